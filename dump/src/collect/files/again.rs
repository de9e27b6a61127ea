//! The files of a tree looked at a second time, for the light second round of a prepared
//! dump (see `collect::refresh`): which trees it may be used for ([`fit`]), and what of
//! their files can change while they run ([`refresh`]).
//!
//! Only trees whose every file is a regular file, a directory, a memory device or a
//! terminal qualify: such a file holds no queued data, and its state in the images (the
//! position, the size, the mode, the name) is read again here. A pipe, a socket, an eventfd,
//! an epoll set... changes with what another process does, without a syscall of the tree.
//! Files of pseudo filesystems (`/proc`, `/sys`, cgroups...) are refused too: a `write` to
//! one can change the process itself (its comm, its memory, its limits).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use images_format::pb::{FdTypes, FileEntry, RegFileEntry};
use images_format::vma::VmaStatus;
use tracee::proc::fd;
use tracee::{Pid, TargetFd};

use super::{is_mem_device, is_tty, major, minor, O_CLOEXEC};
use crate::collect::{CollectError, ProcessState};

/// `O_ACCMODE`, `O_RDONLY`.
const O_ACCMODE: u32 = 3;
const O_RDONLY: u32 = 0;

/// Filesystems whose files change only through the syscalls made on them (`f_type` of
/// `statfs`): disks, tmpfs, overlays, network and FUSE filesystems, and devpts.
const PLAIN_FILESYSTEMS: [(i64, &str); 19] = [
    (0xEF53, "ext4"),
    (0x0102_1994, "tmpfs"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
    (0x794C_7630, "overlay"),
    (0x0102_1997, "9p"),
    (0x6969, "nfs"),
    (0x6573_5546, "fuse"),
    (0x7371_7368, "squashfs"),
    (0xF2F5_2010, "f2fs"),
    (0x8584_58f6, "ramfs"),
    (0x1cd1, "devpts"),
    (0x4d44, "vfat"),
    (0x2011_BAB0, "exfat"),
    (0x2FC1_2FC1, "zfs"),
    (0xE0F5_E1E2, "erofs"),
    (0x9660, "iso9660"),
    (0x5346_544e, "ntfs"),
    (0x3153_464a, "jfs"),
];

/// The memory devices whose reads and writes change nothing of anyone: null, zero, full,
/// random, urandom (`/dev/mem`, `/dev/kmem` and `/dev/port` are major 1 too).
fn harmless_mem_device(rdev: u64) -> bool {
    is_mem_device(rdev) && matches!(minor(rdev), 3 | 5 | 7 | 8 | 9)
}

fn fd_path(pid: Pid, fd: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/fd/{fd}"))
}

/// Why the files of `process` rule out a light second look, if they do. Reads the fds'
/// `statfs` and `stat` (the tree is frozen).
pub fn fit(process: &ProcessState) -> Result<(), String> {
    let pid = process.pid;
    let files = &process.files;
    let kept = [
        (files.ghosts.is_empty(), "a deleted file"),
        (files.remaps.is_empty(), "a remapped file"),
        (files.pipe_data.is_empty(), "pipe data"),
        (files.fifo_data.is_empty(), "FIFO data"),
        (files.locks.is_empty(), "a file lock"),
        (files.memfds.is_empty(), "a memfd"),
        (files.sk_queues.is_empty(), "socket queues"),
    ];
    if let Some((_, what)) = kept.iter().find(|(fine, _)| !fine) {
        return Err(format!("pid {pid} holds {what}"));
    }
    if let Some(file) = files.files.iter().find(|f| f.r#type != FdTypes::Reg as i32) {
        return Err(format!(
            "pid {pid} has file {} of type {}",
            file.id, file.r#type
        ));
    }
    for entry in &files.fdinfo {
        let path = fd_path(pid, entry.fd);
        if entry.r#type != FdTypes::Reg as i32 {
            return Err(format!(
                "pid {pid} fd {} is of type {}",
                entry.fd, entry.r#type
            ));
        }
        let fs = rustix::fs::statfs(&path)
            .map_err(|e| format!("pid {pid} fd {}: statfs: {e}", entry.fd))?;
        #[allow(clippy::unnecessary_cast)]
        let f_type = fs.f_type as i64;
        if !PLAIN_FILESYSTEMS.iter().any(|(magic, _)| *magic == f_type) {
            return Err(format!(
                "pid {pid} fd {} is on a filesystem of type {f_type:#x}",
                entry.fd
            ));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| format!("pid {pid} fd {}: stat: {e}", entry.fd))?;
        let kind = meta.mode() & 0o170_000;
        let plain = match kind {
            0o100_000 | 0o040_000 => true,
            0o020_000 => harmless_mem_device(meta.rdev()) || is_tty(meta.rdev()),
            _ => false,
        };
        if !plain {
            return Err(format!(
                "pid {pid} fd {} is a device {}:{} or special file",
                entry.fd,
                major(meta.rdev()),
                minor(meta.rdev())
            ));
        }
    }
    Ok(())
}

fn stat_err(
    pid: Pid,
    fd: Option<TargetFd>,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> CollectError {
    let path = path.to_path_buf();
    move |source| CollectError::Stat {
        pid,
        fd,
        path,
        source,
    }
}

/// The regular file entry of `id` in the tree's file lists.
fn reg_of(processes: &mut [ProcessState], id: u32) -> Option<&mut RegFileEntry> {
    processes
        .iter_mut()
        .flat_map(|p| p.files.files.iter_mut())
        .find(|f: &&mut FileEntry| f.id == id)
        .and_then(|f| f.reg.as_mut())
}

/// Our own handles on the tree's files, taken at the first look: for an fd, a duplicate of
/// its open file description (`pidfd_getfd`: the very offset and flags); for exe, cwd,
/// root and mapped files, an `O_PATH` open of the file itself. Asking them (`lseek`,
/// `fcntl`, `fstat`) spares a walk of `/proc` paths per question. Best effort: a file not
/// held is looked at through `/proc`, as the full collection does.
#[derive(Debug, Default)]
pub struct Held {
    fds: HashMap<(Pid, u32), OwnedFd>,
    paths: HashMap<PathBuf, OwnedFd>,
}

/// The `/proc` paths of exe, cwd and root, and of one VMA per mapped file, of `process`, with
/// the file id each leads to.
fn path_sources(process: &ProcessState) -> Vec<(PathBuf, u32, Option<&'static str>)> {
    let pid = process.pid;
    let mut out: Vec<(PathBuf, u32, Option<&'static str>)> = [
        ("exe", process.mm.exe_file_id),
        ("cwd", process.files.fs.cwd_id),
        ("root", process.files.fs.root_id),
    ]
    .into_iter()
    .map(|(name, id)| (PathBuf::from(format!("/proc/{pid}/{name}")), id, Some(name)))
    .collect();
    out.extend(
        process
            .mm
            .vmas
            .iter()
            .filter(|v| VmaStatus::from_bits_retain(v.status).maps_file())
            .filter_map(|v| {
                let id = u32::try_from(v.shmid).ok()?;
                let path = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
                Some((PathBuf::from(path), id, None))
            }),
    );
    out
}

/// Takes [`Held`] handles on every file of `processes` (the tree is frozen).
pub fn hold(processes: &[ProcessState]) -> Held {
    let mut held = Held::default();
    for process in processes {
        let pid = process.pid;
        if let Ok(pidfd) = tracee::PidFd::open(pid) {
            for entry in &process.files.fdinfo {
                let Ok(fd) = i32::try_from(entry.fd) else {
                    continue;
                };
                if let Ok(dup) = pidfd.getfd(TargetFd(fd)) {
                    held.fds.insert((pid, entry.fd), dup);
                }
            }
        }
        for (path, _, _) in path_sources(process) {
            let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC;
            if let Ok(fd) = rustix::fs::open(&path, flags, rustix::fs::Mode::empty()) {
                held.paths.insert(path, fd);
            }
        }
    }
    held
}

/// What of a file's `stat` its entry holds.
struct Meta {
    nlink: u64,
    is_file: bool,
    size: u64,
    mode: u32,
}

impl From<std::fs::Metadata> for Meta {
    fn from(meta: std::fs::Metadata) -> Meta {
        Meta {
            nlink: meta.nlink(),
            is_file: meta.is_file(),
            size: meta.size(),
            mode: meta.mode(),
        }
    }
}

impl From<rustix::fs::Stat> for Meta {
    fn from(st: rustix::fs::Stat) -> Meta {
        Meta {
            nlink: st.st_nlink,
            is_file: st.st_mode & 0o170_000 == 0o100_000,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mode: st.st_mode,
        }
    }
}

/// The `stat` of the file at `path`, through its held handle if there is one.
fn meta_at(held: &Held, pid: Pid, fd: Option<TargetFd>, path: &Path) -> Result<Meta, CollectError> {
    if let Some(Ok(st)) = held.paths.get(path).map(rustix::fs::fstat) {
        return Ok(st.into());
    }
    std::fs::metadata(path)
        .map(Meta::from)
        .map_err(stat_err(pid, fd, path))
}

/// What a second look at a file gives: its stat and, for an fd, its position and flags.
struct Seen {
    meta: Meta,
    pos_flags: Option<(u64, u32)>,
    /// The name the kernel shows (for an fd, exe, cwd and root).
    shown: Option<String>,
}

/// Sets what `seen` says into `reg`, as `reg::describe` builds it. `false` if the file is
/// deleted now (it would have to be saved as a ghost: the full collection does that).
fn apply(reg: &mut RegFileEntry, seen: Seen) -> bool {
    if seen.meta.nlink == 0 && seen.meta.is_file {
        return false;
    }
    if let Some((pos, flags)) = seen.pos_flags {
        reg.pos = pos;
        reg.flags = flags & !O_CLOEXEC;
    }
    if let Some(shown) = seen.shown {
        reg.name = shown;
    }
    reg.size = seen.meta.is_file.then_some(seen.meta.size);
    reg.mode = Some(seen.meta.mode);
    true
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// One fd of `pid` looked at again: through the held duplicate of its description where
/// that answers as fdinfo would (position and flags of a regular file or directory, its
/// `stat`), else through `/proc`. Also the build-id of a regular file open for writing
/// (`None` if it is not), as `reg::build_id_of` reads it.
fn fd_again(
    held: &Held,
    pid: Pid,
    fd_number: u32,
) -> Result<(Seen, Option<Vec<u32>>), CollectError> {
    let fd = TargetFd(i32::try_from(fd_number).unwrap_or(-1));
    let path = fd_path(pid, fd_number);
    let dup = held.fds.get(&(pid, fd_number));
    let meta: Meta = match dup.map(rustix::fs::fstat) {
        Some(Ok(st)) => st.into(),
        _ => std::fs::metadata(&path)
            .map(Meta::from)
            .map_err(stat_err(pid, Some(fd), &path))?,
    };
    let is_dir = meta.mode & 0o170_000 == 0o040_000;
    // `lseek(fd, 0, SEEK_CUR)` of a regular file or directory is its position, unchanged;
    // devices have seek methods of their own: fdinfo for them.
    let quick = dup.filter(|_| meta.is_file || is_dir).and_then(|dup| {
        let pos = rustix::fs::seek(dup, rustix::fs::SeekFrom::Current(0)).ok()?;
        let flags = rustix::fs::fcntl_getfl(dup).ok()?;
        Some((pos, flags.bits()))
    });
    let (pos, flags) = match quick {
        Some(answer) => answer,
        None => {
            let info = fd::read_fdinfo(pid, fd).map_err(|source| CollectError::Proc {
                pid,
                what: "fdinfo",
                source,
            })?;
            (info.pos, info.flags)
        }
    };
    let target = std::fs::read_link(&path).map_err(stat_err(pid, Some(fd), &path))?;
    let writable = flags & O_ACCMODE != O_RDONLY && meta.is_file;
    let build_id = writable.then(|| {
        let mut head = [0u8; 4];
        let read = dup.map(|dup| rustix::io::pread(dup, &mut head, 0));
        match read {
            // Not an ELF file: no build-id, as `build_id_of` would find.
            Some(Ok(n)) if n < head.len() || head != ELF_MAGIC => Vec::new(),
            _ => super::reg::build_id_of(&path),
        }
    });
    let seen = Seen {
        meta,
        pos_flags: Some((pos, flags)),
        shown: Some(target.to_string_lossy().into_owned()),
    };
    Ok((seen, build_id))
}

/// The file objects of `processes` (the tree's state from the first look, in tree order)
/// brought up to date: each fd's position and flags, and each file's size, mode and name
/// (another process may have renamed, resized or chmod'ed it). A regular file open for
/// writing gets its build-id read again (a write may have made it an ELF file). `Err` with
/// the reason if a file is deleted now.
pub fn refresh(
    processes: &mut [ProcessState],
    held: &Held,
) -> Result<Result<(), String>, CollectError> {
    let mut done: HashSet<u32> = HashSet::new();
    for at in 0..processes.len() {
        let Some(process) = processes.get(at) else {
            break;
        };
        let pid = process.pid;
        let fds: Vec<(u32, u32)> = process.files.fdinfo.iter().map(|e| (e.fd, e.id)).collect();
        let paths = path_sources(process);
        for (fd_number, id) in fds {
            if !done.insert(id) {
                continue;
            }
            let (seen, build_id) = fd_again(held, pid, fd_number)?;
            let Some(reg) = reg_of(processes, id) else {
                return Ok(Err(format!("pid {pid} fd {fd_number}: no file {id}")));
            };
            if !apply(reg, seen) {
                return Ok(Err(format!(
                    "pid {pid} fd {fd_number}: the file was deleted"
                )));
            }
            if let Some(build_id) = build_id {
                reg.build_id = build_id;
            }
        }
        // In the full collection's order: exe, cwd, root, then the mapped files, whose
        // name is the one maps shows (which the caller found unchanged).
        for (path, id, link) in paths {
            if !done.insert(id) {
                continue;
            }
            let meta = meta_at(held, pid, None, &path)?;
            let shown = match link {
                Some(_) => {
                    let shown = std::fs::read_link(&path).map_err(stat_err(pid, None, &path))?;
                    let shown = shown.to_string_lossy();
                    Some(
                        shown
                            .strip_suffix(" (deleted)")
                            .unwrap_or(&shown)
                            .to_owned(),
                    )
                }
                None => None,
            };
            let Some(reg) = reg_of(processes, id) else {
                return Ok(Err(format!(
                    "pid {pid}: no file {id} for {}",
                    path.display()
                )));
            };
            let seen = Seen {
                meta,
                pos_flags: None,
                shown,
            };
            if !apply(reg, seen) {
                return Ok(Err(format!("pid {pid}: {} was deleted", path.display())));
            }
        }
    }
    Ok(Ok(()))
}
