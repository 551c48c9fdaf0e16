//! A repository served over HTTP (`stasis repo serve`): swapout from one node and swapin on
//! another through it, session tokens (forged, expired, wrong-session and wrong-scope ones
//! refused), chunks checked before they are stored, and kill -9 of the client or the server
//! in the middle of swapouts.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{command, http, open_session, pattern, s, stasis_with, RepoServer};

const MIB: usize = 1 << 20;
const KEY: &str = common::REPO_KEY;

/// Serves repository `data` on `listen` with the test's access key.
fn serve(data: &Path, listen: &str, extra: &[&str]) -> RepoServer {
    common::serve_repo(data, listen, extra, &[], None)
}

const ENV: [(&str, &str); 1] = [("STASIS_REPO_KEY", KEY)];

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    stasis_with(root, args, &ENV)
}

fn ok(root: &Path, args: &[&str]) -> String {
    common::ok_with(root, args, &ENV)
}

fn ok_json(root: &Path, args: &[&str]) -> serde_json::Value {
    common::ok_json_with(root, args, &ENV)
}

fn export(root: &Path, disk: &str, to: &Path) -> Vec<u8> {
    common::export_with(root, disk, to, &ENV)
}

/// Node `root` with image `g` (4 MiB) and disk `d` (32 MiB) holding `written` random bytes.
fn node(root: &Path, work: &Path, written: usize) {
    std::fs::create_dir_all(work).unwrap();
    std::fs::write(work.join("g.raw"), pattern(4 * MIB, 1)).unwrap();
    ok(root, &["image", "import", "g", s(&work.join("g.raw"))]);
    ok(
        root,
        &["disk", "create", "d", "--from", "g", "--size", "32M"],
    );
    std::fs::write(work.join("w.raw"), pattern(written, 2)).unwrap();
    ok(
        root,
        &[
            "disk",
            "write",
            "d",
            s(&work.join("w.raw")),
            "--offset",
            "1M",
        ],
    );
}

/// Two nodes (stores `a` and `b`, work directory `w`) and a served repository; node `a` has
/// disk `d` with `written` bytes written (see [`node`]).
struct Nodes {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    w: PathBuf,
    server: RepoServer,
}

fn nodes(written: usize) -> Nodes {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, w) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("w"),
    );
    let server = serve(&dir.path().join("repo"), "127.0.0.1:0", &[]);
    node(&a, &w, written);
    Nodes {
        _dir: dir,
        a,
        b,
        w,
        server,
    }
}

#[test]
fn a_served_repository_carries_a_disk_between_nodes() {
    let Nodes {
        _dir,
        a,
        b,
        w,
        server,
    } = nodes(8 * MIB);
    let before = export(&a, "d", &w.join("a.raw"));
    let first = ok_json(
        &a,
        &[
            "swapout",
            "d",
            "--repo",
            &server.url,
            "--name",
            "d1",
            "--keep",
        ],
    );
    assert_eq!(
        first["swapout"]["bytes_uploaded"],
        8 * MIB as u64,
        "{first}"
    );
    // Unchanged: nothing new goes up.
    let again = ok_json(&a, &["swapout", "d", "--repo", &server.url, "--name", "d2"]);
    assert_eq!(again["swapout"]["chunks_uploaded"], 0, "{again}");
    ok(&b, &["swapin", "d2", "--as", "d", "--repo", &server.url]);
    ok(&b, &["disk", "hydrate", "d"]);
    assert!(export(&b, "d", &w.join("b.raw")) == before);
    let ls = ok_json(&b, &["repo", "ls", "--repo", &server.url]);
    assert_eq!(ls.as_array().unwrap().len(), 3, "{ls}");
    let stat = ok_json(&b, &["repo", "stat", "--repo", &server.url]);
    assert_eq!(stat["disk_manifests"], 2, "{stat}");
    // gc and verify run where the data is; remotely they are refused as wrong use.
    let out = run(&b, &["repo", "gc", "--repo", &server.url]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&b, &["repo", "verify", "--repo", s(&server.data)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the key, or with a wrong one: refused, exit 2.
    let out = stasis_with(&b, &["repo", "ls", "--repo", &server.url], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = stasis_with(
        &b,
        &["repo", "ls", "--repo", &server.url],
        &[("STASIS_REPO_KEY", "not-the-key-not-the-key")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong access key"));
    // repo rm works remotely with the access key, and only with it; a session token is not
    // enough.
    let out = stasis_with(
        &b,
        &["repo", "rm", "d1", "--repo", &server.url],
        &[("STASIS_REPO_KEY", "not-the-key-not-the-key")],
    );
    assert_eq!(out.status.code(), Some(2));
    let (_, token) = open_session(&server.url, "upload");
    let (status, _) = http(
        &server.url,
        "POST",
        "/v1/remove",
        Some(&token),
        br#"{"names":["d1"]}"#,
    );
    assert_eq!(status, 401);
    let (status, _) = http(&server.url, "POST", "/v1/remove", Some(KEY), b"{");
    assert_eq!(status, 400);
    let out = run(&b, &["repo", "rm", "g", "--repo", &server.url]);
    assert_eq!(out.status.code(), Some(2), "an image disk manifests name");
    let rm = ok_json(&b, &["repo", "rm", "d1", "--repo", &server.url]);
    assert_eq!(rm["removed"][0]["name"], "d1", "{rm}");
    let ls = ok_json(&b, &["repo", "ls", "--repo", &server.url]);
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");
}

#[test]
fn a_repository_served_over_tls_is_reached_with_its_certificate_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, w) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("w"),
    );
    node(&a, &w, 2 * MIB);
    // A self-signed certificate for the loopback address (an end entity, not a CA: rustls
    // refuses a CA certificate as a server's).
    let (cert, key) = (w.join("cert.pem"), w.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    // A key that is not a key is refused at start, as wrong use.
    let out = stasis_with(
        &a,
        &[
            "repo",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            s(&w.join("r2")),
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&cert),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let server = serve(
        &dir.path().join("repo"),
        "127.0.0.1:0",
        &["--tls-cert", s(&cert), "--tls-key", s(&key)],
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let trusted = [("STASIS_REPO_KEY", KEY), ("STASIS_REPO_CA", s(&cert))];
    // Not trusted without the certificate; plain HTTP to it fails too.
    let out = run(&a, &["repo", "ls", "--repo", &server.url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("certificate"),
        "{out:?}"
    );
    let plain = server.url.replacen("https", "http", 1);
    let out = run(&a, &["repo", "ls", "--repo", &plain]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let before = common::export_with(&a, "d", &w.join("a.raw"), &trusted);
    common::ok_with(
        &a,
        &["swapout", "d", "--repo", &server.url, "--name", "d1"],
        &trusted,
    );
    common::ok_with(
        &b,
        &["swapin", "d1", "--as", "d", "--repo", &server.url],
        &trusted,
    );
    assert!(common::export_with(&b, "d", &w.join("b.raw"), &trusted) == before);
}

#[test]
fn tokens_are_checked_and_chunks_verified_before_they_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(
        &dir.path().join("repo"),
        "127.0.0.1:0",
        &["--token-ttl", "2"],
    );
    let url = &server.url;
    let data = pattern(65536, 9);
    let hash = blake3::hash(&data);
    let batch = stasis::repo::wire::encode_chunks(&[(
        stasis::repo::ChunkHash(*hash.as_bytes()),
        &data[..],
    )]);
    let (id, token) = open_session(url, "upload");
    let chunk_path = format!("/v1/sessions/{id}/chunks/{}", hash.to_hex());
    let missing = |auth: Option<&str>, sid: &str| {
        http(
            url,
            "POST",
            &format!("/v1/sessions/{sid}/missing"),
            auth,
            hash.as_bytes(),
        )
    };
    assert_eq!(missing(Some(&token), &id), (200, vec![1]));
    // No token, a forged one (signature changed), a widened one (claims changed under the
    // signature), garbage: all 401 and nothing stored.
    assert_eq!(missing(None, &id).0, 401);
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    assert_eq!(missing(Some(&forged), &id).0, 401);
    let (down_id, down) = open_session(url, "download");
    let widened = down.replacen(".download.", ".upload.", 1);
    assert_eq!(missing(Some(&widened), &down_id).0, 401);
    assert_eq!(missing(Some("v1.x.y.z.w"), &id).0, 401);
    // Another session's token.
    assert_eq!(missing(Some(&down), &id).0, 401);
    // A download token cannot upload.
    let (status, _) = http(
        url,
        "POST",
        &format!("/v1/sessions/{down_id}/chunks"),
        Some(&down),
        &batch,
    );
    assert_eq!(status, 403);
    // A chunk whose bytes do not match its hash is refused and not stored.
    let mut bad = batch.clone();
    *bad.last_mut().unwrap() ^= 1;
    let (status, body) = http(
        url,
        "POST",
        &format!("/v1/sessions/{id}/chunks"),
        Some(&token),
        &bad,
    );
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    assert_eq!(http(url, "GET", &chunk_path, Some(&token), b"").0, 404);
    // Malformed batches: 400.
    let (status, _) = http(
        url,
        "POST",
        &format!("/v1/sessions/{id}/chunks"),
        Some(&token),
        &batch[..40],
    );
    assert_eq!(status, 400);
    // The right chunk with the right token is stored and read back.
    let (status, _) = http(
        url,
        "POST",
        &format!("/v1/sessions/{id}/chunks"),
        Some(&token),
        &batch,
    );
    assert_eq!(status, 204);
    assert_eq!(
        http(url, "GET", &chunk_path, Some(&token), b""),
        (200, data.clone())
    );
    // An ended session's token is refused.
    assert_eq!(
        http(
            url,
            "DELETE",
            &format!("/v1/sessions/{id}"),
            Some(&token),
            b""
        )
        .0,
        204
    );
    assert_eq!(http(url, "GET", &chunk_path, Some(&token), b"").0, 401);
    // Expired (the server hands out 2-second tokens here).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (status, body) = http(
        url,
        "GET",
        &format!("/v1/sessions/{down_id}/stat"),
        Some(&down),
        b"",
    );
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    // A wrong access key opens no session.
    let (status, _) = http(
        url,
        "POST",
        "/v1/sessions",
        Some("wrong"),
        b"{\"scope\":\"upload\"}",
    );
    assert_eq!(status, 401);
}

/// kill -9 of the swapout client, or of the repository server, at spread-out points of a
/// swapout, many times. After each: `repo verify` is clean, the last committed manifest
/// still swaps in with the content it had, and the swapout run again completes and swaps in
/// as the disk.
#[test]
fn kill_9_of_client_or_server_mid_swapout_leaves_a_consistent_repository() {
    let Nodes {
        _dir,
        a,
        b,
        w,
        mut server,
    } = nodes(16 * MIB);
    let data = server.data.clone();
    let addr = server.url.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    ok(
        &a,
        &[
            "swapout",
            "d",
            "--repo",
            &server.url,
            "--name",
            "t0",
            "--keep",
        ],
    );
    let full = started.elapsed();
    let mut committed = ("t0".to_string(), export(&a, "d", &w.join("t0.raw")));
    // A manifest's content as node B gets it: swapped in, hydrated, exported, removed.
    let url = server.url.clone();
    let swapped_in = |manifest: &str| {
        ok(&b, &["swapin", manifest, "--as", "x", "--repo", &url]);
        ok(&b, &["disk", "hydrate", "x"]);
        let content = export(&b, "x", &w.join("x.raw"));
        ok(&b, &["disk", "rm", "x"]);
        content
    };
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let trials = 12;
    let (mut killed_mid, mut finished_first) = (0, 0);
    for trial in 1..=trials {
        // New data to upload: 8 MiB at a random place.
        std::fs::write(w.join("new.raw"), pattern(8 * MIB, 100 + trial)).unwrap();
        let offset = (next() % 20) * MIB as u64;
        ok(
            &a,
            &[
                "disk",
                "write",
                "d",
                s(&w.join("new.raw")),
                "--offset",
                &offset.to_string(),
            ],
        );
        let name = format!("t{trial}");
        let mut client = command(
            &a,
            &[
                "swapout",
                "d",
                "--repo",
                &server.url,
                "--name",
                &name,
                "--keep",
            ],
            &[("STASIS_REPO_KEY", KEY)],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        // Anywhere in the first 60% of the time the first (larger) swapout took.
        let delay = full.mul_f64((next() % 1000) as f64 / 1600.0);
        std::thread::sleep(delay);
        let kill_server = trial % 2 == 0;
        if kill_server {
            let _ = server.child.kill(); // SIGKILL
            let _ = server.child.wait();
        } else {
            let _ = client.kill();
        }
        let status = client.wait().unwrap();
        if kill_server {
            server = serve(&data, &addr, &[]);
        }
        if status.success() {
            finished_first += 1;
        } else {
            killed_mid += 1;
        }
        // The repository is consistent.
        let out = run(&b, &["--json", "repo", "verify", "--repo", s(&data)]);
        assert!(
            out.status.success(),
            "trial {trial}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let report = &report["report"];
        assert_eq!(
            report["damaged"],
            serde_json::json!([]),
            "trial {trial}: {report}"
        );
        assert_eq!(
            report["broken_manifests"],
            serde_json::json!([]),
            "trial {trial}"
        );
        // The last committed manifest still swaps in as it was.
        assert!(swapped_in(&committed.0) == committed.1, "trial {trial}");
        // Run again, the swapout completes and is the disk.
        ok(
            &a,
            &[
                "swapout",
                "d",
                "--repo",
                &server.url,
                "--name",
                &name,
                "--keep",
            ],
        );
        committed = (name, export(&a, "d", &w.join("a.raw")));
        assert!(swapped_in(&committed.0) == committed.1, "trial {trial}");
    }
    eprintln!("{trials} trials: {killed_mid} killed mid-swapout, {finished_first} finished before the kill");
    assert!(
        killed_mid >= trials / 3,
        "too few kills landed mid-swapout: {killed_mid}"
    );
}

#[test]
fn a_served_disk_swaps_out_to_a_served_repository_with_the_clients_key() {
    let Nodes {
        _dir,
        a,
        b,
        w,
        server,
    } = nodes(2 * MIB);
    let before = export(&a, "d", &w.join("a.raw"));
    // The disk's server runs without the repository's key in its environment.
    let sock = w.join("nbd.sock");
    let listen = format!("unix:{}", sock.display());
    let mut nbd = command(&a, &["--json", "serve", "d", "--nbd", &listen], &[])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let started = BufReader::new(nbd.stdout.take().unwrap()).lines().next();
    assert!(started.is_some_and(|l| l.unwrap().contains("\"nbd\"")));
    let out = ok_json(&a, &["swapout", "d", "--repo", &server.url, "--name", "d1"]);
    assert_eq!(out["server_stopped"], true, "{out}");
    assert!(nbd.wait().unwrap().success());
    ok(&b, &["swapin", "d1", "--as", "d", "--repo", &server.url]);
    assert!(export(&b, "d", &w.join("b.raw")) == before);
}
