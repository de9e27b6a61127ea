//! `/proc/PID/fd` (open fds and what they point to) and `/proc/PID/fdinfo/FD`.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::{Pid, TargetFd};

/// One open fd of the target and its `readlink` text (a path, or
/// `pipe:[ino]`, `socket:[ino]`, `anon_inode:[eventfd]`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdLink {
    /// The fd number in the target.
    pub fd: TargetFd,
    /// What `/proc/PID/fd/N` points to.
    pub target: PathBuf,
}

/// Lists the target's fds with their link targets, ascending. Fds closed
/// between listing and readlink are skipped.
pub fn list(pid: Pid) -> Result<Vec<FdLink>, ProcError> {
    let dir_path = proc_path(pid, None, "fd");
    let dir = std::fs::read_dir(&dir_path).map_err(|source| ProcError::Read {
        path: dir_path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|source| ProcError::Read {
            path: dir_path.clone(),
            source,
        })?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        match std::fs::read_link(entry.path()) {
            Ok(target) => out.push(FdLink {
                fd: TargetFd(fd),
                target,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ProcError::Read {
                    path: entry.path(),
                    source,
                })
            }
        }
    }
    out.sort_by_key(|l| l.fd);
    Ok(out)
}

/// The parsed `/proc/PID/fdinfo/FD`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FdInfo {
    /// File position.
    pub pos: u64,
    /// `O_*` open flags (printed in octal by the kernel).
    pub flags: u32,
    /// Mount id (see mountinfo).
    pub mnt_id: u64,
    /// Inode number, where the kernel prints it.
    pub ino: Option<u64>,
    /// Every other line, as `(key, value)` in file order (the type-specific
    /// lines: `eventfd-count`, `tfd` for each epoll target, `inotify wd`...).
    pub extra: Vec<(String, String)>,
}

impl FdInfo {
    /// The first extra value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Epoll targets: `(target fd, events, data)` of each `tfd:` line.
    pub fn epoll_targets(&self) -> Vec<(TargetFd, u32, u64)> {
        self.extra
            .iter()
            .filter(|(k, _)| k == "tfd")
            .filter_map(|(_, v)| {
                let mut w = v.split_ascii_whitespace();
                let fd = w.next()?.parse().ok()?;
                let mut events = None;
                let mut data = None;
                while let Some(word) = w.next() {
                    match word {
                        "events:" => events = u32::from_str_radix(w.next()?, 16).ok(),
                        "data:" => data = u64::from_str_radix(w.next()?, 16).ok(),
                        _ => {}
                    }
                }
                Some((TargetFd(fd), events?, data?))
            })
            .collect()
    }
}

/// Parses an fdinfo file.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo, ParseError> {
    let mut info = FdInfo::default();
    let mut seen_flags = false;
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let v = value.trim();
        let bad = || ParseError::new("fdinfo", i + 1, "bad value", line);
        match key {
            "pos" => info.pos = v.parse().map_err(|_| bad())?,
            "flags" => {
                info.flags = u32::from_str_radix(v, 8).map_err(|_| bad())?;
                seen_flags = true;
            }
            "mnt_id" => info.mnt_id = v.parse().map_err(|_| bad())?,
            "ino" => info.ino = Some(v.parse().map_err(|_| bad())?),
            _ => info.extra.push((key.trim().to_string(), v.to_string())),
        }
    }
    if !seen_flags {
        return Err(ParseError::new("fdinfo", 0, "no flags line", ""));
    }
    Ok(info)
}

/// Reads `/proc/PID/fdinfo/FD`.
pub fn read_fdinfo(pid: Pid, fd: TargetFd) -> Result<FdInfo, ProcError> {
    let path = proc_path(pid, None, &format!("fdinfo/{}", fd.as_raw()));
    let text = read_text(&path)?;
    parse_with(&path, &text, parse_fdinfo)
}

/// Every fd of the system whose link target `pick` accepts, as `(pid, fd, what pick
/// returned)`, from one walk of `/proc/*/fd`: used to name who holds, outside a dump, the
/// other end of something the dump has. Processes and fds that vanish or cannot be read
/// meanwhile are skipped.
pub fn holders<T>(mut pick: impl FnMut(&std::path::Path) -> Option<T>) -> Vec<(Pid, TargetFd, T)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .and_then(|p| Pid::try_from(p).ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Some(number) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Some(what) = std::fs::read_link(fd.path()).ok().and_then(|t| pick(&t)) else {
                continue;
            };
            found.push((pid, TargetFd(number), what));
        }
    }
    found
}

/// `/proc/PID/fd` and `/proc/PID/fdinfo` of one process, held open: listing the fds and
/// reading each one's link and fdinfo through them resolves only the fd number, instead of
/// `/proc/PID/...` again for every fd (tens of thousands of lookups for a large tree).
#[derive(Debug)]
pub struct FdDir {
    pid: Pid,
    fd: OwnedFd,
    fdinfo: OwnedFd,
}

fn open_dir(pid: Pid, name: &str) -> Result<OwnedFd, ProcError> {
    let path = proc_path(pid, None, name);
    rustix::fs::open(
        &path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| ProcError::Read {
        path,
        source: errno.into(),
    })
}

impl FdDir {
    /// Opens the two directories of `pid`.
    pub fn open(pid: Pid) -> Result<FdDir, ProcError> {
        Ok(FdDir {
            pid,
            fd: open_dir(pid, "fd")?,
            fdinfo: open_dir(pid, "fdinfo")?,
        })
    }

    /// The process's fds with their link targets, ascending, as [`list`] gives them.
    pub fn list(&self) -> Result<Vec<FdLink>, ProcError> {
        let dir_path = proc_path(self.pid, None, "fd");
        let err = |errno: Errno| ProcError::Read {
            path: dir_path.clone(),
            source: errno.into(),
        };
        let mut dir = rustix::fs::Dir::read_from(&self.fd).map_err(err)?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(err)?;
            let Some(fd) = entry
                .file_name()
                .to_str()
                .ok()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            match rustix::fs::readlinkat(&self.fd, entry.file_name(), Vec::new()) {
                Ok(target) => out.push(FdLink {
                    fd: TargetFd(fd),
                    target: PathBuf::from(OsString::from_vec(target.into_bytes())),
                }),
                // Closed since the listing.
                Err(Errno::NOENT) => {}
                Err(errno) => {
                    return Err(ProcError::Read {
                        path: dir_path.join(fd.to_string()),
                        source: errno.into(),
                    })
                }
            }
        }
        out.sort_by_key(|l| l.fd);
        Ok(out)
    }

    /// The mode of the `/proc/PID/fd/N` link itself (`lstat`): its owner read and write
    /// bits tell whether `fd` was opened for reading and for writing, at the cost of one
    /// `statx` instead of opening and reading the fdinfo.
    pub fn link_mode(&self, fd: TargetFd) -> Result<u32, ProcError> {
        rustix::fs::statat(
            &self.fd,
            fd.as_raw().to_string(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map(|st| st.st_mode)
        .map_err(|errno| ProcError::Read {
            path: proc_path(self.pid, None, &format!("fd/{}", fd.as_raw())),
            source: errno.into(),
        })
    }

    /// The fdinfo of `fd`, as [`read_fdinfo`] gives it.
    pub fn read_fdinfo(&self, fd: TargetFd) -> Result<FdInfo, ProcError> {
        // Named only for errors: built on the way out, not for every fd.
        let path = || proc_path(self.pid, None, &format!("fdinfo/{}", fd.as_raw()));
        let read_err = |errno: Errno| ProcError::Read {
            path: path(),
            source: errno.into(),
        };
        let file = rustix::fs::openat(
            &self.fdinfo,
            fd.as_raw().to_string(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(read_err)?;
        let bytes = read_whole_show(&file).map_err(read_err)?;
        parse_with(&path(), &String::from_utf8_lossy(&bytes), parse_fdinfo)
    }
}

/// The text of a `/proc` file the kernel makes with one `show` call (a `single_open` seq
/// file, as every fdinfo is): the kernel hands out all of it that fits, so a read that
/// does not fill the buffer got the end, and the read that would only say "end of file" is
/// not made (one syscall less per fd, tens of thousands in a large tree).
fn read_whole_show(file: &OwnedFd) -> Result<Vec<u8>, Errno> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match rustix::io::read(file, &mut chunk) {
            Ok(n) => {
                bytes.extend_from_slice(chunk.get(..n).unwrap_or_default());
                if n < chunk.len() {
                    return Ok(bytes);
                }
            }
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_file() {
        let i =
            parse_fdinfo("pos:\t12\nflags:\t02100002\nmnt_id:\t27\nino:\t1835\n").expect("valid");
        assert_eq!(i.pos, 12);
        assert_eq!(i.flags, 0o2100002);
        assert_eq!(i.mnt_id, 27);
        assert_eq!(i.ino, Some(1835));
        assert!(i.extra.is_empty());
    }

    #[test]
    fn parses_epoll_and_eventfd() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
tfd:        5 events:       19 data:                5  pos:0 ino:3f4 sdev:8\n\
tfd:        7 events:        1 data: ffffffffffffffff  pos:0 ino:3f5 sdev:8\n";
        let i = parse_fdinfo(text).expect("valid");
        assert_eq!(
            i.epoll_targets(),
            vec![(TargetFd(5), 0x19, 5), (TargetFd(7), 1, u64::MAX)]
        );
        let e = parse_fdinfo(
            "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t9\neventfd-count:        2a\neventfd-id: 3\n",
        )
        .expect("valid");
        assert_eq!(e.get("eventfd-count"), Some("2a"));
    }

    #[test]
    fn rejects_missing_flags() {
        assert!(parse_fdinfo("pos:\t0\n").is_err());
        assert!(parse_fdinfo("pos:\tx\nflags:\t0\n").is_err());
    }

    #[test]
    fn lists_own_fds() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let file = tempfile::tempfile().expect("tempfile");
        use std::os::fd::AsRawFd;
        let raw = file.as_raw_fd();
        let fds = list(me).expect("own fds");
        assert!(fds.iter().any(|l| l.fd == TargetFd(raw)));
        let info = read_fdinfo(me, TargetFd(raw)).expect("own fdinfo");
        assert_eq!(info.pos, 0);
    }

    #[test]
    fn fd_dir_reads_as_the_paths_do() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let file = tempfile::tempfile().expect("tempfile");
        use std::io::Write;
        use std::os::fd::AsRawFd;
        (&file).write_all(b"abc").expect("write");
        let raw = TargetFd(file.as_raw_fd());
        let dir = FdDir::open(me).expect("own fd dirs");
        let listed = dir.list().expect("own fds");
        let link = listed
            .iter()
            .find(|l| l.fd == raw)
            .expect("our file listed");
        let by_path = list(me).expect("own fds");
        let same = by_path
            .iter()
            .find(|l| l.fd == raw)
            .expect("our file listed");
        assert_eq!(link, same);
        let info = dir.read_fdinfo(raw).expect("own fdinfo");
        assert_eq!(info.pos, 3);
        assert_eq!(info, read_fdinfo(me, raw).expect("own fdinfo"));
        assert!(dir.read_fdinfo(TargetFd(1 << 30)).is_err());
        assert_eq!(dir.link_mode(raw).expect("link mode") & 0o600, 0o600);
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        assert_eq!(
            dir.link_mode(TargetFd(r.as_raw_fd())).expect("mode") & 0o600,
            0o400
        );
        assert_eq!(
            dir.link_mode(TargetFd(w.as_raw_fd())).expect("mode") & 0o600,
            0o200
        );
        assert!(dir.link_mode(TargetFd(1 << 30)).is_err());
    }

    #[test]
    fn fdinfo_longer_than_one_read_comes_whole() {
        use rustix::event::epoll;
        use std::os::fd::AsRawFd;
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
        // A tfd line is about 90 bytes: 100 targets make several pages of fdinfo.
        let targets: Vec<OwnedFd> = (0..100)
            .map(|_| {
                rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd")
            })
            .collect();
        for (i, t) in targets.iter().enumerate() {
            epoll::add(
                &ep,
                t,
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )
            .expect("epoll add");
        }
        let dir = FdDir::open(me).expect("own fd dirs");
        let info = dir.read_fdinfo(TargetFd(ep.as_raw_fd())).expect("fdinfo");
        assert_eq!(info.epoll_targets().len(), 100);
        assert_eq!(
            info,
            read_fdinfo(me, TargetFd(ep.as_raw_fd())).expect("fdinfo by path")
        );
    }
}
