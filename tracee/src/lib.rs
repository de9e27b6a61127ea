//! A process under ckpt's control, reached from outside: ptrace seize and
//! interrupt, registers and the xsave area, syscall injection, remote memory,
//! `/proc` parsing, pidfds, `PAGEMAP_SCAN`, userfaultfd and `clone3` with
//! `set_tid`.
//!
//! Every unsafe block of ckpt lives in this crate. Modules that need one opt in
//! with `#![allow(unsafe_code)]`; each block does one unsafe thing and says why
//! it is sound. The target's memory is not ours: writing it cannot corrupt
//! ckpt, so those operations are safe functions named for the danger to the
//! target (`write_remote`).
//!
//! The usual sequence, as a dump runs it:
//!
//! ```no_run
//! use tracee::{Pid, RemoteScratch, SeizeOptions, SeizedProcess};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pid = Pid::try_from(4242)?;
//! // Every thread stopped; dropping `frozen` on an early return resumes them.
//! let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP)?;
//! let leader = frozen.leader_mut().expect("a frozen process has a thread");
//! let regs = leader.get_regs()?;
//! let _pin = leader.pin_tracer()?; // both on one CPU: ~10 µs per injected syscall, not ~50
//! let scratch = RemoteScratch::map(leader, 4096)?;
//! leader.syscall(libc::SYS_prctl, [libc::PR_GET_NAME as u64, scratch.addr().get(), 0, 0, 0, 0])?;
//! let mut name = [0u8; 16];
//! scratch.read(0, &mut name)?;
//! scratch.release(leader)?;
//! let maps = tracee::proc::maps::read(pid)?;
//! # let _ = (regs, maps);
//! frozen.resume()?; // or .kill(), or .leave_stopped()
//! # Ok(())
//! # }
//! ```
//!
//! | module | kernel mechanism |
//! |---|---|
//! | [`ptrace`] | `PTRACE_SEIZE`/`INTERRUPT`, registers, xsave, signal mask, pending signals, rseq, seccomp filters; [`SeizedProcess`] freezes a thread group, [`SeizedTree`] a process tree |
//! | [`inject`] | syscalls run in a stopped thread by single-stepping a `syscall` instruction; [`RemoteScratch`] pages |
//! | [`ipc`] | SysV IPC from our side: `shmctl(IPC_RMID)` |
//! | [`memory`] | `process_vm_readv`/`writev`, `/proc/PID/mem` |
//! | [`proc`] | `/proc` parsers: maps, smaps, stat, status, auxv, tasks, children, fds, fdinfo, limits, timers, mountinfo |
//! | [`procmap`] | the `PROCMAP_QUERY` ioctl (6.11+) |
//! | [`pagemap_scan`] | `PAGEMAP_SCAN` (6.7+) and raw pagemap entries |
//! | [`spawn`] | `clone3` with `set_tid`: processes from here, threads by injection |
//! | [`pidfd`] | `pidfd_open`, `pidfd_getfd`, `kcmp` |
//! | [`sockdiag`] | `NETLINK_SOCK_DIAG` `unix_diag`, socket options, `SIOCUNIXFILE` |
//! | [`inetdiag`] | `NETLINK_SOCK_DIAG` `inet_diag`: TCP listeners' backlog and accept queue |
//! | [`taskinfo`] | robust list, scheduling, affinity, I/O priority, rlimits, from outside |
//! | [`uffd`] | userfaultfd: lazy pages and async write-protect tracking |
//! | [`vdso`] | the vDSO's symbols and ELF build-ids |
//! | [`cpu`] | pinning the tracer next to its tracee |
//! | [`heap`] | our own heap keeping what it frees, for the freezes' allocations |
//! | [`kernel`] | [`KernelFeatures`], probed once |
#![deny(unsafe_code)]

pub mod cpu;
pub mod dirty;
mod freeze;
pub mod heap;
pub mod ids;
pub mod inetdiag;
pub mod inject;
pub mod ipc;
pub mod kernel;
pub mod kobj;
pub mod memory;
pub mod pagemap_scan;
pub mod pidfd;
pub mod proc;
pub mod procmap;
pub mod ptrace;
mod regs;
pub mod sockdiag;
pub mod spawn;
pub mod taskinfo;
pub mod uffd;
pub mod vdso;
mod wait;
mod xsave;

pub use cpu::{CpuPin, IdleTimes, PairPin};
pub use ids::{InvalidId, Pid, RemoteAddr, TargetFd, Tid};
pub use inject::{InjectError, RemoteScratch};
pub use kernel::KernelFeatures;
pub use memory::{MemoryError, RemoteMem, RemoteRange};
pub use pidfd::PidFd;
pub use proc::ProcError;
pub use ptrace::{
    AttachKind, FreezeError, PtraceError, Regs, RestartFixup, RseqConfig, SeccompFilter,
    SeizeOptions, SeizedProcess, SeizedTree, SigSet, StopState, SyscallInfo, Tracee, Xsave,
    XsaveComponent, XsaveLayout,
};
/// Error numbers as the kernel returns them; unknown values are kept.
pub use rustix::io::Errno;

/// Size of a page on x86_64; the only page size ckpt handles.
pub const PAGE_SIZE: u64 = 4096;

pub mod syscall_watch;
pub use syscall_watch::{SyscallWatch, WatchError};
