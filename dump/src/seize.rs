//! Freezing the process: every thread seized with `PTRACE_O_SUSPEND_SECCOMP` and interrupted,
//! threads born during the freeze included; for a tree, every process below the root too
//! ([`freeze_tree`]). The result resumes everything when dropped.

use tracee::{FreezeError, Pid, SeizeOptions, SeizedProcess, SeizedTree};

/// The process could not be frozen; nothing of it stays stopped.
#[derive(Debug, thiserror::Error)]
pub enum SeizeError {
    #[error("dump: cannot dump pid {pid}: it is ckpt-dump itself")]
    Ourselves { pid: Pid },
    #[error("dump: pid {pid} is traced by pid {tracer} (a debugger?): detach it first")]
    Traced { pid: Pid, tracer: i32 },
    #[error("dump: freeze pid {pid}")]
    Freeze {
        pid: Pid,
        #[source]
        source: FreezeError,
    },
}

fn check_root(pid: Pid) -> Result<(), SeizeError> {
    if u32::try_from(pid.as_raw()).ok() == Some(std::process::id()) {
        return Err(SeizeError::Ourselves { pid });
    }
    Ok(())
}

/// Why freezing `pid` failed: ptrace allows one tracer, so a process some debugger holds is
/// named with it rather than reported as EPERM. Asked only once the freeze failed: reading
/// `/proc/PID/status` first would lengthen every freeze (a final dump's is down time).
fn freeze_failed(pid: Pid, source: FreezeError) -> SeizeError {
    match tracee::proc::status::read(pid) {
        Ok(status) if status.tracer_pid != 0 => SeizeError::Traced {
            pid,
            tracer: status.tracer_pid,
        },
        _ => SeizeError::Freeze { pid, source },
    }
}

/// Seizes and interrupts every thread of `pid` (see [`SeizedProcess::freeze`]).
#[tracing::instrument(skip_all, fields(pid = %pid))]
pub fn freeze_process(pid: Pid) -> Result<SeizedProcess, SeizeError> {
    check_root(pid)?;
    // Never EXITKILL: if ckpt-dump dies, the target must run on.
    SeizedProcess::freeze(pid, SeizeOptions::DUMP).map_err(|source| freeze_failed(pid, source))
}

/// Freezes `pid` and every process below it (see [`SeizedTree::freeze`]); zombies are
/// listed apart.
#[tracing::instrument(skip_all, fields(pid = %pid))]
pub fn freeze_tree(pid: Pid) -> Result<SeizedTree, SeizeError> {
    check_root(pid)?;
    SeizedTree::freeze(pid, SeizeOptions::DUMP).map_err(|source| freeze_failed(pid, source))
}
