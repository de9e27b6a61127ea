//! The daemon: serves the page faults of lazily restored processes and pushes their
//! remaining pages in the background until none is missing.
//!
//! One thread, one epoll set: the hand-off socket, restore's connection, every
//! userfaultfd and, for a remote source, its connection. Each turn of the loop first
//! handles what is ready (faults and the fork, mremap, munmap and madvise events of the
//! userfaultfds, the source's answers), then moves the background transfer on.
//!
//! From local images a fault block or a background chunk is read and copied at once.
//! Chunks grow from 64 KiB by 64 KiB per fault-free turn up to 4 MiB and fall back to
//! 64 KiB on a fault, so that a faulting thread waits for at most one small chunk, and are
//! held to about 2 ms of reading at the measured speed ([`crate::pace::Pace`]).
//!
//! From a remote source nothing is waited for. A fault sends its GET at once; background
//! GETs are kept in flight, small and several, as many as fill the round trip plus
//! [`crate::pace::QUEUE_TIME`] at the measured speed ([`crate::pace::Pipeline`]): the
//! source answers in order over one link, so everything asked before a fault is ahead of
//! its answer, and one big chunk at a time held a fault behind up to 2 ms of transfer
//! plus a round trip (3.4 ms gaps at 1 Gbit/s), while the link idled for a round trip
//! between chunks. An answer is read only once it has arrived whole (the connection is
//! edge-triggered, and [`Pages::answer_ready`] peeks), so that faults are heard and asked
//! for while an answer is still on the wire. A fault on a page already asked for waits for
//! that answer instead of asking again. An answer is copied only where the pages are still
//! missing at the addresses asked for: a fork, mremap or munmap meanwhile leaves the rest
//! to be asked for again.
//!
//! The background transfer starts [`DaemonOptions::background_delay`] (10 ms) after
//! restore has sent its end marker: before the marker restore is still building the tree
//! (CRIU's daemon waits for it too), and just after it the tree's first steps, each a
//! fault on a just-resumed process, must not queue behind background data; or sooner, once
//! no fault came for [`BACKGROUND_QUIET`] (the first steps are over). Local pages
//! images are read ahead into the page cache at the lowest priority from the moment a task
//! is handed over (see [`crate::source`]). A remote source learns from the GETs' flags
//! whether the end marker came (see [`crate::source`]): a page fetched before (restore
//! itself touching lazy memory) does not count as the destination running.
//!
//! A process that exits, or execs, leaves its userfaultfd without an address space: the
//! next copy fails with ESRCH and the process is dropped. The daemon exits once the end
//! marker arrived and no process misses a page; closing the userfaultfds then unregisters
//! their ranges, so pages that were never lazy read as zeroes from then on.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use images_format::{ImageDir, ImageError, PAGE_SIZE};
use rustix::event::epoll;
use rustix::fs::OFlags;
use rustix::io::Errno;
use tracee::uffd::{UffdError, UffdEvent, Userfaultfd};
use tracee::{CpuPin, RemoteAddr};

use crate::handoff::{HandoffError, HandoffListener, HandoffMessage, HandoffReceiver};
use crate::missing::{page_of, MissingPages, MissingRun};
use crate::pace::{Pace, Pipeline};
use crate::source::{PageSource, Pages, RemotePages, SourceError};

/// Smallest (and post-fault) background chunk.
pub const MIN_XFER: u64 = 64 << 10;
/// Largest background chunk.
pub const MAX_XFER: u64 = 4 << 20;
/// A fault is answered with the aligned block of this size around it (clipped to the
/// missing run): neighbours are likely next, and one 16 KiB copy costs about one 4 KiB one.
pub const FAULT_BLOCK: u64 = 16 << 10;

const LISTENER: u64 = 0;
const RESTORE: u64 = 1;
const FIRST_TASK: u64 = 2;
/// The remote source's connection (task keys count up from [`FIRST_TASK`]).
const SOURCE: u64 = u64::MAX;

/// What the daemon is told to do.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The image directory (pagemaps, and pages unless a page server serves them).
    pub images_dir: PathBuf,
    /// Where `lazy-pages.socket` is created.
    pub work_dir: PathBuf,
    /// Fetch pages from the dump side's page server instead of the images.
    pub page_server: Option<SocketAddr>,
    /// Pin the daemon to this CPU. The faulting threads' CPUs are not looked up: their pids
    /// may not be host pids. A fault served on the faulting thread's CPU costs ~5 µs, across
    /// CPUs ~80 µs in a VM; pin the restored tree and the daemon together where it matters.
    pub cpu: Option<u32>,
    /// Cap the background transfer at this many bytes per second (faults are never
    /// held back), to leave the link or the disk to others.
    pub background_rate: Option<u64>,
    /// How long after restore's end marker the background transfer waits (faults are
    /// served at once): the restored tree's first steps, and restore's own last ones, then
    /// do not share the CPUs with a copy loop. [`BACKGROUND_DELAY`] by default.
    pub background_delay: Duration,
    /// Or sooner, once no fault came this long after the end marker and after the last
    /// fault. [`BACKGROUND_QUIET`] by default; at least the delay: the delay alone.
    pub background_quiet: Duration,
}

/// The default [`DaemonOptions::background_delay`].
pub const BACKGROUND_DELAY: Duration = Duration::from_millis(10);

/// The first steps are over sooner if no fault came this long after the end marker and
/// after the last fault: a process that settled (a small one, or one that touches little
/// of its memory) does not wait the whole delay for the rest of its pages, while one that
/// keeps faulting gets its first faults answered before any background data.
pub const BACKGROUND_QUIET: Duration = Duration::from_millis(1);

/// Counts of what the daemon did.
#[derive(Clone, Debug, Default)]
pub struct DaemonStats {
    /// Userfaultfds received from restore, and created by forks.
    pub tasks: u64,
    pub forks: u64,
    pub zombies: u64,
    /// Processes that went away with pages still missing.
    pub exited: u64,
    /// Faults answered with `UFFDIO_COPY`.
    pub faults_copied: u64,
    /// Faults answered with `UFFDIO_ZEROPAGE` (no lazy page there).
    pub faults_zero: u64,
    pub remaps: u64,
    pub unmaps: u64,
    pub removes: u64,
    /// Bytes copied to answer faults, and in the background.
    pub fault_bytes: u64,
    pub background_bytes: u64,
    /// Lazy bytes announced by the pagemaps of the tasks restore handed over.
    pub lazy_bytes: u64,
    /// Answers read from a remote source, and how often its connection woke the daemon.
    pub answers: u64,
    pub source_wakeups: u64,
    /// From start to the end marker, and to the last page.
    pub until_finished: Option<Duration>,
    pub total: Duration,
}

/// The daemon stopped on an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error(transparent)]
    Images(ImageError),
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("epoll {op}")]
    Epoll {
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("pid {pid}: make its userfaultfd non-blocking")]
    NonBlocking {
        pid: i32,
        #[source]
        errno: Errno,
    },
    #[error("pid {pid}: fill {addr}")]
    Fill {
        pid: i32,
        addr: RemoteAddr,
        #[source]
        source: UffdError,
    },
    #[error("restore closed the hand-off socket before every task was restored")]
    RestoreGone,
    #[error("pin to cpu")]
    Pin(#[source] tracee::cpu::PinError),
}

/// A daemon listening for restore, not yet serving.
#[derive(Debug)]
pub struct LazyDaemon {
    listener: HandoffListener,
    pages: Pages,
    cpu: Option<u32>,
    background_rate: Option<u64>,
    background_delay: Duration,
    background_quiet: Duration,
}

impl LazyDaemon {
    /// Creates the hand-off socket and, for a remote source, connects to the page server.
    /// Restore may connect as soon as this returns.
    pub fn bind(opts: &DaemonOptions) -> Result<LazyDaemon, DaemonError> {
        let dir = ImageDir::new(&opts.images_dir).map_err(DaemonError::Images)?;
        let source = match opts.page_server {
            Some(addr) => PageSource::Remote(RemotePages::connect(addr)?),
            None => PageSource::Local,
        };
        let listener = HandoffListener::bind(&opts.work_dir)?;
        Ok(LazyDaemon {
            listener,
            pages: Pages::new(dir, source),
            cpu: opts.cpu,
            background_rate: opts.background_rate.filter(|&r| r > 0),
            background_delay: opts.background_delay,
            background_quiet: opts.background_quiet,
        })
    }

    /// Ask the page server for zstd-compressed pages (our extension of the protocol; see
    /// [`crate::source`]). No effect on pages read from local images.
    pub fn set_compress_pages(&mut self, on: bool) {
        self.pages.set_compress_pages(on);
    }

    /// The hand-off socket's path.
    pub fn socket_path(&self) -> &std::path::Path {
        self.listener.path()
    }

    /// Serves until every lazy page of every process is in and restore has finished.
    pub fn run(self) -> Result<DaemonStats, DaemonError> {
        let _pin = self
            .cpu
            .map(CpuPin::to_cpu)
            .transpose()
            .map_err(DaemonError::Pin)?;
        // A fault's thread waits while we are queued behind whatever holds the CPU: woken,
        // we go first (see `short_slice`); once the tasks run, at real time (see
        // `Server::urgent`).
        if let Err(error) = tracee::taskinfo::short_slice(tracee::taskinfo::SHORTEST_SLICE) {
            tracing::debug!(%error, "serving faults at the default time slice");
        }
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|errno| DaemonError::Epoll {
                op: "create",
                errno,
            })?;
        add(&epoll, &self.listener, LISTENER)?;
        let mut server = Server {
            epoll,
            listener: self.listener,
            restore: None,
            pages: self.pages,
            tasks: BTreeMap::new(),
            next_key: FIRST_TASK,
            finished: false,
            hand_back: false,
            finish_unlogged: false,
            background_rate: self.background_rate,
            background_delay: self.background_delay,
            background_quiet: self.background_quiet,
            xfer_len: MIN_XFER,
            pace: Pace::new(MAX_XFER, FAULT_BLOCK),
            background_key: FIRST_TASK,
            buf: vec![0u8; usize::try_from(MAX_XFER).expect("4 MiB fits usize")],
            stats: DaemonStats::default(),
            started: Instant::now(),
            faulted: false,
            last_fault: None,
            remote: false,
            inflight: VecDeque::new(),
            pipeline: Pipeline::new(FAULT_BLOCK),
            urgent: None,
        };
        if let Some(fd) = server.pages.remote_fd() {
            // Edge-triggered: each arrival of data wakes us, and an answer is read only
            // once it is whole (see `receive_ready`).
            epoll::add(
                &server.epoll,
                fd,
                epoll::EventData::new_u64(SOURCE),
                epoll::EventFlags::IN | epoll::EventFlags::ET,
            )
            .map_err(|errno| DaemonError::Epoll { op: "add", errno })?;
            server.remote = true;
        }
        server.serve()?;
        let Server {
            pages,
            stats,
            restore,
            hand_back,
            ..
        } = server;
        // A source that did not hear from us since the end marker learns from CLOSE that
        // the destination runs. Until it has, the tree must not outlive us: failing here
        // before the final marker makes the watch kill it.
        let told = pages.source_told();
        match pages.close() {
            Ok(()) => {}
            Err(error) if told => tracing::warn!(%error, "closing the session with the source"),
            Err(error) => return Err(error.into()),
        }
        if hand_back {
            if let Some(restore) = &restore {
                // The watcher closes its references now. It may be gone already (the
                // tree exited and the waiting restore with it): nothing to tell then.
                if let Err(error) = restore.send_done() {
                    tracing::warn!(%error, "could not tell restore that every page is in");
                }
            }
        }
        Ok(stats)
    }
}

/// A process whose faults we serve.
#[derive(Debug)]
struct Task {
    /// The image pid whose pagemap holds its pages (a forked child's is its parent's).
    pid: i32,
    uffd: Userfaultfd,
    missing: MissingPages,
    /// Where the background transfer continues in this process.
    cursor: u64,
    /// Faults that could not be answered yet (the address space was changing).
    pending: Vec<u64>,
}

/// Pages asked of a remote source, not answered yet.
#[derive(Debug)]
struct Request {
    key: u64,
    /// The image pid asked with.
    pid: i32,
    /// `[start, start + len)` in the task when asked, whose pages are the image's from
    /// `image` on.
    start: u64,
    len: u64,
    image: u64,
    /// Fault addresses waiting for these pages; a request made for a fault has its own.
    waiters: Vec<u64>,
    fault: bool,
    sent: Instant,
}

impl Request {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    fn covers(&self, key: u64, page: u64) -> bool {
        self.key == key && self.start <= page && page < self.end()
    }
}

enum Fill {
    Done,
    /// The address space is changing: read its events, then retry.
    Again,
    /// The address space is gone.
    Gone,
}

struct Server {
    epoll: OwnedFd,
    listener: HandoffListener,
    restore: Option<HandoffReceiver>,
    pages: Pages,
    tasks: BTreeMap<u64, Task>,
    next_key: u64,
    finished: bool,
    /// Restore keeps watch: fork userfaultfds go back to it, and the final marker.
    hand_back: bool,
    /// Restore finished, and that is not logged yet (see [`Server::log_finished`]).
    finish_unlogged: bool,
    background_rate: Option<u64>,
    background_delay: Duration,
    background_quiet: Duration,
    xfer_len: u64,
    /// Chunk and fault block limits from the source's measured speed.
    pace: Pace,
    background_key: u64,
    buf: Vec<u8>,
    stats: DaemonStats,
    started: Instant,
    /// A fault was served in this turn of the loop.
    faulted: bool,
    /// When the last fault came (since `started`).
    last_fault: Option<Duration>,
    /// Pages come from a remote source, asked for ahead of time (see [`Pipeline`]).
    remote: bool,
    /// Requests to the remote source not answered yet, oldest first (it answers in order).
    inflight: VecDeque<Request>,
    pipeline: Pipeline,
    /// Real time from restore's end marker on (see `RealTime`; refused, we keep our short
    /// slices), for pages from a remote source: we then wait on the network, mostly asleep.
    /// Not for local images, whose background copy runs flat out and would take the CPU
    /// from a program that shares it. Not before the end marker either, when a prepared
    /// restore, at the same priority, switches on this CPU and must not wait for the tasks'
    /// registration.
    urgent: Option<tracee::taskinfo::RealTime>,
}

fn add(epoll: &OwnedFd, fd: impl AsFd, key: u64) -> Result<(), DaemonError> {
    epoll::add(
        epoll,
        fd,
        epoll::EventData::new_u64(key),
        epoll::EventFlags::IN,
    )
    .map_err(|errno| DaemonError::Epoll { op: "add", errno })
}

impl Server {
    fn serve(&mut self) -> Result<(), DaemonError> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        loop {
            let work_left = self.tasks.values().any(|t| !t.missing.is_empty());
            if self.finished && !work_left && self.inflight.is_empty() {
                break;
            }
            let waiting = if self.finished && work_left {
                self.background_wait()
            } else {
                None
            };
            let background = self.finished && work_left && waiting.is_none();
            let paced = background && self.background_paused();
            // A fault refused with EAGAIN waits for the address space change to end, which
            // the changing thread finishes after we read its event: nothing will wake us
            // for it, so poll again soon.
            let pending = self.tasks.values().any(|t| !t.pending.is_empty());
            let timeout = if let Some(wait) = waiting {
                Some(rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: i64::from(wait.subsec_nanos()).max(1),
                })
            } else if paced {
                Some(rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                })
            } else if background && (!self.remote || self.inflight.is_empty()) {
                // Locally, the next chunk is copied at once; a remote source's answers
                // wake us.
                Some(rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                })
            } else if pending {
                Some(rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 200_000,
                })
            } else {
                None
            };
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(DaemonError::Epoll { op: "wait", errno }),
            }
            self.faulted = false;
            let ready: Vec<u64> = events.iter().map(|e| e.data.u64()).collect();
            for key in ready {
                match key {
                    LISTENER => self.accept()?,
                    RESTORE => self.handoff()?,
                    SOURCE => self.receive_ready()?,
                    key => self.drain(key)?,
                }
            }
            self.retry_pending()?;
            let background_now =
                self.finished && self.background_wait().is_none() && !self.background_paused();
            if background_now {
                self.log_finished();
            }
            if self.remote {
                if background_now {
                    self.fill_window()?;
                }
            } else if self.faulted {
                self.xfer_len = MIN_XFER;
            } else if background_now {
                self.background_step()?;
            }
        }
        self.log_finished();
        self.stats.total = self.started.elapsed();
        for (_, task) in std::mem::take(&mut self.tasks) {
            self.forget(task);
        }
        tracing::info!(
            faults_copied = self.stats.faults_copied,
            faults_zero = self.stats.faults_zero,
            fault_bytes = self.stats.fault_bytes,
            background_bytes = self.stats.background_bytes,
            answers = self.stats.answers,
            source_wakeups = self.stats.source_wakeups,
            ms = self.stats.total.as_millis(),
            "every lazy page is in"
        );
        Ok(())
    }

    /// Says that restore finished, once: when the background transfer starts, not
    /// before the first faults of the resumed tasks are asked for (a log line is tens of
    /// microseconds that a faulting thread would wait).
    fn log_finished(&mut self) {
        if std::mem::take(&mut self.finish_unlogged) {
            tracing::info!(
                tasks = self.stats.tasks,
                lazy_bytes = self.stats.lazy_bytes,
                "restore finished, starting the background transfer"
            );
        }
    }

    fn accept(&mut self) -> Result<(), DaemonError> {
        let receiver = self.listener.accept()?;
        if self.restore.is_some() || self.finished {
            // One restore per daemon; a second connection is refused by closing it.
            tracing::warn!("a second connection on the hand-off socket was closed");
            return Ok(());
        }
        add(&self.epoll, &receiver, RESTORE)?;
        self.restore = Some(receiver);
        // A prepared restore connects once its tree is built from the images here, long
        // before it hands the tasks over at the switch.
        self.pages.open_early();
        Ok(())
    }

    fn handoff(&mut self) -> Result<(), DaemonError> {
        let Some(receiver) = self.restore.as_mut() else {
            return Ok(());
        };
        match receiver.receive()? {
            Some(HandoffMessage::Task { pid, uffd }) => self.add_task(pid, uffd),
            Some(HandoffMessage::Zombie { pid }) => {
                tracing::debug!(pid, "zombie");
                self.stats.zombies += 1;
                Ok(())
            }
            Some(HandoffMessage::Watch) => {
                self.hand_back = true;
                Ok(())
            }
            Some(HandoffMessage::Finished) if self.finished => Ok(()),
            Some(HandoffMessage::Finished) => {
                self.finished = true;
                if self.remote {
                    self.urgent = Some(tracee::taskinfo::RealTime::raise());
                }
                self.stats.until_finished = Some(self.started.elapsed());
                // The tasks resume now: a remote source learns it from our next GET or CLOSE.
                self.pages.restore_finished();
                // Said when the background transfer starts (see `log_finished`).
                self.finish_unlogged = true;
                if !self.hand_back {
                    self.close_restore();
                }
                Ok(())
            }
            None => {
                self.close_restore();
                if self.finished {
                    Ok(())
                } else {
                    Err(DaemonError::RestoreGone)
                }
            }
        }
    }

    fn close_restore(&mut self) {
        if let Some(receiver) = self.restore.take() {
            if let Err(errno) = epoll::delete(&self.epoll, &receiver) {
                tracing::warn!(%errno, "epoll delete of the hand-off connection");
            }
        }
    }

    // No span here: made at the switch, between the tasks' resume and their first fault,
    // one costs tens of microseconds.
    fn add_task(&mut self, pid: i32, uffd: OwnedFd) -> Result<(), DaemonError> {
        let ranges = self.pages.open_task(pid)?;
        let mut missing = MissingPages::new();
        for range in &ranges {
            missing.insert(range.vaddr, range.vaddr + range.len, range.vaddr);
        }
        self.stats.lazy_bytes += missing.bytes();
        tracing::debug!(pid, lazy_bytes = missing.bytes(), "task handed over");
        self.insert_task(Task {
            pid,
            uffd: Userfaultfd::from_fd(uffd),
            missing,
            cursor: 0,
            pending: Vec::new(),
        })
    }

    fn insert_task(&mut self, task: Task) -> Result<(), DaemonError> {
        // poll() on a blocking userfaultfd reports an error instead of readiness. A fork's
        // userfaultfd takes the flags its parent was created with, not ours.
        let flags =
            rustix::fs::fcntl_getfl(&task.uffd).map_err(|errno| DaemonError::NonBlocking {
                pid: task.pid,
                errno,
            })?;
        rustix::fs::fcntl_setfl(&task.uffd, flags | OFlags::NONBLOCK).map_err(|errno| {
            DaemonError::NonBlocking {
                pid: task.pid,
                errno,
            }
        })?;
        let key = self.next_key;
        self.next_key += 1;
        add(&self.epoll, &task.uffd, key)?;
        self.tasks.insert(key, task);
        self.stats.tasks += 1;
        Ok(())
    }

    fn forget(&self, task: Task) {
        // Restore keeps duplicates of the fd: the registration would outlive our close.
        if let Err(errno) = epoll::delete(&self.epoll, &task.uffd) {
            tracing::warn!(pid = task.pid, %errno, "epoll delete of a userfaultfd");
        }
    }

    fn drop_task(&mut self, key: u64) {
        if let Some(task) = self.tasks.remove(&key) {
            if !task.missing.is_empty() {
                self.stats.exited += 1;
                tracing::debug!(
                    pid = task.pid,
                    missing = task.missing.bytes(),
                    "address space gone"
                );
            }
            self.forget(task);
        }
    }

    /// Reads every pending event of one userfaultfd and acts on it.
    fn drain(&mut self, key: u64) -> Result<(), DaemonError> {
        let mut events = Vec::new();
        {
            let Some(task) = self.tasks.get(&key) else {
                return Ok(());
            };
            loop {
                match task.uffd.read_event() {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(error) => {
                        tracing::debug!(pid = task.pid, %error, "userfaultfd unreadable");
                        self.drop_task(key);
                        return Ok(());
                    }
                }
            }
        }
        for event in events {
            match event {
                UffdEvent::Pagefault { addr, .. } => {
                    self.faulted = true;
                    self.last_fault = Some(self.started.elapsed());
                    self.serve_fault(key, addr.get())?;
                }
                UffdEvent::Fork { uffd } => {
                    let Some(parent) = self.tasks.get(&key) else {
                        continue;
                    };
                    // The child's copy of the registered ranges misses exactly the pages
                    // the parent misses now: copies into the parent fail with EAGAIN from
                    // the start of fork until this event is read.
                    if self.hand_back {
                        if let Some(restore) = &self.restore {
                            if let Err(error) = restore.send_uffd(parent.pid, uffd.as_fd()) {
                                tracing::warn!(pid = parent.pid, %error, "could not hand a fork's userfaultfd back");
                            }
                        }
                    }
                    let child = Task {
                        pid: parent.pid,
                        uffd,
                        missing: parent.missing.clone(),
                        cursor: parent.cursor,
                        pending: Vec::new(),
                    };
                    self.stats.forks += 1;
                    self.insert_task(child)?;
                }
                UffdEvent::Remap { from, to, len } => {
                    self.stats.remaps += 1;
                    if let Some(task) = self.tasks.get_mut(&key) {
                        task.missing.remap(from.get(), to.get(), len);
                    }
                }
                UffdEvent::Unmap { start, end } => {
                    self.stats.unmaps += 1;
                    if let Some(task) = self.tasks.get_mut(&key) {
                        task.missing.remove(start.get(), end.get());
                    }
                }
                UffdEvent::Remove { start, end } => {
                    self.stats.removes += 1;
                    if let Some(task) = self.tasks.get_mut(&key) {
                        task.missing.remove(start.get(), end.get());
                    }
                }
                UffdEvent::Unknown { event } => {
                    tracing::warn!(event, "unknown userfaultfd event ignored");
                }
            }
        }
        Ok(())
    }

    fn retry_pending(&mut self) -> Result<(), DaemonError> {
        let keys: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.pending.is_empty())
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            self.drain(key)?;
            let pending = match self.tasks.get_mut(&key) {
                Some(task) => std::mem::take(&mut task.pending),
                None => continue,
            };
            for addr in pending {
                self.serve_fault(key, addr)?;
            }
        }
        Ok(())
    }

    fn serve_fault(&mut self, key: u64, addr: u64) -> Result<(), DaemonError> {
        let page = page_of(addr);
        let Some(task) = self.tasks.get_mut(&key) else {
            return Ok(());
        };
        let Some(run) = task.missing.find(page) else {
            // Registered but never lazy (never written before the dump, or dropped since):
            // it reads as zeroes.
            let result = task.uffd.zeropage(RemoteAddr(page), PAGE_SIZE, false);
            let pid = task.pid;
            match result {
                Ok(()) => self.stats.faults_zero += 1,
                Err(UffdError::Partial { errno, .. }) => match errno {
                    Errno::AGAIN => task.pending.push(addr),
                    Errno::SRCH => self.drop_task(key),
                    // EEXIST: another thread's fault filled it; ENOENT: unmapped. Either
                    // way the thread must retry its access.
                    _ => wake(task, page),
                },
                Err(source) => {
                    return Err(DaemonError::Fill {
                        pid,
                        addr: RemoteAddr(page),
                        source,
                    })
                }
            }
            return Ok(());
        };
        if self.remote {
            return self.ask_for_fault(key, addr, run);
        }
        let size = self.pace.fault_block();
        let block = page & !(size - 1);
        let start = block.max(run.start);
        let end = (block + size).min(run.end);
        task.cursor = end;
        let before = self.stats.fault_bytes;
        let began = Instant::now();
        let filled = self.fill(key, start, end, true)?;
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            bytes = end - start,
            us = began.elapsed().as_micros() as u64,
            "fault block"
        );
        match filled {
            Fill::Done => {
                self.stats.faults_copied += 1;
                if let Some(task) = self.tasks.get(&key) {
                    // Pages skipped as not registered leave the thread waiting.
                    if self.stats.fault_bytes == before || task.missing.find(page).is_some() {
                        wake(task, page);
                    }
                }
            }
            Fill::Again => {
                if let Some(task) = self.tasks.get_mut(&key) {
                    task.pending.push(addr);
                }
            }
            Fill::Gone => self.drop_task(key),
        }
        Ok(())
    }

    /// How long the background transfer still waits after the end marker, if at all: the
    /// delay, or less once faults went quiet (`background_quiet`).
    fn background_wait(&self) -> Option<Duration> {
        let since = self.stats.until_finished?;
        let now = self.started.elapsed();
        let left = self
            .background_delay
            .checked_sub(now.saturating_sub(since))?;
        let last = self.last_fault.map_or(since, |at| at.max(since));
        let quiet = self
            .background_quiet
            .checked_sub(now.saturating_sub(last))?;
        let left = left.min(quiet);
        (!left.is_zero()).then_some(left.min(Duration::from_millis(999)))
    }

    /// Under a rate cap, whether the background transfer is ahead of it.
    fn background_paused(&self) -> bool {
        let (Some(rate), Some(since)) = (self.background_rate, self.stats.until_finished) else {
            return false;
        };
        let elapsed = self.started.elapsed().saturating_sub(since);
        let allowed = u128::from(rate) * elapsed.as_micros() / 1_000_000;
        let asked: u64 = self
            .inflight
            .iter()
            .filter(|r| !r.fault)
            .map(|r| r.len)
            .sum();
        u128::from(self.stats.background_bytes + asked) >= allowed
    }

    /// The next missing run in the background's round robin over the tasks, and the page
    /// in it to go on from (its task's cursor, if the cursor is inside it).
    fn next_background_run(&self) -> Option<(u64, u64, MissingRun)> {
        let (key, cursor, run) = self
            .tasks
            .range(self.background_key..)
            .chain(self.tasks.range(..self.background_key))
            .find(|(_, t)| !t.missing.is_empty())
            .map(|(&k, t)| (k, t.cursor, t.missing.next_from(t.cursor)))?;
        let run = run?;
        let start = if run.start <= cursor && cursor < run.end {
            page_of(cursor)
        } else {
            run.start
        };
        Some((key, start, run))
    }

    fn background_step(&mut self) -> Result<(), DaemonError> {
        let Some((key, start, run)) = self.next_background_run() else {
            return Ok(());
        };
        let end = run
            .end
            .min(start + self.xfer_len.min(self.pace.chunk_cap()));
        if let Some(task) = self.tasks.get_mut(&key) {
            task.cursor = end;
        }
        self.background_key = key + 1;
        let began = Instant::now();
        match self.fill(key, start, end, false)? {
            Fill::Done => {
                self.pace.observe(end - start, began.elapsed());
                tracing::debug!(
                    bytes = end - start,
                    us = began.elapsed().as_micros() as u64,
                    next_cap = self.pace.chunk_cap(),
                    "background chunk"
                );
            }
            Fill::Again => {}
            Fill::Gone => self.drop_task(key),
        }
        self.xfer_len = (self.xfer_len + MIN_XFER).min(MAX_XFER);
        Ok(())
    }

    /// A fault on `addr`, missing in `run`: asks the remote source for the block around it,
    /// or waits for the request already asked that holds it.
    fn ask_for_fault(&mut self, key: u64, addr: u64, run: MissingRun) -> Result<(), DaemonError> {
        let page = page_of(addr);
        if let Some(request) = self.inflight.iter_mut().find(|r| r.covers(key, page)) {
            tracing::debug!(
                addr = format_args!("{addr:#x}"),
                "fault waits for pages asked for"
            );
            request.waiters.push(addr);
            return Ok(());
        }
        let size = self.pipeline.fault_block();
        let block = page & !(size - 1);
        let mut start = block.max(run.start);
        let mut end = (block + size).min(run.end);
        // Neighbours already asked for are not asked for twice.
        for request in self.inflight.iter().filter(|r| r.key == key) {
            if request.end() <= page {
                start = start.max(request.end());
            } else if request.start > page {
                end = end.min(request.start);
            }
        }
        if let Some(task) = self.tasks.get_mut(&key) {
            task.cursor = end;
        }
        self.ask(key, start, end, run, Some(addr))
    }

    /// Asks the remote source for `[start, end)` of the task, inside the missing `run`.
    fn ask(
        &mut self,
        key: u64,
        start: u64,
        end: u64,
        run: MissingRun,
        fault: Option<u64>,
    ) -> Result<(), DaemonError> {
        let Some(task) = self.tasks.get(&key) else {
            return Ok(());
        };
        let pid = task.pid;
        let image = run.image_of(start);
        let len = end - start;
        // Before the write: the source may answer before this thread runs again.
        let sent = Instant::now();
        self.pages.request(pid, image, len / PAGE_SIZE)?;
        self.inflight.push_back(Request {
            key,
            pid,
            start,
            len,
            image,
            waiters: fault.into_iter().collect(),
            fault: fault.is_some(),
            sent,
        });
        Ok(())
    }

    /// Keeps background requests in flight up to the pipeline's window.
    fn fill_window(&mut self) -> Result<(), DaemonError> {
        let chunk = self.pipeline.chunk();
        // Each turn asks for a chunk or skips past pages already asked for.
        for _ in 0..16 {
            let in_flight: u64 = self.inflight.iter().map(|r| r.len).sum();
            if !self.pipeline.room(in_flight, chunk) || !self.ask_background(chunk)? {
                break;
            }
        }
        Ok(())
    }

    /// Asks for the next background chunk, round robin over the tasks; `false` when no
    /// page is left to ask for.
    fn ask_background(&mut self, chunk: u64) -> Result<bool, DaemonError> {
        let Some((key, start, run)) = self.next_background_run() else {
            return Ok(false);
        };
        let mut end = run.end.min(start + chunk);
        for request in self.inflight.iter().filter(|r| r.key == key) {
            if request.start <= start && start < request.end() {
                // Asked for already: go on after it.
                if let Some(task) = self.tasks.get_mut(&key) {
                    task.cursor = request.end();
                }
                return Ok(true);
            }
            if start < request.start && request.start < end {
                end = request.start;
            }
        }
        if let Some(task) = self.tasks.get_mut(&key) {
            task.cursor = end;
        }
        self.background_key = key + 1;
        self.ask(key, start, end, run, None)?;
        Ok(true)
    }

    /// Reads every answer that arrived whole. One still arriving is left to the next
    /// wake-up: reading it now would leave faults unheard for as long as its rest takes.
    fn receive_ready(&mut self) -> Result<(), DaemonError> {
        self.stats.source_wakeups += 1;
        while self.pages.answer_ready()? {
            self.receive_answer()?;
            if self.inflight.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// Reads the answer to the oldest request and copies what is still missing where the
    /// request said, then serves the faults that waited for it.
    fn receive_answer(&mut self) -> Result<(), DaemonError> {
        let Some(request) = self.inflight.pop_front() else {
            // Nothing asked: the source closed the connection, or broke the protocol.
            // Reading says which.
            let mut buf = std::mem::take(&mut self.buf);
            let got = self.pages.receive(0, 0, &mut buf[..PAGE_SIZE as usize]);
            self.buf = buf;
            got?;
            return Ok(());
        };
        let len = usize::try_from(request.len).expect("at most a chunk");
        let mut buf = std::mem::take(&mut self.buf);
        let received = self
            .pages
            .receive(request.pid, request.image, &mut buf[..len]);
        let now = Instant::now();
        let outcome = received.map_err(DaemonError::from).and_then(|got| {
            let got = got.min(len);
            self.pipeline
                .answered(got as u64, request.sent, now, !self.inflight.is_empty());
            self.install(&request, &buf[..got])
        });
        self.buf = buf;
        let outcome = outcome?;
        self.stats.answers += 1;
        tracing::debug!(
            bytes = request.len,
            us = now.duration_since(request.sent).as_micros() as u64,
            in_flight = self.inflight.len(),
            window = self.pipeline.window(),
            "{}",
            if request.fault {
                "fault block"
            } else {
                "background chunk"
            }
        );
        match outcome {
            Fill::Done => {
                if request.fault {
                    self.stats.faults_copied += 1;
                }
                for addr in request.waiters {
                    let Some(task) = self.tasks.get(&request.key) else {
                        break;
                    };
                    if task.missing.find(page_of(addr)).is_some() {
                        // A short answer, or the page moved meanwhile: ask again.
                        self.serve_fault(request.key, addr)?;
                    } else {
                        // Copied (which woke it), or dropped as not registered.
                        wake(task, page_of(addr));
                    }
                }
            }
            Fill::Again => {
                if let Some(task) = self.tasks.get_mut(&request.key) {
                    task.pending.extend(request.waiters);
                }
            }
            Fill::Gone => self.drop_task(request.key),
        }
        Ok(())
    }

    /// Copies an answer to `request` into the task, page runs that are still missing at
    /// the addresses asked for and come from the same image pages (the task may have
    /// filled, moved or unmapped some meanwhile).
    fn install(&mut self, request: &Request, data: &[u8]) -> Result<Fill, DaemonError> {
        let end = request.start + data.len() as u64;
        let mut at = request.start;
        while at < end {
            let Some(task) = self.tasks.get(&request.key) else {
                return Ok(Fill::Gone);
            };
            let image = request.image + (at - request.start);
            let stop = match task.missing.find(at) {
                Some(run) if run.image_of(at) == image => run.end.min(end),
                _ => {
                    at += PAGE_SIZE;
                    continue;
                }
            };
            let from = usize::try_from(at - request.start).expect("inside the answer");
            let to = usize::try_from(stop - request.start).expect("inside the answer");
            let (_, outcome) = self.copy_piece(request.key, at, &data[from..to], request.fault)?;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            at = stop;
        }
        Ok(Fill::Done)
    }

    /// Copies the image's pages into `[start, end)` of the task, as far as they are still
    /// missing, and forgets them.
    fn fill(&mut self, key: u64, start: u64, end: u64, fault: bool) -> Result<Fill, DaemonError> {
        let mut at = start;
        while at < end {
            let Some(task) = self.tasks.get_mut(&key) else {
                return Ok(Fill::Gone);
            };
            let Some(run) = task.missing.find(at) else {
                at += PAGE_SIZE;
                continue;
            };
            let stop = end.min(run.end);
            let len = usize::try_from(stop - at).expect("at most a chunk");
            let pid = task.pid;
            let mut buf = std::mem::take(&mut self.buf);
            let fetched = self.pages.fetch(pid, run.image_of(at), &mut buf[..len]);
            let copied = fetched.map_err(DaemonError::from).and_then(|got| {
                let got = got.min(len);
                self.copy_piece(key, at, &buf[..got], fault)
            });
            self.buf = buf;
            let (off, outcome) = copied?;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            at += off;
        }
        Ok(Fill::Done)
    }

    /// Copies `data` to `at` in the task, which misses those pages from one run, and
    /// forgets them; returns how far it got, and why it stopped short if it did.
    fn copy_piece(
        &mut self,
        key: u64,
        at: u64,
        data: &[u8],
        fault: bool,
    ) -> Result<(u64, Option<Fill>), DaemonError> {
        let Some(task) = self.tasks.get_mut(&key) else {
            return Ok((0, Some(Fill::Gone)));
        };
        let mut off = 0usize;
        let mut copied = 0u64;
        // UFFDIO_COPY stays inside one VMA: a range crossing into the next one (a
        // run spanning two VMAs, or one split by mprotect since) fails whole with
        // ENOENT. Halve the copy until it fits, then go back to the whole remainder.
        let mut try_len = data.len();
        let outcome = loop {
            if off >= data.len() {
                break None;
            }
            let dst = RemoteAddr(at + off as u64);
            let piece = try_len.min(data.len() - off);
            match task.uffd.copy(dst, &data[off..off + piece], false) {
                Ok(()) => {
                    copied += piece as u64;
                    off += piece;
                    try_len = data.len();
                }
                Err(UffdError::Partial { done, .. }) if done > 0 => {
                    copied += done;
                    off += usize::try_from(done).unwrap_or(piece).min(piece);
                    try_len = data.len();
                }
                Err(UffdError::Partial {
                    errno: Errno::NOENT,
                    ..
                }) if piece > PAGE_SIZE as usize => {
                    try_len = (piece / 2) & !(PAGE_SIZE as usize - 1);
                    try_len = try_len.max(PAGE_SIZE as usize);
                }
                Err(UffdError::Partial { errno, .. }) => match errno {
                    // Already there (a fork's child shares it, or a racing fault): it
                    // is not ours to fill; wake whoever waits on it.
                    Errno::EXIST => {
                        wake(task, dst.get());
                        off += PAGE_SIZE as usize;
                    }
                    // Not registered (restore did not register it, or it is being
                    // unmapped): drop the page.
                    Errno::NOENT => {
                        off += PAGE_SIZE as usize;
                        try_len = data.len();
                    }
                    Errno::AGAIN => break Some(Fill::Again),
                    Errno::SRCH => break Some(Fill::Gone),
                    errno => {
                        return Err(DaemonError::Fill {
                            pid: task.pid,
                            addr: dst,
                            source: UffdError::Partial {
                                op: "UFFDIO_COPY",
                                addr: dst,
                                done: 0,
                                len: piece as u64,
                                errno,
                            },
                        });
                    }
                },
                Err(source) => {
                    return Err(DaemonError::Fill {
                        pid: task.pid,
                        addr: dst,
                        source,
                    })
                }
            }
        };
        let off = off.min(data.len()) as u64;
        task.missing.remove(at, at + off);
        if fault {
            self.stats.fault_bytes += copied;
        } else {
            self.stats.background_bytes += copied;
        }
        Ok((off, outcome))
    }
}

fn wake(task: &Task, page: u64) {
    if let Err(error) = task.uffd.wake(RemoteAddr(page), PAGE_SIZE) {
        tracing::debug!(pid = task.pid, %error, "wake");
    }
}
