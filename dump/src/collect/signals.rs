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
/// `struct itimerval`: two `struct timeval`s.
const ITIMER_SIZE: u64 = 32;

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
    scratch: &Scratch,
    handled: u64,
) -> Result<Vec<SaEntry>, CollectError> {
    const SIGCHLD: u64 = 17;
    let tid = leader.tid();
    let signals = || (1..=SIGMAX).filter(|sig| *sig != SIGKILL && *sig != SIGSTOP);
    let asked = |sig: u64| sig == SIGCHLD || handled & (1 << (sig - 1)) != 0;
    // The kernel writes the whole `struct sigaction` back: what is not asked is the default
    // action, all zeros.
    let mut raw = vec![0u8; (SIGMAX * SIGACTION_SIZE) as usize];
    // Each answer of a round has its own slot: one read per round, not one per signal.
    let slots = usize::try_from((scratch.room() / SIGACTION_SIZE).max(1)).unwrap_or(1);
    let wanted: Vec<u64> = signals().filter(|sig| asked(*sig)).collect();
    for round in wanted.chunks(slots) {
        for (slot, sig) in round.iter().enumerate() {
            let off = slot as u64 * SIGACTION_SIZE;
            syscall(
                leader,
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [*sig, 0, scratch.at(tid, off)?, 8, 0, 0],
            )?;
        }
        let answers = scratch.read_vec(tid, 0, round.len() * SIGACTION_SIZE as usize)?;
        for (slot, sig) in round.iter().enumerate() {
            let size = SIGACTION_SIZE as usize;
            let to = usize::try_from((sig - 1) * SIGACTION_SIZE).unwrap_or(0);
            if let (Some(dst), Some(src)) = (
                raw.get_mut(to..to + size),
                answers.get(slot * size..(slot + 1) * size),
            ) {
                dst.copy_from_slice(src);
            }
        }
    }
    let mut out = Vec::with_capacity(62);
    for sig in signals() {
        let off = usize::try_from((sig - 1) * SIGACTION_SIZE).unwrap_or(0);
        let raw = &raw[off..off + SIGACTION_SIZE as usize];
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

/// `struct itimerval` words: interval then value, seconds and microseconds.
fn itimer_entry(raw: &[u8]) -> ItimerEntry {
    ItimerEntry {
        isec: word(raw, 0),
        iusec: word(raw, 1),
        vsec: word(raw, 2),
        vusec: word(raw, 3),
    }
}

/// The three interval timers, each answered into a slot of its own, read at once.
fn itimers(leader: &mut Tracee, scratch: &Scratch) -> Result<[ItimerEntry; 3], CollectError> {
    let tid = leader.tid();
    let which = [ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF];
    for (slot, which) in which.iter().enumerate() {
        syscall(
            leader,
            "getitimer",
            libc::SYS_getitimer,
            [
                *which,
                scratch.at(tid, slot as u64 * ITIMER_SIZE)?,
                0,
                0,
                0,
                0,
            ],
        )?;
    }
    let raw = scratch.read::<{ 3 * ITIMER_SIZE as usize }>(tid, 0)?;
    let size = ITIMER_SIZE as usize;
    Ok([
        itimer_entry(&raw[..size]),
        itimer_entry(&raw[size..2 * size]),
        itimer_entry(&raw[2 * size..]),
    ])
}

fn posix_timer(
    leader: &mut Tracee,
    scratch: &Scratch,
    timer: &PosixTimer,
) -> Result<PosixTimerEntry, CollectError> {
    let tid = leader.tid();
    let id = u64::try_from(timer.id).unwrap_or(u64::MAX);
    syscall(
        leader,
        "timer_gettime",
        libc::SYS_timer_gettime,
        [id, scratch.at(tid, 0)?, 0, 0, 0, 0],
    )?;
    // struct itimerspec: it_interval {sec, nsec}, it_value {sec, nsec}.
    let raw = scratch.read::<32>(tid, 0)?;
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
    scratch: &Scratch,
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
    let [real, virt, prof] = itimers(leader, scratch)?;
    Ok(TaskTimersEntry {
        real,
        virt,
        prof,
        posix,
    })
}
