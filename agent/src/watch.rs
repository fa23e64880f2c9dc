//! The watch list: directory trees whose opens are reported. Kept in kernel maps (by device and
//! inode for the dentry walk, by canonical path for failed opens) and mirrored here for
//! user-space decisions. Changes take effect in the kernel immediately.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::{
        fd::OwnedFd,
        unix::{
            ffi::OsStrExt as _,
            fs::{MetadataExt as _, OpenOptionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

use agent_common::{
    limits::{MAX_WATCHES, WATCH_PREFIX_MAX},
    watch::{WatchKey, kernel_dev},
};
use aya::maps::lpm_trie::Key;

use crate::{probes::WatchMaps, text};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watch directory {0} does not exist: create it or remove it from the watch list")]
    NotFound(PathBuf),
    #[error("watch path {0} is not a directory: watch the directory that holds it")]
    NotDirectory(PathBuf),
    #[error("cannot resolve watch directory {path}: {source}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "watch directory {0} is too long once resolved ({1} bytes); the limit is {max} bytes",
        max = WATCH_PREFIX_MAX - 2
    )]
    TooLong(PathBuf, usize),
    #[error("too many watched directories (at most {MAX_WATCHES})")]
    TooMany,
    #[error(
        "the kernel did not learn watch directory {0} when the agent opened it; the sys_exit \
         program is not attached"
    )]
    NotRegistered(PathBuf),
    #[error("cannot open watch directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("updating the kernel watch maps for {path} failed: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// One watched tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    pub id: u32,
    /// Canonical (resolved, absolute) path.
    pub path: PathBuf,
    pub key: WatchKey,
}

impl Watch {
    pub fn display(&self) -> String {
        text::escape_bytes(self.path.as_os_str().as_bytes())
    }
}

/// What a change to the watch list did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

pub struct WatchList {
    maps: WatchMaps,
    by_path: BTreeMap<PathBuf, Watch>,
    dev_counts: HashMap<u32, u32>,
    /// An open descriptor per watch id: it pins the directory's dentry, whose address the
    /// kernel programs use to recognize the directory.
    pins: HashMap<u32, OwnedFd>,
    /// Watch ids with a problem already reported by `revalidate`.
    troubled: HashSet<u32>,
    next_id: u32,
}

/// Canonical path and kernel key of a directory.
fn resolve(dir: &Path) -> Result<(PathBuf, WatchKey), WatchError> {
    let canonical = std::fs::canonicalize(dir).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            WatchError::NotFound(dir.to_owned())
        } else {
            WatchError::Resolve {
                path: dir.to_owned(),
                source,
            }
        }
    })?;
    let meta = std::fs::metadata(&canonical).map_err(|source| WatchError::Resolve {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(WatchError::NotDirectory(dir.to_owned()));
    }
    let len = canonical.as_os_str().len();
    if len + 2 > WATCH_PREFIX_MAX {
        return Err(WatchError::TooLong(canonical, len));
    }
    let dev = meta.dev();
    let key = WatchKey {
        dev: kernel_dev(libc::major(dev), libc::minor(dev)),
        _pad: 0,
        ino: meta.ino(),
    };
    Ok((canonical, key))
}

/// Checks that `dir` can be watched, without touching the kernel.
pub fn check(dir: &Path) -> Result<(), WatchError> {
    resolve(dir).map(|_| ())
}

/// The two trie entries of a canonical path: everything below it, and the path itself.
fn prefix_keys(canonical: &Path) -> Vec<Key<[u8; WATCH_PREFIX_MAX]>> {
    let bytes = canonical.as_os_str().as_bytes();
    let key = |suffix: &[u8]| {
        let mut data = [0u8; WATCH_PREFIX_MAX];
        let full = [bytes, suffix].concat();
        data[..full.len()].copy_from_slice(&full);
        Key::new((full.len() * 8) as u32, data)
    };
    if bytes == b"/" {
        vec![key(b"")]
    } else {
        vec![key(b"/"), key(b"\0")]
    }
}

impl WatchList {
    pub fn new(maps: WatchMaps) -> Self {
        WatchList {
            maps,
            by_path: BTreeMap::new(),
            dev_counts: HashMap::new(),
            pins: HashMap::new(),
            troubled: HashSet::new(),
            next_id: 1,
        }
    }

    /// Adds a directory tree. Returns the canonical path when it was new.
    pub fn add(&mut self, dir: &Path) -> Result<Option<String>, WatchError> {
        let (canonical, key) = resolve(dir)?;
        if self.by_path.contains_key(&canonical) {
            return Ok(None);
        }
        if self.by_path.len() >= MAX_WATCHES as usize {
            return Err(WatchError::TooMany);
        }
        let id = self.next_id;
        self.next_id += 1;
        let watch = Watch {
            id,
            path: canonical.clone(),
            key,
        };
        self.install(&watch)?;
        let shown = watch.display();
        self.by_path.insert(canonical, watch);
        Ok(Some(shown))
    }

    /// Puts a watch into the kernel maps; on failure nothing of it stays behind.
    fn install(&mut self, watch: &Watch) -> Result<(), WatchError> {
        let result = self.try_install(watch);
        if result.is_err() {
            self.uninstall(watch);
        }
        result
    }

    fn try_install(&mut self, watch: &Watch) -> Result<(), WatchError> {
        let map_err = |source| WatchError::Map {
            path: watch.path.clone(),
            source,
        };
        // Counted first, so that `uninstall` after any failure below is exact.
        let count = self.dev_counts.entry(watch.key.dev).or_insert(0);
        *count += 1;
        let count = *count;
        self.maps
            .inodes
            .insert(watch.key, watch.id, 0)
            .map_err(map_err)?;
        self.maps
            .devs
            .insert(watch.key.dev, count, 0)
            .map_err(map_err)?;
        for key in prefix_keys(&watch.path) {
            self.maps
                .prefixes
                .insert(&key, watch.id, 0)
                .map_err(map_err)?;
        }
        self.bump_generation();
        // Opening the directory teaches the kernel its dentry (see `register_watched_dentry`
        // in the programs); keeping it open pins the dentry.
        let pin = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&watch.path)
            .map_err(|source| WatchError::Open {
                path: watch.path.clone(),
                source,
            })?;
        if !self.registered_ids().contains(&watch.id) {
            return Err(WatchError::NotRegistered(watch.path.clone()));
        }
        self.pins.insert(watch.id, OwnedFd::from(pin));
        Ok(())
    }

    /// Watch ids the kernel has learned a dentry for.
    fn registered_ids(&self) -> Vec<u32> {
        self.maps
            .dentries
            .iter()
            .filter_map(Result::ok)
            .map(|(_, id)| id)
            .collect()
    }

    /// Makes every verdict the kernel remembers stale.
    fn bump_generation(&mut self) {
        let index = agent_common::watch::generation::AGENT;
        let current = self.maps.generation.get(&index, 0).unwrap_or(0);
        if let Err(e) = self.maps.generation.set(index, current.wrapping_add(1), 0) {
            tracing::error!("cannot invalidate the kernel's watch verdicts: {e}");
        }
    }

    fn uninstall(&mut self, watch: &Watch) {
        // Removal errors mean the entry is already gone; nothing else to do.
        let _ = self.maps.inodes.remove(&watch.key);
        if let Some(count) = self.dev_counts.get_mut(&watch.key.dev) {
            *count -= 1;
            if *count == 0 {
                self.dev_counts.remove(&watch.key.dev);
                let _ = self.maps.devs.remove(&watch.key.dev);
            } else {
                let _ = self.maps.devs.insert(watch.key.dev, *count, 0);
            }
        }
        for key in prefix_keys(&watch.path) {
            // Another watch may share the path text only if it is the same path.
            let _ = self.maps.prefixes.remove(&key);
        }
        let dentries: Vec<u64> = self
            .maps
            .dentries
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, id)| *id == watch.id)
            .map(|(dentry, _)| dentry)
            .collect();
        for dentry in dentries {
            let _ = self.maps.dentries.remove(&dentry);
        }
        self.pins.remove(&watch.id);
        self.bump_generation();
    }

    /// Removes a tree by the path it was added with (or its canonical form).
    pub fn remove(&mut self, dir: &Path) -> Option<String> {
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let watch = self
            .by_path
            .remove(&canonical)
            .or_else(|| self.by_path.remove(dir))?;
        self.uninstall(&watch);
        Some(watch.display())
    }

    /// Makes the watch list exactly `dirs`, reporting what changed. Entries that fail are
    /// reported and skipped; the others still apply.
    pub fn set(&mut self, dirs: &[PathBuf]) -> Change {
        let mut change = Change::default();
        let mut wanted = Vec::new();
        for dir in dirs {
            match resolve(dir) {
                Ok((canonical, _)) => wanted.push(canonical),
                Err(e) => change.errors.push(e.to_string()),
            }
        }
        let stale: Vec<PathBuf> = self
            .by_path
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for path in stale {
            if let Some(shown) = self.remove(&path) {
                change.removed.push(shown);
            }
        }
        for path in wanted {
            match self.add(&path) {
                Ok(Some(shown)) => change.added.push(shown),
                Ok(None) => {}
                Err(e) => change.errors.push(e.to_string()),
            }
        }
        change
    }

    /// Re-checks every watched directory: one that was deleted and recreated has a new inode,
    /// which the kernel maps must follow. Returns a note for each repaired or vanished entry.
    /// Each problem is reported once, when it starts, and again when it is over.
    pub fn revalidate(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let watches: Vec<Watch> = self.by_path.values().cloned().collect();
        for old in watches {
            let problem = match resolve(&old.path) {
                Ok((canonical, key)) if canonical == old.path && key == old.key => None,
                Ok((canonical, key)) if canonical == old.path => {
                    self.uninstall(&old);
                    let new = Watch { key, ..old.clone() };
                    let installed = self.install(&new);
                    // Keep the new identity either way: a failed install is retried from
                    // the new key, not from the old one.
                    self.by_path.insert(canonical, new.clone());
                    match installed {
                        Ok(()) => {
                            notes.push(format!(
                                "watch directory {} was replaced; now watching the new one",
                                new.display()
                            ));
                            None
                        }
                        Err(e) => Some(e.to_string()),
                    }
                }
                Ok(_) | Err(_) => Some(format!(
                    "watch directory {} no longer exists as it was; it stays in the list and is \
                     re-checked",
                    old.display()
                )),
            };
            match problem {
                Some(note) if self.troubled.insert(old.id) => notes.push(note),
                Some(_) => {}
                None if self.troubled.remove(&old.id) => {
                    notes.push(format!("watch directory {} is back", old.display()))
                }
                None => {}
            }
        }
        notes
    }

    /// The watch with kernel id `id`.
    pub fn by_id(&self, id: u32) -> Option<&Watch> {
        self.by_path.values().find(|w| w.id == id)
    }

    /// The innermost watched tree that holds `path` (an absolute, normalized path).
    pub fn containing(&self, path: &[u8]) -> Option<&Watch> {
        self.by_path
            .values()
            .filter(|w| text::is_under(path, w.path.as_os_str().as_bytes()))
            .max_by_key(|w| w.path.as_os_str().len())
    }

    /// Canonical paths of every watched tree.
    pub fn paths(&self) -> Vec<String> {
        self.by_path.values().map(Watch::display).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_keys_cover_tree_and_directory() {
        let keys = prefix_keys(Path::new("/data/phi"));
        assert_eq!(keys.len(), 2);
        assert_eq!({ keys[0].prefix_len() }, 80);
        assert_eq!(&keys[0].data()[..10], b"/data/phi/");
        assert_eq!(&keys[1].data()[..10], b"/data/phi\0");
        let root = prefix_keys(Path::new("/"));
        assert_eq!(root.len(), 1);
        assert_eq!({ root[0].prefix_len() }, 8);
    }

    #[test]
    fn resolve_reports_missing_and_non_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        assert!(matches!(resolve(&missing), Err(WatchError::NotFound(_))));
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(resolve(&file), Err(WatchError::NotDirectory(_))));
        let (canonical, key) = resolve(dir.path()).expect("resolves");
        assert!(canonical.is_absolute());
        assert_ne!(key.ino, 0);
        let msg = WatchError::NotFound(missing).to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }
}
