//! One thread under ptrace: seize, interrupt, registers, xsave, signal state, detach.
//!
//! A [`Tracee`] is bound to the OS thread that attached it: the kernel accepts
//! ptrace requests only from the tracer thread, so `Tracee` is neither `Send`
//! nor `Sync`. Dropping it detaches, restoring the registers first if an
//! injected syscall was interrupted half-way.
//!
//! References: [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html).
#![allow(unsafe_code)]

use std::marker::PhantomData;

use crate::ids::{Pid, RemoteAddr, Tid};
use crate::wait::{last_errno, wait_tid, WaitEvent};
use rustix::io::Errno;

pub use crate::freeze::{FreezeError, SeizedProcess, SeizedTree};
pub use crate::regs::{restart, Regs, RestartFixup, SigSet};
pub use crate::xsave::{Xsave, XsaveComponent, XsaveLayout, FXSAVE_SIZE};

const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const NT_X86_XSTATE: usize = 0x202;
/// The largest xsave area we accept (AMX tiles need ~11 KiB).
const XSAVE_MAX: usize = 64 * 1024;
/// The xstate regset's size on this machine, once a first read told it (0 before).
static XSAVE_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub(crate) const PTRACE_EVENT_STOP: i32 = 128;
pub(crate) const PTRACE_EVENT_CLONE: i32 = 3;

bitflags::bitflags! {
    /// `PTRACE_O_*` options given at seize time.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SeizeOptions: u32 {
        /// Syscall stops report `SIGTRAP | 0x80`.
        const TRACESYSGOOD = 0x1;
        /// Auto-attach children created by fork.
        const TRACEFORK = 0x2;
        /// Auto-attach children created by vfork.
        const TRACEVFORK = 0x4;
        /// Auto-attach threads and children created by clone; stop at `PTRACE_EVENT_CLONE`.
        const TRACECLONE = 0x8;
        /// Stop at exec.
        const TRACEEXEC = 0x10;
        /// Stop before exit.
        const TRACEEXIT = 0x40;
        /// SIGKILL the tracee if the tracer exits: only for restore, never for dump.
        const EXITKILL = 0x10_0000;
        /// Injected syscalls bypass the tracee's seccomp filter (needs CAP_SYS_ADMIN).
        const SUSPEND_SECCOMP = 0x20_0000;
    }
}

impl SeizeOptions {
    /// For dumping: the target's seccomp filter must not see our syscalls, and
    /// our death must not kill it.
    pub const DUMP: SeizeOptions = SeizeOptions::SUSPEND_SECCOMP.union(SeizeOptions::TRACESYSGOOD);
    /// For restoring: new threads are caught at their clone event, and the
    /// half-built tree dies with us.
    pub const RESTORE: SeizeOptions = SeizeOptions::SUSPEND_SECCOMP
        .union(SeizeOptions::TRACESYSGOOD)
        .union(SeizeOptions::TRACECLONE)
        .union(SeizeOptions::EXITKILL);
}

/// A failed ptrace request or wait on one thread.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PtraceError {
    /// A ptrace request failed.
    #[error("tid {tid}: ptrace {op}")]
    Ptrace {
        tid: Tid,
        op: &'static str,
        #[source]
        errno: Errno,
    },
    /// `waitpid` failed.
    #[error("tid {tid}: waitpid")]
    Wait {
        tid: Tid,
        #[source]
        errno: Errno,
    },
    /// The thread exited while we waited for it to stop.
    #[error("tid {tid} exited with status {code} while traced")]
    Exited { tid: Tid, code: i32 },
    /// The thread was killed while we waited for it to stop.
    #[error("tid {tid} was killed by signal {signal} while traced")]
    Killed { tid: Tid, signal: i32 },
    /// A request that needs `PTRACE_SEIZE` on a thread attached otherwise.
    #[error("tid {tid}: {op} needs a PTRACE_SEIZE attachment")]
    NotSeized { tid: Tid, op: &'static str },
    /// An xsave area whose size the kernel rejects or that we cannot use.
    #[error("tid {tid}: xsave area of {len} bytes (kernel's is {expected})")]
    XsaveSize {
        tid: Tid,
        len: usize,
        expected: usize,
    },
    /// The thread's first stop after attaching was not the expected one.
    #[error("tid {tid}: unexpected stop (signal {sig}, event {event}) while {doing}")]
    UnexpectedStop {
        tid: Tid,
        sig: i32,
        event: i32,
        doing: &'static str,
    },
}

/// Where a thread is, as far as its tracer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopState {
    /// Resumed; its next stop has not been collected.
    Running,
    /// In a ptrace-stop: `event` is the `PTRACE_EVENT_*` (0 for a
    /// signal-delivery-stop), `sig` the stop signal.
    Stopped { sig: i32, event: i32 },
}

/// How the thread is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// `PTRACE_SEIZE`: `PTRACE_INTERRUPT` and `PTRACE_EVENT_STOP` available.
    Seized,
    /// `PTRACE_TRACEME` in a child we forked, or a thread auto-attached from
    /// such a tracee: stops are classic signal stops.
    Traced,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: a thread's registered rseq area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the `struct rseq` in the thread's memory.
    pub addr: RemoteAddr,
    /// Registered length.
    pub len: u32,
    /// Abort signature.
    pub sig: u32,
    /// Registration flags.
    pub flags: u32,
}

/// One seccomp filter of a thread, from `PTRACE_SECCOMP_GET_FILTER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompFilter {
    /// The classic BPF program: 8-byte `struct sock_filter` instructions.
    pub insns: Vec<u8>,
    /// `SECCOMP_FILTER_FLAG_*` from `PTRACE_SECCOMP_GET_METADATA` (LOG is the one kept).
    pub flags: u64,
}

/// A summary of `PTRACE_GET_SYSCALL_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallInfo {
    /// Not stopped at a syscall.
    None,
    /// At syscall entry (or a seccomp stop).
    Entry { nr: u64, args: [u64; 6] },
    /// At syscall exit.
    Exit { rval: i64, is_error: bool },
}

/// Requests that take no pointer: addr and data are plain integers.
#[derive(Clone, Copy)]
enum PlainRequest {
    Seize,
    Interrupt,
    Cont,
    SingleStep,
    Detach,
    SetOptions,
}

impl PlainRequest {
    fn code(self) -> libc::c_uint {
        match self {
            PlainRequest::Seize => libc::PTRACE_SEIZE,
            PlainRequest::Interrupt => libc::PTRACE_INTERRUPT,
            PlainRequest::Cont => libc::PTRACE_CONT,
            PlainRequest::SingleStep => libc::PTRACE_SINGLESTEP,
            PlainRequest::Detach => libc::PTRACE_DETACH,
            PlainRequest::SetOptions => libc::PTRACE_SETOPTIONS,
        }
    }
}

fn ptrace_plain(req: PlainRequest, tid: Tid, addr: usize, data: usize) -> Result<(), Errno> {
    // SAFETY: `PlainRequest` only holds requests whose addr and data are
    // integers (options, signal numbers), never dereferenced by the kernel.
    let ret = unsafe { libc::ptrace(req.code(), tid.as_raw(), addr, data) };
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn signal_data(sig: i32) -> usize {
    usize::try_from(sig).unwrap_or(0)
}

/// One thread under our ptrace control.
pub struct Tracee {
    tid: Tid,
    tgid: Pid,
    kind: AttachKind,
    options: SeizeOptions,
    state: StopState,
    /// Signals that arrived while an injected syscall ran; sent again on detach.
    pub(crate) deferred_signals: Vec<i32>,
    /// Registers and mask to put back if an injection was cut short.
    pub(crate) injection_saved: Option<(Regs, SigSet)>,
    /// A batch of injections is open: registers and mask are saved in
    /// `injection_saved` and every signal is blocked until it ends.
    pub(crate) in_batch: bool,
    group_stop: Option<i32>,
    pub(crate) syscall_insn: Option<RemoteAddr>,
    detached: bool,
    _bound_to_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for Tracee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracee")
            .field("tid", &self.tid)
            .field("tgid", &self.tgid)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Tracee {
    /// `PTRACE_SEIZE` on `tid` (which belongs to process `tgid`); the thread keeps
    /// running. Call [`Tracee::interrupt`] to stop it.
    pub fn seize(tgid: Pid, tid: Tid, options: SeizeOptions) -> Result<Tracee, PtraceError> {
        ptrace_plain(
            PlainRequest::Seize,
            tid,
            0,
            usize::try_from(options.bits()).unwrap_or(0),
        )
        .map_err(|errno| PtraceError::Ptrace {
            tid,
            op: "seize",
            errno,
        })?;
        Ok(Tracee::new(
            tgid,
            tid,
            AttachKind::Seized,
            options,
            StopState::Running,
        ))
    }

    /// `PTRACE_SEIZE` then `PTRACE_INTERRUPT`: returns with the thread in a
    /// `PTRACE_EVENT_STOP`. Signals that arrive meanwhile are delivered, not lost.
    pub fn seize_and_interrupt(
        tgid: Pid,
        tid: Tid,
        options: SeizeOptions,
    ) -> Result<Tracee, PtraceError> {
        let mut t = Tracee::seize(tgid, tid, options)?;
        t.interrupt()?;
        Ok(t)
    }

    /// Takes over a child we forked that called [`crate::spawn::stop_self_for_tracer`]
    /// (`PTRACE_TRACEME` + `SIGSTOP`): waits for that stop, then sets `options`.
    /// The pending SIGSTOP is suppressed when the thread next resumes.
    pub fn from_stopped_child(pid: Pid, options: SeizeOptions) -> Result<Tracee, PtraceError> {
        let tid = pid.leader();
        let mut t = Tracee::new(pid, tid, AttachKind::Traced, options, StopState::Running);
        match t.wait_stop()? {
            (libc::SIGSTOP, 0) => {}
            (sig, event) => {
                return Err(PtraceError::UnexpectedStop {
                    tid,
                    sig,
                    event,
                    doing: "waiting for a forked child's SIGSTOP",
                })
            }
        }
        ptrace_plain(
            PlainRequest::SetOptions,
            tid,
            0,
            usize::try_from(options.bits()).unwrap_or(0),
        )
        .map_err(|errno| PtraceError::Ptrace {
            tid,
            op: "setoptions",
            errno,
        })?;
        // A signal-delivery-stop resumed with signal 0 drops the signal: the
        // child's SIGSTOP is ours, not the restored program's.
        t.state = StopState::Stopped {
            sig: libc::SIGSTOP,
            event: 0,
        };
        Ok(t)
    }

    /// Waits until process `pid` (a restore child running
    /// [`crate::spawn::pause_for_tracer`]) blocks in `pause()`, as
    /// `/proc/PID/syscall` shows, then seizes and interrupts it. Gives up after
    /// `timeout` with `Ptrace { op: "wait for pause()", errno: ETIMEDOUT }`.
    pub fn seize_paused(
        pid: Pid,
        options: SeizeOptions,
        timeout: std::time::Duration,
    ) -> Result<Tracee, PtraceError> {
        let tid = pid.leader();
        let path = format!("/proc/{pid}/syscall");
        let pause_nr = libc::SYS_pause.to_string();
        let start = std::time::Instant::now();
        loop {
            match std::fs::read_to_string(&path) {
                Ok(text) if text.split(' ').next() == Some(pause_nr.as_str()) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(PtraceError::Ptrace {
                        tid,
                        op: "read /proc/PID/syscall",
                        errno: Errno::from_io_error(&e).unwrap_or(Errno::SRCH),
                    })
                }
            }
            if start.elapsed() > timeout {
                return Err(PtraceError::Ptrace {
                    tid,
                    op: "wait for pause()",
                    errno: Errno::TIMEDOUT,
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Tracee::seize_and_interrupt(pid, tid, options)
    }

    /// A thread auto-attached through `PTRACE_O_TRACECLONE`, which the kernel
    /// attached in the same way as its creator.
    pub(crate) fn auto_attached(tgid: Pid, tid: Tid, parent: &Tracee) -> Tracee {
        Tracee::new(tgid, tid, parent.kind, parent.options, StopState::Running)
    }

    fn new(
        tgid: Pid,
        tid: Tid,
        kind: AttachKind,
        options: SeizeOptions,
        state: StopState,
    ) -> Tracee {
        Tracee {
            tid,
            tgid,
            kind,
            options,
            state,
            deferred_signals: Vec::new(),
            injection_saved: None,
            in_batch: false,
            group_stop: None,
            syscall_insn: None,
            detached: false,
            _bound_to_thread: PhantomData,
        }
    }

    /// This thread's id.
    pub fn tid(&self) -> Tid {
        self.tid
    }

    /// The process (thread group) it belongs to.
    pub fn pid(&self) -> Pid {
        self.tgid
    }

    /// How it is attached.
    pub fn attach_kind(&self) -> AttachKind {
        self.kind
    }

    /// The options it was attached with.
    pub fn options(&self) -> SeizeOptions {
        self.options
    }

    /// The last stop collected, or `Running`.
    pub fn stop_state(&self) -> StopState {
        self.state
    }

    /// Whether the thread is in a ptrace-stop we collected.
    pub fn is_stopped(&self) -> bool {
        matches!(self.state, StopState::Stopped { .. })
    }

    /// Whether the thread is stopped inside the kernel's signal delivery: in a
    /// signal-delivery-stop (our tracees never take syscall-stops: there is no
    /// `PTRACE_SYSCALL` here), or in the `PTRACE_EVENT_STOP` of a group-stop or of
    /// [`Tracee::interrupt`]. Let go from there, the thread passes the kernel's
    /// syscall-restart step on its way back to user space, with the registers it has then.
    pub fn stopped_in_signal_delivery(&self) -> bool {
        match self.state {
            StopState::Stopped { event, .. } => event == 0 || event == PTRACE_EVENT_STOP,
            StopState::Running => false,
        }
    }

    /// The thread was in a group-stop (job control: SIGSTOP, SIGTSTP...) when
    /// [`Tracee::interrupt`] stopped it; it returns to it on detach. Stays true
    /// across later injections.
    pub fn in_group_stop(&self) -> bool {
        self.group_stop.is_some()
    }

    /// The signal of the group-stop the thread was in when interrupted.
    pub fn group_stop_signal(&self) -> Option<i32> {
        self.group_stop
    }

    /// `PTRACE_INTERRUPT` and wait for the `PTRACE_EVENT_STOP`. Signal-delivery
    /// stops seen on the way are passed on to the thread; the interrupt stays
    /// pending across them.
    pub fn interrupt(&mut self) -> Result<(), PtraceError> {
        if self.kind != AttachKind::Seized {
            return Err(PtraceError::NotSeized {
                tid: self.tid,
                op: "interrupt",
            });
        }
        if self.is_stopped() {
            return Ok(());
        }
        ptrace_plain(PlainRequest::Interrupt, self.tid, 0, 0).map_err(|errno| {
            PtraceError::Ptrace {
                tid: self.tid,
                op: "interrupt",
                errno,
            }
        })?;
        loop {
            let (sig, event) = self.wait_stop()?;
            if event == PTRACE_EVENT_STOP {
                // The interrupt reports SIGTRAP; a job-control stop its own signal.
                self.group_stop = matches!(
                    sig,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                )
                .then_some(sig);
                return Ok(());
            }
            // A signal-delivery-stop (even SIGTRAP: we are not stepping yet):
            // deliver it as if we were not here. Other events (clone, exec)
            // are resumed without a signal.
            let pass = if event == 0 { sig } else { 0 };
            self.resume(PlainRequest::Cont, pass, "cont")?;
        }
    }

    /// Waits (`waitpid(__WALL)`) for the next stop of a thread resumed with
    /// [`Tracee::cont`]; an exit or kill is an error.
    pub fn wait_for_stop(&mut self) -> Result<StopState, PtraceError> {
        self.wait_stop()?;
        Ok(self.state)
    }

    /// Waits for the next stop of this thread; returns `(sig, event)`.
    pub(crate) fn wait_stop(&mut self) -> Result<(i32, i32), PtraceError> {
        let tid = self.tid;
        match wait_tid(tid).map_err(|errno| PtraceError::Wait { tid, errno })? {
            WaitEvent::Stopped { sig, event } => {
                self.state = StopState::Stopped { sig, event };
                Ok((sig, event))
            }
            WaitEvent::Exited(code) => {
                self.detached = true;
                Err(PtraceError::Exited { tid, code })
            }
            WaitEvent::Signaled(signal) => {
                self.detached = true;
                Err(PtraceError::Killed { tid, signal })
            }
        }
    }

    fn resume(&mut self, req: PlainRequest, sig: i32, op: &'static str) -> Result<(), PtraceError> {
        ptrace_plain(req, self.tid, 0, signal_data(sig)).map_err(|errno| PtraceError::Ptrace {
            tid: self.tid,
            op,
            errno,
        })?;
        self.state = StopState::Running;
        Ok(())
    }

    /// `PTRACE_CONT`, delivering `sig` if the thread is in a signal-delivery-stop.
    pub fn cont(&mut self, sig: Option<i32>) -> Result<(), PtraceError> {
        self.resume(PlainRequest::Cont, sig.unwrap_or(0), "cont")
    }

    /// `PTRACE_SINGLESTEP` and wait for the next stop; returns `(sig, event)`.
    pub(crate) fn single_step(&mut self, sig: i32) -> Result<(i32, i32), PtraceError> {
        self.resume(PlainRequest::SingleStep, sig, "singlestep")?;
        self.wait_stop()
    }

    /// `PTRACE_GETEVENTMSG`: the new tid at a clone event, the exit status at exit...
    pub(crate) fn event_msg(&self) -> Result<u64, PtraceError> {
        let mut msg: libc::c_ulong = 0;
        // SAFETY: the kernel writes one unsigned long into `msg`, a live local.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETEVENTMSG,
                self.tid.as_raw(),
                0usize,
                &mut msg as *mut libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(self.err("geteventmsg"));
        }
        Ok(msg)
    }

    fn err(&self, op: &'static str) -> PtraceError {
        PtraceError::Ptrace {
            tid: self.tid,
            op,
            errno: last_errno(),
        }
    }

    /// `PTRACE_GETREGS`: the general-purpose registers, fs_base and gs_base.
    pub fn get_regs(&self) -> Result<Regs, PtraceError> {
        let mut raw = std::mem::MaybeUninit::<libc::user_regs_struct>::zeroed();
        // SAFETY: `raw` has room for the one user_regs_struct the kernel writes.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGS,
                self.tid.as_raw(),
                0usize,
                raw.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(self.err("getregs"));
        }
        // SAFETY: zero-initialised plain integers, then filled by the kernel.
        let raw = unsafe { raw.assume_init() };
        Ok(Regs::from(raw))
    }

    /// `PTRACE_SETREGS`.
    pub fn set_regs(&mut self, regs: &Regs) -> Result<(), PtraceError> {
        let raw = libc::user_regs_struct::from(*regs);
        // SAFETY: the kernel reads one user_regs_struct from `raw`, a live local.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGS,
                self.tid.as_raw(),
                0usize,
                &raw as *const libc::user_regs_struct,
            )
        };
        if ret < 0 {
            return Err(self.err("setregs"));
        }
        Ok(())
    }

    /// `PTRACE_GETREGSET` with `NT_X86_XSTATE`: the xsave area, sized by the kernel.
    pub fn get_xsave(&self) -> Result<Xsave, PtraceError> {
        // The regset's size is the kernel's largest xstate, the same for every task: learnt
        // once. A fresh zeroed 64 KiB buffer for each call costs its page faults, tens of
        // microseconds in a VM, where the call itself takes one or two.
        let known = XSAVE_LEN.load(std::sync::atomic::Ordering::Relaxed);
        let mut buf = vec![0u8; if known == 0 { XSAVE_MAX } else { known }];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, which outlives the call; the kernel
        // writes at most `iov_len` bytes there and shrinks `iov_len` to match.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE,
                &mut iov as *mut libc::iovec,
            )
        };
        if ret < 0 {
            return Err(self.err("getregset(NT_X86_XSTATE)"));
        }
        let len = iov.iov_len.min(XSAVE_MAX);
        if known == 0 {
            XSAVE_LEN.store(len, std::sync::atomic::Ordering::Relaxed);
        }
        buf.truncate(len);
        Ok(Xsave::from_bytes(buf))
    }

    /// `PTRACE_SETREGSET` with `NT_X86_XSTATE`. The kernel validates the header
    /// and rejects components this CPU lacks. An area from another kernel whose
    /// xstate size differs is fitted to this one: cut if longer (the kernel
    /// would ignore the tail), zero-padded if shorter (components past the end
    /// are then not in `xstate_bv` and load their initial state).
    pub fn set_xsave(&mut self, xsave: &Xsave) -> Result<(), PtraceError> {
        let kernel_len = self.get_xsave()?.len();
        let mut bytes = xsave.as_bytes().to_vec();
        if bytes.len() < FXSAVE_SIZE + 64 {
            return Err(PtraceError::XsaveSize {
                tid: self.tid,
                len: bytes.len(),
                expected: kernel_len,
            });
        }
        bytes.resize(kernel_len, 0);
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: `iov` describes `bytes`, which outlives the call; the kernel only reads it.
        let ret = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE,
                &mut iov as *mut libc::iovec,
            )
        };
        if ret < 0 {
            return Err(self.err("setregset(NT_X86_XSTATE)"));
        }
        Ok(())
    }

    /// `PTRACE_GETSIGMASK`: the blocked signals.
    pub fn get_sigmask(&self) -> Result<SigSet, PtraceError> {
        let mut mask: u64 = 0;
        // SAFETY: addr is the size (8) of the u64 `mask` the kernel writes.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GETSIGMASK,
                self.tid.as_raw(),
                std::mem::size_of::<u64>(),
                &mut mask as *mut u64,
            )
        };
        if ret < 0 {
            return Err(self.err("getsigmask"));
        }
        Ok(SigSet(mask))
    }

    /// `PTRACE_SETSIGMASK`.
    pub fn set_sigmask(&mut self, mask: SigSet) -> Result<(), PtraceError> {
        let raw: u64 = mask.0;
        // SAFETY: addr is the size (8) of the u64 the kernel reads from `raw`.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_SETSIGMASK,
                self.tid.as_raw(),
                std::mem::size_of::<u64>(),
                &raw as *const u64,
            )
        };
        if ret < 0 {
            return Err(self.err("setsigmask"));
        }
        Ok(())
    }

    /// `PTRACE_PEEKSIGINFO`: the queued signals, without dequeuing them. `shared`
    /// selects the process-wide queue instead of this thread's. Each entry is a
    /// raw 128-byte `siginfo_t`.
    pub fn peek_siginfo(&self, shared: bool) -> Result<Vec<[u8; 128]>, PtraceError> {
        const BATCH: usize = 32;
        #[repr(C)]
        struct PeekArgs {
            off: u64,
            flags: u32,
            nr: i32,
        }
        let mut out = Vec::new();
        loop {
            let args = PeekArgs {
                off: u64::try_from(out.len()).unwrap_or(u64::MAX),
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: 32,
            };
            let mut buf = [[0u8; 128]; BATCH];
            // SAFETY: `args` is a live ptrace_peeksiginfo_args; `buf` has room for
            // `nr` (32) siginfo_t of 128 bytes each.
            let ret = unsafe {
                libc::ptrace(
                    PTRACE_PEEKSIGINFO,
                    self.tid.as_raw(),
                    &args as *const PeekArgs,
                    buf.as_mut_ptr(),
                )
            };
            if ret < 0 {
                return Err(self.err("peeksiginfo"));
            }
            let n = usize::try_from(ret).unwrap_or(0).min(BATCH);
            out.extend_from_slice(&buf[..n]);
            if n < BATCH {
                return Ok(out);
            }
        }
    }

    /// `PTRACE_GET_RSEQ_CONFIGURATION`: the thread's rseq registration, if any.
    pub fn rseq_config(&self) -> Result<Option<RseqConfig>, PtraceError> {
        #[repr(C)]
        #[derive(Default)]
        struct RawRseq {
            rseq_abi_pointer: u64,
            rseq_abi_size: u32,
            signature: u32,
            flags: u32,
            pad: u32,
        }
        let mut raw = RawRseq::default();
        // SAFETY: addr is the size of `raw`, a live local the kernel fills.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid.as_raw(),
                std::mem::size_of::<RawRseq>(),
                &mut raw as *mut RawRseq,
            )
        };
        if ret < 0 {
            return Err(self.err("get_rseq_configuration"));
        }
        Ok((raw.rseq_abi_pointer != 0).then_some(RseqConfig {
            addr: RemoteAddr(raw.rseq_abi_pointer),
            len: raw.rseq_abi_size,
            sig: raw.signature,
            flags: raw.flags,
        }))
    }

    /// `PTRACE_SECCOMP_GET_FILTER` for index 0.. until `ENOENT`, with each
    /// filter's flags. Index 0 is the oldest filter: install them in order.
    /// Empty if the thread has no filter.
    pub fn seccomp_filters(&self) -> Result<Vec<SeccompFilter>, PtraceError> {
        let mut filters = Vec::new();
        for index in 0usize.. {
            // SAFETY: a null data pointer makes the kernel only count instructions.
            let count = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.tid.as_raw(),
                    index,
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            if count < 0 {
                let errno = last_errno();
                // ENOENT: past the last filter. EINVAL at index 0: not in filter mode.
                if errno == Errno::NOENT || (index == 0 && errno == Errno::INVAL) {
                    return Ok(filters);
                }
                return Err(PtraceError::Ptrace {
                    tid: self.tid,
                    op: "seccomp_get_filter",
                    errno,
                });
            }
            let n = usize::try_from(count).unwrap_or(0);
            let mut insns = vec![0u8; n.saturating_mul(8)];
            // SAFETY: `insns` has room for the `n` 8-byte sock_filter entries the
            // kernel just reported for this same filter (filters are immutable).
            let got = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_FILTER,
                    self.tid.as_raw(),
                    index,
                    insns.as_mut_ptr(),
                )
            };
            if got < 0 {
                return Err(self.err("seccomp_get_filter"));
            }
            #[repr(C)]
            struct Metadata {
                filter_off: u64,
                flags: u64,
            }
            let mut meta = Metadata {
                filter_off: u64::try_from(index).unwrap_or(u64::MAX),
                flags: 0,
            };
            // SAFETY: addr is the size of `meta`, a live local the kernel reads
            // `filter_off` from and writes `flags` into.
            let ret = unsafe {
                libc::ptrace(
                    PTRACE_SECCOMP_GET_METADATA,
                    self.tid.as_raw(),
                    std::mem::size_of::<Metadata>(),
                    &mut meta as *mut Metadata,
                )
            };
            if ret < 0 {
                return Err(self.err("seccomp_get_metadata"));
            }
            filters.push(SeccompFilter {
                insns,
                flags: meta.flags,
            });
        }
        Ok(filters)
    }

    /// `PTRACE_GET_SYSCALL_INFO`: where the thread is relative to a syscall.
    pub fn syscall_info(&self) -> Result<SyscallInfo, PtraceError> {
        // struct ptrace_syscall_info: op u8, pad, arch u32, ip u64, sp u64, then a union.
        let mut buf = [0u64; 12];
        // SAFETY: addr is the size of `buf` (96 bytes), which the kernel fills at most.
        let ret = unsafe {
            libc::ptrace(
                PTRACE_GET_SYSCALL_INFO,
                self.tid.as_raw(),
                std::mem::size_of_val(&buf),
                buf.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(self.err("get_syscall_info"));
        }
        let op = buf[0].to_le_bytes()[0];
        Ok(match op {
            1 | 3 => SyscallInfo::Entry {
                nr: buf[3],
                args: [buf[4], buf[5], buf[6], buf[7], buf[8], buf[9]],
            },
            2 => SyscallInfo::Exit {
                rval: i64::from_ne_bytes(buf[3].to_ne_bytes()),
                is_error: buf[4].to_le_bytes()[0] != 0,
            },
            _ => SyscallInfo::None,
        })
    }

    /// Puts back anything an interrupted injection left behind and re-sends the
    /// signals that arrived while it ran. Best effort: used on the way out.
    fn settle(&mut self) {
        self.in_batch = false;
        if let Some((regs, mask)) = self.injection_saved.take() {
            if let Err(e) = self.set_regs(&regs) {
                tracing::warn!(tid = %self.tid, error = %e, "could not restore registers after injection");
            }
            if let Err(e) = self.set_sigmask(mask) {
                tracing::warn!(tid = %self.tid, error = %e, "could not restore signal mask after injection");
            }
        }
    }

    fn requeue_deferred(&mut self) {
        for sig in std::mem::take(&mut self.deferred_signals) {
            // SAFETY: tgkill takes only integers.
            let ret = unsafe {
                libc::syscall(libc::SYS_tgkill, self.tgid.as_raw(), self.tid.as_raw(), sig)
            };
            if ret < 0 {
                tracing::warn!(tid = %self.tid, sig, errno = %last_errno(), "could not re-send a deferred signal");
            }
        }
    }

    /// `PTRACE_DETACH`: the thread runs on (or returns to its group-stop).
    pub fn detach(mut self) -> Result<(), PtraceError> {
        self.detach_inner(0)
    }

    /// `PTRACE_DETACH` delivering `sig` if the thread is in a signal-delivery-stop.
    pub fn detach_with_signal(mut self, sig: i32) -> Result<(), PtraceError> {
        self.detach_inner(sig)
    }

    fn detach_inner(&mut self, sig: i32) -> Result<(), PtraceError> {
        if self.detached {
            return Ok(());
        }
        self.settle();
        if !self.is_stopped() && self.kind == AttachKind::Seized {
            // PTRACE_DETACH needs a stopped tracee.
            self.interrupt()?;
        }
        self.detached = true;
        ptrace_plain(PlainRequest::Detach, self.tid, 0, signal_data(sig)).map_err(|errno| {
            PtraceError::Ptrace {
                tid: self.tid,
                op: "detach",
                errno,
            }
        })?;
        self.requeue_deferred();
        Ok(())
    }

    pub(crate) fn set_stopped(&mut self, state: StopState) {
        self.state = state;
    }

    /// Marks the thread as gone (killed or reaped elsewhere) so drop does not detach.
    pub(crate) fn forget(&mut self) {
        self.detached = true;
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Err(e) = self.detach_inner(0) {
            // ESRCH: the thread is gone, nothing to resume.
            tracing::warn!(tid = %self.tid, error = %e, "detach on drop failed");
        }
    }
}
