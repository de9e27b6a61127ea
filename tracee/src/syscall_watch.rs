//! Counting the syscalls threads make outside an allowlist, with no cost to them while they
//! run: one perf counter per thread on the `raw_syscalls:sys_enter` tracepoint, filtered in
//! the kernel (`PERF_EVENT_IOC_SET_FILTER`) to the syscall numbers *not* allowed. A count of
//! zero then says that every syscall entered since the counter was opened is one of the
//! allowed ones.
//!
//! The count is per thread (`pid` = the thread id, any CPU) and not inherited: a thread born
//! later has no counter, which the caller sees by comparing thread lists; its birth (a
//! `clone`) is counted in its parent's counter anyway, unless `clone` is allowed.
//!
//! What the tracepoint cannot tell: a 64-bit thread may still make 32-bit syscalls with
//! `int $0x80`; those enter with their i386 numbers, which the filter reads as x86_64 ones.
//!
//! References: `perf_event_open(2)`; `include/trace/events/syscalls.h` (the `id` field).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::Tid;

/// `PERF_TYPE_TRACEPOINT`: `config` is a tracepoint id.
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_ATTR_SIZE_VER0`: the first 64 bytes of `struct perf_event_attr`, all we set.
const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_EVENT_IOC_SET_FILTER`: `_IOW('$', 6, char *)`.
const PERF_EVENT_IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;
/// Where tracefs shows the tracepoint's id: mounted on its own, or under debugfs.
const TRACEPOINT_ID_PATHS: [&str; 2] = [
    "/sys/kernel/tracing/events/raw_syscalls/sys_enter/id",
    "/sys/kernel/debug/tracing/events/raw_syscalls/sys_enter/id",
];

/// The first 64 bytes of the kernel's `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`).
#[repr(C)]
#[derive(Debug, Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bit fields (`disabled`, `inherit`, ...): all clear, so the counter runs at once
    /// and only for the thread it was opened on.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// A watch could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("syscall watch: the raw_syscalls:sys_enter tracepoint is not visible (no tracefs)")]
    NoTracepoint,
    #[error("syscall watch: tid {tid}: open a perf counter")]
    Open {
        tid: Tid,
        #[source]
        source: std::io::Error,
    },
    #[error("syscall watch: tid {tid}: set the syscall filter")]
    Filter {
        tid: Tid,
        #[source]
        source: std::io::Error,
    },
    #[error("syscall watch: tid {tid}: read the counter")]
    Read {
        tid: Tid,
        #[source]
        source: std::io::Error,
    },
}

/// The id of the `raw_syscalls:sys_enter` tracepoint, if tracefs shows it.
pub fn tracepoint_id() -> Result<u64, WatchError> {
    TRACEPOINT_ID_PATHS
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
        .ok_or(WatchError::NoTracepoint)
}

/// The tracepoint filter that passes every syscall but those in `allowed`.
pub fn filter_expression(allowed: &[u32]) -> String {
    let mut ids: Vec<u32> = allowed.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        // Every syscall counts: a filter that is always true.
        return "id != -1".to_owned();
    }
    ids.iter()
        .map(|id| format!("id != {id}"))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// One counter per watched thread.
#[derive(Debug)]
pub struct SyscallWatch {
    counters: Vec<(Tid, OwnedFd)>,
}

fn open_counter(tid: Tid, tracepoint: u64) -> Result<OwnedFd, WatchError> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: PERF_ATTR_SIZE_VER0,
        config: tracepoint,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a live, initialised perf_event_attr of the size its `size` field
    // says; the kernel only reads it. The other arguments are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            libc::pid_t::from(tid.as_raw()),
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(WatchError::Open {
            tid,
            source: std::io::Error::last_os_error(),
        });
    }
    let raw = libc::c_int::try_from(ret).map_err(|_| WatchError::Open {
        tid,
        source: std::io::Error::other("perf_event_open returned no fd"),
    })?;
    // SAFETY: `raw` is a new fd that perf_event_open just returned to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Closes every fd of this process but `keep` (sorted), with `close_range` alone (it is
/// called between `fork` and `_exit`: nothing that allocates or locks).
///
/// # Safety
/// Every fd of the process but `keep` is closed: no live object of the process may own
/// one any more (the caller is a fork's child that only exits after this).
unsafe fn close_all_but(keep: &[libc::c_int]) {
    let mut first: libc::c_uint = 0;
    for &fd in keep {
        let Ok(fd) = libc::c_uint::try_from(fd) else {
            continue;
        };
        if fd > first {
            // SAFETY: plain integers; the caller vouches that nothing owns these fds.
            unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0) };
        }
        first = fd.saturating_add(1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) };
}

fn set_filter(tid: Tid, fd: &OwnedFd, filter: &std::ffi::CStr) -> Result<(), WatchError> {
    // SAFETY: `filter` is a NUL-terminated string that outlives the call; the kernel copies
    // it and writes nothing back.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER, filter.as_ptr()) };
    if ret < 0 {
        return Err(WatchError::Filter {
            tid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl SyscallWatch {
    /// Starts counting, in every thread of `tids`, the syscalls whose x86_64 number is not in
    /// `allowed`. Each counter counts from its own opening: threads that run meanwhile are
    /// best given a baseline ([`SyscallWatch::counts`]) once they are stopped.
    pub fn open(tids: &[Tid], allowed: &[u32]) -> Result<SyscallWatch, WatchError> {
        let tracepoint = tracepoint_id()?;
        let filter = std::ffi::CString::new(filter_expression(allowed))
            .map_err(|_| WatchError::NoTracepoint)?;
        let mut counters = Vec::with_capacity(tids.len());
        for &tid in tids {
            let fd = open_counter(tid, tracepoint)?;
            // Set before the thread runs again: until then, the counter counts every syscall.
            set_filter(tid, &fd, &filter)?;
            counters.push((tid, fd));
        }
        Ok(SyscallWatch { counters })
    }

    /// The threads watched, in the order given to [`SyscallWatch::open`].
    pub fn tids(&self) -> impl Iterator<Item = Tid> + '_ {
        self.counters.iter().map(|(tid, _)| *tid)
    }

    /// Closes the counters without the caller waiting for it. The last counter on the
    /// tracepoint to close unregisters the kernel's probe, which waits for RCU grace
    /// periods (40-50 ms measured here), and a process that exits with the counters open
    /// waits the same in its exit. So a grandchild takes them over: this process closes its
    /// copies (not the last ones), and only then does the grandchild close the last, off
    /// every caller's path, and exit (reaped by whoever reaps orphans). If it cannot be
    /// made, the counters close here.
    pub fn close_detached(self) {
        let fds: Vec<libc::c_int> = self.counters.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let mut pipe = [0 as libc::c_int; 2];
        // SAFETY: `pipe` is two writable ints.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        let [read_end, write_end] = pipe;
        let mut keep = fds.clone();
        keep.push(read_end);
        keep.sort_unstable();
        // SAFETY: the child and the grandchild call only async-signal-safe functions
        // (fork, close, read, _exit) on memory made before the fork, so another thread
        // of ours holding a lock at the fork cannot hurt them.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: as above.
            if unsafe { libc::fork() } == 0 {
                // Only the counters and the pipe's read end stay open here: a socket this
                // process closes must not live on in this copy.
                // SAFETY: this grandchild owns nothing but what it keeps, and only exits.
                unsafe { close_all_but(&keep) };
                // EOF once the parent closed its counters and its end of the pipe.
                let mut byte = 0u8;
                // SAFETY: one writable byte; `read_end` is open here.
                while unsafe { libc::read(read_end, std::ptr::addr_of_mut!(byte).cast(), 1) } > 0 {}
                for &fd in &keep {
                    // SAFETY: these fds are this grandchild's own copies.
                    unsafe { libc::close(fd) };
                }
            }
            // SAFETY: leaves at once, running no destructor or atexit handler of the copy.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: `read_end` is our copy of the pipe's read end, owned by nothing else.
        unsafe { libc::close(read_end) };
        if child > 0 {
            let mut status = 0;
            // SAFETY: `child` is our child; `status` is a writable int.
            unsafe { libc::waitpid(child, &mut status, 0) };
        }
        drop(self);
        // SAFETY: `write_end` is ours alone; closing it tells the grandchild to go on.
        unsafe { libc::close(write_end) };
    }

    /// Each thread's count of syscalls outside the allowlist since the watch was opened.
    pub fn counts(&self) -> Result<Vec<(Tid, u64)>, WatchError> {
        self.counters
            .iter()
            .map(|(tid, fd)| {
                let mut word = [0u8; 8];
                match rustix::io::read(fd, &mut word) {
                    Ok(8) => Ok((*tid, u64::from_ne_bytes(word))),
                    Ok(_) => Err(WatchError::Read {
                        tid: *tid,
                        source: std::io::Error::other("short read of a perf counter"),
                    }),
                    Err(errno) => Err(WatchError::Read {
                        tid: *tid,
                        source: errno.into(),
                    }),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_excludes_each_allowed_number_once() {
        assert_eq!(
            filter_expression(&[39, 0, 39, 1]),
            "id != 0 && id != 1 && id != 39"
        );
        assert_eq!(filter_expression(&[]), "id != -1");
    }

    /// A thread that waits for the word, then calls getpid 100 times, and uname too if the
    /// word is `true`, and stays alive (until unparked, at most 200 ms) so that its exit
    /// (exit, 60) does not count before the counter is read.
    fn spawn_worker() -> (
        Tid,
        std::sync::mpsc::Sender<bool>,
        std::thread::JoinHandle<()>,
    ) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
        let worker = std::thread::spawn(move || {
            ready_tx.send(rustix::thread::gettid()).expect("send tid");
            let uname = go_rx.recv().expect("go");
            for _ in 0..100 {
                let _ = rustix::process::getpid();
            }
            if uname {
                let _ = rustix::system::uname();
            }
            std::thread::park_timeout(std::time::Duration::from_millis(200));
        });
        let tid =
            Tid::from_raw(ready_rx.recv().expect("tid").as_raw_nonzero().get()).expect("a tid");
        (tid, go_tx, worker)
    }

    /// Our own thread: its allowed syscalls leave the count at 0, the others count.
    #[test]
    fn only_syscalls_outside_the_allowlist_count() {
        if tracepoint_id().is_err() {
            eprintln!("no tracefs here: nothing to test");
            return;
        }
        // futex (202) is how the worker waits and wakes; getpid (39).
        let allowed = [39, 202, 1, 0, 230, 24, 14, 11];
        let (tid, go, worker) = spawn_worker();
        let watch = SyscallWatch::open(&[tid], &allowed).expect("watch");
        go.send(true).expect("go");
        worker.join().expect("worker");
        let counts = watch.counts().expect("counts");
        assert_eq!(counts.len(), 1);
        assert!(counts[0].1 >= 1, "uname was not counted: {counts:?}");

        let (tid, go, worker) = spawn_worker();
        let watch = SyscallWatch::open(&[tid], &allowed).expect("watch");
        go.send(false).expect("go");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let counts = watch.counts().expect("counts");
        assert_eq!(counts, vec![(tid, 0)], "allowed syscalls were counted");
        worker.thread().unpark();
        worker.join().expect("worker");
    }
}
