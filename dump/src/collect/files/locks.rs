//! File locks held through an fd: `flock` locks and open file description (OFD) locks, which
//! belong to the open file description, and POSIX record locks (`fcntl(F_SETLK)`, `lockf`),
//! which belong to a process. They are read from the `lock:` lines of
//! `/proc/PID/fdinfo/FD`, which lists the locks set through that open file description,
//! and saved as CRIU's `file_lock_entry` in `filelocks.img`: the kind (`flag`), `F_RDLCK` or
//! `F_WRLCK` (`type`, for every kind, as CRIU), the process and fd to set it again through,
//! and the byte range (`len` 0 up to the end of the file).
//!
//! A POSIX lock shows in the fdinfo of every process sharing the description it was set
//! through; it is recorded, under its owner's pid (the pid on the line), only from the fd
//! table it belongs to. A request still waiting for a
//! lock (a `->` line) is not a lock: the blocked syscall asks again after restore. Leases,
//! delegations and mandatory locks are refused.

use images_format::pb::{FdinfoEntry, FileLockEntry};
use tracee::proc::fd::FdInfo;
use tracee::{Pid, TargetFd};

/// CRIU's lock kinds (`file_lock_entry.flag`).
pub const FL_POSIX: u32 = 1;
pub const FL_FLOCK: u32 = 2;
pub const FL_OFD: u32 = 4;

/// `F_RDLCK` and `F_WRLCK`.
pub const F_RDLCK: u32 = 0;
pub const F_WRLCK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("dump: pid {pid}: fd {fd}: unreadable lock line {line:?}")]
    Malformed {
        pid: Pid,
        fd: TargetFd,
        line: String,
    },
    #[error("dump: pid {pid}: fd {fd} holds a {kind} lock ({line}), which cannot be dumped yet")]
    Unsupported {
        pid: Pid,
        fd: TargetFd,
        kind: String,
        line: String,
    },
}

/// One `lock:` line of fdinfo: `1: POSIX  ADVISORY  WRITE 3902 fe:00:10010650 5 14`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLine {
    pub kind: String,
    pub mandatory: bool,
    pub write: bool,
    /// The owner for POSIX locks; -1 for OFD locks.
    pub pid: i64,
    pub start: i64,
    /// Inclusive; `None` is "EOF".
    pub end: Option<i64>,
    /// A request blocked on a lock (`->`), not a held lock.
    pub waiting: bool,
}

/// Parses the value of one `lock:` fdinfo line.
pub fn parse_line(value: &str) -> Option<LockLine> {
    let mut words = value.split_ascii_whitespace().peekable();
    words.next()?.strip_suffix(':')?;
    let waiting = words.next_if_eq(&"->").is_some();
    let kind = words.next()?.to_owned();
    // Leases show their state (ACTIVE, BREAKING...) here; their kind refuses them.
    let mandatory = words.next()? == "MANDATORY";
    let write = match words.next()? {
        "WRITE" => true,
        "READ" => false,
        // Leases show BREAKING/UNLCK/... here; the kind refuses them anyway.
        _ => false,
    };
    let pid = words.next()?.parse().ok()?;
    let _dev_ino = words.next()?;
    let start = words.next()?.parse().ok()?;
    let end = match words.next()? {
        "EOF" => None,
        end => Some(end.parse().ok()?),
    };
    Some(LockLine {
        kind,
        mandatory,
        write,
        pid,
        start,
        end,
        waiting,
    })
}

/// Who owns, among the processes using `pid`'s fd table, a POSIX lock the fdinfo of `pid`
/// shows with owner `line_pid`: POSIX locks belong to an fd table (all the processes
/// sharing it through `CLONE_FILES`), and the one that set it is named. `None` for a lock
/// of another table (a process that shares only the open file description): that process
/// saves it itself.
fn posix_owner(pid: Pid, line_pid: i64) -> Option<Pid> {
    if line_pid == i64::from(pid.as_raw()) {
        return Some(pid);
    }
    let other = Pid::try_from(u32::try_from(line_pid).ok()?).ok()?;
    let same = tracee::pidfd::kcmp(pid, other, tracee::pidfd::KcmpType::Files, 0, 0);
    matches!(same, Ok(std::cmp::Ordering::Equal)).then_some(other)
}

/// The locks to save for the target's `fd` (described by `info`), set by this process or on
/// its open file description.
pub fn from_fdinfo(pid: Pid, fd: TargetFd, info: &FdInfo) -> Result<Vec<FileLockEntry>, LockError> {
    let mut locks = Vec::new();
    for (_, value) in info.extra.iter().filter(|(k, _)| k == "lock") {
        let line = parse_line(value).ok_or_else(|| LockError::Malformed {
            pid,
            fd,
            line: value.clone(),
        })?;
        if line.waiting {
            continue;
        }
        let mut owner = pid;
        let flag = match line.kind.as_str() {
            "POSIX" => match posix_owner(pid, line.pid) {
                Some(found) => {
                    owner = found;
                    FL_POSIX
                }
                None => continue,
            },
            "FLOCK" => FL_FLOCK,
            "OFDLCK" => FL_OFD,
            other => {
                return Err(LockError::Unsupported {
                    pid,
                    fd,
                    kind: other.to_lowercase(),
                    line: value.trim().to_owned(),
                })
            }
        };
        if line.mandatory {
            return Err(LockError::Unsupported {
                pid,
                fd,
                kind: "mandatory".to_owned(),
                line: value.trim().to_owned(),
            });
        }
        let len = line.end.map_or(0, |end| end - line.start + 1);
        locks.push(FileLockEntry {
            flag,
            r#type: if line.write { F_WRLCK } else { F_RDLCK },
            pid: owner.as_raw(),
            fd: fd.as_raw(),
            start: line.start,
            len,
        });
    }
    if !locks.is_empty() {
        tracing::debug!(fd = fd.as_raw(), locks = locks.len(), "file locks");
    }
    Ok(locks)
}

/// Adds the locks `found` on the fd of file object `id` to the process's `locks`.
/// Flock and OFD locks belong to the open file description: they are taken once, from the
/// fd that made it `new` (another process or fd sharing it would list them again). A POSIX
/// lock belongs to its process and shows on each of its fds of the description: it is taken
/// once per process and description (`fdinfo` maps the fds seen so far to their ids).
pub fn add(
    locks: &mut Vec<FileLockEntry>,
    fdinfo: &[FdinfoEntry],
    id: u32,
    new: bool,
    found: Vec<FileLockEntry>,
) {
    let id_of = |fd: i32| {
        fdinfo
            .iter()
            .find(|f| i32::try_from(f.fd).ok() == Some(fd))
            .map(|f| f.id)
    };
    for lock in found {
        if lock.flag != FL_POSIX && !new {
            continue;
        }
        let seen = locks.iter().any(|l| {
            l.flag == lock.flag
                && l.r#type == lock.r#type
                && l.start == lock.start
                && l.len == lock.len
                && (l.fd == lock.fd || id_of(l.fd) == Some(id))
        });
        if !seen {
            locks.push(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(lines: &str) -> FdInfo {
        tracee::proc::fd::parse_fdinfo(&format!(
            "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t1\n{lines}"
        ))
        .expect("fdinfo")
    }

    #[test]
    fn each_kind_of_lock_is_read() {
        let pid = Pid::try_from(3902u32).expect("pid");
        let got = from_fdinfo(
            pid,
            TargetFd(4),
            &info(
                "lock:\t1: POSIX  ADVISORY  WRITE 3902 fe:00:10010650 5 14\n\
                 lock:\t2: FLOCK  ADVISORY  READ 3902 fe:00:10010650 0 EOF\n\
                 lock:\t3: OFDLCK ADVISORY  WRITE -1 fe:00:10010650 100 EOF\n\
                 lock:\t4: POSIX  ADVISORY  READ 77 fe:00:10010650 0 EOF\n\
                 lock:\t4: -> POSIX  ADVISORY  WRITE 3902 fe:00:10010650 0 EOF\n",
            ),
        )
        .expect("locks");
        let short: Vec<_> = got
            .iter()
            .map(|l| (l.flag, l.r#type, l.start, l.len, l.fd, l.pid))
            .collect();
        assert_eq!(
            short,
            vec![
                (FL_POSIX, F_WRLCK, 5, 10, 4, 3902),
                (FL_FLOCK, F_RDLCK, 0, 0, 4, 3902),
                (FL_OFD, F_WRLCK, 100, 0, 4, 3902),
            ]
        );
    }

    #[test]
    fn leases_and_garbage_are_refused() {
        let pid = Pid::try_from(5u32).expect("pid");
        assert!(matches!(
            from_fdinfo(
                pid,
                TargetFd(3),
                &info("lock:\t1: LEASE  ACTIVE    READ 5 fe:00:1 0 EOF\n")
            ),
            Err(LockError::Unsupported { .. })
        ));
        assert!(from_fdinfo(pid, TargetFd(3), &info("lock:\tnonsense\n")).is_err());
    }
}
