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

/// `value` as pretty JSON (and a newline), written by [`write_durably`] with mode 0644: the
/// records and configurations of stores, VMs, experiments and repositories.
pub fn write_json_durably<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    bytes.push(b'\n');
    write_durably(path, &bytes, 0o644)
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

/// Why [`open_shared_redb`] failed.
pub enum RedbOpenError {
    /// Another process holds the whole file (one not in multi-writer mode: an older stasis),
    /// still after the retries.
    Held,
    Db(redb::DatabaseError),
    /// redb panicked on it (it documents that a file damaged outside redb may).
    Damaged,
}

/// Opens (creating) a redb database in multi-writer mode, which every stasis process keeps
/// open at once (redb runs one write transaction at a time across them); retried every 5 ms
/// for up to `wait` while a process in another mode holds the whole file.
pub fn open_shared_redb(
    path: &Path,
    check_integrity: bool,
    wait: std::time::Duration,
) -> Result<redb::Database, RedbOpenError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let owned = path.to_path_buf();
        let opened = std::panic::catch_unwind(move || {
            redb::Database::builder()
                .set_check_integrity_on_open(check_integrity)
                .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
                .create(&owned)
        });
        match opened {
            Ok(Ok(db)) => return Ok(db),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                if std::time::Instant::now() >= deadline {
                    return Err(RedbOpenError::Held);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(Err(e)) => return Err(RedbOpenError::Db(e)),
            Err(_) => return Err(RedbOpenError::Damaged),
        }
    }
}
