//! The golden image: an immutable base shared read-only by every disk made from it.
//!
//! Linear addressing: block N lives at byte `1 MiB + N * 4096` of the `golden` file, so a read
//! needs no index. Beside it, `chunks.b3` holds the BLAKE3 hash of every chunk, computed once
//! at import so the swap engine and image distribution never hash the golden again.
//! Formats: kernel-notes/formats.md.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, HeaderReader, HeaderWriter, DATA_OFFSET, HEADER_LEN};
use super::{StoreError, BLOCK_SIZE, CHUNK_SIZE};

const GOLDEN_MAGIC: &[u8; 8] = b"STASGOLD";
const GOLDEN_VERSION: u32 = 1;
const HASHES_MAGIC: &[u8; 8] = b"STASB3CH";
const HASHES_VERSION: u32 = 1;

pub const GOLDEN_FILE: &str = "golden";
pub const HASHES_FILE: &str = "chunks.b3";

/// An open golden image.
pub struct Golden {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// Logical size in bytes (a multiple of the block size).
    pub size: u64,
    pub blocks: u64,
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub size: u64,
    /// Size of the source before it was padded to a whole block.
    pub source_size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
}

impl Golden {
    pub fn open(dir: &Path) -> Result<Golden, StoreError> {
        let path = dir.join(GOLDEN_FILE);
        let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
        let hdr = format::read_header(&file, &path)?;
        let mut r = HeaderReader::parse(&hdr, GOLDEN_MAGIC, GOLDEN_VERSION, &path, "golden image")?;
        let size = r.u64();
        let block_size = r.u32();
        let blocks = r.u64();
        let chunk_size = r.u32();
        if block_size as usize != BLOCK_SIZE
            || blocks.checked_mul(BLOCK_SIZE as u64) != Some(size)
            || chunk_size as usize != CHUNK_SIZE
        {
            return Err(StoreError::corrupt(
                &path,
                format!("golden image: inconsistent geometry (size {size}, block size {block_size}, {blocks} blocks, chunk size {chunk_size})"),
            ));
        }
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        if DATA_OFFSET.checked_add(size) != Some(len) {
            return Err(StoreError::corrupt(
                &path,
                format!(
                    "golden image: file is {len} bytes, header says {}",
                    DATA_OFFSET.saturating_add(size)
                ),
            ));
        }
        Ok(Golden {
            file,
            path,
            dir: dir.to_path_buf(),
            size,
            blocks,
        })
    }

    /// Byte offset of `block` in the golden file (the caller checks `block < self.blocks`).
    #[inline]
    pub fn block_offset(block: u64) -> u64 {
        DATA_OFFSET + block * BLOCK_SIZE as u64
    }

    /// Reads whole blocks starting at `block`; blocks past the image's end read as zeros.
    pub fn read_blocks(&self, block: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let n = (buf.len() / BLOCK_SIZE) as u64;
        let inside = n.min(self.blocks.saturating_sub(block)) as usize * BLOCK_SIZE;
        if inside > 0 {
            format::read_exact_at(
                &self.file,
                &mut buf[..inside],
                Self::block_offset(block),
                &self.path,
            )?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    /// The BLAKE3 hash of every chunk, verified against its checksum.
    pub fn chunk_hashes(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        read_hashes(&self.dir.join(HASHES_FILE), self.size)
    }

    /// Re-hashes the image and returns the indexes of chunks whose hash differs from the stored one.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<Vec<u64>, StoreError> {
        let stored = self.chunk_hashes()?;
        let mut bad = Vec::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        for (i, want) in stored.iter().enumerate() {
            let off = i as u64 * CHUNK_SIZE as u64;
            let len = (self.size - off).min(CHUNK_SIZE as u64) as usize;
            format::read_exact_at(&self.file, &mut buf[..len], DATA_OFFSET + off, &self.path)?;
            if blake3::hash(&buf[..len]).as_bytes() != want {
                bad.push(i as u64);
            }
            progress(len as u64);
        }
        Ok(bad)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Imports a raw image from `src` into `dir` (which must exist and be empty). Chunks of zeros
/// are left as holes. Files are written under temporary names, synced, then renamed, so a crash
/// never leaves a half-imported image that looks complete.
pub fn import_raw(
    src: &mut dyn Read,
    src_path: &Path,
    dir: &Path,
    mut progress: impl FnMut(u64),
) -> Result<ImportSummary, StoreError> {
    let golden_tmp = dir.join("golden.tmp");
    let hashes_tmp = dir.join("chunks.b3.tmp");
    let out = create_truncated(&golden_tmp)?;
    let mut hashes: Vec<u8> = Vec::new();
    // Read and write 1 MiB at a time (large page-cache folios make later reads cheaper);
    // hash and skip zeros per chunk.
    let mut buf = vec![0u8; 16 * CHUNK_SIZE];
    let mut source_size = 0u64;
    let mut zero_chunks = 0u64;
    loop {
        let got = read_full(src, &mut buf).map_err(|e| StoreError::io(src_path, e))?;
        if got == 0 {
            break;
        }
        // Pad the final partial block with zeros: the image's size is a whole number of blocks.
        let len = got.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        buf[got..len].fill(0);
        let mut run_start: Option<usize> = None;
        for (i, chunk) in buf[..len].chunks(CHUNK_SIZE).enumerate() {
            hashes.extend_from_slice(blake3::hash(chunk).as_bytes());
            let zero = chunk.iter().all(|&b| b == 0);
            zero_chunks += zero as u64;
            let at = i * CHUNK_SIZE;
            match (zero, run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(s)) => {
                    out.write_all_at(&buf[s..at], DATA_OFFSET + source_size + s as u64)
                        .map_err(|e| StoreError::io(&golden_tmp, e))?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            out.write_all_at(&buf[s..len], DATA_OFFSET + source_size + s as u64)
                .map_err(|e| StoreError::io(&golden_tmp, e))?;
        }
        source_size += got as u64;
        progress(got as u64);
        if got < buf.len() {
            break;
        }
    }
    let size = source_size.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64;
    let chunks = hashes.len() as u64 / 32;
    let header = HeaderWriter::new(GOLDEN_MAGIC, GOLDEN_VERSION)
        .u64(size)
        .u32(BLOCK_SIZE as u32)
        .u64(size / BLOCK_SIZE as u64)
        .u32(CHUNK_SIZE as u32)
        .finish();
    out.write_all_at(&header, 0)
        .map_err(|e| StoreError::io(&golden_tmp, e))?;
    out.set_len(DATA_OFFSET + size)
        .map_err(|e| StoreError::io(&golden_tmp, e))?;
    out.sync_all().map_err(|e| StoreError::io(&golden_tmp, e))?;

    write_hashes(&hashes_tmp, size, &hashes)?;
    fs::rename(&hashes_tmp, dir.join(HASHES_FILE)).map_err(|e| StoreError::io(dir, e))?;
    fs::rename(&golden_tmp, dir.join(GOLDEN_FILE)).map_err(|e| StoreError::io(dir, e))?;
    format::sync_dir(dir)?;
    Ok(ImportSummary {
        size,
        source_size,
        chunks,
        zero_chunks,
    })
}

fn write_hashes(path: &Path, image_size: u64, hashes: &[u8]) -> Result<(), StoreError> {
    let f = create_truncated(path)?;
    let header = HeaderWriter::new(HASHES_MAGIC, HASHES_VERSION)
        .u32(CHUNK_SIZE as u32)
        .u64(hashes.len() as u64 / 32)
        .u64(image_size)
        .u32(crc32c::crc32c(hashes))
        .finish();
    f.write_all_at(&header, 0)
        .map_err(|e| StoreError::io(path, e))?;
    f.write_all_at(hashes, HEADER_LEN as u64)
        .map_err(|e| StoreError::io(path, e))?;
    f.sync_all().map_err(|e| StoreError::io(path, e))
}

fn read_hashes(path: &Path, image_size: u64) -> Result<Vec<[u8; 32]>, StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let hdr = format::read_header(&f, path)?;
    let mut r = HeaderReader::parse(&hdr, HASHES_MAGIC, HASHES_VERSION, path, "chunk hash file")?;
    let chunk_size = r.u32();
    let count = r.u64();
    let size = r.u64();
    let crc = r.u32();
    let expected = image_size.div_ceil(CHUNK_SIZE as u64);
    if chunk_size as usize != CHUNK_SIZE || size != image_size || count != expected {
        return Err(StoreError::corrupt(
            path,
            format!("chunk hash file: describes {count} chunks of {chunk_size} bytes over {size} bytes, expected {expected} chunks of {CHUNK_SIZE} over {image_size}"),
        ));
    }
    let len = f.metadata().map_err(|e| StoreError::io(path, e))?.len();
    if len != HEADER_LEN as u64 + count * 32 {
        return Err(StoreError::corrupt(
            path,
            format!(
                "chunk hash file: {len} bytes, expected {}",
                HEADER_LEN as u64 + count * 32
            ),
        ));
    }
    let mut raw = vec![0u8; count as usize * 32];
    format::read_exact_at(&f, &mut raw, HEADER_LEN as u64, path)?;
    if crc32c::crc32c(&raw) != crc {
        return Err(StoreError::corrupt(
            path,
            "chunk hash file: checksum mismatch",
        ));
    }
    Ok(raw
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

fn create_truncated(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}

/// Reads until `buf` is full or the source ends.
fn read_full(src: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
