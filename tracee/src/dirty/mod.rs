//! Pre-copy dirty-page tracking: which pages of a running process were
//! written since the previous round, with one interface over three back-ends.
//!
//! | back-end | mechanism | needs | target frozen during collect? |
//! |---|---|---|---|
//! | [`BackendKind::UffdWp`] | userfaultfd async write-protect (made inside the target, taken out with `pidfd_getfd`), `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING \| PM_SCAN_CHECK_WPASYNC` reports and re-protects written pages atomically | 6.7+ (`UFFD_FEATURE_WP_ASYNC`, `PAGEMAP_SCAN`) | no |
//! | [`BackendKind::SoftDirty`] | pagemap bit 55, cleared by writing `4` to `/proc/PID/clear_refs` | `CONFIG_MEM_SOFT_DIRTY` | yes: writes between the read and the clear are lost |
//! | [`BackendKind::PageHash`] | a 64-bit xxh3 hash of every present page, compared with the previous round's | nothing | yes, from collect until the pages are read |
//!
//! # Using it from a dump, round by round
//!
//! Each pre-copy round is a separate `ckpt-dump` run; tracking lives in a
//! small holder process between them (see [`holder`]).
//!
//! ```no_run
//! use tracee::dirty::{BackendChoice, DirtyTracker, HolderOptions, VmaDirty};
//! use tracee::{Pid, SeizeOptions, SeizedProcess};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pid = Pid::try_from(4242)?;
//! let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP)?;
//! let leader = frozen.leader_mut().expect("a frozen process has a thread");
//! // First `--track-mem` round and every later one: attach to the holder,
//! // or arm afresh (first round, holder lost, exec, pid reused).
//! let mut tracker = DirtyTracker::attach_or_arm(leader, BackendChoice::Auto, &HolderOptions::default())?;
//! let maps = tracee::proc::maps::read(pid)?; // the same list the dump writes
//! let set = tracker.collect(&maps)?;         // re-protects atomically
//! for vma in &set.vmas {
//!     match &vma.dirty {
//!         // Dump every present page, none marked PE_PARENT.
//!         VmaDirty::Whole(_reason) => {}
//!         // Dump `written`; `zeroed` pages are left out (they restore as zero,
//!         // never PE_PARENT); every other page is PE_PARENT.
//!         VmaDirty::Pages { written, zeroed } => { let _ = (written, zeroed); }
//!     }
//! }
//! // ... read the pages, write the images ...
//! tracker.commit()?; // pre-dump with --track-mem: the holder keeps tracking
//! // Final dump, or --leave-running without --track-mem: tracker.release()?;
//! // An error return drops `tracker`, which releases: the target runs as before.
//! # frozen.resume()?;
//! # Ok(())
//! # }
//! ```
//!
//! Rules the report follows:
//! - A VMA is described by its [`VmaKey`] (range, protection, sharing, file
//!   dev/inode/offset), but tracked by address: its pages keep their tracking
//!   wherever a tracked VMA of the previous collect covered them with the same
//!   sharing and file at the same offsets, so a VMA whose bounds moved (a
//!   merged neighbour unmapped again, an `mprotect` split or join) is still
//!   [`VmaDirty::Pages`]; its pages no tracked VMA covered count as written.
//!   A VMA nothing tracked covered (new, moved, registration refused, first
//!   round, tracking lost), or that the back-end finds replaced (a new mapping
//!   over tracked addresses is not registered), is [`VmaDirty::Whole`]. Shared
//!   mappings are always `Whole`: another process's writes to them go through
//!   its own page tables.
//! - `MADV_DONTNEED` drops the write protection, so zapped pages come back as
//!   written but not present: they are listed in `zeroed`.
//! - Each VMA carries a [`WriteHistory`]: per page, in how many collects it was
//!   written, for the queued pre-copy algorithm (write-hot pages go last).
//! - Queued pre-copy: a round may hold pages back instead of sending them
//!   ([`DirtyTracker::hold`], before commit). The next collect reports them
//!   in [`VmaReport::pending`] (the destination lacks them: never `PE_PARENT`)
//!   and forgets them; a round that holds again says so again. Held pages are
//!   carried by address like the write history.
//! - `PE_PARENT` only for pages the parent images hold: a page that became
//!   present without a write (the zero page after a read, a file page of a
//!   private file mapping) is not reported written, yet the parent has no
//!   copy of it; skip it as a full dump would.
//! - With [`BackendKind::UffdWp`] the tracked process must not use
//!   userfaultfd on the same VMAs itself (a VMA takes one context): such
//!   VMAs are refused and reported [`WholeReason::Untracked`] every round.
//! - Lost tracking (holder gone, pid reused, exec, a round that was collected
//!   but never committed) makes the next collect all `Whole`, never a silent miss.

pub mod holder;
mod page_hash;
mod soft_dirty;
mod state;
mod tracker;
mod uffd_wp;

pub use holder::HolderOptions;
pub use soft_dirty::{soft_dirty_available, soft_dirty_regions};
pub use tracker::{Attach, BackendChoice, DirtyTracker};

use crate::ids::{Pid, RemoteAddr};
use crate::proc::maps::{MapsEntry, Perms};
use crate::PAGE_SIZE;
use rustix::io::Errno;

/// Which mechanism finds written pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// userfaultfd async write-protect + `PAGEMAP_SCAN`.
    UffdWp,
    /// Soft-dirty bits (`clear_refs`, pagemap bit 55).
    SoftDirty,
    /// Page-content hashes compared between rounds.
    PageHash,
}

/// What describes a VMA in a round. Between rounds, pages are matched by
/// address: a VMA whose range changed still carries the tracking of the pages
/// a tracked VMA of the previous round held (same sharing, device, inode and,
/// for files, offset); see [`DirtyTracker::collect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmaKey {
    /// First byte.
    pub start: RemoteAddr,
    /// One past the last byte.
    pub end: RemoteAddr,
    /// `rwxp` as bits: read 1, write 2, exec 4, shared 8.
    pub perms: u8,
    /// File offset (anonymous memory: the kernel's page offset, kept by mremap).
    pub pgoff: u64,
    /// Device of the backing file.
    pub dev: (u32, u32),
    /// Inode of the backing file (0: anonymous).
    pub inode: u64,
}

impl VmaKey {
    /// The key of a maps entry.
    pub fn of(e: &MapsEntry) -> VmaKey {
        VmaKey {
            start: e.start,
            end: e.end,
            perms: perms_bits(e.perms),
            pgoff: e.pgoff,
            dev: (e.dev_major, e.dev_minor),
            inode: e.inode,
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get()) / PAGE_SIZE
    }

    /// Whether the mapping is shared.
    pub fn is_shared(&self) -> bool {
        self.perms & 8 != 0
    }
}

fn perms_bits(p: Perms) -> u8 {
    u8::from(p.read) | u8::from(p.write) << 1 | u8::from(p.exec) << 2 | u8::from(p.shared) << 3
}

/// A page-aligned address range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First byte.
    pub start: RemoteAddr,
    /// One past the last byte.
    pub end: RemoteAddr,
}

impl PageRange {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get()) / PAGE_SIZE
    }
}

/// The parts of sorted, disjoint `ranges` inside `[start, end)`.
pub(crate) fn clip(ranges: &[PageRange], start: RemoteAddr, end: RemoteAddr) -> Vec<PageRange> {
    let first = ranges.partition_point(|r| r.end <= start);
    ranges
        .get(first..)
        .unwrap_or_default()
        .iter()
        .take_while(|r| r.start < end)
        .map(|r| PageRange {
            start: r.start.max(start),
            end: r.end.min(end),
        })
        .filter(|r| r.start < r.end)
        .collect()
}

/// Why tracking was lost and everything is dumped whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// No holder answers for this process (never armed, killed, timed out, released).
    NoHolder,
    /// The holder belongs to another process that had this pid.
    PidReused,
    /// The process ran `execve`: a new address space, untracked.
    Exec,
    /// A previous round collected (and re-protected) pages but never committed.
    Interrupted,
    /// The userfaultfd no longer reaches the process's memory.
    UffdDead,
}

/// Why a VMA is dumped whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeReason {
    /// The first round of a fresh tracker: nothing was tracked before.
    FirstRound,
    /// Tracking was lost.
    Lost(LostReason),
    /// Not in the previous round's list with this key (new, changed, moved).
    New,
    /// Shared memory: written through other processes' page tables too.
    Shared,
    /// The kernel refused tracking here (kernel mapping, another userfaultfd...).
    Untracked,
    /// The VMA changed while it was being collected.
    Changed,
}

/// What to dump of one VMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmaDirty {
    /// Every present page; none refers to the parent images.
    Whole(WholeReason),
    /// Written since the previous collect: `written` are present (or swapped)
    /// and must be dumped; `zeroed` were written but are gone now
    /// (`MADV_DONTNEED`): leave them out, never `PE_PARENT`. All other pages
    /// are unchanged since the previous round (`PE_PARENT`).
    Pages {
        /// Written and present: dump them.
        written: Vec<PageRange>,
        /// Written and no longer present: they restore as zero.
        zeroed: Vec<PageRange>,
    },
}

/// Per page of a VMA, in how many collects it was found written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriteHistory {
    /// Collects since this VMA was first tracked (the first, whole, one excluded).
    pub rounds: u32,
    /// One counter per page (saturating at 255).
    pub counts: Vec<u8>,
}

impl WriteHistory {
    fn new(pages: u64) -> WriteHistory {
        WriteHistory {
            rounds: 0,
            counts: vec![0; usize::try_from(pages).unwrap_or(0)],
        }
    }

    fn record(&mut self, base: RemoteAddr, ranges: &[PageRange]) {
        for r in ranges {
            let first = r.start.get().saturating_sub(base.get()) / PAGE_SIZE;
            let last = first.saturating_add(r.pages());
            let (Ok(first), Ok(last)) = (usize::try_from(first), usize::try_from(last)) else {
                continue;
            };
            let last = last.min(self.counts.len());
            for c in self.counts.get_mut(first..last).unwrap_or_default() {
                *c = c.saturating_add(1);
            }
        }
    }
}

/// One VMA of the current list and what to dump of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmaReport {
    /// The VMA.
    pub vma: VmaKey,
    /// Whole, or the written pages.
    pub dirty: VmaDirty,
    /// Write counts per page over the rounds this VMA was tracked.
    pub history: WriteHistory,
    /// Pages an earlier round held back ([`DirtyTracker::hold`]) and no round
    /// sent since: the parent images lack them, so they are saved whatever
    /// `dirty` says. Only in `Pages` VMAs (a `Whole` one is saved whole).
    pub pending: Vec<PageRange>,
}

/// The result of one collect: one report per VMA of the list given, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    /// Collects done by this tracking so far (1 for the first).
    pub round: u32,
    /// The mechanism used.
    pub backend: BackendKind,
    /// Per VMA.
    pub vmas: Vec<VmaReport>,
}

impl DirtySet {
    /// Whether every VMA is whole (a full dump).
    pub fn is_full(&self) -> bool {
        self.vmas
            .iter()
            .all(|v| matches!(v.dirty, VmaDirty::Whole(_)))
    }

    /// The report of the VMA containing `addr`.
    pub fn find(&self, addr: RemoteAddr) -> Option<&VmaReport> {
        self.vmas
            .iter()
            .find(|v| v.vma.start <= addr && addr < v.vma.end)
    }

    /// Pages held back by an earlier round and not sent since, over all VMAs.
    pub fn pending_pages(&self) -> u64 {
        self.vmas
            .iter()
            .flat_map(|v| &v.pending)
            .map(PageRange::pages)
            .sum()
    }

    /// Written and present pages over all `Pages` VMAs.
    pub fn written_pages(&self) -> u64 {
        self.vmas
            .iter()
            .map(|v| match &v.dirty {
                VmaDirty::Pages { written, .. } => written.iter().map(PageRange::pages).sum(),
                VmaDirty::Whole(_) => 0,
            })
            .sum()
    }
}

/// Dirty tracking failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// Creating the userfaultfd inside the target.
    #[error("pid {pid}: create the tracking userfaultfd")]
    Uffd {
        pid: Pid,
        #[source]
        source: crate::uffd::UffdError,
    },
    /// Taking the target's userfaultfd out.
    #[error("pid {pid}: take the tracking userfaultfd out")]
    Pidfd {
        pid: Pid,
        #[source]
        source: crate::pidfd::PidfdError,
    },
    /// An injected syscall (closing the target's copy).
    #[error("pid {pid}: injected syscall")]
    Inject {
        pid: Pid,
        #[source]
        source: Box<crate::inject::InjectError>,
    },
    /// The kernel lacks what the chosen back-end needs.
    #[error("pid {pid}: {backend:?} tracking is not available on this kernel ({what})")]
    Unsupported {
        pid: Pid,
        backend: BackendKind,
        what: &'static str,
    },
    /// `PAGEMAP_SCAN` or a pagemap read.
    #[error("pid {pid}: pagemap")]
    Pagemap {
        pid: Pid,
        #[source]
        source: crate::pagemap_scan::PagemapError,
    },
    /// Reading the target's memory (page hashes).
    #[error("pid {pid}: read memory")]
    Memory {
        pid: Pid,
        #[source]
        source: crate::memory::MemoryError,
    },
    /// Reading `/proc` of the target.
    #[error("pid {pid}: read /proc")]
    Proc {
        pid: Pid,
        #[source]
        source: crate::proc::ProcError,
    },
    /// Writing `/proc/PID/clear_refs`.
    #[error("pid {pid}: write clear_refs")]
    ClearRefs {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    /// Talking to the holder process.
    #[error("pid {pid}: tracking holder at {}", path.display())]
    Holder {
        pid: Pid,
        path: std::path::PathBuf,
        #[source]
        source: holder::HolderError,
    },
    /// A kernel call of the tracker failed.
    #[error("pid {pid}: {op}")]
    Sys {
        pid: Pid,
        op: &'static str,
        #[source]
        errno: Errno,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_counts_pages_inside_the_vma_only() {
        let base = RemoteAddr(0x10000);
        let mut h = WriteHistory::new(4);
        h.record(
            base,
            &[
                PageRange {
                    start: RemoteAddr(0x11000),
                    end: RemoteAddr(0x13000),
                },
                PageRange {
                    start: RemoteAddr(0x13000),
                    end: RemoteAddr(0x20000),
                },
            ],
        );
        h.record(
            base,
            &[PageRange {
                start: RemoteAddr(0x12000),
                end: RemoteAddr(0x13000),
            }],
        );
        assert_eq!(h.counts, vec![0, 1, 2, 1]);
    }

    #[test]
    fn clipping_keeps_the_parts_inside() {
        let r = |s: u64, e: u64| PageRange {
            start: RemoteAddr(s),
            end: RemoteAddr(e),
        };
        let ranges = [r(0x1000, 0x3000), r(0x5000, 0x8000), r(0x9000, 0xa000)];
        assert_eq!(
            clip(&ranges, RemoteAddr(0x2000), RemoteAddr(0x6000)),
            vec![r(0x2000, 0x3000), r(0x5000, 0x6000)]
        );
        assert!(clip(&ranges, RemoteAddr(0x3000), RemoteAddr(0x5000)).is_empty());
        assert_eq!(
            clip(&ranges, RemoteAddr(0), RemoteAddr(0x10000)),
            ranges.to_vec()
        );
    }

    #[test]
    fn a_changed_field_is_another_vma() {
        let line = "7f0000000000-7f0000004000 rw-p 00000000 00:00 0";
        let e = crate::proc::maps::parse_line(line).expect("line");
        let mut moved = e.clone();
        moved.start = RemoteAddr(0x7f0000001000);
        let mut ro = e.clone();
        ro.perms.write = false;
        assert_ne!(VmaKey::of(&e), VmaKey::of(&moved));
        assert_ne!(VmaKey::of(&e), VmaKey::of(&ro));
        assert_eq!(VmaKey::of(&e).pages(), 4);
        assert!(!VmaKey::of(&e).is_shared());
    }
}
