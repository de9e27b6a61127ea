//! What this kernel offers, probed once.
#![allow(unsafe_code)]

use crate::ids::{Pid, RemoteAddr};
use crate::pagemap_scan::{Pagemap, PagemapError, ScanRequest};
use crate::pidfd::{PidFd, PidfdError};
use crate::ptrace::{SeizeOptions, Tracee};
use crate::wait::{last_errno, wait_tid};
use rustix::io::Errno;

/// Kernel features ckpt depends on or can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `PAGEMAP_SCAN` on `/proc/PID/pagemap` (6.7+).
    pub pagemap_scan: bool,
    /// `clone3` exists (5.3+); `set_tid` came with 5.5, which `kernel_release` tells.
    pub clone3: bool,
    /// `pidfd_getfd` (5.6+).
    pub pidfd_getfd: bool,
    /// Size of the `NT_X86_XSTATE` regset, measured on a child; `None` if
    /// the probe child could not be traced.
    pub xsave_size: Option<usize>,
    /// The XCR0 the kernel reports in that regset.
    pub xcr0: Option<u64>,
    /// The userfaultfd features `UFFDIO_API` offers (`None`: no userfaultfd).
    pub uffd_features: Option<u64>,
    /// `kernel.pid_max`.
    pub pid_max: Option<i32>,
    /// `uname -r`.
    pub kernel_release: String,
}

fn probe_pagemap_scan() -> bool {
    let Ok(me) = Pid::try_from(std::process::id()) else {
        return false;
    };
    let Ok(pm) = Pagemap::open(me) else {
        return false;
    };
    !matches!(
        pm.scan(&ScanRequest::present(
            RemoteAddr(0),
            RemoteAddr(crate::PAGE_SIZE)
        )),
        Err(PagemapError::Scan { .. })
    )
}

fn probe_pidfd_getfd() -> bool {
    let Ok(me) = Pid::try_from(std::process::id()) else {
        return false;
    };
    match PidFd::open(me) {
        Ok(pidfd) => !matches!(
            pidfd.getfd(crate::TargetFd(std::os::fd::AsRawFd::as_raw_fd(
                &std::os::fd::AsFd::as_fd(&pidfd)
            ))),
            Err(PidfdError::GetFd {
                errno: Errno::NOSYS,
                ..
            })
        ),
        Err(_) => false,
    }
}

fn probe_uffd() -> Option<u64> {
    // SAFETY: nothing is ever registered on this fd; it only answers UFFDIO_API.
    let uffd =
        unsafe { crate::uffd::Userfaultfd::create_local(crate::uffd::UFFD_USER_MODE_ONLY) }.ok()?;
    uffd.api(crate::uffd::Features::empty())
        .ok()
        .map(|(f, _)| f.bits())
}

fn probe_clone3() -> bool {
    // A zero size is rejected with EINVAL by a kernel that has clone3, ENOSYS otherwise.
    // SAFETY: a null args pointer with size 0 is rejected before anything is read.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    ret < 0 && last_errno() != Errno::NOSYS
}

/// Measures the xsave regset on a short-lived child that only sleeps.
fn probe_xsave() -> Option<(usize, Option<u64>)> {
    // SAFETY: the child runs only async-signal-safe code (pause and _exit),
    // so forking from a multi-threaded process is sound.
    let child = unsafe { libc::fork() };
    if child == 0 {
        loop {
            // SAFETY: pause takes no arguments and is async-signal-safe.
            unsafe { libc::pause() };
        }
    }
    let pid = Pid::from_raw(child)?;
    let result = Tracee::seize_and_interrupt(pid, pid.leader(), SeizeOptions::empty())
        .ok()
        .and_then(|t| t.get_xsave().ok())
        .map(|x| (x.len(), x.xcr0()));
    // The tracee (if any) was detached when dropped; now kill and reap our child.
    let _ =
        rustix::process::kill_process(crate::freeze::to_rustix(pid), rustix::process::Signal::KILL);
    let _ = wait_tid(pid.leader());
    result
}

impl KernelFeatures {
    /// Probes the running kernel. Forks one short-lived child for the xsave size.
    pub fn probe() -> KernelFeatures {
        let xsave = probe_xsave();
        KernelFeatures {
            pagemap_scan: probe_pagemap_scan(),
            clone3: probe_clone3(),
            pidfd_getfd: probe_pidfd_getfd(),
            xsave_size: xsave.map(|x| x.0),
            xcr0: xsave.and_then(|x| x.1),
            uffd_features: probe_uffd(),
            pid_max: std::fs::read_to_string("/proc/sys/kernel/pid_max")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            kernel_release: rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_this_kernel() {
        let k = KernelFeatures::probe();
        assert!(k.clone3);
        assert!(k.pidfd_getfd);
        assert!(k.pid_max.is_some_and(|p| p > 300));
        assert!(k.uffd_features.is_some());
        let size = k.xsave_size.expect("xsave measured");
        assert!(size >= 576, "{size}");
        assert!(k.xcr0.is_some_and(|x| x & 3 == 3));
        // This project's machines run 6.7+; elsewhere PAGEMAP_SCAN may be absent.
        eprintln!("features: {k:?}");
    }
}
