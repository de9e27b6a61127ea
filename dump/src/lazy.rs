//! The source side of post-copy (`ckpt-dump --lazy-pages --address A --port P`).
//!
//! The dump writes every image, but the pages of private anonymous memory are only listed
//! (`PE_LAZY`, no data; with `--prev-images-dir` and `--track-mem`, pages unchanged since the
//! pre-dump are `PE_PARENT` and only the written ones lazy). The process stays frozen, and
//! [`serve`] answers the lazy-pages daemon of the destination from its memory
//! (`process_vm_readv` of the frozen process), speaking CRIU's page-server pull protocol on
//! one TCP session accepted on `A:P`, the address the user named:
//!
//! ```text
//! daemon (destination)                                source (ckpt-dump, process frozen)
//!   connect A:P
//!   GET {cmd 7 | 1 << 30, nr_pages, vaddr, pid} ---->  before restore's end marker
//!   GET {cmd 7 | 1 << 31, nr_pages, vaddr, pid} ---->  after it: the destination runs
//!                                               <----  ADD_F {PE_PRESENT<<16|6, n, vaddr, pid}
//!                                               <----  n * 4096 bytes (n <= nr_pages; only
//!                                                      lazy pages, never anything else)
//!   ...
//!   CLOSE {cmd 0x1023 | 1 << 31}                ---->  the daemon has every page it needs
//!                                               <----  i32 0
//! ```
//!
//! Compression (our extension, see `ckpt_page_server::compress`): a GET flagged
//! [`GET_ZSTD`] (bit 13, `ckpt-lazy-pages --compress-pages`) is answered with a PE_ZSTD
//! ADD_F (L, then one zstd frame of the pages) when that is smaller than the pages; any
//! other GET, and pages that do not shrink, get the plain answer above. The raw and wire
//! bytes of the pages sent are logged at the end of each session.
//!
//! When has the destination resumed? Restore sends its end marker ("RSTF") to the daemon just
//! before the tasks resume. Our daemon flags every GET (the high 16 bits of `cmd`): before the
//! end marker with [`GET_BEFORE_RESUME`] (bit 14), after it with [`GET_RESUMED`] (bit 15).
//! Restore itself, or the daemon for it, may fetch lazy pages while the tree is still being
//! built, and such a fetch says nothing about the destination running. A GET flagged
//! [`GET_RESUMED`] does, and so does a **CLOSE** flagged so (the daemon's last word, sent
//! before it lets the restored tree run on without it). A
//! daemon that sets neither bit (CRIU's) cannot say when restore finished: its **first GET** is
//! then taken as the destination having resumed, the best that can be known (a CRIU restore
//! does not touch lazy memory before resume). Hence:
//!
//! - until the destination resumed (no connection within the connect timeout, the link breaking,
//!   restore failing after some pages were fetched, or the daemon leaving without CLOSE), the
//!   source is resumed as it was: a failed migration leaves the process running where it was;
//! - from then on, the source is also sent SIGSTOP, so that it stays stopped even
//!   if `ckpt-dump` itself dies; it is never resumed again. It is killed at CLOSE (the daemon
//!   closes once every page is in), when the link ends after every lazy page has been taken,
//!   or when the link is lost and no new session arrives within the reconnection window (a new
//!   session is accepted only from the host of the first one). Taking the last page alone does
//!   not kill it: two threads faulting on one page may make the daemon ask for it again. Two
//!   running copies never exist.
//!
//! Trees: every live process of the dumped tree stays frozen, and each GET is answered from
//! the memory of the process its `pid` (`dst_id`) names: the image pid, which is the
//! source's pid (a process the destination forked after resume asks with its restored
//! ancestor's image pid, whose pages its copy misses). A pid outside the tree, or an address
//! that is not a lazy page of that process, gets no pages. Resuming, stopping and killing
//! apply to the whole tree at once: a failure before the destination resumed lets every
//! process run on, and none survives once the destination has run.
//!
//! A prepared post-copy ([`crate::prepare`]) serves the same way, with one more input
//! watched beside the daemon's session: the switch connection of the destination's
//! restore. Its RESUMED counts as a GET flagged [`GET_RESUMED`]; its FAILED, or its end,
//! before the destination ran ends the session like a lost link before resume (the source
//! runs on). Once the destination runs, the switch has nothing more to say and its end is
//! ignored.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use ckpt_page_server::protocol::FRAME_LEN;
use ckpt_page_server::server::MAX_GET_PAGES;
use ckpt_page_server::{Command, Frame, PageCompressor, PageFlags, PageTraffic, GET_ZSTD};
use images_format::switch::{self, SwitchError, SwitchMessage};
use tracee::memory::{self, MemoryError, RemoteRange};
use tracee::{Pid, RemoteAddr, SeizedProcess, SeizedTree, PAGE_SIZE};

use crate::pages::{PlannedRun, RunKind};
use crate::release::{self, ReleaseError};
use crate::{DumpOptions, FinalState};

/// Serving the lazy pages failed. Before the destination resumed, the source runs on.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("dump: listen for the lazy-pages daemon on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: no lazy-pages daemon connected to {addr} within {secs} s; pid {pid} resumed")]
    NoDaemon { addr: String, secs: u64, pid: Pid },
    #[error(
        "dump: the lazy-pages session ended before the destination resumed ({why}); pid {pid} \
         resumed"
    )]
    EndedBeforeResume { pid: Pid, why: String },
    #[error("dump: wait for the lazy-pages daemon on {addr}")]
    Accept {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: pid {pid}: read lazy pages at {vaddr:#x}")]
    Read {
        pid: Pid,
        vaddr: u64,
        #[source]
        source: MemoryError,
    },
    #[error("dump: the destination did not run ({why}); pid {pid} resumed")]
    SwitchFailed { pid: Pid, why: String },
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

/// How a lazy session ended (the source is dead in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyOutcome {
    /// Every lazy page was taken.
    AllTaken,
    /// The daemon closed the session: it has what it needs.
    Closed,
    /// The link was lost after the destination resumed and not re-established in time.
    LinkLost,
}

/// Binds `addr` before the process is frozen, so that a busy port costs it nothing.
pub fn listen(addr: SocketAddr) -> Result<TcpListener, LazyError> {
    TcpListener::bind(addr).map_err(|source| LazyError::Listen { addr, source })
}

/// The `[start, end)` ranges the plan leaves lazy, merged.
pub fn lazy_ranges(plan: &[PlannedRun]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for run in plan.iter().filter(|r| r.kind == RunKind::Lazy) {
        match out.last_mut() {
            Some(last) if last.1 == run.start => last.1 = run.end(),
            _ => out.push((run.start, run.end())),
        }
    }
    out
}

/// Lazy pages not taken yet: sorted, disjoint `[start, end)` ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Untaken {
    ranges: Vec<(u64, u64)>,
}

impl Untaken {
    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    fn pages(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum()
    }

    fn take(&mut self, start: u64, end: u64) {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(s, e) in &self.ranges {
            if e <= start || s >= end {
                out.push((s, e));
                continue;
            }
            if s < start {
                out.push((s, start));
            }
            if e > end {
                out.push((end, e));
            }
        }
        self.ranges = out;
    }
}

/// The pages a GET may have: from `vaddr` to the end of its lazy range, at most `asked`
/// and [`MAX_GET_PAGES`]. Zero for an address that is not lazy: nothing else is served.
fn servable(lazy: &[(u64, u64)], vaddr: u64, asked: u64) -> u64 {
    if !vaddr.is_multiple_of(PAGE_SIZE) {
        return 0;
    }
    let idx = lazy.partition_point(|&(_, e)| e <= vaddr);
    match lazy.get(idx) {
        Some(&(s, e)) if s <= vaddr => ((e - vaddr) / PAGE_SIZE).min(asked).min(MAX_GET_PAGES),
        _ => 0,
    }
}

/// Waits up to `timeout` for a connection; `None` when none came. Once a daemon has been
/// served, only its host may reconnect (`only`): pages go nowhere else. The switch of a
/// prepared dump is heard meanwhile (`source`); once it says the destination runs, the
/// wait is cut to `window`, as for a daemon that lost its link after resume.
fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
    window: Duration,
    only: Option<IpAddr>,
    source: &mut Source,
) -> Result<Option<(TcpStream, IpAddr)>, AcceptEnd> {
    listener.set_nonblocking(true).map_err(AcceptEnd::Io)?;
    let mut deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((_, peer)) if only.is_some_and(|ip| ip != peer.ip()) => {
                tracing::warn!(%peer, "a connection from another host than the daemon's: refused");
            }
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).map_err(AcceptEnd::Io)?;
                tracing::info!(%peer, "lazy-pages daemon connected");
                return Ok(Some((stream, peer.ip())));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(AcceptEnd::Io(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let switch = source.switch.as_ref().map(AsFd::as_fd);
        let ready = wait_readable(listener.as_fd(), switch, left.min(Duration::from_secs(1)))
            .map_err(AcceptEnd::Io)?;
        if ready.switch {
            let resumed = source.is_resumed();
            source.on_switch().map_err(AcceptEnd::Switch)?;
            if source.is_resumed() && !resumed {
                deadline = deadline.min(Instant::now() + window);
            }
        }
    }
}

/// Why waiting for a daemon's connection stopped short.
enum AcceptEnd {
    Io(std::io::Error),
    /// The switch said the destination will not run.
    Switch(LazyError),
}

/// Which of the descriptors [`wait_readable`] watched have something to read (or ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Readable {
    pub(crate) main: bool,
    pub(crate) switch: bool,
}

/// Waits up to `timeout` until `main` or `switch` is readable; an end or error of the
/// connection counts, so that the read that follows sees it.
pub(crate) fn wait_readable(
    main: BorrowedFd<'_>,
    switch: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> std::io::Result<Readable> {
    use rustix::event::{PollFd, PollFlags};
    let nanos = i64::from(timeout.subsec_nanos());
    let timeout = rustix::event::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: nanos,
    };
    let mut fds = vec![PollFd::new(&main, PollFlags::IN)];
    if let Some(switch) = &switch {
        fds.push(PollFd::new(switch, PollFlags::IN));
    }
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(Readable::default()),
        Err(errno) => return Err(errno.into()),
    }
    let seen = |fd: &PollFd<'_>| !fd.revents().is_empty();
    Ok(Readable {
        main: fds.first().is_some_and(seen),
        switch: fds.get(1).is_some_and(seen),
    })
}

/// How one session ended.
enum SessionEnd {
    Closed,
    Lost(String),
}

/// The lazy pages of one process of the tree, by the pid the daemon asks with.
struct ProcessPages {
    pid: Pid,
    lazy: Vec<(u64, u64)>,
    untaken: Untaken,
}

/// The state of the source while it serves.
struct Source {
    /// The root of the tree (for messages).
    pid: Pid,
    /// The frozen tree; `None` once it has been killed.
    tree: Option<SeizedTree>,
    /// Per `dst_id` (the image pid, the source pid): what may be served.
    processes: BTreeMap<u64, ProcessPages>,
    all_taken_logged: bool,
    /// When we learnt that the destination runs: never resume the source again.
    resumed_at: Option<Instant>,
    /// Real time from then on (see `RealTime`; refused, we keep our short slices): not
    /// before, when a prepared restore, at the same priority, may be switching on our CPU.
    urgent: Option<tracee::taskinfo::RealTime>,
    buf: Vec<u8>,
    /// Made at the first GET flagged [`GET_ZSTD`]; `Err` once it could not be made.
    compressor: Option<Result<PageCompressor, ()>>,
    /// The pages sent, raw and on the wire.
    traffic: PageTraffic,
    /// A prepared dump's switch connection, until the destination runs or it ends.
    switch: Option<TcpStream>,
    /// What waits until the first faults are served.
    held: UntilQuiet,
}

/// Work held back while the destination's first faults are served: until the requests
/// pause for [`QUIET`] after a first answer, [`HOLD_AT_MOST`] after the serving starts,
/// or its end. A resumed program waits for each answer, on a machine of few CPUs behind
/// any log line or thread wake-up of ours, and so does the daemon reading it when it
/// shares our CPU.
struct UntilQuiet {
    /// The lines that would have been logged meanwhile, in order.
    lines: Vec<HeldLine>,
    /// The caller's work for then ([`SwitchLink::after_first_faults`]).
    work: Option<Box<dyn FnOnce() + Send>>,
    /// The caller's work for the first answer ([`SwitchLink::after_first_answer`]).
    first_answer: Option<Box<dyn FnOnce() + Send>>,
    /// When the serving started.
    since: Instant,
    /// A page was answered.
    answered: bool,
    done: bool,
}

/// How long the requests must pause before held work is done ([`UntilQuiet`]): longer
/// than the program's run between two faults while it starts.
const QUIET: Duration = Duration::from_micros(500);

/// How long after the destination runs a first request may take before the first-answer
/// work ([`SwitchLink::after_first_answer`]) is done without one: a resumed program that
/// faults at once asks within some 100 µs here.
const NO_FAULT_YET: Duration = Duration::from_micros(300);

/// How long after the serving starts held work waits at most ([`UntilQuiet`]).
const HOLD_AT_MOST: Duration = Duration::from_millis(5);

enum HeldLine {
    Serving {
        addr: String,
        processes: usize,
        pages: u64,
    },
    Resumed {
        pid: Pid,
        why: &'static str,
    },
}

impl HeldLine {
    fn log(&self) {
        match self {
            HeldLine::Serving {
                addr,
                processes,
                pages,
            } => tracing::info!(%addr, processes, pages, "serving lazy pages"),
            HeldLine::Resumed { pid, why } => {
                tracing::info!(%pid, why, "the destination runs; the source stays stopped");
            }
        }
    }
}

impl UntilQuiet {
    fn say(&mut self, line: HeldLine) {
        if self.done {
            line.log();
        } else {
            self.lines.push(line);
        }
    }

    fn new() -> UntilQuiet {
        UntilQuiet {
            lines: Vec::new(),
            work: None,
            first_answer: None,
            since: Instant::now(),
            answered: false,
            done: false,
        }
    }

    /// A page was answered; `resumed`: the destination runs.
    fn answered(&mut self, resumed: bool) {
        self.answered = true;
        if let Some(work) = self.first_answer.take_if(|_| resumed) {
            work();
        }
    }

    fn release(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        for line in self.lines.drain(..) {
            line.log();
        }
        if let Some(work) = self.first_answer.take() {
            work();
        }
        if let Some(work) = self.work.take() {
            work();
        }
    }
}

impl Drop for UntilQuiet {
    fn drop(&mut self) {
        self.release();
    }
}

impl Source {
    /// The destination runs: never resume the source again.
    fn is_resumed(&self) -> bool {
        self.resumed_at.is_some()
    }

    fn untaken_pages(&self) -> u64 {
        self.processes.values().map(|p| p.untaken.pages()).sum()
    }

    fn all_taken(&self) -> bool {
        self.processes.values().all(|p| p.untaken.is_empty())
    }

    /// The destination runs: from now on the source must never run again, even if we die.
    fn destination_resumed(&mut self, kind: GetKind) {
        let why = match kind {
            GetKind::Resumed => "restore finished",
            _ => "first page request of a daemon that does not say when restore finished",
        };
        self.stop_for_good(why);
    }

    /// Hears one message of the switch. Before the destination runs, anything but RESUMED
    /// (FAILED, the end of the connection, garbage) means it never will: an error, which
    /// resumes the source. After, the switch is only closed.
    fn on_switch(&mut self) -> Result<(), LazyError> {
        let Some(stream) = self.switch.as_mut() else {
            return Ok(());
        };
        let why = match switch::read_message(stream) {
            Ok(SwitchMessage::Resumed) => {
                if !self.is_resumed() {
                    self.stop_for_good("the prepared restore reports the tree runs");
                }
                return Ok(());
            }
            Ok(SwitchMessage::Failed { why }) => format!("the restore failed: {why}"),
            Ok(other) => format!("unexpected switch message {}", message_name(&other)),
            Err(SwitchError::Closed) => "the switch connection closed".to_owned(),
            Err(err) => err.to_string(),
        };
        self.switch = None;
        if self.is_resumed() {
            tracing::debug!(%why, "switch connection done");
            return Ok(());
        }
        Err(LazyError::SwitchFailed { pid: self.pid, why })
    }

    /// The destination runs: the tree is stopped by signal too, never to run here again.
    fn stop_for_good(&mut self, why: &'static str) {
        self.resumed_at = Some(Instant::now());
        self.urgent = Some(tracee::taskinfo::RealTime::raise());
        self.held.say(HeldLine::Resumed { pid: self.pid, why });
        let pids: Vec<Pid> = self
            .tree
            .iter()
            .flat_map(|tree| tree.processes().map(SeizedProcess::pid))
            .collect();
        for pid in pids {
            let Some(target) = rustix::process::Pid::from_raw(pid.as_raw()) else {
                continue;
            };
            if let Err(errno) = rustix::process::kill_process(target, rustix::process::Signal::STOP)
            {
                tracing::warn!(%pid, %errno, "cannot queue SIGSTOP on the source");
            }
        }
    }

    /// Kills every process of the tree (none runs on while the others die).
    fn kill(&mut self) -> Result<(), LazyError> {
        if let Some(tree) = self.tree.take() {
            release::finish_tree(tree, FinalState::Killed)?;
            tracing::info!(pid = %self.pid, "source killed");
        }
        Ok(())
    }

    /// Answers one GET: the frame, then the pages, in one write.
    fn answer_get(&mut self, stream: &mut TcpStream, frame: &Frame) -> Result<(), SessionEnd> {
        let alive = self.tree.is_some();
        let target = self.processes.get_mut(&frame.dst_id).filter(|_| alive);
        let n = target
            .as_ref()
            .map_or(0, |p| servable(&p.lazy, frame.vaddr, frame.nr_pages));
        if n == 0 {
            tracing::warn!(
                vaddr = format_args!("{:#x}", frame.vaddr),
                pid = frame.dst_id,
                "request for pages that are not lazy pages of the source: refused"
            );
        }
        let len = usize::try_from(n * PAGE_SIZE).unwrap_or(0);
        let header = Frame::add_f(frame.dst_id, frame.vaddr, n, PRESENT_BITS).encode();
        // Grown as the requests need: zeroing the largest answer's 4 MiB up front would
        // delay the first answer, the one a just-resumed destination waits for.
        if self.buf.len() < FRAME_LEN + len {
            self.buf.resize(FRAME_LEN + len, 0);
        }
        self.buf[..FRAME_LEN].copy_from_slice(&header);
        let target = match target {
            Some(process) if len > 0 => {
                let range = RemoteRange {
                    addr: RemoteAddr(frame.vaddr),
                    len,
                };
                let dst = &mut self.buf[FRAME_LEN..FRAME_LEN + len];
                memory::read_remote_vectored(process.pid, std::slice::from_ref(&range), dst)
                    .map_err(|source| {
                        SessionEnd::Lost(
                            LazyError::Read {
                                pid: process.pid,
                                vaddr: frame.vaddr,
                                source,
                            }
                            .to_string(),
                        )
                    })?;
                Some(process)
            }
            _ => None,
        };
        let mut compressed = None;
        if frame.flags & GET_ZSTD != 0 && target.is_some() {
            let compressor = self.compressor.get_or_insert_with(|| {
                PageCompressor::new().map_err(|error| {
                    tracing::warn!(%error, "cannot compress pages: answering raw");
                })
            });
            if let Ok(compressor) = compressor {
                let header = Frame::add_f(frame.dst_id, frame.vaddr, n, PRESENT_BITS);
                compressed = compressor.encode(&header, &self.buf[FRAME_LEN..FRAME_LEN + len]);
            }
        }
        // One write either way: the header and the pages, or the header, L and the frame.
        let answer = compressed.unwrap_or(&self.buf[..FRAME_LEN + len]);
        stream
            .write_all(answer)
            .map_err(|e| SessionEnd::Lost(format!("send pages: {e}")))?;
        if len > 0 && answer.len() < FRAME_LEN + len {
            let wire = (answer.len() - FRAME_LEN) as u64;
            self.traffic.add_zstd(len as u64, wire);
        } else if len > 0 {
            self.traffic.add_raw(len as u64);
        }
        if let Some(process) = target {
            process
                .untaken
                .take(frame.vaddr, frame.vaddr + n * PAGE_SIZE);
        }
        Ok(())
    }

    /// Does the held work ([`UntilQuiet`]) once the first faults are served: when, after
    /// an answer, neither a request nor a switch message comes within [`QUIET`], or none
    /// comes until [`HOLD_AT_MOST`] after the serving started. Returns at once when one
    /// comes first.
    fn release_when_quiet(&mut self, stream: &TcpStream) {
        if self.held.done {
            return;
        }
        // A program that asks for no page soon after it resumes is not faulting: the
        // first-answer work need not wait for an answer.
        if let Some(resumed_at) = self.resumed_at.filter(|_| self.held.first_answer.is_some()) {
            let left = (resumed_at + NO_FAULT_YET).saturating_duration_since(Instant::now());
            if !left.is_zero() {
                let switch = self.switch.as_ref().map(AsFd::as_fd);
                match wait_readable(stream.as_fd(), switch, left) {
                    Ok(ready) if ready.main || ready.switch => return,
                    _ => {}
                }
            }
            if let Some(work) = self.held.first_answer.take() {
                work();
            }
        }
        let left = (self.held.since + HOLD_AT_MOST).saturating_duration_since(Instant::now());
        let wait = if self.held.answered {
            QUIET.min(left)
        } else {
            left
        };
        if !wait.is_zero() {
            let switch = self.switch.as_ref().map(AsFd::as_fd);
            match wait_readable(stream.as_fd(), switch, wait) {
                Ok(ready) if ready.main || ready.switch => return,
                _ => {}
            }
        }
        self.held.release();
    }

    /// Waits for the daemon's next request while hearing the switch; `false` when the
    /// session was idle for `idle`.
    fn await_request(&mut self, stream: &TcpStream, idle: Duration) -> Result<bool, LazyError> {
        let deadline = Instant::now() + idle;
        while self.switch.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let switch = self.switch.as_ref().map(AsFd::as_fd);
            let ready = match wait_readable(stream.as_fd(), switch, left) {
                Ok(ready) => ready,
                // The read that follows reports it.
                Err(_) => return Ok(true),
            };
            // A request first: the switch's word (RESUMED, most likely, with both ready
            // after the resume) is heard on the next call.
            if ready.main {
                return Ok(true);
            }
            if ready.switch {
                self.on_switch()?;
            }
        }
        Ok(true)
    }

    /// Serves one connection until CLOSE or until it breaks.
    fn session(&mut self, mut stream: TcpStream, idle: Duration) -> Result<SessionEnd, LazyError> {
        // Replies are waited for one by one: send each at once.
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(idle));
        loop {
            self.release_when_quiet(&stream);
            if !self.await_request(&stream, idle)? {
                return Ok(SessionEnd::Lost(
                    "no request within the idle time".to_owned(),
                ));
            }
            let mut bytes = [0u8; FRAME_LEN];
            if let Err(e) = stream.read_exact(&mut bytes) {
                return Ok(SessionEnd::Lost(format!("read a request: {e}")));
            }
            let frame = match Frame::decode(&bytes) {
                Ok(frame) => frame,
                Err(e) => return Ok(SessionEnd::Lost(format!("bad request: {e}"))),
            };
            match frame.command {
                Command::Get => {
                    let kind = get_kind(&frame);
                    // Answered first: a just-resumed destination waits for it, not for
                    // our bookkeeping (the tree is held frozen either way).
                    let answered = self.answer_get(&mut stream, &frame);
                    if !self.is_resumed() && kind != GetKind::BeforeResume {
                        self.destination_resumed(kind);
                    }
                    self.held.answered(self.is_resumed());
                    if let Err(end) = answered {
                        return Ok(end);
                    }
                    // The source stays frozen, not killed, until the daemon closes: a
                    // page two threads faulted on at once may be asked for again.
                    if self.is_resumed() && !self.all_taken_logged && self.all_taken() {
                        self.all_taken_logged = true;
                        tracing::info!(pid = %self.pid, "every lazy page has been taken");
                    }
                }
                Command::Close | Command::ForceClose => {
                    if !self.is_resumed() && frame.flags & GET_RESUMED != 0 {
                        self.destination_resumed(GetKind::Resumed);
                    }
                    let _ = stream.write_all(&0i32.to_le_bytes());
                    return Ok(SessionEnd::Closed);
                }
                other => {
                    return Ok(SessionEnd::Lost(format!(
                        "{other:?} is not a lazy-pages request"
                    )))
                }
            }
        }
    }
}

/// GET flag of our daemon: restore has not finished; the destination does not run yet
/// (the same value as `ckpt_lazy_pages::source::GET_BEFORE_RESUME`).
pub const GET_BEFORE_RESUME: u16 = 0x4000;
/// GET flag of our daemon: restore sent its end marker and the tasks run
/// (`ckpt_lazy_pages::source::GET_RESUMED`).
pub const GET_RESUMED: u16 = 0x8000;

/// What a GET says about the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetKind {
    /// Our daemon, before restore's end marker.
    BeforeResume,
    /// Our daemon, after restore's end marker.
    Resumed,
    /// A daemon without the extension.
    Plain,
}

fn get_kind(frame: &Frame) -> GetKind {
    if frame.flags & GET_RESUMED != 0 {
        GetKind::Resumed
    } else if frame.flags & GET_BEFORE_RESUME != 0 {
        GetKind::BeforeResume
    } else {
        GetKind::Plain
    }
}

/// How long one switch message may take to arrive whole once its first bytes are in.
const SWITCH_READ_TIMEOUT: Duration = Duration::from_secs(10);

const PRESENT_BITS: u16 = {
    let bits = PageFlags::PRESENT.bits();
    assert!(bits <= u16::MAX as u32);
    bits as u16
};

/// Serves the lazy pages of every process of the frozen `tree` (`lazy`: per process, the
/// ranges [`lazy_ranges`] gives) until the destination has them all (see the module
/// documentation for when the tree is resumed or killed).
pub fn serve(
    tree: SeizedTree,
    listener: TcpListener,
    lazy: Vec<(Pid, Vec<(u64, u64)>)>,
    opts: &DumpOptions,
) -> Result<LazyOutcome, LazyError> {
    serve_with(tree, listener, lazy, opts, None)
}

/// What a prepared dump hands to [`serve_prepared`]: its switch connection, and the
/// daemon's connection if one was accepted while waiting for the destination.
pub struct SwitchLink {
    pub switch: TcpStream,
    pub daemon: Option<(TcpStream, IpAddr)>,
    /// Run once the destination's first faults are served (see `UntilQuiet`), or serving
    /// ends: work that must not wake a thread while they wait.
    pub after_first_faults: Option<Box<dyn FnOnce() + Send>>,
    /// Run once the first page is answered after the destination runs, or with the work
    /// above if that comes first: work that must not delay the switch nor its first fault
    /// but should not wait for the pause that the work above waits for.
    pub after_first_answer: Option<Box<dyn FnOnce() + Send>>,
}

/// [`serve`] for a prepared dump: the switch's RESUMED, FAILED or end are heard as well.
pub fn serve_prepared(
    tree: SeizedTree,
    listener: TcpListener,
    lazy: Vec<(Pid, Vec<(u64, u64)>)>,
    opts: &DumpOptions,
    link: SwitchLink,
) -> Result<LazyOutcome, LazyError> {
    serve_with(tree, listener, lazy, opts, Some(link))
}

fn message_name(msg: &SwitchMessage) -> &'static str {
    match msg {
        SwitchMessage::Ready { .. } => "READY",
        SwitchMessage::Delta { .. } => "DELTA",
        SwitchMessage::Abort { .. } => "ABORT",
        SwitchMessage::Resumed => "RESUMED",
        SwitchMessage::Failed { .. } => "FAILED",
    }
}

// No span: a prepared dump gets here at the switch, where making one costs the
// destination's first fault tens of microseconds. The lines say which process.
fn serve_with(
    tree: SeizedTree,
    listener: TcpListener,
    lazy: Vec<(Pid, Vec<(u64, u64)>)>,
    opts: &DumpOptions,
    link: Option<SwitchLink>,
) -> Result<LazyOutcome, LazyError> {
    let pid = tree.root().pid();
    // Each request is a fault or a chunk someone waits for, and the program's CPU may be
    // busy (with the program itself, restored on this machine): woken, we go first; at
    // real time once the destination runs (see `Source::stop_for_good`). (A prepared
    // dump took its short slice as it left real time after the delta.)
    if link.is_none() {
        if let Err(error) = tracee::taskinfo::short_slice(tracee::taskinfo::SHORTEST_SLICE) {
            tracing::debug!(%error, "serving at the default time slice");
        }
    }
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let processes = lazy
        .into_iter()
        .filter_map(|(pid, ranges)| {
            let id = u64::try_from(pid.as_raw()).ok()?;
            let pages = ProcessPages {
                pid,
                untaken: Untaken {
                    ranges: ranges.clone(),
                },
                lazy: ranges,
            };
            Some((id, pages))
        })
        .collect();
    let mut source = Source {
        pid,
        tree: Some(tree),
        processes,
        resumed_at: None,
        urgent: None,
        all_taken_logged: false,
        buf: vec![0u8; FRAME_LEN + PAGE_SIZE as usize],
        compressor: None,
        traffic: PageTraffic::default(),
        switch: None,
        held: UntilQuiet::new(),
    };
    let mut pending = None;
    if let Some(link) = link {
        // A switch message already sent is read at once by the first poll.
        let _ = link.switch.set_read_timeout(Some(SWITCH_READ_TIMEOUT));
        source.switch = Some(link.switch);
        pending = link.daemon;
        source.held.work = link.after_first_faults;
        source.held.first_answer = link.after_first_answer;
    }
    let line = HeldLine::Serving {
        addr: addr.clone(),
        processes: source.processes.len(),
        pages: source.untaken_pages(),
    };
    source.held.say(line);
    let mut peer: Option<IpAddr> = None;
    loop {
        let wait = if source.is_resumed() {
            opts.lazy_reconnect_window
        } else {
            opts.lazy_connect_timeout
        };
        let accepted = match pending.take() {
            Some(daemon) => Ok(Some(daemon)),
            None => match accept_within(
                &listener,
                wait,
                opts.lazy_reconnect_window,
                peer,
                &mut source,
            ) {
                Ok(got) => Ok(got),
                Err(AcceptEnd::Switch(err)) => return Err(err),
                Err(AcceptEnd::Io(err)) => Err(LazyError::Accept {
                    addr: addr.clone(),
                    source: err,
                }),
            },
        };
        let stream = match accepted {
            Ok(Some((stream, ip))) => {
                peer = Some(ip);
                stream
            }
            Ok(None) if source.is_resumed() => {
                tracing::warn!(%pid, "the lazy-pages daemon did not come back: killing the source");
                source.kill()?;
                return Ok(LazyOutcome::LinkLost);
            }
            // Dropping `source` resumes the process: the destination never ran.
            Ok(None) => {
                return Err(LazyError::NoDaemon {
                    addr,
                    secs: wait.as_secs(),
                    pid,
                })
            }
            Err(err) if source.is_resumed() => {
                tracing::warn!(%pid, error = %err, "cannot wait for the daemon: killing the source");
                source.kill()?;
                return Ok(LazyOutcome::LinkLost);
            }
            Err(err) => return Err(err),
        };
        let idle = if source.is_resumed() {
            opts.lazy_reconnect_window
        } else {
            opts.lazy_connect_timeout
        };
        let end = source.session(stream, idle)?;
        source.traffic.log("lazy pages sent: raw vs wire bytes");
        match end {
            SessionEnd::Closed if source.is_resumed() || source.all_taken() => {
                source.kill()?;
                return Ok(if source.all_taken() {
                    LazyOutcome::AllTaken
                } else {
                    LazyOutcome::Closed
                });
            }
            SessionEnd::Closed => {
                return Err(LazyError::EndedBeforeResume {
                    pid,
                    why: "the daemon closed the session without asking for a page".to_owned(),
                })
            }
            SessionEnd::Lost(why) if !source.is_resumed() => {
                return Err(LazyError::EndedBeforeResume { pid, why })
            }
            SessionEnd::Lost(why) => {
                if source.tree.is_none() || source.all_taken() {
                    source.kill()?;
                    return Ok(LazyOutcome::AllTaken);
                }
                tracing::warn!(%pid, %why, window_s = opts.lazy_reconnect_window.as_secs(),
                    "lazy-pages link lost after the destination resumed: waiting for it to reconnect");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn only_lazy_pages_are_servable() {
        let lazy = [(0x10000, 0x10000 + 4 * P), (0x20000, 0x20000 + 2000 * P)];
        assert_eq!(servable(&lazy, 0x10000, 10), 4);
        assert_eq!(servable(&lazy, 0x10000 + P, 2), 2);
        assert_eq!(servable(&lazy, 0x10000 + 4 * P, 1), 0);
        assert_eq!(servable(&lazy, 0x20000, 5000), MAX_GET_PAGES);
        assert_eq!(servable(&lazy, 0x20001, 1), 0);
        assert_eq!(servable(&lazy, 0x1000, 1), 0);
    }

    #[test]
    fn only_our_end_marker_notice_or_a_plain_get_means_resumed() {
        let mut get = Frame::get(7, 0x1000, 1);
        assert_eq!(get_kind(&get), GetKind::Plain);
        get.flags = GET_BEFORE_RESUME;
        assert_eq!(get_kind(&get), GetKind::BeforeResume);
        get.flags = GET_RESUMED;
        assert_eq!(get_kind(&get), GetKind::Resumed);
        // The flags survive the wire.
        let wire = Frame::decode(&get.encode()).expect("decode");
        assert_eq!(get_kind(&wire), GetKind::Resumed);
        assert_eq!(
            (GET_BEFORE_RESUME, GET_RESUMED),
            (
                ckpt_lazy_pages_flags::BEFORE_RESUME,
                ckpt_lazy_pages_flags::RESUMED
            )
        );
    }

    #[test]
    fn the_compression_flag_says_nothing_about_resume() {
        assert_eq!(GET_ZSTD & (GET_BEFORE_RESUME | GET_RESUMED), 0);
        let mut get = Frame::get(7, 0x1000, 1);
        get.flags = GET_ZSTD;
        assert_eq!(get_kind(&get), GetKind::Plain);
        get.flags = GET_ZSTD | GET_BEFORE_RESUME;
        assert_eq!(get_kind(&get), GetKind::BeforeResume);
        get.flags = GET_ZSTD | GET_RESUMED;
        assert_eq!(
            get_kind(&Frame::decode(&get.encode()).expect("decode")),
            GetKind::Resumed
        );
    }

    /// The values `ckpt-lazy-pages` sends (lazy-pages/src/source.rs); the dump does not
    /// link that crate, so they are restated here on purpose.
    mod ckpt_lazy_pages_flags {
        pub const BEFORE_RESUME: u16 = 1 << 14;
        pub const RESUMED: u16 = 1 << 15;
    }

    /// A source with no tree (nothing to stop or resume) listening to a switch; returns
    /// the destination's end of the switch too.
    fn source_with_switch() -> (Source, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let restore = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (switch, _) = listener.accept().expect("accept");
        let source = Source {
            pid: Pid::from_raw(1).expect("pid"),
            tree: None,
            processes: BTreeMap::new(),
            all_taken_logged: false,
            resumed_at: None,
            urgent: None,
            buf: Vec::new(),
            compressor: None,
            traffic: PageTraffic::default(),
            switch: Some(switch),
            held: UntilQuiet::new(),
        };
        (source, restore)
    }

    /// A connected pair of TCP streams: the daemon's end and ours.
    fn daemon_link() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let daemon = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        (daemon, ours)
    }

    /// Work that counts its runs, and the count.
    fn counted_work() -> (
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        Box<dyn FnOnce() + Send>,
    ) {
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&runs);
        let work = Box::new(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        (runs, work)
    }

    #[test]
    fn the_switch_says_whether_the_destination_runs() {
        let (mut source, mut restore) = source_with_switch();
        switch::write_message(&mut restore, &SwitchMessage::Resumed, false).expect("send");
        source.on_switch().expect("RESUMED is no error");
        assert!(source.is_resumed());
        // Once it runs, the switch ending is nothing to act on.
        drop(restore);
        source
            .on_switch()
            .expect("an end after RESUMED is no error");
        assert!(source.switch.is_none());

        let (mut source, mut restore) = source_with_switch();
        let failed = SwitchMessage::Failed {
            why: "no memory".into(),
        };
        switch::write_message(&mut restore, &failed, false).expect("send");
        match source.on_switch() {
            Err(LazyError::SwitchFailed { why, .. }) => assert!(why.contains("no memory")),
            other => panic!("FAILED before resume: {other:?}"),
        }
        assert!(!source.is_resumed());

        let (mut source, restore) = source_with_switch();
        drop(restore);
        assert!(matches!(
            source.on_switch(),
            Err(LazyError::SwitchFailed { .. })
        ));
    }

    #[test]
    fn waiting_hears_the_switch_and_the_main_descriptor_apart() {
        let (source, mut restore) = source_with_switch();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let switch = source.switch.as_ref().map(AsFd::as_fd);
        let idle =
            wait_readable(listener.as_fd(), switch, Duration::from_millis(10)).expect("poll");
        assert_eq!(idle, Readable::default());
        restore.write_all(&[1]).expect("write");
        let ready = wait_readable(listener.as_fd(), switch, Duration::from_secs(5)).expect("poll");
        assert_eq!(
            ready,
            Readable {
                main: false,
                switch: true
            }
        );
    }

    #[test]
    fn held_work_waits_for_a_pause_in_the_requests_after_the_first_answer() {
        use std::sync::atomic::Ordering;
        let (mut source, _restore) = source_with_switch();
        let (mut daemon, stream) = daemon_link();
        let (runs, work) = counted_work();
        source.held.work = Some(work);
        source.held.say(HeldLine::Resumed {
            pid: source.pid,
            why: "test",
        });
        source.held.answered(true);
        // A request waiting: it goes first.
        daemon.write_all(&[0]).expect("write");
        source.release_when_quiet(&stream);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(source.held.lines.len(), 1, "the line is still held");
        let mut byte = [0u8; 1];
        (&stream).read_exact(&mut byte).expect("read the request");
        // Quiet: done, once.
        source.release_when_quiet(&stream);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(source.held.lines.is_empty());
        source.release_when_quiet(&stream);
        drop(source);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn first_answer_work_runs_at_the_first_answer_after_the_resume_or_at_the_release() {
        use std::sync::atomic::Ordering;
        let (runs, work) = counted_work();
        let mut held = UntilQuiet::new();
        held.first_answer = Some(work);
        // Before the destination runs (a prefetch): not yet.
        held.answered(false);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        held.answered(true);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "at the first answer");
        assert!(!held.done, "the held work still waits for its pause");
        held.answered(true);
        held.release();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "once");
        // No answer at all: with the held work.
        let (runs, work) = counted_work();
        let mut held = UntilQuiet::new();
        held.first_answer = Some(work);
        drop(held);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn first_answer_work_waits_only_a_moment_for_a_first_request_after_the_resume() {
        use std::sync::atomic::Ordering;
        let (mut source, _restore) = source_with_switch();
        let (_daemon, stream) = daemon_link();
        let (runs, work) = counted_work();
        source.held.first_answer = Some(work);
        source.stop_for_good("test");
        let start = Instant::now();
        source.release_when_quiet(&stream);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "done without a request");
        assert!(start.elapsed() >= NO_FAULT_YET - Duration::from_micros(50));
        assert!(
            source.urgent.is_some(),
            "serving at real time once the destination runs"
        );
    }

    #[test]
    fn held_work_waits_for_a_first_request_only_so_long() {
        let (mut source, _restore) = source_with_switch();
        let (_daemon, stream) = daemon_link();
        source.held.say(HeldLine::Resumed {
            pid: source.pid,
            why: "test",
        });
        let start = Instant::now();
        source.release_when_quiet(&stream);
        assert!(start.elapsed() >= HOLD_AT_MOST - Duration::from_millis(1));
        assert!(source.held.done && source.held.lines.is_empty());
    }

    #[test]
    fn held_work_is_done_when_the_serving_ends_without_an_answer() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let (mut source, _restore) = source_with_switch();
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        source.held.work = Some(Box::new(move || flag.store(true, Ordering::SeqCst)));
        drop(source);
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn taking_pages_leaves_the_rest() {
        let mut u = Untaken {
            ranges: vec![(0, 10 * P), (20 * P, 30 * P)],
        };
        assert_eq!(u.pages(), 20);
        u.take(2 * P, 4 * P);
        u.take(8 * P, 22 * P);
        assert_eq!(u.ranges, vec![(0, 2 * P), (4 * P, 8 * P), (22 * P, 30 * P)]);
        u.take(0, 100 * P);
        assert!(u.is_empty());
    }

    #[test]
    fn lazy_runs_merge() {
        let plan = [
            PlannedRun {
                start: 0x1000,
                pages: 1,
                kind: RunKind::Lazy,
            },
            PlannedRun {
                start: 0x2000,
                pages: 1,
                kind: RunKind::Lazy,
            },
            PlannedRun {
                start: 0x3000,
                pages: 1,
                kind: RunKind::Dump,
            },
            PlannedRun {
                start: 0x5000,
                pages: 2,
                kind: RunKind::Lazy,
            },
        ];
        assert_eq!(lazy_ranges(&plan), vec![(0x1000, 0x3000), (0x5000, 0x7000)]);
    }
}
