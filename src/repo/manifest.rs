//! Manifests: named, immutable snapshots. A disk manifest lists the chunks in which the disk
//! differs from its golden image; an image manifest lists every chunk of a golden image.
//!
//! Encoding (kernel-notes/formats.md, "Manifest"), little endian:
//! ```text
//! 0        magic      [u8; 8]  b"STASMNFT"
//! 8        version    u32      1
//! 12       info_len   u32      length of the JSON document that follows (<= 1 MiB)
//! 16       info       JSON     ManifestInfo
//! 16+L     count      u64      number of entries
//! 24+L     entries    count x (chunk index u64, BLAKE3 hash [u8; 32]), ascending index
//! end-32   checksum   [u8; 32] BLAKE3 of every byte before it
//! ```

use serde::{Deserialize, Serialize};

use super::chunk::ChunkHash;
use super::RepoError;

const MAGIC: &[u8; 8] = b"STASMNFT";
const VERSION: u32 = 1;
const MAX_INFO: usize = 1 << 20;
const ENTRY_LEN: usize = 40;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Disk,
    Image,
    /// A file kept as chunks, zero chunks left out (a VM's memory image, its kernel): entries
    /// name the chunks that are not all zeros; the rest of `size` reads as zeros.
    File,
    /// A VM swapout: no entries of its own; `parts` names its disk, memory and boot file
    /// manifests and `config` holds how to start it again.
    Vm,
    /// A group of VMs swapped out together: `parts` names each member's VM manifest.
    Experiment,
}

/// What `repo rm` asks: the manifests `names` (of `kind`, or of whichever kind holds each
/// name), with their parts if `with_parts`; `in_use` names the disk manifests the caller's
/// disks still hydrate from, which are refused. Also the body of `POST /v1/remove`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Removal {
    pub names: Vec<String>,
    #[serde(default)]
    pub kind: Option<Kind>,
    #[serde(default)]
    pub with_parts: bool,
    #[serde(default)]
    pub in_use: Vec<String>,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Disk,
        Kind::Image,
        Kind::File,
        Kind::Vm,
        Kind::Experiment,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Disk => "disk",
            Kind::Image => "image",
            Kind::File => "file",
            Kind::Vm => "vm",
            Kind::Experiment => "experiment",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ManifestInfo {
    pub name: String,
    pub kind: Kind,
    /// Logical size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// For a disk: the golden image it is laid over (an image manifest of that name).
    #[serde(default)]
    pub image: Option<String>,
    /// For a disk: the manifest of its previous swapout, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// The disk it was taken from (informational).
    #[serde(default)]
    pub source: Option<String>,
    pub created_at: u64,
    /// For a VM or an experiment: role -> manifest name (e.g. "disk", "memory", "kernel", or
    /// a member VM's name). Those manifests are committed before this one.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub parts: std::collections::BTreeMap<String, String>,
    /// For a VM or an experiment: its configuration, opaque to the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub info: ManifestInfo,
    /// (chunk index, hash), ascending by index, no duplicates.
    pub entries: Vec<(u64, ChunkHash)>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let info = serde_json::to_vec(&self.info).expect("manifest info serializes");
        let mut out = Vec::with_capacity(56 + info.len() + self.entries.len() * ENTRY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(info.len() as u32).to_le_bytes());
        out.extend_from_slice(&info);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (index, hash) in &self.entries {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&hash.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and checks a manifest; any damage or inconsistency is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, RepoError> {
        let bad = |why: &str| RepoError::BadManifest(why.to_string());
        if bytes.len() < 56 {
            return Err(bad("too short"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch (damaged)"));
        }
        if &body[..8] != MAGIC {
            return Err(bad("not a manifest (bad magic)"));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(&format!(
                "version {version} not supported (this build reads {VERSION})"
            )));
        }
        let info_len = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if info_len > MAX_INFO || 16 + info_len + 8 > body.len() {
            return Err(bad("bad info length"));
        }
        let info: ManifestInfo = serde_json::from_slice(&body[16..16 + info_len])
            .map_err(|e| bad(&format!("info: {e}")))?;
        let at = 16 + info_len;
        let count = u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let rest = &body[at + 8..];
        if count.checked_mul(ENTRY_LEN as u64) != Some(rest.len() as u64) {
            return Err(bad("entry count does not match the length"));
        }
        if info.chunk_size == 0 || info.chunk_size % 4096 != 0 {
            return Err(bad("bad chunk size"));
        }
        let chunks = info.size.div_ceil(info.chunk_size as u64);
        let mut entries = Vec::with_capacity(count as usize);
        for e in rest.chunks_exact(ENTRY_LEN) {
            let index = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            if index >= chunks || entries.last().is_some_and(|(prev, _)| *prev >= index) {
                return Err(bad("entries out of order or out of range"));
            }
            entries.push((index, ChunkHash(e[8..].try_into().expect("32 bytes"))));
        }
        Ok(Manifest { info, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            info: ManifestInfo {
                name: "d@1".into(),
                kind: Kind::Disk,
                size: 1 << 20,
                chunk_size: 65536,
                image: Some("g".into()),
                parent: None,
                source: Some("d".into()),
                created_at: 1,
                parts: Default::default(),
                config: None,
            },
            entries: vec![(0, ChunkHash::of(b"a")), (7, ChunkHash::of(b"b"))],
        }
    }

    #[test]
    fn roundtrip_and_every_damage_is_caught() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Manifest::decode(&b).is_err(), "flip at {i} not caught");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn out_of_range_entries_are_refused_even_with_a_good_checksum() {
        let mut m = sample();
        m.entries.push((16, ChunkHash::of(b"c")));
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        m.entries.swap(0, 1);
        assert!(Manifest::decode(&m.encode()).is_err());
    }
}
