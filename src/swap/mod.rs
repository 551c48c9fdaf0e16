//! The swap engine: swapout of a disk to a repository, and swapin from one (lazy).
//!
//! Swapout: the chunks in which the disk differs from its golden image are found from the
//! layers (write layer and delta), hashed (a delta made by swapin already knows the hashes of
//! the chunks the write layer did not touch: they are reused, never recomputed), sent to the
//! repository in batches, which answers which it lacks, and only those are uploaded. The
//! three stages run at once (a pipeline): a reader/hasher thread, the negotiating caller, and
//! uploader threads. The manifest is committed last. The golden image goes to the
//! repository too, once (its hashes are known from import).
//!
//! Swapin: the manifest becomes a disk whose delta is hydrated on demand and in the
//! background from the repository (store::hydrate); each chunk is checked against its hash.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use crate::blockdev::BlockDevice;
use crate::repo::{ChunkHash, Kind, Manifest, ManifestInfo, RepoError, RepoHandle, UploadSession};
use crate::store::disk::Disk;
use crate::store::golden::Golden;
use crate::store::hydrate::ChunkSource;
use crate::store::{Store, StoreError, CHUNK_SIZE};

mod file;
mod served;
pub use file::{file_manifest, restore_file, swapout_file, FileSummary};
pub use served::{
    control_hook, process_running, request_served_swapout, swapout_served, wait_gone,
};

/// Hashes sent to the repository per question.
const NEGOTIATE_BATCH: usize = 1024;
/// Bytes per upload call (one brick sync and one index transaction each), and the fewest
/// chunks: small chunks (memory) go in bigger batches, so the commits do not dominate.
const UPLOAD_BATCH_BYTES: usize = 4 << 20;
const UPLOAD_BATCH_MIN: usize = 32;
const UPLOADERS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    /// A served disk refused: another swapout of it runs, or its server is stopping.
    /// Nothing was done; asking again later may succeed.
    #[error("{0}")]
    Busy(String),
}

impl SwapError {
    pub fn is_usage(&self) -> bool {
        match self {
            SwapError::Store(e) => e.is_usage(),
            SwapError::Repo(e) => e.is_usage(),
            SwapError::Usage(_) => true,
            SwapError::Failed(_) | SwapError::Busy(_) => false,
        }
    }
}

/// Running totals of a transfer, for the progress bar and the summary.
#[derive(Default)]
pub struct Counters {
    pub bytes_scanned: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub hashes_reused: AtomicU64,
    pub chunks_present: AtomicU64,
    pub chunks_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    /// Time the reader/hasher stage spent reading chunks from the layers (wall time) and
    /// hashing them (its thread's CPU time), in nanoseconds, not waiting on the next stage:
    /// the per-stage measurement the hashing target is judged by.
    pub read_nanos: AtomicU64,
    pub hash_nanos: AtomicU64,
}

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct SwapoutSummary {
    pub disk: String,
    pub manifest: String,
    pub repo: String,
    /// Chunks in the manifest (where the disk differs from its golden).
    pub chunks: u64,
    pub bytes_scanned: u64,
    pub bytes_hashed: u64,
    /// Chunks whose hash was known from the swapin and not recomputed.
    pub hashes_reused: u64,
    /// Chunks the repository already held (dedup).
    pub chunks_reused: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Chunks of the golden image uploaded (only the first time the image is swapped out).
    pub image_chunks_uploaded: u64,
    pub seconds: f64,
    /// Of `seconds`, the time the hashing stage spent reading changed chunks and hashing them
    /// (it overlaps negotiation and upload).
    #[serde(default)]
    pub read_seconds: f64,
    #[serde(default)]
    pub hash_seconds: f64,
}

struct Item {
    index: u64,
    hash: ChunkHash,
    /// The bytes, if this stage read them (a reused hash comes without).
    data: Option<Vec<u8>>,
}

/// Runs the hash -> negotiate -> upload pipeline over `items` (chunk index, hash if known)
/// and returns the (index, hash) entries of every chunk that `keep` accepts. The caller holds
/// the repository's upload lock (`_upload`) until it has committed what names these chunks.
///
/// Shutdown travels with the channels: a stage that fails returns its error and drops its
/// end, which ends the stages next to it; the first error is returned.
fn pipeline(
    items: Vec<(u64, Option<ChunkHash>)>,
    chunk_size: usize,
    read: &(dyn Fn(u64) -> Result<Vec<u8>, SwapError> + Sync),
    keep: &(dyn Fn(u64, &ChunkHash) -> bool + Sync),
    repo: &RepoHandle,
    _upload: &UploadSession,
    counters: &Counters,
    progress: &dyn Fn(&Counters),
) -> Result<Vec<(u64, ChunkHash)>, SwapError> {
    let mut entries = Vec::new();
    let upload_batch = (UPLOAD_BATCH_BYTES / chunk_size.max(1)).max(UPLOAD_BATCH_MIN);
    // Tells the other uploaders to stop early once one has failed.
    let upload_failed = AtomicBool::new(false);
    let (hashed, negotiated, uploaded) = std::thread::scope(|s| {
        let (hashed_tx, hashed_rx) = sync_channel::<Item>(64);
        let (upload_tx, upload_rx) = sync_channel::<(ChunkHash, Vec<u8>)>(64);
        // Stage 1: read and hash what is not known.
        let hasher = s.spawn(move || -> Result<(), SwapError> {
            for (index, known) in items {
                let item = match known {
                    Some(hash) => {
                        counters.hashes_reused.fetch_add(1, Ordering::Relaxed);
                        Item {
                            index,
                            hash,
                            data: None,
                        }
                    }
                    None => {
                        let t0 = Instant::now();
                        let data = read(index)?;
                        let read_nanos = t0.elapsed().as_nanos() as u64;
                        // CPU time of this thread, not wall time: on a busy machine the
                        // uploaders preempt the hasher, which is not hashing's cost.
                        let c0 = thread_cpu_nanos();
                        let hash = ChunkHash::of(&data);
                        let hash_nanos = thread_cpu_nanos().saturating_sub(c0);
                        counters.read_nanos.fetch_add(read_nanos, Ordering::Relaxed);
                        counters.hash_nanos.fetch_add(hash_nanos, Ordering::Relaxed);
                        counters
                            .bytes_hashed
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        Item {
                            index,
                            hash,
                            data: Some(data),
                        }
                    }
                };
                counters
                    .bytes_scanned
                    .fetch_add(chunk_size as u64, Ordering::Relaxed);
                if keep(index, &item.hash) && hashed_tx.send(item).is_err() {
                    return Ok(()); // the negotiator stopped; its error is the one to report
                }
            }
            Ok(())
        });
        // Stage 3: upload, in batches, on several threads. Only they own the receiver, so
        // when the last of them is gone the negotiator's sends fail instead of blocking.
        let upload_rx = Arc::new(Mutex::new(upload_rx));
        let uploaders: Vec<_> = (0..UPLOADERS)
            .map(|_| {
                let (upload_rx, upload_failed) = (upload_rx.clone(), &upload_failed);
                s.spawn(move || -> Result<(), SwapError> {
                    loop {
                        let batch = take_batch(&upload_rx.lock(), upload_batch);
                        if batch.is_empty() || upload_failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let refs: Vec<(ChunkHash, &[u8])> =
                            batch.iter().map(|(h, d)| (*h, d.as_slice())).collect();
                        if let Err(e) = repo.put_chunks(&refs) {
                            upload_failed.store(true, Ordering::Relaxed);
                            return Err(e.into());
                        }
                        let bytes: u64 = refs.iter().map(|r| r.1.len() as u64).sum();
                        counters
                            .chunks_uploaded
                            .fetch_add(refs.len() as u64, Ordering::Relaxed);
                        counters.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        drop(upload_rx);
        // Stage 2 (here): ask which chunks the repository lacks.
        let negotiated = (|| -> Result<(), SwapError> {
            let mut queued: HashSet<ChunkHash> = HashSet::new();
            loop {
                let batch = take_batch(&hashed_rx, NEGOTIATE_BATCH);
                if batch.is_empty() {
                    return Ok(());
                }
                let hashes: Vec<ChunkHash> = batch.iter().map(|i| i.hash).collect();
                let missing = repo.missing(&hashes)?;
                for (item, missing) in batch.into_iter().zip(missing) {
                    entries.push((item.index, item.hash));
                    if !missing || !queued.insert(item.hash) {
                        counters.chunks_present.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let data = match item.data {
                        Some(d) => d,
                        // A reused hash the repository no longer holds: read the chunk now.
                        None => {
                            let d = read(item.index)?;
                            if !item.hash.matches(&d) {
                                return Err(SwapError::Failed(format!(
                                    "chunk {} no longer matches the hash recorded at swapin",
                                    item.index
                                )));
                            }
                            d
                        }
                    };
                    if upload_tx.send((item.hash, data)).is_err() {
                        return Ok(()); // every uploader stopped; their error is reported
                    }
                }
                progress(counters);
            }
        })();
        drop(upload_tx);
        drop(hashed_rx);
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<(), SwapError>>| {
            h.join()
                .unwrap_or_else(|_| Err(SwapError::Failed("a swap thread panicked".into())))
        };
        let hashed = joined(hasher);
        let uploaded: Result<(), SwapError> = uploaders.into_iter().map(joined).collect();
        (hashed, negotiated, uploaded)
    });
    negotiated?;
    hashed?;
    uploaded?;
    progress(counters);
    entries.sort_unstable_by_key(|e| e.0);
    Ok(entries)
}

/// This thread's CPU time so far, in nanoseconds.
fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits for one item, then takes what else is ready, up to `max`. Empty: the sender is gone.
fn take_batch<T>(rx: &Receiver<T>, max: usize) -> Vec<T> {
    let mut batch = Vec::new();
    let Ok(first) = rx.recv() else { return batch };
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(i) => batch.push(i),
            Err(_) => break,
        }
    }
    batch
}

/// Puts the golden image `name` in the repository if it is not there yet (only the chunks
/// the repository lacks are read and sent). An image of that name with other content is an
/// error: names must mean one image everywhere. Returns the chunks uploaded and the image's
/// chunk hashes (from import).
fn ensure_image(
    golden: &Golden,
    name: &str,
    repo: &RepoHandle,
    upload: &UploadSession,
    progress: &dyn Fn(&Counters),
) -> Result<(u64, Vec<ChunkHash>), SwapError> {
    let hashes: Vec<ChunkHash> = golden.chunk_hashes()?.into_iter().map(ChunkHash).collect();
    if let Some(m) = repo.image(name)? {
        if m.info.size != golden.size || !m.entries.iter().map(|e| e.1).eq(hashes.iter().copied()) {
            return Err(SwapError::Usage(format!(
                "the repository has a different image named {name:?}"
            )));
        }
        return Ok((0, hashes));
    }
    let counters = Counters::default();
    let items = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| (i as u64, Some(*h)))
        .collect();
    let read = |index: u64| read_golden_chunk(golden, index);
    let entries = pipeline(
        items,
        CHUNK_SIZE,
        &read,
        &|_, _| true,
        repo,
        upload,
        &counters,
        progress,
    )?;
    repo.commit(&Manifest {
        info: ManifestInfo {
            name: name.into(),
            kind: Kind::Image,
            size: golden.size,
            chunk_size: CHUNK_SIZE as u32,
            image: None,
            parent: None,
            source: None,
            created_at: crate::repo::now_secs(),
            parts: Default::default(),
            config: None,
        },
        entries,
    })?;
    Ok((counters.chunks_uploaded.load(Ordering::Relaxed), hashes))
}

/// The golden's chunks as import hashed them: the last one may be short.
fn read_golden_chunk(golden: &Golden, index: u64) -> Result<Vec<u8>, SwapError> {
    let off = index * CHUNK_SIZE as u64;
    let len = golden.size.saturating_sub(off).min(CHUNK_SIZE as u64) as usize;
    let mut buf = vec![0u8; len];
    golden.read_blocks(off / crate::store::BLOCK_SIZE as u64, &mut buf)?;
    Ok(buf)
}

/// One chunk of the disk as the guest sees it, always 64 KiB (past the end of the disk,
/// zeros): hydration fills whole clusters.
fn read_disk_chunk(disk: &Disk, index: u64) -> Result<Vec<u8>, SwapError> {
    let off = index * CHUNK_SIZE as u64;
    let len = disk.size().saturating_sub(off).min(CHUNK_SIZE as u64) as usize;
    let mut buf = vec![0u8; CHUNK_SIZE];
    disk.read_at(off, &mut buf[..len])
        .map_err(|e| SwapError::Failed(format!("reading chunk {index}: {e}")))?;
    Ok(buf)
}

/// Swaps out an open (and quiet: frozen or not served) disk to `repo` under manifest
/// `manifest`. Commits the manifest; releasing the disk is the caller's.
pub fn swapout(
    store: &Store,
    disk_name: &str,
    disk: &Disk,
    repo: &RepoHandle,
    manifest: &str,
    progress: &dyn Fn(&Counters),
) -> Result<SwapoutSummary, SwapError> {
    let started = Instant::now();
    let rec = store.disk(disk_name)?;
    // Held until the manifest is committed: a garbage collection waits for us, so it never
    // marks before our commit and sweeps the chunks we counted on after it.
    let upload = repo.begin_upload()?;
    let (image_chunks_uploaded, golden_hashes) =
        ensure_image(disk.golden(), &rec.image, repo, &upload, progress)?;
    let counters = Counters::default();
    let zero = ChunkHash(*crate::store::hydrate::zero_chunk_hash());
    let items = disk
        .changed_chunks()
        .into_iter()
        .map(|(i, known)| (i, known.map(ChunkHash)))
        .collect();
    // A chunk equal to the golden's (or zeros past its end) needs no entry.
    let keep = |index: u64, hash: &ChunkHash| match golden_hashes.get(index as usize) {
        Some(g) => g != hash,
        None => *hash != zero,
    };
    let read = |index: u64| read_disk_chunk(disk, index);
    let entries = pipeline(
        items, CHUNK_SIZE, &read, &keep, repo, &upload, &counters, progress,
    )?;
    let parent = store
        .delta_origin(disk_name)?
        .and_then(|o| origin_parts(&o).1.map(str::to_string));
    let m = Manifest {
        info: ManifestInfo {
            name: manifest.into(),
            kind: Kind::Disk,
            size: disk.size(),
            chunk_size: CHUNK_SIZE as u32,
            image: Some(rec.image.clone()),
            parent,
            source: Some(disk_name.into()),
            created_at: crate::repo::now_secs(),
            parts: Default::default(),
            config: None,
        },
        entries,
    };
    repo.commit(&m)?;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(SwapoutSummary {
        disk: disk_name.into(),
        manifest: manifest.into(),
        repo: repo.url(),
        chunks: m.entries.len() as u64,
        bytes_scanned: get(&counters.bytes_scanned),
        bytes_hashed: get(&counters.bytes_hashed),
        hashes_reused: get(&counters.hashes_reused),
        chunks_reused: get(&counters.chunks_present),
        chunks_uploaded: get(&counters.chunks_uploaded),
        bytes_uploaded: get(&counters.bytes_uploaded),
        image_chunks_uploaded,
        seconds: started.elapsed().as_secs_f64(),
        read_seconds: get(&counters.read_nanos) as f64 / 1e9,
        hash_seconds: get(&counters.hash_nanos) as f64 / 1e9,
    })
}

/// Fetches chunks for a hydrating delta from a repository.
pub struct RepoSource(pub RepoHandle);

impl ChunkSource for RepoSource {
    /// `get_chunk` checks every chunk against its hash, for every brick kind and for a
    /// served repository, and fails on a mismatch.
    fn fetch(&self, hash: &[u8; 32]) -> Result<Vec<u8>, String> {
        self.0
            .get_chunk(&ChunkHash(*hash))
            .map_err(|e| e.to_string())
    }
}

/// Brings golden image `name` from the repository into the store (verified chunk by chunk),
/// or checks that the store's image of that name is the repository's.
fn ensure_local_image(store: &Store, repo: &RepoHandle, name: &str) -> Result<(), SwapError> {
    let m = repo
        .image(name)?
        .ok_or_else(|| SwapError::Failed(format!("the repository lacks image {name:?}")))?;
    let want: Vec<[u8; 32]> = m.entries.iter().map(|e| e.1 .0).collect();
    if store.image(name).is_ok() {
        if store.open_golden(name)?.chunk_hashes()? != want {
            return Err(SwapError::Usage(format!(
                "this store's image {name:?} differs from the repository's"
            )));
        }
        return Ok(());
    }
    let tmp = store.root().join("tmp").join(format!("{name}.fetch.raw"));
    let write = || -> Result<(), SwapError> {
        let f = std::fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        f.set_len(m.info.size)
            .map_err(|e| StoreError::io(&tmp, e))?;
        file::fetch_chunks_into(repo, &m, &f, &tmp, &|_, _| {})
    };
    let result = write().and_then(|_| {
        store.import_image(name, &tmp, &|_, _| {})?;
        Ok(())
    });
    let _ = std::fs::remove_file(&tmp);
    result?;
    if store.open_golden(name)?.chunk_hashes()? != want {
        return Err(SwapError::Failed(format!(
            "image {name:?} fetched but its hashes differ"
        )));
    }
    Ok(())
}

/// Swapin: makes disk `as_disk` from manifest `manifest`, at once; its data is hydrated
/// when served (on demand and in the background) or by `hydrate`.
pub fn swapin(
    store: &Store,
    repo: &RepoHandle,
    manifest: &str,
    as_disk: &str,
) -> Result<crate::store::registry::DiskRecord, SwapError> {
    let m = repo.manifest(manifest)?;
    let image = m
        .info
        .image
        .clone()
        .ok_or_else(|| SwapError::Failed(format!("manifest {manifest} names no image")))?;
    if store.disk(as_disk).is_ok() {
        return Err(StoreError::DiskExists(as_disk.into()).into());
    }
    ensure_local_image(store, repo, &image)?;
    let entries: Vec<(u64, [u8; 32])> = m.entries.iter().map(|(i, h)| (*i, h.0)).collect();
    let origin = origin_of(&repo.url(), manifest);
    Ok(store.create_hydrating_disk(as_disk, &image, m.info.size, &entries, &origin)?)
}

/// The origin a swapped-in disk records: `<repository URL>#<manifest>`.
pub fn origin_of(url: &str, manifest: &str) -> String {
    format!("{url}#{manifest}")
}

/// An origin's repository URL and manifest name (none in an origin without `#`).
pub fn origin_parts(origin: &str) -> (&str, Option<&str>) {
    match origin.split_once('#') {
        Some((url, manifest)) => (url, Some(manifest)),
        None => (origin, None),
    }
}

/// How the store reaches the origin of a swapped-in disk ("<repository URL>#<manifest>"):
/// give this to `Store::set_source_factory`.
pub fn source_factory() -> crate::store::SourceFactory {
    Arc::new(|origin: &str| {
        let url = origin_parts(origin).0;
        let repo = RepoHandle::open(url, false).map_err(|e| e.to_string())?;
        Ok(Arc::new(RepoSource(repo)) as Arc<dyn ChunkSource>)
    })
}

/// Fetches what a swapped-in disk still lacks, in the background, while it is served:
/// chunks after the last one a read waited for first, then the rest. Stopped (and joined)
/// when dropped; a repository it cannot reach is retried with backoff.
pub struct Prefetcher {
    stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    wake: parking_lot::Condvar,
}

impl Prefetcher {
    /// None when the disk has nothing left to fetch.
    pub fn start(name: &str, disk: Arc<dyn AsRef<Disk> + Send + Sync>) -> Option<Prefetcher> {
        let pending = (*disk)
            .as_ref()
            .delta()
            .and_then(|d| d.hydration())
            .is_some_and(|h| !h.is_complete());
        if !pending {
            return None;
        }
        let stop = Arc::new(Stop::default());
        let (stop2, name) = (stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let mut backoff = std::time::Duration::from_secs(1);
            while !stop2.flag.load(Ordering::Relaxed) {
                match hydrate((*disk).as_ref(), PREFETCH_WORKERS, &stop2.flag, &|_, _| {}) {
                    Ok(true) => {
                        tracing::info!(disk = %name, "hydration complete");
                        return;
                    }
                    Ok(false) => return, // stopped
                    Err(e) => {
                        tracing::warn!(disk = %name, "prefetch: {e} (retrying in {backoff:?})");
                        let mut g = stop2.lock.lock();
                        if !stop2.flag.load(Ordering::Relaxed) {
                            stop2.wake.wait_for(&mut g, backoff);
                        }
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
        Some(Prefetcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        {
            let _g = self.stop.lock.lock();
            self.stop.flag.store(true, Ordering::Relaxed);
            self.stop.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Threads that `disk hydrate` fetches with: chunk reads from the repository (a file, an
/// object, a request) wait on I/O, so a few in flight keep the source and the delta busy at
/// once. The background prefetcher of a served disk uses fewer ([`PREFETCH_WORKERS`]), to
/// leave the disk to the guest.
pub const HYDRATE_WORKERS: usize = 8;
pub const PREFETCH_WORKERS: usize = 2;

/// Fetches every chunk a swapped-in disk still lacks, until done or `stop`, with `workers`
/// threads; `progress(present, total)`. Returns whether the disk is complete.
pub fn hydrate(
    disk: &Disk,
    workers: usize,
    stop: &AtomicBool,
    progress: &dyn Fn(u64, u64),
) -> Result<bool, SwapError> {
    let Some(h) = disk.delta().and_then(|d| d.hydration()) else {
        return Ok(true);
    };
    // Set by the first worker that fails, so that the others stop too.
    let failed = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..workers.max(1))
            .map(|_| s.spawn(|| hydrate_rounds(h, stop, &failed, None)))
            .collect();
        // This thread works too, and reports progress between its batches.
        let mut result = hydrate_rounds(h, stop, &failed, Some(progress));
        for helper in helpers {
            let r = helper
                .join()
                .unwrap_or_else(|_| Err(SwapError::Failed("a hydration thread panicked".into())));
            result = result.and(r);
        }
        result
    });
    // What was fetched is kept either way; the workers' error, if any, is the one to report.
    let persisted = h.persist();
    result?;
    persisted?;
    let (done, total) = h.progress();
    progress(done, total);
    Ok(h.is_complete())
}

/// One hydration worker: batches of chunks, each made durable, until done, stopped, or
/// another worker failed.
fn hydrate_rounds(
    h: &crate::store::hydrate::Hydration,
    stop: &AtomicBool,
    failed: &AtomicBool,
    progress: Option<&dyn Fn(u64, u64)>,
) -> Result<(), SwapError> {
    let result = (|| {
        while !h.is_complete() && !stop.load(Ordering::Relaxed) && !failed.load(Ordering::Relaxed) {
            h.hydrate_some(64)?;
            h.persist()?;
            if let Some(progress) = progress {
                let (done, total) = h.progress();
                progress(done, total);
            }
        }
        Ok(())
    })();
    if result.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    result
}
