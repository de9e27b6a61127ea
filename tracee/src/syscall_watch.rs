//! Counting the syscalls threads make outside an allowlist, with no cost to them while they
//! run: one perf counter per thread on the `raw_syscalls:sys_enter` tracepoint, filtered in
//! the kernel (`PERF_EVENT_IOC_SET_FILTER`) to the syscall numbers *not* allowed. A count of
//! zero then says that every syscall entered since the counter was opened is one of the
//! allowed ones.
//!
//! Two ways to count, the same counts:
//! - one counter per CPU, for every watched thread at once (the filter names their tids:
//!   `common_pid` is the thread id as the initial PID namespace sees it, so only a watcher
//!   in that namespace can name them). Opening these costs ~0.3 ms here.
//! - one counter per thread (`pid` = the thread id, any CPU), the fallback: the first
//!   counter bound to a task on the machine makes the kernel switch its scheduling hooks on
//!   and wait for an RCU grace period (`account_event`), 5-15 ms measured here, inside the
//!   preparation of every prepared migration.
//!
//! Per CPU, every CPU the machine may have must be online at the opening, each counter must
//! have counted all along (its enabled and running times agree), and the CPUs online must
//! be the same at each reading: a CPU taken offline drops its counters for good.
//!
//! Neither is inherited: a thread born later is not watched, which the caller sees by
//! comparing thread lists; its birth (a `clone`) is counted for its parent anyway, unless
//! `clone` is allowed.
//!
//! What the tracepoint cannot tell: a 64-bit thread may still make 32-bit syscalls with
//! `int $0x80`; those enter with their i386 numbers, which the filter reads as x86_64 ones.
//! What the per-CPU counters cannot tell: a CPU taken offline and back online between two
//! readings (its counter stopped meanwhile).
//!
//! References: `perf_event_open(2)`; `include/trace/events/syscalls.h` (the `id` field).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cpu::{cpu_list, parse_cpu_list, CPUS_ONLINE, CPUS_POSSIBLE};
use crate::Tid;

/// `PERF_TYPE_TRACEPOINT`: `config` is a tracepoint id.
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_ATTR_SIZE_VER0`: the first 64 bytes of `struct perf_event_attr`, all we set.
const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_EVENT_IOC_SET_FILTER`: `_IOW('$', 6, char *)`.
const PERF_EVENT_IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;
/// `PERF_EVENT_IOC_ENABLE`: `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `perf_event_attr.disabled`, the first bit field: the counter starts stopped.
const ATTR_DISABLED: u64 = 1;
/// `PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING`: a read gives the
/// count, then how long the counter was enabled and how long it counted.
const READ_WITH_TIMES: u64 = 1 | 2;
/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`).
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;
/// The nice value of the process that closes the counters last.
const CLOSER_NICE: libc::c_int = 19;
/// At most this many threads are named in one per-CPU filter: the kernel takes a filter of
/// up to a page, and the allowlist takes its share of that.
const MAX_TIDS_PER_CPU_FILTER: usize = 96;

/// Where tracefs is mounted, if it is: on its own, or under debugfs.
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// The tracepoint's id, inside a tracefs.
const TRACEPOINT_ID_IN_TRACEFS: &str = "events/raw_syscalls/sys_enter/id";

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
    /// The bit fields (`disabled`, `inherit`, ...): only `disabled`, so that the counter
    /// starts once its filter is set; not inherited by threads born later.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// What a counter counts: one thread wherever it runs, or every watched thread on one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterOn {
    Thread(Tid),
    Cpu(usize),
}

impl std::fmt::Display for CounterOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterOn::Thread(tid) => write!(f, "tid {tid}"),
            CounterOn::Cpu(cpu) => write!(f, "CPU {cpu}"),
        }
    }
}

/// A watch could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "syscall watch: the raw_syscalls:sys_enter tracepoint is not visible (no tracefs \
         mounted, and none of our own without CAP_SYS_ADMIN)"
    )]
    NoTracepoint,
    #[error("syscall watch: {on}: open a perf counter")]
    Open {
        on: CounterOn,
        #[source]
        source: std::io::Error,
    },
    #[error("syscall watch: {on}: set the syscall filter")]
    Filter {
        on: CounterOn,
        #[source]
        source: std::io::Error,
    },
    #[error("syscall watch: {on}: read the counter")]
    Read {
        on: CounterOn,
        #[source]
        source: std::io::Error,
    },
    #[error("syscall watch: {on}: the counter did not count all along")]
    Stopped { on: CounterOn },
    #[error("syscall watch: the CPUs online changed while it watched")]
    CpusChanged,
}

/// The id of the `raw_syscalls:sys_enter` tracepoint: from tracefs where it is mounted,
/// else from a tracefs of our own that no directory shows.
pub fn tracepoint_id() -> Result<u64, WatchError> {
    tracepoint_id_from_mounted_tracefs()
        .or_else(tracepoint_id_from_detached_tracefs)
        .ok_or(WatchError::NoTracepoint)
}

/// The tracepoint's id as a mounted tracefs shows it, if one is.
fn tracepoint_id_from_mounted_tracefs() -> Option<u64> {
    TRACEFS_MOUNTS
        .iter()
        .map(|mount| std::path::Path::new(mount).join(TRACEPOINT_ID_IN_TRACEFS))
        .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
}

/// A machine freshly booted mounts neither tracefs nor debugfs. `fsmount` gives a tracefs
/// that is attached nowhere: we read the id through its descriptor, and closing it is the
/// unmount, so the machine's mounts stay as they were (perf, in the same case, mounts
/// tracefs on `/sys/kernel/tracing` for good). It needs `CAP_SYS_ADMIN`, as the per-CPU
/// counters do.
fn tracepoint_id_from_detached_tracefs() -> Option<u64> {
    use rustix::fs::{openat, Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags, MountAttrFlags,
    };
    use std::io::Read;
    let fs = fsopen("tracefs", FsOpenFlags::FSOPEN_CLOEXEC).ok()?;
    fsconfig_create(&fs).ok()?;
    let attrs = MountAttrFlags::MOUNT_ATTR_RDONLY
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    let root = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).ok()?;
    let id = openat(
        &root,
        TRACEPOINT_ID_IN_TRACEFS,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    std::fs::File::from(id).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
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

/// The tracepoint filter that passes the syscalls of the threads `tids` but those in
/// `allowed`.
pub fn per_cpu_filter_expression(tids: &[Tid], allowed: &[u32]) -> String {
    let threads = tids
        .iter()
        .map(|tid| format!("common_pid == {tid}"))
        .collect::<Vec<_>>()
        .join(" || ");
    format!("({threads}) && {}", filter_expression(allowed))
}

/// Whether thread ids here are the ones the kernel's tracepoints show (`common_pid`).
fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INITIAL_PID_NS_INO)
}

/// The CPUs online, from `held` (the sysfs list, open) if it reads, else by path.
fn cpus_online(held: Option<&std::fs::File>) -> Option<Vec<usize>> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 512];
    let read = held.and_then(|file| file.read_at(&mut buf, 0).ok());
    match read {
        Some(n) if n > 0 && n < buf.len() => {
            std::str::from_utf8(&buf[..n]).ok().and_then(parse_cpu_list)
        }
        _ => cpu_list(CPUS_ONLINE),
    }
}

/// Counters on the watched threads: one per thread, or one per CPU for all of them.
#[derive(Debug)]
pub struct SyscallWatch {
    tids: Vec<Tid>,
    counters: Counters,
    /// The closer process made ahead of time (see [`SyscallWatch::prepare_close`]).
    closer: Option<Closer>,
}

/// A process that waits to close the last copies of the counters.
#[derive(Debug)]
struct Closer {
    /// The write end of the pipe it waits on: closing it lets the closer go.
    pipe: OwnedFd,
    /// Its pid, if it could be learnt (it is our grandchild).
    pid: Option<libc::pid_t>,
}

#[derive(Debug)]
enum Counters {
    /// One counter per thread, in the order of `tids`.
    Threads(Vec<OwnedFd>),
    /// One counter per CPU of `cpus`, every CPU there may be, all online at the opening;
    /// `online`, the sysfs list of the CPUs online, held open: read again from its start
    /// it shows the present, without a path lookup inside the freeze that reads it.
    Cpus {
        cpus: Vec<usize>,
        fds: Vec<OwnedFd>,
        online: Option<std::fs::File>,
    },
}

impl Counters {
    fn fds(&self) -> &[OwnedFd] {
        match self {
            Counters::Threads(fds) | Counters::Cpus { fds, .. } => fds,
        }
    }
}

/// What every counter of a watch has counted, in a fixed order: two readings are the
/// same if nothing counted came between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts(Vec<u64>);

impl Counts {
    /// How many syscalls were counted since `earlier` (a reading of the same watch).
    pub fn since(&self, earlier: &Counts) -> u64 {
        self.0
            .iter()
            .zip(&earlier.0)
            .map(|(now, before)| now.wrapping_sub(*before))
            .fold(0u64, u64::wrapping_add)
    }
}

fn open_counter(on: CounterOn, tracepoint: u64) -> Result<OwnedFd, WatchError> {
    let (pid, cpu, read_format) = match on {
        CounterOn::Thread(tid) => (libc::pid_t::from(tid.as_raw()), -1, 0),
        CounterOn::Cpu(cpu) => {
            let cpu = libc::c_int::try_from(cpu).map_err(|_| WatchError::Open {
                on,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
            (-1, cpu, READ_WITH_TIMES)
        }
    };
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: PERF_ATTR_SIZE_VER0,
        config: tracepoint,
        read_format,
        flags: ATTR_DISABLED,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a live, initialised perf_event_attr of the size its `size` field
    // says; the kernel only reads it. The other arguments are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(WatchError::Open {
            on,
            source: std::io::Error::last_os_error(),
        });
    }
    let raw = libc::c_int::try_from(ret).map_err(|_| WatchError::Open {
        on,
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

/// At most this many fds are kept by the closer ([`CloserFrame`]).
const MAX_KEPT: usize = 1024;
/// The stack of each of the closer's two clones.
const CLOSER_STACK: usize = 64 * 1024;

/// What the closer's two clones read, in memory they share with us: a mapping of its own,
/// never given back (the closer may run on it for as long as it lives).
#[repr(C)]
struct CloserFrame {
    keep: [libc::c_int; MAX_KEPT],
    kept: usize,
    read_end: libc::c_int,
    /// The grandchild's stack, from its top down.
    grandchild_stack: *mut libc::c_void,
    /// Written by the child before it exits: the grandchild's pid, or -1.
    grandchild: libc::pid_t,
}

/// Makes the closer: a child sharing our address space (`CLONE_VM | CLONE_VFORK`: we wait
/// until it exits) that makes the grandchild (`CLONE_VM`), which keeps copies of the fds
/// `keep` (sorted) and closes them once `read_end` reads EOF. The grandchild is an orphan
/// once its parent exits, reaped by whoever reaps orphans. Returns its pid.
fn spawn_closer(keep: &[libc::c_int], read_end: libc::c_int) -> Option<libc::pid_t> {
    let frame_len = std::mem::size_of::<CloserFrame>().next_multiple_of(4096);
    let len = frame_len + 2 * CLOSER_STACK;
    // SAFETY: a new private mapping chosen by the kernel; no existing memory is touched.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .ok()?;
    let bytes = base.cast::<u8>();
    let frame = base.cast::<CloserFrame>();
    let mut kept = [-1; MAX_KEPT];
    kept[..keep.len()].copy_from_slice(keep);
    // SAFETY: the mapping's first `frame_len` bytes, page aligned, hold a frame.
    unsafe {
        frame.write(CloserFrame {
            keep: kept,
            kept: keep.len(),
            read_end,
            // Stacks grow down from their ends: the child's first, then the grandchild's.
            grandchild_stack: bytes.wrapping_add(len).cast(),
            grandchild: -1,
        })
    };
    let child_stack = bytes
        .wrapping_add(frame_len + CLOSER_STACK)
        .cast::<libc::c_void>();
    // Every signal blocked across the clones, which inherit the mask: a handler of ours
    // run by a clone would run on memory we share.
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut before = SigSet::empty();
    let blocked = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut before),
    );
    // SAFETY: the child runs `closer_child` on its own stack in the mapping, touching
    // only the frame and making syscalls; CLONE_VFORK holds us until it has exited.
    let child = unsafe {
        libc::clone(
            closer_child,
            child_stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            base,
        )
    };
    if blocked.is_ok() {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
    if child <= 0 {
        // SAFETY: nothing runs on the mapping: no clone was made.
        unsafe { libc::munmap(base, len) };
        return None;
    }
    let mut status = 0;
    // SAFETY: `child` is our child; `status` is a writable int.
    unsafe { libc::waitpid(child, &mut status, 0) };
    // SAFETY: the child wrote it before it exited; the frame stays mapped.
    let pid = unsafe { frame_field::<libc::pid_t>(base, GRANDCHILD).read_volatile() };
    (pid > 0).then_some(pid)
}

const GRANDCHILD: usize = std::mem::offset_of!(CloserFrame, grandchild);
const GRANDCHILD_STACK: usize = std::mem::offset_of!(CloserFrame, grandchild_stack);
const KEEP: usize = std::mem::offset_of!(CloserFrame, keep);
const KEPT: usize = std::mem::offset_of!(CloserFrame, kept);
const READ_END: usize = std::mem::offset_of!(CloserFrame, read_end);

/// The field at `offset` of the frame at `frame`.
fn frame_field<T>(frame: *mut libc::c_void, offset: usize) -> *mut T {
    frame.cast::<u8>().wrapping_add(offset).cast()
}

/// The closer's child: makes the grandchild, tells us its pid and exits.
extern "C" fn closer_child(frame: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `frame` is the frame `spawn_closer` wrote before cloning us.
    let stack = unsafe { frame_field::<*mut libc::c_void>(frame, GRANDCHILD_STACK).read() };
    // SAFETY: the grandchild runs `closer_grandchild` on its own stack, the mapping's
    // last part, which nothing else uses.
    let pid = unsafe {
        libc::clone(
            closer_grandchild,
            stack,
            libc::CLONE_VM | libc::SIGCHLD,
            frame,
        )
    };
    // SAFETY: only this child writes the field, and the grandchild does not read it.
    unsafe { frame_field::<libc::pid_t>(frame, GRANDCHILD).write_volatile(pid) };
    0
}

/// The closer: keeps only the counters and the pipe's read end, waits for EOF on it,
/// closes the counters and exits. Only syscalls, on memory made before it.
extern "C" fn closer_grandchild(frame: *mut libc::c_void) -> libc::c_int {
    // SAFETY: the frame's fields below were written before the clones and are not written
    // again.
    let keep = unsafe { frame_field::<[libc::c_int; MAX_KEPT]>(frame, KEEP).read() };
    // SAFETY: as above.
    let kept = unsafe { frame_field::<usize>(frame, KEPT).read() };
    // SAFETY: as above.
    let read_end = unsafe { frame_field::<libc::c_int>(frame, READ_END).read() };
    let keep = &keep[..kept.min(MAX_KEPT)];
    // Only the counters and the pipe's read end stay open here: a socket this process
    // closes must not live on in this copy.
    // SAFETY: this process has a fd table of its own, and nothing here owns its fds.
    unsafe { close_all_but(keep) };
    // The closing is in nobody's way at the lowest priority (the tracepoint's switching
    // off runs long stretches of kernel code that do not yield).
    // SAFETY: plain integers; best effort, the result does not matter.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CLOSER_NICE) };
    // EOF once the parent closed its counters and its end of the pipe.
    let mut byte = 0u8;
    // SAFETY: one writable byte; `read_end` is open here.
    while unsafe { libc::read(read_end, std::ptr::addr_of_mut!(byte).cast(), 1) } > 0 {}
    for &fd in keep {
        // SAFETY: these fds are this process's own copies.
        unsafe { libc::close(fd) };
    }
    0
}

/// Sets the filter of a counter opened disabled, then starts it: it counts only what
/// passes the filter.
fn filter_and_start(
    on: CounterOn,
    fd: &OwnedFd,
    filter: &std::ffi::CStr,
) -> Result<(), WatchError> {
    // SAFETY: `filter` is a NUL-terminated string that outlives the call; the kernel copies
    // it and writes nothing back.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER, filter.as_ptr()) };
    if ret < 0 {
        return Err(WatchError::Filter {
            on,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a request without an argument on a perf fd of ours.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) };
    if ret < 0 {
        return Err(WatchError::Filter {
            on,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// One counter's words: the count, and with [`READ_WITH_TIMES`] its enabled and running
/// times.
fn read_counter<const N: usize>(on: CounterOn, fd: &OwnedFd) -> Result<[u64; N], WatchError> {
    let mut bytes = [0u8; 24];
    let want = N * 8;
    match rustix::io::read(fd, &mut bytes[..want]) {
        Ok(n) if n == want => {
            let mut words = [0u64; N];
            for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(chunk);
                *word = u64::from_ne_bytes(raw);
            }
            Ok(words)
        }
        Ok(_) => Err(WatchError::Read {
            on,
            source: std::io::Error::other("short read of a perf counter"),
        }),
        Err(errno) => Err(WatchError::Read {
            on,
            source: errno.into(),
        }),
    }
}

impl SyscallWatch {
    /// Starts counting, in every thread of `tids`, the syscalls whose x86_64 number is not in
    /// `allowed`. Each counter counts from its own opening: threads that run meanwhile are
    /// best given a baseline ([`SyscallWatch::counts`]) once they are stopped. Per CPU where
    /// that can be done (see the module documentation), else per thread.
    pub fn open(tids: &[Tid], allowed: &[u32]) -> Result<SyscallWatch, WatchError> {
        let tracepoint = tracepoint_id()?;
        if let Some(watch) = Self::open_per_cpu(tids, allowed, tracepoint) {
            return Ok(watch);
        }
        Self::open_per_thread(tids, allowed, tracepoint)
    }

    fn open_per_thread(
        tids: &[Tid],
        allowed: &[u32],
        tracepoint: u64,
    ) -> Result<SyscallWatch, WatchError> {
        let filter = std::ffi::CString::new(filter_expression(allowed))
            .map_err(|_| WatchError::NoTracepoint)?;
        let mut fds = Vec::with_capacity(tids.len());
        for &tid in tids {
            let on = CounterOn::Thread(tid);
            let fd = open_counter(on, tracepoint)?;
            filter_and_start(on, &fd, &filter)?;
            fds.push(fd);
        }
        Ok(SyscallWatch {
            tids: tids.to_vec(),
            counters: Counters::Threads(fds),
            closer: None,
        })
    }

    /// The per-CPU watch, or `None` where it cannot be had (another PID namespace, a CPU
    /// offline, too many threads for one filter, no privilege for CPU-wide counters).
    fn open_per_cpu(tids: &[Tid], allowed: &[u32], tracepoint: u64) -> Option<SyscallWatch> {
        if tids.is_empty() || tids.len() > MAX_TIDS_PER_CPU_FILTER || !in_initial_pid_namespace() {
            return None;
        }
        let cpus = cpu_list(CPUS_POSSIBLE)?;
        if cpu_list(CPUS_ONLINE)? != cpus {
            return None;
        }
        let filter = std::ffi::CString::new(per_cpu_filter_expression(tids, allowed)).ok()?;
        let mut fds = Vec::with_capacity(cpus.len());
        for &cpu in &cpus {
            let on = CounterOn::Cpu(cpu);
            let opened = open_counter(on, tracepoint)
                .and_then(|fd| filter_and_start(on, &fd, &filter).map(|()| fd));
            match opened {
                Ok(fd) => fds.push(fd),
                Err(error) => {
                    tracing::debug!(%error, "no per-CPU syscall watch; one counter per thread");
                    return None;
                }
            }
        }
        Some(SyscallWatch {
            tids: tids.to_vec(),
            counters: Counters::Cpus {
                cpus,
                fds,
                online: std::fs::File::open(CPUS_ONLINE).ok(),
            },
            closer: None,
        })
    }

    /// The threads watched, in the order given to [`SyscallWatch::open`].
    pub fn tids(&self) -> impl Iterator<Item = Tid> + '_ {
        self.tids.iter().copied()
    }

    /// Whether the counters are per CPU (else per thread).
    pub fn per_cpu(&self) -> bool {
        matches!(self.counters, Counters::Cpus { .. })
    }

    /// Makes the process that will close the counters for us ([`SyscallWatch::close_detached`])
    /// now, ahead of time. Idempotent; if it cannot be made, the closing makes it, or
    /// closes here.
    ///
    /// The closer shares our address space (`clone` with `CLONE_VM`, as `posix_spawn` makes
    /// its child) instead of getting a copy of it: a `fork` would take our address space's
    /// lock for as long as it copies it, and would leave every page of ours shared
    /// copy-on-write with the closer for as long as it lives, so that each page we first
    /// write afterwards faults and is copied, with a TLB shootdown to every CPU our other
    /// threads run on (tens of microseconds each in a VM, measured inside a final freeze).
    pub fn prepare_close(&mut self) {
        if self.closer.is_some() {
            return;
        }
        let mut keep: Vec<libc::c_int> = self
            .counters
            .fds()
            .iter()
            .map(|fd| fd.as_raw_fd())
            .collect();
        if keep.len() >= MAX_KEPT {
            return;
        }
        let mut pipe = [0 as libc::c_int; 2];
        // SAFETY: `pipe` is two writable ints.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        let [read_end, write_end] = pipe;
        keep.push(read_end);
        keep.sort_unstable();
        let pid = spawn_closer(&keep, read_end);
        // SAFETY: `read_end` is our copy of the pipe's read end, owned by nothing else.
        unsafe { libc::close(read_end) };
        if pid.is_none() {
            // SAFETY: our write end, owned by nothing else.
            unsafe { libc::close(write_end) };
            return;
        }
        self.closer = Some(Closer {
            // SAFETY: `write_end` is a new fd of ours, owned by nothing else.
            pipe: unsafe { OwnedFd::from_raw_fd(write_end) },
            pid,
        });
    }

    /// Closes the counters without the caller waiting for it. The last counter on the
    /// tracepoint to close unregisters the kernel's probe, which waits for RCU grace
    /// periods (40-50 ms measured here), and a process that exits with the counters open
    /// waits the same in its exit. So a grandchild ([`SyscallWatch::prepare_close`]) holds
    /// copies of them: this process closes its own (not the last ones), then the pipe the
    /// grandchild waits on, and the grandchild closes the last, off every caller's path,
    /// and exits (reaped by whoever reaps orphans). Without a grandchild, the counters
    /// close here.
    pub fn close_detached(mut self) {
        self.prepare_close();
        let closer = self.closer.take();
        drop(self);
        // EOF on its pipe: the closer closes the last copies and exits.
        drop(closer.map(|c| c.pipe));
    }

    /// The closer process made by [`SyscallWatch::prepare_close`], if its pid is known.
    pub fn closer_pid(&self) -> Option<i32> {
        self.closer.as_ref().and_then(|c| c.pid)
    }

    /// What each counter counted of the syscalls outside the allowlist since the watch was
    /// opened. A per-CPU counter that missed a moment, or CPUs online that are not those
    /// of the opening, are an error: what they did not see cannot be vouched for.
    pub fn counts(&self) -> Result<Counts, WatchError> {
        match &self.counters {
            Counters::Threads(fds) => self
                .tids
                .iter()
                .zip(fds)
                .map(|(&tid, fd)| read_counter::<1>(CounterOn::Thread(tid), fd).map(|[n]| n))
                .collect::<Result<_, _>>()
                .map(Counts),
            Counters::Cpus { cpus, fds, online } => {
                let counts = cpus
                    .iter()
                    .zip(fds)
                    .map(|(&cpu, fd)| {
                        let on = CounterOn::Cpu(cpu);
                        let [n, enabled, running] = read_counter::<3>(on, fd)?;
                        if running != enabled {
                            return Err(WatchError::Stopped { on });
                        }
                        Ok(n)
                    })
                    .collect::<Result<_, _>>()?;
                if cpus_online(online.as_ref()).as_ref() != Some(cpus) {
                    return Err(WatchError::CpusChanged);
                }
                Ok(Counts(counts))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root, the tracepoint's id comes from a tracefs of our own, the one a mounted
    /// tracefs shows, and the machine's mounts are as they were afterwards.
    #[test]
    fn a_tracefs_of_our_own_shows_the_id_and_leaves_no_mount() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("not root: no tracefs of our own");
            return;
        }
        let mounts = || std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let before = mounts();
        let own = tracepoint_id_from_detached_tracefs().expect("a tracefs of our own");
        assert_eq!(mounts(), before, "the machine's mounts changed");
        if let Some(mounted) = tracepoint_id_from_mounted_tracefs() {
            assert_eq!(mounted, own);
        }
        assert_eq!(tracepoint_id().expect("the id"), own);
    }

    #[test]
    fn the_held_list_of_cpus_online_reads_as_the_path_does() {
        let held = std::fs::File::open(CPUS_ONLINE).ok();
        let by_path = cpu_list(CPUS_ONLINE);
        assert_eq!(cpus_online(held.as_ref()), by_path);
        // Read again from its start: the same, not the end of the file.
        assert_eq!(cpus_online(held.as_ref()), by_path);
        assert_eq!(cpus_online(None), by_path);
    }

    #[test]
    fn the_closer_waits_until_the_watch_closes_and_then_exits() {
        let me = Tid::from_raw(rustix::thread::gettid().as_raw_nonzero().get()).expect("tid");
        let Ok(mut watch) = SyscallWatch::open(&[me], &[]) else {
            // No tracepoint here (no tracefs or no permission): nothing to close.
            return;
        };
        watch.prepare_close();
        let pid = watch.closer_pid().expect("the closer's pid is learnt");
        let alive = |pid: i32| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ")
        };
        assert!(alive(pid), "the closer waits");
        // It shares our address space: no page of ours is copy-on-write with it.
        let (ours, its) = (
            crate::Pid::from_raw(i32::try_from(std::process::id()).expect("pid")).expect("pid"),
            crate::Pid::from_raw(pid).expect("pid"),
        );
        assert_eq!(
            crate::pidfd::kcmp(ours, its, crate::pidfd::KcmpType::Vm, 0, 0).expect("kcmp"),
            std::cmp::Ordering::Equal
        );
        // And only the counters and its pipe of our fds.
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("its fds")
            .count();
        assert_eq!(
            fds,
            watch.counters.fds().len() + 1,
            "the counters and the pipe"
        );
        watch.close_detached();
        // Closing the tracepoint's last counter waits for RCU grace periods: tens of ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the closer did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

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

    /// Our own thread: its allowed syscalls leave the count at 0, the others count; per
    /// CPU (where it can be had) and per thread alike.
    #[test]
    fn only_syscalls_outside_the_allowlist_count() {
        let tracepoint = match tracepoint_id() {
            Ok(id) => id,
            // Without CAP_SYS_ADMIN, and no tracefs mounted, the tracepoint cannot be seen.
            Err(e) if !rustix::process::geteuid().is_root() => {
                eprintln!("{e}: not root, nothing to test");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // futex (202) is how the worker waits and wakes; getpid (39).
        let allowed = [39, 202, 1, 0, 230, 24, 14, 11];
        type Opener = fn(&[Tid], &[u32], u64) -> Option<SyscallWatch>;
        let per_thread: Opener = |tids, allowed, tp| {
            Some(SyscallWatch::open_per_thread(tids, allowed, tp).expect("watch"))
        };
        let openers: [(&str, Opener); 2] = [
            ("per thread", per_thread),
            ("per CPU", SyscallWatch::open_per_cpu),
        ];
        for (scope, open) in openers {
            let (tid, go, worker) = spawn_worker();
            let Some(watch) = open(&[tid], &allowed, tracepoint) else {
                eprintln!("no per-CPU counters here (not root?): {scope} not tested");
                worker.thread().unpark();
                drop(go);
                let _ = worker.join();
                continue;
            };
            assert_eq!(watch.per_cpu(), scope == "per CPU");
            let start = watch.counts().expect("counts");
            go.send(true).expect("go");
            worker.join().expect("worker");
            let counted = watch.counts().expect("counts").since(&start);
            assert!(counted >= 1, "{scope}: uname was not counted");

            let (tid, go, worker) = spawn_worker();
            let watch = open(&[tid], &allowed, tracepoint).expect("watch");
            let start = watch.counts().expect("counts");
            assert!(
                start.0.iter().all(|&n| n == 0),
                "{scope}: counted before: {start:?}"
            );
            go.send(false).expect("go");
            std::thread::sleep(std::time::Duration::from_millis(50));
            let counts = watch.counts().expect("counts");
            assert_eq!(counts, start, "{scope}: allowed syscalls were counted");
            worker.thread().unpark();
            worker.join().expect("worker");
        }
    }

    #[test]
    fn the_per_cpu_filter_names_the_threads_then_the_allowlist() {
        let tids: Vec<Tid> = [10, 11].iter().filter_map(|&t| Tid::from_raw(t)).collect();
        assert_eq!(
            per_cpu_filter_expression(&tids, &[39]),
            "(common_pid == 10 || common_pid == 11) && id != 39"
        );
    }
}
