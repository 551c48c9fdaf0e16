//! A small QMP client (QEMU Machine Protocol: JSON lines over a Unix socket). Events that
//! arrive between a command and its reply are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::HvError;

pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (waiting up to `wait` for the socket to appear), reads the greeting and
    /// leaves capability negotiation mode.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, HvError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!("qmp connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(HvError::io(format!("QMP socket {}", path.display()), e)),
            }
        };
        let io = |e| HvError::io(format!("QMP socket {}", path.display()), e);
        // A save of a large guest takes a while, but no single reply should take minutes.
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_line()?;
        if greeting.get("QMP").is_none() {
            return Err(HvError::Protocol(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_line(&mut self) -> Result<Value, HvError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| HvError::io(format!("QMP socket {}", self.path.display()), e))?;
        if n == 0 {
            return Err(HvError::Protocol("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| HvError::Protocol(format!("bad QMP line {line:?}: {e}")))
    }

    /// Runs `command` with `arguments` (an object) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, HvError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| HvError::io(format!("QMP socket {}", self.path.display()), e))?;
        loop {
            let v = self.read_line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(HvError::Qmp {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
            // An event ({"event": ...}): not ours.
        }
    }
}
