//! Signed checkpoints: the host key states "my chain up to seq N ends in hash H", and each
//! checkpoint names the previous one's signature, so checkpoints form their own chain (like
//! CloudTrail digest files). Without the host key nobody can rewrite records and then make the
//! checkpoints agree.

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use phi_proto::{Timestamp, v1::Checkpoint};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

/// The host's checkpoint signing key.
pub struct HostKey {
    key: SigningKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the host key {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the host key {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the host key {path} can be read by others (mode {mode:o}): run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the host key {path} holds {len} bytes; it must hold 32")]
    Length { path: PathBuf, len: usize },
}

/// SHA-256 of a public key: names the key in checkpoints and records.
pub fn key_id(public: &[u8]) -> Vec<u8> {
    Sha256::digest(public).to_vec()
}

impl HostKey {
    /// Reads the key, or creates it (32 random bytes, mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match std::fs::metadata(path) {
            Ok(meta) => {
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
                let secret: [u8; 32] =
                    bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                        path: path.to_owned(),
                        len: bytes.len(),
                    })?;
                Ok(HostKey {
                    key: SigningKey::from_bytes(&secret),
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
                let mut secret = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut secret))
                    .map_err(create)?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(create)?;
                f.write_all(&secret).map_err(create)?;
                f.sync_all().map_err(create)?;
                Ok(HostKey {
                    key: SigningKey::from_bytes(&secret),
                })
            }
            Err(source) => Err(KeyError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// A key from raw bytes (tests, tools).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        HostKey {
            key: SigningKey::from_bytes(&secret),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a checkpoint over `(host_id, seq, head_hash, time, prev_signature)`.
    pub fn checkpoint(
        &self,
        host_id: &str,
        boot_id: &str,
        seq: u64,
        head_hash: &[u8],
        time: Timestamp,
        prev_signature: &[u8],
    ) -> Checkpoint {
        let mut cp = Checkpoint {
            host_id: host_id.to_owned(),
            seq,
            head_hash: head_hash.to_vec(),
            time: Some(time),
            prev_signature: prev_signature.to_vec(),
            signature: Vec::new(),
            key_id: key_id(&self.public_key()),
            boot_id: boot_id.to_owned(),
        };
        let signature: Signature = self.key.sign(&cp.encode_to_vec());
        cp.signature = signature.to_bytes().to_vec();
        cp
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint at seq {seq}: the public key is not a valid Ed25519 key")]
    BadKey { seq: u64 },
    #[error("checkpoint at seq {seq}: signed by another key than the host's")]
    OtherKey { seq: u64 },
    #[error("checkpoint at seq {seq}: the signature does not verify")]
    Signature { seq: u64 },
    #[error("checkpoint at seq {seq}: it does not name the previous checkpoint's signature")]
    Link { seq: u64 },
}

/// Verifies a checkpoint's signature with `public_key`, and that it follows the checkpoint
/// whose signature is `prev_signature` (empty for the first).
pub fn verify(
    cp: &Checkpoint,
    public_key: &[u8],
    prev_signature: &[u8],
) -> Result<(), CheckpointError> {
    let seq = cp.seq;
    let key: [u8; 32] = public_key
        .try_into()
        .map_err(|_| CheckpointError::BadKey { seq })?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| CheckpointError::BadKey { seq })?;
    if cp.key_id != key_id(public_key) {
        return Err(CheckpointError::OtherKey { seq });
    }
    let signature: [u8; 64] = cp
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| CheckpointError::Signature { seq })?;
    let mut unsigned = cp.clone();
    unsigned.signature.clear();
    key.verify_strict(
        &unsigned.encode_to_vec(),
        &Signature::from_bytes(&signature),
    )
    .map_err(|_| CheckpointError::Signature { seq })?;
    if cp.prev_signature != prev_signature {
        return Err(CheckpointError::Link { seq });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> Timestamp {
        Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }
    }

    #[test]
    fn checkpoints_chain_and_verify() {
        let key = HostKey::from_secret([3; 32]);
        let a = key.checkpoint("h", "b", 10, &[1; 32], ts(), &[]);
        let b = key.checkpoint("h", "b", 20, &[2; 32], ts(), &a.signature);
        verify(&a, &key.public_key(), &[]).expect("first");
        verify(&b, &key.public_key(), &a.signature).expect("second");
        assert_eq!(
            verify(&b, &key.public_key(), &[]),
            Err(CheckpointError::Link { seq: 20 })
        );
        let mut edited = b.clone();
        edited.head_hash = vec![9; 32];
        assert_eq!(
            verify(&edited, &key.public_key(), &a.signature),
            Err(CheckpointError::Signature { seq: 20 })
        );
        let other = HostKey::from_secret([4; 32]);
        assert_eq!(
            verify(&b, &other.public_key(), &a.signature),
            Err(CheckpointError::OtherKey { seq: 20 })
        );
    }

    #[test]
    fn the_key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/host.key");
        let a = HostKey::load_or_create(&path).expect("created");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        let b = HostKey::load_or_create(&path).expect("loaded");
        assert_eq!(a.public_key(), b.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            HostKey::load_or_create(&path),
            Err(KeyError::Permissions { .. })
        ));
    }
}
