//! Crash test: a child process writes and flushes through the store and is killed with SIGKILL
//! at a random moment (also while it is still opening or recovering the disk). After each kill
//! the disk is reopened and every block must hold exactly one whole version that is allowed:
//! the last version written before the last FLUSH that returned, or a later one. Nothing
//! flushed is lost; no block is torn; no block shows data from another branch.
//!
//! Runs STASIS_CRASH_TRIALS trials (default 200) of two kills each. Between kills, some trials
//! compact the disk or fork a sibling, whose content must then stay as it was at the fork.
//! `harness = false`: this file is its own main, and re-executes itself as the child.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stasis::blockdev::BlockDevice;
use stasis::store::Store;

const BS: usize = 4096;
const DISK_BLOCKS: u64 = 256;
const GOLDEN_BLOCKS: u64 = 160;
/// The child flushes after every FLUSH_EVERY operations.
const FLUSH_EVERY: u64 = 16;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { first: u64, count: u64 },
    Zero { first: u64, count: u64 },
}

/// The child's operation number `i` for `seed` (deterministic, so the parent can replay it).
fn op(seed: u64, i: u64) -> Op {
    let r = splitmix(seed.wrapping_mul(1_000_003) ^ i);
    let count = 1 + (r >> 8) % 8;
    let first = (r >> 16) % (DISK_BLOCKS - count + 1);
    if r % 7 == 0 {
        Op::Zero {
            first,
            count: count.min(4),
        }
    } else {
        Op::Write { first, count }
    }
}

/// The content op `i` of `seed` writes into `block`: self-identifying, so a torn or misplaced
/// block cannot pass for a valid version.
fn block_content(seed: u64, i: u64, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BS);
    out.extend_from_slice(&seed.to_le_bytes());
    out.extend_from_slice(&i.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut x = splitmix(seed ^ i.rotate_left(20) ^ block.rotate_left(40));
    while out.len() < BS {
        x = splitmix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(BS);
    out
}

fn child(root: &Path, disk: &str, seed: u64) {
    let store = Store::open(root).expect("child: open store");
    let d = store.open_disk(disk).expect("child: open disk");
    println!("O");
    for i in 0..1_000_000u64 {
        match op(seed, i) {
            Op::Write { first, count } => {
                let mut buf = Vec::with_capacity(count as usize * BS);
                for b in first..first + count {
                    buf.extend_from_slice(&block_content(seed, i, b));
                }
                d.write_at(first * BS as u64, &buf, false)
                    .expect("child: write");
            }
            Op::Zero { first, count } => {
                d.write_zeroes(first * BS as u64, count * BS as u64, false)
                    .expect("child: zero");
            }
        }
        if (i + 1) % FLUSH_EVERY == 0 {
            d.flush().expect("child: flush");
            // Printed only after the flush returned: every op <= i is durable.
            println!("F {i}");
        }
    }
}

struct Outcome {
    /// Ops <= this were covered by a FLUSH that returned.
    flushed: Option<u64>,
    opened: bool,
}

fn run_child(root: &Path, disk: &str, seed: u64, kill_after: Duration) -> Outcome {
    let exe = std::env::current_exe().expect("own path");
    let mut c = Command::new(exe)
        .args([
            "--child",
            root.to_str().expect("utf-8 path"),
            disk,
            &seed.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    std::thread::sleep(kill_after);
    // SIGKILL: no destructor, no flush, no clean marker.
    let _ = c.kill();
    let status = c.wait().expect("wait child");
    assert!(
        !status.success() || kill_after.is_zero(),
        "child ended on its own: {status}"
    );
    let mut out = String::new();
    BufReader::new(c.stdout.take().expect("stdout"))
        .read_to_string(&mut out)
        .expect("read child output");
    let mut outcome = Outcome {
        flushed: None,
        opened: false,
    };
    for line in out.lines() {
        if line == "O" {
            outcome.opened = true;
        } else if let Some(i) = line.strip_prefix("F ") {
            outcome.flushed = Some(i.parse().expect("flush line"));
        }
    }
    outcome
}

/// Checks the disk against what the child may have left, and returns its actual content.
fn verify(
    store: &Store,
    disk: &str,
    seed: u64,
    baseline: &[Vec<u8>],
    outcome: &Outcome,
) -> Vec<Vec<u8>> {
    let d = store
        .open_disk(disk)
        .unwrap_or_else(|e| panic!("reopen {disk} after kill: {e}"));
    // Ops after the last acknowledged flush may or may not be there: at most up to the next flush.
    let last_possible = match outcome.flushed {
        Some(f) => f + FLUSH_EVERY,
        None => FLUSH_EVERY - 1,
    };
    let mut must: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut may: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    for i in 0..=last_possible {
        let (first, count, zero) = match op(seed, i) {
            Op::Write { first, count } => (first, count, false),
            Op::Zero { first, count } => (first, count, true),
        };
        for b in first..first + count {
            let content = if zero {
                vec![0u8; BS]
            } else {
                block_content(seed, i, b)
            };
            if outcome.flushed.is_some_and(|f| i <= f) {
                must.insert(b, content);
            } else {
                may.entry(b).or_default().push(content);
            }
        }
    }
    let mut actual = Vec::with_capacity(DISK_BLOCKS as usize);
    let mut buf = vec![0u8; BS];
    for b in 0..DISK_BLOCKS {
        d.read_at(b * BS as u64, &mut buf)
            .expect("read after recovery");
        let durable = must.get(&b).unwrap_or(&baseline[b as usize]);
        let later = may.get(&b).map(|v| v.as_slice()).unwrap_or(&[]);
        if &buf != durable && !later.iter().any(|v| v == &buf) {
            let head: Vec<u64> = buf[..24]
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            panic!(
                "disk {disk} block {b} after kill (seed {seed}, flushed through {:?}): content {:?}... is neither the \
                 flushed version nor a later write",
                outcome.flushed, head
            );
        }
        actual.push(buf.clone());
    }
    d.close().expect("clean close after verify");
    actual
}

fn read_all(store: &Store, disk: &str) -> Vec<Vec<u8>> {
    let d = store.open_disk(disk).expect("open");
    let mut out = Vec::new();
    for b in 0..DISK_BLOCKS {
        let mut buf = vec![0u8; BS];
        d.read_at(b * BS as u64, &mut buf).expect("read");
        out.push(buf);
    }
    d.close().expect("close");
    out
}

fn parent(trials: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root: PathBuf = dir.path().join("store");
    let golden: Vec<u8> = (0..GOLDEN_BLOCKS as usize * BS)
        .map(|i| splitmix(i as u64 / 8) as u8)
        .collect();
    let gpath = dir.path().join("golden.raw");
    std::fs::write(&gpath, &golden).expect("write golden");
    let store = Store::open(&root).expect("open store");
    store
        .import_image("base", &gpath, &|_, _| {})
        .expect("import");
    let started = Instant::now();
    let (mut kills, mut with_flush, mut during_open) = (0u64, 0u64, 0u64);
    for trial in 0..trials {
        let disk = format!("t{trial}");
        store
            .create_disk(&disk, "base", Some(DISK_BLOCKS * BS as u64))
            .expect("create");
        let mut baseline: Vec<Vec<u8>> = (0..DISK_BLOCKS as usize)
            .map(|b| {
                golden
                    .get(b * BS..(b + 1) * BS)
                    .map(|s| s.to_vec())
                    .unwrap_or_else(|| vec![0u8; BS])
            })
            .collect();
        let mut sibling: Option<(String, Vec<Vec<u8>>)> = None;
        for round in 0..2u64 {
            let seed = trial * 2 + round + 1;
            // Kill times spread from "still starting" to "many flushes in".
            let ms = splitmix(seed ^ 0xabc) % 120;
            let outcome = run_child(&root, &disk, seed, Duration::from_millis(ms));
            kills += 1;
            with_flush += outcome.flushed.is_some() as u64;
            during_open += !outcome.opened as u64;
            baseline = verify(&store, &disk, seed, &baseline, &outcome);
            if round == 0 && trial % 4 == 1 {
                store.compact(&disk).expect("compact after recovery");
                assert!(
                    read_all(&store, &disk) == baseline,
                    "compaction changed {disk}"
                );
            }
            if round == 0 && trial % 4 == 2 {
                let s = format!("{disk}-sibling");
                store.fork(&s, &disk).expect("fork after recovery");
                sibling = Some((s, baseline.clone()));
            }
        }
        if let Some((s, content)) = sibling {
            assert!(
                read_all(&store, &s) == content,
                "sibling {s} saw writes made to {disk} after the fork"
            );
            store.remove_disk(&s).expect("rm sibling");
        }
        store.remove_disk(&disk).expect("rm");
    }
    println!(
        "crash test: {trials} trials, {kills} SIGKILLs ({with_flush} after at least one flush, {during_open} before the disk was open), \
         every flushed write present, no torn block, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let seed = args[4].parse().expect("seed");
        child(Path::new(&args[2]), &args[3], seed);
        return;
    }
    // `cargo test` passes libtest flags (and maybe a filter); `--list` must list nothing odd.
    if args.iter().any(|a| a == "--list") {
        println!("crash: test");
        return;
    }
    let trials = std::env::var("STASIS_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    parent(trials);
}
