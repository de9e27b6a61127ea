//! File locks from `filelocks.img` (CRIU's `file_lock_entry`), set again once the files are
//! open.
//!
//! A flock or OFD lock belongs to the open file description: it is set on the description
//! itself, in ckpt-restore, as soon as the description exists ([`apply_on_descriptions`]),
//! and every process that later shares the description shares the lock. A POSIX record lock
//! belongs to a process: the restored process itself sets it through its own fd number,
//! after its fds are in place ([`apply_posix`]). A POSIX lock vanishes as soon as its owner
//! closes any fd of the file, so nothing may close such an fd in the restored process
//! afterwards.
//!
//! Every lock is taken without waiting: it was held at dump time, so another holder now is
//! a conflict to report, not to wait for.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use images_format::dir::ImageDir;
use images_format::error::ImageError;
use images_format::kind::ImageKind;
use images_format::pb;

/// CRIU's lock kinds, as `file_lock_entry.flag` holds them.
const FL_POSIX: u32 = 1;
const FL_FLOCK: u32 = 2;
const FL_OFD: u32 = 4;
const F_RDLCK: u32 = 0;
const F_WRLCK: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("file locks image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("pid {pid}: fd {fd}: lock kind {flag:#x} or type {kind} is not one restore knows")]
    Unknown {
        pid: i32,
        fd: i32,
        flag: u32,
        kind: u32,
    },
    #[error("pid {pid}: fd {fd}: the {what} lock has no open file description to go on")]
    NoFile {
        pid: i32,
        fd: i32,
        what: &'static str,
    },
    #[error("pid {pid}: fd {fd}: set the {what} lock {start}+{len}")]
    Set {
        pid: i32,
        fd: i32,
        what: &'static str,
        start: i64,
        len: i64,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `fcntl(F_SETLK)` / `lockf`: owned by the process.
    Posix,
    /// `flock`: owned by the open file description, always the whole file.
    Flock,
    /// `fcntl(F_OFD_SETLK)`: owned by the open file description.
    Ofd,
}

/// One lock to set again, through fd `fd` of process `pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLock {
    pub kind: LockKind,
    pub write: bool,
    pub pid: i32,
    pub fd: i32,
    pub start: i64,
    /// 0: up to the end of the file, however long it grows.
    pub len: i64,
}

impl FileLock {
    fn what(&self) -> &'static str {
        match self.kind {
            LockKind::Posix => "POSIX",
            LockKind::Flock => "flock",
            LockKind::Ofd => "OFD",
        }
    }

    fn from_entry(e: &pb::FileLockEntry) -> Result<FileLock, LockError> {
        let unknown = LockError::Unknown {
            pid: e.pid,
            fd: e.fd,
            flag: e.flag,
            kind: e.r#type,
        };
        let kind = match e.flag {
            FL_POSIX => LockKind::Posix,
            FL_FLOCK => LockKind::Flock,
            FL_OFD => LockKind::Ofd,
            _ => return Err(unknown),
        };
        let write = match e.r#type {
            F_RDLCK => false,
            F_WRLCK => true,
            _ => return Err(unknown),
        };
        Ok(FileLock {
            kind,
            write,
            pid: e.pid,
            fd: e.fd,
            start: e.start,
            len: e.len,
        })
    }

    /// `struct flock` for `F_SETLK` / `F_OFD_SETLK` (an OFD lock wants `l_pid` 0).
    fn record(&self) -> nix::libc::flock {
        nix::libc::flock {
            l_type: if self.write {
                nix::libc::F_WRLCK as i16
            } else {
                nix::libc::F_RDLCK as i16
            },
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: self.start,
            l_len: self.len,
            l_pid: 0,
        }
    }

    /// Sets this lock on `file` (the description, for flock and OFD; an fd of the calling
    /// process, for POSIX).
    fn set(&self, file: BorrowedFd<'_>) -> Result<(), LockError> {
        use nix::fcntl::{fcntl, FcntlArg};
        let done: std::io::Result<()> = match self.kind {
            LockKind::Flock => {
                let op = if self.write {
                    rustix::fs::FlockOperation::NonBlockingLockExclusive
                } else {
                    rustix::fs::FlockOperation::NonBlockingLockShared
                };
                rustix::fs::flock(file, op).map_err(Into::into)
            }
            LockKind::Ofd => fcntl(file, FcntlArg::F_OFD_SETLK(&self.record()))
                .map(drop)
                .map_err(Into::into),
            LockKind::Posix => fcntl(file, FcntlArg::F_SETLK(&self.record()))
                .map(drop)
                .map_err(Into::into),
        };
        done.map_err(|source| LockError::Set {
            pid: self.pid,
            fd: self.fd,
            what: self.what(),
            start: self.start,
            len: self.len,
            source,
        })
    }
}

/// Every lock of `filelocks.img`; none when the dump wrote no such image.
pub fn load(dir: &ImageDir) -> Result<Vec<FileLock>, LockError> {
    let name = ImageKind::FileLocks.file_name(0);
    let path = dir.path().join(&name);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let entries: Vec<pb::FileLockEntry> =
        dir.read_all(ImageKind::FileLocks, 0)
            .map_err(|source| LockError::Image {
                path: path.clone(),
                source,
            })?;
    entries.iter().map(FileLock::from_entry).collect()
}

/// Sets every flock and OFD lock on its open file description. `description` finds the
/// description that fd `fd` of process `pid` refers to.
pub fn apply_on_descriptions<'a>(
    locks: &[FileLock],
    description: impl Fn(i32, i32) -> Option<BorrowedFd<'a>>,
) -> Result<(), LockError> {
    for lock in locks.iter().filter(|l| l.kind != LockKind::Posix) {
        let file = description(lock.pid, lock.fd).ok_or(LockError::NoFile {
            pid: lock.pid,
            fd: lock.fd,
            what: lock.what(),
        })?;
        lock.set(file)?;
    }
    Ok(())
}

/// Sets the POSIX locks of process `pid`, by the calling process (their owner), through
/// its own fds: to be called by the restored process itself once its fds are in place and
/// every other fd of ours is closed (closing any fd of the file would drop the lock again).
/// `placed` finds the calling process's fd number `fd`.
pub fn apply_posix<'a>(
    locks: &[FileLock],
    pid: i32,
    placed: impl Fn(i32) -> Option<BorrowedFd<'a>>,
) -> Result<(), LockError> {
    for lock in locks
        .iter()
        .filter(|l| l.kind == LockKind::Posix && l.pid == pid)
    {
        let file = placed(lock.fd).ok_or(LockError::NoFile {
            pid,
            fd: lock.fd,
            what: lock.what(),
        })?;
        lock.set(file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flag: u32, kind: u32) -> pb::FileLockEntry {
        pb::FileLockEntry {
            flag,
            r#type: kind,
            pid: 10,
            fd: 3,
            start: 5,
            len: 10,
        }
    }

    #[test]
    fn a_lock_taken_again_blocks_another_description() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("open")
        };
        let (first, second) = (open(), open());
        let ofd = FileLock {
            kind: LockKind::Ofd,
            write: true,
            pid: 1,
            fd: 7,
            start: 0,
            len: 0,
        };
        let flock = FileLock {
            kind: LockKind::Flock,
            ..ofd
        };
        use std::os::fd::AsFd;
        apply_on_descriptions(&[ofd, flock], |pid, fd| {
            ((pid, fd) == (1, 7)).then(|| first.as_fd())
        })
        .expect("locks on the first description");
        let err = ofd
            .set(second.as_fd())
            .expect_err("OFD lock from another description");
        assert!(matches!(err, LockError::Set { .. }), "{err}");
        assert!(
            flock.set(second.as_fd()).is_err(),
            "flock from another description"
        );
        assert!(ofd.set(first.as_fd()).is_ok(), "the owner takes it again");
        let missing = apply_on_descriptions(&[ofd], |_, _| None);
        assert!(matches!(missing, Err(LockError::NoFile { .. })));
    }

    #[test]
    fn image_entries_become_locks() {
        let lock = FileLock::from_entry(&entry(FL_OFD, F_WRLCK)).expect("lock");
        assert_eq!(
            (lock.kind, lock.write, lock.start, lock.len),
            (LockKind::Ofd, true, 5, 10)
        );
        assert!(FileLock::from_entry(&entry(8, F_RDLCK)).is_err(), "a lease");
        assert!(
            FileLock::from_entry(&entry(FL_POSIX, 2)).is_err(),
            "F_UNLCK"
        );
    }
}
