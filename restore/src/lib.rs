//! Restore a process tree from CRIU-format images, with no code injected into it.
//!
//! read → plan → objects → fork → rebuild → resume. [`plan::plan_tree`] is a pure
//! function from images to operations (one [`plan::Plan`] per live process, parent
//! links, sessions, groups, shared tables, zombies); everything after it follows the plan
//! through `tracee`:
//! - [`objects`]: every open file description of the tree is created here, in
//!   ckpt-restore, before anything is forked, so that descriptions shared between
//!   processes come out shared;
//! - [`fork`]: ckpt-restore forks the root; each process sets its session or group,
//!   forks its children (with `CLONE_FILES`/`CLONE_FS` where shared), places its fds
//!   ([`child`]) and waits for our tracer;
//! - rebuild: ckpt-restore seizes every process and rebuilds each in tree order
//!   (memory, threads, state), joins the groups led by others, lets the zombies die with
//!   their status, then resumes everything at once.
//!
//! A prepared post-copy ([`prepared`]) splits this at the resume: the tree is built from
//! images taken while the source ran on and held stopped (`build` with `hold`), the
//! source's final changes are put into it, and only then does it run (`finish`).
#![forbid(unsafe_code)]

pub mod child;
pub mod creds;
pub mod elf;
pub mod extras;
pub mod files;
pub mod fork;
pub mod lazy;
pub mod locks;
pub mod memory;
pub mod objects;
pub mod plan;
pub mod prepared;
pub mod read;
pub mod remote;
pub mod resume;
pub mod shmem;
pub mod signals;
pub mod sockets;
pub mod stats;
pub mod threads;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use images_format::dir::ImageDir;
use images_format::error::ImageError;
use tracee::{Pid, SeizeOptions, Tracee};

pub use crate::memory::FillMethod;

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub images_dir: PathBuf,
    /// Return once the process runs, instead of waiting for it to end.
    pub detached: bool,
    pub pidfile: Option<PathBuf>,
    /// The process was a shell job: it keeps our session and process group.
    pub shell_job: bool,
    /// How pages are written (for measurements; the default is the fastest).
    pub fill: FillMethod,
    /// Leave lazy pages missing and hand a userfaultfd to `ckpt-lazy-pages`.
    pub lazy_pages: bool,
    /// Where `ckpt-lazy-pages` listens (`lazy-pages.socket`); the images directory if unset.
    pub work_dir: Option<PathBuf>,
    /// Restore into a new pid namespace, whose init is a reaper of ours: the image's
    /// pids are then free whatever the host runs.
    pub new_pid_ns: bool,
    /// With `lazy_pages`: install the pages each thread touches first (instruction and
    /// stack pointers, what registers point to) before the tree resumes.
    pub lazy_prefetch_hot: bool,
    /// `--inherit-fd fd[N]:ID`: our fd N stands for object ID of the images.
    pub inherit_fds: Vec<files::InheritFd>,
}

/// How a restore ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The restored process runs on its own.
    Detached { pid: Pid },
    /// The restored process ran and exited with `code`.
    Exited { pid: Pid, code: i32 },
    /// The restored process was killed by `signal`.
    Killed { pid: Pid, signal: i32 },
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("opening the images")]
    Images(#[from] ImageError),
    #[error("images directory {path}")]
    ImagesDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the images")]
    Read(#[from] read::ReadError),
    #[error("planning the restore")]
    Plan(#[from] plan::PlanError),
    #[error("planning the restore of the tree")]
    TreePlan(#[from] plan::TreePlanError),
    #[error("creating the open files of the tree")]
    Objects(#[from] objects::ObjectsError),
    #[error("restoring file locks")]
    Locks(#[from] locks::LockError),
    #[error("image pid {pid}: death signal and process group")]
    Links {
        pid: i32,
        #[source]
        source: remote::RemoteError,
    },
    #[error("pid {pid}: the zombie did not die when told to")]
    Zombie { pid: Pid },
    #[error("recreating deleted files")]
    Files(#[from] files::FilesError),
    #[error("restore")]
    Fork(#[from] fork::ForkError),
    #[error("rebuilding memory")]
    Memory(#[from] memory::MemoryRestoreError),
    #[error("restoring signals and timers")]
    Signals(#[from] signals::SignalsError),
    #[error("restoring thread state")]
    Threads(#[from] threads::ThreadStateError),
    #[error("creating threads")]
    CreateThread(#[from] threads::CreateThreadError),
    #[error("restoring credentials")]
    Creds(#[from] creds::CredsError),
    #[error("handing lazy pages to ckpt-lazy-pages")]
    Lazy(#[from] lazy::LazyError),
    #[error("prepared post-copy")]
    Prepared(#[from] prepared::PreparedError),
    #[error("resuming")]
    Resume(#[from] resume::ResumeError),
    #[error("/proc shows pid {proc_pid} as ours, but we are pid {pid}: this /proc belongs to another PID namespace (mount one for ours, e.g. unshare --pid --fork --mount-proc)")]
    ForeignProc { pid: u32, proc_pid: String },
    #[error("writing {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tid {tid}: saving or putting back its registers around injected syscalls")]
    Batch {
        tid: tracee::Tid,
        #[source]
        source: tracee::InjectError,
    },
    #[error("pid {pid}: the plan has no threads")]
    NoThreads { pid: Pid },
    #[error("waiting for pid {pid}")]
    Wait {
        pid: Pid,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Restores the process tree in `opts.images_dir`.
///
/// read → plan (the whole tree) → create every open file description here → fork the
/// root, which forks the tree (each process its children) and places its fds → seize
/// every process → rebuild each in tree order → zombies die → resume everything. Once the
/// tree runs, the calling thread lowers its priority (nice 19): what it still does is
/// bookkeeping, which must not take a CPU from the tree's first steps.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreOutcome, RestoreError> {
    let held = build(opts, false, None)?;
    finish(held, opts, &mut |_| Ok(()))
}

/// A tree rebuilt and held: every process seized and stopped with its final registers
/// loaded, nothing resumed. Dropping it kills and reaps the tree and undoes what the
/// restore made (ghost copies, SysV segments).
struct Held {
    // Dropped first: the guards kill the tree before the tracees detach.
    guard: Option<fork::TreeGuard>,
    reaper_guard: Option<fork::KillOnDrop>,
    root_guard: Option<fork::KillOnDrop>,
    /// Per process, its threads but the leader (held only for a prepared restore: a
    /// plain one lets them go at the end of the process's rebuild).
    threads: Vec<Vec<Tracee>>,
    tracees: Vec<Option<Tracee>>,
    lazy: Option<lazy::LazySession>,
    /// A prepared restore's userfaultfds, not handed over yet.
    prepared: Option<lazy::PreparedHandoff>,
    /// Per process, its helper page (prepared restore, where a thread's rseq area lies on
    /// lazy memory: it serves that registration after the switch) and the rseq areas
    /// registered only once the daemon serves the memory.
    helpers: Vec<Option<memory::Helper>>,
    deferred_rseq: Vec<Vec<Option<images_format::pb::RseqEntry>>>,
    /// Per process and thread (a prepared restore's), the xsave area loaded into it: the
    /// switch's new FPU state is written into it instead of one read back.
    xsaves: Vec<Vec<Option<tracee::Xsave>>>,
    /// Affinities given back and the extras set already (a held tree does it before the
    /// switch, off the down time).
    settled: bool,
    tree: plan::TreePlan,
    images: read::TreeImages,
    hosts: Vec<Pid>,
    root_host: Pid,
    reaper: Option<Pid>,
    go_w: Option<std::os::fd::OwnedFd>,
    _status_r: std::os::fd::OwnedFd,
    shared: shmem::SharedMaps,
    affinity: Option<rustix::thread::CpuSet>,
    dir: ImageDir,
    work_dir: PathBuf,
    forking_time: std::time::Duration,
    restore_time: std::time::Duration,
    pages_restored: u64,
    started: Instant,
    subreaper: Option<Subreaper>,
    _pin: Option<tracee::cpu::CpuPin>,
}

impl Drop for Held {
    /// A held tree's threads are traced by us: killed, each stays a zombie until its
    /// tracer reaps it, and its leader cannot be reaped before. Killed and reaped here,
    /// before the guards reap the processes.
    fn drop(&mut self) {
        if self.guard.is_none() || self.threads.iter().all(Vec::is_empty) {
            return;
        }
        for (i, threads) in self.threads.iter_mut().enumerate() {
            if threads.is_empty() {
                continue;
            }
            if let Some(host) = self.hosts.get(i) {
                let host = nix::unistd::Pid::from_raw(host.as_raw());
                let _ = nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL);
            }
            for t in threads.drain(..) {
                let tid = t.tid();
                // Gone by now, or going: nothing to detach.
                let _ = t.detach();
                reap_killed_thread(tid);
            }
        }
    }
}

/// Everything up to the tree's resume: read, plan, fork, rebuild. With `hold` (a prepared
/// restore), the userfaultfds are kept for a later hand-off and every thread stays
/// attached. A thread's rseq area is registered as in any restore unless it lies on lazy
/// memory: the kernel writes the area at each return to user mode, and until the hand-off
/// nobody serves a fault there. Such an area waits for the switch, and its process keeps
/// its helper page for that injection. (A lazy dump keeps the stack and TLS pages, where
/// libc puts the area, present: the wait is the exception.) `session`: a hand-off
/// connection to the daemon opened already (otherwise one is opened here, unless `hold`).
fn build(
    opts: &RestoreOptions,
    hold: bool,
    session: Option<lazy::LazySession>,
) -> Result<Held, RestoreError> {
    let started = Instant::now();
    // Where each CPU idled while we read and plan: a prepared build goes to the idlest,
    // beside a program that runs on (reading the counters twice takes about 0.1 ms, not
    // worth it in a restore inside the down time, where the program is frozen).
    let idle = if hold { tracee::IdleTimes::now() } else { None };
    // Every step reads the new processes through /proc by their pid: a /proc of
    // another PID namespace would show someone else's processes, or none.
    let pid = std::process::id();
    let proc_pid = std::fs::read_link("/proc/self")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if proc_pid != pid.to_string() {
        return Err(RestoreError::ForeignProc { pid, proc_pid });
    }
    // Absolute: the target opens images by path, from its own cwd.
    let path =
        std::fs::canonicalize(&opts.images_dir).map_err(|source| RestoreError::ImagesDir {
            path: opts.images_dir.clone(),
            source,
        })?;
    let dir = ImageDir::new(path)?;
    let images = read::images(&dir)?;
    tracing::debug!(us = micros(started.elapsed()), "images read");
    let mut tree = plan::plan_tree(&images, opts.shell_job)?;
    // Per process, in tree order (`None` for a zombie): its pages and lazy ranges.
    let mut pages_of: Vec<Option<(memory::PagesToFill, Vec<plan::Range>)>> = Vec::new();
    for p in tree.procs.iter_mut() {
        let plan::ProcKind::Live(plan) = &mut p.kind else {
            pages_of.push(None);
            continue;
        };
        let image_pid = p.pid.unsigned_abs();
        let (sources, lazy_ranges) = read::page_sources(&dir, image_pid, opts.lazy_pages)?;
        let pages = memory::pages_to_fill(&plan.memory, &sources)?;
        let mut saved: Vec<plan::Range> = pages
            .fill
            .iter()
            .map(|s| plan::Range {
                start: s.vaddr,
                end: s.vaddr + s.len,
            })
            .collect();
        saved.extend(lazy_ranges.iter().copied());
        plan::mark_accounting(&mut plan.memory, &saved);
        pages_of.push(Some((pages, lazy_ranges)));
    }
    let work_dir = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| dir.path().to_path_buf());
    tracing::info!(
        root = tree.root().map_or(0, |r| r.pid),
        processes = tree.procs.len(),
        us = micros(started.elapsed()),
        "planned"
    );
    for p in tree.live() {
        tracing::debug!(
            pid = p.pid,
            threads = p.threads.len(),
            vmas = p.memory.vmas.len(),
            fds = p.child.fds.len(),
            "planned process"
        );
    }

    // Injection round trips cost 5-8 µs on one CPU and ~100 µs across CPUs here:
    // pin ourselves, and the children inherit the pin until it is given back.
    let affinity = rustix::thread::sched_getaffinity(None).ok();
    let _pin = pin_to_idlest(idle.as_ref(), affinity.as_ref());

    if !opts.new_pid_ns {
        for p in &tree.procs {
            let tids: Vec<i32> = match &p.kind {
                plan::ProcKind::Live(plan) => plan.threads.iter().map(|t| t.tid).collect(),
                plan::ProcKind::Zombie { .. } => Vec::new(),
            };
            if p.parent.is_some() && std::path::Path::new(&format!("/proc/{}", p.pid)).exists() {
                let pid = Pid::from_raw(p.pid).ok_or(fork::ForkError::BadPid { pid: p.pid })?;
                return Err(fork::ForkError::PidInUse { pid }.into());
            }
            fork::check_tids_free(p.pid, tids)?;
        }
    }
    // Ghost files, pipe data and memfds belong to the tree: each is made once.
    let mut ghost_plans: Vec<plan::GhostPlan> = Vec::new();
    for p in tree.live() {
        for g in &p.ghosts {
            if !ghost_plans.iter().any(|h| h.file_id == g.file_id) {
                ghost_plans.push(g.clone());
            }
        }
    }
    let ghosts = files::create_ghosts(&dir, &ghost_plans)?;
    let mut shared = shmem::SharedMaps::load(&dir).map_err(memory::MemoryRestoreError::from)?;
    let no_files = std::collections::HashMap::new();
    let all_files = images.root().map_or(&no_files, |r| &r.files);
    let mut unix =
        sockets::unix::UnixImages::read(&dir, all_files).map_err(objects::ObjectsError::from)?;
    for p in tree.live_mut() {
        ghosts.point_plan_at_copies(p);
    }
    files::load_pipe_data(&dir, all_files, tree.live_mut(), unix.carried_sources())?;
    for p in tree.live_mut() {
        unix.fill(&mut p.child.fds);
        shared.point_plan_at_memfds(p);
    }
    let live: Vec<&plan::Plan> = tree.live().collect();
    let inherited_fds = files::inherited(
        live.iter().flat_map(|p| p.child.fds.iter()),
        &opts.inherit_fds,
    )?;
    let objects = objects::create(&live, inherited_fds)?;
    drop(live);
    // flock and OFD locks belong to the descriptions: set once, here.
    let file_locks = locks::load(&dir)?;
    locks::apply_on_descriptions(&file_locks, |pid, fd| {
        let p = tree.live().find(|p| p.pid == pid)?;
        let id = p.child.fds.iter().find(|f| f.fd == fd)?.file_id;
        objects.get(id).map(|o| o.as_fd())
    })?;
    tracing::debug!(
        objects = objects.len(),
        floor = objects.floor(),
        "open files created"
    );
    let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC);
    let (status_r, status_w) = pipe().map_err(fork::ForkError::Pipe)?;
    let status_w = objects.park_own(status_w).map_err(fork::ForkError::Pipe)?;
    let (go_r, go_w) = pipe().map_err(fork::ForkError::Pipe)?;
    let go_r = objects.park_own(go_r).map_err(fork::ForkError::Pipe)?;
    // Orphans of a failed restore come to us to be reaped.
    let subreaper = Subreaper::set();

    let fork_start = Instant::now();
    let namespace = if opts.new_pid_ns {
        Some(fork::PidNamespace::create()?)
    } else {
        None
    };
    let inherited = fork::Inherited {
        tree: &tree,
        objects: &objects,
        status: &status_w,
        zombies_go: &go_r,
        locks: &file_locks,
    };
    // Tracees are declared before the guards: on an early return the guards kill the
    // half-built tree before the tracees are dropped (which detaches them).
    let mut tracees: Vec<Option<Tracee>> = Vec::with_capacity(tree.procs.len());
    let root_host = fork::fork_tree(inherited, namespace.is_some())?;
    let root_guard = fork::KillOnDrop::new(root_host);
    // From here the reaper lives as long as the namespace has a process.
    let reaper = namespace.map(fork::PidNamespace::start);
    let reaper_guard = reaper.map(fork::KillOnDrop::new);
    // Only the tree holds these now: a process that dies closes its copies.
    drop(objects);
    drop(status_w);
    drop(go_r);
    let mut guard = fork::TreeGuard::new();
    let hosts = fork::wait_ready(&status_r, &tree, &mut guard, READY_TIMEOUT)?;
    tracing::debug!(
        us = micros(fork_start.elapsed()),
        "every process forked and prepared"
    );
    for (i, p) in tree.procs.iter().enumerate() {
        let host = hosts
            .get(i)
            .copied()
            .ok_or(fork::ForkError::NotReady { pid: p.pid })?;
        let t = match &p.kind {
            plan::ProcKind::Zombie { .. } => None,
            plan::ProcKind::Live(_) if i == 0 => Some(
                Tracee::from_stopped_child(host, SeizeOptions::RESTORE)
                    .map_err(|source| fork::ForkError::Attach { pid: host, source })?,
            ),
            plan::ProcKind::Live(_) => Some(
                Tracee::seize_paused(host, SeizeOptions::RESTORE, SEIZE_TIMEOUT)
                    .map_err(|source| fork::ForkError::Attach { pid: host, source })?,
            ),
        };
        tracees.push(t);
    }
    let forking_time = fork_start.elapsed();
    tracing::info!(pid = %root_host, processes = tree.procs.len(), us = micros(forking_time), "forked");

    let restore_start = Instant::now();
    let mut lazy = match session {
        _ if !opts.lazy_pages || hold => None,
        Some(session) => Some(session),
        None => Some(lazy::LazySession::open(&work_dir)?),
    };
    let mut prepared = (opts.lazy_pages && hold).then(lazy::PreparedHandoff::default);
    let mut deferred_rseq: Vec<Vec<Option<images_format::pb::RseqEntry>>> = Vec::new();
    for (i, p) in tree.procs.iter_mut().enumerate() {
        let lazy_ranges = pages_of
            .get(i)
            .and_then(Option::as_ref)
            .map_or(&[][..], |(_, lazy)| lazy.as_slice());
        let rseq = match &mut p.kind {
            plan::ProcKind::Live(plan) if hold => plan
                .threads
                .iter_mut()
                .map(|t| {
                    let lazy = t
                        .rseq
                        .as_ref()
                        .is_some_and(|r| rseq_on_lazy(r, lazy_ranges));
                    if lazy {
                        t.rseq.take()
                    } else {
                        None
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        deferred_rseq.push(rseq);
    }
    let mut threads_of: Vec<Vec<Tracee>> = Vec::new();
    let mut helpers: Vec<Option<memory::Helper>> = Vec::new();
    let mut xsaves: Vec<Vec<Option<tracee::Xsave>>> = Vec::new();
    let mut pages_restored = 0;
    for (i, p) in tree.procs.iter().enumerate() {
        let t = tracees.get_mut(i).and_then(Option::as_mut);
        let (plan, t) = match (&p.kind, t) {
            (plan::ProcKind::Live(plan), Some(t)) => (plan, t),
            (plan::ProcKind::Zombie { .. }, _) => {
                if let Some(l) = lazy.as_mut() {
                    l.add_zombie(p.pid)?;
                }
                if let Some(l) = prepared.as_mut() {
                    l.add_zombie(p.pid);
                }
                threads_of.push(Vec::new());
                helpers.push(None);
                xsaves.push(Vec::new());
                continue;
            }
            (plan::ProcKind::Live(_), None) => {
                return Err(RestoreError::NoThreads {
                    pid: hosts.get(i).copied().unwrap_or(root_host),
                })
            }
        };
        // While our own code still runs in it: every process exists, so every group
        // leader is in its group.
        set_process_links(t, p, plan)?;
        let (pages, lazy_ranges) = pages_of
            .get(i)
            .and_then(Option::as_ref)
            .ok_or(RestoreError::NoThreads { pid: t.pid() })?;
        let target = match (lazy.as_mut(), prepared.as_mut()) {
            (Some(session), _) => Some(LazyTarget::Now(session)),
            (None, Some(later)) => Some(LazyTarget::Later(later)),
            (None, None) => None,
        };
        let keep_helper = deferred_rseq
            .get(i)
            .is_some_and(|r| r.iter().any(Option::is_some));
        let how = Rebuild {
            keep_helper,
            fill: opts.fill,
            cpus: affinity.as_ref(),
            lazy: target.map(|target| LazyPlan {
                target,
                ranges: lazy_ranges,
                // The local images are the prepared ones: their pages may be stale.
                prefetch_from: (opts.lazy_prefetch_hot && !hold).then_some(&dir),
            }),
            nested: opts.new_pid_ns,
            hold,
        };
        let done = rebuild(t, plan, pages, how, &mut shared)?;
        pages_restored += done.pages;
        threads_of.push(done.threads);
        helpers.push(done.helper);
        xsaves.push(done.xsaves);
    }
    // Every mapping of the tree's memfds is back: their seals against writing may go on.
    shared.finish().map_err(memory::MemoryRestoreError::from)?;
    // Opened and mapped by now: unlinked, as they were at dump time.
    drop(ghosts);
    let restore_time = restore_start.elapsed();
    Ok(Held {
        guard: Some(guard),
        reaper_guard,
        root_guard: Some(root_guard),
        threads: threads_of,
        tracees,
        lazy,
        prepared,
        helpers,
        deferred_rseq,
        xsaves,
        settled: false,
        tree,
        images,
        hosts,
        root_host,
        reaper,
        go_w: Some(go_w),
        _status_r: status_r,
        shared,
        affinity,
        dir,
        work_dir,
        forking_time,
        restore_time,
        pages_restored,
        started,
        subreaper,
        _pin,
    })
}

/// From a held tree to a running one: pidfile, extras, zombies, the daemon's end marker,
/// detach (children first). `on_running` is called once every process runs, before the
/// watch starts; if it fails, the tree is killed.
fn finish(
    mut held: Held,
    opts: &RestoreOptions,
    on_running: &mut dyn FnMut(Pid) -> Result<(), RestoreError>,
) -> Result<RestoreOutcome, RestoreError> {
    let finishing = Instant::now();
    let root_host = held.root_host;
    let reaper = held.reaper;
    let started = held.started;
    if let Some(path) = &opts.pidfile {
        std::fs::write(path, format!("{root_host}\n")).map_err(|source| RestoreError::Pidfile {
            path: path.clone(),
            source,
        })?;
    }
    settle(&mut held)?;
    let settled = Instant::now();
    // Last: every group is joined, every parent is stopped and cannot reap them yet.
    drop(held.go_w.take());
    for (i, p) in held.tree.procs.iter().enumerate() {
        if let (plan::ProcKind::Zombie { .. }, Some(host)) = (&p.kind, held.hosts.get(i)) {
            wait_zombie(*host)?;
        }
    }
    // The daemon learns that every task is restored just before they resume. From then
    // on a watch holds references to the tree's userfaultfds until every page is in, and
    // kills the tree if the daemon dies first. A held tree's userfaultfds go to the
    // daemon only now: it starts on them at once, and where CPUs are few its work would
    // delay ours.
    let victim = match reaper {
        Some(reaper) => lazy::Victim::Namespace(reaper),
        None => lazy::Victim::Tree(root_host),
    };
    if let Some(prepared) = held.prepared.take() {
        held.lazy = Some(prepared.hand_over(&held.work_dir)?);
    }
    let watch = match held.lazy.take() {
        Some(l) => Some(l.finish()?),
        None => None,
    };
    let handed_over = Instant::now();
    // From here the restore stands: the SysV segments it created are the tree's.
    held.shared.keep_segments();
    if let Some(g) = held.guard.take() {
        g.release();
    }
    if let Some(g) = held.root_guard.take() {
        g.disarm();
    }
    if let Some(g) = held.reaper_guard.take() {
        g.disarm();
    }
    let tracees = std::mem::take(&mut held.tracees);
    let mut threads_of = std::mem::take(&mut held.threads);
    // Children first: a parent that runs finds its children running.
    for (i, t) in tracees.into_iter().enumerate().rev() {
        for other in threads_of
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
        {
            resume::detach(other)?;
        }
        let (Some(t), Some(p)) = (t, held.tree.procs.get(i)) else {
            continue;
        };
        let stopped = matches!(&p.kind, plan::ProcKind::Live(plan) if plan.task.stopped);
        match (stopped, i) {
            (false, _) => resume::detach(t)?,
            (true, 0) => resume::detach_stopped(t)?,
            (true, _) => resume::detach_into_stop(t)?,
        }
    }
    let detached = Instant::now();
    if let Err(error) = on_running(root_host) {
        lazy::kill_victim(victim);
        return Err(error);
    }
    // The tree runs: what is left here must not take CPU time from it.
    step_aside();
    tracing::info!(
        settle_us = micros(settled.duration_since(finishing)),
        handoff_us = micros(handed_over.duration_since(settled)),
        detach_us = micros(detached.duration_since(handed_over)),
        "tree resumed"
    );
    // The watchdog is forked only now, off the path to the tree's first instruction:
    // until then we hold every userfaultfd, and a daemon that died meanwhile is seen
    // by the watchdog as the end of its connection.
    let watch = match watch {
        Some(w) if opts.detached => {
            match start_watchdog(w, root_host, victim, reaper.is_some()) {
                Ok(w) => w,
                Err(error) => {
                    // Nobody would hold the userfaultfds: missing pages would read as zeroes.
                    lazy::kill_victim(victim);
                    return Err(error);
                }
            }
        }
        other => other,
    };
    drop(held.subreaper.take());
    // The tree runs by now: the statistics file is written off its path.
    stats::write(
        &held.dir,
        held.forking_time,
        held.restore_time,
        held.pages_restored,
    );
    let pid = root_host;
    tracing::info!(%pid, us = micros(started.elapsed()), restore_us = micros(held.restore_time), "restored");
    // Held here only if the watch thread could not start: the references then last as
    // long as we wait, without the kill on the daemon's death.
    let mut _unwatched = None;
    if let Some(w) = watch {
        if reaper.is_some() {
            // A thread cannot be created while our children go to another pid namespace.
            fork::children_in_our_pid_namespace()?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        // Ends with the daemon; nothing waits for it (we may return first).
        let spawned = std::thread::Builder::new()
            .name("lazy-watch".into())
            .spawn(move || {
                if let Ok(w) = rx.recv() {
                    let _ = lazy::LazyWatch::run(w, victim);
                }
            });
        match spawned {
            Ok(_) => {
                if let Err(std::sync::mpsc::SendError(w)) = tx.send(w) {
                    _unwatched = Some(w);
                }
            }
            Err(error) => {
                tracing::error!(%pid, %error, "could not start the lazy-pages watch: the tree is not killed if ckpt-lazy-pages dies");
                _unwatched = Some(w);
            }
        }
    }
    if opts.detached {
        return Ok(RestoreOutcome::Detached { pid });
    }
    let outcome = wait_for(pid);
    if let Some(reaper) = reaper {
        // It exits once its namespace is empty; it is our child to reap.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(reaper.as_raw()), None);
    }
    outcome
}

/// Gives the tree's threads the affinity we pinned them away from and sets what a thread
/// keeps outside its registers (see [`extras`]); once. After the last injection that
/// the pin speeds up.
fn settle(held: &mut Held) -> Result<(), RestoreError> {
    if held.settled {
        return Ok(());
    }
    for (i, t) in held.tracees.iter_mut().enumerate() {
        let Some(t) = t.as_mut() else { continue };
        if let Some(set) = &held.affinity {
            give_back_affinity(t.pid(), set);
        }
        if let Some(images) = held.images.processes.get(i) {
            extras::restore(t, images)?;
        }
    }
    held.settled = true;
    Ok(())
}

/// Lowers our priority as far as it goes: once the tree runs, what this process still
/// does (logs, statistics, the watchdog's fork) is bookkeeping, and on a machine with
/// few CPUs it would take them from the tree's first steps.
fn step_aside() {
    // Best effort: at worst we keep our priority.
    let _ = rustix::process::setpriority_process(None, ASIDE_NICE);
}

/// The nice value of [`step_aside`]: the lowest priority there is.
const ASIDE_NICE: i32 = 19;

/// Whether the kernel's writes to rseq area `r` land on lazy memory (`lazy`).
fn rseq_on_lazy(r: &images_format::pb::RseqEntry, lazy: &[plan::Range]) -> bool {
    let area = plan::Range {
        start: r.rseq_abi_pointer,
        end: r
            .rseq_abi_pointer
            .saturating_add(u64::from(r.rseq_abi_size).max(1)),
    };
    lazy.iter().any(|l| l.overlaps(&area))
}

/// How long the forked tree may take to get ready (each process forks its children and
/// places its fds: milliseconds, unless something hangs).
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a process that reported ready may take to reach its `pause()`.
const SEIZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a zombie may take to die once told to.
const ZOMBIE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const PR_SET_PDEATHSIG: u64 = 1;
const SYS_SETPGID: i64 = 109;

/// What the forked process set up for ckpt-restore's sake, put back as dumped (its
/// death signal), and the group it joins now that every process exists.
fn set_process_links(
    t: &mut Tracee,
    p: &plan::ProcPlan,
    plan: &plan::Plan,
) -> Result<(), RestoreError> {
    let sig = plan.threads.first().map_or(0, |l| l.pdeath_sig);
    let links = |source| RestoreError::Links { pid: p.pid, source };
    remote::call(
        t,
        "prctl(PR_SET_PDEATHSIG)",
        memory::libc_nr::PRCTL,
        [PR_SET_PDEATHSIG, u64::from(sig), 0, 0, 0, 0],
    )
    .map_err(links)?;
    if let Some(pgid) = p.join_group {
        remote::call(
            t,
            format!("setpgid(0, {pgid})"),
            SYS_SETPGID,
            [0, u64::from(pgid.unsigned_abs()), 0, 0, 0, 0],
        )
        .map_err(links)?;
    }
    Ok(())
}

/// Waits until zombie `host` has died (its parent, stopped, cannot reap it; a parent
/// that ignores SIGCHLD lets the kernel reap it at once).
/// Reaps a killed thread we trace (it stays a zombie until its tracer does), waiting up
/// to [`ZOMBIE_TIMEOUT`] for it to die.
fn reap_killed_thread(tid: tracee::Tid) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let tid = nix::unistd::Pid::from_raw(tid.as_raw());
    let deadline = Instant::now() + ZOMBIE_TIMEOUT;
    while Instant::now() < deadline {
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn wait_zombie(host: Pid) -> Result<(), RestoreError> {
    let start = Instant::now();
    loop {
        // Unreadable: already reaped.
        let state = tracee::proc::stat::read(host).ok().map(|s| s.state);
        match state {
            None | Some('Z') | Some('X') => return Ok(()),
            Some(_) if start.elapsed() > ZOMBIE_TIMEOUT => {
                return Err(RestoreError::Zombie { pid: host })
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
    }
}

/// We are the subreaper of what we fork while restoring; put back as it was on drop.
struct Subreaper {
    was: Option<rustix::process::Pid>,
}

impl Subreaper {
    fn set() -> Option<Subreaper> {
        let was = rustix::process::child_subreaper().ok()?;
        rustix::process::set_child_subreaper(Some(rustix::process::getpid())).ok()?;
        Some(Subreaper { was })
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let _ = rustix::process::set_child_subreaper(self.was);
    }
}

/// With `-d` we return while pages are missing: a forked watchdog keeps watch. Returns
/// the watch back if this process has threads (a library caller): it can only be a
/// thread of ours then, which lives as long as our caller.
fn start_watchdog(
    watch: lazy::LazyWatch,
    pid: Pid,
    victim: lazy::Victim,
    in_namespace: bool,
) -> Result<Option<lazy::LazyWatch>, RestoreError> {
    if in_namespace {
        // Not inside the tree's namespace: its end must not take the watchdog along
        // while the tree's processes still run on its references.
        fork::children_in_our_pid_namespace()?;
    }
    if own_threads() != Some(1) {
        tracing::warn!(%pid, "multi-threaded caller: the lazy-pages watch is a thread, not a process");
        return Ok(Some(watch));
    }
    let watchdog = watch.spawn_watchdog(pid, victim)?;
    tracing::info!(%pid, %watchdog, "lazy-pages watchdog started");
    Ok(None)
}

fn own_threads() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(|d| d.flatten().count())
}

/// Gives every thread of `pid` (host ids, from our /proc) the affinity we had before
/// pinning ourselves: the pin was ours, the program never asked for it.
fn give_back_affinity(pid: Pid, set: &rustix::thread::CpuSet) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let tid = task
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(tid) = tid {
            // Best effort, as above.
            let _ = rustix::thread::sched_setaffinity(Some(tid), set);
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How [`rebuild`] fills memory.
struct Rebuild<'a> {
    fill: FillMethod,
    /// Where a filling thread of ours may run.
    cpus: Option<&'a rustix::thread::CpuSet>,
    lazy: Option<LazyPlan<'a>>,
    /// The process is in a pid namespace of its own: its ids there are not ours.
    nested: bool,
    /// Prepared restore: keep the threads attached.
    hold: bool,
    /// Keep the helper page mapped (`hold` only): an injection comes after the switch.
    keep_helper: bool,
}

/// Post-copy: the tree's hand-off to the daemon and this process's lazy ranges.
struct LazyPlan<'a> {
    target: LazyTarget<'a>,
    ranges: &'a [plan::Range],
    /// Install the threads' hot pages from these images before resume.
    prefetch_from: Option<&'a ImageDir>,
}

/// Where a process's userfaultfd goes.
enum LazyTarget<'a> {
    /// To the daemon, at once.
    Now(&'a mut lazy::LazySession),
    /// Kept for the hand-off after the switch (prepared restore).
    Later(&'a mut lazy::PreparedHandoff),
}

/// What [`rebuild`] leaves.
struct Rebuilt {
    pages: u64,
    /// The threads but the leader, still attached (`hold` only).
    threads: Vec<Tracee>,
    /// The helper page, still mapped (`keep_helper` only).
    helper: Option<memory::Helper>,
    /// Per thread (the leader first), the xsave area loaded into it (`hold` only).
    xsaves: Vec<Option<tracee::Xsave>>,
}

/// Rebuilds the stopped child into the dumped process, all threads included, and
/// leaves only the leader attached (every thread, with `how.hold`), with its final
/// registers loaded.
fn rebuild(
    leader: &mut Tracee,
    plan: &plan::Plan,
    pages: &memory::PagesToFill,
    how: Rebuild<'_>,
    shared: &mut shmem::SharedMaps,
) -> Result<Rebuilt, RestoreError> {
    let fill = how.fill;
    let cpus = how.cpus;
    let pid = leader.pid();
    let step = Instant::now();
    // One batch for every injection of the rebuild: registers and mask are saved once
    // and each syscall costs four ptrace calls instead of nine. The batch ends before the
    // final registers and mask go in (ending it puts back the saved ones).
    batch(leader, Tracee::begin_batch)?;
    let helper = memory::place_helper(leader, &plan.memory)?;
    memory::close_other_fds(leader, &plan.child)?;
    // rseq off and the vDSO in place before anything is mapped over the old layout.
    memory::clear_and_move_vdso(leader, &plan.memory, &helper, &pages.vdso_image)?;
    tracing::debug!(%pid, us = micros(step.elapsed()), "old layout cleared");
    let step = Instant::now();
    memory::map_vmas(leader, &plan.memory, &helper, shared)?;
    tracing::debug!(%pid, us = micros(step.elapsed()), vmas = plan.memory.vmas.len(), "vmas mapped");
    // A chrooted target cannot see the images: we write its pages ourselves.
    let chrooted = plan
        .child
        .root
        .as_deref()
        .is_some_and(|r| r != std::path::Path::new("/"));
    let fill = if chrooted && matches!(fill, FillMethod::Preadv | FillMethod::Parallel) {
        FillMethod::Writev
    } else {
        fill
    };
    let fill = match fill {
        FillMethod::Preadv => {
            memory::fill_pages_injected(leader, &helper, &plan.memory, &pages.fill)?
        }
        FillMethod::Writev => memory::fill_pages_writev(pid, &pages.fill)?,
        FillMethod::Parallel => {
            memory::fill_pages_parallel(leader, &helper, &plan.memory, &pages.fill, cpus)?
        }
        FillMethod::ProcMem => memory::fill_pages(pid, &pages.fill)?,
    };
    tracing::info!(%pid, pages = fill.pages_restored, us = fill.fill_time_us, "pages written");
    let step = Instant::now();
    memory::advise(leader, &plan.memory)?;
    // Before anything else runs in the target: from now on the kernel may touch lazy
    // memory (rseq updates at each return to user mode), and the daemon serves it.
    if let Some(l) = how.lazy {
        let vmas = lazy::lazy_vmas(pid, &plan.memory, l.ranges)?;
        let image_pid = plan.pid;
        let uffd = match l.target {
            LazyTarget::Now(session) => session.add(leader, image_pid, &vmas)?,
            LazyTarget::Later(later) => later.add(leader, image_pid, &vmas)?,
        };
        if let Some(dir) = l.prefetch_from {
            let step = Instant::now();
            let pages = lazy::prefetch_hot(uffd, pid, dir, image_pid, l.ranges, &plan.threads)?;
            tracing::info!(%pid, pages, us = micros(step.elapsed()), "hot lazy pages prefetched");
        }
    }
    // After the old executable is gone: a new exe_fd is refused while it is mapped.
    memory::set_mm(leader, &plan.mm, &helper)?;

    signals::set_sigactions(leader, &helper, &plan.task)?;
    for w in threads::set_task_state(leader, &helper, &plan.task)? {
        tracing::warn!(%pid, "{w}");
    }
    signals::set_itimers(leader, &helper, &plan.task)?;
    signals::set_posix_timers(leader, &helper, &plan.task)?;

    tracing::debug!(%pid, us = micros(step.elapsed()), "mm and process state set");
    let step = Instant::now();
    // Threads come after the memory (they share it) and before any per-thread state.
    let mut others: Vec<Tracee> = Vec::new();
    // Declared after `others`: on an error it kills the process before they detach.
    let killer = fork::KillOnDrop::new(pid);
    for t in plan.threads.iter().skip(1) {
        others.push(threads::create_thread(leader, &helper, t, how.nested)?);
    }
    let (leader_plan, other_plans) = plan
        .threads
        .split_first()
        .ok_or(RestoreError::NoThreads { pid })?;
    set_thread(
        leader,
        &helper,
        plan.pid,
        leader_plan,
        &plan.task.shared_pending,
        None,
    )?;
    let mut fresh = creds::FreshThreads::default();
    // The leader's comes first; it is loaded last.
    let mut xsaves: Vec<Option<tracee::Xsave>> = vec![None];
    for (t, p) in others.iter_mut().zip(other_plans) {
        // Every thread injects through the shared helper page.
        t.set_syscall_insn(tracee::RemoteAddr(helper.addr));
        batch(t, Tracee::begin_batch)?;
        set_thread(t, &helper, plan.pid, p, &[], Some(&mut fresh))?;
        batch(t, Tracee::end_batch)?;
        let area = resume::load_registers_kept(t, p)?;
        xsaves.push(how.hold.then_some(area));
    }
    tracing::debug!(%pid, us = micros(step.elapsed()), threads = plan.threads.len(), "threads set");
    let keep_helper = how.hold && how.keep_helper;
    if !keep_helper {
        // The last injected syscall; no thread runs code from the helper page.
        memory::drop_helper(leader, &helper)?;
    }
    batch(leader, Tracee::end_batch)?;
    let area = resume::load_registers_kept(leader, leader_plan)?;
    if let Some(first) = xsaves.first_mut() {
        *first = how.hold.then_some(area);
    }
    killer.disarm();
    if how.hold {
        return Ok(Rebuilt {
            pages: fill.pages_restored,
            threads: others,
            helper: keep_helper.then_some(helper),
            xsaves,
        });
    }
    for t in others {
        resume::detach(t)?;
    }
    Ok(Rebuilt {
        pages: fill.pages_restored,
        threads: Vec::new(),
        helper: None,
        xsaves: Vec::new(),
    })
}

/// Starts or ends a batch of injections in `t` (see [`Tracee::begin_batch`]).
fn batch(
    t: &mut Tracee,
    op: fn(&mut Tracee) -> Result<(), tracee::InjectError>,
) -> Result<(), RestoreError> {
    op(t).map_err(|source| RestoreError::Batch {
        tid: t.tid(),
        source,
    })
}

/// Per-thread state, credentials last: injected syscalls run with the thread's
/// credentials, and everything before needs ours. `fresh`: `t` is a thread created here
/// (see [`creds::FreshThreads`]).
fn set_thread(
    t: &mut Tracee,
    helper: &memory::Helper,
    image_pid: i32,
    p: &plan::ThreadPlan,
    shared: &[Vec<u8>],
    fresh: Option<&mut creds::FreshThreads>,
) -> Result<(), RestoreError> {
    threads::set_thread_state(t, helper, p, fresh.is_some())?;
    signals::queue_pending(t, helper, image_pid, shared, p)?;
    threads::set_security(t, helper, p)?;
    if let Some(c) = &p.creds {
        creds::set_creds(t, helper, c, fresh)?;
    }
    Ok(())
}

/// Pins us to the CPU of `allowed` that idled most since `idle` was read, or to the one
/// we run on now. The build keeps that CPU busy for milliseconds: on a CPU a busy program
/// runs on, each would wait for the other (the program being migrated, when source and
/// destination share a machine).
fn pin_to_idlest(
    idle: Option<&tracee::IdleTimes>,
    allowed: Option<&rustix::thread::CpuSet>,
) -> Option<tracee::cpu::CpuPin> {
    let here = rustix::thread::sched_getcpu();
    let allowed = allowed.map(tracee::taskinfo::cpus_in).unwrap_or_default();
    let cpu = idle
        .and_then(|idle| idle.idlest_since(&allowed, here))
        .unwrap_or(here);
    tracee::cpu::CpuPin::to_cpu(u32::try_from(cpu).ok()?).ok()
}

fn wait_for(pid: Pid) -> Result<RestoreOutcome, RestoreError> {
    use nix::sys::wait::{waitpid, WaitStatus};
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    loop {
        match waitpid(npid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(RestoreOutcome::Exited { pid, code }),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Ok(RestoreOutcome::Killed {
                    pid,
                    signal: sig as i32,
                })
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(source) => return Err(RestoreError::Wait { pid, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rseq_area_waits_only_when_it_touches_lazy_memory() {
        let area = |at: u64| images_format::pb::RseqEntry {
            rseq_abi_pointer: at,
            rseq_abi_size: 32,
            signature: 0x5305_3053,
            ..Default::default()
        };
        let lazy = [plan::Range {
            start: 0x10000,
            end: 0x12000,
        }];
        assert!(rseq_on_lazy(&area(0x10000), &lazy));
        assert!(rseq_on_lazy(&area(0x11fe0), &lazy));
        // Straddling into the lazy range from below.
        assert!(rseq_on_lazy(&area(0xfff0), &lazy));
        assert!(!rseq_on_lazy(&area(0xffe0), &lazy));
        assert!(!rseq_on_lazy(&area(0x12000), &lazy));
        assert!(!rseq_on_lazy(&area(0x10000), &[]));
    }
}
