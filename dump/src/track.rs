//! Dirty tracking for pre-copy, as a dump uses it (`tracee::dirty` does the kernel work and
//! keeps the tracking in its holder process between `ckpt-dump` runs).
//!
//! Per round: [`Tracking::start`] attaches to the holder or arms afresh (only with
//! `--track-mem`), [`Tracking::collect`] reads what was written since the previous round while
//! the process is frozen, [`policies`] turns that into what to save of each VMA, and
//! [`Tracking::finish`] keeps the tracking for the next round (commit) or releases it.
//! Dropping a [`Tracking`] without finishing (a failed dump) releases it: the process runs
//! on exactly as before, without write protection.

use images_format::pb::VmaEntry;
use images_format::vma::{MapFlags, VmaStatus};
use tracee::dirty::{
    Attach, BackendChoice, DirtyError, DirtySet, DirtyTracker, HolderOptions, VmaDirty, WholeReason,
};
use tracee::proc::maps::MapsEntry;
use tracee::{Pid, SeizedProcess, PAGE_SIZE};

use crate::pages::{VmaHistory, VmaPolicy};
use crate::DumpOptions;

/// Pages above a thread's stack pointer kept present in a lazy dump (the frames in use).
const STACK_KEEP_PAGES: u64 = 16;

/// Keeping or releasing the tracking failed (the images themselves are fine).
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("dump: pid {pid}: keep dirty tracking for the next round")]
    Commit {
        pid: Pid,
        #[source]
        source: DirtyError,
    },
    #[error("dump: pid {pid}: release dirty tracking")]
    Release {
        pid: Pid,
        #[source]
        source: DirtyError,
    },
}

/// The dirty tracking of one dump run, if any.
#[derive(Debug)]
pub struct Tracking {
    pid: Pid,
    tracker: Option<DirtyTracker>,
    /// A previous round is named (`--prev-images-dir`): lost tracking deserves a warning.
    follows_round: bool,
}

impl Tracking {
    /// With `--track-mem`, attaches to the tracking kept by an earlier round, or arms it
    /// (first round, or tracking lost). The process must be frozen. Tracking that cannot be
    /// set up is not an error: the dump is then full, and says so.
    pub fn start(tree: &mut SeizedProcess, opts: &DumpOptions) -> Result<Tracking, TrackError> {
        let pid = tree.pid();
        let follows_round = opts.prev_images_dir.is_some();
        let untracked = Tracking {
            pid,
            tracker: None,
            follows_round,
        };
        if !opts.track_mem {
            return Ok(untracked);
        }
        let Some(leader) = tree.leader_mut() else {
            return Ok(untracked);
        };
        let tracker = match DirtyTracker::attach_or_arm(
            leader,
            BackendChoice::Auto,
            &HolderOptions::default(),
        ) {
            Ok(tracker) => Some(tracker),
            Err(err) => {
                tracing::warn!(%pid, error = %err, "dirty tracking cannot be armed: full dump");
                None
            }
        };
        Ok(Tracking {
            pid,
            tracker,
            follows_round,
        })
    }

    /// What was written since the previous round, re-protecting it (`None`: untracked).
    pub fn collect(&mut self, maps: &[MapsEntry]) -> Result<Option<DirtySet>, TrackError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Ok(None);
        };
        match tracker.collect(maps) {
            Ok(set) => {
                let lost = set.vmas.iter().find_map(|v| match v.dirty {
                    VmaDirty::Whole(WholeReason::Lost(reason)) => Some(reason),
                    _ => None,
                });
                match lost {
                    Some(reason) if self.follows_round => tracing::warn!(pid = %self.pid,
                        ?reason, "dirty tracking was lost since the previous round: full dump"),
                    Some(_) => tracing::info!(pid = %self.pid, "dirty tracking armed"),
                    None => {}
                }
                for v in &set.vmas {
                    if let VmaDirty::Whole(reason) = v.dirty {
                        tracing::debug!(start = %v.vma.start, end = %v.vma.end, ?reason,
                            "saved whole");
                    }
                }
                tracing::info!(pid = %self.pid, round = set.round, backend = ?set.backend,
                    written = set.written_pages(), full = set.is_full(), "dirty pages collected");
                Ok(Some(set))
            }
            Err(err) => {
                tracing::warn!(pid = %self.pid, error = %err,
                    "dirty pages cannot be collected: full dump, tracking restarts");
                self.tracker = None;
                Ok(None)
            }
        }
    }

    /// Ends this round: `release` stops the tracking, otherwise it is kept for the next
    /// round. Without `--track-mem` and with `release`, tracking an earlier round left is
    /// released too, so that nothing of it stays on the process.
    pub fn finish(mut self, opts: &DumpOptions, release: bool) -> Result<(), TrackError> {
        let pid = self.pid;
        let Some(tracker) = self.tracker.take() else {
            if release && !opts.track_mem {
                let attached = DirtyTracker::attach(pid, &HolderOptions::default());
                if let Ok(Attach::Tracking(tracker)) = attached {
                    tracing::info!(%pid, "releasing the dirty tracking of an earlier round");
                    tracker
                        .release()
                        .map_err(|source| TrackError::Release { pid, source })?;
                }
            }
            return Ok(());
        };
        if release {
            tracker
                .release()
                .map_err(|source| TrackError::Release { pid, source })
        } else {
            let holder = tracker
                .commit()
                .map_err(|source| TrackError::Commit { pid, source })?;
            tracing::info!(%pid, holder = ?holder, "dirty tracking kept for the next round");
            Ok(())
        }
    }
}

/// Releases tracking an earlier round left on `pid`, if any (after a failed dump, whose own
/// tracker, if it had one, was released when dropped). Failures are only logged: the dump
/// has already failed for a better reason.
pub fn release_held(pid: Pid) {
    match DirtyTracker::attach(pid, &HolderOptions::default()) {
        Ok(Attach::Tracking(tracker)) => match tracker.release() {
            Ok(()) => tracing::info!(%pid, "dirty tracking released after the failure"),
            Err(err) => tracing::warn!(%pid, error = %err, "cannot release dirty tracking"),
        },
        Ok(Attach::Lost(_)) => {}
        Err(err) => tracing::debug!(%pid, error = %err, "no dirty tracking to release"),
    }
}

/// Whether a VMA's pages may be left to a lazy restore: private anonymous memory that is
/// neither a stack, locked, nor a kernel-provided page.
fn lazy_capable(vma: &VmaEntry) -> bool {
    let status = VmaStatus::from_bits_retain(vma.status);
    let kernel = VmaStatus::VDSO | VmaStatus::VVAR | VmaStatus::VSYSCALL | VmaStatus::GUARD;
    status.contains(VmaStatus::ANON_PRIVATE)
        && !status.intersects(kernel)
        && !MapFlags::from_bits_retain(vma.flags).intersects(MapFlags::GROWSDOWN | MapFlags::LOCKED)
}

/// What to save of each VMA (in address order; guard entries skipped). A VMA's pages may be
/// left to the parent only if `parent` (the destination holds the parent images) and the
/// VMA was tracked for the whole interval. `lazy_keep`: a lazy dump, with the stack
/// pointers of the threads, whose pages stay present.
pub fn policies(
    vmas: &[VmaEntry],
    set: Option<&DirtySet>,
    parent: bool,
    lazy_keep: Option<&[u64]>,
) -> Vec<VmaPolicy> {
    vmas.iter()
        .filter(|v| !VmaStatus::from_bits_retain(v.status).contains(VmaStatus::GUARD))
        .map(|v| {
            let report = set
                .filter(|_| parent)
                .and_then(|s| s.find(tracee::RemoteAddr(v.start)))
                .filter(|r| r.vma.start.get() == v.start && r.vma.end.get() == v.end);
            let history = match report.map(|r| &r.dirty) {
                // Pages written then zapped are not present, so the plan never lists them;
                // should one be present again, it is saved, never left to the parent.
                Some(VmaDirty::Pages { written, zeroed }) => {
                    let mut ranges: Vec<(u64, u64)> = written
                        .iter()
                        .chain(zeroed)
                        .map(|r| (r.start.get(), r.end.get()))
                        .collect();
                    ranges.sort_unstable();
                    VmaHistory::Written(merge(ranges))
                }
                _ => VmaHistory::Unknown,
            };
            let lazy = lazy_keep.is_some() && lazy_capable(v);
            let keep = match lazy_keep {
                Some(sps) if lazy => {
                    let mut keep: Vec<(u64, u64)> = sps
                        .iter()
                        .filter(|&&sp| v.start <= sp && sp < v.end)
                        .map(|&sp| {
                            let page = sp & !(PAGE_SIZE - 1);
                            // One page below for the red zone, the frames above.
                            let lo = page.saturating_sub(PAGE_SIZE).max(v.start);
                            let hi = page.saturating_add(STACK_KEEP_PAGES * PAGE_SIZE).min(v.end);
                            (lo, hi)
                        })
                        .collect();
                    keep.sort_unstable();
                    merge(keep)
                }
                _ => Vec::new(),
            };
            VmaPolicy {
                start: v.start,
                end: v.end,
                history,
                lazy,
                keep,
            }
        })
        .collect()
}

/// Merges sorted ranges that touch or overlap.
fn merge(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(start: u64, end: u64, flags: u32) -> VmaEntry {
        VmaEntry {
            start,
            end,
            status: (VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE).bits(),
            flags: 0x22 | flags,
            fd: -1,
            ..VmaEntry::default()
        }
    }

    #[test]
    fn lazy_dumps_keep_stacks_and_kernel_pages() {
        let heap = anon(0x10000, 0x30000, 0);
        let stack = anon(0x7000_0000, 0x7002_0000, MapFlags::GROWSDOWN.bits());
        let mut vdso = anon(0x8000_0000, 0x8000_2000, 0);
        vdso.status |= VmaStatus::VDSO.bits();
        let guard = VmaEntry {
            start: 0x20000,
            end: 0x21000,
            status: VmaStatus::GUARD.bits(),
            ..VmaEntry::default()
        };
        let vmas = [heap, stack, vdso, guard];
        let p = policies(&vmas, None, false, Some(&[0x10800, 0x7001_0000]));
        assert_eq!(p.len(), 3);
        assert!(p[0].lazy && !p[1].lazy && !p[2].lazy);
        // The page below the stack pointer's page (clipped at the start) and 16 above.
        assert_eq!(p[0].keep, vec![(0x10000, 0x10000 + 16 * PAGE_SIZE)]);
        assert!(p.iter().all(|p| p.history == VmaHistory::Unknown));
        let full = policies(&vmas, None, true, None);
        assert!(full.iter().all(|p| !p.lazy && p.keep.is_empty()));
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge(vec![(0, 10), (5, 20), (20, 30), (40, 50)]),
            vec![(0, 30), (40, 50)]
        );
    }
}
