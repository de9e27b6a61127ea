//! Kernel objects without a path: pipes, eventfds, signalfds, timerfds, epoll sets and inotify,
//! described from fdinfo and from a `pidfd_getfd` duplicate of the very same open file
//! description. Whatever is read through the duplicate is read without consuming it (`tee`
//! for pipe contents).

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::OwnedFd;

use images_format::pb::{
    EventfdFileEntry, EventpollFileEntry, EventpollTfdEntry, FdTypes, FhEntry, FifoEntry,
    FileEntry, FownEntry, InotifyFileEntry, InotifyWdEntry, PipeDataEntry, PipeEntry,
    SignalfdEntry, TimerfdEntry,
};
use rustix::pipe::{PipeFlags, SpliceFlags};
use tracee::pidfd::PidFd;
use tracee::proc::fd::FdInfo;
use tracee::{Pid, TargetFd};

use crate::collect::CollectError;

/// The unread bytes of one pipe, written to `pipes-data.img` after their entry.
#[derive(Debug, Clone)]
pub struct PipeData {
    pub entry: PipeDataEntry,
    pub bytes: Vec<u8>,
}

/// `EFD_SEMAPHORE`. An eventfd is always `O_RDWR`, so its access-mode bits carry nothing:
/// the semaphore mode is kept in bit 0 of `eventfd_file_entry.flags`, where restore looks.
pub const EFD_SEMAPHORE_BIT: u32 = 1;

const O_ACCMODE: u32 = 3;
const O_WRONLY: u32 = 1;

fn kobj_err(
    pid: Pid,
    fd: TargetFd,
    what: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> CollectError {
    move |errno| CollectError::Kobj {
        pid,
        fd,
        what,
        source: errno.into(),
    }
}

/// Whether a pipe fd is its write end, from its fdinfo flags.
pub fn is_write_end(info: &FdInfo) -> bool {
    info.flags & O_ACCMODE == O_WRONLY
}

/// Whether a pipe fd is its write end, from the mode of its `/proc/PID/fd/N` link, whose
/// owner bits say how it was opened.
pub fn is_write_mode(link_mode: u32) -> bool {
    link_mode & 0o600 == 0o200
}

/// `pipe:[INODE]` to the inode.
pub fn pipe_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("pipe:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// One end of a pipe. Both ends share `pipe_id`, the inode (truncated to 32 bits, as CRIU).
pub fn pipe_entry(id: u32, inode: u64, flags: u32) -> FileEntry {
    FileEntry {
        r#type: FdTypes::Pipe as i32,
        id,
        pipe: Some(PipeEntry {
            id,
            pipe_id: inode as u32,
            flags,
            fown: FownEntry::default(),
        }),
        ..FileEntry::default()
    }
}

/// A FIFO (named pipe) opened through `fd`: the path, flags and position go in the regular
/// file entry `regf_id`, as CRIU has it; the FIFO entry `id` (the one fdinfo names) links it
/// to the pipe, whose data goes into `fifo-data.img` under `pipe_id`.
pub fn fifo_entry(id: u32, regf_id: u32, inode: u64) -> FileEntry {
    FileEntry {
        r#type: FdTypes::Fifo as i32,
        id,
        fifo: Some(FifoEntry {
            id,
            pipe_id: inode as u32,
            regf_id: Some(regf_id),
        }),
        ..FileEntry::default()
    }
}

/// The unread bytes and the capacity of the FIFO open at the target's `fd`. A readable end
/// is used as it is; a write-only end is reopened for reading through `/proc` (without
/// blocking: the FIFO has a writer, the target itself), and `tee` consumes nothing either way.
pub fn fifo_data(
    pid: Pid,
    fd: TargetFd,
    inode: u64,
    info: &FdInfo,
) -> Result<PipeData, CollectError> {
    let reader = if is_write_end(info) {
        rustix::fs::open(
            format!("/proc/{pid}/fd/{}", fd.as_raw()),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(kobj_err(pid, fd, "reopen the FIFO for reading"))?
    } else {
        duplicate(pid, fd)?
    };
    data_of(pid, fd, inode, &reader)
}

/// `--external pipe:[INODE]` (also CRIU's `file[MNT_ID:INODE]`, whose mount id is not
/// checked): the inode of a pipe whose other end is outside the dumped tree on purpose, to
/// be given back at restore with `--inherit-fd fd[N]:pipe:[INODE]`.
pub fn external_pipe_inode(spec: &str) -> Option<u64> {
    if let Some(inode) = pipe_inode(spec) {
        return Some(inode);
    }
    let inner = spec.strip_prefix("file[")?.strip_suffix(']')?;
    inner.split_once(':')?.1.parse().ok()
}

/// A pipe end of the tree whose other end is held outside it.
#[derive(Debug, thiserror::Error)]
#[error(
    "dump: pid {pid}: fd {fd} is a pipe (pipe:[{inode}]) whose {missing} end is outside the \
     dumped tree, held by {holders} (if that is intended, dump with --external pipe:[{inode}] \
     and restore with --inherit-fd fd[N]:pipe:[{inode}])"
)]
pub struct PipePeerError {
    pub pid: Pid,
    pub fd: TargetFd,
    pub inode: u64,
    pub missing: &'static str,
    /// `pid P fd F` of each outside holder.
    pub holders: String,
}

/// Every `(pid, fd)` outside `tree` whose fd is one of the pipes `inodes`, keyed by the
/// pipe's inode and whether that fd is its write end (from the access mode in
/// `/proc/PID/fdinfo/FD`), from one walk of `/proc/*/fd`. Processes and fds that vanish or
/// cannot be read meanwhile are skipped.
pub fn outside_holders(inodes: &[u64], tree: &[Pid]) -> HashMap<(u64, bool), Vec<(u32, i32)>> {
    let mut found: HashMap<(u64, bool), Vec<(u32, i32)>> = HashMap::new();
    let held = tracee::proc::fd::holders(|target| {
        target
            .to_str()
            .and_then(pipe_inode)
            .filter(|inode| inodes.contains(inode))
    });
    for (pid, fd, inode) in held {
        if tree.contains(&pid) {
            continue;
        }
        let Ok(info) = tracee::proc::fd::read_fdinfo(pid, fd) else {
            continue;
        };
        let mode = rustix::fs::OFlags::from_bits_retain(info.flags) & rustix::fs::OFlags::ACCMODE;
        let Ok(raw) = u32::try_from(pid.as_raw()) else {
            continue;
        };
        found
            .entry((inode, mode == rustix::fs::OFlags::WRONLY))
            .or_default()
            .push((raw, fd.as_raw()));
    }
    found
}

/// Checks a pipe that lacks its `missing` end in the tree (`end` is the end it has), given
/// the `holders` outside the tree of each such pipe (from [`outside_holders`]). Fine if
/// nobody holds that end any more (restore closes it again; outside holders of the end the
/// tree has do not matter) or if the user declared the pipe external; an error naming the
/// outside holders of the missing end otherwise.
pub fn check_outside_peer(
    end: super::PipeEnd,
    missing: &'static str,
    holders: &HashMap<(u64, bool), Vec<(u32, i32)>>,
    external: &[String],
) -> Result<(), PipePeerError> {
    let (pid, fd, inode) = (end.pid, end.fd, end.inode);
    if external
        .iter()
        .any(|spec| external_pipe_inode(spec) == Some(inode))
    {
        tracing::info!(pid = %pid, fd = fd.as_raw(), inode,
            "pipe declared external: restore must pass its other end with --inherit-fd");
        return Ok(());
    }
    // The missing end is the write end exactly when the tree has the read end.
    let Some(held) = holders.get(&(inode, !end.write)).filter(|h| !h.is_empty()) else {
        tracing::debug!(pid = %pid, fd = fd.as_raw(), inode, missing,
            "pipe end closed everywhere: restored closed");
        return Ok(());
    };
    Err(PipePeerError {
        pid,
        fd,
        inode,
        missing,
        holders: held
            .iter()
            .map(|(p, f)| format!("pid {p} fd {f}"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

pub(super) fn duplicate(pid: Pid, fd: TargetFd) -> Result<OwnedFd, CollectError> {
    let pidfd = PidFd::open(pid).map_err(|source| CollectError::Kcmp { pid, fd, source })?;
    pidfd
        .getfd(fd)
        .map_err(|source| CollectError::Kcmp { pid, fd, source })
}

/// Copies the unread bytes of the pipe whose read end is `fd` with `tee`, which leaves them
/// in the pipe, and its capacity.
/// `pidfd` is a pidfd of `pid`, kept from one pipe to the next.
pub fn pipe_data(pidfd: &PidFd, fd: TargetFd, inode: u64) -> Result<PipeData, CollectError> {
    let pid = pidfd.pid();
    let dup = pidfd
        .getfd(fd)
        .map_err(|source| CollectError::Kcmp { pid, fd, source })?;
    data_of(pid, fd, inode, &dup)
}

/// The unread bytes and capacity of a pipe, through `dup`, a readable fd of it.
fn data_of(pid: Pid, fd: TargetFd, inode: u64, dup: &OwnedFd) -> Result<PipeData, CollectError> {
    let capacity =
        rustix::pipe::fcntl_getpipe_size(dup).map_err(kobj_err(pid, fd, "F_GETPIPE_SZ"))?;
    let queued = rustix::io::ioctl_fionread(dup).map_err(kobj_err(pid, fd, "FIONREAD"))?;
    let queued = usize::try_from(queued).unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    if queued > 0 {
        let (our_r, our_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(kobj_err(pid, fd, "pipe"))?;
        // As many buffer slots as theirs: one tee then takes every buffer at once.
        rustix::pipe::fcntl_setpipe_size(&our_w, capacity).map_err(kobj_err(
            pid,
            fd,
            "F_SETPIPE_SZ on our copy",
        ))?;
        let copied = rustix::pipe::tee(dup, &our_w, queued, SpliceFlags::NONBLOCK)
            .map_err(kobj_err(pid, fd, "tee"))?;
        if copied != queued {
            return Err(CollectError::Kobj {
                pid,
                fd,
                what: "tee copied only part of the pipe",
                source: std::io::Error::other(format!("{copied} of {queued} bytes")),
            });
        }
        drop(our_w);
        std::fs::File::from(our_r)
            .read_to_end(&mut bytes)
            .map_err(|source| CollectError::Kobj {
                pid,
                fd,
                what: "read the copied pipe data",
                source,
            })?;
    }
    tracing::debug!(
        fd = fd.as_raw(),
        inode,
        bytes = bytes.len(),
        capacity,
        "pipe data"
    );
    Ok(PipeData {
        entry: PipeDataEntry {
            pipe_id: inode as u32,
            bytes: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            size: u32::try_from(capacity).ok(),
        },
        bytes,
    })
}

fn hex_field(
    pid: Pid,
    fd: TargetFd,
    info: &FdInfo,
    key: &'static str,
) -> Result<u64, CollectError> {
    info.get(key)
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| CollectError::Kobj {
            pid,
            fd,
            what: key,
            source: std::io::Error::other("missing or malformed fdinfo line"),
        })
}

/// An eventfd: its counter and whether it counts as a semaphore.
pub fn eventfd_entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    info: &FdInfo,
) -> Result<FileEntry, CollectError> {
    let counter = hex_field(pid, fd, info, "eventfd-count")?;
    let semaphore = info
        .get("eventfd-semaphore")
        .is_some_and(|v| v.trim() == "1");
    let flags = (flags & !O_ACCMODE) | if semaphore { EFD_SEMAPHORE_BIT } else { 0 };
    Ok(FileEntry {
        r#type: FdTypes::Eventfd as i32,
        id,
        efd: Some(EventfdFileEntry {
            id,
            flags,
            fown: FownEntry::default(),
            counter,
        }),
        ..FileEntry::default()
    })
}

/// A signalfd: the signals it accepts.
pub fn signalfd_entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    info: &FdInfo,
) -> Result<FileEntry, CollectError> {
    let sigmask = hex_field(pid, fd, info, "sigmask")?;
    Ok(FileEntry {
        r#type: FdTypes::Signalfd as i32,
        id,
        sgfd: Some(SignalfdEntry {
            id,
            flags,
            fown: FownEntry::default(),
            sigmask,
        }),
        ..FileEntry::default()
    })
}

/// An epoll instance and what it watches. fdinfo names each target by the fd number it
/// was added with; restore adds it again through that number, so the number must still
/// hold the very file that was added (an fd closed or replaced since is refused).
pub fn epoll_entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    info: &FdInfo,
) -> Result<FileEntry, CollectError> {
    let mut tfd = Vec::new();
    for (_, line) in info.extra.iter().filter(|(k, _)| k == "tfd") {
        let mut words = line.split_ascii_whitespace();
        let number: Option<i32> = words.next().and_then(|w| w.parse().ok());
        let ino = words
            .find_map(|w| w.strip_prefix("ino:"))
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        let (Some(number), Some(ino)) = (number, ino) else {
            return Err(CollectError::Kobj {
                pid,
                fd,
                what: "epoll target line",
                source: std::io::Error::other(line.clone()),
            });
        };
        let link = format!("/proc/{pid}/fd/{number}");
        let same = std::fs::metadata(&link).map(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino);
        if !matches!(same, Ok(true)) {
            return Err(CollectError::Kobj {
                pid,
                fd,
                what: "epoll watches a file that is no longer open at the fd it was added with",
                source: std::io::Error::other(format!("target fd {number}, inode {ino}")),
            });
        }
    }
    for (target, events, data) in info.epoll_targets() {
        tfd.push(EventpollTfdEntry {
            id,
            tfd: u32::try_from(target.as_raw()).unwrap_or(u32::MAX),
            events,
            data,
            dev: None,
            inode: None,
            pos: None,
        });
    }
    Ok(FileEntry {
        r#type: FdTypes::Eventpoll as i32,
        id,
        epfd: Some(EventpollFileEntry {
            id,
            flags,
            fown: FownEntry::default(),
            tfd,
        }),
        ..FileEntry::default()
    })
}

/// A mount point of the filesystem whose kernel `s_dev` (`major << 20 | minor`) is `sdev`.
fn mount_of(sdev: u64) -> Option<OwnedFd> {
    let wanted = format!("{}:{}", sdev >> 20, sdev & 0xf_ffff);
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        if dev != wanted {
            return None;
        }
        rustix::fs::open(
            point,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok()
    })
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One `inotify wd:` line of fdinfo, with the watched path found through its file handle.
fn inotify_watch(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    line: &str,
) -> Result<InotifyWdEntry, CollectError> {
    let bad = |why: String| CollectError::Kobj {
        pid,
        fd,
        what: "inotify watch",
        source: std::io::Error::other(why),
    };
    let wd: u32 = line
        .split_ascii_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| bad(format!("no wd in {line:?}")))?;
    let field = |key: &str| -> Option<String> {
        line.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_owned))
    };
    let hex = |v: Option<String>| v.and_then(|v| u64::from_str_radix(&v, 16).ok());
    let (Some(ino), Some(sdev), Some(mask), Some(ignored), Some(fh_type), Some(handle)) = (
        hex(field("ino:")),
        hex(field("sdev:")),
        hex(field("mask:")),
        hex(field("ignored_mask:")),
        field("fhandle-type:").and_then(|v| i32::from_str_radix(&v, 16).ok()),
        field("f_handle:").and_then(|v| hex_bytes(&v)),
    ) else {
        return Err(bad(format!("malformed line {line:?}")));
    };
    let mount = mount_of(sdev).ok_or_else(|| bad(format!("no mount of device {sdev:#x}")))?;
    let opened = tracee::kobj::open_by_handle(&mount, fh_type, &handle)
        .map_err(|e| bad(format!("wd {wd}: open_by_handle_at: {e}")))?;
    let path = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&opened)
    ))
    .map_err(|e| bad(format!("wd {wd}: path of the watched inode: {e}")))?;
    let mut words: Vec<u64> = handle
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_ne_bytes(w)
        })
        .collect();
    // CRIU always stores at least 16 words of handle.
    if words.len() < 16 {
        words.resize(16, 0);
    }
    Ok(InotifyWdEntry {
        id,
        i_ino: ino,
        mask: mask as u32,
        ignored_mask: ignored as u32,
        s_dev: sdev as u32,
        wd,
        f_handle: FhEntry {
            bytes: u32::try_from(handle.len()).unwrap_or(0),
            r#type: fh_type as u32,
            handle: words,
            path: Some(path.to_string_lossy().into_owned()),
            mnt_id: None,
        },
    })
}

/// An inotify instance and its watches. Queued events cannot be put back into a new
/// instance, so an instance with unread events is refused rather than silently emptied.
pub fn inotify_entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    info: &FdInfo,
) -> Result<FileEntry, CollectError> {
    let dup = duplicate(pid, fd)?;
    let queued = rustix::io::ioctl_fionread(&dup).map_err(kobj_err(pid, fd, "FIONREAD"))?;
    if queued > 0 {
        return Err(CollectError::Kobj {
            pid,
            fd,
            what: "inotify has unread events, which a restore cannot queue again",
            source: std::io::Error::other(format!("{queued} bytes of events")),
        });
    }
    let mut wd = Vec::new();
    for (_, line) in info.extra.iter().filter(|(k, _)| k == "inotify wd") {
        wd.push(inotify_watch(pid, fd, id, line)?);
    }
    wd.sort_by_key(|w| w.wd);
    Ok(FileEntry {
        r#type: FdTypes::Inotify as i32,
        id,
        ify: Some(InotifyFileEntry {
            id,
            flags,
            fown: FownEntry::default(),
            wd,
        }),
        ..FileEntry::default()
    })
}

/// `(sec, nsec)` as timerfd's fdinfo prints `it_value` and `it_interval`.
fn pair(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// A timerfd: its clock, the time left until it fires (relative, as fdinfo shows it), its
/// period, and the expirations not read yet.
pub fn timerfd_entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    info: &FdInfo,
) -> Result<FileEntry, CollectError> {
    let bad = |what: &'static str| CollectError::Kobj {
        pid,
        fd,
        what,
        source: std::io::Error::other("missing or malformed fdinfo line"),
    };
    let clockid = info
        .get("clockid")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("clockid"))?;
    let ticks = info
        .get("ticks")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("ticks"))?;
    let settime_flags = info
        .get("settime flags")
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| bad("settime flags"))?;
    let (vsec, vnsec) = info
        .get("it_value")
        .and_then(pair)
        .ok_or_else(|| bad("it_value"))?;
    let (isec, insec) = info
        .get("it_interval")
        .and_then(pair)
        .ok_or_else(|| bad("it_interval"))?;
    Ok(FileEntry {
        r#type: FdTypes::Timerfd as i32,
        id,
        tfd: Some(TimerfdEntry {
            id,
            flags,
            fown: FownEntry::default(),
            clockid,
            ticks,
            settime_flags,
            vsec,
            vnsec,
            isec,
            insec,
        }),
        ..FileEntry::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pipe_end_is_fine_when_closed_or_external_and_named_when_held() {
        let end = super::super::PipeEnd {
            pid: Pid::try_from(10u32).expect("pid"),
            fd: TargetFd(1),
            inode: 77,
            write: true,
        };
        let nobody = HashMap::new();
        assert!(check_outside_peer(end, "read", &nobody, &[]).is_ok());
        // Outside holders of the write end, the one the tree has, do not count.
        let same_end = HashMap::from([((77, true), vec![(502, 3)])]);
        assert!(check_outside_peer(end, "read", &same_end, &[]).is_ok());
        let held = HashMap::from([((77, false), vec![(500, 4), (501, 9)])]);
        let err = check_outside_peer(end, "read", &held, &[]).expect_err("held outside");
        let text = err.to_string();
        assert!(
            text.contains("pid 10: fd 1 is a pipe (pipe:[77]) whose read end")
                && text.contains("held by pid 500 fd 4, pid 501 fd 9"),
            "{text}"
        );
        let external = ["pipe:[77]".to_owned()];
        assert!(check_outside_peer(end, "read", &held, &external).is_ok());
        let other = ["pipe:[78]".to_owned()];
        assert!(check_outside_peer(end, "read", &held, &other).is_err());
    }

    #[test]
    fn outside_holders_finds_our_own_pipe() {
        use std::os::fd::AsRawFd;
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        let inode = rustix::fs::fstat(&r).expect("fstat").st_ino;
        let found = outside_holders(&[inode], &[]);
        let ours = std::process::id();
        let fds_of = |write: bool| -> Vec<i32> {
            found
                .get(&(inode, write))
                .map(|h| {
                    h.iter()
                        .filter(|(p, _)| *p == ours)
                        .map(|(_, f)| *f)
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(fds_of(false), vec![r.as_raw_fd()], "read end: {found:?}");
        assert_eq!(fds_of(true), vec![w.as_raw_fd()], "write end: {found:?}");
        let me = Pid::try_from(ours).expect("pid");
        let without_us = outside_holders(&[inode], &[me]);
        assert!(
            !without_us.contains_key(&(inode, false)) && !without_us.contains_key(&(inode, true))
        );
    }

    #[test]
    fn external_pipe_specs() {
        assert_eq!(external_pipe_inode("pipe:[4242]"), Some(4242));
        assert_eq!(external_pipe_inode("file[13:4242]"), Some(4242));
        assert_eq!(external_pipe_inode("unix[4242]"), None);
        assert_eq!(external_pipe_inode("file[4242]"), None);
    }

    #[test]
    fn pipe_inode_from_link() {
        assert_eq!(pipe_inode("pipe:[4242]"), Some(4242));
        assert_eq!(pipe_inode("pipe:[x]"), None);
        assert_eq!(pipe_inode("socket:[1]"), None);
    }

    #[test]
    fn eventfd_keeps_count_and_semaphore() {
        let info = tracee::proc::fd::parse_fdinfo(
            "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1\neventfd-count:                7\neventfd-id: 3\neventfd-semaphore: 1\n",
        )
        .expect("parse");
        let pid = Pid::try_from(1u32).expect("pid");
        let entry = eventfd_entry(pid, TargetFd(3), 5, 0o4002, &info).expect("entry");
        let efd = entry.efd.expect("efd");
        assert_eq!(efd.counter, 7);
        assert_eq!(efd.flags, 0o4000 | EFD_SEMAPHORE_BIT);
    }

    #[test]
    fn timerfd_fields() {
        let info = tracee::proc::fd::parse_fdinfo(
            "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1\nclockid: 1\nticks: 2\nsettime flags: 01\nit_value: (2, 500)\nit_interval: (0, 10000000)\n",
        )
        .expect("parse");
        let pid = Pid::try_from(1u32).expect("pid");
        let tfd = timerfd_entry(pid, TargetFd(3), 5, 2, &info)
            .expect("entry")
            .tfd
            .expect("tfd");
        assert_eq!((tfd.clockid, tfd.ticks, tfd.settime_flags), (1, 2, 1));
        assert_eq!(
            (tfd.vsec, tfd.vnsec, tfd.isec, tfd.insec),
            (2, 500, 0, 10_000_000)
        );
    }

    #[test]
    fn signalfd_without_mask_is_an_error() {
        let info =
            tracee::proc::fd::parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\n").expect("parse");
        let pid = Pid::try_from(1u32).expect("pid");
        assert!(signalfd_entry(pid, TargetFd(3), 5, 2, &info).is_err());
    }
}
