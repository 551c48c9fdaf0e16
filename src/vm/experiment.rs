//! Experiments: groups of VMs swapped out and in together, consistently. Every VM pauses
//! first (all at once, one thread each, released together), and only then are they saved:
//! no VM runs on while another is already stopped for longer than the pause skew, which is
//! measured and reported. On swapin all are restored paused, then resumed together.
//!
//! `<store>/experiments/<name>.json` lists the members; a swapout commits an experiment
//! manifest whose parts are the members' VM manifests.

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{load, Progress, VmError, VmState, VmSwapinSummary, VmSwapoutSummary};
use crate::repo::{Kind, Manifest, ManifestInfo, RepoHandle};
use crate::store::Store;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ExperimentRecord {
    pub name: String,
    pub vms: Vec<String>,
    /// The experiment manifest of the last swapout.
    #[serde(default)]
    pub manifest: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
}

/// When each member's pause (or resume) was asked for and when it was done, in ms after the
/// group's start; the skew bounds how far apart the VMs stopped (or started).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GroupTiming {
    pub vm: String,
    pub sent_ms: f64,
    pub done_ms: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ExperimentSwapoutSummary {
    pub experiment: String,
    pub manifest: String,
    /// From the first pause sent to the last one done: every VM stopped within this window.
    pub pause_skew_ms: f64,
    pub pauses: Vec<GroupTiming>,
    pub vms: Vec<VmSwapoutSummary>,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ExperimentSwapinSummary {
    pub experiment: String,
    pub manifest: String,
    /// From the first resume sent to the last one done.
    pub resume_skew_ms: f64,
    pub resumes: Vec<GroupTiming>,
    pub vms: Vec<VmSwapinSummary>,
    pub seconds: f64,
}

fn path(store: &Store, name: &str) -> PathBuf {
    store
        .root()
        .join("experiments")
        .join(format!("{name}.json"))
}

pub fn load_experiment(store: &Store, name: &str) -> Result<ExperimentRecord, VmError> {
    crate::store::validate_name(name)?;
    let p = path(store, name);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| VmError::Failed(format!("{}: damaged record: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VmError::Usage(format!(
            "no experiment named {name} on this node"
        ))),
        Err(e) => Err(VmError::io(&p, e)),
    }
}

fn save_experiment(store: &Store, rec: &ExperimentRecord) -> Result<(), VmError> {
    let p = path(store, &rec.name);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(|e| VmError::io(dir, e))?;
    }
    crate::fsutil::write_json_durably(&p, rec).map_err(|e| VmError::io(&p, e))
}

pub fn list_experiments(store: &Store) -> Result<Vec<ExperimentRecord>, VmError> {
    let dir = store.root().join("experiments");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json") {
                out.push(load_experiment(store, name)?);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Groups VMs of this node (each at most in one experiment).
pub fn create(store: &Store, name: &str, vms: &[String]) -> Result<ExperimentRecord, VmError> {
    crate::store::validate_name(name)?;
    if vms.is_empty() {
        return Err(VmError::Usage(
            "an experiment needs at least one --vm".into(),
        ));
    }
    if load_experiment(store, name).is_ok() {
        return Err(VmError::Usage(format!("experiment {name} exists")));
    }
    let others = list_experiments(store)?;
    for (i, vm) in vms.iter().enumerate() {
        load(store, vm)?;
        if vms[..i].contains(vm) {
            return Err(VmError::Usage(format!("VM {vm} is named twice")));
        }
        if let Some(o) = others.iter().find(|o| o.vms.contains(vm)) {
            return Err(VmError::Usage(format!(
                "VM {vm} is in experiment {} already",
                o.name
            )));
        }
    }
    let rec = ExperimentRecord {
        name: name.into(),
        vms: vms.to_vec(),
        manifest: None,
        repo: None,
    };
    save_experiment(store, &rec)?;
    Ok(rec)
}

/// Runs `f` on every member at once (threads released together) and times each call.
fn together<T: Send>(
    vms: &[String],
    f: &(dyn Fn(&str) -> Result<T, VmError> + Sync),
) -> (Vec<GroupTiming>, Vec<Result<T, VmError>>) {
    let barrier = Barrier::new(vms.len());
    let start = Instant::now();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let results: Vec<(GroupTiming, Result<T, VmError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let sent = start.elapsed();
                    let r = f(vm);
                    let done = start.elapsed();
                    (
                        GroupTiming {
                            vm: vm.clone(),
                            sent_ms: ms(sent),
                            done_ms: ms(done),
                        },
                        r,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(vms)
            .map(|(h, vm)| {
                h.join().unwrap_or_else(|_| {
                    (
                        GroupTiming {
                            vm: vm.clone(),
                            sent_ms: 0.0,
                            done_ms: 0.0,
                        },
                        Err(VmError::Failed(format!("the thread for VM {vm} panicked"))),
                    )
                })
            })
            .collect()
    });
    results.into_iter().unzip()
}

fn skew(t: &[GroupTiming]) -> f64 {
    let first = t.iter().map(|t| t.sent_ms).fold(f64::INFINITY, f64::min);
    let last = t.iter().map(|t| t.done_ms).fold(0.0, f64::max);
    (last - first).max(0.0)
}

/// Pauses every member at once, then swaps each out, then commits the experiment manifest.
/// If a pause fails, the members already paused are resumed and nothing is saved.
pub fn swapout(
    store: &Store,
    name: &str,
    repo: &RepoHandle,
    progress: Progress,
) -> Result<ExperimentSwapoutSummary, VmError> {
    let started = Instant::now();
    let mut rec = load_experiment(store, name)?;
    let running: Vec<String> = rec
        .vms
        .iter()
        .filter(|vm| load(store, vm).is_ok_and(|r| r.state == VmState::Running))
        .cloned()
        .collect();
    progress("pausing every VM", 0, 0);
    let (pauses, results) = together(&running, &|vm| super::pause(store, vm));
    if let Some(i) = results.iter().position(Result::is_err) {
        for (vm, r) in running.iter().zip(&results) {
            if r.is_ok() {
                let _ = super::resume(store, vm);
            }
        }
        let err = results.into_iter().nth(i).and_then(Result::err);
        return Err(err.unwrap_or_else(|| VmError::Failed("a pause failed".into())));
    }
    let pause_skew_ms = skew(&pauses);
    let mut vms = Vec::new();
    for vm in &rec.vms {
        let state = load(store, vm)?.state;
        if state == VmState::SwappedOut {
            continue; // done by an earlier, interrupted run
        }
        let paused = pauses
            .iter()
            .find(|t| &t.vm == vm)
            .map(|t| Duration::from_secs_f64((t.done_ms - t.sent_ms).max(0.0) / 1000.0));
        let stage = |s: &str, d: u64, n: u64| progress(&format!("{vm}: {s}"), d, n);
        vms.push(super::swapout(
            store,
            vm,
            repo,
            paused.or(Some(Duration::ZERO)),
            &stage,
        )?);
    }
    let mut parts = std::collections::BTreeMap::new();
    for vm in &rec.vms {
        let m = load(store, vm)?
            .manifest
            .ok_or_else(|| VmError::Failed(format!("VM {vm} has no manifest")))?;
        parts.insert(vm.clone(), m);
    }
    let manifest = format!("{name}@{}", crate::repo::now_secs());
    let upload = repo.begin_upload()?;
    repo.commit(&Manifest {
        info: ManifestInfo {
            name: manifest.clone(),
            kind: Kind::Experiment,
            size: 0,
            chunk_size: super::MEMORY_CHUNK as u32,
            image: None,
            parent: None,
            source: Some(name.into()),
            created_at: crate::repo::now_secs(),
            parts,
            config: Some(serde_json::json!({ "vms": rec.vms, "pause_skew_ms": pause_skew_ms })),
        },
        entries: Vec::new(),
    })?;
    drop(upload);
    rec.manifest = Some(manifest.clone());
    rec.repo = Some(repo.url());
    save_experiment(store, &rec)?;
    Ok(ExperimentSwapoutSummary {
        experiment: name.into(),
        manifest,
        pause_skew_ms,
        pauses,
        vms,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Swaps every member in (restored paused), then resumes them together. If one fails, those
/// restored before it stay paused, and running it again restores the rest and resumes all.
pub fn swapin(
    store: &Store,
    what: &str,
    repo: &RepoHandle,
    progress: Progress,
) -> Result<ExperimentSwapinSummary, VmError> {
    let started = Instant::now();
    let m = super::find_named_or_newest(repo, Kind::Experiment, what)?;
    let name = m.info.source.clone().unwrap_or_else(|| what.to_string());
    let mut vms = Vec::new();
    let mut members = Vec::new();
    for (vm, vm_manifest) in &m.info.parts {
        let vm_m = repo.find(Kind::Vm, vm_manifest)?.ok_or_else(|| {
            VmError::Failed(format!("the repository lacks VM manifest {vm_manifest}"))
        })?;
        members.push(vm.clone());
        // Restored (paused) by an earlier run that failed on a later member: keep it.
        if load(store, vm).is_ok_and(|r| {
            r.state == VmState::Running && r.manifest.as_deref() == Some(vm_manifest.as_str())
        }) {
            continue;
        }
        let stage = |s: &str, d: u64, n: u64| progress(&format!("{vm}: {s}"), d, n);
        vms.push(super::swapin(store, repo, &vm_m, false, &stage)?);
    }
    progress("resuming every VM", 0, 0);
    let (resumes, results) = together(&members, &|vm| super::resume(store, vm));
    for r in results {
        r?;
    }
    let rec = ExperimentRecord {
        name: name.clone(),
        vms: members,
        manifest: Some(m.info.name.clone()),
        repo: Some(repo.url()),
    };
    save_experiment(store, &rec)?;
    Ok(ExperimentSwapinSummary {
        experiment: name,
        manifest: m.info.name.clone(),
        resume_skew_ms: skew(&resumes),
        resumes,
        vms,
        seconds: started.elapsed().as_secs_f64(),
    })
}
