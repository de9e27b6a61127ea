//! The memory of a prepared dump after pre-copy rounds: `ckpt-dump --prepare` without
//! `--lazy-pages`, the last step of a pre-copy, where the destination holds every page; and
//! with `--lazy-pages --track-mem` (assisted post-copy), where it holds the pages unwritten
//! since the round, and the source serves the others.
//!
//! Why: the final dump of a pre-copy rebuilds the whole process inside the down time, when
//! all that changed since the previous round is a few pages and registers. Prepared, the
//! destination rebuilds it from S1's images (pages written since the previous round, the
//! rest in the parent images it already holds) while it runs on, and S2 only has to send
//! what changed since S1, which for memory dirty tracking tells:
//!
//! ```text
//! T   take over the tracking the rounds kept and collect what was written since the
//!     previous round, while the process runs (the userfaultfd back-end allows it); or,
//!     with none to take over, a freeze of its own to arm it
//! S1  the usual prepared S1 (see `prepare`); its page plan takes T's dirty set and what
//!     was written since T (looked at after S1's page scan, not protected again), so that
//!     pages unwritten since the previous round, and only those, are PE_PARENT (a page
//!     first touched after T is not the round's); the pages are read after T, while the
//!     process runs: a page written after T is torn or stale in S1's images, and tracked
//!     as written
//! S2  collect what was written since T; if the VMAs are S1's and every private VMA was
//!     tracked page by page, S1's pagemap and pages images stand for S2's and the pages
//!     written since T cross as the delta's pages (written over the destination's copy,
//!     or put in where it has none), read from the frozen process, but S1's lazy pages
//!     (the source serves them as they are now); else S2 saves the memory whole (and the
//!     destination rebuilds from the new images)
//! ```
//!
//! S1's page images then stay the set's: the image directories, at both ends, hold the
//! memory as S1 read it, and the pages written since crossed in the delta only (the
//! process at the destination has them). T must come before S1's freezes: the tracking's
//! injections (arming is a `userfaultfd` in the process) would count as the process's own
//! syscalls after them, and rule the light S2 out.
//!
//! Only the userfaultfd back-end allows reading the pages while the process runs; with
//! another, or none, S2 saves the memory whole. A tree is refused: tracking follows one
//! process.

use images_format::pb::VmaEntry;
use images_format::switch::HotPages;
use images_format::vma::VmaStatus;
use tracee::dirty::{BackendKind, DirtySet, PageRange, VmaDirty};
use tracee::memory::{self, RemoteRange};
use tracee::{Pid, RemoteAddr, PAGE_SIZE};

use crate::collect::ProcessState;
use crate::track::Tracking;
use crate::{release, seize, DumpError, DumpOptions};

/// The tracking between T and S2, and S1's VMAs and lazy pages.
#[derive(Debug)]
pub struct SwitchPages {
    tracking: Tracking,
    /// S1's VMAs: its page images stand for S2's only over the same ones.
    vmas: Vec<VmaEntry>,
    /// S1's lazy pages (sorted `[start, end)`): the source serves them as they are at S2,
    /// so a write since needs nothing more.
    lazy: Vec<(u64, u64)>,
}

impl SwitchPages {
    /// T: takes over the rounds' tracking while the process runs (or, with none to take
    /// over, freezes the process alone and arms it) and collects what was written since
    /// the previous round; returns the tracking and that set (`None`: untracked, every
    /// page is saved).
    pub fn start(pid: Pid, opts: &DumpOptions) -> Result<(Tracking, Option<DirtySet>), DumpError> {
        crate::refuse_children(pid, "a prepared dump after rounds")?;
        let started = std::time::Instant::now();
        // The rounds' tracking, taken over while the process runs: no freeze at all.
        if let Some(mut tracking) = Tracking::attach_running(pid, opts) {
            let set = tracking.collect(&crate::maps_of(pid)?)?;
            tracing::info!(
                us = started.elapsed().as_micros() as u64,
                "T: tracking taken over"
            );
            return Ok((tracking, set));
        }
        let mut process = seize::freeze_process(pid)?;
        let tracked = DumpOptions {
            track_mem: true,
            ..opts.clone()
        };
        let mut tracking = Tracking::start(&mut process, &tracked)?;
        let set = tracking.collect(&crate::maps_of(pid)?)?;
        process
            .resume()
            .map_err(|source| DumpError::Release(release::ReleaseError::Resume { pid, source }))?;
        tracing::info!(
            us = started.elapsed().as_micros() as u64,
            "T: tracking armed, frozen"
        );
        Ok((tracking, set))
    }

    /// After S1: keeps the tracking for S2 with S1's VMAs and lazy pages.
    pub fn after_s1(tracking: Tracking, s1: &ProcessState) -> SwitchPages {
        SwitchPages {
            tracking,
            vmas: s1.mm.vmas.clone(),
            lazy: crate::lazy::lazy_ranges(&s1.plan),
        }
    }

    /// S1's lazy pages, which the source serves when S2 kept S1's page images.
    pub fn lazy_ranges(&self) -> &[(u64, u64)] {
        &self.lazy
    }

    /// In S2's freeze: the pages written since T, read from the frozen process, if S1's
    /// page images still describe the rest of its memory; `None` if S2 must save it whole
    /// (the log says why).
    pub fn since_s1(&mut self, process: &ProcessState) -> Option<Vec<HotPages>> {
        let whole = |why: &str| {
            tracing::info!(why, "S2 saves the memory whole");
            None
        };
        if process.mm.vmas != self.vmas {
            return whole("the mappings changed since S1");
        }
        if self.tracking.backend() != Some(BackendKind::UffdWp) {
            return whole("no dirty tracking that allows reading pages while the process runs");
        }
        let set = match self.tracking.collect(&process.maps) {
            Ok(Some(set)) => set,
            Ok(None) | Err(_) => return whole("the dirty tracking was lost"),
        };
        let runs = match written_runs(&set, &process.mm.vmas) {
            Ok(runs) => without(runs, &self.lazy),
            Err(why) => return whole(why),
        };
        let mut out = Vec::with_capacity(runs.len());
        let ranges: Vec<RemoteRange> = runs
            .iter()
            .filter(|r| !r.zero)
            .map(|r| RemoteRange {
                addr: RemoteAddr(r.start),
                len: r.len(),
            })
            .collect();
        let mut data = vec![0u8; ranges.iter().map(|r| r.len).sum()];
        if let Err(error) = memory::read_remote_vectored(process.pid, &ranges, &mut data) {
            tracing::info!(%error, "cannot read the pages written since S1");
            return whole("the written pages cannot be read");
        }
        let mut at = 0;
        for run in runs {
            let bytes = if run.zero {
                vec![0u8; run.len()]
            } else {
                at += run.len();
                data[at - run.len()..at].to_vec()
            };
            out.push(HotPages {
                pid: process.pid.as_raw(),
                vaddr: run.start,
                data: bytes,
            });
        }
        Some(out)
    }
}

/// Pages written since the previous collect, from `start` on: with their bytes, or zero
/// (written, then dropped: they read as zero in anonymous memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WrittenRun {
    start: u64,
    end: u64,
    zero: bool,
}

impl WrittenRun {
    fn len(&self) -> usize {
        usize::try_from(self.end - self.start).unwrap_or(usize::MAX)
    }
}

/// The runs of `set`, in address order; an error says why they do not tell every change of
/// the private memory of `vmas` (a private VMA saved whole, or anonymous-looking zeroes in
/// a file mapping, which would read back the file's bytes instead).
fn written_runs(set: &DirtySet, vmas: &[VmaEntry]) -> Result<Vec<WrittenRun>, &'static str> {
    let private = VmaStatus::ANON_PRIVATE | VmaStatus::FILE_PRIVATE;
    let kernel = VmaStatus::VDSO | VmaStatus::VVAR | VmaStatus::VSYSCALL | VmaStatus::GUARD;
    let mut runs = Vec::new();
    for report in &set.vmas {
        let start = report.vma.start.get();
        let status = vmas
            .iter()
            .find(|v| v.start == start)
            .map(|v| VmaStatus::from_bits_retain(v.status))
            .unwrap_or(VmaStatus::empty());
        let counts = status.intersects(private) && !status.intersects(kernel);
        match &report.dirty {
            VmaDirty::Whole(_) if counts => return Err("a private mapping is not tracked"),
            VmaDirty::Whole(_) => {}
            VmaDirty::Pages { written, zeroed } => {
                if !zeroed.is_empty() && !status.contains(VmaStatus::ANON_PRIVATE) {
                    return Err("pages of a file mapping were dropped");
                }
                let runs_of = |ranges: &[PageRange], zero: bool| {
                    ranges
                        .iter()
                        .map(|r| WrittenRun {
                            start: r.start.get(),
                            end: r.end.get(),
                            zero,
                        })
                        .collect::<Vec<_>>()
                };
                runs.extend(runs_of(written, false));
                runs.extend(runs_of(zeroed, true));
            }
        }
    }
    runs.sort_unstable_by_key(|r| r.start);
    debug_assert!(runs.iter().all(|r| r.start % PAGE_SIZE == 0));
    Ok(runs)
}

/// `runs` (in address order) less the pages in `lazy` (sorted, disjoint).
fn without(runs: Vec<WrittenRun>, lazy: &[(u64, u64)]) -> Vec<WrittenRun> {
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        let mut start = run.start;
        for &(lo, hi) in lazy
            .iter()
            .filter(|&&(lo, hi)| lo < run.end && run.start < hi)
        {
            if lo > start {
                out.push(WrittenRun {
                    start,
                    end: lo,
                    ..run
                });
            }
            start = start.max(hi);
        }
        if start < run.end {
            out.push(WrittenRun { start, ..run });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracee::dirty::{VmaKey, VmaReport, WholeReason};

    fn vma(start: u64, end: u64, status: VmaStatus) -> VmaEntry {
        VmaEntry {
            start,
            end,
            status: status.bits(),
            ..VmaEntry::default()
        }
    }

    fn range(start: u64, pages: u64) -> PageRange {
        PageRange {
            start: RemoteAddr(start),
            end: RemoteAddr(start + pages * PAGE_SIZE),
        }
    }

    fn report(start: u64, end: u64, dirty: VmaDirty) -> VmaReport {
        VmaReport {
            vma: VmaKey {
                start: RemoteAddr(start),
                end: RemoteAddr(end),
                perms: 3,
                pgoff: 0,
                dev: (0, 0),
                inode: 0,
            },
            dirty,
            history: Default::default(),
            pending: Vec::new(),
        }
    }

    #[test]
    fn written_and_dropped_pages_become_runs_in_address_order() {
        let anon = VmaStatus::ANON_PRIVATE | VmaStatus::REGULAR;
        let vmas = [vma(0x10000, 0x20000, anon), vma(0x40000, 0x50000, anon)];
        let set = DirtySet {
            round: 2,
            backend: BackendKind::UffdWp,
            vmas: vec![
                report(
                    0x40000,
                    0x50000,
                    VmaDirty::Pages {
                        written: vec![range(0x41000, 2)],
                        zeroed: vec![],
                    },
                ),
                report(
                    0x10000,
                    0x20000,
                    VmaDirty::Pages {
                        written: vec![range(0x13000, 1)],
                        zeroed: vec![range(0x11000, 1)],
                    },
                ),
            ],
        };
        let runs = written_runs(&set, &vmas).expect("tracked page by page");
        let starts: Vec<(u64, bool)> = runs.iter().map(|r| (r.start, r.zero)).collect();
        assert_eq!(
            starts,
            vec![(0x11000, true), (0x13000, false), (0x41000, false)]
        );
        assert_eq!(runs[2].len(), 2 * PAGE_SIZE as usize);
    }

    #[test]
    fn lazy_pages_are_left_out_of_the_written_runs() {
        const P: u64 = PAGE_SIZE;
        let run = |start: u64, pages: u64| WrittenRun {
            start,
            end: start + pages * P,
            zero: false,
        };
        let runs = vec![run(0x10000, 8), run(0x20000, 2)];
        let lazy = [(0x11000, 0x13000), (0x16000, 0x20000 + P)];
        assert_eq!(
            without(runs, &lazy),
            vec![run(0x10000, 1), run(0x13000, 3), run(0x20000 + P, 1)]
        );
        assert_eq!(without(vec![run(0x11000, 2)], &lazy), Vec::new());
    }

    #[test]
    fn an_untracked_private_mapping_or_dropped_file_pages_mean_saving_whole() {
        let anon = VmaStatus::ANON_PRIVATE | VmaStatus::REGULAR;
        let file = VmaStatus::FILE_PRIVATE | VmaStatus::REGULAR;
        let vdso = VmaStatus::VDSO | VmaStatus::REGULAR;
        let whole = |start, end| report(start, end, VmaDirty::Whole(WholeReason::Untracked));
        let vmas = [vma(0x1000, 0x2000, vdso), vma(0x10000, 0x20000, anon)];
        let kernel_only = DirtySet {
            round: 2,
            backend: BackendKind::UffdWp,
            vmas: vec![whole(0x1000, 0x2000)],
        };
        assert_eq!(written_runs(&kernel_only, &vmas), Ok(Vec::new()));
        let anon_whole = DirtySet {
            vmas: vec![whole(0x10000, 0x20000)],
            ..kernel_only.clone()
        };
        assert!(written_runs(&anon_whole, &vmas).is_err());
        let files = [vma(0x10000, 0x20000, file)];
        let dropped = DirtySet {
            vmas: vec![report(
                0x10000,
                0x20000,
                VmaDirty::Pages {
                    written: vec![],
                    zeroed: vec![range(0x10000, 1)],
                },
            )],
            ..kernel_only
        };
        assert!(written_runs(&dropped, &files).is_err());
    }
}
