//! `ckpt-dump`: freeze a process tree, read its whole state from outside (ptrace, injected
//! syscalls, `/proc`, `PAGEMAP_SCAN`, `process_vm_readv`) and write it as CRIU-format images.
//!
//! The sequence is [`dump`]: freeze, collect (reads only), write (never ptraces), release.
//! An error anywhere before release drops the frozen tree, which resumes every process
//! exactly as it was; only [`release::finish_tree`] (for a lazy dump, once its pages are
//! served) may kill them.
//!
//! Trees: `-t PID` names the root; every process below it is frozen too (every thread,
//! children found through `/proc/PID/task/*/children` until a pass finds nothing new) and
//! saved in CRIU's layout. Zombies are only a `pstree.img` entry and a `core-PID.img` with
//! `TASK_DEAD` and their raw wait status. File ids are global: an open file description held
//! by several processes (`kcmp(KCMP_FILE)` tells) is one `files.img` object, and processes
//! sharing an fd table (`CLONE_FILES`) share one `fdinfo` image; `ids-PID.img` gives equal
//! ids to processes sharing fs info or handlers. A process sharing its address space with
//! another (`CLONE_VM`: a vfork child before exec) is refused. Kill, `--leave-running` and
//! `--leave-stopped` apply to every process. A lazy dump serves the pages of every process
//! of the tree ([`lazy`]). Pre-copy (`--pre-dump`, `--track-mem`, also with `--lazy-pages`)
//! handles one process: a root with children is refused ([`DumpError::Tree`]).
//! Private memory that processes share copy-on-write at dump time, which restore gives each
//! of them a copy of, is logged ("restore duplicates N bytes") and in
//! [`DumpStats::cow_shared_bytes`], which `stats-dump` keeps in a field of ours
//! (`dump_stats_entry.cow_shared_bytes`, number 1001).
//!
//! What a dump directory holds, with CRIU's meaning of every field:
//!
//! ```text
//! inventory.img        img_version 2, fdinfo_per_id, ns_per_id, root_ids = ckpt-dump's own
//!                      ids (1 for mm/files/fs/sighand), so equal namespace ids mean "shared"
//! pstree.img           one entry per process, parents first (pid, ppid 0 for the root, pgid,
//!                      sid, threads; zombies last, with their own pid as only thread)
//! core-TID.img         per thread: gpregs (incl. orig_ax, fs/gs base), fpregs + xsave by
//!                      component, clear_tid_addr, thread_core (sigmask, private pending
//!                      signals, rseq, robust list, sigaltstack, sched, pdeath, creds, seccomp,
//!                      comm); the leader's also has tc (62 sigactions in signal order without
//!                      SIGKILL/SIGSTOP, timers, rlimits, shared pending signals, ...);
//!                      ckpt extensions (field numbers from 1001, which crit skips):
//!                      thread_core.{cpu_affinity (if restricted), timer_slack_ns, ioprio
//!                      (if a class is set)} and tc.mdwe_flags (if set)
//! ids-PID.img          kernel object ids; files_id names fdinfo-<files_id>.img
//! mm-PID.img           mm fields (brk from brk(0), auxv), exe_file_id, every VMA (VMA_AREA_*
//!                      status, MAP_* flags, madv bits; shmid = file id of file mappings), and
//!                      VMA_AREA_GUARD-only entries for guard regions after the real VMAs
//! pagemap-PID.img      pagemap_head{pages_id} + PE_PRESENT runs (adjacent runs are merged,
//!  + pages-N.img       even across VMAs), contents in pages-N.img in the same order
//! fdinfo-N.img         {file id, FD_CLOEXEC, REG, fd} per fd
//! files.img            reg_file_entry per open file description, exe, cwd, root and mapped
//!                      file (path, open flags without O_CLOEXEC, pos, mode, size, build-id);
//!                      unix_sk_entry per unix socket (peer inode, name, backlog, options)
//! sk-queues.img        sk_packet_entry{id_for, length} + the bytes, per unread datagram or
//!                      record of a unix socket (a stream's unread bytes as one entry)
//! remap-fpath.img      GHOST remaps of deleted files (open or mapped) to
//!  + ghost-file-N.img  ghost_file_entry followed by the whole contents (never chunked)
//! fs-PID.img           cwd and root file ids, umask
//! seccomp.img          each thread's filters, oldest first; prev = the older filter's index,
//!                      thread_core.seccomp_filter = index of the thread's newest
//! timens-0.img         CLOCK_MONOTONIC and CLOCK_BOOTTIME at dump time
//! stats-dump           freezing/frozen/memdump/memwrite (µs) and page counts (scanned,
//!                      written, skipped as in the parent, lazy)
//! parent               symlink to --prev-images-dir, as given
//! ```
//!
//! Pre-copy ([`DumpMode::PreDump`], `--pre-dump`): the process is frozen only while its VMA
//! list is read and dirty tracking is armed or scanned (the scan re-protects the pages it
//! reports, atomically); then it runs again and its pages are read with `process_vm_readv`
//! and written (`inventory.img` with `pre_dump_mode`, `pagemap-PID.img`, `pages-1.img`). A page
//! written after the scan is caught by the next round. With `--track-mem` the tracking
//! (`tracee::dirty`) is kept by its holder process between rounds; a later round, or the final
//! dump, with `--prev-images-dir` saves only the pages written since and marks every other
//! present page of a VMA tracked the whole interval `PE_PARENT` ([`pages::plan`]). Nothing
//! unproven is ever `PE_PARENT`: an untracked, new or changed VMA, lost tracking, a parent
//! the destination lacks, or no `--track-mem` all mean a full dump. The final dump, a failed
//! one, and `--leave-running` without `--track-mem` release the tracking (after the process
//! is let go: unregistering is slow and need not be frozen time).
//!
//! Pages that `PAGEMAP_SCAN` calls swapped but that are only the pte markers of write
//! protection (never populated) are not pages: they are left out ([`collect`]). A pre-dump
//! reads the VMA list from `/proc/PID/maps` (it writes no `mm` image); the final dump of a
//! pre-copy reads `smaps` before the freeze and keeps it if the VMAs are unchanged
//! ([`collect::VmaSource`]). Runs of pages never span VMAs, so that a VMA the running
//! process unmaps during a pre-dump costs only its own pages, which are left out (the next
//! round sees that VMA as new and saves it whole).
//!
//! Page server (`--page-server --address A --port P`): the pagemaps and pages go to
//! `ckpt-page-server` instead of the directory (every other image stays local). It is
//! connected before the process is frozen; if it cannot be reached or the connection
//! drops, the dump fails and the process runs on as before.
//!
//! Post-copy ([`DumpMode::Lazy`], `--lazy-pages`): see [`lazy`]; prepared post-copy
//! (`--lazy-pages --prepare`), where the destination is built before the final freeze: see
//! [`prepare`].
#![forbid(unsafe_code)]

mod aside;
pub mod collect;
mod direct;
pub mod fault;
mod ids;
pub mod lazy;
pub mod pages;
pub mod prepare;
pub mod release;
pub mod seize;
pub mod switch_pages;
pub mod track;
pub mod write;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_page_server::{ClientError, PageServerClient, PagemapId};
pub use fault::{FaultPoint, InjectedFault};
use tracee::Pid;

use crate::pages::VmaPolicy;
use crate::write::PagesTo;

/// What happens to the process once its images are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinalState {
    /// Killed (the default, as CRIU does: the images are now the process).
    #[default]
    Killed,
    /// Resumed (`--leave-running`).
    Running,
    /// Left stopped, as by SIGSTOP (`--leave-stopped`).
    Stopped,
}

/// What kind of dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DumpMode {
    /// Every image (`ckpt-dump`).
    #[default]
    Full,
    /// Only memory, read while the process runs (`--pre-dump`).
    PreDump,
    /// Every image but the pages of private anonymous memory, which the frozen source then
    /// serves to the lazy-pages daemon of the destination (`--lazy-pages`).
    Lazy,
}

/// A dump request: the binary's flags as plain data.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// The process to dump (`-t`).
    pub pid: i32,
    /// Where the images go (`-D`); created if missing.
    pub images_dir: PathBuf,
    /// Kill, resume or leave stopped afterwards.
    pub final_state: FinalState,
    /// Accept a terminal as stdio (`--shell-job`).
    pub shell_job: bool,
    /// Objects whose other side is outside the tree on purpose (`--external`): for now
    /// pipes, as `pipe:[INODE]` (or CRIU's `file[MNT_ID:INODE]`).
    pub external: Vec<String>,
    /// A datagram unix socket may be connected to a named socket outside the tree: restore
    /// connects it to that name again (`--ext-unix-sk`, CRIU's meaning).
    pub ext_unix_sk: bool,
    /// A step to fail on purpose (`CKPT_FAULT`).
    pub fault: Option<FaultPoint>,
    /// Full dump, pre-dump or lazy dump.
    pub mode: DumpMode,
    /// The previous (pre-)dump's directory (`--prev-images-dir`), linked as `parent`.
    pub prev_images_dir: Option<PathBuf>,
    /// Keep dirty tracking between rounds and use it (`--track-mem`).
    pub track_mem: bool,
    /// Queued pre-copy round: hold back pages written since the previous round
    /// (`--hold-hot-pages`, with `--pre-dump --track-mem`; see [`track`]).
    pub hold_hot_pages: bool,
    /// Send the pages to this page server (`--page-server --address --port`).
    pub page_server: Option<SocketAddr>,
    /// Send them zstd-compressed where that is smaller (`--compress-pages`): our extension
    /// of the protocol, for `ckpt-page-server` only (see `ckpt_page_server::compress`).
    pub compress_pages: bool,
    /// Lazy dump: where to listen for the lazy-pages daemon (`--address --port`).
    pub lazy_listen: Option<SocketAddr>,
    /// Lazy dump: how long to wait for the daemon to connect before resuming the source.
    pub lazy_connect_timeout: Duration,
    /// Lazy dump: how long to wait for the daemon to reconnect after the link is lost once
    /// the destination runs, before the source is killed.
    pub lazy_reconnect_window: Duration,
    /// Lazy dump: prepared post-copy (`--prepare`): images first while the tree runs, the
    /// final freeze only once the destination holds them (see [`prepare`]).
    pub prepare: bool,
}

impl DumpOptions {
    /// A full dump of `pid` into `images_dir`, killing the process afterwards.
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>) -> DumpOptions {
        DumpOptions {
            pid,
            images_dir: images_dir.into(),
            final_state: FinalState::Killed,
            shell_job: false,
            external: Vec::new(),
            ext_unix_sk: false,
            fault: None,
            mode: DumpMode::Full,
            prev_images_dir: None,
            track_mem: false,
            hold_hot_pages: false,
            page_server: None,
            compress_pages: false,
            lazy_listen: None,
            lazy_connect_timeout: Duration::from_secs(300),
            lazy_reconnect_window: Duration::from_secs(30),
            prepare: false,
        }
    }
}

/// Timings (µs) and page counts of a dump, as CRIU's `stats-dump` holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Seizing and interrupting every thread.
    pub freezing_time_us: u32,
    /// From the first thread stopped to the last thread released.
    pub frozen_time_us: u32,
    /// Finding and reading the pages.
    pub memdump_time_us: u32,
    /// Writing the pages into the image.
    pub memwrite_time_us: u32,
    /// Pages of every dumpable VMA that were looked at.
    pub pages_scanned: u64,
    /// Pages left to a parent image (`PE_PARENT`).
    pub pages_skipped_parent: u64,
    /// Pages written into `pages-N.img` (or sent to the page server).
    pub pages_written: u64,
    /// Pages left to the lazy restore (`PE_LAZY`).
    pub pages_lazy: u64,
    /// Pages of shared memory objects written (`pagemap-shmem` images), each object once.
    pub shpages_written: u64,
    /// Bytes of private memory several processes of the tree shared copy-on-write at dump
    /// time, which restore gives each process a copy of (logged, and in `stats-dump`).
    pub cow_shared_bytes: u64,
}

/// Why a dump failed. Every variant wraps the error of one step.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("dump: {0} is not a valid pid")]
    BadPid(i32),
    #[error(transparent)]
    Seize(#[from] seize::SeizeError),
    #[error(transparent)]
    Collect(#[from] collect::CollectError),
    #[error(transparent)]
    Write(#[from] write::WriteError),
    #[error(transparent)]
    Release(#[from] release::ReleaseError),
    #[error(transparent)]
    Fault(#[from] InjectedFault),
    #[error(transparent)]
    Track(#[from] track::TrackError),
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    #[error(transparent)]
    Prepare(#[from] prepare::PrepareError),
    #[error("dump: the page server at {addr}")]
    PageServer {
        addr: SocketAddr,
        #[source]
        source: ClientError,
    },
    #[error("dump: {mode:?} needs {what}")]
    Options { mode: DumpMode, what: &'static str },
    #[error(
        "dump: pid {pid} has child processes {children:?}: {what} of a process tree is not \
         supported yet"
    )]
    Tree {
        pid: Pid,
        children: Vec<Pid>,
        what: &'static str,
    },
}

/// What a dump of more than one process cannot do yet, if `opts` asks for it.
fn tree_refusal(opts: &DumpOptions) -> Option<&'static str> {
    match opts.mode {
        DumpMode::PreDump => Some("pre-copy"),
        DumpMode::Full | DumpMode::Lazy if opts.track_mem => Some("pre-copy (--track-mem)"),
        DumpMode::Full | DumpMode::Lazy => None,
    }
}

/// Refuses a process with children for `what`, which handles one process only.
fn refuse_children(pid: Pid, what: &'static str) -> Result<(), DumpError> {
    let children = tracee::proc::task::children(pid).map_err(|source| {
        DumpError::Collect(collect::CollectError::Proc {
            pid,
            what: "children",
            source,
        })
    })?;
    if children.is_empty() {
        return Ok(());
    }
    Err(DumpError::Tree {
        pid,
        children,
        what,
    })
}

/// Refuses a tree for the modes that handle one process only.
fn refuse_tree(pid: Pid, opts: &DumpOptions, tree: &tracee::SeizedTree) -> Result<(), DumpError> {
    match tree_refusal(opts) {
        Some(what) if !tree.is_single() => Err(DumpError::Tree {
            pid,
            children: tree
                .processes()
                .skip(1)
                .map(tracee::SeizedProcess::pid)
                .chain(tree.zombies().iter().map(|(_, z)| *z))
                .collect(),
            what,
        }),
        _ => Ok(()),
    }
}

/// Keeps the usual terminating signals (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT) pending while a
/// dump runs: dying in the middle of an injected syscall would leave the target with our
/// registers and a scratch page. Once the old mask is back, a pending signal acts as usual,
/// after the target has been let go.
struct SignalShield {
    old: Option<nix::sys::signal::SigSet>,
}

impl SignalShield {
    fn raise() -> SignalShield {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            set.add(sig);
        }
        let mut old = SigSet::empty();
        match pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)) {
            Ok(()) => SignalShield { old: Some(old) },
            Err(errno) => {
                tracing::warn!(%errno, "cannot hold off termination signals during the dump");
                SignalShield { old: None }
            }
        }
    }
}

impl Drop for SignalShield {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            use nix::sys::signal::{pthread_sigmask, SigmaskHow};
            if let Err(errno) = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None) {
                tracing::warn!(%errno, "cannot restore the signal mask");
            }
        }
    }
}

fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

fn connect_page_server(opts: &DumpOptions) -> Result<Option<PageServerClient>, DumpError> {
    let Some(addr) = opts.page_server else {
        return Ok(None);
    };
    let mut client =
        PageServerClient::connect(addr).map_err(|source| DumpError::PageServer { addr, source })?;
    client
        .set_compress_pages(opts.compress_pages)
        .map_err(|source| DumpError::PageServer { addr, source })?;
    Ok(Some(client))
}

/// Whether the destination holds the parent pagemap of `pid`: without it nothing may be
/// `PE_PARENT`.
fn destination_has_parent(
    opts: &DumpOptions,
    pid: Pid,
    client: Option<&mut PageServerClient>,
) -> Result<bool, DumpError> {
    let Some(parent) = &opts.prev_images_dir else {
        return Ok(false);
    };
    let id = u64::try_from(pid.as_raw()).unwrap_or(0);
    match (client, opts.page_server) {
        (Some(client), Some(addr)) => client
            .parent_has(PagemapId::process(id))
            .map_err(|source| DumpError::PageServer { addr, source }),
        _ => {
            // A relative parent is relative to the image directory, as the link will be;
            // that directory may not exist yet, so `..` is resolved by hand then.
            let dir = if opts.images_dir.is_dir() {
                opts.images_dir.join(parent)
            } else {
                lexical_join(&opts.images_dir, parent)
            };
            Ok(images_format::ImageDir::new(&dir)
                .map(|d| d.exists(images_format::ImageKind::Pagemap, id))
                .unwrap_or(false))
        }
    }
}

/// `base/rel` with `.` and `..` taken away without asking the filesystem.
fn lexical_join(base: &std::path::Path, rel: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in base.components().chain(rel.components()) {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn close_page_server(
    client: Option<PageServerClient>,
    opts: &DumpOptions,
) -> Result<(), DumpError> {
    match (client, opts.page_server) {
        (Some(client), Some(addr)) => {
            client.pages_pushed().log("pages sent: raw vs wire bytes");
            client
                .close()
                .map_err(|source| DumpError::PageServer { addr, source })
        }
        _ => Ok(()),
    }
}

/// Dumps one process according to `opts.mode`.
/// A failed dump also ends the dirty tracking of earlier rounds: the process runs on exactly
/// as before, without write protection.
pub fn dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let result = match opts.mode {
        _ if opts.prepare => prepare::prepared_dump(opts),
        DumpMode::PreDump => predump(opts),
        DumpMode::Full | DumpMode::Lazy => full_dump(opts),
    };
    if result.is_err() && opts.track_mem {
        if let Some(pid) = Pid::from_raw(opts.pid) {
            track::release_held(pid);
        }
    }
    result
}

/// One pre-copy round: memory only, read while the process runs.
#[tracing::instrument(skip_all, fields(pid = opts.pid))]
fn predump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let pid = Pid::from_raw(opts.pid).ok_or(DumpError::BadPid(opts.pid))?;
    let _shield = SignalShield::raise();
    // Before the freeze: an unreachable page server must cost the process nothing.
    let mut client = connect_page_server(opts)?;
    // Asked before the freeze: a round trip to the page server is not the process's time.
    let parent = destination_has_parent(opts, pid, client.as_mut())?;
    if opts.track_mem {
        if let Some(tracking) = track::Tracking::attach_running(pid, opts) {
            return predump_running(pid, opts, tracking, client, parent);
        }
    }
    let freeze_start = Instant::now();
    let mut tree = seize::freeze_process(pid)?;
    let mut stats = DumpStats {
        freezing_time_us: micros(freeze_start),
        ..DumpStats::default()
    };
    let frozen_since = Instant::now();
    tracing::debug!(us = stats.freezing_time_us, "frozen");
    // The children were not frozen: a round of a tree would miss their pages.
    refuse_children(pid, "pre-copy")?;
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;
    let mut tracking = track::Tracking::start(&mut tree, opts)?;
    if tracking.backend() == Some(tracee::dirty::BackendKind::UffdWp) {
        // Armed (the injection needs the freeze) and collected; the pages are scanned and
        // read while it runs, as in a round taken over from a previous one.
        let set = tracking.collect(&maps_of(pid)?)?;
        tree.resume()
            .map_err(|source| DumpError::Release(release::ReleaseError::Resume { pid, source }))?;
        stats.frozen_time_us = micros(frozen_since);
        tracing::info!(us = stats.frozen_time_us, "frozen for the pre-dump");
        return predump_rest(pid, opts, tracking, set, client, parent, stats);
    }
    let memory = collect::memory(pid)?;
    stats.pages_scanned = memory.pages_scanned;
    let set = tracking.collect(&memory.maps)?;
    let policies = tracking.policies(&memory.vmas, set.as_ref(), parent);
    let plan = pages::plan(&memory.pages, &policies);
    // The pages are read while it runs: anything written from now on is in the next round.
    tree.resume()
        .map_err(|source| DumpError::Release(release::ReleaseError::Resume { pid, source }))?;
    stats.frozen_time_us = micros(frozen_since);
    tracing::info!(us = stats.frozen_time_us, "frozen for the pre-dump");
    write_round(pid, opts, tracking, &plan, client, stats)
}

/// Reads and writes a round's pages as `plan` says, then keeps the tracking for the next.
fn write_round(
    pid: Pid,
    opts: &DumpOptions,
    tracking: track::Tracking,
    plan: &[pages::PlannedRun],
    mut client: Option<PageServerClient>,
    mut stats: DumpStats,
) -> Result<DumpStats, DumpError> {
    let mut to = match client.as_mut() {
        Some(c) => PagesTo::Server(c),
        None => PagesTo::Local,
    };
    let images = write::predump_images(pid, plan, opts, &mut to, &mut stats)?;
    close_page_server(client, opts)?;
    tracking.finish(opts, false)?;
    images.commit(&stats)?;
    tracing::info!(
        written = stats.pages_written,
        parent = stats.pages_skipped_parent,
        "pre-dump finished"
    );
    Ok(stats)
}

/// A round after another whose tracking allows collecting while the process runs (the
/// userfaultfd back-end): no freeze at all. What was written is collected (and protected
/// again) first, the pages are scanned and read after; a page written between the collect
/// and the scan is saved too ([`track::with_written_since`]), and anything written from
/// the collect on is the next round's.
fn predump_running(
    pid: Pid,
    opts: &DumpOptions,
    mut tracking: track::Tracking,
    client: Option<PageServerClient>,
    parent: bool,
) -> Result<DumpStats, DumpError> {
    refuse_children(pid, "pre-copy")?;
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;
    let set = tracking.collect(&maps_of(pid)?)?;
    tracing::info!("pre-dump taken while the process runs: not frozen");
    predump_rest(
        pid,
        opts,
        tracking,
        set,
        client,
        parent,
        DumpStats::default(),
    )
}

/// The VMAs of `pid` from `/proc/PID/maps`.
fn maps_of(pid: Pid) -> Result<Vec<tracee::proc::maps::MapsEntry>, DumpError> {
    tracee::proc::maps::read(pid).map_err(|source| {
        DumpError::Collect(collect::CollectError::Proc {
            pid,
            what: "maps",
            source,
        })
    })
}

/// The rest of a round whose written pages were collected (`set`, protected again): the
/// page scan and the pages, read while the process runs (the userfaultfd back-end).
fn predump_rest(
    pid: Pid,
    opts: &DumpOptions,
    mut tracking: track::Tracking,
    set: Option<tracee::dirty::DirtySet>,
    client: Option<PageServerClient>,
    parent: bool,
    mut stats: DumpStats,
) -> Result<DumpStats, DumpError> {
    let memory = collect::memory(pid)?;
    let set = track::with_written_since(pid, set);
    stats.pages_scanned = memory.pages_scanned;
    let policies = tracking.policies(&memory.vmas, set.as_ref(), parent);
    let plan = pages::plan(&memory.pages, &policies);
    write_round(pid, opts, tracking, &plan, client, stats)
}

/// Per VMA of `process`, how its pages are saved in a full or lazy dump.
fn full_policies(
    process: &collect::ProcessState,
    opts: &DumpOptions,
    set: Option<&tracee::dirty::DirtySet>,
    parent: bool,
) -> Vec<VmaPolicy> {
    let lazy_keep = (opts.mode == DumpMode::Lazy).then(|| {
        // The pages under each of its threads' stack pointers stay present, as CRIU keeps
        // stacks, and so do each thread's TLS and rseq pages.
        let gpregs = |t: &collect::ThreadState| t.core.thread_info.as_ref().map(|ti| ti.gpregs);
        track::LazyKeep {
            stack_pointers: process
                .threads
                .iter()
                .filter_map(|t| gpregs(t).map(|g| g.sp))
                .collect(),
            pages: process
                .threads
                .iter()
                .flat_map(|t| {
                    let fs_base = gpregs(t).map(|g| g.fs_base).filter(|a| *a != 0);
                    let rseq = t
                        .core
                        .thread_core
                        .as_ref()
                        .and_then(|tc| tc.rseq_entry.as_ref())
                        .map(|r| r.rseq_abi_pointer)
                        .filter(|a| *a != 0);
                    fs_base.into_iter().chain(rseq)
                })
                .collect(),
        }
    });
    track::policies(&process.mm.vmas, set, parent, lazy_keep.as_ref())
}

/// Heap a full dump touches before the freeze: the collection's and the encoding's
/// allocations of a small process then fault in no fresh page while it is frozen (some 140
/// faults of 2-3 µs each without).
const FULL_DUMP_HEAP: usize = 1 << 20;

/// A full dump (or the frozen part of a lazy one) of one process, all of its threads.
#[tracing::instrument(skip_all, fields(pid = opts.pid))]
fn full_dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let pid = Pid::from_raw(opts.pid).ok_or(DumpError::BadPid(opts.pid))?;
    // Declared before `tree`, so dropped after it: signals wait until the target is let go.
    let _shield = SignalShield::raise();
    let mut client = connect_page_server(opts)?;
    // Asked before the freeze: a round trip to the page server is not the process's time.
    let parent = destination_has_parent(opts, pid, client.as_mut())?;
    let listener = match opts.mode {
        DumpMode::Lazy => {
            let addr = opts.lazy_listen.ok_or(DumpError::Options {
                mode: opts.mode,
                what: "--address and --port to serve the pages at",
            })?;
            Some(lazy::listen(addr)?)
        }
        _ => None,
    };
    // The final dump of a pre-copy, a lazy dump (post-copy) and a dump that leaves the
    // process stopped for a restore elsewhere (total copy) are the ones whose frozen time is
    // a migration's down time: smaps' page walk (~20 ms/GiB, 0.3 ms for a small process)
    // is done before the freeze, and kept if the VMAs stay the same.
    let migrating = opts.prev_images_dir.is_some()
        || opts.mode == DumpMode::Lazy
        || opts.final_state == FinalState::Stopped;
    let vma_source = if migrating {
        tracee::proc::smaps::read(pid)
            .map(collect::VmaSource::SmapsIfUnchanged)
            .unwrap_or(collect::VmaSource::Smaps)
    } else {
        collect::VmaSource::Smaps
    };
    // Made and warmed while the tree runs: none of it is frozen time.
    let reader = collect::TreeReader::start()?;
    collect::learn_xsave_layout();
    tracee::heap::warm(FULL_DUMP_HEAP);
    let freeze_start = Instant::now();
    // Every thread of every process is stopped from here; dropping `tree` resumes them
    // untouched.
    let mut tree = seize::freeze_tree(pid)?;
    let mut stats = DumpStats {
        freezing_time_us: micros(freeze_start),
        ..DumpStats::default()
    };
    let frozen_since = Instant::now();
    tracing::info!(
        processes = tree.processes().count(),
        zombies = tree.zombies().len(),
        threads = tree.processes().map(|p| p.threads().len()).sum::<usize>(),
        us = stats.freezing_time_us,
        "frozen"
    );
    refuse_tree(pid, opts, &tree)?;
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;

    let collect_start = Instant::now();
    let mut state = collect::tree_read_by(&mut tree, opts, vma_source, reader)?;
    stats.cow_shared_bytes = state.cow_shared_bytes;
    tracing::info!(us = micros(collect_start), "collected");
    // After the collect: arming injects a userfaultfd that must not be seen among the fds.
    // Tracking is refused for trees above, so only the root can have any.
    let root = tree
        .process_mut(pid)
        .ok_or(DumpError::Collect(collect::CollectError::NoThreads { pid }))?;
    let mut tracking = track::Tracking::start(root, opts)?;
    let maps = state
        .processes
        .first()
        .map(|p| p.maps.clone())
        .unwrap_or_default();
    let set = tracking.collect(&maps)?;
    for process in &mut state.processes {
        // Only the root can have a parent round: everything of the others is saved (or
        // left lazy).
        let policies = if process.pid == pid {
            full_policies(process, opts, set.as_ref(), parent)
        } else {
            full_policies(process, opts, None, false)
        };
        process.plan = pages::plan(&process.pages, &policies);
    }
    // Images are written while the process is still frozen: pages are read as they stream.
    let write_start = Instant::now();
    let mut to = match client.as_mut() {
        Some(c) => PagesTo::Server(c),
        None => PagesTo::Local,
    };
    let images = write::images(&state, opts, &mut to, &mut stats)?;
    tracing::info!(
        us = micros(write_start),
        pages = stats.pages_written,
        parent = stats.pages_skipped_parent,
        lazy = stats.pages_lazy,
        "written"
    );
    close_page_server(client, opts)?;
    if let Some(listener) = listener {
        tracking.finish(opts, true)?;
        stats.frozen_time_us = micros(frozen_since);
        images.commit(&stats)?;
        let ranges = state
            .processes
            .iter()
            .map(|p| (p.pid, lazy::lazy_ranges(&p.plan)))
            .collect();
        let outcome = lazy::serve(tree, listener, ranges, opts)?;
        tracing::info!(?outcome, "lazy pages served; the source is gone");
        return Ok(stats);
    }
    release::finish_tree(tree, opts.final_state)?;
    stats.frozen_time_us = micros(frozen_since);
    images.commit(&stats)?;
    // After the release: unregistering 1 GiB of write protection takes tens of ms that the
    // process need not spend frozen (or is not there any more to spend). The images are
    // complete, so a failure here is only reported.
    let release_tracking = opts.final_state != FinalState::Running || !opts.track_mem;
    if let Err(err) = tracking.finish(opts, release_tracking) {
        tracing::warn!(error = %err, "dump written, but dirty tracking was not finished cleanly");
    }
    Ok(stats)
}
