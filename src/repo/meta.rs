//! The metadata service's database (`meta.redb`): the chunk index and the manifests.
//!
//! Tables (kernel-notes/formats.md, "Repository"):
//! - `meta`: `format` = "stasis-repo-meta", `version` = "1".
//! - `chunks`: hash (32 bytes) -> brick u16 LE, size u32 LE, last use u64 LE (seconds).
//! - `disk_manifests`, `image_manifests`, `file_manifests`, `vm_manifests`,
//!   `experiment_manifests`: name -> encoded manifest (one table per kind).
//!
//! The database is opened once per handle, in redb's multi-writer mode: any number of
//! processes (a swapout, a disk server hydrating, `repo ls`, `repo serve`) keep it open at
//! once, and redb lets one write transaction run at a time. Opening it per operation, as
//! before, cost three syncs per question (redb marks the file in use on open and clean on
//! close), which made a swapout's negotiation and indexing wait on the disk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::chunk::ChunkHash;
use super::manifest::{Kind, Manifest, ManifestInfo};
use super::{GcReport, RepoError, RepoStat};

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const DISKS: TableDefinition<&str, &[u8]> = TableDefinition::new("disk_manifests");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("image_manifests");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("file_manifests");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vm_manifests");
const EXPERIMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("experiment_manifests");
const FORMAT_NAME: &str = "stasis-repo-meta";
const FORMAT_VERSION: &str = "1";
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// An error inside a transaction: the database's, or ours (which aborts it).
enum TxErr {
    Db(redb::Error),
    Repo(RepoError),
}

macro_rules! from_db {
    ($($t:ty),*) => {$(impl From<$t> for TxErr {
        fn from(e: $t) -> Self {
            TxErr::Db(e.into())
        }
    })*};
}
from_db!(
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError
);

impl From<RepoError> for TxErr {
    fn from(e: RepoError) -> Self {
        TxErr::Repo(e)
    }
}

pub struct Meta {
    path: PathBuf,
    db: Database,
}

fn table_for(kind: &Kind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match kind {
        Kind::Disk => DISKS,
        Kind::Image => IMAGES,
        Kind::File => FILES,
        Kind::Vm => VMS,
        Kind::Experiment => EXPERIMENTS,
    }
}

fn encode_chunk(brick: u16, size: u32, used: u64) -> [u8; 14] {
    let mut v = [0u8; 14];
    v[..2].copy_from_slice(&brick.to_le_bytes());
    v[2..6].copy_from_slice(&size.to_le_bytes());
    v[6..].copy_from_slice(&used.to_le_bytes());
    v
}

fn decode_chunk(v: &[u8]) -> Option<(u16, u32, u64)> {
    (v.len() == 14).then(|| {
        (
            u16::from_le_bytes([v[0], v[1]]),
            u32::from_le_bytes(v[2..6].try_into().expect("4 bytes")),
            u64::from_le_bytes(v[6..14].try_into().expect("8 bytes")),
        )
    })
}

/// A chunk's last use is written again only when older than this (a quarter of the default
/// gc grace period), so it always has most of a grace period ahead of it after `missing`.
pub const MARK_REFRESH_SECS: u64 = super::DEFAULT_GC_GRACE_SECS / 4;

fn hash_of(k: &[u8]) -> Option<ChunkHash> {
    k.try_into().ok().map(ChunkHash)
}

impl Meta {
    pub fn open(path: &Path) -> Result<Meta, RepoError> {
        let meta = Meta {
            path: path.to_path_buf(),
            db: Self::open_db(path)?,
        };
        // Nothing to write when the file holds this version's tables already (the usual
        // case): checked in a read transaction, without a commit.
        let ready = meta.read(|txn| {
            let t = match txn.open_table(META) {
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                other => other?,
            };
            let get = |k: &str| -> Result<Option<String>, TxErr> {
                Ok(t.get(k)?.map(|v| v.value().to_string()))
            };
            if get("format")?.as_deref() != Some(FORMAT_NAME)
                || get("version")?.as_deref() != Some(FORMAT_VERSION)
            {
                return Ok(false);
            }
            // A table added by a later version (a kind of manifest) is made below.
            let present = |opened: Result<_, redb::TableError>| match opened {
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
                other => other.map(|_| true),
            };
            let mut all = present(txn.open_table(CHUNKS).map(drop))?;
            for kind in Kind::ALL {
                all &= present(txn.open_table(table_for(&kind)).map(drop))?;
            }
            Ok(all)
        })?;
        if ready {
            return Ok(meta);
        }
        meta.write(|txn| {
            let mut t = txn.open_table(META)?;
            let format = t.get("format")?.map(|v| v.value().to_string());
            let version = t.get("version")?.map(|v| v.value().to_string());
            match (format.as_deref(), version.as_deref()) {
                (None, None) => {
                    t.insert("format", FORMAT_NAME)?;
                    t.insert("version", FORMAT_VERSION)?;
                }
                (Some(FORMAT_NAME), Some(FORMAT_VERSION)) => {}
                (f, v) => {
                    return Err(TxErr::Repo(RepoError::Meta {
                        path: path.to_path_buf(),
                        why: format!(
                            "format {f:?} version {v:?}, expected {FORMAT_NAME} {FORMAT_VERSION}"
                        ),
                    }))
                }
            }
            drop(t);
            txn.open_table(CHUNKS)?;
            for kind in Kind::ALL {
                txn.open_table(table_for(&kind))?;
            }
            Ok(())
        })?;
        Ok(meta)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> RepoError {
        RepoError::Meta {
            path: self.path.clone(),
            why: e.into().to_string(),
        }
    }

    fn open_db(path: &Path) -> Result<Database, RepoError> {
        use crate::fsutil::{open_shared_redb, RedbOpenError};
        open_shared_redb(path, false, OPEN_TIMEOUT).map_err(|e| RepoError::Meta {
            path: path.to_path_buf(),
            why: match e {
                RedbOpenError::Held => "held by another process".into(),
                RedbOpenError::Db(e) => redb::Error::from(e).to_string(),
                RedbOpenError::Damaged => "the database file is damaged".into(),
            },
        })
    }

    /// One write transaction, committed if `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, TxErr>,
    ) -> Result<T, RepoError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        match f(&txn) {
            Ok(v) => {
                txn.commit().map_err(|e| self.db_err(e))?;
                Ok(v)
            }
            Err(e) => {
                let _ = txn.abort();
                Err(self.tx_err(e))
            }
        }
    }

    fn tx_err(&self, e: TxErr) -> RepoError {
        match e {
            TxErr::Db(e) => self.db_err(e),
            TxErr::Repo(e) => e,
        }
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, TxErr>,
    ) -> Result<T, RepoError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        f(&txn).map_err(|e| self.tx_err(e))
    }

    /// Which of `hashes` are not indexed; those that are get their last use set to `now`,
    /// unless it is already recent (within [`MARK_REFRESH_SECS`]): a read transaction then
    /// answers, and no commit (an fsync) is paid for chunks a swapout just counted on.
    pub fn missing(&self, hashes: &[ChunkHash], now: u64) -> Result<Vec<bool>, RepoError> {
        let (out, stale) = self.read(|txn| {
            let t = txn.open_table(CHUNKS)?;
            let mut out = Vec::with_capacity(hashes.len());
            let mut stale = Vec::new();
            for h in hashes {
                match t.get(&h.0[..])?.and_then(|v| decode_chunk(v.value())) {
                    Some((brick, size, used)) => {
                        if used + MARK_REFRESH_SECS < now {
                            stale.push((*h, brick, size));
                        }
                        out.push(false);
                    }
                    None => out.push(true),
                }
            }
            Ok((out, stale))
        })?;
        if !stale.is_empty() {
            // Indexing again only sets the time: a chunk gc removed in between would come
            // back into the index without its file, so only those still indexed are marked.
            self.write(|txn| {
                let mut t = txn.open_table(CHUNKS)?;
                for (h, brick, size) in &stale {
                    if t.get(&h.0[..])?.is_some() {
                        t.insert(&h.0[..], &encode_chunk(*brick, *size, now)[..])?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    pub fn index(&self, entries: &[(ChunkHash, u16, u32)], now: u64) -> Result<(), RepoError> {
        self.write(|txn| {
            let mut t = txn.open_table(CHUNKS)?;
            for (h, brick, size) in entries {
                t.insert(&h.0[..], &encode_chunk(*brick, *size, now)[..])?;
            }
            Ok(())
        })
    }

    pub fn chunk(&self, hash: &ChunkHash) -> Result<Option<(u16, u32)>, RepoError> {
        self.read(|txn| {
            let t = txn.open_table(CHUNKS)?;
            let v = t.get(&hash.0[..])?;
            Ok(v.and_then(|v| decode_chunk(v.value()))
                .map(|(b, s, _)| (b, s)))
        })
    }

    /// Every indexed chunk: (hash, brick, size).
    pub fn chunks(&self) -> Result<Vec<(ChunkHash, u16, u32)>, RepoError> {
        self.read(|txn| {
            let t = txn.open_table(CHUNKS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                if let (Some(h), Some((b, s, _))) = (hash_of(k.value()), decode_chunk(v.value())) {
                    out.push((h, b, s));
                }
            }
            Ok(out)
        })
    }

    pub fn indexed(&self) -> Result<HashSet<ChunkHash>, RepoError> {
        Ok(self.chunks()?.into_iter().map(|c| c.0).collect())
    }

    pub fn commit(&self, m: &Manifest) -> Result<(), RepoError> {
        let bytes = m.encode();
        self.write(|txn| {
            // A VM or an experiment names manifests that must already be here.
            for part in m.info.parts.values() {
                let mut found = false;
                for kind in Kind::ALL {
                    found |= txn
                        .open_table(table_for(&kind))?
                        .get(part.as_str())?
                        .is_some();
                }
                if !found {
                    return Err(TxErr::Repo(RepoError::NotFound(format!(
                        "manifest {part:?} (a part of {:?}) is not in the repository",
                        m.info.name
                    ))));
                }
            }
            let mut t = txn.open_table(table_for(&m.info.kind))?;
            if let Some(old) = t.get(m.info.name.as_str())? {
                // A retried swapout (its client died after the commit) commits the same
                // content at another time: that is the same manifest.
                let same = Manifest::decode(old.value()).is_ok_and(|mut old| {
                    old.info.created_at = m.info.created_at;
                    old == *m
                });
                if same {
                    return Ok(());
                }
                return Err(TxErr::Repo(RepoError::Exists(format!(
                    "a different {} manifest named {:?} exists (manifests are immutable)",
                    m.info.kind.as_str(),
                    m.info.name
                ))));
            }
            if let Some(image) = &m.info.image {
                let images = txn.open_table(IMAGES)?;
                if images.get(image.as_str())?.is_none() {
                    return Err(TxErr::Repo(RepoError::NotFound(format!(
                        "image manifest {image:?} is not in the repository"
                    ))));
                }
            }
            let chunks = txn.open_table(CHUNKS)?;
            let mut missing = 0;
            let mut first = None;
            for (_, h) in &m.entries {
                if chunks.get(&h.0[..])?.is_none() {
                    missing += 1;
                    first.get_or_insert(*h);
                }
            }
            if let Some(first) = first {
                return Err(TxErr::Repo(RepoError::MissingChunks {
                    name: m.info.name.clone(),
                    missing,
                    first,
                }));
            }
            t.insert(m.info.name.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes manifests, in one transaction; see [`super::Repo::remove`]. Returns what was
    /// removed.
    pub fn remove(&self, what: &super::Removal) -> Result<Vec<(Kind, String)>, RepoError> {
        let super::Removal {
            names,
            kind,
            with_parts,
            in_use,
        } = what;
        self.write(|txn| {
            // Every manifest's references: its image (an image manifest) and its parts
            // (names of any kind, as the commit checks them).
            let mut all: Vec<(Kind, String, ManifestInfo)> = Vec::new();
            for k in Kind::ALL {
                let t = txn.open_table(table_for(&k))?;
                for item in t.iter()? {
                    let (name, v) = item?;
                    let info = Manifest::decode(v.value())?.info;
                    all.push((k, name.value().to_string(), info));
                }
            }
            let refers_to = |info: &ManifestInfo, k: Kind, name: &str| {
                (k == Kind::Image && info.image.as_deref() == Some(name))
                    || info.parts.values().any(|p| p == name)
            };
            // The manifests that stay and name manifest (k, n).
            let users_of = |k: Kind, n: &str, doomed: &[(Kind, String)]| -> Vec<String> {
                all.iter()
                    .filter(|(ak, an, info)| {
                        !doomed.iter().any(|(dk, dn)| dk == ak && dn == an) && refers_to(info, k, n)
                    })
                    .map(|(ak, an, _)| format!("{} {an:?}", ak.as_str()))
                    .collect()
            };
            let named_by_user = resolve_removals(&all, names, *kind)?;
            let mut doomed: Vec<(Kind, String)> = named_by_user.clone();
            if *with_parts {
                // The parts of what goes, and theirs, unless something that stays names them.
                let mut i = 0;
                while i < doomed.len() {
                    let (k, n) = doomed[i].clone();
                    if let Some((_, _, info)) = all.iter().find(|(ak, an, _)| *ak == k && *an == n)
                    {
                        for part in info.parts.values() {
                            let found: Vec<Kind> = all
                                .iter()
                                .filter(|(_, an, _)| an == part)
                                .map(|(ak, _, _)| *ak)
                                .collect();
                            // A part is named without its kind: with two manifests of that
                            // name, which one is the part is a guess, and a wrong guess would
                            // free another manifest's chunks.
                            if found.len() > 1 {
                                return Err(TxErr::Repo(RepoError::Usage(format!(
                                    "part {part:?} of {} {n:?} names manifests of several kinds: \
                                     remove them by name, with --kind",
                                    k.as_str()
                                ))));
                            }
                            for pk in found {
                                if !doomed.iter().any(|(dk, dn)| *dk == pk && dn == part) {
                                    doomed.push((pk, part.clone()));
                                }
                            }
                        }
                    }
                    i += 1;
                }
                while let Some(i) = doomed.iter().position(|(k, n)| {
                    !named_by_user.contains(&(*k, n.clone()))
                        && !users_of(*k, n, &doomed).is_empty()
                }) {
                    doomed.remove(i);
                }
            }
            for (k, n) in &named_by_user {
                let users = users_of(*k, n, &doomed);
                if !users.is_empty() {
                    return Err(TxErr::Repo(RepoError::Usage(format!(
                        "{} manifest {n:?} is named by {}: remove {} first{}",
                        k.as_str(),
                        users.join(", "),
                        if users.len() == 1 { "it" } else { "them" },
                        if matches!(k, Kind::Image) {
                            ""
                        } else {
                            " (--with-parts removes a VM or an experiment with its parts)"
                        }
                    ))));
                }
            }
            if let Some((_, n)) = doomed
                .iter()
                .find(|(k, n)| *k == Kind::Disk && in_use.contains(n))
            {
                return Err(TxErr::Repo(RepoError::Usage(format!(
                    "disk manifest {n:?} is still being swapped in here: a disk hydrates from it \
                     (`stasis disk hydrate` completes it)"
                ))));
            }
            for (k, n) in &doomed {
                txn.open_table(table_for(k))?.remove(n.as_str())?;
            }
            Ok(doomed)
        })
    }

    pub fn manifest(&self, kind: Kind, name: &str) -> Result<Option<Manifest>, RepoError> {
        let bytes = self.read(|txn| {
            let t = txn.open_table(table_for(&kind))?;
            let v = t.get(name)?;
            Ok(v.map(|v| v.value().to_vec()))
        })?;
        bytes.map(|b| Manifest::decode(&b)).transpose()
    }

    pub fn all_manifests(&self) -> Result<Vec<Manifest>, RepoError> {
        let raw = self.read(|txn| {
            let mut out = Vec::new();
            for kind in Kind::ALL {
                let t = txn.open_table(table_for(&kind))?;
                for item in t.iter()? {
                    let (_, v) = item?;
                    out.push(v.value().to_vec());
                }
            }
            Ok(out)
        })?;
        raw.iter().map(|b| Manifest::decode(b)).collect()
    }

    pub fn list(&self) -> Result<Vec<(ManifestInfo, u64)>, RepoError> {
        Ok(self
            .all_manifests()?
            .into_iter()
            .map(|m| (m.info, m.entries.len() as u64))
            .collect())
    }

    pub fn stat(&self) -> Result<RepoStat, RepoError> {
        let manifests = self.all_manifests()?;
        let (chunks, stored_bytes) = self.read(|txn| {
            let t = txn.open_table(CHUNKS)?;
            let mut bytes = 0u64;
            for item in t.iter()? {
                let (_, v) = item?;
                bytes += decode_chunk(v.value()).map_or(0, |(_, s, _)| s as u64);
            }
            Ok((t.len()?, bytes))
        })?;
        let mut s = RepoStat {
            chunks,
            stored_bytes,
            ..RepoStat::default()
        };
        for m in &manifests {
            match m.info.kind {
                Kind::Disk => s.disk_manifests += 1,
                Kind::Image => s.image_manifests += 1,
                Kind::File => s.file_manifests += 1,
                Kind::Vm => s.vm_manifests += 1,
                Kind::Experiment => s.experiment_manifests += 1,
            }
            s.logical_bytes += m.entries.len() as u64 * m.info.chunk_size as u64;
        }
        s.dedup_ratio = if stored_bytes > 0 {
            s.logical_bytes as f64 / stored_bytes as f64
        } else {
            0.0
        };
        Ok(s)
    }

    /// Removes from the index every chunk no manifest names and unused since `cutoff`; returns
    /// the report and the removed chunks (hash, brick, size), whose files the caller deletes.
    pub fn sweep(&self, cutoff: u64) -> Result<(GcReport, Vec<(ChunkHash, u16, u32)>), RepoError> {
        let live: HashSet<ChunkHash> = self
            .all_manifests()?
            .iter()
            .flat_map(|m| m.entries.iter().map(|e| e.1))
            .collect();
        self.write(|txn| {
            let mut t = txn.open_table(CHUNKS)?;
            let mut report = GcReport::default();
            let mut doomed = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let (Some(h), Some((brick, size, used))) =
                    (hash_of(k.value()), decode_chunk(v.value()))
                else {
                    continue;
                };
                if live.contains(&h) {
                    report.chunks_live += 1;
                } else if used >= cutoff {
                    report.chunks_in_grace += 1;
                } else {
                    doomed.push((h, brick, size));
                }
            }
            for (h, _, size) in &doomed {
                t.remove(&h.0[..])?;
                report.chunks_removed += 1;
                report.bytes_removed += *size as u64;
            }
            Ok((report, doomed))
        })
    }
}

/// Which manifest each of `names` is, among `all` (kind, name, info): of `kind` if given,
/// else the one kind that has the name.
fn resolve_removals(
    all: &[(Kind, String, ManifestInfo)],
    names: &[String],
    kind: Option<Kind>,
) -> Result<Vec<(Kind, String)>, RepoError> {
    let mut out: Vec<(Kind, String)> = Vec::new();
    for name in names {
        let kinds: Vec<Kind> = all
            .iter()
            .filter(|(k, n, _)| n == name && kind.is_none_or(|want| want == *k))
            .map(|(k, _, _)| *k)
            .collect();
        match kinds.as_slice() {
            [k] => {
                if !out.contains(&(*k, name.clone())) {
                    out.push((*k, name.clone()));
                }
            }
            [] => {
                return Err(RepoError::NotFound(format!(
                    "no {}manifest {name:?}",
                    kind.map_or(String::new(), |k| format!("{} ", k.as_str()))
                )))
            }
            several => {
                let kinds: Vec<&str> = several.iter().map(Kind::as_str).collect();
                return Err(RepoError::Usage(format!(
                    "{name:?} names a {} manifest: say which with --kind",
                    kinds.join(" and a ")
                )));
            }
        }
    }
    Ok(out)
}
