//! Open files: every fd of the process (`fdinfo-<files_id>.img`), the file objects behind them
//! and behind the executable, cwd, root and file mappings (`files.img`), deleted files kept as
//! ghost images, and `fs-PID.img`. Regular files, directories, character devices reopened by
//! path, pipes with both ends in the process, eventfds, signalfds, timerfds, epoll sets
//! and inotify instances are supported; anything else fails the dump before a single image is written.

mod kobj;
mod reg;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use images_format::pb::{FdTypes, FdinfoEntry, FileEntry, FsEntry, RemapFilePathEntry, RemapType};
use tracee::pidfd;
use tracee::proc::fd::{self, FdLink};
use tracee::{Pid, TargetFd};

use super::memory::MemoryState;
use super::CollectError;

pub use kobj::PipeData;
pub use reg::Ghost;

/// `O_CLOEXEC` as fdinfo shows it: it belongs to the fd, not to the file.
const O_CLOEXEC: u32 = 0o2_000_000;
const FD_CLOEXEC: u32 = 1;

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
    // mappings: restoring it as a plain file would be wrong, so it is refused for now.
    if target.starts_with("/memfd:") {
        return FdKind::Unsupported("memfd");
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
        0o010_000 => FdKind::Unsupported("fifo"),
        0o060_000 => FdKind::Unsupported("block device"),
        _ => FdKind::Unsupported("special file"),
    }
}

/// File objects known so far, with CRIU's single counter of file ids.
#[derive(Default)]
struct FileTable {
    /// Fds already described, with their inode and file id: a dup shares the id.
    by_fd: Vec<(TargetFd, (u64, u64), u32)>,
    /// Files reached by a path (exe, cwd, root, mappings), one id per inode.
    by_inode: Vec<((u64, u64), u32)>,
    next_id: u32,
    next_ghost: u32,
    /// Pipes (by inode) whose data is saved already.
    pipes_read: Vec<u64>,
    state: FilesState,
}

impl FileTable {
    fn fresh_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
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
/// returns its id. `shown` is the path the kernel shows for it. A deleted file (a binary
/// replaced while it runs) is saved as a ghost, as for fds.
fn path_file(
    table: &mut FileTable,
    pid: Pid,
    proc_link: &Path,
    shown: &str,
) -> Result<u32, CollectError> {
    let meta = meta_of(pid, proc_link, None)?;
    let key = (meta.dev(), meta.ino());
    if let Some((_, id)) = table.by_inode.iter().find(|(k, _)| *k == key) {
        return Ok(*id);
    }
    let id = table.fresh_id();
    let deleted = meta.nlink() == 0 && meta.is_file();
    let name = shown.strip_suffix(" (deleted)").unwrap_or(shown);
    let reg = reg::describe(id, name, 0, 0, &meta, Some(proc_link));
    table.state.files.push(reg::file_entry(reg));
    table.by_inode.push((key, id));
    if deleted {
        add_ghost(table, id, proc_link, &meta, name);
    }
    Ok(id)
}

/// Saves a deleted file's contents as a ghost image that stands in for file object `id`.
fn add_ghost(table: &mut FileTable, id: u32, source: &Path, meta: &std::fs::Metadata, name: &str) {
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

/// Fails on the first fd the dump cannot save, before anything else is collected.
pub fn precheck(pid: Pid, shell_job: bool) -> Result<(), CollectError> {
    let links = fd::list(pid).map_err(|source| CollectError::Proc {
        pid,
        what: "fd list",
        source,
    })?;
    // Pipe inode to (an fd of it, has a read end, has a write end).
    let mut pipes: Vec<(u64, TargetFd, bool, bool)> = Vec::new();
    for link in &links {
        let proc_link = PathBuf::from(format!("/proc/{pid}/fd/{}", link.fd.as_raw()));
        let meta = meta_of(pid, &proc_link, Some(link.fd))?;
        check_kind(pid, link, &meta, shell_job)?;
        let target = link.target.to_string_lossy();
        if let Some(inode) = kobj::pipe_inode(&target) {
            let info = fd::read_fdinfo(pid, link.fd).map_err(|source| CollectError::Proc {
                pid,
                what: "fdinfo",
                source,
            })?;
            let write = kobj::is_write_end(&info);
            match pipes.iter_mut().find(|p| p.0 == inode) {
                Some(p) if write => p.3 = true,
                Some(p) => p.2 = true,
                None => pipes.push((inode, link.fd, !write, write)),
            }
        }
    }
    // Restore recreates a pipe from its two ends: with one end elsewhere, the data and
    // the peer could not be rebuilt.
    if let Some(&(inode, fd, read, _)) = pipes.iter().find(|p| !(p.2 && p.3)) {
        return Err(CollectError::PipePeer {
            pid,
            fd,
            inode,
            missing: if read { "write" } else { "read" },
        });
    }
    Ok(())
}

fn check_kind(
    pid: Pid,
    link: &FdLink,
    meta: &std::fs::Metadata,
    shell_job: bool,
) -> Result<(), CollectError> {
    let target = link.target.to_string_lossy().into_owned();
    match classify(&target, meta.mode(), meta.rdev()) {
        FdKind::Regular
        | FdKind::Pipe
        | FdKind::Eventfd
        | FdKind::Signalfd
        | FdKind::Timerfd
        | FdKind::Epoll
        | FdKind::Inotify => Ok(()),
        FdKind::Tty if shell_job => Ok(()),
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

/// One open fd: its file object (shared with earlier dups) and its fdinfo entry.
fn open_fd(
    table: &mut FileTable,
    pid: Pid,
    link: &FdLink,
    shell_job: bool,
) -> Result<(), CollectError> {
    let fd = link.fd;
    let proc_link = PathBuf::from(format!("/proc/{pid}/fd/{}", fd.as_raw()));
    let meta = meta_of(pid, &proc_link, Some(fd))?;
    let target = link.target.to_string_lossy().into_owned();
    check_kind(pid, link, &meta, shell_job)?;
    let kind = classify(&target, meta.mode(), meta.rdev());
    if kind == FdKind::Tty {
        tracing::info!(fd = fd.as_raw(), path = %target,
            "terminal recorded by path (--shell-job): restore reopens it");
    }
    let info = fd::read_fdinfo(pid, fd).map_err(|source| CollectError::Proc {
        pid,
        what: "fdinfo",
        source,
    })?;
    let fd_number = u32::try_from(fd.as_raw()).unwrap_or(0);
    let fd_flags = if info.flags & O_CLOEXEC != 0 {
        FD_CLOEXEC
    } else {
        0
    };
    let key = (meta.dev(), meta.ino());
    // A dup'ed fd (or one inherited twice) is the same open file description: one object.
    let mut shared = None;
    for (other, other_key, id) in &table.by_fd {
        if *other_key == key
            && pidfd::same_file(pid, *other, pid, fd).map_err(|source| CollectError::Kcmp {
                pid,
                fd,
                source,
            })?
        {
            shared = Some(*id);
            break;
        }
    }
    let id = match shared {
        Some(id) => id,
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
                    let inode = meta.ino();
                    if !kobj::is_write_end(&info) && !table.pipes_read.contains(&inode) {
                        let data = kobj::pipe_data(pid, fd, inode)?;
                        table.state.pipe_data.push(data);
                        table.pipes_read.push(inode);
                    }
                    kobj::pipe_entry(id, inode, flags)
                }
            };
            table.state.files.push(entry);
            table.by_fd.push((fd, key, id));
            id
        }
        None => {
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
                (meta.is_file() && !deleted).then_some(proc_link.as_path()),
            );
            table.state.files.push(reg::file_entry(reg));
            if deleted {
                add_ghost(table, id, &proc_link, &meta, &name);
            }
            table.by_fd.push((fd, key, id));
            id
        }
    };
    tracing::debug!(fd = fd.as_raw(), id, path = %target, pos = info.pos, "fd");
    let fd_type = match kind {
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

/// Collects every fd, the executable, cwd, root and mapped files. File-mapped VMAs get
/// their file id in `shmid`, as CRIU's `vma_entry` has it.
#[tracing::instrument(skip_all, fields(pid = %pid))]
pub fn collect(
    pid: Pid,
    umask: u32,
    memory: &mut MemoryState,
    shell_job: bool,
) -> Result<FilesState, CollectError> {
    let mut table = FileTable::default();
    let links = fd::list(pid).map_err(|source| CollectError::Proc {
        pid,
        what: "fd list",
        source,
    })?;
    for link in &links {
        open_fd(&mut table, pid, link, shell_job)?;
    }
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let exe_shown = readlink(pid, &exe)?;
    table.state.exe_file_id = path_file(&mut table, pid, &exe, &exe_shown)?;
    for which in ["cwd", "root"] {
        let link = PathBuf::from(format!("/proc/{pid}/{which}"));
        let shown = readlink(pid, &link)?;
        let id = path_file(&mut table, pid, &link, &shown)?;
        if which == "cwd" {
            table.state.fs.cwd_id = id;
        } else {
            table.state.fs.root_id = id;
        }
    }
    table.state.fs.umask = Some(umask);
    for mapped in &memory.mapped_files {
        let link = Path::new(&mapped.map_files);
        let id = path_file(&mut table, pid, link, &mapped.path)?;
        if let Some(vma) = memory.vmas.get_mut(mapped.vma_index) {
            vma.shmid = u64::from(id);
            // The map_files link's own mode shows how the mapped file was opened, which
            // restore must match (a shared writable mapping needs O_RDWR).
            if let Ok(meta) = std::fs::symlink_metadata(link) {
                vma.fdflags = Some(open_mode(meta.mode()));
            }
        }
    }
    tracing::info!(
        fds = table.state.fdinfo.len(),
        files = table.state.files.len(),
        ghosts = table.state.ghosts.len(),
        "files collected"
    );
    Ok(table.state)
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
        assert_eq!(
            classify("/tmp/fifo", 0o010_644, 0),
            FdKind::Unsupported("fifo")
        );
    }
}
