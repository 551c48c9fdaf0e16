//! NBD server: serves one disk over a Unix or TCP socket to QEMU, qemu-io, nbdinfo, nbdcopy
//! and `fio --ioengine=nbd`.
//!
//! One thread per connection reads requests; a small pool of workers per connection carries
//! them out in parallel and replies (out of order, as the protocol allows) under a write lock.
//! Every connection serves the same device, and a FLUSH syncs the whole write layer, so a
//! FLUSH on one connection covers writes completed on all of them: CAN_MULTI_CONN is honest.
//! Malformed input gets the protocol's error reply or a closed connection and a log line,
//! never a panic and never a change to the disk.

pub mod proto;

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::blockdev::{BlockDevice, BlockError};
use proto::*;

/// Worker threads per connection (requests carried out in parallel).
const WORKERS_PER_CONNECTION: usize = 4;
/// Requests read ahead of the workers per connection.
const QUEUE_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("invalid listen address '{0}': use unix:PATH or tcp:HOST:PORT")]
    BadAddress(String),
}

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, NbdError> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:").filter(|a| a.contains(':')) {
            Ok(Listen::Tcp(a.to_string()))
        } else {
            Err(NbdError::BadAddress(s.to_string()))
        }
    }
}

/// A connected socket of either kind.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(NetShutdown::Both),
            Conn::Tcp(s) => s.shutdown(NetShutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The open connections and the threads serving them (joined at stop).
type Connections = Mutex<Vec<(Conn, Option<JoinHandle<()>>)>>;

/// A running NBD server. `stop` (or drop) closes the listener and every connection, after
/// the requests in flight have been carried out.
pub struct NbdServer {
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    conns: Arc<Connections>,
    pub uri: String,
    pub connections_served: Arc<AtomicU64>,
}

/// Transmission flags we advertise.
const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN
    | TFLAG_SEND_CACHE;

impl NbdServer {
    /// Starts serving `dev` as export `name` (the empty name is accepted as the default export).
    pub fn start<D: BlockDevice + 'static>(
        listen: &Listen,
        name: &str,
        dev: Arc<D>,
    ) -> Result<NbdServer, NbdError> {
        let (listener, uri) = match listen {
            Listen::Unix(path) => {
                let l = super::bind_unix(path).map_err(|e| NbdError::Io {
                    what: format!("listen on {}", path.display()),
                    source: e,
                })?;
                (
                    Listener::Unix(l, path.clone()),
                    format!("nbd+unix:///{name}?socket={}", path.display()),
                )
            }
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(|e| NbdError::Io {
                    what: format!("listen on {addr}"),
                    source: e,
                })?;
                let local = l.local_addr().map_err(|e| NbdError::Io {
                    what: "local address".into(),
                    source: e,
                })?;
                (Listener::Tcp(l), format!("nbd://{local}/{name}"))
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let conns: Arc<Connections> = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicU64::new(0));
        let name = name.to_string();
        let accept_thread = {
            let (stopping, conns, served) = (stopping.clone(), conns.clone(), served.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(listener, &name, dev, &stopping, &conns, &served))
                .map_err(|e| NbdError::Io {
                    what: "spawn accept thread".into(),
                    source: e,
                })?
        };
        Ok(NbdServer {
            stopping,
            accept_thread: Some(accept_thread),
            conns,
            uri,
            connections_served: served,
        })
    }

    /// Stops accepting, lets requests in flight finish, closes every connection.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock());
        for (conn, _) in &conns {
            // Readers see end of file; workers finish what they hold; the thread exits.
            conn.shutdown();
        }
        for (_, thread) in conns {
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop<D: BlockDevice + 'static>(
    listener: Listener,
    name: &str,
    dev: Arc<D>,
    stopping: &AtomicBool,
    conns: &Connections,
    served: &AtomicU64,
) {
    while !stopping.load(Ordering::SeqCst) {
        if !super::wait_readable(listener.fd(), 100) {
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("nbd: accept: {e}");
                continue;
            }
        };
        let id = served.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(keep) = conn.try_clone() else { continue };
        let (dev, name) = (dev.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || match serve_connection(conn, &name, dev) {
                Ok(()) => tracing::debug!(conn = id, "nbd: connection closed"),
                Err(e) => tracing::warn!(conn = id, "nbd: connection ended: {e}"),
            });
        let mut list = conns.lock();
        // Forget connections that have ended.
        list.retain(|(_, t)| t.as_ref().is_some_and(|t| !t.is_finished()));
        list.push((keep, thread.ok()));
    }
}

fn io_err(what: &str) -> impl Fn(io::Error) -> NbdError + '_ {
    move |e| NbdError::Io {
        what: what.to_string(),
        source: e,
    }
}

/// The handshake; Ok when the client enters transmission.
fn handshake<D: BlockDevice>(conn: &mut Conn, name: &str, dev: &D) -> Result<(), NbdError> {
    conn.write_all(&server_greeting())
        .map_err(io_err("send greeting"))?;
    let mut flags = [0u8; 4];
    conn.read_exact(&mut flags)
        .map_err(io_err("read client flags"))?;
    let client_flags = parse_client_flags(flags).map_err(|e| NbdError::Io {
        what: "handshake".into(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let known = |export: &str| export.is_empty() || export == name;
    loop {
        let mut hdr = [0u8; 16];
        conn.read_exact(&mut hdr).map_err(io_err("read option"))?;
        let (option, len) = parse_option_header(hdr).map_err(|e| NbdError::Io {
            what: "option".into(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)
            .map_err(io_err("read option data"))?;
        let reply = |conn: &mut Conn, kind: u32, payload: &[u8]| -> Result<(), NbdError> {
            conn.write_all(&option_reply(option, kind, payload))
                .map_err(io_err("send option reply"))
        };
        match option {
            OPT_EXPORT_NAME => {
                let export = String::from_utf8_lossy(&data).to_string();
                if !known(&export) {
                    // This option has no error reply: the protocol says to close.
                    return Err(NbdError::Io {
                        what: format!("export '{export}'"),
                        source: io::Error::new(io::ErrorKind::NotFound, "no such export"),
                    });
                }
                conn.write_all(&export_name_reply(
                    dev.size(),
                    TRANSMISSION_FLAGS,
                    no_zeroes,
                ))
                .map_err(io_err("send export"))?;
                return Ok(());
            }
            OPT_ABORT => {
                let _ = reply(conn, REP_ACK, &[]);
                return Err(NbdError::Io {
                    what: "handshake".into(),
                    source: io::Error::new(io::ErrorKind::ConnectionAborted, "client aborted"),
                });
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(conn, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                reply(conn, REP_SERVER, &list_entry(name))?;
                reply(conn, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let (export, infos) = match parse_info_request(&data) {
                    Ok(v) => v,
                    Err(_) => {
                        reply(conn, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                        continue;
                    }
                };
                if !known(&export) {
                    reply(
                        conn,
                        REP_ERR_UNKNOWN,
                        format!("no export named '{export}'").as_bytes(),
                    )?;
                    continue;
                }
                reply(conn, REP_INFO, &info_export(dev.size(), TRANSMISSION_FLAGS))?;
                if infos.contains(&INFO_BLOCK_SIZE) {
                    reply(
                        conn,
                        REP_INFO,
                        &info_block_size(1, crate::store::BLOCK_SIZE as u32, MAX_PAYLOAD),
                    )?;
                }
                reply(conn, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(());
                }
            }
            _ => reply(conn, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Buffers handed back and forth between a connection's reader and its workers: a fresh
/// large allocation costs an mmap, page faults and zeroing per request.
#[derive(Default)]
struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// A buffer of exactly `len` bytes (content unspecified: the caller overwrites it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.0.lock().pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        let mut pool = self.0.lock();
        if pool.len() < QUEUE_DEPTH + WORKERS_PER_CONNECTION {
            pool.push(b);
        }
    }
}

fn serve_connection<D: BlockDevice + 'static>(
    mut conn: Conn,
    name: &str,
    dev: Arc<D>,
) -> Result<(), NbdError> {
    // The accept loop keeps a handle to every socket (to close them on stop), so dropping
    // ours would not close it: shut it down explicitly however the connection ends.
    let result = transmit(&mut conn, name, dev);
    conn.shutdown();
    result
}

fn transmit<D: BlockDevice + 'static>(
    conn: &mut Conn,
    name: &str,
    dev: Arc<D>,
) -> Result<(), NbdError> {
    handshake(conn, name, &*dev)?;
    let writer = Arc::new(Mutex::new(
        conn.try_clone().map_err(io_err("clone socket"))?,
    ));
    let (tx, rx) = sync_channel::<Job>(QUEUE_DEPTH);
    let rx = Arc::new(Mutex::new(rx));
    let pool = Arc::new(BufferPool::default());
    let workers: Vec<JoinHandle<()>> = (0..WORKERS_PER_CONNECTION)
        .filter_map(|i| {
            let (rx, writer, dev, pool) = (rx.clone(), writer.clone(), dev.clone(), pool.clone());
            std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn(move || worker(&rx, &writer, &*dev, &pool))
                .ok()
        })
        .collect();
    let result = read_requests(conn, &tx, &pool);
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    result
}

/// Reads requests until the client disconnects; hands them to the workers.
fn read_requests(
    conn: &mut Conn,
    tx: &std::sync::mpsc::SyncSender<Job>,
    pool: &BufferPool,
) -> Result<(), NbdError> {
    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        match conn.read_exact(&mut hdr) {
            Ok(()) => {}
            // The client closed the socket (or we are stopping): a normal end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                return Err(NbdError::Io {
                    what: "read request".into(),
                    source: e,
                })
            }
        }
        let req = parse_request(&hdr).map_err(|e| NbdError::Io {
            what: "request".into(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if req.command == CMD_DISC {
            return Ok(());
        }
        let len = req.payload_len() as usize;
        let mut payload = if len == 0 { Vec::new() } else { pool.take(len) };
        conn.read_exact(&mut payload)
            .map_err(io_err("read write payload (client vanished mid-request?)"))?;
        if tx.send(Job { req, payload }).is_err() {
            return Ok(());
        }
    }
}

fn worker<D: BlockDevice>(
    rx: &Mutex<Receiver<Job>>,
    writer: &Mutex<Conn>,
    dev: &D,
    pool: &BufferPool,
) {
    // Reply header and read data go out in one buffer: one write under the lock.
    let mut out: Vec<u8> = Vec::new();
    loop {
        let job = match rx.lock().recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let error = execute(dev, &job, &mut out);
        out[..16].copy_from_slice(&simple_reply(error, job.req.cookie));
        let reply_len = match (error, job.req.command) {
            (0, CMD_READ) => 16 + job.req.length as usize,
            _ => 16,
        };
        if job.payload.capacity() > 0 {
            pool.give(job.payload);
        }
        if let Err(e) = writer.lock().write_all(&out[..reply_len]) {
            tracing::debug!("nbd: reply not delivered: {e}");
        }
    }
}

/// The reply's error code; the protocol asks for ENOSPC on writes past the end.
fn errno_of(e: &BlockError, write: bool) -> u32 {
    match e {
        BlockError::OutOfRange { .. } if write => ENOSPC,
        BlockError::Storage(err) => {
            tracing::error!("nbd: I/O error: {err}");
            EIO
        }
        other => other.errno() as u32,
    }
}

/// Carries out one request; returns the error code. `out` (reused, never shrunk) is left
/// holding room for the reply header (16 bytes) followed, for a successful read, by the data.
fn execute<D: BlockDevice>(dev: &D, job: &Job, out: &mut Vec<u8>) -> u32 {
    if out.len() < 16 {
        out.resize(16, 0);
    }
    let r = job.req;
    let fua = r.flags & CMD_FLAG_FUA != 0;
    // FUA is advertised, so it is accepted on every command (a no-op where it means nothing;
    // older QEMU sets it on FLUSH).
    let allowed_flags = match r.command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if r.flags & !allowed_flags != 0 {
        return EINVAL;
    }
    let result = match r.command {
        CMD_READ => {
            if r.length > MAX_PAYLOAD {
                return EINVAL;
            }
            // Only a read needs more than the header: the buffer grows to the largest read
            // seen (zero-filling only the growth) and the read overwrites what it uses.
            let end = 16 + r.length as usize;
            if out.len() < end {
                out.resize(end, 0);
            }
            dev.read_at(r.offset, &mut out[16..end])
                .map_err(|e| errno_of(&e, false))
        }
        CMD_WRITE => dev
            .write_at(r.offset, &job.payload, fua)
            .map_err(|e| errno_of(&e, true)),
        CMD_FLUSH => dev.flush().map_err(|e| errno_of(&e, false)),
        CMD_TRIM => dev
            .discard(r.offset, r.length as u64, fua)
            .map_err(|e| errno_of(&e, true)),
        CMD_WRITE_ZEROES => dev
            .write_zeroes(r.offset, r.length as u64, fua)
            .map_err(|e| errno_of(&e, true)),
        CMD_CACHE => crate::blockdev::check_range(r.offset, r.length as u64, dev.size())
            .map_err(|e| errno_of(&e, false)),
        other => {
            tracing::warn!("nbd: unknown command {other}");
            Err(EINVAL)
        }
    };
    match result {
        Ok(()) => 0,
        Err(code) => code,
    }
}
