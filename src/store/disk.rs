//! An open disk: write layer over delta over golden over zeros, resolved per 4 KiB block.

use std::sync::Arc;

use parking_lot::Mutex;

use super::delta::{Delta, DeltaBlock};
use super::golden::Golden;
use super::wlog::{Entry, WriteLayer};
use super::{DiskLock, StoreError, BLOCK_SIZE};
use crate::blockdev::{check_range, BlockDevice, BlockError};

const BS: u64 = BLOCK_SIZE as u64;
const RMW_STRIPES: usize = 256;
/// Blocks per delta cluster / index shard group.
const CLUSTER: usize = super::delta::CLUSTER_BLOCKS as usize;
/// Large requests are resolved and copied in pieces of this size to bound temporary buffers.
const PIECE: u64 = 1 << 20;

/// Where the current content of one block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Zero,
    Slot(u32),
    Delta(u64),
    Golden(u64),
}

impl Source {
    /// Whether `next` is the block `k` places after `self` in the same place, so both can be
    /// read with one pread.
    fn continues(self, k: u64, next: Source) -> bool {
        match (self, next) {
            (Source::Zero, Source::Zero) => true,
            (Source::Slot(a), Source::Slot(b)) => a as u64 + k == b as u64,
            (Source::Delta(a), Source::Delta(b)) => a + k * BS == b,
            (Source::Golden(a), Source::Golden(b)) => a + k == b,
            _ => false,
        }
    }
}

/// What `Disk::verify` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    pub golden_bytes_checked: u64,
    /// One line per damaged block or chunk, naming the file.
    pub damaged: Vec<String>,
}

pub struct Disk {
    size: u64,
    golden: Arc<Golden>,
    delta: Option<Arc<Delta>>,
    wlog: WriteLayer,
    /// Serialises read-modify-write of the same block (two sub-block writes to different
    /// sectors of one block must both land).
    rmw: Box<[Mutex<()>]>,
    _lock: DiskLock,
}

fn storage(e: StoreError) -> BlockError {
    BlockError::Storage(Box::new(e))
}

impl Disk {
    pub(super) fn new(
        size: u64,
        golden: Arc<Golden>,
        delta: Option<Arc<Delta>>,
        wlog: WriteLayer,
        lock: DiskLock,
    ) -> Disk {
        Disk {
            size,
            golden,
            delta,
            wlog,
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            _lock: lock,
        }
    }

    pub fn write_layer(&self) -> &WriteLayer {
        &self.wlog
    }

    pub fn delta(&self) -> Option<&Delta> {
        self.delta.as_deref()
    }

    /// Flushes and closes cleanly (the next open needs no recovery).
    pub fn close(self) -> Result<(), StoreError> {
        self.close_shared()
    }

    /// Closes cleanly while others may still hold a reference. The caller guarantees that no
    /// write comes after this (a server freezes its I/O gate first).
    pub fn close_shared(&self) -> Result<(), StoreError> {
        self.wlog.close()
    }

    /// Re-reads every stored block of every layer and checks it: write-layer slots and delta
    /// blocks against their CRC-32C, golden chunks against their BLAKE3 hash. Blocks of a
    /// swapped-in delta not fetched yet are not local: they are skipped, not downloaded
    /// (each chunk is checked against its hash when it arrives). `total` is told the bytes to check once they are known, `progress` each step.
    pub fn verify(
        &self,
        total: &dyn Fn(u64),
        progress: &dyn Fn(u64),
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut buf = vec![0u8; BLOCK_SIZE];
        let written = self.wlog.entries();
        let delta_blocks: Vec<(u64, DeltaBlock)> = self.delta.as_ref().map_or_else(Vec::new, |d| {
            let local = |b: &DeltaBlock| match (b, d.hydration()) {
                (DeltaBlock::Data(off), Some(h)) => h.is_local(*off),
                _ => true,
            };
            d.blocks().into_iter().filter(|(_, b)| local(b)).collect()
        });
        let stored = written
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Data { .. }))
            .count()
            + delta_blocks
                .iter()
                .filter(|(_, b)| matches!(b, DeltaBlock::Data(_)))
                .count();
        total(stored as u64 * BS + self.golden.size);
        for (block, entry) in written {
            if let Entry::Data { slot, crc } = entry {
                // The block may have been rewritten since the listing (a served disk): check
                // the version that is still current, under the reuse gate.
                let _guard = self.wlog.read_guard();
                if !matches!(self.wlog.lookup(block), Some(Entry::Data { slot: s, .. }) if s == slot)
                {
                    continue;
                }
                if !self.wlog.read_slot_checked(slot, crc, &mut buf)? {
                    report.damaged.push(format!(
                        "{}: write layer block {block} (slot {slot})",
                        self.wlog.dir().display()
                    ));
                }
                report.blocks_checked += 1;
                progress(BS);
            }
        }
        if let Some(delta) = &self.delta {
            for (block, found) in delta_blocks {
                if let DeltaBlock::Data(off) = found {
                    match delta.read_verified(block, off, &mut buf) {
                        Ok(()) => {}
                        Err(StoreError::Corrupt { path, problem }) => report
                            .damaged
                            .push(format!("{}: {problem}", path.display())),
                        Err(e) => return Err(e),
                    }
                    report.blocks_checked += 1;
                    progress(BS);
                }
            }
        }
        for chunk in self.golden.verify(progress)? {
            report.damaged.push(format!(
                "{}: chunk {chunk} does not match its BLAKE3 hash",
                self.golden.path().display()
            ));
        }
        report.golden_bytes_checked = self.golden.size;
        Ok(report)
    }

    /// Releases the disk without flushing or closing cleanly, as a crash would (the page
    /// cache still holds completed writes; the next open recovers from the journal).
    pub fn abandon(self) {
        self.wlog.abandon();
    }

    /// Where `block` is read from, given what the write layer says of it; the delta is asked
    /// only if the write layer does not have the block.
    #[inline]
    fn source(
        &self,
        block: u64,
        upper: Option<Entry>,
        middle: impl FnOnce() -> DeltaBlock,
    ) -> Source {
        match upper {
            Some(Entry::Data { slot, .. }) => Source::Slot(slot),
            Some(Entry::Zero) => Source::Zero,
            None => match middle() {
                DeltaBlock::Data(off) => Source::Delta(off),
                DeltaBlock::Zero => Source::Zero,
                DeltaBlock::Absent if block < self.golden.blocks => Source::Golden(block),
                DeltaBlock::Absent => Source::Zero,
            },
        }
    }

    /// Resolves `out.len()` consecutive blocks from `first`, all inside one 16-block cluster:
    /// one delta probe serves them all.
    #[inline]
    fn resolve_cluster(&self, first: u64, out: &mut [Source]) {
        let mut middle: Option<[DeltaBlock; CLUSTER]> = None;
        for (k, o) in out.iter_mut().enumerate() {
            let block = first + k as u64;
            *o = self.source(block, self.wlog.lookup(block), || {
                let m = middle.get_or_insert_with(|| {
                    let mut m = [DeltaBlock::Absent; CLUSTER];
                    if let Some(delta) = &self.delta {
                        delta.lookup_cluster(first, &mut m[..]);
                    }
                    m
                });
                m[k]
            });
        }
    }

    fn read_run(&self, src: Source, out: &mut [u8]) -> Result<(), StoreError> {
        match src {
            Source::Zero => {
                out.fill(0);
                Ok(())
            }
            Source::Slot(slot) => self.wlog.read_slots(slot, out),
            Source::Delta(off) => self
                .delta
                .as_ref()
                .expect("resolved from delta")
                .read_at(off, out),
            Source::Golden(block) => self.golden.read_blocks(block, out),
        }
    }

    /// Reads whole blocks; runs of blocks stored contiguously go out as one pread.
    fn read_blocks(&self, first: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let n = (buf.len() / BLOCK_SIZE) as u64;
        self.fetch_delta_blocks(first, n)?;
        // No slot can be reused while we hold this, so a block read is never another's data.
        let _guard = self.wlog.read_guard();
        let mut run: Option<(u64, Source)> = None;
        let mut i = 0u64;
        let mut sources = [Source::Zero; CLUSTER];
        while i < n {
            let block = first + i;
            let m = ((CLUSTER as u64 - block % CLUSTER as u64).min(n - i)) as usize;
            self.resolve_cluster(block, &mut sources[..m]);
            for (k, &s) in sources[..m].iter().enumerate() {
                let at = i + k as u64;
                match run {
                    Some((start, src)) if src.continues(at - start, s) => {}
                    Some((start, src)) => {
                        self.read_run(src, &mut buf[(start * BS) as usize..(at * BS) as usize])?;
                        run = Some((at, s));
                    }
                    None => run = Some((at, s)),
                }
            }
            i += m as u64;
        }
        if let Some((start, src)) = run {
            self.read_run(src, &mut buf[(start * BS) as usize..])?;
        }
        Ok(())
    }

    /// For a swapped-in disk: fetches the delta chunks that blocks `[first, first+n)` read
    /// from, before `read_blocks` takes the write layer's reuse gate (a FLUSH waits for that
    /// gate; it must not wait for the network). Resolving without the gate may be stale, but
    /// the delta never changes and a block that moves to the write layer needs no fetch; a
    /// block missed here is fetched by the read itself.
    fn fetch_delta_blocks(&self, first: u64, n: u64) -> Result<(), StoreError> {
        let Some(delta) = self.delta.as_ref().filter(|d| d.is_hydrating()) else {
            return Ok(());
        };
        let mut sources = [Source::Zero; CLUSTER];
        let mut i = 0u64;
        while i < n {
            let block = first + i;
            let m = ((CLUSTER as u64 - block % CLUSTER as u64).min(n - i)) as usize;
            self.resolve_cluster(block, &mut sources[..m]);
            for s in &sources[..m] {
                if let Source::Delta(off) = *s {
                    delta.make_local(off, BS)?;
                }
            }
            i += m as u64;
        }
        Ok(())
    }

    fn rmw_lock(&self, block: u64) -> parking_lot::MutexGuard<'_, ()> {
        self.rmw[(block as usize) % RMW_STRIPES].lock()
    }

    /// Writes `bytes` at byte `at` inside `block`, keeping the rest of the block.
    /// Optimistic: the merged block is committed only if no other write changed the block
    /// since it was read (else it is read and merged again), so a racing write is never
    /// undone. That check alone is what makes it correct; the stripe lock only keeps sub-block
    /// writes to one block (sectors written side by side) from retrying each other.
    fn write_partial(
        &self,
        block: u64,
        at: usize,
        bytes: Option<&[u8]>,
        len: usize,
    ) -> Result<(), StoreError> {
        let _g = self.rmw_lock(block);
        let mut buf = [0u8; BLOCK_SIZE];
        loop {
            // The version first, then the content: a write landing in between is caught.
            let version = self.wlog.block_version(block);
            self.read_blocks(block, &mut buf)?;
            match bytes {
                Some(b) => buf[at..at + len].copy_from_slice(b),
                None => buf[at..at + len].fill(0),
            }
            if self.wlog.write_block_if_unchanged(block, &buf, version)? {
                return Ok(());
            }
        }
    }

    /// Splits `[offset, offset+len)` into a partial head, whole blocks, and a partial tail.
    fn split(
        offset: u64,
        len: u64,
    ) -> (
        Option<(u64, usize, usize)>,
        (u64, u64),
        Option<(u64, usize, usize)>,
    ) {
        let end = offset + len;
        let first_full = offset.div_ceil(BS);
        let end_full = end / BS;
        if first_full >= end_full {
            // No whole block: one or two partial blocks.
            let b0 = offset / BS;
            let b1 = (end - 1) / BS;
            if b0 == b1 {
                return (
                    Some((b0, (offset % BS) as usize, len as usize)),
                    (0, 0),
                    None,
                );
            }
            let head_len = (BS - offset % BS) as usize;
            return (
                Some((b0, (offset % BS) as usize, head_len)),
                (0, 0),
                Some((b1, 0, (end % BS) as usize)),
            );
        }
        let head = (offset % BS != 0).then(|| {
            (
                offset / BS,
                (offset % BS) as usize,
                (first_full * BS - offset) as usize,
            )
        });
        let tail = (end % BS != 0).then(|| (end_full, 0, (end % BS) as usize));
        (head, (first_full, end_full - first_full), tail)
    }

    fn write_impl(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), StoreError> {
        let (head, (first, count), tail) = Self::split(offset, len);
        if let Some((block, at, n)) = head {
            self.write_partial(block, at, data.map(|d| &d[..n]), n)?;
        }
        let body_at = (first * BS).saturating_sub(offset) as usize;
        if count > 0 {
            match data {
                Some(d) => {
                    // Whole blocks never read the lower layers (no read-before-write).
                    let mut done = 0;
                    while done < count {
                        let n = (count - done).min(PIECE / BS);
                        let from = body_at + (done * BS) as usize;
                        self.wlog
                            .write_blocks(first + done, &d[from..from + (n * BS) as usize])?;
                        done += n;
                    }
                }
                None => self.wlog.write_zeroes(first, count)?,
            }
        }
        if let Some((block, at, n)) = tail {
            let from = (block * BS - offset) as usize;
            self.write_partial(block, at, data.map(|d| &d[from..from + n]), n)?;
        }
        Ok(())
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        if offset % BS == 0 && buf.len() as u64 % BS == 0 {
            // In pieces: each holds the reuse gate briefly, so a FLUSH freeing slots never
            // waits behind one huge read (nor do the readers queued behind it).
            for (i, piece) in buf.chunks_mut(PIECE as usize).enumerate() {
                self.read_blocks(offset / BS + i as u64 * (PIECE / BS), piece)
                    .map_err(storage)?;
            }
            return Ok(());
        }
        // Unaligned: read the covering blocks piecewise and copy out.
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut tmp = Vec::new();
        while pos < end {
            let block = pos / BS;
            let piece_end = ((block * BS) + PIECE).min(end);
            let blocks = (piece_end - block * BS).div_ceil(BS);
            tmp.resize((blocks * BS) as usize, 0);
            self.read_blocks(block, &mut tmp).map_err(storage)?;
            let skip = (pos - block * BS) as usize;
            let n = (piece_end - pos) as usize;
            let at = (pos - offset) as usize;
            buf[at..at + n].copy_from_slice(&tmp[skip..skip + n]);
            pos = piece_end;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.size)?;
        if !data.is_empty() {
            self.write_impl(offset, Some(data), data.len() as u64)
                .map_err(storage)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        if len > 0 {
            self.write_impl(offset, None, len).map_err(storage)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        let first = offset.div_ceil(BS);
        let end = (offset + len) / BS;
        if end > first {
            self.wlog
                .write_zeroes(first, end - first)
                .map_err(storage)?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.wlog.flush().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cases() {
        // inside one block
        assert_eq!(Disk::split(10, 20), (Some((0, 10, 20)), (0, 0), None));
        // straddling two blocks, no whole block
        assert_eq!(
            Disk::split(4000, 200),
            (Some((0, 4000, 96)), (0, 0), Some((1, 0, 104)))
        );
        // aligned whole blocks
        assert_eq!(Disk::split(4096, 8192), (None, (1, 2), None));
        // head + body + tail
        assert_eq!(
            Disk::split(100, 3 * 4096),
            (Some((0, 100, 3996)), (1, 2), Some((3, 0, 100)))
        );
        // exactly one whole block, unaligned end only
        assert_eq!(Disk::split(0, 4096 + 1), (None, (0, 1), Some((1, 0, 1))));
    }
}

impl Disk {
    /// The chunks (64 KiB clusters, by index) in which the disk may differ from its golden:
    /// those the write layer touched and those the delta holds, ascending. Each comes with
    /// its BLAKE3 hash when that is known without reading it: a cluster the write layer left
    /// alone whose hash swapin recorded in the chunk map, or that the delta holds as zeros.
    pub fn changed_chunks(&self) -> Vec<(u64, Option<[u8; 32]>)> {
        let touched: std::collections::BTreeSet<u64> = self
            .wlog
            .entries()
            .into_iter()
            .map(|(block, _)| block / CLUSTER as u64)
            .collect();
        let Some(delta) = &self.delta else {
            return touched.into_iter().map(|c| (c, None)).collect();
        };
        let recorded: std::collections::HashMap<u64, [u8; 32]> = delta
            .hydration()
            .map(|h| h.hashes().map(|(c, hash)| (c, *hash)).collect())
            .unwrap_or_default();
        let mut clusters: Vec<u64> = delta
            .blocks()
            .into_iter()
            .map(|(b, _)| b / CLUSTER as u64)
            .chain(touched.iter().copied())
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        clusters
            .into_iter()
            .map(|c| {
                if touched.contains(&c) {
                    return (c, None);
                }
                if let Some(hash) = recorded.get(&c) {
                    return (c, Some(*hash));
                }
                let mut blocks = [DeltaBlock::Absent; CLUSTER];
                delta.lookup_cluster(c * CLUSTER as u64, &mut blocks);
                let zeros = blocks.iter().all(|b| *b == DeltaBlock::Zero);
                (c, zeros.then(|| *super::hydrate::zero_chunk_hash()))
            })
            .collect()
    }

    pub fn golden(&self) -> &Golden {
        &self.golden
    }
}
