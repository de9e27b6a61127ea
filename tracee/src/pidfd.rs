//! pidfds and `kcmp`: holding a target's files and telling shared kernel
//! objects apart.
//!
//! References: [pidfd_open(2)](https://man7.org/linux/man-pages/man2/pidfd_open.2.html),
//! [pidfd_getfd(2)](https://man7.org/linux/man-pages/man2/pidfd_getfd.2.html),
//! [kcmp(2)](https://man7.org/linux/man-pages/man2/kcmp.2.html).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::freeze::to_rustix;
use crate::ids::{Pid, TargetFd};
use crate::wait::last_errno;
use rustix::io::Errno;
use rustix::process::{pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

/// A pidfd operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PidfdError {
    /// `pidfd_open` (ESRCH: no such process).
    #[error("pid {pid}: pidfd_open")]
    Open {
        pid: Pid,
        #[source]
        errno: Errno,
    },
    /// `pidfd_getfd` (EBADF: the target has no such fd; ESRCH: it exited).
    #[error("pid {pid}: pidfd_getfd of fd {fd}")]
    GetFd {
        pid: Pid,
        fd: TargetFd,
        #[source]
        errno: Errno,
    },
    /// `kcmp`.
    #[error("kcmp of pids {pid1} and {pid2}")]
    Kcmp {
        pid1: Pid,
        pid2: Pid,
        #[source]
        errno: Errno,
    },
}

/// A pidfd: a handle on a process that cannot be confused with a later
/// process reusing its pid.
#[derive(Debug)]
pub struct PidFd {
    pid: Pid,
    fd: OwnedFd,
}

impl PidFd {
    /// `pidfd_open(pid, 0)`.
    pub fn open(pid: Pid) -> Result<PidFd, PidfdError> {
        let fd = pidfd_open(to_rustix(pid), PidfdFlags::empty())
            .map_err(|errno| PidfdError::Open { pid, errno })?;
        Ok(PidFd { pid, fd })
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// `pidfd_getfd`: a new fd of ours on the very same open file description
    /// as the target's `fd` (shared offset, flags and socket queues).
    ///
    /// # Warning
    /// Reading through it consumes the target's data; changing its offset or
    /// flags changes them for the target too. Peek, and put back what you change.
    pub fn getfd(&self, fd: TargetFd) -> Result<OwnedFd, PidfdError> {
        let raw = fd.as_raw();
        if raw < 0 {
            // rustix asserts on negative fds; the kernel would say EBADF.
            return Err(PidfdError::GetFd {
                pid: self.pid,
                fd,
                errno: Errno::BADF,
            });
        }
        pidfd_getfd(&self.fd, raw, PidfdGetfdFlags::empty()).map_err(|errno| PidfdError::GetFd {
            pid: self.pid,
            fd,
            errno,
        })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What `kcmp` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KcmpType {
    /// The open file descriptions behind fd `idx1` of pid1 and fd `idx2` of pid2.
    File,
    /// The address spaces.
    Vm,
    /// The fd tables.
    Files,
    /// The filesystem info (cwd, root, umask).
    Fs,
    /// The signal handler tables.
    Sighand,
    /// The SysV semaphore undo lists.
    Sysvsem,
    /// The I/O contexts.
    Io,
}

impl KcmpType {
    fn code(self) -> libc::c_long {
        match self {
            KcmpType::File => 0,
            KcmpType::Vm => 1,
            KcmpType::Files => 2,
            KcmpType::Fs => 3,
            KcmpType::Sighand => 4,
            KcmpType::Io => 5,
            KcmpType::Sysvsem => 6,
        }
    }
}

/// `kcmp(pid1, pid2, type, idx1, idx2)`: whether two processes share a kernel
/// object. The result orders objects (for sorting and dedup); `Equal` means shared.
pub fn kcmp(
    pid1: Pid,
    pid2: Pid,
    kind: KcmpType,
    idx1: u64,
    idx2: u64,
) -> Result<std::cmp::Ordering, PidfdError> {
    // SAFETY: kcmp takes only integers; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(pid1.as_raw()),
            libc::c_long::from(pid2.as_raw()),
            kind.code(),
            idx1,
            idx2,
        )
    };
    match ret {
        0 => Ok(std::cmp::Ordering::Equal),
        1 => Ok(std::cmp::Ordering::Less),
        2 => Ok(std::cmp::Ordering::Greater),
        // 3: not equal, but the kernel cannot order them.
        3 => Ok(std::cmp::Ordering::Greater),
        _ => Err(PidfdError::Kcmp {
            pid1,
            pid2,
            errno: last_errno(),
        }),
    }
}

/// `kcmp(KCMP_FILE)`: whether two fds (possibly in two processes) are the same
/// open file description.
pub fn same_file(pid1: Pid, fd1: TargetFd, pid2: Pid, fd2: TargetFd) -> Result<bool, PidfdError> {
    let idx = |fd: TargetFd| u64::try_from(fd.as_raw()).unwrap_or(u64::MAX);
    kcmp(pid1, pid2, KcmpType::File, idx(fd1), idx(fd2)).map(|o| o == std::cmp::Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn getfd_shares_offset_with_target() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(b"hello").expect("write");
        let pidfd = PidFd::open(me).expect("pidfd_open");
        let dup = pidfd.getfd(TargetFd(file.as_raw_fd())).expect("getfd");
        let mut dup = std::fs::File::from(dup);
        dup.seek(SeekFrom::Start(1)).expect("seek");
        let mut s = String::new();
        file.read_to_string(&mut s).expect("read");
        assert_eq!(s, "ello");
        assert!(same_file(
            me,
            TargetFd(file.as_raw_fd()),
            me,
            TargetFd(dup.as_raw_fd())
        )
        .expect("kcmp"));
        assert!(matches!(
            pidfd.getfd(TargetFd(-5)),
            Err(PidfdError::GetFd {
                errno: Errno::BADF,
                ..
            })
        ));
    }

    #[test]
    fn kcmp_vm_of_self_is_equal() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        assert_eq!(
            kcmp(me, me, KcmpType::Vm, 0, 0).expect("kcmp"),
            std::cmp::Ordering::Equal
        );
    }
}
