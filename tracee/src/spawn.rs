//! Creating processes and threads with chosen ids: `clone3` with `set_tid`.
//!
//! A restored process is forked by ckpt-restore (or by its restored parent)
//! with [`fork_with_pid`]; the child runs ordinary Rust code to set itself up,
//! then waits to be rebuilt by injection in one of two ways:
//!
//! - [`stop_self_for_tracer`] (`PTRACE_TRACEME` + `SIGSTOP`), taken over by
//!   its parent with [`Tracee::from_stopped_child`]: the tracer must be the
//!   parent, and the attachment is a classic one (no `PTRACE_INTERRUPT`);
//! - [`pause_for_tracer`], taken over by any process with
//!   [`Tracee::seize_paused`]: a seized attachment, for children forked by a
//!   restored parent.
//!
//! Threads are created from outside with [`Tracee::inject_clone3_thread`].
//!
//! References: [clone3(2)](https://man7.org/linux/man-pages/man2/clone3.2.html).
#![allow(unsafe_code)]

use crate::ids::{Pid, RemoteAddr, Tid};
use crate::inject::InjectError;
use crate::memory;
use crate::ptrace::{PtraceError, SeizeOptions, StopState, Tracee, PTRACE_EVENT_CLONE};
use crate::wait::{last_errno, wait_tid, WaitEvent};
use rustix::io::Errno;
use std::convert::Infallible;

bitflags::bitflags! {
    /// `CLONE_*` flags for `clone3`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CloneFlags: u64 {
        /// Share the address space.
        const VM = 0x100;
        /// Share cwd, root and umask.
        const FS = 0x200;
        /// Share the fd table.
        const FILES = 0x400;
        /// Share signal handlers.
        const SIGHAND = 0x800;
        /// Return a pidfd.
        const PIDFD = 0x1000;
        /// Same parent as the caller.
        const PARENT = 0x8000;
        /// Same thread group.
        const THREAD = 0x10000;
        /// New mount namespace.
        const NEWNS = 0x20000;
        /// Share SysV semaphore undo lists.
        const SYSVSEM = 0x40000;
        /// Set the TLS (fs_base).
        const SETTLS = 0x80000;
        /// Store the child tid in the parent's memory.
        const PARENT_SETTID = 0x10_0000;
        /// Clear the child tid in the child's memory at exit and futex-wake it.
        const CHILD_CLEARTID = 0x20_0000;
        /// Store the child tid in the child's memory.
        const CHILD_SETTID = 0x100_0000;
        /// New cgroup namespace.
        const NEWCGROUP = 0x200_0000;
        /// New UTS namespace.
        const NEWUTS = 0x400_0000;
        /// New IPC namespace.
        const NEWIPC = 0x800_0000;
        /// New user namespace.
        const NEWUSER = 0x1000_0000;
        /// New pid namespace.
        const NEWPID = 0x2000_0000;
        /// New network namespace.
        const NEWNET = 0x4000_0000;
        /// Share the I/O context.
        const IO = 0x8000_0000;
        /// New time namespace.
        const NEWTIME = 0x80;
    }
}

impl CloneFlags {
    /// What a POSIX thread shares with its creator (glibc's `pthread_create`
    /// set, minus the tid bookkeeping a restore sets itself).
    pub const THREAD_DEFAULT: CloneFlags = CloneFlags::VM
        .union(CloneFlags::FS)
        .union(CloneFlags::FILES)
        .union(CloneFlags::SIGHAND)
        .union(CloneFlags::THREAD)
        .union(CloneFlags::SYSVSEM);
}

/// `struct clone_args` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

impl CloneArgs {
    fn to_bytes(self) -> [u8; 88] {
        let words = [
            self.flags,
            self.pidfd,
            self.child_tid,
            self.parent_tid,
            self.exit_signal,
            self.stack,
            self.stack_size,
            self.tls,
            self.set_tid,
            self.set_tid_size,
            self.cgroup,
        ];
        let mut out = [0u8; 88];
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        out
    }
}

/// Creating a process or thread with a chosen id failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// `set_tid` named a pid that exists.
    #[error("pid {pid} is in use")]
    PidInUse { pid: Pid },
    /// `set_tid` named a pid above `kernel.pid_max` (or otherwise invalid).
    #[error(
        "pid {pid} cannot be chosen (above kernel.pid_max, or not allowed in this pid namespace)"
    )]
    PidInvalid { pid: Pid },
    /// Any other `clone3` failure (EPERM: no CAP_CHECKPOINT_RESTORE).
    #[error("clone3 with pid {pid}")]
    Clone3 {
        pid: Pid,
        #[source]
        errno: Errno,
    },
    /// Forking a multi-threaded process would leave the child with locks held
    /// by threads that do not exist in it.
    #[error(
        "fork with a chosen pid from a process with {threads} threads (must be single-threaded)"
    )]
    MultiThreaded { threads: u64 },
    /// The thread count of our own process could not be read.
    #[error("count our own threads")]
    CountThreads(#[source] std::io::Error),
    /// Flags that need pointers or a new stack (`VM`, `THREAD`, `SETTLS`,
    /// `PIDFD`, the tid-storing ones) make no sense for a fork.
    #[error("clone flags {flags:?} are not allowed when forking a process")]
    Flags { flags: CloneFlags },
    /// The `set_tid` list is empty or longer than the 32 pid namespace levels.
    #[error("{len} pids given for set_tid (1..=32 allowed)")]
    PidCount { len: usize },
    /// A plain `fork` ([`fork_any`]) failed.
    #[error("fork")]
    Fork {
        #[source]
        errno: Errno,
    },
}

fn own_thread_count() -> Result<u64, SpawnError> {
    let entries = std::fs::read_dir("/proc/thread-self/..").map_err(SpawnError::CountThreads)?;
    let mut n = 0u64;
    for e in entries {
        e.map_err(SpawnError::CountThreads)?;
        n += 1;
    }
    Ok(n)
}

/// Forks a child whose pid is `pid` (`clone3` with `set_tid = [pid]`,
/// `exit_signal = SIGCHLD`) and runs `child` in it; returns the child's pid in
/// the parent. `flags` may add namespaces or sharing (`CLONE_FILES` for a
/// shared fd table, `CLONE_NEWPID`...).
///
/// The calling process must be single-threaded, which is checked: the child is
/// a copy of the caller's only thread, so any code is fine in it, as after
/// `fork` in a single-threaded program. One difference from glibc's `fork`:
/// glibc's cached thread id (in the thread control block) keeps the parent's
/// value in the child, so pthread calls that rely on it (error-checking or
/// recursive pthread mutexes, `pthread_kill(pthread_self())`) misbehave there;
/// Rust's std locks, `raise` and raw syscalls do not use it.
pub fn fork_with_pid(
    pid: Pid,
    flags: CloneFlags,
    child: impl FnOnce() -> Infallible,
) -> Result<Pid, SpawnError> {
    fork_with_pids(&[pid], flags, child)
}

/// Forks a child with whatever pid the kernel picks and runs `child` in it;
/// returns the child's pid in the parent. Same single-thread rule as
/// [`fork_with_pid`], for helpers (watchdogs) that need no chosen pid.
pub fn fork_any(child: impl FnOnce() -> Infallible) -> Result<Pid, SpawnError> {
    let threads = own_thread_count()?;
    if threads != 1 {
        return Err(SpawnError::MultiThreaded { threads });
    }
    // SAFETY: the process is single-threaded (checked just above), so the
    // child inherits no lock held by a thread that will not exist in it.
    let ret = unsafe { libc::fork() };
    if ret < 0 {
        return Err(SpawnError::Fork {
            errno: last_errno(),
        });
    }
    if ret == 0 {
        child();
    }
    Pid::from_raw(ret).ok_or(SpawnError::Fork {
        errno: Errno::RANGE,
    })
}

/// Like [`fork_with_pid`] with one pid per pid namespace level, innermost
/// first (`set_tid` semantics: `[1, host_pid]` creates the init of a new pid
/// namespace with `CLONE_NEWPID`).
pub fn fork_with_pids(
    pids: &[Pid],
    flags: CloneFlags,
    child: impl FnOnce() -> Infallible,
) -> Result<Pid, SpawnError> {
    let threads = own_thread_count()?;
    if threads != 1 {
        return Err(SpawnError::MultiThreaded { threads });
    }
    // SAFETY: the process is single-threaded (checked just above; only this
    // thread can create another), so the child inherits no lock held by a
    // thread that will not exist in it.
    unsafe { fork_with_pids_unchecked(pids, flags, child) }
}

/// [`fork_with_pids`] without the single-thread check.
///
/// # Safety
/// If the calling process has other threads, `child` may only do
/// async-signal-safe work (raw syscalls, no allocation, no locks) before it
/// execs or exits: another thread may have held the allocator's or stdio's
/// lock at the moment of the fork.
pub unsafe fn fork_with_pids_unchecked(
    pids: &[Pid],
    flags: CloneFlags,
    child: impl FnOnce() -> Infallible,
) -> Result<Pid, SpawnError> {
    let first = *pids.first().ok_or(SpawnError::PidCount { len: 0 })?;
    // Sharing our memory without a stack of its own would have the child
    // run on our stack; the others need pointers we do not pass.
    let forbidden = flags
        & (CloneFlags::VM
            | CloneFlags::THREAD
            | CloneFlags::SETTLS
            | CloneFlags::PIDFD
            | CloneFlags::PARENT_SETTID
            | CloneFlags::CHILD_SETTID
            | CloneFlags::CHILD_CLEARTID);
    if !forbidden.is_empty() {
        return Err(SpawnError::Flags { flags: forbidden });
    }
    if pids.len() > 32 {
        return Err(SpawnError::PidCount { len: pids.len() });
    }
    let set_tid: Vec<libc::pid_t> = pids.iter().map(|p| p.as_raw()).collect();
    let args = CloneArgs {
        flags: flags.bits(),
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: set_tid.len() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` and the `set_tid` array it points to are live for the
    // call. Without CLONE_VM the child runs on a copy of our memory and stack,
    // like fork; the caller guarantees what the child may run (see # Safety).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret < 0 {
        let errno = last_errno();
        return Err(match errno {
            Errno::EXIST => SpawnError::PidInUse { pid: first },
            Errno::INVAL => SpawnError::PidInvalid { pid: first },
            errno => SpawnError::Clone3 { pid: first, errno },
        });
    }
    if ret == 0 {
        child();
    }
    let raw = i32::try_from(ret).map_err(|_| SpawnError::Clone3 {
        pid: first,
        errno: Errno::RANGE,
    })?;
    Pid::from_raw(raw).ok_or(SpawnError::Clone3 {
        pid: first,
        errno: Errno::RANGE,
    })
}

/// In a child forked for restore: `PTRACE_TRACEME`, then stop with SIGSTOP,
/// for the parent to take over with [`Tracee::from_stopped_child`]. Returns
/// only if the tracer resumes the child without rebuilding it.
///
/// TRACEME (not a seize by the parent) is chosen because the stop it gives is
/// a signal-delivery-stop the tracer swallows: after the final detach the
/// process runs, where a group-stop would leave it stopped.
pub fn stop_self_for_tracer() -> Result<(), Errno> {
    // SAFETY: PTRACE_TRACEME takes no pointer arguments.
    let ret = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize) };
    if ret < 0 {
        return Err(last_errno());
    }
    // Raw ids from the kernel: after a raw clone3, glibc's cached thread id
    // in our TCB is still the parent's.
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    // SAFETY: tgkill takes only integers.
    let ret = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSTOP) };
    if ret != 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// In a child forked for restore: wait in `pause()` forever, for a tracer
/// that is not our parent (a restored parent forked us) to take over with
/// [`Tracee::seize_paused`]. Unlike [`stop_self_for_tracer`] this leaves no
/// job-control stop behind and lets any process be the tracer.
pub fn pause_for_tracer() -> Infallible {
    loop {
        // SAFETY: pause takes no arguments; it returns only after a caught
        // signal, and a restore child catches none.
        unsafe { libc::pause() };
    }
}

/// `close_range(first, last, 0)`: closes every fd numbered `first..=last`.
///
/// Warning: like `close(2)` on a raw number, this closes fds that `OwnedFd`s of this
/// process may still own. It is meant for a process forked for restore, just before it
/// becomes the restored program, whose only fds worth keeping are outside the range.
pub fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range takes only integers; closing fds has no memory effect.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if ret < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// Dies by signal `sig` as a process whose default action for it is to terminate
/// (a restored zombie replaying its death): the disposition goes back to `SIG_DFL`,
/// the signal is unblocked and raised. Exits with `128 + sig` if that did not kill.
pub fn die_by_signal(sig: i32) -> ! {
    // SAFETY: SIG_DFL installs no handler; the previous disposition is not asked for.
    let _ = unsafe { libc::signal(sig, libc::SIG_DFL) };
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: `set` is a valid sigset_t-sized buffer, initialised by sigemptyset.
    let _ = unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: `set` was initialised just above; the signal number is only read.
    let _ = unsafe { libc::sigaddset(set.as_mut_ptr(), sig) };
    // SAFETY: `set` is initialised; no old mask is asked for (null).
    let _ = unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut()) };
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    // SAFETY: tgkill takes only integers.
    let _ = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    std::process::exit(128 + (sig & 0x7f))
}

/// A thread to create in a restored process by injected `clone3`.
#[derive(Debug, Clone, Copy)]
pub struct ThreadCloneRequest {
    /// The tid the thread must get.
    pub tid: Tid,
    /// Clone flags; [`CloneFlags::THREAD_DEFAULT`] for a POSIX thread.
    pub flags: CloneFlags,
    /// Lowest address of the new thread's stack (its registers are set after
    /// creation, so any mapped, writable area will do).
    pub stack: RemoteAddr,
    /// Size of that stack.
    pub stack_size: u64,
    /// 96 bytes of writable target memory (a scratch page) for `clone_args`
    /// and the `set_tid` array.
    pub args_addr: RemoteAddr,
}

impl Tracee {
    /// Creates thread `req.tid` in this stopped tracee's process with an
    /// injected `clone3`, and returns it attached, stopped before its first
    /// instruction (caught through `PTRACE_O_TRACECLONE`, which this tracee
    /// must have been attached with). The new thread's registers are the
    /// injection's (rip after the syscall instruction, rax 0) and its signal
    /// mask blocks everything: set both before letting it run.
    pub fn inject_clone3_thread(
        &mut self,
        req: &ThreadCloneRequest,
    ) -> Result<Tracee, InjectError> {
        self.clone3_thread(req, false)
    }

    /// [`Tracee::inject_clone3_thread`] for a process in a pid namespace below
    /// ours: `req.tid` is the thread's id in the process's namespace (what
    /// `clone3` returns there), and the returned thread is addressed by the
    /// id the clone event reports, ours.
    pub fn inject_clone3_thread_nested(
        &mut self,
        req: &ThreadCloneRequest,
    ) -> Result<Tracee, InjectError> {
        self.clone3_thread(req, true)
    }

    fn clone3_thread(
        &mut self,
        req: &ThreadCloneRequest,
        nested: bool,
    ) -> Result<Tracee, InjectError> {
        let tid = self.tid();
        let nr = libc::SYS_clone3;
        if !self.options().contains(SeizeOptions::TRACECLONE) {
            return Err(InjectError::Ptrace {
                tid,
                nr,
                source: PtraceError::Ptrace {
                    tid,
                    op: "inject clone3 without PTRACE_O_TRACECLONE",
                    errno: Errno::INVAL,
                },
            });
        }
        let set_tid_addr = req.args_addr.saturating_add(88);
        let args = CloneArgs {
            flags: req.flags.bits(),
            stack: req.stack.get(),
            stack_size: req.stack_size,
            set_tid: set_tid_addr.get(),
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        let mut bytes = args.to_bytes().to_vec();
        bytes.extend_from_slice(&i64::from(req.tid.as_raw()).to_ne_bytes());
        memory::write_remote(self.pid(), req.args_addr, &bytes)
            .map_err(|source| InjectError::Scratch { tid, source })?;
        let mut reported: Option<u64> = None;
        let ret = self.run_injected(
            nr,
            [req.args_addr.get(), 88, 0, 0, 0, 0],
            &mut |t, event| {
                if event == PTRACE_EVENT_CLONE {
                    reported = Some(t.event_msg().map_err(|source| InjectError::Ptrace {
                        tid,
                        nr,
                        source,
                    })?);
                }
                Ok(())
            },
        )?;
        let created = crate::inject::decode_return(ret).map_err(|errno| InjectError::Failed {
            tid,
            nr,
            errno,
        })?;
        let wrong = || InjectError::CloneTid {
            tid,
            want: req.tid,
            got: created,
        };
        if created != i64::from(req.tid.as_raw()) {
            return Err(wrong());
        }
        let ours = if nested {
            // Only the event knows the id in our namespace.
            reported
                .and_then(|r| i32::try_from(r).ok())
                .and_then(Tid::from_raw)
                .ok_or_else(wrong)?
        } else {
            if reported.is_some_and(|r| u64::try_from(created) != Ok(r)) {
                return Err(wrong());
            }
            req.tid
        };
        let mut thread = Tracee::auto_attached(self.pid(), ours, self);
        // The same instruction serves every thread of the address space.
        thread.syscall_insn = self.syscall_insn;
        // The new thread reports a stop before running anything: SIGSTOP for a
        // classic (TRACEME) attachment, PTRACE_EVENT_STOP for a seized one.
        match wait_tid(ours) {
            Ok(WaitEvent::Stopped { sig, event }) => {
                thread.set_stopped(StopState::Stopped { sig, event });
                Ok(thread)
            }
            Ok(WaitEvent::Exited(code)) => {
                thread.forget();
                Err(InjectError::Ptrace {
                    tid,
                    nr,
                    source: PtraceError::Exited { tid: ours, code },
                })
            }
            Ok(WaitEvent::Signaled(signal)) => {
                thread.forget();
                Err(InjectError::Ptrace {
                    tid,
                    nr,
                    source: PtraceError::Killed { tid: ours, signal },
                })
            }
            Err(errno) => Err(InjectError::Ptrace {
                tid,
                nr,
                source: PtraceError::Wait { tid: ours, errno },
            }),
        }
    }
}
