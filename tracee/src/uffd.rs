//! userfaultfd: lazy restore (missing faults served by a daemon) and
//! dirty-page tracking (async write-protect reported by `PAGEMAP_SCAN`).
//!
//! A userfaultfd acts on the address space of the process that created it,
//! whoever issues the ioctls: create it inside the target by injection, take
//! it out with `pidfd_getfd`, and drive it from here.
//!
//! References: [userfaultfd(2)](https://man7.org/linux/man-pages/man2/userfaultfd.2.html),
//! [ioctl_userfaultfd(2)](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::ids::{RemoteAddr, TargetFd, Tid};
use crate::inject::InjectError;
use crate::ptrace::Tracee;
use crate::wait::last_errno;
use rustix::io::Errno;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;

/// `UFFD_USER_MODE_ONLY`: only faults from user mode are reported. Never for
/// lazy restore (a `read()` into a lazy buffer faults in kernel mode).
pub const UFFD_USER_MODE_ONLY: u64 = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED`.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: write faults on protected pages are resolved by
/// the kernel, and `PAGEMAP_SCAN` reports them as written.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// Report write-protect faults' WP flag.
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// Report forks (a new userfaultfd for the child arrives with the event).
        const EVENT_FORK = 1 << 1;
        /// Report mremap.
        const EVENT_REMAP = 1 << 2;
        /// Report MADV_DONTNEED/REMOVE.
        const EVENT_REMOVE = 1 << 3;
        /// Missing faults on hugetlbfs.
        const MISSING_HUGETLBFS = 1 << 4;
        /// Missing faults on shmem.
        const MISSING_SHMEM = 1 << 5;
        /// Report munmap.
        const EVENT_UNMAP = 1 << 6;
        /// SIGBUS instead of fault events.
        const SIGBUS = 1 << 7;
        /// Report the faulting thread id.
        const THREAD_ID = 1 << 8;
        /// Minor faults on hugetlbfs.
        const MINOR_HUGETLBFS = 1 << 9;
        /// Minor faults on shmem.
        const MINOR_SHMEM = 1 << 10;
        /// Exact fault addresses.
        const EXACT_ADDRESS = 1 << 11;
        /// Write-protect on hugetlbfs and shmem.
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// Write-protect unpopulated pages too.
        const WP_UNPOPULATED = 1 << 13;
        /// UFFDIO_POISON.
        const POISON = 1 << 14;
        /// Write faults resolved by the kernel; written pages seen by PAGEMAP_SCAN.
        const WP_ASYNC = 1 << 15;
        /// UFFDIO_MOVE.
        const MOVE = 1 << 16;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on missing pages.
        const MISSING = 1 << 0;
        /// Write-protect faults.
        const WP = 1 << 1;
        /// Minor faults (page in cache, not mapped).
        const MINOR = 1 << 2;
    }
}

/// A userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// An ioctl failed.
    #[error("userfaultfd {op} at {addr} ({len} bytes)")]
    Ioctl {
        op: &'static str,
        addr: RemoteAddr,
        len: u64,
        #[source]
        errno: Errno,
    },
    /// `UFFDIO_COPY`/`ZEROPAGE` stopped early (EAGAIN: the mm changed; retry the rest).
    #[error("userfaultfd {op} at {addr}: {done} of {len} bytes done")]
    Partial {
        op: &'static str,
        addr: RemoteAddr,
        done: u64,
        len: u64,
        #[source]
        errno: Errno,
    },
    /// Creating a userfaultfd in our own process.
    #[error("userfaultfd()")]
    Create(#[source] Errno),
    /// Reading an event.
    #[error("read userfaultfd event")]
    Read(#[source] Errno),
    /// Creating one inside a tracee by injection.
    #[error("tid {tid}: inject userfaultfd()")]
    Inject {
        tid: Tid,
        #[source]
        source: Box<InjectError>,
    },
}

/// An event read from a userfaultfd.
#[derive(Debug)]
pub enum UffdEvent {
    /// A thread faulted at `addr` (`flags`: 1 write, 2 wp, 4 minor).
    Pagefault {
        addr: RemoteAddr,
        flags: u64,
        tid: u32,
    },
    /// The process forked; `uffd` watches the child's copy of the registered ranges.
    Fork { uffd: Userfaultfd },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        from: RemoteAddr,
        to: RemoteAddr,
        len: u64,
    },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)`.
    Remove { start: RemoteAddr, end: RemoteAddr },
    /// `munmap` of `[start, end)`.
    Unmap { start: RemoteAddr, end: RemoteAddr },
    /// An event kind this code does not know.
    Unknown { event: u8 },
}

/// A userfaultfd we hold.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

impl Userfaultfd {
    /// Wraps an fd known to be a userfaultfd (from `pidfd_getfd` or `SCM_RIGHTS`).
    pub fn from_fd(fd: OwnedFd) -> Userfaultfd {
        Userfaultfd { fd }
    }

    /// `userfaultfd(O_CLOEXEC | O_NONBLOCK | extra)` in our own process.
    ///
    /// # Safety
    /// This fd acts on our own address space: register only mappings that no
    /// Rust object lives in (a fresh `mmap`), since filling or protecting
    /// pages changes memory behind the compiler's back.
    pub unsafe fn create_local(extra_flags: u64) -> Result<Userfaultfd, UffdError> {
        let flags = u64::try_from(libc::O_CLOEXEC | libc::O_NONBLOCK).unwrap_or(0) | extra_flags;
        // SAFETY: userfaultfd takes only an integer.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if ret < 0 {
            return Err(UffdError::Create(last_errno()));
        }
        let raw = i32::try_from(ret).map_err(|_| UffdError::Create(Errno::BADF))?;
        // SAFETY: the kernel just returned this new fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Userfaultfd { fd })
    }

    /// # Safety
    /// `T` must be the `#[repr(C)]` struct request `req` reads and writes
    /// (its size is encoded in `req`), with any pointers in it valid.
    unsafe fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> Result<(), Errno> {
        // SAFETY: the caller guarantees `arg` is what `req` expects.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg as *mut T) };
        if ret < 0 {
            Err(last_errno())
        } else {
            Ok(())
        }
    }

    /// `UFFDIO_API`: enables `features` (once per fd); returns the features
    /// the kernel granted and the ioctl bitmask it supports.
    pub fn api(&self, features: Features) -> Result<(Features, u64), UffdError> {
        #[repr(C)]
        struct Api {
            api: u64,
            features: u64,
            ioctls: u64,
        }
        let mut a = Api {
            api: UFFD_API,
            features: features.bits(),
            ioctls: 0,
        };
        // SAFETY: `a` is the #[repr(C)] argument of UFFDIO_API.
        unsafe { self.ioctl(UFFDIO_API, &mut a) }.map_err(|errno| UffdError::Ioctl {
            op: "UFFDIO_API",
            addr: RemoteAddr(0),
            len: 0,
            errno,
        })?;
        Ok((Features::from_bits_retain(a.features), a.ioctls))
    }

    /// `UFFDIO_REGISTER` of `[start, start+len)`; returns the ioctls allowed there.
    pub fn register(
        &self,
        start: RemoteAddr,
        len: u64,
        mode: RegisterMode,
    ) -> Result<u64, UffdError> {
        #[repr(C)]
        struct Register {
            range: Range,
            mode: u64,
            ioctls: u64,
        }
        let mut r = Register {
            range: Range {
                start: start.get(),
                len,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: `r` is the #[repr(C)] argument of UFFDIO_REGISTER.
        unsafe { self.ioctl(UFFDIO_REGISTER, &mut r) }.map_err(|errno| UffdError::Ioctl {
            op: "UFFDIO_REGISTER",
            addr: start,
            len,
            errno,
        })?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_UNREGISTER`.
    pub fn unregister(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        let mut r = Range {
            start: start.get(),
            len,
        };
        // SAFETY: `r` is the #[repr(C)] argument of UFFDIO_UNREGISTER.
        unsafe { self.ioctl(UFFDIO_UNREGISTER, &mut r) }.map_err(|errno| UffdError::Ioctl {
            op: "UFFDIO_UNREGISTER",
            addr: start,
            len,
            errno,
        })
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in the range.
    pub fn wake(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        let mut r = Range {
            start: start.get(),
            len,
        };
        // SAFETY: `r` is the #[repr(C)] argument of UFFDIO_WAKE.
        unsafe { self.ioctl(UFFDIO_WAKE, &mut r) }.map_err(|errno| UffdError::Ioctl {
            op: "UFFDIO_WAKE",
            addr: start,
            len,
            errno,
        })
    }

    /// `UFFDIO_COPY` of `src` (our memory) to `dst` in the registered process,
    /// waking the faulting threads unless `dont_wake`.
    pub fn copy(&self, dst: RemoteAddr, src: &[u8], dont_wake: bool) -> Result<(), UffdError> {
        #[repr(C)]
        struct Copy {
            dst: u64,
            src: u64,
            len: u64,
            mode: u64,
            copy: i64,
        }
        let len = src.len() as u64;
        let mut c = Copy {
            dst: dst.get(),
            src: src.as_ptr() as u64,
            len,
            mode: u64::from(dont_wake),
            copy: 0,
        };
        // SAFETY: `c` is the #[repr(C)] argument of UFFDIO_COPY; its source is
        // `src`, live and `len` bytes long, which the kernel only reads.
        unsafe { self.ioctl(UFFDIO_COPY, &mut c) }.map_err(|errno| UffdError::Partial {
            op: "UFFDIO_COPY",
            addr: dst,
            done: u64::try_from(c.copy).unwrap_or(0),
            len,
            errno,
        })
    }

    /// `UFFDIO_ZEROPAGE` over `[dst, dst+len)`.
    pub fn zeropage(&self, dst: RemoteAddr, len: u64, dont_wake: bool) -> Result<(), UffdError> {
        #[repr(C)]
        struct Zero {
            range: Range,
            mode: u64,
            zeropage: i64,
        }
        let mut z = Zero {
            range: Range {
                start: dst.get(),
                len,
            },
            mode: u64::from(dont_wake),
            zeropage: 0,
        };
        // SAFETY: `z` is the #[repr(C)] argument of UFFDIO_ZEROPAGE.
        unsafe { self.ioctl(UFFDIO_ZEROPAGE, &mut z) }.map_err(|errno| UffdError::Partial {
            op: "UFFDIO_ZEROPAGE",
            addr: dst,
            done: u64::try_from(z.zeropage).unwrap_or(0),
            len,
            errno,
        })
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`true`) or unprotect the range.
    pub fn writeprotect(
        &self,
        start: RemoteAddr,
        len: u64,
        protect: bool,
    ) -> Result<(), UffdError> {
        #[repr(C)]
        struct Wp {
            range: Range,
            mode: u64,
        }
        let mut w = Wp {
            range: Range {
                start: start.get(),
                len,
            },
            mode: u64::from(protect),
        };
        // SAFETY: `w` is the #[repr(C)] argument of UFFDIO_WRITEPROTECT.
        unsafe { self.ioctl(UFFDIO_WRITEPROTECT, &mut w) }.map_err(|errno| UffdError::Ioctl {
            op: "UFFDIO_WRITEPROTECT",
            addr: start,
            len,
            errno,
        })
    }

    /// Reads one event; `None` if none is pending (the fd is non-blocking
    /// when created with `O_NONBLOCK`, else this blocks).
    pub fn read_event(&self) -> Result<Option<UffdEvent>, UffdError> {
        let mut msg = [0u8; 32];
        let n = match rustix::io::read(&self.fd, &mut msg) {
            Ok(n) => n,
            Err(Errno::AGAIN) => return Ok(None),
            Err(errno) => return Err(UffdError::Read(errno)),
        };
        if n != msg.len() {
            return Err(UffdError::Read(Errno::IO));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[8 + i * 8..16 + i * 8]);
            u64::from_ne_bytes(b)
        };
        Ok(Some(match msg[0] {
            0x12 => UffdEvent::Pagefault {
                flags: word(0),
                addr: RemoteAddr(word(1)),
                tid: u32::try_from(word(2) & 0xffff_ffff).unwrap_or(0),
            },
            0x13 => {
                let raw = i32::try_from(word(0) & 0xffff_ffff)
                    .map_err(|_| UffdError::Read(Errno::BADF))?;
                // SAFETY: for a fork event the kernel installed this new fd in
                // our table for us; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                UffdEvent::Fork {
                    uffd: Userfaultfd { fd },
                }
            }
            0x14 => UffdEvent::Remap {
                from: RemoteAddr(word(0)),
                to: RemoteAddr(word(1)),
                len: word(2),
            },
            0x15 => UffdEvent::Remove {
                start: RemoteAddr(word(0)),
                end: RemoteAddr(word(1)),
            },
            0x16 => UffdEvent::Unmap {
                start: RemoteAddr(word(0)),
                end: RemoteAddr(word(1)),
            },
            event => UffdEvent::Unknown { event },
        }))
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Userfaultfd> for OwnedFd {
    fn from(u: Userfaultfd) -> OwnedFd {
        u.fd
    }
}

impl Tracee {
    /// Creates a userfaultfd inside the tracee's process by an injected
    /// `userfaultfd(O_CLOEXEC | O_NONBLOCK | extra_flags)` and returns its fd
    /// number there; take it with [`crate::pidfd::PidFd::getfd`] and close the
    /// target's copy with an injected `close`. Runs with the target's
    /// credentials: without `UFFD_USER_MODE_ONLY` it needs CAP_SYS_PTRACE there.
    pub fn inject_userfaultfd(&mut self, extra_flags: u64) -> Result<TargetFd, UffdError> {
        let flags = u64::try_from(libc::O_CLOEXEC | libc::O_NONBLOCK).unwrap_or(0) | extra_flags;
        let tid = self.tid();
        let fd = self
            .syscall(libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])
            .map_err(|e| UffdError::Inject {
                tid,
                source: Box::new(e),
            })?;
        Ok(TargetFd(i32::try_from(fd).unwrap_or(-1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap_scan::{PageCategories, Pagemap, ScanRequest};
    use crate::{Pid, PAGE_SIZE};

    /// An anonymous mapping of ours, unmapped on drop.
    struct Anon {
        addr: *mut libc::c_void,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Anon {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: a fresh private anonymous mapping chosen by the kernel.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            Anon { addr, len }
        }

        fn start(&self) -> RemoteAddr {
            RemoteAddr(self.addr as u64)
        }

        fn read(&self, off: usize) -> u8 {
            let mut b = [0u8; 1];
            let me = Pid::try_from(std::process::id()).expect("own pid");
            crate::memory::read_remote(me, self.start().saturating_add(off as u64), &mut b)
                .expect("read");
            b[0]
        }

        fn write(&self, off: usize, v: u8) {
            let me = Pid::try_from(std::process::id()).expect("own pid");
            crate::memory::write_remote_fast(me, self.start().saturating_add(off as u64), &[v])
                .expect("write");
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping this guard created and nothing else uses.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }

    #[test]
    fn copy_and_zeropage_fill_missing_pages() {
        // SAFETY: only the fresh `Anon` mapping below is registered.
        let uffd = unsafe { Userfaultfd::create_local(0) }.expect("userfaultfd");
        let (features, _) = uffd.api(Features::empty()).expect("api");
        let _ = features;
        let area = Anon::new(4);
        uffd.register(area.start(), 4 * PAGE_SIZE, RegisterMode::MISSING)
            .expect("register");
        let page = vec![0x5au8; PAGE_SIZE as usize];
        uffd.copy(area.start(), &page, false).expect("copy");
        uffd.zeropage(area.start().saturating_add(PAGE_SIZE), PAGE_SIZE, false)
            .expect("zeropage");
        assert_eq!(area.read(10), 0x5a);
        assert_eq!(area.read(PAGE_SIZE as usize + 10), 0);
        // Filling an existing page again is refused.
        assert!(matches!(
            uffd.copy(area.start(), &page, false),
            Err(UffdError::Partial {
                errno: Errno::EXIST,
                ..
            })
        ));
        assert!(uffd.read_event().expect("read").is_none());
        // Pages 2 and 3 are still missing: unregister before touching them.
        uffd.unregister(area.start(), 4 * PAGE_SIZE)
            .expect("unregister");
        assert_eq!(area.read(3 * PAGE_SIZE as usize), 0);
    }

    #[test]
    fn a_missing_fault_is_reported_and_served() {
        // SAFETY: only the fresh `Anon` mapping below is registered.
        let uffd = unsafe { Userfaultfd::create_local(0) }.expect("userfaultfd");
        uffd.api(Features::THREAD_ID).expect("api");
        let area = Anon::new(2);
        uffd.register(area.start(), 2 * PAGE_SIZE, RegisterMode::MISSING)
            .expect("register");
        let addr = area.start().get() + PAGE_SIZE + 8;
        let reader = std::thread::spawn(move || {
            // SAFETY: `area` stays mapped until the thread is joined below; the
            // read blocks in the kernel until the page is supplied.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let event = loop {
            if let Some(e) = uffd.read_event().expect("read event") {
                break e;
            }
            assert!(std::time::Instant::now() < deadline, "no fault reported");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let UffdEvent::Pagefault {
            addr: at,
            flags,
            tid,
        } = event
        else {
            panic!("unexpected event {event:?}");
        };
        assert_eq!(at.get() & !(PAGE_SIZE - 1), area.start().get() + PAGE_SIZE);
        assert_eq!(flags & 1, 0, "a read fault");
        assert!(tid > 0);
        uffd.copy(
            area.start().saturating_add(PAGE_SIZE),
            &[0x77u8; 4096],
            false,
        )
        .expect("serve the fault");
        assert_eq!(reader.join().expect("reader thread"), 0x77);
    }

    #[test]
    fn async_write_protect_reports_written_pages() {
        // SAFETY: only the fresh `Anon` mapping below is registered.
        let uffd = unsafe { Userfaultfd::create_local(UFFD_USER_MODE_ONLY) }.expect("userfaultfd");
        let (granted, _) = uffd
            .api(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .expect("api");
        assert!(granted.contains(Features::WP_ASYNC));
        let area = Anon::new(8);
        for p in 0..8 {
            area.write(p * PAGE_SIZE as usize, 1);
        }
        uffd.register(area.start(), 8 * PAGE_SIZE, RegisterMode::WP)
            .expect("register");
        uffd.writeprotect(area.start(), 8 * PAGE_SIZE, true)
            .expect("protect");
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let pm = Pagemap::open(me).expect("pagemap");
        let end = area.start().saturating_add(8 * PAGE_SIZE);
        let req = ScanRequest::written_and_reprotect(area.start(), end);
        assert!(pm.scan(&req).expect("first scan").is_empty());
        area.write(2 * PAGE_SIZE as usize, 7);
        area.write(5 * PAGE_SIZE as usize + 9, 7);
        let written = pm.scan(&req).expect("scan");
        let pages: Vec<u64> = written
            .iter()
            .flat_map(|r| (r.start.get()..r.end.get()).step_by(PAGE_SIZE as usize))
            .map(|a| (a - area.start().get()) / PAGE_SIZE)
            .collect();
        assert_eq!(pages, vec![2, 5]);
        assert!(written
            .iter()
            .all(|r| r.categories.contains(PageCategories::WRITTEN)));
        // Reported pages were protected again: a second scan is empty.
        assert!(pm.scan(&req).expect("rescan").is_empty());
    }
}
