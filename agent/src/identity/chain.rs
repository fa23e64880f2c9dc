//! The privilege chain: from the person who logged in to the credentials a process acts with,
//! through every change of effective uid on the way (sudo, su, doas, setuid programs).

use phi_proto::v1 as pb;

use super::{names::NameCache, session::program};
use crate::process::ProcessInfo;

/// Programs whose job is to change identity; named as the "via" of the change they make.
const TOOLS: &[&str] = &[
    "sudo", "su", "doas", "pkexec", "runuser", "setpriv", "sg", "newgrp", "sudoedit",
];

fn is_tool(p: &ProcessInfo) -> bool {
    TOOLS.contains(&program(p).as_str())
}

/// Builds the chain for a process. `lineage` is the process and its parents, nearest first,
/// each with the effective uid it acts with (for the process itself: from the event).
pub fn privilege_chain(
    login_uid: Option<u32>,
    lineage: &[(u32, u32, &ProcessInfo)],
    names: &mut NameCache,
) -> Vec<pb::ChainLink> {
    let Some(login_uid) = login_uid else {
        return Vec::new();
    };
    // Top down, from the login (the session's own plumbing, like a root sshd, comes first and
    // is skipped: the chain starts at the first process acting as the person who logged in).
    let top_down: Vec<&(u32, u32, &ProcessInfo)> = lineage.iter().rev().collect();
    let start = top_down
        .iter()
        .position(|(_, euid, _)| *euid == login_uid)
        .unwrap_or(0);
    let mut chain = vec![pb::ChainLink {
        uid: login_uid,
        user: names.user(login_uid),
        pid: top_down.get(start).map_or(0, |(pid, _, _)| *pid),
        via: "login".into(),
    }];
    let mut current = login_uid;
    for i in start..top_down.len() {
        let (pid, euid, p) = *top_down[i];
        if euid == current {
            continue;
        }
        let via = if is_tool(p) {
            program(p)
        } else {
            match i.checked_sub(1).map(|j| top_down[j].2) {
                Some(parent) if is_tool(parent) => program(parent),
                _ => program(p),
            }
        };
        chain.push(pb::ChainLink {
            uid: euid,
            user: names.user(euid),
            pid,
            via,
        });
        current = euid;
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(exe: &str) -> ProcessInfo {
        ProcessInfo {
            exe: Some(exe.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn sudo_after_an_ssh_login() {
        let sshd = proc("/usr/sbin/sshd");
        let bash = proc("/usr/bin/bash");
        let sudo = proc("/usr/bin/sudo");
        let cat = proc("/usr/bin/cat");
        // nearest first: cat (root) <- sudo (root) <- bash (1000) <- sshd (root, session leader)
        let lineage = [
            (40, 0, &cat),
            (30, 0, &sudo),
            (20, 1000, &bash),
            (10, 0, &sshd),
        ];
        let mut names = NameCache::default();
        let chain = privilege_chain(Some(1000), &lineage, &mut names);
        assert_eq!(chain.len(), 2, "{chain:?}");
        assert_eq!(
            (chain[0].uid, chain[0].pid, chain[0].via.as_str()),
            (1000, 20, "login")
        );
        assert_eq!(
            (chain[1].uid, chain[1].pid, chain[1].via.as_str()),
            (0, 30, "sudo")
        );
        assert_eq!(chain[1].user, "root");
    }

    #[test]
    fn su_to_another_user_names_each_step() {
        let bash = proc("/usr/bin/bash");
        let su = proc("/usr/bin/su");
        let bash2 = proc("/usr/bin/bash");
        let lineage = [(3, 1002, &bash2), (2, 0, &su), (1, 1000, &bash)];
        let mut names = NameCache::default();
        let chain = privilege_chain(Some(1000), &lineage, &mut names);
        let steps: Vec<(u32, &str)> = chain.iter().map(|l| (l.uid, l.via.as_str())).collect();
        assert_eq!(steps, vec![(1000, "login"), (0, "su"), (1002, "su")]);
    }

    #[test]
    fn no_login_no_chain() {
        let mut names = NameCache::default();
        assert!(privilege_chain(None, &[], &mut names).is_empty());
    }
}
