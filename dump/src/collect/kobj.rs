//! `task_kobj_ids_entry`: small ids for the kernel objects a process uses (mm, fd table, fs,
//! signal handlers, namespaces). ckpt-dump itself takes the first id of each kind, as CRIU
//! does, so that `inventory.img`'s `root_ids` tells restore which namespaces were shared with
//! the dumping tool (and so need not be recreated).
//!
//! In a tree, processes made with `CLONE_VM`, `CLONE_FILES`, `CLONE_FS` or `CLONE_SIGHAND`
//! share the object and so its id; `kcmp` tells, and orders the objects, so each process
//! costs a binary search among the objects met so far ([`TreeIds`]).

use std::os::unix::fs::MetadataExt;

use images_format::pb::TaskKobjIdsEntry;
use tracee::pidfd::{self, KcmpType};
use tracee::Pid;

use super::CollectError;
use crate::ids::IdTable;

/// Namespaces in CRIU's order; ids come from one counter shared by all of them.
const NAMESPACES: [&str; 8] = ["pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time"];

fn ns_inode(owner: &str, ns: &str) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{owner}/ns/{ns}"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The (device, inode) of every namespace of `owner` (`self` or a pid), in
/// [`NAMESPACES`] order; `None` where it cannot be read.
pub type NsKeys = [Option<(u64, u64)>; 8];

/// Reads the namespaces of `owner`; no ptrace needed, so any thread of ours may do it.
pub fn ns_keys(owner: &str) -> NsKeys {
    let mut keys = [None; 8];
    for (key, name) in keys.iter_mut().zip(NAMESPACES) {
        *key = ns_inode(owner, name);
    }
    keys
}

fn entry(ns_ids: &[Option<u32>; 8], object_id: u32) -> TaskKobjIdsEntry {
    TaskKobjIdsEntry {
        vm_id: object_id,
        files_id: object_id,
        fs_id: object_id,
        sighand_id: object_id,
        pid_ns_id: ns_ids[0],
        net_ns_id: ns_ids[1],
        ipc_ns_id: ns_ids[2],
        uts_ns_id: ns_ids[3],
        mnt_ns_id: ns_ids[4],
        user_ns_id: ns_ids[5],
        cgroup_ns_id: ns_ids[6],
        time_ns_id: ns_ids[7],
    }
}

/// The per-process objects, in the order of [`Shared`]'s fields.
const KINDS: [(KcmpType, &str); 4] = [
    (KcmpType::Vm, "address space"),
    (KcmpType::Files, "fd table"),
    (KcmpType::Fs, "fs info"),
    (KcmpType::Sighand, "signal handlers"),
];

/// Which objects of a process an earlier process of the tree already has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shared {
    /// The address space (`CLONE_VM`, a vfork child): the pid it is shared with.
    pub vm: Option<Pid>,
    /// The fd table (`CLONE_FILES`): its fds are already described.
    pub files: bool,
    pub fs: bool,
    pub sighand: bool,
}

/// Ids for every process of a tree, ckpt-dump's own taking the first of each kind.
#[derive(Debug)]
pub struct TreeIds {
    ns: IdTable<(&'static str, (u64, u64))>,
    /// ckpt-dump's namespace ids, given first (by [`TreeIds::namespaces`]'s first call).
    ours: Option<[Option<u32>; 8]>,
    /// Per kind, one process per object met so far with the object's id, in kcmp order.
    objects: [Vec<(Pid, u32)>; 4],
    /// The next id per kind: 1 is ckpt-dump's.
    next: [u32; 4],
}

impl Default for TreeIds {
    fn default() -> Self {
        TreeIds {
            ns: IdTable::default(),
            ours: None,
            objects: Default::default(),
            next: [2; 4],
        }
    }
}

impl TreeIds {
    /// ckpt-dump's own ids (the inventory's `root_ids`); its namespaces once
    /// [`TreeIds::namespaces`] was called.
    pub fn root_ids(&self) -> TaskKobjIdsEntry {
        entry(&self.ours.unwrap_or([None; 8]), 1)
    }

    /// The ids of `pid`, and which of its objects an earlier process has: its namespaces
    /// read here (see [`TreeIds::objects`] and [`TreeIds::namespaces`] to split the two).
    #[cfg(test)]
    pub fn ids(&mut self, pid: Pid) -> Result<(TaskKobjIdsEntry, Shared), CollectError> {
        let ours = ns_keys("self");
        let (mut entry, shared) = self.objects(pid)?;
        self.namespaces(pid, &ours, &ns_keys(&pid.to_string()), &mut entry);
        Ok((entry, shared))
    }

    /// The ids of the namespaces (`theirs`, read by [`ns_keys`]) of `pid` into `entry`;
    /// `ours` are ckpt-dump's, which take the first ids at the first call. Called for the
    /// processes in tree order, so that the ids do not depend on who read the keys when.
    pub fn namespaces(
        &mut self,
        pid: Pid,
        ours: &NsKeys,
        theirs: &NsKeys,
        entry: &mut TaskKobjIdsEntry,
    ) {
        if self.ours.is_none() {
            let mut ids = [None; 8];
            for (i, name) in NAMESPACES.iter().enumerate() {
                ids[i] = ours[i].map(|key| self.ns.get_or_insert((*name, key)).0);
            }
            self.ours = Some(ids);
        }
        let mut ids = [None; 8];
        for (i, name) in NAMESPACES.iter().enumerate() {
            ids[i] = theirs[i].map(|key| {
                let (id, new) = self.ns.get_or_insert((*name, key));
                if new {
                    tracing::warn!(
                        namespace = name,
                        "pid {pid} lives in its own {name} namespace, \
                        which is not dumped: restore uses the restorer's"
                    );
                }
                id
            });
        }
        let ns = self::entry(&ids, 0);
        entry.pid_ns_id = ns.pid_ns_id;
        entry.net_ns_id = ns.net_ns_id;
        entry.ipc_ns_id = ns.ipc_ns_id;
        entry.uts_ns_id = ns.uts_ns_id;
        entry.mnt_ns_id = ns.mnt_ns_id;
        entry.user_ns_id = ns.user_ns_id;
        entry.cgroup_ns_id = ns.cgroup_ns_id;
        entry.time_ns_id = ns.time_ns_id;
    }

    /// The ids of the per-process objects of `pid` (namespaces left unset), and which of
    /// them an earlier process has.
    pub fn objects(&mut self, pid: Pid) -> Result<(TaskKobjIdsEntry, Shared), CollectError> {
        let mut ids = [0u32; 4];
        let mut seen = [None; 4];
        for (k, (kind, what)) in KINDS.iter().enumerate() {
            let (id, with) = self.object_id(k, *kind, what, pid)?;
            ids[k] = id;
            seen[k] = with;
        }
        let mut entry = entry(&[None; 8], 0);
        entry.vm_id = ids[0];
        entry.files_id = ids[1];
        entry.fs_id = ids[2];
        entry.sighand_id = ids[3];
        let shared = Shared {
            vm: seen[0],
            files: seen[1].is_some(),
            fs: seen[2].is_some(),
            sighand: seen[3].is_some(),
        };
        Ok((entry, shared))
    }

    /// The id of object kind `k` of `pid`, and the earlier process sharing it, if any.
    fn object_id(
        &mut self,
        k: usize,
        kind: KcmpType,
        what: &'static str,
        pid: Pid,
    ) -> Result<(u32, Option<Pid>), CollectError> {
        let known = &mut self.objects[k];
        let mut failed = None;
        let found = known.binary_search_by(|(other, _)| {
            pidfd::kcmp(*other, pid, kind, 0, 0).unwrap_or_else(|source| {
                failed.get_or_insert((*other, source));
                std::cmp::Ordering::Less
            })
        });
        if let Some((with, source)) = failed {
            return Err(CollectError::KcmpObject {
                pid,
                with,
                what,
                source,
            });
        }
        match found {
            Ok(i) => Ok((known[i].1, Some(known[i].0))),
            Err(at) => {
                let id = self.next[k];
                self.next[k] += 1;
                known.insert(at, (pid, id));
                Ok((id, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharers_get_one_id_and_strangers_their_own() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let other = Pid::try_from(child.id()).expect("child pid");
        let mut table = TreeIds::default();
        let (first, shared) = table.ids(me).expect("ids");
        assert_eq!(shared, Shared::default(), "nothing met before");
        let (theirs, shared) = table.ids(other).expect("ids");
        let (again, shared_again) = table.ids(me).expect("ids");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            shared,
            Shared::default(),
            "a forked and exec'd child shares nothing"
        );
        assert_eq!(again, first);
        assert_eq!(
            shared_again,
            Shared {
                vm: Some(me),
                files: true,
                fs: true,
                sighand: true
            }
        );
        // 1 is ckpt-dump's own; every object of the tree counts from 2, per kind.
        assert_eq!((first.vm_id, first.files_id), (2, 2));
        assert_eq!((theirs.vm_id, theirs.fs_id, theirs.sighand_id), (3, 3, 3));
        assert_eq!(table.root_ids().files_id, 1);
        assert_eq!(theirs.net_ns_id, first.net_ns_id, "same namespaces");
    }
}
