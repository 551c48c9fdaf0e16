//! Whole VMs: a Stasis disk served over NBD, a hypervisor running the VM on it, and the
//! stateful swapout of both to the repository, memory included, and back on any node.
//!
//! A VM lives in `<store>/vms/<name>/`: `vm.json` (its [`VmRecord`]), the disk server's
//! socket and log, the hypervisor's sockets and pid file, the console log, and during a
//! swapout the memory image. Swapout: pause, save (memory and device state to a file; the
//! hypervisor drained and flushed the disk at the pause, so the disk is the state of that
//! same instant), swap the disk out through its server's control socket, store the memory
//! image and boot files in the repository, and commit one VM manifest that names them all
//! and holds the VM's spec. Each step is recorded before the next starts, so a swapout that
//! failed half way is finished by running it again.
//!
//! Swapin: the disk comes back lazily (usable at once), the memory image is rebuilt (sparse)
//! from the repository, the disk is served, the hypervisor restores the image paused, and
//! the VM resumes. Guest time does not jump: QEMU runs with `-rtc clock=vm`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::hypervisor::{DriveChoice, Driver, HvError, Hypervisor, VmContext, VmSpec, VmStatus};
use crate::repo::{Kind, Manifest, ManifestInfo, RepoError, RepoHandle};
use crate::store::{Store, StoreError};
use crate::swap::{FileSummary, SwapError, SwapoutSummary};

pub mod experiment;

/// Memory images are stored in 64 KiB chunks, chosen with data (bench/RESULTS.md, "Memory
/// chunk size"): two identical idle guests share less than at 4 KiB (the second adds 5.4%
/// of its RAM, not 3.2%), but each chunk costs the repository a file and an index entry,
/// and bricks compress each chunk on its own: at 64 KiB the memory of an idle guest is
/// stored in as few bytes as QEMU's whole stream through zstd, and a busy guest's swapout
/// stores 16x fewer chunk files than at 4 KiB.
pub const MEMORY_CHUNK: usize = 64 * 1024;
/// Boot files (kernel, initrd) in disk-sized chunks.
const BOOT_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    /// Another command is working on the VM (its lock is held): nothing was done.
    #[error("{0}")]
    Busy(String),
    #[error("VM {vm}: {source}")]
    Hypervisor {
        vm: String,
        #[source]
        source: HvError,
    },
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VmError {
    pub fn is_usage(&self) -> bool {
        match self {
            VmError::Usage(_) => true,
            VmError::Swap(e) => e.is_usage(),
            VmError::Repo(e) => e.is_usage(),
            VmError::Store(e) => e.is_usage(),
            _ => false,
        }
    }

    fn io(path: &Path, e: std::io::Error) -> VmError {
        VmError::Failed(format!("{}: {e}", path.display()))
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Started or swapped in here: its hypervisor and disk server should be running.
    Running,
    /// A swapout is saving it (`memory_path`, `manifest` and `repo` are chosen): its
    /// hypervisor still holds it, paused, and perhaps saved already.
    Saving,
    /// A swapout is under way (or failed half way): the VM is saved, not yet all stored.
    SwappingOut,
    /// In the repository (`manifest`), nothing of it runs here.
    SwappedOut,
}

/// What this node knows of a VM (`<store>/vms/<name>/vm.json`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmRecord {
    pub name: String,
    pub spec: VmSpec,
    pub state: VmState,
    /// The disk server's pid, while it runs.
    #[serde(default)]
    pub server_pid: Option<u32>,
    /// The ublk device (`/dev/ublkbN`) the disk server serves the disk as, while it runs;
    /// None: it serves NBD on the VM's `disk.sock` (hypervisor::DriveChoice).
    #[serde(default)]
    pub disk_device: Option<PathBuf>,
    /// The repository of the last swapout or swapin.
    #[serde(default)]
    pub repo: Option<String>,
    /// The VM manifest of the last swapout (or the one swapped in).
    #[serde(default)]
    pub manifest: Option<String>,
    /// During a swapout: whether the disk manifest is committed yet.
    #[serde(default)]
    pub disk_done: bool,
    /// During a swapout: where the saved memory image is (with `ram_path`, the device
    /// state only).
    #[serde(default)]
    pub memory_path: Option<PathBuf>,
    /// Where the guest's RAM lives while the VM runs here, when its hypervisor keeps it in
    /// a file (QEMU's shared memory backend): a swapout stores this file as the VM's
    /// memory, and the save writes only the device state. None: the hypervisor's own
    /// memory, saved with the device state.
    #[serde(default)]
    pub ram_path: Option<PathBuf>,
    /// During a swapin: the origin (`<repository URL>#<disk manifest>`) of the disk it
    /// brought in, so that a rerun after a failure uses that disk and no other.
    #[serde(default)]
    pub swapin_disk: Option<String>,
    #[serde(default)]
    pub created_at: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmSwapoutSummary {
    pub vm: String,
    pub manifest: String,
    pub repo: String,
    /// How long the pause took (request to paused).
    pub pause_ms: f64,
    /// Saving memory and device state to the local file.
    pub save_seconds: f64,
    /// The memory image's size: the RAM file and the device state, or the save file.
    pub memory_file_bytes: u64,
    pub disk: Option<SwapoutSummary>,
    /// The guest RAM (the RAM file, or the save file holding RAM and device state).
    pub memory: FileSummary,
    /// The device state, stored apart when the RAM was in its own file.
    #[serde(default)]
    pub device_state: Option<FileSummary>,
    /// Boot files stored now (0 when the repository held them).
    pub boot_files_uploaded: u64,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmSwapinSummary {
    pub vm: String,
    pub manifest: String,
    pub repo: String,
    /// Rebuilding the memory image from the repository.
    pub memory_seconds: f64,
    pub memory_chunks: u64,
    /// The hypervisor loading it.
    pub restore_seconds: f64,
    pub seconds: f64,
}

/// Reports what a long operation is doing: (stage, done, total); total 0 when unknown.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

pub fn vms_dir(store: &Store) -> PathBuf {
    store.root().join("vms")
}

pub fn vm_dir(store: &Store, name: &str) -> PathBuf {
    vms_dir(store).join(name)
}

fn record_path(store: &Store, name: &str) -> PathBuf {
    vm_dir(store, name).join("vm.json")
}

fn nbd_socket(store: &Store, name: &str) -> PathBuf {
    vm_dir(store, name).join("disk.sock")
}

fn dir_file(store: &Store, name: &str, file: &str) -> PathBuf {
    vm_dir(store, name).join(file)
}

/// Where a VM's memory image is written while it passes between the hypervisor and the
/// repository: STASIS_MEMORY_DIR if set, else /dev/shm when it has room for all of the VM's
/// memory (the image never touches a disk: writing it back would cost more than the
/// swapout's own writes), else the VM's directory. The swapout syncs it before it records
/// that the VM exists only there and in its disk (on /dev/shm a reboot loses it, and a rerun
/// then says so instead of storing a damaged image).
///
/// `device_state_only`: the VM's RAM is in a RAM file, so the image is its device state.
fn memory_file(store: &Store, rec: &VmRecord, device_state_only: bool) -> PathBuf {
    if let Some(p) = &rec.memory_path {
        return p.clone();
    }
    let file = scratch_name(store, &rec.name, "memory");
    if let Some(dir) = std::env::var_os("STASIS_MEMORY_DIR") {
        return PathBuf::from(dir).join(file);
    }
    let shm = Path::new("/dev/shm");
    // With a RAM file the image is the device state only (well under a MiB for a plain
    // machine); without, RAM and device state.
    let need = if device_state_only {
        64 << 20
    } else {
        memory_with_margin(rec)
    };
    if has_room(shm, need) {
        return shm.join(file);
    }
    vm_dir(store, &rec.name).join("memory.img")
}

/// `stasis-<h>-<vm>.<ext>`: a VM's file outside its store (/dev/shm, $STASIS_MEMORY_DIR),
/// `<h>` the first 12 hex digits of the BLAKE3 hash of the store's path, so that two stores
/// on one node do not collide.
fn scratch_name(store: &Store, vm: &str, ext: &str) -> String {
    let h = blake3::hash(store.root().as_os_str().as_encoded_bytes()).to_hex();
    format!("stasis-{}-{vm}.{ext}", &h[..12])
}

/// The VM's memory plus an eighth: the room asked for its RAM, or an image holding it.
fn memory_with_margin(rec: &VmRecord) -> u64 {
    let mem = rec.spec.mem_mib << 20;
    mem + mem / 8
}

/// Whether `dir` has more than `need` bytes free besides what the RAM files there may still
/// grow into: that room is not free, taking it could kill a running guest (SIGBUS).
fn has_room(dir: &Path, need: u64) -> bool {
    free_bytes(dir).is_some_and(|free| free.saturating_sub(ram_files_growth(dir)) > need)
}

/// Where a QEMU VM's RAM lives while it runs, as a shared memory backend that a swapout
/// reads once the VM is paused (QEMU would otherwise copy every page into its save file
/// first): STASIS_MEMORY_DIR if set, else /dev/shm when it has room for all of the VM's
/// memory on top of what the RAM files of VMs already there may still grow to. None when it
/// has not: a tmpfs that fills under a running guest kills it (SIGBUS), so the VM then runs
/// on QEMU's own memory and a swapout saves it with mapped-ram.
///
/// The file is created at its full (sparse) length before this returns, under a lock on the
/// directory, so that a `vm start` or swapin running at the same time counts it as taken.
fn ram_file_for(store: &Store, rec: &VmRecord) -> Option<PathBuf> {
    if !rec.spec.driver.is_qemu() {
        return None;
    }
    let (dir, checked) = match std::env::var_os("STASIS_MEMORY_DIR") {
        Some(dir) => (PathBuf::from(dir), false),
        None => (PathBuf::from("/dev/shm"), true),
    };
    let reserve = || -> Result<Option<PathBuf>, String> {
        let _lock = crate::store::DiskLock::acquire_blocking(&dir.join(".stasis-ram.lock"))
            .map_err(|e| e.to_string())?;
        let path = dir.join(scratch_name(store, &rec.name, "ram"));
        // A file of this VM left by an earlier run is replaced: not counted.
        let _ = std::fs::remove_file(&path);
        if checked && !has_room(&dir, memory_with_margin(rec)) {
            return Ok(None);
        }
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(rec.spec.mem_mib << 20))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Some(path))
    };
    reserve().unwrap_or_else(|e| {
        tracing::warn!(vm = rec.name, dir = %dir.display(), "cannot place a RAM file there: {e}");
        None
    })
}

/// How much the RAM files of running VMs in `dir` may still grow: their size less what is
/// allocated (a guest's pages are allocated as it first touches them).
fn ram_files_growth(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("stasis-") && n.ends_with(".ram")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len().saturating_sub(m.blocks() * 512))
        .sum()
}

/// Free bytes (for unprivileged users) on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs into a zeroed struct, with a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

pub fn load(store: &Store, name: &str) -> Result<VmRecord, VmError> {
    crate::store::validate_name(name)?;
    let path = record_path(store, name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VmError::Usage(format!("no VM named {name} on this node")))
        }
        Err(e) => return Err(VmError::io(&path, e)),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| VmError::Failed(format!("{}: damaged record: {e}", path.display())))
}

fn save_record(store: &Store, rec: &VmRecord) -> Result<(), VmError> {
    let path = record_path(store, &rec.name);
    crate::fsutil::write_json_durably(&path, rec).map_err(|e| VmError::io(&path, e))
}

/// Every VM this node knows, by name.
pub fn list(store: &Store) -> Result<Vec<VmRecord>, VmError> {
    let dir = vms_dir(store);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(VmError::io(&dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if record_path(store, &name).exists() {
            out.push(load(store, &name)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Runs `f` with the VM's driver and context.
fn with_driver<T>(
    store: &Store,
    rec: &VmRecord,
    f: impl FnOnce(&Driver, &VmContext) -> Result<T, HvError>,
) -> Result<T, VmError> {
    let dir = vm_dir(store, &rec.name);
    let sock = nbd_socket(store, &rec.name);
    let ctx = VmContext {
        name: &rec.name,
        dir: &dir,
        spec: &rec.spec,
        nbd_socket: &sock,
        block_device: rec.disk_device.as_deref(),
        ram_file: rec.ram_path.as_deref(),
    };
    f(&Driver::for_spec(&rec.spec), &ctx).map_err(|source| VmError::Hypervisor {
        vm: rec.name.clone(),
        source,
    })
}

/// Status of a VM as its hypervisor sees it.
pub fn status(store: &Store, rec: &VmRecord) -> Result<VmStatus, VmError> {
    if rec.state == VmState::SwappedOut {
        return Ok(VmStatus::Stopped);
    }
    with_driver(store, rec, |d, c| d.status(c))
}

pub fn counters(store: &Store, rec: &VmRecord) -> Result<crate::hypervisor::VmCounters, VmError> {
    with_driver(store, rec, |d, c| d.counters(c))
}

/// Runs `stasis --store <store> ARGS` in a session of its own (setsid: it is not signalled
/// with us, a terminal's ^C, and outlives us), stdout and stderr to `log_path`.
fn spawn_detached(
    store: &Store,
    args: &[&str],
    env: &[(&str, &str)],
    log_path: &Path,
    what: &str,
) -> Result<Child, VmError> {
    let log = std::fs::File::create(log_path).map_err(|e| VmError::io(log_path, e))?;
    let err = log.try_clone().map_err(|e| VmError::io(log_path, e))?;
    let exe = std::env::current_exe().map_err(|e| VmError::Failed(format!("own path: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store.root())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    // SAFETY: setsid in the child between fork and exec (async-signal-safe).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| VmError::Failed(format!("starting {what}: {e}")))
}

/// Whether this host offers ublk to us.
fn ublk_here() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ublk-control")
        .is_ok()
}

/// Whether the VM's disk is served as a ublk device on this node (else over NBD). At a
/// swapin (`at_swapin`), a VM started with `--drive ublk` on a node without ublk runs over
/// NBD instead, with a warning: a VM swaps in on any node.
fn serve_as_ublk(spec: &VmSpec, at_swapin: bool) -> Result<bool, VmError> {
    let qemu = spec.driver.is_qemu();
    match spec.drive {
        DriveChoice::Ublk if at_swapin && !ublk_here() => {
            tracing::warn!(
                disk = spec.disk,
                "this host has no ublk: the disk goes over NBD"
            );
            Ok(false)
        }
        DriveChoice::Nbd => Ok(false),
        DriveChoice::Auto => Ok(qemu && ublk_here()),
        DriveChoice::Ublk if !qemu => Err(VmError::Usage(format!(
            "--drive ublk is for the QEMU driver; the {} driver takes its disk over NBD",
            spec.driver.kind()
        ))),
        DriveChoice::Ublk if !ublk_here() => Err(VmError::Usage(
            "--drive ublk: this host has no ublk (/dev/ublk-control does not open; modprobe \
             ublk_drv, as root)"
                .into(),
        )),
        DriveChoice::Ublk => Ok(true),
    }
}

/// Serves the VM's disk, over NBD on its socket or as a ublk device ([`serve_as_ublk`]): a
/// `stasis serve` of its own, detached, so the disk outlives this command (and a swapout
/// goes through its control socket).
fn start_disk_server(store: &Store, rec: &mut VmRecord, at_swapin: bool) -> Result<(), VmError> {
    let dir = vm_dir(store, &rec.name);
    let sock = nbd_socket(store, &rec.name);
    let log_path = dir.join("disk-server.log");
    let nbd = format!("unix:{}", sock.display());
    let ublk = serve_as_ublk(&rec.spec, at_swapin)?;
    let frontend: &[&str] = if ublk { &["--ublk"] } else { &["--nbd", &nbd] };
    let mut child = spawn_detached(
        store,
        &[&["serve", rec.spec.disk.as_str()], frontend].concat(),
        &[],
        &log_path,
        "the disk server",
    )?;
    let control = store.control_socket(&rec.spec.disk);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut device = None;
    loop {
        if let Ok(status) = crate::control::request(&control, &rec.spec.disk, "status") {
            // A ublk server answers once its device is up; it names the device.
            let served_device = status
                .get("address")
                .and_then(|a| a.as_str())
                .filter(|_| status.get("frontend").and_then(|f| f.as_str()) == Some("ublk"))
                .map(PathBuf::from)
                .filter(|d| d.exists());
            if ublk && served_device.is_some() {
                device = served_device;
                break;
            }
            if !ublk && sock.exists() {
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let why = log.lines().last().unwrap_or("").to_string();
            return Err(if why.contains("in use") || why.contains("served") {
                VmError::Usage(format!("disk {} cannot be served: {why}", rec.spec.disk))
            } else {
                VmError::Failed(format!(
                    "the server of disk {} exited ({status}): {why}",
                    rec.spec.disk
                ))
            });
        }
        if Instant::now() > deadline {
            // SIGTERM first: a ublk server killed outright leaves its device behind, and
            // the disk refused until the device is deleted or recovered by hand.
            if !terminate(child.id(), Duration::from_secs(30)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            return Err(VmError::Failed(format!(
                "the server of disk {} did not start within 30 s",
                rec.spec.disk
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    rec.server_pid = Some(child.id());
    rec.disk_device = device;
    Ok(())
}

/// Stops the disk server (SIGTERM: it drains, flushes and closes the disk) and waits.
fn stop_disk_server(rec: &mut VmRecord) -> Result<(), VmError> {
    rec.disk_device = None;
    if let Some(pid) = rec.server_pid.take() {
        if !terminate(pid, Duration::from_secs(60)) {
            return Err(VmError::Failed(format!(
                "the server of disk {} (pid {pid}) did not stop",
                rec.spec.disk
            )));
        }
    }
    Ok(())
}

/// SIGTERM to a disk server (it drains, flushes and closes the disk; a ublk server deletes
/// its device), then waits up to `limit` for it to end; whether it did.
fn terminate(pid: u32, limit: Duration) -> bool {
    if crate::swap::process_running(pid as u64) {
        // SAFETY: a signal to a server this node started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    wait_gone(Some(pid), limit)
}

/// Starts VM `name` on `spec`: serves its disk, then boots it; its RAM in a file that a
/// swapout reads (see [`ram_file_for`]) unless `private_ram`.
pub fn start(
    store: &Store,
    name: &str,
    spec: VmSpec,
    private_ram: bool,
) -> Result<VmRecord, VmError> {
    crate::store::validate_name(name)?;
    store.disk(&spec.disk)?;
    if let Ok(existing) = load(store, name) {
        return Err(VmError::Usage(format!(
            "VM {name} exists on this node ({})",
            state_word(existing.state)
        )));
    }
    if let Some(other) = owner_of_disk(store, &spec.disk)? {
        return Err(VmError::Usage(format!(
            "disk {} is the disk of VM {other}",
            spec.disk
        )));
    }
    for f in [&spec.kernel, &spec.initrd].into_iter().flatten() {
        if !f.is_file() {
            return Err(VmError::Usage(format!("{}: no such file", f.display())));
        }
    }
    let dir = vm_dir(store, name);
    std::fs::create_dir_all(&dir).map_err(|e| VmError::io(&dir, e))?;
    let mut rec = VmRecord {
        name: name.into(),
        spec,
        state: VmState::Running,
        server_pid: None,
        disk_device: None,
        repo: None,
        manifest: None,
        disk_done: false,
        memory_path: None,
        ram_path: None,
        swapin_disk: None,
        created_at: crate::repo::now_secs(),
    };
    // Boot files are copied in: the VM must not depend on paths that may change, and a
    // swapin elsewhere puts them in the same place.
    adopt_boot_files(&dir, &mut rec.spec)?;
    if !private_ram {
        rec.ram_path = ram_file_for(store, &rec);
    }
    let started = start_disk_server(store, &mut rec, false).and_then(|_| {
        save_record(store, &rec)?;
        start_choosing_accel(store, &mut rec)
    });
    if let Err(e) = started {
        // A hypervisor that started and then failed (the KVM probe) goes first.
        let _ = with_driver(store, &rec, |d, c| d.kill(c));
        let _ = stop_disk_server(&mut rec);
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(ram) = &rec.ram_path {
            let _ = std::fs::remove_file(ram);
        }
        return Err(e);
    }
    Ok(rec)
}

/// How long a VM started with accel "auto" must run under KVM before KVM is trusted.
const KVM_PROBE: Duration = Duration::from_secs(6);

/// Starts the VM; a QEMU VM with accel "auto" tries KVM where /dev/kvm opens and falls back
/// to TCG if the guest cannot run under it (a host without working nested virtualization
/// offers /dev/kvm, and the guest stops at once with an internal error). The accelerator
/// that worked is recorded: a saved VM restores only under the same one.
fn start_choosing_accel(store: &Store, rec: &mut VmRecord) -> Result<(), VmError> {
    let crate::hypervisor::DriverConfig::Qemu { accel, .. } = &mut rec.spec.driver else {
        return with_driver(store, rec, |d, c| d.start(c));
    };
    if accel != "auto" {
        return with_driver(store, rec, |d, c| d.start(c));
    }
    *accel = crate::hypervisor::default_accel();
    let verdict = kvm_verdict(store);
    if accel == "kvm" && verdict == Some(false) {
        *accel = "tcg".into();
    }
    let probe = accel == "kvm" && verdict.is_none();
    // Recorded before it starts: a start killed meanwhile leaves an accelerator QEMU knows.
    save_record(store, rec)?;
    with_driver(store, rec, |d, c| d.start(c))?;
    if !probe {
        return Ok(());
    }
    // Measured here: the guest stops about 3 s into its boot. An explicit --accel kvm, or a
    // verdict of an earlier probe since the host booted, skips this wait.
    let deadline = Instant::now() + KVM_PROBE;
    let mut status = VmStatus::Running;
    while Instant::now() < deadline && status == VmStatus::Running {
        std::thread::sleep(Duration::from_millis(100));
        status = with_driver(store, rec, |d, c| d.status(c))?;
    }
    record_kvm_verdict(store, status == VmStatus::Running);
    if status == VmStatus::Running {
        return Ok(());
    }
    tracing::warn!(vm = %rec.name, "the guest does not run under KVM here: using TCG");
    with_driver(store, rec, |d, c| d.kill(c))?;
    if let crate::hypervisor::DriverConfig::Qemu { accel, .. } = &mut rec.spec.driver {
        *accel = "tcg".into();
    }
    save_record(store, rec)?;
    with_driver(store, rec, |d, c| d.start(c))
}

/// Where the KVM probe's verdict is kept: `<boot id> works|fails`. Whether a guest runs under
/// KVM is the host's property (its nested virtualization), not the VM's, so it is probed once
/// per boot of the host.
fn kvm_verdict_path(store: &Store) -> PathBuf {
    store.root().join("run").join("kvm-verdict")
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The verdict of a KVM probe since the host last booted, if any.
fn kvm_verdict(store: &Store) -> Option<bool> {
    let text = std::fs::read_to_string(kvm_verdict_path(store)).ok()?;
    let (boot, verdict) = text.trim().split_once(' ')?;
    (Some(boot) == boot_id().as_deref()).then_some(verdict == "works")
}

/// Keeps a probe's verdict; a failure to keep it only costs the next start a probe.
fn record_kvm_verdict(store: &Store, works: bool) {
    if let Some(boot) = boot_id() {
        let text = format!("{boot} {}\n", if works { "works" } else { "fails" });
        let _ = crate::fsutil::write_durably(&kvm_verdict_path(store), text.as_bytes(), 0o644);
    }
}

fn adopt_boot_files(dir: &Path, spec: &mut VmSpec) -> Result<(), VmError> {
    for (file, slot) in [("kernel", &mut spec.kernel), ("initrd", &mut spec.initrd)] {
        if let Some(src) = slot.as_ref() {
            let dest = dir.join(file);
            if *src != dest {
                std::fs::copy(src, &dest).map_err(|e| VmError::io(src, e))?;
                *slot = Some(dest);
            }
        }
    }
    Ok(())
}

fn state_word(s: VmState) -> &'static str {
    match s {
        VmState::Running => "running",
        VmState::Saving => "being saved",
        VmState::SwappingOut => "swapping out",
        VmState::SwappedOut => "swapped out",
    }
}

/// The VM of this node whose disk is `disk` (running, or swapping out), if any.
/// A VM record that cannot be read is an error, not "no owner": a disk must not be swapped
/// out alone under a VM whose record is damaged.
pub fn owner_of_disk(store: &Store, disk: &str) -> Result<Option<String>, VmError> {
    Ok(list(store)?
        .into_iter()
        .find(|v| v.spec.disk == disk && v.state != VmState::SwappedOut)
        .map(|v| v.name))
}

/// Starts `stasis vm swapout NAME [--repo URL]` detached (the control socket's swapout of a
/// VM's disk); its output goes to `<vm dir>/swapout.log`. Returns its pid and that path.
pub fn spawn_swapout(
    store: &Store,
    name: &str,
    repo: Option<&str>,
    repo_key: Option<&str>,
) -> Result<(u32, PathBuf), VmError> {
    let log_path = vm_dir(store, name).join("swapout.log");
    let mut args = vec!["vm", "swapout", name];
    args.extend(repo.iter().flat_map(|url| ["--repo", url]));
    let env: Vec<(&str, &str)> = repo_key
        .map(|key| (crate::repo::remote::KEY_ENV, key))
        .into_iter()
        .collect();
    let mut child = spawn_detached(store, &args, &env, &log_path, "the VM swapout")?;
    let pid = child.id();
    // Reaped here if it ends while we still run (else init reaps it): no zombie.
    std::thread::spawn(move || child.wait());
    Ok((pid, log_path))
}

/// Held by a command that changes a VM's state (swapout, swapin, kill) for its whole run:
/// two at once would write over each other's record and memory image.
fn lock_vm(store: &Store, name: &str) -> Result<crate::store::DiskLock, VmError> {
    store.try_lock(&format!("vm-{name}"))?.ok_or_else(|| {
        VmError::Busy(format!(
            "VM {name} is busy: another stasis command is swapping it out or in, or killing it"
        ))
    })
}

/// Whether another command holds VM `name` (see [`lock_vm`]).
pub fn is_locked(store: &Store, name: &str) -> bool {
    matches!(lock_vm(store, name), Err(VmError::Busy(_)))
}

/// Ends VM `name` here without saving it: the hypervisor is killed, the disk server stopped
/// (the disk stays, with every write the guest had flushed), and the record removed.
pub fn kill(store: &Store, name: &str) -> Result<(), VmError> {
    let _one_at_a_time = lock_vm(store, name)?;
    let mut rec = load(store, name)?;
    if rec.state != VmState::SwappedOut {
        with_driver(store, &rec, |d, c| d.kill(c))?;
        stop_disk_server(&mut rec)?;
    }
    // Its RAM file, and the memory image of an unfinished swapout, may live outside the
    // VM's directory.
    for p in [&rec.memory_path, &rec.ram_path].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    let dir = vm_dir(store, name);
    std::fs::remove_dir_all(&dir).map_err(|e| VmError::io(&dir, e))
}

/// Pauses a running VM; returns how long it took.
pub fn pause(store: &Store, name: &str) -> Result<Duration, VmError> {
    let rec = load(store, name)?;
    if rec.state != VmState::Running {
        return Err(VmError::Usage(format!(
            "VM {name} is {}, not running",
            state_word(rec.state)
        )));
    }
    let t = Instant::now();
    with_driver(store, &rec, |d, c| d.pause(c))?;
    Ok(t.elapsed())
}

pub fn resume(store: &Store, name: &str) -> Result<(), VmError> {
    let rec = load(store, name)?;
    with_driver(store, &rec, |d, c| d.resume(c))
}

/// Swaps VM `name` out to `repo` (URL `url`): pause (unless the caller paused it: an
/// experiment pauses all its VMs first), save, then store disk, memory and boot files and
/// commit the VM manifest. Run again after a failure, it finishes what is left.
pub fn swapout(
    store: &Store,
    name: &str,
    repo: &RepoHandle,
    paused: Option<Duration>,
    progress: Progress,
) -> Result<VmSwapoutSummary, VmError> {
    let started = Instant::now();
    let _one_at_a_time = lock_vm(store, name)?;
    let mut rec = load(store, name)?;
    let memory = memory_file(store, &rec, rec.ram_path.is_some());
    let mut pause_ms = paused.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let mut save_seconds = 0.0;
    if rec.state == VmState::SwappedOut {
        return Err(VmError::Usage(format!(
            "VM {name} is already swapped out (as {})",
            rec.manifest.as_deref().unwrap_or("?")
        )));
    }
    if rec.state != VmState::Running && rec.repo.as_deref() != Some(repo.url().as_str()) {
        return Err(VmError::Usage(format!(
            "VM {name} is half swapped out to {}: finish it there",
            rec.repo.as_deref().unwrap_or("?")
        )));
    }
    let status = with_driver(store, &rec, |d, c| d.status(c))?;
    if rec.state != VmState::SwappingOut {
        // Running, or Saving (a run died during or after its save): save, record, kill.
        if status == VmStatus::Stopped {
            let when = if rec.state == VmState::Saving {
                "its hypervisor ended while it was being saved"
            } else {
                "its hypervisor stopped: crashed, or the node rebooted"
            };
            return Err(VmError::Failed(format!(
                "VM {name} is not running here ({when}); its disk {} holds what the guest \
                 flushed. `stasis vm kill {name}` removes the VM, then start it again from \
                 its disk",
                rec.spec.disk
            )));
        }
        // A run that died after its save completed left the VM saved and paused, the image
        // whole (the hypervisor says so): it is taken as it is. A completed save this
        // record does not name is not ours to trust.
        let already_saved = status == VmStatus::Saved;
        let image_here = memory.is_file() && rec.ram_path.as_ref().is_none_or(|ram| ram.is_file());
        if already_saved && !(rec.state == VmState::Saving && image_here) {
            return Err(VmError::Failed(format!(
                "VM {name}'s hypervisor holds a completed save that this node has no whole \
                 image of; `stasis vm resume {name}` lets it run again, then swap it out"
            )));
        }
        // Running: not paused by the caller (an experiment pauses all first), or resumed by
        // hand since a run recorded `saving`.
        if status == VmStatus::Running {
            progress("pausing", 0, 0);
            let t = Instant::now();
            with_driver(store, &rec, |d, c| d.pause(c))?;
            pause_ms = t.elapsed().as_secs_f64() * 1000.0;
        }
        let before = rec.clone();
        if rec.state == VmState::Running {
            // Recorded before the save: where the image goes and under which name, so that a
            // run that dies during or after the save is finished by the next.
            rec.state = VmState::Saving;
            rec.memory_path = Some(memory.clone());
            rec.manifest = Some(unused_manifest_name(repo, name)?);
            rec.repo = Some(repo.url());
            rec.disk_done = false;
            save_record(store, &rec)?;
        }
        if !already_saved {
            progress("saving memory and device state", 0, 0);
            let t = Instant::now();
            if let Err(e) = with_driver(store, &rec, |d, c| d.save(c, &memory)) {
                let _ = std::fs::remove_file(&memory);
                // Nothing was stored: the VM is as it was (paused), under its old record.
                save_record(store, &before)?;
                return Err(e);
            }
            save_seconds = t.elapsed().as_secs_f64();
        }
        // From here the VM exists only in this file and its disk: make the file and its name
        // durable (QEMU does not; free on /dev/shm, where a reboot loses it and a rerun then
        // says so instead of storing a damaged image), then record that it is whole.
        for f in std::iter::once(&memory).chain(&rec.ram_path) {
            crate::fsutil::sync_file_and_dir(f).map_err(|e| VmError::io(f, e))?;
        }
        rec.state = VmState::SwappingOut;
        save_record(store, &rec)?;
    }
    // Recorded: the hypervisor, paused since the save, can go now; also on a rerun whose run
    // died between that record and this kill.
    if status != VmStatus::Stopped {
        with_driver(store, &rec, |d, c| d.kill(c))?;
    }
    let manifest = rec.manifest.clone().unwrap_or_default();
    // The guest's RAM: its own file, or in the save file with the device state.
    let ram = rec.ram_path.as_ref().unwrap_or(&memory);
    let file_len = |f: &Path| {
        std::fs::metadata(f)
            .map(|m| m.len())
            .map_err(|e| VmError::io(f, e))
    };
    let ram_bytes = file_len(ram)?;
    let memory_file_bytes = match rec.ram_path {
        Some(_) => ram_bytes + file_len(&memory)?,
        None => ram_bytes,
    };
    let disk_manifest = format!("{manifest}.disk");
    let mem_manifest = format!("{manifest}.memory");
    let device_manifest = format!("{manifest}.device-state");
    // Memory, boot files, and the manifest naming them, under one upload session (a gc
    // does not sweep what we counted on before the manifest names it).
    let upload = repo.begin_upload()?;
    // The disk step (through the disk's server while it runs, else here) and the memory
    // step run at once: neither needs the other, and the disk step is mostly waiting (for
    // the server's swapout, then for it to stop).
    let (disk_step, memory_step) = std::thread::scope(|s| {
        let disk = (!rec.disk_done).then(|| {
            s.spawn(|| {
                progress("disk", 0, 0);
                swapout_disk_once(store, &rec, repo, &disk_manifest, progress)
            })
        });
        let memory = (|| -> Result<_, VmError> {
            let show = |c: &crate::swap::Counters| {
                use std::sync::atomic::Ordering::Relaxed;
                progress("memory", c.bytes_scanned.load(Relaxed), ram_bytes)
            };
            let store_file = |path: &Path, manifest: &str, what: &str, show| {
                let (m, summary) = crate::swap::swapout_file(
                    path,
                    MEMORY_CHUNK,
                    manifest,
                    &format!("{what} of VM {name}"),
                    repo,
                    &upload,
                    show,
                )?;
                repo.commit(&m)?;
                Ok::<_, VmError>(summary)
            };
            let summary = store_file(ram, &mem_manifest, "memory", &show)?;
            let device = match rec.ram_path {
                Some(_) => Some(store_file(
                    &memory,
                    &device_manifest,
                    "device state",
                    &|_| {},
                )?),
                None => None,
            };
            let mut boot = Vec::new();
            for (role, file) in [("kernel", &rec.spec.kernel), ("initrd", &rec.spec.initrd)] {
                if let Some(path) = file {
                    boot.push((role, store_boot_file(repo, &upload, path)?));
                }
            }
            Ok((summary, device, boot))
        })();
        let disk = disk.map(|d| {
            d.join()
                .unwrap_or_else(|_| Err(VmError::Failed("the disk step panicked".into())))
        });
        (disk, memory)
    });
    let mut disk_summary = None;
    if let Some(done) = disk_step {
        disk_summary = done?;
        rec.server_pid = None;
        rec.disk_device = None;
        rec.disk_done = true;
        save_record(store, &rec)?;
    }
    let (memory_summary, device_summary, boot) = memory_step?;
    let mut parts = std::collections::BTreeMap::new();
    parts.insert("disk".to_string(), disk_manifest);
    parts.insert("memory".to_string(), mem_manifest);
    if device_summary.is_some() {
        parts.insert("device-state".to_string(), device_manifest);
    }
    let mut boot_files_uploaded = 0;
    for (role, (name, uploaded)) in boot {
        boot_files_uploaded += uploaded as u64;
        parts.insert(role.to_string(), name);
    }
    let vm_manifest = Manifest {
        info: ManifestInfo {
            name: manifest.clone(),
            kind: Kind::Vm,
            size: 0,
            chunk_size: MEMORY_CHUNK as u32,
            image: None,
            parent: None,
            source: Some(name.to_string()),
            created_at: crate::repo::now_secs(),
            parts,
            config: Some(json!({ "spec": rec.spec })),
        },
        entries: Vec::new(),
    };
    repo.commit(&vm_manifest)?;
    drop(upload);
    let ram_path = rec.ram_path.take();
    rec.state = VmState::SwappedOut;
    rec.memory_path = None;
    save_record(store, &rec)?;
    // The repository holds them now.
    for f in [
        Some(memory),
        ram_path,
        Some(dir_file(store, name, "kernel")),
        Some(dir_file(store, name, "initrd")),
    ]
    .iter()
    .flatten()
    {
        let _ = std::fs::remove_file(f);
    }
    Ok(VmSwapoutSummary {
        vm: name.into(),
        manifest,
        repo: repo.url(),
        pause_ms,
        save_seconds,
        memory_file_bytes,
        disk: disk_summary,
        memory: memory_summary,
        device_state: device_summary,
        boot_files_uploaded,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The disk step of a VM swapout, also when a run that died left it half done: the disk's
/// server may be finishing the swapout that run asked for (it stops answering, or refuses
/// another, while it stops), or may have committed it already. Returns None when it was
/// already done.
fn swapout_disk_once(
    store: &Store,
    rec: &VmRecord,
    repo: &RepoHandle,
    disk_manifest: &str,
    progress: Progress,
) -> Result<Option<SwapoutSummary>, VmError> {
    let disk = &rec.spec.disk;
    let served = crate::control::request(&store.control_socket(disk), disk, "status").is_ok();
    let server_alive = rec
        .server_pid
        .is_some_and(|p| crate::swap::process_running(p as u64));
    let settle = || -> Result<bool, VmError> {
        if !wait_gone(rec.server_pid, Duration::from_secs(300)) {
            return Err(VmError::Failed(format!(
                "the server of disk {disk} (pid {:?}) neither answers nor stops",
                rec.server_pid
            )));
        }
        Ok(store.disk(disk).is_err() && repo.find(Kind::Disk, disk_manifest)?.is_some())
    };
    if !served && (server_alive || store.disk(disk).is_err()) && settle()? {
        return Ok(None);
    }
    let url = repo.url();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match swapout_disk(store, rec, &url, repo, disk_manifest, progress) {
            Ok(summary) => return Ok(Some(summary)),
            // The server is busy with the swapout a dead run asked for: it stops when that
            // succeeds (then look again), or serves on if it failed (then ask again). While
            // it stops it no longer answers but still holds the disk.
            Err(e) if (is_busy(&e) || stopping(store, rec)) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
                let gone = !rec
                    .server_pid
                    .is_some_and(|p| crate::swap::process_running(p as u64));
                if gone && settle()? {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the VM's disk server still runs but no longer answers (it is stopping).
fn stopping(store: &Store, rec: &VmRecord) -> bool {
    let disk = &rec.spec.disk;
    rec.server_pid
        .is_some_and(|p| crate::swap::process_running(p as u64))
        && crate::control::request(&store.control_socket(disk), disk, "status").is_err()
}

/// A served disk's refusal because its server is finishing another swapout or stopping
/// (the control reply's `busy`).
fn is_busy(e: &VmError) -> bool {
    matches!(e, VmError::Swap(SwapError::Busy(_)))
}

/// Waits for process `pid` (if any) to end; false if it still runs after `limit`.
fn wait_gone(pid: Option<u32>, limit: Duration) -> bool {
    crate::swap::wait_gone(pid.map(u64::from), limit)
}

/// `NAME@UNIX-TIME`, or with a suffix if a swapout in the same second took that name.
fn unused_manifest_name(repo: &RepoHandle, name: &str) -> Result<String, VmError> {
    let base = format!("{name}@{}", crate::repo::now_secs());
    for n in 0..1000 {
        let candidate = if n == 0 {
            base.clone()
        } else {
            format!("{base}.{n}")
        };
        let taken = repo.find(Kind::Vm, &candidate)?.is_some()
            || repo
                .find(Kind::Disk, &format!("{candidate}.disk"))?
                .is_some()
            || repo
                .find(Kind::File, &format!("{candidate}.memory"))?
                .is_some();
        if !taken {
            return Ok(candidate);
        }
    }
    Err(VmError::Failed(format!("no free manifest name for {base}")))
}

fn swapout_disk(
    store: &Store,
    rec: &VmRecord,
    url: &str,
    repo: &RepoHandle,
    manifest: &str,
    progress: Progress,
) -> Result<SwapoutSummary, VmError> {
    let disk = &rec.spec.disk;
    if crate::control::request(&store.control_socket(disk), disk, "status").is_ok() {
        return Ok(crate::swap::request_served_swapout(
            store,
            disk,
            url,
            manifest,
            false,
            &mut |e| {
                let get = |k: &str| e.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                progress("disk", get("bytes_scanned"), 0);
            },
        )?);
    }
    // Its server is gone (the node rebooted, or it was killed): swap it out ourselves.
    let opened = store.open_disk(disk)?;
    let summary = crate::swap::swapout(store, disk, &opened, repo, manifest, &|c| {
        progress(
            "disk",
            c.bytes_scanned.load(std::sync::atomic::Ordering::Relaxed),
            0,
        )
    })?;
    opened.close()?;
    store.remove_disk(disk)?;
    Ok(summary)
}

/// Stores a boot file once per content: its manifest is named by its hash. Returns the
/// manifest's name and whether it was uploaded now.
fn store_boot_file(
    repo: &RepoHandle,
    upload: &crate::repo::UploadSession,
    path: &Path,
) -> Result<(String, bool), VmError> {
    let bytes = std::fs::read(path).map_err(|e| VmError::io(path, e))?;
    let name = format!("boot-{}", &blake3::hash(&bytes).to_hex()[..32]);
    if repo.find(Kind::File, &name)?.is_some() {
        return Ok((name, false));
    }
    let (m, _) =
        crate::swap::swapout_file(path, BOOT_CHUNK, &name, "boot file", repo, upload, &|_| {})?;
    repo.commit(&m)?;
    Ok((name, true))
}

/// The VM manifest `what` names: a manifest name, or a VM's name (its newest swapout).
pub fn find_vm_manifest(repo: &RepoHandle, what: &str) -> Result<Manifest, VmError> {
    find_named_or_newest(repo, Kind::Vm, what)
}

/// The manifest of `kind` named `what`, else the newest of that kind whose `source` is
/// `what` (a VM's or an experiment's name).
pub(crate) fn find_named_or_newest(
    repo: &RepoHandle,
    kind: Kind,
    what: &str,
) -> Result<Manifest, VmError> {
    if let Some(m) = repo.find(kind, what)? {
        return Ok(m);
    }
    let newest = repo
        .list()?
        .into_iter()
        .filter(|(i, _)| i.kind == kind && i.source.as_deref() == Some(what))
        .max_by_key(|(i, _)| (i.created_at, i.name.clone()));
    match newest {
        Some((info, _)) => repo
            .find(kind, &info.name)?
            .ok_or_else(|| VmError::Failed(format!("manifest {} vanished", info.name))),
        None => Err(VmError::Usage(format!(
            "no {} manifest, nor a swapped-out {0} named {what:?}, in {}",
            kind.as_str(),
            repo.url()
        ))),
    }
}

/// Swaps VM manifest `m` in here: disk (lazily), boot files, memory image; serves the disk,
/// restores the VM paused and, with `resume`, resumes it.
pub fn swapin(
    store: &Store,
    repo: &RepoHandle,
    m: &Manifest,
    resume_it: bool,
    progress: Progress,
) -> Result<VmSwapinSummary, VmError> {
    let started = Instant::now();
    let name = m
        .info
        .source
        .clone()
        .ok_or_else(|| VmError::Failed(format!("VM manifest {} names no VM", m.info.name)))?;
    crate::store::validate_name(&name)?;
    let _one_at_a_time = lock_vm(store, &name)?;
    let spec: VmSpec = m
        .info
        .config
        .as_ref()
        .and_then(|c| c.get("spec"))
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| VmError::Failed(format!("VM manifest {} has no spec", m.info.name)))?;
    let part =
        |role: &str| {
            m.info.parts.get(role).cloned().ok_or_else(|| {
                VmError::Failed(format!("VM manifest {} lacks its {role}", m.info.name))
            })
        };
    let (disk_manifest, mem_manifest) = (part("disk")?, part("memory")?);
    // Saved with its RAM in a file of its own: the memory part is that RAM, restored into
    // the VM's RAM file, and the device state is apart.
    let device_manifest = m.info.parts.get("device-state").cloned();
    let mut rec = match load(store, &name) {
        Ok(r) if r.state == VmState::SwappedOut => r,
        Ok(r) => {
            return Err(VmError::Usage(format!(
                "VM {name} is {} on this node",
                state_word(r.state)
            )))
        }
        Err(VmError::Usage(_)) => VmRecord {
            name: name.clone(),
            spec: spec.clone(),
            state: VmState::SwappedOut,
            server_pid: None,
            disk_device: None,
            repo: None,
            manifest: None,
            disk_done: false,
            memory_path: None,
            ram_path: None,
            swapin_disk: None,
            created_at: crate::repo::now_secs(),
        },
        Err(e) => return Err(e),
    };
    rec.spec = spec;
    let dir = vm_dir(store, &name);
    std::fs::create_dir_all(&dir).map_err(|e| VmError::io(&dir, e))?;
    // Boot files, where the spec expects them (the VM's own directory).
    for (role, slot) in [
        ("kernel", &mut rec.spec.kernel),
        ("initrd", &mut rec.spec.initrd),
    ] {
        if slot.is_some() {
            let path = dir.join(role);
            crate::swap::restore_file(repo, &part(role)?, &path, true, &|_, _| {})?;
            *slot = Some(path);
        }
    }
    progress("memory", 0, 0);
    rec.memory_path = None;
    let memory = memory_file(store, &rec, device_manifest.is_some());
    // The RAM file the VM will run on: in memory where there is room, else on the VM's
    // directory (slower: the kernel writes the guest's pages back to the disk).
    let ram = device_manifest.as_ref().map(|_| {
        ram_file_for(store, &rec).unwrap_or_else(|| {
            tracing::warn!(
                vm = name,
                "no room in memory for the VM's RAM file: it goes on disk"
            );
            dir.join("ram")
        })
    });
    // Scratch: whatever happens next, it goes; the RAM file too unless the VM runs on it.
    struct RemoveOnDrop<'a>(Option<&'a Path>);
    impl Drop for RemoveOnDrop<'_> {
        fn drop(&mut self) {
            if let Some(f) = self.0 {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    let _scratch = RemoveOnDrop(Some(&memory));
    let mut ram_unused = RemoveOnDrop(ram.as_deref());
    let t = Instant::now();
    let show = |d, n| progress("memory", d, n);
    let mut memory_chunks = crate::swap::restore_file(
        repo,
        &mem_manifest,
        ram.as_ref().unwrap_or(&memory),
        false,
        &show,
    )?;
    if let Some(device) = &device_manifest {
        memory_chunks += crate::swap::restore_file(repo, device, &memory, false, &|_, _| {})?;
    }
    let memory_seconds = t.elapsed().as_secs_f64();
    progress("disk", 0, 0);
    // A disk of that name here is used only if it is this swapout's (an earlier swapin of
    // it failed after bringing the disk in).
    // (The record says so: a disk that came from this manifest and then ran, under a VM
    // since killed, holds newer writes than this memory image and must not be used.)
    let origin = crate::swap::origin_of(&repo.url(), &disk_manifest);
    match store.delta_origin(&rec.spec.disk) {
        Err(_) => {
            rec.swapin_disk = Some(origin.clone());
            save_record(store, &rec)?;
            crate::swap::swapin(store, repo, &disk_manifest, &rec.spec.disk)?;
        }
        Ok(Some(o)) if o == origin && rec.swapin_disk.as_deref() == Some(origin.as_str()) => {}
        Ok(_) => {
            return Err(VmError::Usage(format!(
                "this node has another disk named {}: remove it or swap the VM in elsewhere",
                rec.spec.disk
            )))
        }
    }
    start_disk_server(store, &mut rec, true)?;
    rec.state = VmState::Running;
    rec.repo = Some(repo.url());
    rec.manifest = Some(m.info.name.clone());
    rec.disk_done = false;
    rec.ram_path = ram.clone();
    save_record(store, &rec)?;
    progress("restoring", 0, 0);
    let t = Instant::now();
    let restored = with_driver(store, &rec, |d, c| {
        d.restore(c, &memory)?;
        if resume_it {
            d.resume(c)?;
        }
        Ok(())
    });
    let restore_seconds = t.elapsed().as_secs_f64();
    if let Err(e) = restored {
        // Back to swapped out: the repository still has all of it. A QEMU that restored
        // and then failed to resume goes first: it runs on the RAM file and the disk.
        let _ = with_driver(store, &rec, |d, c| d.kill(c));
        let _ = stop_disk_server(&mut rec);
        rec.state = VmState::SwappedOut;
        rec.ram_path = None;
        let _ = save_record(store, &rec);
        return Err(e);
    }
    // The VM runs on its RAM file now.
    ram_unused.0 = None;
    // The disk is the VM's now, running on: a later swapin must not take it for its own.
    rec.swapin_disk = None;
    save_record(store, &rec)?;
    Ok(VmSwapinSummary {
        vm: name,
        manifest: m.info.name.clone(),
        repo: repo.url(),
        memory_seconds,
        memory_chunks,
        restore_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}
