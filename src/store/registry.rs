//! The registry: images, disks, deltas and the branch tree, in redb (embedded, ACID; its
//! version is pinned, since redb 2.0 changed the file format that 1.x promised). Values are JSON
//! documents so that dumps stay readable; a field added later must be `Option` or carry
//! `#[serde(default)]` so that older records still load. Layout: kernel-notes/formats.md.
//!
//! Every process that uses the store (the CLI, disk servers that live for days, VM commands)
//! keeps the registry open from `Store::open` on, in redb's multi-writer mode, which runs one
//! write transaction at a time across them. Opening it per operation, as before, cost three
//! syncs and an integrity check each time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::delta::DeltaStats;
use super::StoreError;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const DISKS: TableDefinition<&str, &[u8]> = TableDefinition::new("disks");
const DELTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("deltas");

const FORMAT_NAME: &str = "stasis-registry";
const FORMAT_VERSION: &str = "1";
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    /// Logical size in bytes (a whole number of blocks).
    pub size: u64,
    pub source: String,
    pub source_format: String,
    pub chunk_size: u32,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub imported_at: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskRecord {
    pub name: String,
    pub image: String,
    pub size: u64,
    /// Id of the (possibly shared) delta, or none while the disk equals its golden.
    pub delta: Option<String>,
    /// Id of the disk's own write layer (a directory under `wlogs/`).
    pub wlog: String,
    /// The disk this one was forked from.
    pub parent: Option<String>,
    /// Set when the parent was removed (the name may since have been reused).
    #[serde(default)]
    pub parent_removed: bool,
    pub created_at: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaRecord {
    pub id: String,
    pub image: String,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub file_bytes: u64,
    pub created_at: u64,
    /// For a delta made by swapin: "<repository URL>#<manifest>", where its data comes from.
    #[serde(default)]
    pub origin: Option<String>,
}

impl DeltaRecord {
    pub fn new(id: String, image: String, stats: &DeltaStats) -> Self {
        DeltaRecord {
            id,
            image,
            data_blocks: stats.data_blocks,
            zero_blocks: stats.zero_blocks,
            file_bytes: stats.file_bytes,
            created_at: super::now_secs(),
            origin: None,
        }
    }
}

pub struct Registry {
    path: PathBuf,
    db: Database,
}

/// One registry transaction. Nothing is written unless the closure given to
/// [`Registry::update`] returns `Ok`.
pub struct Txn<'a> {
    txn: Tx<'a>,
    path: &'a Path,
}

/// A read (`Registry::read`: it waits for no writer, in this process or another) or a
/// write (`Registry::update`: one at a time across every process of the store).
enum Tx<'a> {
    Read(&'a redb::ReadTransaction),
    Write(&'a redb::WriteTransaction),
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(path, format!("registry: {e}"))
}

impl Registry {
    /// Opens the registry at `path`, creating it if absent.
    pub fn open(path: &Path) -> Result<Registry, StoreError> {
        let reg = Registry {
            path: path.to_path_buf(),
            db: Self::open_db(path)?,
        };
        // Nothing to write when the file is a registry of this version already (the usual
        // case): checked in a read transaction, which waits for no writer.
        if reg.is_ready()? {
            return Ok(reg);
        }
        reg.update(|t| {
            let Tx::Write(txn) = t.txn else {
                unreachable!("update runs a write transaction")
            };
            let mut meta = txn.open_table(META).map_err(|e| db_err(t.path, e))?;
            let name = meta.get("format").map_err(|e| db_err(t.path, e))?.map(|v| v.value().to_string());
            let version = meta.get("version").map_err(|e| db_err(t.path, e))?.map(|v| v.value().to_string());
            match (name.as_deref(), version.as_deref()) {
                (None, None) if txn.list_tables().map_err(|e| db_err(t.path, e))?.count() > 1 => {
                    return Err(StoreError::corrupt(t.path, "registry: a redb database, but not a Stasis registry"))
                }
                (None, None) => {
                    meta.insert("format", FORMAT_NAME).map_err(|e| db_err(t.path, e))?;
                    meta.insert("version", FORMAT_VERSION).map_err(|e| db_err(t.path, e))?;
                }
                (Some(FORMAT_NAME), Some(FORMAT_VERSION)) => {}
                (Some(FORMAT_NAME), Some(v)) => {
                    return Err(StoreError::corrupt(
                        t.path,
                        format!("registry: unsupported version {v} (this build reads version {FORMAT_VERSION})"),
                    ))
                }
                _ => return Err(StoreError::corrupt(t.path, "registry: not a Stasis registry")),
            }
            drop(meta);
            for def in [IMAGES, DISKS, DELTAS] {
                txn.open_table(def).map_err(|e| db_err(t.path, e))?;
            }
            Ok(())
        })?;
        Ok(reg)
    }

    /// Whether the file is a registry of this version with its tables (a new file has none).
    fn is_ready(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        for def in [IMAGES, DISKS, DELTAS] {
            match txn.open_table(def) {
                Ok(_) => {}
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                Err(e) => return Err(db_err(&self.path, e)),
            }
        }
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(db_err(&self.path, e)),
        };
        let get = |k: &str| -> Result<Option<String>, StoreError> {
            Ok(meta
                .get(k)
                .map_err(|e| db_err(&self.path, e))?
                .map(|v| v.value().to_string()))
        };
        Ok(get("format")?.as_deref() == Some(FORMAT_NAME)
            && get("version")?.as_deref() == Some(FORMAT_VERSION))
    }

    fn open_db(at: &Path) -> Result<Database, StoreError> {
        use crate::fsutil::{open_shared_redb, RedbOpenError};
        open_shared_redb(at, true, OPEN_TIMEOUT).map_err(|e| match e {
            RedbOpenError::Held => StoreError::Busy(format!(
                "registry {} is held by another process",
                at.display()
            )),
            RedbOpenError::Db(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
                StoreError::io(at, e)
            }
            RedbOpenError::Db(e) => db_err(at, e),
            RedbOpenError::Damaged => db_err(at, "the database file is damaged"),
        })
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Txn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        let out = f(&mut Txn {
            txn: Tx::Write(&txn),
            path: &self.path,
        });
        match out {
            Ok(v) => {
                txn.commit().map_err(|e| db_err(&self.path, e))?;
                Ok(v)
            }
            Err(e) => {
                txn.abort().map_err(|e| db_err(&self.path, e))?;
                Err(e)
            }
        }
    }

    /// Runs `f` in a read transaction: it sees the last commit of any process.
    pub fn read<T>(&self, f: impl FnOnce(&Txn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        f(&Txn {
            txn: Tx::Read(&txn),
            path: &self.path,
        })
    }
}

/// The record under `key`, decoded.
fn record<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    path: &Path,
) -> Result<Option<T>, StoreError> {
    let Some(v) = table.get(key).map_err(|e| db_err(path, e))? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|e| db_err(path, format!("record {key:?} is damaged: {e}")))
}

/// Every record of a table, decoded.
fn records<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter().map_err(|e| db_err(path, e))? {
        let (k, v) = item.map_err(|e| db_err(path, e))?;
        let rec = serde_json::from_slice(v.value())
            .map_err(|e| db_err(path, format!("record {:?} is damaged: {e}", k.value())))?;
        out.push(rec);
    }
    Ok(out)
}

impl Txn<'_> {
    fn get<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.txn {
            Tx::Read(t) => record(
                &t.open_table(def).map_err(|e| db_err(self.path, e))?,
                key,
                self.path,
            ),
            Tx::Write(t) => record(
                &t.open_table(def).map_err(|e| db_err(self.path, e))?,
                key,
                self.path,
            ),
        }
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        match self.txn {
            Tx::Read(t) => records(
                &t.open_table(def).map_err(|e| db_err(self.path, e))?,
                self.path,
            ),
            Tx::Write(t) => records(
                &t.open_table(def).map_err(|e| db_err(self.path, e))?,
                self.path,
            ),
        }
    }

    /// The write transaction under `update` (a read's `Txn` is never `&mut`).
    fn writing(&self) -> &redb::WriteTransaction {
        match self.txn {
            Tx::Write(t) => t,
            Tx::Read(_) => unreachable!("a registry read is given &Txn, which cannot write"),
        }
    }

    fn put<T: Serialize>(
        &self,
        def: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| db_err(self.path, e))?;
        let mut table = self
            .writing()
            .open_table(def)
            .map_err(|e| db_err(self.path, e))?;
        table
            .insert(key, bytes.as_slice())
            .map_err(|e| db_err(self.path, e))?;
        Ok(())
    }

    fn remove(&self, def: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        let mut table = self
            .writing()
            .open_table(def)
            .map_err(|e| db_err(self.path, e))?;
        table.remove(key).map_err(|e| db_err(self.path, e))?;
        Ok(())
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        self.get(IMAGES, name)
    }
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.all(IMAGES)
    }
    pub fn put_image(&mut self, rec: &ImageRecord) -> Result<(), StoreError> {
        self.put(IMAGES, &rec.name, rec)
    }
    pub fn remove_image(&mut self, name: &str) -> Result<(), StoreError> {
        self.remove(IMAGES, name)
    }

    pub fn disk(&self, name: &str) -> Result<Option<DiskRecord>, StoreError> {
        self.get(DISKS, name)
    }
    pub fn disks(&self) -> Result<Vec<DiskRecord>, StoreError> {
        self.all(DISKS)
    }
    pub fn put_disk(&mut self, rec: &DiskRecord) -> Result<(), StoreError> {
        self.put(DISKS, &rec.name, rec)
    }
    pub fn remove_disk(&mut self, name: &str) -> Result<(), StoreError> {
        self.remove(DISKS, name)
    }

    pub fn delta(&self, id: &str) -> Result<Option<DeltaRecord>, StoreError> {
        self.get(DELTAS, id)
    }
    pub fn deltas(&self) -> Result<Vec<DeltaRecord>, StoreError> {
        self.all(DELTAS)
    }
    pub fn put_delta(&mut self, rec: &DeltaRecord) -> Result<(), StoreError> {
        self.put(DELTAS, &rec.id, rec)
    }
    pub fn remove_delta(&mut self, id: &str) -> Result<(), StoreError> {
        self.remove(DELTAS, id)
    }
}
