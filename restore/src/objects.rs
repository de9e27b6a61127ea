//! Every open file description of the tree, created by ckpt-restore itself before the
//! root is forked.
//!
//! Each restored process is forked while it still holds this whole table, so two fds of
//! different processes that shared one description at dump time (inherited through
//! fork, or passed over a unix socket) come out sharing it again: same offset, same
//! pipe, same socket. Each process later dups the entries its fd table needs into place
//! and closes the rest ([`crate::child`]).
//!
//! The table lives above every fd number a restored process uses, so that placing an fd
//! never lands on an entry still needed. Creators, per kind of object:
//! - regular files: opened with their dumped flags and moved to their offset;
//! - pipes, eventfd, signalfd, timerfd, epoll, inotify: [`Kobjs::create`], one arm per
//!   [`FdSource`] variant (a new kind of object adds its arm there);
//! - objects that must be made together because they refer to each other (unix
//!   sockets: peers, and connections queued on listeners) are made last, all at once,
//!   by one call that returns `(file id, fd)` pairs for [`Objects::insert`] (see
//!   [`create`]); last, because their queues may carry any other object in flight.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Resource, Rlimit};

use crate::files::FdSource;
use crate::plan::{FdOpen, Plan};

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("file id {id}: opening {path}")]
    Open {
        id: u32,
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("file id {id}: moving {path} to offset {pos}")]
    Seek {
        id: u32,
        path: PathBuf,
        pos: u64,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("file id {id}: creating the {what}: {reason}")]
    Create {
        id: u32,
        what: &'static str,
        reason: String,
    },
    #[error("file id {id}: moving it above fd {floor}")]
    Park {
        id: u32,
        floor: RawFd,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("creating the unix sockets")]
    Unix(#[from] crate::sockets::unix::UnixError),
    #[error("creating an inet socket")]
    Inet(#[from] crate::sockets::inet::InetError),
    #[error("{needed} fds are needed at once, but the hard RLIMIT_NOFILE is {hard}")]
    TooManyFiles { needed: u64, hard: u64 },
    #[error("raising RLIMIT_NOFILE to {to}")]
    Rlimit {
        to: u64,
        #[source]
        source: rustix::io::Errno,
    },
}

/// File id to the open file description, held at fds above every restored fd number.
#[derive(Debug)]
pub struct Objects {
    floor: RawFd,
    fds: HashMap<u32, OwnedFd>,
}

impl Objects {
    /// An empty table whose fds go at `floor` or above.
    pub fn new(floor: RawFd) -> Objects {
        Objects {
            floor,
            fds: HashMap::new(),
        }
    }

    /// The lowest fd number the table (and anything else of ours that must survive
    /// the placing of fds) may use.
    pub fn floor(&self) -> RawFd {
        self.floor
    }

    pub fn get(&self, id: u32) -> Option<&OwnedFd> {
        self.fds.get(&id)
    }

    pub fn contains(&self, id: u32) -> bool {
        self.fds.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Adds the description of file `id` (moved above the floor). A creator that makes
    /// several objects at once, or `--inherit-fd` (one of our own fds), comes in here.
    pub fn insert(&mut self, id: u32, fd: OwnedFd) -> Result<(), ObjectsError> {
        let fd = park(fd, self.floor).map_err(|source| ObjectsError::Park {
            id,
            floor: self.floor,
            source,
        })?;
        self.fds.insert(id, fd);
        Ok(())
    }

    /// Moves one of our own fds (a pipe to the children, ...) above the floor, so
    /// that it survives the placing of the restored fds.
    pub fn park_own(&self, fd: OwnedFd) -> rustix::io::Result<OwnedFd> {
        park(fd, self.floor)
    }
}

fn park(fd: OwnedFd, floor: RawFd) -> rustix::io::Result<OwnedFd> {
    if fd.as_raw_fd() >= floor {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, floor)
}

/// The lowest number the table may use: above every fd of every process.
pub fn floor_of<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> RawFd {
    let top = plans
        .into_iter()
        .flat_map(|p| p.child.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2);
    top.max(2).saturating_add(1)
}

/// Creates every open file description the fds of `plans` refer to, each once.
/// `premade`: descriptions that exist already (`--inherit-fd`: ckpt-restore's own),
/// used for their file ids instead of making new ones.
pub fn create(plans: &[&Plan], premade: Vec<(u32, OwnedFd)>) -> Result<Objects, ObjectsError> {
    let floor = floor_of(plans.iter().copied());
    let mut ids: Vec<&FdOpen> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in plans {
        for f in &p.child.fds {
            if seen.insert(f.file_id) {
                ids.push(f);
            }
        }
    }
    // Files in flight in unix socket queues that no process holds are made too: the
    // socket sends them again with their packet.
    let carried: Vec<&FdOpen> = ids
        .iter()
        .filter_map(|f| match &f.source {
            FdSource::UnixSocket(sk) => Some(sk.carried.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    for f in carried {
        if seen.insert(f.file_id) {
            ids.push(f);
        }
    }
    // Everything at once: the table, plus the pipes to the children and a margin for
    // what each child opens itself (pidfds, a pipe per fd-table sharer).
    let needed = u64::try_from(floor).unwrap_or(0) + u64::try_from(ids.len()).unwrap_or(0) + 64;
    raise_nofile(needed)?;
    let mut objects = Objects::new(floor);
    for (id, fd) in premade {
        objects.insert(id, fd)?;
    }
    let is_unix = |f: &FdOpen| matches!(f.source, FdSource::UnixSocket(_));
    let mut kobjs = Kobjs::default();
    for f in ids.iter().copied() {
        if objects.contains(f.file_id) || is_unix(f) {
            continue;
        }
        let fd = match &f.source {
            FdSource::Path => open_file(f)?,
            _ => kobjs.create(f).map_err(|reason| ObjectsError::Create {
                id: f.file_id,
                what: kobj_name(&f.source),
                reason,
            })?,
        };
        objects.insert(f.file_id, fd)?;
    }
    // Unix sockets last, all at once: they refer to each other (peers, and connections
    // queued on listeners), and their queues may carry any object of the table in flight.
    // `create_all` sets their status flags itself.
    let unix = crate::sockets::unix::create_all(
        ids.iter()
            .copied()
            .filter(|f| is_unix(f) && !objects.contains(f.file_id)),
        |id| objects.get(id).map(std::os::fd::AsFd::as_fd),
    )?;
    for (id, fd) in unix {
        objects.insert(id, fd)?;
    }
    Ok(objects)
}

/// Raises the soft RLIMIT_NOFILE to fit `needed` fds (up to the hard limit). The
/// restored processes get their dumped limits back when rebuilt.
fn raise_nofile(needed: u64) -> Result<(), ObjectsError> {
    let now = rustix::process::getrlimit(Resource::Nofile);
    if now.current.is_none_or(|soft| soft >= needed) {
        return Ok(());
    }
    let hard = now.maximum;
    if hard.is_some_and(|hard| hard < needed) {
        return Err(ObjectsError::TooManyFiles {
            needed,
            hard: hard.unwrap_or(0),
        });
    }
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )
    .map_err(|source| ObjectsError::Rlimit {
        to: hard.unwrap_or(u64::MAX),
        source,
    })
}

/// A regular file (or directory, device...) opened as it was, at its offset.
fn open_file(f: &FdOpen) -> Result<OwnedFd, ObjectsError> {
    let path = f.open_path();
    let flags =
        OFlags::from_bits_retain(f.flags) & !(OFlags::CREATE | OFlags::EXCL | OFlags::TRUNC);
    let opened =
        rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty()).map_err(|source| {
            ObjectsError::Open {
                id: f.file_id,
                path: path.to_path_buf(),
                source,
            }
        })?;
    if f.pos != 0 {
        rustix::fs::seek(&opened, rustix::fs::SeekFrom::Start(f.pos)).map_err(|source| {
            ObjectsError::Seek {
                id: f.file_id,
                path: path.to_path_buf(),
                pos: f.pos,
                source,
            }
        })?;
    }
    Ok(opened)
}

pub(crate) fn kobj_name(source: &FdSource) -> &'static str {
    match source {
        FdSource::Path => "file",
        FdSource::Pipe { write: false, .. } => "pipe read end",
        FdSource::Pipe { write: true, .. } => "pipe write end",
        FdSource::Eventfd { .. } => "eventfd",
        FdSource::Signalfd { .. } => "signalfd",
        FdSource::Timerfd { .. } => "timerfd",
        FdSource::Epoll { .. } => "epoll",
        FdSource::Inotify { .. } => "inotify",
        FdSource::Fifo { .. } => "FIFO",
        FdSource::Inet(_) => "inet socket",
        FdSource::UnixSocket(_) => "unix socket",
    }
}

/// File status flags that `F_SETFL` can change and that a restored object keeps.
/// `O_DIRECT` is a pipe's packet mode.
fn status_flags(flags: u32) -> OFlags {
    OFlags::from_bits_retain(flags)
        & (OFlags::NONBLOCK | OFlags::APPEND | OFlags::ASYNC | OFlags::DIRECT)
}

/// The kernel objects behind fds: pipes are made once, at their first end, and filled
/// with their unread data; each end is handed out as its file id comes.
#[derive(Debug, Default)]
pub struct Kobjs {
    /// Pipe id to its (read, write) ends, until handed out.
    pipes: Vec<(u32, Option<OwnedFd>, Option<OwnedFd>)>,
}

impl Kobjs {
    /// Creates the object behind `f`; epoll targets are added later, by the process
    /// that holds the targets' fd numbers.
    pub fn create(&mut self, f: &FdOpen) -> Result<OwnedFd, String> {
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
            FdSource::Fifo { .. } => return crate::files::open_fifo(f),
            FdSource::Inet(sk) => crate::sockets::inet::create(sk).map_err(|e| e.to_string())?,
            // Made with every other unix socket of the tree, before any other object.
            FdSource::UnixSocket(_) => return Err("not made by sockets::unix::create_all".into()),
        };
        rustix::fs::fcntl_setfl(&made, status_flags(f.flags))
            .map_err(|e| format!("set flags {:#o}: {e}", f.flags))?;
        Ok(made)
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
            // hanging. Each end gets its dumped flags when handed out.
            let (r, w) = rustix::pipe::pipe_with(
                rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
            )
            .map_err(|e| format!("pipe: {e}"))?;
            if let Some(size) = size {
                crate::files::set_pipe_size(&w, size)?;
            }
            crate::files::write_all(&w, data)?;
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

/// An inotify instance whose watches get their dumped wds. The kernel hands out wds in
/// increasing order, so a gap (a watch removed before the dump) is skipped by adding and
/// removing a watch; a wd lower than the next one handed out cannot be had.
fn inotify(watches: &[(i32, PathBuf, u32)]) -> Result<OwnedFd, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(fd: i32, file_id: u32, source: FdSource) -> FdOpen {
        FdOpen {
            fd,
            file_id,
            path: PathBuf::new(),
            flags: 0,
            pos: 0,
            cloexec: false,
            ghost: None,
            source,
        }
    }

    #[test]
    fn both_ends_of_a_pipe_share_one_pipe_with_its_data() {
        let mut k = Kobjs::default();
        let source = |write| FdSource::Pipe {
            pipe_id: 7,
            write,
            size: None,
            data: b"queued".to_vec(),
        };
        let w = k.create(&fd(4, 11, source(true))).expect("write end");
        let r = k.create(&fd(3, 10, source(false))).expect("read end");
        rustix::io::write(&w, b"+").expect("write");
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&r, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"queued+");
        assert!(k.create(&fd(5, 12, source(false))).is_err());
    }

    #[test]
    fn table_entries_sit_above_the_floor() {
        let mut o = Objects::new(40);
        let (r, _w) = rustix::pipe::pipe().expect("pipe");
        o.insert(3, r).expect("insert");
        let got = o.get(3).expect("entry").as_raw_fd();
        assert!(got >= 40, "fd {got}");
    }
}
