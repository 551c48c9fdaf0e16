//! The `stasis` command line.
//!
//! Exit status: 0 on success, 2 for wrong use (bad arguments, unknown names, a name already
//! taken, a disk in use; nothing was changed), 1 for failures of the store or the machine.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::control::{ControlServer, ServeInfo};
use crate::frontend::nbd::{Listen, NbdServer};
use crate::frontend::Served;
use crate::store::{Store, StoreError};
use crate::units::{human, parse_size};

mod vm;

#[derive(Parser, Debug)]
#[command(
    name = "stasis",
    version,
    about = "Stateful swapout of virtual machines: branching copy-on-write VM disks"
)]
pub struct Cli {
    /// Store directory [default: /var/lib/stasis as root, else $XDG_DATA_HOME/stasis]
    #[arg(long, global = true, env = "STASIS_STORE", value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print machine-readable JSON instead of text
    #[arg(long, global = true)]
    json: bool,
    /// More log output (repeat for more); STASIS_LOG=filter overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Golden images: the read-only bases disks are made from
    #[command(subcommand)]
    Image(ImageCmd),
    /// Disks: copy-on-write branches of a golden image
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Serve a disk as a block device until SIGTERM/SIGINT (then: drain, flush, close)
    #[command(group(clap::ArgGroup::new("frontend").required(true).args(["nbd", "ublk"])))]
    Serve {
        disk: String,
        /// Serve over NBD: unix:PATH or tcp:HOST:PORT
        #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
        nbd: Option<Listen>,
        /// Serve as /dev/ublkbN (Linux ublk driver; root)
        #[arg(long)]
        ublk: bool,
        /// ublk queues [default: one per CPU]
        #[arg(long, requires = "ublk", conflicts_with = "recover")]
        queues: Option<u16>,
        /// Take over the disk's /dev/ublkbN after its server died (kill -9, crash): same
        /// device, mounts stay, I/O the dead server had taken is re-issued
        #[arg(long, requires = "ublk")]
        recover: bool,
    },
    /// ublk devices left by a dead server
    #[command(subcommand)]
    Ublk(UblkCmd),
    /// Talk to a served disk's control socket
    Ctl {
        disk: String,
        #[arg(value_parser = ["status", "stats", "flush", "freeze", "thaw"])]
        command: String,
    },
    /// Swap a disk out to the repository: upload what it lacks, commit a manifest, release
    /// the disk's local layers (unless --keep)
    Swapout {
        disk: String,
        #[command(flatten)]
        repo: RepoArg,
        /// Manifest name [default: DISK@UNIX-TIME]
        #[arg(long)]
        name: Option<String>,
        /// Keep the disk in the store after the swapout
        #[arg(long)]
        keep: bool,
    },
    /// Swap a manifest in as a disk: usable at once, its data arrives on demand and in the
    /// background while served
    #[command(group(clap::ArgGroup::new("serve_as").args(["nbd", "ublk"])))]
    Swapin {
        manifest: String,
        /// Name of the new disk
        #[arg(long = "as", value_name = "DISK")]
        as_disk: String,
        #[command(flatten)]
        repo: RepoArg,
        /// Serve it at once over NBD (unix:PATH or tcp:HOST:PORT)
        #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
        nbd: Option<Listen>,
        /// Serve it at once as /dev/ublkbN
        #[arg(long)]
        ublk: bool,
    },
    /// The repository: manifests, chunks, garbage collection, verification
    #[command(subcommand)]
    Repo(RepoCmd),
    /// This store's settings (STORE/config.json): show, set or unset them
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Whole VMs: start one on a disk, swap it out (memory and disk) and in on any node
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Groups of VMs swapped out and in together, consistently
    #[command(subcommand)]
    Experiment(vm::ExperimentCmd),
    /// Send one QMP command to a QEMU (for exec-driver hooks): prints its return value
    Qmp {
        socket: PathBuf,
        command: String,
        /// Arguments, a JSON object
        arguments: Option<String>,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct RepoArg {
    /// Repository: http(s)://HOST:PORT (a served one; STASIS_REPO_KEY holds its access key),
    /// file:///PATH or PATH [default: the store's configured one (`stasis config set repo`),
    /// else STORE/repo]
    #[arg(long = "repo", env = "STASIS_REPO", value_name = "URL")]
    url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum RepoCmd {
    /// Create a repository with chosen bricks (a swapout otherwise creates one with one
    /// brick directory)
    Init {
        #[command(flatten)]
        repo: RepoArg,
        /// A brick: a directory (relative to the repository or absolute) or
        /// s3://BUCKET[/PREFIX] (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY);
        /// repeat for several [default: brick0]
        #[arg(long = "brick", value_name = "SPEC")]
        bricks: Vec<String>,
        /// Endpoint of an S3-compatible server (MinIO, Ceph RGW, Garage), for s3:// bricks
        #[arg(long, value_name = "URL")]
        s3_endpoint: Option<String>,
        /// Region of s3:// bricks
        #[arg(long)]
        s3_region: Option<String>,
    },
    /// List manifests (disks and images)
    Ls {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Chunks, bytes stored, logical bytes, dedup ratio
    Stat {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Remove chunks no manifest names (unused for the grace period)
    Gc {
        #[command(flatten)]
        repo: RepoArg,
        /// Keep unreferenced chunks used within this many seconds
        #[arg(long, default_value_t = crate::repo::DEFAULT_GC_GRACE_SECS)]
        grace: u64,
    },
    /// Remove manifests (their chunks are freed by a later `repo gc`); refused for one that
    /// another manifest names, or that a disk of this store still hydrates from
    Rm {
        #[command(flatten)]
        repo: RepoArg,
        /// Manifest names
        #[arg(required = true, value_name = "MANIFEST")]
        names: Vec<String>,
        /// The kind, when a name is taken by manifests of several kinds
        #[arg(long, value_parser = ["disk", "image", "file", "vm", "experiment"])]
        kind: Option<String>,
        /// A VM's or an experiment's parts go too (disk, memory, boot files, member VMs),
        /// except those another manifest still names
        #[arg(long)]
        with_parts: bool,
    },
    /// Re-hash every chunk; report damaged chunks and the manifests they break
    Verify {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Serve a repository over HTTP to other nodes until SIGTERM/SIGINT (clients: --repo
    /// http://ADDR with STASIS_REPO_KEY set to the key in DIR/access.key)
    Serve {
        /// Address to listen on, HOST:PORT (port 0: any free port, printed at start)
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// The repository's directory (created if new) [default: STORE/repo]
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Lifetime of session tokens, in seconds
        #[arg(long, default_value_t = crate::repo::server::DEFAULT_TOKEN_TTL_SECS)]
        token_ttl: u64,
        /// Serve https:// with this PEM certificate chain (clients trust the system's roots
        /// and the certificates in STASIS_REPO_CA)
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    s.parse()
        .map_err(|e: crate::frontend::nbd::NbdError| e.to_string())
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Print every setting
    Show,
    /// Set one: `repo URL` is the repository used when neither --repo nor STASIS_REPO is
    /// given (file:///PATH, a path, or http://HOST:PORT)
    Set {
        #[arg(value_parser = ["repo"])]
        key: String,
        value: String,
    },
    /// Go back to the default of one setting
    Unset {
        #[arg(value_parser = ["repo"])]
        key: String,
    },
}

#[derive(Subcommand, Debug)]
enum UblkCmd {
    /// Delete the /dev/ublkbN a dead server left for DISK instead of recovering it (a
    /// filesystem still mounted on it gets I/O errors)
    Delete { disk: String },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Import a raw or qcow2 file as golden image NAME (hashes every chunk once)
    Import { name: String, file: PathBuf },
    /// List golden images
    List,
    /// Re-hash an image and compare with the hashes stored at import
    Verify { name: String },
    /// Remove an image that no disk uses
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
enum DiskCmd {
    /// Create a disk over a golden image
    Create {
        disk: String,
        #[arg(long, value_name = "IMAGE")]
        from: String,
        /// Disk size (e.g. 20G); at least the image's size, a multiple of 4 KiB. Default: the image's size
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Fork a disk into a new branch sharing its current state
    Fork {
        new: String,
        #[arg(long, value_name = "DISK")]
        from: String,
    },
    /// Fold a disk's write layer into its delta
    Compact { disk: String },
    /// List disks and their branch tree
    List,
    /// Show a disk's layers, sizes and dirty blocks
    Info { disk: String },
    /// Remove a disk (layers shared with other branches stay)
    Rm { disk: String },
    /// Write a disk's full content to FILE as a raw image
    Export { disk: String, file: PathBuf },
    /// Check every stored block of the disk's layers against its checksum or hash
    Verify { disk: String },
    /// Fetch every chunk a swapped-in disk still lacks from its repository
    Hydrate { disk: String },
    /// Write FILE's content into the disk at OFFSET, through the store (only changed blocks)
    Write {
        disk: String,
        file: PathBuf,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        offset: u64,
    },
}

fn default_store() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/stasis");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("stasis");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/stasis")
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A byte progress bar on stderr when it is a terminal and output is not JSON. It also
/// clears itself when dropped, so an error never leaves a stale bar above its message.
struct Progress(ProgressBar);

impl Progress {
    /// For the store's `progress(done, total)` callbacks.
    fn report(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

impl std::ops::Deref for Progress {
    type Target = ProgressBar;
    fn deref(&self) -> &ProgressBar {
        &self.0
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn progress_bar(json: bool, what: &str) -> Progress {
    Progress(new_bar(json, what))
}

fn new_bar(json: bool, what: &str) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

enum Failure {
    Usage(String),
    Failed(String),
}

impl From<crate::frontend::ublk::UblkFrontendError> for Failure {
    fn from(e: crate::frontend::ublk::UblkFrontendError) -> Self {
        match e {
            crate::frontend::ublk::UblkFrontendError::NotRecoverable { .. } => {
                Failure::Usage(e.to_string())
            }
            other => Failure::Failed(other.to_string()),
        }
    }
}

impl From<crate::control::ControlError> for Failure {
    fn from(e: crate::control::ControlError) -> Self {
        match e {
            crate::control::ControlError::NotServed { .. } => Failure::Usage(e.to_string()),
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// A control reply's error, if it is one: `what: <the server's error>`.
fn control_reply_ok(reply: &serde_json::Value, what: &str) -> Result<(), Failure> {
    if reply.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
        return Ok(());
    }
    Err(Failure::Failed(format!(
        "{what}: {}",
        reply
            .get("error")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("failed")
    )))
}

impl From<crate::swap::SwapError> for Failure {
    fn from(e: crate::swap::SwapError) -> Self {
        if e.is_usage() {
            Failure::Usage(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    }
}

impl From<crate::repo::RepoError> for Failure {
    fn from(e: crate::repo::RepoError) -> Self {
        crate::swap::SwapError::from(e).into()
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        if e.is_usage() {
            Failure::Usage(e.to_string())
        } else {
            Failure::Failed(e.to_string())
        }
    }
}

/// Runs the command line; returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => 0,
        Err(Failure::Usage(m)) => {
            eprintln!("stasis: {m}");
            2
        }
        Err(Failure::Failed(m)) => {
            eprintln!("stasis: error: {m}");
            1
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn run(cli: Cli) -> Result<(), Failure> {
    let root = cli.store.clone().unwrap_or_else(default_store);
    // Absolute: the paths we print (control sockets) and hand to servers must not depend on
    // our working directory.
    let root = std::path::absolute(&root).unwrap_or(root);
    let json = cli.json;
    let mut store = Store::open(&root)?;
    store.set_source_factory(crate::swap::source_factory());
    store.set_disk_guard(std::sync::Arc::new(crate::frontend::ublk::orphan_guard));
    match cli.command {
        Command::Image(cmd) => image(&store, cmd, json),
        Command::Disk(cmd) => disk(&store, cmd, json),
        Command::Serve {
            disk,
            nbd: Some(nbd),
            ..
        } => serve(&store, &disk, &nbd, json),
        Command::Serve {
            disk,
            queues,
            recover,
            ..
        } => serve_ublk(&store, &disk, queues, recover, json),
        Command::Ublk(UblkCmd::Delete { disk }) => ublk_delete(&store, &disk, json),
        Command::Ctl { disk, command } => ctl(&store, &disk, &command, json),
        Command::Swapout {
            disk,
            repo,
            name,
            keep,
        } => swapout(&store, &disk, &repo, name, keep, json),
        Command::Swapin {
            manifest,
            as_disk,
            repo,
            nbd,
            ublk,
        } => {
            swapin(&store, &manifest, &as_disk, &repo, json)?;
            match (nbd, ublk) {
                (Some(nbd), _) => serve(&store, &as_disk, &nbd, json),
                (None, true) => serve_ublk(&store, &as_disk, None, false, json),
                (None, false) => Ok(()),
            }
        }
        Command::Repo(cmd) => repo_cmd(&store, cmd, json),
        Command::Config(cmd) => config_cmd(&store, cmd, json),
        Command::Vm(cmd) => vm::vm_cmd(&store, cmd, json),
        Command::Experiment(cmd) => vm::experiment_cmd(&store, cmd, json),
        Command::Qmp {
            socket,
            command,
            arguments,
        } => vm::qmp(&socket, &command, arguments.as_deref()),
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it spawns from now on, so that
/// `wait_for_stop_signal` receives them (instead of the default action killing us mid-I/O).
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask manipulation on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_stop_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait on signals blocked in every thread.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

type ServedDisk = std::sync::Arc<Served<crate::store::Disk>>;

/// Starts the control socket of a disk being served through `frontend` at `address`.
fn start_control(
    store: &Store,
    name: &str,
    frontend: &str,
    address: String,
    served: &ServedDisk,
) -> Result<ControlServer, Failure> {
    let info = ServeInfo {
        disk: name.to_string(),
        frontend: frontend.into(),
        address,
        started_at: crate::frontend::unix_now(),
    };
    let hook =
        crate::swap::control_hook(store.root().to_path_buf(), name.to_string(), served.clone());
    ControlServer::start(
        &store.control_socket(name),
        served.clone(),
        info,
        Some(hook),
    )
    .map_err(|e| Failure::Failed(e.to_string()))
}

/// The start line of a server: with --json one object (`fields` plus disk, control, pid),
/// else `headline` and where the control socket is.
fn announce_serving(
    json: bool,
    name: &str,
    control: &Path,
    mut fields: serde_json::Value,
    headline: &str,
) {
    if json {
        fields["disk"] = json!(name);
        fields["control"] = json!(control);
        fields["pid"] = json!(std::process::id());
        println!("{fields}");
    } else {
        println!("{headline}");
        println!(
            "control socket: {} (stasis ctl {name} status|stats|flush|freeze|thaw)",
            control.display()
        );
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

/// The end of serving, once the frontend has stopped taking and finished its requests: no
/// more control requests, hold anything left (the gate stays frozen), flush, close cleanly;
/// then, after a swapout through the control socket, release the disk's local layers;
/// then say so (`stopped`, without --json).
fn finish_serving(
    store: &Store,
    name: &str,
    served: ServedDisk,
    control: ControlServer,
    json: bool,
    stopped: &str,
) -> Result<(), Failure> {
    drop(control);
    served
        .freeze_for_close()
        .map_err(|e| Failure::Failed(format!("final flush failed: {e}")))?;
    served.device().close_shared()?;
    let retired = served.retired();
    if retired == Some(true) {
        // The disk's lock goes with its last reference: the frontend, the prefetcher and
        // the control socket (its clients included) have all let go by now.
        drop(std::sync::Arc::into_inner(served).ok_or_else(|| {
            Failure::Failed(format!(
                "disk {name} is swapped out, but something still holds it open: not released"
            ))
        })?);
        store.remove_disk(name)?;
    }
    if let Some(release) = retired {
        tracing::info!(disk = %name, released = release, "swapped out");
    }
    if !json {
        if retired.is_some() {
            println!("disk {name} swapped out: server stopped");
        }
        println!("{stopped}");
    }
    Ok(())
}

fn serve(store: &Store, name: &str, listen: &Listen, json: bool) -> Result<(), Failure> {
    let signals = block_stop_signals();
    let disk = store.open_disk(name)?;
    let served = std::sync::Arc::new(Served::new(disk));
    let prefetch = crate::swap::Prefetcher::start(name, served.clone());
    let mut nbd = NbdServer::start(listen, name, served.clone())
        .map_err(|e| Failure::Failed(e.to_string()))?;
    let control = start_control(store, name, "nbd", nbd.uri.clone(), &served)?;
    announce_serving(
        json,
        name,
        &store.control_socket(name),
        json!({"nbd": nbd.uri}),
        &format!("serving disk {name} over NBD at {}", nbd.uri),
    );
    let sig = wait_for_stop_signal(&signals);
    tracing::info!(signal = sig, "stopping: draining I/O, flushing, closing");
    // Release anything a freeze holds (else it could never finish); no new connections or
    // requests; finish what is in flight; then the common end.
    served.begin_stop();
    nbd.stop();
    drop(prefetch);
    let served_count = nbd
        .connections_served
        .load(std::sync::atomic::Ordering::Relaxed);
    finish_serving(
        store,
        name,
        served,
        control,
        json,
        &format!("stopped: disk {name} flushed and closed ({served_count} connection(s) served)"),
    )
}

fn serve_ublk(
    store: &Store,
    name: &str,
    queues: Option<u16>,
    recover: bool,
    json: bool,
) -> Result<(), Failure> {
    use crate::frontend::ublk;
    let signals = block_stop_signals();
    // The server must not share a mount namespace with a mount of its own device when it
    // exits (the exit deadlocks): give it a private one, which never sees such mounts.
    // SAFETY: unshare and mount with constant arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
        {
            return Err(Failure::Failed(format!(
                "private mount namespace: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    // Opening the disk takes its lock: for --recover, that proves the old server is dead,
    // and it replays the journal up to the last write the dead server completed.
    let record_path = store.frontend_record(name, "ublk");
    // Only --recover may open a disk whose device is waiting for its server: the store's
    // guard (ublk::orphan_guard) refuses everyone else.
    let disk = if recover {
        store.open_disk_taking_over(name)?
    } else {
        store.open_disk(name)?
    };
    let served = std::sync::Arc::new(Served::new(disk));
    let prefetch = crate::swap::Prefetcher::start(name, served.clone());
    let ctrl = if recover {
        let record = ublk::DeviceRecord::load(&record_path).ok_or_else(|| {
            Failure::Usage(format!(
                "disk {name} has no recorded ublk device to recover ({} missing)",
                record_path.display()
            ))
        })?;
        ublk::check_recoverable(&record)?;
        // A copy of the guest's mount of this very device came with our namespace: drop it
        // (here only) before the device comes back.
        ublk::detach_own_mounts(record.dev_id)
            .map_err(|e| Failure::Failed(format!("detaching /dev/ublkb{}: {e}", record.dev_id)))?;
        ublk::reattach(&record)?
    } else {
        let mut opts = ublk::UblkOptions::default();
        if let Some(q) = queues {
            opts.queues = q.max(1);
        }
        let tag = ublk::new_tag();
        let ctrl = ublk::create("stasis", &opts, tag)?;
        let record = ublk::DeviceRecord {
            dev_id: ctrl.dev_info().dev_id,
            tag,
        };
        if let Err(e) = record.save(&record_path) {
            let _ = ctrl.del_dev();
            return Err(Failure::Failed(format!("{}: {e}", record_path.display())));
        }
        ctrl
    };
    let dev_id = ctrl.dev_info().dev_id;
    let control_path = store.control_socket(name);
    let control = start_control(store, name, "ublk", format!("/dev/ublkb{dev_id}"), &served)?;
    // The stop signal arrives on its own thread, which stops the device; a signal that comes
    // while the device is still starting waits for the start (a stop before it would be lost).
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let stopper = {
        let (ctrl, served) = (ctrl.clone(), served.clone());
        std::thread::spawn(move || {
            let sig = wait_for_stop_signal(&signals);
            if started_rx.recv().is_err() {
                return; // the device never started: nothing to stop
            }
            tracing::info!(
                signal = sig,
                "stopping: deleting the device, flushing, closing"
            );
            served.begin_stop();
            if let Err(e) = ublk::init_control_ring()
                .map_err(|e| e.to_string())
                .and_then(|_| ctrl.kill_dev().map(|_| ()).map_err(|e| e.to_string()))
            {
                tracing::error!("ublk: stopping the device: {e}");
            }
        })
    };
    let verb = if recover {
        "recovered: disk"
    } else {
        "serving disk"
    };
    let name_owned = name.to_string();
    let control_shown = control_path.clone();
    ublk::serve(&ctrl, served.clone(), recover, move |id| {
        let _ = started_tx.send(());
        announce_serving(
            json,
            &name_owned,
            &control_shown,
            json!({"ublk": format!("/dev/ublkb{id}"), "recovered": recover}),
            &format!("{verb} {name_owned} as /dev/ublkb{id}"),
        );
    })?;
    let _ = stopper.join();
    let _ = std::fs::remove_file(&record_path);
    drop(prefetch);
    finish_serving(
        store,
        name,
        served,
        control,
        json,
        &format!("stopped: /dev/ublkb{dev_id} deleted; disk {name} flushed and closed"),
    )
}

fn ublk_delete(store: &Store, name: &str, json: bool) -> Result<(), Failure> {
    use crate::frontend::ublk;
    let record_path = store.frontend_record(name, "ublk");
    // The lock proves no server is running the disk; the guard would refuse: this is the
    // command it points to.
    let disk = store.open_disk_taking_over(name)?;
    let record = ublk::DeviceRecord::load(&record_path)
        .ok_or_else(|| Failure::Usage(format!("disk {name} has no recorded ublk device")))?;
    ublk::delete_orphan(&record)?;
    let _ = std::fs::remove_file(&record_path);
    disk.close()?;
    if json {
        println!(
            "{}",
            json!({"disk": name, "deleted": format!("/dev/ublkb{}", record.dev_id)})
        );
    } else {
        println!("deleted /dev/ublkb{} (disk {name})", record.dev_id);
    }
    Ok(())
}

fn ctl(store: &Store, name: &str, command: &str, json: bool) -> Result<(), Failure> {
    store.disk(name)?;
    let reply = crate::control::request(&store.control_socket(name), name, command)?;
    if json {
        println!("{reply}");
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
    }
    control_reply_ok(&reply, command)
}

fn image(store: &Store, cmd: ImageCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        ImageCmd::Import { name, file } => {
            let pb = progress_bar(json, &format!("importing {name}"));
            let started = std::time::Instant::now();
            let rec = store.import_image(&name, &file, &|done, total| pb.report(done, total))?;
            pb.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            if json {
                print_json(&json!({ "image": rec, "seconds": secs }));
            } else {
                println!(
                    "imported image {} from {} ({}, {}): {} chunks hashed, {} of them zero, in {:.1}s",
                    rec.name,
                    file.display(),
                    rec.source_format,
                    human(rec.size),
                    rec.chunks,
                    rec.zero_chunks,
                    secs
                );
            }
        }
        ImageCmd::List => {
            let images = store.images()?;
            let disks = store.disks()?;
            if json {
                print_json(&json!(images));
            } else {
                println!(
                    "{:<24} {:>12} {:>8} {:>6}  SOURCE",
                    "IMAGE", "SIZE", "CHUNKS", "DISKS"
                );
                for i in images {
                    let users = disks.iter().filter(|d| d.image == i.name).count();
                    println!(
                        "{:<24} {:>12} {:>8} {:>6}  {}",
                        i.name,
                        human(i.size),
                        i.chunks,
                        users,
                        i.source
                    );
                }
            }
        }
        ImageCmd::Verify { name } => {
            store.image(&name)?;
            let golden = store.open_golden(&name)?;
            let pb = progress_bar(json, &format!("verifying {name}"));
            pb.set_length(golden.size);
            let bad = golden.verify(|n| pb.inc(n))?;
            pb.finish_and_clear();
            if json {
                print_json(&json!({ "image": name, "ok": bad.is_empty(), "bad_chunks": bad }));
            } else if bad.is_empty() {
                println!("image {name}: every chunk matches its hash");
            } else {
                println!("image {name}: {} chunk(s) damaged: {:?}", bad.len(), bad);
            }
            if !bad.is_empty() {
                return Err(Failure::Failed(format!("image {name} is damaged")));
            }
        }
        ImageCmd::Rm { name } => {
            store.remove_image(&name)?;
            if json {
                print_json(&json!({ "removed": name }));
            } else {
                println!("removed image {name}");
            }
        }
    }
    Ok(())
}

fn disk(store: &Store, cmd: DiskCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        DiskCmd::Create { disk, from, size } => {
            let rec = store.create_disk(&disk, &from, size)?;
            if json {
                print_json(&json!(rec));
            } else {
                println!(
                    "created disk {} ({}) from image {}",
                    rec.name,
                    human(rec.size),
                    rec.image
                );
            }
        }
        DiskCmd::Fork { new, from } => {
            let pb = progress_bar(json, &format!("folding {from}"));
            let rec =
                store.fork_with_progress(&new, &from, &|done, total| pb.report(done, total))?;
            pb.finish_and_clear();
            if json {
                print_json(&json!(rec));
            } else {
                println!(
                    "forked disk {} from {} (both now share delta {})",
                    rec.name,
                    from,
                    rec.delta.as_deref().unwrap_or("none")
                );
            }
        }
        DiskCmd::Compact { disk } => {
            let pb = progress_bar(json, &format!("folding {disk}"));
            let rec = store.compact_with_progress(&disk, &|done, total| pb.report(done, total))?;
            pb.finish_and_clear();
            if json {
                print_json(&json!(rec));
            } else {
                println!(
                    "compacted disk {}: write layer folded into delta {}",
                    rec.name,
                    rec.delta.as_deref().unwrap_or("none")
                );
            }
        }
        DiskCmd::List => {
            let disks = store.disks()?;
            if json {
                print_json(&json!(disks));
            } else {
                println!(
                    "{:<24} {:>12} {:<20} {:<20} DELTA",
                    "DISK", "SIZE", "IMAGE", "PARENT"
                );
                for d in &disks {
                    let parent = match &d.parent {
                        Some(p) if d.parent_removed => format!("{p} (removed)"),
                        Some(p) => p.clone(),
                        None => "-".into(),
                    };
                    println!(
                        "{:<24} {:>12} {:<20} {:<20} {}",
                        d.name,
                        human(d.size),
                        d.image,
                        parent,
                        d.delta.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        DiskCmd::Info { disk } => {
            let info = store.disk_info(&disk)?;
            if json {
                print_json(&json!(info));
            } else {
                println!("disk:        {}", info.name);
                println!("size:        {} ({} bytes)", human(info.size), info.size);
                println!("image:       {} ({})", info.image, human(info.golden_bytes));
                println!(
                    "parent:      {}{}",
                    info.parent.as_deref().unwrap_or("-"),
                    if info.parent_removed {
                        " (removed)"
                    } else {
                        ""
                    }
                );
                println!(
                    "children:    {}",
                    if info.children.is_empty() {
                        "-".into()
                    } else {
                        info.children.join(", ")
                    }
                );
                match &info.delta {
                    Some(d) => println!(
                        "delta:       {} ({} data blocks = {}, {} zero blocks; file {}){}",
                        d.id,
                        d.data_blocks,
                        human(d.data_bytes),
                        d.zero_blocks,
                        human(d.file_bytes),
                        if d.shared_with.is_empty() {
                            String::new()
                        } else {
                            format!(", shared with {}", d.shared_with.join(", "))
                        }
                    ),
                    None => println!("delta:       - (none)"),
                }
                if let Some(h) = info.delta.as_ref().and_then(|d| d.hydration.as_ref()) {
                    println!(
                        "hydration:   {}/{} chunks local ({:.0}%) from {}",
                        h.chunks_present,
                        h.chunks,
                        if h.chunks == 0 {
                            100.0
                        } else {
                            h.chunks_present as f64 * 100.0 / h.chunks as f64
                        },
                        h.origin
                    );
                }
                match &info.write_layer {
                    Some(w) => println!(
                        "write layer: {} dirty blocks ({} data = {}, {} zero)",
                        w.dirty_blocks,
                        w.data_blocks,
                        human(w.data_bytes),
                        w.zero_blocks
                    ),
                    None => println!("write layer: (disk is in use; ask its server)"),
                }
            }
        }
        DiskCmd::Rm { disk } => {
            store.remove_disk(&disk)?;
            if json {
                print_json(&json!({ "removed": disk }));
            } else {
                println!("removed disk {disk}");
            }
        }
        DiskCmd::Export { disk, file } => export(store, &disk, &file, json)?,
        DiskCmd::Verify { disk } => {
            let d = store.open_disk(&disk)?;
            let pb = progress_bar(json, &format!("verifying {disk}"));
            let report = d.verify(&|n| pb.set_length(n), &|n| pb.inc(n))?;
            pb.finish_and_clear();
            d.close()?;
            if json {
                print_json(
                    &json!({ "disk": disk, "ok": report.damaged.is_empty(), "report": report }),
                );
            } else {
                println!(
                    "disk {disk}: {} stored blocks and {} of golden checked, {} damaged",
                    report.blocks_checked,
                    human(report.golden_bytes_checked),
                    report.damaged.len()
                );
                for line in &report.damaged {
                    println!("  damaged: {line}");
                }
            }
            if !report.damaged.is_empty() {
                return Err(Failure::Failed(format!("disk {disk} is damaged")));
            }
        }
        DiskCmd::Hydrate { disk } => hydrate(store, &disk, json)?,
        DiskCmd::Write { disk, file, offset } => {
            let pb = progress_bar(json, &format!("writing {disk}"));
            let (bytes, changed) =
                store.write_file(&disk, &file, offset, &|done, total| pb.report(done, total))?;
            pb.finish_and_clear();
            if json {
                print_json(
                    &json!({ "disk": disk, "file": file, "offset": offset, "bytes": bytes, "changed_bytes": changed }),
                );
            } else {
                println!(
                    "wrote {} into disk {disk} at offset {offset}: {} changed, flushed",
                    file.display(),
                    human(changed)
                );
            }
        }
    }
    Ok(())
}

fn export(store: &Store, disk: &str, file: &Path, json: bool) -> Result<(), Failure> {
    let pb = progress_bar(json, &format!("exporting {disk}"));
    let started = std::time::Instant::now();
    let size = store.export(disk, file, &|done, total| pb.report(done, total))?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if json {
        print_json(&json!({ "disk": disk, "file": file, "bytes": size, "seconds": secs }));
    } else {
        println!(
            "exported disk {disk} to {} ({}) in {secs:.1}s",
            file.display(),
            human(size)
        );
    }
    Ok(())
}

/// The manifests that disks of this store are still hydrating from, from any repository:
/// matched by name only, since one repository has many spellings (a trailing slash, a
/// symlink, another host name for its server), and refusing too often loses nothing.
fn hydrating_manifests(store: &Store) -> Result<Vec<String>, Failure> {
    Ok(store
        .hydrating_origins()?
        .into_iter()
        .filter_map(|origin| crate::swap::origin_parts(&origin).1.map(str::to_string))
        .collect())
}

/// The repository's URL: --repo / STASIS_REPO, else the store's configured one (`stasis
/// config set repo`), else STORE/repo.
fn repo_url(store: &Store, arg: &RepoArg) -> Result<String, Failure> {
    let url = match &arg.url {
        Some(url) => url.clone(),
        None => store.default_repo()?,
    };
    Ok(absolute_repo_url(url))
}

/// A relative path made absolute: the URL is recorded in swapped-in disks and sent to
/// servers, which do not share our working directory.
fn absolute_repo_url(url: String) -> String {
    let path = url.strip_prefix("file://").unwrap_or(&url);
    if url.contains("://") && !url.starts_with("file://") || Path::new(path).is_absolute() {
        return url;
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path).display().to_string(),
        Err(_) => url,
    }
}

/// The repository named by --repo / STASIS_REPO, or the store's configured one, or the
/// store's own. Only a swapout may create it; everything else needs an existing one.
fn open_repo(
    store: &Store,
    arg: &RepoArg,
    create: bool,
) -> Result<crate::repo::RepoHandle, Failure> {
    Ok(crate::repo::RepoHandle::open(
        &repo_url(store, arg)?,
        create,
    )?)
}

fn swapout(
    store: &Store,
    name: &str,
    repo: &RepoArg,
    manifest: Option<String>,
    keep: bool,
    json: bool,
) -> Result<(), Failure> {
    store.disk(name)?;
    if let Some(vm) = crate::vm::owner_of_disk(store, name)? {
        return Err(Failure::Usage(format!(
            "disk {name} is the disk of VM {vm}: swap out the VM (`stasis vm swapout {vm}`), \
             its memory goes with it"
        )));
    }
    let manifest = manifest.unwrap_or_else(|| format!("{name}@{}", crate::repo::now_secs()));
    if crate::control::request(&store.control_socket(name), name, "status").is_ok() {
        return swapout_served(store, name, &repo_url(store, repo)?, &manifest, keep, json);
    }
    let repo = open_repo(store, repo, true)?;
    let disk = store.open_disk(name)?;
    let pb = progress_bar(json, &format!("swapout {name}"));
    let show = |c: &crate::swap::Counters| {
        use std::sync::atomic::Ordering::Relaxed;
        pb.set_position(c.bytes_scanned.load(Relaxed));
        pb.set_message(format!(
            "swapout {name}: {} uploaded, {} chunks already held",
            human(c.bytes_uploaded.load(Relaxed)),
            c.chunks_present.load(Relaxed)
        ));
    };
    let summary = crate::swap::swapout(store, name, &disk, &repo, &manifest, &show);
    pb.finish_and_clear();
    let summary = summary?;
    disk.close()?;
    if !keep {
        store.remove_disk(name)?;
    }
    print_swapout(&summary, keep, false, json);
    Ok(())
}

fn print_swapout(summary: &crate::swap::SwapoutSummary, keep: bool, served: bool, json: bool) {
    let (name, manifest) = (&summary.disk, &summary.manifest);
    if json {
        print_json(&json!({"swapout": summary, "released": !keep, "server_stopped": served}));
        return;
    }
    println!(
        "swapped out disk {name} as manifest {manifest} in {:.2}s: {} chunks, {} uploaded ({} chunks), {} chunks already held, {} hashes reused{}{}",
        summary.seconds,
        summary.chunks,
        human(summary.bytes_uploaded),
        summary.chunks_uploaded,
        summary.chunks_reused,
        summary.hashes_reused,
        if served { "; its server stopped" } else { "" },
        if keep { "" } else { "; local layers released" }
    );
    println!(
        "bring it back with: stasis swapin {manifest} --as {name} --repo {}",
        summary.repo
    );
}

/// Swapout of a disk being served: the server does it (freeze, swapout, stop, release)
/// through its control socket; this waits for the server to be gone.
fn swapout_served(
    store: &Store,
    name: &str,
    url: &str,
    manifest: &str,
    keep: bool,
    json: bool,
) -> Result<(), Failure> {
    let pb = progress_bar(json, &format!("swapout {name} (served)"));
    let summary =
        crate::swap::request_served_swapout(store, name, url, manifest, keep, &mut |event| {
            let get = |k: &str| {
                event
                    .get(k)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            pb.set_position(get("bytes_scanned"));
            pb.set_message(format!(
                "swapout {name}: {} uploaded, {} chunks already held",
                human(get("bytes_uploaded")),
                get("chunks_present")
            ));
        });
    pb.finish_and_clear();
    print_swapout(&summary?, keep, true, json);
    Ok(())
}

fn swapin(
    store: &Store,
    manifest: &str,
    as_disk: &str,
    repo: &RepoArg,
    json: bool,
) -> Result<(), Failure> {
    let repo = open_repo(store, repo, false)?;
    let rec = crate::swap::swapin(store, &repo, manifest, as_disk)?;
    if json {
        println!(
            "{}",
            json!({"swapin": manifest, "disk": rec.name, "size": rec.size, "repo": repo.url()})
        );
    } else {
        println!(
            "swapped in manifest {manifest} as disk {as_disk} ({}); its data arrives when it is served, or with `stasis disk hydrate {as_disk}`",
            human(rec.size)
        );
    }
    Ok(())
}

fn hydrate(store: &Store, name: &str, json: bool) -> Result<(), Failure> {
    let disk = store.open_disk(name)?;
    let pb = progress_bar(json, &format!("hydrating {name}"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let result = crate::swap::hydrate(
        &disk,
        crate::swap::HYDRATE_WORKERS,
        &stop,
        &|done, total| {
            let chunk = crate::store::CHUNK_SIZE as u64;
            pb.report(done * chunk, total * chunk);
        },
    );
    pb.finish_and_clear();
    result?;
    let (done, total) = disk
        .delta()
        .and_then(|d| d.hydration())
        .map_or((0, 0), |h| h.progress());
    disk.close()?;
    if json {
        print_json(&json!({"disk": name, "chunks_present": done, "chunks": total}));
    } else {
        println!("disk {name}: {done}/{total} chunks local");
    }
    Ok(())
}

fn repo_serve(
    store: &Store,
    listen: std::net::SocketAddr,
    data: Option<PathBuf>,
    token_ttl_secs: u64,
    tls: Option<crate::repo::tls::TlsFiles>,
    json: bool,
) -> Result<(), Failure> {
    let signals = block_stop_signals();
    let data = data.unwrap_or_else(|| store.root().join("repo"));
    let data = std::path::absolute(&data).unwrap_or(data);
    let opts = crate::repo::server::ServeOptions {
        data: data.clone(),
        listen,
        token_ttl_secs,
        tls,
    };
    // The stop signal arrives on its own thread and ends the server gracefully.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let stop = async move {
        let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
    };
    std::thread::spawn(move || {
        let sig = wait_for_stop_signal(&signals);
        tracing::info!(signal = sig, "repo serve: stopping");
        let _ = stop_tx.send(());
    });
    crate::repo::server::serve(
        &opts,
        |url, key_file| {
            if json {
                println!(
                    "{}",
                    json!({"url": url, "data": data, "access_key_file": key_file, "pid": std::process::id()})
                );
            } else {
                println!("serving repository {} at {url}", data.display());
                println!(
                    "clients: STASIS_REPO_KEY=$(cat {}) stasis swapout DISK --repo {url}",
                    key_file.display()
                );
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
        },
        stop,
    )?;
    Ok(())
}

fn config_cmd(store: &Store, cmd: ConfigCmd, json: bool) -> Result<(), Failure> {
    let mut config = store.config()?;
    match cmd {
        ConfigCmd::Show => {}
        ConfigCmd::Set { key, value } => {
            debug_assert_eq!(key, "repo");
            if value.trim().is_empty() {
                return Err(Failure::Usage(
                    "an empty repository: give a URL or a path".into(),
                ));
            }
            if value.contains("://")
                && !["file://", "http://", "https://"]
                    .iter()
                    .any(|p| value.starts_with(p))
            {
                return Err(Failure::Usage(format!(
                    "repository {value:?}: use file:///PATH, a path, or http://HOST:PORT"
                )));
            }
            config.repo = Some(absolute_repo_url(value));
            store.set_config(&config)?;
        }
        ConfigCmd::Unset { key } => {
            debug_assert_eq!(key, "repo");
            config.repo = None;
            store.set_config(&config)?;
        }
    }
    if json {
        print_json(&json!(config));
    } else {
        println!(
            "repo = {}",
            config.repo.as_deref().unwrap_or("(unset: STORE/repo)")
        );
    }
    Ok(())
}

fn repo_cmd(store: &Store, cmd: RepoCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        RepoCmd::Ls { repo } => {
            let repo = open_repo(store, &repo, false)?;
            let mut list = repo.list()?;
            list.sort_by(|a, b| (a.0.created_at, &a.0.name).cmp(&(b.0.created_at, &b.0.name)));
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|(i, n)| json!({"info": i, "chunks": n}))
                    .collect();
                print_json(&json!(v));
            } else {
                for (info, n) in list {
                    println!(
                        "{:<6} {:<32} {:>10} {:>8} chunks  image={} parent={}",
                        info.kind.as_str(),
                        info.name,
                        human(info.size),
                        n,
                        info.image.as_deref().unwrap_or("-"),
                        info.parent.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        RepoCmd::Stat { repo } => {
            let repo = open_repo(store, &repo, false)?;
            let s = repo.stat()?;
            if json {
                print_json(&json!(s));
            } else {
                println!(
                    "{}: {} chunks, {} stored, {} logical, dedup {:.2}x; manifests: {} disk, {} image, {} file, {} vm, {} experiment",
                    repo.url(),
                    s.chunks,
                    human(s.stored_bytes),
                    human(s.logical_bytes),
                    s.dedup_ratio,
                    s.disk_manifests,
                    s.image_manifests,
                    s.file_manifests,
                    s.vm_manifests,
                    s.experiment_manifests
                );
            }
        }
        RepoCmd::Gc { repo, grace } => {
            let handle = open_repo(store, &repo, false)?;
            let repo = handle.local("repo gc")?;
            let r = repo.gc(grace)?;
            if json {
                print_json(&json!(r));
            } else {
                println!(
                    "gc: {} chunks live, {} removed ({}), {} kept in the grace period, {} orphan files removed",
                    r.chunks_live,
                    r.chunks_removed,
                    human(r.bytes_removed),
                    r.chunks_in_grace,
                    r.orphan_files_removed
                );
            }
        }
        RepoCmd::Init {
            repo,
            bricks,
            s3_endpoint,
            s3_region,
        } => {
            let url = repo_url(store, &repo)?;
            if url.contains("://") && !url.starts_with("file://") {
                return Err(Failure::Usage(format!(
                    "repo init makes a local repository; {url} is not one"
                )));
            }
            let root = PathBuf::from(url.strip_prefix("file://").unwrap_or(&url));
            let bricks = if bricks.is_empty() {
                vec!["brick0".to_string()]
            } else {
                bricks
            };
            let specs = bricks
                .iter()
                .map(|b| {
                    crate::repo::BrickSpec::parse(b, s3_endpoint.as_deref(), s3_region.as_deref())
                })
                .collect::<Result<Vec<_>, _>>()?;
            crate::repo::Repo::init(&root, &specs)?;
            // Opening it checks that every brick can be reached.
            let opened = crate::repo::Repo::open_existing(&url).and_then(|r| r.probe_bricks());
            if let Err(e) = opened {
                let _ = std::fs::remove_file(root.join("repo.json"));
                return Err(e.into());
            }
            if json {
                print_json(&json!({"repo": format!("file://{}", root.display()), "bricks": specs}));
            } else {
                println!(
                    "created repository file://{} with {} brick(s)",
                    root.display(),
                    specs.len()
                );
            }
        }
        RepoCmd::Serve {
            listen,
            data,
            token_ttl,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| crate::repo::tls::TlsFiles { cert, key });
            repo_serve(store, listen, data, token_ttl, tls, json)?
        }
        RepoCmd::Rm {
            repo,
            names,
            kind,
            with_parts,
        } => {
            let repo = open_repo(store, &repo, false)?;
            let kind = kind.as_deref().and_then(crate::repo::Kind::parse);
            let removed = repo.remove(&crate::repo::Removal {
                names,
                kind,
                with_parts,
                in_use: hydrating_manifests(store)?,
            })?;
            if json {
                let v: Vec<_> = removed
                    .iter()
                    .map(|(k, n)| json!({"kind": k, "name": n}))
                    .collect();
                print_json(&json!({"repo": repo.url(), "removed": v}));
            } else {
                for (k, n) in &removed {
                    println!("removed {} manifest {n}", k.as_str());
                }
                println!(
                    "their chunks are freed by `stasis repo gc` once no manifest names them and the grace period has passed"
                );
            }
        }
        RepoCmd::Verify { repo } => {
            let handle = open_repo(store, &repo, false)?;
            let repo = handle.local("repo verify")?;
            let pb = progress_bar(json, "verifying repository");
            let r = repo.verify(&|done, total| pb.report(done, total));
            pb.finish_and_clear();
            let r = r?;
            if json {
                print_json(&json!({"ok": r.damaged.is_empty(), "report": r}));
            } else {
                println!(
                    "{}: {} chunks ({}) checked, {} damaged",
                    repo.url(),
                    r.chunks_checked,
                    human(r.bytes_checked),
                    r.damaged.len()
                );
                for d in &r.damaged {
                    println!("  damaged: {d}");
                }
                for m in &r.broken_manifests {
                    println!("  broken manifest: {m}");
                }
            }
            if !r.damaged.is_empty() {
                return Err(Failure::Failed(format!(
                    "{} damaged chunk(s), {} broken manifest(s)",
                    r.damaged.len(),
                    r.broken_manifests.len()
                )));
            }
        }
    }
    Ok(())
}
