//! The `stasis` binary as users drive it: the CLI tour, wrong use (exit 2, one line, nothing
//! changed), and damaged store files (a clear error naming the file, no panic, nothing changed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::{ok, pattern, stasis};

const MIB: usize = 1 << 20;

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    work: PathBuf,
    golden: Vec<u8>,
}

/// A store with image `base`, disk `d` (its own writes in a delta shared with its fork `e`,
/// then more writes in its write layer), all closed cleanly.
fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut golden = pattern(MIB + 1000, 1);
    golden[300_000..700_000].fill(0);
    std::fs::write(work.join("golden.raw"), &golden).unwrap();
    ok(
        &root,
        &[
            "image",
            "import",
            "base",
            work.join("golden.raw").to_str().unwrap(),
        ],
    );
    ok(
        &root,
        &["disk", "create", "d", "--from", "base", "--size", "2M"],
    );
    std::fs::write(work.join("w1"), pattern(100_000, 2)).unwrap();
    ok(
        &root,
        &[
            "disk",
            "write",
            "d",
            work.join("w1").to_str().unwrap(),
            "--offset",
            "12345",
        ],
    );
    ok(&root, &["disk", "fork", "e", "--from", "d"]);
    std::fs::write(work.join("w2"), pattern(50_000, 3)).unwrap();
    ok(
        &root,
        &[
            "disk",
            "write",
            "d",
            work.join("w2").to_str().unwrap(),
            "--offset",
            "1500000",
        ],
    );
    Env {
        _dir: dir,
        root,
        work,
        golden,
    }
}

/// Content hash of every layer file in the store, plus the registry's content. (redb rewrites
/// its file on open, since its integrity check commits, so the registry is compared by what it
/// holds, read through a plain redb reader, not by its bytes.)
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    out.insert(
        root.join("registry.redb"),
        registry_content(&root.join("registry.redb")),
    );
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.starts_with(root.join("locks")) && !p.ends_with("registry.redb") {
                out.insert(
                    p.clone(),
                    blake3::hash(&std::fs::read(&p).unwrap())
                        .to_hex()
                        .to_string(),
                );
            }
        }
    }
    out
}

fn registry_content(path: &Path) -> String {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    let Ok(db) = redb::Database::builder().create(path) else {
        return format!(
            "unreadable:{}",
            blake3::hash(&std::fs::read(path).unwrap_or_default()).to_hex()
        );
    };
    let txn = db.begin_read().unwrap();
    let mut out = String::new();
    for name in ["meta", "images", "disks", "deltas"] {
        if name == "meta" {
            let t = txn
                .open_table(TableDefinition::<&str, &str>::new(name))
                .unwrap();
            for kv in t.iter().unwrap() {
                let (k, v) = kv.unwrap();
                out += &format!("{name}/{}={}\n", k.value(), v.value());
            }
        } else {
            let t = txn
                .open_table(TableDefinition::<&str, &[u8]>::new(name))
                .unwrap();
            for kv in t.iter().unwrap() {
                let (k, v) = kv.unwrap();
                out += &format!(
                    "{name}/{}={}\n",
                    k.value(),
                    String::from_utf8_lossy(v.value())
                );
            }
        }
    }
    out
}

fn expected_d(env: &Env) -> Vec<u8> {
    let mut want = env.golden.clone();
    want.resize(2 * MIB, 0);
    want[12345..112_345].copy_from_slice(&pattern(100_000, 2));
    want[1_500_000..1_550_000].copy_from_slice(&pattern(50_000, 3));
    want
}

#[test]
fn tour_export_matches_and_branches_are_isolated() {
    let env = setup();
    let out_d = env.work.join("d.raw");
    let out_e = env.work.join("e.raw");
    ok(&env.root, &["disk", "export", "d", out_d.to_str().unwrap()]);
    ok(&env.root, &["disk", "export", "e", out_e.to_str().unwrap()]);
    let want_d = expected_d(&env);
    let mut want_e = want_d.clone();
    want_e[1_500_000..1_550_000].copy_from_slice(&{
        let mut g = env.golden.clone();
        g.resize(2 * MIB, 0);
        g[1_500_000..1_550_000].to_vec()
    });
    assert!(
        std::fs::read(&out_d).unwrap() == want_d,
        "export of d differs"
    );
    assert!(
        std::fs::read(&out_e).unwrap() == want_e,
        "e saw d's writes made after the fork"
    );

    // Compact folds d's write layer; content stays; e still shares nothing new.
    ok(&env.root, &["disk", "compact", "d"]);
    ok(&env.root, &["disk", "export", "d", out_d.to_str().unwrap()]);
    assert!(
        std::fs::read(&out_d).unwrap() == want_d,
        "compact changed d"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&env.root, &["disk", "info", "d", "--json"])).unwrap();
    assert_eq!(info["write_layer"]["dirty_blocks"], 0);
    assert_eq!(info["parent"], serde_json::Value::Null);
    assert_eq!(info["children"], serde_json::json!(["e"]));
    let info_e: serde_json::Value =
        serde_json::from_str(&ok(&env.root, &["disk", "info", "e", "--json"])).unwrap();
    assert_eq!(info_e["parent"], "d");
    assert_ne!(
        info_e["delta"]["id"], info["delta"]["id"],
        "d's compaction made a new delta; e keeps the old"
    );

    // Removing the parent keeps the child's shared layers.
    ok(&env.root, &["disk", "rm", "d"]);
    ok(&env.root, &["disk", "export", "e", out_e.to_str().unwrap()]);
    assert!(
        std::fs::read(&out_e).unwrap() == want_e,
        "removing d damaged e"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&env.root, &["disk", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(ok(&env.root, &["disk", "list"]).contains("d (removed)"));
    let images: serde_json::Value =
        serde_json::from_str(&ok(&env.root, &["image", "list", "--json"])).unwrap();
    assert_eq!(images[0]["name"], "base");
    assert_eq!(
        images[0]["size"],
        (MIB + 4096) as u64,
        "image padded to whole blocks"
    );
    ok(&env.root, &["disk", "verify", "e"]);
    ok(&env.root, &["image", "verify", "base"]);
    // Once no disk uses it, the image can go, and the store holds no layer files any more.
    ok(&env.root, &["disk", "rm", "e"]);
    ok(&env.root, &["image", "rm", "base"]);
    let left: Vec<_> = snapshot(&env.root)
        .into_keys()
        .filter(|p| !p.ends_with("registry.redb"))
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn wrong_use_exits_2_with_one_line_and_changes_nothing() {
    let env = setup();
    let before = snapshot(&env.root);
    let golden = env.work.join("golden.raw");
    let g = golden.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["disk", "create", "d", "--from", "base"],
        vec!["disk", "create", "x", "--from", "nope"],
        vec!["disk", "create", "x", "--from", "base", "--size", "1M"],
        vec!["disk", "create", "x", "--from", "base", "--size", "3000001"],
        vec!["disk", "create", "x", "--from", "base", "--size", "12Q"],
        vec!["disk", "create", "bad/name", "--from", "base"],
        vec!["disk", "create", ".hidden", "--from", "base"],
        vec!["disk", "fork", "e", "--from", "d"],
        vec!["disk", "fork", "z", "--from", "nope"],
        vec!["disk", "compact", "nope"],
        vec!["disk", "rm", "nope"],
        vec!["disk", "info", "nope"],
        vec!["disk", "export", "nope", "/tmp/never-written"],
        vec!["disk", "write", "d", g, "--offset", "2M"],
        vec!["disk", "write", "d", "/nonexistent/file"],
        vec!["image", "rm", "base"],
        vec!["image", "import", "base", g],
        vec!["image", "import", "new", "/nonexistent/file"],
        vec!["image", "import", "new", "/"],
        vec!["image", "verify", "nope"],
        vec!["disk", "create"],
        vec!["disk", "frobnicate"],
        vec![],
        vec![
            "vm", "start", "v", "--disk", "nope", "--mem", "256M", "--kernel", g,
        ],
        vec![
            "vm", "start", "v", "--disk", "d", "--mem", "1M", "--kernel", g,
        ],
        vec![
            "vm",
            "start",
            "v",
            "--disk",
            "d",
            "--mem",
            "256M",
            "--kernel",
            "/nonexistent",
        ],
        vec!["vm", "start", "v", "--disk", "d", "--mem", "256M"],
        vec![
            "vm", "start", "bad/name", "--disk", "d", "--mem", "256M", "--kernel", g,
        ],
        vec![
            "vm", "start", "v", "--disk", "d", "--mem", "256M", "--kernel", g, "--driver", "exec",
        ],
        vec!["vm", "swapout", "nope"],
        vec!["vm", "swapin", "nope"],
        vec!["vm", "status", "nope"],
        vec!["vm", "kill", "nope"],
        vec!["experiment", "create", "x", "--vm", "nope"],
        vec!["experiment", "create", "x"],
        vec!["experiment", "swapout", "nope"],
        vec!["experiment", "swapin", "nope"],
        vec!["qmp", "/nonexistent.sock", "stop", "[1]"],
    ];
    for args in cases {
        let out = stasis(&env.root, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "stasis {args:?}: status {:?}, stderr {err}",
            out.status
        );
        if !args.is_empty()
            && !matches!(args.get(1), Some(&"frobnicate") | Some(&"create") if args.len() <= 2)
        {
            if !err.starts_with("error:") {
                assert_eq!(
                    err.trim_end().lines().count(),
                    1,
                    "stasis {args:?}: not one line: {err}"
                );
                assert!(err.starts_with("stasis: "), "{err}");
            }
        }
        assert_eq!(
            snapshot(&env.root),
            before,
            "stasis {args:?} changed the store"
        );
    }
    assert!(!Path::new("/tmp/never-written").exists());
}

/// A damaged file makes commands fail with status 1 and a message naming the file, and the
/// store is left exactly as it was.
fn expect_refused(env: &Env, file: &Path, args: &[&str], what: &str) {
    let before = snapshot(&env.root);
    let out = stasis(&env.root, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: stasis {args:?} -> {:?}: {err}",
        out.status
    );
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(&*name),
        "{what}: error does not name {name}: {err}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(
        snapshot(&env.root),
        before,
        "{what}: the failed command changed the store"
    );
}

fn find(root: &Path, sub: &str, suffix: &str) -> PathBuf {
    let mut stack = vec![root.join(sub)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                return p;
            }
        }
    }
    panic!("no {suffix} under {sub}")
}

fn wlog_of(env: &Env, disk: &str) -> PathBuf {
    let info: serde_json::Value =
        serde_json::from_str(&ok(&env.root, &["disk", "info", disk, "--json"])).unwrap();
    env.root
        .join("wlogs")
        .join(info["write_layer"]["id"].as_str().unwrap())
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Truncate(u64),
    TruncateBy(u64),
    Flip(u64),
    FlipFromEnd(u64),
    /// Set the version field to 99 and fix the header checksum: a well-formed future file.
    FutureVersion,
}

fn damage(path: &Path, how: Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len() as u64;
    match how {
        Damage::Truncate(n) => bytes.truncate(n as usize),
        Damage::TruncateBy(n) => bytes.truncate((len - n) as usize),
        Damage::Flip(at) => bytes[at as usize] ^= 0x10,
        Damage::FlipFromEnd(n) => bytes[(len - n) as usize] ^= 0x10,
        Damage::FutureVersion => {
            bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
            let crc = crc32c::crc32c(&bytes[..4092]);
            bytes[4092..4096].copy_from_slice(&crc.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

const HEADER_DAMAGE: [Damage; 7] = [
    Damage::Truncate(0),
    Damage::Truncate(100),
    Damage::Truncate(4095),
    Damage::Flip(3),
    Damage::Flip(20),
    Damage::Flip(4093),
    Damage::FutureVersion,
];

#[test]
fn damaged_layer_files_are_refused_by_name() {
    let targets: Vec<(&str, Box<dyn Fn(&Env) -> PathBuf>, Vec<Damage>)> = vec![
        (
            "golden",
            Box::new(|e: &Env| e.root.join("images/base/golden")),
            vec![Damage::TruncateBy(1)],
        ),
        (
            "delta",
            Box::new(|e: &Env| find(&e.root, "deltas", ".delta")),
            vec![Damage::TruncateBy(1), Damage::FlipFromEnd(5)],
        ),
        (
            "journal",
            Box::new(|e: &Env| wlog_of(e, "d").join("journal")),
            vec![Damage::TruncateBy(1), Damage::FlipFromEnd(3)],
        ),
        (
            "wlog data",
            Box::new(|e: &Env| wlog_of(e, "d").join("data")),
            vec![Damage::TruncateBy(4096)],
        ),
        (
            "clean marker",
            Box::new(|e: &Env| wlog_of(e, "d").join("clean")),
            vec![],
        ),
    ];
    for (what, locate, extra) in &targets {
        for how in HEADER_DAMAGE.iter().chain(extra.iter()) {
            let env = setup();
            let file = locate(&env);
            damage(&file, *how);
            let out = env.work.join("out.raw");
            expect_refused(
                &env,
                &file,
                &["disk", "export", "d", out.to_str().unwrap()],
                &format!("{what} {how:?}"),
            );
            assert!(
                !out.exists(),
                "{what} {how:?}: export wrote output from a damaged disk"
            );
        }
    }
}

#[test]
fn damaged_chunk_hashes_and_data_blocks_are_found_by_verify() {
    let env = setup();
    let hashes = env.root.join("images/base/chunks.b3");
    damage(&hashes, Damage::FlipFromEnd(40));
    expect_refused(&env, &hashes, &["image", "verify", "base"], "chunk hashes");

    for (what, file, at) in [
        ("golden data", "golden", (1 << 20) + 5000u64),
        ("delta data", "delta", (1 << 20) + 10),
        ("write layer data", "data", (1 << 20) + 7),
    ] {
        let env = setup();
        let path = match file {
            "golden" => env.root.join("images/base/golden"),
            "delta" => find(&env.root, "deltas", ".delta"),
            _ => wlog_of(&env, "d").join("data"),
        };
        damage(&path, Damage::Flip(at));
        // Block data is not checked on every read: the scrub finds it, naming file and block.
        let out = stasis(&env.root, &["disk", "verify", "d"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        let name = if file == "data" {
            wlog_of(&env, "d").to_string_lossy().to_string()
        } else {
            path.to_string_lossy().to_string()
        };
        assert!(
            text.contains("damaged: ") && text.contains(&name),
            "{what}: {text}"
        );
    }
}

#[test]
fn damaged_registry_is_refused() {
    for how in [
        Damage::Truncate(0),
        Damage::Truncate(1000),
        Damage::Flip(0),
        Damage::Flip(600),
        Damage::FlipFromEnd(9),
        Damage::TruncateBy(4096),
    ] {
        let env = setup();
        let reg = env.root.join("registry.redb");
        if matches!(how, Damage::Truncate(0)) {
            // An empty registry file is a new registry to redb; make it a foreign file instead.
            std::fs::write(&reg, b"not a database").unwrap();
        } else {
            damage(&reg, how);
        }
        let before = snapshot(&env.root);
        let out = stasis(&env.root, &["disk", "list"]);
        let err = String::from_utf8_lossy(&out.stderr);
        // Either refused naming the registry, or (damage in unused pages) still correct.
        if out.status.success() {
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("d "),
                "{how:?}: wrong listing"
            );
        } else {
            assert_eq!(out.status.code(), Some(1), "{how:?}: {err}");
            assert!(err.contains("registry.redb"), "{how:?}: {err}");
            assert_eq!(snapshot(&env.root), before, "{how:?}: changed the store");
        }
    }
}

#[test]
fn expected_content_helper_matches_a_fresh_export() {
    // Guards the other tests' ground truth against drifting from what setup() does.
    let env = setup();
    let out = env.work.join("d.raw");
    ok(&env.root, &["disk", "export", "d", out.to_str().unwrap()]);
    assert!(std::fs::read(out).unwrap() == expected_d(&env));
}
