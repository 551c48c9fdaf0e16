//! File helpers every layer uses.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a small file whole or not at all, durably: a temporary file beside it (`path`
/// with its extension replaced by `tmp`: `repo.json` -> `repo.tmp`) with `mode`, synced,
/// renamed over `path`, then the directory synced. A crash leaves the old file or the new
/// one; a failure removes the temporary file.
pub fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = &path.with_extension("tmp");
    let dir = path.parent().unwrap_or(Path::new("."));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| fs::rename(tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written.and_then(|_| sync_dir(dir))
}

/// fsync a directory, so that a file created or renamed in it is durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// fsync a file and then its directory: the file's data and its name are durable.
pub fn sync_file_and_dir(path: &Path) -> std::io::Result<()> {
    fs::File::open(path)?.sync_all()?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}
