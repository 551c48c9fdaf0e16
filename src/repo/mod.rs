//! The content-addressed repository: where swapped-out disks live.
//!
//! Metadata is decoupled from data. The metadata service (`meta.redb`, redb) holds the chunk
//! index (hash -> brick, size, last use) and the manifests; data bricks hold the chunk bytes
//! ([`brick`]). The repository knows nothing of block devices or disks: it stores chunks and
//! the manifests that name them. On-disk layout and formats: kernel-notes/formats.md.
//!
//! Invariants:
//! - A chunk is in the index only once its file is durable in a brick (file synced, then
//!   its directory), and every chunk's hash is checked before it is stored and when read.
//! - A manifest is committed in one transaction that first checks that every chunk it names
//!   is in the index: no manifest ever references a chunk the repository does not hold.
//! - Garbage collection removes chunks from the index before it deletes their files, and
//!   holds the repository lock exclusively, while uploads hold it shared.

pub mod brick;
pub mod chunk;
pub mod manifest;
mod meta;
pub mod remote;
pub mod server;
pub mod tls;
pub mod token;
pub mod wire;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use chunk::ChunkHash;
pub use manifest::{Kind, Manifest, ManifestInfo, Removal};

use brick::{Brick, DirBrick};
use meta::Meta;

const CONFIG_FILE: &str = "repo.json";
const FORMAT_NAME: &str = "stasis-repo";
const FORMAT_VERSION: u32 = 1;
/// Chunks no manifest references are kept this long after their last use (upload or a
/// swapout finding them present), so that a swapout in flight never loses what it counted on.
pub const DEFAULT_GC_GRACE_SECS: u64 = 3600;
/// How long a presigned URL for one chunk stays valid: long enough for one transfer.
const DIRECT_URL_TTL: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chunk {hash}: {why}")]
    BadChunk { hash: ChunkHash, why: String },
    #[error("manifest: {0}")]
    BadManifest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error(
        "manifest {name} names {missing} chunk(s) the repository does not hold (first: {first})"
    )]
    MissingChunks {
        name: String,
        missing: usize,
        first: ChunkHash,
    },
    #[error("repository metadata {path}: {why}")]
    Meta { path: PathBuf, why: String },
    #[error("{0}")]
    Usage(String),
    /// A served repository refused our key or token.
    #[error("repository refused access: {0}")]
    Denied(String),
    /// A served repository could not be reached or failed.
    #[error("repository server: {0}")]
    Remote(String),
}

impl RepoError {
    pub fn io(path: &Path, source: std::io::Error) -> RepoError {
        RepoError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Errors the user caused (a wrong name, a taken name, a bad URL): nothing was changed.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RepoError::NotFound(_)
                | RepoError::Exists(_)
                | RepoError::Usage(_)
                | RepoError::Denied(_)
        )
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Config {
    format: String,
    version: u32,
    bricks: Vec<BrickSpec>,
}

/// One brick in the configuration: a directory (relative to the repository or absolute), or
/// `{"s3": {...}}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum BrickSpec {
    Dir(PathBuf),
    S3 { s3: brick::S3Spec },
}

impl BrickSpec {
    /// `s3://BUCKET[/PREFIX]` (endpoint and region from the arguments), or a directory.
    pub fn parse(
        s: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<BrickSpec, RepoError> {
        let Some(rest) = s.strip_prefix("s3://") else {
            return Ok(BrickSpec::Dir(PathBuf::from(s)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(RepoError::Usage(format!("brick {s:?}: no bucket")));
        }
        Ok(BrickSpec::S3 {
            s3: brick::S3Spec {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
                endpoint: endpoint.map(str::to_string),
                region: region.map(str::to_string),
            },
        })
    }
}

/// What `stat` reports.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct RepoStat {
    pub chunks: u64,
    pub stored_bytes: u64,
    pub disk_manifests: u64,
    pub image_manifests: u64,
    pub file_manifests: u64,
    pub vm_manifests: u64,
    pub experiment_manifests: u64,
    /// Bytes the manifests describe (their chunks, counted once per manifest).
    pub logical_bytes: u64,
    /// logical / stored.
    pub dedup_ratio: f64,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct GcReport {
    pub chunks_live: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Unreferenced chunks kept because they were used within the grace period.
    pub chunks_in_grace: u64,
    /// Brick files the index did not know (left by a crash between write and index).
    pub orphan_files_removed: u64,
}

#[derive(Serialize, Debug, Default, Clone)]
pub struct RepoVerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// One line per damaged or missing chunk.
    pub damaged: Vec<String>,
    /// Manifests that name a damaged or missing chunk.
    pub broken_manifests: Vec<String>,
}

pub struct Repo {
    root: PathBuf,
    meta: Meta,
    bricks: Vec<Brick>,
}

/// The repository lock: uploads hold it shared, garbage collection exclusive.
pub struct RepoLock {
    _file: fs::File,
}

impl Repo {
    /// `spec` is `file:///path` or a path. Creates an empty repository (one brick,
    /// `brick0`) if the directory has none.
    pub fn open(spec: &str) -> Result<Repo, RepoError> {
        Self::open_with(spec, true)
    }

    /// Opens a repository that must exist (reading from one: swapin, hydration). A missing
    /// path is an error, not a new empty repository (an unmounted share must not look empty).
    pub fn open_existing(spec: &str) -> Result<Repo, RepoError> {
        Self::open_with(spec, false)
    }

    fn open_with(spec: &str, create: bool) -> Result<Repo, RepoError> {
        let root = parse_spec(spec)?;
        if !create && !root.join(CONFIG_FILE).exists() {
            return Err(RepoError::NotFound(format!(
                "no repository at {} ({} missing)",
                root.display(),
                CONFIG_FILE
            )));
        }
        fs::create_dir_all(&root).map_err(|e| RepoError::io(&root, e))?;
        let config_path = root.join(CONFIG_FILE);
        let config = match fs::read(&config_path) {
            Ok(bytes) => {
                let c: Config = serde_json::from_slice(&bytes).map_err(|e| RepoError::Meta {
                    path: config_path.clone(),
                    why: e.to_string(),
                })?;
                if c.format != FORMAT_NAME || c.version != FORMAT_VERSION || c.bricks.is_empty() {
                    return Err(RepoError::Meta {
                        path: config_path,
                        why: format!("not a {FORMAT_NAME} version {FORMAT_VERSION} configuration"),
                    });
                }
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Self::init(&root, &[BrickSpec::Dir(PathBuf::from("brick0"))])?
            }
            Err(e) => return Err(RepoError::io(&config_path, e)),
        };
        let bricks = config
            .bricks
            .iter()
            .map(|b| match b {
                BrickSpec::Dir(dir) => DirBrick::open(&root.join(dir)).map(Brick::Dir),
                BrickSpec::S3 { s3 } => brick::S3Brick::open(s3).map(Brick::S3),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = Meta::open(&root.join("meta.redb"))?;
        Ok(Repo { root, meta, bricks })
    }

    /// Writes a new repository's configuration (`repo init`).
    pub fn init(root: &Path, bricks: &[BrickSpec]) -> Result<Config, RepoError> {
        fs::create_dir_all(root).map_err(|e| RepoError::io(root, e))?;
        let path = root.join(CONFIG_FILE);
        if path.exists() {
            return Err(RepoError::Exists(format!(
                "{} is already a repository",
                root.display()
            )));
        }
        let config = Config {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            bricks: bricks.to_vec(),
        };
        crate::fsutil::write_json_durably(&path, &config).map_err(|e| RepoError::io(&path, e))?;
        Ok(config)
    }

    /// Checks that every brick can be reached.
    pub fn probe_bricks(&self) -> Result<(), RepoError> {
        self.bricks.iter().try_for_each(Brick::probe)
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn lock(&self, exclusive: bool) -> Result<RepoLock, RepoError> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RepoError::io(&path, e))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            return Err(RepoError::io(&path, std::io::Error::last_os_error()));
        }
        Ok(RepoLock { _file: file })
    }

    /// Held by a swapout while it uploads and commits: garbage collection waits for it.
    pub fn upload_lock(&self) -> Result<RepoLock, RepoError> {
        self.lock(false)
    }

    /// Which of `hashes` the repository lacks (true = missing). Those it has are marked as
    /// used now, which keeps them from garbage collection for the grace period.
    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<bool>, RepoError> {
        self.meta.missing(hashes, now_secs())
    }

    fn brick_for(&self, hash: &ChunkHash) -> u16 {
        (hash.0[0] as usize % self.bricks.len()) as u16
    }

    /// Stores chunks (each checked against its hash first), makes them durable, then indexes
    /// them. A chunk already held is written again with the same bytes (the caller asked
    /// `missing` first, so that is rare).
    pub fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        let mut per_brick: Vec<Vec<(ChunkHash, &[u8])>> = vec![Vec::new(); self.bricks.len()];
        for chunk in chunks {
            per_brick[self.brick_for(&chunk.0) as usize].push(*chunk);
        }
        for (brick, mine) in self.bricks.iter().zip(&per_brick) {
            if !mine.is_empty() {
                brick.put(mine)?;
                brick.sync(mine.iter().map(|(h, _)| h))?;
            }
        }
        let entries: Vec<(ChunkHash, u16, u32)> = chunks
            .iter()
            .map(|(h, d)| (*h, self.brick_for(h), d.len() as u32))
            .collect();
        self.meta.index(&entries, now_secs())
    }

    /// A presigned URL that lets a node fetch a chunk straight from its S3 brick; None for
    /// a chunk in a directory brick, or not held.
    pub fn download_url(&self, hash: &ChunkHash) -> Result<Option<String>, RepoError> {
        // A repository of directories answers without an index lookup.
        if !self.has_s3_bricks() {
            return Ok(None);
        }
        match self.meta.chunk(hash)? {
            Some((brick, _)) => match self.bricks.get(brick as usize) {
                Some(Brick::S3(b)) => b.download_url(hash, DIRECT_URL_TTL).map(Some),
                _ => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Whether any brick is an S3 bucket: only then do nodes of a served repository move
    /// chunks straight to and from a brick.
    pub fn has_s3_bricks(&self) -> bool {
        self.bricks.iter().any(|b| matches!(b, Brick::S3(_)))
    }

    /// Presigned URLs that let upload session `session` put chunks straight into their S3
    /// brick, at a staging key of that session (never the chunk's own key). None for a chunk
    /// whose brick is a directory: it goes through [`Repo::put_chunks`]. What a node puts
    /// there counts only once [`Repo::take_uploaded`] has checked it (and dropped it unread
    /// if the chunk is held by then).
    pub fn upload_urls(
        &self,
        session: &str,
        hashes: &[ChunkHash],
    ) -> Result<Vec<Option<String>>, RepoError> {
        hashes
            .iter()
            .map(|h| match &self.bricks[self.brick_for(h) as usize] {
                Brick::S3(b) => b.upload_url(session, h, DIRECT_URL_TTL).map(Some),
                Brick::Dir(_) => Ok(None),
            })
            .collect()
    }

    /// Takes in chunks session `session` put at their staging keys: each is read, checked
    /// against its hash and copied to its own key by the server, then the batch is indexed.
    /// A chunk held already is not touched (its staging object is dropped). A chunk that is
    /// missing or does not match fails the call, and nothing of the batch is indexed.
    pub fn take_uploaded(&self, session: &str, hashes: &[ChunkHash]) -> Result<(), RepoError> {
        let mut entries = Vec::with_capacity(hashes.len());
        // One index lookup for the batch (which also marks the held ones as used now).
        let missing = self.meta.missing(hashes, now_secs())?;
        for (h, missing) in hashes.iter().zip(missing) {
            let brick = self.brick_for(h);
            let Brick::S3(b) = &self.bricks[brick as usize] else {
                return Err(RepoError::Usage(format!(
                    "chunk {h} belongs in a directory brick: upload it, not a URL"
                )));
            };
            if !missing {
                b.discard_staged(session, h);
                continue;
            }
            let size = b.accept_staged(session, h)?;
            entries.push((*h, brick, size));
        }
        self.meta.index(&entries, now_secs())
    }

    /// A chunk's bytes, checked against its hash (a damaged chunk is an error, never data).
    pub fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let guess = self.brick_for(hash) as usize;
        match self.bricks[guess].get(hash) {
            Ok(data) => Ok(data),
            Err(RepoError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // Not where the hash says: the index knows (bricks added since it was stored).
                match self.meta.chunk(hash)? {
                    Some((brick, _)) if (brick as usize) < self.bricks.len() => {
                        self.bricks[brick as usize].get(hash)
                    }
                    _ => Err(RepoError::NotFound(format!(
                        "chunk {hash} is not in the repository"
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Commits a manifest: atomically, and only if every chunk it names is held (and, for a
    /// disk, its image manifest exists). Committing the same manifest again is a no-op.
    pub fn commit(&self, m: &Manifest) -> Result<(), RepoError> {
        self.meta.commit(m)
    }

    /// The manifest of that kind and name, if there is one.
    pub fn find(&self, kind: Kind, name: &str) -> Result<Option<Manifest>, RepoError> {
        self.meta.manifest(kind, name)
    }

    pub fn manifest(&self, name: &str) -> Result<Manifest, RepoError> {
        no_manifest(self.find(Kind::Disk, name)?, name, &self.url())
    }

    /// Every manifest's info and entry count, disks then images, by name.
    pub fn list(&self) -> Result<Vec<(ManifestInfo, u64)>, RepoError> {
        self.meta.list()
    }

    pub fn stat(&self) -> Result<RepoStat, RepoError> {
        self.meta.stat()
    }

    /// Removes manifests (see [`Removal`]), at once or not at all. A manifest another one
    /// names (an image its disks name, a part of a VM or an experiment) is refused while that
    /// one stays. With `with_parts`, a VM's or an experiment's parts go with it, except those
    /// another remaining manifest names. The chunks stay until `gc` finds them unnamed after
    /// the grace period. A manifest's parent is history, not a reference: every manifest
    /// lists all of its chunks. Disk manifests in `in_use` are refused too (the repository
    /// cannot see other nodes' disks: remove a manifest once its swapins are hydrated).
    pub fn remove(&self, what: &Removal) -> Result<Vec<(Kind, String)>, RepoError> {
        self.meta.remove(what)
    }

    /// Mark (every chunk a manifest names) and sweep (unreferenced chunks unused for
    /// `grace_secs`: out of the index first, then their files), holding the repository lock
    /// exclusively so no upload runs meanwhile.
    pub fn gc(&self, grace_secs: u64) -> Result<GcReport, RepoError> {
        let _lock = self.lock(true)?;
        let now = now_secs();
        let mut report = self.meta.sweep(now.saturating_sub(grace_secs))?;
        for (hash, brick, _) in &report.1 {
            self.bricks[*brick as usize].remove(hash)?;
        }
        // Files the index does not know, older than the grace period: a crash between a
        // chunk's write and its indexing, or before its rename (temporary files).
        let indexed = self.meta.indexed()?;
        for brick in &self.bricks {
            report.0.orphan_files_removed +=
                brick.remove_stale_tmp(now.saturating_sub(grace_secs))?;
            for (hash, mtime) in brick.list()? {
                if !indexed.contains(&hash) && mtime + grace_secs < now {
                    brick.remove(&hash)?;
                    report.0.orphan_files_removed += 1;
                }
            }
        }
        Ok(report.0)
    }

    /// Re-hashes every indexed chunk and checks that every manifest's chunks are indexed.
    pub fn verify(&self, progress: &dyn Fn(u64, u64)) -> Result<RepoVerifyReport, RepoError> {
        let chunks = self.meta.chunks()?;
        let total: u64 = chunks.iter().map(|(_, _, size)| *size as u64).sum();
        let mut report = RepoVerifyReport::default();
        let mut bad = std::collections::BTreeSet::new();
        for (hash, brick, size) in &chunks {
            let brick = self.bricks.get(*brick as usize);
            match brick.map(|b| b.get(hash)) {
                Some(Ok(data)) if data.len() == *size as usize => {}
                Some(Ok(_)) => {
                    report
                        .damaged
                        .push(format!("chunk {hash}: size differs from the index"));
                    bad.insert(*hash);
                }
                Some(Err(e)) => {
                    report.damaged.push(e.to_string());
                    bad.insert(*hash);
                }
                None => {
                    report.damaged.push(format!(
                        "chunk {hash}: indexed in a brick that is not configured"
                    ));
                    bad.insert(*hash);
                }
            }
            report.chunks_checked += 1;
            report.bytes_checked += *size as u64;
            progress(report.bytes_checked, total);
        }
        let indexed: std::collections::HashSet<ChunkHash> = chunks.iter().map(|c| c.0).collect();
        for m in self.meta.all_manifests()? {
            let info = &m.info;
            let mut broken = false;
            for (_, h) in &m.entries {
                if !indexed.contains(h) {
                    if bad.insert(*h) {
                        report.damaged.push(format!(
                            "chunk {h}: named by {} but not in the index",
                            info.name
                        ));
                    }
                    broken = true;
                } else if bad.contains(h) {
                    broken = true;
                }
            }
            if broken {
                report.broken_manifests.push(info.name.clone());
            }
        }
        Ok(report)
    }
}

/// A repository as the swap engine uses it: local (`file://` or a path: this process opens
/// its metadata and bricks) or served (`http://`: another node's `stasis repo serve`).
/// Static dispatch over the two.
pub enum RepoHandle {
    Local(Repo),
    Remote(remote::RemoteRepo),
}

/// Held by a swapout from its first upload to its commit: for a local repository, the
/// repository lock (shared; gc waits); a served one takes it per request, and its upload
/// session's token scopes what the swapout may do.
pub enum UploadSession {
    Local(RepoLock),
    Remote,
}

impl RepoHandle {
    /// `create`: a local repository that does not exist yet is made (only a swapout may).
    pub fn open(spec: &str, create: bool) -> Result<RepoHandle, RepoError> {
        Self::open_with_key(spec, create, None)
    }

    /// [`RepoHandle::open`] with the access key of a served repository given (None: from
    /// `STASIS_REPO_KEY`); a local repository needs none.
    pub fn open_with_key(
        spec: &str,
        create: bool,
        access_key: Option<&str>,
    ) -> Result<RepoHandle, RepoError> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return Ok(RepoHandle::Remote(remote::RemoteRepo::open(
                spec, access_key,
            )?));
        }
        Ok(RepoHandle::Local(if create {
            Repo::open(spec)?
        } else {
            Repo::open_existing(spec)?
        }))
    }

    pub fn url(&self) -> String {
        match self {
            RepoHandle::Local(r) => r.url(),
            RepoHandle::Remote(r) => r.url().to_string(),
        }
    }

    /// The local repository, for what only runs where the data is (gc, verify).
    pub fn local(&self, what: &str) -> Result<&Repo, RepoError> {
        match self {
            RepoHandle::Local(r) => Ok(r),
            RepoHandle::Remote(r) => Err(RepoError::Usage(format!(
                "{what} runs where the repository's data is: on the server of {}, with \
                 --repo set to its data directory",
                r.url()
            ))),
        }
    }

    pub fn begin_upload(&self) -> Result<UploadSession, RepoError> {
        match self {
            RepoHandle::Local(r) => r.upload_lock().map(UploadSession::Local),
            RepoHandle::Remote(r) => r.begin_upload().map(|_| UploadSession::Remote),
        }
    }

    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<bool>, RepoError> {
        match self {
            RepoHandle::Local(r) => r.missing(hashes),
            RepoHandle::Remote(r) => r.missing(hashes),
        }
    }

    pub fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        match self {
            RepoHandle::Local(r) => r.put_chunks(chunks),
            RepoHandle::Remote(r) => r.put_chunks(chunks),
        }
    }

    pub fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        match self {
            RepoHandle::Local(r) => r.get_chunk(hash),
            RepoHandle::Remote(r) => r.get_chunk(hash),
        }
    }

    pub fn commit(&self, m: &Manifest) -> Result<(), RepoError> {
        match self {
            RepoHandle::Local(r) => r.commit(m),
            RepoHandle::Remote(r) => r.commit(m),
        }
    }

    pub fn find(&self, kind: Kind, name: &str) -> Result<Option<Manifest>, RepoError> {
        match self {
            RepoHandle::Local(r) => r.find(kind, name),
            RepoHandle::Remote(r) => r.find(kind, name),
        }
    }

    /// A disk manifest, which must exist.
    pub fn manifest(&self, name: &str) -> Result<Manifest, RepoError> {
        no_manifest(self.find(Kind::Disk, name)?, name, &self.url())
    }

    pub fn image(&self, name: &str) -> Result<Option<Manifest>, RepoError> {
        self.find(Kind::Image, name)
    }

    pub fn list(&self) -> Result<Vec<(ManifestInfo, u64)>, RepoError> {
        match self {
            RepoHandle::Local(r) => r.list(),
            RepoHandle::Remote(r) => r.list(),
        }
    }

    pub fn stat(&self) -> Result<RepoStat, RepoError> {
        match self {
            RepoHandle::Local(r) => r.stat(),
            RepoHandle::Remote(r) => r.stat(),
        }
    }

    pub fn remove(&self, what: &Removal) -> Result<Vec<(Kind, String)>, RepoError> {
        match self {
            RepoHandle::Local(r) => r.remove(what),
            RepoHandle::Remote(r) => r.remove(what),
        }
    }
}

fn parse_spec(spec: &str) -> Result<PathBuf, RepoError> {
    let path = match spec.strip_prefix("file://") {
        Some(p) => p,
        None if spec.contains("://") => {
            return Err(RepoError::Usage(format!(
                "repository {spec:?}: use http(s)://HOST:PORT (a served repository), file:///PATH or a path"
            )))
        }
        None => spec,
    };
    if path.is_empty() {
        return Err(RepoError::Usage("empty repository path".into()));
    }
    Ok(PathBuf::from(path))
}

fn no_manifest(m: Option<Manifest>, name: &str, url: &str) -> Result<Manifest, RepoError> {
    m.ok_or_else(|| RepoError::NotFound(format!("no manifest {name:?} in {url}")))
}

/// [`crate::fsutil::write_durably`], its error as the repository's.
pub(crate) fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RepoError> {
    crate::fsutil::write_durably(path, bytes, mode).map_err(|e| RepoError::io(path, e))
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(kind: Kind, name: &str, parts: &[(&str, &str)]) -> Manifest {
        Manifest {
            info: ManifestInfo {
                name: name.into(),
                kind,
                size: 0,
                chunk_size: 65536,
                image: None,
                parent: None,
                source: None,
                created_at: 1,
                parts: parts
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                config: None,
            },
            entries: Vec::new(),
        }
    }

    fn rm(names: &[String], kind: Option<Kind>, with_parts: bool, in_use: &[String]) -> Removal {
        Removal {
            names: names.to_vec(),
            kind,
            with_parts,
            in_use: in_use.to_vec(),
        }
    }

    fn names(repo: &Repo) -> Vec<String> {
        let mut v: Vec<String> = repo.list().unwrap().into_iter().map(|m| m.0.name).collect();
        v.sort();
        v
    }

    /// Two VMs share a kernel; an experiment holds the first.
    fn repo_with_vms() -> (tempfile::TempDir, Repo) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::open(dir.path().to_str().unwrap()).unwrap();
        for (kind, name) in [
            (Kind::Disk, "a-disk"),
            (Kind::File, "a-mem"),
            (Kind::Disk, "b-disk"),
            (Kind::File, "b-mem"),
            (Kind::File, "kernel"),
        ] {
            repo.commit(&manifest(kind, name, &[])).unwrap();
        }
        for vm in ["a", "b"] {
            let (disk, mem) = (format!("{vm}-disk"), format!("{vm}-mem"));
            let parts = [
                ("disk", disk.as_str()),
                ("memory", &mem),
                ("kernel", "kernel"),
            ];
            repo.commit(&manifest(Kind::Vm, vm, &parts)).unwrap();
        }
        repo.commit(&manifest(Kind::Experiment, "exp", &[("a", "a")]))
            .unwrap();
        (dir, repo)
    }

    #[test]
    fn a_part_is_refused_while_what_names_it_stays_and_nothing_is_removed() {
        let (_dir, repo) = repo_with_vms();
        let before = names(&repo);
        for name in ["a", "a-mem", "kernel"] {
            let e = repo
                .remove(&rm(&[name.into()], None, false, &[]))
                .unwrap_err();
            assert!(e.is_usage(), "{e}");
        }
        // All or nothing: one refused name keeps the others too.
        let e = repo
            .remove(&rm(&["b-disk".into(), "a-mem".into()], None, false, &[]))
            .unwrap_err();
        assert!(e.is_usage(), "{e}");
        let e = repo
            .remove(&rm(&["nope".into()], None, false, &[]))
            .unwrap_err();
        assert!(matches!(e, RepoError::NotFound(_)), "{e}");
        let e = repo
            .remove(&rm(&["a-disk".into()], Some(Kind::File), false, &[]))
            .unwrap_err();
        assert!(matches!(e, RepoError::NotFound(_)), "{e}");
        assert_eq!(names(&repo), before);
    }

    #[test]
    fn with_parts_removes_an_experiment_and_its_vms_but_keeps_shared_parts() {
        let (_dir, repo) = repo_with_vms();
        // A disk that a node still hydrates from holds the whole removal back.
        let e = repo
            .remove(&rm(&["exp".into()], None, true, &["a-disk".into()]))
            .unwrap_err();
        assert!(e.is_usage(), "{e}");
        let mut removed: Vec<String> = repo
            .remove(&rm(&["exp".into()], None, true, &[]))
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        removed.sort();
        assert_eq!(removed, ["a", "a-disk", "a-mem", "exp"]);
        // The kernel stays: VM b names it.
        assert_eq!(names(&repo), ["b", "b-disk", "b-mem", "kernel"]);
        repo.remove(&rm(&["b".into()], None, true, &[])).unwrap();
        assert!(names(&repo).is_empty());
    }

    #[test]
    fn a_name_two_kinds_share_needs_its_kind() {
        let (_dir, repo) = repo_with_vms();
        repo.commit(&manifest(Kind::File, "b", &[])).unwrap();
        let e = repo
            .remove(&rm(&["b".into()], None, false, &[]))
            .unwrap_err();
        assert!(e.to_string().contains("--kind"), "{e}");
        let removed = repo.remove(&rm(&["b".into()], Some(Kind::File), false, &[]));
        assert_eq!(removed.unwrap(), [(Kind::File, "b".to_string())]);
        assert!(repo.find(Kind::Vm, "b").unwrap().is_some(), "the VM stays");
        // A part whose name two kinds share is not guessed at.
        repo.commit(&manifest(Kind::File, "a", &[])).unwrap();
        let e = repo
            .remove(&rm(&["exp".into()], None, true, &[]))
            .unwrap_err();
        assert!(
            e.is_usage() && e.to_string().contains("several kinds"),
            "{e}"
        );
        assert!(repo.find(Kind::Experiment, "exp").unwrap().is_some());
    }
}
