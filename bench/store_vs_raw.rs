//! In-process benchmark of the store against plain pread/pwrite/fdatasync on a raw file on the
//! same filesystem, side by side in one run (medians of interleaved repeats, and ratios).
//!
//! A 2 GiB disk over a 1 GiB golden, laid out so that reads hit each layer:
//!   [0, 256M)    delta        (written, then compacted)
//!   [256M, 512M) write layer  (written after the compaction)
//!   [512M, 1G)   golden only
//!   [1G, 1.5G)   beyond the golden (zeros); the sequential-write job writes here
//!   [1.5G, 2G)   beyond the golden (zeros); the random-write job writes here
//! The raw peer is a 2 GiB file with the same content.
//!
//! `tools/bench-store` runs it; STASIS_BENCH_DIR picks the directory (default
//! /var/tmp/stasis-bench), STASIS_BENCH_REPEATS the repeats (default 5).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use stasis::blockdev::BlockDevice;
use stasis::store::{Disk, Store};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const DISK: u64 = 2 * GIB;
const GOLDEN: u64 = GIB;
const BS: u64 = 4096;

#[path = "common.rs"]
mod common;
use common::{fill, splitmix};

/// The two things compared: the same operations on each.
trait Target {
    fn read(&self, off: u64, buf: &mut [u8]);
    fn write(&self, off: u64, buf: &[u8]);
    fn flush(&self);
}

impl Target for Disk {
    fn read(&self, off: u64, buf: &mut [u8]) {
        self.read_at(off, buf).expect("store read");
    }
    fn write(&self, off: u64, buf: &[u8]) {
        self.write_at(off, buf, false).expect("store write");
    }
    fn flush(&self) {
        BlockDevice::flush(self).expect("store flush");
    }
}

struct Raw(File);

impl Target for Raw {
    fn read(&self, off: u64, buf: &mut [u8]) {
        self.0.read_exact_at(buf, off).expect("raw read");
    }
    fn write(&self, off: u64, buf: &[u8]) {
        self.0.write_all_at(buf, off).expect("raw write");
    }
    fn flush(&self) {
        self.0.sync_data().expect("raw fdatasync");
    }
}

struct Job {
    name: &'static str,
    unit: &'static str,
    run: Box<dyn Fn(&dyn Target, u64) -> f64>,
}

/// 4 KiB random reads inside [lo, hi): returns IOPS.
fn randread(lo: u64, hi: u64, n: u64) -> Box<dyn Fn(&dyn Target, u64) -> f64> {
    Box::new(move |t, rep| {
        let mut buf = vec![0u8; BS as usize];
        let blocks = (hi - lo) / BS;
        let start = Instant::now();
        for i in 0..n {
            let b = splitmix(rep * 1_000_003 + i) % blocks;
            t.read(lo + b * BS, &mut buf);
        }
        n as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let dir = PathBuf::from(
        std::env::var("STASIS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/stasis-bench".into()),
    );
    let repeats: u64 = std::env::var("STASIS_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    eprintln!("setting up in {} ...", dir.display());

    // Golden: 1 GiB of incompressible data.
    let golden_path = dir.join("golden.raw");
    let raw_path = dir.join("raw.img");
    {
        let g = File::create(&golden_path).expect("golden");
        let r = File::create(&raw_path).expect("raw");
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..GOLDEN / MIB {
            fill(&mut buf, i);
            g.write_all_at(&buf, i * MIB).expect("write golden");
            r.write_all_at(&buf, i * MIB).expect("write raw");
        }
        // The raw peer is fully allocated over the whole 2 GiB, as a preallocated image would be.
        buf.fill(0);
        for i in GOLDEN / MIB..DISK / MIB {
            r.write_all_at(&buf, i * MIB).expect("write raw");
        }
        r.sync_all().expect("sync raw");
    }
    let store = Store::open(&dir.join("store")).expect("store");
    store
        .import_image("golden", &golden_path, &|_, _| {})
        .expect("import");
    store
        .create_disk("bench", "golden", Some(DISK))
        .expect("create");
    let raw = Raw(OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw_path)
        .expect("open raw"));
    {
        // [0, 256M) into the delta, [256M, 512M) into the write layer; same bytes into raw.
        let mut buf = vec![0u8; MIB as usize];
        let d = store.open_disk("bench").expect("open");
        for i in 0..256 {
            fill(&mut buf, 1_000_000 + i);
            d.write(i * MIB, &buf);
            raw.write(i * MIB, &buf);
        }
        d.close().expect("close");
        store.compact("bench").expect("compact");
        let d = store.open_disk("bench").expect("open");
        for i in 256..512 {
            fill(&mut buf, 1_000_000 + i);
            d.write(i * MIB, &buf);
            raw.write(i * MIB, &buf);
        }
        d.close().expect("close");
        raw.flush();
    }
    let rss_before = rss_bytes();
    let disk = store.open_disk("bench").expect("open");
    let index_rss = rss_bytes().saturating_sub(rss_before);

    let jobs: Vec<Job> = vec![
        Job {
            name: "4k randread, delta",
            unit: "IOPS",
            run: randread(0, 256 * MIB, 200_000),
        },
        Job {
            name: "4k randread, write layer",
            unit: "IOPS",
            run: randread(256 * MIB, 512 * MIB, 200_000),
        },
        Job {
            name: "4k randread, golden",
            unit: "IOPS",
            run: randread(512 * MIB, GIB, 200_000),
        },
        Job {
            name: "4k randwrite, flush/64",
            unit: "IOPS",
            run: Box::new(|t, rep| {
                let mut buf = vec![0u8; BS as usize];
                let n = 12_800u64;
                let start = Instant::now();
                for i in 0..n {
                    let b = splitmix(rep * 7_000_003 + i) % (512 * MIB / BS);
                    fill(&mut buf[..64], i ^ rep << 32);
                    t.write(3 * GIB / 2 + b * BS, &buf);
                    if (i + 1) % 64 == 0 {
                        t.flush();
                    }
                }
                n as f64 / start.elapsed().as_secs_f64()
            }),
        },
        Job {
            name: "1M seqread, delta+wlog+golden",
            unit: "MiB/s",
            run: Box::new(|t, _| {
                let mut buf = vec![0u8; MIB as usize];
                let start = Instant::now();
                for i in 0..GIB / MIB {
                    t.read(i * MIB, &mut buf);
                }
                (GIB / MIB) as f64 / start.elapsed().as_secs_f64()
            }),
        },
        Job {
            name: "1M seqwrite + fdatasync",
            unit: "MiB/s",
            run: Box::new(|t, rep| {
                let mut buf = vec![0u8; MIB as usize];
                fill(&mut buf, rep);
                let n = 512u64;
                let start = Instant::now();
                for i in 0..n {
                    buf[0..8].copy_from_slice(&i.to_le_bytes());
                    t.write(GIB + i * MIB, &buf);
                }
                t.flush();
                n as f64 / start.elapsed().as_secs_f64()
            }),
        },
    ];

    // Warm both (first touch of the files pulls them into the page cache).
    eprintln!("warming up ...");
    for j in &jobs {
        if j.name.contains("read") {
            (j.run)(&disk, 999);
            (j.run)(&raw, 999);
        }
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> =
        jobs.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for rep in 0..repeats {
        for (j, job) in jobs.iter().enumerate() {
            // Alternate who goes first so drift does not favour one side.
            if rep % 2 == 0 {
                results[j].0.push((job.run)(&disk, rep));
                results[j].1.push((job.run)(&raw, rep));
            } else {
                results[j].1.push((job.run)(&raw, rep));
                results[j].0.push((job.run)(&disk, rep));
            }
            eprintln!(
                "rep {rep} {:<28} store {:>10.0}  raw {:>10.0}",
                job.name, results[j].0[rep as usize], results[j].1[rep as usize]
            );
        }
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[s.len() / 2]
    };
    println!("| job | unit | stasis (median) | raw file (median) | ratio |");
    println!("|---|---|---:|---:|---:|");
    let mut json = Vec::new();
    for (job, (s, r)) in jobs.iter().zip(&results) {
        let (ms, mr) = (median(s), median(r));
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}x |",
            job.name,
            job.unit,
            ms,
            mr,
            ms / mr
        );
        json.push(serde_json::json!({"job": job.name, "unit": job.unit, "stasis": s, "raw": r, "ratio_of_medians": ms / mr}));
    }
    let st = disk.write_layer().stats();
    let delta_clusters = disk.delta().map(|d| d.stats.clusters).unwrap_or(0);
    let budget = 64 * MIB + DISK / 1000;
    println!(
        "\nindex memory: {} (RSS growth when opening the disk; write layer {} blocks, delta {} clusters); budget 64 MiB + 0.1% = {}",
        human(index_rss),
        st.data_blocks + st.zero_blocks,
        delta_clusters,
        human(budget)
    );
    println!(
        "repeats: {repeats}, interleaved; directory {}",
        dir.display()
    );
    let out = serde_json::json!({"results": json, "index_rss_bytes": index_rss, "budget_bytes": budget, "repeats": repeats});
    let _ = std::fs::create_dir_all("bench/out");
    let _ = std::fs::write(
        "bench/out/store_vs_raw.json",
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    );
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn human(b: u64) -> String {
    stasis::units::human(b)
}
