//! The source side of a prepared post-copy (`ckpt-dump --lazy-pages --prepare`).
//!
//! Why: in a plain post-copy the whole pipeline (collect, write, transfer, read, rebuild
//! every process) runs while the process is frozen, milliseconds even for a small one.
//! Almost none of that state changes in those milliseconds, so it can be taken while the
//! process runs on and be rebuilt at the destination ahead of time; only what changed since
//! has to cross inside the down time. Hence two rounds, one `ckpt-dump` for both:
//!
//! ```text
//! listen on A:P (a busy port costs nothing)
//! S1  freeze, collect, let the tree run, then write the whole lazy image set into -D
//!     ("prepared images written"; the orchestrator copies -D to the destination; pages
//!     read while it runs may be torn or stale: S2 compares and sends them again)
//!     accept connections: SWITCH_MAGIC first = the restore's switch, else the daemon
//!     wait for READY on the switch (--lazy-connect-timeout; none: error, the tree runs on)
//! S2  freeze, collect, encode the image set in memory,
//!     compare it with S1's by file name, send DELTA {changed images, hot pages}, each
//!     image compressed against its S1 version, which the destination holds too
//!     (ABORT {why} and resume if anything of S2 fails)
//!     then -D gets the final images, off the critical path
//! serve the lazy pages as `lazy::serve` does, hearing the switch too (RESUMED, FAILED)
//! ```
//!
//! S2 encodes its images with the same code as any dump (`write::images_in_memory`): they
//! come out byte for byte as S1's did wherever the state is the same, which is what makes
//! comparing whole files a sound delta; in memory, no file is created, filled and read
//! back inside the down time (reading a small process's set back from tmpfs alone took
//! ~0.08 ms, the comparison in memory takes ~0.01 ms). An image S1 wrote
//! and S2 does not (a queue drained, a file closed) crosses as that kind's empty image
//! (its header and no entries), which reads as "none", like a missing file; `-D` loses
//! the file.
//!
//! What a delta holds in practice, and why: `timens-0.img` always (it records the clocks);
//! `pages-N.img` almost always, since a lazy dump keeps present the pages a thread needs
//! at once (its stack, TLS and rseq pages, and file-backed private pages), and a thread that
//! ran has written its stack; `core-TID.img` of every thread that ran in user space since
//! S1 (a thread asleep in the same syscall keeps the same registers); `files.img` when a
//! file position moved. The destination therefore has present pages to rewrite as well as
//! registers to set.
//!
//! Hot pages: what a resumed thread touches first (the pages at its instruction and stack
//! pointers, the page on either side of the stack pointer, and wherever a general register
//! or the TLS base points), read from the frozen process, among the pages S2 leaves lazy:
//! the destination installs them before it resumes instead of faulting each through the
//! daemon. This is the same choice of pages as restore's `--lazy-prefetch-hot`.
//!
//! Fault injection (`CKPT_FAULT`) acts in S2 only, where a failure must reach the
//! destination as an ABORT.
//!
//! Failure semantics, as for a plain lazy dump: until the destination says it runs (its
//! RESUMED, or the daemon's GET or CLOSE flagged resumed), any failure resumes the source
//! (an ABORT tells the destination, where it can still listen); from then on the source is
//! never resumed again.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use images_format::pb::UserX86RegsEntry;
use images_format::switch::{self, HotPages, NamedImage, SwitchError, SwitchMessage};
use images_format::{ImageKind, ImageWriter};
use tracee::memory::{self, RemoteRange};
use tracee::{Pid, RemoteAddr, SeizedTree, PAGE_SIZE};

use crate::collect::{self, TreeState};
use crate::lazy::{self, SwitchLink};
use crate::release;
use crate::write::{self, WrittenImages};
use crate::{
    fault, full_policies, micros, pages, seize, DumpError, DumpMode, DumpOptions, DumpStats,
    FaultPoint, FinalState, SignalShield,
};

/// A prepared dump failed; in every case before the destination runs, the tree runs on.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("dump: --prepare {what}")]
    Refused { what: &'static str },
    #[error("dump: no prepared restore said READY on {addr} within {secs} s; pid {pid} runs on")]
    NoReady { addr: String, secs: u64, pid: Pid },
    #[error("dump: wait for the prepared restore on {addr}")]
    Accept {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: the switch connection failed before READY; pid {pid} runs on")]
    BeforeReady {
        pid: Pid,
        #[source]
        source: SwitchError,
    },
    #[error("dump: the prepared restore sent {what} instead of READY; pid {pid} runs on")]
    NotReady { pid: Pid, what: &'static str },
    #[error("dump: read image {}", path.display())]
    ReadImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: send the delta; pid {pid} resumed")]
    SendDelta {
        pid: Pid,
        #[source]
        source: SwitchError,
    },
}

/// What `--prepare` cannot be combined with, if `opts` asks for it.
fn refusal(opts: &DumpOptions) -> Option<&'static str> {
    if opts.mode != DumpMode::Lazy {
        Some("needs --lazy-pages")
    } else if opts.prev_images_dir.is_some() {
        Some("with --prev-images-dir is not supported yet")
    } else if opts.track_mem {
        Some("with --track-mem is not supported yet")
    } else if opts.page_server.is_some() {
        Some("with --page-server is not supported")
    } else {
        None
    }
}

/// Image file name -> contents.
type Images = BTreeMap<String, Vec<u8>>;

/// One freeze, collection and write: the tree stays frozen.
struct Round {
    tree: SeizedTree,
    state: TreeState,
    images: WrittenImages,
    stats: DumpStats,
    frozen_since: Instant,
    /// Collecting, then writing (µs).
    collect_us: u32,
    write_us: u32,
}

/// A frozen tree, its state and its page plans.
struct Collected {
    tree: SeizedTree,
    state: TreeState,
    stats: DumpStats,
    frozen_since: Instant,
}

/// Freezes the tree and reads its state, and plans its pages.
fn freeze_and_collect(pid: Pid, opts: &DumpOptions) -> Result<Collected, DumpError> {
    // smaps' page walk is done while the tree runs, and kept if the VMAs stay the same.
    let vma_source = tracee::proc::smaps::read(pid)
        .map(collect::VmaSource::SmapsIfUnchanged)
        .unwrap_or(collect::VmaSource::Smaps);
    let freeze_start = Instant::now();
    let mut tree = seize::freeze_tree(pid)?;
    let mut stats = DumpStats {
        freezing_time_us: micros(freeze_start),
        ..DumpStats::default()
    };
    let frozen_since = Instant::now();
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;
    let mut state = collect::tree(&mut tree, opts, vma_source)?;
    stats.cow_shared_bytes = state.cow_shared_bytes;
    for process in &mut state.processes {
        let policies = full_policies(process, opts, None, false);
        process.plan = pages::plan(&process.pages, &policies);
    }
    Ok(Collected {
        tree,
        state,
        stats,
        frozen_since,
    })
}

/// S2: the images are encoded in memory while the tree stays frozen.
fn round(pid: Pid, opts: &DumpOptions) -> Result<Round, DumpError> {
    let Collected {
        tree,
        state,
        mut stats,
        frozen_since,
    } = freeze_and_collect(pid, opts)?;
    let collect_us = micros(frozen_since);
    let write_start = Instant::now();
    let images = write::images_in_memory(&state, opts, &mut stats)?;
    Ok(Round {
        tree,
        state,
        images,
        stats,
        frozen_since,
        collect_us,
        write_us: micros(write_start),
    })
}

/// S1: freeze, collect, let the tree go. Its images are written afterwards, from a
/// process that runs again: the first round is not down time, but its freeze is a gap in
/// the program all the same, so it holds the tree only while the state is read.
fn first_round(pid: Pid, opts: &DumpOptions) -> Result<(TreeState, DumpStats), DumpError> {
    let Collected {
        tree,
        state,
        mut stats,
        frozen_since,
    } = freeze_and_collect(pid, opts)?;
    release::finish_tree(tree, FinalState::Running)?;
    stats.frozen_time_us = micros(frozen_since);
    Ok((state, stats))
}

fn read_images(dir: &Path, names: &[String]) -> Result<Images, PrepareError> {
    names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map(|bytes| (name.clone(), bytes))
                .map_err(|source| PrepareError::ReadImage { path, source })
        })
        .collect()
}

/// The images of `now` whose bytes differ from `before`'s (by file name), and, for each
/// image of `before` that `now` lacks, that kind's empty image. Returns the delta and the
/// names of the vanished images.
fn delta(before: &Images, now: Images) -> (Vec<NamedImage>, Vec<String>) {
    let mut vanished = Vec::new();
    let mut out: Vec<NamedImage> = Vec::new();
    for name in before.keys().filter(|n| !now.contains_key(*n)) {
        // A name that is no image kind was never written by a dump: nothing to say.
        let Some(kind) = ImageKind::from_file_name(name).map(|n| n.kind) else {
            continue;
        };
        let Ok(bytes) = ImageWriter::new(Vec::new(), kind, name.as_str()).and_then(|w| w.finish())
        else {
            continue;
        };
        vanished.push(name.clone());
        out.push(NamedImage {
            name: name.clone(),
            bytes,
        });
    }
    for (name, bytes) in now {
        if before.get(&name) != Some(&bytes) {
            out.push(NamedImage { name, bytes });
        }
    }
    (out, vanished)
}

/// The pages a thread with registers `regs` touches first, page-aligned.
fn hot_addrs(regs: &UserX86RegsEntry) -> [u64; 21] {
    let page = |a: u64| a & !(PAGE_SIZE - 1);
    [
        regs.ip,
        regs.sp,
        regs.sp.wrapping_sub(PAGE_SIZE),
        regs.sp.wrapping_add(PAGE_SIZE),
        regs.ax,
        regs.bx,
        regs.cx,
        regs.dx,
        regs.si,
        regs.di,
        regs.bp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.fs_base,
        regs.gs_base,
    ]
    .map(page)
}

/// The hot pages of threads `regs` that are in `lazy` (sorted `[start, end)` ranges), as
/// runs `(first page, pages)` of adjacent pages.
fn hot_runs<'a>(
    regs: impl IntoIterator<Item = &'a UserX86RegsEntry>,
    lazy: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let mut pages: Vec<u64> = regs
        .into_iter()
        .flat_map(hot_addrs)
        .filter(|&p| lazy.iter().any(|&(s, e)| s <= p && p < e))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for page in pages {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * PAGE_SIZE == page => *n += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

/// Reads the hot pages of every process of the frozen tree. A run that cannot be read
/// (the page vanished under a racing unmap, which a frozen tree cannot do, or a guard) is
/// left to the daemon.
fn hot_pages(state: &TreeState) -> Vec<HotPages> {
    let mut out = Vec::new();
    for process in &state.processes {
        let lazy = lazy::lazy_ranges(&process.plan);
        let regs = process
            .threads
            .iter()
            .filter_map(|t| t.core.thread_info.as_ref().map(|ti| &ti.gpregs));
        for (vaddr, n) in hot_runs(regs, &lazy) {
            let Ok(len) = usize::try_from(n * PAGE_SIZE) else {
                continue;
            };
            let mut data = vec![0u8; len];
            let range = RemoteRange {
                addr: RemoteAddr(vaddr),
                len,
            };
            match memory::read_remote_vectored(process.pid, &[range], &mut data) {
                Ok(()) => out.push(HotPages {
                    pid: process.pid.as_raw(),
                    vaddr,
                    data,
                }),
                Err(error) => {
                    tracing::debug!(pid = %process.pid, vaddr, %error, "hot pages left to the daemon");
                }
            }
        }
    }
    out
}

/// What a connection's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// The prepared restore.
    Switch,
    /// Anything else: the lazy-pages daemon (a page-server frame).
    Daemon,
    /// Nothing sent yet (a daemon speaks only once it has a fault to ask for).
    Silent,
    /// Too few bytes yet to tell.
    Undecided,
    /// Closed without a word.
    Closed,
}

/// Classifies a connection by the bytes peeked at its start.
fn classify(first: &[u8]) -> Opening {
    let magic = &switch::SWITCH_MAGIC;
    if first.is_empty() {
        Opening::Closed
    } else if first.len() >= magic.len() {
        if switch::is_switch_magic(&first[..magic.len()]) {
            Opening::Switch
        } else {
            Opening::Daemon
        }
    } else if magic.starts_with(first) {
        Opening::Undecided
    } else {
        Opening::Daemon
    }
}

/// Peeks at a non-blocking connection's first bytes.
fn peek_opening(stream: &TcpStream) -> std::io::Result<Opening> {
    let mut first = [0u8; switch::SWITCH_MAGIC.len()];
    match stream.peek(&mut first) {
        Ok(n) => Ok(classify(&first[..n])),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
            Ok(Opening::Silent)
        }
        Err(e) => Err(e),
    }
}

/// The prepared restore said READY.
struct Ready {
    switch: TcpStream,
    hot_pages: bool,
    /// The daemon's connection, if it came first.
    daemon: Option<(TcpStream, IpAddr)>,
}

/// Accepts connections, tells the switch from the daemon by their first bytes, and waits
/// for READY on the switch (up to `timeout`).
fn wait_ready(listener: &TcpListener, timeout: Duration, pid: Pid) -> Result<Ready, PrepareError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let accept_err = |source| PrepareError::Accept {
        addr: addr.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(accept_err)?;
    let deadline = Instant::now() + timeout;
    let mut switch: Option<TcpStream> = None;
    let mut daemon: Option<(TcpStream, IpAddr)> = None;
    let mut unknown: Vec<(TcpStream, SocketAddr)> = Vec::new();
    loop {
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(true).map_err(accept_err)?;
                    unknown.push((stream, peer));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(accept_err(e)),
            }
        }
        let mut undecided = Vec::new();
        let mut partial = false;
        for (stream, peer) in unknown.drain(..) {
            match peek_opening(&stream) {
                Ok(Opening::Switch) if switch.is_none() => {
                    let mut stream = stream;
                    let mut magic = [0u8; switch::SWITCH_MAGIC.len()];
                    stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.read_exact(&mut magic))
                        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10))))
                        .map_err(accept_err)?;
                    let _ = stream.set_nodelay(true);
                    tracing::info!(%peer, "prepared restore connected");
                    switch = Some(stream);
                }
                Ok(Opening::Switch) => {
                    tracing::warn!(%peer, "a second prepared restore: refused");
                }
                Ok(Opening::Daemon) if daemon.is_none() => {
                    stream.set_nonblocking(false).map_err(accept_err)?;
                    tracing::info!(%peer, "lazy-pages daemon connected");
                    daemon = Some((stream, peer.ip()));
                }
                Ok(Opening::Daemon) => {
                    tracing::warn!(%peer, "a second lazy-pages daemon: refused");
                }
                Ok(Opening::Silent) => undecided.push((stream, peer)),
                Ok(Opening::Undecided) => {
                    partial = true;
                    undecided.push((stream, peer));
                }
                Ok(Opening::Closed) => tracing::debug!(%peer, "a connection closed unheard"),
                Err(error) => tracing::debug!(%peer, %error, "a connection failed unheard"),
            }
        }
        unknown = undecided;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let err = PrepareError::NoReady {
                addr,
                secs: timeout.as_secs(),
                pid,
            };
            // A restore that connected but never got ready is told not to wait on.
            if let Some(stream) = switch.as_mut() {
                let why = err.to_string();
                let _ = switch::write_message(stream, &SwitchMessage::Abort { why }, false);
            }
            return Err(err);
        }
        let switch_ready = {
            use rustix::event::{PollFd, PollFlags};
            let fds_owned: Vec<_> = std::iter::once(listener.as_fd())
                .chain(switch.iter().map(AsFd::as_fd))
                .chain(unknown.iter().map(|(s, _)| s.as_fd()))
                .collect();
            let mut fds: Vec<PollFd<'_>> = fds_owned
                .iter()
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            // Undecided connections with a few bytes in are looked at again soon, not spun on.
            let wait = if partial {
                left.min(Duration::from_millis(1))
            } else {
                left.min(Duration::from_secs(1))
            };
            let timeout = rustix::event::Timespec {
                tv_sec: i64::try_from(wait.as_secs()).unwrap_or(1),
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(errno) => return Err(accept_err(errno.into())),
            }
            switch.is_some() && fds.get(1).is_some_and(|fd| !fd.revents().is_empty())
        };
        if !switch_ready {
            continue;
        }
        let Some(stream) = switch.as_mut() else {
            continue;
        };
        match switch::read_message(stream) {
            Ok(SwitchMessage::Ready { hot_pages }) => {
                let Some(switch) = switch.take() else {
                    continue;
                };
                listener.set_nonblocking(false).map_err(accept_err)?;
                // A connection still silent is the daemon's, which speaks only once it
                // has a fault to ask for (the switch is found).
                if daemon.is_none() {
                    if let Some((stream, peer)) = unknown.into_iter().next() {
                        stream.set_nonblocking(false).map_err(accept_err)?;
                        tracing::info!(%peer, "lazy-pages daemon connected");
                        daemon = Some((stream, peer.ip()));
                    }
                }
                return Ok(Ready {
                    switch,
                    hot_pages,
                    daemon,
                });
            }
            Ok(other) => {
                let what = match other {
                    SwitchMessage::Delta { .. } => "DELTA",
                    SwitchMessage::Abort { .. } => "ABORT",
                    SwitchMessage::Resumed => "RESUMED",
                    SwitchMessage::Failed { .. } => "FAILED",
                    SwitchMessage::Ready { .. } => "READY",
                };
                return Err(PrepareError::NotReady { pid, what });
            }
            Err(source) => return Err(PrepareError::BeforeReady { pid, source }),
        }
    }
}

/// S2's result: the frozen tree, its state, and what -D still has to get.
struct Switched {
    round: Round,
    /// Images that changed (written into -D after the send) and those that vanished.
    changed: Vec<NamedImage>,
    vanished: Vec<String>,
}

/// S2: freeze, collect, encode the images in memory, send DELTA. On error the tree is
/// dropped (resumed) before this returns.
fn switch_round(
    pid: Pid,
    opts: &DumpOptions,
    prepared: &Images,
    hot: bool,
    stream: &mut TcpStream,
) -> Result<Switched, DumpError> {
    let mut round = round(pid, opts)?;
    let delta_start = Instant::now();
    let now = round.images.take_memory();
    let (images, vanished) = delta(prepared, now);
    let hot = if hot {
        hot_pages(&round.state)
    } else {
        Vec::new()
    };
    let delta_us = micros(delta_start);
    let send_start = Instant::now();
    let raw = switch::delta_plain_len(&images, &hot);
    let msg = SwitchMessage::Delta { images, hot };
    // Straight to the socket (the frame is built once, in one write), counting the bytes.
    let mut wire = Counted {
        inner: stream,
        n: 0,
    };
    // Against the prepared images: mostly the same bytes, which need not cross again.
    switch::write_message_based(&mut wire, &msg, opts.compress_pages, |name| {
        prepared.get(name).map(Vec::as_slice)
    })
    .map_err(|source| PrepareError::SendDelta { pid, source })?;
    let wire_bytes = wire.n;
    let frozen_to_sent = micros(round.frozen_since);
    let send_us = micros(send_start);
    round.stats.frozen_time_us = frozen_to_sent;
    let (images, hot) = match msg {
        SwitchMessage::Delta { images, hot } => (images, hot),
        _ => (Vec::new(), Vec::new()),
    };
    tracing::info!(
        freezing_us = round.stats.freezing_time_us,
        frozen_to_delta_sent_us = frozen_to_sent,
        collect_us = round.collect_us,
        write_us = round.write_us,
        delta_us,
        send_us,
        raw_bytes = raw,
        wire_bytes,
        images = images.len(),
        names = ?images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        hot_pages = hot.iter().map(|h| h.data.len() as u64 / PAGE_SIZE).sum::<u64>(),
        "S2: delta sent"
    );
    Ok(Switched {
        round,
        changed: images,
        vanished,
    })
}

/// A writer that counts what goes through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Brings -D to S2's state: the changed images written, the vanished ones removed,
/// S2's `stats-dump`. The source's copy is only a record by now: failures are logged. Runs
/// beside the serving of the pages (the daemon's first requests must not wait for it).
fn update_images_dir(
    dir: &Path,
    images: WrittenImages,
    stats: DumpStats,
    mut changed: Vec<NamedImage>,
    vanished: &[String],
) {
    match images.commit_memory(&stats) {
        Ok(rest) => changed.extend(
            rest.into_iter()
                .map(|(name, bytes)| NamedImage { name, bytes }),
        ),
        Err(error) => tracing::warn!(%error, "cannot encode stats-dump"),
    }
    for image in &changed {
        let path = dir.join(&image.name);
        let result = if vanished.contains(&image.name) {
            std::fs::remove_file(&path)
        } else {
            std::fs::write(&path, &image.bytes)
        };
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot update the image");
        }
    }
}

/// A prepared post-copy dump (see the module documentation).
#[tracing::instrument(skip_all, fields(pid = opts.pid))]
pub(crate) fn prepared_dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    if let Some(what) = refusal(opts) {
        return Err(PrepareError::Refused { what }.into());
    }
    let pid = Pid::from_raw(opts.pid).ok_or(DumpError::BadPid(opts.pid))?;
    // Raised before each round's tree, dropped after it: signals wait until the tree is
    // let go. Not while waiting for the destination, when nothing is held.
    let shield = SignalShield::raise();
    let addr = opts.lazy_listen.ok_or(DumpError::Options {
        mode: opts.mode,
        what: "--address and --port to serve the pages at",
    })?;
    let listener = lazy::listen(addr)?;

    // S1: the whole image set, then the tree runs on. A fault asked for (`CKPT_FAULT`)
    // strikes S2, the round whose failure the switch must survive.
    let s1_opts = DumpOptions {
        fault: None,
        ..opts.clone()
    };
    let (state, mut s1_stats) = first_round(pid, &s1_opts)?;
    let images = write::images_of_running(&state, &s1_opts, &mut s1_stats)?;
    let names = images.file_names();
    images.commit(&s1_stats)?;
    drop(shield);
    tracing::info!(
        s1_frozen_us = s1_stats.frozen_time_us,
        freezing_us = s1_stats.freezing_time_us,
        images = names.len(),
        lazy = s1_stats.pages_lazy,
        "prepared images written"
    );
    let prepared = read_images(&opts.images_dir, &names)?;

    let ready = wait_ready(&listener, opts.lazy_connect_timeout, pid)?;
    let mut switch_stream = ready.switch;
    tracing::info!(hot_pages = ready.hot_pages, "the destination is ready");

    // S2: the delta. Any failure resumes the tree (dropped inside) and tells the
    // destination.
    let _shield = SignalShield::raise();
    let switched = match switch_round(pid, opts, &prepared, ready.hot_pages, &mut switch_stream) {
        Ok(switched) => switched,
        Err(err) => {
            let abort = SwitchMessage::Abort {
                why: err.to_string(),
            };
            if let Err(error) = switch::write_message(&mut switch_stream, &abort, false) {
                tracing::warn!(%error, "cannot tell the destination the switch is off");
            }
            return Err(err);
        }
    };
    let Switched {
        round,
        changed,
        vanished,
    } = switched;
    let ranges = round
        .state
        .processes
        .iter()
        .map(|p| (p.pid, lazy::lazy_ranges(&p.plan)))
        .collect();
    let stats = round.stats;
    let dir = opts.images_dir.clone();
    let images = round.images;
    let updating = std::thread::Builder::new()
        .name("prepared-images".to_owned())
        .spawn(move || update_images_dir(&dir, images, stats, changed, &vanished));
    let updating = match updating {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(%error, "-D keeps the prepared images: no thread to update it");
            None
        }
    };
    let link = SwitchLink {
        switch: switch_stream,
        daemon: ready.daemon,
    };
    let served = lazy::serve_prepared(round.tree, listener, ranges, opts, link);
    if let Some(handle) = updating {
        if handle.join().is_err() {
            tracing::warn!("updating -D panicked");
        }
    }
    let outcome = served?;
    tracing::info!(?outcome, "lazy pages served; the source is gone");
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(list: &[(&str, &[u8])]) -> Images {
        list.iter()
            .map(|(n, b)| ((*n).to_owned(), b.to_vec()))
            .collect()
    }

    #[test]
    fn the_delta_is_what_differs_by_name() {
        let before = images(&[
            ("core-7.img", b"regs-a"),
            ("mm-7.img", b"vmas"),
            ("sk-queues.img", b"queued"),
            ("notes.txt", b"not an image"),
        ]);
        let now = images(&[
            ("core-7.img", b"regs-b"),
            ("mm-7.img", b"vmas"),
            ("core-8.img", b"new thread"),
        ]);
        let (delta, vanished) = delta(&before, now);
        let names: Vec<&str> = delta.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["sk-queues.img", "core-7.img", "core-8.img"]);
        assert_eq!(delta[1].bytes, b"regs-b");
        assert_eq!(vanished, ["sk-queues.img"]);
        // A vanished image crosses as its kind's empty image: the header, no entry.
        let empty = &delta[0].bytes;
        let mut reader = images_format::ImageReader::new(
            empty.as_slice(),
            ImageKind::SkQueues,
            "sk-queues.img",
            None,
        )
        .expect("a valid empty image");
        assert!(reader.read_raw_entry().expect("read").is_none());
    }

    #[test]
    fn an_unchanged_set_has_an_empty_delta() {
        let set = images(&[("core-7.img", b"regs"), ("pstree.img", b"tree")]);
        let (delta, vanished) = delta(&set, set.clone());
        assert!(delta.is_empty() && vanished.is_empty());
    }

    #[test]
    fn hot_pages_are_the_lazy_ones_under_the_registers_in_runs() {
        const P: u64 = PAGE_SIZE;
        let regs = UserX86RegsEntry {
            ip: 0x40_1234,
            sp: 0x7000_0000 + 10 * P + 8,
            ax: 0x9000_0000 + 5,
            fs_base: 0x9000_0000 + P,
            bx: 0x7000_0000 + 10 * P,
            ..UserX86RegsEntry::default()
        };
        let lazy = [
            (0x7000_0000, 0x7000_0000 + 11 * P),
            (0x9000_0000, 0x9000_2000),
        ];
        assert_eq!(
            hot_runs([&regs], &lazy),
            // sp - 1 page and sp's page (sp + 1 page is not lazy); ax and fs_base adjacent.
            vec![(0x7000_0000 + 9 * P, 2), (0x9000_0000, 2)]
        );
        assert!(hot_runs([&regs], &[]).is_empty());
    }

    #[test]
    fn connections_are_told_apart_by_their_first_bytes() {
        assert_eq!(classify(&switch::SWITCH_MAGIC), Opening::Switch);
        assert_eq!(classify(&switch::SWITCH_MAGIC[..3]), Opening::Undecided);
        assert_eq!(classify(&[]), Opening::Closed);
        // A page-server GET: command 7 with our flags in the high half.
        assert_eq!(classify(&[7, 0, 0, 0x40, 1, 0, 0, 0]), Opening::Daemon);
        assert_eq!(classify(&[7]), Opening::Daemon);
    }

    #[test]
    fn peeking_leaves_the_bytes_for_the_reader() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut restore = TcpStream::connect(addr).expect("connect");
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted.set_nonblocking(true).expect("nonblocking");
        assert_eq!(peek_opening(&accepted).expect("peek"), Opening::Silent);
        switch::write_magic(&mut restore).expect("magic");
        let start = Instant::now();
        while peek_opening(&accepted).expect("peek") != Opening::Switch {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the magic never came"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        accepted.set_nonblocking(false).expect("blocking");
        switch::read_magic(&mut accepted).expect("the magic is still there to read");
        drop(restore);
        assert_eq!(
            peek_opening(&accepted).expect("peek"),
            Opening::Closed,
            "end of stream"
        );
    }

    #[test]
    fn prepare_is_refused_where_unsupported() {
        let mut opts = DumpOptions::new(1, "img");
        assert!(refusal(&opts).is_some(), "not lazy");
        opts.mode = DumpMode::Lazy;
        assert!(refusal(&opts).is_none());
        opts.track_mem = true;
        assert!(refusal(&opts).is_some());
        opts.track_mem = false;
        opts.prev_images_dir = Some("../1".into());
        assert!(refusal(&opts).is_some());
    }
}
