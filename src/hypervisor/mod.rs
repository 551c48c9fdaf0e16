//! Hypervisor drivers: what Stasis needs from whatever runs a VM, behind one small trait.
//!
//! A driver starts a VM whose disk Stasis already serves, pauses it, saves its memory and
//! device state to a file (after which the VM no longer runs), restores such a file into a
//! new, paused VM, resumes it, and reports its status and counters. The drivers are a closed
//! set dispatched statically ([`Driver`]): QEMU over QMP, `xl` for Xen, and user hook
//! commands for anything else.
//!
//! Drivers keep no state in memory: everything they need is in the VM's directory (sockets,
//! pid files) and its [`VmSpec`], so any `stasis` process can act on any VM.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod exec;
mod qemu;
pub use qemu::{default_accel, default_machine};
pub mod qmp;
mod xen;

pub use exec::ExecDriver;
pub use qemu::QemuDriver;
pub use xen::XenDriver;

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {command}: {class}: {desc}")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    #[error("{0}")]
    Protocol(String),
    /// A hypervisor command (qemu, xl, a hook) failed.
    #[error("{command} failed: {why}")]
    Command { command: String, why: String },
    #[error("{0}")]
    Failed(String),
}

impl HvError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> HvError {
        HvError::Io {
            what: what.into(),
            source,
        }
    }
}

/// What a VM is: its machine and how it boots. Kept in the VM's record and, on swapout, in
/// its manifest (boot files are then stored in the repository and found again by hash).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// The Stasis disk that is the VM's drive (served over NBD while the VM runs).
    pub disk: String,
    pub mem_mib: u64,
    pub cpus: u32,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    pub driver: DriverConfig,
    /// How the disk reaches the hypervisor, chosen again on every node it starts on.
    #[serde(default)]
    pub drive: DriveChoice,
}

/// How a VM's disk is handed to its hypervisor: over NBD on a Unix socket (any hypervisor,
/// any host), or as a ublk block device (`/dev/ublkbN`: the kernel's block layer between
/// QEMU and the store, no NBD protocol; QEMU only, on hosts with ublk).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriveChoice {
    /// ublk for QEMU where this host has it (`/dev/ublk-control` opens), else NBD.
    #[default]
    Auto,
    Nbd,
    Ublk,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum DriverConfig {
    Qemu {
        /// "kvm" or "tcg", chosen at start (a saved VM restores under the same one).
        accel: String,
        /// Arguments added to QEMU's command line (the same on every restore).
        #[serde(default)]
        extra_args: Vec<String>,
        /// The versioned machine type the VM started on (`pc` resolved, e.g.
        /// "pc-i440fx-10.0"): a restore under a newer QEMU must build the same machine, or
        /// the saved device state does not fit. None: QEMU's default (not resolvable).
        #[serde(default)]
        machine: Option<String>,
    },
    Exec {
        /// Directory of hook executables (kernel-notes/hypervisors.md).
        hooks: PathBuf,
        /// A hook still running after this many seconds is killed and fails.
        #[serde(default = "default_hook_timeout")]
        timeout_secs: u64,
    },
    Xen {
        /// The domain's xl configuration file.
        config: PathBuf,
    },
}

impl DriverConfig {
    pub fn is_qemu(&self) -> bool {
        matches!(self, DriverConfig::Qemu { .. })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DriverConfig::Qemu { .. } => "qemu",
            DriverConfig::Exec { .. } => "exec",
            DriverConfig::Xen { .. } => "xen",
        }
    }
}

/// Where a VM lives on this node while it runs.
pub struct VmContext<'a> {
    pub name: &'a str,
    /// Its runtime directory: sockets, pid files, console log.
    pub dir: &'a Path,
    pub spec: &'a VmSpec,
    /// The Unix socket its disk is served on (NBD; the export is the disk's name), unless
    /// `block_device` is set.
    pub nbd_socket: &'a Path,
    /// The block device its disk is served as (ublk), for a driver that attaches one
    /// (QEMU); None: NBD on `nbd_socket`.
    pub block_device: Option<&'a Path>,
    /// Where the guest's RAM lives, for a driver that can keep it in a file Stasis reads
    /// (QEMU: a shared memory backend). Its save then writes only the device state, and
    /// its restore expects this file to hold the RAM again. None: the RAM is the
    /// hypervisor's own, and a save writes it with the device state.
    pub ram_file: Option<&'a Path>,
}

impl VmContext<'_> {
    pub fn nbd_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.spec.disk,
            self.nbd_socket.display()
        )
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    Running,
    Paused,
    /// Paused after a save that completed (QEMU's `postmigrate`): the image is whole.
    Saved,
    /// The hypervisor has no such VM running.
    Stopped,
    /// Neither: migrating, booting, an error state, ...
    Other,
}

impl VmStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Saved => "saved",
            VmStatus::Stopped => "stopped",
            VmStatus::Other => "other",
        }
    }
}

/// What the scheduler will weigh: how much CPU a VM used (idleness is the disk's idle time,
/// from its control socket, and the CPU time's growth).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct VmCounters {
    /// CPU seconds the VM's hypervisor process used (None: the driver cannot tell).
    pub cpu_seconds: Option<f64>,
}

pub trait Hypervisor {
    /// Boots the VM; its disk is already served at `vm.nbd_socket`.
    fn start(&self, vm: &VmContext) -> Result<(), HvError>;
    /// Stops the guest's CPUs (and its disk I/O: the hypervisor drains it).
    fn pause(&self, vm: &VmContext) -> Result<(), HvError>;
    /// Saves a paused VM's memory and device state to `file`. The VM stays, paused, until
    /// `kill`: the caller kills it once it has made the file durable and recorded it, so a
    /// crash in between leaves a VM that is saved again, not one lost.
    fn save(&self, vm: &VmContext, file: &Path) -> Result<(), HvError>;
    /// Starts the VM from `file`, paused.
    fn restore(&self, vm: &VmContext, file: &Path) -> Result<(), HvError>;
    fn resume(&self, vm: &VmContext) -> Result<(), HvError>;
    fn status(&self, vm: &VmContext) -> Result<VmStatus, HvError>;
    fn counters(&self, vm: &VmContext) -> Result<VmCounters, HvError>;
    /// Ends the VM at once, without saving.
    fn kill(&self, vm: &VmContext) -> Result<(), HvError>;
}

/// The driver a spec names (static dispatch).
pub enum Driver {
    Qemu(QemuDriver),
    Exec(ExecDriver),
    Xen(XenDriver),
}

impl Driver {
    pub fn for_spec(spec: &VmSpec) -> Driver {
        match &spec.driver {
            DriverConfig::Qemu {
                accel,
                extra_args,
                machine,
            } => Driver::Qemu(QemuDriver {
                accel: accel.clone(),
                extra_args: extra_args.clone(),
                machine: machine.clone(),
            }),
            DriverConfig::Exec {
                hooks,
                timeout_secs,
            } => Driver::Exec(ExecDriver {
                hooks: hooks.clone(),
                timeout: std::time::Duration::from_secs(*timeout_secs),
            }),
            DriverConfig::Xen { config } => Driver::Xen(XenDriver {
                config: config.clone(),
            }),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Driver::Qemu($d) => $e,
            Driver::Exec($d) => $e,
            Driver::Xen($d) => $e,
        }
    };
}

impl Hypervisor for Driver {
    fn start(&self, vm: &VmContext) -> Result<(), HvError> {
        dispatch!(self, d => d.start(vm))
    }
    fn pause(&self, vm: &VmContext) -> Result<(), HvError> {
        dispatch!(self, d => d.pause(vm))
    }
    fn save(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        dispatch!(self, d => d.save(vm, file))
    }
    fn restore(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        dispatch!(self, d => d.restore(vm, file))
    }
    fn resume(&self, vm: &VmContext) -> Result<(), HvError> {
        dispatch!(self, d => d.resume(vm))
    }
    fn status(&self, vm: &VmContext) -> Result<VmStatus, HvError> {
        dispatch!(self, d => d.status(vm))
    }
    fn counters(&self, vm: &VmContext) -> Result<VmCounters, HvError> {
        dispatch!(self, d => d.counters(vm))
    }
    fn kill(&self, vm: &VmContext) -> Result<(), HvError> {
        dispatch!(self, d => d.kill(vm))
    }
}

/// How long an exec hook may run unless its VM's driver says otherwise (a save of a large
/// VM to slow storage takes minutes).
pub const DEFAULT_HOOK_TIMEOUT_SECS: u64 = 900;

fn default_hook_timeout() -> u64 {
    DEFAULT_HOOK_TIMEOUT_SECS
}

/// How long QEMU's start or an `xl` command may run: `xl save` of a large domain to slow
/// storage takes long, and killing it half way leaves the domain suspended.
const COMMAND_TIMEOUT_SECS: u64 = 4 * 3600;

/// Runs a command (QEMU's start, `xl`) to its end and returns its stdout; it fails unless it
/// exits 0, or if it still runs after [`COMMAND_TIMEOUT_SECS`].
fn run_command(cmd: &mut std::process::Command) -> Result<String, HvError> {
    run_command_within(cmd, std::time::Duration::from_secs(COMMAND_TIMEOUT_SECS))
}

/// [`run_command`] with a time limit: past `limit` the command and what it started (its
/// process group) are killed (SIGKILL), and it fails, so a hung hook or `xl` cannot hang a
/// swapout forever. Its output is read until it closes, for at most 30 s after it exits.
fn run_command_within(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> Result<String, HvError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let shown = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HvError::io(format!("running {shown}"), e))?;
    // Read on threads of their own: a command that fills one pipe while we wait would block.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            let _ = tx.send(bytes);
        });
        rx
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                // SAFETY: kill of the process group we made the child lead (its pgid is its
                // pid), which it and what it started are in.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                // The readers are left behind: a child of the command may hold the pipes.
                return Err(HvError::Command {
                    command: format!("{cmd:?}"),
                    why: format!("still running after {} s: killed", limit.as_secs()),
                });
            }
            Err(e) => return Err(HvError::io(format!("waiting for {shown}"), e)),
        }
    };
    // A process the command left behind may hold its output open: wait for it a while only.
    let done_by = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(done_by.saturating_duration_since(std::time::Instant::now()))
    };
    let (out, err) = match (collect(stdout), collect(stderr)) {
        (Ok(out), Ok(err)) => (out, err),
        _ => {
            return Err(HvError::Command {
                command: format!("{cmd:?}"),
                why: format!(
                    "exited ({status}), but something it started still holds its output open \
                     after 30 s"
                ),
            })
        }
    };
    if !status.success() {
        return Err(HvError::Command {
            command: format!("{cmd:?}"),
            why: format!("{status}: {}", String::from_utf8_lossy(&err).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// CPU seconds (user + system) process `pid` used, from /proc.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the whole line, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf with a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_command_past_its_limit_is_killed_and_fails() {
        let t = Instant::now();
        let e = run_command_within(Command::new("sleep").arg("30"), Duration::from_millis(300))
            .unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn what_a_command_started_dies_with_it_at_the_limit() {
        let t = Instant::now();
        let e = run_command_within(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        // The background sleep held the output pipes: had it lived, this would wait 30 s.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn output_larger_than_a_pipe_comes_back_whole_and_failures_carry_stderr() {
        let out = run_command_within(
            Command::new("sh").args([
                "-c",
                "head -c 1000000 /dev/zero | tr '\\0' x; echo oops >&2",
            ]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.len(), 1_000_000);
        let e = run_command_within(
            Command::new("sh").args(["-c", "echo why >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(e.to_string().contains("why"), "{e}");
    }
}
