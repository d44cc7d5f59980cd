//! Private directories and key files.
//!
//! Key files are written 0600 through a temporary file in the same directory
//! (fsync, then rename or link), so a reader never sees a partial file, and are
//! refused on read if group or others can access them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::VaultError;

/// Key files are small; anything larger than this is not one of ours.
const MAX_KEY_FILE_LEN: u64 = 1 << 20;

/// Creates `dir` (and parents) if missing with mode 0700; if it exists, leaves mode alone.
pub fn ensure_private_dir(dir: &Path) -> Result<(), VaultError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(VaultError::io(
                "creating directory",
                dir,
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(VaultError::io("inspecting directory", dir, e)),
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| VaultError::io("creating directory", dir, e))
}

/// Writes a new file with mode 0600 atomically (write temp file in same dir with 0600, fsync, rename).
///
/// An existing file at `path` is replaced.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    write_atomically(path, bytes, 0o600, Install::Replace).map(|_| ())
}

/// Like [`write_private_file`], but never replaces an existing file: returns
/// `Ok(false)` (and leaves the existing file untouched) if `path` already
/// exists, `Ok(true)` if this call created it. Two processes racing to create
/// the same key file therefore agree on one content.
pub fn create_private_file(path: &Path, bytes: &[u8]) -> Result<bool, VaultError> {
    write_atomically(path, bytes, 0o600, Install::CreateNew)
}

/// Writes a public (0644) file atomically, replacing any existing one.
pub(crate) fn write_public_file(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    write_atomically(path, bytes, 0o644, Install::Replace).map(|_| ())
}

/// Reads a key file, refusing (VaultError::InsecurePermissions{path, mode}) if group or world can read/write it (mode & 0o077 != 0).
pub fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    read_private_file_opt(path)?.ok_or_else(|| {
        VaultError::io(
            "reading",
            path,
            io::Error::new(io::ErrorKind::NotFound, "no such file"),
        )
    })
}

/// [`read_private_file`], with a missing file reported as `Ok(None)`.
pub(crate) fn read_private_file_opt(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, VaultError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VaultError::io("opening", path, e)),
    };
    // Check the file we actually opened (no check-then-open race).
    let meta = file
        .metadata()
        .map_err(|e| VaultError::io("inspecting", path, e))?;
    if !meta.is_file() {
        return Err(VaultError::BadKeyFile {
            path: path.to_path_buf(),
            reason: "not a regular file",
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(VaultError::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(VaultError::BadKeyFile {
            path: path.to_path_buf(),
            reason: "file is too large to be a key file",
        });
    }
    // Reserve enough up front that reading does not reallocate (which would
    // leave an unzeroized copy behind); +1 lets read_to_end detect EOF.
    let cap = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    (&mut file)
        .take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| VaultError::io("reading", path, e))?;
    if buf.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(VaultError::BadKeyFile {
            path: path.to_path_buf(),
            reason: "file is too large to be a key file",
        });
    }
    Ok(Some(buf))
}

/// How the finished temporary file takes the final name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Install {
    /// `rename`: replaces an existing file.
    Replace,
    /// `link`: fails if the name exists.
    CreateNew,
}

/// Returns Ok(false) only for `Install::CreateNew` when the target exists.
fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    install: Install,
) -> Result<bool, VaultError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        VaultError::io(
            "writing",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;

    if install == Install::CreateNew && fs::symlink_metadata(path).is_ok() {
        return Ok(false);
    }

    let (tmp_path, mut file) = create_temp(&dir, file_name, mode)?;
    let result = (|| {
        file.write_all(bytes)
            .map_err(|e| VaultError::io("writing", &tmp_path, e))?;
        // The umask may have narrowed the mode; make it exactly `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| VaultError::io("setting permissions on", &tmp_path, e))?;
        file.sync_all()
            .map_err(|e| VaultError::io("syncing", &tmp_path, e))?;
        drop(file);
        match install {
            Install::Replace => {
                fs::rename(&tmp_path, path)
                    .map_err(|e| VaultError::io("renaming into", path, e))?;
                Ok(true)
            }
            Install::CreateNew => match fs::hard_link(&tmp_path, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(VaultError::io("creating", path, e)),
            },
        }
    })();
    // After a rename the temp name is gone; otherwise remove it (best effort).
    if install == Install::CreateNew || result.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    let created = result?;
    if created {
        sync_dir(&dir);
    }
    Ok(created)
}

/// Creates a fresh temporary file next to the target.
fn create_temp(
    dir: &Path,
    file_name: &std::ffi::OsStr,
    mode: u32,
) -> Result<(PathBuf, File), VaultError> {
    let mut last_err = None;
    for _ in 0..16 {
        let mut rnd = [0u8; 8];
        crate::fill_random(&mut rnd);
        let mut name = std::ffi::OsString::from(".");
        name.push(file_name);
        name.push(format!(".tmp-{}-{}", std::process::id(), hex::encode(rnd)));
        let tmp_path = dir.join(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp_path)
        {
            Ok(f) => return Ok((tmp_path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(VaultError::io("creating temporary file in", dir, e)),
        }
    }
    Err(VaultError::io(
        "creating temporary file in",
        dir,
        last_err.unwrap_or_else(|| io::Error::other("could not pick a temporary name")),
    ))
}

/// Makes a rename/link durable. Best effort: some filesystems refuse to fsync
/// directories, and the data itself is already synced.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).map(|m| m.mode() & 0o7777).unwrap_or(0)
    }

    #[test]
    fn write_private_file_creates_0600_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private_file(&p, b"one").unwrap();
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_private_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o600);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k")]);
    }

    #[test]
    fn create_private_file_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        assert!(create_private_file(&p, b"first").unwrap());
        assert_eq!(mode_of(&p), 0o600);
        assert!(!create_private_file(&p, b"second").unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 1, "temporary file left behind");
    }

    #[test]
    fn read_private_file_checks_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_private_file(&p, b"secret").unwrap();
        assert_eq!(&**read_private_file(&p).unwrap(), b"secret");

        for bad in [0o640, 0o604, 0o660, 0o606, 0o644, 0o620, 0o602] {
            fs::set_permissions(&p, fs::Permissions::from_mode(bad)).unwrap();
            match read_private_file(&p) {
                Err(VaultError::InsecurePermissions { path, mode }) => {
                    assert_eq!(path, p);
                    assert_eq!(mode, bad);
                }
                other => panic!("mode {bad:o}: expected InsecurePermissions, got {other:?}"),
            }
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(&**read_private_file(&p).unwrap(), b"secret");
    }

    #[test]
    fn read_private_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing.key");
        let err = read_private_file(&p).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("missing.key"), "{err}");

        let err = read_private_file(dir.path()).unwrap_err();
        assert!(matches!(err, VaultError::BadKeyFile { .. }), "{err:?}");
    }

    #[test]
    fn ensure_private_dir_creates_0700_and_leaves_existing_alone() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        ensure_private_dir(&nested).unwrap();
        assert!(nested.is_dir());
        assert_eq!(mode_of(&nested), 0o700);
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);

        fs::set_permissions(&nested, fs::Permissions::from_mode(0o750)).unwrap();
        ensure_private_dir(&nested).unwrap();
        assert_eq!(mode_of(&nested), 0o750);

        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(ensure_private_dir(&file).is_err());
    }
}
