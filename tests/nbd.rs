//! `stasis serve --nbd` against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and
//! against a hand-written client sending malformed input; the control socket.
//! Needs qemu-utils, libnbd-bin and fio (tools/test installs them).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{ok, stasis};

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stasis")
}

fn tool(name: &str, args: &[&str]) -> Output {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is needed for this test (tools/test installs it): {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Server {
    child: Child,
    root: PathBuf,
    sock: PathBuf,
    uri: String,
    golden: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only reached with the child still running when a test failed midway.
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_on_panic();
        }
    }
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let golden: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("g.raw"), &golden).unwrap();
        ok(
            &root,
            &[
                "image",
                "import",
                "g",
                dir.path().join("g.raw").to_str().unwrap(),
            ],
        );
        ok(
            &root,
            &["disk", "create", "d", "--from", "g", "--size", "64M"],
        );
        let sock = dir.path().join("nbd.sock");
        let mut child = Command::new(bin())
            .arg("--store")
            .arg(&root)
            .args(["--json", "serve", "d", "--nbd"])
            .arg(format!("unix:{}", sock.display()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = child.stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("serve printed {line:?}: {e}"));
        let uri = v["nbd"].as_str().unwrap().to_string();
        assert_eq!(uri, format!("nbd+unix:///d?socket={}", sock.display()));
        Server {
            child,
            root,
            sock,
            uri,
            golden,
            _dir: dir,
        }
    }

    /// SIGTERM, and the server must exit 0 after flushing and closing.
    fn stop(mut self) -> (PathBuf, Vec<u8>, tempfile::TempDir) {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exited with {status}");
        assert!(!self.sock.exists(), "NBD socket left behind");
        assert!(
            !self.root.join("run/d.sock").exists(),
            "control socket left behind"
        );
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        (self.root.clone(), self.golden.clone(), dir)
    }

    fn kill_on_panic(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

fn export(root: &Path, to: &Path) -> Vec<u8> {
    // A clean close by the server means no recovery warning here.
    let out = stasis(root, &["disk", "export", "d", to.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("not closed cleanly"),
        "server did not close the disk cleanly"
    );
    std::fs::read(to).unwrap()
}

#[test]
fn real_clients_roundtrip_and_sigterm_keeps_everything() {
    let srv = Server::start();
    let info: serde_json::Value =
        serde_json::from_slice(&tool("nbdinfo", &["--json", &srv.uri]).stdout).unwrap();
    let export_info = &info["exports"][0];
    assert_eq!(export_info["export-size"], DISK_SIZE);
    assert_eq!(export_info["can_multi_conn"], true);
    assert_eq!(export_info["can_flush"], true);
    assert_eq!(export_info["can_fua"], true);
    assert_eq!(export_info["can_trim"], true);
    assert_eq!(export_info["can_zero"], true);

    // Unaligned pattern writes, a FUA write, zeroes, and reads that check them.
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "write -f -P 0xcd 9000000 70000",
            "-c",
            "write -z 20000000 1000000",
            "-c",
            "read -P 0xab 1000 5000",
            "-c",
            "read -P 0xcd 9000000 70000",
            "-c",
            "read -P 0 20000000 1000000",
            &srv.uri,
        ],
    );
    // fio: random writes at queue depth 16 on one connection, then verified.
    tool(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=32M",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would leave local-verify-0-verify.state in the working directory.
            "--verify_state_save=0",
        ],
    );
    tool("qemu-img", &["info", &srv.uri]);
    let dir = srv._dir.path().to_path_buf();
    let copy = dir.join("copy.raw");
    tool("nbdcopy", &[&srv.uri, copy.to_str().unwrap()]);
    tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &srv.uri,
            copy.to_str().unwrap(),
        ],
    );

    let (root, golden, _dir) = srv.stop();
    let exported = export(&root, &dir.join("export.raw"));
    let copied = std::fs::read(&copy).unwrap();
    assert!(
        exported == copied,
        "the disk after SIGTERM differs from what nbdcopy read while serving"
    );
    let mut want = golden.clone();
    want.resize(DISK_SIZE as usize, 0);
    want[1000..6000].fill(0xab);
    want[9_000_000..9_070_000].fill(0xcd);
    want[20_000_000..21_000_000].fill(0);
    assert!(
        exported[..32 * MIB as usize] == want[..32 * MIB as usize],
        "qemu-io's writes did not all land"
    );
}

fn handshake(s: &mut UnixStream, export: &str) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[0..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(s, 7, &data);
    loop {
        let (kind, _) = read_option_reply(s);
        if kind == 1 {
            return;
        }
        assert_eq!(kind, 3, "expected NBD_REP_INFO or ACK");
    }
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn read_option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(
        u64::from_be_bytes(h[0..8].try_into().unwrap()),
        0x0003_e889_0455_65a9
    );
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).unwrap();
    (kind, data)
}

fn request(
    s: &mut UnixStream,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// (error, cookie)
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698);
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return true,
        }
    }
}

#[test]
fn malformed_input_gets_errors_or_a_closed_connection_and_changes_nothing() {
    let srv = Server::start();

    // Handshake: a client that is not fixed-newstyle; a bad option magic; a huge option.
    let mut s = srv.connect();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "non-fixed-newstyle client must be dropped");

    let mut s = srv.connect();
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"BADMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s), "bad option magic must close");

    let mut s = srv.connect();
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x07\x7f\xff\xff\xff").unwrap();
    assert!(closed(&mut s), "a 2 GiB option must close");

    // Unknown export and unsupported options get error replies; the connection stays.
    let mut s = srv.connect();
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut data = Vec::new();
    data.extend_from_slice(&4u32.to_be_bytes());
    data.extend_from_slice(b"nope");
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, 7, &data);
    assert_eq!(read_option_reply(&mut s).0, 0x8000_0006, "unknown export");
    send_option(&mut s, 5, &[]); // STARTTLS
    assert_eq!(
        read_option_reply(&mut s).0,
        0x8000_0001,
        "unsupported option"
    );
    send_option(&mut s, 7, &[0, 0, 0, 50, 1]); // truncated GO data
    assert_eq!(read_option_reply(&mut s).0, 0x8000_0003, "malformed option");
    send_option(&mut s, 3, &[]); // LIST
    let (kind, entry) = read_option_reply(&mut s);
    assert_eq!((kind, &entry[4..]), (2, &b"d"[..]));
    assert_eq!(read_option_reply(&mut s).0, 1);

    // Transmission: per-request errors.
    let mut s = srv.connect();
    handshake(&mut s, "d");
    request(&mut s, 0, 0, 1, DISK_SIZE - 10, 20, &[]);
    assert_eq!(reply(&mut s), (22, 1), "read past the end: EINVAL");
    request(&mut s, 0, 1, 2, DISK_SIZE - 2, 4, &[7u8; 4]);
    assert_eq!(
        reply(&mut s),
        (28, 2),
        "write past the end: ENOSPC, payload consumed"
    );
    request(&mut s, 0, 99, 3, 0, 0, &[]);
    assert_eq!(reply(&mut s), (22, 3), "unknown command: EINVAL");
    request(&mut s, 0, 0, 4, 0, 64 << 20, &[]);
    assert_eq!(reply(&mut s), (22, 4), "read over 32 MiB: EINVAL");
    request(&mut s, 0x80, 1, 5, 0, 4, &[7u8; 4]);
    assert_eq!(reply(&mut s), (22, 5), "unknown flag: EINVAL");
    request(&mut s, 0, 4, 6, u64::MAX - 5, 100, &[]);
    assert_eq!(reply(&mut s), (28, 6), "trim with offset overflow: refused");
    request(&mut s, 0, 0, 7, 0, 16, &[]);
    let (err, cookie) = reply(&mut s);
    assert_eq!((err, cookie), (0, 7), "still serving after errors");
    let mut data = [0u8; 16];
    s.read_exact(&mut data).unwrap();
    // A bad request magic ends the connection.
    s.write_all(&[0xffu8; 28]).unwrap();
    assert!(closed(&mut s));

    // A write over 32 MiB cannot be skipped: the connection is closed.
    let mut s = srv.connect();
    handshake(&mut s, "d");
    request(&mut s, 0, 1, 8, 0, (32 << 20) + 1, &[]);
    assert!(closed(&mut s));

    // A client that vanishes in the middle of a write payload.
    let mut s = srv.connect();
    handshake(&mut s, "d");
    request(&mut s, 0, 1, 9, 0, 4096, &[0x55u8; 100]);
    drop(s);

    // Random garbage at every stage.
    for seed in 0..40u64 {
        let mut s = srv.connect();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let garbage: Vec<u8> = (0..(seed * 37 % 400))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if seed % 2 == 0 {
            handshake(&mut s, "");
        }
        let _ = s.write_all(&garbage);
        drop(s);
    }

    // The server is alive and the disk is untouched.
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0 32M 1M", &srv.uri],
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&srv.root, &["--json", "ctl", "d", "stats"])).unwrap();
    assert_eq!(
        st["stats"]["write"]["ops"], 0,
        "no malformed request wrote anything"
    );
    let dir = srv._dir.path().to_path_buf();
    let (root, golden, _dir) = srv.stop();
    let exported = export(&root, &dir.join("export.raw"));
    let mut want = golden;
    want.resize(DISK_SIZE as usize, 0);
    assert!(exported == want, "malformed input changed the disk");
}

#[test]
fn control_socket_freeze_holds_io_until_thaw() {
    let srv = Server::start();
    let mut s = srv.connect();
    handshake(&mut s, "d");
    let frozen: serde_json::Value =
        serde_json::from_str(&ok(&srv.root, &["--json", "ctl", "d", "freeze"])).unwrap();
    assert_eq!(frozen["frozen"], true);
    request(&mut s, 0, 1, 42, 4096, 4096, &[0x77u8; 4096]);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut h = [0u8; 16];
    assert!(
        s.read_exact(&mut h).is_err(),
        "a write completed while the disk was frozen"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&srv.root, &["--json", "ctl", "d", "stats"])).unwrap();
    assert_eq!(st["stats"]["frozen"], true);
    assert_eq!(st["stats"]["write"]["ops"], 0);
    ok(&srv.root, &["ctl", "d", "thaw"]);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        reply(&mut s),
        (0, 42),
        "the held write completes after thaw"
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(&srv.root, &["--json", "ctl", "d", "stats"])).unwrap();
    assert_eq!(st["stats"]["write"]["ops"], 1);
    assert_eq!(st["stats"]["write"]["bytes"], 4096);
    ok(&srv.root, &["ctl", "d", "flush"]);
    let status: serde_json::Value =
        serde_json::from_str(&ok(&srv.root, &["--json", "ctl", "d", "status"])).unwrap();
    assert_eq!(
        (
            status["disk"].as_str(),
            status["frontend"].as_str(),
            status["size"].as_u64()
        ),
        (Some("d"), Some("nbd"), Some(DISK_SIZE))
    );

    // Bad control requests get error replies; the server keeps serving.
    let mut c = UnixStream::connect(srv.root.join("run/d.sock")).unwrap();
    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
    for bad in [
        "not json\n",
        "{}\n",
        "{\"cmd\": \"explode\"}\n",
        "{\"cmd\": 7}\n",
    ] {
        c.write_all(bad.as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad:?} -> {line}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let mode = std::fs::metadata(srv.root.join("run/d.sock"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "control socket must be private");
    // Wrong use of the client: exit 2.
    assert_eq!(
        stasis(&srv.root, &["ctl", "d", "explode"]).status.code(),
        Some(2)
    );
    assert_eq!(
        stasis(&srv.root, &["ctl", "nope", "status"]).status.code(),
        Some(2)
    );
    // The disk is in use while served.
    let busy = stasis(&srv.root, &["disk", "export", "d", "/tmp/never"]);
    assert_eq!(busy.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"));
    drop(s);
    let dir = srv._dir.path().to_path_buf();
    let (root, _, _dir) = srv.stop();
    let exported = export(&root, &dir.join("e.raw"));
    assert!(
        exported[4096..8192].iter().all(|&b| b == 0x77),
        "the write held by the freeze landed"
    );
    assert_eq!(
        stasis(&root, &["ctl", "d", "status"]).status.code(),
        Some(2),
        "no server: wrong use"
    );
}
