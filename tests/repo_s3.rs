//! A repository whose brick is an S3 bucket (object_store), against a local S3 server on
//! loopback (moto_server, from PyPI `moto[server]`; tools/test installs it): the swapout /
//! swapin roundtrip between two nodes, a bit flipped in a stored object caught at swapin
//! and by `repo verify`, and nodes of a served repository reaching its bucket straight
//! through presigned URLs.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, pattern, s, stasis_with};

const MIB: usize = 1 << 20;

struct Moto(Child, String);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts moto_server on a free loopback port with bucket `stasis-test`; returns it and its
/// endpoint.
fn moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server (PyPI moto[server]) is installed: tools/test installs it");
    let addr = format!("127.0.0.1:{port}");
    // Ready when it answers a request, not when it accepts a connection: it accepts (and
    // resets) for a moment before it serves, on a busy machine.
    let answers = || -> bool {
        use std::io::{Read, Write};
        let Ok(mut c) = TcpStream::connect(&addr) else {
            return false;
        };
        let mut reply = Vec::new();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok()
            && c.read_to_end(&mut reply).is_ok()
            && reply.starts_with(b"HTTP/")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("http://{addr}");
    assert_eq!(http(&endpoint, "PUT", "/stasis-test", None, b"").0, 200);
    Moto(child, endpoint)
}

/// Reads object `key` of the test bucket, flips one bit, writes it back (signed requests,
/// through object_store: moto refuses unsigned reads of objects).
fn flip_bit(endpoint: &str, key: &str) {
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("stasis-test")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = object_store::path::Path::from(key);
    rt.block_on(async {
        let mut data = store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        data[100] ^= 0x10;
        store.put(&path, data.into()).await.unwrap();
    });
}

const AWS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    stasis_with(root, args, &AWS)
}

fn ok(root: &Path, args: &[&str]) -> String {
    common::ok_with(root, args, &AWS)
}

fn export(root: &Path, disk: &str, to: &Path) -> Vec<u8> {
    common::export_with(root, disk, to, &AWS)
}

#[test]
fn an_s3_brick_carries_a_disk_between_nodes_and_damage_is_caught() {
    let moto = moto();
    let endpoint = &moto.1;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, w) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
        dir.path().join("w"),
    );
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&w).unwrap();
    // A bucket that does not exist is refused at init, and no repository is left.
    let out = run(
        &a,
        &[
            "repo",
            "init",
            "--repo",
            s(&dir.path().join("r2")),
            "--brick",
            "s3://absent/x",
            "--s3-endpoint",
            endpoint,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!dir.path().join("r2/repo.json").exists());
    ok(
        &a,
        &[
            "repo",
            "init",
            "--repo",
            s(&repo),
            "--brick",
            "s3://stasis-test/chunks",
            "--s3-endpoint",
            endpoint,
        ],
    );
    std::fs::write(w.join("g.raw"), pattern(4 * MIB, 1)).unwrap();
    ok(&a, &["image", "import", "g", s(&w.join("g.raw"))]);
    ok(&a, &["disk", "create", "d", "--from", "g", "--size", "16M"]);
    std::fs::write(w.join("x.raw"), pattern(3 * MIB, 2)).unwrap();
    ok(
        &a,
        &["disk", "write", "d", s(&w.join("x.raw")), "--offset", "5M"],
    );
    let before = export(&a, "d", &w.join("a.raw"));
    ok(&a, &["swapout", "d", "--repo", s(&repo), "--name", "d1"]);
    // The chunks are objects in the bucket, not files in the repository.
    let (status, listing) = http(
        endpoint,
        "GET",
        "/stasis-test?list-type=2&prefix=chunks/",
        None,
        b"",
    );
    assert_eq!(status, 200);
    let listing = String::from_utf8_lossy(&listing).to_string();
    assert!(listing.matches("<Key>").count() >= 48, "{listing}");
    ok(&b, &["swapin", "d1", "--as", "d", "--repo", s(&repo)]);
    ok(&b, &["disk", "hydrate", "d"]);
    assert!(export(&b, "d", &w.join("b.raw")) == before);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&b, &["--json", "repo", "verify", "--repo", s(&repo)])).unwrap();
    assert_eq!(v["report"]["damaged"], serde_json::json!([]), "{v}");
    // One bit flipped in the object that holds the disk's first written chunk.
    let chunk = &pattern(3 * MIB, 2)[..65536];
    let hex = blake3::hash(chunk).to_hex();
    let key = format!("chunks/{}/{hex}", &hex[..2]);
    assert!(listing.contains(&key), "{key} not in {listing}");
    flip_bit(endpoint, &key);
    // Swapin on another node: the damaged chunk is never data; hydration fails on it.
    ok(&c, &["swapin", "d1", "--as", "d", "--repo", s(&repo)]);
    let out = run(&c, &["disk", "hydrate", "d"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged") || err.contains("hash"), "{err}");
    let out = run(&c, &["--json", "repo", "verify", "--repo", s(&repo)]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["report"]["broken_manifests"],
        serde_json::json!(["d1"]),
        "{v}"
    );
}

/// A served repository whose brick is a bucket: nodes hold no S3 credentials, yet their
/// chunks go to and come from the bucket straight, through presigned URLs the server hands
/// out; what a node puts there is indexed only once the server has read it back and checked
/// it.
#[test]
fn nodes_of_a_served_repository_reach_its_bucket_straight_through_presigned_urls() {
    const KEY: &str = common::REPO_KEY;
    let moto = moto();
    let endpoint = &moto.1;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, w, data) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("w"),
        dir.path().join("repo"),
    );
    std::fs::create_dir_all(&w).unwrap();
    ok(
        &a,
        &[
            "repo",
            "init",
            "--repo",
            s(&data),
            "--brick",
            "s3://stasis-test/served",
            "--s3-endpoint",
            endpoint,
        ],
    );
    // The server has the credentials (and logs what it redirects); the nodes have none.
    let server_log = w.join("server.log");
    let server = common::serve_repo(
        &data,
        "127.0.0.1:0",
        &[],
        &[AWS[0], AWS[1], AWS[2], ("STASIS_LOG", "stasis=debug")],
        Some(&server_log),
    );
    let url = server.url.clone();
    let node = [("STASIS_REPO_KEY", KEY)];
    std::fs::write(w.join("g.raw"), pattern(4 * MIB, 1)).unwrap();
    common::ok_with(&a, &["image", "import", "g", s(&w.join("g.raw"))], &node);
    common::ok_with(
        &a,
        &["disk", "create", "d", "--from", "g", "--size", "16M"],
        &node,
    );
    std::fs::write(w.join("x.raw"), pattern(3 * MIB, 2)).unwrap();
    common::ok_with(
        &a,
        &["disk", "write", "d", s(&w.join("x.raw")), "--offset", "5M"],
        &node,
    );
    let before = common::export_with(&a, "d", &w.join("a.raw"), &node);
    common::ok_with(&a, &["swapout", "d", "--repo", &url, "--name", "d1"], &node);
    common::ok_with(&b, &["swapin", "d1", "--as", "d", "--repo", &url], &node);
    common::ok_with(&b, &["disk", "hydrate", "d"], &node);
    assert!(common::export_with(&b, "d", &w.join("b.raw"), &node) == before);
    let log = std::fs::read_to_string(&server_log).unwrap();
    assert!(
        log.contains("indexed chunks stored straight into the bucket"),
        "{log}"
    );
    assert!(log.contains("redirected to its bucket"), "{log}");

    // A node that puts other bytes under a chunk's name: refused at the check, not indexed,
    // and nothing is left of it. Put right, it is taken in; a replay of the URL afterwards
    // (still valid for minutes) writes only to the staging key, never over the chunk.
    let (id, token) = common::open_session(&url, "upload");
    let (id, token) = (id.as_str(), token.as_str());
    let right: &[u8] = b"what the chunk should be";
    let claimed = *blake3::hash(right).as_bytes();
    let hex = blake3::Hash::from_bytes(claimed).to_hex();
    let put_url = || -> String {
        let (status, body) = http(
            &url,
            "POST",
            &format!("/v1/sessions/{id}/upload-urls"),
            Some(token),
            &claimed,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["urls"][0]
            .as_str()
            .expect("an S3 brick gets a URL")
            .to_string()
    };
    let put = |to: &str, bytes: &'static [u8]| {
        let r = reqwest::blocking::Client::new()
            .put(to)
            .body(bytes)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{r:?}");
    };
    let uploaded = || {
        http(
            &url,
            "POST",
            &format!("/v1/sessions/{id}/uploaded"),
            Some(token),
            &claimed,
        )
        .0
    };
    let first = put_url();
    assert!(first.contains("/staging/"), "{first}");
    put(&first, b"something else");
    assert_eq!(uploaded(), 422);
    let second = put_url();
    put(&second, b"what the chunk should be");
    assert_eq!(uploaded(), 204);
    put(&second, b"garbage over a chunk already taken in");
    let (status, got) = http(
        &url,
        "GET",
        &format!("/v1/sessions/{id}/chunks/{hex}"),
        Some(token),
        b"",
    );
    assert_eq!((status, got.as_slice()), (200, right));
    // Naming it again drops the replayed staging object, unread; the chunk stays as it was.
    assert_eq!(uploaded(), 204);
    let stat: serde_json::Value = serde_json::from_str(&common::ok_with(
        &a,
        &["--json", "repo", "stat", "--repo", &url],
        &node,
    ))
    .unwrap();
    let (status, listing) = http(
        endpoint,
        "GET",
        "/stasis-test?list-type=2&prefix=served/",
        None,
        b"",
    );
    assert_eq!(status, 200);
    let listing = String::from_utf8_lossy(&listing);
    assert!(
        !listing.contains("/staging/"),
        "no staging object is left: {listing}"
    );
    assert_eq!(
        stat["chunks"].as_u64().unwrap() as usize,
        listing.matches("<Key>").count(),
        "every object is an indexed chunk"
    );
}
