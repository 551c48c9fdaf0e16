//! Fuzzing the on-disk parsers: damaged delta, journal, golden and hash files must give an
//! error (or, if they still parse, answer lookups) and never panic. Mutations are applied both
//! with and without re-sealing the checksums, so the structural checks behind the CRCs are
//! reached too.

use std::path::Path;

use proptest::prelude::*;
use stasis::store::delta::{Delta, DeltaWriter};
use stasis::store::golden::Golden;
use stasis::store::wlog::WriteLayer;

const HDR: usize = 4096;

/// Recomputes the header CRC (and for a delta, the table CRC at header offset 64).
fn reseal(bytes: &mut [u8], delta: bool) {
    if bytes.len() < HDR {
        return;
    }
    if delta {
        let table_offset = u64::from_le_bytes(bytes[40..48].try_into().unwrap()) as usize;
        if table_offset < bytes.len() {
            let crc = crc32c::crc32c(&bytes[table_offset..]);
            bytes[64..68].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&bytes[..4092]);
    bytes[4092..4096].copy_from_slice(&crc.to_le_bytes());
}

fn sample_delta(dir: &Path) -> Vec<u8> {
    let p = dir.join("sample.delta");
    let mut w = DeltaWriter::create(&p).unwrap();
    for b in [0u64, 1, 5, 17, 18, 40, 1000, 1001, 65_536] {
        if b % 5 == 0 {
            w.push_zero(b);
        } else {
            w.push_data(b, &vec![b as u8; 4096]).unwrap();
        }
    }
    w.finish().unwrap();
    std::fs::read(&p).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, value: u8 },
    Truncate { to: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
    ]
}

fn apply(bytes: &mut Vec<u8>, muts: &[Mutation], focus: usize) {
    for m in muts {
        let len = bytes.len().max(1);
        match *m {
            // Half the mutations land in the header's fields, where they matter most.
            Mutation::Flip { at, bit } => {
                let i = if at % 2 == 0 {
                    16 + at % focus
                } else {
                    at % len
                };
                if i < bytes.len() {
                    bytes[i] ^= 1 << bit;
                }
            }
            Mutation::Set { at, value } => {
                let i = if at % 2 == 0 {
                    16 + at % focus
                } else {
                    at % len
                };
                if i < bytes.len() {
                    bytes[i] = value;
                }
            }
            Mutation::Truncate { to } => {
                if to % 4 == 0 {
                    bytes.truncate(to % len);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        .. ProptestConfig::default()
    })]

    #[test]
    fn delta_parser_never_panics(muts in proptest::collection::vec(mutation(), 1..6), reseal_it in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = sample_delta(dir.path());
        apply(&mut bytes, &muts, 80);
        if reseal_it {
            reseal(&mut bytes, true);
        }
        let p = dir.path().join("fuzzed.delta");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(d) = Delta::open(&p) {
            for b in 0..70_000u64 {
                d.lookup(b);
            }
            let mut buf = vec![0u8; 4096];
            for (block, found) in d.blocks() {
                if let stasis::store::delta::DeltaBlock::Data(off) = found {
                    let _ = d.read_verified(block, off, &mut buf);
                }
            }
        }
    }

    #[test]
    fn journal_parser_never_panics(muts in proptest::collection::vec(mutation(), 1..6), reseal_it in any::<bool>(), clean in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        WriteLayer::create(&w).unwrap();
        {
            let layer = WriteLayer::open(&w, 1 << 16).unwrap();
            for b in 0..20u64 {
                layer.write_blocks(b * 3, &vec![b as u8 + 1; 4096]).unwrap();
            }
            layer.write_zeroes(7, 3).unwrap();
            layer.flush().unwrap();
            if clean { layer.close().unwrap() } else { layer.abandon() }
        }
        let target = w.join(if muts.len() % 2 == 0 { "journal" } else { "data" });
        let mut bytes = std::fs::read(&target).unwrap();
        apply(&mut bytes, &muts, 40);
        if reseal_it {
            reseal(&mut bytes, false);
        }
        std::fs::write(&target, &bytes).unwrap();
        if let Ok(layer) = WriteLayer::open(&w, 1 << 16) {
            let mut buf = vec![0u8; 4096];
            for (_, e) in layer.entries() {
                if let stasis::store::wlog::Entry::Data { slot, .. } = e {
                    let _ = layer.read_slots(slot, &mut buf);
                }
            }
            let _ = layer.write_blocks(1, &vec![9u8; 4096]);
            let _ = layer.close();
        }
    }

    #[test]
    fn golden_parser_never_panics(muts in proptest::collection::vec(mutation(), 1..6), reseal_it in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::create_dir(&img).unwrap();
        let src: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        stasis::store::golden::import_raw(&mut src.as_slice(), Path::new("src"), &img, |_| {}).unwrap();
        let target = img.join(if muts.len() % 2 == 0 { "golden" } else { "chunks.b3" });
        let mut bytes = std::fs::read(&target).unwrap();
        apply(&mut bytes, &muts, 40);
        if reseal_it {
            reseal(&mut bytes, false);
        }
        std::fs::write(&target, &bytes).unwrap();
        if let Ok(g) = Golden::open(&img) {
            let mut buf = vec![0u8; 8192];
            let _ = g.read_blocks(g.blocks.saturating_sub(1), &mut buf);
            let _ = g.verify(|_| {});
        }
    }
}

fn sample_manifest() -> Vec<u8> {
    use stasis::repo::{ChunkHash, Kind, Manifest, ManifestInfo};
    Manifest {
        info: ManifestInfo {
            name: "d@1".into(),
            kind: Kind::Disk,
            size: 64 << 20,
            chunk_size: 65536,
            image: Some("g".into()),
            parent: Some("d@0".into()),
            source: Some("d".into()),
            created_at: 1,
            parts: Default::default(),
            config: None,
        },
        entries: (0..40u64)
            .map(|i| (i * 7, ChunkHash::of(&i.to_le_bytes())))
            .collect(),
    }
    .encode()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        .. ProptestConfig::default()
    })]

    /// A manifest off the wire or out of the database: any damage is an error, never a panic;
    /// with its BLAKE3 trailer recomputed, the structural checks must still hold.
    #[test]
    fn manifest_decoder_never_panics(muts in proptest::collection::vec(mutation(), 1..6), reseal_it in any::<bool>()) {
        let mut bytes = sample_manifest();
        apply(&mut bytes, &muts, 200);
        if reseal_it && bytes.len() >= 32 {
            let n = bytes.len() - 32;
            let sum = blake3::hash(&bytes[..n]);
            bytes[n..].copy_from_slice(sum.as_bytes());
        }
        if let Ok(m) = stasis::repo::Manifest::decode(&bytes) {
            let chunks = m.info.size.div_ceil(m.info.chunk_size as u64);
            prop_assert!(m.entries.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert!(m.entries.iter().all(|e| e.0 < chunks));
        }
    }

    /// The chunk map of a hydrating delta: damage gives an error at open or a delta whose reads
    /// fail cleanly (no repository connected), never a panic.
    #[test]
    fn chunk_map_parser_never_panics(muts in proptest::collection::vec(mutation(), 1..6), reseal_it in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.delta");
        let zero = *stasis::store::hydrate::zero_chunk_hash();
        let entries: Vec<(u64, [u8; 32])> = [0u64, 3, 4, 100]
            .iter()
            .map(|&c| (c, if c == 4 { zero } else { *blake3::hash(&c.to_le_bytes()).as_bytes() }))
            .collect();
        Delta::create_hydrating(&p, &entries).unwrap();
        let map = p.with_extension("chunks");
        let mut bytes = std::fs::read(&map).unwrap();
        apply(&mut bytes, &muts, 40);
        if reseal_it {
            reseal(&mut bytes, false);
        }
        std::fs::write(&map, &bytes).unwrap();
        if let Ok(d) = Delta::open(&p) {
            if let Some(h) = d.hydration() {
                let (present, total) = h.progress();
                prop_assert!(present <= total);
            }
            let mut buf = vec![0u8; 4096];
            for (block, found) in d.blocks() {
                if let stasis::store::delta::DeltaBlock::Data(off) = found {
                    let _ = d.read_verified(block, off, &mut buf);
                }
            }
        }
    }
}
