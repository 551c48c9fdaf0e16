//! Swapout of a disk while it is served, and the control socket's `swapout` request.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::{swapout, Counters, SwapError, SwapoutSummary};
use crate::control::{SwapoutHook, SwapoutRequest};
use crate::frontend::Served;
use crate::repo::RepoHandle;
use crate::store::disk::Disk;
use crate::store::Store;

/// Swaps out a disk while it is served: freezes it (I/O in flight finished, new I/O held,
/// flushed; a control `thaw` cannot interfere), swaps it out, then retires the device: the
/// held requests and every later one fail, since the disk now lives in the repository and
/// its local layers are about to go. A failed swapout thaws it instead: the disk is served
/// on, intact, and running the swapout again completes it.
pub fn swapout_served(
    store: &Store,
    disk_name: &str,
    served: &Served<Disk>,
    repo: &RepoHandle,
    manifest: &str,
    progress: &dyn Fn(&Counters),
) -> Result<SwapoutSummary, SwapError> {
    served.freeze_pinned().map_err(SwapError::Failed)?;
    match swapout(store, disk_name, served.device(), repo, manifest, progress) {
        Ok(summary) => {
            served.retire();
            Ok(summary)
        }
        Err(e) => {
            served.unpin();
            Err(e)
        }
    }
}

/// What a successful control-socket swapout leaves for the server to do once it has
/// stopped: release the disk's local layers unless `keep`.
#[derive(Clone, Copy, Debug)]
pub struct ServedSwapout {
    pub keep: bool,
}

/// The control socket's `swapout` for disk `name` served by this process: opens the
/// repository (the request's, else the store's own), swaps out, records the outcome in
/// `done`, and asks the server to stop (SIGTERM to itself, which `serve` waits for).
pub fn control_hook(
    store_root: PathBuf,
    name: String,
    served: Weak<Served<Disk>>,
    done: Arc<Mutex<Option<ServedSwapout>>>,
) -> SwapoutHook {
    // Weak: once the server stops, its disk must close (and unlock) for the release, even
    // while a control connection still holds this hook.
    Arc::new(move |req: &SwapoutRequest, events: &mut dyn FnMut(Value)| {
        let served = served.upgrade().ok_or("the server is stopping")?;
        let store = Store::open(&store_root).map_err(|e| e.to_string())?;
        let url = req
            .repo
            .clone()
            .unwrap_or_else(|| store.root().join("repo").display().to_string());
        let repo = RepoHandle::open(&url, true).map_err(|e| e.to_string())?;
        let manifest = req
            .manifest
            .clone()
            .unwrap_or_else(|| format!("{name}@{}", crate::repo::now_secs()));
        // Progress goes out at most five times a second.
        let events = RefCell::new(events);
        let last = Cell::new(Instant::now());
        let progress = |c: &Counters| {
            use std::sync::atomic::Ordering::Relaxed;
            if last.get().elapsed() < Duration::from_millis(200) {
                return;
            }
            last.set(Instant::now());
            (events.borrow_mut())(json!({
                "event": "progress",
                "bytes_scanned": c.bytes_scanned.load(Relaxed),
                "bytes_uploaded": c.bytes_uploaded.load(Relaxed),
                "chunks_present": c.chunks_present.load(Relaxed),
            }));
        };
        let summary = swapout_served(&store, &name, &served, &repo, &manifest, &progress)
            .map_err(|e| e.to_string())?;
        drop(served);
        tracing::info!(disk = %name, manifest = %manifest, "swapped out; stopping the server");
        *done.lock() = Some(ServedSwapout { keep: req.keep });
        // SAFETY: kill to our own pid; `serve` has SIGTERM blocked and waits for it.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        Ok(json!({
            "swapout": summary,
            "stopping": true,
            "release": !req.keep,
            "pid": std::process::id(),
        }))
    })
}
