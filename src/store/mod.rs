//! The branching copy-on-write block store.
//!
//! Every disk is three levels, resolved top-down for each 4 KiB block:
//! write layer ([`wlog`]) -> delta ([`delta`]) -> golden ([`golden`]) -> zeros.
//! The registry ([`registry`]) ties images, disks and shared deltas into a branch tree.
//!
//! Store directory layout:
//! ```text
//! registry.redb           images, disks, deltas (redb)
//! images/<name>/golden    golden image data, linear
//! images/<name>/chunks.b3 BLAKE3 hash of every chunk of the golden
//! deltas/<id>.delta       deltas, shared by the disks that reference them
//! wlogs/<id>/             one write layer per disk (data, journal, clean marker)
//! locks/                  flock files: one per disk, one for structural changes
//! tmp/                    imports and folds in progress
//! ```

pub mod config;
pub mod delta;
pub mod disk;
mod extents;
pub mod format;
pub mod golden;
pub mod hydrate;
pub mod registry;
pub mod wlog;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::Serialize;

pub use disk::Disk;
pub use registry::{DeltaRecord, DiskRecord, ImageRecord};

use crate::blockdev::BlockDevice;
use delta::{Delta, DeltaStats};
use golden::Golden;
use registry::Registry;
use wlog::WriteLayer;

/// Granularity of the store: copy-on-write, zero tracking and the write layer's dirty set.
pub const BLOCK_SIZE: usize = 4096;
/// Granularity of content hashing (golden chunk hashes; repository chunks). 16 blocks, the
/// delta's cluster. Provisional until the repository's dedup measurement settles it.
pub const CHUNK_SIZE: usize = 64 * 1024;
// Hydration fills whole delta clusters from whole repository chunks.
const _: () = assert!(CHUNK_SIZE == delta::CLUSTER_BLOCKS as usize * BLOCK_SIZE);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: String },
    #[error("image '{0}' not found")]
    ImageNotFound(String),
    #[error("disk '{0}' not found")]
    DiskNotFound(String),
    #[error("image '{0}' already exists")]
    ImageExists(String),
    #[error("disk '{0}' already exists")]
    DiskExists(String),
    #[error(
        "invalid name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    InvalidName(String),
    #[error("disk '{0}' is in use by another process")]
    DiskInUse(String),
    #[error("image '{image}' is used by disk(s) {disks}")]
    ImageInUse { image: String, disks: String },
    #[error("invalid size: {0}")]
    InvalidSize(String),
    #[error("cannot import {}: {problem}", path.display())]
    Import { path: PathBuf, problem: String },
    #[error("{0}")]
    Busy(String),
    /// Data not local and its source unreachable (a swapped-in disk still hydrating).
    #[error("{0}")]
    Unavailable(String),
    /// The disk guard refused: something outside the store still holds the disk's state.
    #[error("{0}")]
    Held(String),
}

impl StoreError {
    pub fn io(path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn corrupt(path: &Path, problem: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    /// Errors caused by how the store was asked, not by its state or the machine: the CLI
    /// exits with status 2 for these, and nothing was changed.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            StoreError::ImageNotFound(_)
                | StoreError::DiskNotFound(_)
                | StoreError::ImageExists(_)
                | StoreError::DiskExists(_)
                | StoreError::InvalidName(_)
                | StoreError::DiskInUse(_)
                | StoreError::Held(_)
                | StoreError::ImageInUse { .. }
                | StoreError::InvalidSize(_)
                | StoreError::Import { .. }
        )
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random 64-bit id (ids name layer files; they need only be unique within a store).
pub(crate) fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let h = blake3::hash(format!("{t:?}{}", std::process::id()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

pub(crate) fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_string()))
    }
}

/// An exclusive flock, released when dropped (or when the process dies).
pub struct DiskLock {
    _file: File,
}

impl DiskLock {
    fn try_acquire(path: &Path) -> Result<Option<DiskLock>, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(DiskLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(StoreError::io(path, err))
        }
    }

    pub fn acquire_blocking(path: &Path) -> Result<DiskLock, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        loop {
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(DiskLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(StoreError::io(path, err));
            }
        }
    }
}

/// `stasis disk info`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub image: String,
    pub size: u64,
    pub parent: Option<String>,
    pub parent_removed: bool,
    pub children: Vec<String>,
    pub golden_bytes: u64,
    pub delta: Option<DeltaInfo>,
    /// None while another process has the disk open.
    pub write_layer: Option<WriteLayerInfo>,
    pub in_use: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeltaInfo {
    pub id: String,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub data_bytes: u64,
    pub file_bytes: u64,
    /// Other disks sharing this delta.
    pub shared_with: Vec<String>,
    /// For a delta made by swapin: how much of its data is local.
    pub hydration: Option<HydrationInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HydrationInfo {
    pub chunks_present: u64,
    pub chunks: u64,
    /// "<repository URL>#<manifest>"
    pub origin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteLayerInfo {
    pub id: String,
    pub dirty_blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub data_bytes: u64,
    pub journal_records: u64,
}

/// Source format of an image file.
fn detect_format(path: &Path) -> Result<&'static str, StoreError> {
    let mut magic = [0u8; 4];
    let f = File::open(path).map_err(|e| StoreError::Import {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut magic, 0)
        .map_err(|e| StoreError::io(path, e))?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// Makes the chunk source of a hydrating delta from its recorded origin (a repository URL
/// and manifest). The store knows nothing of repositories: the swap engine provides this.
pub type SourceFactory =
    Arc<dyn Fn(&str) -> Result<Arc<dyn hydrate::ChunkSource>, String> + Send + Sync>;

/// Asked, with the disk's lock held, before a disk is opened, folded or removed: an error
/// (its message) refuses. The store knows nothing of frontends; the CLI installs this so a
/// disk whose ublk device outlived its server (and may hold a mounted filesystem's unwritten
/// state) is not changed behind that device's back.
pub type DiskGuard = Arc<dyn Fn(&Store, &str) -> Result<(), String> + Send + Sync>;

pub struct Store {
    root: PathBuf,
    registry: Registry,
    sources: Option<SourceFactory>,
    guard: Option<DiskGuard>,
}

impl Store {
    /// Opens the store at `root`, creating its directories and registry if needed.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in ["", "images", "deltas", "wlogs", "locks", "tmp", "run"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        }
        let registry = Registry::open(&root.join("registry.redb"))?;
        Ok(Store {
            root: root.to_path_buf(),
            registry,
            sources: None,
            guard: None,
        })
    }

    /// From now on, every delta still hydrating that this store opens is connected to its
    /// origin through `factory`.
    pub fn set_source_factory(&mut self, factory: SourceFactory) {
        self.sources = Some(factory);
    }

    /// Opens delta `id`, connected to its origin if it is still hydrating.
    fn open_delta(&self, id: &str) -> Result<Delta, StoreError> {
        let delta = Delta::open(&self.delta_path(id))?;
        if let (Some(h), Some(factory)) = (delta.hydration(), &self.sources) {
            if !h.is_complete() {
                let origin = self.registry.read(|t| t.delta(id))?.and_then(|d| d.origin);
                if let Some(origin) = origin {
                    match factory(&origin) {
                        Ok(source) => h.set_source(source),
                        // Reads of absent chunks will say so; the rest of the disk works.
                        Err(e) => tracing::warn!(delta = id, "cannot reach {origin}: {e}"),
                    }
                }
            }
        }
        Ok(delta)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The control socket of a served disk.
    pub fn control_socket(&self, disk: &str) -> PathBuf {
        self.root.join("run").join(format!("{disk}.sock"))
    }

    /// Where a frontend keeps what it must know about a served disk after a crash (for ublk:
    /// the kernel device serving it), `<store>/run/<disk>.<frontend>`.
    pub fn frontend_record(&self, disk: &str, frontend: &str) -> PathBuf {
        self.root.join("run").join(format!("{disk}.{frontend}"))
    }

    fn image_dir(&self, name: &str) -> PathBuf {
        self.root.join("images").join(name)
    }
    fn delta_path(&self, id: &str) -> PathBuf {
        self.root.join("deltas").join(format!("{id}.delta"))
    }
    fn wlog_dir(&self, id: &str) -> PathBuf {
        self.root.join("wlogs").join(id)
    }

    /// Serialises structural changes (create, fork, compact, remove, import, cleanup).
    fn structure_lock(&self) -> Result<DiskLock, StoreError> {
        DiskLock::acquire_blocking(&self.root.join("locks").join("store.lock"))
    }

    /// `locks/<what>.lock`, exclusively, if no other holder has it (None then): for layers
    /// above the store that need one command at a time on a thing of theirs (a VM).
    pub fn try_lock(&self, what: &str) -> Result<Option<DiskLock>, StoreError> {
        validate_name(what)?;
        DiskLock::try_acquire(&self.root.join("locks").join(format!("{what}.lock")))
    }

    fn lock_disk(&self, name: &str) -> Result<DiskLock, StoreError> {
        DiskLock::try_acquire(&self.root.join("locks").join(format!("disk-{name}.lock")))?
            .ok_or_else(|| StoreError::DiskInUse(name.to_string()))
    }

    /// Locks a disk that is about to be used or changed, and asks the disk guard.
    fn lock_disk_guarded(&self, name: &str) -> Result<DiskLock, StoreError> {
        let lock = self.lock_disk(name)?;
        if let Some(guard) = &self.guard {
            guard(self, name).map_err(StoreError::Held)?;
        }
        Ok(lock)
    }

    pub fn set_disk_guard(&mut self, guard: DiskGuard) {
        self.guard = Some(guard);
    }

    fn new_id() -> String {
        format!("{:016x}", random_id())
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.registry.read(|t| t.images())
    }

    pub fn disks(&self) -> Result<Vec<DiskRecord>, StoreError> {
        self.registry.read(|t| t.disks())
    }

    pub fn image(&self, name: &str) -> Result<ImageRecord, StoreError> {
        self.registry
            .read(|t| t.image(name))?
            .ok_or_else(|| StoreError::ImageNotFound(name.into()))
    }

    pub fn disk(&self, name: &str) -> Result<DiskRecord, StoreError> {
        self.registry
            .read(|t| t.disk(name))?
            .ok_or_else(|| StoreError::DiskNotFound(name.into()))
    }

    /// Imports `file` (raw, or qcow2 through qemu-img) as golden image `name`.
    pub fn import_image(
        &self,
        name: &str,
        file: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ImageRecord, StoreError> {
        validate_name(name)?;
        let _structure = self.structure_lock()?;
        if self.registry.read(|t| t.image(name))?.is_some() {
            return Err(StoreError::ImageExists(name.into()));
        }
        let import_err = |problem: String| StoreError::Import {
            path: file.to_path_buf(),
            problem,
        };
        let meta = fs::metadata(file).map_err(|e| import_err(e.to_string()))?;
        if meta.is_dir() {
            return Err(import_err("is a directory".into()));
        }
        let format = detect_format(file)?;
        let work = self
            .root
            .join("tmp")
            .join(format!("import-{}", Self::new_id()));
        fs::create_dir(&work).map_err(|e| StoreError::io(&work, e))?;
        let result = (|| {
            let (source, total) = if format == "qcow2" {
                let raw = work.join("converted.raw");
                let out = Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(file)
                    .arg(&raw)
                    .output()
                    .map_err(|e| import_err(format!("qcow2 needs qemu-img: {e}")))?;
                if !out.status.success() {
                    return Err(import_err(format!(
                        "qemu-img convert failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                let len = fs::metadata(&raw)
                    .map_err(|e| StoreError::io(&raw, e))?
                    .len();
                (raw, len)
            } else {
                // Block devices report size 0 in metadata; measure by seeking to the end.
                let mut f = File::open(file).map_err(|e| import_err(e.to_string()))?;
                let len = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
                    .map_err(|e| StoreError::io(file, e))?;
                (file.to_path_buf(), len)
            };
            if total == 0 {
                return Err(import_err("the image is empty".into()));
            }
            let mut src = File::open(&source).map_err(|e| StoreError::io(&source, e))?;
            let image_dir = work.join("image");
            fs::create_dir(&image_dir).map_err(|e| StoreError::io(&image_dir, e))?;
            let mut done = 0u64;
            let summary = golden::import_raw(&mut src, &source, &image_dir, |n| {
                done += n;
                progress(done, total);
            })?;
            let dest = self.image_dir(name);
            if dest.exists() {
                // Left by a crash between moving an import in and registering it.
                fs::remove_dir_all(&dest).map_err(|e| StoreError::io(&dest, e))?;
            }
            fs::rename(&image_dir, &dest).map_err(|e| StoreError::io(&dest, e))?;
            format::sync_dir(&self.root.join("images"))?;
            let rec = ImageRecord {
                name: name.to_string(),
                size: summary.size,
                source: file.display().to_string(),
                source_format: format.to_string(),
                chunk_size: CHUNK_SIZE as u32,
                chunks: summary.chunks,
                zero_chunks: summary.zero_chunks,
                imported_at: now_secs(),
            };
            self.registry.update(|t| t.put_image(&rec))?;
            Ok(rec)
        })();
        let _ = fs::remove_dir_all(&work);
        if result.is_err() {
            self.collect_garbage()?;
        }
        result
    }

    /// Removes an image no disk uses.
    pub fn remove_image(&self, name: &str) -> Result<(), StoreError> {
        let _structure = self.structure_lock()?;
        self.registry.update(|t| {
            t.image(name)?
                .ok_or_else(|| StoreError::ImageNotFound(name.into()))?;
            let users: Vec<String> = t
                .disks()?
                .into_iter()
                .filter(|d| d.image == name)
                .map(|d| d.name)
                .collect();
            if !users.is_empty() {
                return Err(StoreError::ImageInUse {
                    image: name.into(),
                    disks: users.join(", "),
                });
            }
            t.remove_image(name)
        })?;
        self.collect_garbage()
    }

    pub fn open_golden(&self, image: &str) -> Result<Golden, StoreError> {
        Golden::open(&self.image_dir(image))
    }

    /// Creates disk `name` over golden `image`; `size` defaults to the image's size.
    pub fn create_disk(
        &self,
        name: &str,
        image: &str,
        size: Option<u64>,
    ) -> Result<DiskRecord, StoreError> {
        self.create_disk_over(name, image, size, |_| Ok(None))
    }

    /// Creates disk `name` over `image` whose delta is `entries` (cluster, BLAKE3 hash of its
    /// 64 KiB), to be hydrated from `origin` (a repository URL and manifest, recorded for the
    /// servers that will connect it): swapin. No chunk data is read here.
    pub fn create_hydrating_disk(
        &self,
        name: &str,
        image: &str,
        size: u64,
        entries: &[(u64, [u8; 32])],
        origin: &str,
    ) -> Result<DiskRecord, StoreError> {
        self.create_disk_over(name, image, Some(size), |store| {
            let id = Self::new_id();
            let tmp = store.root.join("tmp").join(format!("{id}.delta"));
            let stats = Delta::create_hydrating(&tmp, entries)?;
            for ext in ["chunks", "delta"] {
                let to = store.delta_path(&id).with_extension(ext);
                fs::rename(tmp.with_extension(ext), &to).map_err(|e| StoreError::io(&to, e))?;
            }
            format::sync_dir(&store.root.join("deltas"))?;
            let mut rec = DeltaRecord::new(id, image.into(), &stats);
            rec.origin = Some(origin.to_string());
            Ok(Some(rec))
        })
    }

    /// The common part of creating a disk: checks, a fresh write layer, and the registry
    /// entry (with the delta `make_delta` wrote, if any) in one transaction. On failure the
    /// files made so far are collected.
    fn create_disk_over(
        &self,
        name: &str,
        image: &str,
        size: Option<u64>,
        make_delta: impl FnOnce(&Self) -> Result<Option<DeltaRecord>, StoreError>,
    ) -> Result<DiskRecord, StoreError> {
        validate_name(name)?;
        let _structure = self.structure_lock()?;
        let img = self.image(image)?;
        let size = size.unwrap_or(img.size);
        if size < img.size {
            return Err(StoreError::InvalidSize(format!(
                "{size} bytes is smaller than image '{image}' ({} bytes)",
                img.size
            )));
        }
        if size % BLOCK_SIZE as u64 != 0 {
            return Err(StoreError::InvalidSize(format!(
                "{size} bytes is not a multiple of {BLOCK_SIZE}"
            )));
        }
        if self.registry.read(|t| t.disk(name))?.is_some() {
            return Err(StoreError::DiskExists(name.into()));
        }
        let made = make_delta(self).and_then(|delta| {
            let wlog = Self::new_id();
            WriteLayer::create(&self.wlog_dir(&wlog))?;
            let rec = DiskRecord {
                name: name.into(),
                image: image.into(),
                size,
                delta: delta.as_ref().map(|d| d.id.clone()),
                wlog,
                parent: None,
                created_at: now_secs(),
                parent_removed: false,
            };
            self.registry.update(|t| {
                if t.disk(name)?.is_some() {
                    return Err(StoreError::DiskExists(name.into()));
                }
                if let Some(d) = &delta {
                    t.put_delta(d)?;
                }
                t.put_disk(&rec)
            })?;
            Ok(rec)
        });
        if made.is_err() {
            self.collect_garbage()?;
        }
        made
    }

    /// The origins (`<repository URL>#<manifest>`) of the deltas that are still hydrating,
    /// read from the registry and the chunk maps without opening any disk. A chunk map that
    /// exists but cannot be read counts as hydrating: callers use this to keep what such a
    /// disk still needs.
    pub fn hydrating_origins(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for disk in self.disks()? {
            let Some(id) = disk.delta else { continue };
            let Some(origin) = self.registry.read(|t| t.delta(&id))?.and_then(|d| d.origin) else {
                continue;
            };
            let map = hydrate::chunks_path(&self.delta_path(&id));
            let hydrating = match hydrate::map_progress(&map) {
                Some((present, total)) => present < total,
                None => map.exists(),
            };
            if hydrating && !out.contains(&origin) {
                out.push(origin);
            }
        }
        Ok(out)
    }

    /// Where the disk's delta is hydrated from, if it came from a swapin.
    pub fn delta_origin(&self, disk: &str) -> Result<Option<String>, StoreError> {
        let rec = self.disk(disk)?;
        let Some(id) = rec.delta else { return Ok(None) };
        Ok(self.registry.read(|t| t.delta(&id))?.and_then(|d| d.origin))
    }

    /// Opens a disk for I/O. It stays locked against other openers until the `Disk` is dropped.
    pub fn open_disk(&self, name: &str) -> Result<Disk, StoreError> {
        let lock = self.lock_disk_guarded(name)?;
        self.open_locked(name, lock)
    }

    /// Opens a disk without asking the disk guard: for the caller that takes over, or gives
    /// up, exactly what the guard protects (`serve --ublk --recover`, `ublk delete`).
    pub fn open_disk_taking_over(&self, name: &str) -> Result<Disk, StoreError> {
        let lock = self.lock_disk(name)?;
        self.open_locked(name, lock)
    }

    fn open_locked(&self, name: &str, lock: DiskLock) -> Result<Disk, StoreError> {
        let rec = self.disk(name)?;
        let golden = Arc::new(self.open_golden(&rec.image)?);
        let delta = match &rec.delta {
            Some(id) => Some(Arc::new(self.open_delta(id)?)),
            None => None,
        };
        let wlog = WriteLayer::open(&self.wlog_dir(&rec.wlog), rec.size / BLOCK_SIZE as u64)?;
        Ok(Disk::new(rec.size, golden, delta, wlog, lock))
    }

    /// Folds a disk's write layer into a new delta. Returns the new delta's id and stats, or
    /// None when the write layer is empty (the current delta stays as it is).
    fn fold_disk(
        &self,
        rec: &DiskRecord,
        progress: &dyn Fn(u64, u64),
    ) -> Result<Option<(String, DeltaStats)>, StoreError> {
        let wlog = WriteLayer::open(&self.wlog_dir(&rec.wlog), rec.size / BLOCK_SIZE as u64)?;
        if wlog.dirty_blocks() == 0 {
            return Ok(None);
        }
        let base = match &rec.delta {
            Some(id) => Some(self.open_delta(id)?),
            None => None,
        };
        let id = Self::new_id();
        let tmp = self.root.join("tmp").join(format!("{id}.delta"));
        let stats = delta::fold(
            &tmp,
            base.as_ref(),
            &wlog,
            rec.size / BLOCK_SIZE as u64,
            progress,
        )?;
        let dest = self.delta_path(&id);
        fs::rename(&tmp, &dest).map_err(|e| StoreError::io(&dest, e))?;
        format::sync_dir(&self.root.join("deltas"))?;
        Ok(Some((id, stats)))
    }

    /// Folds the disk's write layer into a new delta (the old one stays while another branch
    /// shares it). Nothing to do if the write layer is empty.
    pub fn compact(&self, name: &str) -> Result<DiskRecord, StoreError> {
        self.compact_with_progress(name, &|_, _| {})
    }

    /// `compact`, reporting (bytes done, bytes in all) while it folds.
    pub fn compact_with_progress(
        &self,
        name: &str,
        progress: &dyn Fn(u64, u64),
    ) -> Result<DiskRecord, StoreError> {
        self.fork_or_compact(name, None, progress)
    }

    /// Makes `new` a branch of `from`: both share the golden and `from`'s state as of now
    /// (its write layer folded into a read-only delta), and neither sees the other's later writes.
    pub fn fork(&self, new: &str, from: &str) -> Result<DiskRecord, StoreError> {
        self.fork_with_progress(new, from, &|_, _| {})
    }

    /// `fork`, reporting (bytes done, bytes in all) while it folds.
    pub fn fork_with_progress(
        &self,
        new: &str,
        from: &str,
        progress: &dyn Fn(u64, u64),
    ) -> Result<DiskRecord, StoreError> {
        validate_name(new)?;
        self.fork_or_compact(from, Some(new), progress)
    }

    fn fork_or_compact(
        &self,
        name: &str,
        child: Option<&str>,
        progress: &dyn Fn(u64, u64),
    ) -> Result<DiskRecord, StoreError> {
        let _structure = self.structure_lock()?;
        let _lock = self.lock_disk_guarded(name)?;
        let rec = self.disk(name)?;
        if let Some(c) = child {
            if self.registry.read(|t| t.disk(c))?.is_some() {
                return Err(StoreError::DiskExists(c.into()));
            }
        }
        let result = (|| {
            let folded = self.fold_disk(&rec, progress)?;
            let mut parent = rec.clone();
            if let Some((id, _)) = &folded {
                parent.delta = Some(id.clone());
                parent.wlog = Self::new_id();
                WriteLayer::create(&self.wlog_dir(&parent.wlog))?;
            }
            let child_rec = match child {
                Some(c) => {
                    let wlog = Self::new_id();
                    WriteLayer::create(&self.wlog_dir(&wlog))?;
                    Some(DiskRecord {
                        name: c.into(),
                        image: rec.image.clone(),
                        size: rec.size,
                        delta: parent.delta.clone(),
                        wlog,
                        parent: Some(name.into()),
                        parent_removed: false,
                        created_at: now_secs(),
                    })
                }
                None => None,
            };
            self.registry.update(|t| {
                if let Some((id, stats)) = &folded {
                    t.put_delta(&DeltaRecord::new(id.clone(), rec.image.clone(), stats))?;
                }
                t.put_disk(&parent)?;
                if let Some(c) = &child_rec {
                    if t.disk(&c.name)?.is_some() {
                        return Err(StoreError::DiskExists(c.name.clone()));
                    }
                    t.put_disk(c)?;
                }
                Self::drop_unreferenced_deltas(t)
            })?;
            Ok(child_rec.unwrap_or(parent))
        })();
        // The registry is committed (or untouched): leftover files are only garbage, swept
        // again by the next structural change.
        if let Err(e) = self.collect_garbage() {
            tracing::warn!("removing unreferenced layers: {e}");
        }
        result
    }

    fn drop_unreferenced_deltas(t: &mut registry::Txn) -> Result<(), StoreError> {
        let used: BTreeSet<String> = t.disks()?.into_iter().filter_map(|d| d.delta).collect();
        for d in t.deltas()? {
            if !used.contains(&d.id) {
                t.remove_delta(&d.id)?;
            }
        }
        Ok(())
    }

    /// Removes a disk. Layers it shares with other branches stay.
    pub fn remove_disk(&self, name: &str) -> Result<(), StoreError> {
        let _structure = self.structure_lock()?;
        let _lock = self.lock_disk_guarded(name)?;
        self.registry.update(|t| {
            t.disk(name)?
                .ok_or_else(|| StoreError::DiskNotFound(name.into()))?;
            t.remove_disk(name)?;
            for mut child in t
                .disks()?
                .into_iter()
                .filter(|d| d.parent.as_deref() == Some(name) && !d.parent_removed)
            {
                child.parent_removed = true;
                t.put_disk(&child)?;
            }
            Self::drop_unreferenced_deltas(t)
        })?;
        // The lock file stays: deleting it while others may open it would let two holders
        // lock two different files of the same name.
        self.collect_garbage()
    }

    /// Deletes layer files and image directories the registry no longer references (left by
    /// removals, or by a crash between writing a layer and committing it). Callers hold the
    /// structure lock, so no fold or import is in flight.
    fn collect_garbage(&self) -> Result<(), StoreError> {
        let (disks, deltas, images) = self
            .registry
            .read(|t| Ok((t.disks()?, t.deltas()?, t.images()?)))?;
        let live_wlogs: BTreeSet<String> = disks.iter().map(|d| d.wlog.clone()).collect();
        let live_deltas: BTreeSet<String> = deltas
            .iter()
            .flat_map(|d| [format!("{}.delta", d.id), format!("{}.chunks", d.id)])
            .collect();
        let live_images: BTreeSet<String> = images.iter().map(|i| i.name.clone()).collect();
        let sweep = |dir: PathBuf, live: &BTreeSet<String>| -> Result<(), StoreError> {
            let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if live.contains(&name) {
                    continue;
                }
                let path = entry.path();
                tracing::debug!(path = %path.display(), "removing unreferenced layer");
                let r = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                r.map_err(|e| StoreError::io(&path, e))?;
            }
            Ok(())
        };
        sweep(self.root.join("wlogs"), &live_wlogs)?;
        sweep(self.root.join("deltas"), &live_deltas)?;
        sweep(self.root.join("images"), &live_images)?;
        sweep(self.root.join("tmp"), &BTreeSet::new())?;
        Ok(())
    }

    pub fn disk_info(&self, name: &str) -> Result<DiskInfo, StoreError> {
        let (rec, all_disks, delta_rec) = self.registry.read(|t| {
            let rec = t
                .disk(name)?
                .ok_or_else(|| StoreError::DiskNotFound(name.into()))?;
            let delta = match &rec.delta {
                Some(id) => t.delta(id)?,
                None => None,
            };
            Ok((rec, t.disks()?, delta))
        })?;
        let img = self.image(&rec.image)?;
        let children = all_disks
            .iter()
            .filter(|d| d.parent.as_deref() == Some(name) && !d.parent_removed)
            .map(|d| d.name.clone())
            .collect();
        let delta = delta_rec.map(|d| DeltaInfo {
            shared_with: all_disks
                .iter()
                .filter(|o| o.name != name && o.delta.as_deref() == Some(d.id.as_str()))
                .map(|o| o.name.clone())
                .collect(),
            data_bytes: d.data_blocks * BLOCK_SIZE as u64,
            hydration: hydrate::map_progress(&hydrate::chunks_path(&self.delta_path(&d.id))).map(
                |(chunks_present, chunks)| HydrationInfo {
                    chunks_present,
                    chunks,
                    origin: d.origin.clone().unwrap_or_default(),
                },
            ),
            id: d.id,
            data_blocks: d.data_blocks,
            zero_blocks: d.zero_blocks,
            file_bytes: d.file_bytes,
        });
        // Opening the write layer may recover it; hold off structural changes meanwhile.
        let _structure = self.structure_lock()?;
        let (write_layer, in_use) = match self.lock_disk(name) {
            Ok(_lock) => {
                let w = WriteLayer::open(&self.wlog_dir(&rec.wlog), rec.size / BLOCK_SIZE as u64)?;
                let st = w.stats();
                (
                    Some(WriteLayerInfo {
                        id: rec.wlog.clone(),
                        dirty_blocks: st.data_blocks + st.zero_blocks,
                        data_blocks: st.data_blocks,
                        zero_blocks: st.zero_blocks,
                        data_bytes: st.data_blocks * BLOCK_SIZE as u64,
                        journal_records: st.journal_records,
                    }),
                    false,
                )
            }
            Err(StoreError::DiskInUse(_)) => (None, true),
            Err(e) => return Err(e),
        };
        Ok(DiskInfo {
            name: rec.name,
            image: rec.image,
            size: rec.size,
            parent: rec.parent,
            parent_removed: rec.parent_removed,
            children,
            golden_bytes: img.size,
            delta,
            write_layer,
            in_use,
        })
    }

    /// Writes the content of `src` into the disk at byte `offset`, through the store. Only
    /// blocks whose content changes are written, so the write layer records the real change.
    /// Flushed before returning. Returns (bytes read, bytes that differed).
    pub fn write_file(
        &self,
        name: &str,
        src: &Path,
        offset: u64,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(u64, u64), StoreError> {
        let disk = self.open_disk(name)?;
        let mut file = File::open(src).map_err(|e| StoreError::Import {
            path: src.to_path_buf(),
            problem: e.to_string(),
        })?;
        let len = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
            .map_err(|e| StoreError::io(src, e))?;
        if offset.checked_add(len).is_none_or(|end| end > disk.size()) {
            return Err(StoreError::InvalidSize(format!(
                "{} ({len} bytes) at offset {offset} does not fit in disk '{name}' ({} bytes)",
                src.display(),
                disk.size()
            )));
        }
        let io_err = |e: crate::blockdev::BlockError| StoreError::Corrupt {
            path: self.root.clone(),
            problem: format!("disk '{name}': {e}"),
        };
        let (mut new, mut old) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let (mut done, mut changed) = (0u64, 0u64);
        while done < len {
            let n = (len - done).min(new.len() as u64) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut new[..n], done)
                .map_err(|e| StoreError::io(src, e))?;
            disk.read_at(offset + done, &mut old[..n]).map_err(io_err)?;
            // Write each run of differing blocks (aligned to the disk's blocks) in one call.
            let base = offset + done;
            let mut i = 0usize;
            while i < n {
                let block_end = (((base + i as u64) / BLOCK_SIZE as u64 + 1) * BLOCK_SIZE as u64
                    - base) as usize;
                let end = block_end.min(n);
                if new[i..end] != old[i..end] {
                    let start = i;
                    let mut stop = end;
                    while stop < n {
                        let e2 = (stop + BLOCK_SIZE).min(n);
                        if new[stop..e2] == old[stop..e2] {
                            break;
                        }
                        stop = e2;
                    }
                    disk.write_at(base + start as u64, &new[start..stop], false)
                        .map_err(io_err)?;
                    changed += (stop - start) as u64;
                    i = stop;
                } else {
                    i = end;
                }
            }
            done += n as u64;
            progress(done, len);
        }
        disk.close()?;
        Ok((len, changed))
    }

    /// Writes the disk's full content to `dest` as a raw file (sparse where it reads zeros).
    pub fn export(
        &self,
        name: &str,
        dest: &Path,
        progress: &dyn Fn(u64, u64),
    ) -> Result<u64, StoreError> {
        let disk = self.open_disk(name)?;
        let size = disk.size();
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .map_err(|e| StoreError::io(dest, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            disk.read_at(pos, &mut buf[..n])
                .map_err(|e| StoreError::Corrupt {
                    path: self.root.clone(),
                    problem: format!("reading disk '{name}' at {pos}: {e}"),
                })?;
            if buf[..n].iter().any(|&b| b != 0) {
                std::os::unix::fs::FileExt::write_all_at(&out, &buf[..n], pos)
                    .map_err(|e| StoreError::io(dest, e))?;
            }
            pos += n as u64;
            progress(pos, size);
        }
        out.set_len(size).map_err(|e| StoreError::io(dest, e))?;
        out.sync_all().map_err(|e| StoreError::io(dest, e))?;
        disk.close()?;
        Ok(size)
    }
}
