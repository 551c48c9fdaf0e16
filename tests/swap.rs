//! Swapout and swapin through the real binary: two stores (two nodes) sharing a file://
//! repository; deduplication and hash reuse; damaged chunks caught; a swapped-in disk served
//! over NBD to a real client while it hydrates.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok, ok_json, pattern, s};

const MIB: usize = 1 << 20;

struct Nodes {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    repo: String,
    work: PathBuf,
}

/// Node A has image `g` (4 MiB, a zero region) and disk `d` (16 MiB) with writes: aligned,
/// unaligned, repeated content (dedup inside the disk), zeros over golden data, and data past
/// the golden's end.
fn nodes() -> Nodes {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, work) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("w"),
    );
    std::fs::create_dir(&work).unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let mut golden = pattern(4 * MIB, 1);
    golden[MIB..2 * MIB].fill(0);
    std::fs::write(work.join("g.raw"), &golden).unwrap();
    ok(&a, &["image", "import", "g", s(&work.join("g.raw"))]);
    ok(&a, &["disk", "create", "d", "--from", "g", "--size", "16M"]);
    write_same(&a, "d", &work);
    Nodes {
        _dir: dir,
        a,
        b,
        repo,
        work,
    }
}

fn write_at(root: &Path, disk: &str, work: &Path, data: &[u8], offset: usize) {
    let f = work.join(format!("w-{offset}"));
    std::fs::write(&f, data).unwrap();
    ok(
        root,
        &[
            "disk",
            "write",
            disk,
            s(&f),
            "--offset",
            &offset.to_string(),
        ],
    );
}

fn write_same(root: &Path, disk: &str, work: &Path) {
    write_at(root, disk, work, &pattern(MIB, 2), 512 * 1024);
    write_at(root, disk, work, &pattern(100_000, 3), 3_000_001 & !4095);
    write_at(root, disk, work, &pattern(MIB, 2), 9 * MIB);
    write_at(root, disk, work, &vec![0u8; 256 * 1024], 3 * MIB);
    write_at(root, disk, work, &pattern(12_345, 4), 15 * MIB + 7);
}

fn export(root: &Path, disk: &str, to: &Path) -> Vec<u8> {
    common::export_with(root, disk, to, &[])
}

/// Makes every chunk upload to the file:// repository `repo` fail (each brick fan-out
/// directory taken by a plain file), or, with `blocked` false, repairs it.
fn block_uploads(repo: &str, blocked: bool) {
    let brick = PathBuf::from(repo.trim_start_matches("file://")).join("brick0");
    std::fs::create_dir_all(&brick).unwrap();
    for i in 0..=255u8 {
        let fan = brick.join(format!("{i:02x}"));
        if blocked {
            std::fs::write(fan, b"").unwrap();
        } else {
            std::fs::remove_file(fan).unwrap();
        }
    }
}

#[test]
fn swapout_on_one_node_swapin_on_another_gives_the_same_disk() {
    let n = nodes();
    let before = export(&n.a, "d", &n.work.join("a.raw"));
    let out = ok_json(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    let sw = &out["swapout"];
    assert!(sw["chunks"].as_u64().unwrap() > 0);
    // The 1 MiB written twice is stored once.
    assert!(sw["chunks_reused"].as_u64().unwrap() >= 16, "{out}");
    assert!(sw["image_chunks_uploaded"].as_u64().unwrap() > 0);
    // Released: the disk is gone from node A.
    assert!(
        !ok(&n.a, &["disk", "list"]).contains(" d "),
        "disk d still listed on A"
    );

    // Node B lacks the image: swapin fetches it, and the disk is there at once.
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    let info = ok_json(&n.b, &["disk", "info", "d"]);
    let h = &info["delta"]["hydration"];
    assert_eq!(h["chunks_present"], 0, "{info}");
    assert!(h["chunks"].as_u64().unwrap() > 0);
    // Verifying checks what is local; it downloads nothing.
    ok(&n.b, &["disk", "verify", "d"]);
    let info = ok_json(&n.b, &["disk", "info", "d"]);
    assert_eq!(info["delta"]["hydration"]["chunks_present"], 0, "{info}");
    let h = &info["delta"]["hydration"];
    let after = export(&n.b, "d", &n.work.join("b.raw"));
    assert!(
        before == after,
        "the swapped-in disk differs from the swapped-out one"
    );
    let info = ok_json(&n.b, &["disk", "info", "d"]);
    assert_eq!(info["delta"]["hydration"]["chunks_present"], h["chunks"]);
    ok(&n.b, &["disk", "verify", "d"]);
    ok(&n.b, &["repo", "verify", "--repo", &n.repo]);
}

#[test]
fn an_unchanged_disk_uploads_nothing_and_equal_writes_are_stored_once() {
    let n = nodes();
    ok(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    // Swapped out again unchanged: no byte uploaded, no byte hashed (hashes reused).
    let out = ok_json(
        &n.b,
        &["swapout", "d", "--repo", &n.repo, "--name", "d2", "--keep"],
    );
    let sw = &out["swapout"];
    assert_eq!(sw["bytes_uploaded"], 0, "{out}");
    assert_eq!(sw["bytes_hashed"], 0, "{out}");
    assert_eq!(sw["hashes_reused"], sw["chunks"], "{out}");
    // One changed chunk after swapin: only it is hashed and uploaded.
    write_at(&n.b, "d", &n.work, &pattern(4096, 9), 9 * MIB);
    let out = ok_json(
        &n.b,
        &["swapout", "d", "--repo", &n.repo, "--name", "d3", "--keep"],
    );
    assert_eq!(out["swapout"]["chunks_uploaded"], 1, "{out}");
    assert_eq!(out["swapout"]["bytes_hashed"], 64 * 1024, "{out}");
    // Another disk with the same writes, on node A: nothing new is stored.
    ok(
        &n.a,
        &["disk", "create", "e", "--from", "g", "--size", "16M"],
    );
    write_same(&n.a, "e", &n.work);
    let out = ok_json(&n.a, &["swapout", "e", "--repo", &n.repo, "--name", "e1"]);
    assert_eq!(out["swapout"]["chunks_uploaded"], 0, "{out}");
    assert_eq!(out["swapout"]["image_chunks_uploaded"], 0, "{out}");
    let stat = ok_json(&n.a, &["repo", "stat", "--repo", &n.repo]);
    assert_eq!(stat["disk_manifests"], 4);
    assert!(stat["dedup_ratio"].as_f64().unwrap() > 1.0);
    // gc keeps everything a manifest names, and removes what a crash left in a brick (a
    // chunk written to its temporary name but never renamed into place).
    let fan = PathBuf::from(n.repo.trim_start_matches("file://")).join("brick0/ab");
    std::fs::create_dir_all(&fan).unwrap();
    let leftover = fan.join("tmp.x.1.0");
    std::fs::write(&leftover, b"half a chunk").unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&leftover)
        .status()
        .unwrap();
    assert!(touched.success());
    let gc = ok_json(&n.a, &["repo", "gc", "--repo", &n.repo, "--grace", "0"]);
    assert!(!leftover.exists(), "{gc}");
    ok(&n.a, &["repo", "verify", "--repo", &n.repo]);
    ok(&n.a, &["swapin", "d3", "--as", "d3", "--repo", &n.repo]);
    ok(&n.a, &["disk", "hydrate", "d3"]);
}

#[test]
fn repo_rm_frees_what_no_manifest_names_and_refuses_what_is_still_needed() {
    let n = nodes();
    ok(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    // Node B swaps d1 in (lazily), changes one chunk and swaps out d2, keeping its disk,
    // which still hydrates from d1.
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    // The chunk at 15 MiB holds bytes no other chunk has: d1 is the last to name them.
    write_at(&n.b, "d", &n.work, &pattern(64 * 1024, 7), 15 * MIB);
    ok(
        &n.b,
        &["swapout", "d", "--repo", &n.repo, "--name", "d2", "--keep"],
    );
    let ls = |root: &Path| -> Vec<String> {
        let v = ok_json(root, &["repo", "ls", "--repo", &n.repo]);
        let names = v.as_array().unwrap().iter();
        let mut names: Vec<String> = names
            .map(|m| m["info"]["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let before = ls(&n.a);
    // Refused, and nothing changes: the manifest B still hydrates from, an image disk
    // manifests name, a name that is not there, a kind that does not match.
    let err = fails(&n.b, &["repo", "rm", "d1", "--repo", &n.repo], 2);
    assert!(err.contains("still being swapped in here"), "{err}");
    let err = fails(&n.a, &["repo", "rm", "g", "--repo", &n.repo], 2);
    assert!(err.contains("named by disk"), "{err}");
    fails(&n.a, &["repo", "rm", "d1", "nope", "--repo", &n.repo], 2);
    fails(
        &n.a,
        &["repo", "rm", "d1", "--kind", "vm", "--repo", &n.repo],
        2,
    );
    fails(&n.a, &["repo", "rm", "--repo", &n.repo], 2);
    assert_eq!(ls(&n.a), before);

    // Once B's disk is hydrated, d1 can go; gc then frees the chunks only d1 named.
    ok(&n.b, &["disk", "hydrate", "d"]);
    let expected = export(&n.b, "d", &n.work.join("b.raw"));
    let chunks = |root: &Path| {
        ok_json(root, &["repo", "stat", "--repo", &n.repo])["chunks"]
            .as_u64()
            .unwrap()
    };
    let held = chunks(&n.a);
    let out = ok_json(&n.b, &["repo", "rm", "d1", "--repo", &n.repo]);
    assert_eq!(out["removed"][0]["name"], "d1", "{out}");
    assert_eq!(ls(&n.a), ["d2", "g"]);
    // gc keeps what was used in the current second even with no grace period.
    let a_second = || std::thread::sleep(std::time::Duration::from_millis(1100));
    a_second();
    ok(&n.a, &["repo", "gc", "--repo", &n.repo, "--grace", "0"]);
    assert_eq!(chunks(&n.a), held - 1, "the one chunk d2 replaced is freed");
    ok(&n.a, &["repo", "verify", "--repo", &n.repo]);
    // d2 still swaps in whole, on the node that never had it.
    ok(&n.a, &["swapin", "d2", "--as", "d", "--repo", &n.repo]);
    assert!(export(&n.a, "d", &n.work.join("a.raw")) == expected);
    // With its last disk manifest gone, the image can go too.
    ok(&n.a, &["repo", "rm", "d2", "g", "--repo", &n.repo]);
    a_second();
    ok(&n.a, &["repo", "gc", "--repo", &n.repo, "--grace", "0"]);
    assert_eq!(chunks(&n.a), 0);
}

#[test]
fn the_stores_configured_repository_is_used_when_no_option_names_one() {
    let n = nodes();
    let shown = ok_json(&n.a, &["config", "show"]);
    assert_eq!(shown, serde_json::json!({}), "nothing set by default");
    ok(&n.a, &["config", "set", "repo", &n.repo]);
    ok(&n.b, &["config", "set", "repo", &n.repo]);
    assert_eq!(ok_json(&n.a, &["config", "show"])["repo"], n.repo.as_str());
    ok(&n.a, &["swapout", "d", "--name", "d1"]);
    ok(&n.b, &["swapin", "d1", "--as", "d"]);
    let names = ok_json(&n.b, &["repo", "ls", "--repo", &n.repo]);
    assert_eq!(names.as_array().unwrap().len(), 2, "{names}");
    assert!(
        !n.a.join("repo").exists(),
        "the store's own repository was not used"
    );
    // --repo still wins; unset goes back to STORE/repo.
    let other = n.work.join("other-repo");
    ok(
        &n.b,
        &[
            "swapout",
            "d",
            "--name",
            "d2",
            "--keep",
            "--repo",
            s(&other),
        ],
    );
    assert!(other.join("repo.json").exists());
    ok(&n.b, &["config", "unset", "repo"]);
    fails(&n.b, &["repo", "ls"], 2);
    // Wrong use changes nothing; a damaged file is reported, not guessed at.
    ok(&n.b, &["config", "set", "repo", &n.repo]);
    fails(&n.b, &["config", "set", "repo", "s3://bucket"], 2);
    fails(&n.b, &["config", "set", "colour", "blue"], 2);
    assert_eq!(ok_json(&n.b, &["config", "show"])["repo"], n.repo.as_str());
    std::fs::write(n.b.join("config.json"), b"{\"repo\": 7}").unwrap();
    let err = fails(&n.b, &["repo", "ls"], 1);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn a_damaged_chunk_is_never_returned_as_data() {
    let n = nodes();
    ok(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    // Flip a bit in one chunk the disk manifest names (not an image chunk).
    let m = ok_json(&n.a, &["repo", "ls", "--repo", &n.repo]);
    assert!(m.to_string().contains("\"d1\""));
    let brick = PathBuf::from(n.repo.trim_start_matches("file://")).join("brick0");
    let chunk = pattern(MIB, 2);
    let hash = blake3::hash(&chunk[..64 * 1024]).to_hex().to_string();
    let path = brick.join(&hash[..2]).join(&hash);
    let mut bytes = std::fs::read(&path).expect("the chunk of the repeated write is stored");
    bytes[1000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    let err = fails(&n.b, &["disk", "export", "d", s(&n.work.join("b.raw"))], 1);
    assert!(err.contains("does not match its hash"), "{err}");
    let out = common::stasis(&n.b, &["--json", "repo", "verify", "--repo", &n.repo]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["report"]["broken_manifests"],
        serde_json::json!(["d1"])
    );
}

#[test]
fn wrong_use_is_refused_and_changes_nothing() {
    let n = nodes();
    fails(&n.a, &["swapout", "d", "--repo", "s3://bucket/x"], 2);
    fails(&n.a, &["swapout", "nope", "--repo", &n.repo], 2);
    ok(
        &n.a,
        &["swapout", "d", "--repo", &n.repo, "--name", "d1", "--keep"],
    );
    write_at(&n.a, "d", &n.work, &pattern(4096, 5), 0);
    // Manifests are immutable: the name is taken.
    let err = fails(
        &n.a,
        &["swapout", "d", "--repo", &n.repo, "--name", "d1", "--keep"],
        2,
    );
    assert!(err.contains("immutable"), "{err}");
    fails(&n.b, &["swapin", "nope", "--as", "x", "--repo", &n.repo], 2);
    // Reading from a repository that is not there is refused (not a new, empty one).
    let absent = n.work.join("no-repo");
    fails(
        &n.b,
        &["swapin", "d1", "--as", "x", "--repo", s(&absent)],
        2,
    );
    assert!(!absent.exists(), "a missing repository was created");
    ok(&n.b, &["swapin", "d1", "--as", "x", "--repo", &n.repo]);
    fails(&n.b, &["swapin", "d1", "--as", "x", "--repo", &n.repo], 2);
}

#[test]
fn a_swapped_in_disk_serves_a_real_client_at_once_while_it_hydrates() {
    let n = nodes();
    let before = export(&n.a, "d", &n.work.join("a.raw"));
    ok(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    let sock = n.work.join("nbd.sock");
    let (mut server, uri) = spawn_nbd(
        &n.b,
        &["swapin", "d1", "--as", "d", "--repo", &n.repo],
        &sock,
    );
    let copy = n.work.join("copy.raw");
    let out = std::process::Command::new("nbdcopy")
        .args([&uri, s(&copy)])
        .output()
        .expect("nbdcopy (libnbd-bin) is installed");
    assert!(
        out.status.success(),
        "nbdcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&copy).unwrap() == before,
        "read over NBD differs"
    );
    // SAFETY: signalling our child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
    let info = ok_json(&n.b, &["disk", "info", "d"]);
    let h = &info["delta"]["hydration"];
    assert_eq!(h["chunks_present"], h["chunks"], "{info}");
    assert!(export(&n.b, "d", &n.work.join("b.raw")) == before);
}

#[test]
fn a_failed_swapout_keeps_the_disk_and_the_repository_and_can_be_run_again() {
    let n = nodes();
    let before = export(&n.a, "d", &n.work.join("a.raw"));
    block_uploads(&n.repo, true);
    let err = fails(
        &n.a,
        &["swapout", "d", "--repo", &n.repo, "--name", "d1"],
        1,
    );
    assert!(err.contains("brick0"), "{err}");
    // The disk is still here, intact; the repository holds no manifest and verifies.
    assert!(export(&n.a, "d", &n.work.join("a2.raw")) == before);
    let ls = ok_json(&n.a, &["repo", "ls", "--repo", &n.repo]);
    assert_eq!(ls, serde_json::json!([]), "{ls}");
    ok(&n.a, &["repo", "verify", "--repo", &n.repo]);
    // Repaired, the same command completes.
    block_uploads(&n.repo, false);
    ok(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    assert!(export(&n.b, "d", &n.work.join("b.raw")) == before);
}

/// `stasis --json ARGS --nbd unix:SOCK` on `root` (serve, or swapin that serves); returns
/// the child and its NBD URI once it serves.
fn spawn_nbd(root: &Path, args: &[&str], sock: &Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let listen = format!("unix:{}", sock.display());
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--nbd", &listen]);
    let mut server = common::command(root, &all, &[])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("server output").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(uri) = v["nbd"].as_str() {
            return (server, uri.to_string());
        }
    }
}

fn qemu_io(uri: &str, cmd: &str) -> std::process::Output {
    std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io (qemu-utils) is installed")
}

#[test]
fn a_served_disk_swaps_out_through_its_control_socket_and_its_server_stops() {
    let n = nodes();
    let (mut server, uri) = spawn_nbd(&n.a, &["serve", "d"], &n.work.join("nbd.sock"));
    let out = qemu_io(&uri, "write -P 0x5a 1M 192k");
    assert!(out.status.success(), "{out:?}");
    // A swapout that fails leaves the disk served, thawed and writable, and the repository
    // empty.
    block_uploads(&n.repo, true);
    let err = fails(
        &n.a,
        &["swapout", "d", "--repo", &n.repo, "--name", "d1"],
        1,
    );
    assert!(err.contains("brick0"), "{err}");
    assert!(server.try_wait().unwrap().is_none(), "the server stopped");
    let out = qemu_io(&uri, "write -P 0x6b 3M 64k");
    assert!(
        out.status.success(),
        "written after the failed swapout: {out:?}"
    );
    assert_eq!(ok_json(&n.a, &["ctl", "d", "status"])["frozen"], false);
    assert_eq!(
        ok_json(&n.a, &["repo", "ls", "--repo", &n.repo]),
        serde_json::json!([])
    );
    block_uploads(&n.repo, false);
    // The served disk's content, every acknowledged write included.
    let mut expected = vec![0u8; 16 * MIB];
    let out = std::process::Command::new("nbdcopy")
        .args([&uri, "-"])
        .output()
        .expect("nbdcopy (libnbd-bin) is installed");
    assert!(out.status.success());
    expected.copy_from_slice(&out.stdout);
    assert!(expected[MIB..MIB + 192 * 1024].iter().all(|&b| b == 0x5a));
    // The swapout: manifest committed, server stopped by itself, disk released.
    let summary = ok_json(&n.a, &["swapout", "d", "--repo", &n.repo, "--name", "d1"]);
    assert_eq!(summary["server_stopped"], true, "{summary}");
    assert_eq!(summary["released"], true, "{summary}");
    let status = server.wait().unwrap();
    assert!(status.success(), "server exit: {status:?}");
    fails(&n.a, &["disk", "info", "d"], 2);
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    assert!(export(&n.b, "d", &n.work.join("b.raw")) == expected);
    ok(&n.b, &["repo", "verify", "--repo", &n.repo]);
}

#[test]
fn a_served_swapout_with_keep_stops_the_server_and_keeps_the_disk() {
    let n = nodes();
    let before = export(&n.a, "d", &n.work.join("a.raw"));
    let (mut server, _uri) = spawn_nbd(&n.a, &["serve", "d"], &n.work.join("nbd.sock"));
    let out = ok(
        &n.a,
        &["swapout", "d", "--repo", &n.repo, "--name", "d1", "--keep"],
    );
    assert!(out.contains("its server stopped"), "{out}");
    assert!(server.wait().unwrap().success());
    assert!(export(&n.a, "d", &n.work.join("a2.raw")) == before);
    ok(&n.b, &["swapin", "d1", "--as", "d", "--repo", &n.repo]);
    assert!(export(&n.b, "d", &n.work.join("b.raw")) == before);
}
