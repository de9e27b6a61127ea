//! Open files: every fd of the process (`fdinfo-<files_id>.img`), the file objects behind them
//! and behind the executable, cwd, root and file mappings (`files.img`), deleted files kept as
//! ghost images, and `fs-PID.img`. Regular files, directories, character devices reopened by
//! path, pipes (an end held outside the tree only when declared `--external`), FIFOs
//! (reopened by path, their data in `fifo-data.img`), eventfds, signalfds, timerfds, epoll
//! sets, inotify instances, unix sockets (`unix`, with their queues for `sk-queues.img`, and
//! the files in flight in them described like any fd: [`in_flight_file`]) and
//! UDP and listening TCP sockets (`inet`) are supported, with the file locks held through
//! them (`locks`, for `filelocks.img`); anything else fails the dump before a single image
//! is written.
//!
//! A tree of a hundred processes holds ten thousand fds, and each `/proc` read or `kcmp` is
//! a syscall, so the work is split by what it needs:
//! - [`precheck_all`] tells the kind of every fd before anything else is collected, with
//!   the least it can read: the link text names pipes, sockets and anonymous inodes; only a
//!   file named by a path is stat'ed, only a pipe's link mode is read (its direction, for
//!   [`check_pipe_peers`]), and sockets are looked up in one `unix_diag` listing.
//! - The fds are then described (fdinfo, `kcmp` among the fds met before, socket options
//!   and queues, pipe contents) by a thread of their own, one process ahead of the tracer
//!   (`worker`), with their fdinfo read ahead by another (`prefetch`); the worker also
//!   reads what the exe, cwd, root and mappings need (`ahead`), so that [`collect`] only
//!   adds their file objects. A single process is described by [`collect`] itself: the two
//!   threads' start costs more than its fds.
//! - fdinfo names the inode: pipes, sockets and anonymous inodes are never stat'ed.

pub mod again;
mod ahead;
mod inet;
mod kobj;
mod locks;
mod prefetch;
mod reg;
pub mod unix;
mod worker;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use images_format::pb::{FdTypes, FdinfoEntry, FileEntry, FsEntry, RemapFilePathEntry, RemapType};
use tracee::pidfd;
use tracee::proc::fd::{self, FdLink};
use tracee::{Pid, TargetFd};

use super::memory::MemoryState;
use super::CollectError;

pub use inet::InetError;
pub use kobj::{PipeData, PipePeerError};
pub use locks::LockError;
pub use reg::Ghost;
pub use unix::{SkPacket, UnixError};
pub use worker::FileTable;

/// `O_CLOEXEC` as fdinfo shows it: it belongs to the fd, not to the file.
const O_CLOEXEC: u32 = 0o2_000_000;
const FD_CLOEXEC: u32 = 1;
/// Set in the keys of FIFOs among the pipe inodes whose data is saved: no real inode has it.
const FIFO_TAG: u64 = 1 << 63;

/// What the images say about files.
#[derive(Debug, Clone, Default)]
pub struct FilesState {
    /// One entry per open fd, for `fdinfo-<files_id>.img`.
    pub fdinfo: Vec<FdinfoEntry>,
    /// Every file object, for `files.img`.
    pub files: Vec<FileEntry>,
    /// Deleted files whose contents go into `ghost-file-N.img`.
    pub ghosts: Vec<Ghost>,
    /// Which file object is a ghost, for `remap-fpath.img`.
    pub remaps: Vec<RemapFilePathEntry>,
    /// cwd, root and umask.
    pub fs: FsEntry,
    /// The file id of the executable, for `mm_entry.exe_file_id`.
    pub exe_file_id: u32,
    /// Unread bytes of each pipe, for `pipes-data.img`.
    pub pipe_data: Vec<PipeData>,
    /// Unread bytes of each FIFO, for `fifo-data.img`.
    pub fifo_data: Vec<PipeData>,
    /// flock, OFD and POSIX locks, for `filelocks.img`.
    pub locks: Vec<images_format::pb::FileLockEntry>,
    /// The memfds behind fds and mappings, for `memfd.img` (see `collect::shmem`).
    pub memfds: Vec<super::shmem::MemfdInode>,
    /// Unread data of unix sockets, for `sk-queues.img`.
    pub sk_queues: Vec<SkPacket>,
}

/// What one fd refers to, as far as the dump is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    Regular,
    Tty,
    Pipe,
    Eventfd,
    Signalfd,
    Timerfd,
    Epoll,
    Inotify,
    /// A named pipe, reopened by path at restore.
    Fifo,
    /// An IPv4 or IPv6 socket (UDP, or TCP closed or listening).
    Inet,
    /// A unix socket, described by `unix`.
    UnixSocket,
    /// A memfd: its inode goes to `memfd.img`, its contents to a shmem pagemap.
    Memfd,
    Unsupported(&'static str),
}

impl FdKind {
    /// Kernel objects without a path, described by `kobj`.
    fn is_kobj(self) -> bool {
        matches!(
            self,
            FdKind::Pipe
                | FdKind::Eventfd
                | FdKind::Signalfd
                | FdKind::Timerfd
                | FdKind::Epoll
                | FdKind::Inotify
        )
    }
}

fn major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

fn minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// Terminals reopened by path: vt and console (4, 5) and Unix98 pty slaves (136-143). The
/// pty master `/dev/ptmx` (5:2) is not one: opening it makes a new pair.
fn is_tty(rdev: u64) -> bool {
    matches!(major(rdev), 4 | 5 | 136..=143) && !(major(rdev) == 5 && minor(rdev) == 2)
}

/// The memory devices (`/dev/null`, `zero`, `full`, `random`, `urandom`: major 1) hold no
/// state, so reopening them by path restores them; as in CRIU, other devices are refused.
fn is_mem_device(rdev: u64) -> bool {
    major(rdev) == 1
}

fn classify(target: &str, mode: u32, rdev: u64) -> FdKind {
    if target.starts_with("pipe:") {
        return FdKind::Pipe;
    }
    if target.starts_with("socket:") {
        return FdKind::Unsupported("socket");
    }
    if let Some(kind) = target.strip_prefix("anon_inode:") {
        return FdKind::Unsupported(match kind {
            "[eventfd]" => return FdKind::Eventfd,
            "[signalfd]" => return FdKind::Signalfd,
            "[eventpoll]" => return FdKind::Epoll,
            "[timerfd]" => return FdKind::Timerfd,
            "inotify" => return FdKind::Inotify,
            "[fanotify]" => "fanotify",
            "[pidfd]" => "pidfd",
            "[userfaultfd]" => "userfaultfd",
            "[io_uring]" => "io_uring",
            _ => "anonymous inode",
        });
    }
    // A memfd looks like a deleted regular file, but it has seals and is shared by
    // mappings: its inode is saved once for the tree (`collect::shmem`).
    if target.starts_with("/memfd:") {
        return FdKind::Memfd;
    }
    if !target.starts_with('/') {
        return FdKind::Unsupported("special file");
    }
    match mode & 0o170_000 {
        0o100_000 | 0o040_000 => FdKind::Regular,
        0o020_000 if is_tty(rdev) => FdKind::Tty,
        0o020_000 if is_mem_device(rdev) => FdKind::Regular,
        0o020_000 if major(rdev) == 5 && minor(rdev) == 2 => FdKind::Unsupported("pty master"),
        0o020_000 => FdKind::Unsupported("character device"),
        0o010_000 => FdKind::Fifo,
        0o060_000 => FdKind::Unsupported("block device"),
        _ => FdKind::Unsupported("special file"),
    }
}

/// What two fds sharing an open file description must have in common: mount and inode,
/// offset, status flags, and for an eventfd its kernel id. Fds that differ in any are
/// different descriptions without asking `kcmp`.
type FdKey = (u64, u64, u64, u32, u64);

fn fd_key(inode: (u64, u64), info: &fd::FdInfo) -> FdKey {
    let eventfd_id = info
        .get("eventfd-id")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (
        inode.0,
        inode.1,
        info.pos,
        info.flags & !O_CLOEXEC,
        eventfd_id,
    )
}

/// File objects known so far in the whole tree, with CRIU's single counter of file ids:
/// ids are global, so an open file description shared by several processes (inherited
/// through fork, passed over a socket) is one object. One table serves every process of a
/// dump, in tree order; [`FileTable`] passes it between the tracer and the thread that
/// describes fds ahead of it.
#[derive(Default)]
struct Table {
    /// Fds already described, bucketed by [`FdKey`] and kept in the kernel's `kcmp` order
    /// within a bucket: finding the description of a new fd costs a binary search of kcmp
    /// calls, even with thousands of separate opens of one file.
    by_fd: HashMap<FdKey, Vec<(Pid, TargetFd, u32)>>,
    /// Files reached by a path (exe, cwd, root, mappings), one id per inode.
    by_inode: HashMap<(u64, u64), u32>,
    next_id: u32,
    next_ghost: u32,
    /// Build-ids of the regular files met so far.
    build_ids: reg::BuildIds,
    /// A pidfd of the process being read, kept for its next fd to duplicate.
    pidfd: Option<pidfd::PidFd>,
    /// Pipes (by inode) whose data is saved already.
    pipes_read: std::collections::HashSet<u64>,
    /// The fds [`precheck_all`] listed and classified, per process, with what it read of
    /// them, so that [`collect`] need not read it again (the tree is frozen: they cannot
    /// change).
    prechecked: HashMap<Pid, Vec<(FdLink, Seen)>>,
    /// What the process being collected adds; taken by [`collect`].
    state: FilesState,
    /// The unix sockets of the tree, checked for outside peers by [`check_unix_peers`].
    unix: unix::UnixTable,
    /// Our copies of files in flight in unix socket queues: `by_fd` names them by our pid
    /// and their fd numbers here, so they stay open as long as the table.
    in_flight: Vec<std::os::fd::OwnedFd>,
    /// The fdinfo of the prechecked fds, read ahead by a thread of its own.
    prefetch: Option<prefetch::Prefetch>,
    /// What the worker read of the exe, cwd, root and mappings of the processes it
    /// described, for [`collect`].
    paths_ahead: HashMap<Pid, ahead::PathsAhead>,
}

impl Table {
    fn fresh_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    /// The id of the open file description behind `fd` of `pid` if an earlier fd (of any
    /// process) shares it; otherwise where to insert it in its bucket.
    fn find_shared(
        &self,
        key: FdKey,
        pid: Pid,
        fd: TargetFd,
    ) -> Result<Result<u32, usize>, CollectError> {
        let Some(bucket) = self.by_fd.get(&key) else {
            return Ok(Err(0));
        };
        let mut failed = None;
        let idx = |fd: TargetFd| u64::try_from(fd.as_raw()).unwrap_or(u64::MAX);
        let found = bucket.binary_search_by(|(other_pid, other_fd, _)| {
            match pidfd::kcmp(
                *other_pid,
                pid,
                pidfd::KcmpType::File,
                idx(*other_fd),
                idx(fd),
            ) {
                Ok(order) => order,
                Err(source) => {
                    failed.get_or_insert(source);
                    std::cmp::Ordering::Less
                }
            }
        });
        if let Some(source) = failed {
            return Err(CollectError::Kcmp { pid, fd, source });
        }
        Ok(found.map(|i| bucket[i].2))
    }

    /// A pidfd of `pid` (whose `fd` needs it): the one kept if it is `pid`'s, else a new
    /// one, kept in its place. Kept only for the dump, while the tree is frozen: the pid
    /// stays that process's.
    fn pidfd_of(&mut self, pid: Pid, fd: TargetFd) -> Result<&pidfd::PidFd, CollectError> {
        let pidfd = match self.pidfd.take() {
            Some(kept) if kept.pid() == pid => kept,
            _ => {
                pidfd::PidFd::open(pid).map_err(|source| CollectError::Kcmp { pid, fd, source })?
            }
        };
        Ok(self.pidfd.insert(pidfd))
    }

    fn remember_fd(&mut self, key: FdKey, at: usize, pid: Pid, fd: TargetFd, id: u32) {
        let bucket = self.by_fd.entry(key).or_default();
        bucket.insert(at.min(bucket.len()), (pid, fd, id));
    }
}

fn meta_of(pid: Pid, path: &Path, fd: Option<TargetFd>) -> Result<std::fs::Metadata, CollectError> {
    std::fs::metadata(path).map_err(|source| CollectError::Stat {
        pid,
        fd,
        path: path.to_path_buf(),
        source,
    })
}

/// Adds a file reached through a `/proc` link (exe, cwd, root, a mapping) once per inode and
/// returns its id. `shown` is the path the kernel shows for it, `meta` its `stat` if read
/// already. A deleted file (a binary replaced while it runs) is saved as a ghost, as for
/// fds.
fn path_file(
    table: &mut Table,
    pid: Pid,
    proc_link: &Path,
    shown: &str,
    meta: Option<std::fs::Metadata>,
) -> Result<u32, CollectError> {
    let meta = match meta {
        Some(meta) => meta,
        None => meta_of(pid, proc_link, None)?,
    };
    let key = (meta.dev(), meta.ino());
    if let Some(id) = table.by_inode.get(&key) {
        return Ok(*id);
    }
    let id = table.fresh_id();
    let deleted = meta.nlink() == 0 && meta.is_file();
    let name = shown.strip_suffix(" (deleted)").unwrap_or(shown);
    let reg = reg::describe(
        id,
        name,
        0,
        0,
        &meta,
        Some((proc_link, &mut table.build_ids)),
    );
    table.state.files.push(reg::file_entry(reg));
    table.by_inode.insert(key, id);
    if deleted {
        add_ghost(table, id, proc_link, &meta, name);
    }
    Ok(id)
}

/// Saves a deleted file's contents as a ghost image that stands in for file object `id`.
fn add_ghost(table: &mut Table, id: u32, source: &Path, meta: &std::fs::Metadata, name: &str) {
    table.next_ghost += 1;
    let ghost = reg::ghost(table.next_ghost, source, meta);
    table.state.remaps.push(RemapFilePathEntry {
        orig_id: id,
        remap_id: ghost.id,
        remap_type: Some(RemapType::Ghost as i32),
    });
    tracing::info!(path = %name, size = meta.len(), "deleted file: contents saved as a ghost image");
    table.state.ghosts.push(ghost);
}

fn readlink(pid: Pid, path: &Path) -> Result<String, CollectError> {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| CollectError::Stat {
            pid,
            fd: None,
            path: path.to_path_buf(),
            source,
        })
}

/// What [`precheck_all`] learnt of one fd: its kind and what it read to tell it.
struct Seen {
    kind: FdKind,
    /// The fdinfo, if the kind depends on it (sockets); the other fds' is read when they
    /// are described, off the precheck's path.
    info: Option<fd::FdInfo>,
    /// `stat` of a file named by a path (regular files, FIFOs, devices).
    meta: Option<std::fs::Metadata>,
}

fn fd_link_path(pid: Pid, fd: TargetFd) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/fd/{}", fd.as_raw()))
}

/// Tells what `link` of `pid` is, or why it cannot be dumped, reading no more than that
/// takes: the link text names pipes and anonymous inodes, a file named by a path is
/// stat'ed, and only a socket needs its fdinfo (`fdinfo` reads it) to tell a unix socket.
fn look(
    pid: Pid,
    link: &FdLink,
    fdinfo: impl FnOnce() -> Result<fd::FdInfo, CollectError>,
    shell_job: bool,
) -> Result<Seen, CollectError> {
    let fd = link.fd;
    let meta = if shows(link, b"/") && !shows(link, b"/memfd:") {
        Some(meta_of(pid, &fd_link_path(pid, fd), Some(fd))?)
    } else {
        None
    };
    let info = if shows(link, b"socket:") {
        Some(fdinfo()?)
    } else {
        None
    };
    let kind = check_kind(pid, link, meta.as_ref(), info.as_ref(), shell_job)?;
    Ok(Seen { kind, info, meta })
}

/// The fdinfo of `fd` of `pid`, through `dir` if the process's fd directories are open.
fn read_info(pid: Pid, fd: TargetFd, dir: Option<&fd::FdDir>) -> Result<fd::FdInfo, CollectError> {
    match dir {
        Some(dir) => dir.read_fdinfo(fd),
        None => fd::read_fdinfo(pid, fd),
    }
    .map_err(|source| CollectError::Proc {
        pid,
        what: "fdinfo",
        source,
    })
}

/// The `stat` of a file named by a path, as [`look`] got it, or read now.
fn stat_of(
    pid: Pid,
    fd: TargetFd,
    proc_link: &Path,
    meta: Option<std::fs::Metadata>,
) -> Result<std::fs::Metadata, CollectError> {
    match meta {
        Some(meta) => Ok(meta),
        None => meta_of(pid, proc_link, Some(fd)),
    }
}

/// One end of a pipe held by a process of the tree.
#[derive(Debug, Clone, Copy)]
pub struct PipeEnd {
    pub pid: Pid,
    pub fd: TargetFd,
    pub inode: u64,
    pub write: bool,
}

/// Once every process of the tree is collected: the peer of each unix socket must be a
/// socket of the tree too ([`unix::check_peers`]). Returns the `files.img` entries of the
/// outside peers that `--ext-unix-sk` lets restore reach by name.
pub fn check_unix_peers(
    table: &mut FileTable,
    ext_unix_sk: bool,
) -> Result<Vec<FileEntry>, CollectError> {
    let Table { unix, next_id, .. } = table.get();
    let fresh_id = || {
        *next_id += 1;
        *next_id
    };
    Ok(unix::check_peers(unix, fresh_id, ext_unix_sk)?)
}

/// Restore recreates a pipe from its two ends: with one end held outside the dumped tree,
/// the peer could not be rebuilt, unless the user declared the pipe `external` (CRIU's
/// `--external pipe:[INODE]`) and passes that end to restore with `--inherit-fd`. An end
/// that nobody holds any more is fine: restore closes it again. `ends` are the pipe ends of
/// every process.
pub fn check_pipe_peers(ends: &[PipeEnd], external: &[String]) -> Result<(), CollectError> {
    // Pipe inode to (an end of it, has a read end, has a write end).
    let mut pipes: HashMap<u64, (PipeEnd, bool, bool)> = HashMap::new();
    for end in ends {
        let entry = pipes.entry(end.inode).or_insert((*end, false, false));
        if end.write {
            entry.2 = true;
        } else {
            entry.1 = true;
        }
    }
    let mut broken: Vec<_> = pipes.values().filter(|p| !(p.1 && p.2)).collect();
    broken.sort_by_key(|p| (p.0.pid, p.0.fd.as_raw()));
    if broken.is_empty() {
        return Ok(());
    }
    let mut tree: Vec<Pid> = ends.iter().map(|e| e.pid).collect();
    tree.dedup();
    let inodes: Vec<u64> = broken.iter().map(|p| p.0.inode).collect();
    let holders = kobj::outside_holders(&inodes, &tree);
    for &&(end, read, _) in &broken {
        let missing = if read { "write" } else { "read" };
        kobj::check_outside_peer(end, missing, &holders, external)?;
    }
    Ok(())
}

/// Fails on the first fd the dump cannot save in any process of a tree, before anything else
/// is collected. Returns the pipe ends, for [`check_pipe_peers`] once every process of the
/// tree was looked at. Runs in two threads (the fds are only read from `/proc` and
/// duplicated, which needs no ptrace: any thread of ours may do it). The error is the one of
/// the first process in `pids` order that has one, as one by one.
///
/// Then, for a tree of more than one process, starts describing the fds of `pids`, in that
/// order, on a thread of its own (`worker`), for [`collect`] to find ready, and reading
/// their fdinfo ahead of it on another (`prefetch`); a single process's are described by
/// [`collect`] itself.
pub fn precheck_all(
    files: &mut FileTable,
    pids: &[Pid],
    shell_job: bool,
) -> Result<Vec<PipeEnd>, CollectError> {
    let table = files.get();
    let ends = check_every_fd(table, pids, shell_job)?;
    let unread = pids
        .iter()
        .map(|pid| {
            let fds = table.prechecked.get(pid).map_or_else(Vec::new, |seen| {
                seen.iter()
                    .filter(|(_, seen)| seen.info.is_none())
                    .map(|(link, _)| link.fd)
                    .collect()
            });
            (*pid, fds)
        })
        .collect();
    // One process (what a migration dumps): nothing to overlap its fds with but its own
    // injections, and two threads to start cost more than describing a few fds (their
    // start ran 0.45 ms on the CPU the dump then waited for, traced).
    if pids.len() > 1 {
        table.prefetch = Some(prefetch::Prefetch::start(unread));
        files.start_worker(pids.to_vec(), shell_job);
    }
    Ok(ends)
}

/// The checks of [`precheck_all`]: every process is scanned, by two threads, while a third
/// lists the unix sockets (a single process is scanned alone).
fn check_every_fd(
    table: &mut Table,
    pids: &[Pid],
    shell_job: bool,
) -> Result<Vec<PipeEnd>, CollectError> {
    let scan_every = |first: usize| -> Vec<(Pid, Result<Scanned, CollectError>)> {
        pids.iter()
            .skip(first)
            .step_by(2)
            .map(|&pid| (pid, scan(pid, shell_job)))
            .collect()
    };
    let (even, odd, listing) = if let [pid] = pids {
        // One process (what a migration dumps): threads would cost more than they save,
        // and the host's unix sockets are listed only if the process has sockets.
        let scanned = scan(*pid, shell_job);
        let listing = scanned
            .as_ref()
            .is_ok_and(|s| !s.sockets.is_empty())
            .then(unix::UnixSockets::dump)
            .and_then(Result::ok);
        (vec![(*pid, scanned)], Vec::new(), listing)
    } else {
        std::thread::scope(|scope| {
            // Which sockets are unix sockets, from one sock_diag dump taken meanwhile.
            let listing = scope.spawn(unix::UnixSockets::dump);
            let odd = scope.spawn(|| scan_every(1));
            let even = scan_every(0);
            // A panic in a helper is a bug of ours: read those processes again here.
            let odd = odd.join().unwrap_or_else(|_| scan_every(1));
            (even, odd, listing.join().ok().and_then(Result::ok))
        })
    };
    let mut even = even.into_iter();
    let mut odd = odd.into_iter();
    let mut ends = Vec::new();
    for i in 0..pids.len() {
        let next = if i % 2 == 0 { even.next() } else { odd.next() };
        let Some((pid, scanned)) = next else {
            break;
        };
        let mut scanned = scanned?;
        settle_sockets(pid, &mut scanned, listing.as_ref(), shell_job)?;
        table.prechecked.insert(pid, scanned.seen);
        ends.extend(scanned.pipes);
    }
    if let Some(listing) = listing {
        table.unix.set_listing(listing);
    }
    Ok(ends)
}

/// What [`scan`] found of one process.
struct Scanned {
    seen: Vec<(FdLink, Seen)>,
    pipes: Vec<PipeEnd>,
    /// Which of `seen` are sockets, whose kind [`settle_sockets`] tells.
    sockets: Vec<usize>,
}

/// Tells the kind of the sockets of `scanned`: those in the unix `listing` are unix
/// sockets; any other has its fdinfo read and is classified by [`look`]. So a socket that
/// cannot be dumped fails after the other fds of its process were checked.
fn settle_sockets(
    pid: Pid,
    scanned: &mut Scanned,
    listing: Option<&unix::UnixSockets>,
    shell_job: bool,
) -> Result<(), CollectError> {
    for &i in &scanned.sockets {
        let Some((link, seen)) = scanned.seen.get_mut(i) else {
            continue;
        };
        let listed = inet::socket_inode(&link.target.to_string_lossy())
            .and_then(|ino| u32::try_from(ino).ok())
            .is_some_and(|ino| listing.is_some_and(|l| l.get(ino).is_some()));
        if listed {
            seen.kind = FdKind::UnixSocket;
        } else {
            *seen = look(pid, link, || read_info(pid, link.fd, None), shell_job)?;
        }
    }
    Ok(())
}

/// Lists and classifies every fd of `pid` ([`look`]), but its sockets, which wait for the
/// unix listing; fails on the first one the dump cannot save. Also returns its pipe ends.
fn scan(pid: Pid, shell_job: bool) -> Result<Scanned, CollectError> {
    let dir = fd::FdDir::open(pid).map_err(|source| CollectError::Proc {
        pid,
        what: "fd directory",
        source,
    })?;
    let links = dir.list().map_err(|source| CollectError::Proc {
        pid,
        what: "fd list",
        source,
    })?;
    let mut scanned = Scanned {
        seen: Vec::with_capacity(links.len()),
        pipes: Vec::new(),
        sockets: Vec::new(),
    };
    for link in links {
        if shows(&link, b"socket:") {
            scanned.sockets.push(scanned.seen.len());
            let unsettled = Seen {
                kind: FdKind::Unsupported("socket"),
                info: None,
                meta: None,
            };
            scanned.seen.push((link, unsettled));
            continue;
        }
        let seen = look(
            pid,
            &link,
            || read_info(pid, link.fd, Some(&dir)),
            shell_job,
        )?;
        if seen.kind == FdKind::Pipe {
            scanned.pipes.push(pipe_end(pid, &dir, &link)?);
        }
        scanned.seen.push((link, seen));
    }
    Ok(scanned)
}

/// Whether the link text of `link` starts with `prefix`.
fn shows(link: &FdLink, prefix: &[u8]) -> bool {
    link.target
        .as_os_str()
        .as_encoded_bytes()
        .starts_with(prefix)
}

/// The pipe end `link` of `pid`: its direction from the mode of its link in `dir`.
fn pipe_end(pid: Pid, dir: &fd::FdDir, link: &FdLink) -> Result<PipeEnd, CollectError> {
    let mode = dir
        .link_mode(link.fd)
        .map_err(|source| CollectError::Proc {
            pid,
            what: "fd link",
            source,
        })?;
    Ok(PipeEnd {
        pid,
        fd: link.fd,
        inode: kobj::pipe_inode(&link.target.to_string_lossy()).unwrap_or(0),
        write: kobj::is_write_mode(mode),
    })
}

/// [`classify`], with IPv4 and IPv6 sockets told apart from the other sockets by asking a
/// duplicate of the socket for its family.
fn kind_of(
    pid: Pid,
    fd: TargetFd,
    target: &str,
    meta: Option<&std::fs::Metadata>,
    info: Option<&fd::FdInfo>,
) -> Result<FdKind, CollectError> {
    // Only files named by a path are classified by their mode.
    let (mode, rdev) = meta.map_or((0, 0), |m| (m.mode(), m.rdev()));
    let kind = classify(target, mode, rdev);
    // Only unix sockets show `scm_fds` in their fdinfo: with the fdinfo at hand, that
    // settles it without reading it again or duplicating the socket.
    if target.starts_with("socket:") && info.is_some_and(|i| i.get("scm_fds").is_some()) {
        return Ok(FdKind::UnixSocket);
    }
    // Unix first: its test reads fdinfo only, where the others duplicate the socket.
    if target.starts_with("socket:") && unix::is_unix(pid, fd, target)? {
        return Ok(FdKind::UnixSocket);
    }
    if inet::socket_inode(target).is_some() && inet::is_inet(pid, fd)? {
        return Ok(FdKind::Inet);
    }
    Ok(kind)
}

/// What `link` is, or why it cannot be dumped.
fn check_kind(
    pid: Pid,
    link: &FdLink,
    meta: Option<&std::fs::Metadata>,
    info: Option<&fd::FdInfo>,
    shell_job: bool,
) -> Result<FdKind, CollectError> {
    let target = link.target.to_string_lossy().into_owned();
    let kind = kind_of(pid, link.fd, &target, meta, info)?;
    match kind {
        FdKind::Regular
        | FdKind::Memfd
        | FdKind::Fifo
        | FdKind::Inet
        | FdKind::UnixSocket
        | FdKind::Pipe
        | FdKind::Eventfd
        | FdKind::Signalfd
        | FdKind::Timerfd
        | FdKind::Epoll
        | FdKind::Inotify => Ok(kind),
        FdKind::Tty if shell_job => Ok(kind),
        FdKind::Tty => Err(CollectError::Tty {
            pid,
            fd: link.fd,
            path: target,
        }),
        FdKind::Unsupported(kind) => Err(CollectError::UnsupportedFd {
            pid,
            fd: link.fd,
            kind,
            target,
        }),
    }
}

/// One open fd: its file object (shared with earlier dups) and its fdinfo entry. `dir`:
/// the process's fd directories, if open.
fn open_fd(
    table: &mut Table,
    pid: Pid,
    link: &FdLink,
    seen: Option<Seen>,
    dir: Option<&fd::FdDir>,
    shell_job: bool,
) -> Result<(), CollectError> {
    let fd = link.fd;
    let (id, kind, info, new_description) = file_of(table, pid, link, seen, dir, shell_job)?;
    let fd_number = u32::try_from(fd.as_raw()).unwrap_or(0);
    let fd_flags = if info.flags & O_CLOEXEC != 0 {
        FD_CLOEXEC
    } else {
        0
    };
    let held = locks::from_fdinfo(pid, fd, &info)?;
    locks::add(
        &mut table.state.locks,
        &table.state.fdinfo,
        id,
        new_description,
        held,
    );
    let fd_type = match kind {
        FdKind::Fifo => FdTypes::Fifo,
        FdKind::Memfd => FdTypes::Memfd,
        FdKind::Inet => FdTypes::Inetsk,
        FdKind::UnixSocket => FdTypes::Unixsk,
        FdKind::Pipe => FdTypes::Pipe,
        FdKind::Eventfd => FdTypes::Eventfd,
        FdKind::Signalfd => FdTypes::Signalfd,
        FdKind::Timerfd => FdTypes::Timerfd,
        FdKind::Epoll => FdTypes::Eventpoll,
        FdKind::Inotify => FdTypes::Inotify,
        _ => FdTypes::Reg,
    };
    table.state.fdinfo.push(FdinfoEntry {
        id,
        flags: fd_flags,
        r#type: fd_type as i32,
        fd: fd_number,
        xattr_security_selinux: None,
    });
    Ok(())
}

/// A file in flight in a unix socket's queue, of which the peek installed `ours` in our own
/// fd table: described like any fd, as an fd of ours, so that it gets the id of a
/// process's fd on the same description (by `kcmp`) or a new `files.img` entry. Our copy
/// stays open with the table, which may compare later fds with it.
fn in_flight_file(
    table: &mut Table,
    ours: std::os::fd::OwnedFd,
    shell_job: bool,
) -> Result<u32, CollectError> {
    use std::os::fd::AsRawFd;
    let me = unix::our_pid()?;
    let fd = TargetFd(ours.as_raw_fd());
    let proc_link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw()));
    let target = std::fs::read_link(&proc_link).map_err(|source| CollectError::Stat {
        pid: me,
        fd: Some(fd),
        path: proc_link.clone(),
        source,
    })?;
    table.in_flight.push(ours);
    let link = FdLink { fd, target };
    let (id, ..) = file_of(table, me, &link, None, None, shell_job)?;
    Ok(id)
}

/// The file object behind `link` of `pid` (shared with earlier fds on the same open file
/// description, or new), its kind, its fdinfo, and whether it is new.
fn file_of(
    table: &mut Table,
    pid: Pid,
    link: &FdLink,
    seen: Option<Seen>,
    dir: Option<&fd::FdDir>,
    shell_job: bool,
) -> Result<(u32, FdKind, fd::FdInfo, bool), CollectError> {
    let fd = link.fd;
    let proc_link = fd_link_path(pid, fd);
    let target = link.target.to_string_lossy().into_owned();
    let Seen {
        kind,
        info,
        mut meta,
    } = match seen {
        Some(seen) => seen,
        None => look(pid, link, || read_info(pid, fd, dir), shell_job)?,
    };
    let info = match info {
        Some(info) => info,
        None => read_info(pid, fd, dir)?,
    };
    // fdinfo names the inode: pipes, sockets and anonymous inodes need no stat.
    let (mnt_id, ino) = match info.ino {
        Some(ino) => (info.mnt_id, ino),
        None => {
            let stat = stat_of(pid, fd, &proc_link, meta.take())?;
            let inode = (stat.dev(), stat.ino());
            meta = Some(stat);
            inode
        }
    };
    if kind == FdKind::Tty {
        tracing::info!(fd = fd.as_raw(), path = %target,
            "terminal recorded by path (--shell-job): restore reopens it");
    }
    let key = fd_key((mnt_id, ino), &info);
    // A dup'ed fd (or one inherited through fork) is the same open file description: one
    // object, whichever process of the tree holds it.
    let found = table.find_shared(key, pid, fd)?;
    let insert_at = found.err().unwrap_or(0);
    let new_description = found.is_err();
    let id = match found.ok() {
        Some(id) => id,
        None if kind == FdKind::Fifo => {
            let meta = stat_of(pid, fd, &proc_link, meta)?;
            // Restore reopens a FIFO by its path: one unlinked since cannot be reached.
            if meta.nlink() == 0 {
                return Err(CollectError::UnsupportedFd {
                    pid,
                    fd,
                    kind: "deleted FIFO",
                    target,
                });
            }
            let regf_id = table.fresh_id();
            let reg = reg::describe(regf_id, &target, info.flags & !O_CLOEXEC, 0, &meta, None);
            table.state.files.push(reg::file_entry(reg));
            let id = table.fresh_id();
            let inode = ino;
            // Tagged: a FIFO's inode (on its filesystem) may equal a pipe's (on pipefs).
            if table.pipes_read.insert(inode | FIFO_TAG) {
                let data = kobj::fifo_data(pid, fd, inode, &info)?;
                table.state.fifo_data.push(data);
            }
            table.state.files.push(kobj::fifo_entry(id, regf_id, inode));
            table.remember_fd(key, insert_at, pid, fd, id);
            id
        }
        None if kind == FdKind::Memfd => {
            let id = table.fresh_id();
            let flags = info.flags & !O_CLOEXEC;
            let (entry, inode) =
                super::shmem::memfd_file(pid, proc_link.clone(), &target, id, flags, info.pos)?;
            table.state.files.push(entry);
            table.state.memfds.push(inode);
            table.remember_fd(key, insert_at, pid, fd, id);
            id
        }
        None if kind == FdKind::Inet => {
            let id = table.fresh_id();
            let entry = inet::entry(pid, fd, id, info.flags & !O_CLOEXEC, ino)?;
            table.state.files.push(entry);
            table.remember_fd(key, insert_at, pid, fd, id);
            id
        }
        None if kind == FdKind::UnixSocket => {
            let id = table.fresh_id();
            let flags = info.flags & !O_CLOEXEC;
            let queues = &mut table.state.sk_queues;
            let (entry, carried) =
                unix::describe(&mut table.unix, pid, fd, id, flags, ino, queues)?;
            table.state.files.push(entry);
            table.remember_fd(key, insert_at, pid, fd, id);
            // Remembered first: a socket in flight in its own queue is found again.
            for unix::InFlight { packet, fds } in carried {
                let rights = fds
                    .into_iter()
                    .map(|ours| in_flight_file(table, ours, shell_job))
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|source| unix::UnixError::InFlight {
                        pid,
                        fd,
                        ino,
                        source: Box::new(source),
                    })?;
                tracing::debug!(fd = fd.as_raw(), ?rights, "file descriptors in flight");
                if let Some(p) = table.state.sk_queues.get_mut(packet) {
                    unix::set_rights(p, rights);
                }
            }
            id
        }
        None if kind.is_kobj() => {
            let id = table.fresh_id();
            let flags = info.flags & !O_CLOEXEC;
            let entry = match kind {
                FdKind::Eventfd => kobj::eventfd_entry(pid, fd, id, flags, &info)?,
                FdKind::Signalfd => kobj::signalfd_entry(pid, fd, id, flags, &info)?,
                FdKind::Timerfd => kobj::timerfd_entry(pid, fd, id, flags, &info)?,
                FdKind::Epoll => kobj::epoll_entry(pid, fd, id, flags, &info)?,
                FdKind::Inotify => kobj::inotify_entry(pid, fd, id, flags, &info)?,
                _ => {
                    let inode = ino;
                    if !kobj::is_write_end(&info) && !table.pipes_read.contains(&inode) {
                        let data = kobj::pipe_data(table.pidfd_of(pid, fd)?, fd, inode)?;
                        table.state.pipe_data.push(data);
                        table.pipes_read.insert(inode);
                    }
                    kobj::pipe_entry(id, inode, flags)
                }
            };
            table.state.files.push(entry);
            table.remember_fd(key, insert_at, pid, fd, id);
            id
        }
        None => {
            let meta = stat_of(pid, fd, &proc_link, meta)?;
            let id = table.fresh_id();
            let deleted = meta.nlink() == 0 && meta.is_file();
            let name = target
                .strip_suffix(" (deleted)")
                .filter(|_| deleted)
                .unwrap_or(&target)
                .to_owned();
            let reg = reg::describe(
                id,
                &name,
                info.flags & !O_CLOEXEC,
                info.pos,
                &meta,
                (meta.is_file() && !deleted).then_some((proc_link.as_path(), &mut table.build_ids)),
            );
            table.state.files.push(reg::file_entry(reg));
            if deleted {
                add_ghost(table, id, &proc_link, &meta, &name);
            }
            table.remember_fd(key, insert_at, pid, fd, id);
            id
        }
    };
    tracing::debug!(fd = fd.as_raw(), id, path = %target, pos = info.pos, "fd");
    Ok((id, kind, info, new_description))
}

/// The device (major, minor) and inode of the file mapped at `start`, as `maps` shows it.
fn maps_inode(maps: &[tracee::proc::maps::MapsEntry], start: u64) -> Option<(u32, u32, u64)> {
    let at = maps.binary_search_by_key(&start, |m| m.start.get()).ok()?;
    let m = maps.get(at)?;
    (m.inode != 0).then_some((m.dev_major, m.dev_minor, m.inode))
}

/// `O_RDONLY`, `O_WRONLY` or `O_RDWR` from the owner bits of a `map_files` link.
fn open_mode(link_mode: u32) -> u32 {
    const O_WRONLY: u32 = 1;
    const O_RDWR: u32 = 2;
    match (link_mode & 0o400 != 0, link_mode & 0o200 != 0) {
        (true, true) => O_RDWR,
        (false, true) => O_WRONLY,
        _ => 0,
    }
}

/// Collects every fd, the executable, cwd, root and mapped files of `pid` into the tree's
/// `table`. File-mapped VMAs get their file id in `shmid`, as CRIU's `vma_entry` has it.
/// The result holds the fdinfo of the process and only the file objects, ghosts and pipe
/// data this process adds to the tree: objects met earlier keep their id and are not
/// repeated. `with_fds: false` skips the fds: the process shares its fd table with one
/// collected before (`CLONE_FILES`).
#[tracing::instrument(skip_all, fields(pid = %pid))]
pub fn collect(
    files: &mut FileTable,
    pid: Pid,
    umask: u32,
    memory: &mut MemoryState,
    shell_job: bool,
    with_fds: bool,
) -> Result<FilesState, CollectError> {
    let described = files.take_described(pid);
    let table = files.get();
    table.state = match (with_fds, described) {
        // Described by the worker, for nothing if the process shares its fd table.
        (false, _) => {
            table.prechecked.remove(&pid);
            FilesState::default()
        }
        (true, Some(described)) => described?,
        (true, None) => describe_fds(table, pid, shell_job)?,
    };
    collect_paths(table, pid, umask, memory)?;
    let state = std::mem::take(&mut table.state);
    // The next process's fds are described while the tracer reads its other state.
    files.hand_over();
    Ok(state)
}

/// Describes every fd of `pid` into `table` (with what [`precheck_all`] read of them if it
/// did); returns what they add to the tree: their fdinfo and the new file objects, ghosts,
/// pipe data, locks and socket queues.
fn describe_fds(table: &mut Table, pid: Pid, shell_job: bool) -> Result<FilesState, CollectError> {
    table.state = FilesState::default();
    let links: Vec<(FdLink, Option<Seen>)> = match table.prechecked.remove(&pid) {
        Some(seen) => {
            let mut ahead = table
                .prefetch
                .as_ref()
                .and_then(|p| p.take(pid))
                .unwrap_or_default();
            seen.into_iter()
                .map(|(link, mut seen)| {
                    if seen.info.is_none() {
                        seen.info = ahead.remove(&link.fd);
                    }
                    (link, Some(seen))
                })
                .collect()
        }
        None => fd::list(pid)
            .map_err(|source| CollectError::Proc {
                pid,
                what: "fd list",
                source,
            })?
            .into_iter()
            .map(|l| (l, None))
            .collect(),
    };
    // Held open for the fdinfo of every fd: each read then looks up only the fd number.
    let dir = fd::FdDir::open(pid).map_err(|source| CollectError::Proc {
        pid,
        what: "fd directory",
        source,
    })?;
    // Grown once: a file entry is large, and moving them at each growth shows in profiles.
    table.state.fdinfo.reserve(links.len());
    table.state.files.reserve(links.len());
    for (link, seen) in links {
        open_fd(table, pid, &link, seen, Some(&dir), shell_job)?;
    }
    Ok(std::mem::take(&mut table.state))
}

/// Adds the executable, cwd, root and the mapped files of `pid` to `table.state`, and umask.
fn collect_paths(
    table: &mut Table,
    pid: Pid,
    umask: u32,
    memory: &mut MemoryState,
) -> Result<(), CollectError> {
    let mut ahead = table.paths_ahead.remove(&pid).unwrap_or_default();
    for (which, name) in ahead::LINKS.iter().enumerate() {
        let link = PathBuf::from(format!("/proc/{pid}/{name}"));
        let (shown, meta) = match ahead.take_link(which) {
            Some((shown, meta)) => (shown, Some(meta)),
            None => (readlink(pid, &link)?, None),
        };
        let id = path_file(table, pid, &link, &shown, meta)?;
        match which {
            0 => table.state.exe_file_id = id,
            1 => table.state.fs.cwd_id = id,
            _ => table.state.fs.root_id = id,
        }
    }
    table.state.fs.umask = Some(umask);
    // The VMAs of one file (a library's text, data...) are one file object: the device and
    // inode maps shows for each spare a stat of all but the first.
    let mut by_maps: HashMap<(u32, u32, u64), u32> = HashMap::new();
    for mapped in &memory.mapped_files {
        let link = Path::new(&mapped.map_files);
        let shown = memory
            .vmas
            .get(mapped.vma_index)
            .and_then(|vma| maps_inode(&memory.maps, vma.start));
        let id = match shown.and_then(|inode| by_maps.get(&inode)) {
            Some(id) => *id,
            None => {
                let id = path_file(table, pid, link, &mapped.path, None)?;
                if let Some(inode) = shown {
                    by_maps.insert(inode, id);
                }
                id
            }
        };
        if let Some(vma) = memory.vmas.get_mut(mapped.vma_index) {
            vma.shmid = u64::from(id);
            // The map_files link's own mode shows how the mapped file was opened, which
            // restore must match (a shared writable mapping needs O_RDWR).
            let mode = ahead
                .mode(vma.start)
                .or_else(|| std::fs::symlink_metadata(link).ok().map(|meta| meta.mode()));
            if let Some(mode) = mode {
                vma.fdflags = Some(open_mode(mode));
            }
        }
    }
    // A memfd mapping names a memfd file object, one per memfd inode of the tree.
    for m in memory
        .shmem
        .iter()
        .filter(|m| m.kind == super::memory::ShmemKind::Memfd)
    {
        let link = PathBuf::from(&m.map_files);
        let meta = meta_of(pid, &link, None)?;
        let key = (meta.dev(), meta.ino());
        let id = match table.by_inode.get(&key) {
            Some(id) => *id,
            None => {
                let id = table.fresh_id();
                let flags = std::fs::symlink_metadata(&link)
                    .map(|l| open_mode(l.mode()))
                    .unwrap_or(0);
                let shown = format!("/memfd:{}", m.name);
                let (entry, inode) = super::shmem::memfd_file(pid, link, &shown, id, flags, 0)?;
                table.state.files.push(entry);
                table.state.memfds.push(inode);
                table.by_inode.insert(key, id);
                id
            }
        };
        if let Some(vma) = memory.vmas.get_mut(m.vma_index) {
            vma.shmid = u64::from(id);
        }
    }
    tracing::info!(
        fds = table.state.fdinfo.len(),
        files = table.state.files.len(),
        ghosts = table.state.ghosts.len(),
        "files collected"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_files_mode_gives_the_open_mode() {
        assert_eq!(open_mode(0o120_600), 2);
        assert_eq!(open_mode(0o120_400), 0);
        assert_eq!(open_mode(0o120_200), 1);
    }

    #[test]
    fn fd_kinds() {
        assert_eq!(classify("pipe:[123]", 0o010_600, 0), FdKind::Pipe);
        assert_eq!(
            classify("socket:[9]", 0o140_777, 0),
            FdKind::Unsupported("socket")
        );
        assert_eq!(
            classify("anon_inode:[fanotify]", 0o600, 0),
            FdKind::Unsupported("fanotify")
        );
        assert_eq!(classify("/tmp/x", 0o100_644, 0), FdKind::Regular);
        assert_eq!(classify("/tmp", 0o040_755, 0), FdKind::Regular);
        // /dev/null is char 1:3, /dev/pts/0 is 136:0.
        assert_eq!(
            classify("/dev/null", 0o020_666, (1 << 8) | 3),
            FdKind::Regular
        );
        assert_eq!(classify("/dev/pts/0", 0o020_620, 136 << 8), FdKind::Tty);
        assert_eq!(
            classify("/dev/ptmx", 0o020_666, (5 << 8) | 2),
            FdKind::Unsupported("pty master")
        );
        assert_eq!(
            classify("/dev/net/tun", 0o020_666, (10 << 8) | 200),
            FdKind::Unsupported("character device")
        );
        assert_eq!(classify("/tmp/fifo", 0o010_644, 0), FdKind::Fifo);
    }
}
