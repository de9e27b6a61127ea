//! The address space: every VMA as CRIU's `vma_entry` (protection, `MAP_*` flags, status bits,
//! madvise bits), guard regions as extra `VMA_AREA_GUARD` entries, and the page ranges that
//! must be saved: present or swapped pages of private mappings that are neither the zero page
//! nor still the file's own page (`PAGEMAP_SCAN`), plus the whole `[vdso]`.
//!
//! Shared memory objects (`MAP_SHARED|MAP_ANONYMOUS`, SysV segments, memfds) are listed in
//! [`MemoryState::shmem`]: their contents belong to the object, not to one process, and are
//! saved once for the tree by [`super::shmem`]. Their VMAs name the object as CRIU's do:
//! `shmid` is the shmem inode (for SysV, which is the segment id), or for a memfd the
//! `files.img` id of a memfd file entry.

use images_format::pb::VmaEntry;
use images_format::vma::{MapFlags, VmaStatus};
use tracee::pagemap_scan::{PageCategories, Pagemap, ScanFlags, ScanRequest};
use tracee::proc::maps;
use tracee::proc::smaps::{self, SmapsEntry};
use tracee::{Pid, RemoteAddr, PAGE_SIZE};

use super::CollectError;

const O_RDONLY: u32 = 0;
const O_RDWR: u32 = 2;

/// smaps `VmFlags` codes that become `MAP_*` flags of the mapping.
const MMAP_CODES: [(&str, MapFlags); 5] = [
    ("gd", MapFlags::GROWSDOWN),
    ("lo", MapFlags::LOCKED),
    ("nr", MapFlags::NORESERVE),
    ("ht", MapFlags::HUGETLB),
    ("dp", MapFlags::DROPPABLE),
];

/// smaps `VmFlags` codes that record a `madvise()` advice, as `1 << MADV_*`.
const MADV_CODES: [(&str, u32); 8] = [
    ("sr", 2),  // MADV_SEQUENTIAL
    ("rr", 1),  // MADV_RANDOM
    ("dc", 10), // MADV_DONTFORK
    ("dd", 16), // MADV_DONTDUMP
    ("mg", 12), // MADV_MERGEABLE
    ("hg", 14), // MADV_HUGEPAGE
    ("nh", 15), // MADV_NOHUGEPAGE
    ("wf", 18), // MADV_WIPEONFORK
];

/// A run of pages to save, in address order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub start: u64,
    pub pages: u64,
}

impl PageRun {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.pages * PAGE_SIZE
    }
}

/// A file some VMA maps, for `files.img` (the VMA's `shmid` names its file id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    /// Index into [`MemoryState::vmas`].
    pub vma_index: usize,
    /// The path the kernel shows.
    pub path: String,
    /// `/proc/PID/map_files/START-END`, which opens the very file even if renamed.
    pub map_files: String,
}

/// What kind of shared memory object a VMA maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShmemKind {
    /// `MAP_SHARED|MAP_ANONYMOUS` (or a shared mapping of `/dev/zero`): a shmem inode of
    /// its own, `/dev/zero (deleted)` in maps.
    Anon,
    /// A SysV segment attached with `shmat` (`/SYSV<key> (deleted)`).
    Sysv,
    /// A memfd (`/memfd:<name> (deleted)`), mapped shared or private.
    Memfd,
}

/// A VMA of a shared memory object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmemVma {
    /// Index into [`MemoryState::vmas`].
    pub vma_index: usize,
    pub kind: ShmemKind,
    /// The shmem inode number (for SysV, the segment id).
    pub inode: u64,
    /// `/proc/PID/map_files/START-END`, which opens the object itself.
    pub map_files: String,
    /// The name the kernel shows (a memfd's name after `memfd:`, a SysV segment's key).
    pub name: String,
}

/// The collected address space.
#[derive(Debug, Clone, Default)]
pub struct MemoryState {
    /// Every VMA in address order, then the guard regions.
    pub vmas: Vec<VmaEntry>,
    /// File-backed VMAs whose file must be described in `files.img`.
    pub mapped_files: Vec<MappedFile>,
    /// VMAs of shared memory objects.
    pub shmem: Vec<ShmemVma>,
    /// The pages to save.
    pub pages: Vec<PageRun>,
    /// Pages of the VMAs whose contents were looked at.
    pub pages_scanned: u64,
    /// The maps lines the VMAs came from, for dirty tracking to compare between rounds.
    pub maps: Vec<tracee::proc::maps::MapsEntry>,
    /// How each VMA's pages were looked for, to look again the same way ([`rescan`]).
    pub scans: Vec<VmaScan>,
}

/// How the pages of one VMA are found: what [`collect`] decided from its smaps entry, kept
/// so that a later look at the same VMAs ([`rescan`]) walks them exactly alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaScan {
    start: RemoteAddr,
    end: RemoteAddr,
    contents: Contents,
    file: bool,
    /// A regular VMA whose contents are not scanned: guard markers are looked for apart.
    guards_apart: bool,
}

/// How the contents of one VMA are saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    /// Nothing: kernel-provided (`[vvar]`, `[vsyscall]`) or kept by a shared file.
    None,
    /// Pages that exist and differ from the file or zero page.
    Scanned,
    /// Every page (the `[vdso]`, which restore may need to compare).
    Whole,
}

/// A VMA the dump cannot save faithfully yet.
fn unsupported(pid: Pid, v: &SmapsEntry, why: &'static str) -> CollectError {
    CollectError::UnsupportedVma {
        pid,
        start: v.vma.start,
        end: v.vma.end,
        path: v.vma.path.clone().unwrap_or_default(),
        why,
    }
}

/// One VMA as the images describe it.
#[derive(Debug, Clone, PartialEq)]
struct Classified {
    entry: VmaEntry,
    contents: Contents,
    shmem: Option<ShmemKind>,
}

/// Which shared memory object a file-like VMA is, from the name the kernel shows.
fn shmem_kind(m: &tracee::proc::maps::MapsEntry) -> Option<ShmemKind> {
    let path = m.path.as_deref()?;
    if path.starts_with("/memfd:") && m.deleted {
        return Some(ShmemKind::Memfd);
    }
    if !m.perms.shared {
        return None;
    }
    if path.starts_with("/SYSV") && m.deleted {
        Some(ShmemKind::Sysv)
    } else if (path == "/dev/zero" && m.deleted) || path.starts_with("[anon_shmem:") {
        Some(ShmemKind::Anon)
    } else {
        None
    }
}

/// Classifies one VMA the way CRIU's smaps parser does.
fn classify(pid: Pid, v: &SmapsEntry) -> Result<Option<Classified>, CollectError> {
    let m = &v.vma;
    // The kernel's own `[vvar]` pages are PFN mappings too; any other is a device's.
    if !m.is_kernel_special() && (v.has_flag("io") || v.has_flag("pf")) {
        return Err(unsupported(pid, v, "I/O or PFN mapping of a device"));
    }
    if v.has_flag("ht") {
        return Err(unsupported(
            pid,
            v,
            "hugetlb mappings are not supported yet",
        ));
    }
    let mut flags = if m.perms.shared {
        MapFlags::SHARED
    } else {
        MapFlags::PRIVATE
    };
    for (code, bit) in MMAP_CODES {
        if v.has_flag(code) {
            flags |= bit;
        }
    }
    let madv = MADV_CODES
        .iter()
        .filter(|(code, _)| v.has_flag(code))
        .fold(0u64, |acc, (_, bit)| acc | (1u64 << bit));
    let mut entry = VmaEntry {
        start: m.start.get(),
        end: m.end.get(),
        pgoff: m.pgoff,
        shmid: 0,
        prot: u32::try_from(m.perms.prot()).unwrap_or(0),
        flags: flags.bits(),
        status: 0,
        fd: -1,
        madv: (madv != 0).then_some(madv),
        fdflags: None,
    };
    let path = m.path.as_deref().unwrap_or("");
    let shmem = shmem_kind(m);
    let contents = match m.special_name() {
        Some("[uprobes]") => return Ok(None),
        Some("[vsyscall]") => {
            entry.status = (VmaStatus::VSYSCALL | VmaStatus::ANON_PRIVATE).bits();
            Contents::None
        }
        Some("[vvar]" | "[vvar_vclock]") => {
            entry.status = (VmaStatus::REGULAR | VmaStatus::VVAR | VmaStatus::ANON_PRIVATE).bits();
            Contents::None
        }
        Some("[vdso]") => {
            entry.status = (VmaStatus::REGULAR | VmaStatus::VDSO | VmaStatus::ANON_PRIVATE).bits();
            Contents::Whole
        }
        Some("[heap]") => {
            entry.status = (VmaStatus::REGULAR | VmaStatus::HEAP | VmaStatus::ANON_PRIVATE).bits();
            Contents::Scanned
        }
        _ if shmem == Some(ShmemKind::Anon) || shmem == Some(ShmemKind::Sysv) => {
            // The object's inode names it across processes (for SysV it is the segment id).
            entry.shmid = m.inode;
            entry.status = (VmaStatus::REGULAR | VmaStatus::ANON_SHARED).bits();
            if shmem == Some(ShmemKind::Sysv) {
                entry.status |= VmaStatus::SYSVIPC.bits();
            }
            Contents::None
        }
        _ if m.is_file() => {
            if m.deleted && path.starts_with("/[aio]") {
                return Err(unsupported(pid, v, "AIO rings are not supported yet"));
            }
            let kind = if m.perms.shared {
                VmaStatus::FILE_SHARED
            } else {
                VmaStatus::FILE_PRIVATE
            };
            entry.status = (VmaStatus::REGULAR | kind).bits();
            if shmem == Some(ShmemKind::Memfd) {
                entry.status |= VmaStatus::MEMFD.bits();
            }
            entry.fdflags = Some(if m.perms.shared && m.perms.write {
                O_RDWR
            } else {
                O_RDONLY
            });
            if m.perms.shared {
                Contents::None
            } else {
                Contents::Scanned
            }
        }
        _ if m.perms.shared => {
            return Err(unsupported(
                pid,
                v,
                "shared mapping of an unknown kind of anonymous memory",
            ));
        }
        _ => {
            // `[stack]`, `[anon:NAME]` and plain anonymous memory.
            entry.status = (VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE).bits();
            Contents::Scanned
        }
    };
    if VmaStatus::from_bits_retain(entry.status).is_anon() {
        entry.flags |= MapFlags::ANONYMOUS.bits();
    }
    Ok(Some(Classified {
        entry,
        contents,
        shmem,
    }))
}

/// Every page of `[start, end)` that exists (present or swapped) or is a guard marker,
/// with what it is: the pages to save are those neither the shared zero page, a file's own
/// page, nor a guard marker (which looks swapped too). Only a file mapping can hold a file's
/// page, and asking the kernel about it costs a page lookup per present page (16 ms for a
/// populated GiB), so anonymous memory does not ask.
fn pages_and_guards_request(start: RemoteAddr, end: RemoteAddr, file: bool) -> ScanRequest {
    let file = if file {
        PageCategories::FILE
    } else {
        PageCategories::empty()
    };
    ScanRequest {
        start,
        end,
        flags: ScanFlags::empty(),
        inverted: PageCategories::empty(),
        mask: PageCategories::empty(),
        anyof_mask: PageCategories::PRESENT | PageCategories::SWAPPED | PageCategories::GUARD,
        return_mask: PageCategories::PRESENT
            | PageCategories::SWAPPED
            | PageCategories::GUARD
            | PageCategories::PFNZERO
            | file,
        max_pages: 0,
    }
}

fn guard_entry(start: RemoteAddr, end: RemoteAddr) -> VmaEntry {
    VmaEntry {
        start: start.get(),
        end: end.get(),
        status: VmaStatus::GUARD.bits(),
        fd: -1,
        ..VmaEntry::default()
    }
}

/// The swap type of a pte marker in a pagemap entry: write-protected but never populated
/// pages of a dirty-tracked VMA look swapped to `PAGEMAP_SCAN`, and hold nothing.
const PTE_MARKER_SWAP_TYPE: u64 = 31;
/// Swap entries in pagemap: bits 0-4 the type, then the offset.
const SWAP_TYPE_MASK: u64 = 0x1f;

/// Adds the pages of a swapped (not present) region that really hold data: swapped out or
/// being migrated, not the pte markers that userfaultfd write protection leaves.
fn swapped_pages(
    pagemap: &Pagemap,
    pid: Pid,
    region: &tracee::pagemap_scan::PageRegion,
    pages: &mut Vec<PageRun>,
) -> Result<(), CollectError> {
    let npages = usize::try_from(region.pages()).unwrap_or(0);
    let entries = pagemap
        .read_entries(region.start, npages)
        .map_err(|source| CollectError::Pagemap { pid, source })?;
    let mut addr = region.start.get();
    for entry in entries {
        let swapped = entry & tracee::pagemap_scan::entry::SWAPPED != 0;
        let marker =
            entry & tracee::pagemap_scan::entry::PFN_MASK & SWAP_TYPE_MASK == PTE_MARKER_SWAP_TYPE;
        if !swapped || !marker {
            push_run(pages, addr, addr + PAGE_SIZE);
        }
        addr += PAGE_SIZE;
    }
    Ok(())
}

fn guard_request(start: RemoteAddr, end: RemoteAddr) -> ScanRequest {
    ScanRequest {
        start,
        end,
        flags: ScanFlags::empty(),
        inverted: PageCategories::empty(),
        mask: PageCategories::GUARD,
        anyof_mask: PageCategories::empty(),
        return_mask: PageCategories::GUARD,
        max_pages: 0,
    }
}

fn push_run(pages: &mut Vec<PageRun>, start: u64, end: u64) {
    let count = (end.saturating_sub(start)) / PAGE_SIZE;
    if count == 0 {
        return;
    }
    match pages.last_mut() {
        Some(last) if last.end() == start => last.pages += count,
        _ => pages.push(PageRun {
            start,
            pages: count,
        }),
    }
}

/// Finds the pages to save and the guard markers of one VMA, as [`collect`] decided to.
fn scan_vma(
    pagemap: &Pagemap,
    pid: Pid,
    scan: &VmaScan,
    pages: &mut Vec<PageRun>,
    guards: &mut Vec<VmaEntry>,
) -> Result<(), CollectError> {
    let (start, end) = (scan.start, scan.end);
    match scan.contents {
        Contents::None => {}
        Contents::Whole => push_run(pages, start.get(), end.get()),
        Contents::Scanned => {
            // One walk finds both the pages and the guard markers: walking the page
            // tables of a populated GiB costs tens of ms of frozen time.
            let regions = pagemap
                .scan(&pages_and_guards_request(start, end, scan.file))
                .map_err(|source| CollectError::Pagemap { pid, source })?;
            for r in regions {
                if r.categories.contains(PageCategories::GUARD) {
                    guards.push(guard_entry(r.start, r.end));
                } else if r
                    .categories
                    .intersects(PageCategories::PFNZERO | PageCategories::FILE)
                {
                    // The shared zero page, or still the file's own page.
                } else if r.categories.contains(PageCategories::PRESENT) {
                    push_run(pages, r.start.get(), r.end.get());
                } else {
                    swapped_pages(pagemap, pid, &r, pages)?;
                }
            }
        }
    }
    if scan.guards_apart {
        let found = pagemap
            .scan(&guard_request(start, end))
            .map_err(|source| CollectError::Pagemap { pid, source })?;
        guards.extend(found.into_iter().map(|r| guard_entry(r.start, r.end)));
    }
    Ok(())
}

/// How many bytes of other VMAs one walk of [`rescan`] may cross to take in the next VMA
/// of its kind: walking them costs, a walk more costs too (a few µs each).
const CROSS_AT_MOST: u64 = 16 << 20;

/// Which walk of [`rescan`] a VMA belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Anon,
    File,
    GuardsOnly,
}

impl VmaScan {
    fn walk(&self) -> Option<Walk> {
        match (self.contents, self.file) {
            (Contents::Scanned, false) => Some(Walk::Anon),
            (Contents::Scanned, true) => Some(Walk::File),
            _ if self.guards_apart => Some(Walk::GuardsOnly),
            _ => None,
        }
    }

    fn len(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get())
    }
}

/// The VMAs of `scans` (in address order) that walk `kind`, in groups one walk each: a
/// group ends where more than [`CROSS_AT_MOST`] bytes of other VMAs lie before the next.
fn walk_groups(scans: &[VmaScan], kind: Walk) -> Vec<Vec<&VmaScan>> {
    let mut groups: Vec<Vec<&VmaScan>> = Vec::new();
    let mut crossed = 0u64;
    for scan in scans {
        if scan.walk() != Some(kind) {
            crossed = crossed.saturating_add(scan.len());
            continue;
        }
        match groups.last_mut() {
            Some(group) if crossed <= CROSS_AT_MOST => group.push(scan),
            _ => groups.push(vec![scan]),
        }
        crossed = 0;
    }
    groups
}

/// `[start, end)` cut to the VMAs of `group` it overlaps.
fn clipped<'a>(
    group: &'a [&VmaScan],
    start: RemoteAddr,
    end: RemoteAddr,
) -> impl Iterator<Item = (RemoteAddr, RemoteAddr)> + 'a {
    group.iter().filter_map(move |v| {
        let s = start.max(v.start);
        let e = end.min(v.end);
        (s < e).then_some((s, e))
    })
}

/// The pages to save and the guard regions of VMAs [`collect`] saw (`scans`), looked for
/// again as it did, for a process whose VMAs are known not to have changed: the same
/// requests and the same reading of their answers, only with one walk over several VMAs
/// of a kind where [`collect`] walks each VMA (the answers are cut back to the VMAs).
pub fn rescan(pid: Pid, scans: &[VmaScan]) -> Result<(Vec<PageRun>, Vec<VmaEntry>), CollectError> {
    let pagemap = Pagemap::open(pid).map_err(|source| CollectError::Pagemap { pid, source })?;
    let scan_err = |source| CollectError::Pagemap { pid, source };
    let mut found: Vec<PageRun> = Vec::new();
    let mut guards: Vec<(RemoteAddr, RemoteAddr)> = Vec::new();
    for scan in scans.iter().filter(|s| s.contents == Contents::Whole) {
        push_run(&mut found, scan.start.get(), scan.end.get());
    }
    for kind in [Walk::Anon, Walk::File] {
        for group in walk_groups(scans, kind) {
            let (Some(first), Some(last)) = (group.first(), group.last()) else {
                continue;
            };
            let request = pages_and_guards_request(first.start, last.end, kind == Walk::File);
            for r in pagemap.scan(&request).map_err(scan_err)? {
                for (start, end) in clipped(&group, r.start, r.end) {
                    if r.categories.contains(PageCategories::GUARD) {
                        guards.push((start, end));
                    } else if r
                        .categories
                        .intersects(PageCategories::PFNZERO | PageCategories::FILE)
                    {
                        // The shared zero page, or still the file's own page.
                    } else if r.categories.contains(PageCategories::PRESENT) {
                        push_run(&mut found, start.get(), end.get());
                    } else {
                        let part = tracee::pagemap_scan::PageRegion {
                            start,
                            end,
                            categories: r.categories,
                        };
                        let mut pages = Vec::new();
                        swapped_pages(&pagemap, pid, &part, &mut pages)?;
                        found.extend(pages);
                    }
                }
            }
        }
    }
    for group in walk_groups(scans, Walk::GuardsOnly) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            continue;
        };
        for r in pagemap
            .scan(&guard_request(first.start, last.end))
            .map_err(scan_err)?
        {
            guards.extend(clipped(&group, r.start, r.end));
        }
    }
    // In address order, adjacent runs merged, as a walk VMA after VMA leaves them.
    found.sort_unstable_by_key(|r| r.start);
    let mut pages = Vec::with_capacity(found.len());
    for run in found {
        push_run(&mut pages, run.start, run.end());
    }
    guards.sort_unstable_by_key(|g| g.0);
    let guards = guards.into_iter().map(|(s, e)| guard_entry(s, e)).collect();
    Ok((pages, guards))
}

/// Where the VMA list and its flags come from.
#[derive(Debug, Clone)]
pub enum VmaSource {
    /// `/proc/PID/smaps`, read now (what a full dump needs: every VMA flag).
    Smaps,
    /// `/proc/PID/maps` only (a pre-dump, which writes no `mm` image and needs only the
    /// VMAs' ranges and kinds; 0.1 ms instead of ~20 ms per GiB of smaps' page walk).
    MapsOnly,
    /// smaps read before the freeze, used if `/proc/PID/maps` read now shows the very same
    /// VMAs (else smaps is read again). Only flags that can change without changing a maps
    /// line (madvise advice and mlock of a whole VMA) could be stale, and only if they
    /// changed in the moment before the freeze: what a pre-copy final dump accepts to be
    /// frozen ~20 ms/GiB less.
    SmapsIfUnchanged(Vec<SmapsEntry>),
}

fn maps_only(maps: Vec<tracee::proc::maps::MapsEntry>) -> Vec<SmapsEntry> {
    maps.into_iter()
        .map(|vma| SmapsEntry {
            vma,
            fields: Default::default(),
            vm_flags: Vec::new(),
        })
        .collect()
}

/// Collects the VMAs and the pages to save of a frozen process.
#[tracing::instrument(skip_all, fields(pid = %pid))]
pub fn collect(pid: Pid, source: VmaSource) -> Result<MemoryState, CollectError> {
    let proc_err = |what| move |source| CollectError::Proc { pid, what, source };
    let maps = match source {
        VmaSource::Smaps => smaps::read(pid).map_err(proc_err("smaps"))?,
        VmaSource::MapsOnly => maps_only(maps::read(pid).map_err(proc_err("maps"))?),
        VmaSource::SmapsIfUnchanged(early) => {
            // Same lines, same VMAs: the flags read before the freeze stand (see
            // [`VmaSource::SmapsIfUnchanged`]).
            let now = maps::read(pid).map_err(proc_err("maps"))?;
            if now.len() == early.len() && now.iter().zip(&early).all(|(n, e)| *n == e.vma) {
                early
            } else {
                tracing::debug!("the VMAs changed since the early smaps read: reading again");
                smaps::read(pid).map_err(proc_err("smaps"))?
            }
        }
    };
    let pagemap = Pagemap::open(pid).map_err(|source| CollectError::Pagemap { pid, source })?;
    let mut state = MemoryState {
        maps: maps.iter().map(|v| v.vma.clone()).collect(),
        ..MemoryState::default()
    };
    let mut guards = Vec::new();
    for v in &maps {
        let Some(Classified {
            entry,
            contents,
            shmem,
        }) = classify(pid, v)?
        else {
            continue;
        };
        let (start, end) = (v.vma.start, v.vma.end);
        let status = VmaStatus::from_bits_retain(entry.status);
        let scan = VmaScan {
            start,
            end,
            contents,
            file: v.vma.is_file(),
            // Guard markers only live in anonymous and private file VMAs (scanned).
            guards_apart: contents != Contents::Scanned
                && status.contains(VmaStatus::REGULAR)
                && !status.contains(VmaStatus::VVAR),
        };
        if contents != Contents::None {
            state.pages_scanned += v.vma.len() / PAGE_SIZE;
        }
        scan_vma(&pagemap, pid, &scan, &mut state.pages, &mut guards)?;
        state.scans.push(scan);
        let map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", start.get(), end.get());
        if let Some(kind) = shmem {
            let shown = v.vma.path.as_deref().unwrap_or("");
            let name = match kind {
                ShmemKind::Memfd => shown.strip_prefix("/memfd:").unwrap_or(shown),
                ShmemKind::Sysv => shown.strip_prefix("/SYSV").unwrap_or(shown),
                ShmemKind::Anon => shown,
            };
            state.shmem.push(ShmemVma {
                vma_index: state.vmas.len(),
                kind,
                inode: v.vma.inode,
                map_files,
                name: name.to_owned(),
            });
        } else if status.maps_file() {
            state.mapped_files.push(MappedFile {
                vma_index: state.vmas.len(),
                path: v.vma.path.clone().unwrap_or_default(),
                map_files,
            });
        }
        tracing::debug!(
            start = format_args!("{:#x}", entry.start),
            end = format_args!("{:#x}", entry.end),
            status = format_args!("{:#x}", entry.status),
            path = v.vma.path.as_deref().unwrap_or(""),
            "vma"
        );
        state.vmas.push(entry);
    }
    // CRIU lists guard regions after the real VMAs, as VMAs of their own.
    state.vmas.extend(guards);
    tracing::info!(
        vmas = state.vmas.len(),
        pages = state.pages.iter().map(|r| r.pages).sum::<u64>(),
        scanned = state.pages_scanned,
        "memory collected"
    );
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_runs_merge() {
        let mut pages = Vec::new();
        push_run(&mut pages, 0x1000, 0x3000);
        push_run(&mut pages, 0x3000, 0x4000);
        push_run(&mut pages, 0x8000, 0x9000);
        push_run(&mut pages, 0x9000, 0x9000);
        assert_eq!(
            pages,
            vec![
                PageRun {
                    start: 0x1000,
                    pages: 3
                },
                PageRun {
                    start: 0x8000,
                    pages: 1
                }
            ]
        );
    }

    fn smaps_of(text: &str) -> SmapsEntry {
        smaps::parse(text).unwrap().remove(0)
    }

    #[test]
    fn classifies_like_criu() {
        let pid = Pid::from_raw(1).unwrap();
        let heap = smaps_of(
            "55d0c000-55d2d000 rw-p 00000000 00:00 0                                  [heap]\n\
             Size:                132 kB\nVmFlags: rd wr mr mw me ac \n",
        );
        let Classified {
            entry: e,
            contents: c,
            ..
        } = classify(pid, &heap).unwrap().unwrap();
        assert_eq!(
            e.status,
            (VmaStatus::REGULAR | VmaStatus::HEAP | VmaStatus::ANON_PRIVATE).bits()
        );
        assert_eq!(e.flags, (MapFlags::PRIVATE | MapFlags::ANONYMOUS).bits());
        assert_eq!(e.prot, 3);
        assert_eq!(c, Contents::Scanned);

        let stack = smaps_of(
            "7ffc0000-7ffc2000 rw-p 00000000 00:00 0                          [stack]\n\
             Size:                8 kB\nVmFlags: rd wr mr mw me gd ac hg dd \n",
        );
        let e = classify(pid, &stack).unwrap().unwrap().entry;
        assert_eq!(
            e.flags,
            (MapFlags::PRIVATE | MapFlags::ANONYMOUS | MapFlags::GROWSDOWN).bits()
        );
        assert_eq!(e.madv, Some((1 << 14) | (1 << 16)));

        let lib = smaps_of(
            "7f00000000-7f00001000 r--p 00002000 08:01 1234   /usr/lib/libc.so.6\n\
             Size:                4 kB\nVmFlags: rd mr mw me \n",
        );
        let Classified {
            entry: e,
            contents: c,
            ..
        } = classify(pid, &lib).unwrap().unwrap();
        assert_eq!(
            e.status,
            (VmaStatus::REGULAR | VmaStatus::FILE_PRIVATE).bits()
        );
        assert_eq!(e.pgoff, 0x2000);
        assert_eq!(e.fdflags, Some(O_RDONLY));
        assert_eq!(c, Contents::Scanned);

        let vvar = smaps_of(
            "7f1000-7f2000 r--p 00000000 00:00 0    [vvar_vclock]\nVmFlags: rd mr pf io de dd \n",
        );
        let Classified {
            entry: e,
            contents: c,
            ..
        } = classify(pid, &vvar).unwrap().unwrap();
        assert_eq!(
            e.status,
            (VmaStatus::REGULAR | VmaStatus::VVAR | VmaStatus::ANON_PRIVATE).bits()
        );
        assert_eq!(c, Contents::None);
        let device =
            smaps_of("7f1000-7f2000 rw-s 00000000 00:05 7    /dev/mem\nVmFlags: rd wr sh pf io \n");
        assert!(
            classify(pid, &device).is_err(),
            "device mappings are refused"
        );
    }

    #[test]
    fn shared_memory_objects_are_named_by_their_inode() {
        let pid = Pid::from_raw(1).unwrap();
        let anon = smaps_of(
            "7f10000000-7f10040000 rw-s 00000000 00:01 4711    /dev/zero (deleted)\n\
             VmFlags: rd wr sh mr mw me ms \n",
        );
        let c = classify(pid, &anon).unwrap().unwrap();
        assert_eq!(c.shmem, Some(ShmemKind::Anon));
        assert_eq!(c.entry.shmid, 4711);
        assert_eq!(
            c.entry.status,
            (VmaStatus::REGULAR | VmaStatus::ANON_SHARED).bits()
        );
        assert_eq!(
            c.entry.flags,
            (MapFlags::SHARED | MapFlags::ANONYMOUS).bits()
        );
        assert_eq!(c.contents, Contents::None);

        let sysv = smaps_of(
            "7f20000000-7f20002000 r--s 00000000 00:01 32769   /SYSV0000abcd (deleted)\n\
             VmFlags: rd sh mr me ms \n",
        );
        let c = classify(pid, &sysv).unwrap().unwrap();
        assert_eq!(c.shmem, Some(ShmemKind::Sysv));
        assert_eq!(c.entry.shmid, 32769);
        assert_eq!(
            c.entry.status,
            (VmaStatus::REGULAR | VmaStatus::ANON_SHARED | VmaStatus::SYSVIPC).bits()
        );

        let memfd = smaps_of(
            "7f30000000-7f30001000 rw-s 00000000 00:01 99      /memfd:cfg (deleted)\n\
             VmFlags: rd wr sh mr mw me ms \n",
        );
        let c = classify(pid, &memfd).unwrap().unwrap();
        assert_eq!(c.shmem, Some(ShmemKind::Memfd));
        assert_eq!(
            c.entry.status,
            (VmaStatus::REGULAR | VmaStatus::FILE_SHARED | VmaStatus::MEMFD).bits()
        );
        assert_eq!(c.contents, Contents::None);

        let tmpfs_file = smaps_of(
            "7f40000000-7f40001000 rw-s 00000000 00:2a 12      /dev/shm/data\n\
             VmFlags: rd wr sh mr mw me ms \n",
        );
        let c = classify(pid, &tmpfs_file).unwrap().unwrap();
        assert_eq!(
            c.shmem, None,
            "a tmpfs file is a file, not an object of ours"
        );
        assert_eq!(
            c.entry.status,
            (VmaStatus::REGULAR | VmaStatus::FILE_SHARED).bits()
        );
    }
}
