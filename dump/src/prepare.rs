//! The source side of a prepared post-copy (`ckpt-dump --lazy-pages --prepare`), and of the
//! prepared end of a pre-copy (`ckpt-dump --prepare` after pre-dump rounds, no lazy pages:
//! its memory is the business of `switch_pages`, the rest is as below; it serves no page,
//! and ends the source once the destination says RESUMED).
//!
//! Why: in a plain post-copy the whole pipeline (collect, write, transfer, read, rebuild
//! every process) runs while the process is frozen, milliseconds even for a small one.
//! Almost none of that state changes in those milliseconds, so it can be taken while the
//! process runs on and be rebuilt at the destination ahead of time; only what changed since
//! has to cross inside the down time. Hence two rounds, one `ckpt-dump` for both:
//!
//! ```text
//! listen on A:P (a busy port costs nothing)
//! S1  short freezes, the rest read while the tree runs (see "S1" below), then
//!     write the whole lazy image set into -D
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
//! S1: its freezes are not down time, but each is a gap in the program as long as any, so
//! S1 holds the tree only for what needs it stopped, in several short freezes a few
//! milliseconds apart, each one a gap of a few hundred microseconds:
//!
//! ```text
//! open the syscall watch's counters; read ahead each process's stat, status and auxv and
//!     the vdso's syscall, and ask the CPU its xsave layout (nothing of it in a freeze)
//! F1  registers, xsave, masks, pending signals, stop state, rseq, seccomp filters: ptrace
//!     reads, no injection; counts c1; release; the leaders' personalities from /proc; 1 ms
//! F2  counts must be c1; injected into each leader: brk, dumpable, THP; counts c2;
//!     release; 1 ms
//! F3  counts must be c2; injected: child subreaper, membarrier, MDWE; counts c3; ...
//! F4  injected: dispositions (of the signals the status read ahead names) and timers; ...
//! F5+ injected into two threads of each process at a time: sigaltstack, parent-death
//!     signal, securebits, clear-tid address; the last freeze's counts, as it ends, are
//!     the watch's baseline (`refresh::arm`); release
//! ... the tree runs: stat, status and auxv again, robust list, scheduling, affinity,
//!     timer slack, I/O priority, the address space (smaps, the page scan), rlimits,
//!     namespaces and object ids, the files: /proc, pidfd_getfd, no ptrace
//! ```
//!
//! The injecting freezes follow each other closely, the long reading comes after the
//! last: measured, a freeze right after milliseconds of other work ran ~100 us longer
//! (caches).
//!
//! ckpt-dump runs under a real-time policy while it holds the tree (a busy machine would
//! otherwise delay each round trip, and a released thread of a busy program could take
//! the CPU while its siblings stay frozen), pinned to the CPU of the thread it injects
//! into; after each release it moves off that CPU until the images are written, so that
//! the program is not left waiting behind ckpt-dump's reading.
//!
//! The images it gives are as good a base as one freeze's: each value is the tree's at
//! some moment of S1, and whatever differs at S2 the delta carries (or S2 reads in full).
//!
//! Why the light S2 stays sound. A light S2 re-reads only what can change without a
//! counted syscall (`collect::refresh`), and keeps the rest from S1; it is taken only if no
//! thread's count grew past the baseline. So every value S1 keeps must be the tree's
//! value at the baseline, given that no counted syscall follows it. Take a kept value read
//! at time t. Between t and the baseline the tree is either frozen (nothing changes) or
//! runs with its syscalls counted; and a counted syscall between two freezes makes the
//! counts at a freeze's start differ from those at the previous one's end, which rules
//! the light S2 out at once. Reads in a freeze (F1, F2...) and between freezes are
//! therefore the tree's values at the baseline whenever the light S2 may be taken, and so
//! are reads after the last freeze (a change after the baseline is counted past it); a
//! count that grew in S1 itself is only ever seen as "grew", never absorbed into the
//! baseline. What must not happen is a kept value read before the first freeze, where a
//! syscall between the read and F1 would be absorbed: the reads ahead (stat, status,
//! auxv) only steer the freezes (whether F1 reads seccomp filters, which dispositions F4
//! injects for; the leader's comm and credentials, replaced afterwards), and are read
//! again after the last freeze: the images take the values read again, and if what
//! steered the freezes changed since the reads ahead, the light S2 is ruled out ("moved"):
//! equal values ahead and after, with no counted syscall from F1 on, are the values the
//! freezes saw.
//! The vdso's `syscall` found ahead is checked (its two bytes read) in each freeze before
//! an injection goes there.
//! Values that change with no syscall (registers, masks, pending signals, pages, rseq's
//! critical section, what other processes set from outside: scheduling, affinity, timer
//! slack, I/O priority, rlimits, oom_score_adj, file sizes...) S2 reads again anyway, so
//! when S1 reads them does not matter. Threads or processes that come or go between the
//! freezes make the later freeze read the whole tree again (and arm from its end).
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

use crate::aside::Aside;
use crate::collect::{self, refresh, TreeState};
use crate::lazy::{self, SwitchLink};
use crate::release;
use crate::switch_pages::SwitchPages;
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
    match opts.mode {
        DumpMode::PreDump => Some("is a final dump, not a pre-dump"),
        _ if opts.page_server.is_some() => Some("with --page-server is not supported"),
        DumpMode::Lazy if opts.prev_images_dir.is_some() && !opts.track_mem => {
            Some("with --lazy-pages and --prev-images-dir needs --track-mem")
        }
        DumpMode::Full if opts.final_state == crate::FinalState::Running => {
            Some("with --leave-running would leave the process running twice")
        }
        DumpMode::Lazy | DumpMode::Full => None,
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
    /// When the freeze began, on the monotonic clock (see [`monotonic_ns`]).
    freeze_start_ns: i64,
    /// Collecting, then writing (µs).
    collect_us: u32,
    write_us: u32,
    /// The state was read lightly (`collect::refresh`), not collected in full.
    light: bool,
    /// The destination holds the memory and S1's page images still describe it: the
    /// pages written since (see `switch_pages`).
    written: Option<Vec<HotPages>>,
    /// S1's page images stand for S2's (`written` was taken from here).
    reused: bool,
}

/// A frozen tree, its state and its page plans.
struct Collected {
    tree: SeizedTree,
    state: TreeState,
    stats: DumpStats,
    frozen_since: Instant,
    freeze_start_ns: i64,
    light: bool,
}

/// What the final round may start from instead of a full collection: the first round's
/// state and the watch on the tree's syscalls since (see `collect::refresh`).
struct Earlier<'a> {
    state: &'a TreeState,
    watch: &'a mut refresh::Watch,
}

/// Reads the frozen tree's state: lightly from `earlier` if the watch allows it (and what
/// it reads again shows no change it cannot follow), else in full. Says which it did.
fn read_state(
    tree: &mut SeizedTree,
    opts: &DumpOptions,
    vma_source: collect::VmaSource,
    earlier: Option<(Earlier<'_>, Option<refresh::Reader>)>,
) -> Result<(TreeState, bool), DumpError> {
    if let Some((earlier, reader)) = earlier {
        let why = match refresh::look_again(tree, earlier.state, earlier.watch, reader)? {
            refresh::Refreshed::State(state) => {
                fault::check(opts.fault, FaultPoint::AfterInject)?;
                return Ok((state, true));
            }
            refresh::Refreshed::Stale(why) => why,
        };
        tracing::info!(%why, "S2 collects in full");
    }
    Ok((collect::tree(tree, opts, vma_source)?, false))
}

/// S2's work once over while the tree still runs, its results dropped: the final freeze
/// then runs code, data and kernel objects that are warm in the caches. Cold, the same
/// work took twice as long in that freeze as it does run twice in a row.
fn rehearse(earlier: &Earlier<'_>, opts: &DumpOptions) {
    refresh::rehearse(earlier.state, earlier.watch);
    let mut stats = DumpStats::default();
    let _ = write::images_in_memory(earlier.state, opts, &mut stats);
}

/// Freezes the tree and reads its state (lightly from `earlier` where it can), and plans
/// its pages.
fn freeze_and_collect(
    pid: Pid,
    opts: &DumpOptions,
    earlier: Option<Earlier<'_>>,
) -> Result<Collected, DumpError> {
    // Made while the tree runs: the thread that reads /proc beside us in the light look.
    let earlier = earlier.map(|earlier| {
        let reader = refresh::Reader::start(earlier.state, earlier.watch);
        (earlier, reader)
    });
    // smaps' page walk is done while the tree runs, and kept if the VMAs stay the same.
    let vma_source = tracee::proc::smaps::read(pid)
        .map(collect::VmaSource::SmapsIfUnchanged)
        .unwrap_or(collect::VmaSource::Smaps);
    if let Some((earlier, _)) = &earlier {
        rehearse(earlier, opts);
    }
    let freeze_start_ns = monotonic_ns();
    let freeze_start = Instant::now();
    let mut tree = seize::freeze_tree(pid)?;
    let mut stats = DumpStats {
        freezing_time_us: micros(freeze_start),
        ..DumpStats::default()
    };
    let frozen_since = Instant::now();
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;
    let (mut state, light) = read_state(&mut tree, opts, vma_source, earlier)?;
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
        freeze_start_ns,
        light,
    })
}

/// S2: the images are encoded in memory while the tree stays frozen.
/// With `held` (the destination holds the memory), the pages written since S1 instead of
/// the memory, where S1's page images still stand.
fn round(
    pid: Pid,
    opts: &DumpOptions,
    earlier: Option<Earlier<'_>>,
    held: Option<&mut SwitchPages>,
) -> Result<Round, DumpError> {
    let Collected {
        tree,
        mut state,
        mut stats,
        frozen_since,
        freeze_start_ns,
        light,
    } = freeze_and_collect(pid, opts, earlier)?;
    let written = held.and_then(|h| state.processes.first().and_then(|p| h.since_s1(p)));
    if written.is_some() {
        // S1's page images stand: none is read or encoded again.
        for process in &mut state.processes {
            process.plan.clear();
        }
    }
    let collect_us = micros(frozen_since);
    let write_start = Instant::now();
    let images = write::images_in_memory(&state, opts, &mut stats)?;
    Ok(Round {
        tree,
        state,
        images,
        stats,
        frozen_since,
        freeze_start_ns,
        collect_us,
        write_us: micros(write_start),
        light,
        reused: written.is_some(),
        written,
    })
}

/// Heap touched ahead of S2 (see `tracee::heap`): several times what S2 of a small
/// process allocates (about 170 KiB for the benchmark's 4 MiB program).
const S2_HEAP: usize = 1 << 20;

/// How many threads of each process a freeze of S1 injects into.
const THREADS_PER_FREEZE: usize = 2;

/// S1's freezes for the injections into a tree of at most `most` threads a process: the
/// leaders' values, the leaders' dispositions and timers, then the threads a few at a
/// time (see "S1" in the module documentation).
fn injection_steps(most: usize) -> Vec<collect::Injected> {
    let mut steps = vec![
        collect::Injected::LeaderMm,
        collect::Injected::LeaderFlags,
        collect::Injected::LeaderSignals,
    ];
    steps.extend(
        (0..most)
            .step_by(THREADS_PER_FREEZE)
            .map(|from| collect::Injected::Threads {
                from,
                to: from + THREADS_PER_FREEZE,
            }),
    );
    steps
}

/// How long the tree runs between two of S1's freezes that have nothing to read between.
const BETWEEN_FREEZES: Duration = Duration::from_millis(1);

/// One of S1's freezes: the tree, how long freezing took, when it was frozen.
struct S1Freeze {
    tree: SeizedTree,
    freezing_us: u32,
    since: Instant,
    /// ckpt-dump's thread under a real-time policy while it holds the tree: on a busy
    /// machine each injection's round trip may otherwise wait a time slice behind whatever
    /// else runs, and so may the release: once the first thread of a busy program is let
    /// go it can take the CPU from ckpt-dump while the others stay frozen (milliseconds,
    /// measured). ckpt-dump sleeps in every wait, so the program's injected syscalls still
    /// run; the kernel's real-time throttling bounds the rest.
    urgent: tracee::taskinfo::RealTime,
    /// ckpt-dump's thread on the CPU the root last ran on from before the freeze: the stop
    /// then wakes it there, and the injections (pinned there, see `collect`) need no move
    /// onto the CPU the stopped program left idle, a move that once took 1.6 ms to take
    /// effect (traced: the idle CPU of this virtual machine was woken that late for it).
    beside: Option<tracee::CpuPin>,
}

impl S1Freeze {
    fn new(pid: Pid) -> Result<S1Freeze, DumpError> {
        tracing::info!(monotonic_ns = monotonic_ns(), "S1 freezes the tree");
        let urgent = tracee::taskinfo::RealTime::raise();
        // Best effort: unpinned, the injections pin themselves as they begin.
        let beside = tracee::CpuPin::next_to(pid, pid.leader()).ok();
        let start = Instant::now();
        let tree = seize::freeze_tree(pid)?;
        Ok(S1Freeze {
            tree,
            freezing_us: micros(start),
            since: Instant::now(),
            urgent,
            beside,
        })
    }

    /// Lets the tree run, and steps aside from the CPU its root ran on (see [`Aside`]);
    /// returns how long it was held.
    fn release(self, pid: Pid) -> Result<(u32, Aside), DumpError> {
        release::finish_tree(self.tree, FinalState::Running)?;
        let held = micros(self.since);
        drop(self.beside);
        if let Err(error) = self.urgent.end() {
            tracing::warn!(%error, "could not give back our scheduling policy");
        }
        Ok((held, Aside::from_cpu_of(pid)))
    }
}

/// S1: short freezes, the rest read while the tree runs (see "S1" in the module
/// documentation). Its images are written afterwards, from a process that runs again: the
/// first round is not down time, but each freeze is a gap in the program all the same.
/// Before the tree goes the last time, the counts of its syscalls become the watch's
/// baseline, if it qualifies for a light S2 (else `Err` says why not).
fn first_round(pid: Pid, opts: &DumpOptions) -> Result<FirstRound, DumpError> {
    let mut counters = Some(refresh::watch_before_freeze(pid));
    let counts = |counters: &Option<Result<refresh::Counters, String>>| {
        counters
            .as_ref()
            .and_then(|c| c.as_ref().ok())
            .map(refresh::Counters::counts)
    };
    let ahead = collect::read_ahead(pid);

    let mut first = S1Freeze::new(pid)?;
    let mut in_freeze = collect::in_freeze(&mut first.tree, ahead, false, opts)?;
    let mut counts_last = counts(&counters);
    let mut freezing_us = vec![first.freezing_us];
    let (held, mut aside) = first.release(pid)?;
    let mut held_us = vec![held];
    collect::between_freezes(&mut in_freeze);

    // The injections, in freezes of their own. What the tree's threads count between two
    // freezes is the program's own doing: it must be nothing for the reads to hold.
    let mut moved = None;
    let mut armed = Err("S1 did not end".to_owned());
    let mut whole = None;
    let steps = injection_steps(in_freeze.most_threads());
    for (n, &step) in steps.iter().enumerate() {
        // Freezes too close together are one gap to the program: let it run a while.
        std::thread::sleep(BETWEEN_FREEZES);
        drop(aside);
        let mut freeze = S1Freeze::new(pid)?;
        let counts_now = counts(&counters);
        if let Some(Err(why)) = &counts_now {
            moved.get_or_insert_with(|| why.clone());
        } else if counts_now != counts_last {
            moved.get_or_insert_with(|| {
                "the tree made syscalls outside the allowlist between S1's freezes".to_owned()
            });
        }
        let same = collect::injected_in_freeze(&mut freeze.tree, &mut in_freeze, step, opts)?;
        if !same {
            // The processes or threads changed between the freezes: this one reads all.
            tracing::info!("the tree changed between S1's freezes: read whole in this one");
            whole = Some(collect::in_freeze(
                &mut freeze.tree,
                collect::ReadAhead::default(),
                true,
                opts,
            )?);
        }
        let last = !same || n + 1 == steps.len();
        if last {
            // The baseline: the counts as the last freeze ends.
            let opened = counters
                .take()
                .unwrap_or_else(|| Err("no counters".to_owned()));
            armed = opened.and_then(|counters| refresh::arm(&freeze.tree, counters));
        } else {
            counts_last = counts(&counters);
        }
        freezing_us.push(freeze.freezing_us);
        let (held, now_aside) = freeze.release(pid)?;
        held_us.push(held);
        aside = now_aside;
        if last {
            break;
        }
    }
    let after_start = Instant::now();
    let settled = match whole {
        Some(whole) => {
            // Read again in the last freeze: what S1 saw before does not count.
            moved = None;
            collect::after_release(whole, opts, collect::VmaSource::Smaps)?
        }
        None => collect::after_release(in_freeze, opts, collect::VmaSource::Smaps)?,
    };
    let after_us = micros(after_start);
    let collect::Settled {
        mut state,
        moved: moved_after,
    } = settled;
    if let Some(why) = moved_after {
        moved.get_or_insert(why);
    }
    let mut stats = DumpStats {
        freezing_time_us: freezing_us.iter().copied().max().unwrap_or(0),
        frozen_time_us: held_us.iter().copied().max().unwrap_or(0),
        ..DumpStats::default()
    };
    for process in &mut state.processes {
        let policies = full_policies(process, opts, None, false);
        process.plan = pages::plan(&process.pages, &policies);
    }
    stats.cow_shared_bytes = state.cow_shared_bytes;
    tracing::info!(?held_us, ?freezing_us, after_us, "S1: read in freezes");
    let watch = match moved {
        Some(why) => Err(why),
        None => armed.and_then(|armed| armed.ready(&state)),
    };
    Ok(FirstRound {
        state,
        stats,
        watch,
        aside,
    })
}

/// What S1 leaves: the state, its statistics, the watch (or why there is none), and
/// ckpt-dump kept off the program's CPU while it writes the images.
struct FirstRound {
    state: TreeState,
    stats: DumpStats,
    watch: Result<refresh::Watch, String>,
    aside: Aside,
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
/// image of `before` that `now` lacks (but those `kept`, which stand as they are), that
/// kind's empty image. Returns the delta and the names of the vanished images.
fn delta(before: &Images, now: Images, kept: &[String]) -> (Vec<NamedImage>, Vec<String>) {
    let mut vanished = Vec::new();
    let mut out: Vec<NamedImage> = Vec::new();
    let gone = |n: &&String| !now.contains_key(*n) && !kept.contains(*n);
    for name in before.keys().filter(gone) {
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

/// Reads the hot pages of every process of the frozen tree, among the lazy pages
/// `lazy_of` gives for it. A run that cannot be read (the page vanished under a racing
/// unmap, which a frozen tree cannot do, or a guard) is left to the daemon.
fn hot_pages(
    state: &TreeState,
    lazy_of: impl Fn(&collect::ProcessState) -> Vec<(u64, u64)>,
) -> Vec<HotPages> {
    let mut out = Vec::new();
    for process in &state.processes {
        let lazy = lazy_of(process);
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
    sent: DeltaSent,
}

/// S2: freeze, collect, encode the images in memory, send DELTA. On error the tree is
/// dropped (resumed) before this returns.
fn switch_round(
    pid: Pid,
    opts: &DumpOptions,
    prepared: &Images,
    hot: bool,
    stream: &mut TcpStream,
    earlier: Option<Earlier<'_>>,
    mut held: Option<&mut SwitchPages>,
) -> Result<Switched, DumpError> {
    // Until the delta is sent: as S1's freezes, above every normal task. Not after: the
    // prepared restore, at the same real-time priority, must not wait for us.
    let urgent = tracee::taskinfo::RealTime::raise();
    let mut round = round(pid, opts, earlier, held.as_deref_mut())?;
    let delta_start = Instant::now();
    let mut now = round.images.take_memory();
    let mut kept = Vec::new();
    if round.written.is_some() {
        for (i, process) in round.state.processes.iter().enumerate() {
            for name in write::process_page_images(i, process.pid) {
                now.remove(&name);
                kept.push(name);
            }
        }
    }
    let (images, vanished) = delta(prepared, now, &kept);
    let mut pages = round.written.take().unwrap_or_default();
    if hot {
        // S1's lazy pages, where S2 kept S1's page images.
        let s1_lazy = held
            .filter(|_| round.reused)
            .map(|h| h.lazy_ranges().to_vec());
        pages.extend(hot_pages(&round.state, |p| match &s1_lazy {
            Some(lazy) => lazy.clone(),
            None => lazy::lazy_ranges(&p.plan),
        }));
    }
    let hot = pages;
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
    // A lazy dump serves the destination's faults from now on: with short slices, as it
    // leaves real time (see `lazy::serve_with`).
    let normal = if opts.mode == DumpMode::Lazy {
        urgent.end_with_slice(tracee::taskinfo::SHORTEST_SLICE)
    } else {
        urgent.end()
    };
    if let Err(error) = normal {
        tracing::debug!(%error, "could not give back our scheduling policy");
    }
    let wire_bytes = wire.n;
    let frozen_to_sent = micros(round.frozen_since);
    let send_us = micros(send_start);
    round.stats.frozen_time_us = frozen_to_sent;
    let (images, hot) = match msg {
        SwitchMessage::Delta { images, hot } => (images, hot),
        _ => (Vec::new(), Vec::new()),
    };
    let sent = DeltaSent {
        freeze_start_ns: round.freeze_start_ns,
        freezing_us: round.stats.freezing_time_us,
        frozen_to_sent_us: frozen_to_sent,
        light: round.light,
        collect_us: round.collect_us,
        write_us: round.write_us,
        delta_us,
        send_us,
        raw_bytes: raw,
        wire_bytes,
        names: images.iter().map(|i| i.name.clone()).collect(),
        hot_pages: hot.iter().map(|h| h.data.len() as u64 / PAGE_SIZE).sum(),
    };
    Ok(Switched {
        round,
        changed: images,
        vanished,
        sent,
    })
}

/// What S2 did, for its log line: written once the destination's first faults are served,
/// not between the delta and them.
struct DeltaSent {
    freeze_start_ns: i64,
    freezing_us: u32,
    frozen_to_sent_us: u32,
    light: bool,
    collect_us: u32,
    write_us: u32,
    delta_us: u32,
    send_us: u32,
    raw_bytes: usize,
    wire_bytes: usize,
    names: Vec<String>,
    hot_pages: u64,
}

impl DeltaSent {
    fn log(&self) {
        tracing::info!(
            freeze_start_ns = self.freeze_start_ns,
            freezing_us = self.freezing_us,
            frozen_to_delta_sent_us = self.frozen_to_sent_us,
            light = self.light,
            collect_us = self.collect_us,
            write_us = self.write_us,
            delta_us = self.delta_us,
            send_us = self.send_us,
            raw_bytes = self.raw_bytes,
            wire_bytes = self.wire_bytes,
            images = self.names.len(),
            names = ?self.names,
            hot_pages = self.hot_pages,
            "S2: delta sent"
        );
    }
}

/// Now on the monotonic clock, in ns: the clock a program's own timestamps use (the
/// benchmark's workloads stamp it), so that their gaps line up with the dump's freezes.
fn monotonic_ns() -> i64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec.saturating_mul(1_000_000_000) + now.tv_nsec
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

/// How long after the switch -D is brought up to date, unless the pages are all served
/// before: the lazy-pages daemon asks only for faults that long by default (its
/// `--background-delay`), the restored tree's first steps.
const UPDATE_DELAY: Duration = Duration::from_millis(10);

/// The thread that brings -D up to date, and where it says what it ran under before
/// `SCHED_IDLE`.
type Updater = (
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Receiver<Option<(tracee::Tid, tracee::taskinfo::Sched)>>,
);

/// Waits for the thread that brings -D up to date, telling it first that nothing is
/// served any more (`served`, dropped): it need not wait out [`UPDATE_DELAY`], and its
/// work is now what our exit waits for, so it gets its normal policy back (under
/// `SCHED_IDLE` it could wait behind the busy program for tens of milliseconds).
fn join_updater(updater: Option<Updater>, served: std::sync::mpsc::Sender<()>) {
    drop(served);
    let Some((handle, idle)) = updater else {
        return;
    };
    if let Ok(Some((tid, before))) = idle.recv() {
        if let Err(error) = tracee::taskinfo::set_sched(tid, &before) {
            tracing::debug!(%error, "-D is updated under SCHED_IDLE");
        }
    }
    if handle.join().is_err() {
        tracing::warn!("updating -D panicked");
    }
}

/// What is left to do once the delta is sent, off the path of the destination's first
/// faults.
struct AfterSwitch {
    sent: DeltaSent,
    dir: PathBuf,
    images: WrittenImages,
    stats: DumpStats,
    changed: Vec<NamedImage>,
    vanished: Vec<String>,
    watch: Option<refresh::Watch>,
    state: TreeState,
}

impl AfterSwitch {
    fn run(self) {
        self.sent.log();
        update_images_dir(
            &self.dir,
            self.images,
            self.stats,
            self.changed,
            &self.vanished,
        );
        // Its counters are closed (`Watch::take_counters`); the handles the light look read
        // go now.
        drop(self.watch);
        drop(self.state);
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

/// The end of a prepared dump that serves no pages: RESUMED ends the source as asked
/// (killed, or left stopped), once `resumed` has run; anything else (FAILED, the link
/// closing) resumes it.
fn await_destination(
    tree: SeizedTree,
    mut switch: TcpStream,
    opts: &DumpOptions,
    resumed: impl FnOnce(),
) -> Result<(), DumpError> {
    let pid = tree.root().pid();
    let _ = switch.set_read_timeout(None);
    let why = match switch::read_message(&mut switch) {
        Ok(SwitchMessage::Resumed) => {
            resumed();
            tracing::info!(%pid, "the destination runs");
            release::finish_tree(tree, opts.final_state)?;
            return Ok(());
        }
        Ok(SwitchMessage::Failed { why }) => format!("the restore failed: {why}"),
        Ok(_) => "an unexpected switch message".to_owned(),
        Err(error) => error.to_string(),
    };
    drop(tree);
    Err(lazy::LazyError::SwitchFailed { pid, why }.into())
}

/// A prepared post-copy dump (see the module documentation).
#[tracing::instrument(skip_all, fields(pid = opts.pid))]
pub(crate) fn prepared_dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    if let Some(what) = refusal(opts) {
        return Err(PrepareError::Refused { what }.into());
    }
    let pid = Pid::from_raw(opts.pid).ok_or(DumpError::BadPid(opts.pid))?;
    // From the start: opening the watch and reading the tree before S1 take a millisecond
    // or more, which the program would wait out on its own CPU; and to the end (see
    // `Aside`).
    let _aside = Aside::from_cpu_of(pid);
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
    // The destination holds every page unless they are lazy, and after a round (assisted
    // post-copy) those unwritten since: the pages written since S1 cross with the delta
    // then, and dirty tracking tells which (see `switch_pages`).
    let tracked = if opts.mode == DumpMode::Lazy && !opts.track_mem {
        None
    } else {
        Some(SwitchPages::start(pid, &s1_opts)?)
    };
    let FirstRound {
        mut state,
        stats: mut s1_stats,
        watch,
        aside,
    } = first_round(pid, &s1_opts)?;
    let mut held = None;
    if let Some((tracking, set)) = tracked {
        // What was written since T too, looked at after S1's page scan: a page first
        // touched after T is not the round's (S2 collects it).
        let set = crate::track::with_written_since(pid, set);
        // The pages unwritten since the previous round are the parent's: the destination
        // holds that round (it restores from our images' `parent`, or fails, and then
        // the process runs on here).
        let parent = opts.prev_images_dir.is_some();
        for process in &mut state.processes {
            let policies = full_policies(process, opts, set.as_ref(), parent);
            process.plan = pages::plan(&process.pages, &policies);
        }
        held = state
            .processes
            .first()
            .map(|p| SwitchPages::after_s1(tracking, p));
    }
    let mut watch = watch
        .map_err(|why| tracing::info!(%why, "S2 will collect in full"))
        .ok();
    let images = write::images_of_running(&state, &s1_opts, &mut s1_stats)?;
    let names = images.file_names();
    images.commit(&s1_stats)?;
    drop(aside);
    drop(shield);
    tracing::info!(
        s1_frozen_us = s1_stats.frozen_time_us,
        freezing_us = s1_stats.freezing_time_us,
        images = names.len(),
        lazy = s1_stats.pages_lazy,
        "prepared images written"
    );
    let prepared = read_images(&opts.images_dir, &names)?;
    // While the destination builds: the closing of the watch at S2's freeze then makes no
    // process (see `SyscallWatch::prepare_close`).
    if let Some(watch) = watch.as_mut() {
        watch.prepare_close();
    }

    // The thread that brings -D up to date once the tree runs at the destination, made
    // now, while the destination builds: a thread still starting at S2 would run its start
    // on the first CPU S2 leaves, in the way of the destination's first faults.
    let (to_updater, updates) = std::sync::mpsc::channel::<AfterSwitch>();
    let (served, serving) = std::sync::mpsc::channel::<()>();
    let (idled, idle) = std::sync::mpsc::channel();
    let updater = std::thread::Builder::new()
        .name("prepared-images".to_owned())
        .spawn(move || {
            // The destination's first faults are served from this process meanwhile, on a
            // machine of few CPUs: they go first, and so does anything else that waits.
            match tracee::taskinfo::idle_policy() {
                Ok(before) => {
                    let _ = idled.send(before);
                }
                Err(error) => tracing::debug!(%error, "-D is updated at normal priority"),
            }
            // Nothing comes when S2 fails: the main thread then keeps it all.
            if let Ok(work) = updates.recv() {
                // Not among the destination's first faults: writing -D keeps a CPU busy
                // that the restored tree may wake on.
                let _ = serving.recv_timeout(UPDATE_DELAY);
                work.run();
            }
        });
    let updater = match updater {
        Ok(handle) => Some((handle, idle)),
        Err(error) => {
            tracing::warn!(%error, "-D keeps the prepared images: no thread to update it");
            None
        }
    };

    // S2's allocations then fault in no fresh page inside the freeze (some 40 of them,
    // 2-3 µs each): touched now, while the tree runs and the destination gets ready.
    tracee::heap::warm(S2_HEAP);
    let ready = wait_ready(&listener, opts.lazy_connect_timeout, pid)?;
    let mut switch_stream = ready.switch;
    tracing::info!(hot_pages = ready.hot_pages, "the destination is ready");

    // S2: the delta. Any failure resumes the tree (dropped inside) and tells the
    // destination.
    let _shield = SignalShield::raise();
    let earlier = watch.as_mut().map(|watch| Earlier {
        state: &state,
        watch,
    });
    let switched = match switch_round(
        pid,
        opts,
        &prepared,
        ready.hot_pages,
        &mut switch_stream,
        earlier,
        held.as_mut(),
    ) {
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
        sent,
    } = switched;
    // Closed once the destination runs and its first fault is answered: not in S2, where
    // their close's IPIs slowed the reads (see `refresh::OpenCounters`).
    let counters = watch.as_mut().and_then(refresh::Watch::take_counters);
    let close_counters = move || {
        if let Some(counters) = counters {
            counters.close();
        }
    };
    // Where S2 kept S1's page images, S1's lazy pages are the ones to serve.
    let s1_lazy = held.as_ref().filter(|_| round.reused);
    let ranges = round
        .state
        .processes
        .iter()
        .map(|p| match s1_lazy {
            Some(h) => (p.pid, h.lazy_ranges().to_vec()),
            None => (p.pid, lazy::lazy_ranges(&p.plan)),
        })
        .collect();
    let stats = round.stats;
    let work = AfterSwitch {
        sent,
        dir: opts.images_dir.clone(),
        images: round.images,
        stats,
        changed,
        vanished,
        watch,
        state,
    };
    let update = move || {
        if let Err(unsent) = to_updater.send(work) {
            tracing::warn!("-D is updated here: its thread is gone");
            unsent.0.run();
        }
    };
    if opts.mode != DumpMode::Lazy {
        update();
        // No page to serve: the destination's word alone decides the source's end.
        let ended = await_destination(round.tree, switch_stream, opts, close_counters);
        // Its write protection goes with it (or comes off the process running on here).
        drop(held);
        join_updater(updater, served);
        ended?;
        return Ok(stats);
    }
    let link = SwitchLink {
        switch: switch_stream,
        daemon: ready.daemon,
        // Woken now, the thread would run before the daemon's first request on a machine
        // of few CPUs (even under SCHED_IDLE), and it waits for the serving anyway.
        after_first_faults: Some(Box::new(update)),
        after_first_answer: Some(Box::new(close_counters)),
    };
    let outcome = lazy::serve_prepared(round.tree, listener, ranges, opts, link);
    join_updater(updater, served);
    let outcome = outcome?;
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
        let (delta, vanished) = delta(&before, now, &[]);
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
    fn kept_images_neither_vanish_nor_cross() {
        let before = images(&[("pagemap-7.img", b"map"), ("pages-1.img", b"pages")]);
        let kept = ["pagemap-7.img".to_owned(), "pages-1.img".to_owned()];
        let (sent, vanished) = delta(&before, Images::new(), &kept);
        assert!(sent.is_empty() && vanished.is_empty());
        let (sent, vanished) = delta(&before, Images::new(), &kept[..1]);
        assert_eq!(vanished, ["pages-1.img"]);
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn an_unchanged_set_has_an_empty_delta() {
        let set = images(&[("core-7.img", b"regs"), ("pstree.img", b"tree")]);
        let (delta, vanished) = delta(&set, set.clone(), &[]);
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

    /// Threads rewriting memory while the main thread sleeps in short steps and writes a
    /// regular file (appending, at offsets, seeking): only allowed syscalls. With `mmap` as
    /// an argument, the main thread maps a page on each step too.
    const WORKER: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 512
static volatile uint64_t *region;
static volatile int started;

static void *writer(void *arg) {
    uint64_t seed = 0x9E3779B97F4A7C15ULL * ((uintptr_t)arg + 1);
    double acc = 1.0;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        /* Keeps changing values in the vector registers too. */
        acc = acc * 1.0000001 + (double)(seed & 7);
        region[(seed % PAGES) * 512 + (seed % 512)] += seed + (uint64_t)acc;
    }
    return NULL;
}

int main(int argc, char **argv) {
    int do_mmap = argc > 1 && !strcmp(argv[1], "mmap");
    /* What the test harness leaked is not the state under test. */
    close_range(3, ~0U, 0);
    region = mmap(NULL, PAGES * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int log = open("log.txt", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int data = open("data.bin", O_RDWR | O_CREAT, 0600);
    pthread_t t;
    for (uintptr_t i = 0; i < 3; i++)
        pthread_create(&t, NULL, writer, (void *)i);
    /* Ready once every thread is past its start (rseq, robust list: syscalls of its own). */
    while (started < 3)
        ;
    FILE *f = fopen("ready.tmp", "w");
    fputs("ready\n", f);
    fclose(f);
    rename("ready.tmp", "ready");
    char line[64];
    for (unsigned long n = 0;; n++) {
        int len = snprintf(line, sizeof line, "step %lu\n", n);
        write(log, line, (size_t)len);
        pwrite(data, &n, sizeof n, (off_t)((n % 64) * 8));
        lseek(data, (off_t)(n % 100), SEEK_SET);
        struct timespec ts = {0, 200 * 1000};
        nanosleep(&ts, NULL);
        if (do_mmap)
            mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
}
"#;

    /// The worker, compiled and started in its own directory; killed and reaped on drop.
    struct Worker {
        child: std::process::Child,
        dir: tempfile::TempDir,
    }

    impl Worker {
        fn start(args: &[&str]) -> Worker {
            let dir = tempfile::tempdir().expect("tempdir");
            let src = dir.path().join("worker.c");
            std::fs::write(&src, WORKER).expect("write the worker");
            let exe = dir.path().join("worker");
            let cc = std::process::Command::new("cc")
                .args(["-O1", "-pthread", "-o"])
                .arg(&exe)
                .arg(&src)
                .status()
                .expect("run cc");
            assert!(cc.success(), "cannot compile the worker");
            let child = std::process::Command::new(&exe)
                .args(args)
                .current_dir(dir.path())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start the worker");
            let start = Instant::now();
            while !dir.path().join("ready").exists() {
                assert!(start.elapsed() < Duration::from_secs(30), "never ready");
                std::thread::sleep(Duration::from_millis(5));
            }
            Worker { child, dir }
        }

        /// Waits until the worker has appended to its log since it was `len` bytes long.
        fn wait_progress(&self, len: u64) {
            let start = Instant::now();
            let log = self.dir.path().join("log.txt");
            while std::fs::metadata(&log).map_or(0, |m| m.len()) < len + 64 {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the worker is stuck"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn pid(&self) -> Pid {
            Pid::from_raw(i32::try_from(self.child.id()).expect("pid")).expect("pid")
        }
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The images of `state` (plans made as a round makes them), all but the clocks.
    fn encoded(mut state: TreeState, opts: &DumpOptions) -> Images {
        for process in &mut state.processes {
            let policies = full_policies(process, opts, None, false);
            process.plan = pages::plan(&process.pages, &policies);
        }
        let mut stats = DumpStats::default();
        let mut images = write::images_in_memory(&state, opts, &mut stats).expect("encode");
        let mut out = images.take_memory();
        out.remove("timens-0.img");
        out
    }

    /// A worker started with `args`, and the options of a lazy dump of it into a
    /// directory of its own (kept as long as the returned guard).
    fn lazy_dump_of(args: &[&str]) -> (Worker, tempfile::TempDir, DumpOptions) {
        let worker = Worker::start(args);
        let images_dir = tempfile::tempdir().expect("tempdir");
        let mut opts = DumpOptions::new(worker.pid().as_raw(), images_dir.path());
        opts.mode = DumpMode::Lazy;
        (worker, images_dir, opts)
    }

    /// S1 as a prepared dump does it: two freezes, the rest read while the tree runs.
    fn first_look(pid: Pid, opts: &DumpOptions) -> (TreeState, Result<refresh::Watch, String>) {
        let first = first_round(pid, opts).expect("S1");
        (first.state, first.watch)
    }

    #[test]
    fn the_light_second_look_gives_the_images_of_a_full_collection() {
        let (worker, _images_dir, opts) = lazy_dump_of(&[]);
        let pid = worker.pid();
        let (mut before, watch) = first_look(pid, &opts);
        let mut watch = watch.expect("the worker qualifies for a light S2");
        let log_file = |state: &TreeState| {
            state.processes[0]
                .files
                .files
                .iter()
                .filter_map(|f| f.reg.as_ref())
                .find(|r| r.name.ends_with("log.txt"))
                .map(|r| (r.pos, r.size))
        };
        let first_log = log_file(&before).expect("the log file is among the files");
        for round in 0..4 {
            worker.wait_progress(log_file(&before).and_then(|l| l.1).unwrap_or(0));
            // Every other round as S2 does it: with the reader made before the freeze
            // reading /proc on another thread.
            let reader = (round % 2 == 1)
                .then(|| refresh::Reader::start(&before, &watch).expect("the reader is made"));
            let mut tree = seize::freeze_tree(pid).expect("freeze again");
            let look = match reader {
                Some(reader) => refresh::look_again(&mut tree, &before, &watch, Some(reader)),
                None => {
                    refresh::verdict(&watch, &tree)
                        .unwrap_or_else(|why| panic!("round {round}: {why}"));
                    refresh::again(&mut tree, &before, &watch)
                }
            };
            let light = match look.expect("light look") {
                refresh::Refreshed::State(state) => state,
                refresh::Refreshed::Stale(why) => panic!("round {round}: stale: {why}"),
            };
            let log_now = log_file(&light).expect("the log file");
            assert!(
                log_now.0 > first_log.0,
                "round {round}: the log's position did not move: {log_now:?} {first_log:?}"
            );
            let full = collect::tree(&mut tree, &opts, collect::VmaSource::Smaps).expect("collect");
            let light = encoded(light, &opts);
            let full = encoded(full, &opts);
            assert_eq!(
                light.keys().collect::<Vec<_>>(),
                full.keys().collect::<Vec<_>>(),
                "round {round}"
            );
            for (name, bytes) in &full {
                assert!(
                    light.get(name) == Some(bytes),
                    "round {round}: {name} differs"
                );
            }
            // The full collection injected syscalls (the watch counts them): the light look
            // is off from here, so the next round starts from a fresh first look.
            release::finish_tree(tree, FinalState::Running).expect("release");
            let (state, again) = first_look(pid, &opts);
            before = state;
            watch = again.expect("the worker still qualifies");
        }
    }

    /// The light S2's two steps on a frozen 4-thread worker, many times over: reading
    /// again and encoding the images (median µs). A micro benchmark, not a test:
    /// `cargo test --release -p ckpt-dump --lib -- --ignored --nocapture s2_timing`.
    #[test]
    #[ignore]
    fn s2_timing() {
        let (worker, _images_dir, opts) = lazy_dump_of(&[]);
        let pid = worker.pid();
        let (before, watch) = first_look(pid, &opts);
        let watch = watch.expect("the worker qualifies for a light S2");
        let mut tree = seize::freeze_tree(pid).expect("freeze again");
        let (mut look, mut encode) = (Vec::new(), Vec::new());
        for _ in 0..500 {
            let start = Instant::now();
            let refresh::Refreshed::State(mut state) =
                refresh::again(&mut tree, &before, &watch).expect("light look")
            else {
                panic!("stale");
            };
            look.push(start.elapsed().as_micros());
            let start = Instant::now();
            for process in &mut state.processes {
                let policies = full_policies(process, &opts, None, false);
                process.plan = pages::plan(&process.pages, &policies);
            }
            let mut stats = DumpStats::default();
            let images = write::images_in_memory(&state, &opts, &mut stats).expect("encode");
            encode.push(start.elapsed().as_micros());
            drop(images);
        }
        look.sort_unstable();
        encode.sort_unstable();
        println!(
            "light S2 of a 4-thread process: read again {} µs, encode {} µs (medians of 500)",
            look[look.len() / 2],
            encode[encode.len() / 2]
        );
        release::finish_tree(tree, FinalState::Running).expect("release");
    }

    #[test]
    fn a_stopped_watch_vouches_for_nothing_but_the_light_look_still_reads() {
        let (worker, _images_dir, opts) = lazy_dump_of(&[]);
        let pid = worker.pid();
        let (before, watch) = first_look(pid, &opts);
        let mut watch = watch.expect("the worker qualifies for a light S2");
        let mut tree = seize::freeze_tree(pid).expect("freeze again");
        refresh::verdict(&watch, &tree).expect("nothing outside the allowlist yet");
        watch
            .take_counters()
            .expect("the counters are open")
            .close();
        let why = refresh::verdict(&watch, &tree).expect_err("a stopped watch");
        assert!(why.contains("stopped"), "{why}");
        // What the light look reads is held apart from the counters.
        match refresh::again(&mut tree, &before, &watch).expect("light look") {
            refresh::Refreshed::State(state) => assert_eq!(state.processes.len(), 1),
            refresh::Refreshed::Stale(why) => panic!("stale: {why}"),
        }
        release::finish_tree(tree, FinalState::Running).expect("release");
    }

    #[test]
    fn a_syscall_outside_the_allowlist_rules_out_the_light_look() {
        let (worker, _images_dir, opts) = lazy_dump_of(&["mmap"]);
        let pid = worker.pid();
        // S1 sees it when one falls between its freezes (most runs: the worker maps a page
        // every 200 µs or so); else the next freeze does.
        let (_, watch) = first_look(pid, &opts);
        let why = match watch {
            Err(why) => why,
            Ok(watch) => {
                std::thread::sleep(Duration::from_millis(30));
                let tree = seize::freeze_tree(pid).expect("freeze after S1");
                let why = refresh::verdict(&watch, &tree).expect_err("mmap was not seen after S1");
                release::finish_tree(tree, FinalState::Running).expect("release");
                why
            }
        };
        assert!(why.contains("outside the allowlist"), "{why}");
        // And the watch sees it at the next freeze, armed at the end of a single one.
        let counters = refresh::watch_before_freeze(pid);
        let mut tree = seize::freeze_tree(pid).expect("freeze");
        let state = collect::tree(&mut tree, &opts, collect::VmaSource::Smaps).expect("collect");
        let armed = counters.and_then(|counters| refresh::arm(&tree, counters));
        release::finish_tree(tree, FinalState::Running).expect("release");
        let watch = armed
            .and_then(|armed| armed.ready(&state))
            .expect("the worker qualifies for a light S2");
        std::thread::sleep(Duration::from_millis(30));
        let tree = seize::freeze_tree(pid).expect("freeze again");
        let why = refresh::verdict(&watch, &tree).expect_err("mmap was not seen");
        assert!(why.contains("outside the allowlist"), "{why}");
        release::finish_tree(tree, FinalState::Running).expect("release");
    }

    #[test]
    fn prepare_is_refused_where_unsupported() {
        let mut opts = DumpOptions::new(1, "img");
        opts.track_mem = true;
        opts.prev_images_dir = Some("../1".into());
        assert!(refusal(&opts).is_none(), "the end of a pre-copy");
        opts.final_state = crate::FinalState::Running;
        assert!(refusal(&opts).is_some(), "running at both ends");
        opts.final_state = crate::FinalState::Killed;
        opts.mode = DumpMode::PreDump;
        assert!(refusal(&opts).is_some(), "a pre-dump");
        opts.mode = DumpMode::Lazy;
        assert!(refusal(&opts).is_none(), "assisted post-copy");
        opts.track_mem = false;
        assert!(refusal(&opts).is_some(), "a round but no tracking");
        opts.prev_images_dir = None;
        assert!(refusal(&opts).is_none());
        opts.page_server = Some("127.0.0.1:1".parse().expect("an address"));
        assert!(refusal(&opts).is_some(), "a page server");
    }
}
