//! Hydration: a delta whose data arrives later. Swapin creates the delta of a disk from a
//! manifest at once (its table says which 64 KiB clusters hold data), leaves those clusters'
//! data as holes, and fills each from a [`ChunkSource`] the first time it is read, or in the
//! background (the prefetcher calls [`Hydration::hydrate_some`]). The device is usable at
//! once; nothing else in the store sees the difference.
//!
//! The side file `<id>.chunks` next to `<id>.delta` (kernel-notes/formats.md, "Chunk map"):
//! ```text
//! 0      header   4 KiB, magic b"STASCHNK", version 1; body: count u64, entries_at u64,
//!                 present_at u64
//! 4096   entries  count x (cluster u64 LE, BLAKE3 hash [u8; 32]), ascending cluster: the
//!                 delta's data clusters in data order (cluster k's data is the k-th 64 KiB)
//! ...    present  count bytes: 1 once the cluster's data and CRCs are durable in the delta
//! ```
//! It stays after hydration completes: its hashes let the next swapout skip re-hashing
//! clusters the disk did not change. A `present` byte is written only after the delta file
//! was synced, so a crash at worst forgets chunks (fetched again), never claims absent ones.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::delta::CLUSTER_BLOCKS;
use super::format::{self, le_u64, HeaderReader, HeaderWriter, HEADER_LEN};
use super::{StoreError, BLOCK_SIZE, CHUNK_SIZE};

const MAGIC: &[u8; 8] = b"STASCHNK";
const VERSION: u32 = 1;
const ENTRY_LEN: usize = 40;
const STRIPES: usize = 64;

/// Where hydration gets the chunks it lacks (the swap engine connects a repository).
pub trait ChunkSource: Send + Sync {
    /// The bytes of the chunk named by this BLAKE3 hash, checked against it: a source never
    /// returns bytes that are not that chunk, it fails instead (the repository's reads check
    /// every chunk where it enters, `brick::decode`; the store does not hash it again, which
    /// was a sixth of hydration's CPU).
    fn fetch(&self, hash: &[u8; 32]) -> Result<Vec<u8>, String>;
}

/// The BLAKE3 hash of a 64 KiB chunk of zeros: swapin makes such chunks zero clusters, never
/// fetched.
pub fn zero_chunk_hash() -> &'static [u8; 32] {
    static ZERO: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    ZERO.get_or_init(|| *blake3::hash(&[0u8; CHUNK_SIZE]).as_bytes())
}

pub fn chunks_path(delta_path: &Path) -> PathBuf {
    delta_path.with_extension("chunks")
}

/// Writes the chunk map for a delta about to be hydrated (nothing present yet), synced.
pub fn write_map(path: &Path, entries: &[(u64, [u8; 32])]) -> Result<(), StoreError> {
    let count = entries.len() as u64;
    let entries_at = HEADER_LEN as u64;
    let present_at = entries_at + count * ENTRY_LEN as u64;
    let mut buf = HeaderWriter::new(MAGIC, VERSION)
        .u64(count)
        .u64(entries_at)
        .u64(present_at)
        .finish();
    for (cluster, hash) in entries {
        buf.extend_from_slice(&cluster.to_le_bytes());
        buf.extend_from_slice(hash);
    }
    buf.resize(buf.len() + entries.len(), 0);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    f.write_all_at(&buf, 0)
        .and_then(|_| f.sync_all())
        .map_err(|e| StoreError::io(path, e))
}

/// (chunks present, chunks) from a chunk map, read without opening its delta; None if there
/// is no map or it cannot be read (`disk info` must not fail on that).
pub fn map_progress(path: &Path) -> Option<(u64, u64)> {
    let map = File::open(path).ok()?;
    let hdr = format::read_header(&map, path).ok()?;
    let mut r = HeaderReader::parse(&hdr, MAGIC, VERSION, path, "chunk map").ok()?;
    let (count, _, present_at) = (r.u64(), r.u64(), r.u64());
    let mut present = vec![0u8; usize::try_from(count).ok()?];
    format::read_exact_at(&map, &mut present, present_at, path).ok()?;
    Some((present.iter().filter(|&&b| b == 1).count() as u64, count))
}

pub struct Hydration {
    map_path: PathBuf,
    map: File,
    /// The delta file, writable (the `Delta` reads through its own handle).
    data: File,
    data_path: PathBuf,
    data_offset: u64,
    crc_offset: u64,
    present_at: u64,
    clusters: Vec<u64>,
    hashes: Vec<[u8; 32]>,
    present: Vec<AtomicBool>,
    remaining: AtomicU64,
    /// Chunks written to the delta whose `present` byte is not written yet.
    unsynced: Mutex<Vec<u32>>,
    /// Held by `persist` from taking `unsynced` to writing the map (see there).
    persisting: Mutex<()>,
    /// Held while a chunk is written into the delta: the kernel serializes writes to one
    /// file anyway (its inode lock), and workers waiting there spin on the CPU that the others
    /// need for reading and checksums (13% of hydration's CPU in a profile); here they sleep.
    writing: Mutex<()>,
    stripes: Box<[Mutex<()>]>,
    source: RwLock<Option<Arc<dyn ChunkSource>>>,
    /// The last chunk a read had to wait for: the prefetcher continues from there.
    hint: AtomicU64,
    cursor: AtomicU64,
}

impl Hydration {
    /// Loads the chunk map of the delta at `delta_path`, if it has one. `data_clusters` is
    /// the delta's count of data blocks / 16: the map must describe exactly those.
    pub fn open(
        delta_path: &Path,
        data_offset: u64,
        crc_offset: u64,
        data_blocks: u64,
    ) -> Result<Option<Hydration>, StoreError> {
        let map_path = chunks_path(delta_path);
        let map = match OpenOptions::new().read(true).write(true).open(&map_path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&map_path, e)),
        };
        let corrupt = |what: &str| StoreError::corrupt(&map_path, format!("chunk map: {what}"));
        let hdr = format::read_header(&map, &map_path)?;
        let mut r = HeaderReader::parse(&hdr, MAGIC, VERSION, &map_path, "chunk map")?;
        let (count, entries_at, present_at) = (r.u64(), r.u64(), r.u64());
        let clusters_in_delta = data_blocks / CLUSTER_BLOCKS;
        if entries_at != HEADER_LEN as u64
            || count != clusters_in_delta
            || data_blocks % CLUSTER_BLOCKS != 0
            || count
                .checked_mul(ENTRY_LEN as u64)
                .and_then(|n| n.checked_add(entries_at))
                != Some(present_at)
        {
            return Err(corrupt("header does not match its delta"));
        }
        let mut raw = vec![0u8; count as usize * (ENTRY_LEN + 1)];
        format::read_exact_at(&map, &mut raw, entries_at, &map_path)?;
        let (entries, present) = raw.split_at(count as usize * ENTRY_LEN);
        let mut clusters = Vec::with_capacity(count as usize);
        let mut hashes = Vec::with_capacity(count as usize);
        for e in entries.chunks_exact(ENTRY_LEN) {
            let c = le_u64(&e[..8]);
            if clusters.last().is_some_and(|&p| p >= c) {
                return Err(corrupt("entries out of order"));
            }
            clusters.push(c);
            hashes.push(e[8..].try_into().expect("32 bytes"));
        }
        if present.iter().any(|&b| b > 1) {
            return Err(corrupt("bad present byte"));
        }
        let remaining = present.iter().filter(|&&b| b == 0).count() as u64;
        let data = OpenOptions::new()
            .write(true)
            .open(delta_path)
            .map_err(|e| StoreError::io(delta_path, e))?;
        Ok(Some(Hydration {
            map_path,
            map,
            data,
            data_path: delta_path.to_path_buf(),
            data_offset,
            crc_offset,
            present_at,
            clusters,
            hashes,
            present: present.iter().map(|&b| AtomicBool::new(b == 1)).collect(),
            remaining: AtomicU64::new(remaining),
            unsynced: Mutex::new(Vec::new()),
            persisting: Mutex::new(()),
            writing: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            source: RwLock::new(None),
            hint: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
        }))
    }

    pub fn set_source(&self, source: Arc<dyn ChunkSource>) {
        *self.source.write() = Some(source);
    }

    /// (chunks present, chunks in all).
    pub fn progress(&self) -> (u64, u64) {
        let total = self.clusters.len() as u64;
        (total - self.remaining.load(Ordering::Relaxed), total)
    }

    /// Whether the delta bytes at `offset` are local (a chunk not fetched yet is not).
    pub fn is_local(&self, offset: u64) -> bool {
        let k = ((offset - self.data_offset) / CHUNK_SIZE as u64) as usize;
        self.present
            .get(k)
            .is_none_or(|p| p.load(Ordering::Acquire))
    }

    pub fn is_complete(&self) -> bool {
        self.remaining.load(Ordering::Relaxed) == 0
    }

    /// The data clusters, in data order (cluster k's data is the k-th 64 KiB).
    pub(super) fn clusters(&self) -> &[u64] {
        &self.clusters
    }

    /// The hash of each data cluster: (cluster, BLAKE3).
    pub fn hashes(&self) -> impl Iterator<Item = (u64, &[u8; 32])> {
        self.clusters.iter().copied().zip(self.hashes.iter())
    }

    /// Makes sure the chunks holding delta bytes `[offset, offset+len)` are present.
    pub fn ensure_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.is_complete() || len == 0 {
            return Ok(());
        }
        let first = (offset - self.data_offset) / CHUNK_SIZE as u64;
        let last = (offset + len - 1 - self.data_offset) / CHUNK_SIZE as u64;
        for k in first..=last.min(self.clusters.len() as u64 - 1) {
            if !self.present[k as usize].load(Ordering::Acquire) {
                self.hint.store(k + 1, Ordering::Relaxed);
                self.fetch(k as usize)?;
            }
        }
        Ok(())
    }

    fn fetch(&self, k: usize) -> Result<(), StoreError> {
        let _stripe = self.stripes[k % STRIPES].lock();
        if self.present[k].load(Ordering::Acquire) {
            return Ok(());
        }
        let source = self.source.read().clone().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "cluster {} of {} is not hydrated yet and no repository is connected",
                self.clusters[k],
                self.data_path.display()
            ))
        })?;
        let hash = &self.hashes[k];
        let data = source.fetch(hash).map_err(|e| {
            StoreError::Unavailable(format!(
                "fetching chunk for cluster {}: {e}",
                self.clusters[k]
            ))
        })?;
        // The source checked the bytes against the hash; a chunk of another size than a
        // cluster's cannot be written in one.
        if data.len() != CHUNK_SIZE {
            return Err(StoreError::corrupt(
                &self.data_path,
                format!(
                    "chunk {} for cluster {} is {} bytes, not a cluster's (refused)",
                    blake3::Hash::from_bytes(*hash).to_hex(),
                    self.clusters[k],
                    data.len()
                ),
            ));
        }
        let mut crcs = Vec::with_capacity(CHUNK_SIZE / BLOCK_SIZE * 4);
        for block in data.chunks_exact(BLOCK_SIZE) {
            crcs.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
        }
        let at = self.data_offset + (k * CHUNK_SIZE) as u64;
        let crc_at = self.crc_offset + (k * CHUNK_SIZE / BLOCK_SIZE * 4) as u64;
        let written = {
            let _one_writer = self.writing.lock();
            self.data
                .write_all_at(&data, at)
                .and_then(|_| self.data.write_all_at(&crcs, crc_at))
        };
        written.map_err(|e| StoreError::io(&self.data_path, e))?;
        self.present[k].store(true, Ordering::Release);
        self.remaining.fetch_sub(1, Ordering::Relaxed);
        self.unsynced.lock().push(k as u32);
        Ok(())
    }

    /// Fetches up to `n` absent chunks, those after the last one a read waited for first;
    /// returns how many it fetched (0: complete).
    pub fn hydrate_some(&self, n: usize) -> Result<usize, StoreError> {
        let total = self.clusters.len() as u64;
        let mut done = 0;
        let mut scanned = 0;
        while done < n && scanned < total && !self.is_complete() {
            let hint = self.hint.load(Ordering::Relaxed);
            // Claimed with a compare-exchange: two workers never both take the same chunk.
            let k = if hint > 0
                && hint < total
                && !self.present[hint as usize].load(Ordering::Acquire)
                && self
                    .hint
                    .compare_exchange(hint, hint + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                hint
            } else {
                scanned += 1;
                self.cursor.fetch_add(1, Ordering::Relaxed) % total
            };
            if !self.present[k as usize].load(Ordering::Acquire) {
                self.fetch(k as usize)?;
                done += 1;
            }
        }
        Ok(done)
    }

    /// Records fetched chunks as present, durably: delta first, then the map. One call at a
    /// time (several hydration workers call it): Linux reports a writeback error to one
    /// `fdatasync` only, so a second one running alongside could succeed and mark present
    /// chunks whose pages the first one's error dropped.
    pub fn persist(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.persisting.lock();
        let mut pending = std::mem::take(&mut *self.unsynced.lock());
        if pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.data.sync_data() {
            // After a failed writeback the kernel may drop those pages, and the holes under
            // them read as zeros: count the chunks as absent again, to be fetched anew; also
            // those written since the take, whose pages the same writeback may have covered.
            let mut lost = pending;
            lost.append(&mut self.unsynced.lock());
            for &k in &lost {
                if self.present[k as usize].swap(false, Ordering::AcqRel) {
                    self.remaining.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Err(StoreError::io(&self.data_path, e));
        }
        // One write per run of consecutive clusters (workers take them mostly in order),
        // not one per cluster.
        pending.sort_unstable();
        for run in pending.chunk_by(|a, b| *b == a + 1) {
            self.map
                .write_all_at(&vec![1u8; run.len()], self.present_at + run[0] as u64)
                .map_err(|e| StoreError::io(&self.map_path, e))?;
        }
        self.map
            .sync_data()
            .map_err(|e| StoreError::io(&self.map_path, e))
    }
}

impl Drop for Hydration {
    fn drop(&mut self) {
        if let Err(e) = self.persist() {
            tracing::warn!("hydration state not saved (chunks will be fetched again): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::delta::Delta;
    use super::*;

    fn hash(n: u8) -> [u8; 32] {
        *blake3::hash(&[n]).as_bytes()
    }

    #[test]
    fn a_chunk_map_that_names_other_clusters_than_the_delta_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.delta");
        Delta::create_hydrating(&p, &[(2, hash(1)), (9, hash(2)), (11, *zero_chunk_hash())])
            .unwrap();
        let d = Delta::open(&p).unwrap();
        let h = d.hydration().unwrap();
        assert_eq!(h.progress(), (0, 2), "the zero chunk is not in the map");
        assert_eq!(h.clusters(), &[2, 9]);
        drop(d);
        // Cluster 9 renamed 10 in the map (header re-sealed: only the cross-check can tell).
        let map = chunks_path(&p);
        let mut bytes = std::fs::read(&map).unwrap();
        let at = HEADER_LEN + ENTRY_LEN;
        bytes[at..at + 8].copy_from_slice(&10u64.to_le_bytes());
        std::fs::write(&map, &bytes).unwrap();
        let err = Delta::open(&p).err().expect("refused").to_string();
        assert!(err.contains("does not match the delta"), "{err}");
    }

    #[test]
    fn without_a_source_an_absent_chunk_is_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.delta");
        Delta::create_hydrating(&p, &[(0, hash(1))]).unwrap();
        let d = Delta::open(&p).unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        let off = super::super::format::DATA_OFFSET;
        assert!(matches!(
            d.read_at(off, &mut buf),
            Err(StoreError::Unavailable(_))
        ));
    }
}
