//! Forking the tree with its original pids: ckpt-restore forks the root, and each
//! process forks its own children (clone3 with set_tid, `CLONE_FILES`/`CLONE_FS` where
//! they were shared), so that parents, sessions, groups and shared tables come out as
//! they were.
//!
//! Every forked process holds ckpt-restore's table of open file descriptions
//! ([`crate::objects`]) at high fd numbers until it has forked its children; then it dups
//! what its fd table needs into place and closes the rest. Each one reports through one
//! pipe shared by the whole tree ([`Report`]: hello with its pid in our namespace, ready,
//! or why it failed), then waits for our tracer: the root stopped (`PTRACE_TRACEME`), the
//! others in `pause()`, to be seized; a zombie waits until ckpt-restore lets it exit.
//! Each has `PR_SET_PDEATHSIG` = SIGKILL meanwhile, so that a half-built tree dies with
//! whoever forked it; the rebuild sets the dumped value back.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::pipe::{pipe_with, PipeFlags};
use tracee::spawn::{self, CloneFlags, SpawnError};
use tracee::{Pid, PtraceError};

use std::convert::Infallible;

use crate::child;
use crate::objects::Objects;
use crate::plan::{ProcKind, TreePlan};

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
    #[error("pid {pid} (pid {host} in our pid namespace): preparing it failed: {reason}")]
    Prepare { pid: i32, host: Pid, reason: String },
    #[error("pid {pid}: opening a pidfd")]
    Pidfd {
        pid: Pid,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("waiting for the forked processes")]
    Poll(#[source] rustix::io::Errno),
    #[error("a forked process wrote a malformed report: {0}")]
    BadReport(String),
    #[error("every forked process is gone before the tree was ready")]
    ChildrenGone,
    #[error("pid {pid} (image pid) did not get ready in time")]
    NotReady { pid: i32 },
    #[error("pid {pid} (image pid) exited before it was ready")]
    Died { pid: i32 },
    #[error("pid {pid}: taking over the forked child")]
    Attach {
        pid: Pid,
        #[source]
        source: PtraceError,
    },
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

/// What every forked process of the tree holds: its copy of ckpt-restore's memory (the
/// plan and the object table) and these fds, all above the table's floor.
#[derive(Debug, Clone, Copy)]
pub struct Inherited<'a> {
    pub tree: &'a TreePlan,
    pub objects: &'a Objects,
    /// Write end of the report pipe to ckpt-restore.
    pub status: &'a OwnedFd,
    /// Read end of the pipe zombies wait on; ckpt-restore closes the write end when
    /// they may exit.
    pub zombies_go: &'a OwnedFd,
    /// The tree's file locks: each process sets its POSIX ones.
    pub locks: &'a [crate::locks::FileLock],
}

/// Forks the root of the tree as its image pid; the root forks the rest. Returns the
/// root's pid in our namespace. Each process reports through the status pipe
/// ([`Reports`]).
pub fn fork_tree(inherited: Inherited<'_>, in_new_ns: bool) -> Result<Pid, ForkError> {
    let root = inherited.tree.root().ok_or(ForkError::BadPid { pid: 0 })?;
    let want = Pid::from_raw(root.pid).ok_or(ForkError::BadPid { pid: root.pid })?;
    // Checked first for a clear error before anything is created; clone3 decides in
    // the end (EEXIST), as the pid may be taken in between. Our /proc shows host pids.
    if !in_new_ns && std::path::Path::new(&format!("/proc/{}", root.pid)).exists() {
        return Err(ForkError::PidInUse { pid: want });
    }
    let forked = spawn::fork_with_pid(want, CloneFlags::empty(), || {
        run_process(inherited, 0, None, None)
    });
    match forked {
        Ok(p) => Ok(p),
        Err(SpawnError::PidInUse { pid }) => Err(ForkError::PidInUse { pid }),
        Err(source) => Err(ForkError::Spawn { pid: want, source }),
    }
}

/// The whole life of forked process `i` before our tracer takes over: report, set its
/// session, fork its children, put its fds and fs in place, report ready, wait.
///
/// `done`: for a child sharing its parent's fd table, where it tells the parent that
/// it has forked its own children (the parent places the shared fds only then).
/// `parent`: the parent's pid, to notice that it died before our death signal was set.
fn run_process(
    inh: Inherited<'_>,
    i: usize,
    done: Option<&OwnedFd>,
    parent: Option<rustix::process::Pid>,
) -> Infallible {
    let Some(me) = inh.tree.procs.get(i) else {
        std::process::exit(child::CHILD_FAILED)
    };
    // A half-built tree must not outlive whoever forked it.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if parent.is_some() && rustix::process::getppid() != parent {
        std::process::exit(child::CHILD_FAILED);
    }
    let host = own_host_pid().unwrap_or(0);
    let report = |kind, text: &str| {
        Report {
            kind,
            pid: me.pid,
            host,
            text: text.to_string(),
        }
        .send(inh.status)
    };
    report(ReportKind::Hello, "");
    if let Err(reason) = prepare_process(inh, i) {
        report(ReportKind::Failed, &reason);
        if let Some(done) = done {
            let _ = rustix::io::write(done, b"F");
        }
        std::process::exit(child::CHILD_FAILED);
    }
    report(ReportKind::Ready, "");
    if let Some(done) = done {
        let _ = rustix::io::write(done, b"1");
    }
    match me.kind {
        ProcKind::Zombie { status } => exit_as_zombie(inh.zombies_go, me.join_group, status),
        ProcKind::Live(_) if i == 0 => {
            let _ = spawn::stop_self_for_tracer();
            // Resumed without a rebuild: ckpt-restore gave up on us.
            std::process::exit(child::CHILD_FAILED)
        }
        ProcKind::Live(_) => spawn::pause_for_tracer(),
    }
}

/// Our pid in ckpt-restore's namespace: /proc is its (checked before forking), so
/// `/proc/self` names us as it knows us, whatever pid namespace we are in.
fn own_host_pid() -> Option<i32> {
    std::fs::read_link("/proc/self")
        .ok()?
        .to_str()?
        .parse()
        .ok()
}

fn prepare_process(inh: Inherited<'_>, i: usize) -> Result<(), String> {
    let me = inh.tree.procs.get(i).ok_or("no such process")?;
    // Before the children: they inherit the session and group.
    child::set_session(&me.session)?;
    for &c in &me.children {
        fork_child(inh, c)?;
    }
    match &me.kind {
        ProcKind::Live(plan) => {
            // Every process sharing this fd table has forked its children by now.
            if me.places_fds() {
                let placed = child::place_fds(&plan.child.fds, inh.objects)?;
                let mut keep: Vec<RawFd> = plan.child.fds.iter().map(|f| f.fd).collect();
                keep.push(inh.status.as_raw_fd());
                let closed = child::close_fds_except(&keep);
                // POSIX locks belong to the fd table: set through it, for every process
                // sharing it, once no other fd of their files is left to close.
                let locked = closed.and_then(|()| {
                    let by_number = |fd: i32| {
                        placed
                            .iter()
                            .find(|p| p.as_raw_fd() == fd)
                            .map(|p| p.as_fd())
                    };
                    sharing_table(inh.tree, i).try_for_each(|pid| {
                        crate::locks::apply_posix(inh.locks, pid, by_number)
                            .map_err(|e| format!("{e}"))
                    })
                });
                child::release_placed(placed);
                locked?;
            }
            if !me.shares_fs {
                child::set_fs(&plan.child)?;
            }
        }
        ProcKind::Zombie { .. } => {
            child::close_fds_except(&[inh.status.as_raw_fd(), inh.zombies_go.as_raw_fd()])?;
        }
    }
    Ok(())
}

/// The pids of process `i` and of every descendant sharing its fd table.
fn sharing_table(tree: &TreePlan, i: usize) -> impl Iterator<Item = i32> + '_ {
    let mut todo = vec![i];
    std::iter::from_fn(move || {
        let at = todo.pop()?;
        let p = tree.procs.get(at)?;
        todo.extend(
            p.children
                .iter()
                .copied()
                .filter(|&c| tree.procs.get(c).is_some_and(|c| c.shares_files)),
        );
        Some(p.pid)
    })
}

/// Forks child `c` of the process we are; waits for it when it shares our fd table.
fn fork_child(inh: Inherited<'_>, c: usize) -> Result<(), String> {
    let p = inh.tree.procs.get(c).ok_or("no such child")?;
    let want = Pid::from_raw(p.pid).ok_or_else(|| format!("bad pid {}", p.pid))?;
    let mut flags = CloneFlags::empty();
    if p.shares_files {
        flags |= CloneFlags::FILES;
    }
    if p.shares_fs {
        flags |= CloneFlags::FS;
    }
    let done = if p.shares_files {
        let (r, w) = pipe_with(PipeFlags::CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let r = inh.objects.park_own(r).map_err(|e| format!("pipe: {e}"))?;
        let w = inh.objects.park_own(w).map_err(|e| format!("pipe: {e}"))?;
        Some((r, w))
    } else {
        None
    };
    let me = Some(rustix::process::getpid());
    let forked = spawn::fork_with_pid(want, flags, || {
        run_process(inh, c, done.as_ref().map(|d| &d.1), me)
    })
    .map_err(|e| format!("fork pid {}: {e}", p.pid))?;
    if let Some((r, _w)) = done {
        wait_done(&r, forked).map_err(|e| format!("pid {}: {e}", p.pid))?;
    }
    Ok(())
}

/// Waits for a child sharing our fd table to say it has forked its own children.
fn wait_done(r: &OwnedFd, child: Pid) -> Result<(), String> {
    use rustix::event::{poll, PollFd, PollFlags};
    let rpid = rustix::process::Pid::from_raw(child.as_raw()).ok_or("bad pid")?;
    let pidfd = rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("pidfd_open: {e}"))?;
    loop {
        let mut fds = [
            PollFd::new(r, PollFlags::IN),
            PollFd::new(&pidfd, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        if fds[0].revents().contains(PollFlags::IN) {
            let mut byte = [0u8; 1];
            return match rustix::io::read(r, &mut byte) {
                Ok(1) if byte[0] == b'1' => Ok(()),
                _ => Err("failed before it was ready".into()),
            };
        }
        if !fds[1].revents().is_empty() {
            return Err("exited before it was ready".into());
        }
    }
}

/// A zombie: once ckpt-restore closes the go pipe (every other process is rebuilt),
/// join its group and die as it died.
fn exit_as_zombie(go: &OwnedFd, join: Option<i32>, status: u32) -> ! {
    let mut byte = [0u8; 1];
    // EOF: go. Anything else: the restore was given up; die all the same.
    while let Err(rustix::io::Errno::INTR) = rustix::io::read(go, &mut byte) {}
    if let Some(pgid) = join.and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::setpgid(None, Some(pgid));
    }
    let status = status & 0xffff;
    let signal = status & 0x7f;
    if signal == 0 || signal == 0x7f {
        std::process::exit(i32::try_from((status >> 8) & 0xff).unwrap_or(0));
    }
    // No core file for a replayed death.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    spawn::die_by_signal(i32::try_from(signal).unwrap_or(0))
}

/// What a forked process tells ckpt-restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// It exists (sent first, with its pid in our namespace).
    Hello = 1,
    /// Prepared: stopped or waiting for the tracer (a zombie: waiting to exit).
    Ready = 2,
    /// It failed; the text says why. It exits.
    Failed = 3,
}

/// One message on the status pipe: a 16-byte header (kind, image pid, host pid, text
/// length), then the text. At most `PIPE_BUF` bytes, so that the write is atomic even
/// with every process of the tree writing to the same pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    pub pid: i32,
    pub host: i32,
    pub text: String,
}

const REPORT_HEADER: usize = 16;
/// Linux's PIPE_BUF.
const PIPE_BUF: usize = 4096;

impl Report {
    pub fn encode(&self) -> Vec<u8> {
        let mut text = self.text.as_bytes();
        if text.len() > PIPE_BUF - REPORT_HEADER {
            text = &text[..PIPE_BUF - REPORT_HEADER];
        }
        let mut out = Vec::with_capacity(REPORT_HEADER + text.len());
        out.extend_from_slice(&(self.kind as u32).to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&self.host.to_le_bytes());
        out.extend_from_slice(&u32::try_from(text.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(text);
        out
    }

    /// The first whole report in `buf` and the bytes it took; `None` if incomplete.
    pub fn decode(buf: &[u8]) -> Option<Result<(Report, usize), String>> {
        let word = |at: usize| -> Option<[u8; 4]> { buf.get(at..at + 4)?.try_into().ok() };
        let kind = u32::from_le_bytes(word(0)?);
        let pid = i32::from_le_bytes(word(4)?);
        let host = i32::from_le_bytes(word(8)?);
        let len = usize::try_from(u32::from_le_bytes(word(12)?)).unwrap_or(usize::MAX);
        if len > PIPE_BUF {
            return Some(Err(format!("report of pid {pid} claims {len} bytes")));
        }
        let text = buf.get(REPORT_HEADER..REPORT_HEADER + len)?;
        let kind = match kind {
            1 => ReportKind::Hello,
            2 => ReportKind::Ready,
            3 => ReportKind::Failed,
            other => return Some(Err(format!("report of pid {pid} has kind {other}"))),
        };
        let report = Report {
            kind,
            pid,
            host,
            text: String::from_utf8_lossy(text).into_owned(),
        };
        Some(Ok((report, REPORT_HEADER + len)))
    }

    fn send(&self, to: &OwnedFd) {
        // Nothing more can be done if ckpt-restore is gone: our death signal follows.
        let _ = rustix::io::write(to, &self.encode());
    }
}

/// Every process of the tree we created, by image pid: killed (and reaped where we
/// can) on drop unless released.
#[derive(Debug, Default)]
pub struct TreeGuard {
    /// In the order they were added: killed in that order.
    procs: Vec<(i32, Pid, OwnedFd)>,
    /// Where each image pid is in `procs`: looked up per process on every wakeup.
    index: std::collections::HashMap<i32, usize>,
    armed: bool,
}

impl TreeGuard {
    pub fn new() -> TreeGuard {
        TreeGuard {
            procs: Vec::new(),
            index: std::collections::HashMap::new(),
            armed: true,
        }
    }

    /// Follows process `pid` (`host` in our namespace) from now on.
    pub fn add(&mut self, pid: i32, host: Pid) -> Result<(), ForkError> {
        let raw = rustix::process::Pid::from_raw(host.as_raw())
            .ok_or(ForkError::BadPid { pid: host.as_raw() })?;
        match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => {
                self.index.entry(pid).or_insert(self.procs.len());
                self.procs.push((pid, host, fd));
                Ok(())
            }
            // Gone already: what it reported before dying says why.
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(source) => Err(ForkError::Pidfd { pid: host, source }),
        }
    }

    /// The process's pid in our namespace.
    pub fn host(&self, pid: i32) -> Option<Pid> {
        self.entry(pid).map(|p| p.1)
    }

    /// Its pidfd: readable once it has exited.
    pub fn pidfd(&self, pid: i32) -> Option<&OwnedFd> {
        self.entry(pid).map(|p| &p.2)
    }

    fn entry(&self, pid: i32) -> Option<&(i32, Pid, OwnedFd)> {
        self.procs.get(*self.index.get(&pid)?)
    }

    pub fn release(mut self) {
        self.armed = false;
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for (_, _, fd) in &self.procs {
            // ESRCH: gone already.
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
        // Children of killed parents come to us (we are their subreaper while we
        // restore), or to the namespace's reaper: reap what is ours.
        for (_, host, fd) in &self.procs {
            reap_killed(*host, fd);
        }
    }
}

/// Reaps killed process `host` if it is, or becomes, our child.
fn reap_killed(host: Pid, pidfd: &OwnedFd) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let npid = nix::unistd::Pid::from_raw(host.as_raw());
    for _ in 0..500 {
        match waitpid(npid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return,
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                // Not ours (yet): reaped by someone else once the pid is free.
                if rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL)
                    == Err(rustix::io::Errno::SRCH)
                {
                    return;
                }
            }
            Err(_) => return,
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Reads the reports of the tree until every process is ready; returns each one's pid
/// in our namespace, in tree order. The guard follows every process that said hello.
pub fn wait_ready(
    status: &OwnedFd,
    tree: &TreePlan,
    guard: &mut TreeGuard,
    timeout: std::time::Duration,
) -> Result<Vec<Pid>, ForkError> {
    use rustix::event::{poll, PollFd, PollFlags};
    let deadline = std::time::Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::new();
    let mut ready: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let all = tree.procs.len();
    while ready.len() < all {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            let missing = tree
                .procs
                .iter()
                .find(|p| !ready.contains(&p.pid))
                .map_or(0, |p| p.pid);
            return Err(ForkError::NotReady { pid: missing });
        }
        let waiting: Vec<(i32, &OwnedFd)> = tree
            .procs
            .iter()
            .filter(|p| !ready.contains(&p.pid))
            .filter_map(|p| Some((p.pid, guard.pidfd(p.pid)?)))
            .collect();
        let mut fds = vec![PollFd::new(status, PollFlags::IN)];
        fds.extend(
            waiting
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::IN)),
        );
        let wait = rustix::time::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match poll(&mut fds, Some(&wait)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(source) => return Err(ForkError::Poll(source)),
        }
        let status_in = !fds[0].revents().is_empty();
        let died = fds
            .iter()
            .skip(1)
            .zip(&waiting)
            .find(|(f, _)| !f.revents().is_empty())
            .map(|(_, (pid, _))| *pid);
        drop(fds);
        if status_in {
            let mut chunk = [0u8; PIPE_BUF];
            match rustix::io::read(status, &mut chunk) {
                Ok(0) => return Err(ForkError::ChildrenGone),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(source) => return Err(ForkError::Poll(source)),
            }
            while let Some(decoded) = Report::decode(&buf) {
                let (report, used) = decoded.map_err(ForkError::BadReport)?;
                buf.drain(..used);
                let host =
                    Pid::from_raw(report.host).ok_or(ForkError::BadPid { pid: report.host })?;
                match report.kind {
                    ReportKind::Hello => guard.add(report.pid, host)?,
                    ReportKind::Ready => {
                        ready.insert(report.pid);
                    }
                    ReportKind::Failed => {
                        return Err(ForkError::Prepare {
                            pid: report.pid,
                            host,
                            reason: report.text,
                        })
                    }
                }
            }
            // Reports come before the exit they announce: read them all first.
            continue;
        }
        if let Some(pid) = died {
            return Err(ForkError::Died { pid });
        }
    }
    tree.procs
        .iter()
        .map(|p| guard.host(p.pid).ok_or(ForkError::NotReady { pid: p.pid }))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_any_split_of_the_stream_and_bad_ones_are_refused() {
        let reports = [
            Report {
                kind: ReportKind::Hello,
                pid: 7,
                host: 4007,
                text: String::new(),
            },
            Report {
                kind: ReportKind::Failed,
                pid: 8,
                host: 4008,
                text: "fd 3: open /gone: ENOENT".into(),
            },
        ];
        let stream: Vec<u8> = reports.iter().flat_map(Report::encode).collect();
        for cut in 0..stream.len() {
            let mut buf = stream[..cut].to_vec();
            let mut got = Vec::new();
            while let Some(r) = Report::decode(&buf) {
                let (report, used) = r.expect("well formed");
                got.push(report);
                buf.drain(..used);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(r) = Report::decode(&buf) {
                let (report, used) = r.expect("well formed");
                got.push(report);
                buf.drain(..used);
            }
            assert_eq!(got, reports, "split at {cut}");
            assert!(buf.is_empty());
        }
        let long = Report {
            kind: ReportKind::Failed,
            pid: 1,
            host: 1,
            text: "x".repeat(10_000),
        };
        assert!(long.encode().len() <= PIPE_BUF, "one atomic pipe write");
        let mut bad = reports[0].encode();
        bad[0] = 9;
        assert!(matches!(Report::decode(&bad), Some(Err(_))));
    }
}
