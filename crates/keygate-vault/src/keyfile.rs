//! Where the master key lives, and the file steps of `keygate key rotate`.
//!
//! A rotation never has a moment where the only copy of a key the database
//! needs is in memory:
//!
//! 1. the new key is written durably next to the key file as `<file>.next`
//!    ([`KeyFile::write_next`]: 0600, fsync, never over an existing `.next`);
//! 2. the store re-wraps every data key under it in one transaction;
//! 3. `<file>.next` is renamed over the key file ([`KeyFile::promote_next`],
//!    then the directory is synced).
//!
//! A crash between 1 and 2 leaves an unused `.next` (the store removes it at
//! the next start); a crash between 2 and 3 leaves the key the database needs
//! in `.next` (the store finishes the rename at the next start).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::files::{create_private_file, read_private_file, read_private_file_opt, sync_dir};
use crate::{MasterKey, VaultError};

/// Where the master key came from. Decides whether keygate can rotate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `KEYGATE_MASTER_KEY`: a value in keygate's environment, which keygate
    /// cannot replace. Rotation is refused.
    Env,
    /// A key file keygate may replace: `<data dir>/master.key` or the file
    /// named by `KEYGATE_MASTER_KEY_FILE`.
    File(KeyFile),
    /// Handed over in code ([`crate::Vault::new`]): there is nowhere to keep a
    /// new key. Rotation is refused.
    Memory,
}

/// A master key file and its `.next` companion used during rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    pub fn new(path: impl Into<PathBuf>) -> KeyFile {
        KeyFile { path: path.into() }
    }

    /// The key file itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<key file>.next`, in the same directory (so the rename is atomic).
    pub fn next_path(&self) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(OsString::from)
            .unwrap_or_else(|| OsString::from("master.key"));
        name.push(".next");
        self.path.with_file_name(name)
    }

    /// Reads and parses the key file (permissions checked).
    pub fn read(&self) -> Result<MasterKey, VaultError> {
        let bytes = read_private_file(&self.path)?;
        MasterKey::parse_file(&bytes, &self.path)
    }

    /// The key in `<key file>.next`, if that file exists (permissions checked).
    pub fn read_next(&self) -> Result<Option<MasterKey>, VaultError> {
        let next = self.next_path();
        match read_private_file_opt(&next)? {
            Some(bytes) => MasterKey::parse_file(&bytes, &next).map(Some),
            None => Ok(None),
        }
    }

    /// Refuses a key file that a rename cannot replace in place: a symbolic
    /// link (the rename would replace the link, not the file it points to) or
    /// anything but a regular file.
    pub fn check_replaceable(&self) -> Result<(), VaultError> {
        let meta = fs::symlink_metadata(&self.path)
            .map_err(|e| VaultError::io("inspecting", &self.path, e))?;
        if meta.file_type().is_symlink() {
            return Err(VaultError::BadKeyFile {
                path: self.path.clone(),
                reason: "it is a symbolic link and keygate only replaces a regular file; \
                         point KEYGATE_MASTER_KEY_FILE at the file itself",
            });
        }
        if !meta.is_file() {
            return Err(VaultError::BadKeyFile {
                path: self.path.clone(),
                reason: "not a regular file",
            });
        }
        Ok(())
    }

    /// Step 1 of a rotation: writes `key` to `<key file>.next` (0600,
    /// fsynced, directory synced). Never replaces an existing `.next`, which
    /// may hold the only copy of a key the database uses.
    pub fn write_next(&self, key: &MasterKey) -> Result<(), VaultError> {
        self.check_replaceable()?;
        let next = self.next_path();
        if create_private_file(&next, key.to_file_text().as_bytes())? {
            Ok(())
        } else {
            Err(VaultError::BadKeyFile {
                path: next,
                reason: "it already exists, left by an unfinished key rotation; \
                         restart keygate so that it settles it, then rotate again",
            })
        }
    }

    /// Step 3 of a rotation: renames `<key file>.next` over the key file
    /// (atomic), then syncs the directory.
    pub fn promote_next(&self) -> Result<(), VaultError> {
        fs::rename(self.next_path(), &self.path).map_err(|e| {
            VaultError::io(
                "installing the new master key (the database already uses it; until this \
                 succeeds it is kept in the .next file, which must not be deleted) as",
                &self.path,
                e,
            )
        })?;
        sync_dir(self.dir());
        Ok(())
    }

    /// Removes `<key file>.next` (a missing file is fine).
    pub fn discard_next(&self) -> Result<(), VaultError> {
        let next = self.next_path();
        match fs::remove_file(&next) {
            Ok(()) => {
                sync_dir(self.dir());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VaultError::io("removing", &next, e)),
        }
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn next_path_is_a_sibling() {
        let f = KeyFile::new("/etc/keygate/mk");
        assert_eq!(f.next_path(), PathBuf::from("/etc/keygate/mk.next"));
        let f = KeyFile::new("master.key");
        assert_eq!(f.next_path(), PathBuf::from("master.key.next"));
    }

    #[test]
    fn write_promote_and_discard() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, source) = MasterKey::load(tmp.path(), None, None).unwrap();
        let KeySource::File(file) = source else {
            panic!("data-dir key must be a file source: {source:?}");
        };
        assert_eq!(file.path(), tmp.path().join("master.key"));
        assert!(file.read_next().unwrap().is_none());

        let new = MasterKey::generate();
        file.write_next(&new).unwrap();
        assert_eq!(mode_of(&file.next_path()), 0o600);
        assert_eq!(file.read_next().unwrap().unwrap().id(), new.id());
        // The key file is untouched until promoted.
        assert_eq!(file.read().unwrap().id(), old.id());
        // A second write never replaces a pending key.
        let err = file.write_next(&MasterKey::generate()).unwrap_err();
        assert!(err.to_string().contains("master.key.next"), "{err}");
        assert_eq!(file.read_next().unwrap().unwrap().id(), new.id());

        file.promote_next().unwrap();
        assert_eq!(file.read().unwrap().id(), new.id());
        assert_eq!(mode_of(file.path()), 0o600);
        assert!(file.read_next().unwrap().is_none());
        assert_eq!(names(tmp.path()), vec!["master.key".to_string()]);

        file.write_next(&MasterKey::generate()).unwrap();
        file.discard_next().unwrap();
        file.discard_next().unwrap();
        assert_eq!(names(tmp.path()), vec!["master.key".to_string()]);
        assert_eq!(file.read().unwrap().id(), new.id());
    }

    #[test]
    fn pending_key_file_is_permission_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let file = KeyFile::new(tmp.path().join("k"));
        crate::write_private_file(file.path(), MasterKey::generate().to_file_text().as_bytes())
            .unwrap();
        file.write_next(&MasterKey::generate()).unwrap();
        fs::set_permissions(file.next_path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            file.read_next(),
            Err(VaultError::InsecurePermissions { .. })
        ));
    }

    #[test]
    fn symlinked_key_file_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real.key");
        crate::write_private_file(&real, MasterKey::generate().to_file_text().as_bytes()).unwrap();
        let link = tmp.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = KeyFile::new(&link);
        let err = file.write_next(&MasterKey::generate()).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(!file.next_path().exists());

        let missing = KeyFile::new(tmp.path().join("missing.key"));
        let err = missing.write_next(&MasterKey::generate()).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    }

    #[test]
    fn sources_follow_the_resolution_order() {
        let tmp = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let (got, source) = MasterKey::load(tmp.path(), Some(&k.to_base64()), None).unwrap();
        assert_eq!((got.id(), source), (k.id(), KeySource::Env));

        let f = tmp.path().join("elsewhere.key");
        crate::write_private_file(&f, k.to_file_text().as_bytes()).unwrap();
        let (got, source) = MasterKey::load(tmp.path(), None, Some(&f)).unwrap();
        assert_eq!(got.id(), k.id());
        assert_eq!(source, KeySource::File(KeyFile::new(&f)));
        assert!(!tmp.path().join("master.key").exists());
    }
}
