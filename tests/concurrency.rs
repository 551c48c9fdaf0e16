//! The store under several I/O threads at once, as ublk queues and NBD connections call it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stasis::blockdev::BlockDevice;
use stasis::store::{Disk, Store};

const BS: u64 = 4096;

fn disk(dir: &std::path::Path, blocks: u64) -> (Store, Disk) {
    let g = dir.join("g.raw");
    // Golden blocks carry their own block number too, so a misplaced read is always visible.
    let golden: Vec<u8> = (0..blocks).flat_map(|b| stamp(b, 0)).collect();
    std::fs::write(&g, golden).unwrap();
    let store = Store::open(&dir.join("s")).unwrap();
    store.import_image("g", &g, &|_, _| {}).unwrap();
    store.create_disk("d", "g", None).unwrap();
    let d = store.open_disk("d").unwrap();
    (store, d)
}

/// A block that says which block it belongs to and which version it is.
fn stamp(block: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS as usize);
    while v.len() < BS as usize {
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&version.to_le_bytes());
    }
    v
}

#[test]
fn sub_block_writes_to_one_block_from_many_threads_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, d) = disk(dir.path(), 64);
    let d = Arc::new(d);
    // 8 threads, each owning one 512-byte sector of every block, all writing at once.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    for b in 0..64u64 {
                        d.write_at(b * BS + t * 512, &[(t * 16 + round) as u8; 512], false)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let mut buf = vec![0u8; BS as usize];
    for b in 0..64u64 {
        d.read_at(b * BS, &mut buf).unwrap();
        for t in 0..8u64 {
            let sector = &buf[(t * 512) as usize..((t + 1) * 512) as usize];
            assert!(
                sector.iter().all(|&x| x == (t * 16 + 19) as u8),
                "block {b} sector {t} lost a write"
            );
        }
    }
}

#[test]
fn readers_never_see_another_blocks_data_while_slots_are_recycled() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, d) = disk(dir.path(), 32);
    let d = Arc::new(d);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let d = d.clone();
            std::thread::spawn(move || {
                for v in 1..20000u64 {
                    let b = (v * 7 + w * 13) % 32;
                    d.write_at(b * BS, &stamp(b, v), false).unwrap();
                    if v % 2 == 0 {
                        d.flush().unwrap(); // frees superseded slots for reuse
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let d = d.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; BS as usize];
                let mut reads = 0u64;
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let b = (i * 11) % 32;
                    d.read_at(b * BS, &mut buf).unwrap();
                    let owner = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                    let version = &buf[8..16];
                    assert_eq!(owner, b, "block {b} returned block {owner}'s data");
                    assert!(
                        buf.chunks(16)
                            .all(|c| c[0..8] == buf[0..8] && &c[8..16] == version),
                        "block {b} torn"
                    );
                    reads += 1;
                    i += 1;
                }
                reads
            })
        })
        .collect();
    writers.into_iter().for_each(|t| t.join().unwrap());
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        reads > 100,
        "readers ran concurrently with the writers ({reads} reads)"
    );
}

#[test]
fn sub_block_writes_never_undo_a_concurrent_whole_block_write() {
    // One thread rewrites sector 0 of a block over and over (read-modify-write); another
    // writes the whole block with increasing versions. Sectors 1-7 are written only by the
    // whole-block writer, so at the end they must hold its last version.
    let dir = tempfile::tempdir().unwrap();
    let (_store, d) = disk(dir.path(), 16);
    let d = Arc::new(d);
    for round in 0..20u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let partial = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    d.write_at(3 * BS, &[i; 512], false).unwrap();
                    i = i.wrapping_add(1);
                }
            })
        };
        let last = 300u64;
        for v in 1..=last {
            d.write_at(3 * BS, &stamp(round, v), false).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        partial.join().unwrap();
        let mut buf = vec![0u8; BS as usize];
        d.read_at(3 * BS, &mut buf).unwrap();
        assert!(
            buf[512..] == stamp(round, last)[512..],
            "round {round}: a sub-block write brought back old bytes"
        );
    }
}
