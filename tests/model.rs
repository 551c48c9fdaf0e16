//! Model-based property test of the store: random sequences of write / read / discard /
//! write-zeroes / flush / fork / compact / close+reopen on random (aligned and unaligned)
//! ranges, checked after every step against an in-memory model of each branch.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use stasis::blockdev::{BlockDevice, BlockError};
use stasis::store::{Disk, Store};

const BS: u64 = 4096;
/// Golden: 37.5 blocks of random bytes (padded to 38 blocks by import).
const GOLDEN_LEN: usize = 37 * 4096 + 2048;
/// Disks are larger than their golden; the rest reads as zeros.
const DISK_SIZE: u64 = 64 * BS;

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: usize,
        offset: u64,
        len: u64,
        seed: u8,
    },
    Read {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Discard {
        disk: usize,
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        disk: usize,
        offset: u64,
        len: u64,
    },
    Flush {
        disk: usize,
    },
    Fork {
        disk: usize,
    },
    Compact {
        disk: usize,
    },
    Reopen {
        disk: usize,
    },
}

/// Offsets and lengths: half block-aligned, half arbitrary, all inside the disk.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..DISK_SIZE / BS, 1..=8u64).prop_map(|(b, n)| (b * BS, n.min(DISK_SIZE / BS - b) * BS)),
        (0..DISK_SIZE - 1, 1..=3 * BS).prop_map(|(o, l)| (o, l.min(DISK_SIZE - o))),
        (0..DISK_SIZE / BS, 1..=700u64)
            .prop_map(|(b, l)| (b * BS + 512, l.min(DISK_SIZE - b * BS - 512))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..8usize;
    prop_oneof![
        6 => (d.clone(), range(), any::<u8>()).prop_map(|(disk, (offset, len), seed)| Op::Write { disk, offset, len, seed }),
        4 => (d.clone(), range()).prop_map(|(disk, (offset, len))| Op::Read { disk, offset, len }),
        1 => (d.clone(), range()).prop_map(|(disk, (offset, len))| Op::Discard { disk, offset, len }),
        1 => (d.clone(), range()).prop_map(|(disk, (offset, len))| Op::WriteZeroes { disk, offset, len }),
        1 => d.clone().prop_map(|disk| Op::Flush { disk }),
        1 => d.clone().prop_map(|disk| Op::Fork { disk }),
        1 => d.clone().prop_map(|disk| Op::Compact { disk }),
        1 => d.prop_map(|disk| Op::Reopen { disk }),
    ]
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (offset + i)
                .wrapping_mul(31)
                .wrapping_add(seed as u64 * 7 + 1) as u8
        })
        .collect()
}

struct World {
    store: Store,
    /// Branch name -> (open disk, model of its content).
    disks: BTreeMap<String, (Option<Disk>, Vec<u8>)>,
    next: usize,
}

impl World {
    fn name(&self, i: usize) -> String {
        let names: Vec<&String> = self.disks.keys().collect();
        names[i % names.len()].clone()
    }

    fn disk(&mut self, name: &str) -> &Disk {
        let store = &self.store;
        let entry = self.disks.get_mut(name).expect("known disk");
        entry
            .0
            .get_or_insert_with(|| store.open_disk(name).expect("open disk"))
    }

    fn close(&mut self, name: &str) {
        if let Some(d) = self.disks.get_mut(name).and_then(|e| e.0.take()) {
            d.close().expect("clean close");
        }
    }

    fn check_all(&mut self) {
        let names: Vec<String> = self.disks.keys().cloned().collect();
        for n in names {
            let expected = self.disks[&n].1.clone();
            let mut got = vec![0u8; DISK_SIZE as usize];
            self.disk(&n).read_at(0, &mut got).expect("full read");
            assert!(got == expected, "disk {n} differs from its model");
        }
    }
}

fn run(ops: Vec<Op>, dir: &Path) {
    let golden: Vec<u8> = (0..GOLDEN_LEN)
        .map(|i| (i * 7 + i / 4096) as u8 ^ 0x5a)
        .collect();
    let gpath = dir.join("golden.raw");
    std::fs::write(&gpath, &golden).unwrap();
    let store = Store::open(&dir.join("store")).unwrap();
    store.import_image("base", &gpath, &|_, _| {}).unwrap();
    store.create_disk("d0", "base", Some(DISK_SIZE)).unwrap();
    let mut model = golden.clone();
    model.resize(DISK_SIZE as usize, 0);
    let mut w = World {
        store,
        disks: BTreeMap::new(),
        next: 1,
    };
    w.disks.insert("d0".into(), (None, model));

    for op in ops {
        match op {
            Op::Write {
                disk,
                offset,
                len,
                seed,
            } => {
                let n = w.name(disk);
                let data = pattern(seed, offset, len);
                w.disk(&n).write_at(offset, &data, seed % 5 == 0).unwrap();
                w.disks.get_mut(&n).unwrap().1[offset as usize..(offset + len) as usize]
                    .copy_from_slice(&data);
            }
            Op::Read { disk, offset, len } => {
                let n = w.name(disk);
                let mut buf = vec![0xeeu8; len as usize];
                w.disk(&n).read_at(offset, &mut buf).unwrap();
                let want = &w.disks[&n].1[offset as usize..(offset + len) as usize];
                assert!(
                    buf == want,
                    "read of {n} at {offset}+{len} differs from the model"
                );
            }
            Op::Discard { disk, offset, len } => {
                let n = w.name(disk);
                w.disk(&n).discard(offset, len, false).unwrap();
                // Only whole blocks inside the range are dropped (discard is advisory).
                let first = offset.div_ceil(BS) * BS;
                let end = (offset + len) / BS * BS;
                if end > first {
                    w.disks.get_mut(&n).unwrap().1[first as usize..end as usize].fill(0);
                }
            }
            Op::WriteZeroes { disk, offset, len } => {
                let n = w.name(disk);
                w.disk(&n).write_zeroes(offset, len, false).unwrap();
                w.disks.get_mut(&n).unwrap().1[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Flush { disk } => {
                let n = w.name(disk);
                w.disk(&n).flush().unwrap();
            }
            Op::Fork { disk } => {
                if w.disks.len() >= 6 {
                    continue;
                }
                let n = w.name(disk);
                w.close(&n);
                let child = format!("d{}", w.next);
                w.next += 1;
                w.store.fork(&child, &n).unwrap();
                let model = w.disks[&n].1.clone();
                w.disks.insert(child, (None, model));
            }
            Op::Compact { disk } => {
                let n = w.name(disk);
                w.close(&n);
                w.store.compact(&n).unwrap();
            }
            Op::Reopen { disk } => {
                let n = w.name(disk);
                // Half of the reopens skip the clean close: the write layer then recovers
                // from its journal (everything written was completed, so nothing may be lost).
                if disk % 2 == 0 {
                    w.close(&n);
                } else if let Some(d) = w.disks.get_mut(&n).and_then(|e| e.0.take()) {
                    d.abandon();
                }
            }
        }
    }
    w.check_all();
    // Every branch again after closing everything and reopening the store.
    let names: Vec<String> = w.disks.keys().cloned().collect();
    for n in &names {
        w.close(n);
    }
    w.store = Store::open(&dir.join("store")).unwrap();
    w.check_all();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        run(ops, dir.path());
    }
}

#[test]
fn out_of_range_io_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("g.raw");
    std::fs::write(&gpath, vec![7u8; 8192]).unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    store.import_image("g", &gpath, &|_, _| {}).unwrap();
    store.create_disk("d", "g", Some(16384)).unwrap();
    let disk = store.open_disk("d").unwrap();
    let mut buf = vec![0u8; 4096];
    for (off, len) in [
        (16384u64, 1u64),
        (12288, 4097),
        (u64::MAX - 10, 20),
        (16383, 2),
    ] {
        assert!(matches!(
            disk.read_at(off, &mut vec![0u8; len as usize]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_at(off, &vec![1u8; len as usize], true),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_zeroes(off, len, false),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.discard(off, len, false),
            Err(BlockError::OutOfRange { .. })
        ));
    }
    assert_eq!(
        disk.write_layer().dirty_blocks(),
        0,
        "a refused request must not touch the disk"
    );
    disk.read_at(12288, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096]);
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    // Zero-length requests at the very end are fine and do nothing.
    disk.read_at(16384, &mut []).unwrap();
    disk.write_at(16384, &[], false).unwrap();
}

#[test]
fn second_opener_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("g.raw");
    std::fs::write(&gpath, vec![1u8; 4096]).unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    store.import_image("g", &gpath, &|_, _| {}).unwrap();
    store.create_disk("d", "g", None).unwrap();
    let _open = store.open_disk("d").unwrap();
    let err = store.open_disk("d").err().expect("second open must fail");
    assert_eq!(err.to_string(), "disk 'd' is in use by another process");
    assert!(
        store.fork("e", "d").is_err()
            && store.compact("d").is_err()
            && store.remove_disk("d").is_err()
    );
    assert_eq!(store.disks().unwrap().len(), 1, "nothing changed");
}

#[test]
fn whole_block_writes_never_read_lower_layers() {
    // Make the golden unreadable after opening the disk: whole-block writes must still work,
    // sub-block writes (which need the old content) must fail cleanly.
    let dir = tempfile::tempdir().unwrap();
    let gpath = dir.path().join("g.raw");
    std::fs::write(&gpath, vec![9u8; 4 * 4096]).unwrap();
    let root = dir.path().join("s");
    let store = Store::open(&root).unwrap();
    store.import_image("g", &gpath, &|_, _| {}).unwrap();
    store.create_disk("d", "g", None).unwrap();
    let disk = store.open_disk("d").unwrap();
    // Shrink the golden file under the open disk so that any read of it fails with truncation.
    let golden = root.join("images/g/golden");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&golden)
        .unwrap()
        .set_len(100)
        .unwrap();
    disk.write_at(4096, &vec![3u8; 8192], false).unwrap();
    assert!(
        disk.write_at(10, &[1u8; 10], false).is_err(),
        "a partial write must read the golden"
    );
    let mut buf = vec![0u8; 8192];
    disk.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, vec![3u8; 8192]);
}
