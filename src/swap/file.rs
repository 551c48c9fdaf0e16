//! Files kept in the repository as chunks: a VM's memory image (page-sized chunks) and its
//! boot files. Only the file's data extents are read (SEEK_DATA/SEEK_HOLE: a mapped-ram
//! memory image is sparse, QEMU leaves its zero pages as holes), and a chunk of zeros is
//! never stored: the manifest names the chunks that are not all zeros, the rest of the file
//! reads as zeros. Identical chunks (the same page in two VMs, or in two swapouts of one)
//! are stored once, by the same negotiation as disk chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{pipeline, Counters, SwapError};
use crate::repo::{ChunkHash, Kind, Manifest, ManifestInfo, RepoError, RepoHandle, UploadSession};

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct FileSummary {
    pub manifest: String,
    /// The file's length.
    pub size: u64,
    /// Bytes in the file's data extents (what was read).
    pub bytes_scanned: u64,
    /// Chunks in the manifest (not all zeros).
    pub chunks: u64,
    /// Chunks the repository already held (dedup).
    pub chunks_reused: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub seconds: f64,
}

fn io_err(path: &Path, e: std::io::Error) -> SwapError {
    SwapError::Repo(RepoError::io(path, e))
}

/// The data extents of `file` as (offset, length), in order; a filesystem without
/// SEEK_DATA makes it one extent, the whole file.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at: u64 = 0;
    while at < len {
        // SAFETY: lseek on an open descriptor; offsets are checked below.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return vec![(0, len)];
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (data, hole) = (data as u64, if hole < 0 { len } else { hole as u64 });
        if hole <= data {
            break;
        }
        out.push((data, hole.min(len) - data));
        at = hole;
    }
    out
}

/// Stores file `path` in the repository as chunks of `chunk_size`, and returns the manifest
/// (not committed: the caller commits it, under the same upload session, before or along
/// with what names it). `name` is the manifest's name, `source` says what the file is.
pub fn swapout_file(
    path: &Path,
    chunk_size: usize,
    name: &str,
    source: &str,
    repo: &RepoHandle,
    upload: &UploadSession,
    progress: &dyn Fn(&Counters),
) -> Result<(Manifest, FileSummary), SwapError> {
    let started = Instant::now();
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let cs = chunk_size as u64;
    let mut indices: Vec<u64> = Vec::new();
    for (off, n) in data_extents(&file, len) {
        for i in off / cs..(off + n).div_ceil(cs) {
            if indices.last() != Some(&i) {
                indices.push(i);
            }
        }
    }
    let read = |index: u64| -> Result<Vec<u8>, SwapError> {
        let off = index * cs;
        let mut buf = vec![0u8; (len - off).min(cs) as usize];
        file.read_exact_at(&mut buf, off)
            .map_err(|e| io_err(path, e))?;
        Ok(buf)
    };
    // A chunk of zeros (full, or the short last one) is left out.
    let zero_full = ChunkHash::of(&vec![0u8; chunk_size]);
    let zero_last = ChunkHash::of(&vec![0u8; (len % cs) as usize]);
    let keep = |_: u64, h: &ChunkHash| *h != zero_full && *h != zero_last;
    let counters = Counters::default();
    let items = indices.into_iter().map(|i| (i, None)).collect();
    let entries = pipeline(
        items, chunk_size, &read, &keep, repo, upload, &counters, progress,
    )?;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let summary = FileSummary {
        manifest: name.into(),
        size: len,
        bytes_scanned: get(&counters.bytes_hashed),
        chunks: entries.len() as u64,
        chunks_reused: get(&counters.chunks_present),
        chunks_uploaded: get(&counters.chunks_uploaded),
        bytes_uploaded: get(&counters.bytes_uploaded),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((
        file_manifest(name, source, len, chunk_size, entries),
        summary,
    ))
}

/// A file manifest with these entries.
pub fn file_manifest(
    name: &str,
    source: &str,
    size: u64,
    chunk_size: usize,
    entries: Vec<(u64, ChunkHash)>,
) -> Manifest {
    Manifest {
        info: ManifestInfo {
            name: name.into(),
            kind: Kind::File,
            size,
            chunk_size: chunk_size as u32,
            image: None,
            parent: None,
            source: Some(source.into()),
            created_at: crate::repo::now_secs(),
            parts: Default::default(),
            config: None,
        },
        entries,
    }
}

/// Rebuilds the file of manifest `name` at `path` (sparse: only its chunks are written),
/// each chunk checked against its hash. Written to a temporary file and renamed: `path` is
/// whole or absent. `progress(done, total)` in chunks.
pub fn restore_file(
    repo: &RepoHandle,
    name: &str,
    path: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(), SwapError> {
    let m = repo.find(Kind::File, name)?.ok_or_else(|| {
        RepoError::NotFound(format!("file manifest {name:?} is not in {}", repo.url()))
    })?;
    let tmp = path.with_extension("partial");
    let write = || -> Result<(), SwapError> {
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.set_len(m.info.size).map_err(|e| io_err(&tmp, e))?;
        let cs = m.info.chunk_size as u64;
        let total = m.entries.len() as u64;
        // Chunks are fetched a few at a time on threads: a served repository answers each
        // with a round trip.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| -> Result<(), SwapError> {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| -> Result<(), SwapError> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((index, hash)) = m.entries.get(i) else {
                                return Ok(());
                            };
                            // get_chunk checks the bytes against the hash.
                            let data = repo.get_chunk(hash)?;
                            let off = index * cs;
                            if off + data.len() as u64 > m.info.size {
                                return Err(SwapError::Failed(format!(
                                    "chunk {index} of {name} lies past the file's end"
                                )));
                            }
                            f.write_all_at(&data, off).map_err(|e| io_err(&tmp, e))?;
                            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if d % 256 == 0 {
                                progress(d, total);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .unwrap_or_else(|_| Err(SwapError::Failed("a fetch thread panicked".into())))?;
            }
            Ok(())
        })?;
        progress(total, total);
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
