//! Helpers shared by the integration tests that drive the real binary.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `stasis --store ROOT ARGS...` with a clean environment for the store and repository.
pub fn stasis(root: &Path, args: &[&str]) -> Output {
    stasis_with(root, args, &[])
}

/// [`stasis`] with these environment variables set.
pub fn stasis_with(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(root, args, env).output().expect("run stasis")
}

/// The command [`stasis_with`] runs, for tests that spawn it.
pub fn command(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stasis"));
    c.arg("--store")
        .arg(root)
        .args(args)
        .env_remove("STASIS_STORE")
        .env_remove("STASIS_REPO")
        .env_remove("STASIS_REPO_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Like [`stasis`], asserting success; returns stdout.
pub fn ok(root: &Path, args: &[&str]) -> String {
    ok_with(root, args, &[])
}

/// [`ok`] with these environment variables set.
pub fn ok_with(root: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = stasis_with(root, args, env);
    assert!(
        out.status.success(),
        "stasis {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Like [`ok`] with `--json`, parsed.
pub fn ok_json(root: &Path, args: &[&str]) -> serde_json::Value {
    ok_json_with(root, args, &[])
}

/// [`ok_json`] with these environment variables set.
pub fn ok_json_with(root: &Path, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok_with(root, &all, env)).expect("JSON output")
}

/// `stasis disk export DISK TO`, then the exported bytes.
pub fn export_with(root: &Path, disk: &str, to: &Path, env: &[(&str, &str)]) -> Vec<u8> {
    ok_with(root, &["disk", "export", disk, s(to)], env);
    std::fs::read(to).expect("exported file")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// One raw HTTP/1.0 request (no chunked replies to decode) to `url` (`http://HOST:PORT`);
/// returns the status and the body.
pub fn http(
    url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).expect("send");
    c.write_all(body).expect("send");
    let mut out = Vec::new();
    c.read_to_end(&mut out).expect("reply");
    let status = String::from_utf8_lossy(&out[9..12])
        .parse()
        .expect("status");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers")
        + 4;
    (status, out[split..].to_vec())
}

/// Runs stasis expecting exit status `code`; returns stderr.
pub fn fails(root: &Path, args: &[&str], code: i32) -> String {
    let out = stasis(root, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stasis {args:?}: expected exit {code}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The access key the tests' served repositories use.
pub const REPO_KEY: &str = "test-access-key-0123456789abcdef";

/// A running `stasis repo serve`; killed when dropped (also when a test fails first).
pub struct RepoServer {
    pub child: std::process::Child,
    pub url: String,
    pub data: std::path::PathBuf,
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves repository `data` (its access key set to [`REPO_KEY`]) on `listen`, with `extra`
/// arguments and `env`; the server's stderr goes to `log` if given.
pub fn serve_repo(
    data: &Path,
    listen: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    log: Option<&Path>,
) -> RepoServer {
    use std::io::BufRead;
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join("access.key"), format!("{REPO_KEY}\n")).unwrap();
    let mut args = vec![
        "--json",
        "repo",
        "serve",
        "--listen",
        listen,
        "--data",
        s(data),
    ];
    args.extend_from_slice(extra);
    let mut cmd = command(&data.join("unused-store"), &args, env);
    cmd.stdout(std::process::Stdio::piped());
    if let Some(log) = log {
        cmd.stderr(std::fs::File::create(log).unwrap());
    }
    let mut child = cmd.spawn().unwrap();
    let line = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .expect("repo serve prints its address")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    RepoServer {
        child,
        url: v["url"].as_str().unwrap().to_string(),
        data: data.to_path_buf(),
    }
}

/// Opens a session of `scope` on the served repository at `url`: (session id, token).
pub fn open_session(url: &str, scope: &str) -> (String, String) {
    let (status, body) = http(
        url,
        "POST",
        "/v1/sessions",
        Some(REPO_KEY),
        format!("{{\"scope\":\"{scope}\"}}").as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        v["session"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}
