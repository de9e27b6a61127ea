//! Per-thread and process-wide kernel state set by injection: tid address, robust
//! list, rseq, sigaltstack, name, scheduling, no_new_privs, seccomp; personality,
//! rlimits, subreaper, oom_score_adj.

use tracee::{Pid, Tracee};

use crate::memory::{libc_nr as nr, Helper};
use crate::plan::{TaskPlan, ThreadPlan};
use crate::remote::{self, word, RemoteError};

const PR_SET_NAME: u64 = 15;
const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SS_ONSTACK: u32 = 1;
const SS_DISABLE: u32 = 2;
const SYS_SCHED_SETSCHEDULER: i64 = 144;
const SYS_SETPRIORITY: i64 = 141;
const SYS_PRLIMIT64: i64 = 302;
const PRIO_PROCESS: u64 = 0;
/// RLIM_INFINITY as the kernel stores it.
const RLIM_INFINITY: u64 = u64::MAX;

#[derive(Debug, thiserror::Error)]
pub enum ThreadStateError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("pid {pid}: writing oom_score_adj {value}")]
    OomScoreAdj {
        pid: Pid,
        value: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Kernel pointers and settings private to one thread.
///
/// The dumped signal mask is not set here but with the registers, last
/// ([`crate::resume::load_registers`]): injections run with every signal blocked, so
/// pending signals queued meanwhile cannot be taken before the thread resumes.
pub fn set_thread_state(
    t: &mut Tracee,
    helper: &Helper,
    plan: &ThreadPlan,
    created: bool,
) -> Result<(), ThreadStateError> {
    let pid = t.pid();
    remote::call(
        t,
        "set_tid_address",
        nr::SET_TID_ADDRESS,
        [plan.clear_tid_addr, 0, 0, 0, 0, 0],
    )?;
    if let Some((head, len)) = plan.robust_list {
        remote::call(
            t,
            "set_robust_list",
            nr::SET_ROBUST_LIST,
            [head, u64::from(len), 0, 0, 0, 0],
        )?;
    }
    if let Some(r) = &plan.rseq {
        register_rseq(t, r)?;
    }
    // Always set in the leader: the child inherited our runtime's alternate stack, now
    // unmapped, and a SA_ONSTACK handler would fault on it. A thread `created` with CLONE_VM
    // (and without CLONE_VFORK) starts without one.
    let (sp, flags, size) = match &plan.sigaltstack {
        Some(sas) if sas.ss_flags & SS_DISABLE == 0 && sas.ss_size != 0 => {
            (sas.ss_sp, sas.ss_flags & !SS_ONSTACK, sas.ss_size)
        }
        _ => (0, SS_DISABLE, 0),
    };
    if created && flags == SS_DISABLE {
        return set_rest(t, helper, plan);
    }
    let mut st = Vec::with_capacity(24);
    st.extend_from_slice(&sp.to_ne_bytes());
    // SS_ONSTACK is state, not a request: sigaltstack() refuses it.
    st.extend_from_slice(&flags.to_ne_bytes());
    st.extend_from_slice(&0u32.to_ne_bytes());
    st.extend_from_slice(&size.to_ne_bytes());
    helper.put(pid, &st, "pass a stack_t")?;
    remote::call(
        t,
        "sigaltstack",
        nr::SIGALTSTACK,
        [helper.data(), 0, 0, 0, 0, 0],
    )?;
    set_rest(t, helper, plan)
}

/// Registers the thread's rseq area. The kernel writes the area at the next return to
/// user mode: its page must be in, or served.
pub fn register_rseq(t: &mut Tracee, r: &images_format::pb::RseqEntry) -> Result<(), RemoteError> {
    remote::call(
        t,
        format!("rseq register at {:#x}", r.rseq_abi_pointer),
        nr::RSEQ,
        [
            r.rseq_abi_pointer,
            u64::from(r.rseq_abi_size),
            0,
            u64::from(r.signature),
            0,
            0,
        ],
    )?;
    Ok(())
}

/// The thread's name and scheduling.
fn set_rest(t: &mut Tracee, helper: &Helper, plan: &ThreadPlan) -> Result<(), ThreadStateError> {
    let pid = t.pid();
    if let Some(comm) = &plan.comm {
        set_name(t, helper, comm)?;
    }
    // A new thread has its creator's scheduling, which is nearly always what was dumped:
    // asked from outside, that costs less than the two injections.
    if let Some(s) = plan.sched.as_ref().filter(|s| !has_sched(t.tid(), s)) {
        helper.put(pid, &s.prio.to_ne_bytes(), "pass a sched_param")?;
        remote::call(
            t,
            "sched_setscheduler",
            SYS_SCHED_SETSCHEDULER,
            [0, u64::from(s.policy), helper.data(), 0, 0, 0],
        )?;
        remote::call(
            t,
            "setpriority",
            SYS_SETPRIORITY,
            [PRIO_PROCESS, 0, word(i64::from(s.nice)), 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Whether thread `tid` has the scheduling `s` already (policy with its reset-on-fork flag,
/// real-time priority, nice). Unreadable counts as not.
fn has_sched(tid: tracee::Tid, s: &crate::plan::Sched) -> bool {
    tracee::taskinfo::sched(tid).is_ok_and(|now| {
        u32::try_from(now.policy).ok() == Some(s.policy)
            && u32::try_from(now.priority).ok() == Some(s.prio)
            && now.nice == s.nice
    })
}

/// `prctl(PR_SET_NAME)`: the kernel keeps 15 bytes.
pub fn set_name(t: &mut Tracee, helper: &Helper, comm: &str) -> Result<(), ThreadStateError> {
    let mut name: Vec<u8> = comm.as_bytes().iter().copied().take(15).collect();
    name.push(0);
    helper.put(t.pid(), &name, "pass the thread name")?;
    remote::call(
        t,
        "prctl(PR_SET_NAME)",
        nr::PRCTL,
        [PR_SET_NAME, helper.data(), 0, 0, 0, 0],
    )?;
    Ok(())
}

/// no_new_privs and the seccomp filters, oldest first; injected syscalls bypass them
/// (the tracee is attached with `PTRACE_O_SUSPEND_SECCOMP`).
pub fn set_security(
    t: &mut Tracee,
    helper: &Helper,
    plan: &ThreadPlan,
) -> Result<(), ThreadStateError> {
    let pid = t.pid();
    let nnp = plan
        .creds
        .as_ref()
        .and_then(|c| c.no_new_privs)
        .unwrap_or(0)
        != 0;
    if nnp {
        remote::call(
            t,
            "prctl(PR_SET_NO_NEW_PRIVS)",
            nr::PRCTL,
            [PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0],
        )?;
    }
    for (i, filter) in plan.seccomp.iter().enumerate() {
        let insns = u16::try_from(filter.len() / 8).unwrap_or(u16::MAX);
        let mut prog = Vec::with_capacity(16 + filter.len());
        prog.extend_from_slice(&insns.to_ne_bytes());
        prog.extend_from_slice(&[0u8; 6]);
        prog.extend_from_slice(&(helper.data() + 16).to_ne_bytes());
        prog.extend_from_slice(filter);
        helper.put(pid, &prog, "pass a seccomp filter")?;
        remote::call(
            t,
            format!("seccomp filter {i}"),
            nr::SECCOMP,
            [SECCOMP_SET_MODE_FILTER, 0, helper.data(), 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Process-wide settings that only the process can make, through its leader.
pub fn set_task_state(
    t: &mut Tracee,
    helper: &Helper,
    task: &TaskPlan,
) -> Result<Vec<String>, ThreadStateError> {
    let pid = t.pid();
    let mut warnings = Vec::new();
    remote::call(
        t,
        "personality",
        nr::PERSONALITY,
        [u64::from(task.personality), 0, 0, 0, 0, 0],
    )?;
    // The child inherited our limits, read here in one go: only those the image changes
    // need injections. Unknown (unreadable) ones are read by injection.
    let current = tracee::proc::limits::read(pid).unwrap_or_default();
    for (resource, limit) in &task.rlimits {
        let now = current.iter().find(|l| l.resource == *resource);
        if now.is_some_and(|l| l.soft == limit.cur && l.hard == limit.max) {
            continue;
        }
        let mut val = Vec::with_capacity(16);
        val.extend_from_slice(&limit.cur.to_ne_bytes());
        val.extend_from_slice(&limit.max.to_ne_bytes());
        val.extend_from_slice(&[0u8; 16]);
        helper.put(pid, &val, "pass an rlimit")?;
        // A hard limit above the current one cannot be set without CAP_SYS_RESOURCE.
        let hard = match now {
            Some(l) => l.hard,
            None => read_hard_limit(t, helper, *resource)?,
        };
        if limit.max > hard && hard != RLIM_INFINITY {
            warnings.push(format!(
                "rlimit {resource}: hard limit {} cannot be raised above {hard} without CAP_SYS_RESOURCE; kept {hard}",
                limit.max
            ));
            let cur = limit.cur.min(hard);
            let mut capped = Vec::with_capacity(16);
            capped.extend_from_slice(&cur.to_ne_bytes());
            capped.extend_from_slice(&hard.to_ne_bytes());
            helper.put(pid, &capped, "pass an rlimit")?;
        }
        remote::call(
            t,
            format!("prlimit64({resource})"),
            SYS_PRLIMIT64,
            [0, u64::from(*resource), helper.data(), 0, 0, 0],
        )?;
    }
    if task.child_subreaper {
        remote::call(
            t,
            "prctl(PR_SET_CHILD_SUBREAPER)",
            nr::PRCTL,
            [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0],
        )?;
    }
    if let Some(value) = task.oom_score_adj {
        let path = format!("/proc/{pid}/oom_score_adj");
        if let Err(source) = std::fs::write(&path, value.to_string()) {
            // Going below the current value needs CAP_SYS_RESOURCE, which we may lack.
            if source.raw_os_error() == Some(13) {
                warnings.push(format!(
                    "oom_score_adj {value} needs CAP_SYS_RESOURCE; left as it is"
                ));
            } else {
                return Err(ThreadStateError::OomScoreAdj { pid, value, source });
            }
        }
    }
    Ok(warnings)
}

/// The thread's hard limit of `resource`, read by an injected `prlimit64` through the
/// second half of the helper's data area.
fn read_hard_limit(t: &mut Tracee, helper: &Helper, resource: u32) -> Result<u64, RemoteError> {
    remote::call(
        t,
        format!("prlimit64({resource}) read"),
        SYS_PRLIMIT64,
        [0, u64::from(resource), 0, helper.data() + 16, 0, 0],
    )?;
    let mut old = [0u8; 16];
    remote::get(t.pid(), helper.data() + 16, &mut old, "read an rlimit")?;
    let mut hard = [0u8; 8];
    hard.copy_from_slice(&old[8..16]);
    Ok(u64::from_ne_bytes(hard))
}

#[derive(Debug, thiserror::Error)]
pub enum CreateThreadError {
    #[error("tid {tid} is not a valid thread id")]
    BadTid { tid: i32 },
    #[error("creating thread {tid}")]
    Clone {
        tid: i32,
        #[source]
        source: tracee::InjectError,
    },
}

/// Creates thread `plan.tid` by an injected `clone3` in the leader. The thread is
/// caught at its clone event before it runs; its registers are set at resume, so the
/// stack given to the kernel is only a placeholder (the helper's data pages).
pub fn create_thread(
    leader: &mut Tracee,
    helper: &Helper,
    plan: &ThreadPlan,
    nested: bool,
) -> Result<Tracee, CreateThreadError> {
    use tracee::spawn::{CloneFlags, ThreadCloneRequest};
    let tid = tracee::Tid::from_raw(plan.tid).ok_or(CreateThreadError::BadTid { tid: plan.tid })?;
    let req = ThreadCloneRequest {
        tid,
        flags: CloneFlags::THREAD_DEFAULT,
        stack: tracee::RemoteAddr(helper.data()),
        stack_size: crate::plan::PAGE_SIZE,
        args_addr: tracee::RemoteAddr(helper.data()),
    };
    // In a pid namespace of its own the thread's id there is the image's; ours differs.
    let created = if nested {
        leader.inject_clone3_thread_nested(&req)
    } else {
        leader.inject_clone3_thread(&req)
    };
    created.map_err(|source| CreateThreadError::Clone {
        tid: plan.tid,
        source,
    })
}
