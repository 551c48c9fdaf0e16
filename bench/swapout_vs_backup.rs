//! Swapout against incremental backup tools, side by side in one run, plus swapin latency,
//! hydration bandwidth and a chunk-size model (bench/RESULTS.md, issue 4).
//!
//! A 4 GiB disk with 2 GiB of random data written, swapped out once (baseline) and backed up
//! once by each peer. Then, three times: 5% of the written data changes in scattered 64 KiB
//! regions (the same regions for everyone), and each tool stores the new state:
//! - stasis: the disk was swapped in from the previous manifest (as a swapout leaves it on
//!   the next node), the changes written to it, `swap::swapout` to a local repository;
//! - restic `backup`, borg `create`, casync `make` of the same disk exported as a raw file.
//! Reported: medians of wall time, CPU time (user+system) and bytes added to each repository.
//!
//! `tools/bench-swap` runs it (installs restic, borgbackup, casync); STASIS_BENCH_DIR picks
//! the directory (default /var/tmp/stasis-bench; needs ~14 GiB free).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use stasis::blockdev::BlockDevice;
use stasis::repo::RepoHandle;
use stasis::store::Store;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const DISK: u64 = 4 * GIB;
const WRITTEN: u64 = 2 * GIB;
const REGION: u64 = 64 * 1024;
const REPEATS: usize = 3;

#[path = "common.rs"]
mod common;
use common::{fill, splitmix};

/// CPU seconds (user + system) of this process, or of its waited-for children.
fn cpu(who: i32) -> f64 {
    // SAFETY: getrusage fills a local struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Bytes allocated under `p` (du): what a repository really grew by.
fn du(p: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(p)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Default, Clone, Copy)]
struct Sample {
    secs: f64,
    cpu: f64,
    bytes: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Peer {
    name: &'static str,
    repo: PathBuf,
    run: Box<dyn Fn(usize) -> Command>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = PathBuf::from(
        std::env::var("STASIS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/stasis-bench".into()),
    )
    .join("swap");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let raw = base.join("disk.raw");
    let repo_dir = base.join("stasis-repo");

    // The node: a 64 MiB golden, a 4 GiB disk over it, 2 GiB of random data written.
    let mut store = Store::open(&base.join("store")).unwrap();
    store.set_source_factory(stasis::swap::source_factory());
    let golden = base.join("golden.raw");
    let mut buf = vec![0u8; MIB as usize];
    {
        let f = File::create(&golden).unwrap();
        for i in 0..64 {
            fill(&mut buf, 1_000_000 + i);
            f.write_all_at(&buf, i * MIB).unwrap();
        }
    }
    store.import_image("g", &golden, &|_, _| {}).unwrap();
    store.create_disk("d", "g", Some(DISK)).unwrap();
    let rawf = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&raw)
        .unwrap();
    rawf.set_len(DISK).unwrap();
    {
        let disk = store.open_disk("d").unwrap();
        // The written range covers the whole golden; beyond it the disk reads zeros, as the
        // raw file's hole does.
        for i in 0..WRITTEN / MIB {
            fill(&mut buf, i);
            disk.write_at(i * MIB, &buf, false).unwrap();
            rawf.write_all_at(&buf, i * MIB).unwrap();
        }
        disk.flush().unwrap();
        disk.close().unwrap();
    }
    rawf.sync_all().unwrap();
    eprintln!("setup: 2 GiB written to the disk and to {}", raw.display());

    let repo = RepoHandle::open(repo_dir.to_str().unwrap(), true).unwrap();
    // (bytes hashed, hashing seconds, reading seconds) of the hashing stage, summed over the
    // incremental swapouts.
    let stage = std::cell::Cell::new((0u64, 0f64, 0f64));
    let swapout = |manifest: &str| -> Sample {
        let before = du(&repo_dir);
        let (t0, c0) = (Instant::now(), cpu(libc::RUSAGE_SELF));
        let disk = store.open_disk("d").unwrap();
        let s = stasis::swap::swapout(&store, "d", &disk, &repo, manifest, &|_| {}).unwrap();
        disk.close().unwrap();
        store.remove_disk("d").unwrap();
        let sample = Sample {
            secs: t0.elapsed().as_secs_f64(),
            cpu: cpu(libc::RUSAGE_SELF) - c0,
            bytes: du(&repo_dir) - before,
        };
        eprintln!(
            "  stasis swapout {manifest}: {:.2}s, hashed {} MiB ({:.3}s reading, {:.3}s hashing), reused {} hashes, uploaded {} MiB",
            sample.secs,
            s.bytes_hashed / MIB,
            s.read_seconds,
            s.hash_seconds,
            s.hashes_reused,
            s.bytes_uploaded / MIB
        );
        if manifest != "m0" {
            let (b, h, r) = stage.get();
            stage.set((b + s.bytes_hashed, h + s.hash_seconds, r + s.read_seconds));
        }
        sample
    };

    let pw = [
        ("RESTIC_PASSWORD", "bench"),
        ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes"),
    ];
    // STASIS_BENCH_PEERS=0 leaves the peers out (for profiling stasis alone): no peer rows,
    // and no ratio against them.
    let with_peers = std::env::var("STASIS_BENCH_PEERS").map_or(true, |v| v != "0");
    let mut peers: Vec<Peer> = vec![
        Peer {
            name: "restic 0.14 backup",
            repo: base.join("restic"),
            run: {
                let (r, f) = (base.join("restic"), raw.clone());
                Box::new(move |_| {
                    let mut c = Command::new("restic");
                    c.args(["-q", "-r"]).arg(&r).arg("backup").arg(&f);
                    c
                })
            },
        },
        Peer {
            name: "borg 1.2 create",
            repo: base.join("borg"),
            run: {
                let (r, f) = (base.join("borg"), raw.clone());
                Box::new(move |i| {
                    let mut c = Command::new("borg");
                    c.arg("create")
                        .arg(format!("{}::s{i}", r.display()))
                        .arg(&f);
                    c
                })
            },
        },
        Peer {
            name: "casync make",
            repo: base.join("casync"),
            run: {
                let (r, f, b) = (base.join("casync"), raw.clone(), base.clone());
                Box::new(move |i| {
                    let mut c = Command::new("casync");
                    c.arg("make")
                        .arg(format!("--store={}", r.display()))
                        .arg(b.join(format!("s{i}.caibx")))
                        .arg(&f);
                    c
                })
            },
        },
    ];
    if with_peers {
        sh(Command::new("restic")
            .envs(pw)
            .args(["-q", "init", "-r"])
            .arg(base.join("restic")));
        sh(Command::new("borg")
            .envs(pw)
            .args(["init", "-e", "none"])
            .arg(base.join("borg")));
        std::fs::create_dir_all(base.join("casync")).unwrap();
    } else {
        peers.clear();
    }
    let peer_run = |p: &Peer, i: usize| -> Sample {
        let before = du(&p.repo);
        let (t0, c0) = (Instant::now(), cpu(libc::RUSAGE_CHILDREN));
        sh((p.run)(i).envs(pw));
        let s = Sample {
            secs: t0.elapsed().as_secs_f64(),
            cpu: cpu(libc::RUSAGE_CHILDREN) - c0,
            bytes: du(&p.repo) - before,
        };
        eprintln!("  {} #{i}: {:.2}s", p.name, s.secs);
        s
    };

    eprintln!("baseline (full) copies:");
    let base_stasis = swapout("m0");
    for p in &peers {
        peer_run(p, 0);
    }

    let regions = (WRITTEN / 20) / REGION;
    let mut stasis_samples = Vec::new();
    let mut peer_samples: Vec<Vec<Sample>> = peers.iter().map(|_| Vec::new()).collect();
    let mut region = vec![0u8; REGION as usize];
    for rep in 1..=REPEATS {
        // Swapin the previous manifest (lazily: nothing is fetched until read), then change
        // 5% of the written data in scattered 64 KiB regions, on the disk and the raw file.
        stasis::swap::swapin(&store, &repo, &format!("m{}", rep - 1), "d").unwrap();
        let disk = store.open_disk("d").unwrap();
        let mut picked = std::collections::BTreeSet::new();
        let mut x = rep as u64 * 7919;
        while picked.len() < regions as usize {
            x = splitmix(x);
            picked.insert(x % (WRITTEN / REGION));
        }
        for r in &picked {
            fill(&mut region, (rep as u64) << 40 | r);
            disk.write_at(r * REGION, &region, false).unwrap();
            rawf.write_all_at(&region, r * REGION).unwrap();
        }
        disk.flush().unwrap();
        disk.close().unwrap();
        rawf.sync_all().unwrap();
        eprintln!(
            "round {rep}: {} regions of 64 KiB changed ({} MiB)",
            regions,
            regions * REGION / MIB
        );
        stasis_samples.push(swapout(&format!("m{rep}")));
        for (i, p) in peers.iter().enumerate() {
            peer_samples[i].push(peer_run(p, rep));
        }
    }
    let changed = regions * REGION;

    // Swapin on a second node: time to the first read, and full hydration against the
    // repository's raw read bandwidth (every chunk file of the manifest read once).
    let mut node_b = Store::open(&base.join("store-b")).unwrap();
    node_b.set_source_factory(stasis::swap::source_factory());
    // The golden comes with the first swapin; do that first, so latency is the disk's alone.
    stasis::swap::swapin(&node_b, &repo, "m0", "warm").unwrap();
    let t0 = Instant::now();
    let last = format!("m{REPEATS}");
    stasis::swap::swapin(&node_b, &repo, &last, "d").unwrap();
    let disk = node_b.open_disk("d").unwrap();
    let mut four_k = vec![0u8; 4096];
    disk.read_at(WRITTEN / 2 + 12288, &mut four_k).unwrap();
    let first_read = t0.elapsed();
    let manifest = repo.manifest(&last).unwrap();
    let brick = repo_dir.join("brick0");
    // Both reads start cold, as on a node that has not seen these chunks: with the page cache
    // warm from the swapouts, the raw read measures memory, not the repository.
    // The raw read uses as many threads as hydration does, each reading every n-th file.
    let workers = std::env::var("STASIS_BENCH_HYDRATE_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(stasis::swap::HYDRATE_WORKERS);
    // (bytes, time) of a cold read of every chunk file of the manifest.
    let read_raw = || -> (u64, Duration) {
        drop_caches();
        let t = Instant::now();
        let bytes = std::thread::scope(|s| {
            let (entries, brick) = (&manifest.entries, &brick);
            let readers: Vec<_> = (0..workers)
                .map(|w| {
                    s.spawn(move || {
                        let mut bytes = 0u64;
                        for (_, h) in entries.iter().skip(w).step_by(workers) {
                            let hex = h.to_hex();
                            bytes += std::fs::read(brick.join(&hex[..2]).join(&hex))
                                .unwrap()
                                .len() as u64;
                        }
                        bytes
                    })
                })
                .collect();
            readers.into_iter().map(|r| r.join().unwrap()).sum()
        });
        (bytes, t.elapsed())
    };
    let (raw_bytes, raw_read) = read_raw();
    // What this disk can do when hydration's writes share it with the repository: the same
    // reads, each chunk written to its place in one file, synced once at the end (a plain
    // parallel copy, no hashing).
    drop_caches();
    let copy_to = base.join("copy.raw");
    let t_copy = Instant::now();
    {
        let out = File::create(&copy_to).unwrap();
        std::thread::scope(|s| {
            let (entries, brick, out) = (&manifest.entries, &brick, &out);
            for w in 0..workers {
                s.spawn(move || {
                    for (k, (_, h)) in entries.iter().enumerate().skip(w).step_by(workers) {
                        let hex = h.to_hex();
                        let data = std::fs::read(brick.join(&hex[..2]).join(&hex)).unwrap();
                        out.write_all_at(&data, k as u64 * 65536).unwrap();
                    }
                });
            }
        });
        out.sync_data().unwrap();
    }
    let copy = t_copy.elapsed();
    std::fs::remove_file(&copy_to).unwrap();
    drop_caches();
    let t2 = Instant::now();
    let done = stasis::swap::hydrate(&disk, workers, &AtomicBool::new(false), &|_, _| {}).unwrap();
    assert!(done);
    let hydrate = t2.elapsed();
    disk.close().unwrap();
    // The same hydration on a node whose store is on another device than the repository, as
    // a node's disk and a repository server's are: here a tmpfs (/dev/shm, or
    // STASIS_BENCH_NODE_DIR), so the repository's disk serves hydration's reads only.
    let node_dir = PathBuf::from(
        std::env::var("STASIS_BENCH_NODE_DIR")
            .unwrap_or_else(|_| "/dev/shm/stasis-bench-node".into()),
    );
    // Three rounds, each a cold raw read then a cold hydration of a fresh swapin, side by
    // side (this VM's disk bandwidth moves by 20% between minutes); medians.
    let _ = std::fs::remove_dir_all(&node_dir);
    let (mut raw_apart, mut hydrate_apart) = (Vec::new(), Vec::new());
    {
        let mut node_c = Store::open(&node_dir).unwrap();
        node_c.set_source_factory(stasis::swap::source_factory());
        stasis::swap::swapin(&node_c, &repo, "m0", "warm").unwrap();
        for round in 0..3 {
            raw_apart.push(read_raw().1.as_secs_f64());
            let name = format!("d{round}");
            stasis::swap::swapin(&node_c, &repo, &last, &name).unwrap();
            let disk = node_c.open_disk(&name).unwrap();
            drop_caches();
            let t = Instant::now();
            let done =
                stasis::swap::hydrate(&disk, workers, &AtomicBool::new(false), &|_, _| {}).unwrap();
            assert!(done);
            hydrate_apart.push(t.elapsed().as_secs_f64());
            disk.close().unwrap();
            node_c.remove_disk(&name).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&node_dir);
    let (raw_apart, hydrate_apart) = (median(raw_apart), median(hydrate_apart));

    // Single-core BLAKE3 on 64 KiB inputs, for the hashing target.
    let mut chunk = vec![0u8; 65536];
    fill(&mut chunk, 42);
    let t3 = Instant::now();
    let mut n = 0u64;
    while t3.elapsed() < Duration::from_secs(1) {
        std::hint::black_box(blake3::hash(&chunk));
        n += 1;
    }
    let blake3_rate = n as f64 * 65536.0 / t3.elapsed().as_secs_f64();

    let med = |v: &[Sample]| {
        (
            median(v.iter().map(|s| s.secs).collect()),
            median(v.iter().map(|s| s.cpu).collect()),
            median(v.iter().map(|s| s.bytes as f64).collect()),
        )
    };
    let (st, sc, sb) = med(&stasis_samples);
    println!("\n### Incremental store of a 4 GiB disk, 2 GiB written, 5% changed ({} MiB in 64 KiB regions), medians of {REPEATS}\n", changed / MIB);
    println!(
        "| tool | wall s | CPU s | bytes added (MiB) | bytes added / changed | stasis speed-up |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| stasis swapout | {st:.2} | {sc:.2} | {:.1} | {:.3} | 1.0x |",
        sb / MIB as f64,
        sb / changed as f64
    );
    let mut fastest = f64::MAX;
    for (p, samples) in peers.iter().zip(&peer_samples) {
        let (t, c, b) = med(samples);
        fastest = fastest.min(t);
        println!(
            "| {} | {t:.2} | {c:.2} | {:.1} | {:.3} | {:.1}x |",
            p.name,
            b / MIB as f64,
            b / changed as f64,
            t / st
        );
    }
    let vs_fastest = if peers.is_empty() {
        "no peers run".to_string()
    } else {
        format!("{:.1}x (target >= 10x)", fastest / st)
    };
    println!(
        "\nbaseline swapout (2 GiB + the image): {:.2}s. stasis vs the fastest peer: {vs_fastest}; bytes added / changed: {:.3} (target <= 1.05)",
        base_stasis.secs,
        sb / changed as f64
    );
    let (hashed, hash_secs, read_secs) = stage.get();
    let mib_s = |bytes: u64, secs: f64| bytes as f64 / secs / MIB as f64;
    println!(
        "hashing stage of the incremental swapouts: {:.0} MiB/s hashing alone ({:.0}% of single-core BLAKE3 on 64 KiB here, {:.0} MiB/s; target >= 80%), {:.0} MiB/s with reading the changed chunks from the layers",
        mib_s(hashed, hash_secs),
        mib_s(hashed, hash_secs) / (blake3_rate / MIB as f64) * 100.0,
        blake3_rate / MIB as f64,
        mib_s(hashed, hash_secs + read_secs),
    );
    println!(
        "\n### Swapin\n\nfirst read {:.1} ms after swapin started (target <= 200 ms); full hydration of {} MiB: {:.2}s = {:.0} MiB/s; the repository's raw read of the same chunk files ({workers} threads, as hydration): {:.0} MiB/s; ratio {:.2} (target >= 0.70)",
        first_read.as_secs_f64() * 1000.0,
        raw_bytes / MIB,
        hydrate.as_secs_f64(),
        raw_bytes as f64 / hydrate.as_secs_f64() / MIB as f64,
        raw_bytes as f64 / raw_read.as_secs_f64() / MIB as f64,
        raw_read.as_secs_f64() / hydrate.as_secs_f64()
    );
    println!(
        "the same chunk files copied into one file ({workers} threads, one fdatasync): {:.0} MiB/s; hydration / copy: {:.2}",
        raw_bytes as f64 / copy.as_secs_f64() / MIB as f64,
        copy.as_secs_f64() / hydrate.as_secs_f64()
    );
    println!(
        "with the node's store on another device than the repository ({}; medians of 3 rounds, each a raw read then a hydration): full hydration {hydrate_apart:.2}s = {:.0} MiB/s; raw read {raw_apart:.2}s = {:.0} MiB/s; ratio {:.2} (target >= 0.70)",
        node_dir.display(),
        raw_bytes as f64 / hydrate_apart / MIB as f64,
        raw_bytes as f64 / raw_apart / MIB as f64,
        raw_apart / hydrate_apart
    );
    chunk_size_model();
    let _ = std::fs::remove_dir_all(&base);
}

/// Empties the page cache (needs root; without it the comparison is warm on both sides, and
/// says so).
fn drop_caches() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("  (cannot drop the page cache: not root; reads below may be warm)");
    }
}

/// The chunk size, with data: for two change patterns over the 2 GiB written, how many bytes
/// a swapout must upload, and how much metadata and hashing it costs, per chunk size.
fn chunk_size_model() {
    println!("\n### Chunk size model (2 GiB written; uploads and metadata per swapout)\n");
    println!("| changes | chunk | chunks uploaded | bytes uploaded / changed | manifest + index bytes | BLAKE3 MiB/s on one chunk |");
    println!("|---|---|---|---|---|---|");
    // Manifest entry 40 bytes; index row: 32-byte key + 14-byte value + redb overhead ~ 30.
    let meta_per_chunk = 40 + 32 + 14 + 30;
    let blocks = WRITTEN / 4096;
    let patterns: [(&str, u64, u64); 2] = [
        ("5% in 64 KiB regions", 16, (WRITTEN / 20) / REGION),
        ("5% in 4 KiB blocks", 1, (WRITTEN / 20) / 4096),
    ];
    for (label, run_blocks, count) in patterns {
        let mut dirty = std::collections::BTreeSet::new();
        let mut x = 1u64;
        while dirty.len() < count as usize {
            x = splitmix(x);
            dirty.insert((x % (blocks / run_blocks)) * run_blocks);
        }
        let dirty: std::collections::BTreeSet<u64> =
            dirty.iter().flat_map(|b| *b..*b + run_blocks).collect();
        let changed = count * run_blocks * 4096;
        for kib in [16u64, 64, 256, 1024] {
            let per = kib * 1024 / 4096;
            let chunks: std::collections::BTreeSet<u64> = dirty.iter().map(|b| b / per).collect();
            let mut input = vec![0u8; (kib * 1024) as usize];
            fill(&mut input, kib);
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_millis(300) {
                std::hint::black_box(blake3::hash(&input));
                n += 1;
            }
            let rate = n as f64 * input.len() as f64 / t.elapsed().as_secs_f64() / MIB as f64;
            let total_chunks = WRITTEN / (kib * 1024);
            println!(
                "| {label} | {kib} KiB | {} | {:.2} | {:.1} MiB (all {} chunks) | {rate:.0} |",
                chunks.len(),
                (chunks.len() as u64 * kib * 1024) as f64 / changed as f64,
                (total_chunks * meta_per_chunk) as f64 / MIB as f64,
                total_chunks
            );
        }
    }
}
