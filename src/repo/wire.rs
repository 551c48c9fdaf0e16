//! Bodies of the served repository's binary requests (kernel-notes/formats.md, "Repository
//! over HTTP"). All integers little-endian.
//!
//! - Hash list (`missing`): `n` hashes of 32 bytes, nothing else; the answer is `n` bytes,
//!   1 for a chunk the repository lacks, 0 for one it holds.
//! - Chunk batch (`chunks`): records of `hash[32] | len: u32 | data[len]`, back to back.

use super::chunk::ChunkHash;

/// Largest chunk a batch may carry (the store's chunks are 64 KiB; images' last ones less).
pub const MAX_CHUNK: usize = 16 << 20;
/// Most hashes one `missing` request may ask about.
pub const MAX_HASHES: usize = 1 << 16;
/// Most chunks one batch may carry (a brick holds a file open per chunk of a batch).
pub const MAX_BATCH_CHUNKS: usize = 1024;

pub fn encode_hashes(hashes: &[ChunkHash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.0).collect()
}

pub fn decode_hashes(body: &[u8]) -> Result<Vec<ChunkHash>, String> {
    if body.len() % 32 != 0 {
        return Err(format!(
            "hash list of {} bytes is not a multiple of 32",
            body.len()
        ));
    }
    if body.len() / 32 > MAX_HASHES {
        return Err(format!("more than {MAX_HASHES} hashes in one request"));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| ChunkHash(c.try_into().expect("32-byte chunks")))
        .collect())
}

pub fn encode_chunks(chunks: &[(ChunkHash, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| 36 + c.1.len()).sum());
    for (hash, data) in chunks {
        out.extend_from_slice(&hash.0);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The batch's records, borrowing from `body`. Hashes are not checked here (the brick does).
pub fn decode_chunks(body: &[u8]) -> Result<Vec<(ChunkHash, &[u8])>, String> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if out.len() == MAX_BATCH_CHUNKS {
            return Err(format!("more than {MAX_BATCH_CHUNKS} chunks in one batch"));
        }
        if rest.len() < 36 {
            return Err(format!(
                "truncated chunk record header ({} bytes)",
                rest.len()
            ));
        }
        let hash = ChunkHash(rest[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(rest[32..36].try_into().expect("4 bytes")) as usize;
        if len > MAX_CHUNK {
            return Err(format!("chunk {hash} of {len} bytes exceeds {MAX_CHUNK}"));
        }
        let data = rest[36..]
            .get(..len)
            .ok_or_else(|| format!("chunk {hash}: {len} bytes announced, fewer sent"))?;
        out.push((hash, data));
        rest = &rest[36 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_roundtrip() {
        let a = vec![1u8; 100];
        let chunks = [(ChunkHash::of(&a), &a[..]), (ChunkHash::of(b""), &b""[..])];
        let body = encode_chunks(&chunks);
        assert_eq!(decode_chunks(&body).unwrap(), chunks.to_vec());
        let hashes = [ChunkHash::of(b"x"), ChunkHash::of(b"y")];
        assert_eq!(decode_hashes(&encode_hashes(&hashes)).unwrap(), hashes);
        assert!(decode_chunks(&body[..body.len() - 1]).is_err());
        assert!(decode_hashes(&[0; 33]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = decode_chunks(&body);
            let _ = decode_hashes(&body);
        }
    }
}
