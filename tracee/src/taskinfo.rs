//! Per-task state the kernel shows and changes from outside, without
//! injection: robust futex list, scheduling, CPU affinity, nice, I/O priority
//! and resource limits.
#![allow(unsafe_code)]

use crate::ids::{Pid, RemoteAddr, Tid};
use crate::proc::limits::Limit;
use crate::wait::last_errno;
use rustix::io::Errno;

/// A per-task query or change failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskInfoError {
    /// A syscall on a thread failed.
    #[error("tid {tid}: {call}")]
    Thread {
        tid: Tid,
        call: &'static str,
        #[source]
        errno: Errno,
    },
    /// A syscall on a process failed.
    #[error("pid {pid}: {call}")]
    Process {
        pid: Pid,
        call: &'static str,
        #[source]
        errno: Errno,
    },
}

fn thread_err(tid: Tid, call: &'static str) -> TaskInfoError {
    TaskInfoError::Thread {
        tid,
        call,
        errno: last_errno(),
    }
}

/// `get_robust_list(tid)`: the head of the thread's robust futex list and its length.
pub fn robust_list(tid: Tid) -> Result<(RemoteAddr, u64), TaskInfoError> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: the kernel writes one pointer-sized value into `head` and one
    // size_t into `len`, both live locals.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            libc::c_long::from(tid.as_raw()),
            &mut head as *mut u64,
            &mut len as *mut libc::size_t,
        )
    };
    if ret < 0 {
        return Err(thread_err(tid, "get_robust_list"));
    }
    Ok((RemoteAddr(head), len as u64))
}

/// A thread's scheduling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sched {
    /// `SCHED_*` policy, with `SCHED_RESET_ON_FORK` (0x40000000) kept if set.
    pub policy: i32,
    /// Real-time priority (0 for normal policies).
    pub priority: i32,
    /// Nice value.
    pub nice: i32,
}

/// `sched_getscheduler`, `sched_getparam` and `getpriority` on one thread.
pub fn sched(tid: Tid) -> Result<Sched, TaskInfoError> {
    // SAFETY: takes only an integer.
    let policy = unsafe { libc::sched_getscheduler(tid.as_raw()) };
    if policy < 0 {
        return Err(thread_err(tid, "sched_getscheduler"));
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes one sched_param into `param`, a live local.
    let ret = unsafe { libc::sched_getparam(tid.as_raw(), &mut param) };
    if ret < 0 {
        return Err(thread_err(tid, "sched_getparam"));
    }
    // getpriority's raw syscall returns 20 - nice, never negative on success:
    // unlike the libc wrapper there is no ambiguity with -1.
    // SAFETY: takes only integers.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_getpriority,
            libc::c_long::from(libc::PRIO_PROCESS),
            libc::c_long::from(tid.as_raw()),
        )
    };
    if raw < 0 {
        return Err(thread_err(tid, "getpriority"));
    }
    let nice = 20 - i32::try_from(raw).unwrap_or(20);
    Ok(Sched {
        policy,
        priority: param.sched_priority,
        nice,
    })
}

/// `sched_setscheduler` then `setpriority` on one thread (from outside; needs
/// CAP_SYS_NICE for real-time policies or a lower nice).
pub fn set_sched(tid: Tid, sched: &Sched) -> Result<(), TaskInfoError> {
    // The nice value first: a real-time thread ignores it, and `sched_setscheduler` to a
    // normal policy keeps it, so a thread leaving real time lands on its new nice value at
    // once instead of passing through its old one.
    let who = libc::id_t::try_from(tid.as_raw()).unwrap_or(0);
    // SAFETY: takes only integers.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, sched.nice) };
    if ret < 0 {
        return Err(thread_err(tid, "setpriority"));
    }
    let param = libc::sched_param {
        sched_priority: sched.priority,
    };
    // SAFETY: the kernel reads one sched_param from `param`, a live local.
    let ret = unsafe { libc::sched_setscheduler(tid.as_raw(), sched.policy, &param) };
    if ret < 0 {
        return Err(thread_err(tid, "sched_setscheduler"));
    }
    Ok(())
}

/// The calling thread.
pub fn this_thread() -> Option<Tid> {
    Tid::from_raw(rustix::thread::gettid().as_raw_nonzero().get())
}

/// Puts the calling thread under `SCHED_IDLE`: it runs only on CPU time no normal task
/// wants, and never preempts one. For background work that must not delay anything,
/// where nice 19 still lets a thread that slept long run before a waiting normal task.
/// Returns the thread and what it had, for [`set_sched`] to give back from any thread
/// once the work is what everything waits for (an idle thread may starve meanwhile).
pub fn idle_policy() -> Result<Option<(Tid, Sched)>, TaskInfoError> {
    let idle = Sched {
        policy: libc::SCHED_IDLE,
        priority: 0,
        nice: 19,
    };
    let Some(me) = this_thread() else {
        return Ok(None);
    };
    let before = sched(me)?;
    set_sched(me, &idle)?;
    Ok(Some((me, before)))
}

/// `struct sched_attr` up to `sched_period` (`SCHED_ATTR_SIZE_VER0`), all we set.
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The shortest time slice the kernel grants ([`short_slice`]).
pub const SHORTEST_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// The calling thread, under the normal policy at its nice value, asks for time slices of
/// `slice` (`sched_setattr` with `sched_runtime`: EEVDF's custom slices, Linux 6.12 on;
/// the kernel keeps it between 0.1 and 100 ms). Woken, a thread of a shorter slice than
/// the running one's preempts it at once instead of waiting for that slice to end
/// (milliseconds behind a busy program, measured here). For threads that wake to answer
/// someone waiting, and sleep again: their share of the CPU stays that of their nice
/// value. A later change of policy (`set_sched`, [`RealTime`]) drops it. Older kernels
/// refuse nothing, they ignore it.
pub fn short_slice(slice: std::time::Duration) -> Result<(), TaskInfoError> {
    let Some(me) = this_thread() else {
        return Ok(());
    };
    normal_with_slice(me, sched(me)?.nice, 0, slice)
}

/// `SCHED_FLAG_RESET_ON_FORK` of `sched_attr.sched_flags`.
const SCHED_FLAG_RESET_ON_FORK: u64 = 1;

/// The calling thread `me` under the normal policy at `nice`, with time slices of `slice`.
fn normal_with_slice(
    me: Tid,
    nice: i32,
    flags: u64,
    slice: std::time::Duration,
) -> Result<(), TaskInfoError> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags,
        nice,
        priority: 0,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        deadline: 0,
        period: 0,
    };
    // SAFETY: the kernel reads `attr.size` bytes from `attr`, a live local of that size.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::addr_of!(attr), 0) };
    if ret < 0 {
        return Err(thread_err(me, "sched_setattr"));
    }
    Ok(())
}

/// The calling thread at the lowest real-time priority (`SCHED_FIFO` 1, reset on fork:
/// children start with the normal policy) until [`RealTime::end`] or drop, then back to
/// the policy it had. Above every normal task and below any real-time one, for the short
/// spells the tools hold a process stopped, and for the threads that answer a migrated
/// program's page faults while it waits: there short slices ([`short_slice`]) do not
/// suffice, as a woken thread that has had more than its share of the CPU lately (a fault
/// server in a burst of faults) is not eligible under EEVDF, and waits out the running
/// task's whole slice: the memory reclaimer (`kdamond`) ran 3 ms at a time on the fault
/// servers' CPU, and the program stalled that long each time. Best effort: without the
/// privilege the thread keeps its policy.
#[derive(Debug)]
pub struct RealTime {
    previous: std::cell::Cell<Option<(Tid, Sched)>>,
}

/// `SCHED_FIFO`, with `SCHED_RESET_ON_FORK`.
const FIFO_RESET_ON_FORK: i32 = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;

impl RealTime {
    pub fn raise() -> RealTime {
        let previous = this_thread()
            .and_then(|me| sched(me).ok().map(|previous| (me, previous)))
            .filter(|(me, previous)| {
                let urgent = Sched {
                    policy: FIFO_RESET_ON_FORK,
                    priority: 1,
                    nice: previous.nice,
                };
                set_sched(*me, &urgent).is_ok()
            });
        RealTime {
            previous: std::cell::Cell::new(previous),
        }
    }

    /// Back to the policy the thread had.
    pub fn end(&self) -> Result<(), TaskInfoError> {
        match self.previous.take() {
            Some((me, previous)) => set_sched(me, &previous),
            None => Ok(()),
        }
    }

    /// Back to the normal policy the thread had, with time slices of `slice`
    /// ([`short_slice`]) in the same call: a thread that serves others once its spell is
    /// over is never, even for an instant, at the default slice, and pays one system call
    /// instead of three. A thread that was not under the normal policy gets its own back,
    /// as [`RealTime::end`]; one that never left it gets the slice.
    pub fn end_with_slice(&self, slice: std::time::Duration) -> Result<(), TaskInfoError> {
        match self.previous.take() {
            Some((me, previous))
                if previous.policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_OTHER =>
            {
                let flags = if previous.policy & libc::SCHED_RESET_ON_FORK != 0 {
                    SCHED_FLAG_RESET_ON_FORK
                } else {
                    0
                };
                normal_with_slice(me, previous.nice, flags, slice)
            }
            Some((me, previous)) => set_sched(me, &previous),
            None => short_slice(slice),
        }
    }

    /// Back to the policy the thread had, at nice value `nice` in one step: a thread that
    /// goes into the background after its spell is never, even for an instant, at its old
    /// nice value, where a task it just woke would wait behind it.
    pub fn end_at_nice(&self, nice: i32) -> Result<(), TaskInfoError> {
        match self.previous.take() {
            Some((me, previous)) => set_sched(me, &Sched { nice, ..previous }),
            None => Ok(()),
        }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        // Dropped on every path out: a failure has nowhere to go, and the policy only
        // matters for the microseconds the thread still lives here.
        let _ = self.end();
    }
}

/// `sched_getaffinity`: the CPUs the thread may run on, ascending.
pub fn affinity(tid: Tid) -> Result<Vec<usize>, TaskInfoError> {
    let rpid = rustix::process::Pid::from_raw(tid.as_raw());
    let set = rustix::thread::sched_getaffinity(rpid).map_err(|errno| TaskInfoError::Thread {
        tid,
        call: "sched_getaffinity",
        errno,
    })?;
    Ok(cpus_in(&set))
}

/// The CPUs in `set`, ascending.
pub fn cpus_in(set: &rustix::thread::CpuSet) -> Vec<usize> {
    (0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect()
}

/// `sched_setaffinity` on one thread. CPUs this machine lacks are dropped;
/// if none is left the call fails with EINVAL.
pub fn set_affinity(tid: Tid, cpus: &[usize]) -> Result<(), TaskInfoError> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        if c < rustix::thread::CpuSet::MAX_CPU {
            set.set(c);
        }
    }
    let rpid = rustix::process::Pid::from_raw(tid.as_raw());
    rustix::thread::sched_setaffinity(rpid, &set).map_err(|errno| TaskInfoError::Thread {
        tid,
        call: "sched_setaffinity",
        errno,
    })
}

/// `ioprio_get(IOPRIO_WHO_PROCESS, tid)`: the raw I/O priority (class << 13 | data).
pub fn ioprio(tid: Tid) -> Result<i32, TaskInfoError> {
    // SAFETY: takes only integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ioprio_get,
            1 as libc::c_long,
            libc::c_long::from(tid.as_raw()),
        )
    };
    if ret < 0 {
        return Err(thread_err(tid, "ioprio_get"));
    }
    Ok(i32::try_from(ret).unwrap_or(0))
}

/// `ioprio_set(IOPRIO_WHO_PROCESS, tid, prio)`.
pub fn set_ioprio(tid: Tid, prio: i32) -> Result<(), TaskInfoError> {
    // SAFETY: takes only integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            1 as libc::c_long,
            libc::c_long::from(tid.as_raw()),
            libc::c_long::from(prio),
        )
    };
    if ret < 0 {
        return Err(thread_err(tid, "ioprio_set"));
    }
    Ok(())
}

/// Number of `RLIMIT_*` resources.
pub const RLIMIT_COUNT: u32 = 16;

/// `prlimit(pid, r, NULL, &old)` for every resource.
pub fn prlimits(pid: Pid) -> Result<Vec<Limit>, TaskInfoError> {
    (0..RLIMIT_COUNT)
        .map(|resource| {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a null new limit only reads; the kernel writes `old`, a live local.
            let ret = unsafe {
                libc::prlimit64(
                    pid.as_raw(),
                    resource as libc::__rlimit_resource_t,
                    std::ptr::null(),
                    &mut old,
                )
            };
            if ret < 0 {
                return Err(TaskInfoError::Process {
                    pid,
                    call: "prlimit",
                    errno: last_errno(),
                });
            }
            Ok(Limit {
                resource,
                soft: old.rlim_cur,
                hard: old.rlim_max,
            })
        })
        .collect()
}

/// `prlimit(pid, limit.resource, &new, NULL)`. Raising a hard limit needs
/// CAP_SYS_RESOURCE.
pub fn set_prlimit(pid: Pid, limit: &Limit) -> Result<(), TaskInfoError> {
    let new = libc::rlimit64 {
        rlim_cur: limit.soft,
        rlim_max: limit.hard,
    };
    // SAFETY: the kernel reads `new`, a live local; the old-limit pointer is null.
    let ret = unsafe {
        libc::prlimit64(
            pid.as_raw(),
            limit.resource as libc::__rlimit_resource_t,
            &new,
            std::ptr::null_mut(),
        )
    };
    if ret < 0 {
        return Err(TaskInfoError::Process {
            pid,
            call: "prlimit",
            errno: last_errno(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (Pid, Tid) {
        let pid = Pid::try_from(std::process::id()).expect("own pid");
        // SAFETY: gettid has no arguments.
        let tid = Tid::from_raw(unsafe { libc::gettid() }).expect("own tid");
        (pid, tid)
    }

    #[test]
    fn a_short_slice_is_granted_and_keeps_the_policy_and_nice_value() {
        std::thread::spawn(|| {
            let (_, tid) = me();
            let before = sched(tid).expect("sched");
            short_slice(SHORTEST_SLICE).expect("sched_setattr");
            let after = sched(tid).expect("sched");
            assert_eq!((after.policy, after.nice), (before.policy, before.nice));
            assert_slice(tid, 100_000);
        })
        .join()
        .expect("thread");
    }

    /// The thread's `se.slice` in ns is `want` (only kernels with EEVDF's custom slices,
    /// 6.12 on, show it).
    fn assert_slice(tid: Tid, want: u64) {
        let text =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).expect("read sched");
        if let Some(line) = text.lines().find(|l| l.starts_with("se.slice")) {
            let slice: u64 = line
                .rsplit(':')
                .next()
                .and_then(|v| v.trim().parse().ok())
                .expect("se.slice value");
            assert_eq!(slice, want, "{line}");
        }
    }

    #[test]
    fn leaving_real_time_with_a_slice_gives_the_old_nice_value_and_the_slice() {
        std::thread::spawn(|| {
            let (_, tid) = me();
            let before = Sched {
                policy: libc::SCHED_OTHER,
                priority: 0,
                nice: 5,
            };
            set_sched(tid, &before).expect("nice 5");
            let urgent = RealTime::raise();
            let during = sched(tid).expect("sched");
            // Root here; without the privilege the thread stays as it was.
            let raised = during.policy & 0xff == libc::SCHED_FIFO;
            urgent
                .end_with_slice(SHORTEST_SLICE)
                .expect("back to normal");
            let after = sched(tid).expect("sched");
            assert_eq!((after.policy & 0xff, after.nice), (libc::SCHED_OTHER, 5));
            assert!(after.policy & libc::SCHED_RESET_ON_FORK == 0, "{after:?}");
            assert!(raised || during == before, "{during:?}");
            assert_slice(tid, 100_000);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn reads_own_thread_state() {
        let (pid, tid) = me();
        let (head, len) = robust_list(tid).expect("robust list");
        // glibc registers a robust list for every thread.
        assert!(head.get() != 0 && len > 0);
        let s = sched(tid).expect("sched");
        assert_eq!(s.policy & 0xff, libc::SCHED_OTHER);
        set_sched(tid, &s).expect("set same sched");
        let cpus = affinity(tid).expect("affinity");
        assert!(!cpus.is_empty());
        set_affinity(tid, &cpus).expect("set same affinity");
        let prio = ioprio(tid).expect("ioprio");
        set_ioprio(tid, prio).expect("set same ioprio");
        let limits = prlimits(pid).expect("prlimits");
        assert_eq!(limits.len(), 16);
        let nofile = limits[7];
        set_prlimit(pid, &nofile).expect("set same limit");
        let from_proc = crate::proc::limits::read(pid).expect("limits file");
        assert_eq!(from_proc[7], nofile);
    }

    /// Runs `f` on a thread of its own: policies and nice values are per thread, and the
    /// test harness reuses its threads.
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread")
    }

    #[test]
    fn a_real_time_spell_ends_at_the_nice_value_asked() {
        let (during, after) = on_own_thread(|| {
            let (_, tid) = me();
            let spell = RealTime::raise();
            let during = sched(tid).expect("sched");
            spell.end_at_nice(19).expect("end");
            (during, sched(tid).expect("sched"))
        });
        // Root here: the spell is real time; without the privilege it is not, and the
        // thread only gets the nice value.
        if during.policy & 0xff == libc::SCHED_FIFO {
            assert_eq!(during.priority, 1);
        }
        assert_eq!(after.policy & 0xff, libc::SCHED_OTHER);
        assert_eq!((after.priority, after.nice), (0, 19));
    }

    #[test]
    fn idle_policy_puts_the_calling_thread_under_sched_idle() {
        let (s, given_back) = on_own_thread(|| {
            let (tid, before) = idle_policy().expect("idle policy").expect("a tid");
            let idle = sched(tid).expect("sched");
            set_sched(tid, &before).expect("give the policy back");
            (idle, sched(tid).expect("sched"))
        });
        assert_eq!(s.policy & 0xff, libc::SCHED_IDLE);
        assert_eq!(given_back.policy & 0xff, libc::SCHED_OTHER);
        let (_, tid) = me();
        assert_eq!(sched(tid).expect("sched").policy & 0xff, libc::SCHED_OTHER);
    }
}
