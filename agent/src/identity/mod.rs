//! Who did it: names for ids, the login session, the privilege chain back to the person who
//! logged in, and the container or pod.

pub mod chain;
pub mod container;
pub mod names;
pub mod session;

use phi_proto::v1 as pb;

use crate::{clock::Clock, process::ProcessTable};

/// Everything identity needs that outlives one record.
pub struct Identities {
    pub names: names::NameCache,
    pub sessions: session::Sessions,
    pub containers: container::Containers,
}

impl Identities {
    pub fn new() -> Self {
        Identities {
            names: names::NameCache::default(),
            sessions: session::Sessions::default(),
            containers: container::Containers::new(),
        }
    }

    /// The identity of process `tgid` acting with the given credentials.
    pub fn identity(
        &mut self,
        creds: &Credentials,
        processes: &mut ProcessTable,
        clock: &Clock,
    ) -> pb::Identity {
        let names = &mut self.names;
        let session = creds.sessionid.and_then(|sid| {
            self.sessions
                .lookup(sid, creds.tgid, processes, names, clock)
        });
        let (ancestors, _) = processes.ancestors(creds.tgid, 64);
        let me = processes.get(creds.tgid).cloned().unwrap_or_default();
        let mut lineage = vec![(creds.tgid, creds.euid, &me)];
        for (pid, p) in &ancestors {
            lineage.push((*pid, p.euid, p));
        }
        let chain = chain::privilege_chain(creds.loginuid, &lineage, names);
        pb::Identity {
            uid: creds.uid,
            euid: creds.euid,
            gid: creds.gid,
            egid: creds.egid,
            login_uid: creds.loginuid,
            audit_session: creds.sessionid,
            user: names.user(creds.uid),
            euser: names.user(creds.euid),
            group: names.group(creds.gid),
            login_user: creds
                .loginuid
                .map_or_else(|| "unset".to_owned(), |u| names.user(u)),
            session,
            chain,
        }
    }
}

/// The credentials an event carries.
pub struct Credentials {
    pub tgid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub egid: u32,
    pub loginuid: Option<u32>,
    pub sessionid: Option<u32>,
}
