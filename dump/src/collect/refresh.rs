//! A light second look at a tree read once already ([`super::tree`]), for the final round
//! of a prepared dump, inside the down time: only what can have changed is read again, and
//! the images come out byte for byte as a full collection's would.
//!
//! What can change is bounded by watching the tree between the two looks: every thread
//! counts, in the kernel, the syscalls it enters outside [`ALLOWED_SYSCALLS`] (a
//! `tracee::SyscallWatch`, opened before the first freeze: [`watch_before_freeze`]); the
//! counts when the first look ends, the tree still frozen, are the baseline ([`arm`]). A
//! first look made of several freezes compares the counts across them
//! ([`Counters::counts`]: what grows between two freezes rules the light look out) and
//! arms at the end of its last one (the prepared dump's module documentation has the
//! argument). At
//! the second freeze the counts are read first ([`verdict`]): any count above its
//! baseline, a thread more or less, a zombie, or a counter that cannot be read, and the
//! caller collects in full.
//!
//! The allowed syscalls change nothing the images hold but what is read again here:
//! - `read`, `write`, `pread64`, `pwrite64`, `readv`, `writev`, `preadv(2)`, `pwritev(2)`,
//!   `lseek`: an fd's position, and a regular file's size (and contents, hence its build-id
//!   when it is open for writing): read again ([`super::files::again`]). [`Armed::ready`]
//!   admits only trees whose fds are regular files, directories, the memory devices that
//!   hold nothing (null, zero, full, random, urandom) or terminals, on plain filesystems:
//!   nothing with queued data, and nothing whose writes reach into a process (`/proc`,
//!   `/sys`...).
//! - sleeping and waiting (`nanosleep`, `clock_nanosleep`, `pause`, `sched_yield`, `futex`,
//!   `poll`/`ppoll`/`select`/`pselect6` on such fds, `restart_syscall`), reading clocks and
//!   ids and statistics (`clock_gettime`, `clock_getres`, `gettimeofday`, `time`, `getpid`,
//!   `gettid`, `getppid`, `get*id`, `getgroups`, `getrusage`, `times`, `getcpu`, `getrandom`,
//!   `uname`, `sysinfo`, `getpgrp`, `getpgid`, `getsid`, `getpriority`, `getrlimit`,
//!   `sched_getaffinity`, `sched_getscheduler`, `sched_getparam`, `capget`, `getcwd`,
//!   `getitimer`), reading file metadata (`fstat`, `newfstatat`, `statx`, `access`,
//!   `faccessat(2)`, `readlink(at)`): nothing of the tree. A syscall interrupted by the freeze
//!   re-enters as itself or as `restart_syscall`.
//! - `rt_sigprocmask`, `rt_sigpending`, `rt_sigsuspend`, `rt_sigtimedwait` (and the masks of
//!   `ppoll`/`pselect6`): the signal mask and the pending signals, read again.
//!
//! What changes with no syscall at all, and is read again too: registers and the xsave area
//! (`wrfsbase`, `wrpkru` included), pending signals (sent from outside), the stop state, the
//! pages present (faults) and the rseq critical section pointer (plain memory), the stack
//! VMA growing by a fault (the maps are compared: any change and the second look gives up),
//! and what other processes may change from outside: scheduling, affinity, timer slack, I/O
//! priority, rlimits, `oom_score_adj`, the process group, the files' names, sizes and modes.
//! A handled signal delivered meanwhile changes registers, stack, mask and pending signals
//! (read again); a `SA_RESETHAND` disposition or an alternate signal stack
//! (`SS_AUTODISARM`, `SS_ONSTACK`) would change more: [`Armed::ready`] refuses trees with
//! either, and trees with an armed interval timer or any POSIX timer.
//!
//! Everything else is kept from the first look: credentials, seccomp, namespaces and ids,
//! dispositions, robust list, tid address, personality, `brk`, dumpable, THP and MDWE
//! flags, membarrier registrations, the sigaltstack, the VMAs and the file table, which
//! only a syscall outside the list (or an exec, a clone, an exit) can change.
//!
//! What the watch cannot see: a 64-bit thread making a 32-bit syscall with `int $0x80`,
//! whose i386 number the tracepoint shows as if it were an x86_64 one.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc};

use images_format::pb::TaskCoreEntry;
use images_format::vma::VmaStatus;
use tracee::proc::{self, ProcError};
use tracee::syscall_watch::Counts;
use tracee::{Pid, SeizedTree, SyscallWatch, Tid};

use super::{
    files, memory, read_i32_file, rlimits, signals, threads, CollectError, ProcessState, TreeState,
    TASK_ALIVE, TASK_STOPPED,
};

/// The x86_64 syscalls that may run between the two looks (see the module documentation).
pub const ALLOWED_SYSCALLS: &[(u32, &str)] = &[
    (0, "read"),
    (1, "write"),
    (4, "stat"),
    (5, "fstat"),
    (6, "lstat"),
    (7, "poll"),
    (8, "lseek"),
    (14, "rt_sigprocmask"),
    (17, "pread64"),
    (18, "pwrite64"),
    (19, "readv"),
    (20, "writev"),
    (21, "access"),
    (23, "select"),
    (24, "sched_yield"),
    (34, "pause"),
    (35, "nanosleep"),
    (36, "getitimer"),
    (39, "getpid"),
    (63, "uname"),
    (79, "getcwd"),
    (89, "readlink"),
    (96, "gettimeofday"),
    (97, "getrlimit"),
    (98, "getrusage"),
    (99, "sysinfo"),
    (100, "times"),
    (102, "getuid"),
    (104, "getgid"),
    (107, "geteuid"),
    (108, "getegid"),
    (110, "getppid"),
    (111, "getpgrp"),
    (115, "getgroups"),
    (118, "getresuid"),
    (120, "getresgid"),
    (121, "getpgid"),
    (124, "getsid"),
    (125, "capget"),
    (127, "rt_sigpending"),
    (128, "rt_sigtimedwait"),
    (130, "rt_sigsuspend"),
    (140, "getpriority"),
    (143, "sched_getparam"),
    (145, "sched_getscheduler"),
    (186, "gettid"),
    (201, "time"),
    (202, "futex"),
    (204, "sched_getaffinity"),
    (219, "restart_syscall"),
    (228, "clock_gettime"),
    (229, "clock_getres"),
    (230, "clock_nanosleep"),
    (262, "newfstatat"),
    (267, "readlinkat"),
    (269, "faccessat"),
    (270, "pselect6"),
    (271, "ppoll"),
    (295, "preadv"),
    (296, "pwritev"),
    (309, "getcpu"),
    (318, "getrandom"),
    (327, "preadv2"),
    (328, "pwritev2"),
    (332, "statx"),
    (439, "faccessat2"),
];

/// `SA_RESETHAND`: the disposition goes back to the default when the signal is delivered.
const SA_RESETHAND: u64 = 0x8000_0000;
/// `SS_DISABLE`: the thread has no alternate signal stack.
const SS_DISABLE: u32 = 2;

/// The counters opened before the first look ([`watch_before_freeze`]).
#[derive(Debug)]
pub struct Counters {
    watch: SyscallWatch,
}

/// The watch, set up at the end of the first look.
#[derive(Debug)]
pub struct Watch {
    /// `None` once taken out ([`Watch::take_counters`]).
    watch: Option<SyscallWatch>,
    /// The counts when the first look ended: its own injected syscalls count.
    baseline: Counts,
    held: Arc<Held>,
    /// Every process's threads at the first look, in freeze order.
    threads: Vec<(Pid, Vec<Tid>)>,
}

impl Watch {
    /// Makes the closer of [`OpenCounters::close`] ahead of time (see
    /// [`SyscallWatch::prepare_close`]).
    pub fn prepare_close(&mut self) {
        if let Some(watch) = self.watch.as_mut() {
            watch.prepare_close();
        }
    }

    /// Takes the counters out of the watch, for the caller to close when closing them
    /// delays nothing ([`OpenCounters::close`]); the handles the light look reads stay.
    /// A later [`verdict`] rules the light look out.
    pub fn take_counters(&mut self) -> Option<OpenCounters> {
        self.watch.take().map(OpenCounters)
    }
}

/// A watch's counters, taken out of it once its last [`verdict`] is in: they vouch for
/// nothing more, and the tracepoint they keep on slows every syscall of the machine (by a
/// third for a `getpid` loop even with the counters stopped, `PERF_EVENT_IOC_DISABLE`, but
/// open, measured here), which a program restored on this machine pays until they close.
/// Closing the last of them unpatches the kernel's syscall entry: some ten IPIs to every
/// other CPU, which took 150-190 µs from the final freeze's reads on a machine of two
/// CPUs. So a prepared dump closes them once the destination's first fault is answered.
#[derive(Debug)]
pub struct OpenCounters(SyscallWatch);

impl OpenCounters {
    /// Closes the counters, detached (see [`SyscallWatch::close_detached`]): the process
    /// that closes the last of them was made ahead of time on our CPUs, and runs there.
    pub fn close(self) {
        self.0.close_detached();
    }
}

/// Every thread of the tree under `root` now, from `/proc` (the tree runs).
fn threads_now(root: Pid) -> Result<Vec<Tid>, String> {
    let mut tids = Vec::new();
    let mut pids = vec![root];
    while let Some(pid) = pids.pop() {
        let threads = proc::task::list_tids(pid).map_err(|e| error_chain(&e))?;
        for &tid in &threads {
            // A child that is gone already is simply not there.
            if let Ok(children) = proc::task::children_of_thread(pid, tid) {
                pids.extend(children);
            }
        }
        tids.extend(threads);
    }
    Ok(tids)
}

/// Starts counting the syscalls outside [`ALLOWED_SYSCALLS`] of every thread of the tree
/// under `root`, before the first look freezes it. Opening the first counter of the
/// tracepoint switches it on for the whole machine (milliseconds): done while the tree
/// still runs, it costs the program nothing. What the tree does between now and the freeze
/// counts too, which can only rule the light look out (a thread born meanwhile is born by
/// a counted `clone`, and then has no counter: [`arm`] sees that).
pub fn watch_before_freeze(root: Pid) -> Result<Counters, String> {
    let start = std::time::Instant::now();
    let tids = threads_now(root)?;
    let allowed: Vec<u32> = ALLOWED_SYSCALLS.iter().map(|(nr, _)| *nr).collect();
    let watch = SyscallWatch::open(&tids, &allowed).map_err(|e| error_chain(&e))?;
    tracing::info!(
        threads = tids.len(),
        per_cpu = watch.per_cpu(),
        open_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
        "syscall watch opened"
    );
    Ok(Counters { watch })
}

impl Counters {
    /// Every watched thread's count now: compared across the freezes of one look (see
    /// [`arm`]), what grows between them is the tree's own doing.
    pub fn counts(&self) -> Result<Counts, String> {
        self.watch.counts().map_err(|e| error_chain(&e))
    }
}

fn threads_of(tree: &SeizedTree) -> Vec<(Pid, Vec<Tid>)> {
    tree.processes().map(|p| (p.pid(), p.tids())).collect()
}

/// Why the state of `state` rules out a second look lighter than a full collection.
fn fit(state: &TreeState) -> Result<(), String> {
    if let Some(zombie) = state.zombies.first() {
        return Err(format!("pid {} is a zombie", zombie.pid));
    }
    for process in &state.processes {
        let pid = process.pid;
        let tc = process
            .threads
            .first()
            .and_then(|t| t.core.tc.as_ref())
            .ok_or_else(|| format!("pid {pid} has no task core"))?;
        if let Some(timers) = &tc.timers {
            let armed = |t: &images_format::pb::ItimerEntry| {
                t.isec != 0 || t.iusec != 0 || t.vsec != 0 || t.vusec != 0
            };
            if !timers.posix.is_empty() {
                return Err(format!("pid {pid} has POSIX timers"));
            }
            if [&timers.real, &timers.virt, &timers.prof]
                .into_iter()
                .any(armed)
            {
                return Err(format!("pid {pid} has an interval timer armed"));
            }
        }
        if let Some(sig) = tc
            .sigactions
            .iter()
            .position(|sa| sa.flags & SA_RESETHAND != 0)
        {
            return Err(format!("pid {pid}: signal {} is SA_RESETHAND", sig + 1));
        }
        for thread in &process.threads {
            let sas = thread
                .core
                .thread_core
                .as_ref()
                .and_then(|tc| tc.sas.as_ref());
            if sas.is_some_and(|sas| sas.ss_flags & SS_DISABLE == 0) {
                return Err(format!("tid {} has an alternate signal stack", thread.tid));
            }
        }
        files::again::fit(process)?;
    }
    Ok(())
}

/// The counters with their baseline, taken at the end of the first look.
#[derive(Debug)]
pub struct Armed {
    watch: SyscallWatch,
    baseline: Counts,
    threads: Vec<(Pid, Vec<Tid>)>,
}

/// Ends the first look at `tree`, still frozen: takes the counts of `counters` (opened
/// before the freeze) now as the baseline the second round compares with (the first look's
/// own injected syscalls count). Microseconds: the rest of the setup ([`Armed::ready`])
/// waits until the tree runs again. `Err` says why the light look is ruled out.
pub fn arm(tree: &SeizedTree, counters: Counters) -> Result<Armed, String> {
    let threads = threads_of(tree);
    let mut watched: Vec<Tid> = counters.watch.tids().collect();
    let mut frozen: Vec<Tid> = threads
        .iter()
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    watched.sort_unstable();
    frozen.sort_unstable();
    if watched != frozen {
        return Err("threads came or went while the counters were opened".to_owned());
    }
    let baseline = counters.watch.counts().map_err(|e| error_chain(&e))?;
    Ok(Armed {
        watch: counters.watch,
        baseline,
        threads,
    })
}

impl Armed {
    /// Whether the tree, whose first look gave `state`, qualifies for a light second look;
    /// if so, takes the handles on its files and `/proc` files that look reads. Done once
    /// the tree runs again: what it looks at (the files behind the fds, the threads' `/proc`
    /// files) stays the same unless a counted syscall changes it.
    pub fn ready(self, state: &TreeState) -> Result<Watch, String> {
        fit(state)?;
        Ok(Watch {
            watch: Some(self.watch),
            baseline: self.baseline,
            held: Arc::new(Held::take(state)),
            threads: self.threads,
        })
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the tree, frozen again, may be looked at lightly: no thread made a syscall
/// outside the list, and the tree has the very threads it had. Read first thing after the
/// freeze. `Err` says why not.
pub fn verdict(watch: &Watch, tree: &SeizedTree) -> Result<(), String> {
    let counts = watch
        .watch
        .as_ref()
        .ok_or("the syscall watch was stopped")?
        .counts()
        .map_err(|e| error_chain(&e))?;
    if counts != watch.baseline {
        let n = counts.since(&watch.baseline);
        return Err(format!(
            "the tree made {n} syscall(s) outside the allowlist"
        ));
    }
    if let Some((pid, _)) = tree.zombies().first() {
        return Err(format!("pid {pid} is a zombie now"));
    }
    if threads_of(tree) != watch.threads {
        return Err("the tree's processes or threads changed".to_owned());
    }
    Ok(())
}

/// `/proc` files of the tree held open from the first look: read again from their start
/// they show the present (a `seq_file` starts over at offset 0), without a walk of `/proc`
/// paths each time. Best effort: what is not held is read by path.
#[derive(Debug, Default)]
struct Held {
    proc_files: HashMap<String, OwnedFd>,
    files: files::again::Held,
}

impl Held {
    fn maps(pid: Pid) -> String {
        format!("/proc/{pid}/maps")
    }

    fn stat(pid: Pid) -> String {
        format!("/proc/{pid}/stat")
    }

    fn oom(pid: Pid) -> String {
        format!("/proc/{pid}/oom_score_adj")
    }

    fn slack(tid: Tid) -> String {
        format!("/proc/{tid}/timerslack_ns")
    }

    fn take(state: &TreeState) -> Held {
        let mut paths = Vec::new();
        for process in &state.processes {
            let pid = process.pid;
            paths.extend([Held::maps(pid), Held::stat(pid), Held::oom(pid)]);
            paths.extend(process.threads.iter().map(|t| Held::slack(t.tid)));
        }
        let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC;
        let proc_files = paths
            .into_iter()
            .filter_map(|path| {
                let fd = rustix::fs::open(&path, flags, rustix::fs::Mode::empty()).ok()?;
                Some((path, fd))
            })
            .collect();
        Held {
            proc_files,
            files: files::again::hold(&state.processes),
        }
    }

    /// The whole text of the held file `path`, read from its start; `None` if not held or
    /// unreadable.
    fn read(&self, path: String) -> Option<String> {
        let fd = self.proc_files.get(&path)?;
        let mut text = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let at = u64::try_from(text.len()).ok()?;
            match rustix::io::pread(fd, &mut chunk, at) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(chunk.get(..n)?),
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return None,
            }
        }
        String::from_utf8(text).ok()
    }
}

/// The result of a second look.
#[derive(Debug)]
pub enum Refreshed {
    /// The tree's state now.
    State(TreeState),
    /// Something the light look does not read again changed: collect in full.
    Stale(String),
}

fn proc_err(pid: Pid, what: &'static str) -> impl FnOnce(ProcError) -> CollectError {
    move |source| CollectError::Proc { pid, what, source }
}

/// Reads again what may have changed in the frozen `tree` since `before` was read of it
/// (with [`verdict`] saying it may be read lightly of `watch`, from [`Armed::ready`]), and
/// returns the state a full collection would give. The page plans are left
/// to the caller, as after [`super::tree`].
pub fn again(
    tree: &mut SeizedTree,
    before: &TreeState,
    watch: &Watch,
) -> Result<Refreshed, CollectError> {
    self::tree(tree, before, &watch.held, || {
        unseized_all(before, &watch.held)
    })
}

/// What [`look_again`] reads without ptrace, read of the running tree and dropped (see
/// `prepare::rehearse`).
pub fn rehearse(before: &TreeState, watch: &Watch) {
    let mut processes = before.processes.clone();
    let _ = files::again::refresh(&mut processes, &watch.held.files);
}

/// The final freeze's look at `tree`: the [`verdict`] (this freeze is the last the
/// counters vouch for: the caller closes them, see [`OpenCounters`]), then, if the verdict
/// allows, [`again`], with what needs no ptrace read meanwhile by `reader` (if any) on another
/// CPU, while this thread reads the registers and the files. `Stale` says why the light
/// look was ruled out.
pub fn look_again(
    tree: &mut SeizedTree,
    before: &TreeState,
    watch: &Watch,
    reader: Option<Reader>,
) -> Result<Refreshed, CollectError> {
    if let Some(reader) = &reader {
        reader.go();
    }
    if let Err(why) = verdict(watch, tree) {
        return Ok(Refreshed::Stale(why));
    }
    let held = &watch.held;
    self::tree(tree, before, held, || {
        reader
            .and_then(Reader::wait)
            .unwrap_or_else(|| unseized_all(before, held))
    })
}

/// A thread made before the final freeze, while the tree runs and making it costs the
/// program nothing, that reads for [`look_again`] what needs no ptrace (maps, stat, page
/// tables, limits) once the tree is frozen. It runs on a CPU other than its maker's: the
/// one the frozen tree leaves idle, on a machine of two.
pub struct Reader {
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<UnseizedAll>,
}

impl Reader {
    /// Makes the thread, for the tree whose first look gave `before`; `None` if it cannot
    /// be made (the look then reads it all on the caller's thread).
    pub fn start(before: &TreeState, watch: &Watch) -> Option<Reader> {
        let shown: Vec<Shown> = before.processes.iter().map(Shown::of).collect();
        let held = Arc::clone(&watch.held);
        let elsewhere = tracee::cpu::online_elsewhere();
        let (go, start) = mpsc::channel::<()>();
        let (result, done) = mpsc::channel();
        let (settled, ready) = mpsc::channel::<()>();
        let made = std::thread::Builder::new()
            .name("light-look".to_owned())
            .spawn(move || {
                // As its maker: ahead of every normal task while the tree is frozen. Raised
                // first: moved onto the busy program's CPU at the normal policy, it would
                // wait there for the program's time slice to end (milliseconds).
                let _urgent = tracee::taskinfo::RealTime::raise();
                let me = tracee::taskinfo::this_thread().filter(|_| !elsewhere.is_empty());
                if let Some(Err(error)) =
                    me.map(|me| tracee::taskinfo::set_affinity(me, &elsewhere))
                {
                    tracing::debug!(%error, "the light look's reader stays where it was made");
                }
                // glibc gives a thread its own arena at its first allocation, an mmap of
                // the process's address space made under the lock the other thread's page
                // faults take: made, and its pages touched, before the freeze.
                tracee::heap::warm(READER_HEAP);
                // Its reads once over while the tree runs, for warm caches in the freeze.
                for process in &shown {
                    let _ = unseized_again(process, &held);
                }
                drop(settled);
                if start.recv().is_err() {
                    return;
                }
                let read = shown.iter().map(|s| unseized_again(s, &held)).collect();
                let _ = result.send(read);
            });
        match made {
            Ok(_) => {
                // Settled on its CPU before the freeze: made here, it would otherwise first
                // run on ours, once we sleep in the freeze, and then move.
                let _ = ready.recv();
                Some(Reader { go, done })
            }
            Err(error) => {
                tracing::debug!(%error, "no thread for the light look's reads");
                None
            }
        }
    }

    /// The tree is frozen: read.
    fn go(&self) {
        let _ = self.go.send(());
    }

    /// What was read; `None` if the thread is gone. Waited for awake a while: the reader
    /// is about done when we get here, and a thread that sleeps is woken late on a
    /// virtual machine, where waking an idle CPU takes tens of microseconds.
    fn wait(self) -> Option<UnseizedAll> {
        let awake_until = std::time::Instant::now() + SPIN_FOR_READER;
        while std::time::Instant::now() < awake_until {
            match self.done.try_recv() {
                Ok(read) => return Some(read),
                Err(mpsc::TryRecvError::Disconnected) => return None,
                Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        self.done.recv().ok()
    }
}

/// Heap the reader touches before the freeze: what the 16 blocks of 8 KiB it touched
/// before the tools kept freed memory came to.
const READER_HEAP: usize = 128 << 10;

/// How long [`Reader::wait`] waits awake before it sleeps.
const SPIN_FOR_READER: std::time::Duration = std::time::Duration::from_micros(300);

/// What [`unseized_again`] read of each process of the tree, in order.
type UnseizedAll = Result<Vec<Result<Unseized, String>>, CollectError>;

fn unseized_all(before: &TreeState, held: &Held) -> UnseizedAll {
    before
        .processes
        .iter()
        .map(|process| unseized_again(&Shown::of(process), held))
        .collect()
}

/// What [`unseized_again`] compares with, of a process's first look.
struct Shown {
    pid: Pid,
    maps: Vec<proc::maps::MapsEntry>,
    scans: Vec<super::memory::VmaScan>,
    guards: Vec<images_format::pb::VmaEntry>,
}

impl Shown {
    fn of(process: &ProcessState) -> Shown {
        Shown {
            pid: process.pid,
            maps: process.maps.clone(),
            scans: process.scans.clone(),
            guards: process
                .mm
                .vmas
                .iter()
                .filter(|v| VmaStatus::from_bits_retain(v.status).contains(VmaStatus::GUARD))
                .cloned()
                .collect(),
        }
    }
}

// A span at the info level costs the frozen tree microseconds to make: debug only.
#[tracing::instrument(level = "debug", skip_all, fields(pid = %tree.root().pid()))]
fn tree(
    tree: &mut SeizedTree,
    before: &TreeState,
    held: &Held,
    unseized: impl FnOnce() -> UnseizedAll,
) -> Result<Refreshed, CollectError> {
    let mut seized = Vec::with_capacity(before.processes.len());
    for process in &before.processes {
        match seized_again(tree, process, held)? {
            Ok(now) => seized.push(now),
            Err(why) => return Ok(Refreshed::Stale(why)),
        }
    }
    let mut processes = before.processes.clone();
    if let Err(why) = files::again::refresh(&mut processes, &held.files)? {
        return Ok(Refreshed::Stale(why));
    }
    let unseized = unseized()?;
    for ((process, unseized), seized) in processes.iter_mut().zip(unseized).zip(seized) {
        let unseized = match unseized {
            Ok(unseized) => unseized,
            Err(why) => return Ok(Refreshed::Stale(why)),
        };
        if let Err(why) = merge(process, unseized, seized) {
            return Ok(Refreshed::Stale(why));
        }
    }
    Ok(Refreshed::State(TreeState {
        processes,
        zombies: Vec::new(),
        // A statistic of the first look (copy-on-write sharing), not in any image.
        cow_shared_bytes: before.cow_shared_bytes,
    }))
}

/// What the light look reads of a process without ptrace.
struct Unseized {
    stat: proc::stat::Stat,
    pages: Vec<super::PageRun>,
    rlimits: images_format::pb::TaskRlimitsEntry,
    oom_score_adj: Option<i32>,
}

/// Reads again what `/proc` and the page tables show of the process of `shown`; `Err(why)`
/// inside if its VMAs or guard regions changed.
fn unseized_again(shown: &Shown, held: &Held) -> Result<Result<Unseized, String>, CollectError> {
    let pid = shown.pid;
    let maps = match held
        .read(Held::maps(pid))
        .and_then(|t| proc::maps::parse(&t).ok())
    {
        Some(maps) => maps,
        None => proc::maps::read(pid).map_err(proc_err(pid, "maps"))?,
    };
    if maps != shown.maps {
        return Ok(Err(format!("pid {pid}: the VMAs changed")));
    }
    let stat = match held
        .read(Held::stat(pid))
        .and_then(|t| proc::stat::parse(&t).ok())
    {
        Some(stat) => stat,
        None => proc::stat::read(pid).map_err(proc_err(pid, "stat"))?,
    };
    let (pages, guards) = memory::rescan(pid, &shown.scans)?;
    if guards != shown.guards {
        return Ok(Err(format!("pid {pid}: the guard regions changed")));
    }
    let rlimits = match tracee::taskinfo::prlimits(pid) {
        Ok(limits) => super::rlimits_entry(limits),
        Err(_) => rlimits(pid)?,
    };
    let oom_score_adj = match held.read(Held::oom(pid)) {
        Some(text) => text.trim().parse().ok(),
        None => read_i32_file(pid, "oom_score_adj"),
    };
    Ok(Ok(Unseized {
        stat,
        pages,
        rlimits,
        oom_score_adj,
    }))
}

/// What the light look reads of a process through ptrace.
struct Seized {
    signals: super::SignalState,
    threads: Vec<threads::ThreadState>,
}

/// Reads again the signal state and the threads of `process` in the frozen `tree`;
/// `Err(why)` inside if they cannot be followed.
fn seized_again(
    tree: &mut SeizedTree,
    process: &ProcessState,
    held: &Held,
) -> Result<Result<Seized, String>, CollectError> {
    let pid = process.pid;
    let Some(seized) = tree.process_mut(pid) else {
        return Ok(Err(format!("pid {pid} is not in the tree")));
    };
    let Some(leader) = seized.leader_mut() else {
        return Ok(Err(format!("pid {pid} has no threads")));
    };
    let signals = super::signal_state(leader)?;
    let mut earlier: HashMap<Tid, &threads::ThreadState> =
        process.threads.iter().map(|t| (t.tid, t)).collect();
    let mut now = Vec::with_capacity(process.threads.len());
    for thread in seized.threads() {
        let Some(before) = earlier.remove(&thread.tid()) else {
            return Ok(Err(format!("tid {} is new", thread.tid())));
        };
        let slack = held
            .read(Held::slack(thread.tid()))
            .and_then(|t| t.trim().parse().ok());
        match threads::refresh(thread, before, slack)? {
            Some(state) => now.push(state),
            None => {
                return Ok(Err(format!(
                    "tid {}: its timer slack cannot be read from outside",
                    thread.tid()
                )))
            }
        }
    }
    if !earlier.is_empty() {
        return Ok(Err(format!("pid {pid} lost threads")));
    }
    Ok(Ok(Seized {
        signals,
        threads: now,
    }))
}

/// Brings `process` up to date from what was read of it again; `Err(why)` if it cannot be.
fn merge(process: &mut ProcessState, unseized: Unseized, seized: Seized) -> Result<(), String> {
    let pid = process.pid;
    let Unseized {
        stat,
        pages,
        rlimits,
        oom_score_adj,
    } = unseized;
    let Seized {
        signals:
            super::SignalState {
                stopped,
                stop_signo,
                leader_mask,
                shared_pending,
            },
        threads: mut now,
    } = seized;
    let Some(old_tc) = process.threads.first().and_then(|t| t.core.tc.clone()) else {
        return Err(format!("pid {pid} has no task core"));
    };
    let tc = TaskCoreEntry {
        task_state: if stopped { TASK_STOPPED } else { TASK_ALIVE },
        flags: stat.flags,
        blk_sigset: leader_mask.0,
        comm: stat.comm.clone(),
        rlimits: Some(rlimits),
        signals_s: Some(signals::signal_queue(&shared_pending)),
        oom_score_adj,
        stop_signo,
        ..old_tc
    };
    if let Some(leader) = now.first_mut() {
        if let Some(thread_core) = leader.core.thread_core.as_mut() {
            thread_core.comm = Some(stat.comm.clone());
        }
        leader.core.tc = Some(tc);
    }
    super::mm_from_stat(&mut process.mm, &stat);
    process.pstree.pgid = u32::try_from(stat.pgrp).unwrap_or(0);
    process.pstree.sid = u32::try_from(stat.session).unwrap_or(0);
    process.pstree.threads = now
        .iter()
        .map(|t| u32::try_from(t.tid.as_raw()).unwrap_or(0))
        .collect();
    process.threads = now;
    process.plan = crate::pages::plan(&pages, &[]);
    process.pages = pages;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_is_sorted_unique_and_leaves_out_what_changes_state() {
        let numbers: Vec<u32> = ALLOWED_SYSCALLS.iter().map(|(nr, _)| *nr).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(numbers, sorted);
        // rt_sigreturn, mmap, mprotect, munmap, brk, rt_sigaction, ioctl, madvise, clone,
        // fork, execve, exit, fcntl, sigaltstack, prctl, arch_prctl, exit_group, clone3.
        for forbidden in [
            15, 9, 10, 11, 12, 13, 16, 28, 56, 57, 59, 60, 72, 131, 157, 158, 231, 435,
        ] {
            assert!(!numbers.contains(&forbidden), "{forbidden} is allowed");
        }
    }
}
