//! What the forked child does before it stops for our tracer.
//!
//! The child is a fork of single-threaded `ckpt-restore`, so it may run ordinary code.
//! It puts its fd table, cwd, root, umask, session and process group in the dumped
//! shape, then stops itself. Credentials stay ours: injected syscalls that open images,
//! `set_tid` and `PR_SET_MM_MAP` with an exe fd all need them.
//!
//! A failure is written as text to the status pipe and the child exits with
//! [`CHILD_FAILED`]; the parent reads the pipe once it sees the exit.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::FdFlags;

use crate::files::FdSource;
use crate::plan::{ChildPlan, FdOpen, SessionPlan};

/// Exit status of a child whose preparation failed (its reason is on the status pipe).
pub const CHILD_FAILED: i32 = 121;

/// Runs in the forked child: prepares everything, then returns so the caller stops.
///
/// On error, returns the status pipe (moved to a high fd) and the reason, for the
/// caller to report before it exits.
pub fn prepare(plan: &ChildPlan, status: &OwnedFd) -> Result<(), (Option<OwnedFd>, String)> {
    // The status pipe must not sit on a number the image wants.
    let above = plan.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let status = match rustix::io::fcntl_dupfd_cloexec(status, above) {
        Ok(moved) => moved,
        Err(e) => {
            return Err((
                status.try_clone().ok(),
                format!("move status pipe above fd {above}: {e}"),
            ))
        }
    };
    if let Err(msg) = close_foreign_fds(status.as_raw_fd()) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = open_fds(&plan.fds) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = set_fs(plan) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = set_session(&plan.session) {
        return Err((Some(status), msg));
    }
    Ok(())
}

/// Writes the failure reason to the parent.
pub fn report_failure(status: &OwnedFd, msg: &str) {
    let mut file = std::fs::File::from(match status.try_clone() {
        Ok(fd) => fd,
        Err(_) => return,
    });
    // Nothing more can be done if the parent is gone; the exit status still says it.
    let _ = file.write_all(msg.as_bytes());
}

/// Closes every fd we inherited from `ckpt-restore` (stdio, log file) but the status pipe.
pub(crate) fn close_foreign_fds(keep: RawFd) -> Result<(), String> {
    close_fds_except(&[keep])
}

/// Closes every fd of ours but those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> Result<(), String> {
    let mut open = BTreeSet::new();
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("list /proc/self/fd: {e}"))?;
    for entry in dir {
        let entry = entry.map_err(|e| format!("list /proc/self/fd: {e}"))?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        {
            open.insert(fd);
        }
    }
    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
        // EBADF is the directory fd of the listing, already closed.
        match nix::unistd::close(fd) {
            Ok(()) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(format!("close inherited fd {fd}: {e}")),
        }
    }
    Ok(())
}

/// Opens each dumped file and places it at its fd number. Fds that shared one open
/// file description (same file id: dup'ed, or inherited) share one again, offset
/// included.
fn open_fds(fds: &[FdOpen]) -> Result<(), String> {
    let mut placed: HashMap<u32, OwnedFd> = HashMap::new();
    let mut extra: Vec<OwnedFd> = Vec::new();
    // New objects are parked above every planned number, so that placing one never lands on
    // a number another still needs.
    let above = fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let mut kobjs = Kobjs::new(above);
    for f in fds {
        let path = f.open_path();
        let fd = match placed.get(&f.file_id) {
            Some(first) => {
                let dup = rustix::io::fcntl_dupfd_cloexec(first, f.fd)
                    .map_err(|e| format!("fd {}: dup of {}: {e}", f.fd, path.display()))?;
                place_at(dup, f.fd, f.cloexec)
                    .map_err(|e| format!("fd {}: place {}: {e}", f.fd, path.display()))?
            }
            None if f.source != FdSource::Path => {
                let made = kobjs
                    .create(f)
                    .map_err(|e| format!("fd {}: create {}: {e}", f.fd, kobj_name(&f.source)))?;
                place_at(made, f.fd, f.cloexec)
                    .map_err(|e| format!("fd {}: place {}: {e}", f.fd, kobj_name(&f.source)))?
            }
            None => {
                let flags = OFlags::from_bits_retain(f.flags)
                    & !(OFlags::CREATE | OFlags::EXCL | OFlags::TRUNC);
                let opened = rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| format!("fd {}: open {}: {e}", f.fd, path.display()))?;
                if f.pos != 0 {
                    rustix::fs::seek(&opened, rustix::fs::SeekFrom::Start(f.pos)).map_err(|e| {
                        format!("fd {}: seek {} to {}: {e}", f.fd, path.display(), f.pos)
                    })?;
                }
                place_at(opened, f.fd, f.cloexec)
                    .map_err(|e| format!("fd {}: place {}: {e}", f.fd, path.display()))?
            }
        };
        match placed.entry(f.file_id) {
            std::collections::hash_map::Entry::Occupied(_) => extra.push(fd),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(fd);
            }
        }
    }
    add_epoll_targets(fds, placed.values().chain(&extra))?;
    // The fds now belong to the image's program, not to us: never close them.
    for fd in placed.into_values().chain(extra) {
        std::mem::forget(fd);
    }
    Ok(())
}

/// Moves `fd` to number `target`, which is free: everything else not yet placed is closed.
fn place_at(fd: OwnedFd, target: RawFd, cloexec: bool) -> rustix::io::Result<OwnedFd> {
    let placed = if fd.as_raw_fd() == target {
        fd
    } else {
        let moved = rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), target)?;
        drop(fd);
        if moved.as_raw_fd() != target {
            // Someone holds `target`: only a bug in the fd plan can cause this.
            return Err(rustix::io::Errno::BADF);
        }
        moved
    };
    let flags = if cloexec {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    rustix::io::fcntl_setfd(&placed, flags)?;
    Ok(placed)
}

fn set_fs(plan: &ChildPlan) -> Result<(), String> {
    if let Some(root) = &plan.root {
        if root.as_os_str() != "/" {
            rustix::process::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
        }
    }
    if let Some(cwd) = &plan.cwd {
        rustix::process::chdir(cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
    }
    rustix::process::umask(Mode::from_bits_truncate(plan.umask));
    Ok(())
}

fn set_session(session: &SessionPlan) -> Result<(), String> {
    match session {
        SessionPlan::Inherit => Ok(()),
        SessionPlan::NewSession => rustix::process::setsid()
            .map(drop)
            .map_err(|e| format!("setsid: {e}")),
        SessionPlan::NewGroup => {
            rustix::process::setpgid(None, None).map_err(|e| format!("setpgid: {e}"))
        }
    }
}

fn kobj_name(source: &FdSource) -> &'static str {
    match source {
        FdSource::Path => "file",
        FdSource::Pipe { write: false, .. } => "pipe read end",
        FdSource::Pipe { write: true, .. } => "pipe write end",
        FdSource::Eventfd { .. } => "eventfd",
        FdSource::Signalfd { .. } => "signalfd",
        FdSource::Timerfd { .. } => "timerfd",
        FdSource::Epoll { .. } => "epoll",
        FdSource::Inotify { .. } => "inotify",
    }
}

/// The kernel objects the child creates: pipes are made once, at their first end, and
/// filled with their unread data; each end is handed out as its fd comes.
struct Kobjs {
    above: RawFd,
    /// Pipe id to its (read, write) ends, parked high until placed.
    pipes: Vec<(u32, Option<OwnedFd>, Option<OwnedFd>)>,
}

/// File status flags that `F_SETFL` can change and that a restored object keeps.
fn status_flags(flags: u32) -> OFlags {
    OFlags::from_bits_retain(flags) & (OFlags::NONBLOCK | OFlags::APPEND | OFlags::ASYNC)
}

impl Kobjs {
    fn new(above: RawFd) -> Self {
        Self {
            above,
            pipes: Vec::new(),
        }
    }

    fn park(&self, fd: OwnedFd) -> rustix::io::Result<OwnedFd> {
        rustix::io::fcntl_dupfd_cloexec(&fd, self.above)
    }

    fn create(&mut self, f: &FdOpen) -> Result<OwnedFd, String> {
        let made = match &f.source {
            FdSource::Path => return Err("not a kernel object".into()),
            FdSource::Pipe {
                pipe_id,
                write,
                size,
                data,
            } => return self.pipe_end(*pipe_id, *write, *size, data, f.flags),
            FdSource::Eventfd { counter, semaphore } => {
                let mut flags = rustix::event::EventfdFlags::CLOEXEC;
                if *semaphore {
                    flags |= rustix::event::EventfdFlags::SEMAPHORE;
                }
                let efd = rustix::event::eventfd(0, flags).map_err(|e| format!("eventfd: {e}"))?;
                if *counter != 0 {
                    rustix::io::write(&efd, &counter.to_ne_bytes())
                        .map_err(|e| format!("set counter {counter}: {e}"))?;
                }
                efd
            }
            FdSource::Signalfd { sigmask } => {
                let mut set = nix::sys::signal::SigSet::empty();
                for bit in 0..64 {
                    if sigmask & (1u64 << bit) == 0 {
                        continue;
                    }
                    let signo: i32 = bit + 1;
                    let signal = nix::sys::signal::Signal::try_from(signo)
                        .map_err(|_| format!("signal {signo} in the mask cannot be set here"))?;
                    set.add(signal);
                }
                let sfd = nix::sys::signalfd::SignalFd::with_flags(
                    &set,
                    nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
                )
                .map_err(|e| format!("signalfd: {e}"))?;
                OwnedFd::from(sfd)
            }
            FdSource::Timerfd {
                clockid,
                ticks,
                value,
                interval,
            } => timerfd(*clockid, *ticks, *value, *interval)?,
            FdSource::Epoll { .. } => {
                rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
                    .map_err(|e| format!("epoll_create: {e}"))?
            }
            FdSource::Inotify { watches } => inotify(watches)?,
        };
        rustix::fs::fcntl_setfl(&made, status_flags(f.flags))
            .map_err(|e| format!("set flags {:#o}: {e}", f.flags))?;
        self.park(made).map_err(|e| format!("move: {e}"))
    }

    fn pipe_end(
        &mut self,
        pipe_id: u32,
        write: bool,
        size: Option<u32>,
        data: &[u8],
        flags: u32,
    ) -> Result<OwnedFd, String> {
        if !self.pipes.iter().any(|p| p.0 == pipe_id) {
            // Non-blocking while refilled: data larger than the pipe fails instead of
            // hanging the child. Each end gets its dumped flags when placed.
            let (r, w) = rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )
            .map_err(|e| format!("pipe: {e}"))?;
            if let Some(size) = size {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > rustix::pipe::fcntl_getpipe_size(&w).unwrap_or(0) {
                    rustix::pipe::fcntl_setpipe_size(&w, size)
                        .map_err(|e| format!("F_SETPIPE_SZ {size}: {e}"))?;
                }
            }
            let mut left = data;
            while !left.is_empty() {
                let n = rustix::io::write(&w, left).map_err(|e| format!("refill: {e}"))?;
                left = left.get(n..).unwrap_or_default();
            }
            let r = self.park(r).map_err(|e| format!("move: {e}"))?;
            let w = self.park(w).map_err(|e| format!("move: {e}"))?;
            self.pipes.push((pipe_id, Some(r), Some(w)));
        }
        let slot = self
            .pipes
            .iter_mut()
            .find(|p| p.0 == pipe_id)
            .ok_or_else(|| "pipe vanished".to_string())?;
        let end = if write { slot.2.take() } else { slot.1.take() };
        // A second open file description of the same end (a reopen through /proc) would
        // need a reopen here too; it is refused rather than merged with the first.
        let end = end.ok_or_else(|| "a second open file of this pipe end".to_string())?;
        rustix::fs::fcntl_setfl(&end, status_flags(flags))
            .map_err(|e| format!("set flags {flags:#o}: {e}"))?;
        Ok(end)
    }
}

fn timespec((sec, nsec): (u64, u64)) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: i64::try_from(sec).unwrap_or(i64::MAX),
        tv_nsec: i64::try_from(nsec).unwrap_or(0),
    }
}

fn timerfd(
    clockid: u32,
    ticks: u64,
    value: (u64, u64),
    interval: (u64, u64),
) -> Result<OwnedFd, String> {
    use rustix::time::{TimerfdClockId as Clock, TimerfdFlags, TimerfdTimerFlags};
    let clock = match clockid {
        0 => Clock::Realtime,
        1 => Clock::Monotonic,
        7 => Clock::Boottime,
        8 => Clock::RealtimeAlarm,
        9 => Clock::BoottimeAlarm,
        other => return Err(format!("clock {other} is not one a timerfd uses")),
    };
    let tfd = rustix::time::timerfd_create(clock, TimerfdFlags::CLOEXEC)
        .map_err(|e| format!("timerfd_create: {e}"))?;
    if value != (0, 0) {
        let spec = rustix::time::Itimerspec {
            it_interval: timespec(interval),
            it_value: timespec(value),
        };
        rustix::time::timerfd_settime(&tfd, TimerfdTimerFlags::empty(), &spec)
            .map_err(|e| format!("timerfd_settime: {e}"))?;
    }
    if ticks != 0 {
        tracee::kobj::timerfd_set_ticks(&tfd, ticks)
            .map_err(|e| format!("set {ticks} pending expirations: {e}"))?;
    }
    Ok(tfd)
}

/// Adds every epoll target through the fd number it was added with, now that all of them
/// are in place.
fn add_epoll_targets<'a>(
    fds: &[FdOpen],
    open: impl Iterator<Item = &'a OwnedFd>,
) -> Result<(), String> {
    let by_number: HashMap<RawFd, &OwnedFd> = open.map(|fd| (fd.as_raw_fd(), fd)).collect();
    let mut done = BTreeSet::new();
    for f in fds {
        let FdSource::Epoll { targets } = &f.source else {
            continue;
        };
        // Dups of one epoll share its set: fill it once.
        if !done.insert(f.file_id) {
            continue;
        }
        let epoll = by_number
            .get(&f.fd)
            .ok_or_else(|| format!("epoll fd {} is not open", f.fd))?;
        for &(target, events, data) in targets {
            let watched = by_number
                .get(&target)
                .ok_or_else(|| format!("epoll fd {}: target fd {target} is not open", f.fd))?;
            rustix::event::epoll::add(
                epoll,
                watched,
                rustix::event::epoll::EventData::new_u64(data),
                rustix::event::epoll::EventFlags::from_bits_retain(events),
            )
            .map_err(|e| format!("epoll fd {}: add target fd {target}: {e}", f.fd))?;
        }
    }
    Ok(())
}

/// An inotify instance whose watches get their dumped wds. The kernel hands out wds in
/// increasing order, so a gap (a watch removed before the dump) is skipped by adding and
/// removing a watch; a wd lower than the next one handed out cannot be had.
fn inotify(watches: &[(i32, std::path::PathBuf, u32)]) -> Result<OwnedFd, String> {
    use rustix::fs::inotify;
    /// Enough for any gap a real program leaves, small enough to fail fast.
    const MAX_SKIPPED: u32 = 1 << 16;
    let ify =
        inotify::init(inotify::CreateFlags::CLOEXEC).map_err(|e| format!("inotify_init: {e}"))?;
    let mut skipped = 0;
    for (wd, path, mask) in watches {
        let flags = inotify::WatchFlags::from_bits_retain(*mask);
        loop {
            let got = inotify::add_watch(&ify, path, flags)
                .map_err(|e| format!("watch {}: {e}", path.display()))?;
            if got == *wd {
                break;
            }
            if got > *wd {
                return Err(format!(
                    "watch {} got wd {got}, but the dumped one was {wd}",
                    path.display()
                ));
            }
            skipped += 1;
            if skipped > MAX_SKIPPED {
                return Err(format!("wd {wd} for {} is too far ahead", path.display()));
            }
            inotify::remove_watch(&ify, got).map_err(|e| format!("skip wd {got}: {e}"))?;
        }
    }
    if skipped > 0 {
        // Each skipped wd queued an IN_IGNORED the program never caused: drop them (and
        // with them anything that happened on the watched files in these microseconds).
        rustix::fs::fcntl_setfl(&ify, OFlags::NONBLOCK).map_err(|e| format!("inotify: {e}"))?;
        let mut buf = [0u8; 4096];
        while matches!(rustix::io::read(&ify, &mut buf), Ok(n) if n > 0) {}
        rustix::fs::fcntl_setfl(&ify, OFlags::empty()).map_err(|e| format!("inotify: {e}"))?;
    }
    Ok(ify)
}
