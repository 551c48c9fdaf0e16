//! Chunks: the unit of the repository, addressed by the BLAKE3 hash of their bytes.

use std::fmt;

/// The BLAKE3 hash of a chunk's bytes: its name everywhere (bricks, index, manifests).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// True when `data` is the chunk this hash names.
    pub fn matches(&self, data: &[u8]) -> bool {
        // blake3::Hash compares in constant time; the speed is the hashing.
        blake3::Hash::from_bytes(self.0) == blake3::hash(data)
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(s: &str) -> Option<ChunkHash> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| ChunkHash(*h.as_bytes()))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_match() {
        let h = ChunkHash::of(b"stasis");
        assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
        assert!(h.matches(b"stasis"));
        assert!(!h.matches(b"stasiS"));
        assert_eq!(ChunkHash::from_hex("zz"), None);
    }
}
