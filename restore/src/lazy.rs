//! Post-copy restore: lazy pages stay missing and a userfaultfd created in the
//! restored process is handed to `ckpt-lazy-pages`, which fills them on demand.
//!
//! The userfaultfd is created inside the target (injected, before its credentials
//! are set: without `UFFD_USER_MODE_ONLY` it needs CAP_SYS_PTRACE, because the
//! process's own syscalls and the kernel's rseq updates fault in kernel mode), taken
//! out with `pidfd_getfd`, set up from here (the ioctls act on the target's mm) and
//! sent to the daemon before anything can touch lazy memory.
//!
//! Someone other than the daemon holds a reference to every userfaultfd of the tree
//! until every page is in: a [`LazyWatch`]. It asks the daemon (hand-off watch marker)
//! to hand back the userfaultfds the kernel makes at each fork, and keeps them with
//! restore's own duplicates. If the hand-off connection closes without the daemon's
//! final marker, the daemon died with pages missing: the watch kills the tree first and
//! closes its references after, because missing pages read as zeroes once the last
//! reference to their userfaultfd is closed. When the final marker comes, it closes them
//! at once: registered pages that were never lazy fault until then.
//!
//! Who holds the watch: the waiting `ckpt-restore` (a thread); with `-d`, a watchdog
//! process forked from `ckpt-restore` (outside the restored tree's pid namespace, if
//! any) that exits when the daemon does. A fork's userfaultfd exists only in the daemon
//! between the daemon reading the fork event and the watch receiving it: a daemon dying
//! in that window leaves that child on its own until the watch kills it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use ckpt_lazy_pages::handoff::{HandoffError, HandoffMessage, HandoffReceiver, LazyHandoff};
use tracee::pidfd::{PidFd, PidfdError};
use tracee::uffd::{Features, RegisterMode, UffdError, Userfaultfd};
use tracee::{Pid, RemoteAddr, Tracee};

use crate::memory::libc_nr as nr;
use crate::plan::{MemoryPlan, Range, MAP_ANONYMOUS, MAP_PRIVATE};
use crate::remote::{self, RemoteError};

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("pid {pid}: creating its userfaultfd")]
    Create {
        pid: Pid,
        #[source]
        source: UffdError,
    },
    #[error("pid {pid}: taking its userfaultfd")]
    Take {
        pid: Pid,
        #[source]
        source: PidfdError,
    },
    #[error("pid {pid}: setting up its userfaultfd")]
    Setup {
        pid: Pid,
        #[source]
        source: UffdError,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("pid {pid}: handing its userfaultfd to ckpt-lazy-pages (is `ckpt-lazy-pages -D DIR` running?)")]
    Handoff {
        pid: Pid,
        #[source]
        source: HandoffError,
    },
    #[error("pid {pid}: lazy pages at {addr:#x} are not in a private anonymous vma")]
    NotAnonymous { pid: Pid, addr: u64 },
    #[error("pid {pid}: starting the watchdog that kills the tree if ckpt-lazy-pages dies")]
    Watchdog {
        pid: Pid,
        #[source]
        source: tracee::spawn::SpawnError,
    },
}

/// The process's userfaultfd as handed over; the duplicate we keep, and the open
/// connection that still owes the daemon its end marker.
#[derive(Debug)]
pub struct LazyRestore {
    pub uffd: Userfaultfd,
    handoff: LazyHandoff,
}

impl LazyRestore {
    /// Tells the daemon that every task is restored, just before they resume, and keeps
    /// watch over it from then on.
    pub fn finish(mut self, pid: Pid) -> Result<LazyWatch, LazyError> {
        let handoff_error = |source| LazyError::Handoff { pid, source };
        self.handoff.watch().map_err(handoff_error)?;
        let back = self.handoff.finish_and_watch().map_err(handoff_error)?;
        Ok(LazyWatch {
            back,
            held: vec![OwnedFd::from(self.uffd)],
        })
    }
}

/// Freeze-free start (`--lazy-prefetch-hot`): installs, before the tree resumes, the lazy
/// pages its threads touch first: at each thread's instruction pointer, around its stack
/// pointer (the page below too: pushes go there), and wherever a general register or the
/// TLS base points. Only pages whose contents are in the local images (a remote source's
/// pages come through the daemon, after resume); they go in with `UFFDIO_COPY`, as the
/// daemon's do, never by writing into the registered range. Returns the pages installed.
pub fn prefetch_hot(
    uffd: &Userfaultfd,
    pid: Pid,
    dir: &images_format::dir::ImageDir,
    image_pid: i32,
    lazy: &[Range],
    threads: &[crate::plan::ThreadPlan],
) -> Result<u64, LazyError> {
    use images_format::{ImageKind, PagesReader, PAGE_SIZE};
    let mut hot: Vec<u64> = Vec::new();
    for t in threads {
        let r = &t.regs;
        hot.extend([
            r.rip,
            r.rsp,
            r.rsp.wrapping_sub(PAGE_SIZE),
            r.rsp.wrapping_add(PAGE_SIZE),
        ]);
        hot.extend([
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15, r.fs_base, r.gs_base,
        ]);
    }
    let mut pages: Vec<u64> = hot
        .into_iter()
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&p| lazy.iter().any(|l| l.start <= p && p < l.end))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    if pages.is_empty() {
        return Ok(0);
    }
    let Ok(id) = u64::try_from(image_pid) else {
        return Ok(0);
    };
    let reader = match PagesReader::open(dir, ImageKind::Pagemap, id) {
        Ok(r) => r,
        Err(error) => {
            tracing::debug!(%pid, %error, "no pagemap to prefetch from");
            return Ok(0);
        }
    };
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut installed = 0;
    for page in pages {
        if let Err(error) = reader.read_pages(page, &mut buf) {
            // A remote source's lazy page: the daemon brings it.
            tracing::trace!(%pid, page, %error, "not in the local images");
            continue;
        }
        match uffd.copy(RemoteAddr(page), &buf, true) {
            Ok(()) => installed += 1,
            Err(UffdError::Partial {
                errno: rustix::io::Errno::EXIST,
                ..
            }) => {}
            Err(source) => return Err(LazyError::Setup { pid, source }),
        }
    }
    Ok(installed)
}

/// What dies if the daemon dies with pages missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    /// The restored root and every descendant (host pids).
    Tree(Pid),
    /// The init of the restored tree's pid namespace: the kernel kills everything in it.
    Namespace(Pid),
}

/// How a watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// The daemon said every lazy page is in; our references are closed.
    AllIn,
    /// The daemon went away first: the victim was killed, then our references closed.
    DaemonGone,
}

/// References to every userfaultfd of the tree, and the connection on which the daemon
/// hands fork userfaultfds back and says when it is done.
#[derive(Debug)]
pub struct LazyWatch {
    back: HandoffReceiver,
    held: Vec<OwnedFd>,
}

impl LazyWatch {
    /// Watches until the daemon is done or gone (blocking).
    pub fn run(mut self, victim: Victim) -> WatchEnd {
        loop {
            match self.back.receive() {
                Ok(Some(HandoffMessage::Task { uffd, .. })) => self.held.push(uffd),
                Ok(Some(HandoffMessage::Finished)) => {
                    tracing::debug!(held = self.held.len(), "every lazy page is in");
                    return WatchEnd::AllIn;
                }
                Ok(Some(HandoffMessage::Zombie { .. } | HandoffMessage::Watch)) => {}
                Ok(None) | Err(_) => {
                    tracing::error!(
                        ?victim,
                        "ckpt-lazy-pages died with pages missing: killing the restored tree"
                    );
                    kill_victim(victim);
                    // Only now may the userfaultfds close.
                    drop(self.held);
                    return WatchEnd::DaemonGone;
                }
            }
        }
    }

    /// Runs the watch in a process of its own, which outlives us (for `-d`). It must be
    /// forked from a single-threaded process, outside the tree's pid namespace.
    pub fn spawn_watchdog(self, pid: Pid, victim: Victim) -> Result<Pid, LazyError> {
        let mut keep: Vec<RawFd> = self.held.iter().map(AsRawFd::as_raw_fd).collect();
        keep.push(self.back.as_fd().as_raw_fd());
        tracee::spawn::fork_any(move || {
            // Nothing else of ours may stay open in a process that outlives us (whoever
            // reads our output would wait for it), and no terminal signal should reach it.
            let _ = crate::child::close_fds_except(&keep);
            let _ = nix::unistd::setsid();
            let end = self.run(victim);
            std::process::exit(match end {
                WatchEnd::AllIn => 0,
                WatchEnd::DaemonGone => 1,
            })
        })
        .map_err(|source| LazyError::Watchdog { pid, source })
    }
}

fn kill_victim(victim: Victim) {
    match victim {
        Victim::Namespace(reaper) => signal(reaper, nix::sys::signal::Signal::SIGKILL),
        Victim::Tree(root) => kill_tree(root),
    }
}

fn signal(pid: Pid, sig: nix::sys::signal::Signal) {
    // ESRCH: gone already, which is what we want.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.as_raw()), sig);
}

/// Stops the tree until no new process appears in it, then kills all of it: a stopped
/// process cannot fork a child we would miss.
fn kill_tree(root: Pid) {
    let mut seen: Vec<Pid> = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if seen.contains(&pid) {
            continue;
        }
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        seen.push(pid);
        todo.extend(children_of(pid));
    }
    for pid in seen {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The children of every thread of `pid`, from /proc.
fn children_of(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        out.extend(
            text.split_whitespace()
                .filter_map(|w| w.parse::<i32>().ok())
                .filter_map(Pid::from_raw),
        );
    }
    out
}

/// The VMAs to register: every private anonymous VMA holding a lazy page.
pub fn lazy_vmas(pid: Pid, memory: &MemoryPlan, lazy: &[Range]) -> Result<Vec<Range>, LazyError> {
    let mut out: Vec<Range> = Vec::new();
    for l in lazy {
        let mut found = false;
        for v in memory.vmas.iter().filter(|v| v.range.overlaps(l)) {
            if v.file.is_some()
                || v.map_flags & MAP_PRIVATE == 0
                || v.map_flags & MAP_ANONYMOUS == 0
            {
                return Err(LazyError::NotAnonymous { pid, addr: l.start });
            }
            found = true;
            if !out.contains(&v.range) {
                out.push(v.range);
            }
        }
        if !found {
            return Err(LazyError::NotAnonymous { pid, addr: l.start });
        }
    }
    out.sort();
    Ok(out)
}

/// Creates the target's userfaultfd, registers `vmas` for missing faults and hands
/// it to the daemon listening in `work_dir`, as task `image_pid` of the images.
pub fn hand_over(
    t: &mut Tracee,
    image_pid: i32,
    vmas: &[Range],
    work_dir: &Path,
) -> Result<LazyRestore, LazyError> {
    let pid = t.pid();
    let target_fd = t
        .inject_userfaultfd(0)
        .map_err(|source| LazyError::Create { pid, source })?;
    let taken = PidFd::open(pid)
        .and_then(|p| p.getfd(target_fd))
        .map_err(|source| LazyError::Take { pid, source });
    // The process never had this fd: close its copy whatever happened.
    remote::call(
        t,
        "close the userfaultfd in the target",
        nr::CLOSE,
        [remote::word(i64::from(target_fd.as_raw())), 0, 0, 0, 0, 0],
    )?;
    let uffd = Userfaultfd::from_fd(taken?);
    let features = Features::EVENT_FORK
        | Features::EVENT_REMAP
        | Features::EVENT_REMOVE
        | Features::EVENT_UNMAP;
    uffd.api(features)
        .map_err(|source| LazyError::Setup { pid, source })?;
    for v in vmas {
        uffd.register(RemoteAddr(v.start), v.len(), RegisterMode::MISSING)
            .map_err(|source| LazyError::Setup { pid, source })?;
    }
    let mut handoff =
        LazyHandoff::connect(work_dir).map_err(|source| LazyError::Handoff { pid, source })?;
    handoff
        .send_uffd(image_pid, uffd.as_fd())
        .map_err(|source| LazyError::Handoff { pid, source })?;
    Ok(LazyRestore { uffd, handoff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{MappedFile, VmaPlan};

    fn vma(start: u64, end: u64, file: bool) -> VmaPlan {
        VmaPlan {
            range: Range { start, end },
            prot: 3,
            map_flags: if file {
                MAP_PRIVATE
            } else {
                MAP_PRIVATE | MAP_ANONYMOUS
            },
            file: file.then(|| MappedFile {
                file_id: 1,
                path: "/f".into(),
                ghost: None,
                open_flags: 0,
                pgoff: 0,
                size: None,
                build_id: Vec::new(),
            }),
            madv: 0,
            status: 0,
            write_then_protect: false,
        }
    }

    #[test]
    fn every_anonymous_vma_touched_by_a_lazy_range_is_registered_once() {
        let pid = Pid::from_raw(7).expect("pid");
        let memory = MemoryPlan {
            vmas: vec![
                vma(0x1000, 0x3000, false),
                vma(0x3000, 0x5000, false),
                vma(0x8000, 0x9000, false),
            ],
            ..Default::default()
        };
        // One lazy range spanning two adjacent vmas, one more inside the first.
        let got = lazy_vmas(
            pid,
            &memory,
            &[
                Range {
                    start: 0x2000,
                    end: 0x4000,
                },
                Range {
                    start: 0x1000,
                    end: 0x2000,
                },
            ],
        )
        .expect("lazy vmas");
        assert_eq!(
            got,
            vec![
                Range {
                    start: 0x1000,
                    end: 0x3000
                },
                Range {
                    start: 0x3000,
                    end: 0x5000
                }
            ]
        );
    }

    #[test]
    fn lazy_pages_outside_private_anonymous_memory_are_refused() {
        let pid = Pid::from_raw(7).expect("pid");
        let memory = MemoryPlan {
            vmas: vec![vma(0x1000, 0x3000, true)],
            ..Default::default()
        };
        assert!(matches!(
            lazy_vmas(
                pid,
                &memory,
                &[Range {
                    start: 0x1000,
                    end: 0x2000
                }]
            ),
            Err(LazyError::NotAnonymous { .. })
        ));
        assert!(matches!(
            lazy_vmas(
                pid,
                &memory,
                &[Range {
                    start: 0x6000,
                    end: 0x7000
                }]
            ),
            Err(LazyError::NotAnonymous { .. })
        ));
    }
}
