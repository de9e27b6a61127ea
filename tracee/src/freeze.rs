//! Freezing a whole thread group: seize and interrupt every thread until the
//! set of threads in `/proc/PID/task` stops changing.

use std::collections::BTreeSet;

use crate::ids::{Pid, Tid};
use crate::proc::{self, ProcError};
use crate::ptrace::{PtraceError, SeizeOptions, Tracee};
use rustix::io::Errno;

/// Rescans of `/proc/PID/task` before we give up on a process that keeps
/// creating threads faster than we stop them.
const MAX_ROUNDS: usize = 64;

/// Freezing a process failed; every thread already stopped has been resumed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FreezeError {
    /// `/proc/PID/task` could not be listed.
    #[error("pid {pid}: list threads")]
    ListThreads {
        pid: Pid,
        #[source]
        source: ProcError,
    },
    /// `PTRACE_SEIZE` of one thread failed (EPERM: already traced, or not ours).
    #[error("pid {pid}: seize tid {tid}")]
    Seize {
        pid: Pid,
        tid: Tid,
        #[source]
        source: PtraceError,
    },
    /// Stopping a seized thread failed.
    #[error("pid {pid}: stop tid {tid}")]
    Stop {
        pid: Pid,
        tid: Tid,
        #[source]
        source: PtraceError,
    },
    /// Every thread exited while we froze the process.
    #[error("pid {pid} exited while being frozen")]
    Gone { pid: Pid },
    /// The id is a thread of another process, not a process.
    #[error("{pid} is a thread of process {tgid}, not a process (use {tgid})")]
    NotLeader { pid: Pid, tgid: i32 },
    /// The process created threads faster than we could stop them.
    #[error("pid {pid}: thread set still changing after {rounds} rescans")]
    Unstable { pid: Pid, rounds: usize },
    /// The process waits in `vfork` for a child that shares its memory to exec or exit; a
    /// thread in that wait does not stop for ptrace until then.
    #[error(
        "pid {pid} waits for its vfork child {child} to exec or exit, and cannot be frozen \
         until it does"
    )]
    Vfork { pid: Pid, child: Pid },
}

/// A child of `pid` that shares its address space: `pid` is then (or is about to be)
/// blocked in `vfork` until that child execs or exits, where an interrupt would wait for
/// ever. A process that vforks after this check still can; the window is the child's run
/// up to exec.
fn vfork_child(pid: Pid) -> Option<Pid> {
    let children = proc::task::children(pid).ok()?;
    children.into_iter().find(|child| {
        crate::pidfd::kcmp(pid, *child, crate::pidfd::KcmpType::Vm, 0, 0)
            .is_ok_and(|order| order == std::cmp::Ordering::Equal)
    })
}

/// Every thread of one process, stopped under ptrace. Dropping it detaches
/// them all, so an early return leaves the process running as before.
#[derive(Debug)]
pub struct SeizedProcess {
    pid: Pid,
    threads: Vec<Tracee>,
}

impl SeizedProcess {
    /// Seizes and interrupts every thread of `pid`, rescanning `/proc/PID/task`
    /// until no new thread appears. Threads that exit meanwhile are dropped.
    /// The leader comes first in [`SeizedProcess::threads`] while it lives.
    pub fn freeze(pid: Pid, options: SeizeOptions) -> Result<SeizedProcess, FreezeError> {
        let mut frozen = SeizedProcess {
            pid,
            threads: Vec::new(),
        };
        match proc::status::read(pid) {
            Ok(status) if status.tgid != pid.as_raw() => {
                return Err(FreezeError::NotLeader {
                    pid,
                    tgid: status.tgid,
                })
            }
            Ok(_) => {}
            Err(source) => return Err(FreezeError::ListThreads { pid, source }),
        }
        if let Some(child) = vfork_child(pid) {
            return Err(FreezeError::Vfork { pid, child });
        }
        let mut known: BTreeSet<Tid> = BTreeSet::new();
        for _round in 0..MAX_ROUNDS {
            let tids = proc::task::list_tids(pid)
                .map_err(|source| FreezeError::ListThreads { pid, source })?;
            let fresh: Vec<Tid> = tids.into_iter().filter(|t| !known.contains(t)).collect();
            if fresh.is_empty() {
                if frozen.threads.is_empty() {
                    return Err(FreezeError::Gone { pid });
                }
                frozen
                    .threads
                    .sort_by_key(|t| (t.tid() != pid.leader(), t.tid()));
                return Ok(frozen);
            }
            // Seize all new threads before interrupting any, so that the window
            // in which a running thread can spawn an unseen one is short.
            let mut seized = Vec::with_capacity(fresh.len());
            for tid in fresh {
                known.insert(tid);
                match Tracee::seize(pid, tid, options) {
                    Ok(t) => seized.push(t),
                    Err(PtraceError::Ptrace {
                        errno: Errno::SRCH, ..
                    }) => {}
                    // A zombie (a leader that called pthread_exit, or a thread
                    // dying right now) cannot be seized and has nothing to dump.
                    Err(PtraceError::Ptrace {
                        errno: Errno::PERM, ..
                    }) if is_zombie(pid, tid) => {}
                    Err(source) => return Err(FreezeError::Seize { pid, tid, source }),
                }
            }
            for mut t in seized {
                let tid = t.tid();
                match t.interrupt() {
                    Ok(()) => frozen.threads.push(t),
                    Err(PtraceError::Exited { .. } | PtraceError::Killed { .. }) => {}
                    Err(PtraceError::Ptrace {
                        errno: Errno::SRCH, ..
                    }) => t.forget(),
                    Err(source) => return Err(FreezeError::Stop { pid, tid, source }),
                }
            }
        }
        Err(FreezeError::Unstable {
            pid,
            rounds: MAX_ROUNDS,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The stopped threads, leader first.
    pub fn threads(&self) -> &[Tracee] {
        &self.threads
    }

    /// The stopped threads, for injection and register access.
    pub fn threads_mut(&mut self) -> &mut [Tracee] {
        &mut self.threads
    }

    /// The thread `tid`, if it is one of ours.
    pub fn thread_mut(&mut self, tid: Tid) -> Option<&mut Tracee> {
        self.threads.iter_mut().find(|t| t.tid() == tid)
    }

    /// The group leader, or the first live thread if the leader has exited
    /// (a zombie leader cannot be seized).
    pub fn leader_mut(&mut self) -> Option<&mut Tracee> {
        self.threads.first_mut()
    }

    /// The thread ids, leader first.
    pub fn tids(&self) -> Vec<Tid> {
        self.threads.iter().map(Tracee::tid).collect()
    }

    /// Detaches every thread: the process runs on (or stays in the group-stop
    /// it was in). Errors are reported for the first thread that failed; the
    /// others are still detached.
    pub fn resume(self) -> Result<(), PtraceError> {
        let mut first_err = None;
        for t in self.threads {
            if let Err(e) = t.detach() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process with SIGKILL and collects each thread's death, which
    /// the kernel reports to us as its tracer before the real parent can see it.
    /// If we are also the real parent, the leader is left for our own `waitpid`.
    pub fn kill(mut self) -> Result<(), Errno> {
        let our_child = proc::stat::read(self.pid)
            .is_ok_and(|s| u32::try_from(s.ppid).is_ok_and(|p| p == std::process::id()));
        rustix::process::kill_process(to_rustix(self.pid), rustix::process::Signal::KILL)?;
        // A dead leader is reported only once every other thread of its group has been reaped,
        // so the tracer collects the other threads first.
        let leader = self.pid.leader();
        self.threads.sort_by_key(|t| t.tid() == leader);
        for t in &mut self.threads {
            t.forget();
            if our_child && t.tid() == self.pid.leader() {
                continue;
            }
            // Stops reported before the kill took effect come first: wait on.
            while let Ok(crate::wait::WaitEvent::Stopped { .. }) = crate::wait::wait_tid(t.tid()) {}
        }
        Ok(())
    }

    /// Sends SIGSTOP to the process, then detaches: it ends in a group-stop,
    /// for a later `SIGCONT` (or a kill once a restore elsewhere has succeeded).
    pub fn leave_stopped(self) -> Result<(), PtraceError> {
        if let Err(errno) =
            rustix::process::kill_process(to_rustix(self.pid), rustix::process::Signal::STOP)
        {
            return Err(PtraceError::Ptrace {
                tid: self.pid.leader(),
                op: "kill(SIGSTOP) before detach",
                errno,
            });
        }
        self.resume()
    }
}

fn is_zombie(pid: Pid, tid: Tid) -> bool {
    match proc::stat::read_thread(pid, tid) {
        Ok(stat) => matches!(stat.state, 'Z' | 'X'),
        Err(e) => e.is_gone(),
    }
}

pub(crate) fn to_rustix(pid: Pid) -> rustix::process::Pid {
    rustix::process::Pid::from_raw(pid.as_raw()).expect("Pid is positive by construction")
}

/// A process tree, every live process frozen with [`SeizedProcess::freeze`].
/// Dropping it resumes everything.
#[derive(Debug)]
pub struct SeizedTree {
    /// Live processes in the order they were frozen (parents before children)
    /// with their parent's pid (`None` for the root).
    processes: Vec<(Option<Pid>, SeizedProcess)>,
    /// Zombie children (exited, not yet reaped) with their parent's pid.
    zombies: Vec<(Pid, Pid)>,
}

/// Whether `pid` is a zombie process: exited, every thread gone, not yet reaped.
/// A leader that called `pthread_exit` also shows `Z`, but its other threads
/// still list under `/proc/PID/task`.
fn is_zombie_process(pid: Pid) -> bool {
    if !is_zombie(pid, pid.leader()) {
        return false;
    }
    match proc::task::list_tids(pid) {
        Ok(tids) => tids.iter().all(|t| *t == pid.leader()),
        Err(e) => !e.is_gone(),
    }
}

impl SeizedTree {
    /// Freezes `root`, then its children, then theirs. Each process is frozen
    /// before its children are listed, so its list cannot change under us;
    /// once every process is frozen, every list is read again (a process that
    /// ran until we reached it may have made a sibling with `CLONE_PARENT`), until
    /// a pass finds nothing new. Children that exit before we reach them are
    /// left out; zombies are listed apart (they cannot be seized).
    pub fn freeze(root: Pid, options: SeizeOptions) -> Result<SeizedTree, FreezeError> {
        let mut tree = SeizedTree {
            processes: Vec::new(),
            zombies: Vec::new(),
        };
        tree.processes
            .push((None, SeizedProcess::freeze(root, options)?));
        let mut next = 0;
        for _round in 0..MAX_ROUNDS {
            while next < tree.processes.len() {
                let pid = tree.processes[next].1.pid();
                next += 1;
                tree.add_children(pid, options)?;
            }
            // The verification pass: with every process stopped, the lists are final. A
            // root found without children needs none: only the root itself, or a child of
            // it with CLONE_PARENT, could have added one, and it was listed frozen. (The
            // pass would read /proc once more inside the freeze.)
            if tree.processes.len() == 1 && tree.zombies.is_empty() {
                return Ok(tree);
            }
            let before = tree.processes.len() + tree.zombies.len();
            let known: Vec<Pid> = tree.processes.iter().map(|(_, p)| p.pid()).collect();
            for pid in known {
                tree.add_children(pid, options)?;
            }
            if tree.processes.len() + tree.zombies.len() == before {
                return Ok(tree);
            }
        }
        Err(FreezeError::Unstable {
            pid: root,
            rounds: MAX_ROUNDS,
        })
    }

    fn knows(&self, pid: Pid) -> bool {
        self.processes.iter().any(|(_, p)| p.pid() == pid)
            || self.zombies.iter().any(|(_, z)| *z == pid)
    }

    /// Freezes the children of the frozen process `pid` not in the tree yet.
    fn add_children(&mut self, pid: Pid, options: SeizeOptions) -> Result<(), FreezeError> {
        let children =
            proc::task::children(pid).map_err(|source| FreezeError::ListThreads { pid, source })?;
        for child in children {
            if self.knows(child) {
                continue;
            }
            if is_zombie_process(child) {
                self.zombies.push((pid, child));
                continue;
            }
            match SeizedProcess::freeze(child, options) {
                Ok(p) => self.processes.push((Some(pid), p)),
                // It exited (or became a zombie) between the listing and now.
                Err(FreezeError::Gone { .. }) => {
                    if is_zombie_process(child) {
                        self.zombies.push((pid, child));
                    }
                }
                Err(FreezeError::ListThreads { source, .. }) if source.is_gone() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The root process.
    pub fn root(&self) -> &SeizedProcess {
        &self.processes[0].1
    }

    /// Whether the tree is its root alone (no live or zombie descendant).
    pub fn is_single(&self) -> bool {
        self.processes.len() == 1 && self.zombies.is_empty()
    }

    /// The root alone, if the tree is nothing more (see [`SeizedTree::is_single`]);
    /// otherwise the tree back.
    pub fn into_single(mut self) -> Result<SeizedProcess, SeizedTree> {
        if !self.is_single() {
            return Err(self);
        }
        match self.processes.pop() {
            Some((_, p)) => Ok(p),
            None => Err(self),
        }
    }

    /// Every live process, parents before children.
    pub fn processes(&self) -> impl Iterator<Item = &SeizedProcess> {
        self.processes.iter().map(|(_, p)| p)
    }

    /// Every live process with its parent's pid (`None` for the root), parents
    /// before children.
    pub fn with_parents(&self) -> impl Iterator<Item = (Option<Pid>, &SeizedProcess)> {
        self.processes.iter().map(|(parent, p)| (*parent, p))
    }

    /// Every live process, for injection.
    pub fn processes_mut(&mut self) -> impl Iterator<Item = &mut SeizedProcess> {
        self.processes.iter_mut().map(|(_, p)| p)
    }

    /// The process `pid`, if it is in the tree and alive.
    pub fn process_mut(&mut self, pid: Pid) -> Option<&mut SeizedProcess> {
        self.processes
            .iter_mut()
            .map(|(_, p)| p)
            .find(|p| p.pid() == pid)
    }

    /// The parent of `pid` within the tree (`None` for the root or a stranger).
    pub fn parent_of(&self, pid: Pid) -> Option<Pid> {
        self.processes
            .iter()
            .find(|(_, p)| p.pid() == pid)
            .and_then(|(parent, _)| *parent)
            .or_else(|| {
                self.zombies
                    .iter()
                    .find(|(_, z)| *z == pid)
                    .map(|(parent, _)| *parent)
            })
    }

    /// Zombie processes as `(parent, zombie)`.
    pub fn zombies(&self) -> &[(Pid, Pid)] {
        &self.zombies
    }

    /// Detaches every process, children first; the first error is reported
    /// after all were tried.
    pub fn resume(self) -> Result<(), PtraceError> {
        let mut first_err = None;
        for (_, p) in self.processes.into_iter().rev() {
            if let Err(e) = p.resume() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills every process of the tree (SIGKILL), children first.
    pub fn kill(self) -> Result<(), Errno> {
        let mut first_err = None;
        for (_, p) in self.processes.into_iter().rev() {
            if let Err(e) = p.kill() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// SIGKILL to every live process first (none runs on while others die),
    /// then every thread let go; the deaths are left to the real parents to
    /// collect. Returns the first process that refused the signal, after all
    /// were tried.
    pub fn kill_all_and_release(self) -> Result<(), (Pid, Errno)> {
        let mut first_err = None;
        for (_, p) in &self.processes {
            if let Err(e) =
                rustix::process::kill_process(to_rustix(p.pid()), rustix::process::Signal::KILL)
            {
                first_err.get_or_insert((p.pid(), e));
            }
        }
        for (_, p) in self.processes.into_iter().rev() {
            // Threads already dying refuse the detach (ESRCH): the expected outcome.
            if let Err(err) = p.resume() {
                tracing::debug!(error = %err, "detach after SIGKILL");
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Leaves every process in a group-stop (see [`SeizedProcess::leave_stopped`]).
    pub fn leave_stopped(self) -> Result<(), PtraceError> {
        let mut first_err = None;
        for (_, p) in self.processes.into_iter().rev() {
            if let Err(e) = p.leave_stopped() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
