//! `stasis vm ...`, `stasis experiment ...` and `stasis qmp`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::{open_repo, print_json, progress_bar, Failure, RepoArg};
use crate::hypervisor::{DriveChoice, DriverConfig, VmSpec};
use crate::store::Store;
use crate::units::{human, parse_size};
use crate::vm::{self, experiment, VmError, VmState};

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Start a VM on a disk: the disk is served (ublk or NBD) and the hypervisor boots on it
    #[command(group(clap::ArgGroup::new("boot").required(true).args(["kernel", "boot_disk"])))]
    Start {
        name: String,
        /// The Stasis disk that is its drive
        #[arg(long)]
        disk: String,
        /// Memory, e.g. 512M or 2G
        #[arg(long, value_parser = parse_size)]
        mem: u64,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Kernel to boot directly (with --initrd and --append)
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        /// Boot from the disk itself (its boot loader) instead of --kernel
        #[arg(long)]
        boot_disk: bool,
        /// Hypervisor driver
        #[arg(long, default_value = "qemu", value_parser = ["qemu", "exec", "xen"])]
        driver: String,
        /// For --driver exec: the directory of hook commands (kernel-notes/hypervisors.md)
        #[arg(long, value_name = "DIR", required_if_eq("driver", "exec"))]
        hooks: Option<PathBuf>,
        /// For --driver exec: seconds a hook may run before it is killed and fails
        #[arg(long, value_name = "SECS", default_value_t = crate::hypervisor::DEFAULT_HOOK_TIMEOUT_SECS)]
        hook_timeout: u64,
        /// For --driver xen: the domain's xl configuration file
        #[arg(long, value_name = "FILE", required_if_eq("driver", "xen"))]
        xen_config: Option<PathBuf>,
        /// For --driver qemu: kvm or tcg [default: kvm when it works here, else tcg]
        #[arg(long, value_parser = ["kvm", "tcg"])]
        accel: Option<String>,
        /// For --driver qemu: an extra QEMU argument (repeat for more)
        #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
        qemu_args: Vec<String>,
        /// For --driver qemu: keep the guest's RAM in QEMU's own memory (KSM can merge it)
        /// instead of a shared file in /dev/shm that a swapout reads directly; a swapout
        /// then waits for QEMU to copy the RAM into a save file
        #[arg(long)]
        private_ram: bool,
        /// How the disk reaches the hypervisor: ublk (/dev/ublkbN, QEMU only, hosts with
        /// ublk), nbd (a Unix socket), or auto: ublk for QEMU where this host has it
        #[arg(long, value_enum, default_value = "auto")]
        drive: DriveChoice,
    },
    /// Swap a running VM out: pause, save memory and device state, store disk and memory in
    /// the repository, free this node
    Swapout {
        name: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Swap a VM in on this node, from its VM manifest or its name (newest swapout): it
    /// continues where it was paused
    Swapin {
        /// VM manifest name, or VM name
        what: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// The VMs of this node (and, with --repo, the VMs swapped out to that repository)
    List {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// One VM: state, hypervisor status, CPU time, disk idle time
    Status { name: String },
    /// Stop a VM's CPUs (its disk I/O drained and flushed); it stays in memory
    Pause { name: String },
    /// Let a paused VM run again
    Resume { name: String },
    /// End a VM without saving it (its disk stays, with what the guest flushed)
    Kill { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ExperimentCmd {
    /// Group VMs of this node into an experiment
    Create {
        name: String,
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
    },
    /// Swap every VM of the experiment out, consistently: all pause first, then all are saved
    Swapout {
        name: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Swap an experiment in (its manifest, or its name: the newest); all resume together
    Swapin {
        what: String,
        #[command(flatten)]
        repo: RepoArg,
    },
    /// The experiments of this node
    List,
}

impl From<VmError> for Failure {
    fn from(e: VmError) -> Self {
        if e.is_usage() {
            Failure::Usage(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    }
}

/// The repository named by --repo / STASIS_REPO, else `recorded` (where the VM or the
/// experiment went to or came from), else the store's own.
fn repo_or_recorded(
    store: &Store,
    arg: &RepoArg,
    recorded: Option<String>,
    create: bool,
) -> Result<crate::repo::RepoHandle, Failure> {
    match (&arg.url, recorded) {
        (None, Some(url)) => Ok(crate::repo::RepoHandle::open(&url, create)?),
        _ => open_repo(store, arg, create),
    }
}

/// The progress callback of `vm` and `experiment` operations: the bar's message is `what`
/// and the current stage; bytes when the stage knows a total.
fn stage_progress<'a>(
    pb: &'a indicatif::ProgressBar,
    what: &'a str,
) -> impl Fn(&str, u64, u64) + Sync + 'a {
    move |stage, done, total| {
        pb.set_message(format!("{what}: {stage}"));
        pb.set_length(total);
        pb.set_position(done);
    }
}

pub fn vm_cmd(store: &Store, cmd: VmCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        VmCmd::Start {
            name,
            disk,
            mem,
            cpus,
            kernel,
            initrd,
            append,
            boot_disk: _,
            driver,
            hooks,
            hook_timeout,
            xen_config,
            accel,
            qemu_args,
            private_ram,
            drive,
        } => {
            if mem < (16 << 20) || mem % (1 << 20) != 0 {
                return Err(Failure::Usage(
                    "--mem must be a whole number of MiB, at least 16M".into(),
                ));
            }
            let absolute = |p: Option<PathBuf>| p.map(|p| std::path::absolute(&p).unwrap_or(p));
            let driver = match driver.as_str() {
                "exec" => DriverConfig::Exec {
                    hooks: absolute(hooks).unwrap_or_default(),
                    timeout_secs: hook_timeout,
                },
                "xen" => DriverConfig::Xen {
                    config: absolute(xen_config).unwrap_or_default(),
                },
                _ => DriverConfig::Qemu {
                    // "auto": KVM if it works here, else TCG (decided at start, then kept).
                    accel: accel.unwrap_or_else(|| "auto".into()),
                    // Pinned at start, unless the user chose one (--qemu-arg -machine ...
                    // comes after ours and wins).
                    machine: crate::hypervisor::default_machine(),
                    extra_args: qemu_args,
                },
            };
            let spec = VmSpec {
                disk,
                mem_mib: mem >> 20,
                cpus,
                kernel: absolute(kernel),
                initrd: absolute(initrd),
                append,
                driver,
                drive,
            };
            let rec = vm::start(store, &name, spec, private_ram)?;
            let dir = vm::vm_dir(store, &name);
            if json {
                print_json(
                    &json!({"vm": rec.name, "state": "running", "disk": rec.spec.disk,
                    "driver": rec.spec.driver.kind(), "dir": dir, "ram_file": rec.ram_path,
                    "disk_device": rec.disk_device,
                    "console": dir.join("console.log"), "disk_server_pid": rec.server_pid}),
                );
            } else {
                println!(
                    "VM {name} running ({} driver) on disk {}; console: {}",
                    rec.spec.driver.kind(),
                    rec.spec.disk,
                    dir.join("console.log").display()
                );
            }
            Ok(())
        }
        VmCmd::Swapout { name, repo } => {
            // By default a VM goes back to the repository it came from. The VM is looked
            // up first: an unknown one must not create the store's repository.
            let rec = vm::load(store, &name)?;
            let handle = repo_or_recorded(store, &repo, rec.repo, true)?;
            let what = format!("swapout {name}");
            let pb = progress_bar(json, &what);
            let show = stage_progress(&pb, &what);
            let s = vm::swapout(store, &name, &handle, None, &show);
            pb.finish_and_clear();
            let s = s?;
            if json {
                print_json(&json!({ "vm_swapout": s }));
            } else {
                println!(
                    "swapped out VM {name} as {} in {:.2}s (paused in {:.1} ms, saved in {:.2}s): memory {} in {} chunks, {} uploaded ({} chunks already held); disk {} uploaded",
                    s.manifest,
                    s.seconds,
                    s.pause_ms,
                    s.save_seconds,
                    human(s.memory.size),
                    s.memory.chunks,
                    human(s.memory.bytes_uploaded),
                    s.memory.chunks_reused,
                    human(s.disk.as_ref().map_or(0, |d| d.bytes_uploaded)),
                );
                println!(
                    "bring it back (on any node) with: stasis vm swapin {name} --repo {}",
                    s.repo
                );
            }
            Ok(())
        }
        VmCmd::Swapin { what, repo } => {
            // A VM swapped out from here knows its repository.
            let recorded = vm::load(store, &what)
                .ok()
                .filter(|rec| rec.state == VmState::SwappedOut)
                .and_then(|rec| rec.repo);
            let handle = repo_or_recorded(store, &repo, recorded, false)?;
            let m = vm::find_vm_manifest(&handle, &what)?;
            let label = format!("swapin {what}");
            let pb = progress_bar(json, &label);
            let show = stage_progress(&pb, &label);
            let s = vm::swapin(store, &handle, &m, true, &show);
            pb.finish_and_clear();
            let s = s?;
            if json {
                print_json(&json!({ "vm_swapin": s }));
            } else {
                println!(
                    "swapped in VM {} from {} in {:.2}s (memory rebuilt in {:.2}s, {} chunks; restored in {:.2}s); it runs on, its disk arrives on demand",
                    s.vm, s.manifest, s.seconds, s.memory_seconds, s.memory_chunks, s.restore_seconds
                );
            }
            Ok(())
        }
        VmCmd::List { repo } => {
            let local = vm::list(store)?;
            let mut rows = Vec::new();
            for rec in &local {
                let status = vm::status(store, rec)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|e| format!("unknown ({e})"));
                rows.push(json!({"vm": rec.name, "where": "here", "state": rec.state,
                    "status": status, "disk": rec.spec.disk, "driver": rec.spec.driver.kind(),
                    "manifest": rec.manifest, "repo": rec.repo}));
            }
            if repo.url.is_some() {
                let handle = open_repo(store, &repo, false)?;
                let mut newest: std::collections::BTreeMap<String, crate::repo::ManifestInfo> =
                    Default::default();
                for (info, _) in handle.list()? {
                    if info.kind != crate::repo::Kind::Vm {
                        continue;
                    }
                    let vm = info.source.clone().unwrap_or_default();
                    if newest
                        .get(&vm)
                        .is_none_or(|n| n.created_at <= info.created_at)
                    {
                        newest.insert(vm, info);
                    }
                }
                for (vm, info) in newest {
                    rows.push(json!({"vm": vm, "where": "repository", "state": "swapped-out",
                        "manifest": info.name, "created_at": info.created_at, "repo": handle.url()}));
                }
            }
            if json {
                print_json(&json!(rows));
            } else if rows.is_empty() {
                println!("no VMs");
            } else {
                println!(
                    "{:<16} {:<11} {:<13} {:<9} {:<16} MANIFEST",
                    "VM", "WHERE", "STATE", "STATUS", "DISK"
                );
                for r in rows {
                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{:<16} {:<11} {:<13} {:<9} {:<16} {}",
                        s("vm"),
                        s("where"),
                        s("state"),
                        s("status"),
                        s("disk"),
                        s("manifest")
                    );
                }
            }
            Ok(())
        }
        VmCmd::Status { name } => {
            let rec = vm::load(store, &name)?;
            let status = vm::status(store, &rec)?;
            let counters = if rec.state == VmState::Running {
                vm::counters(store, &rec)?
            } else {
                Default::default()
            };
            let idle = crate::control::request(
                &store.control_socket(&rec.spec.disk),
                &rec.spec.disk,
                "stats",
            )
            .ok()
            .and_then(|v| v.get("stats")?.get("idle_seconds").cloned());
            let dir = vm::vm_dir(store, &name);
            if json {
                print_json(&json!({"vm": name, "state": rec.state, "status": status,
                    "cpu_seconds": counters.cpu_seconds, "disk_idle_seconds": idle,
                    "disk": rec.spec.disk, "manifest": rec.manifest, "repo": rec.repo,
                    "disk_device": rec.disk_device, "ram_file": rec.ram_path,
                    "console": dir.join("console.log")}));
            } else {
                println!(
                    "VM {name}: {:?}, hypervisor says {}; CPU {}; disk {} idle for {}s; console {}",
                    rec.state,
                    status.as_str(),
                    counters
                        .cpu_seconds
                        .map_or("unknown".into(), |c| format!("{c:.1}s")),
                    rec.spec.disk,
                    idle.map_or("?".into(), |v| v.to_string()),
                    dir.join("console.log").display()
                );
            }
            Ok(())
        }
        VmCmd::Pause { name } => {
            let took = vm::pause(store, &name)?;
            if json {
                print_json(
                    &json!({"vm": name, "paused": true, "pause_ms": took.as_secs_f64() * 1000.0}),
                );
            } else {
                println!("VM {name} paused in {:.1} ms", took.as_secs_f64() * 1000.0);
            }
            Ok(())
        }
        VmCmd::Resume { name } => {
            vm::resume(store, &name)?;
            if json {
                print_json(&json!({"vm": name, "running": true}));
            } else {
                println!("VM {name} running");
            }
            Ok(())
        }
        VmCmd::Kill { name } => {
            vm::kill(store, &name)?;
            if json {
                print_json(&json!({"vm": name, "killed": true}));
            } else {
                println!("VM {name} ended; its disk stays");
            }
            Ok(())
        }
    }
}

pub fn experiment_cmd(store: &Store, cmd: ExperimentCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        ExperimentCmd::Create { name, vms } => {
            let rec = experiment::create(store, &name, &vms)?;
            if json {
                print_json(&json!(rec));
            } else {
                println!("experiment {name}: {}", rec.vms.join(", "));
            }
        }
        ExperimentCmd::Swapout { name, repo } => {
            // By default an experiment goes back to the repository it came from.
            let rec = experiment::load_experiment(store, &name)?;
            let handle = repo_or_recorded(store, &repo, rec.repo, true)?;
            let what = format!("swapout {name}");
            let pb = progress_bar(json, &what);
            let show = stage_progress(&pb, &what);
            let s = experiment::swapout(store, &name, &handle, &show);
            pb.finish_and_clear();
            let s = s?;
            if json {
                print_json(&json!({ "experiment_swapout": s }));
            } else {
                println!(
                    "swapped out experiment {name} as {} in {:.2}s: {} VMs paused within {:.1} ms of each other",
                    s.manifest,
                    s.seconds,
                    s.pauses.len(),
                    s.pause_skew_ms
                );
                for v in &s.vms {
                    println!(
                        "  {}: {} ({} memory uploaded, {} chunks already held)",
                        v.vm,
                        v.manifest,
                        human(v.memory.bytes_uploaded),
                        v.memory.chunks_reused
                    );
                }
                println!(
                    "bring it back with: stasis experiment swapin {name} --repo {}",
                    handle.url()
                );
            }
        }
        ExperimentCmd::Swapin { what, repo } => {
            let recorded = experiment::load_experiment(store, &what)
                .ok()
                .and_then(|rec| rec.repo);
            let handle = repo_or_recorded(store, &repo, recorded, false)?;
            let label = format!("swapin {what}");
            let pb = progress_bar(json, &label);
            let show = stage_progress(&pb, &label);
            let s = experiment::swapin(store, &what, &handle, &show);
            pb.finish_and_clear();
            let s = s?;
            if json {
                print_json(&json!({ "experiment_swapin": s }));
            } else {
                println!(
                    "swapped in experiment {} from {} in {:.2}s: {} VMs resumed within {:.1} ms of each other",
                    s.experiment,
                    s.manifest,
                    s.seconds,
                    s.resumes.len(),
                    s.resume_skew_ms
                );
            }
        }
        ExperimentCmd::List => {
            let all = experiment::list_experiments(store)?;
            if json {
                print_json(&json!(all));
            } else if all.is_empty() {
                println!("no experiments");
            } else {
                for e in all {
                    println!(
                        "{}: {} (last manifest: {})",
                        e.name,
                        e.vms.join(", "),
                        e.manifest.as_deref().unwrap_or("-")
                    );
                }
            }
        }
    }
    Ok(())
}

/// `stasis qmp SOCKET COMMAND [ARGUMENTS-JSON]`: one QMP command, its `return` printed as
/// JSON (for hook scripts of the exec driver, and for operators).
pub fn qmp(
    socket: &std::path::Path,
    command: &str,
    arguments: Option<&str>,
) -> Result<(), Failure> {
    let args: serde_json::Value = match arguments {
        Some(a) => serde_json::from_str(a)
            .map_err(|e| Failure::Usage(format!("arguments must be a JSON object: {e}")))?,
        None => json!({}),
    };
    if !args.is_object() {
        return Err(Failure::Usage("arguments must be a JSON object".into()));
    }
    let mut q = crate::hypervisor::qmp::Qmp::connect(socket, std::time::Duration::from_secs(10))
        .map_err(|e| Failure::Failed(e.to_string()))?;
    let r = q
        .execute(command, args)
        .map_err(|e| Failure::Failed(e.to_string()))?;
    println!("{r}");
    Ok(())
}
