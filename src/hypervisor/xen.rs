//! Xen, through the `xl` toolstack (kernel-notes/xen.md says exactly what this relies on).
//! The domain is named after the VM; its xl configuration file must give it the Stasis disk
//! (over NBD through qemu-xen's qdisk backend: `stasis vm start` serves the disk over NBD).
//!
//! Known limit (kernel-notes/xen.md): `xl save` suspends a PV, PVH or PV-on-HVM guest by
//! asking it (xenstore control/shutdown), which a domain paused by `xl pause` cannot answer;
//! only HVM guests without PV drivers save after a pause. The deeper hook is libxenguest's
//! suspend callback (freeze the disk there), not yet built.
//!
//! Not run by the tests: this machine has no Xen. The commands are those of xl(1) as of Xen
//! 4.17: `xl create`, `xl pause`, `xl save -p` (the domain stays, paused, after the image
//! is written; we destroy it after), `xl restore -p` (restored paused), `xl unpause`,
//! `xl list`, `xl destroy`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run_command, HvError, Hypervisor, VmContext, VmCounters, VmStatus};

pub struct XenDriver {
    pub config: PathBuf,
}

fn xl() -> Command {
    Command::new(std::env::var("STASIS_XL").unwrap_or_else(|_| "xl".into()))
}

/// One domain's line of `xl list NAME`: name, id, mem, vcpus, state, time(s).
fn list_line(vm: &VmContext) -> Result<Option<Vec<String>>, HvError> {
    match run_command(xl().args(["list", vm.name])) {
        Ok(out) => Ok(out
            .lines()
            .nth(1)
            .map(|l| l.split_whitespace().map(String::from).collect())),
        // xl list exits non-zero for a domain that does not exist.
        Err(HvError::Command { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Hypervisor for XenDriver {
    fn start(&self, vm: &VmContext) -> Result<(), HvError> {
        run_command(
            xl().arg("create")
                .arg(&self.config)
                .arg(format!("name=\"{}\"", vm.name)),
        )
        .map(drop)
    }

    fn pause(&self, vm: &VmContext) -> Result<(), HvError> {
        run_command(xl().args(["pause", vm.name])).map(drop)
    }

    /// The image carries the domain's configuration as created (with its name): no config
    /// file is passed here or at restore, which would replace it.
    fn save(&self, vm: &VmContext, file: &Path) -> Result<(), HvError> {
        // `-p`: the domain stays, paused, until the caller kills it (see the trait).
        run_command(xl().args(["save", "-p", vm.name]).arg(file)).map(drop)
    }

    fn restore(&self, _vm: &VmContext, file: &Path) -> Result<(), HvError> {
        run_command(xl().args(["restore", "-p"]).arg(file)).map(drop)
    }

    fn resume(&self, vm: &VmContext) -> Result<(), HvError> {
        run_command(xl().args(["unpause", vm.name])).map(drop)
    }

    /// The state column: r running, b blocked (idle: running), p paused.
    fn status(&self, vm: &VmContext) -> Result<VmStatus, HvError> {
        let Some(line) = list_line(vm)? else {
            return Ok(VmStatus::Stopped);
        };
        let state = line.get(4).map(String::as_str).unwrap_or("");
        Ok(if state.contains('p') {
            VmStatus::Paused
        } else if state.contains('r') || state.contains('b') {
            VmStatus::Running
        } else {
            VmStatus::Other
        })
    }

    fn counters(&self, vm: &VmContext) -> Result<VmCounters, HvError> {
        let cpu = list_line(vm)?.and_then(|l| l.get(5).and_then(|t| t.parse().ok()));
        Ok(VmCounters { cpu_seconds: cpu })
    }

    fn kill(&self, vm: &VmContext) -> Result<(), HvError> {
        if list_line(vm)?.is_none() {
            return Ok(());
        }
        run_command(xl().args(["destroy", vm.name])).map(drop)
    }
}
