//! `ckpt-dump`: freeze a process, read its whole state from outside (ptrace, injected
//! syscalls, `/proc`, `PAGEMAP_SCAN`, `process_vm_readv`) and write it as CRIU-format images.
//!
//! The sequence is [`dump`]: freeze, collect (reads only), write (never ptraces), release.
//! An error anywhere before release drops the frozen process, which resumes it exactly as it
//! was; only [`release::finish`] may kill it.
//!
//! What a dump directory holds, with CRIU's meaning of every field:
//!
//! ```text
//! inventory.img        img_version 2, fdinfo_per_id, ns_per_id, root_ids = ckpt-dump's own
//!                      ids (1 for mm/files/fs/sighand), so equal namespace ids mean "shared"
//! pstree.img           one entry per process (pid, ppid 0 for the root, pgid, sid, threads)
//! core-TID.img         per thread: gpregs (incl. orig_ax, fs/gs base), fpregs + xsave by
//!                      component, clear_tid_addr, thread_core (sigmask, private pending
//!                      signals, rseq, robust list, sigaltstack, sched, pdeath, creds, seccomp,
//!                      comm); the leader's also has tc (62 sigactions in signal order without
//!                      SIGKILL/SIGSTOP, timers, rlimits, shared pending signals, ...)
//! ids-PID.img          kernel object ids; files_id names fdinfo-<files_id>.img
//! mm-PID.img           mm fields (brk from brk(0), auxv), exe_file_id, every VMA (VMA_AREA_*
//!                      status, MAP_* flags, madv bits; shmid = file id of file mappings), and
//!                      VMA_AREA_GUARD-only entries for guard regions after the real VMAs
//! pagemap-PID.img      pagemap_head{pages_id} + PE_PRESENT runs (adjacent runs are merged,
//!  + pages-N.img       even across VMAs), contents in pages-N.img in the same order
//! fdinfo-N.img         {file id, FD_CLOEXEC, REG, fd} per fd
//! files.img            reg_file_entry per open file description, exe, cwd, root and mapped
//!                      file (path, open flags without O_CLOEXEC, pos, mode, size, build-id)
//! remap-fpath.img      GHOST remaps of deleted files (open or mapped) to
//!  + ghost-file-N.img  ghost_file_entry followed by the whole contents (never chunked)
//! fs-PID.img           cwd and root file ids, umask
//! seccomp.img          each thread's filters, oldest first; prev = the older filter's index,
//!                      thread_core.seccomp_filter = index of the thread's newest
//! timens-0.img         CLOCK_MONOTONIC and CLOCK_BOOTTIME at dump time
//! stats-dump           freezing/frozen/memdump/memwrite (µs) and page counts
//! ```
#![forbid(unsafe_code)]

pub mod collect;
mod direct;
pub mod fault;
mod ids;
pub mod release;
pub mod seize;
pub mod write;

use std::path::PathBuf;
use std::time::Instant;

pub use fault::{FaultPoint, InjectedFault};
use tracee::Pid;

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
    /// A step to fail on purpose (`CKPT_FAULT`).
    pub fault: Option<FaultPoint>,
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
    /// Pages left to a parent image (none yet: no pre-dump).
    pub pages_skipped_parent: u64,
    /// Pages written into `pages-N.img`.
    pub pages_written: u64,
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

/// Dumps one process (all of its threads) into `opts.images_dir`.
#[tracing::instrument(skip_all, fields(pid = opts.pid))]
pub fn dump(opts: &DumpOptions) -> Result<DumpStats, DumpError> {
    let pid = Pid::from_raw(opts.pid).ok_or(DumpError::BadPid(opts.pid))?;
    // Declared before `tree`, so dropped after it: signals wait until the target is let go.
    let _shield = SignalShield::raise();
    let freeze_start = Instant::now();
    // Every thread is stopped from here; dropping `tree` resumes them untouched.
    let mut tree = seize::freeze_process(pid)?;
    let mut stats = DumpStats {
        freezing_time_us: micros(freeze_start),
        ..DumpStats::default()
    };
    let frozen_since = Instant::now();
    tracing::info!(
        threads = tree.threads().len(),
        us = stats.freezing_time_us,
        "frozen"
    );
    fault::check(opts.fault, FaultPoint::AfterFreeze)?;

    let collect_start = Instant::now();
    let state = collect::process(&mut tree, opts)?;
    tracing::info!(us = micros(collect_start), "collected");
    // Images are written while the process is still frozen: pages are read as they stream.
    let write_start = Instant::now();
    let images = write::images(&state, opts, &mut stats)?;
    tracing::info!(
        us = micros(write_start),
        pages = stats.pages_written,
        "written"
    );
    release::finish(tree, opts.final_state)?;
    stats.frozen_time_us = micros(frozen_since);
    images.commit(&stats)?;
    Ok(stats)
}
