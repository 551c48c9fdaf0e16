//! The common 4 KiB header that starts every file Stasis writes (kernel-notes/formats.md).
//!
//! ```text
//! 0    magic     [u8; 8]   identifies the file kind, e.g. b"STASGOLD"
//! 8    version   u32 LE    format version of that kind
//! 12   length    u32 LE    header length in bytes, always 4096
//! 16   body      ...       kind-specific fields, little endian
//! 4092 crc32c    u32 LE    CRC-32C (Castagnoli) of bytes 0..4092
//! ```
//! A whole block keeps the payload that follows 4 KiB aligned.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::StoreError;

pub const HEADER_LEN: usize = 4096;
/// Where block data starts in golden, delta and write-layer data files. Runs of blocks then
/// sit at file offsets as aligned as their index (the disk offset for the golden, the data
/// index or slot number for the others), which lets the page cache use large folios for them (measured on Linux 6.18: 4 KiB reads of a file whose data sits 4 KiB off
/// alignment are ~13% slower). The gap after the header is a hole: it takes no space.
pub const DATA_OFFSET: u64 = 1 << 20;
const CRC_AT: usize = HEADER_LEN - 4;
const BODY_AT: usize = 16;

/// A header being written: fields are appended to the body in order.
pub struct HeaderWriter {
    buf: Vec<u8>,
}

impl HeaderWriter {
    pub fn new(magic: &[u8; 8], version: u32) -> Self {
        let mut buf = vec![0u8; HEADER_LEN];
        buf[0..8].copy_from_slice(magic);
        buf[8..12].copy_from_slice(&version.to_le_bytes());
        buf[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        buf.truncate(BODY_AT);
        HeaderWriter { buf }
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// The finished 4096-byte header with its checksum.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.buf.len() <= CRC_AT, "header body too long");
        self.buf.resize(HEADER_LEN, 0);
        let crc = crc32c::crc32c(&self.buf[..CRC_AT]);
        self.buf[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// A validated header being read: fields are taken from the body in order.
pub struct HeaderReader<'a> {
    buf: &'a [u8],
    at: usize,
    pub version: u32,
}

impl<'a> HeaderReader<'a> {
    /// Checks length, magic, version and checksum; `path` and `what` name the file in errors.
    pub fn parse(
        buf: &'a [u8],
        magic: &[u8; 8],
        supported_version: u32,
        path: &Path,
        what: &str,
    ) -> Result<Self, StoreError> {
        let corrupt = |problem: String| StoreError::corrupt(path, format!("{what}: {problem}"));
        if buf.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "truncated header ({} of {HEADER_LEN} bytes)",
                buf.len()
            )));
        }
        if &buf[0..8] != magic {
            return Err(corrupt(format!(
                "bad magic {:?}, expected {:?}",
                String::from_utf8_lossy(&buf[0..8]),
                String::from_utf8_lossy(magic)
            )));
        }
        let version = le_u32(&buf[8..12]);
        let stored_crc = le_u32(&buf[CRC_AT..HEADER_LEN]);
        if crc32c::crc32c(&buf[..CRC_AT]) != stored_crc {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if version != supported_version {
            return Err(corrupt(format!(
                "unsupported format version {version} (this build reads version {supported_version})"
            )));
        }
        let length = le_u32(&buf[12..16]);
        if length as usize != HEADER_LEN {
            return Err(corrupt(format!(
                "header length {length}, expected {HEADER_LEN}"
            )));
        }
        Ok(HeaderReader {
            buf: &buf[..HEADER_LEN],
            at: BODY_AT,
            version,
        })
    }

    pub fn u32(&mut self) -> u32 {
        let v = le_u32(&self.buf[self.at..self.at + 4]);
        self.at += 4;
        v
    }

    pub fn u64(&mut self) -> u64 {
        let v = le_u64(&self.buf[self.at..self.at + 8]);
        self.at += 8;
        v
    }
}

/// Reads the first 4096 bytes of `file`, or fewer if the file is shorter.
pub fn read_header(file: &File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io(path, e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

pub fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

pub fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is reported as truncation.
pub fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
) -> Result<(), StoreError> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StoreError::corrupt(
            path,
            format!("truncated: {} bytes expected at offset {offset}", buf.len()),
        )),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// fsync a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::fsutil::sync_dir(dir).map_err(|e| StoreError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"STASTEST";

    #[test]
    fn roundtrip_and_every_single_bit_flip_is_caught() {
        let hdr = HeaderWriter::new(MAGIC, 3).u64(42).u32(7).finish();
        let p = Path::new("t");
        let mut r = HeaderReader::parse(&hdr, MAGIC, 3, p, "test").unwrap();
        assert_eq!((r.u64(), r.u32()), (42, 7));
        for bit in (0..HEADER_LEN * 8).step_by(7) {
            let mut bad = hdr.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                HeaderReader::parse(&bad, MAGIC, 3, p, "test").is_err(),
                "bit {bit}"
            );
        }
    }

    #[test]
    fn truncated_and_wrong_version_name_the_file() {
        let hdr = HeaderWriter::new(MAGIC, 3).finish();
        let p = Path::new("/x/file");
        let e = HeaderReader::parse(&hdr[..100], MAGIC, 3, p, "test")
            .err()
            .unwrap();
        assert!(e.to_string().contains("/x/file") && e.to_string().contains("truncated"));
        let e = HeaderReader::parse(&hdr, MAGIC, 4, p, "test")
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("unsupported format version 3"),
            "{e}"
        );
    }
}
