//! Signal dispositions, interval and POSIX timers, and pending signals.
//!
//! All of it is process or thread state only the process itself can set, so every
//! call is injected; buffers go through the helper page's data area.

use tracee::{Pid, Tracee};

use crate::memory::{libc_nr as nr, Helper};
use crate::plan::{TaskPlan, ThreadPlan, NSIG};
use crate::remote::{self, word, RemoteError};

const SIGKILL: usize = 9;
const SIGSTOP: usize = 19;
/// `struct sigevent` is 64 bytes on x86_64; `sigev_notify_thread_id` is at 16.
const SIGEVENT_SIZE: usize = 64;
const SIGEV_THREAD_ID: u32 = 4;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
/// Size of a kernel `siginfo_t`.
const SIGINFO_SIZE: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("pid {pid}: posix timer {want} came back as id {got}; this kernel cannot create timers with chosen ids")]
    TimerId { pid: Pid, want: u32, got: i32 },
    #[error("pid {pid}: a pending signal's siginfo is {len} bytes, not {SIGINFO_SIZE}")]
    Siginfo { pid: Pid, len: usize },
}

/// Sets the 64 dispositions: the dumped ones, and the default for every other, since
/// the child inherited ours.
///
/// A signal whose dumped disposition is the plain default (all zero) and that the child
/// neither ignores nor catches (`/proc/PID/status`) is left alone: a default disposition
/// has no flags or mask after an exec, and nothing of ours sets one. Most programs
/// change a few signals, so this spares most of 62 injections.
pub fn set_sigactions(
    t: &mut Tracee,
    helper: &Helper,
    task: &TaskPlan,
) -> Result<(), SignalsError> {
    let pid = t.pid();
    // Unknown (unreadable status): every signal is set.
    let changed_here = tracee::proc::status::read(pid)
        .map(|s| s.sig_ign | s.sig_cgt)
        .unwrap_or(u64::MAX);
    let mut table = Vec::with_capacity(NSIG * 32);
    let mut wanted = Vec::with_capacity(NSIG);
    for sig in 1..=NSIG {
        let sa = task.sigactions.get(sig - 1).copied().flatten();
        let (handler, flags, restorer, mask) = sa
            .map(|a| (a.handler, a.flags, a.restorer, a.mask))
            .unwrap_or((0, 0, 0, 0));
        for v in [handler, flags, restorer, mask] {
            table.extend_from_slice(&v.to_ne_bytes());
        }
        let default = handler == 0 && flags == 0 && restorer == 0 && mask == 0;
        wanted.push(!default || changed_here & (1u64 << (sig - 1)) != 0);
    }
    helper.put(pid, &table, "pass the signal handlers")?;
    for sig in 1..=NSIG {
        if sig == SIGKILL || sig == SIGSTOP || !wanted.get(sig - 1).copied().unwrap_or(true) {
            continue;
        }
        let at = helper.data() + (sig as u64 - 1) * 32;
        remote::call(
            t,
            format!("rt_sigaction({sig})"),
            nr::RT_SIGACTION,
            [sig as u64, at, 0, 8, 0, 0],
        )?;
    }
    Ok(())
}

/// Arms the interval timers with the remaining time they had.
pub fn set_itimers(t: &mut Tracee, helper: &Helper, task: &TaskPlan) -> Result<(), SignalsError> {
    let pid = t.pid();
    let Some(timers) = &task.itimers else {
        return Ok(());
    };
    for (which, it) in timers.iter().enumerate() {
        if it.vsec == 0 && it.vusec == 0 {
            continue;
        }
        let mut val = Vec::with_capacity(32);
        for v in [it.isec, it.iusec, it.vsec, it.vusec] {
            val.extend_from_slice(&v.to_ne_bytes());
        }
        helper.put(pid, &val, "pass an itimerval")?;
        remote::call(
            t,
            format!("setitimer({which})"),
            nr::SETITIMER,
            [which as u64, helper.data(), 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Recreates the POSIX timers with their dumped ids, then arms them.
///
/// Since Linux 6.15, `PR_TIMER_CREATE_RESTORE_IDS` makes `timer_create` take the id
/// from its output argument; without it ids come out in creation order from 0, which
/// matches only for processes that never deleted a timer.
pub fn set_posix_timers(
    t: &mut Tracee,
    helper: &Helper,
    task: &TaskPlan,
) -> Result<(), SignalsError> {
    let pid = t.pid();
    if task.posix_timers.is_empty() {
        return Ok(());
    }
    let mut timers = task.posix_timers.clone();
    timers.sort_by_key(|p| p.it_id);
    let restore_ids = remote::call_raw(
        t,
        "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
        nr::PRCTL,
        [
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_ON,
            0,
            0,
            0,
            0,
        ],
    )? == 0;
    for p in &timers {
        let mut ev = vec![0u8; SIGEVENT_SIZE];
        ev[0..8].copy_from_slice(&p.sival_ptr.to_ne_bytes());
        ev[8..12].copy_from_slice(&p.si_signo.to_ne_bytes());
        ev[12..16].copy_from_slice(&p.it_sigev_notify.to_ne_bytes());
        if p.it_sigev_notify & SIGEV_THREAD_ID != 0 {
            let tid = p.notify_thread_id.unwrap_or(pid.as_raw());
            ev[16..20].copy_from_slice(&tid.to_ne_bytes());
        }
        // The id goes in at the output slot right after the sigevent.
        ev.extend_from_slice(&p.it_id.to_ne_bytes());
        helper.put(pid, &ev, "pass a sigevent")?;
        let id_at = helper.data() + SIGEVENT_SIZE as u64;
        remote::call(
            t,
            format!("timer_create(id {})", p.it_id),
            nr::TIMER_CREATE,
            [u64::from(p.clock_id), helper.data(), id_at, 0, 0, 0],
        )?;
        let mut got = [0u8; 4];
        remote::get(pid, id_at, &mut got, "read a timer id")?;
        let got = i32::from_ne_bytes(got);
        if u32::try_from(got).ok() != Some(p.it_id) {
            return Err(SignalsError::TimerId {
                pid,
                want: p.it_id,
                got,
            });
        }
        if p.vsec == 0 && p.vnsec == 0 {
            continue;
        }
        let mut spec = Vec::with_capacity(32);
        for v in [p.isec, p.insec, p.vsec, p.vnsec] {
            spec.extend_from_slice(&v.to_ne_bytes());
        }
        helper.put(pid, &spec, "pass an itimerspec")?;
        remote::call(
            t,
            format!("timer_settime({})", p.it_id),
            nr::TIMER_SETTIME,
            [u64::from(p.it_id), 0, helper.data(), 0, 0, 0],
        )?;
    }
    if restore_ids {
        remote::call(
            t,
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
            nr::PRCTL,
            [
                PR_TIMER_CREATE_RESTORE_IDS,
                PR_TIMER_CREATE_RESTORE_IDS_OFF,
                0,
                0,
                0,
                0,
            ],
        )?;
    }
    Ok(())
}

/// Queues the signals that were pending, shared ones on the process, private ones on
/// their thread. Sent from inside, so the kernel keeps every siginfo field as is.
pub fn queue_pending(
    t: &mut Tracee,
    helper: &Helper,
    image_pid: i32,
    shared: &[Vec<u8>],
    thread: &ThreadPlan,
) -> Result<(), SignalsError> {
    let pid = t.pid();
    for (info, tgid_only) in shared
        .iter()
        .map(|i| (i, true))
        .chain(thread.pending.iter().map(|i| (i, false)))
    {
        if info.len() != SIGINFO_SIZE {
            return Err(SignalsError::Siginfo {
                pid,
                len: info.len(),
            });
        }
        let mut signo = [0u8; 4];
        signo.copy_from_slice(&info[0..4]);
        let signo = u64::from(u32::from_ne_bytes(signo));
        helper.put(pid, info, "pass a siginfo")?;
        // Ids as the process sees them: the image's (the same as ours unless it lives
        // in a new pid namespace).
        let tgid = word(i64::from(image_pid));
        if tgid_only {
            remote::call(
                t,
                format!("rt_sigqueueinfo({signo})"),
                nr::RT_SIGQUEUEINFO,
                [tgid, signo, helper.data(), 0, 0, 0],
            )?;
        } else {
            let tid = word(i64::from(thread.tid));
            remote::call(
                t,
                format!("rt_tgsigqueueinfo({signo})"),
                nr::RT_TGSIGQUEUEINFO,
                [tgid, tid, signo, helper.data(), 0, 0],
            )?;
        }
    }
    Ok(())
}
