//! The per-disk control socket: how operators, and later swapout, talk to a served disk.
//!
//! A Unix socket (mode 0600) at `<store>/run/<disk>.sock`; one JSON object per line each way
//! (kernel-notes/control.md). Requests: `{"cmd": "status" | "stats" | "flush" | "freeze" |
//! "thaw" | "swapout"}`. Replies: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. A bad request
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

/// A `swapout` request: `{"cmd":"swapout", "repo": URL?, "manifest": NAME?, "keep": bool?,
/// "disk_only": bool?, "progress": bool?}` (kernel-notes/control.md section 3.6).
#[derive(Clone, Debug, Default)]
pub struct SwapoutRequest {
    pub repo: Option<String>,
    /// The access key of a served repository (the client's `STASIS_REPO_KEY`: the server
    /// process may not have it). The socket is the user's own (mode 0600).
    pub repo_key: Option<String>,
    pub manifest: Option<String>,
    pub keep: bool,
    /// Swap out the disk alone even if it is a VM's (the VM swapout's own request). Without
    /// it, a request for a VM's disk swaps out the whole VM.
    pub disk_only: bool,
}

/// Carries out a swapout of the served disk for the control socket. It gets the request
/// and a sink for progress events, and returns the reply's fields (or the error's text).
/// The serving side installs it: the control socket knows nothing of repositories.
pub type SwapoutHook =
    Arc<dyn Fn(&SwapoutRequest, &mut dyn FnMut(Value)) -> Result<Value, HookError> + Send + Sync>;

/// Why a `swapout` request failed, as its reply says it: `{"ok": false, "error": ..., and
/// "busy": true when the disk is busy with another swapout or its server is stopping (ask
/// again later; nothing was done)}`.
#[derive(Debug)]
pub struct HookError {
    pub error: String,
    pub busy: bool,
}

impl From<String> for HookError {
    fn from(error: String) -> Self {
        HookError { error, busy: false }
    }
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
        swapout: Option<SwapoutHook>,
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
                // The clients' streams, to end them at stop: a stopped server keeps no
                // reference to the disk (it is closed, and maybe released, next).
                let mut clients: Vec<(UnixStream, JoinHandle<()>)> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    clients.retain(|(_, t)| !t.is_finished());
                    if !crate::frontend::wait_readable(listener.as_raw_fd(), 100) {
                        continue;
                    }
                    let Ok((stream, _)) = listener.accept() else {
                        continue;
                    };
                    let Ok(handle) = stream.try_clone() else {
                        continue;
                    };
                    let (dev, info, swapout) = (dev.clone(), info.clone(), swapout.clone());
                    if let Ok(t) = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(stream, &dev, &info, swapout.as_ref()) {
                                tracing::debug!("control: client: {e}");
                            }
                        })
                    {
                        clients.push((handle, t));
                    }
                }
                // Only the reading side: a request being handled (a swapout) still finishes
                // and sends its reply; then the client's next read sees the end.
                for (stream, t) in clients {
                    let _ = stream.shutdown(std::net::Shutdown::Read);
                    let _ = t.join();
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
    swapout: Option<&SwapoutHook>,
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
        // Progress events of a long request go out as they come; a client that went away
        // does not stop the request (a swapout runs to its end either way).
        let mut event_sink = |event: Value| {
            let _ = write_line(&mut out, &event);
        };
        let reply = if line.len() > MAX_LINE {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            handle(&line, dev, info, swapout, &mut event_sink)
        };
        write_line(&mut out, &reply)?;
        if line.len() > MAX_LINE {
            return Ok(());
        }
    }
}

fn write_line(out: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut text = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    text.push(b'\n');
    out.write_all(&text)
}

fn handle<D: BlockDevice>(
    line: &[u8],
    dev: &Served<D>,
    info: &ServeInfo,
    swapout: Option<&SwapoutHook>,
    events: &mut dyn FnMut(Value),
) -> Value {
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
        "swapout" => {
            let Some(hook) = swapout else {
                return json!({"ok": false, "error": "this server cannot swap its disk out"});
            };
            let req = match parse_swapout(&request) {
                Ok(r) => r,
                Err(e) => return json!({"ok": false, "error": e}),
            };
            let wants_progress = request.get("progress").and_then(Value::as_bool) == Some(true);
            let mut sink = |e: Value| {
                if wants_progress {
                    events(e)
                }
            };
            match hook(&req, &mut sink) {
                Ok(mut fields) => {
                    fields["ok"] = json!(true);
                    fields
                }
                Err(HookError { error, busy: true }) => {
                    json!({"ok": false, "error": error, "busy": true})
                }
                Err(HookError { error, .. }) => json!({"ok": false, "error": error}),
            }
        }
        other => {
            json!({"ok": false, "error": format!("unknown command '{other}' (status, stats, flush, freeze, thaw, swapout)")})
        }
    }
}

fn parse_swapout(request: &Value) -> Result<SwapoutRequest, String> {
    let text = |key: &str| -> Result<Option<String>, String> {
        match request.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(format!("\"{key}\" must be a non-empty string")),
        }
    };
    let flag = |key: &str| -> Result<bool, String> {
        match request.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("\"{key}\" must be true or false")),
        }
    };
    Ok(SwapoutRequest {
        repo: text("repo")?,
        repo_key: text("repo_key")?,
        manifest: text("manifest")?,
        keep: flag("keep")?,
        disk_only: flag("disk_only")?,
    })
}

/// Sends one command to the server of `disk` and returns its reply.
pub fn request(path: &Path, disk: &str, cmd: &str) -> Result<Value, ControlError> {
    request_with(
        path,
        disk,
        &json!({"cmd": cmd}),
        Some(Duration::from_secs(120)),
        &mut |_| {},
    )
}

/// Sends `request` to the server of `disk`; lines carrying an `"event"` member before the
/// reply go to `on_event`. `timeout` bounds each wait for a line (None: wait as long as the
/// server works, for a swapout).
pub fn request_with(
    path: &Path,
    disk: &str,
    request: &Value,
    timeout: Option<Duration>,
    on_event: &mut dyn FnMut(&Value),
) -> Result<Value, ControlError> {
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
    stream.set_read_timeout(timeout).map_err(io_err)?;
    let mut out = stream.try_clone().map_err(io_err)?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    out.write_all(&line).map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut text = String::new();
        if reader.read_line(&mut text).map_err(io_err)? == 0 {
            return Err(ControlError::Protocol(
                "the server closed the connection without a reply".into(),
            ));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ControlError::Protocol(format!("bad reply {text:?}: {e}")))?;
        if v.get("event").is_some() {
            on_event(&v);
            continue;
        }
        return Ok(v);
    }
}
