//! User and group names through the name service (NSS: files, LDAP, SSSD...), cached, and
//! dropped when /etc/passwd or /etc/group change.

use std::{
    collections::HashMap,
    ffi::CStr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

/// How often the files are checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

fn mtime(path: &str) -> Option<SystemTime> {
    std::fs::metadata(Path::new(path))
        .and_then(|m| m.modified())
        .ok()
}

pub struct NameCache {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl Default for NameCache {
    fn default() -> Self {
        NameCache {
            users: HashMap::new(),
            groups: HashMap::new(),
            stamps: (mtime("/etc/passwd"), mtime("/etc/group")),
            checked: Instant::now(),
        }
    }
}

/// Shown for an id the name service does not know.
fn numeric(id: u32) -> String {
    format!("#{id}")
}

fn lookup_user(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: zeroed passwd is a valid out-parameter; the buffer outlives the call.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        return Some(
            unsafe { CStr::from_ptr(pwd.pw_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

fn lookup_group(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: zeroed group is a valid out-parameter; the buffer outlives the call.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call.
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
        return Some(
            unsafe { CStr::from_ptr(grp.gr_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

impl NameCache {
    fn refresh_if_changed(&mut self) {
        if self.checked.elapsed() < RECHECK {
            return;
        }
        self.checked = Instant::now();
        let now = (mtime("/etc/passwd"), mtime("/etc/group"));
        if now != self.stamps {
            self.stamps = now;
            self.users.clear();
            self.groups.clear();
        }
    }

    /// The user name of `uid`, or `#uid` when there is none.
    pub fn user(&mut self, uid: u32) -> String {
        self.refresh_if_changed();
        self.users
            .entry(uid)
            .or_insert_with(|| lookup_user(uid))
            .clone()
            .unwrap_or_else(|| numeric(uid))
    }

    /// The group name of `gid`, or `#gid`.
    pub fn group(&mut self, gid: u32) -> String {
        self.refresh_if_changed();
        self.groups
            .entry(gid)
            .or_insert_with(|| lookup_group(gid))
            .clone()
            .unwrap_or_else(|| numeric(gid))
    }

    /// Forces the next lookup to check the files (tests).
    #[cfg(test)]
    fn expire(&mut self) {
        self.checked = Instant::now() - RECHECK * 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_root_and_marks_unknown_ids() {
        let mut n = NameCache::default();
        assert_eq!(n.user(0), "root");
        assert_eq!(n.group(0), "root");
        assert_eq!(n.user(3_999_999_999), "#3999999999");
    }

    #[test]
    fn a_changed_passwd_file_drops_the_cache() {
        let mut n = NameCache::default();
        n.users.insert(4242, Some("stale".into()));
        n.stamps.0 = Some(SystemTime::UNIX_EPOCH);
        n.expire();
        assert_eq!(
            n.user(4242),
            "#4242",
            "cache dropped after the file changed"
        );
    }
}
