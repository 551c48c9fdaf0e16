//! Device frontends: what turns a disk of the store into a device a VM or host uses.
//! Every frontend serves a [`Served`] device: the disk plus the I/O gate (freeze/thaw, used by
//! the control socket and, later, swapout) and the per-operation statistics.
//!
//! - [`nbd`]: the NBD protocol over a Unix or TCP socket (QEMU, qemu-io, nbdinfo, fio).

pub mod nbd;
pub mod ublk;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::blockdev::{BlockDevice, BlockError};

/// Holds new I/O while frozen; counts I/O in flight so a freeze can wait for it to drain.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Held by a freeze (control `freeze`, or the closing one).
    frozen: bool,
    /// Held by a swapout, apart from `frozen`: a control `thaw` cannot let writes in under
    /// it, and ending it leaves an operator's freeze as it was.
    pinned: bool,
    in_flight: u64,
    /// The server is stopping: freeze and thaw from the control socket no longer apply (a
    /// freeze then could hold the requests the frontend is waiting to finish).
    stopping: bool,
    /// The disk was swapped out (`Some(release)`: whether its local layers go): every
    /// request, held or new, fails. Data written now would be acknowledged and then lost.
    retired: Option<bool>,
}

impl GateState {
    fn holds_io(&self) -> bool {
        (self.frozen || self.pinned) && self.retired.is_none()
    }
}

struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            self.0.changed.notify_all();
        }
    }
}

impl Gate {
    fn enter(&self) -> Result<InFlight<'_>, BlockError> {
        let mut s = self.state.lock();
        while s.holds_io() {
            self.changed.wait(&mut s);
        }
        if s.retired.is_some() {
            return Err(BlockError::Storage(
                "the disk was swapped out: this server no longer serves it".into(),
            ));
        }
        s.in_flight += 1;
        Ok(InFlight(self))
    }
}

#[derive(Default)]
struct Counter {
    ops: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    fn add(&self, bytes: u64) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn snapshot(&self) -> OpStats {
        OpStats {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Why a pinned freeze (a swapout's) was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum PinError {
    /// Another swapout holds the pin, or the server is stopping: nothing was done, and the
    /// caller may ask again.
    Busy(&'static str),
    /// The flush before the swapout failed; the disk is served on, not pinned.
    Flush(String),
}

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinError::Busy(why) => f.write_str(why),
            PinError::Flush(why) => f.write_str(why),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct OpStats {
    pub ops: u64,
    pub bytes: u64,
}

/// What `stats` on the control socket reports.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub read: OpStats,
    pub write: OpStats,
    pub flush: OpStats,
    pub discard: OpStats,
    pub write_zeroes: OpStats,
    pub errors: u64,
    pub in_flight: u64,
    pub frozen: bool,
    /// Seconds since the last request completed (since serving started if none did): idleness.
    pub idle_seconds: f64,
}

/// A device being served: I/O passes through the gate and is counted.
pub struct Served<D: BlockDevice> {
    dev: D,
    gate: Gate,
    read: Counter,
    write: Counter,
    flush: Counter,
    discard: Counter,
    zeroes: Counter,
    errors: AtomicU64,
    started: Instant,
    /// Milliseconds after `started` at which the last request completed.
    last_io_ms: AtomicU64,
}

impl<D: BlockDevice> Served<D> {
    pub fn new(dev: D) -> Self {
        Served {
            dev,
            gate: Gate::default(),
            read: Counter::default(),
            write: Counter::default(),
            flush: Counter::default(),
            discard: Counter::default(),
            zeroes: Counter::default(),
            errors: AtomicU64::new(0),
            started: Instant::now(),
            last_io_ms: AtomicU64::new(0),
        }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl<D: BlockDevice> AsRef<D> for Served<D> {
    fn as_ref(&self) -> &D {
        &self.dev
    }
}

impl<D: BlockDevice> Served<D> {
    fn done<T>(
        &self,
        counter: &Counter,
        bytes: u64,
        r: Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        match &r {
            Ok(_) => counter.add(bytes),
            Err(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_io_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        r
    }

    /// Finishes the I/O in flight, holds new I/O, and flushes. Returns when the device is
    /// quiescent and durable; it stays frozen until `thaw`. Returns false if a `thaw` came
    /// while it waited for I/O to drain (the device is then not frozen).
    /// Returns false at once, without freezing, once the server is stopping.
    pub fn freeze(&self) -> Result<bool, BlockError> {
        self.freeze_inner(false)
    }

    /// The last freeze before the disk is closed: holds whatever might still come. A swapout
    /// still running is waited for (it reads the disk).
    pub fn freeze_for_close(&self) -> Result<(), BlockError> {
        self.freeze_inner(true).map(|_| ())
    }

    fn freeze_inner(&self, closing: bool) -> Result<bool, BlockError> {
        let still_frozen = {
            let mut s = self.gate.state.lock();
            if s.stopping && !closing {
                return Ok(false);
            }
            s.frozen = true;
            while s.frozen && (s.in_flight > 0 || closing && s.pinned) {
                self.gate.changed.wait(&mut s);
            }
            s.frozen
        };
        self.dev.flush()?;
        Ok(still_frozen)
    }

    /// Holds I/O for an operation that must see the disk still while it reads it (swapout):
    /// like `freeze`, but a control `thaw` cannot release it; it ends with `unpin` or
    /// `retire`. Refused while another holds the pin or the server is stopping (busy).
    pub fn freeze_pinned(&self) -> Result<(), PinError> {
        {
            let mut s = self.gate.state.lock();
            if s.pinned {
                return Err(PinError::Busy("a swapout of this disk is already running"));
            }
            if s.stopping {
                return Err(PinError::Busy("the server is stopping"));
            }
            s.pinned = true;
            while s.in_flight > 0 {
                self.gate.changed.wait(&mut s);
            }
        }
        self.dev.flush().map_err(|e| {
            self.unpin();
            PinError::Flush(format!("flush before swapout failed: {e}"))
        })
    }

    /// Ends a pinned freeze without retiring: I/O flows again, unless an operator's freeze
    /// still holds it.
    pub fn unpin(&self) {
        let mut s = self.gate.state.lock();
        s.pinned = false;
        self.gate.changed.notify_all();
    }

    /// Releases what a control freeze holds (no effect once the server is stopping; a
    /// swapout's pin stays).
    pub fn thaw(&self) {
        let mut s = self.gate.state.lock();
        if !s.stopping {
            s.frozen = false;
            self.gate.changed.notify_all();
        }
    }

    /// The server is stopping: releases what a control freeze holds, so the frontend can
    /// finish its requests, and ignores freeze and thaw from now on. A swapout's pin stays:
    /// the held requests wait for its end (they fail if it retires the disk, and go on if
    /// it fails), so none lands while the swapout reads the disk.
    pub fn begin_stop(&self) {
        let mut s = self.gate.state.lock();
        s.stopping = true;
        s.frozen = false;
        self.gate.changed.notify_all();
    }

    /// The disk has been swapped out (it was pinned, so nothing is in flight): every request
    /// held, and every later one, fails instead of reaching layers about to be released.
    /// `release`: whether the server removes the disk once closed. Implies `begin_stop`.
    pub fn retire(&self, release: bool) {
        let mut s = self.gate.state.lock();
        s.retired = Some(release);
        s.pinned = false;
        s.stopping = true;
        self.gate.changed.notify_all();
    }

    /// `Some(release)` once the disk was swapped out.
    pub fn retired(&self) -> Option<bool> {
        self.gate.state.lock().retired
    }

    /// Whether I/O is held (by a freeze or a swapout).
    pub fn is_frozen(&self) -> bool {
        self.gate.state.lock().holds_io()
    }

    pub fn stats(&self) -> Stats {
        let (in_flight, frozen) = {
            let s = self.gate.state.lock();
            (s.in_flight, s.holds_io())
        };
        let now_ms = self.started.elapsed().as_millis() as u64;
        Stats {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            discard: self.discard.snapshot(),
            write_zeroes: self.zeroes.snapshot(),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight,
            frozen,
            idle_seconds: now_ms.saturating_sub(self.last_io_ms.load(Ordering::Relaxed)) as f64
                / 1000.0,
        }
    }
}

impl<D: BlockDevice> BlockDevice for Served<D> {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let _io = self.gate.enter().inspect_err(|_| self.count_error())?;
        let r = self.dev.read_at(offset, buf);
        self.done(&self.read, buf.len() as u64, r)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        let _io = self.gate.enter().inspect_err(|_| self.count_error())?;
        let r = self.dev.write_at(offset, data, fua);
        self.done(&self.write, data.len() as u64, r)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let _io = self.gate.enter().inspect_err(|_| self.count_error())?;
        let r = self.dev.write_zeroes(offset, len, fua);
        self.done(&self.zeroes, len, r)
    }

    fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let _io = self.gate.enter().inspect_err(|_| self.count_error())?;
        let r = self.dev.discard(offset, len, fua);
        self.done(&self.discard, len, r)
    }

    fn flush(&self) -> Result<(), BlockError> {
        let _io = self.gate.enter().inspect_err(|_| self.count_error())?;
        let r = self.dev.flush();
        self.done(&self.flush, 0, r)
    }
}

/// Binds a Unix socket at `path`. A socket file left there by a crashed server is replaced;
/// a live server (something answers) or a file that is not a socket is an error.
pub(crate) fn bind_unix(
    path: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a file that is not a socket is there",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::new(
                ErrorKind::AddrInUse,
                "another server is listening there",
            ));
        }
        std::fs::remove_file(path)?;
    }
    std::os::unix::net::UnixListener::bind(path)
}

/// Waits up to `ms` for `fd` to become readable (a listener: a client to accept), so that
/// accept loops notice a stop request.
pub(crate) fn wait_readable(fd: std::os::unix::io::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Wall-clock seconds, for status replies.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// A device whose reads wait until the test lets them go.
    struct Held(Mutex<Option<mpsc::Receiver<()>>>);

    impl BlockDevice for Held {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> Result<(), BlockError> {
            if let Some(rx) = self.0.lock().take() {
                let _ = rx.recv();
            }
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8], _: bool) -> Result<(), BlockError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
    }

    fn wait_until(cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("condition not reached");
    }

    type Joined<T> = std::thread::JoinHandle<Result<T, BlockError>>;

    /// A read held inside the device, and a freeze started behind it (frozen, draining).
    fn read_in_flight_then_freeze() -> (
        mpsc::Sender<()>,
        Arc<Served<Held>>,
        Joined<()>,
        Joined<bool>,
    ) {
        let (release, rx) = mpsc::channel();
        let dev = Arc::new(Served::new(Held(Mutex::new(Some(rx)))));
        let reader = {
            let d = dev.clone();
            std::thread::spawn(move || d.read_at(0, &mut [0u8; 512]))
        };
        wait_until(|| dev.stats().in_flight == 1);
        let freezer = {
            let d = dev.clone();
            std::thread::spawn(move || d.freeze())
        };
        wait_until(|| dev.is_frozen());
        (release, dev, reader, freezer)
    }

    #[test]
    fn once_stopping_a_control_freeze_holds_nothing_but_the_closing_freeze_does() {
        let (release, dev, reader, freezer) = read_in_flight_then_freeze();
        // Stopping releases the freeze a control client made...
        dev.begin_stop();
        assert!(!dev.is_frozen());
        // ...and a late one (a control client still connected) neither freezes nor thaws.
        assert!(!dev.freeze().unwrap());
        release.send(()).unwrap();
        assert!(reader.join().unwrap().is_ok());
        let _ = freezer.join().unwrap();
        dev.freeze_for_close().unwrap();
        dev.thaw();
        assert!(dev.is_frozen(), "a thaw undid the closing freeze");
    }

    #[test]
    fn freeze_waits_for_in_flight_io_and_holds_new_io_until_thaw() {
        let (release, dev, reader, freezer) = read_in_flight_then_freeze();
        // New I/O is held while frozen.
        let late = {
            let d = dev.clone();
            std::thread::spawn(move || d.write_at(0, &[1u8; 512], false))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!freezer.is_finished(), "freeze returned with I/O in flight");
        release.send(()).unwrap();
        assert!(reader.join().unwrap().is_ok());
        assert_eq!(
            freezer.join().unwrap().unwrap(),
            true,
            "frozen once drained"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!late.is_finished(), "a write passed a frozen gate");
        dev.thaw();
        assert!(late.join().unwrap().is_ok());
        assert_eq!(dev.stats().write.ops, 1);
    }

    #[test]
    fn a_thaw_during_the_drain_makes_the_freeze_report_not_frozen() {
        let (release, dev, reader, freezer) = read_in_flight_then_freeze();
        dev.thaw();
        assert_eq!(
            freezer.join().unwrap().unwrap(),
            false,
            "the freeze must not claim a frozen disk"
        );
        release.send(()).unwrap();
        assert!(reader.join().unwrap().is_ok());
        assert!(!dev.is_frozen());
    }

    #[test]
    fn a_swapout_pin_survives_thaw_and_stop_keeps_an_operator_freeze_and_retires_held_io() {
        let dev = Arc::new(Served::new(Held(Mutex::new(None))));
        dev.freeze_pinned().unwrap();
        assert!(dev.freeze_pinned().is_err(), "a second swapout got the pin");
        // A control thaw does not let writes in under the pin.
        dev.thaw();
        let held = {
            let d = dev.clone();
            std::thread::spawn(move || d.write_at(0, &[1u8; 512], false))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!held.is_finished(), "a write passed a pinned gate");
        // An operator's freeze made meanwhile outlives the pin.
        assert!(dev.freeze().unwrap());
        dev.unpin();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!held.is_finished(), "unpin dropped the operator's freeze");
        dev.thaw();
        assert!(held.join().unwrap().is_ok());
        // Stopping during a swapout: the closing freeze waits for it; a retired disk fails
        // what was held and says whether to release it.
        dev.freeze_pinned().unwrap();
        dev.begin_stop();
        let late = {
            let d = dev.clone();
            std::thread::spawn(move || d.write_at(0, &[2u8; 512], false))
        };
        let closer = {
            let d = dev.clone();
            std::thread::spawn(move || d.freeze_for_close())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!late.is_finished() && !closer.is_finished());
        dev.retire(true);
        assert!(
            late.join().unwrap().is_err(),
            "a write landed on a retired disk"
        );
        assert!(closer.join().unwrap().is_ok());
        assert_eq!(dev.retired(), Some(true));
        assert_eq!(dev.stats().write.ops, 1);
    }
}
