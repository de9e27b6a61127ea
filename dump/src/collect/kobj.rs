//! `task_kobj_ids_entry`: small ids for the kernel objects a process uses (mm, fd table, fs,
//! signal handlers, namespaces). ckpt-dump itself takes the first id of each kind, as CRIU
//! does, so that `inventory.img`'s `root_ids` tells restore which namespaces were shared with
//! the dumping tool (and so need not be recreated).

use std::os::unix::fs::MetadataExt;

use images_format::pb::TaskKobjIdsEntry;
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

/// The ids of `pid` and of ckpt-dump itself (the inventory's `root_ids`).
pub fn ids(pid: Pid) -> Result<(TaskKobjIdsEntry, TaskKobjIdsEntry), CollectError> {
    let mut table = IdTable::default();
    let mut ours = [None; 8];
    let mut theirs = [None; 8];
    for (i, ns) in NAMESPACES.iter().enumerate() {
        ours[i] = ns_inode("self", ns).map(|key| table.get_or_insert((ns, key)).0);
    }
    let target = pid.to_string();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        theirs[i] = ns_inode(&target, ns).map(|key| {
            let (id, new) = table.get_or_insert((ns, key));
            if new {
                tracing::warn!(
                    namespace = ns,
                    "pid {pid} lives in its own {ns} namespace, \
                    which is not dumped: restore uses the restorer's"
                );
            }
            id
        });
    }
    // ckpt-dump and the target never share mm, fd table, fs or handlers: ids 1 and 2.
    Ok((entry(&theirs, 2), entry(&ours, 1)))
}
