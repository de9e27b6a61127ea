//! userfaultfd async write-protect + `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;

use super::{BackendKind, DirtyError, VmaKey};
use crate::ids::{Pid, RemoteAddr};
use crate::pagemap_scan::{PageRegion, Pagemap, PagemapError, ScanRequest};
use crate::pidfd::PidFd;
use crate::ptrace::Tracee;
use crate::uffd::{Features, RegisterMode, UffdError, Userfaultfd, UFFD_USER_MODE_ONLY};
use rustix::io::Errno;

/// How starting to track a VMA went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    Tracked,
    /// The kernel refused (special mapping, another userfaultfd, VMA changed).
    Refused,
    /// The userfaultfd's address space is gone (the process exec'd or exited).
    Dead,
}

#[derive(Debug)]
pub(crate) struct UffdWp {
    pid: Pid,
    uffd: Userfaultfd,
    pagemap: Pagemap,
}

/// Whether this kernel offers async write-protect (asked on a throwaway fd,
/// since `UFFDIO_API` works once per fd).
pub(crate) fn available() -> bool {
    // SAFETY: nothing is registered on this fd; it only answers UFFDIO_API.
    let probe = unsafe { Userfaultfd::create_local(UFFD_USER_MODE_ONLY) };
    probe
        .and_then(|u| u.api(Features::empty()))
        .is_ok_and(|(f, _)| f.contains(Features::WP_ASYNC | Features::WP_UNPOPULATED))
}

impl UffdWp {
    /// Creates the userfaultfd inside the stopped `tracee` (it acts on the mm
    /// of its creator), takes it out, closes the target's copy and enables
    /// async write-protect. Nothing is registered yet.
    pub(crate) fn arm(tracee: &mut Tracee) -> Result<UffdWp, DirtyError> {
        let pid = tracee.pid();
        // User-mode only: the target's own syscalls writing into its memory
        // are still resolved and recorded in the page tables by WP_ASYNC.
        let target_fd = tracee
            .inject_userfaultfd(UFFD_USER_MODE_ONLY)
            .map_err(|source| DirtyError::Uffd { pid, source })?;
        let taken = PidFd::open(pid)
            .and_then(|p| p.getfd(target_fd))
            .map_err(|source| DirtyError::Pidfd { pid, source });
        let fd_arg = u64::try_from(target_fd.as_raw()).unwrap_or(u64::MAX);
        let closed = tracee.syscall(libc::SYS_close, [fd_arg, 0, 0, 0, 0, 0]);
        let taken = taken?;
        closed.map_err(|source| DirtyError::Inject {
            pid,
            source: Box::new(source),
        })?;
        let uffd = Userfaultfd::from_fd(taken);
        let (granted, _) = uffd
            .api(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .map_err(|source| DirtyError::Uffd { pid, source })?;
        if !granted.contains(Features::WP_ASYNC) {
            return Err(DirtyError::Unsupported {
                pid,
                backend: BackendKind::UffdWp,
                what: "UFFD_FEATURE_WP_ASYNC",
            });
        }
        UffdWp::from_fd(pid, uffd.into())
    }

    /// Wraps a tracking userfaultfd received from a holder.
    pub(crate) fn from_fd(pid: Pid, fd: OwnedFd) -> Result<UffdWp, DirtyError> {
        let pagemap = Pagemap::open(pid).map_err(|source| DirtyError::Pagemap { pid, source })?;
        Ok(UffdWp {
            pid,
            uffd: Userfaultfd::from_fd(fd),
            pagemap,
        })
    }

    pub(crate) fn fd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// Registers the VMA and write-protects all of it, so that from now on
    /// every first write to a page is recorded.
    pub(crate) fn start(&mut self, key: &VmaKey) -> Result<Start, DirtyError> {
        let len = key.end.get().saturating_sub(key.start.get());
        match self.uffd.register(key.start, len, RegisterMode::WP) {
            Ok(_) => {}
            Err(UffdError::Ioctl {
                errno: Errno::SRCH, ..
            }) => return Ok(Start::Dead),
            Err(UffdError::Ioctl { .. }) => return Ok(Start::Refused),
            Err(source) => {
                return Err(DirtyError::Uffd {
                    pid: self.pid,
                    source,
                })
            }
        }
        // The protecting scan reports every present page (nothing was
        // protected yet); the caller dumps this VMA whole anyway.
        match self.scan(key) {
            Ok(Some(_)) => Ok(Start::Tracked),
            Ok(None) => {
                self.stop(key);
                Ok(Start::Refused)
            }
            Err(e) => Err(e),
        }
    }

    /// Pages written since the last scan, protected again as they are
    /// reported; `None` if part of the range is no longer registered (the
    /// VMA changed: what was reported before the failure is lost, so the
    /// caller dumps the range whole).
    pub(crate) fn scan(&mut self, key: &VmaKey) -> Result<Option<Vec<PageRegion>>, DirtyError> {
        match self
            .pagemap
            .scan(&ScanRequest::written_and_reprotect(key.start, key.end))
        {
            Ok(r) => Ok(Some(r)),
            Err(PagemapError::Scan {
                errno: Errno::PERM, ..
            }) => Ok(None),
            Err(source) => Err(DirtyError::Pagemap {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Unregisters the VMA (errors ignored: it may be gone).
    pub(crate) fn stop(&mut self, key: &VmaKey) {
        let len = key.end.get().saturating_sub(key.start.get());
        let _ = self.uffd.unregister(RemoteAddr(key.start.get()), len);
    }
}
