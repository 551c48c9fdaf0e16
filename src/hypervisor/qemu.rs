//! QEMU, driven over QMP.
//!
//! - start: `qemu-system-x86_64 -daemonize` with the disk as a virtio-blk drive on an NBD
//!   client (`-blockdev driver=nbd` over the Stasis server's Unix socket), `-rtc
//!   base=utc,clock=vm` (guest time stops while the VM is stopped or swapped out), the
//!   console on `console.log` (appended across restores) and QMP on `qmp.sock`.
//! - pause: `stop` (QEMU drains and flushes the drive: every write the guest completed is in
//!   the Stasis disk, durably, when it returns).
//! - guest RAM: where the caller gives a RAM file ([`VmContext::ram_file`]), a shared
//!   `memory-backend-file` on it, so the RAM is readable by Stasis and need not be copied
//!   by QEMU at save; otherwise QEMU's own anonymous memory.
//! - save: `migrate` to `file:`: with a RAM file, under `x-ignore-shared` (the file holds
//!   the device state and QEMU's small private RAM blocks; the guest RAM stays where it is);
//!   otherwise with the mapped-ram capability (each RAM page at a fixed offset, zero pages
//!   left as holes). Wait for completion; QEMU stays, paused, until killed.
//! - restore: the same command line plus `-incoming defer`, `migrate-incoming` from the
//!   file (the RAM file, if any, already holds the RAM); the guest was saved paused, so it
//!   stays paused until `cont`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp::Qmp;
use super::{
    process_cpu_seconds, run_command, HvError, Hypervisor, VmContext, VmCounters, VmStatus,
};

pub struct QemuDriver {
    pub accel: String,
    pub extra_args: Vec<String>,
    pub machine: Option<String>,
}

/// The versioned machine type QEMU's `pc` stands for here (from `-machine help`: "pc ...
/// (alias of pc-i440fx-10.0)"), or None if QEMU does not say.
pub fn default_machine() -> Option<String> {
    let out = Command::new(qemu_binary())
        .args(["-machine", "help"])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    pc_alias(&String::from_utf8_lossy(&out.stdout))
}

fn pc_alias(help: &str) -> Option<String> {
    help.lines()
        .find(|l| l.split_whitespace().next() == Some("pc"))
        .and_then(|l| l.split_once("(alias of "))
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|n| !n.is_empty() && !n.contains(','))
}

/// The QEMU binary: STASIS_QEMU, else qemu-system-x86_64 from PATH.
fn qemu_binary() -> String {
    std::env::var("STASIS_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// KVM when this host offers it to us, else TCG (software emulation).
pub fn default_accel() -> String {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm { "kvm" } else { "tcg" }.into()
}

fn qmp_path(vm: &VmContext) -> PathBuf {
    vm.dir.join("qmp.sock")
}

fn pid_path(vm: &VmContext) -> PathBuf {
    vm.dir.join("qemu.pid")
}

fn qemu_pid(vm: &VmContext) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_path(vm))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    crate::swap::process_running(pid as u64).then_some(pid)
}

/// Migration capabilities of a save and its restore, each set on or off (QEMU keeps them
/// from one migration to the next, and a restore must use the save's). Guest RAM in a shared
/// file (`x-ignore-shared`): QEMU saves only the device state (and its own small RAM blocks:
/// ROMs), the RAM stays in the file. Otherwise `mapped-ram`: each RAM page at a fixed offset
/// of the save file, zero pages left as holes.
fn migration_caps(vm: &VmContext) -> [(&'static str, bool); 2] {
    let shared = vm.ram_file.is_some();
    [("x-ignore-shared", shared), ("mapped-ram", !shared)]
}

impl QemuDriver {
    fn command_line(&self, vm: &VmContext, incoming: bool) -> Result<Vec<String>, HvError> {
        let spec = vm.spec;
        let blockdev = match vm.block_device {
            // The ublk device, with O_DIRECT: the store below has its own cache, and a
            // guest flush must reach it (QEMU's flush is an fdatasync of the device, which
            // the kernel passes to the ublk server as a FLUSH).
            Some(dev) => json!({
                "driver": "host_device",
                "node-name": "stasis-disk",
                "filename": dev,
                "cache": {"direct": true},
            }),
            None => json!({
                "driver": "nbd",
                "node-name": "stasis-disk",
                "server": {"type": "unix", "path": vm.nbd_socket},
                "export": spec.disk,
            }),
        };
        let mut machine = self.machine.clone().unwrap_or_else(|| "pc".into());
        let mut ram = Vec::new();
        if let Some(file) = vm.ram_file {
            // The guest's RAM is this file, mapped shared: Stasis reads it once the VM is
            // paused, where QEMU would otherwise copy every page into its save file.
            machine.push_str(",memory-backend=stasis-ram");
            ram = vec![
                "-object".into(),
                format!(
                    "memory-backend-file,id=stasis-ram,size={}M,mem-path={},share=on",
                    spec.mem_mib,
                    file.display()
                ),
            ];
        }
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("stasis-{},process=stasis-vm-{}", vm.name, vm.name),
            "-machine".into(),
            machine,
            "-accel".into(),
            self.accel.clone(),
            "-m".into(),
            format!("{}M", spec.mem_mib),
            "-smp".into(),
            spec.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-rtc".into(),
            "base=utc,clock=vm".into(),
            "-blockdev".into(),
            blockdev.to_string(),
            "-device".into(),
            "virtio-blk-pci,drive=stasis-disk,id=stasis-disk-dev,bootindex=1".into(),
            "-chardev".into(),
            format!(
                "file,id=console,path={},append=on",
                vm.console_log().display()
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path(vm).display()),
            "-daemonize".into(),
            "-pidfile".into(),
            pid_path(vm).display().to_string(),
        ];
        for (flag, file) in [("-kernel", &spec.kernel), ("-initrd", &spec.initrd)] {
            if let Some(f) = file {
                args.extend([flag.into(), f.display().to_string()]);
            }
        }
        if let Some(a) = &spec.append {
            args.extend(["-append".into(), a.clone()]);
        }
        args.extend(ram);
        args.extend(self.extra_args.iter().cloned());
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let ram_file = vm.ram_file.map(Path::to_path_buf);
        for p in [Some(qmp_path(vm)), Some(pid_path(vm)), ram_file]
            .iter()
            .flatten()
        {
            if p.to_str().is_some_and(|s| s.contains(',')) {
                return Err(HvError::Failed(format!(
                    "{} holds a comma, which QEMU's option syntax cannot take",
                    p.display()
                )));
            }
        }
        Ok(args)
    }

    /// Starts QEMU; with -daemonize it returns once QEMU is initialized (QMP listening).
    fn launch(&self, vm: &VmContext, incoming: bool) -> Result<(), HvError> {
        if let Some(pid) = qemu_pid(vm) {
            return Err(HvError::Failed(format!(
                "QEMU already runs for VM {} (pid {pid})",
                vm.name
            )));
        }
        let _ = std::fs::remove_file(qmp_path(vm));
        if let (Some(ram), false) = (vm.ram_file, incoming) {
            // A fresh boot starts from zeroed RAM, not from what an earlier run (a KVM probe)
            // left there: emptied and sized again, in place (the file stays reserved).
            let size = vm.spec.mem_mib << 20;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(ram)
                .and_then(|f| f.set_len(size))
                .map_err(|e| HvError::io(format!("emptying the RAM file {}", ram.display()), e))?;
        }
        let args = self.command_line(vm, incoming)?;
        tracing::debug!(vm = vm.name, ?args, "starting QEMU");
        run_command(Command::new(qemu_binary()).args(&args))?;
        Ok(())
    }

    fn qmp(&self, vm: &VmContext) -> Result<Qmp, HvError> {
        if qemu_pid(vm).is_none() {
            return Err(HvError::Failed(format!(
                "QEMU is not running VM {}",
                vm.name
            )));
        }
        Qmp::connect(&qmp_path(vm), Duration::from_secs(10))
    }

    fn set_caps(q: &mut Qmp, vm: &VmContext) -> Result<(), HvError> {
        let caps: Vec<Value> = migration_caps(vm)
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        Ok(())
    }

    /// Waits for the migration QEMU runs (out or in) to complete.
    fn wait_migration(q: &mut Qmp, what: &str) -> Result<Value, HvError> {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let r = q.execute("query-migrate", json!({}))?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(r),
                Some("failed") | Some("cancelled") => {
                    return Err(HvError::Failed(format!(
                        "{what} failed: {}",
                        r.get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(HvError::Failed(format!(
                        "{what} did not end within an hour"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Waits for QEMU's process to end (after `quit`).
    fn wait_exit(vm: &VmContext, limit: Duration) -> Result<(), HvError> {
        let deadline = Instant::now() + limit;
        while qemu_pid(vm).is_some() {
            if Instant::now() > deadline {
                return Err(HvError::Failed(format!(
                    "QEMU of VM {} did not exit after quit",
                    vm.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(pid_path(vm));
        Ok(())
    }
}

impl Hypervisor for QemuDriver {
    fn start(&self, vm: &VmContext) -> Result<(), HvError> {
        self.launch(vm, false)
    }

    fn pause(&self, vm: &VmContext) -> Result<(), HvError> {
        self.qmp(vm)?.execute("stop", json!({}))?;
        Ok(())
    }

    fn save(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        let mut q = self.qmp(vm)?;
        let status = q.execute("query-status", json!({}))?;
        if status.get("running").and_then(Value::as_bool) != Some(false) {
            return Err(HvError::Failed(format!(
                "VM {} must be paused before it is saved",
                vm.name
            )));
        }
        // A save a dead run started goes on in QEMU without its client, to the same file (the
        // record names it): wait for it, or take it if it has just completed, rather than
        // start another, which QEMU refuses after a completed one and which would write over
        // the file.
        let previous = q.execute("query-migrate", json!({}))?;
        let previous = previous.get("status").and_then(Value::as_str);
        let taken_over = match previous {
            Some("setup" | "active" | "pre-switchover" | "device" | "wait-unplug") => true,
            Some("completed") => {
                status.get("status").and_then(Value::as_str) == Some("postmigrate")
                    && file.is_file()
            }
            _ => false,
        };
        if !taken_over {
            let _ = std::fs::remove_file(file);
            Self::set_caps(&mut q, vm)?;
            q.execute(
                "migrate",
                json!({ "uri": format!("file:{}", file.display()) }),
            )?;
        }
        let r = Self::wait_migration(&mut q, "saving the VM")?;
        // QEMU stays, paused (postmigrate), until the caller has recorded the file and
        // kills it: a crash before that finds the VM still here and saves it again.
        tracing::info!(vm = vm.name, total_ms = ?r.get("total-time"), "saved");
        Ok(())
    }

    fn restore(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        self.launch(vm, true)?;
        let restored = (|| {
            let mut q = self.qmp(vm)?;
            Self::set_caps(&mut q, vm)?;
            q.execute(
                "migrate-incoming",
                json!({ "uri": format!("file:{}", file.display()) }),
            )?;
            Self::wait_migration(&mut q, "restoring the VM")?;
            // The source was paused when saved, so the destination waits for `cont`.
            let status = q.execute("query-status", json!({}))?;
            if status.get("running").and_then(Value::as_bool) != Some(false) {
                return Err(HvError::Failed(format!(
                    "VM {} runs before it was resumed (status {status})",
                    vm.name
                )));
            }
            Ok(())
        })();
        if restored.is_err() {
            let _ = self.kill(vm);
        }
        restored
    }

    fn resume(&self, vm: &VmContext) -> Result<(), HvError> {
        self.qmp(vm)?.execute("cont", json!({}))?;
        Ok(())
    }

    fn status(&self, vm: &VmContext) -> Result<VmStatus, HvError> {
        if qemu_pid(vm).is_none() {
            return Ok(VmStatus::Stopped);
        }
        let s = self.qmp(vm)?.execute("query-status", json!({}))?;
        Ok(match s.get("status").and_then(Value::as_str) {
            Some("running") => VmStatus::Running,
            Some("paused") => VmStatus::Paused,
            Some("postmigrate") => VmStatus::Saved,
            _ => VmStatus::Other,
        })
    }

    fn counters(&self, vm: &VmContext) -> Result<VmCounters, HvError> {
        Ok(VmCounters {
            cpu_seconds: qemu_pid(vm).and_then(process_cpu_seconds),
        })
    }

    fn kill(&self, vm: &VmContext) -> Result<(), HvError> {
        let Some(pid) = qemu_pid(vm) else {
            return Ok(());
        };
        let quit = Qmp::connect(&qmp_path(vm), Duration::from_secs(2))
            .and_then(|mut q| q.execute("quit", json!({})));
        if quit.is_err() || Self::wait_exit(vm, Duration::from_secs(10)).is_err() {
            // SAFETY: kill of the pid QEMU wrote, which still runs.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Self::wait_exit(vm, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{DriverConfig, VmSpec};

    fn spec() -> VmSpec {
        VmSpec {
            disk: "d".into(),
            mem_mib: 256,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: None,
            driver: DriverConfig::Qemu {
                accel: "tcg".into(),
                extra_args: vec![],
                machine: Some("pc-i440fx-10.0".into()),
            },
            drive: crate::hypervisor::DriveChoice::Auto,
        }
    }

    fn driver() -> QemuDriver {
        QemuDriver {
            accel: "tcg".into(),
            extra_args: vec![],
            machine: Some("pc-i440fx-10.0".into()),
        }
    }

    #[test]
    fn a_ram_file_becomes_a_shared_memory_backend_saved_apart() {
        let spec = spec();
        let dir = Path::new("/s/vms/v");
        let ram = Path::new("/dev/shm/stasis-x-v.ram");
        let vm = VmContext {
            name: "v",
            dir,
            spec: &spec,
            nbd_socket: Path::new("/s/vms/v/disk.sock"),
            block_device: None,
            ram_file: Some(ram),
        };
        let args = driver().command_line(&vm, false).unwrap();
        let after = |args: &[String], flag: &str| {
            args[args.iter().position(|a| a == flag).unwrap() + 1].clone()
        };
        assert_eq!(
            after(&args, "-machine"),
            "pc-i440fx-10.0,memory-backend=stasis-ram"
        );
        assert!(after(&args, "-blockdev").contains(r#""driver":"nbd""#));
        assert_eq!(
            after(&args, "-object"),
            "memory-backend-file,id=stasis-ram,size=256M,mem-path=/dev/shm/stasis-x-v.ram,share=on"
        );
        assert_eq!(
            migration_caps(&vm),
            [("x-ignore-shared", true), ("mapped-ram", false)]
        );
        // Without one: QEMU's own memory, saved with mapped-ram.
        let vm = VmContext {
            ram_file: None,
            ..vm
        };
        let args = driver().command_line(&vm, true).unwrap();
        assert!(!args.iter().any(|a| a == "-object"));
        assert_eq!(args.last().map(String::as_str), Some("defer"));
        assert_eq!(
            migration_caps(&vm),
            [("x-ignore-shared", false), ("mapped-ram", true)]
        );
        // A ublk device: QEMU opens it directly, with O_DIRECT.
        let vm = VmContext {
            block_device: Some(Path::new("/dev/ublkb3")),
            ..vm
        };
        let args = driver().command_line(&vm, false).unwrap();
        let blockdev: Value = serde_json::from_str(&after(&args, "-blockdev")).unwrap();
        assert_eq!(
            blockdev,
            json!({"driver": "host_device", "node-name": "stasis-disk",
                   "filename": "/dev/ublkb3", "cache": {"direct": true}})
        );
        // QEMU's option syntax would split a path at a comma.
        let vm = VmContext {
            ram_file: Some(Path::new("/dev/shm/a,b.ram")),
            ..vm
        };
        assert!(driver().command_line(&vm, false).is_err());
    }

    #[test]
    fn the_pc_alias_is_read_from_machine_help() {
        let help = "Supported machines are:\nmicrovm              microvm (i386)\n\
                    pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
                    pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
                    q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n";
        assert_eq!(super::pc_alias(help).as_deref(), Some("pc-i440fx-10.0"));
        assert_eq!(
            super::pc_alias("Supported machines are:\npc-i440fx-9.2 x\n"),
            None
        );
    }
}
