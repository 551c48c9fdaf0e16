//! The delta: read-only blocks that differ from the golden, accumulated since the last migration.
//!
//! One file: a header, the block data, a CRC-32C per data block, then a clustered hash table
//! (kernel-notes/formats.md).
//! The table is keyed by *cluster* (16 consecutive blocks = 64 KiB, one repository chunk); an
//! entry carries two 16-bit maps (which blocks of the cluster have data, which are zeros) and
//! the index of the cluster's first data block. A cluster's data blocks are stored
//! consecutively, so block i of a cluster is at `first + popcount(present & ((1 << i) - 1))`.
//! One probe answers a read; a sequential read of a cluster is one contiguous pread. The table
//! is open addressing with linear probing at load factor <= 1/2 and lives in memory (24 bytes
//! per table slot: 48 to 96 bytes per stored 64 KiB cluster).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, le_u16, le_u64, HeaderReader, HeaderWriter, DATA_OFFSET};
use super::hydrate::{self, Hydration};
use super::wlog::{Entry as WEntry, WriteLayer};
use super::{StoreError, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"STASDLTA";
const VERSION: u32 = 1;
pub const CLUSTER_BLOCKS: u64 = 16;
const ENTRY_LEN: usize = 24;
const EMPTY: u64 = u64::MAX;
const WRITE_BATCH: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TableEntry {
    cluster: u64,
    first: u64,
    present: u16,
    zero: u16,
}

const EMPTY_ENTRY: TableEntry = TableEntry {
    cluster: EMPTY,
    first: 0,
    present: 0,
    zero: 0,
};

/// Where a block of the delta is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaBlock {
    /// Byte offset of the block's data in the delta file.
    Data(u64),
    Zero,
    /// Not in the delta: read the golden.
    Absent,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DeltaStats {
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub clusters: u64,
    pub file_bytes: u64,
}

pub struct Delta {
    file: File,
    path: PathBuf,
    table: Vec<TableEntry>,
    mask: u64,
    data_offset: u64,
    crc_offset: u64,
    pub stats: DeltaStats,
    /// Set while (and after) the delta is filled from a repository (swapin).
    hydration: Option<Hydration>,
}

#[inline]
fn slot_of(cluster: u64, mask: u64) -> u64 {
    cluster.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) & mask
}

impl Delta {
    pub fn open(path: &Path) -> Result<Delta, StoreError> {
        let file = File::open(path).map_err(|e| StoreError::io(path, e))?;
        let hdr = format::read_header(&file, path)?;
        let mut r = HeaderReader::parse(&hdr, MAGIC, VERSION, path, "delta")?;
        let bs = r.u32();
        let cluster_blocks = r.u32();
        let data_offset = r.u64();
        let data_blocks = r.u64();
        let table_offset = r.u64();
        let capacity = r.u64();
        let entries = r.u64();
        let table_crc = r.u32();
        let zero_blocks = r.u64();
        let crc_offset = r.u64();
        let corrupt = |what: String| StoreError::corrupt(path, format!("delta: {what}"));
        if bs as usize != BLOCK_SIZE || cluster_blocks as u64 != CLUSTER_BLOCKS {
            return Err(corrupt(format!(
                "geometry {bs}/{cluster_blocks} not supported"
            )));
        }
        let data_end = data_blocks
            .checked_mul(BLOCK_SIZE as u64)
            .and_then(|b| b.checked_add(data_offset));
        let crc_end = data_end.and_then(|e| e.checked_add(data_blocks * 4));
        if data_offset != DATA_OFFSET
            || !capacity.is_power_of_two()
            || entries >= capacity
            || capacity > 1 << 40
            || data_end != Some(crc_offset)
            || crc_end != Some(table_offset)
        {
            return Err(corrupt("inconsistent header".into()));
        }
        let file_len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
        let expected_len = capacity
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|t| t.checked_add(table_offset));
        if expected_len != Some(file_len) {
            let said =
                expected_len.map_or("an impossible size".to_string(), |l| format!("{l} bytes"));
            return Err(corrupt(format!(
                "file is {file_len} bytes, header says {said} (truncated?)"
            )));
        }
        let mut raw = vec![0u8; capacity as usize * ENTRY_LEN];
        format::read_exact_at(&file, &mut raw, table_offset, path)?;
        if crc32c::crc32c(&raw) != table_crc {
            return Err(corrupt("hash table checksum mismatch".into()));
        }
        let table: Vec<TableEntry> = raw
            .chunks_exact(ENTRY_LEN)
            .map(|e| TableEntry {
                cluster: le_u64(&e[0..8]),
                first: le_u64(&e[8..16]),
                present: le_u16(&e[16..18]),
                zero: le_u16(&e[18..20]),
            })
            .collect();
        if raw.chunks_exact(ENTRY_LEN).any(|e| e[20..24] != [0u8; 4]) {
            return Err(corrupt(
                "hash table entry with non-zero reserved bytes".into(),
            ));
        }
        // Structural checks, so that a lookup can trust the table (and always terminates).
        let mask = capacity - 1;
        let (mut seen, mut data, mut zeros) = (0u64, 0u64, 0u64);
        for (i, e) in table.iter().enumerate() {
            if e.cluster == EMPTY {
                continue;
            }
            seen += 1;
            let n = e.present.count_ones() as u64;
            if e.present & e.zero != 0
                || e.present | e.zero == 0
                || e.first.checked_add(n).is_none_or(|end| end > data_blocks)
                || e.cluster > u64::MAX / CLUSTER_BLOCKS
            {
                return Err(corrupt(format!("hash table entry {i} is invalid")));
            }
            data += n;
            zeros += e.zero.count_ones() as u64;
        }
        if seen != entries || data != data_blocks || zeros != zero_blocks {
            return Err(corrupt("hash table does not match its header".into()));
        }
        // Every data block belongs to exactly one cluster: the ranges tile [0, data_blocks).
        let mut ranges: Vec<(u64, u64)> = table
            .iter()
            .filter(|e| e.cluster != EMPTY && e.present != 0)
            .map(|e| (e.first, e.present.count_ones() as u64))
            .collect();
        ranges.sort_unstable();
        let mut next = 0;
        for (first, n) in ranges {
            if first != next {
                return Err(corrupt(
                    "hash table data ranges overlap or leave gaps".into(),
                ));
            }
            next = first + n;
        }
        let hydration = Hydration::open(path, data_offset, crc_offset, data_blocks)?;
        let delta = Delta {
            hydration,
            file,
            path: path.to_path_buf(),
            table,
            mask,
            data_offset,
            crc_offset,
            stats: DeltaStats {
                data_blocks,
                zero_blocks,
                clusters: entries,
                file_bytes: file_len,
            },
        };
        // A chunk map must describe this very table: its k-th cluster is a whole data cluster
        // whose data is the k-th 64 KiB (its hashes are trusted by swapout).
        if let Some(h) = &delta.hydration {
            for (k, &cluster) in h.clusters().iter().enumerate() {
                let whole = delta.find(cluster).is_some_and(|e| {
                    e.first == k as u64 * CLUSTER_BLOCKS && e.present == u16::MAX && e.zero == 0
                });
                if !whole {
                    return Err(StoreError::corrupt(
                        &hydrate::chunks_path(path),
                        format!("chunk map: cluster {cluster} does not match the delta's table"),
                    ));
                }
            }
        }
        for e in delta.table.iter().filter(|e| e.cluster != EMPTY) {
            // The probe must stop at this very entry (not an equal-looking earlier one).
            if !delta
                .find(e.cluster)
                .is_some_and(|found| std::ptr::eq(found, e))
            {
                return Err(corrupt(format!(
                    "cluster {} is listed twice or off its probe chain",
                    e.cluster
                )));
            }
        }
        Ok(delta)
    }

    fn find(&self, cluster: u64) -> Option<&TableEntry> {
        let mut i = slot_of(cluster, self.mask);
        loop {
            let e = &self.table[i as usize];
            if e.cluster == cluster {
                return Some(e);
            }
            if e.cluster == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Looks up `out.len()` consecutive blocks from `first`, all in one cluster: one probe.
    #[inline]
    pub fn lookup_cluster(&self, first: u64, out: &mut [DeltaBlock]) {
        let entry = self.find(first / CLUSTER_BLOCKS);
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.block_in(entry, first + k as u64);
        }
    }

    #[inline]
    pub fn lookup(&self, block: u64) -> DeltaBlock {
        self.block_in(self.find(block / CLUSTER_BLOCKS), block)
    }

    /// Where `block` is, given its cluster's table entry (if the cluster is in the delta).
    #[inline]
    fn block_in(&self, entry: Option<&TableEntry>, block: u64) -> DeltaBlock {
        let Some(e) = entry else {
            return DeltaBlock::Absent;
        };
        let bit = 1u16 << (block % CLUSTER_BLOCKS);
        if e.zero & bit != 0 {
            DeltaBlock::Zero
        } else if e.present & bit != 0 {
            let index = e.first + (e.present & (bit - 1)).count_ones() as u64;
            DeltaBlock::Data(self.data_offset + index * BLOCK_SIZE as u64)
        } else {
            DeltaBlock::Absent
        }
    }

    /// Reads `buf.len()` bytes of block data at a file offset returned by `lookup`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.make_local(offset, buf.len() as u64)?;
        format::read_exact_at(&self.file, buf, offset, &self.path)
    }

    /// Fetches, for a swapped-in delta, the chunks holding `[offset, offset+len)` that are
    /// not local yet (a no-op once hydrated). Readers call it before they take locks that
    /// must not be held across a network fetch.
    pub fn make_local(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match &self.hydration {
            Some(h) => h.ensure_range(offset, len),
            None => Ok(()),
        }
    }

    /// Whether reads may still have to fetch.
    pub fn is_hydrating(&self) -> bool {
        self.hydration.as_ref().is_some_and(|h| !h.is_complete())
    }

    /// Reads the block at `offset` (from `lookup`) and checks it against its stored CRC-32C.
    pub fn read_verified(&self, block: u64, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.read_at(offset, buf)?;
        let index = (offset - self.data_offset) / BLOCK_SIZE as u64;
        let mut crc = [0u8; 4];
        format::read_exact_at(
            &self.file,
            &mut crc,
            self.crc_offset + index * 4,
            &self.path,
        )?;
        if crc32c::crc32c(buf) != u32::from_le_bytes(crc) {
            return Err(StoreError::corrupt(
                &self.path,
                format!("delta: block {block} does not match its checksum"),
            ));
        }
        Ok(())
    }

    /// Every block of the delta, sorted by block number.
    pub fn blocks(&self) -> Vec<(u64, DeltaBlock)> {
        let mut clusters: Vec<&TableEntry> =
            self.table.iter().filter(|e| e.cluster != EMPTY).collect();
        clusters.sort_unstable_by_key(|e| e.cluster);
        let mut out = Vec::new();
        for e in clusters {
            for i in 0..CLUSTER_BLOCKS {
                let block = e.cluster * CLUSTER_BLOCKS + i;
                match self.block_in(Some(e), block) {
                    DeltaBlock::Absent => {}
                    found => out.push((block, found)),
                }
            }
        }
        out
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hydration state of a delta made by swapin.
    pub fn hydration(&self) -> Option<&Hydration> {
        self.hydration.as_ref()
    }

    /// Creates at `path` the delta of a swapped-in disk: `entries` (ascending cluster, each a
    /// whole 64 KiB chunk named by its BLAKE3 hash) become data clusters left as holes, to be
    /// filled on first read or by the prefetcher; chunks of zeros become zero
    /// clusters. Writes the chunk map beside it.
    pub fn create_hydrating(
        path: &Path,
        entries: &[(u64, [u8; 32])],
    ) -> Result<DeltaStats, StoreError> {
        let mut out = DeltaWriter::create(path)?;
        let mut data = Vec::new();
        for (cluster, hash) in entries {
            if hash == hydrate::zero_chunk_hash() {
                for b in 0..CLUSTER_BLOCKS {
                    out.push_zero(cluster * CLUSTER_BLOCKS + b);
                }
            } else {
                out.push_reserved_cluster(*cluster)?;
                data.push((*cluster, *hash));
            }
        }
        let stats = out.finish()?;
        hydrate::write_map(&hydrate::chunks_path(path), &data)?;
        Ok(stats)
    }
}

/// Writes a delta file from blocks given in ascending order.
pub struct DeltaWriter {
    file: File,
    path: PathBuf,
    clusters: Vec<TableEntry>,
    data_blocks: u64,
    zero_blocks: u64,
    last_block: Option<u64>,
    crcs: Vec<u8>,
    batch: Vec<u8>,
    batch_start: u64,
}

impl DeltaWriter {
    pub fn create(path: &Path) -> Result<DeltaWriter, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        Ok(DeltaWriter {
            file,
            path: path.to_path_buf(),
            clusters: Vec::new(),
            data_blocks: 0,
            zero_blocks: 0,
            last_block: None,
            crcs: Vec::new(),
            batch: Vec::with_capacity(WRITE_BATCH),
            batch_start: DATA_OFFSET,
        })
    }

    fn entry_for(&mut self, block: u64) -> &mut TableEntry {
        assert!(
            self.last_block.is_none_or(|b| b < block),
            "delta blocks must be pushed in ascending order"
        );
        self.last_block = Some(block);
        let cluster = block / CLUSTER_BLOCKS;
        if self.clusters.last().is_none_or(|e| e.cluster != cluster) {
            let first = self.data_blocks;
            self.clusters.push(TableEntry {
                cluster,
                first,
                present: 0,
                zero: 0,
            });
        }
        self.clusters.last_mut().expect("pushed above")
    }

    pub fn push_zero(&mut self, block: u64) {
        self.entry_for(block).zero |= 1 << (block % CLUSTER_BLOCKS);
        self.zero_blocks += 1;
    }

    pub fn push_data(&mut self, block: u64, data: &[u8]) -> Result<(), StoreError> {
        debug_assert_eq!(data.len(), BLOCK_SIZE);
        self.entry_for(block).present |= 1 << (block % CLUSTER_BLOCKS);
        self.data_blocks += 1;
        self.crcs
            .extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        self.batch.extend_from_slice(data);
        if self.batch.len() >= WRITE_BATCH {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Adds a whole data cluster whose data and CRCs are written later (hydration): the
    /// file keeps a hole there.
    pub fn push_reserved_cluster(&mut self, cluster: u64) -> Result<(), StoreError> {
        let first = cluster * CLUSTER_BLOCKS;
        self.entry_for(first).present = u16::MAX;
        self.last_block = Some(first + CLUSTER_BLOCKS - 1);
        self.data_blocks += CLUSTER_BLOCKS;
        self.crcs
            .resize(self.crcs.len() + CLUSTER_BLOCKS as usize * 4, 0);
        self.write_batch()?;
        self.batch_start += CLUSTER_BLOCKS * BLOCK_SIZE as u64;
        Ok(())
    }

    fn write_batch(&mut self) -> Result<(), StoreError> {
        self.file
            .write_all_at(&self.batch, self.batch_start)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.batch_start += self.batch.len() as u64;
        self.batch.clear();
        Ok(())
    }

    /// Writes the table and the header and syncs the file.
    pub fn finish(mut self) -> Result<DeltaStats, StoreError> {
        self.write_batch()?;
        let entries = self.clusters.len() as u64;
        let capacity = (entries * 2).max(16).next_power_of_two();
        let mask = capacity - 1;
        let mut table = vec![EMPTY_ENTRY; capacity as usize];
        for e in &self.clusters {
            let mut i = slot_of(e.cluster, mask);
            while table[i as usize].cluster != EMPTY {
                i = (i + 1) & mask;
            }
            table[i as usize] = *e;
        }
        let mut raw = vec![0u8; capacity as usize * ENTRY_LEN];
        for (e, out) in table.iter().zip(raw.chunks_exact_mut(ENTRY_LEN)) {
            out[0..8].copy_from_slice(&e.cluster.to_le_bytes());
            out[8..16].copy_from_slice(&e.first.to_le_bytes());
            out[16..18].copy_from_slice(&e.present.to_le_bytes());
            out[18..20].copy_from_slice(&e.zero.to_le_bytes());
        }
        let crc_offset = DATA_OFFSET + self.data_blocks * BLOCK_SIZE as u64;
        self.file
            .write_all_at(&self.crcs, crc_offset)
            .map_err(|e| StoreError::io(&self.path, e))?;
        let table_offset = crc_offset + self.crcs.len() as u64;
        self.file
            .write_all_at(&raw, table_offset)
            .map_err(|e| StoreError::io(&self.path, e))?;
        let header = HeaderWriter::new(MAGIC, VERSION)
            .u32(BLOCK_SIZE as u32)
            .u32(CLUSTER_BLOCKS as u32)
            .u64(DATA_OFFSET)
            .u64(self.data_blocks)
            .u64(table_offset)
            .u64(capacity)
            .u64(entries)
            .u32(crc32c::crc32c(&raw))
            .u64(self.zero_blocks)
            .u64(crc_offset)
            .finish();
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| StoreError::io(&self.path, e))?;
        Ok(DeltaStats {
            data_blocks: self.data_blocks,
            zero_blocks: self.zero_blocks,
            clusters: entries,
            file_bytes: table_offset + raw.len() as u64,
        })
    }
}

/// Writes at `path` the delta that results from laying `wlog` over `base`: the write layer
/// wins wherever it has the block. Blocks at or past `disk_blocks` are dropped.
pub fn fold(
    path: &Path,
    base: Option<&Delta>,
    wlog: &WriteLayer,
    disk_blocks: u64,
    progress: &dyn Fn(u64, u64),
) -> Result<DeltaStats, StoreError> {
    let lower = base.map(|d| d.blocks()).unwrap_or_default();
    let upper = wlog.entries();
    // Bytes to go through, as an upper bound (blocks in both layers count once when written).
    let total = (lower.len() + upper.len()) as u64 * BLOCK_SIZE as u64;
    let mut seen = 0u64;
    let mut out = DeltaWriter::create(path)?;
    let mut buf = vec![0u8; BLOCK_SIZE];
    let (mut i, mut j) = (0, 0);
    while i < lower.len() || j < upper.len() {
        seen += 1;
        if seen % 256 == 0 {
            progress((i + j) as u64 * BLOCK_SIZE as u64, total);
        }
        let take_upper = j < upper.len() && (i >= lower.len() || upper[j].0 <= lower[i].0);
        if take_upper {
            let (block, entry) = upper[j];
            if i < lower.len() && lower[i].0 == block {
                i += 1;
            }
            j += 1;
            if block >= disk_blocks {
                continue;
            }
            match entry {
                WEntry::Zero => out.push_zero(block),
                WEntry::Data { slot, crc } => {
                    if !wlog.read_slot_checked(slot, crc, &mut buf)? {
                        return Err(StoreError::corrupt(
                            wlog.dir(),
                            format!("write layer: block {block} (slot {slot}) does not match its checksum"),
                        ));
                    }
                    out.push_data(block, &buf)?;
                }
            }
        } else {
            let (block, found) = lower[i];
            i += 1;
            if block >= disk_blocks {
                continue;
            }
            match found {
                DeltaBlock::Zero => out.push_zero(block),
                DeltaBlock::Data(off) => {
                    base.expect("lower blocks come from base")
                        .read_verified(block, off, &mut buf)?;
                    out.push_data(block, &buf)?;
                }
                DeltaBlock::Absent => {}
            }
        }
    }
    progress(total, total);
    out.finish()
}
