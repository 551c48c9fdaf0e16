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
/// whole or absent; `durable`: synced before the rename (not for scratch files read at
/// once). `progress(done, total)` in chunks. Returns how many chunks it wrote.
pub fn restore_file(
    repo: &RepoHandle,
    name: &str,
    path: &Path,
    durable: bool,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<u64, SwapError> {
    let m = repo.find(Kind::File, name)?.ok_or_else(|| {
        RepoError::NotFound(format!("file manifest {name:?} is not in {}", repo.url()))
    })?;
    let tmp = path.with_extension("partial");
    let write = || -> Result<u64, SwapError> {
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.set_len(m.info.size).map_err(|e| io_err(&tmp, e))?;
        fetch_chunks_into(repo, &m, &f, &tmp, progress)?;
        if durable {
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        Ok(m.entries.len() as u64)
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the chunks of manifest `m` (file or image) into `f` (at `path`, `m.info.size`
/// long), each at its index times the chunk size, fetched on [`super::HYDRATE_WORKERS`]
/// threads: a served repository answers each with a round trip. `get_chunk` checks each
/// against its hash; the first failure stops the other threads. `progress(done, total)`
/// in chunks.
pub(crate) fn fetch_chunks_into(
    repo: &RepoHandle,
    m: &Manifest,
    f: &File,
    path: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(), SwapError> {
    let cs = m.info.chunk_size as u64;
    let total = m.entries.len() as u64;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicU64::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let fetch = || -> Result<(), SwapError> {
        while !failed.load(Ordering::Relaxed) {
            let Some((index, hash)) = m.entries.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let data = repo.get_chunk(hash)?;
            let off = index * cs;
            if off + data.len() as u64 > m.info.size {
                return Err(SwapError::Failed(format!(
                    "chunk {index} of {} lies past its end",
                    m.info.name
                )));
            }
            f.write_all_at(&data, off).map_err(|e| io_err(path, e))?;
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d % 256 == 0 {
                progress(d, total);
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..super::HYDRATE_WORKERS)
            .map(|_| s.spawn(|| fetch().inspect_err(|_| failed.store(true, Ordering::Relaxed))))
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(SwapError::Failed("a fetch thread panicked".into())))
        })
    })?;
    progress(total, total);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse file with data, a hole, a run of written zeros and a short tail.
    fn sample(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("mem.img");
        let mut want = vec![0u8; 1 << 20];
        for (i, b) in want[..40_000].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8 + 1;
        }
        want[700_000..700_005].copy_from_slice(b"tail!");
        let len = want.len() as u64 + 1000; // a short last chunk
        want.resize(len as usize, 0);
        let f = File::create(&path).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&want[..40_000], 0).unwrap();
        f.write_all_at(&vec![0u8; 100_000], 300_000).unwrap(); // zeros, written out
        f.write_all_at(&want[700_000..700_005], 700_000).unwrap();
        (path, want)
    }

    #[test]
    fn a_file_roundtrips_sparse_without_its_zero_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (path, want) = sample(dir.path());
        let repo = RepoHandle::open(dir.path().join("repo").to_str().unwrap(), true).unwrap();
        let upload = repo.begin_upload().unwrap();
        let (m, s) = swapout_file(&path, 16384, "m", "test", &repo, &upload, &|_| {}).unwrap();
        // Chunks 0-2 hold the data, 42 holds the tail; the written zeros are left out.
        assert_eq!(
            m.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 42]
        );
        assert_eq!(s.chunks_uploaded, 4);
        repo.commit(&m).unwrap();
        drop(upload);
        let out = dir.path().join("restored.img");
        restore_file(&repo, "m", &out, true, &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), want);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated < 200_000,
            "restored file is not sparse: {allocated} bytes"
        );
        // The same file again adds nothing.
        let upload = repo.begin_upload().unwrap();
        let (_, s) = swapout_file(&path, 16384, "m2", "test", &repo, &upload, &|_| {}).unwrap();
        assert_eq!((s.chunks_uploaded, s.chunks_reused), (0, 4));
    }

    #[test]
    fn a_damaged_chunk_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path());
        let repo_dir = dir.path().join("repo");
        let repo = RepoHandle::open(repo_dir.to_str().unwrap(), true).unwrap();
        let upload = repo.begin_upload().unwrap();
        let (m, _) = swapout_file(&path, 16384, "m", "test", &repo, &upload, &|_| {}).unwrap();
        repo.commit(&m).unwrap();
        drop(upload);
        // Flip a byte in the stored copy of chunk 0.
        let hex = m.entries[0].1.to_hex();
        let chunk = walk(&repo_dir)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == hex))
            .expect("chunk file");
        let mut bytes = std::fs::read(&chunk).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&chunk, bytes).unwrap();
        let out = dir.path().join("restored.img");
        assert!(restore_file(&repo, "m", &out, true, &|_, _| {}).is_err());
        assert!(!out.exists() && !out.with_extension("partial").exists());
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
