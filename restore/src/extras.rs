//! State kept in ckpt's extension fields of the core image (numbers from
//! `images_format::EXTENSION_FIELDS_START`, which CRIU does not know): per thread the CPU
//! affinity, timer slack and I/O priority; per process the memory-deny-write-execute flags.
//!
//! Order: this runs last, once every thread is rebuilt and the affinity we lent the process
//! while injecting (ours, pinned next to it) has been given back, just before the leader is
//! detached. Affinity, timer slack and I/O priority are set from outside
//! (`sched_setaffinity(tid)`, `/proc/TID/timerslack_ns`, `ioprio_set(IOPRIO_WHO_PROCESS,
//! tid)`): they need our privileges, not the target's, so restored credentials cannot stand
//! in the way. MDWE has no outside door: it is an injected `prctl(PR_SET_MDWE)` in the
//! leader, after the memory is rebuilt with its dumped protections (MDWE refuses to make a
//! mapping executable later, and can never be cleared). Seccomp filters do not see it: the
//! restore tracee is attached with `PTRACE_O_SUSPEND_SECCOMP`, and the call needs no
//! capability.
//!
//! What the kernel may refuse from outside on another machine or with fewer privileges
//! (CPUs this machine lacks, CAP_SYS_NICE for the timer slack, CAP_SYS_ADMIN for a
//! real-time I/O class) is reported as a warning and the restore goes on, as for rlimits;
//! MDWE, a protection the program asked for, is never dropped silently: failing to set it
//! fails the restore.

use std::collections::HashMap;

use images_format::pb;
use tracee::{Pid, Tid, Tracee};

use crate::memory::libc_nr as nr;
use crate::read::ProcessImages;
use crate::remote;
use crate::threads::ThreadStateError;

const PR_SET_MDWE: u64 = 65;
/// CPUs a cpu set can hold; mask words past them name CPUs no machine here has.
const MAX_CPU_WORDS: usize = rustix::thread::CpuSet::MAX_CPU / 64;

/// What one thread's image asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadExtras {
    /// The thread's id in the images.
    pub tid: i32,
    /// CPUs it may run on; `None` if it was not restricted.
    pub cpus: Option<Vec<usize>>,
    pub timer_slack_ns: Option<u64>,
    /// `class << 13 | level`; `None` for no class.
    pub ioprio: Option<i32>,
}

/// What the images of one process ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    pub threads: Vec<ThreadExtras>,
    pub mdwe_flags: Option<u32>,
}

/// CPU numbers from mask words, lowest first (CPU n is bit n % 64 of word n / 64).
pub fn cpus_of(words: &[u64]) -> Vec<usize> {
    words
        .iter()
        .take(MAX_CPU_WORDS)
        .enumerate()
        .flat_map(|(i, word)| {
            (0..64)
                .filter(move |bit| word >> bit & 1 == 1)
                .map(move |bit| i * 64 + bit)
        })
        .collect()
}

fn thread_extras(tid: i32, core: &pb::ThreadCoreEntry) -> ThreadExtras {
    ThreadExtras {
        tid,
        cpus: (!core.cpu_affinity.is_empty()).then(|| cpus_of(&core.cpu_affinity)),
        timer_slack_ns: core.timer_slack_ns,
        ioprio: core.ioprio.and_then(|p| i32::try_from(p).ok()),
    }
}

/// Reads the extension fields of a process's core images.
pub fn plan(images: &ProcessImages) -> Extras {
    let tids = if images.pstree.threads.is_empty() {
        vec![images.pstree.pid]
    } else {
        images.pstree.threads.clone()
    };
    let threads = tids
        .iter()
        .zip(&images.cores)
        .filter_map(|(tid, core)| {
            let tid = i32::try_from(*tid).ok()?;
            Some(thread_extras(tid, core.thread_core.as_ref()?))
        })
        .collect();
    let mdwe_flags = images
        .cores
        .first()
        .and_then(|c| c.tc.as_ref())
        .and_then(|tc| tc.mdwe_flags)
        .filter(|flags| *flags != 0);
    Extras {
        threads,
        mdwe_flags,
    }
}

/// Our ids of the threads of `pid`, by their id in the images (the last `NSpid` entry:
/// they differ when the process lives in a pid namespace of its own).
fn our_tids(pid: Pid) -> HashMap<i32, Tid> {
    let Ok(tids) = tracee::proc::task::list_tids(pid) else {
        return HashMap::new();
    };
    tids.into_iter()
        .filter_map(|tid| {
            let status = tracee::proc::status::read_thread(pid, tid).ok()?;
            let inner = status.ns_pid.last().copied().unwrap_or(tid.as_raw());
            Some((inner, tid))
        })
        .collect()
}

/// Sets what the thread's image asks for, from outside; returns what the kernel refused.
fn set_thread(tid: Tid, wanted: &ThreadExtras) -> Vec<String> {
    let mut refused = Vec::new();
    if let Some(cpus) = &wanted.cpus {
        if let Err(err) = tracee::taskinfo::set_affinity(tid, cpus) {
            refused.push(format!(
                "cpu affinity {cpus:?} not restored ({err}: {})",
                err_source(&err)
            ));
        }
    }
    if let Some(slack) = wanted.timer_slack_ns {
        let path = format!("/proc/{tid}/timerslack_ns");
        if let Err(err) = std::fs::write(&path, slack.to_string()) {
            refused.push(format!(
                "timer slack {slack} ns not restored ({path}: {err})"
            ));
        }
    }
    if let Some(prio) = wanted.ioprio {
        if let Err(err) = tracee::taskinfo::set_ioprio(tid, prio) {
            refused.push(format!(
                "I/O priority {prio:#x} not restored ({err}: {})",
                err_source(&err)
            ));
        }
    }
    refused
}

fn err_source(err: &dyn std::error::Error) -> String {
    err.source().map(ToString::to_string).unwrap_or_default()
}

/// Sets the extension state of every thread of the restored process whose stopped
/// leader is `leader`; see the module doc for the order and what may fail.
pub fn restore(leader: &mut Tracee, images: &ProcessImages) -> Result<(), ThreadStateError> {
    let extras = plan(images);
    let pid = leader.pid();
    let tids = our_tids(pid);
    for wanted in &extras.threads {
        let Some(&tid) = tids.get(&wanted.tid) else {
            // Other threads run already: one may have exited, taking its state along.
            tracing::debug!(%pid, image_tid = wanted.tid, "thread gone before its extras were set");
            continue;
        };
        for refused in set_thread(tid, wanted) {
            tracing::warn!(%pid, %tid, "{refused}");
        }
    }
    if let Some(flags) = extras.mdwe_flags {
        // The helper page that injections used is unmapped by now.
        leader.use_vdso_syscall_insn();
        remote::call(
            leader,
            format!("prctl(PR_SET_MDWE, {flags:#x})"),
            nr::PRCTL,
            [PR_SET_MDWE, u64::from(flags), 0, 0, 0, 0],
        )?;
    }
    tracing::debug!(%pid, threads = extras.threads.len(), mdwe = ?extras.mdwe_flags, "extras set");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_words_give_cpus_in_order() {
        assert_eq!(cpus_of(&[0b101]), [0, 2]);
        assert_eq!(cpus_of(&[0, 1 << 63, 1]), [127, 128]);
        assert!(cpus_of(&[]).is_empty());
        // Words for CPUs no cpu set can hold are ignored, not allocated.
        let many = vec![u64::MAX; 1 << 16];
        assert_eq!(cpus_of(&many).len(), rustix::thread::CpuSet::MAX_CPU);
    }

    fn core(thread: pb::ThreadCoreEntry, mdwe: Option<u32>) -> pb::CoreEntry {
        pb::CoreEntry {
            thread_core: Some(thread),
            tc: mdwe.map(|f| pb::TaskCoreEntry {
                mdwe_flags: Some(f),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn plan_follows_pstree_threads() {
        let images = ProcessImages {
            pstree: pb::PstreeEntry {
                pid: 40,
                threads: vec![40, 41],
                ..Default::default()
            },
            cores: vec![
                core(
                    pb::ThreadCoreEntry {
                        cpu_affinity: vec![0b10],
                        timer_slack_ns: Some(123_456),
                        ioprio: Some((2 << 13) | 3),
                        ..Default::default()
                    },
                    Some(1),
                ),
                core(
                    pb::ThreadCoreEntry {
                        timer_slack_ns: Some(50_000),
                        ..Default::default()
                    },
                    None,
                ),
            ],
            ..Default::default()
        };
        let extras = plan(&images);
        assert_eq!(extras.mdwe_flags, Some(1));
        assert_eq!(
            extras.threads,
            [
                ThreadExtras {
                    tid: 40,
                    cpus: Some(vec![1]),
                    timer_slack_ns: Some(123_456),
                    ioprio: Some(0x4003),
                },
                ThreadExtras {
                    tid: 41,
                    cpus: None,
                    timer_slack_ns: Some(50_000),
                    ioprio: None,
                },
            ]
        );
    }

    #[test]
    fn images_without_extensions_ask_for_nothing() {
        let images = ProcessImages {
            pstree: pb::PstreeEntry {
                pid: 7,
                ..Default::default()
            },
            cores: vec![core(pb::ThreadCoreEntry::default(), Some(0))],
            ..Default::default()
        };
        let extras = plan(&images);
        assert_eq!(extras.mdwe_flags, None);
        assert_eq!(
            extras.threads,
            [ThreadExtras {
                tid: 7,
                ..Default::default()
            }]
        );
    }
}
