//! A data brick: a directory of chunk files, `<dir>/<first two hex digits>/<hash hex>`.
//! A chunk file holds exactly the chunk's bytes; it is written to a temporary file, synced,
//! and renamed into place, so a chunk file is whole or absent. A brick checks every chunk's
//! hash before it stores it, and the repository checks it again on every read.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::chunk::ChunkHash;
use super::RepoError;

pub struct Brick {
    dir: PathBuf,
    tmp_counter: AtomicU64,
}

impl Brick {
    pub fn open(dir: &Path) -> Result<Brick, RepoError> {
        fs::create_dir_all(dir.join("tmp")).map_err(|e| RepoError::io(dir, e))?;
        Ok(Brick {
            dir: dir.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Stores a chunk durably (file synced; the caller syncs the directory, see
    /// [`Brick::sync_dirs`]) after checking that `data` is what `hash` names.
    pub fn put(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), RepoError> {
        if !hash.matches(data) {
            return Err(RepoError::BadChunk {
                hash: *hash,
                why: "its bytes do not match its hash (refused)".into(),
            });
        }
        let dest = self.chunk_path(hash);
        let parent = dest.parent().expect("chunk paths have a fan-out directory");
        fs::create_dir_all(parent).map_err(|e| RepoError::io(parent, e))?;
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp =
            self.dir
                .join("tmp")
                .join(format!("{}.{}.{n}", hash.to_hex(), std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            fs::rename(&tmp, &dest)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            RepoError::io(&dest, e)
        })
    }

    /// Makes the renames of chunks stored so far durable.
    pub fn sync_dirs<'a>(
        &self,
        hashes: impl Iterator<Item = &'a ChunkHash>,
    ) -> Result<(), RepoError> {
        let mut dirs: Vec<PathBuf> = hashes
            .map(|h| {
                self.chunk_path(h)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| RepoError::io(&d, e))?;
        }
        Ok(())
    }

    /// The chunk's bytes, checked against its hash.
    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let path = self.chunk_path(hash);
        let data = fs::read(&path).map_err(|e| RepoError::io(&path, e))?;
        if !hash.matches(&data) {
            return Err(RepoError::BadChunk {
                hash: *hash,
                why: format!("{} does not match its hash (damaged)", path.display()),
            });
        }
        Ok(data)
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), RepoError> {
        let path = self.chunk_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io(&path, e)),
        }
    }

    /// Every chunk file in the brick, with its modification time (seconds since the epoch).
    pub fn list(&self) -> Result<Vec<(ChunkHash, u64)>, RepoError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| RepoError::io(&self.dir, e))?;
        for fan in entries.flatten() {
            let name = fan.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !fan.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(fan.path())
                .map_err(|e| RepoError::io(&fan.path(), e))?
                .flatten()
            {
                let Some(hash) = ChunkHash::from_hex(&f.file_name().to_string_lossy()) else {
                    continue;
                };
                let mtime = f
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                out.push((hash, mtime));
            }
        }
        Ok(out)
    }
}
