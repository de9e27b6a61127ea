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
//!
//! # A tree: one [`LazySession`] per restore
//!
//! One connection to the daemon carries every process of the tree, in the order of
//! `pstree.img` (parents before children), then the end marker once:
//!
//! ```text
//! let mut lazy = LazySession::open(work_dir)?;          // before the first process
//! // per process, in pstree order, in its rebuild, before anything runs in it
//! // (after its VMAs are mapped, before its threads and credentials):
//! let vmas = lazy_vmas(host_pid, &plan.memory, &lazy_ranges_of_this_process)?;
//! let uffd = lazy.add(&mut tracee, image_pid, &vmas)?;  // -> &Userfaultfd
//! prefetch_hot(uffd, ...)?;                              // optional (--lazy-prefetch-hot)
//! lazy.add_zombie(image_pid)?;                           // per zombie: -pid, no fd
//! // once every process is rebuilt, just before the tree resumes:
//! let watch = lazy.finish()?;                            // end marker; -> LazyWatch
//! // then, as for one process: watch.run(victim) in a thread, or
//! // watch.spawn_watchdog(root, victim) with -d.
//! ```
//!
//! A process with no lazy page still goes through `add` (with empty `vmas`): CRIU's
//! daemon expects a userfaultfd for every live task of pstree. The watch
//! holds a pidfd of every process added: if the daemon dies with pages missing it stops
//! and kills each of them and every descendant it finds from them and from the root
//! (`Victim::Tree`), or the namespace's init (`Victim::Namespace`, which takes all). A
//! dropped session (restore failed) closes the connection without the end marker: the
//! daemon stops with an error, and restore kills what it built.

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
    #[error("open the lazy hand-off to ckpt-lazy-pages in {work_dir} (is `ckpt-lazy-pages -D DIR` running?)")]
    Session {
        work_dir: std::path::PathBuf,
        #[source]
        source: HandoffError,
    },
    #[error("image pid {image_pid}: telling ckpt-lazy-pages it is a zombie")]
    Zombie {
        image_pid: i32,
        #[source]
        source: HandoffError,
    },
    #[error("sending ckpt-lazy-pages the end marker")]
    Finish {
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

/// The hand-off of a whole tree: one connection to the daemon, every process's
/// userfaultfd (our duplicates kept), and a pidfd of each process for the watch.
#[derive(Debug)]
pub struct LazySession {
    handoff: LazyHandoff,
    uffds: Vec<Userfaultfd>,
    processes: Vec<PidFd>,
}

impl LazySession {
    /// Connects to the daemon listening in `work_dir` and asks it to hand the fork
    /// userfaultfds back (the watch). Call before the first process is added.
    pub fn open(work_dir: &Path) -> Result<LazySession, LazyError> {
        let session_error = |source| LazyError::Session {
            work_dir: work_dir.to_path_buf(),
            source,
        };
        let mut handoff = LazyHandoff::connect(work_dir).map_err(session_error)?;
        handoff.watch().map_err(session_error)?;
        Ok(LazySession {
            handoff,
            uffds: Vec::new(),
            processes: Vec::new(),
        })
    }

    /// Creates the userfaultfd of the stopped process `t` (task `image_pid` of the
    /// images), registers `vmas` for missing faults and hands it to the daemon, which
    /// serves its faults from now on. Returns our duplicate, for [`prefetch_hot`].
    pub fn add(
        &mut self,
        t: &mut Tracee,
        image_pid: i32,
        vmas: &[Range],
    ) -> Result<&Userfaultfd, LazyError> {
        let pid = t.pid();
        let started = std::time::Instant::now();
        let process = PidFd::open(pid).map_err(|source| LazyError::Take { pid, source })?;
        let uffd = create_registered(t, &process, vmas)?;
        self.handoff
            .send_uffd(image_pid, uffd.as_fd())
            .map_err(|source| LazyError::Handoff { pid, source })?;
        tracing::debug!(
            %pid,
            image_pid,
            vmas = vmas.len(),
            us = started.elapsed().as_micros(),
            "userfaultfd handed over"
        );
        self.processes.push(process);
        self.uffds.push(uffd);
        Ok(self.uffds.last().expect("pushed just now"))
    }

    /// Tells the daemon that task `image_pid` is a zombie: no memory, no fd.
    pub fn add_zombie(&mut self, image_pid: i32) -> Result<(), LazyError> {
        self.handoff
            .send_zombie(image_pid)
            .map_err(|source| LazyError::Zombie { image_pid, source })
    }

    /// The userfaultfds handed over so far, in the order they were added.
    pub fn uffds(&self) -> &[Userfaultfd] {
        &self.uffds
    }

    /// Sends the end marker (every process is restored and about to resume) and keeps
    /// watch from then on: see [`LazyWatch`].
    pub fn finish(self) -> Result<LazyWatch, LazyError> {
        let back = self
            .handoff
            .finish_and_watch()
            .map_err(|source| LazyError::Finish { source })?;
        Ok(LazyWatch {
            back,
            held: self.uffds.into_iter().map(OwnedFd::from).collect(),
            processes: self.processes,
        })
    }
}

/// The userfaultfds of a tree held for a prepared post-copy (`--prepared`): created and
/// registered like a [`LazySession`]'s, but handed to the daemon only once the final
/// images are in the directory, since the daemon reads a process's page lists when it
/// receives it. Until then nothing may fault on lazy memory: the tree is held stopped, and
/// nobody would serve the fault.
#[derive(Debug, Default)]
pub struct PreparedHandoff {
    /// The connection to the daemon, if opened before the switch.
    session: Option<LazySession>,
    processes: Vec<PreparedProcess>,
    /// Processes (by index in `processes`) and zombies, in the order of the tree.
    order: Vec<Slot>,
}

#[derive(Debug)]
struct PreparedProcess {
    image_pid: i32,
    pid: Pid,
    uffd: Userfaultfd,
    process: PidFd,
    vmas: Vec<Range>,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Process(usize),
    Zombie(i32),
}

impl PreparedHandoff {
    /// Creates the userfaultfd of the stopped process `t` and registers `vmas`, as
    /// [`LazySession::add`] does, keeping it for [`PreparedHandoff::hand_over`].
    pub fn add(
        &mut self,
        t: &mut Tracee,
        image_pid: i32,
        vmas: &[Range],
    ) -> Result<&Userfaultfd, LazyError> {
        let pid = t.pid();
        let process = PidFd::open(pid).map_err(|source| LazyError::Take { pid, source })?;
        let uffd = create_registered(t, &process, vmas)?;
        self.order.push(Slot::Process(self.processes.len()));
        self.processes.push(PreparedProcess {
            image_pid,
            pid,
            uffd,
            process,
            vmas: vmas.to_vec(),
        });
        Ok(&self.processes.last().expect("pushed just now").uffd)
    }

    /// Connects to the daemon now, off the switch's path: it reads nothing until a
    /// process is handed over. A daemon not there yet is connected to at the hand-off.
    pub fn connect_early(&mut self, work_dir: &Path) {
        match LazySession::open(work_dir) {
            Ok(session) => self.session = Some(session),
            Err(error) => {
                tracing::debug!(%error, "no daemon yet: connecting at the hand-off");
            }
        }
    }

    /// The connection opened early, for a restore that drops this one (a daemon whose
    /// restore connection closes without the end marker stops).
    pub fn take_session(&mut self) -> Option<LazySession> {
        self.session.take()
    }

    /// Task `image_pid` is a zombie: told to the daemon in its place in the tree.
    pub fn add_zombie(&mut self, image_pid: i32) {
        self.order.push(Slot::Zombie(image_pid));
    }

    /// The userfaultfd of task `image_pid`, and the VMAs registered with it.
    pub fn uffd(&self, image_pid: i32) -> Option<(&Userfaultfd, &[Range])> {
        self.processes
            .iter()
            .find(|p| p.image_pid == image_pid)
            .map(|p| (&p.uffd, p.vmas.as_slice()))
    }

    /// Per image pid, the VMAs registered with its userfaultfd.
    pub fn registered(&self) -> std::collections::HashMap<u32, Vec<Range>> {
        self.processes
            .iter()
            .map(|p| (p.image_pid.unsigned_abs(), p.vmas.clone()))
            .collect()
    }

    /// Connects to the daemon in `work_dir` and hands it every process, in the order they
    /// were added: from here on it serves their faults.
    pub fn hand_over(self, work_dir: &Path) -> Result<LazySession, LazyError> {
        let mut session = match self.session {
            Some(session) => session,
            None => LazySession::open(work_dir)?,
        };
        let mut processes: Vec<Option<PreparedProcess>> =
            self.processes.into_iter().map(Some).collect();
        for slot in self.order {
            match slot {
                Slot::Process(i) => {
                    let Some(p) = processes.get_mut(i).and_then(Option::take) else {
                        continue;
                    };
                    session
                        .handoff
                        .send_uffd(p.image_pid, p.uffd.as_fd())
                        .map_err(|source| LazyError::Handoff { pid: p.pid, source })?;
                    session.processes.push(p.process);
                    session.uffds.push(p.uffd);
                }
                Slot::Zombie(image_pid) => session.add_zombie(image_pid)?,
            }
        }
        Ok(session)
    }
}

/// Installs pages the source read from its frozen process (the switch's hot pages) at
/// `vaddr`, where they lie in the `registered` VMAs; pages already in (the daemon's, or a
/// fault's) stay. Returns the pages installed.
pub fn install_pages(
    uffd: &Userfaultfd,
    pid: Pid,
    registered: &[Range],
    vaddr: u64,
    data: &[u8],
) -> Result<u64, LazyError> {
    use images_format::PAGE_SIZE;
    let mut installed = 0;
    for (i, page) in data.chunks_exact(PAGE_SIZE as usize).enumerate() {
        let at = vaddr + i as u64 * PAGE_SIZE;
        if !registered.iter().any(|v| v.start <= at && at < v.end) {
            continue;
        }
        installed += u64::from(install_page(uffd, pid, at, page)?);
    }
    Ok(installed)
}

/// Copies one page in at `at`; false if a page was there already (the daemon's, or a
/// fault's), which stays.
fn install_page(uffd: &Userfaultfd, pid: Pid, at: u64, page: &[u8]) -> Result<bool, LazyError> {
    match uffd.copy(RemoteAddr(at), page, true) {
        Ok(()) => Ok(true),
        Err(UffdError::Partial {
            errno: rustix::io::Errno::EXIST,
            ..
        }) => Ok(false),
        Err(source) => Err(LazyError::Setup { pid, source }),
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
        installed += u64::from(install_page(uffd, pid, page, &buf)?);
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
    /// Every process handed over: killed with the victim, by pidfd (no pid reuse).
    processes: Vec<PidFd>,
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
                    kill_victim_of(victim, &self.processes);
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
        keep.extend(self.processes.iter().map(|p| p.as_fd().as_raw_fd()));
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

/// Kills the victim at once: for a caller that can no longer keep watch over it.
pub fn kill_victim(victim: Victim) {
    kill_victim_of(victim, &[]);
}

fn kill_victim_of(victim: Victim, processes: &[PidFd]) {
    match victim {
        Victim::Namespace(reaper) => signal(reaper, nix::sys::signal::Signal::SIGKILL),
        Victim::Tree(root) => kill_tree(root, processes),
    }
}

fn signal_pidfd(process: &PidFd, sig: rustix::process::Signal) {
    // ESRCH: gone already, which is what we want.
    let _ = rustix::process::pidfd_send_signal(process, sig);
}

fn signal(pid: Pid, sig: nix::sys::signal::Signal) {
    // ESRCH: gone already, which is what we want.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.as_raw()), sig);
}

/// Stops the tree until no new process appears in it, then kills all of it: a stopped
/// process cannot fork a child we would miss. The processes handed over are stopped
/// first through their pidfds (one whose parent exited is no longer below the root),
/// and their descendants are looked for as well.
fn kill_tree(root: Pid, processes: &[PidFd]) {
    for p in processes {
        signal_pidfd(p, rustix::process::Signal::STOP);
    }
    let mut seen: Vec<Pid> = Vec::new();
    let mut todo = vec![root];
    // A pid is only looked up while its pidfd says the process runs: once it exited,
    // the pid may be someone else's.
    todo.extend(processes.iter().filter(|p| still_alive(p)).map(PidFd::pid));
    while let Some(pid) = todo.pop() {
        if seen.contains(&pid) {
            continue;
        }
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        seen.push(pid);
        todo.extend(children_of(pid));
    }
    for p in processes {
        signal_pidfd(p, rustix::process::Signal::KILL);
    }
    for pid in seen {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// A pidfd polls readable once its process has exited; until then its pid is its own.
fn still_alive(p: &PidFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(p, rustix::event::PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
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

/// Creates the target's userfaultfd (injected: the kernel ties it to the target's mm),
/// takes it out with `pidfd_getfd`, and sets it up from here.
fn create_registered(
    t: &mut Tracee,
    process: &PidFd,
    vmas: &[Range],
) -> Result<Userfaultfd, LazyError> {
    let pid = t.pid();
    let target_fd = t
        .inject_userfaultfd(0)
        .map_err(|source| LazyError::Create { pid, source })?;
    let taken = process
        .getfd(target_fd)
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
    Ok(uffd)
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
