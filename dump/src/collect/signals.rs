//! Process-wide signal and timer state: the 62 dispositions (all but SIGKILL and SIGSTOP, in
//! signal order, as CRIU stores them), shared pending signals, the three itimers and every
//! POSIX timer with its id, all read by injected syscalls in the leader.

use images_format::pb::{
    ItimerEntry, PosixTimerEntry, SaEntry, SiginfoEntry, SignalQueueEntry, TaskTimersEntry,
};
use tracee::proc::timers::{self, PosixTimer, TimerNotify};
use tracee::{Pid, Tracee};

use super::inject::{syscall, syscall_u64, Scratch};
use super::CollectError;

/// Highest signal number.
const SIGMAX: u64 = 64;
const SIGKILL: u64 = 9;
const SIGSTOP: u64 = 19;
/// The kernel's `struct sigaction`: handler, flags, restorer, mask.
const SIGACTION_SIZE: u64 = 32;
const ITIMER_REAL: u64 = 0;
const ITIMER_VIRTUAL: u64 = 1;
const ITIMER_PROF: u64 = 2;
/// Where the timers go in the scratch area (after the sigactions).
const OFF_TIMER: u64 = SIGMAX * SIGACTION_SIZE;

fn word(raw: &[u8], index: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[index * 8..index * 8 + 8]);
    u64::from_ne_bytes(b)
}

/// Pending signals as the image keeps them: the raw 128-byte siginfo of each.
pub fn signal_queue(pending: &[[u8; 128]]) -> SignalQueueEntry {
    SignalQueueEntry {
        signals: pending
            .iter()
            .map(|s| SiginfoEntry {
                siginfo: s.to_vec(),
            })
            .collect(),
    }
}

/// Reads the dispositions with `rt_sigaction(sig, NULL, &old, 8)`: those of the signals in
/// `handled` (caught or ignored, from `/proc/PID/status` `SigCgt | SigIgn`) and SIGCHLD's.
/// Every other signal has the default action, saved as all zero without asking: an injected
/// syscall each would be most of the cost of a small process. What that leaves out, flags
/// or a mask stored along with `SIG_DFL`, changes no behaviour (no handler runs); SIGCHLD is
/// the exception (`SA_NOCLDWAIT` reaps children even with `SIG_DFL`), so it is always read.
pub fn sigactions(
    leader: &mut Tracee,
    scratch: &Scratch<'_>,
    handled: u64,
) -> Result<Vec<SaEntry>, CollectError> {
    const SIGCHLD: u64 = 17;
    let tid = leader.tid();
    let signals = || (1..=SIGMAX).filter(|sig| *sig != SIGKILL && *sig != SIGSTOP);
    let asked = |sig: u64| sig == SIGCHLD || handled & (1 << (sig - 1)) != 0;
    scratch.clear(tid, 0, (SIGMAX * SIGACTION_SIZE) as usize)?;
    // Each answer has its own slot: one read of the area afterwards, not one per signal.
    for sig in signals().filter(|sig| asked(*sig)) {
        let off = (sig - 1) * SIGACTION_SIZE;
        syscall(
            leader,
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            [sig, 0, scratch.at(off), 8, 0, 0],
        )?;
    }
    const ALL: usize = (SIGMAX * SIGACTION_SIZE) as usize;
    let all = scratch.read::<ALL>(tid, 0)?;
    let mut out = Vec::with_capacity(62);
    for sig in signals() {
        let off = usize::try_from((sig - 1) * SIGACTION_SIZE).unwrap_or(0);
        let raw = &all[off..off + SIGACTION_SIZE as usize];
        out.push(SaEntry {
            sigaction: word(raw, 0),
            flags: word(raw, 1),
            restorer: word(raw, 2),
            mask: word(raw, 3),
            compat_sigaction: Some(false),
            mask_extended: None,
        });
    }
    Ok(out)
}

fn itimer(
    leader: &mut Tracee,
    scratch: &Scratch<'_>,
    which: u64,
) -> Result<ItimerEntry, CollectError> {
    let tid = leader.tid();
    syscall(
        leader,
        "getitimer",
        libc::SYS_getitimer,
        [which, scratch.at(OFF_TIMER), 0, 0, 0, 0],
    )?;
    // struct itimerval: it_interval {sec, usec}, it_value {sec, usec}.
    let raw = scratch.read::<32>(tid, OFF_TIMER)?;
    Ok(ItimerEntry {
        isec: word(&raw, 0),
        iusec: word(&raw, 1),
        vsec: word(&raw, 2),
        vusec: word(&raw, 3),
    })
}

fn posix_timer(
    leader: &mut Tracee,
    scratch: &Scratch<'_>,
    timer: &PosixTimer,
) -> Result<PosixTimerEntry, CollectError> {
    let tid = leader.tid();
    let id = u64::try_from(timer.id).unwrap_or(u64::MAX);
    syscall(
        leader,
        "timer_gettime",
        libc::SYS_timer_gettime,
        [id, scratch.at(OFF_TIMER), 0, 0, 0, 0],
    )?;
    // struct itimerspec: it_interval {sec, nsec}, it_value {sec, nsec}.
    let raw = scratch.read::<32>(tid, OFF_TIMER)?;
    let overrun = syscall_u64(
        leader,
        "timer_getoverrun",
        libc::SYS_timer_getoverrun,
        [id, 0, 0, 0, 0, 0],
    )?;
    Ok(PosixTimerEntry {
        it_id: u32::try_from(timer.id).unwrap_or(0),
        clock_id: u32::try_from(timer.clock_id).unwrap_or(0),
        si_signo: u32::try_from(timer.signo).unwrap_or(0),
        it_sigev_notify: sigev_notify(timer),
        sival_ptr: timer.sigval,
        overrun: u32::try_from(overrun).unwrap_or(u32::MAX),
        isec: word(&raw, 0),
        insec: word(&raw, 1),
        vsec: word(&raw, 2),
        vnsec: word(&raw, 3),
        notify_thread_id: timer.notify_tid,
    })
}

/// `sigev_notify` as `timer_create` took it: the kind, plus `SIGEV_THREAD_ID` when the
/// signal goes to one thread.
fn sigev_notify(timer: &PosixTimer) -> u32 {
    const SIGEV_SIGNAL: u32 = 0;
    const SIGEV_NONE: u32 = 1;
    const SIGEV_THREAD: u32 = 2;
    const SIGEV_THREAD_ID: u32 = 4;
    let kind = match timer.notify {
        TimerNotify::Signal => SIGEV_SIGNAL,
        TimerNotify::None => SIGEV_NONE,
        TimerNotify::Thread => SIGEV_THREAD,
    };
    if timer.notify_tid.is_some() {
        kind | SIGEV_THREAD_ID
    } else {
        kind
    }
}

/// The three itimers and every POSIX timer of the process.
pub fn timers(
    pid: Pid,
    leader: &mut Tracee,
    scratch: &Scratch<'_>,
) -> Result<TaskTimersEntry, CollectError> {
    let listed = timers::read(pid).map_err(|source| CollectError::Proc {
        pid,
        what: "timers",
        source,
    })?;
    let mut posix = Vec::with_capacity(listed.len());
    for timer in &listed {
        posix.push(posix_timer(leader, scratch, timer)?);
    }
    Ok(TaskTimersEntry {
        real: itimer(leader, scratch, ITIMER_REAL)?,
        virt: itimer(leader, scratch, ITIMER_VIRTUAL)?,
        prof: itimer(leader, scratch, ITIMER_PROF)?,
        posix,
    })
}
