//! Swapout of a disk while it is served, and the control socket's `swapout` request.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// its local layers are about to go (`release`: the server removes the disk once it is
/// closed). A failed swapout thaws it instead: the disk is served
/// on, intact, and running the swapout again completes it.
pub fn swapout_served(
    store: &Store,
    disk_name: &str,
    served: &Served<Disk>,
    repo: &RepoHandle,
    manifest: &str,
    release: bool,
    progress: &dyn Fn(&Counters),
) -> Result<SwapoutSummary, SwapError> {
    served.freeze_pinned().map_err(SwapError::Failed)?;
    match swapout(store, disk_name, served.device(), repo, manifest, progress) {
        Ok(summary) => {
            served.retire(release);
            Ok(summary)
        }
        Err(e) => {
            served.unpin();
            Err(e)
        }
    }
}

/// The control socket's `swapout` for disk `name` served by this process: opens the
/// repository (the request's, else the store's own), swaps out (the device retires, and
/// says whether to release the disk), and asks the server to stop (SIGTERM to itself,
/// which `serve` waits for).
pub fn control_hook(store_root: PathBuf, name: String, served: Arc<Served<Disk>>) -> SwapoutHook {
    Arc::new(move |req: &SwapoutRequest, events: &mut dyn FnMut(Value)| {
        let store = Store::open(&store_root).map_err(|e| e.to_string())?;
        let url = req
            .repo
            .clone()
            .unwrap_or_else(|| store.root().join("repo").display().to_string());
        let repo = RepoHandle::open_with_key(&url, true, req.repo_key.as_deref())
            .map_err(|e| e.to_string())?;
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
        let summary = swapout_served(
            &store, &name, &served, &repo, &manifest, !req.keep, &progress,
        )
        .map_err(|e| e.to_string())?;
        tracing::info!(disk = %name, manifest = %manifest, "swapped out; stopping the server");
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
