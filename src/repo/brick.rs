//! Data bricks: where chunk bytes live. A brick checks every chunk's hash before it stores
//! it, and again on every read.
//!
//! - [`DirBrick`]: a directory of chunk files, `<dir>/<first two hex digits>/<hash hex>`.
//!   A chunk file is written under a temporary name, synced, and renamed into place, so it
//!   is whole or absent.
//! - [`S3Brick`]: objects `<prefix>/<first two hex digits>/<hash hex>` in an S3-compatible
//!   bucket (object_store): MinIO, Ceph RGW, Garage, AWS S3. A PUT is atomic and durable
//!   when it returns. Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, ...); where the bucket is, from the repository's configuration.

use std::borrow::Cow;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::chunk::ChunkHash;
use super::RepoError;

/// Syncs issued at once: a journaling filesystem (ext4's jbd2, XFS's log) makes one
/// journal commit for all the syncs waiting on it, where one sync after another pays a
/// commit each.
const PARALLEL_SYNCS: usize = 16;

/// Runs `f` on every item, from up to [`PARALLEL_SYNCS`] threads; the first error wins.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), RepoError> + Sync,
) -> Result<(), RepoError> {
    if items.len() <= 1 {
        return items.iter().try_for_each(&f);
    }
    let per_thread = items.len().div_ceil(PARALLEL_SYNCS);
    std::thread::scope(|s| {
        let mut results = Vec::new();
        let mut workers = Vec::new();
        for part in items.chunks(per_thread) {
            let run = || part.iter().try_for_each(&f);
            // No thread to be had (a limit reached): this thread syncs that part itself.
            match std::thread::Builder::new().spawn_scoped(s, run) {
                Ok(w) => workers.push(w),
                Err(_) => results.push(part.iter().try_for_each(&f)),
            }
        }
        for w in workers {
            results.push(w.join().unwrap_or_else(|_| {
                Err(RepoError::Io {
                    path: PathBuf::from("<brick>"),
                    source: std::io::Error::other("a brick sync thread panicked"),
                })
            }));
        }
        results.into_iter().collect()
    })
}

fn mtime_secs(f: &fs::DirEntry) -> u64 {
    f.metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// A stored chunk (file or object) is either the chunk's bytes, or one zstd frame of them
/// (with its content size) when that is at least 1/16 smaller: memory and filesystem
/// metadata compress, random data does not and is stored as it is. The hash is always the
/// uncompressed chunk's, and a read accepts what matches it: a frame that decompresses to
/// the hash's bytes, else the stored bytes themselves (a raw chunk that happens to begin
/// with zstd's magic decompresses to something else, or to nothing).
const ZSTD_LEVEL: i32 = 3;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// What to store for `data` (compressed only if that saves at least 1/16).
pub(crate) fn encode(data: &[u8]) -> Cow<'_, [u8]> {
    match COMPRESSOR.with(|c| c.borrow_mut().as_mut().map(|c| c.compress(data))) {
        Some(Ok(c)) if c.len() + data.len() / 16 < data.len() => Cow::Owned(c),
        _ => Cow::Borrowed(data),
    }
}

// One zstd context per thread, made once: a context per chunk would allocate and set up
// several hundred KiB for every 64 KiB stored or read. None if zstd could not make one (the
// chunk is then stored raw, or read as raw).
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// The chunk `hash` names, from what was stored for it; damage is an error, never data.
pub(crate) fn decode(
    hash: &ChunkHash,
    stored: Vec<u8>,
    at: impl FnOnce() -> String,
) -> Result<Vec<u8>, RepoError> {
    if stored.starts_with(&ZSTD_MAGIC) {
        let size = zstd::zstd_safe::get_frame_content_size(&stored)
            .ok()
            .flatten();
        if let Some(size) = size.filter(|s| *s <= super::wire::MAX_CHUNK as u64) {
            let data = DECOMPRESSOR.with(|d| {
                d.borrow_mut()
                    .as_mut()
                    .map(|d| d.decompress(&stored, size as usize))
            });
            if let Some(Ok(data)) = data {
                if hash.matches(&data) {
                    return Ok(data);
                }
            }
        }
    }
    check_read(hash, &stored, at)?;
    Ok(stored)
}

/// A chunk offered for storing must be what its hash names.
fn refuse_mismatch(hash: &ChunkHash, data: &[u8]) -> Result<(), RepoError> {
    if hash.matches(data) {
        return Ok(());
    }
    Err(RepoError::BadChunk {
        hash: *hash,
        why: "its bytes do not match its hash (refused)".into(),
    })
}

/// A chunk read back from `at` must be what its hash names: else it is damaged, never data.
fn check_read(hash: &ChunkHash, data: &[u8], at: impl FnOnce() -> String) -> Result<(), RepoError> {
    if hash.matches(data) {
        return Ok(());
    }
    Err(RepoError::BadChunk {
        hash: *hash,
        why: format!("{} does not match its hash (damaged)", at()),
    })
}

/// Names of chunk files being written (never a hash: `list` skips them).
const TMP_PREFIX: &str = "tmp.";

pub struct DirBrick {
    dir: PathBuf,
    tmp_counter: AtomicU64,
}

impl DirBrick {
    pub fn open(dir: &Path) -> Result<DirBrick, RepoError> {
        fs::create_dir_all(dir).map_err(|e| RepoError::io(dir, e))?;
        Ok(DirBrick {
            dir: dir.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
        })
    }

    pub fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Stores chunks after checking that each one's bytes are what its hash names: all
    /// written to temporary files first, then each synced (fdatasync), then all renamed into
    /// place, so a chunk file is whole or absent (the caller then syncs the directories, see
    /// [`DirBrick::sync_dirs`]). Per-file syncs, not one syncfs: syncfs also writes back
    /// whatever else is dirty on the filesystem (VM disks being written, other tenants),
    /// which made an incremental disk swapout 40% slower in bench/RESULTS.md.
    pub fn put(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        let mut staged: Vec<(PathBuf, PathBuf, fs::File)> = Vec::with_capacity(chunks.len());
        let result = (|| {
            for (hash, data) in chunks {
                refuse_mismatch(hash, data)?;
                let dest = self.chunk_path(hash);
                let parent = dest.parent().expect("chunk paths have a fan-out directory");
                match fs::create_dir(parent) {
                    // Its entry in the brick directory made durable at once, before any
                    // chunk lands in it (at most 256 times in a brick's life).
                    Ok(()) => crate::fsutil::sync_dir(&self.dir)
                        .map_err(|e| RepoError::io(&self.dir, e))?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(RepoError::io(parent, e)),
                }
                let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
                // In the chunk's own directory: the rename stays in one directory, and
                // concurrent uploads do not all contend for one.
                let tmp = parent.join(format!(
                    "{TMP_PREFIX}{}.{}.{n}",
                    hash.to_hex(),
                    std::process::id()
                ));
                let mut f = fs::File::create(&tmp).map_err(|e| RepoError::io(&tmp, e))?;
                let written = f.write_all(&encode(data));
                staged.push((tmp, dest, f));
                written.map_err(|e| RepoError::io(&staged[staged.len() - 1].0, e))?;
            }
            in_parallel(&staged, |(tmp, _, f)| {
                f.sync_data().map_err(|e| RepoError::io(tmp, e))
            })?;
            for (tmp, dest, _) in &staged {
                fs::rename(tmp, dest).map_err(|e| RepoError::io(dest, e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            for (tmp, _, _) in &staged {
                let _ = fs::remove_file(tmp);
            }
        }
        result
    }

    /// Makes the renames of chunks stored so far durable (see [`Brick::sync`]): each fan-out
    /// directory they touched is synced once (a new fan-out directory's own entry was synced
    /// by `put` when it made it).
    pub fn sync_dirs<'a>(
        &self,
        hashes: impl Iterator<Item = &'a ChunkHash>,
    ) -> Result<(), RepoError> {
        let mut dirs: Vec<PathBuf> = hashes
            .filter_map(|h| self.chunk_path(h).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        in_parallel(&dirs, |d| {
            crate::fsutil::sync_dir(d).map_err(|e| RepoError::io(d, e))
        })
    }

    /// The chunk's bytes, checked against its hash.
    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let path = self.chunk_path(hash);
        let stored = fs::read(&path).map_err(|e| RepoError::io(&path, e))?;
        decode(hash, stored, || path.display().to_string())
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), RepoError> {
        let path = self.chunk_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io(&path, e)),
        }
    }

    /// Removes temporary files (a crash between a chunk's write and its rename) last
    /// modified before `cutoff` (seconds since the epoch); returns how many. They are in the
    /// fan-out directories (and, from older versions, in `tmp/`).
    pub fn remove_stale_tmp(&self, cutoff: u64) -> Result<u64, RepoError> {
        let mut removed = 0;
        let entries = fs::read_dir(&self.dir).map_err(|e| RepoError::io(&self.dir, e))?;
        for sub in entries.flatten() {
            let legacy = sub.file_name() == "tmp";
            if !sub.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())
                .map_err(|e| RepoError::io(&sub.path(), e))?
                .flatten()
            {
                let is_tmp = legacy || f.file_name().to_string_lossy().starts_with(TMP_PREFIX);
                if is_tmp && mtime_secs(&f) < cutoff && fs::remove_file(f.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
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
                out.push((hash, mtime_secs(&f)));
            }
        }
        Ok(out)
    }
}

/// Where an S3 brick is (repository configuration; no credentials in it).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct S3Spec {
    pub bucket: String,
    /// Key prefix inside the bucket ("" for none).
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL for S3-compatible servers (MinIO, Ceph RGW, ...); AWS when absent.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

/// The key level under an S3 brick's prefix where nodes' direct uploads land before the
/// server checks them.
const STAGING: &str = "staging";

pub struct S3Brick {
    spec: S3Spec,
    store: object_store::aws::AmazonS3,
    /// object_store is async; bricks are called from plain threads, which block on this.
    rt: tokio::runtime::Runtime,
}

impl S3Brick {
    pub fn open(spec: &S3Spec) -> Result<S3Brick, RepoError> {
        let fail = |why: String| RepoError::Meta {
            path: PathBuf::from(format!("s3://{}/{}", spec.bucket, spec.prefix)),
            why,
        };
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&spec.bucket);
        if let Some(e) = &spec.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(r) = &spec.region {
            b = b.with_region(r);
        }
        let store = b.build().map_err(|e| fail(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-brick")
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        Ok(S3Brick {
            spec: spec.clone(),
            store,
            rt,
        })
    }

    fn key(&self, hash: &ChunkHash) -> object_store::path::Path {
        let hex = hash.to_hex();
        self.prefixed(&format!("{}/{hex}", &hex[..2]))
    }

    /// The brick's prefix as a listing root (None: the whole bucket).
    fn root(&self) -> Option<object_store::path::Path> {
        let prefix = self.spec.prefix.trim_matches('/');
        (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix))
    }

    fn err(&self, hash: Option<&ChunkHash>, e: object_store::Error) -> RepoError {
        let at = match hash {
            Some(h) => self.key(h).to_string(),
            None => self.spec.prefix.clone(),
        };
        self.err_at(&at, e)
    }

    /// An error of the object at key `at`.
    fn err_at(&self, at: &str, e: object_store::Error) -> RepoError {
        let kind = match e {
            object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
            _ => std::io::ErrorKind::Other,
        };
        RepoError::Io {
            path: PathBuf::from(format!("s3://{}/{at}", self.spec.bucket)),
            source: std::io::Error::new(kind, e.to_string()),
        }
    }

    pub fn put(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), RepoError> {
        use object_store::ObjectStoreExt;
        refuse_mismatch(hash, data)?;
        let payload = object_store::PutPayload::from(encode(data).into_owned());
        self.rt
            .block_on(self.store.put(&self.key(hash), payload))
            .map(|_| ())
            .map_err(|e| self.err(Some(hash), e))
    }

    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        self.get_at(&self.key(hash), hash)
    }

    /// The object at `key`, checked to be the chunk `hash` names.
    fn get_at(
        &self,
        key: &object_store::path::Path,
        hash: &ChunkHash,
    ) -> Result<Vec<u8>, RepoError> {
        use object_store::ObjectStoreExt;
        let data = self
            .rt
            .block_on(async { self.store.get(key).await?.bytes().await })
            .map_err(|e| self.err_at(key.as_ref(), e))?;
        decode(hash, Vec::from(data), || {
            format!("s3://{}/{key}", self.spec.bucket)
        })
    }

    fn prefixed(&self, rest: &str) -> object_store::path::Path {
        let prefix = self.spec.prefix.trim_matches('/');
        if prefix.is_empty() {
            object_store::path::Path::from(rest)
        } else {
            object_store::path::Path::from(format!("{prefix}/{rest}"))
        }
    }

    /// Where a node's direct upload of a chunk lands first (`<prefix>/staging/<session>/
    /// <hash>`): never the chunk's own key, which only the server writes, after checking.
    fn staging_key(&self, session: &str, hash: &ChunkHash) -> object_store::path::Path {
        self.prefixed(&format!("{STAGING}/{session}/{}", hash.to_hex()))
    }

    /// A presigned `GET` of the chunk's object, valid `ttl`: a node given it reads the
    /// bucket straight, without credentials of its own.
    pub fn download_url(
        &self,
        hash: &ChunkHash,
        ttl: std::time::Duration,
    ) -> Result<String, RepoError> {
        self.sign(axum::http::Method::GET, &self.key(hash), hash, ttl)
    }

    /// A presigned `PUT` to the chunk's staging key for `session`, valid `ttl`.
    pub fn upload_url(
        &self,
        session: &str,
        hash: &ChunkHash,
        ttl: std::time::Duration,
    ) -> Result<String, RepoError> {
        self.sign(
            axum::http::Method::PUT,
            &self.staging_key(session, hash),
            hash,
            ttl,
        )
    }

    fn sign(
        &self,
        method: axum::http::Method,
        key: &object_store::path::Path,
        hash: &ChunkHash,
        ttl: std::time::Duration,
    ) -> Result<String, RepoError> {
        use object_store::signer::Signer;
        self.rt
            .block_on(self.store.signed_url(method, key, ttl))
            .map(|u| u.to_string())
            .map_err(|e| self.err(Some(hash), e))
    }

    /// Takes in a chunk a node put at its staging key: read, checked against its hash, then
    /// copied (server side) to the chunk's own key; the staging object is removed either way.
    pub fn accept_staged(&self, session: &str, hash: &ChunkHash) -> Result<u32, RepoError> {
        use object_store::ObjectStoreExt;
        let staged = self.staging_key(session, hash);
        let result = self.get_at(&staged, hash).and_then(|data| {
            self.rt
                .block_on(self.store.copy(&staged, &self.key(hash)))
                .map(|_| data.len() as u32)
                .map_err(|e| self.err(Some(hash), e))
        });
        self.discard_staged(session, hash);
        result
    }

    /// Drops what a node put at a chunk's staging key, unread.
    pub fn discard_staged(&self, session: &str, hash: &ChunkHash) {
        use object_store::ObjectStoreExt;
        let _ = self
            .rt
            .block_on(self.store.delete(&self.staging_key(session, hash)));
    }

    /// Staging objects older than `cutoff` (uploads never taken in): removed.
    fn remove_stale_staging(&self, cutoff: u64) -> Result<u64, RepoError> {
        use futures_util::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let staging = self.prefixed(STAGING);
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&staging)).try_collect())
            .map_err(|e| self.err(None, e))?;
        let mut removed = 0;
        for m in metas {
            if (m.last_modified.timestamp().max(0) as u64) < cutoff {
                match self.rt.block_on(self.store.delete(&m.location)) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                    Err(e) => return Err(self.err(None, e)),
                }
            }
        }
        Ok(removed)
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), RepoError> {
        use object_store::ObjectStoreExt;
        match self.rt.block_on(self.store.delete(&self.key(hash))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(Some(hash), e)),
        }
    }

    /// One listing of the fan-out level: fails if the bucket is missing or refuses us.
    fn probe(&self) -> Result<(), RepoError> {
        use object_store::ObjectStore;
        self.rt
            .block_on(self.store.list_with_delimiter(self.root().as_ref()))
            .map(|_| ())
            .map_err(|e| self.err(None, e))
    }

    pub fn list(&self) -> Result<Vec<(ChunkHash, u64)>, RepoError> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStore;
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(self.root().as_ref()).try_collect())
            .map_err(|e| self.err(None, e))?;
        let staging = self.prefixed(STAGING);
        Ok(metas
            .into_iter()
            .filter(|m| !m.location.prefix_matches(&staging))
            .filter_map(|m| {
                let hash = ChunkHash::from_hex(m.location.filename()?)?;
                Some((hash, m.last_modified.timestamp().max(0) as u64))
            })
            .collect())
    }
}

/// A brick of either kind (static dispatch).
pub enum Brick {
    Dir(DirBrick),
    S3(S3Brick),
}

impl Brick {
    pub fn put(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        match self {
            Brick::Dir(b) => b.put(chunks),
            Brick::S3(b) => chunks.iter().try_for_each(|(h, d)| b.put(h, d)),
        }
    }

    /// Makes the chunks stored so far durable (directory bricks sync their directories;
    /// an S3 PUT is durable when it returns).
    pub fn sync<'a>(&self, hashes: impl Iterator<Item = &'a ChunkHash>) -> Result<(), RepoError> {
        match self {
            Brick::Dir(b) => b.sync_dirs(hashes),
            Brick::S3(_) => Ok(()),
        }
    }

    pub fn get(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        match self {
            Brick::Dir(b) => b.get(hash),
            Brick::S3(b) => b.get(hash),
        }
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), RepoError> {
        match self {
            Brick::Dir(b) => b.remove(hash),
            Brick::S3(b) => b.remove(hash),
        }
    }

    pub fn list(&self) -> Result<Vec<(ChunkHash, u64)>, RepoError> {
        match self {
            Brick::Dir(b) => b.list(),
            Brick::S3(b) => b.list(),
        }
    }

    /// See [`DirBrick::remove_stale_tmp`]; an S3 brick's are the staging objects of direct
    /// uploads never taken in.
    pub fn remove_stale_tmp(&self, cutoff: u64) -> Result<u64, RepoError> {
        match self {
            Brick::Dir(b) => b.remove_stale_tmp(cutoff),
            Brick::S3(b) => b.remove_stale_staging(cutoff),
        }
    }

    /// Checks the brick can be reached (an S3 bucket that exists, credentials it accepts).
    pub fn probe(&self) -> Result<(), RepoError> {
        match self {
            Brick::Dir(_) => Ok(()),
            Brick::S3(b) => b.probe(),
        }
    }
}

#[cfg(test)]
mod compression_tests {
    use super::*;

    fn brick() -> (tempfile::TempDir, DirBrick) {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBrick::open(&dir.path().join("b")).unwrap();
        (dir, b)
    }

    #[test]
    fn compressible_chunks_are_stored_smaller_and_read_back_exactly() {
        let (_d, b) = brick();
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        let h = ChunkHash::of(&data);
        b.put(&[(h, &data)]).unwrap();
        let stored = fs::metadata(b.chunk_path(&h)).unwrap().len();
        assert!(
            stored < 8192,
            "stored {stored} bytes for a very compressible chunk"
        );
        assert_eq!(b.get(&h).unwrap(), data);
    }

    #[test]
    fn a_raw_chunk_that_begins_with_the_zstd_magic_reads_back() {
        let (_d, b) = brick();
        // Incompressible (stored raw), and beginning with zstd's magic number.
        let mut data = vec![0u8; 16384];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        data[..4].copy_from_slice(&ZSTD_MAGIC);
        let h = ChunkHash::of(&data);
        b.put(&[(h, &data)]).unwrap();
        assert!(
            fs::read(b.chunk_path(&h)).unwrap() == data,
            "not stored raw"
        );
        assert!(b.get(&h).unwrap() == data);
    }

    #[test]
    fn every_damage_to_a_compressed_chunk_is_caught() {
        let (_d, b) = brick();
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 7) as u8).collect();
        let h = ChunkHash::of(&data);
        b.put(&[(h, &data)]).unwrap();
        let path = b.chunk_path(&h);
        let good = fs::read(&path).unwrap();
        assert!(good.starts_with(&ZSTD_MAGIC));
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(&path, &bad).unwrap();
            assert!(b.get(&h).is_err(), "a flip at byte {i} was not caught");
        }
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(b.get(&h).is_err());
    }
}
