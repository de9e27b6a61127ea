//! Running syscalls inside a stopped thread, with no code injected.
//!
//! The thread's registers are saved, every signal but SIGTRAP is blocked with
//! `PTRACE_SETSIGMASK` for the window, `rip` points at a `syscall` instruction
//! that already exists in the target (its `[vdso]`, or a helper page during
//! restore), `orig_rax = -1` keeps the kernel's syscall-restart logic off our
//! registers, and one `PTRACE_SINGLESTEP` runs the instruction. The single-step
//! trap is swallowed; any other signal that stops the thread meanwhile is
//! re-sent when the thread is detached, so it stays pending for the program.
//! Registers and mask are put back after every call.
#![allow(unsafe_code)]

use crate::ids::{Pid, RemoteAddr, Tid};
use crate::memory::{self, MemoryError};
use crate::proc::{self, ProcError};
use crate::ptrace::{PtraceError, Regs, SigSet, Tracee, PTRACE_EVENT_STOP};
use crate::PAGE_SIZE;
use rustix::io::Errno;

/// The `syscall` instruction: `0f 05`.
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
/// Single steps we allow before deciding the instruction never completes.
const MAX_STEPS: usize = 64;
/// The mask during injections: every signal but SIGTRAP. The kernel sends the single-step
/// trap with `force_sig`, which resets the program's SIGTRAP handler to `SIG_DFL` when the
/// signal is blocked: blocking it would change what the program does on its next SIGTRAP
/// (and what a dump reads of its handlers).
const INJECTION_MASK: SigSet = SigSet(!(1 << (libc::SIGTRAP - 1)));

/// An injected syscall that could not run, or ran and failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// A ptrace request failed while injecting.
    #[error("tid {tid}: injecting syscall {nr}")]
    Ptrace {
        tid: Tid,
        nr: i64,
        #[source]
        source: PtraceError,
    },
    /// The syscall ran and returned an error.
    #[error("tid {tid}: injected syscall {nr} failed")]
    Failed {
        tid: Tid,
        nr: i64,
        #[source]
        errno: Errno,
    },
    /// The thread is running: stop it first.
    #[error("tid {tid}: not stopped, cannot inject syscall {nr}")]
    NotStopped { tid: Tid, nr: i64 },
    /// No `syscall` instruction could be found in the target's `[vdso]`.
    #[error("tid {tid}: no syscall instruction in its [vdso] (give one with set_syscall_insn)")]
    NoSyscallInsn { tid: Tid },
    /// Reading the maps while looking for a `syscall` instruction.
    #[error("tid {tid}: looking for a syscall instruction")]
    FindInsnMaps {
        tid: Tid,
        #[source]
        source: ProcError,
    },
    /// Reading the vdso text while looking for a `syscall` instruction.
    #[error("tid {tid}: looking for a syscall instruction")]
    FindInsnMemory {
        tid: Tid,
        #[source]
        source: MemoryError,
    },
    /// Executing the instruction raised a fault (the address is not a mapped
    /// `syscall` instruction).
    #[error("tid {tid}: syscall {nr} at {insn} faulted with signal {sig}")]
    Faulted {
        tid: Tid,
        nr: i64,
        insn: RemoteAddr,
        sig: i32,
    },
    /// The instruction did not complete within a bounded number of steps.
    #[error("tid {tid}: syscall {nr} at {insn} did not complete")]
    Stuck { tid: Tid, nr: i64, insn: RemoteAddr },
    /// Access to a scratch area.
    #[error("tid {tid}: scratch memory")]
    Scratch {
        tid: Tid,
        #[source]
        source: MemoryError,
    },
    /// After a step the thread was neither before nor after the instruction.
    #[error("tid {tid}: syscall {nr} at {insn} left the thread at {rip}")]
    Strayed {
        tid: Tid,
        nr: i64,
        insn: RemoteAddr,
        rip: RemoteAddr,
    },
    /// The clone event for an injected thread did not come, or gave a bad tid.
    #[error("tid {tid}: injected clone3 of tid {want} reported tid {got}")]
    CloneTid { tid: Tid, want: Tid, got: i64 },
}

/// The `nr` of [`InjectError::Ptrace`] when saving or restoring a thread's registers and
/// signal mask around a batch, outside any one syscall.
const BATCH_STATE: i64 = -1;

/// Wraps a failed ptrace request made while injecting syscall `nr`.
fn ptrace_failed(tid: Tid, nr: i64) -> impl Fn(PtraceError) -> InjectError + Copy {
    move |source| InjectError::Ptrace { tid, nr, source }
}

impl InjectError {
    /// The errno when the syscall itself failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            InjectError::Failed { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Turns a raw return value into the value or the errno, the way libc does.
pub fn decode_return(raw: i64) -> Result<i64, Errno> {
    if (-4095..0).contains(&raw) {
        let code = i32::try_from(-raw).unwrap_or(libc::EINVAL);
        Err(Errno::from_raw_os_error(code))
    } else {
        Ok(raw)
    }
}

fn as_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

fn as_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

impl Tracee {
    /// Uses the `syscall` instruction at `addr` for injections (restore's helper
    /// page, whose vdso may not be where the process expects it).
    pub fn set_syscall_insn(&mut self, addr: RemoteAddr) {
        self.syscall_insn = Some(addr);
    }

    /// Forgets the instruction given with [`Tracee::set_syscall_insn`], so that the next
    /// injection looks for one in the target's `[vdso]` again (once the page that held it
    /// is unmapped).
    pub fn use_vdso_syscall_insn(&mut self) {
        self.syscall_insn = None;
    }

    /// The `syscall` instruction injections use: the one given with
    /// [`Tracee::set_syscall_insn`], or the first `0f 05` in the target's `[vdso]`.
    pub fn syscall_insn(&mut self) -> Result<RemoteAddr, InjectError> {
        if let Some(addr) = self.syscall_insn {
            return Ok(addr);
        }
        let addr = find_syscall_insn(self.tid())?;
        self.syscall_insn = Some(addr);
        Ok(addr)
    }

    /// Runs syscall `nr` with `args` (rdi, rsi, rdx, r10, r8, r9) in this stopped
    /// thread and returns its value; `-errno` results become
    /// [`InjectError::Failed`]. The thread's registers and signal mask are
    /// restored afterwards.
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        let raw = self.syscall_raw(nr, args)?;
        decode_return(raw).map_err(|errno| InjectError::Failed {
            tid: self.tid(),
            nr,
            errno,
        })
    }

    /// Like [`Tracee::syscall`] but returns the raw `rax`, negative errno included.
    pub fn syscall_raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
        self.run_injected(nr, args, &mut |_, _| Ok(()))
    }

    /// Starts a batch of injections: the registers and signal mask are saved
    /// and all signals blocked once, and each [`Tracee::syscall`] until
    /// [`Tracee::end_batch`] only sets the argument registers and steps (about
    /// half the ptrace calls). Registers set with `set_regs` during a batch
    /// are overwritten when it ends. Detaching or dropping ends it too.
    pub fn begin_batch(&mut self) -> Result<(), InjectError> {
        if self.in_batch {
            return Ok(());
        }
        let perr = ptrace_failed(self.tid(), BATCH_STATE);
        let regs = self.get_regs().map_err(perr)?;
        let mask = self.get_sigmask().map_err(perr)?;
        self.injection_saved = Some((regs, mask));
        self.in_batch = true;
        self.set_sigmask(INJECTION_MASK).map_err(perr)
    }

    /// Ends a batch: puts the saved registers and signal mask back.
    pub fn end_batch(&mut self) -> Result<(), InjectError> {
        if !self.in_batch {
            return Ok(());
        }
        let perr = ptrace_failed(self.tid(), BATCH_STATE);
        if let Some((regs, mask)) = self.injection_saved {
            self.set_regs(&regs).map_err(perr)?;
            self.set_sigmask(mask).map_err(perr)?;
        }
        self.injection_saved = None;
        self.in_batch = false;
        Ok(())
    }

    /// The program's own registers: during a batch the thread holds injected ones, so the
    /// registers saved when it began; otherwise `PTRACE_GETREGS`.
    pub fn program_regs(&self) -> Result<Regs, PtraceError> {
        match self.injection_saved {
            Some((regs, _)) if self.in_batch => Ok(regs),
            _ => self.get_regs(),
        }
    }

    /// The program's own signal mask: during a batch every signal is blocked, so the mask
    /// saved when it began; otherwise `PTRACE_GETSIGMASK`.
    pub fn program_sigmask(&self) -> Result<SigSet, PtraceError> {
        match self.injection_saved {
            Some((_, mask)) if self.in_batch => Ok(mask),
            _ => self.get_sigmask(),
        }
    }

    /// Core of injection. `on_event` sees every ptrace event stop
    /// (`PTRACE_EVENT_CLONE`...) with this tracee, before stepping on.
    pub(crate) fn run_injected(
        &mut self,
        nr: i64,
        args: [u64; 6],
        on_event: &mut dyn FnMut(&Tracee, i32) -> Result<(), InjectError>,
    ) -> Result<i64, InjectError> {
        let tid = self.tid();
        if !self.is_stopped() {
            return Err(InjectError::NotStopped { tid, nr });
        }
        let insn = self.syscall_insn()?;
        let perr = ptrace_failed(tid, nr);
        if self.in_batch {
            if let Some((saved_regs, _)) = self.injection_saved {
                return self.step_through(nr, args, insn, saved_regs, on_event);
            }
        }
        let saved_regs = self.get_regs().map_err(perr)?;
        let saved_mask = self.get_sigmask().map_err(perr)?;
        self.injection_saved = Some((saved_regs, saved_mask));
        let result = self
            .set_sigmask(INJECTION_MASK)
            .map_err(perr)
            .and_then(|()| self.step_through(nr, args, insn, saved_regs, on_event));
        // Put everything back even if the step failed; an error here leaves
        // `injection_saved` set so that drop tries again before detaching.
        let restore = self
            .set_regs(&saved_regs)
            .and_then(|()| self.set_sigmask(saved_mask));
        match restore {
            Ok(()) => self.injection_saved = None,
            Err(e) if result.is_ok() => return Err(perr(e)),
            Err(_) => {}
        }
        result
    }

    fn step_through(
        &mut self,
        nr: i64,
        args: [u64; 6],
        insn: RemoteAddr,
        saved: Regs,
        on_event: &mut dyn FnMut(&Tracee, i32) -> Result<(), InjectError>,
    ) -> Result<i64, InjectError> {
        let tid = self.tid();
        let perr = ptrace_failed(tid, nr);
        let regs = Regs {
            rip: insn.get(),
            rax: as_u64(nr),
            orig_rax: u64::MAX,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            r10: args[3],
            r8: args[4],
            r9: args[5],
            ..saved
        };
        self.set_regs(&regs).map_err(perr)?;
        tracing::trace!(%tid, nr, "inject");
        let after = insn.saturating_add(SYSCALL_INSN.len() as u64);
        for _ in 0..MAX_STEPS {
            let (sig, event) = self.single_step(0).map_err(perr)?;
            if event == PTRACE_EVENT_STOP {
                // A group-stop or a stale interrupt reported before the step: step again.
                continue;
            }
            if event != 0 {
                on_event(self, event)?;
                continue;
            }
            let now = self.get_regs().map_err(perr)?;
            // A SIGTRAP before the instruction ran is not our step's: the program's own,
            // pending and blocked by its mask, dequeued under ours.
            let programs_trap = sig == libc::SIGTRAP && now.rip == insn.get();
            if sig != libc::SIGTRAP || programs_trap {
                if matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL)
                    && now.rip == insn.get()
                {
                    return Err(InjectError::Faulted { tid, nr, insn, sig });
                }
                // Blocked signals cannot stop us, so this one is SIGSTOP-like:
                // it belongs to the program, which gets it again on detach.
                self.deferred_signals.push(sig);
            }
            if now.rip == after.get() {
                return Ok(as_i64(now.rax));
            }
            if now.rip != insn.get() {
                // The thread is somewhere we did not send it: stepping on
                // would run the program's code under our registers.
                return Err(InjectError::Strayed {
                    tid,
                    nr,
                    insn,
                    rip: RemoteAddr(now.rip),
                });
            }
            // Stopped before the instruction ran: step again.
        }
        Err(InjectError::Stuck { tid, nr, insn })
    }

    /// Injects `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)`.
    pub fn inject_mmap_anon(&mut self, len: u64) -> Result<RemoteAddr, InjectError> {
        let prot = as_u64(i64::from(libc::PROT_READ | libc::PROT_WRITE));
        let flags = as_u64(i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS));
        let addr = self.syscall(libc::SYS_mmap, [0, len, prot, flags, u64::MAX, 0])?;
        Ok(RemoteAddr(as_u64(addr)))
    }

    /// Injects `munmap(addr, len)`.
    pub fn inject_munmap(&mut self, addr: RemoteAddr, len: u64) -> Result<(), InjectError> {
        self.syscall(libc::SYS_munmap, [addr.get(), len, 0, 0, 0, 0])
            .map(|_| ())
    }
}

/// Finds a `syscall` instruction in `[vdso]` of `tid`.
fn find_syscall_insn(tid: Tid) -> Result<RemoteAddr, InjectError> {
    let pid = tid.as_proc_pid();
    let maps = proc::maps::read(pid).map_err(|source| InjectError::FindInsnMaps { tid, source })?;
    let vdso = maps
        .iter()
        .find(|v| v.path.as_deref() == Some("[vdso]"))
        .ok_or(InjectError::NoSyscallInsn { tid })?;
    let len = usize::try_from(vdso.end.get().saturating_sub(vdso.start.get()))
        .unwrap_or(0)
        .min(1 << 20);
    let mut text = vec![0u8; len];
    memory::read_remote(pid, vdso.start, &mut text)
        .map_err(|source| InjectError::FindInsnMemory { tid, source })?;
    text.windows(2)
        .position(|w| w == SYSCALL_INSN)
        .map(|off| vdso.start.saturating_add(off as u64))
        .ok_or(InjectError::NoSyscallInsn { tid })
}

/// Anonymous read-write pages mapped in the target by an injected `mmap`, used
/// for the in and out buffers of injected syscalls. Unmap it with
/// [`RemoteScratch::release`]; dropping it without doing so leaves the mapping
/// in the target and logs a warning.
#[derive(Debug)]
pub struct RemoteScratch {
    pid: Pid,
    tid: Tid,
    addr: RemoteAddr,
    len: u64,
    released: bool,
}

impl RemoteScratch {
    /// Maps `len` bytes (rounded up to whole pages) in the target.
    pub fn map(tracee: &mut Tracee, len: u64) -> Result<RemoteScratch, InjectError> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let addr = tracee.inject_mmap_anon(len)?;
        Ok(RemoteScratch {
            pid: tracee.pid(),
            tid: tracee.tid(),
            addr,
            len,
            released: false,
        })
    }

    /// Start of the area in the target.
    pub fn addr(&self) -> RemoteAddr {
        self.addr
    }

    /// Size of the area in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the area is empty (never, once mapped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The target address of `offset` in the area.
    pub fn at(&self, offset: u64) -> RemoteAddr {
        self.addr.saturating_add(offset)
    }

    fn check(&self, offset: u64, len: usize) -> Result<RemoteAddr, InjectError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(InjectError::Scratch {
                tid: self.tid,
                source: MemoryError::OutOfRange {
                    pid: self.pid,
                    addr: self.addr,
                    offset,
                    len,
                    size: self.len,
                },
            });
        }
        Ok(self.addr.saturating_add(offset))
    }

    /// Writes `data` at `offset` in the area.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), InjectError> {
        let at = self.check(offset, data.len())?;
        memory::write_remote_fast(self.pid, at, data).map_err(|source| InjectError::Scratch {
            tid: self.tid,
            source,
        })
    }

    /// Reads `buf.len()` bytes at `offset` in the area.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), InjectError> {
        let at = self.check(offset, buf.len())?;
        memory::read_remote(self.pid, at, buf).map_err(|source| InjectError::Scratch {
            tid: self.tid,
            source,
        })
    }

    /// Unmaps the area with an injected `munmap`.
    pub fn release(mut self, tracee: &mut Tracee) -> Result<(), InjectError> {
        self.released = true;
        tracee.inject_munmap(self.addr, self.len)
    }

    /// Keeps the area mapped in the target on purpose and returns its address.
    pub fn leak(mut self) -> RemoteAddr {
        self.released = true;
        self.addr
    }
}

impl Drop for RemoteScratch {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!(pid = %self.pid, addr = %self.addr, len = self.len,
                "scratch area dropped without release: it stays mapped in the target");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_errno_range() {
        assert_eq!(decode_return(5), Ok(5));
        assert_eq!(decode_return(-2), Err(Errno::NOENT));
        assert_eq!(decode_return(-4096), Ok(-4096));
        assert!(decode_return(-4095).is_err());
    }
}
