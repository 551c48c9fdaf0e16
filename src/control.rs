//! The per-disk control socket: how operators, and later swapout, talk to a served disk.
//!
//! A Unix socket (mode 0600) at `<store>/run/<disk>.sock`; one JSON object per line each way
//! (kernel-notes/control.md). Requests: `{"cmd": "status" | "stats" | "flush" | "freeze" |
//! "thaw"}`. Replies: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. A bad request
//! gets an error reply; the device keeps serving.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::blockdev::BlockDevice;
use crate::frontend::Served;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no server for disk '{disk}' ({}: {source})", path.display())]
    NotServed {
        disk: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Protocol(String),
}

/// What `status` reports besides the live state.
#[derive(Clone, Debug)]
pub struct ServeInfo {
    pub disk: String,
    pub frontend: String,
    pub address: String,
    pub started_at: u64,
}

pub struct ControlServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn start<D: BlockDevice + 'static>(
        path: &Path,
        dev: Arc<Served<D>>,
        info: ServeInfo,
    ) -> Result<ControlServer, ControlError> {
        let io_err = |e| ControlError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let listener = crate::frontend::bind_unix(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if !crate::frontend::wait_readable(listener.as_raw_fd(), 100) {
                        continue;
                    }
                    let Ok((stream, _)) = listener.accept() else {
                        continue;
                    };
                    let (dev, info) = (dev.clone(), info.clone());
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(stream, &dev, &info) {
                                tracing::debug!("control: client: {e}");
                            }
                        });
                }
            })
            .map_err(io_err)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client<D: BlockDevice>(
    stream: UnixStream,
    dev: &Served<D>,
    info: &ServeInfo,
) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            handle(&line, dev, info)
        };
        let mut text = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        text.push(b'\n');
        out.write_all(&text)?;
        if line.len() > MAX_LINE {
            return Ok(());
        }
    }
}

fn handle<D: BlockDevice>(line: &[u8], dev: &Served<D>, info: &ServeInfo) -> Value {
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("not JSON: {e}")}),
    };
    let Some(cmd) = request.get("cmd").and_then(Value::as_str) else {
        return json!({"ok": false, "error": "missing \"cmd\""});
    };
    match cmd {
        "status" => json!({
            "ok": true,
            "disk": info.disk,
            "frontend": info.frontend,
            "address": info.address,
            "size": dev.size(),
            "frozen": dev.is_frozen(),
            "pid": std::process::id(),
            "uptime_seconds": crate::frontend::unix_now().saturating_sub(info.started_at),
        }),
        "stats" => json!({"ok": true, "stats": dev.stats()}),
        "flush" => match BlockDevice::flush(dev.device()) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        "freeze" => match dev.freeze() {
            Ok(true) => json!({"ok": true, "frozen": true}),
            Ok(false) => {
                json!({"ok": false, "error": "not frozen: a thaw arrived while the freeze waited for I/O to drain, or the server is stopping"})
            }
            Err(e) => {
                dev.thaw();
                json!({"ok": false, "error": format!("flush during freeze failed: {e}")})
            }
        },
        "thaw" => {
            dev.thaw();
            json!({"ok": true, "frozen": false})
        }
        other => {
            json!({"ok": false, "error": format!("unknown command '{other}' (status, stats, flush, freeze, thaw)")})
        }
    }
}

/// Sends one command to the server of `disk` and returns its reply.
pub fn request(path: &Path, disk: &str, cmd: &str) -> Result<Value, ControlError> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotServed {
            disk: disk.into(),
            path: path.into(),
            source: e,
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let io_err = |e| ControlError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    // A freeze waits for I/O in flight; give it time, but not forever.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io_err)?;
    let mut out = stream.try_clone().map_err(io_err)?;
    let mut line = serde_json::to_vec(&json!({"cmd": cmd}))
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    out.write_all(&line).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    serde_json::from_str(&reply)
        .map_err(|e| ControlError::Protocol(format!("bad reply {reply:?}: {e}")))
}
