//! `<store>/config.json`: the node's settings that commands use when no option or
//! environment variable says otherwise (kernel-notes/formats.md, "Store configuration").
//! Today one: the repository swapouts go to and swapins come from.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{format, Store, StoreError};

const FILE: &str = "config.json";

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The repository's URL (`file:///PATH`, `http://HOST:PORT`) or absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

impl Store {
    fn config_path(&self) -> PathBuf {
        self.root().join(FILE)
    }

    /// The configuration; a store without the file has the default (nothing set).
    pub fn config(&self) -> Result<StoreConfig, StoreError> {
        let path = self.config_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::corrupt(&path, format!("not a store configuration: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreConfig::default()),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// Replaces the configuration, whole or not at all (a temporary file, synced, renamed).
    pub fn set_config(&self, config: &StoreConfig) -> Result<(), StoreError> {
        let path = self.config_path();
        let tmp = path.with_extension("json.tmp");
        let mut bytes = serde_json::to_vec_pretty(config).expect("a config serializes");
        bytes.push(b'\n');
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| StoreError::io(&path, e))?;
        format::sync_dir(path.parent().unwrap_or(Path::new(".")))
    }
}
