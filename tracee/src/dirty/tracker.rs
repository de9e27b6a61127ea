//! The tracker: one interface over the three back-ends, the round logic
//! (VMA comparison, whole VMAs, history) and the hand-over to the holder.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::holder::{self, GetReply, HolderOptions, Lease};
use super::page_hash::{self, PageHash};
use super::soft_dirty::{soft_dirty_available, SoftDirty};
use super::state::{MmFingerprint, TrackState, TrackedVma};
use super::uffd_wp::{self, Start, UffdWp};
use super::{
    clip, BackendKind, DirtyError, DirtySet, LostReason, PageRange, VmaDirty, VmaKey, VmaReport,
    WholeReason,
};
use crate::ids::{Pid, RemoteAddr};
use crate::pagemap_scan::{PageCategories, PageRegion};
use crate::proc::maps::MapsEntry;
use crate::ptrace::Tracee;
use crate::PAGE_SIZE;

/// Which back-end [`DirtyTracker::arm`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// userfaultfd write-protect where the kernel has it, else soft-dirty,
    /// else page hashes.
    Auto,
    /// This one (an error if the kernel lacks it).
    Only(BackendKind),
}

#[derive(Debug)]
enum Backend {
    UffdWp(UffdWp),
    SoftDirty(SoftDirty),
    PageHash(PageHash),
}

/// What [`DirtyTracker::attach`] found.
#[derive(Debug)]
pub enum Attach {
    /// Tracking continues from the previous round.
    Tracking(Box<DirtyTracker>),
    /// Tracking is gone: the next dump must be full (arm again).
    Lost(LostReason),
}

/// Dirty-page tracking of one process across pre-copy rounds.
///
/// Dropping it without [`DirtyTracker::commit`] releases tracking (a failed
/// dump leaves the process as it was, and the next round is full).
#[derive(Debug)]
pub struct DirtyTracker {
    state: TrackState,
    backend: Backend,
    /// The next collect reports every VMA whole, for this reason.
    full: Option<WholeReason>,
    lease: Option<Lease>,
    holder_pid: Option<Pid>,
    path: PathBuf,
    opts: HolderOptions,
    finished: bool,
}

fn resolve(choice: BackendChoice, pid: Pid) -> Result<BackendKind, DirtyError> {
    match choice {
        BackendChoice::Only(BackendKind::SoftDirty) if !soft_dirty_available() => {
            Err(DirtyError::Unsupported {
                pid,
                backend: BackendKind::SoftDirty,
                what: "CONFIG_MEM_SOFT_DIRTY",
            })
        }
        BackendChoice::Only(kind) => Ok(kind),
        BackendChoice::Auto if uffd_wp::available() => Ok(BackendKind::UffdWp),
        BackendChoice::Auto if soft_dirty_available() => Ok(BackendKind::SoftDirty),
        BackendChoice::Auto => Ok(BackendKind::PageHash),
    }
}

fn split(regions: &[PageRegion]) -> (Vec<PageRange>, Vec<PageRange>) {
    let mut written = Vec::new();
    let mut zeroed = Vec::new();
    for r in regions {
        let range = PageRange {
            start: r.start,
            end: r.end,
        };
        if r.categories
            .intersects(PageCategories::PRESENT | PageCategories::SWAPPED)
        {
            written.push(range);
        } else {
            zeroed.push(range);
        }
    }
    (written, zeroed)
}

/// What the previous round knew of the range of one VMA of this round.
#[derive(Debug)]
struct Carried {
    /// The VMA under its current key, with the history (and hashes) of the
    /// pages the previous round tracked.
    tv: TrackedVma,
    /// Pages of it no tracked VMA of the previous round covered: nothing is
    /// known of them, so they count as written.
    untracked: Vec<PageRange>,
}

/// Whether `key` can hold pages that `prev` tracked: the same sharing and
/// backing file, at the same file offsets. Protection may differ (an
/// `mprotect` splits or joins VMAs but keeps their pages and their tracking).
fn same_mapping(prev: &VmaKey, key: &VmaKey) -> bool {
    prev.is_shared() == key.is_shared()
        && prev.dev == key.dev
        && prev.inode == key.inode
        // Anonymous memory lists no offset worth comparing (maps shows 0).
        && (key.inode == 0
            || key.pgoff.wrapping_sub(prev.pgoff) == key.start.get().wrapping_sub(prev.start.get()))
}

/// Page index of `addr` inside a VMA starting at `base`.
fn page_index(base: RemoteAddr, addr: RemoteAddr) -> usize {
    usize::try_from(addr.get().saturating_sub(base.get()) / PAGE_SIZE).unwrap_or(usize::MAX)
}

/// What the previous round's VMAs (`prev`, sorted by start, not
/// overlapping) tracked of the range of `key`; `None` if none of it.
///
/// A VMA's bounds move without its pages changing: a neighbouring mapping
/// that merged into it before tracking began is unmapped again, an
/// `mprotect` splits it, registration joins it with a registered neighbour.
/// Matching only identical ranges would dump such a VMA whole every time it
/// moves (a 1 GiB region next to short-lived small mappings: every round).
/// Pages stay tracked wherever a tracked VMA of the previous round covered
/// them: the back-ends notice a mapping that was replaced meanwhile (uffd: a
/// new VMA is not registered, the scan fails; soft-dirty: a new VMA is all
/// dirty; hashes: compare contents).
fn carry(prev: &[TrackedVma], key: VmaKey) -> Option<Carried> {
    let first = prev.partition_point(|p| p.key.end <= key.start);
    let rest = prev.get(first..).unwrap_or_default();
    if let Some(exact) = rest.first().filter(|p| p.key == key) {
        return Some(Carried {
            tv: exact.clone(),
            untracked: Vec::new(),
        });
    }
    let pieces: Vec<&TrackedVma> = rest
        .iter()
        .take_while(|p| p.key.start < key.end)
        .filter(|p| p.tracked && same_mapping(&p.key, &key))
        .collect();
    // Hashes (PageHash) must cover a piece for its pages to count.
    let with_hashes = pieces.iter().any(|p| !p.hashes.is_empty());
    let mut tv = TrackedVma::new(key);
    if with_hashes {
        tv.hashes = vec![0; tv.history.counts.len()];
    }
    let mut covered = Vec::new();
    let mut rounds = u32::MAX;
    for p in pieces {
        let pages = usize::try_from(p.key.pages()).unwrap_or(0);
        if with_hashes && p.hashes.len() != pages {
            continue;
        }
        let start = p.key.start.max(key.start);
        let end = p.key.end.min(key.end);
        let (from, to) = (page_index(p.key.start, start), page_index(key.start, start));
        let n = page_index(start, end);
        let (Some(src), Some(dst)) = (
            p.history.counts.get(from..from.saturating_add(n)),
            tv.history.counts.get_mut(to..to.saturating_add(n)),
        ) else {
            continue;
        };
        dst.copy_from_slice(src);
        if with_hashes {
            if let (Some(src), Some(dst)) = (
                p.hashes.get(from..from.saturating_add(n)),
                tv.hashes.get_mut(to..to.saturating_add(n)),
            ) {
                dst.copy_from_slice(src);
            }
        }
        rounds = rounds.min(p.history.rounds);
        tv.held.extend(clip(&p.held, start, end));
        covered.push(PageRange { start, end });
    }
    if covered.is_empty() {
        return None;
    }
    tv.tracked = true;
    tv.history.rounds = rounds;
    let mut untracked = Vec::new();
    let mut at = key.start;
    for c in &covered {
        if at < c.start {
            untracked.push(PageRange {
                start: at,
                end: c.start,
            });
        }
        at = at.max(c.end);
    }
    if at < key.end {
        untracked.push(PageRange {
            start: at,
            end: key.end,
        });
    }
    Some(Carried { tv, untracked })
}

/// The union of two lists of ranges, sorted and merged where they touch.
fn union(a: Vec<PageRange>, b: &[PageRange]) -> Vec<PageRange> {
    if b.is_empty() {
        return a;
    }
    let mut all = a;
    all.extend_from_slice(b);
    all.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<PageRange> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl DirtyTracker {
    /// Starts tracking `tracee`'s process (stopped, e.g. the leader of a
    /// frozen process); the first [`DirtyTracker::collect`] protects every VMA
    /// and reports all of them whole. A holder left from earlier tracking of
    /// the process is released first.
    pub fn arm(
        tracee: &mut Tracee,
        choice: BackendChoice,
        opts: &HolderOptions,
    ) -> Result<DirtyTracker, DirtyError> {
        Self::arm_because(tracee, choice, opts, WholeReason::FirstRound)
    }

    fn arm_because(
        tracee: &mut Tracee,
        choice: BackendChoice,
        opts: &HolderOptions,
        reason: WholeReason,
    ) -> Result<DirtyTracker, DirtyError> {
        let pid = tracee.pid();
        let (fingerprint, start_time) =
            MmFingerprint::read(pid).map_err(|source| DirtyError::Proc { pid, source })?;
        let path = holder::socket_path(&opts.dir, pid, start_time);
        // One tracker per process: a VMA takes only one userfaultfd.
        holder::release_at(&path).map_err(|source| DirtyError::Holder {
            pid,
            path: path.clone(),
            source,
        })?;
        let kind = resolve(choice, pid)?;
        let backend = match kind {
            BackendKind::UffdWp => Backend::UffdWp(UffdWp::arm(tracee)?),
            BackendKind::SoftDirty => Backend::SoftDirty(SoftDirty::open(pid)?),
            BackendKind::PageHash => Backend::PageHash(PageHash::open(pid)?),
        };
        Ok(DirtyTracker {
            state: TrackState {
                backend: kind,
                pid,
                start_time,
                fingerprint,
                round: 0,
                vmas: Vec::new(),
            },
            backend,
            full: Some(reason),
            lease: None,
            holder_pid: None,
            path,
            opts: opts.clone(),
            finished: false,
        })
    }

    /// Takes over tracking kept by the holder of `pid`, or says why there is
    /// none (no holder, pid reused, exec, an uncommitted round).
    pub fn attach(pid: Pid, opts: &HolderOptions) -> Result<Attach, DirtyError> {
        let (fingerprint, start_time) =
            MmFingerprint::read(pid).map_err(|source| DirtyError::Proc { pid, source })?;
        let path = holder::socket_path(&opts.dir, pid, start_time);
        let herr = |source| DirtyError::Holder {
            pid,
            path: path.clone(),
            source,
        };
        let Some(mut lease) = Lease::connect(&path).map_err(herr)? else {
            return Ok(Attach::Lost(LostReason::NoHolder));
        };
        let reply = match lease.get() {
            Ok(reply) => reply,
            // A holder that exits as we connect (released, target gone).
            Err(holder::HolderError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(Attach::Lost(LostReason::NoHolder));
            }
            Err(e) => return Err(herr(e)),
        };
        let (holder_pid, bytes, uffd) = match reply {
            GetReply::Lost(reason) => return Ok(Attach::Lost(reason)),
            GetReply::State {
                holder,
                state,
                uffd,
            } => (holder, state, uffd),
        };
        let state = TrackState::decode(&bytes).map_err(|e| herr(holder::HolderError::Decode(e)))?;
        let mismatch = if state.pid != pid || state.start_time != start_time {
            Some(LostReason::PidReused)
        } else if state.fingerprint != fingerprint {
            Some(LostReason::Exec)
        } else {
            None
        };
        if let Some(reason) = mismatch {
            // What this holder tracks is not this address space any more.
            lease.release().map_err(herr)?;
            return Ok(Attach::Lost(reason));
        }
        let backend = match state.backend {
            BackendKind::UffdWp => {
                let fd = uffd.ok_or_else(|| {
                    herr(holder::HolderError::Protocol {
                        what: "no userfaultfd with a write-protect state",
                    })
                })?;
                Backend::UffdWp(UffdWp::from_fd(pid, fd)?)
            }
            BackendKind::SoftDirty => Backend::SoftDirty(SoftDirty::open(pid)?),
            BackendKind::PageHash => Backend::PageHash(PageHash::open(pid)?),
        };
        Ok(Attach::Tracking(Box::new(DirtyTracker {
            state,
            backend,
            full: None,
            lease: Some(lease),
            holder_pid,
            path,
            opts: opts.clone(),
            finished: false,
        })))
    }

    /// [`DirtyTracker::attach`], or when tracking is lost (or the holder
    /// does not answer sensibly) [`DirtyTracker::arm`] with the next collect
    /// all whole for that reason. What each `--track-mem` round calls.
    pub fn attach_or_arm(
        tracee: &mut Tracee,
        choice: BackendChoice,
        opts: &HolderOptions,
    ) -> Result<DirtyTracker, DirtyError> {
        let reason = match Self::attach(tracee.pid(), opts) {
            Ok(Attach::Tracking(t)) => return Ok(*t),
            Ok(Attach::Lost(reason)) => reason,
            Err(DirtyError::Holder { .. }) => LostReason::NoHolder,
            Err(e) => return Err(e),
        };
        Self::arm_because(tracee, choice, opts, WholeReason::Lost(reason))
    }

    /// The process tracked.
    pub fn pid(&self) -> Pid {
        self.state.pid
    }

    /// The mechanism in use.
    pub fn backend(&self) -> BackendKind {
        self.state.backend
    }

    /// Collects done so far.
    pub fn round(&self) -> u32 {
        self.state.round
    }

    /// The holder process, once there is one.
    pub fn holder_pid(&self) -> Option<Pid> {
        self.holder_pid
    }

    /// The holder's socket.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Written pages since the previous collect for each VMA of `maps` (the
    /// process's current list, as the dump writes it), re-arming tracking as
    /// it goes: new VMAs are registered and reported whole. A VMA whose
    /// bounds moved since the previous collect keeps the tracking of the
    /// pages that were tracked there (see `carry`). With the uffd back-end
    /// the process may run; the others need it frozen until the pages are
    /// read.
    pub fn collect(&mut self, maps: &[MapsEntry]) -> Result<DirtySet, DirtyError> {
        let full = self.full.take();
        self.state.round = self.state.round.saturating_add(1);
        let mut prev = std::mem::take(&mut self.state.vmas);
        prev.sort_unstable_by_key(|v| v.key.start);
        let mut dead = false;
        let mut reports = Vec::with_capacity(maps.len());
        let mut next = Vec::with_capacity(maps.len());
        for e in maps {
            let key = VmaKey::of(e);
            let old = carry(&prev, key);
            let (mut tv, dirty) = self.collect_one(e, key, old, full, &mut dead)?;
            // Held pages are forgotten here: the round that holds again says so (`hold`).
            let held = std::mem::take(&mut tv.held);
            let pending = match dirty {
                VmaDirty::Pages { .. } => held,
                VmaDirty::Whole(_) => Vec::new(),
            };
            reports.push(VmaReport {
                vma: key,
                dirty,
                history: tv.history.clone(),
                pending,
            });
            next.push(tv);
        }
        if let Backend::SoftDirty(sd) = &mut self.backend {
            sd.clear()?;
        }
        if dead {
            // The userfaultfd outlived the address space (exec): nothing
            // reported by it can be trusted.
            for r in &mut reports {
                r.dirty = VmaDirty::Whole(WholeReason::Lost(LostReason::UffdDead));
                r.pending.clear();
            }
            for v in &mut next {
                v.tracked = false;
            }
        }
        // The keys as listed at this collect, even where registering has
        // since merged neighbours: the next round matches by coverage.
        self.state.vmas = next;
        Ok(DirtySet {
            round: self.state.round,
            backend: self.state.backend,
            vmas: reports,
        })
    }

    fn collect_one(
        &mut self,
        e: &MapsEntry,
        key: VmaKey,
        old: Option<Carried>,
        full: Option<WholeReason>,
        dead: &mut bool,
    ) -> Result<(TrackedVma, VmaDirty), DirtyError> {
        if key.is_shared() {
            return Ok((TrackedVma::new(key), VmaDirty::Whole(WholeReason::Shared)));
        }
        if e.is_kernel_special() {
            return Ok((
                TrackedVma::new(key),
                VmaDirty::Whole(WholeReason::Untracked),
            ));
        }
        let reason = match (old, full) {
            (_, Some(reason)) => reason,
            (None, None) => WholeReason::New,
            (Some(c), None) if !c.tv.tracked => WholeReason::Untracked,
            (Some(Carried { mut tv, untracked }), None) => match self.written(&mut tv)? {
                Some(regions) => {
                    let (written, zeroed) = split(&regions);
                    let written = union(written, &untracked);
                    tv.history.rounds = tv.history.rounds.saturating_add(1);
                    // Once per page: an untracked page may be zeroed as well.
                    tv.history
                        .record(key.start, &union(written.clone(), &zeroed));
                    return Ok((tv, VmaDirty::Pages { written, zeroed }));
                }
                None => WholeReason::Changed,
            },
        };
        let mut tv = TrackedVma::new(key);
        tv.tracked = self.start(&mut tv, dead)?;
        Ok((tv, VmaDirty::Whole(reason)))
    }

    /// Written pages of a tracked VMA since the last round, re-armed;
    /// `None` if the VMA changed under the scan.
    fn written(&mut self, tv: &mut TrackedVma) -> Result<Option<Vec<PageRegion>>, DirtyError> {
        match &mut self.backend {
            Backend::UffdWp(u) => u.scan(&tv.key),
            Backend::SoftDirty(s) => s.scan(&tv.key).map(Some),
            Backend::PageHash(h) => Ok(h.hash(&tv.key)?.map(|new| {
                let changed = page_hash::changed(tv.key.start, &tv.hashes, &new);
                tv.hashes = new;
                changed
            })),
        }
    }

    /// Starts tracking a VMA; `false` if it cannot be tracked.
    fn start(&mut self, tv: &mut TrackedVma, dead: &mut bool) -> Result<bool, DirtyError> {
        match &mut self.backend {
            Backend::UffdWp(u) => Ok(match u.start(&tv.key)? {
                Start::Tracked => true,
                Start::Refused => false,
                Start::Dead => {
                    *dead = true;
                    false
                }
            }),
            // Bits are cleared for the whole process at the end of the round.
            Backend::SoftDirty(_) => Ok(true),
            Backend::PageHash(h) => Ok(match h.hash(&tv.key)? {
                Some(hashes) => {
                    tv.hashes = hashes;
                    true
                }
                None => false,
            }),
        }
    }

    /// Records the pages this round holds back (queued pre-copy: sorted,
    /// disjoint ranges; pages outside the current VMAs are ignored). The next
    /// collect reports them as [`VmaReport::pending`]. Without a call, nothing
    /// is held: the round saved every page the parent images lack.
    pub fn hold(&mut self, ranges: &[PageRange]) {
        for v in &mut self.state.vmas {
            v.held = clip(ranges, v.key.start, v.key.end);
        }
    }

    /// Pages currently recorded as held back.
    pub fn held_pages(&self) -> u64 {
        self.state
            .vmas
            .iter()
            .flat_map(|v| &v.held)
            .map(PageRange::pages)
            .sum()
    }

    /// Keeps tracking for the next round: hands the state to the holder
    /// (forking one the first time). Returns the holder's pid. Call it only
    /// once the pages of this round are safely written.
    pub fn commit(mut self) -> Result<Option<Pid>, DirtyError> {
        let pid = self.state.pid;
        let bytes = self.state.encode();
        let herr = |path: &Path, source| DirtyError::Holder {
            pid,
            path: path.to_path_buf(),
            source,
        };
        if let Some(lease) = &mut self.lease {
            lease.put(&bytes).map_err(|e| herr(&self.path, e))?;
            self.finished = true;
            return Ok(self.holder_pid);
        }
        let uffd: Option<OwnedFd> = match &self.backend {
            Backend::UffdWp(u) => {
                Some(
                    u.fd()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| DirtyError::Sys {
                            pid,
                            op: "dup the userfaultfd",
                            errno: rustix::io::Errno::from_io_error(&e)
                                .unwrap_or(rustix::io::Errno::BADF),
                        })?,
                )
            }
            _ => None,
        };
        let holder = holder::spawn(&self.path, &self.opts, pid, bytes, uffd.as_ref())
            .map_err(|e| herr(&self.path, e))?;
        self.holder_pid = Some(holder);
        self.finished = true;
        Ok(Some(holder))
    }

    /// Ends tracking: unregisters every VMA (the process runs exactly as
    /// before: no `uw` left in its smaps) and stops the holder.
    pub fn release(mut self) -> Result<(), DirtyError> {
        self.finished = true;
        self.release_now()
    }

    fn release_now(&mut self) -> Result<(), DirtyError> {
        if let Backend::UffdWp(u) = &mut self.backend {
            for v in self.state.vmas.iter().filter(|v| v.tracked) {
                u.stop(&v.key);
            }
        }
        let asked = match self.lease.take() {
            Some(mut lease) => lease.release().is_ok(),
            None => false,
        };
        if asked {
            return Ok(());
        }
        // No lease, or a broken one (now closed, so the holder is free to
        // take a new connection).
        holder::release_at(&self.path)
            .map(drop)
            .map_err(|source| DirtyError::Holder {
                pid: self.state.pid,
                path: self.path.clone(),
                source,
            })
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(error) = self.release_now() {
            tracing::warn!(pid = %self.state.pid, %error, "could not release dirty tracking");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn key(start: u64, end: u64, perms: u8) -> VmaKey {
        VmaKey {
            start: RemoteAddr(start),
            end: RemoteAddr(end),
            perms,
            pgoff: 0,
            dev: (0, 0),
            inode: 0,
        }
    }

    /// A tracked VMA whose page `i` was written `i` times.
    fn tracked(k: VmaKey) -> TrackedVma {
        let mut v = TrackedVma::new(k);
        v.tracked = true;
        v.history.rounds = 3;
        for (i, c) in v.history.counts.iter_mut().enumerate() {
            *c = u8::try_from(i).unwrap_or(u8::MAX);
        }
        v
    }

    fn range(start: u64, end: u64) -> PageRange {
        PageRange {
            start: RemoteAddr(start),
            end: RemoteAddr(end),
        }
    }

    #[test]
    fn an_identical_vma_is_carried_as_it_was() {
        let k = key(0x10000, 0x20000, 3);
        let prev = [tracked(k)];
        let c = carry(&prev, k).expect("carried");
        assert_eq!(c.tv, prev[0]);
        assert!(c.untracked.is_empty());
    }

    #[test]
    fn a_shrunk_vma_keeps_the_tracking_of_its_pages() {
        // 16 pages tracked; 4 unmapped at each end since.
        let prev = [tracked(key(0x10000, 0x10000 + 16 * P, 3))];
        let c = carry(&prev, key(0x10000 + 4 * P, 0x10000 + 12 * P, 3)).expect("carried");
        assert!(c.tv.tracked);
        assert!(c.untracked.is_empty());
        assert_eq!(c.tv.history.counts, (4..12).collect::<Vec<u8>>());
        assert_eq!(c.tv.history.rounds, 3);
    }

    #[test]
    fn joined_vmas_are_carried_across_protection_changes() {
        let mut second = tracked(key(0x14000, 0x18000, 1));
        second.history.rounds = 1;
        let prev = [tracked(key(0x10000, 0x14000, 3)), second];
        let c = carry(&prev, key(0x10000, 0x18000, 3)).expect("carried");
        assert!(c.untracked.is_empty());
        assert_eq!(c.tv.history.counts, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(c.tv.history.rounds, 1);
    }

    #[test]
    fn pages_no_tracked_vma_covered_are_untracked() {
        let mut refused = tracked(key(0x18000, 0x1c000, 3));
        refused.tracked = false;
        let prev = [tracked(key(0x10000, 0x14000, 3)), refused];
        let c = carry(&prev, key(0x0c000, 0x20000, 3)).expect("carried");
        assert_eq!(
            c.untracked,
            vec![range(0x0c000, 0x10000), range(0x14000, 0x20000)]
        );
        // Nothing tracked under it: a new VMA.
        assert!(carry(&prev, key(0x18000, 0x1c000 + P, 3)).is_none());
        assert!(carry(&prev, key(0x30000, 0x40000, 3)).is_none());
        // An untracked VMA that did not change stays untracked.
        let same = carry(&prev, key(0x18000, 0x1c000, 3)).expect("carried");
        assert!(!same.tv.tracked);
    }

    #[test]
    fn another_file_or_offset_is_not_carried() {
        let mut file = key(0x10000, 0x20000, 1);
        file.inode = 7;
        file.dev = (8, 1);
        file.pgoff = 0x3000;
        let prev = [tracked(file)];
        // The second half of the same mapping: offset follows the address.
        let mut half = file;
        half.start = RemoteAddr(0x18000);
        half.pgoff = 0x3000 + 0x8000;
        assert!(carry(&prev, half).is_some());
        let mut moved = half;
        moved.pgoff = 0x3000;
        assert!(carry(&prev, moved).is_none());
        let mut other = half;
        other.inode = 8;
        assert!(carry(&prev, other).is_none());
        let mut shared = half;
        shared.perms |= 8;
        assert!(carry(&prev, shared).is_none());
    }

    #[test]
    fn hashes_are_carried_page_by_page() {
        let mut a = tracked(key(0x10000, 0x12000, 3));
        a.hashes = vec![11, 12];
        let mut b = tracked(key(0x12000, 0x14000, 3));
        b.hashes = vec![21, 22];
        let c = carry(&[a, b], key(0x11000, 0x15000, 3)).expect("carried");
        assert_eq!(c.tv.hashes, vec![12, 21, 22, 0]);
        assert_eq!(c.untracked, vec![range(0x14000, 0x15000)]);
    }

    #[test]
    fn held_pages_are_carried_by_address() {
        let mut a = tracked(key(0x10000, 0x14000, 3));
        a.held = vec![range(0x11000, 0x14000)];
        let mut b = tracked(key(0x14000, 0x18000, 3));
        b.held = vec![range(0x14000, 0x15000), range(0x17000, 0x18000)];
        let exact = carry(std::slice::from_ref(&a), a.key).expect("carried");
        assert_eq!(exact.tv.held, a.held);
        // Joined, shrunk at both ends.
        let c = carry(&[a, b], key(0x12000, 0x17000, 3)).expect("carried");
        assert_eq!(
            c.tv.held,
            vec![range(0x12000, 0x14000), range(0x14000, 0x15000)]
        );
    }

    #[test]
    fn ranges_unite() {
        let a = vec![range(0x1000, 0x2000), range(0x5000, 0x6000)];
        let b = [range(0x2000, 0x3000), range(0x5800, 0x9000)];
        assert_eq!(
            union(a, &b),
            vec![range(0x1000, 0x3000), range(0x5000, 0x9000)]
        );
    }
}
