//! Restore a process from CRIU-format images, with no code injected into it.
//!
//! read → plan → fork → rebuild → resume. [`plan::plan`] is a pure function from
//! images to operations; everything after it follows the plan through `tracee`.
#![forbid(unsafe_code)]

pub mod child;
pub mod creds;
pub mod elf;
pub mod extras;
pub mod files;
pub mod fork;
pub mod lazy;
pub mod memory;
pub mod plan;
pub mod read;
pub mod remote;
pub mod resume;
pub mod signals;
pub mod stats;
pub mod threads;

use std::path::PathBuf;
use std::time::Instant;

use images_format::dir::ImageDir;
use images_format::error::ImageError;
use tracee::{Pid, Tracee};

pub use crate::memory::FillMethod;
use crate::plan::SessionPlan;

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
    #[error("pid {pid}: the plan has no threads")]
    NoThreads { pid: Pid },
    #[error("waiting for pid {pid}")]
    Wait {
        pid: Pid,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Restores the process in `opts.images_dir`.
pub fn restore(opts: &RestoreOptions) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    // Every step reads the new process through /proc by its pid: a /proc of another PID
    // namespace would show someone else's process, or none.
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
    let (pages, lazy_ranges) = read::page_sources(&dir, images.root.pstree.pid, opts.lazy_pages)?;
    let mut plan = plan::plan(&images)?;
    if opts.shell_job {
        plan.child.session = SessionPlan::Inherit;
    }
    let pages = memory::pages_to_fill(&plan.memory, &pages)?;
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
    let work_dir = opts
        .work_dir
        .clone()
        .unwrap_or_else(|| dir.path().to_path_buf());
    let lazy = opts.lazy_pages.then_some(LazyPlan {
        ranges: &lazy_ranges,
        work_dir: &work_dir,
        prefetch_from: opts.lazy_prefetch_hot.then_some(&dir),
    });
    tracing::info!(
        pid = plan.pid,
        threads = plan.threads.len(),
        vmas = plan.memory.vmas.len(),
        fds = plan.child.fds.len(),
        "planned"
    );

    // Injection round trips cost 5-8 µs on one CPU and ~100 µs across CPUs here:
    // pin ourselves, and the child inherits the pin until it is given back.
    let affinity = rustix::thread::sched_getaffinity(None).ok();
    let _pin = pin_here();

    if !opts.new_pid_ns {
        fork::check_tids_free(plan.pid, plan.threads.iter().map(|t| t.tid))?;
    }
    let ghosts = files::create_ghosts(&dir, &plan.ghosts)?;
    ghosts.point_plan_at_copies(&mut plan);
    files::load_pipe_data(&dir, &mut plan)?;
    let fork_start = Instant::now();
    let namespace = if opts.new_pid_ns {
        Some(fork::PidNamespace::create()?)
    } else {
        None
    };
    let (forked, leader) = fork::fork_root(plan.pid, &plan.child, namespace.is_some())?;
    // From here the reaper lives as long as the namespace has a process.
    let reaper = namespace.map(fork::PidNamespace::start);
    let forking_time = fork_start.elapsed();
    let mut leader = leader;
    // Declared after the leader so that, on an early return, it kills the half-built
    // process before the leader's Tracee is dropped (which detaches it).
    let forked = forked;
    let pid = forked.pid;
    tracing::info!(%pid, us = micros(forking_time), "forked");

    let restore_start = Instant::now();
    let how = Rebuild {
        fill: opts.fill,
        cpus: affinity.as_ref(),
        lazy,
        nested: opts.new_pid_ns,
    };
    let (pages_restored, lazy) = rebuild(&mut leader, &plan, &pages, &how)?;
    // Opened and mapped by now: unlinked, as they were at dump time.
    drop(ghosts);
    let restore_time = restore_start.elapsed();
    stats::write(&dir, forking_time, restore_time, pages_restored);
    if let Some(path) = &opts.pidfile {
        std::fs::write(path, format!("{pid}\n")).map_err(|source| RestoreError::Pidfile {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(set) = &affinity {
        give_back_affinity(pid, set);
    }
    extras::restore(&mut leader, &images.root)?;
    // The daemon learns that every task is restored just before they resume. From then
    // on a watch holds references to the tree's userfaultfds until every page is in, and
    // kills the tree if the daemon dies first.
    let victim = match reaper {
        Some(reaper) => lazy::Victim::Namespace(reaper),
        None => lazy::Victim::Tree(pid),
    };
    let watch = match lazy {
        Some(l) => Some(l.finish(pid)?),
        None => None,
    };
    let watch = match watch {
        Some(w) if opts.detached => start_watchdog(w, pid, victim, reaper.is_some())?,
        other => other,
    };
    let pid = forked.release();
    if plan.task.stopped {
        resume::detach_stopped(leader)?;
    } else {
        resume::detach(leader)?;
    }
    tracing::info!(%pid, us = micros(started.elapsed()), restore_us = micros(restore_time), "restored");
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

/// Rebuilds the stopped child into the dumped process, all threads included, and
/// leaves only the leader attached, with its final registers loaded. Returns the
/// number of pages written.
/// How [`rebuild`] fills memory.
struct Rebuild<'a> {
    fill: FillMethod,
    /// Where a filling thread of ours may run.
    cpus: Option<&'a rustix::thread::CpuSet>,
    lazy: Option<LazyPlan<'a>>,
    /// The process is in a pid namespace of its own: its ids there are not ours.
    nested: bool,
}

/// Post-copy: the lazy ranges of the image and where the daemon listens.
struct LazyPlan<'a> {
    ranges: &'a [plan::Range],
    work_dir: &'a std::path::Path,
    /// Install the threads' hot pages from these images before resume.
    prefetch_from: Option<&'a ImageDir>,
}

fn rebuild(
    leader: &mut Tracee,
    plan: &plan::Plan,
    pages: &memory::PagesToFill,
    how: &Rebuild<'_>,
) -> Result<(u64, Option<lazy::LazyRestore>), RestoreError> {
    let fill = how.fill;
    let cpus = how.cpus;
    let pid = leader.pid();
    let step = Instant::now();
    let helper = memory::place_helper(leader, &plan.memory)?;
    memory::close_other_fds(leader, &plan.child)?;
    // rseq off and the vDSO in place before anything is mapped over the old layout.
    memory::clear_and_move_vdso(leader, &plan.memory, &helper, &pages.vdso_image)?;
    tracing::debug!(%pid, us = micros(step.elapsed()), "old layout cleared");
    let step = Instant::now();
    memory::map_vmas(leader, &plan.memory, &helper)?;
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
    let lazy = match &how.lazy {
        Some(l) => {
            let vmas = lazy::lazy_vmas(pid, &plan.memory, l.ranges)?;
            let image_pid = plan.pid;
            let handed = lazy::hand_over(leader, image_pid, &vmas, l.work_dir)?;
            if let Some(dir) = l.prefetch_from {
                let step = Instant::now();
                let pages =
                    lazy::prefetch_hot(&handed.uffd, pid, dir, image_pid, l.ranges, &plan.threads)?;
                tracing::info!(%pid, pages, us = micros(step.elapsed()), "hot lazy pages prefetched");
            }
            Some(handed)
        }
        None => None,
    };
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
    )?;
    for (t, p) in others.iter_mut().zip(other_plans) {
        // Every thread injects through the shared helper page.
        t.set_syscall_insn(tracee::RemoteAddr(helper.addr));
        set_thread(t, &helper, plan.pid, p, &[])?;
        resume::load_registers(t, p)?;
    }
    tracing::debug!(%pid, us = micros(step.elapsed()), threads = plan.threads.len(), "threads set");
    // The last injected syscall; no thread runs code from the helper page.
    memory::drop_helper(leader, &helper)?;
    resume::load_registers(leader, leader_plan)?;
    killer.disarm();
    for t in others {
        resume::detach(t)?;
    }
    Ok((fill.pages_restored, lazy))
}

/// Per-thread state, credentials last: injected syscalls run with the thread's
/// credentials, and everything before needs ours.
fn set_thread(
    t: &mut Tracee,
    helper: &memory::Helper,
    image_pid: i32,
    p: &plan::ThreadPlan,
    shared: &[Vec<u8>],
) -> Result<(), RestoreError> {
    threads::set_thread_state(t, helper, p)?;
    signals::queue_pending(t, helper, image_pid, shared, p)?;
    threads::set_security(t, helper, p)?;
    if let Some(c) = &p.creds {
        creds::set_creds(t, helper, c)?;
    }
    Ok(())
}

/// Pins us to the CPU we run on now.
fn pin_here() -> Option<tracee::cpu::CpuPin> {
    let cpu = rustix::thread::sched_getcpu();
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
