//! Where keygate keeps its files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// `--data-dir`, else `$XDG_DATA_HOME/keygate`, else `~/.local/share/keygate`.
pub fn data_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("keygate"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/keygate")),
        None => bail!("cannot find a data dir: set --data-dir, KEYGATE_DATA_DIR or HOME"),
    }
}

pub fn ca_cert(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

pub fn admin_token(dir: &Path) -> PathBuf {
    dir.join("admin-token")
}

pub fn default_database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("keygate.db").display())
}
