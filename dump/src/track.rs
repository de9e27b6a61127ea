//! Dirty tracking for pre-copy, as a dump uses it (`tracee::dirty` does the kernel work and
//! keeps the tracking in its holder process between `ckpt-dump` runs).
//!
//! Per round: [`Tracking::start`] attaches to the holder or arms afresh (only with
//! `--track-mem`), [`Tracking::collect`] reads what was written since the previous round while
//! the process is frozen, [`policies`] turns that into what to save of each VMA, and
//! [`Tracking::finish`] keeps the tracking for the next round (commit) or releases it.
//!
//! Queued pre-copy (`--hold-hot-pages`, pre-dumps only): [`Tracking::policies`] saves only
//! pages proven unwritten since the previous round that the destination lacks, holds back
//! the rest ([`queued_policies`]) and tells the tracker which pages it held. The next round,
//! queued or not, and the final dump get those pages as `pending` and save them unless they
//! are held again: nothing held is ever `PE_PARENT`. The first round proves nothing, so it
//! holds every page and sends none (the thesis's "initial transfer sends only clean pages",
//! with no dirty bits to tell clean ones yet).
//! Dropping a [`Tracking`] without finishing (a failed dump) releases it: the process runs
//! on exactly as before, without write protection.

use images_format::pb::VmaEntry;
use images_format::vma::{MapFlags, VmaStatus};
use tracee::dirty::{
    Attach, BackendChoice, BackendKind, DirtyError, DirtySet, DirtyTracker, HolderOptions,
    PageRange, VmaDirty, VmaReport, WholeReason,
};
use tracee::proc::maps::MapsEntry;
use tracee::{Pid, RemoteAddr, SeizedProcess, PAGE_SIZE};

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
    /// A queued pre-copy round: hold back the pages written since the previous round.
    hold: bool,
}

impl Tracking {
    /// With `--track-mem`, attaches to the tracking kept by an earlier round, or arms it
    /// (first round, or tracking lost). The process must be frozen. Tracking that cannot be
    /// set up is not an error: the dump is then full, and says so.
    pub fn start(tree: &mut SeizedProcess, opts: &DumpOptions) -> Result<Tracking, TrackError> {
        let pid = tree.pid();
        let follows_round = opts.prev_images_dir.is_some();
        let hold = opts.hold_hot_pages && opts.mode == crate::DumpMode::PreDump;
        let untracked = Tracking {
            pid,
            tracker: None,
            follows_round,
            hold: false,
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
            hold,
        })
    }

    /// Takes over the tracking an earlier round kept, without the process frozen: only
    /// where that tracking allows collecting while it runs (the userfaultfd back-end);
    /// `None` otherwise (then [`Tracking::start`], frozen).
    pub fn attach_running(pid: Pid, opts: &DumpOptions) -> Option<Tracking> {
        match DirtyTracker::attach(pid, &HolderOptions::default()) {
            Ok(Attach::Tracking(tracker)) if tracker.backend() == BackendKind::UffdWp => {
                Some(Tracking {
                    pid,
                    tracker: Some(*tracker),
                    follows_round: opts.prev_images_dir.is_some(),
                    hold: opts.hold_hot_pages && opts.mode == crate::DumpMode::PreDump,
                })
            }
            // Given back to its holder when dropped, for the frozen attach to take.
            Ok(_) | Err(_) => None,
        }
    }

    /// What to save of each VMA in a pre-dump ([`policies`], or with `--hold-hot-pages`
    /// [`queued_policies`], whose held pages the tracker then remembers for the next round).
    /// Without tracking nothing can be held: what is held must be remembered.
    pub fn policies(
        &mut self,
        vmas: &[VmaEntry],
        set: Option<&DirtySet>,
        parent: bool,
    ) -> Vec<VmaPolicy> {
        match self.tracker.as_mut().filter(|_| self.hold) {
            Some(tracker) => {
                let policies = queued_policies(vmas, set, parent);
                let held = held_ranges(&policies);
                tracker.hold(&held);
                tracing::info!(pid = %self.pid, held_in_vmas = tracker.held_pages(),
                    pending = set.map_or(0, DirtySet::pending_pages),
                    "queued round: pages written since the previous round are held back");
                policies
            }
            None => {
                if self.hold {
                    tracing::warn!(pid = %self.pid,
                        "--hold-hot-pages without dirty tracking: every page is sent");
                }
                policies(vmas, set, parent, None)
            }
        }
    }

    /// The mechanism that tracks, if any.
    pub fn backend(&self) -> Option<BackendKind> {
        self.tracker.as_ref().map(DirtyTracker::backend)
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

/// `set` (collected while the process runs) with what was written since, looked at without
/// protecting it again (the next collect still sees it). Called after a page scan that
/// follows the collect: a page written (perhaps first touched) between the two must not
/// pass for one of the previous round's, which may lack it. A VMA that cannot be looked at
/// is saved whole.
pub fn with_written_since(pid: Pid, set: Option<DirtySet>) -> Option<DirtySet> {
    let mut set = set?;
    for report in &mut set.vmas {
        let VmaDirty::Pages { written, .. } = &mut report.dirty else {
            continue;
        };
        let request = tracee::pagemap_scan::ScanRequest::written(report.vma.start, report.vma.end);
        match tracee::pagemap_scan::scan(pid, &request) {
            Ok(regions) => written.extend(regions.iter().map(|r| PageRange {
                start: r.start,
                end: r.end,
            })),
            Err(error) => {
                tracing::info!(%error, start = %report.vma.start, "saved whole");
                report.dirty = VmaDirty::Whole(WholeReason::Changed);
            }
        }
    }
    Some(set)
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

/// What a lazy dump keeps present rather than leaving to faults.
#[derive(Debug, Clone, Default)]
pub struct LazyKeep {
    /// The threads' stack pointers: the frames above each, and the red zone below.
    pub stack_pointers: Vec<u64>,
    /// Single pages the restored process touches first: each thread's TLS block and rseq
    /// area, which restore itself writes before the process runs (a fault then would be a
    /// round trip to the source inside the down time).
    pub pages: Vec<u64>,
}

/// What to save of each VMA (in address order; guard entries skipped). A VMA's pages may be
/// left to the parent only if `parent` (the destination holds the parent images) and the
/// VMA was tracked for the whole interval. `lazy_keep`: a lazy dump, with what stays present.
pub fn policies(
    vmas: &[VmaEntry],
    set: Option<&DirtySet>,
    parent: bool,
    lazy_keep: Option<&LazyKeep>,
) -> Vec<VmaPolicy> {
    dumpable(vmas)
        .map(|v| {
            let history = match report_of(v, set, parent) {
                // Pages written then zapped are not present, so the plan never lists them;
                // should one be present again, it is saved, never left to the parent. Pages
                // an earlier queued round held back are not in the parent either.
                Some(
                    r @ VmaReport {
                        dirty: VmaDirty::Pages { written, zeroed },
                        ..
                    },
                ) => VmaHistory::Written(ranges_of(written.iter().chain(zeroed).chain(&r.pending))),
                _ => VmaHistory::Unknown,
            };
            let lazy = lazy_keep.is_some() && lazy_capable(v);
            let keep = match lazy_keep {
                Some(wanted) if lazy => {
                    let inside = |addr: &&u64| v.start <= **addr && **addr < v.end;
                    let stacks = wanted.stack_pointers.iter().filter(inside).map(|&sp| {
                        let page = sp & !(PAGE_SIZE - 1);
                        // One page below for the red zone, the frames above.
                        let lo = page.saturating_sub(PAGE_SIZE).max(v.start);
                        let hi = page.saturating_add(STACK_KEEP_PAGES * PAGE_SIZE).min(v.end);
                        (lo, hi)
                    });
                    let pages = wanted.pages.iter().filter(inside).map(|&addr| {
                        let page = addr & !(PAGE_SIZE - 1);
                        (page, page.saturating_add(PAGE_SIZE).min(v.end))
                    });
                    let mut keep: Vec<(u64, u64)> = stacks.chain(pages).collect();
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

/// The VMAs whose pages are saved (guard entries are not VMAs of their own).
fn dumpable(vmas: &[VmaEntry]) -> impl Iterator<Item = &VmaEntry> {
    vmas.iter()
        .filter(|v| !VmaStatus::from_bits_retain(v.status).contains(VmaStatus::GUARD))
}

/// The tracker's report on exactly this VMA, if the parent images may be referred to.
fn report_of<'a>(v: &VmaEntry, set: Option<&'a DirtySet>, parent: bool) -> Option<&'a VmaReport> {
    set.filter(|_| parent)
        .and_then(|s| s.find(RemoteAddr(v.start)))
        .filter(|r| r.vma.start.get() == v.start && r.vma.end.get() == v.end)
}

/// Sorted, merged `(start, end)` pairs of page ranges.
fn ranges_of<'a>(ranges: impl Iterator<Item = &'a PageRange>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = ranges.map(|r| (r.start.get(), r.end.get())).collect();
    out.sort_unstable();
    merge(out)
}

/// What to save of each VMA in a queued pre-copy round: pages proven unwritten since the
/// previous round and held back by an earlier one are saved, pages written since (and every
/// page of a VMA nothing is proven about: first round, new, untracked, lost tracking, no
/// parent at the destination) are held back, the rest is in the parent images.
pub fn queued_policies(vmas: &[VmaEntry], set: Option<&DirtySet>, parent: bool) -> Vec<VmaPolicy> {
    dumpable(vmas)
        .map(|v| {
            let history = match report_of(v, set, parent) {
                Some(
                    r @ VmaReport {
                        dirty: VmaDirty::Pages { written, zeroed },
                        ..
                    },
                ) => VmaHistory::Queued {
                    hot: ranges_of(written.iter().chain(zeroed)),
                    pending: ranges_of(r.pending.iter()),
                },
                _ => VmaHistory::Queued {
                    hot: vec![(v.start, v.end)],
                    pending: Vec::new(),
                },
            };
            VmaPolicy {
                start: v.start,
                end: v.end,
                history,
                lazy: false,
                keep: Vec::new(),
            }
        })
        .collect()
}

/// The pages a queued round holds back (present or not: a held page that is absent now is
/// saved whenever it is present later without being written again), for the tracker.
pub fn held_ranges(policies: &[VmaPolicy]) -> Vec<PageRange> {
    let mut held: Vec<(u64, u64)> = policies
        .iter()
        .flat_map(|p| match &p.history {
            VmaHistory::Queued { hot, .. } => hot
                .iter()
                .map(|&(s, e)| (s.max(p.start), e.min(p.end)))
                .filter(|(s, e)| s < e)
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    held.sort_unstable();
    merge(held)
        .into_iter()
        .map(|(s, e)| PageRange {
            start: RemoteAddr(s),
            end: RemoteAddr(e),
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
        let keep = LazyKeep {
            stack_pointers: vec![0x10800, 0x7001_0000],
            pages: vec![0x2f010, 0x7001_0008],
        };
        let p = policies(&vmas, None, false, Some(&keep));
        assert_eq!(p.len(), 3);
        assert!(p[0].lazy && !p[1].lazy && !p[2].lazy);
        // The page below the stack pointer's page (clipped at the start) and 16 above, and
        // the one page of the TLS block.
        assert_eq!(
            p[0].keep,
            vec![(0x10000, 0x10000 + 16 * PAGE_SIZE), (0x2f000, 0x30000)]
        );
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

#[cfg(test)]
mod queued_tests {
    use super::*;
    use crate::collect::PageRun;
    use crate::pages::{plan, RunKind};
    use tracee::dirty::{BackendKind, VmaKey, WriteHistory};

    const BASE: u64 = 0x10_0000;
    const PAGES: u64 = 64;

    fn heap() -> VmaEntry {
        VmaEntry {
            start: BASE,
            end: BASE + PAGES * PAGE_SIZE,
            status: (VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE).bits(),
            flags: 0x22,
            fd: -1,
            ..VmaEntry::default()
        }
    }

    fn range(first: u64, last: u64) -> PageRange {
        PageRange {
            start: RemoteAddr(BASE + first * PAGE_SIZE),
            end: RemoteAddr(BASE + last * PAGE_SIZE),
        }
    }

    /// Page indices as ranges.
    fn ranges(pages: &[u64]) -> Vec<PageRange> {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out: Vec<PageRange> = Vec::new();
        for p in sorted {
            match out.last_mut() {
                Some(last) if last.end.get() == BASE + p * PAGE_SIZE => {
                    last.end = RemoteAddr(last.end.get() + PAGE_SIZE)
                }
                _ => out.push(range(p, p + 1)),
            }
        }
        out
    }

    /// What the tracker reports for the heap: `written` pages, and the ranges held before.
    fn set(written: &[u64], pending: &[PageRange]) -> DirtySet {
        let vma = heap();
        DirtySet {
            round: 2,
            backend: BackendKind::UffdWp,
            vmas: vec![VmaReport {
                vma: VmaKey {
                    start: RemoteAddr(vma.start),
                    end: RemoteAddr(vma.end),
                    perms: 3,
                    pgoff: 0,
                    dev: (0, 0),
                    inode: 0,
                },
                dirty: VmaDirty::Pages {
                    written: ranges(written),
                    zeroed: Vec::new(),
                },
                history: WriteHistory::default(),
                pending: pending.to_vec(),
            }],
        }
    }

    fn kinds(policies: &[VmaPolicy]) -> Vec<RunKind> {
        let runs = [PageRun {
            start: BASE,
            pages: PAGES,
        }];
        let mut out = Vec::new();
        for r in plan(&runs, policies) {
            out.extend(std::iter::repeat_n(r.kind, r.pages as usize));
        }
        out
    }

    #[test]
    fn the_first_queued_round_holds_everything() {
        let p = queued_policies(&[heap()], None, false);
        assert!(kinds(&p).iter().all(|&k| k == RunKind::Held));
        assert_eq!(held_ranges(&p), vec![range(0, PAGES)]);
        // Tracked, but the destination lacks the parent: nothing is proven either.
        let s = set(&[1], &[]);
        let p = queued_policies(&[heap()], Some(&s), false);
        assert_eq!(held_ranges(&p), vec![range(0, PAGES)]);
    }

    #[test]
    fn hot_pages_are_held_and_cooled_ones_sent() {
        // Held before: 0..8. Written since: 2, 3 and 20.
        let s = set(&[2, 3, 20], &[range(0, 8)]);
        let p = queued_policies(&[heap()], Some(&s), true);
        let k = kinds(&p);
        for (i, kind) in k.iter().enumerate() {
            let want = match i {
                2 | 3 | 20 => RunKind::Held,
                0..8 => RunKind::Dump,
                _ => RunKind::Parent,
            };
            assert_eq!(*kind, want, "page {i}");
        }
        assert_eq!(held_ranges(&p), vec![range(2, 4), range(20, 21)]);
    }

    #[test]
    fn held_pages_are_saved_by_a_round_that_does_not_hold() {
        // The final dump (or a plain pre-dump) after a queued round.
        let s = set(&[30], &[range(0, 4)]);
        let k = kinds(&policies(&[heap()], Some(&s), true, None));
        for (i, kind) in k.iter().enumerate() {
            let want = if i < 4 || i == 30 {
                RunKind::Dump
            } else {
                RunKind::Parent
            };
            assert_eq!(*kind, want, "page {i}");
        }
    }

    /// Image of one round: page -> its version, or in the parent; absent when held.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Slot {
        Data(u64),
        Parent,
    }

    /// Random rounds (queued or plain, in any mix), then the final dump: the chain the
    /// destination restores from gives every page's last contents, and no `PE_PARENT` points
    /// at a page its parent lacks (the page server refuses those).
    #[test]
    fn any_chain_of_rounds_restores_the_exact_memory() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _trial in 0..200 {
            let mut mem = vec![0u64; PAGES as usize];
            let mut version = 0u64;
            let mut images: Vec<Vec<Option<Slot>>> = Vec::new();
            let mut held: Vec<PageRange> = Vec::new();
            let mut written: Vec<u64> = Vec::new();
            let rounds = 1 + rnd(6);
            for round in 0..=rounds {
                let last = round == rounds;
                let queued = !last && rnd(3) != 0;
                let s = set(&written, &held);
                let tracked = round > 0;
                let s = tracked.then_some(&s);
                let p = if queued {
                    queued_policies(&[heap()], s, tracked)
                } else {
                    policies(&[heap()], s, tracked, None)
                };
                held = if queued { held_ranges(&p) } else { Vec::new() };
                let image: Vec<Option<Slot>> = kinds(&p)
                    .iter()
                    .zip(&mem)
                    .map(|(k, &v)| match k {
                        RunKind::Dump => Some(Slot::Data(v)),
                        RunKind::Parent => Some(Slot::Parent),
                        RunKind::Held => None,
                        RunKind::Lazy => panic!("no lazy pages here"),
                    })
                    .collect();
                for (i, slot) in image.iter().enumerate() {
                    if *slot == Some(Slot::Parent) {
                        let parent = images.last().and_then(|img| img[i]);
                        assert!(parent.is_some(), "page {i} PE_PARENT, parent lacks it");
                    }
                }
                images.push(image);
                if last {
                    // The final dump is taken frozen: the chain must give the memory now.
                    for (i, &want) in mem.iter().enumerate() {
                        let got = images.iter().rev().find_map(|img| match img[i] {
                            Some(Slot::Data(v)) => Some(Some(v)),
                            Some(Slot::Parent) => None,
                            None => Some(None),
                        });
                        assert_eq!(got, Some(Some(want)), "page {i} after {rounds} rounds");
                    }
                    break;
                }
                // The process runs on: a few hot pages often, the others now and then.
                written.clear();
                for _ in 0..rnd(12) {
                    let page = if rnd(2) == 0 { rnd(4) } else { rnd(PAGES) };
                    version += 1;
                    mem[page as usize] = version;
                    written.push(page);
                }
            }
        }
    }
}
