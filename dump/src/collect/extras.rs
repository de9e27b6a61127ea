//! State CRIU's schema has no field for, saved in ckpt's extension fields (numbered from
//! `images_format::EXTENSION_FIELDS_START`): per thread the CPU affinity, timer slack and
//! I/O priority; per process the memory-deny-write-execute flags.
//!
//! Affinity and I/O priority are read from outside (`sched_getaffinity(tid)`,
//! `ioprio_get(IOPRIO_WHO_PROCESS, tid)`), which needs no privilege over the target. Timer
//! slack and MDWE are asked by injection: `/proc/TID/timerslack_ns` is only readable with
//! CAP_SYS_NICE, and MDWE has no outside view at all.

use images_format::pb::ThreadCoreEntry;
use tracee::{Tid, Tracee};

use super::inject::syscall_u64;
use super::CollectError;

const PR_GET_TIMERSLACK: u64 = 30;
const PR_GET_MDWE: u64 = 66;
/// `IOPRIO_PRIO_CLASS(prio)`: the class sits above 13 bits of level.
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// The affinity as 64-bit mask words, lowest CPUs first; empty if the thread may run on
/// every CPU in `online` (then it is not restricted, and a restore on a larger machine must
/// not confine it to this one's CPUs).
pub fn affinity_words(cpus: &[usize], online: Option<&[usize]>) -> Vec<u64> {
    if let Some(online) = online {
        if online.iter().all(|c| cpus.contains(c)) {
            return Vec::new();
        }
    }
    let Some(&highest) = cpus.iter().max() else {
        return Vec::new();
    };
    let mut words = vec![0u64; highest / 64 + 1];
    for &cpu in cpus {
        if let Some(word) = words.get_mut(cpu / 64) {
            *word |= 1 << (cpu % 64);
        }
    }
    words
}

/// The online CPUs, read once per dump: every thread of a tree asks.
fn online_cpus() -> Option<&'static [usize]> {
    static ONLINE: std::sync::OnceLock<Option<Vec<usize>>> = std::sync::OnceLock::new();
    ONLINE
        .get_or_init(|| tracee::cpu::cpu_list(tracee::cpu::CPUS_ONLINE))
        .as_deref()
}

fn task_info(
    tid: Tid,
    what: &'static str,
) -> impl FnOnce(tracee::taskinfo::TaskInfoError) -> CollectError {
    move |source| CollectError::TaskInfo { tid, what, source }
}

/// Fills the thread's affinity (`cpus`), timer slack and I/O priority into `tc`.
pub fn thread(
    thread: &mut Tracee,
    cpus: &[usize],
    tc: &mut ThreadCoreEntry,
) -> Result<(), CollectError> {
    let tid = thread.tid();
    tc.cpu_affinity = affinity_words(cpus, online_cpus());
    // `/proc/TID/timerslack_ns` spares an injection; reading another user's needs
    // CAP_SYS_NICE, so the injection stays as the fallback.
    tc.timer_slack_ns = match super::read_proc_number(&format!("/proc/{tid}/timerslack_ns"), 10) {
        Some(slack) => Some(slack),
        None => Some(syscall_u64(
            thread,
            "prctl(PR_GET_TIMERSLACK)",
            libc::SYS_prctl,
            [PR_GET_TIMERSLACK, 0, 0, 0, 0, 0],
        )?),
    };
    let ioprio = tracee::taskinfo::ioprio(tid).map_err(task_info(tid, "I/O priority"))?;
    // IOPRIO_CLASS_NONE means "follow the nice value": nothing to set at restore.
    if ioprio >> IOPRIO_CLASS_SHIFT != 0 {
        tc.ioprio = u32::try_from(ioprio).ok();
    }
    Ok(())
}

/// [`thread`] from outside alone, the timer slack already read (`slack`).
pub fn outside(
    tid: Tid,
    cpus: &[usize],
    slack: u64,
    tc: &mut ThreadCoreEntry,
) -> Result<(), CollectError> {
    tc.cpu_affinity = affinity_words(cpus, online_cpus());
    tc.timer_slack_ns = Some(slack);
    let ioprio = tracee::taskinfo::ioprio(tid).map_err(task_info(tid, "I/O priority"))?;
    tc.ioprio = (ioprio >> IOPRIO_CLASS_SHIFT != 0)
        .then(|| u32::try_from(ioprio).ok())
        .flatten();
    Ok(())
}

/// `prctl(PR_GET_MDWE)` in the leader: the flags, or `None` if none is set or the kernel
/// predates MDWE (Linux 6.3), which answers EINVAL and so cannot have any set.
pub fn mdwe(leader: &mut Tracee) -> Result<Option<u32>, CollectError> {
    match leader.syscall(libc::SYS_prctl, [PR_GET_MDWE, 0, 0, 0, 0, 0]) {
        Ok(0) => Ok(None),
        Ok(flags) => Ok(u32::try_from(flags).ok()),
        Err(err) if err.errno() == Some(tracee::Errno::INVAL) => Ok(None),
        Err(source) => Err(CollectError::Inject {
            tid: leader.tid(),
            what: "prctl(PR_GET_MDWE)",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unrestricted_affinity_is_left_out() {
        let online = [0, 1, 2, 3];
        assert!(affinity_words(&[0, 1, 2, 3], Some(&online)).is_empty());
        // More than online (possible CPUs): still unrestricted.
        assert!(affinity_words(&[0, 1, 2, 3, 4, 5], Some(&online)).is_empty());
        assert_eq!(affinity_words(&[1], Some(&online)), [0b10]);
    }

    #[test]
    fn affinity_words_put_cpu_n_in_word_n_div_64() {
        assert_eq!(affinity_words(&[0, 65, 130], None), [1, 2, 4]);
        assert_eq!(affinity_words(&[63], None), [1 << 63]);
        assert!(affinity_words(&[], None).is_empty());
    }
}
