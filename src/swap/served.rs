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
    served.freeze_pinned().map_err(|e| match e {
        crate::frontend::PinError::Busy(why) => SwapError::Busy(why.to_string()),
        crate::frontend::PinError::Flush(why) => SwapError::Failed(why),
    })?;
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
        // The disk of a VM: the whole VM goes (its memory with it), by a `stasis vm swapout`
        // of its own, which asks us for the disk (disk_only) in turn. It runs detached: this
        // server stops during it, and must not wait for it.
        if !req.disk_only {
            if let Some(vm) = crate::vm::owner_of_disk(&store, &name).map_err(|e| e.to_string())? {
                if crate::vm::is_locked(&store, &vm) {
                    return Err(crate::control::HookError {
                        error: format!("VM {vm} is busy: a swapout of it is already running"),
                        busy: true,
                    });
                }
                if req.keep || req.manifest.is_some() {
                    return Err(format!(
                        "disk {name} is the disk of VM {vm}: its swapout is the VM's, which \
                         takes neither \"keep\" nor \"manifest\""
                    )
                    .into());
                }
                let (pid, log) = crate::vm::spawn_swapout(
                    &store,
                    &vm,
                    req.repo.as_deref(),
                    req.repo_key.as_deref(),
                )
                .map_err(|e| e.to_string())?;
                return Ok(json!({"vm": vm, "vm_swapout_pid": pid, "log": log}));
            }
        }
        let url = match req.repo.clone() {
            Some(url) => url,
            None => store.default_repo().map_err(|e| e.to_string())?,
        };
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
        .map_err(|e| crate::control::HookError {
            busy: matches!(e, SwapError::Busy(_)),
            error: e.to_string(),
        })?;
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

/// Whether process `pid` still runs. A zombie does not: it has closed its files and
/// released its locks, and only waits for its parent to reap it.
pub fn process_running(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits for process `pid` (if any) to end; false if it still runs after `limit`.
pub fn wait_gone(pid: Option<u64>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while pid.is_some_and(process_running) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The client side of a served disk's swapout: asks its server, through the control socket,
/// to swap it out to repository `url` as `manifest` (then stop, and release it unless
/// `keep`), and waits for the server to be gone. `on_progress` gets the server's progress
/// events. The caller's STASIS_REPO_KEY goes along: the server may not hold it.
pub fn request_served_swapout(
    store: &Store,
    name: &str,
    url: &str,
    manifest: &str,
    keep: bool,
    on_progress: &mut dyn FnMut(&Value),
) -> Result<SwapoutSummary, SwapError> {
    let mut request = json!({"cmd": "swapout", "repo": url, "manifest": manifest, "keep": keep, "disk_only": true, "progress": true});
    if let Ok(key) = std::env::var(crate::repo::remote::KEY_ENV) {
        request["repo_key"] = json!(key);
    }
    let reply = crate::control::request_with(
        &store.control_socket(name),
        name,
        &request,
        None,
        on_progress,
    )
    .map_err(|e| SwapError::Failed(e.to_string()))?;
    if reply.get("ok").and_then(Value::as_bool) != Some(true) {
        let why = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        let why = format!("swapout of served disk {name} failed: {why}");
        return Err(
            if reply.get("busy").and_then(Value::as_bool) == Some(true) {
                SwapError::Busy(why)
            } else {
                SwapError::Failed(why)
            },
        );
    }
    let summary: SwapoutSummary =
        serde_json::from_value(reply.get("swapout").cloned().unwrap_or_default())
            .map_err(|e| SwapError::Failed(format!("bad swapout reply: {e}")))?;
    // The manifest is committed; now the server stops and releases the disk.
    let pid = reply.get("pid").and_then(Value::as_u64);
    if !wait_gone(pid, Duration::from_secs(120)) {
        return Err(SwapError::Failed(format!(
            "disk {name} is swapped out as {manifest}, but its server (pid {}) has not \
             stopped after 120 s",
            pid.unwrap_or_default()
        )));
    }
    if !keep && store.disk(name).is_ok() {
        return Err(SwapError::Failed(format!(
            "disk {name} is swapped out as {manifest}, but its server did not release it \
             (see its log; `stasis disk rm {name}` releases it)"
        )));
    }
    Ok(summary)
}
