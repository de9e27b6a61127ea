//! Rebuilding the address space of the stopped child by injected syscalls.
//!
//! Order matters throughout:
//! - the helper page (a `syscall` instruction) goes into a hole of both layouts
//!   first, so that injection no longer depends on the child's own vdso;
//! - the child's own rseq area is unregistered before its TLS is unmapped, or the
//!   kernel would fault writing it at the next preemption;
//! - `[vvar]`, `[vvar_vclock]` and `[vdso]` move as one block (the vdso code reads
//!   the vvar pages at fixed offsets) and via a temporary spot, since the child's
//!   block may overlap the dumped one;
//! - the target `preadv`s its pages from the pages image into its own writable
//!   memory (one copy from the page cache: measured fastest, see [`FillMethod`]);
//!   pages of read-only VMAs go through `/proc/PID/mem`, which ignores protections;
//!   a read-only private VMA that was writable once is mapped writable and
//!   write-protected after the fill, so the kernel accounts it as before (`ac`);
//! - `PR_SET_MM_MAP` with the exe fd comes after the old executable is unmapped
//!   (EBUSY otherwise).
//! - shared memory objects (`MAP_SHARED|MAP_ANONYMOUS`, memfds, SysV segments) are mapped
//!   in address order with the rest, through [`crate::shmem::SharedMaps`]: the first
//!   mapping in the tree creates and fills an object, later ones map the same object.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use images_format::VmaStatus;
use tracee::memory::{MemoryError, RemoteMem};
use tracee::{Pid, RemoteAddr, Tracee};

use crate::remote::{self, RemoteError};
use crate::shmem::SharedMaps;

use crate::plan::{self, MemoryPlan, MmPlan, Range, VmaPlan, PAGE_SIZE};

/// Code of the helper page: `syscall; int3`.
const HELPER_CODE: [u8; 3] = [0x0f, 0x05, 0xcc];
/// Helper layout: one page of code, then data pages for paths, `prctl_mm_map`, the
/// signal handler table and seccomp programs (up to 4096 instructions of 8 bytes).
const HELPER_PAGES: u64 = 10;
const HELPER_DATA: u64 = PAGE_SIZE;
/// Lowest address tried for the helper and the temporary vdso spot.
pub(crate) const HOLE_FROM: u64 = 0x1_0000_0000;
/// Highest user address on x86_64 with 4-level paging.
pub(crate) const USER_END: u64 = 0x7fff_ffff_f000;

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const MREMAP_MAYMOVE: u64 = 1;
const MREMAP_FIXED: u64 = 2;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const O_RDONLY: u64 = 0;
const O_CLOEXEC: u64 = 0o2_000_000;
const AT_FDCWD: i64 = -100;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_THP_DISABLE: u64 = 41;
const PR_SET_DUMPABLE: u64 = 4;
const MADV_GUARD_INSTALL: u64 = 102;
/// Size of `struct prctl_mm_map` (include/uapi/linux/prctl.h).
const PRCTL_MM_MAP_SIZE: usize = 104;
/// Pages are copied into the target in pieces of this size.
const FILL_CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryRestoreError {
    #[error("pid {pid}: reading the child's maps")]
    Maps {
        pid: Pid,
        #[source]
        source: tracee::proc::ProcError,
    },
    #[error("pid {pid}: no free hole of {len:#x} bytes for the {what}")]
    NoHole {
        pid: Pid,
        len: u64,
        what: &'static str,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("pid {pid}: map vma {start:#x}: the kernel placed it at {got:#x}")]
    Misplaced { pid: Pid, start: u64, got: u64 },
    #[error("pid {pid}: ptrace while {step}")]
    Ptrace {
        pid: Pid,
        step: &'static str,
        #[source]
        source: tracee::PtraceError,
    },
    #[error("pid {pid}: the vDSO here differs from the dumped one ({what}); restore on a machine with the same kernel")]
    VdsoMismatch { pid: Pid, what: String },
    #[error("pid {pid}: mapped file {path} changed since the dump ({what})")]
    FileChanged {
        pid: Pid,
        path: PathBuf,
        what: String,
    },
    #[error("pid {pid}: mapped file {path}")]
    FileStat {
        pid: Pid,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: reading pages from {path} at offset {offset}")]
    PagesRead {
        pid: Pid,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the dumped vdso from {path} at offset {offset}")]
    VdsoImage {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("page range {start:#x}+{len:#x} is outside every dumped vma")]
    PagesOutside { start: u64, len: u64 },
    #[error("pid {pid}: the pages image ended before the pages for {addr:#x}")]
    ShortPages { pid: Pid, addr: u64 },
    #[error("pid {pid}: the page-filling thread panicked")]
    FillThread { pid: Pid },
    #[error("pid {pid}: listing its fds")]
    ListFds {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: path {path} is too long to pass to the target")]
    PathTooLong { pid: Pid, path: PathBuf },
    #[error("shared memory")]
    Shmem(#[from] crate::shmem::ShmemError),
}

/// Where the bytes of a run of dumped pages are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSource {
    pub vaddr: u64,
    pub len: u64,
    pub file: PathBuf,
    pub offset: u64,
}

impl PageSource {
    /// The bytes of `start..end` (inside this run): the same file, at their own offset.
    pub fn part(&self, start: u64, end: u64) -> PageSource {
        PageSource {
            vaddr: start,
            len: end - start,
            file: self.file.clone(),
            offset: self.offset + (start - self.vaddr),
        }
    }
}

/// The helper page in the target, through which every injected syscall goes.
#[derive(Debug, Clone, Copy)]
pub struct Helper {
    pub addr: u64,
}

impl Helper {
    pub fn data(&self) -> u64 {
        self.addr + HELPER_DATA
    }
    /// Bytes the data area holds.
    pub fn room(&self) -> u64 {
        (HELPER_PAGES * PAGE_SIZE).saturating_sub(HELPER_DATA)
    }
    /// Writes `data` at the start of the data area, refusing what would spill over
    /// into the restored memory after it (image values decide some sizes).
    pub fn put(&self, pid: Pid, data: &[u8], step: impl Into<String>) -> Result<(), RemoteError> {
        if data.len() as u64 > self.room() {
            return Err(RemoteError::TooLarge {
                pid,
                step: step.into(),
                len: data.len(),
                room: self.room(),
            });
        }
        remote::put(pid, self.data(), data, step)
    }
    pub fn len(&self) -> u64 {
        HELPER_PAGES * PAGE_SIZE
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn range(&self) -> Range {
        Range {
            start: self.addr,
            end: self.addr + self.len(),
        }
    }
}

/// What the memory step did, for the stats and the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStats {
    pub pages_restored: u64,
    pub fill_time_us: u64,
}

fn inj(
    t: &mut Tracee,
    step: impl Into<String>,
    nr: i64,
    args: [u64; 6],
) -> Result<i64, MemoryRestoreError> {
    Ok(remote::call(t, step, nr, args)?)
}

fn mem_err(pid: Pid, step: impl Into<String>) -> impl FnOnce(MemoryError) -> MemoryRestoreError {
    let step = step.into();
    move |source| {
        MemoryRestoreError::Remote(RemoteError::Memory {
            pid,
            step,
            source: Box::new(source),
        })
    }
}

fn as_u64(v: i64) -> u64 {
    remote::word(v)
}

/// The child's current VMAs.
fn child_maps(pid: Pid) -> Result<Vec<(Range, Option<String>)>, MemoryRestoreError> {
    let maps =
        tracee::proc::maps::read(pid).map_err(|source| MemoryRestoreError::Maps { pid, source })?;
    Ok(maps
        .into_iter()
        .map(|m| {
            (
                Range {
                    start: m.start.get(),
                    end: m.end.get(),
                },
                m.path.clone(),
            )
        })
        .collect())
}

fn is_vdso_part(name: Option<&str>) -> bool {
    matches!(name, Some("[vdso]" | "[vvar]" | "[vvar_vclock]"))
}

/// Maps the helper page in a hole of both layouts and moves injection onto it.
pub fn place_helper(t: &mut Tracee, memory: &MemoryPlan) -> Result<Helper, MemoryRestoreError> {
    let pid = t.pid();
    let mut taken: Vec<Range> = child_maps(pid)?.into_iter().map(|(r, _)| r).collect();
    taken.extend(memory.occupied.iter().copied());
    taken.extend(memory.guards.iter().copied());
    let len = HELPER_PAGES * PAGE_SIZE;
    let addr =
        plan::pick_hole(&taken, len, HOLE_FROM, USER_END).ok_or(MemoryRestoreError::NoHole {
            pid,
            len,
            what: "helper page",
        })?;
    inj(
        t,
        "map the helper page",
        libc_nr::MMAP,
        [
            addr,
            len,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
            u64::MAX,
            0,
        ],
    )?;
    tracee::memory::write_remote(pid, RemoteAddr(addr), &HELPER_CODE)
        .map_err(mem_err(pid, "write the helper code"))?;
    inj(
        t,
        "make the helper executable",
        libc_nr::MPROTECT,
        [addr, PAGE_SIZE, PROT_READ | PROT_EXEC, 0, 0, 0],
    )?;
    t.set_syscall_insn(RemoteAddr(addr));
    Ok(Helper { addr })
}

/// Empties the child's address space but the helper and the vDSO block, then moves
/// that block to its dumped place.
pub fn clear_and_move_vdso(
    t: &mut Tracee,
    memory: &MemoryPlan,
    helper: &Helper,
    dumped_vdso: &Option<Vec<u8>>,
) -> Result<(), MemoryRestoreError> {
    let pid = t.pid();
    // The child's libc registered rseq in its TLS, which is about to go.
    let rseq = t
        .rseq_config()
        .map_err(|source| MemoryRestoreError::Ptrace {
            pid,
            step: "reading the child's rseq",
            source,
        })?;
    if let Some(r) = rseq {
        inj(
            t,
            "unregister the child's rseq",
            libc_nr::RSEQ,
            [
                r.addr.get(),
                u64::from(r.len),
                RSEQ_FLAG_UNREGISTER,
                u64::from(r.sig),
                0,
                0,
            ],
        )?;
    }
    let maps = child_maps(pid)?;
    let keep = |(range, name): &(Range, Option<String>)| {
        is_vdso_part(name.as_deref())
            || name.as_deref() == Some("[vsyscall]")
            || range.overlaps(&helper.range())
    };
    for span in spans_between_kept(&maps, keep) {
        inj(
            t,
            format!("unmap the child's {:#x}-{:#x}", span.start, span.end),
            libc_nr::MUNMAP,
            [span.start, span.len(), 0, 0, 0, 0],
        )?;
    }
    let Some(dumped) = &memory.vdso_block else {
        // The dumped process had no vDSO (static binaries can drop it): drop ours too.
        for (range, name) in &maps {
            if is_vdso_part(name.as_deref()) {
                inj(
                    t,
                    "unmap the vdso",
                    libc_nr::MUNMAP,
                    [range.start, range.len(), 0, 0, 0, 0],
                )?;
            }
        }
        return Ok(());
    };
    let ours: Vec<Range> = maps
        .iter()
        .filter(|(_, n)| is_vdso_part(n.as_deref()))
        .map(|(r, _)| *r)
        .collect();
    let (Some(first), Some(last)) = (ours.first(), ours.last()) else {
        return Err(MemoryRestoreError::VdsoMismatch {
            pid,
            what: "this process has no vdso".into(),
        });
    };
    let block = Range {
        start: first.start,
        end: last.end,
    };
    check_vdso_layout(pid, &maps, dumped)?;
    if let Some(image) = dumped_vdso {
        check_vdso_symbols(pid, image)?;
    }
    if block.start == dumped.range.start {
        return Ok(());
    }
    let mut taken: Vec<Range> = memory.occupied.clone();
    taken.push(block);
    taken.push(helper.range());
    let temp = plan::pick_hole(&taken, block.len(), HOLE_FROM, USER_END).ok_or(
        MemoryRestoreError::NoHole {
            pid,
            len: block.len(),
            what: "vdso move",
        },
    )?;
    // One mremap spanning the three VMAs moves them together (allowed since 6.x).
    for (from, to) in [(block.start, temp), (temp, dumped.range.start)] {
        inj(
            t,
            format!("move the vdso block {from:#x} -> {to:#x}"),
            libc_nr::MREMAP,
            [
                from,
                block.len(),
                block.len(),
                MREMAP_MAYMOVE | MREMAP_FIXED,
                to,
                0,
            ],
        )?;
    }
    Ok(())
}

/// The address spans covering every mapping of `maps` (in address order) not kept, one
/// span per run of such mappings between kept ones: munmap takes the holes between
/// mappings in its stride, so one injection clears what took one per mapping.
fn spans_between_kept<F>(maps: &[(Range, Option<String>)], keep: F) -> Vec<Range>
where
    F: Fn(&(Range, Option<String>)) -> bool,
{
    let mut spans: Vec<Range> = Vec::new();
    let mut open = false;
    for entry in maps {
        if keep(entry) {
            open = false;
            continue;
        }
        let range = entry.0;
        match spans.last_mut() {
            Some(last) if open => last.end = range.end,
            _ => spans.push(range),
        }
        open = true;
    }
    spans
}

/// The child's vDSO block must have the dumped parts in the same order and sizes,
/// and the same vDSO code (compared by its ELF symbols).
fn check_vdso_layout(
    pid: Pid,
    maps: &[(Range, Option<String>)],
    dumped: &plan::VdsoBlock,
) -> Result<(), MemoryRestoreError> {
    let ours: Vec<u64> = maps
        .iter()
        .filter(|(_, n)| is_vdso_part(n.as_deref()))
        .map(|(r, _)| r.len())
        .collect();
    let theirs: Vec<u64> = dumped.parts.iter().map(|(_, r)| r.len()).collect();
    if ours != theirs {
        return Err(MemoryRestoreError::VdsoMismatch {
            pid,
            what: format!("part sizes {ours:x?} here, {theirs:x?} in the image"),
        });
    }
    Ok(())
}

/// The dumped vDSO code must export the same symbols at the same offsets as ours:
/// glibc keeps pointers into it, and the code itself is not restored.
fn check_vdso_symbols(pid: Pid, image: &[u8]) -> Result<(), MemoryRestoreError> {
    let dumped =
        tracee::vdso::dynamic_symbols(image).map_err(|e| MemoryRestoreError::VdsoMismatch {
            pid,
            what: format!("the dumped vdso is not an ELF image: {e}"),
        })?;
    let ours = tracee::vdso::read_vdso(pid).map_err(|e| MemoryRestoreError::VdsoMismatch {
        pid,
        what: format!("reading this vdso: {e}"),
    })?;
    if ours.symbols != dumped {
        let mut diff: Vec<String> = Vec::new();
        for (name, off) in &dumped {
            match ours.symbols.get(name) {
                Some(o) if o == off => {}
                Some(o) => diff.push(format!("{name} at {o:#x} here, {off:#x} in the image")),
                None => diff.push(format!("{name} missing here")),
            }
        }
        diff.truncate(4);
        return Err(MemoryRestoreError::VdsoMismatch {
            pid,
            what: diff.join(", "),
        });
    }
    tracing::debug!(%pid, symbols = dumped.len(), "vdso symbols match the image");
    Ok(())
}

/// Closes in the target every fd the plan does not name (the child's status pipe).
pub fn close_other_fds(
    t: &mut Tracee,
    child: &crate::plan::ChildPlan,
) -> Result<(), MemoryRestoreError> {
    let pid = t.pid();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|source| MemoryRestoreError::ListFds { pid, source })?;
    let mut extra = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|source| MemoryRestoreError::ListFds { pid, source })?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        {
            if !child.fds.iter().any(|f| f.fd == fd) {
                extra.push(fd);
            }
        }
    }
    for fd in extra {
        inj(
            t,
            format!("close fd {fd}"),
            libc_nr::CLOSE,
            [as_u64(i64::from(fd)), 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Pages split by where they go.
#[derive(Debug, Clone, Default)]
pub struct PagesToFill {
    /// Runs written into the new VMAs.
    pub fill: Vec<PageSource>,
    /// The dumped `[vdso]` code, when the image has it: compared, never written.
    pub vdso_image: Option<Vec<u8>>,
}

/// Splits the dumped pages into those to write and those of the vDSO block (the
/// running kernel's vDSO is moved there instead), reading the dumped vDSO code.
pub fn pages_to_fill(
    memory: &MemoryPlan,
    sources: &[PageSource],
) -> Result<PagesToFill, MemoryRestoreError> {
    let (fill, vdso) = split_sources(memory, sources)?;
    let vdso_part = memory.vdso_block.as_ref().and_then(|b| {
        b.parts
            .iter()
            .find(|(status, _)| VmaStatus::from_bits_retain(*status).contains(VmaStatus::VDSO))
            .map(|(_, r)| *r)
    });
    let vdso_image = match vdso_part {
        Some(part) => read_range(&vdso, part)?,
        None => None,
    };
    Ok(PagesToFill { fill, vdso_image })
}

/// The bytes of `want` if `sources` cover all of it.
fn read_range(sources: &[PageSource], want: Range) -> Result<Option<Vec<u8>>, MemoryRestoreError> {
    let mut image = vec![0u8; usize::try_from(want.len()).unwrap_or(0)];
    let mut covered = 0;
    for s in sources {
        let r = Range {
            start: s.vaddr,
            end: s.vaddr + s.len,
        };
        if !r.overlaps(&want) {
            continue;
        }
        let start = r.start.max(want.start);
        let end = r.end.min(want.end);
        let dst = usize::try_from(start - want.start).unwrap_or(0);
        let n = usize::try_from(end - start).unwrap_or(0);
        let Some(slot) = image.get_mut(dst..dst + n) else {
            continue;
        };
        let read = |source| MemoryRestoreError::VdsoImage {
            path: s.file.clone(),
            offset: s.offset,
            source,
        };
        let file = File::open(&s.file).map_err(read)?;
        file.read_exact_at(slot, s.offset + (start - s.vaddr))
            .map_err(read)?;
        covered += end - start;
    }
    Ok((covered == want.len()).then_some(image))
}

/// Sorts page runs into those inside dumped VMAs and those in the vDSO block; a run
/// anywhere else means a damaged image.
pub fn split_sources(
    memory: &MemoryPlan,
    sources: &[PageSource],
) -> Result<(Vec<PageSource>, Vec<PageSource>), MemoryRestoreError> {
    let mut fill = Vec::new();
    let mut vdso = Vec::new();
    for s in sources {
        let r = Range {
            start: s.vaddr,
            end: s.vaddr.saturating_add(s.len),
        };
        if memory
            .vdso_block
            .as_ref()
            .is_some_and(|b| r.start >= b.range.start && r.end <= b.range.end)
        {
            vdso.push(s.clone());
            continue;
        }
        // A run may span adjacent VMAs; each of its pages must be in one.
        let mut at = r.start;
        let idx = memory.vmas.partition_point(|v| v.range.end <= at);
        for v in &memory.vmas[idx..] {
            if v.range.start > at {
                break;
            }
            at = v.range.end.min(r.end);
            if at >= r.end {
                break;
            }
        }
        if at < r.end {
            return Err(MemoryRestoreError::PagesOutside {
                start: s.vaddr,
                len: s.len,
            });
        }
        fill.push(s.clone());
    }
    Ok((fill, vdso))
}

/// Maps every dumped VMA at its place with its protection. Shared memory objects come
/// from `shared`, which creates each object at its first mapping in the tree (see
/// [`crate::shmem`]).
pub fn map_vmas(
    t: &mut Tracee,
    memory: &MemoryPlan,
    helper: &Helper,
    shared: &mut SharedMaps,
) -> Result<(), MemoryRestoreError> {
    let pid = t.pid();
    let mut opened: HashMap<(u32, u64), i64> = HashMap::new();
    let mut checked: std::collections::HashSet<u32> = std::collections::HashSet::new();
    for vma in &memory.vmas {
        if let Some(object) = memory
            .shmem
            .iter()
            .find(|s| s.range.start == vma.range.start)
        {
            shared.map(t, helper, memory, object, vma.write_then_protect)?;
            continue;
        }
        // Once per file: reading an ELF for its build-id costs far more than a mapping.
        if let Some(f) = &vma.file {
            if checked.insert(f.file_id) {
                check_mapped_file(pid, vma)?;
            }
        }
        let (fd, offset) = match &vma.file {
            Some(f) => {
                let key = (f.file_id, f.open_flags as u64);
                let fd = match opened.get(&key) {
                    Some(&fd) => fd,
                    None => {
                        let fd =
                            open_in_target(t, helper, &f.path, f.open_flags as u64 | O_CLOEXEC)?;
                        opened.insert(key, fd);
                        fd
                    }
                };
                (as_u64(fd), f.pgoff)
            }
            None => (u64::MAX, 0),
        };
        let got = inj(
            t,
            format!("map vma {:#x}-{:#x}", vma.range.start, vma.range.end),
            libc_nr::MMAP,
            [
                vma.range.start,
                vma.range.len(),
                u64::from(if vma.write_then_protect {
                    vma.prot | plan::PROT_WRITE
                } else {
                    vma.prot
                }),
                u64::from(vma.map_flags),
                fd,
                offset,
            ],
        )?;
        if as_u64(got) != vma.range.start {
            return Err(MemoryRestoreError::Misplaced {
                pid,
                start: vma.range.start,
                got: as_u64(got),
            });
        }
    }
    for fd in opened.into_values() {
        inj(
            t,
            "close a mapped file",
            libc_nr::CLOSE,
            [as_u64(fd), 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Refuses to map an ELF file whose build-id or size changed since the dump.
fn check_mapped_file(pid: Pid, vma: &VmaPlan) -> Result<(), MemoryRestoreError> {
    let Some(f) = &vma.file else { return Ok(()) };
    if let Some(size) = f.size {
        let meta =
            std::fs::metadata(f.open_path()).map_err(|source| MemoryRestoreError::FileStat {
                pid,
                path: f.path.clone(),
                source,
            })?;
        if meta.len() != size {
            return Err(MemoryRestoreError::FileChanged {
                pid,
                path: f.path.clone(),
                what: format!("size {} now, {} at dump", meta.len(), size),
            });
        }
    }
    if !f.build_id.is_empty() {
        if let Ok(Some(now)) = crate::elf::build_id(f.open_path()) {
            if !build_ids_match(&now, &f.build_id) {
                return Err(MemoryRestoreError::FileChanged {
                    pid,
                    path: f.path.clone(),
                    what: "its build-id differs".into(),
                });
            }
        }
    }
    Ok(())
}

/// Whether a build-id read from the file now matches the image's words. Images pack
/// the id's bytes into native-endian u32 words with zero padding; a writer that
/// stored one byte per word is accepted too.
pub fn build_ids_match(now: &[u8], dumped: &[u32]) -> bool {
    let packed: Vec<u8> = dumped.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let as_packed = packed.len() >= now.len()
        && packed[..now.len()] == *now
        && packed[now.len()..].iter().all(|&b| b == 0);
    let as_bytes =
        dumped.len() == now.len() && dumped.iter().zip(now).all(|(&w, &b)| w == u32::from(b));
    as_packed || as_bytes
}

/// Injects `openat(AT_FDCWD, path, flags)` with the path in the helper's data page.
pub fn open_in_target(
    t: &mut Tracee,
    helper: &Helper,
    path: &std::path::Path,
    flags: u64,
) -> Result<i64, MemoryRestoreError> {
    let pid = t.pid();
    let mut bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    bytes.push(0);
    if bytes.len() as u64 > (HELPER_PAGES - 1) * PAGE_SIZE {
        return Err(MemoryRestoreError::PathTooLong {
            pid,
            path: path.to_path_buf(),
        });
    }
    helper
        .put(pid, &bytes, format!("pass path {}", path.display()))
        .map_err(MemoryRestoreError::Remote)?;
    inj(
        t,
        format!("open {} in the target", path.display()),
        libc_nr::OPENAT,
        [as_u64(AT_FDCWD), helper.data(), flags, 0, 0, 0],
    )
}

/// How the dumped pages get into the new VMAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FillMethod {
    /// The target `preadv`s the pages image into its own writable memory; the rest
    /// goes through `/proc/PID/mem`. One copy from the page cache: the fastest of
    /// the single-CPU methods here.
    Preadv,
    /// We read the image and `process_vm_writev` it (two copies).
    Writev,
    /// We read the image and `pwrite` `/proc/PID/mem` (two copies, page by page).
    ProcMem,
    /// `Preadv` for half of the pages while a thread of ours `Writev`s the other half
    /// from another CPU: the default, ~10% faster than `Preadv` for 1 GiB here.
    #[default]
    Parallel,
}

/// Writes the dumped pages into the new VMAs through `/proc/PID/mem`.
pub fn fill_pages(pid: Pid, sources: &[PageSource]) -> Result<MemoryStats, MemoryRestoreError> {
    fill_pages_with(pid, sources, false)
}

/// Like [`fill_pages`], with `process_vm_writev` into writable memory and
/// `/proc/PID/mem` only for the rest.
pub fn fill_pages_writev(
    pid: Pid,
    sources: &[PageSource],
) -> Result<MemoryStats, MemoryRestoreError> {
    fill_pages_with(pid, sources, true)
}

fn fill_pages_with(
    pid: Pid,
    sources: &[PageSource],
    writev: bool,
) -> Result<MemoryStats, MemoryRestoreError> {
    let started = Instant::now();
    let mem = RemoteMem::open(pid).map_err(mem_err(pid, "open /proc/PID/mem"))?;
    let mut files: HashMap<&std::path::Path, File> = HashMap::new();
    // No larger than the largest run: a whole chunk is a zeroed allocation the allocator
    // clears where it reuses memory (8 MiB cleared to fill 16 pages took 0.6 ms).
    let largest = sources.iter().map(|s| s.len).max().unwrap_or(0);
    let mut buf = vec![
        0u8;
        usize::try_from(largest)
            .unwrap_or(FILL_CHUNK)
            .min(FILL_CHUNK)
    ];
    let mut pages = 0;
    for src in sources {
        let file = match files.get(src.file.as_path()) {
            Some(f) => f,
            None => {
                let f = File::open(&src.file).map_err(|source| MemoryRestoreError::PagesRead {
                    pid,
                    path: src.file.clone(),
                    offset: 0,
                    source,
                })?;
                files.entry(src.file.as_path()).or_insert(f)
            }
        };
        let mut done = 0u64;
        while done < src.len {
            let n = usize::try_from((src.len - done).min(FILL_CHUNK as u64)).unwrap_or(FILL_CHUNK);
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, src.offset + done)
                .map_err(|source| MemoryRestoreError::PagesRead {
                    pid,
                    path: src.file.clone(),
                    offset: src.offset + done,
                    source,
                })?;
            let at = RemoteAddr(src.vaddr + done);
            let written = if writev {
                tracee::memory::write_remote_fast(pid, at, chunk)
            } else {
                mem.write_at(at, chunk)
            };
            written.map_err(mem_err(
                pid,
                format!("write pages at {:#x}", src.vaddr + done),
            ))?;
            done += n as u64;
        }
        pages += src.len / PAGE_SIZE;
    }
    Ok(MemoryStats {
        pages_restored: pages,
        fill_time_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    })
}

/// Most iovecs passed to one injected `preadv` (the helper's data area holds them).
const PREADV_IOVECS: usize = 1024;
const O_RDONLY_CLOEXEC: u64 = O_RDONLY | O_CLOEXEC;

/// Splits runs at VMA boundaries into those the target can write itself (its VMA is
/// writable) and the rest, which only `/proc/PID/mem` can fill.
pub fn split_by_writability(
    memory: &MemoryPlan,
    sources: &[PageSource],
) -> (Vec<PageSource>, Vec<PageSource>) {
    let mut writable = Vec::new();
    let mut other = Vec::new();
    for s in sources {
        let end = s.vaddr.saturating_add(s.len);
        let mut at = s.vaddr;
        let idx = memory.vmas.partition_point(|v| v.range.end <= at);
        for v in &memory.vmas[idx..] {
            if at >= end || v.range.start > at {
                break;
            }
            let stop = v.range.end.min(end);
            let part = s.part(at, stop);
            if v.prot & plan::PROT_WRITE != 0 || v.write_then_protect {
                writable.push(part);
            } else {
                other.push(part);
            }
            at = stop;
        }
        if at < end {
            // Not inside a VMA: `split_sources` refused these already; let the write fail loudly.
            other.push(s.part(at, end));
        }
    }
    (writable, other)
}

/// Fills writable VMAs by making the target `preadv` the pages image straight into
/// its own memory: one copy, from the page cache, with the target's own page faults,
/// many runs per call. The rest goes through `/proc/PID/mem`.
pub fn fill_pages_injected(
    t: &mut Tracee,
    helper: &Helper,
    memory: &MemoryPlan,
    sources: &[PageSource],
) -> Result<MemoryStats, MemoryRestoreError> {
    let started = Instant::now();
    let pid = t.pid();
    let (writable, other) = split_by_writability(memory, sources);
    preadv_runs(t, helper, &writable)?;
    let rest = fill_pages(pid, &other)?;
    Ok(MemoryStats {
        pages_restored: page_count(&writable) + rest.pages_restored,
        fill_time_us: micros_since(started),
    })
}

/// Up to this many pages, [`fill_pages_parallel`] writes them itself, from one thread.
const SMALL_FILL_PAGES: u64 = 32;

/// Like [`fill_pages_injected`], with a second CPU at work: the target `preadv`s
/// half of the writable runs while a thread of ours `process_vm_writev`s the other
/// half. Fresh pages cost most here (allocation and zeroing in the target's faults),
/// and that work spreads over both CPUs. `cpus` is where our thread may run (the
/// affinity we had before pinning ourselves next to the target).
pub fn fill_pages_parallel(
    t: &mut Tracee,
    helper: &Helper,
    memory: &MemoryPlan,
    sources: &[PageSource],
    cpus: Option<&rustix::thread::CpuSet>,
) -> Result<MemoryStats, MemoryRestoreError> {
    let started = Instant::now();
    let pid = t.pid();
    if page_count(sources) <= SMALL_FILL_PAGES {
        // A few pages (what post-copy leaves to fill): starting a thread and injecting
        // reads would cost more than writing them from here.
        return fill_pages_writev(pid, sources);
    }
    let (writable, other) = split_by_writability(memory, sources);
    let (mine, theirs) = split_half(&writable);
    let theirs_result = std::thread::scope(|scope| {
        let worker = std::thread::Builder::new().spawn_scoped(scope, || {
            if let Some(set) = cpus {
                // Best effort: pinned like us, it would only take turns with the target.
                let _ = rustix::thread::sched_setaffinity(None, set);
            }
            fill_pages_writev(pid, &theirs)
        });
        match worker {
            Ok(worker) => {
                let mine_result = preadv_runs(t, helper, &mine);
                let theirs_result = worker
                    .join()
                    .unwrap_or(Err(MemoryRestoreError::FillThread { pid }));
                mine_result.and(theirs_result).map(drop)
            }
            // A process that has unshared its PID namespace (--new-pid-ns) may start no
            // thread (EINVAL): the target then reads every run itself.
            Err(_) => preadv_runs(t, helper, &writable),
        }
    });
    theirs_result?;
    let rest = fill_pages(pid, &other)?;
    Ok(MemoryStats {
        pages_restored: page_count(&writable) + rest.pages_restored,
        fill_time_us: micros_since(started),
    })
}

fn page_count(runs: &[PageSource]) -> u64 {
    runs.iter().map(|s| s.len / PAGE_SIZE).sum()
}

fn micros_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Splits runs in two halves of (nearly) equal bytes, cutting a run at a page.
pub fn split_half(runs: &[PageSource]) -> (Vec<PageSource>, Vec<PageSource>) {
    let total: u64 = runs.iter().map(|r| r.len).sum();
    let half = (total / 2) & !(PAGE_SIZE - 1);
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut taken = 0u64;
    for r in runs {
        if taken >= half {
            second.push(r.clone());
        } else if taken + r.len <= half {
            taken += r.len;
            first.push(r.clone());
        } else {
            let cut = half - taken;
            first.push(r.part(r.vaddr, r.vaddr + cut));
            second.push(r.part(r.vaddr + cut, r.vaddr + r.len));
            taken = half;
        }
    }
    (first, second)
}

/// Makes the target `preadv` `runs` from the pages images into its own memory.
fn preadv_runs(
    t: &mut Tracee,
    helper: &Helper,
    runs: &[PageSource],
) -> Result<(), MemoryRestoreError> {
    let mut fds: Vec<(PathBuf, i64)> = Vec::new();
    let mut i = 0;
    while i < runs.len() {
        let file = runs[i].file.clone();
        let fd = match fds.iter().find(|(p, _)| *p == file) {
            Some((_, fd)) => *fd,
            None => {
                let fd = open_in_target(t, helper, &file, O_RDONLY_CLOEXEC)?;
                fds.push((file.clone(), fd));
                fd
            }
        };
        // A batch: runs of one file whose data follow each other in it.
        let first = i;
        let mut next_offset = runs[i].offset;
        while i < runs.len()
            && i - first < PREADV_IOVECS
            && runs[i].file == file
            && runs[i].offset == next_offset
        {
            next_offset += runs[i].len;
            i += 1;
        }
        read_into_target(t, helper, fd, &runs[first..i])?;
    }
    for (_, fd) in fds {
        inj(
            t,
            "close a pages image",
            libc_nr::CLOSE,
            [as_u64(fd), 0, 0, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// One `preadv` of `batch` (contiguous in the file), repeated on short reads.
fn read_into_target(
    t: &mut Tracee,
    helper: &Helper,
    fd: i64,
    batch: &[PageSource],
) -> Result<(), MemoryRestoreError> {
    let pid = t.pid();
    let mut runs: Vec<(u64, u64)> = batch.iter().map(|s| (s.vaddr, s.len)).collect();
    let mut offset = batch.first().map(|s| s.offset).unwrap_or(0);
    while !runs.is_empty() {
        let iov: Vec<u8> = runs
            .iter()
            .flat_map(|&(base, len)| base.to_ne_bytes().into_iter().chain(len.to_ne_bytes()))
            .collect();
        helper
            .put(pid, &iov, "pass iovecs")
            .map_err(MemoryRestoreError::Remote)?;
        let got = inj(
            t,
            format!("preadv {} runs at {:#x}", runs.len(), runs[0].0),
            libc_nr::PREADV,
            [as_u64(fd), helper.data(), runs.len() as u64, offset, 0, 0],
        )?;
        let mut got = as_u64(got);
        if got == 0 {
            return Err(MemoryRestoreError::ShortPages {
                pid,
                addr: runs[0].0,
            });
        }
        offset += got;
        while got > 0 {
            let Some(first) = runs.first_mut() else { break };
            if got >= first.1 {
                got -= first.1;
                runs.remove(0);
            } else {
                first.0 += got;
                first.1 -= got;
                got = 0;
            }
        }
    }
    Ok(())
}

/// Re-applies write protection, madvise bits and guard regions once the contents are in.
pub fn advise(t: &mut Tracee, memory: &MemoryPlan) -> Result<(), MemoryRestoreError> {
    for vma in memory.vmas.iter().filter(|v| v.write_then_protect) {
        inj(
            t,
            format!("mprotect({:#x}, {:#x})", vma.range.start, vma.prot),
            libc_nr::MPROTECT,
            [
                vma.range.start,
                vma.range.len(),
                u64::from(vma.prot),
                0,
                0,
                0,
            ],
        )?;
    }
    for vma in &memory.vmas {
        for bit in 0..64u64 {
            if vma.madv & (1 << bit) != 0 {
                inj(
                    t,
                    format!("madvise({:#x}, {bit})", vma.range.start),
                    libc_nr::MADVISE,
                    [vma.range.start, vma.range.len(), bit, 0, 0, 0],
                )?;
            }
        }
    }
    for g in &memory.guards {
        inj(
            t,
            format!("install guard region {:#x}-{:#x}", g.start, g.end),
            libc_nr::MADVISE,
            [g.start, g.len(), MADV_GUARD_INSTALL, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Sets the mm fields (`PR_SET_MM_MAP`, with auxv and exe file), THP and dumpable.
pub fn set_mm(t: &mut Tracee, mm: &MmPlan, helper: &Helper) -> Result<(), MemoryRestoreError> {
    let pid = t.pid();
    let exe_fd = match &mm.exe {
        Some(exe) => Some(open_in_target(t, helper, exe, O_RDONLY | O_CLOEXEC)?),
        None => None,
    };
    let auxv_bytes: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let auxv_at = helper.data() + 512;
    let mut map = Vec::with_capacity(PRCTL_MM_MAP_SIZE);
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ] {
        map.extend_from_slice(&v.to_ne_bytes());
    }
    let auxv_size = u32::try_from(auxv_bytes.len()).unwrap_or(0);
    // exe_fd -1 leaves the exe file alone.
    let exe = exe_fd
        .map(|fd| u32::try_from(fd).unwrap_or(u32::MAX))
        .unwrap_or(u32::MAX);
    map.extend_from_slice(&auxv_size.to_ne_bytes());
    map.extend_from_slice(&exe.to_ne_bytes());
    debug_assert_eq!(map.len(), PRCTL_MM_MAP_SIZE);
    let mut data = map;
    data.resize(512, 0);
    data.extend_from_slice(&auxv_bytes);
    helper
        .put(pid, &data, "pass prctl_mm_map")
        .map_err(MemoryRestoreError::Remote)?;
    inj(
        t,
        "prctl(PR_SET_MM_MAP)",
        libc_nr::PRCTL,
        [
            PR_SET_MM,
            PR_SET_MM_MAP,
            helper.data(),
            PRCTL_MM_MAP_SIZE as u64,
            0,
            0,
        ],
    )?;
    if let Some(fd) = exe_fd {
        inj(
            t,
            "close the exe fd",
            libc_nr::CLOSE,
            [as_u64(fd), 0, 0, 0, 0, 0],
        )?;
    }
    if mm.thp_disabled {
        inj(
            t,
            "prctl(PR_SET_THP_DISABLE)",
            libc_nr::PRCTL,
            [PR_SET_THP_DISABLE, 1, 0, 0, 0, 0],
        )?;
    }
    if let Some(d) = mm.dumpable {
        if let Ok(d) = u64::try_from(d) {
            inj(
                t,
                "prctl(PR_SET_DUMPABLE)",
                libc_nr::PRCTL,
                [PR_SET_DUMPABLE, d, 0, 0, 0, 0],
            )?;
        }
    }
    Ok(())
}

/// Drops the helper page: the last injected syscall, whose single-step trap comes
/// before the next instruction would be fetched from the gone page.
pub fn drop_helper(t: &mut Tracee, helper: &Helper) -> Result<(), MemoryRestoreError> {
    inj(
        t,
        "unmap the helper page",
        libc_nr::MUNMAP,
        [helper.addr, helper.len(), 0, 0, 0, 0],
    )
    .map(drop)
}

/// x86_64 syscall numbers used by the restore.
pub mod libc_nr {
    pub const READ: i64 = 0;
    pub const CLOSE: i64 = 3;
    pub const MMAP: i64 = 9;
    pub const MPROTECT: i64 = 10;
    pub const MUNMAP: i64 = 11;
    pub const RT_SIGACTION: i64 = 13;
    pub const PREADV: i64 = 295;
    pub const MREMAP: i64 = 25;
    pub const MADVISE: i64 = 28;
    pub const SETITIMER: i64 = 38;
    pub const PRCTL: i64 = 157;
    pub const SIGALTSTACK: i64 = 131;
    pub const PERSONALITY: i64 = 135;
    pub const SET_TID_ADDRESS: i64 = 218;
    pub const TIMER_CREATE: i64 = 222;
    pub const TIMER_SETTIME: i64 = 223;
    pub const SET_ROBUST_LIST: i64 = 273;
    pub const RT_SIGQUEUEINFO: i64 = 129;
    pub const RT_TGSIGQUEUEINFO: i64 = 297;
    pub const OPENAT: i64 = 257;
    pub const SECCOMP: i64 = 317;
    pub const RSEQ: i64 = 334;
    pub const SETGROUPS: i64 = 116;
    pub const SETRESUID: i64 = 117;
    pub const SETRESGID: i64 = 119;
    pub const SETFSUID: i64 = 122;
    pub const SETFSGID: i64 = 123;
    pub const CAPSET: i64 = 126;
    pub const GETPID: i64 = 39;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{MemoryPlan, Range, VdsoBlock, VmaPlan};

    #[test]
    fn unmapped_spans_run_between_kept_mappings() {
        let m = |start: u64, end: u64, name: Option<&str>| {
            (Range { start, end }, name.map(str::to_string))
        };
        let maps = [
            m(0x1000, 0x2000, Some("/bin/x")),
            m(0x3000, 0x5000, None),
            m(0x5000, 0x6000, Some("[helper]")),
            m(0x8000, 0x9000, None),
            m(0x9000, 0xa000, Some("[vdso]")),
            m(0xb000, 0xc000, Some("[stack]")),
            m(0xd000, 0xe000, Some("[vvar]")),
        ];
        let kept =
            |(r, n): &(Range, Option<String>)| is_vdso_part(n.as_deref()) || r.start == 0x5000;
        let spans = spans_between_kept(&maps, kept);
        let span = |start, end| Range { start, end };
        assert_eq!(
            spans,
            [
                span(0x1000, 0x5000),
                span(0x8000, 0x9000),
                span(0xb000, 0xc000)
            ]
        );
        assert!(spans_between_kept(&maps, |_| true).is_empty());
    }

    fn vma(start: u64, end: u64) -> VmaPlan {
        VmaPlan {
            range: Range { start, end },
            prot: 3,
            map_flags: 0x32,
            file: None,
            madv: 0,
            status: 0,
            write_then_protect: false,
        }
    }

    fn src(vaddr: u64, len: u64) -> PageSource {
        PageSource {
            vaddr,
            len,
            file: "pages-1.img".into(),
            offset: 0,
        }
    }

    #[test]
    fn build_ids_match_packed_words_and_one_byte_per_word() {
        let id = [1u8, 2, 3, 4, 5];
        assert!(build_ids_match(
            &id,
            &[
                u32::from_ne_bytes([1, 2, 3, 4]),
                u32::from_ne_bytes([5, 0, 0, 0])
            ]
        ));
        assert!(build_ids_match(&id, &[1, 2, 3, 4, 5]));
        assert!(!build_ids_match(
            &id,
            &[
                u32::from_ne_bytes([1, 2, 3, 4]),
                u32::from_ne_bytes([6, 0, 0, 0])
            ]
        ));
    }

    #[test]
    fn pages_split_into_vma_runs_and_vdso_and_strays_are_refused() {
        let memory = MemoryPlan {
            vmas: vec![
                vma(0x1000, 0x3000),
                vma(0x3000, 0x4000),
                vma(0x8000, 0x9000),
            ],
            vdso_block: Some(VdsoBlock {
                range: Range {
                    start: 0x10000,
                    end: 0x18000,
                },
                parts: vec![],
            }),
            ..Default::default()
        };
        let (fill, vdso) = split_sources(
            &memory,
            &[
                src(0x2000, 0x2000),
                src(0x8000, 0x1000),
                src(0x16000, 0x2000),
            ],
        )
        .expect("split");
        assert_eq!(fill.len(), 2, "a run spanning two adjacent vmas is fine");
        assert_eq!(vdso.len(), 1);
        assert!(matches!(
            split_sources(&memory, &[src(0x4000, 0x1000)]),
            Err(MemoryRestoreError::PagesOutside { .. })
        ));
        assert!(matches!(
            split_sources(&memory, &[src(0x3000, 0x2000)]),
            Err(MemoryRestoreError::PagesOutside { .. })
        ));
    }

    #[test]
    fn runs_split_at_vma_boundaries_by_writability() {
        let mut ro = vma(0x3000, 0x4000);
        ro.prot = 1;
        let memory = MemoryPlan {
            vmas: vec![vma(0x1000, 0x3000), ro, vma(0x4000, 0x6000)],
            ..Default::default()
        };
        let (w, other) = split_by_writability(
            &memory,
            &[PageSource {
                vaddr: 0x2000,
                len: 0x3000,
                file: "p".into(),
                offset: 0x10000,
            }],
        );
        assert_eq!(
            w,
            vec![
                PageSource {
                    vaddr: 0x2000,
                    len: 0x1000,
                    file: "p".into(),
                    offset: 0x10000
                },
                PageSource {
                    vaddr: 0x4000,
                    len: 0x1000,
                    file: "p".into(),
                    offset: 0x12000
                },
            ]
        );
        assert_eq!(
            other,
            vec![PageSource {
                vaddr: 0x3000,
                len: 0x1000,
                file: "p".into(),
                offset: 0x11000
            }]
        );
    }

    #[test]
    fn halves_split_runs_at_a_page_and_keep_file_offsets() {
        let runs = [
            PageSource {
                vaddr: 0x1000,
                len: 0x3000,
                file: "p".into(),
                offset: 0,
            },
            PageSource {
                vaddr: 0x9000,
                len: 0x1000,
                file: "p".into(),
                offset: 0x3000,
            },
        ];
        let (a, b) = split_half(&runs);
        assert_eq!(
            a,
            vec![PageSource {
                vaddr: 0x1000,
                len: 0x2000,
                file: "p".into(),
                offset: 0
            }]
        );
        assert_eq!(
            b,
            vec![
                PageSource {
                    vaddr: 0x3000,
                    len: 0x1000,
                    file: "p".into(),
                    offset: 0x2000
                },
                PageSource {
                    vaddr: 0x9000,
                    len: 0x1000,
                    file: "p".into(),
                    offset: 0x3000
                },
            ]
        );
        let (a, b) = split_half(&runs[1..]);
        assert!(
            a.is_empty() && b.len() == 1,
            "a single page goes whole to one side"
        );
    }
}
