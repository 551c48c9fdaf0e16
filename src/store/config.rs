//! `<store>/config.json`: the node's settings that commands use when no option or
//! environment variable says otherwise (kernel-notes/formats.md, "Store configuration").
//! Today one: the repository swapouts go to and swapins come from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

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

    /// The repository when no option names one: the configured one, else `<store>/repo`.
    pub fn default_repo(&self) -> Result<String, StoreError> {
        Ok(match self.config()?.repo {
            Some(url) => url,
            None => self.root().join("repo").display().to_string(),
        })
    }

    /// Replaces the configuration, whole or not at all.
    pub fn set_config(&self, config: &StoreConfig) -> Result<(), StoreError> {
        let path = self.config_path();
        crate::fsutil::write_json_durably(&path, config).map_err(|e| StoreError::io(&path, e))
    }
}
