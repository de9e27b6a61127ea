//! The last step of each thread: every register, the signal mask, then detach.

use images_format::xsave::{self, XsaveError};
use tracee::{PtraceError, SigSet, Tid, Tracee, Xsave, XsaveLayout};

use crate::plan::ThreadPlan;

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("tid {tid}: {step}")]
    Ptrace {
        tid: Tid,
        step: &'static str,
        #[source]
        source: PtraceError,
    },
    #[error("tid {tid}: the image's FPU state does not fit this CPU")]
    Xsave {
        tid: Tid,
        #[source]
        source: XsaveError,
    },
    #[error("tid {tid}: the image uses xsave components {missing:#x} this CPU does not have")]
    MissingComponents { tid: Tid, missing: u64 },
    #[error("tid {tid}: moving it to another CPU")]
    Affinity {
        tid: Tid,
        #[source]
        source: tracee::taskinfo::TaskInfoError,
    },
}

/// The thread's xsave area with the image's FPU state in this CPU's layout.
fn xsave_area(t: &Tracee, plan: &ThreadPlan) -> Result<Xsave, ResumeError> {
    let tid = t.tid();
    let current = t.get_xsave().map_err(|source| ResumeError::Ptrace {
        tid,
        step: "reading the xsave area",
        source,
    })?;
    xsave_area_from(tid, current, plan)
}

/// `current`, the xsave area of thread `tid`, with the image's FPU state written in.
fn xsave_area_from(tid: Tid, current: Xsave, plan: &ThreadPlan) -> Result<Xsave, ResumeError> {
    let xcr0 = current.xcr0().unwrap_or(0b11);
    let layout = layout_for(xcr0);
    if let Some(x) = plan.fpregs.xsave.as_ref() {
        let missing = x.xstate_bv & !layout.feature_mask();
        if missing != 0 {
            return Err(ResumeError::MissingComponents { tid, missing });
        }
    }
    let mut raw = current.into_bytes();
    xsave::write_raw(&plan.fpregs, &layout, &mut raw)
        .map_err(|source| ResumeError::Xsave { tid, source })?;
    Ok(Xsave::from_bytes(raw))
}

/// This CPU's xsave layout under `xcr0`, found once per process: it comes from CPUID,
/// which in a virtual machine traps to the hypervisor (microseconds a leaf, one leaf per
/// component), and a prepared switch loads registers inside the down time.
fn layout_for(xcr0: u64) -> xsave::XsaveLayout {
    static KNOWN: std::sync::Mutex<Vec<(u64, xsave::XsaveLayout)>> =
        std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, layout)) = known.iter().find(|(x, _)| *x == xcr0) {
        return layout.clone();
    }
    let cpu = XsaveLayout::for_xcr0(xcr0);
    let layout = xsave::XsaveLayout::new(
        cpu.components
            .iter()
            .map(|c| (c.index, usize::try_from(c.offset).unwrap_or(usize::MAX))),
    );
    known.push((xcr0, layout.clone()));
    layout
}

/// The general registers to load into `t` for `plan`. A thread dumped inside a syscall
/// that restarts unless a signal handler runs first (`sigsuspend`, `pause`, an absolute
/// sleep...) gets its registers as dumped when it will be let go from a stop in signal
/// delivery, where the kernel then restarts the call, or lets a handler run and returns
/// `EINTR` (or restarts after it, under `SA_RESTART`), as it would have for the original.
/// Rewound beforehand, the call would be re-issued even after a handler that a signal
/// sent just after the restore ran first: a `sigsuspend` would then wait for a second
/// signal. Our tracees' stops are all in signal delivery (injections end in the
/// single-step's trap), but the rewound registers stay for any other.
fn regs_for<'a>(t: &Tracee, plan: &'a ThreadPlan) -> &'a tracee::Regs {
    match &plan.as_dumped {
        Some(dumped) if t.stopped_in_signal_delivery() => dumped,
        _ => &plan.regs,
    }
}

/// Loads every register and the signal mask into the stopped thread.
pub fn load_registers(t: &mut Tracee, plan: &ThreadPlan) -> Result<(), ResumeError> {
    load_registers_kept(t, plan).map(drop)
}

/// [`load_registers`], returning the xsave area it loaded: a later load into the thread,
/// stopped since, may start from it instead of reading the thread's again.
pub fn load_registers_kept(t: &mut Tracee, plan: &ThreadPlan) -> Result<Xsave, ResumeError> {
    let tid = t.tid();
    let xsave = xsave_area(t, plan)?;
    t.set_xsave(&xsave).map_err(|source| ResumeError::Ptrace {
        tid,
        step: "setting the xsave area",
        source,
    })?;
    t.set_regs(regs_for(t, plan))
        .map_err(|source| ResumeError::Ptrace {
            tid,
            step: "setting registers",
            source,
        })?;
    t.set_sigmask(SigSet(plan.sigmask))
        .map_err(|source| ResumeError::Ptrace {
            tid,
            step: "setting the signal mask",
            source,
        })?;
    Ok(xsave)
}

/// Loads into a stopped thread whose registers and mask are `before` (loaded earlier) those
/// of `now`, leaving out what did not change: each load is a ptrace round trip or more
/// (the FPU state three, two with `loaded`, the xsave area [`load_registers_kept`] loaded
/// for `before`), inside a prepared switch's down time. Returns whether the FPU state
/// changed.
pub fn load_changed_registers(
    t: &mut Tracee,
    before: &ThreadPlan,
    now: &ThreadPlan,
    loaded: Option<&Xsave>,
) -> Result<bool, ResumeError> {
    let tid = t.tid();
    let fpu = now.fpregs != before.fpregs;
    if fpu {
        let xsave = match loaded {
            Some(area) => xsave_area_from(tid, area.clone(), now)?,
            None => xsave_area(t, now)?,
        };
        t.set_xsave(&xsave).map_err(|source| ResumeError::Ptrace {
            tid,
            step: "setting the xsave area",
            source,
        })?;
    }
    let regs = regs_for(t, now);
    if regs != regs_for(t, before) {
        t.set_regs(regs).map_err(|source| ResumeError::Ptrace {
            tid,
            step: "setting registers",
            source,
        })?;
    }
    if now.sigmask != before.sigmask {
        t.set_sigmask(SigSet(now.sigmask))
            .map_err(|source| ResumeError::Ptrace {
                tid,
                step: "setting the signal mask",
                source,
            })?;
    }
    Ok(fpu)
}

/// Lets the thread run.
pub fn detach(t: Tracee) -> Result<(), ResumeError> {
    let tid = t.tid();
    t.detach().map_err(|source| ResumeError::Ptrace {
        tid,
        step: "detaching",
        source,
    })
}

/// `getpid`: a syscall that changes nothing, to make a stopped thread run once.
const SYS_GETPID: i64 = 39;

/// Moves the stopped `threads` to CPUs their affinity allows other than `ours`, and gives
/// each its affinity back. A thread let go wakes where it last ran if that CPU is free;
/// left where we built it, on our CPU, it would wait there behind what we still do at
/// the resume (and behind the lazy-pages daemon we wake) while another CPU may idle: the
/// kernel's search for an idle CPU is cut short when the CPUs were busy of late, as they
/// are during a migration. A stopped thread only changes CPU by running: each runs one
/// injected `getpid` with its affinity narrowed to the chosen CPU.
pub fn move_off_cpu<'a>(
    threads: impl Iterator<Item = &'a mut Tracee>,
    ours: usize,
) -> Result<(), ResumeError> {
    let mut turn = 0;
    for t in threads {
        let tid = t.tid();
        let affinity_err = |source| ResumeError::Affinity { tid, source };
        let allowed = tracee::taskinfo::affinity(tid).map_err(affinity_err)?;
        let others: Vec<usize> = allowed.iter().copied().filter(|&c| c != ours).collect();
        let Some(&cpu) = others.get(turn % others.len().max(1)) else {
            continue;
        };
        turn += 1;
        tracee::taskinfo::set_affinity(tid, &[cpu]).map_err(affinity_err)?;
        // The helper page of the build is gone by now: the vDSO's instruction.
        t.use_vdso_syscall_insn();
        let ran = t.syscall(SYS_GETPID, [0; 6]);
        tracee::taskinfo::set_affinity(tid, &allowed).map_err(affinity_err)?;
        // Only a placement: a thread that cannot run one here (a process without a
        // vDSO, say) wakes where it is.
        if let Err(error) = ran {
            tracing::debug!(%tid, %error, "the thread stays on the CPU it was built on");
        }
    }
    Ok(())
}

/// Lets the process go into a group stop, as it was when dumped.
pub fn detach_stopped(t: Tracee) -> Result<(), ResumeError> {
    let tid = t.tid();
    t.detach_with_signal(SIGSTOP)
        .map_err(|source| ResumeError::Ptrace {
            tid,
            step: "detaching with SIGSTOP",
            source,
        })
}

/// Lets a seized process go into a group stop, as it was when dumped. Unlike
/// [`detach_stopped`] this works from any ptrace stop: the SIGSTOP is queued first
/// and taken by the process once it runs untraced.
pub fn detach_into_stop(t: Tracee) -> Result<(), ResumeError> {
    let tid = t.tid();
    let pid = nix::unistd::Pid::from_raw(t.pid().as_raw());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).map_err(|errno| {
        ResumeError::Ptrace {
            tid,
            step: "queueing SIGSTOP",
            source: PtraceError::Ptrace {
                tid,
                op: "kill SIGSTOP",
                errno: rustix::io::Errno::from_raw_os_error(errno as i32),
            },
        }
    })?;
    detach(t)
}

const SIGSTOP: i32 = 19;
