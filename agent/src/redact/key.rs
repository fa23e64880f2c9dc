//! The pseudonym key: 32 random bytes in a file only the agent can read, created at first
//! start. The same key gives the same tokens across restarts, so records stay joinable.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the redaction key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the redaction key file {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the redaction key file {path} can be read by others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the redaction key file {path} holds {len} bytes; it must hold {KEY_BYTES}")]
    Length { path: PathBuf, len: usize },
    #[error("the redaction key file {0} is not a regular file")]
    NotAFile(PathBuf),
}

fn random_key() -> std::io::Result<[u8; KEY_BYTES]> {
    let mut key = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// Reads the key, or creates it (mode 0600, parent directory 0700) when the file is missing.
pub fn load_or_create(path: &Path) -> Result<[u8; KEY_BYTES], KeyError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_file() {
                return Err(KeyError::NotAFile(path.to_owned()));
            }
            let mode = meta.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.to_owned(),
                source,
            })?;
            bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                path: path.to_owned(),
                len: bytes.len(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let create = |source| KeyError::Create {
                path: path.to_owned(),
                source,
            };
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
                && !dir.exists()
            {
                std::fs::create_dir_all(dir).map_err(create)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(create)?;
            }
            let key = random_key().map_err(create)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(create)?;
            f.write_all(&key).map_err(create)?;
            f.sync_all().map_err(create)?;
            tracing::info!(path = %path.display(), "created a new redaction key");
            Ok(key)
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reads_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/redaction.key");
        let a = load_or_create(&path).expect("created");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(path.parent().expect("parent"))
                .expect("stat")
                .mode()
                & 0o777,
            0o700
        );
        let b = load_or_create(&path).expect("read back");
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_readable_short_and_non_file_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        std::fs::write(&path, [7u8; KEY_BYTES]).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(&path).expect_err("group/other readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, [7u8; 5]).expect("write");
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Length { len: 5, .. })
        ));
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyError::NotAFile(_))
        ));
    }
}
