//! Any hypervisor, through hook commands the user provides: a directory holding executables
//! named `start`, `pause`, `save`, `restore`, `resume`, `kill` and, optionally, `status` and
//! `counters`. Each runs with the VM described in its environment (kernel-notes/
//! hypervisors.md, "exec"); `save` and `restore` get the memory image's path as their one
//! argument. A hook succeeds by exiting 0; its stderr explains a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run_command_within, HvError, Hypervisor, VmContext, VmCounters, VmStatus};

pub struct ExecDriver {
    pub hooks: PathBuf,
    /// A hook that runs longer is killed and fails.
    pub timeout: std::time::Duration,
}

impl ExecDriver {
    fn hook(&self, vm: &VmContext, name: &str, arg: Option<&Path>) -> Result<String, HvError> {
        let path = self.hooks.join(name);
        let mut cmd = Command::new(&path);
        if let Some(a) = arg {
            cmd.arg(a);
        }
        let spec = vm.spec;
        if let Ok(exe) = std::env::current_exe() {
            cmd.env("STASIS_BIN", exe);
        }
        cmd.env("STASIS_VM", vm.name)
            .env("STASIS_VM_DIR", vm.dir)
            .env("STASIS_DISK", &spec.disk)
            .env("STASIS_NBD_SOCKET", vm.nbd_socket)
            .env("STASIS_NBD_URI", vm.nbd_uri())
            .env("STASIS_MEM_MIB", spec.mem_mib.to_string())
            .env("STASIS_CPUS", spec.cpus.to_string())
            .env("STASIS_CONSOLE_LOG", vm.console_log());
        for (key, value) in [
            (
                "STASIS_KERNEL",
                spec.kernel.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "STASIS_INITRD",
                spec.initrd.as_ref().map(|p| p.display().to_string()),
            ),
            ("STASIS_APPEND", spec.append.clone()),
        ] {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        tracing::debug!(vm = vm.name, hook = name, "running hook");
        run_command_within(&mut cmd, self.timeout)
    }

    fn has_hook(&self, name: &str) -> bool {
        self.hooks.join(name).is_file()
    }
}

impl Hypervisor for ExecDriver {
    fn start(&self, vm: &VmContext) -> Result<(), HvError> {
        self.hook(vm, "start", None).map(drop)
    }

    fn pause(&self, vm: &VmContext) -> Result<(), HvError> {
        self.hook(vm, "pause", None).map(drop)
    }

    fn save(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        self.hook(vm, "save", Some(file))?;
        if !file.is_file() {
            return Err(HvError::Failed(format!(
                "the save hook succeeded but wrote no {}",
                file.display()
            )));
        }
        Ok(())
    }

    fn restore(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        self.hook(vm, "restore", Some(file)).map(drop)
    }

    fn resume(&self, vm: &VmContext) -> Result<(), HvError> {
        self.hook(vm, "resume", None).map(drop)
    }

    /// The `status` hook prints running, paused or stopped; without one: other.
    fn status(&self, vm: &VmContext) -> Result<VmStatus, HvError> {
        if !self.has_hook("status") {
            return Ok(VmStatus::Other);
        }
        Ok(match self.hook(vm, "status", None)?.trim() {
            "running" => VmStatus::Running,
            "paused" => VmStatus::Paused,
            "saved" => VmStatus::Saved,
            "stopped" => VmStatus::Stopped,
            _ => VmStatus::Other,
        })
    }

    /// The `counters` hook prints a JSON object like {"cpu_seconds": 1.5}.
    fn counters(&self, vm: &VmContext) -> Result<VmCounters, HvError> {
        if !self.has_hook("counters") {
            return Ok(VmCounters::default());
        }
        let out = self.hook(vm, "counters", None)?;
        serde_json::from_str(out.trim())
            .map_err(|e| HvError::Protocol(format!("counters hook printed {out:?}: {e}")))
    }

    fn kill(&self, vm: &VmContext) -> Result<(), HvError> {
        self.hook(vm, "kill", None).map(drop)
    }
}
