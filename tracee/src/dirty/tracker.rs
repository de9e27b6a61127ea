//! The tracker: one interface over the three back-ends, the round logic
//! (VMA comparison, whole VMAs, history) and the hand-over to the holder.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::holder::{self, GetReply, HolderOptions, Lease};
use super::page_hash::{self, PageHash};
use super::soft_dirty::{soft_dirty_available, SoftDirty};
use super::state::{MmFingerprint, TrackState, TrackedVma};
use super::uffd_wp::{self, Start, UffdWp};
use super::{
    BackendKind, DirtyError, DirtySet, LostReason, PageRange, VmaDirty, VmaKey, VmaReport,
    WholeReason,
};
use crate::ids::Pid;
use crate::pagemap_scan::{PageCategories, PageRegion};
use crate::proc::maps::MapsEntry;
use crate::ptrace::Tracee;

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
    /// A VMA was registered during the current collect.
    registered: bool,
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

/// The VMA `key` made of `group`, if the group tiles it exactly.
fn merge(key: VmaKey, mut group: Vec<TrackedVma>) -> Option<TrackedVma> {
    if group.len() == 1 && group[0].key == key {
        return group.pop();
    }
    let mut at = key.start;
    for g in &group {
        let same_kind =
            g.key.perms == key.perms && g.key.dev == key.dev && g.key.inode == key.inode;
        if g.key.start != at || !same_kind {
            return None;
        }
        at = g.key.end;
    }
    if group.is_empty() || at != key.end {
        return None;
    }
    let mut merged = TrackedVma::new(key);
    merged.tracked = group.iter().all(|g| g.tracked);
    merged.history.rounds = group.iter().map(|g| g.history.rounds).min().unwrap_or(0);
    merged.history.counts = group
        .iter()
        .flat_map(|g| g.history.counts.iter().copied())
        .collect();
    if group.iter().all(|g| !g.hashes.is_empty()) {
        merged.hashes = group
            .iter()
            .flat_map(|g| g.hashes.iter().copied())
            .collect();
    }
    Some(merged)
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
            registered: false,
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
            registered: false,
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
    /// it goes: new VMAs are registered and reported whole. With the uffd
    /// back-end the process may run; the others need it frozen until the
    /// pages are read.
    pub fn collect(&mut self, maps: &[MapsEntry]) -> Result<DirtySet, DirtyError> {
        let full = self.full.take();
        self.state.round = self.state.round.saturating_add(1);
        let mut prev: HashMap<VmaKey, TrackedVma> = std::mem::take(&mut self.state.vmas)
            .into_iter()
            .map(|v| (v.key, v))
            .collect();
        let mut dead = false;
        let mut reports = Vec::with_capacity(maps.len());
        let mut next = Vec::with_capacity(maps.len());
        for e in maps {
            let key = VmaKey::of(e);
            let old = prev.remove(&key);
            let (tv, dirty) = self.collect_one(e, key, old, full, &mut dead)?;
            reports.push(VmaReport {
                vma: key,
                dirty,
                history: tv.history.clone(),
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
            }
            for v in &mut next {
                v.tracked = false;
            }
        }
        // Registering can merge a VMA with a registered neighbour: keep the
        // next round's keys as the kernel now lists them.
        self.state.vmas = if self.registered && !dead {
            self.settle(next)?
        } else {
            next
        };
        self.registered = false;
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
        old: Option<TrackedVma>,
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
            (Some(tv), None) if !tv.tracked => WholeReason::Untracked,
            (Some(mut tv), None) => match self.written(&mut tv)? {
                Some(regions) => {
                    let (written, zeroed) = split(&regions);
                    tv.history.rounds = tv.history.rounds.saturating_add(1);
                    tv.history.record(key.start, &written);
                    tv.history.record(key.start, &zeroed);
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
                Start::Tracked => {
                    self.registered = true;
                    true
                }
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

    /// Rebuilds the tracked list from the current maps: a VMA that is
    /// exactly one tracked VMA, or exactly tiles several (merged by
    /// registration), is carried over; anything else is left out and will
    /// be new next round.
    fn settle(&self, next: Vec<TrackedVma>) -> Result<Vec<TrackedVma>, DirtyError> {
        let pid = self.state.pid;
        let now =
            crate::proc::maps::read(pid).map_err(|source| DirtyError::Proc { pid, source })?;
        let mut parts = next.into_iter().peekable();
        let mut out = Vec::with_capacity(now.len());
        for e in &now {
            let key = VmaKey::of(e);
            while parts.next_if(|p| p.key.end <= key.start).is_some() {}
            let mut group = Vec::new();
            while let Some(p) = parts.next_if(|p| p.key.start >= key.start && p.key.end <= key.end)
            {
                group.push(p);
            }
            if let Some(merged) = merge(key, group) {
                out.push(merged);
            }
        }
        Ok(out)
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
