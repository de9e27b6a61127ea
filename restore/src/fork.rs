//! Forking the root with its original PID; the child prepares itself and stops.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use rustix::pipe::{pipe_with, PipeFlags};
use tracee::spawn::{self, CloneFlags, SpawnError};
use tracee::{Pid, PtraceError, SeizeOptions, Tracee};

use crate::child;
use crate::plan::ChildPlan;

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("pid {pid} is in use (free it, or run with --new-pid-ns)")]
    PidInUse { pid: Pid },
    #[error("tid {tid} of pid {pid} is in use (free it)")]
    TidInUse { pid: i32, tid: i32 },
    #[error("the image's pid {pid} is not a valid pid")]
    BadPid { pid: i32 },
    #[error("fork pid {pid}")]
    Spawn {
        pid: Pid,
        #[source]
        source: SpawnError,
    },
    #[error("entering the new pid namespace {path}")]
    Namespace {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("status pipe")]
    Pipe(#[source] rustix::io::Errno),
    #[error("pid {pid}: preparing the child failed: {reason}")]
    Child { pid: Pid, reason: String },
    #[error("pid {pid}: taking over the forked child")]
    Attach {
        pid: Pid,
        #[source]
        source: PtraceError,
    },
}

/// The forked root: stopped, traced by us, and killed on drop unless released.
#[derive(Debug)]
pub struct Forked {
    pub pid: Pid,
    armed: bool,
}

impl Forked {
    /// The process now belongs to the restored program: stop killing it on drop.
    pub fn release(mut self) -> Pid {
        self.armed = false;
        self.pid
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.armed {
            kill_and_reap(self.pid);
        }
    }
}

/// Kills a process we created if dropped before [`KillOnDrop::disarm`].
#[derive(Debug)]
pub struct KillOnDrop {
    pid: Pid,
    armed: bool,
}

impl KillOnDrop {
    pub fn new(pid: Pid) -> KillOnDrop {
        KillOnDrop { pid, armed: true }
    }
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.armed {
            kill_and_reap(self.pid);
        }
    }
}

/// SIGKILL and reap a child we created.
pub fn kill_and_reap(pid: Pid) {
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    match nix::sys::signal::kill(npid, nix::sys::signal::Signal::SIGKILL) {
        Ok(()) => {}
        // Already killed and reaped by an earlier guard.
        Err(nix::errno::Errno::ESRCH) => return,
        Err(e) => {
            tracing::warn!(%pid, %e, "could not kill the half-restored process");
            return;
        }
    }
    let _ = nix::sys::wait::waitpid(npid, Some(nix::sys::wait::WaitPidFlag::__WALL));
}

/// Refuses early, before anything is created, when a thread id the image needs is
/// taken (the injected `clone3` would fail only after the memory is rebuilt).
pub fn check_tids_free(pid: i32, tids: impl IntoIterator<Item = i32>) -> Result<(), ForkError> {
    for tid in tids {
        if tid != pid && std::path::Path::new(&format!("/proc/{tid}")).exists() {
            return Err(ForkError::TidInUse { pid, tid });
        }
    }
    Ok(())
}

/// Forks the root as `pid`, runs [`child::prepare`] in it, and takes it over when it
/// stops. A child that fails reports why through a pipe before exiting.
pub fn fork_root(
    pid: i32,
    plan: &ChildPlan,
    in_new_ns: bool,
) -> Result<(Forked, Tracee), ForkError> {
    let want = Pid::from_raw(pid).ok_or(ForkError::BadPid { pid })?;
    // Checked first for a clear error before anything is created; clone3 decides in
    // the end (EEXIST), as the pid may be taken in between. Our /proc shows host pids.
    if !in_new_ns && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ForkError::PidInUse { pid: want });
    }
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC).map_err(ForkError::Pipe)?;
    let forked = spawn::fork_with_pid(want, CloneFlags::empty(), || run_child(plan, &write_end));
    // Only the child may hold the write end, so that its exit ends our read.
    drop(write_end);
    let child_pid = match forked {
        Ok(p) => p,
        Err(SpawnError::PidInUse { pid }) => return Err(ForkError::PidInUse { pid }),
        Err(source) => return Err(ForkError::Spawn { pid: want, source }),
    };
    let guard = Forked {
        pid: child_pid,
        armed: true,
    };
    match Tracee::from_stopped_child(child_pid, SeizeOptions::RESTORE) {
        Ok(t) => Ok((guard, t)),
        Err(source) => {
            let reason = read_reason(read_end);
            match reason {
                Some(reason) => Err(ForkError::Child {
                    pid: child_pid,
                    reason,
                }),
                None => Err(ForkError::Attach {
                    pid: child_pid,
                    source,
                }),
            }
        }
    }
}

/// The forked child's whole life before the tracer takes over. It never returns:
/// the fds it holds are closed by number in [`child::prepare`], not dropped.
fn run_child(plan: &ChildPlan, status: &OwnedFd) -> ! {
    match child::prepare(plan, status) {
        Ok(()) => {
            let _ = spawn::stop_self_for_tracer();
            // Resumed without a rebuild: the parent gave up on us.
            std::process::exit(child::CHILD_FAILED)
        }
        Err((status, reason)) => {
            if let Some(status) = &status {
                child::report_failure(status, &reason);
            }
            std::process::exit(child::CHILD_FAILED)
        }
    }
}

/// The child's failure message, once it has exited (EOF on the pipe).
fn read_reason(read_end: OwnedFd) -> Option<String> {
    let mut text = String::new();
    let mut file = std::fs::File::from(read_end);
    match file.read_to_string(&mut text) {
        Ok(_) if !text.is_empty() => Some(text),
        _ => None,
    }
}

/// A new pid namespace for the restored tree (`--new-pid-ns`): its init is a reaper
/// of ours, and we create the root inside it with `setns`, so that the root keeps its
/// pid there whatever the host uses, and stays our child (we trace it).
#[derive(Debug)]
pub struct PidNamespace {
    pub reaper: Pid,
    /// Written once the root exists: until then the reaper must not take the empty
    /// namespace for a finished one. Closed without a byte, the reaper exits.
    go: Option<OwnedFd>,
}

impl PidNamespace {
    /// Forks the reaper as pid 1 of a new pid namespace and makes our next children
    /// members of it.
    pub fn create() -> Result<PidNamespace, ForkError> {
        let one = Pid::from_raw(1).ok_or(ForkError::BadPid { pid: 1 })?;
        let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC).map_err(ForkError::Pipe)?;
        let keep = read_end.as_raw_fd();
        let reaper = spawn::fork_with_pid(one, CloneFlags::NEWPID, || run_reaper(&read_end, keep))
            .map_err(|source| ForkError::Spawn { pid: one, source })?;
        drop(read_end);
        let ns = PidNamespace {
            reaper,
            go: Some(write_end),
        };
        let path = format!("/proc/{reaper}/ns/pid");
        let fd = std::fs::File::open(&path).map_err(|source| ForkError::Namespace {
            path: path.clone(),
            source,
        })?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|e| {
            ForkError::Namespace {
                path,
                source: std::io::Error::from_raw_os_error(e as i32),
            }
        })?;
        Ok(ns)
    }

    /// The root exists: from now on the reaper lives as long as anything in the
    /// namespace, and outlives us.
    pub fn start(mut self) -> Pid {
        if let Some(go) = self.go.take() {
            let mut file = std::fs::File::from(go);
            // The reaper reads it; if it died already, the restored tree died with it.
            let _ = std::io::Write::write_all(&mut file, b"g");
        }
        self.reaper
    }
}

impl Drop for PidNamespace {
    fn drop(&mut self) {
        if self.go.is_some() {
            // Killing the init of a pid namespace kills everything in it.
            kill_and_reap(self.reaper);
        }
    }
}

/// Makes our next children members of our own pid namespace again (after
/// [`PidNamespace::create`] pointed them into the tree's).
pub fn children_in_our_pid_namespace() -> Result<(), ForkError> {
    let path = "/proc/self/ns/pid".to_string();
    let fd = std::fs::File::open(&path).map_err(|source| ForkError::Namespace {
        path: path.clone(),
        source,
    })?;
    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|e| ForkError::Namespace {
        path,
        source: std::io::Error::from_raw_os_error(e as i32),
    })
}

/// Pid 1 of the new namespace: reaps orphans until nothing else is left in it.
fn run_reaper(go: &OwnedFd, keep: RawFd) -> ! {
    // Our stdio and the write end of the pipe must not be held open by a process
    // that may outlive us (whoever reads our output would wait for it).
    if child::close_foreign_fds(keep).is_err() {
        std::process::exit(1);
    }
    let mut byte = [0u8; 1];
    let mut file = match go.try_clone() {
        Ok(fd) => std::fs::File::from(fd),
        Err(_) => std::process::exit(1),
    };
    if !matches!(file.read(&mut byte), Ok(1)) {
        std::process::exit(1);
    }
    loop {
        match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {}
        }
        // No child of ours: is anyone left in the namespace (the root may still be
        // ckpt-restore's child)? kill(-1, 0) from pid 1 reaches everyone else here.
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), None)
            == Err(nix::errno::Errno::ESRCH)
        {
            std::process::exit(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
