//! Shared memory objects: `MAP_SHARED|MAP_ANONYMOUS` memory, memfds and SysV segments, each
//! created once for the whole tree and mapped by every process that mapped it.
//!
//! - Anonymous shared memory (`VMA_ANON_SHARED`, `shmid` = the dumped shmem inode): the
//!   first process that maps an object creates it, by an injected
//!   `mmap(MAP_SHARED|MAP_ANONYMOUS)` of the object's whole size in a hole of its layout.
//!   ckpt-restore opens that mapping's `/proc/PID/map_files/<range>` (the object itself,
//!   kept open in [`SharedMaps`]), writes the contents of `pagemap-shmem-<shmid>.img` into
//!   it at their offsets, and the temporary mapping goes again. Every mapping of the object,
//!   in this process or a later one, is an injected `openat` of
//!   `/proc/<ckpt-restore>/fd/<that fd>` (a new open of the same inode) and `mmap` of it at
//!   the VMA's place and offset.
//! - memfds (`memfd.img`): created by ckpt-restore itself before any process is forked
//!   (their fds are open file descriptions like any other), sized, filled from their shmem
//!   pagemap, given their owner and mode, and sealed only then: a seal against writes or
//!   growth would refuse the contents. Seals against writing wait until every process is
//!   rebuilt ([`SharedMaps::finish`]): a writable shared mapping made before such a seal
//!   lives on, but could not be made again after it. Fds of a memfd reopen it through
//!   `/proc/<ckpt-restore>/fd/N` with their own flags and offset; mappings map such a reopen.
//! - SysV segments (`ipcns-shm-<id>.img`): at the first attach in the tree, a segment that
//!   still exists with the same id, key and size is used as it is. Otherwise it is created
//!   again with its key, mode and size under its old id (`kernel.shm_next_id` set before an
//!   injected `shmget`), attached by an injected `shmat` at its address and filled through
//!   the attach's `map_files`. Later attaches are plain injected `shmat`s. A segment
//!   created again belongs to the restore until it succeeds ([`SharedMaps::keep_segments`]):
//!   a restore that fails removes it again when its [`SharedMaps`] is dropped, so that a
//!   second attempt finds the id free.
//!
//! [`SharedMaps`] is the registry of what exists so far; one is made per restore
//! ([`SharedMaps::load`]) and passed to every process's rebuild in tree order.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use images_format::dir::ImageDir;
use images_format::pb;
use images_format::vma::MapFlags;
use images_format::{ImageError, ImageKind, PageSource, PagesError, PagesReader, VmaStatus};
use tracee::{Pid, Tracee};

use crate::memory::{libc_nr, Helper};
use crate::plan::{self, MemoryPlan, PlanError, Range, PAGE_SIZE};
use crate::remote::{self, RemoteError};

const PROT_READ: u64 = 1;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u32 = 4;
const MAP_SHARED: u64 = 0x01;
const MAP_PRIVATE: u64 = 0x02;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const O_RDONLY: u64 = 0;
const O_RDWR: u64 = 2;
const O_CLOEXEC: u64 = 0o2_000_000;
const IPC_CREAT: u64 = 0o1000;
const IPC_EXCL: u64 = 0o2000;
const IPC_RMID: u64 = 0;
const SHM_RDONLY: u64 = 0o10000;
const SHM_EXEC: u64 = 0o100000;
/// In `ipc_desc_entry.mode`: the segment was removed (`IPC_RMID`) while attached.
const SHM_DEST: u32 = 0o1000;
const SHMGET: i64 = 29;
const SHMAT: i64 = 30;
const SHMCTL: i64 = 31;
/// `F_SEAL_SEAL` alone: the memfd was made without `MFD_ALLOW_SEALING`.
const F_SEAL_SEAL: u32 = 1;
/// `F_SEAL_WRITE | F_SEAL_FUTURE_WRITE`: seals that refuse new writable shared mappings.
const WRITE_SEALS: u32 = 0x8 | 0x10;
const SHM_NEXT_ID: &str = "/proc/sys/kernel/shm_next_id";
/// Bytes copied into an object at a time.
const COPY_CHUNK: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ShmemError {
    #[error("reading the shared memory images")]
    Image(#[from] ImageError),
    #[error("reading the pages of shared memory object {shmid}")]
    Pages {
        shmid: u64,
        #[source]
        source: PagesError,
    },
    #[error("shared memory object {shmid}: the pages image ends before offset {offset:#x}")]
    PagesFile { shmid: u64, offset: u64 },
    #[error("shared memory object {shmid}: {what} {}", path.display())]
    Io {
        shmid: u64,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memfd {name:?}: {what}")]
    Memfd {
        name: String,
        what: &'static str,
        #[source]
        source: rustix::io::Errno,
    },
    #[error(
        "pid {pid}: vma {start:#x} maps memfd inode {inode_id}, which memfd.img does not list"
    )]
    NoMemfd { pid: Pid, start: u64, inode_id: u64 },
    #[error(
        "pid {pid}: vma {start:#x} attaches SysV segment {id}, which no ipcns-shm image lists"
    )]
    NoSegment { pid: Pid, start: u64, id: u64 },
    #[error("SysV segment {id} (key {key:#x}): id {id} is taken by another segment (key {other_key:#x}, {other_size} bytes)")]
    SegmentIdTaken {
        id: u64,
        key: u32,
        other_key: u32,
        other_size: u64,
    },
    #[error(
        "SysV segment {id}: shmget gave id {got} (another process created segments meanwhile?)"
    )]
    SegmentIdMoved { id: u64, got: u64 },
    #[error("pid {pid}: vma {start:#x}: SysV segment {id} attached from offset {pgoff:#x} (a partly detached segment) is not supported")]
    PartialAttach {
        pid: Pid,
        start: u64,
        id: u64,
        pgoff: u64,
    },
    #[error("no free hole of {len:#x} bytes in pid {pid} to create shared memory object {shmid}")]
    NoHole { pid: Pid, shmid: u64, len: u64 },
    #[error("pid {pid}: {what} at {start:#x}: the kernel placed it at {got:#x}")]
    Misplaced {
        pid: Pid,
        what: &'static str,
        start: u64,
        got: u64,
    },
    #[error("pid {pid}: open {} for shared memory object {shmid}", path.display())]
    OpenInTarget {
        pid: Pid,
        shmid: u64,
        path: PathBuf,
        #[source]
        source: Box<crate::memory::MemoryRestoreError>,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// What a shared memory VMA maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedKind {
    /// `MAP_SHARED|MAP_ANONYMOUS` memory.
    Anon,
    /// A SysV segment (the `shmid` is the segment id).
    Sysv,
    /// A memfd (`memfd_inode_entry.inode_id`), mapped shared or private.
    Memfd { inode_id: u64 },
}

/// A VMA of a shared memory object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVma {
    pub range: Range,
    pub kind: SharedKind,
    /// The object's id in the images (shmem inode, segment id, or the memfd's `shmid`).
    pub shmid: u64,
    pub pgoff: u64,
    pub prot: u32,
    /// `MAP_SHARED` (else a private mapping of a memfd).
    pub shared: bool,
}

/// The VMAs of shared memory objects among `vmas` (of image pid `pid`); a memfd VMA names
/// its memfd file in `files`.
pub fn plan_vmas(
    pid: u32,
    vmas: &[pb::VmaEntry],
    files: &HashMap<u32, pb::FileEntry>,
) -> Result<Vec<SharedVma>, PlanError> {
    let mut out = Vec::new();
    for v in vmas {
        let status = VmaStatus::from_bits_retain(v.status);
        let kind = if status.contains(VmaStatus::MEMFD) {
            let missing = PlanError::MissingMappedFile {
                pid,
                start: v.start,
                id: u32::try_from(v.shmid).unwrap_or(u32::MAX),
            };
            let id = u32::try_from(v.shmid).map_err(|_| missing)?;
            let memfd = files.get(&id).and_then(|f| f.memfd.as_ref()).ok_or(
                PlanError::MissingMappedFile {
                    pid,
                    start: v.start,
                    id,
                },
            )?;
            SharedKind::Memfd {
                inode_id: u64::from(memfd.inode_id),
            }
        } else if status.contains(VmaStatus::ANON_SHARED) {
            if status.contains(VmaStatus::SYSVIPC) {
                SharedKind::Sysv
            } else {
                SharedKind::Anon
            }
        } else {
            continue;
        };
        out.push(SharedVma {
            range: Range {
                start: v.start,
                end: v.end,
            },
            kind,
            shmid: v.shmid,
            pgoff: v.pgoff,
            prot: v.prot,
            shared: MapFlags::from_bits_retain(v.flags).contains(MapFlags::SHARED),
        });
    }
    Ok(out)
}

/// A SysV segment as the images have it.
#[derive(Debug, Clone)]
struct Segment {
    entry: pb::IpcShmEntry,
    contents: Vec<u8>,
}

/// A memfd created for the restore.
#[derive(Debug)]
struct Memfd {
    file: File,
    name: String,
    /// Seals still to add once every process is rebuilt (see [`SharedMaps::finish`]).
    pending_seals: u32,
}

/// What exists so far of the tree's shared memory, for the processes still to rebuild.
#[derive(Debug)]
pub struct SharedMaps {
    dir: ImageDir,
    /// Anonymous objects created so far, by `shmid`: our own open file of each.
    anon: HashMap<u64, File>,
    /// memfds by `inode_id`.
    memfds: HashMap<u64, Memfd>,
    /// `files.img` ids of memfd files and their `inode_id`.
    memfd_files: HashMap<u32, u64>,
    /// SysV segments of the images by id, and those attachable now.
    segments: HashMap<u64, Segment>,
    segments_ready: HashSet<u64>,
    /// Segments this restore created again, removed on drop unless it succeeded.
    recreated: Vec<Recreated>,
    /// The restore succeeded: the recreated segments stay.
    keep: bool,
}

/// A segment created by the restore: its id, size and creator (the restored process whose
/// injected `shmget` made it) tell it apart from a later segment that reuses the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recreated {
    id: u64,
    size: u64,
    cpid: u32,
}

impl Drop for SharedMaps {
    /// A failed restore removes the segments it created again. Each is checked against
    /// `/proc/sysvipc/shm` first: a segment gone meanwhile may have left its id to another.
    fn drop(&mut self) {
        if self.keep || self.recreated.is_empty() {
            return;
        }
        let live = std::fs::read_to_string("/proc/sysvipc/shm")
            .map(|text| parse_sysvipc_shm(&text))
            .unwrap_or_default();
        for r in &self.recreated {
            let ours = live
                .iter()
                .any(|l| l.id == r.id && l.size == r.size && l.cpid == r.cpid);
            if !ours {
                continue;
            }
            match i32::try_from(r.id).map(tracee::ipc::shm_remove) {
                Ok(Ok(())) => {
                    tracing::info!(id = r.id, "restore failed: SysV segment it created removed")
                }
                Ok(Err(errno)) => {
                    tracing::warn!(id = r.id, %errno, "restore failed, and the SysV segment it created could not be removed")
                }
                Err(_) => tracing::warn!(id = r.id, "SysV segment id out of range"),
            }
        }
    }
}

fn io_err(
    shmid: u64,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> ShmemError {
    let path = path.to_path_buf();
    move |source| ShmemError::Io {
        shmid,
        what,
        path,
        source,
    }
}

/// Writes the saved pages of `pagemap-shmem-<shmid>.img` into `file`, up to `limit` bytes.
fn fill_object(dir: &ImageDir, shmid: u64, file: &File, limit: u64) -> Result<u64, ShmemError> {
    let reader = match PagesReader::open(dir, ImageKind::ShmemPagemap, shmid) {
        Ok(r) => r,
        // An object with no page ever written has no pagemap in some writers.
        Err(PagesError::Image(ImageError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(0)
        }
        Err(source) => return Err(ShmemError::Pages { shmid, source }),
    };
    let segments = reader
        .resolve()
        .map_err(|source| ShmemError::Pages { shmid, source })?;
    let mut buf = vec![0u8; usize::try_from(COPY_CHUNK).unwrap_or(0)];
    let mut written = 0;
    for s in segments {
        let PageSource::File { layer, offset } = s.source else {
            continue;
        };
        let Some(pages) = reader.pages_file(layer) else {
            return Err(ShmemError::PagesFile {
                shmid,
                offset: s.vaddr,
            });
        };
        let mut done = 0;
        while done < s.len && s.vaddr + done < limit {
            let n = (s.len - done).min(COPY_CHUNK).min(limit - (s.vaddr + done));
            let chunk = buf
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            pages
                .read_exact_at(chunk, offset + done)
                .map_err(|_| ShmemError::PagesFile {
                    shmid,
                    offset: s.vaddr + done,
                })?;
            file.write_all_at(chunk, s.vaddr + done).map_err(io_err(
                shmid,
                "write contents into",
                Path::new("the object"),
            ))?;
            done += n;
            written += n;
        }
    }
    Ok(written)
}

/// The largest offset the saved pages of an object reach.
fn saved_extent(dir: &ImageDir, shmid: u64) -> u64 {
    PagesReader::open(dir, ImageKind::ShmemPagemap, shmid)
        .ok()
        .and_then(|r| r.pagemap().ranges.last().map(|p| p.end()))
        .unwrap_or(0)
}

impl SharedMaps {
    /// Reads the shared memory images of `dir` and creates the memfds (before any process
    /// is forked: their fds are open file descriptions of the tree).
    pub fn load(dir: &ImageDir) -> Result<SharedMaps, ShmemError> {
        let mut maps = SharedMaps {
            dir: dir.clone(),
            anon: HashMap::new(),
            memfds: HashMap::new(),
            memfd_files: HashMap::new(),
            segments: HashMap::new(),
            segments_ready: HashSet::new(),
            recreated: Vec::new(),
            keep: false,
        };
        for entry in dir.read_all::<pb::MemfdInodeEntry>(ImageKind::MemfdInode, 0)? {
            let memfd = create_memfd(dir, &entry)?;
            maps.memfds.insert(entry.inode_id, memfd);
        }
        if !maps.memfds.is_empty() {
            for f in dir.read_all::<pb::FileEntry>(ImageKind::Files, 0)? {
                if let Some(m) = &f.memfd {
                    maps.memfd_files.insert(m.id, u64::from(m.inode_id));
                }
            }
        }
        for file in dir.list()? {
            if file.name.kind != ImageKind::IpcnsShm {
                continue;
            }
            let mut reader = dir.open_named(&file.file_name)?;
            while let Some(entry) = reader.read_entry::<pb::IpcShmEntry>()? {
                let padded = entry.size.div_ceil(4) * 4;
                let mut contents = reader.read_payload(padded)?;
                contents.truncate(usize::try_from(entry.size).unwrap_or(usize::MAX));
                maps.segments
                    .insert(u64::from(entry.desc.id), Segment { entry, contents });
            }
        }
        Ok(maps)
    }

    /// The path through which a memfd fd of `files.img` id `file_id` is opened: a new open
    /// file description of the memfd ckpt-restore made. `None` if it is not a memfd.
    pub fn memfd_path(&self, file_id: u32) -> Option<PathBuf> {
        let inode_id = self.memfd_files.get(&file_id)?;
        let memfd = self.memfds.get(inode_id)?;
        Some(our_fd_path(&memfd.file))
    }

    /// Points every memfd fd of `plan` at [`SharedMaps::memfd_path`] (its name stays, for
    /// messages).
    pub fn point_plan_at_memfds(&self, plan: &mut plan::Plan) {
        for fd in &mut plan.child.fds {
            if let Some(path) = self.memfd_path(fd.file_id) {
                if let Some(m) = self
                    .memfd_files
                    .get(&fd.file_id)
                    .and_then(|i| self.memfds.get(i))
                {
                    fd.path = PathBuf::from(format!("/memfd:{}", m.name));
                }
                fd.ghost = Some(path);
            }
        }
    }

    /// The restore succeeded: the SysV segments it created stay when this is dropped
    /// (otherwise they are removed again).
    pub fn keep_segments(&mut self) {
        self.keep = true;
    }

    /// Adds the seals against writing that had to wait until every process of the tree
    /// was rebuilt, with its mappings (call once, after the last rebuild).
    pub fn finish(&mut self) -> Result<(), ShmemError> {
        for memfd in self.memfds.values_mut() {
            if memfd.pending_seals != 0 {
                let seals = rustix::fs::SealFlags::from_bits_retain(memfd.pending_seals);
                rustix::fs::fcntl_add_seals(&memfd.file, seals).map_err(|source| {
                    ShmemError::Memfd {
                        name: memfd.name.clone(),
                        what: "add its seals",
                        source,
                    }
                })?;
                memfd.pending_seals = 0;
            }
        }
        Ok(())
    }

    /// Maps `v` into the stopped process `t` (see the module doc). `writable_first`: map it
    /// writable, the caller write-protects it after the fill.
    pub fn map(
        &mut self,
        t: &mut Tracee,
        helper: &Helper,
        memory: &MemoryPlan,
        v: &SharedVma,
        writable_first: bool,
    ) -> Result<(), ShmemError> {
        let pid = t.pid();
        let mut prot = u64::from(v.prot);
        if writable_first {
            prot |= PROT_WRITE;
        }
        match v.kind {
            SharedKind::Anon => {
                if !self.anon.contains_key(&v.shmid) {
                    let file = self.create_anon(t, helper, memory, v)?;
                    self.anon.insert(v.shmid, file);
                }
                let file = self.anon.get(&v.shmid).expect("created above if missing");
                // A later mapper may reach further into the object than the first.
                let need = v.pgoff.saturating_add(v.range.len());
                let path = our_fd_path(file);
                let len = file
                    .metadata()
                    .map_err(io_err(v.shmid, "stat", &path))?
                    .len();
                if len < need {
                    file.set_len(need).map_err(io_err(v.shmid, "grow", &path))?;
                }
                map_file(t, helper, v, &path, O_RDWR, prot, MAP_SHARED)
            }
            SharedKind::Memfd { inode_id } => {
                let memfd = self.memfds.get(&inode_id).ok_or(ShmemError::NoMemfd {
                    pid,
                    start: v.range.start,
                    inode_id,
                })?;
                let path = our_fd_path(&memfd.file);
                let (open, flags) = if v.shared {
                    let open = if prot & PROT_WRITE != 0 {
                        O_RDWR
                    } else {
                        O_RDONLY
                    };
                    (open, MAP_SHARED)
                } else {
                    (O_RDONLY, MAP_PRIVATE)
                };
                map_file(t, helper, v, &path, open, prot, flags)
            }
            SharedKind::Sysv => self.attach(t, memory, v),
        }
    }

    /// Creates anonymous object `v.shmid` in `t` and fills it; returns our file of it.
    fn create_anon(
        &mut self,
        t: &mut Tracee,
        helper: &Helper,
        memory: &MemoryPlan,
        v: &SharedVma,
    ) -> Result<File, ShmemError> {
        let pid = t.pid();
        let size = round_page(
            v.pgoff
                .saturating_add(v.range.len())
                .max(saved_extent(&self.dir, v.shmid)),
        );
        let mut taken: Vec<Range> = memory.occupied.clone();
        taken.extend(memory.guards.iter().copied());
        taken.push(helper.range());
        let at = plan::pick_hole(
            &taken,
            size,
            crate::memory::HOLE_FROM,
            crate::memory::USER_END,
        )
        .ok_or(ShmemError::NoHole {
            pid,
            shmid: v.shmid,
            len: size,
        })?;
        let got = remote::call(
            t,
            format!("create shared memory object {} ({size:#x} bytes)", v.shmid),
            libc_nr::MMAP,
            [
                at,
                size,
                PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                u64::MAX,
                0,
            ],
        )?;
        check_placed(pid, "shared memory object", at, got)?;
        let path = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", at, at + size));
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(v.shmid, "open", &path));
        // The object lives on in our file; the temporary mapping goes whatever happened.
        remote::call(
            t,
            format!("unmap the new shared memory object {}", v.shmid),
            libc_nr::MUNMAP,
            [at, size, 0, 0, 0, 0],
        )?;
        let file = opened?;
        let written = fill_object(&self.dir, v.shmid, &file, size)?;
        tracing::debug!(%pid, shmid = v.shmid, size, written, "shared memory object created");
        Ok(file)
    }

    /// Attaches SysV segment `v.shmid` at `v.range`, creating it first if needed. An attach
    /// that `mprotect` or `munmap` split into several VMAs is one `shmat` at its first VMA,
    /// then each VMA's protection and the holes between them.
    fn attach(
        &mut self,
        t: &mut Tracee,
        memory: &MemoryPlan,
        v: &SharedVma,
    ) -> Result<(), ShmemError> {
        let pid = t.pid();
        let id = v.shmid;
        let segment = self.segments.get(&id).ok_or(ShmemError::NoSegment {
            pid,
            start: v.range.start,
            id,
        })?;
        let partial = ShmemError::PartialAttach {
            pid,
            start: v.range.start,
            id,
            pgoff: v.pgoff,
        };
        let base = v.range.start.checked_sub(v.pgoff).ok_or(partial)?;
        let group: Vec<&SharedVma> = memory
            .shmem
            .iter()
            .filter(|s| {
                s.kind == SharedKind::Sysv
                    && s.shmid == id
                    && s.range.start.checked_sub(s.pgoff) == Some(base)
            })
            .collect();
        match group.iter().map(|g| g.range.start).min() {
            // Attached with the first VMA of its group already.
            Some(first) if first < v.range.start => return Ok(()),
            _ => {}
        }
        if v.pgoff != 0 {
            // The head of the attach is gone: a `shmat` there could cover VMAs mapped
            // before this one.
            return Err(ShmemError::PartialAttach {
                pid,
                start: v.range.start,
                id,
                pgoff: v.pgoff,
            });
        }
        let size = segment.entry.size;
        let mut fill = false;
        if !self.segments_ready.contains(&id) {
            fill = !segment_exists(segment)?;
            if fill {
                create_segment(t, segment)?;
                self.recreated.push(Recreated {
                    id,
                    size,
                    cpid: u32::try_from(pid.as_raw()).unwrap_or(0),
                });
            }
        }
        let prot = group.iter().fold(0, |p, g| p | u64::from(g.prot));
        let mut flags = 0;
        if prot & PROT_WRITE == 0 {
            flags |= SHM_RDONLY;
        }
        if prot & u64::from(PROT_EXEC) != 0 {
            flags |= SHM_EXEC;
        }
        let got = remote::call(
            t,
            format!("shmat({id}, {base:#x})"),
            SHMAT,
            [id, base, flags, 0, 0, 0],
        )?;
        check_placed(pid, "SysV segment", base, got)?;
        let attached = Range {
            start: base,
            end: base + round_page(size),
        };
        if fill {
            let path = PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                attached.start, attached.end
            ));
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(id, "open", &path))?;
            file.write_all_at(&segment.contents, 0).map_err(io_err(
                id,
                "write contents into",
                &path,
            ))?;
            tracing::debug!(%pid, id, size, "SysV segment recreated");
            // Removed while attached, as it was: it lives on while attached, and attaching
            // it by id stays possible meanwhile (Linux allows it).
            if segment.entry.desc.mode & SHM_DEST != 0 {
                remote::call(
                    t,
                    format!("remove SysV segment {id} again (it was removed while attached)"),
                    SHMCTL,
                    [id, IPC_RMID, 0, 0, 0, 0],
                )?;
            }
        }
        self.segments_ready.insert(id);
        let mut at = attached.start;
        let mut parts: Vec<&SharedVma> = group;
        parts.sort_by_key(|g| g.range.start);
        for g in parts {
            if g.range.start > at {
                unmap(t, id, at, g.range.start)?;
            }
            if u64::from(g.prot) != prot {
                remote::call(
                    t,
                    format!("mprotect part {:#x} of SysV segment {id}", g.range.start),
                    libc_nr::MPROTECT,
                    [g.range.start, g.range.len(), u64::from(g.prot), 0, 0, 0],
                )?;
            }
            at = at.max(g.range.end);
        }
        if at < attached.end {
            unmap(t, id, at, attached.end)?;
        }
        Ok(())
    }
}

/// Unmaps `[start, end)` of an attach of segment `id`: that part had been detached.
fn unmap(t: &mut Tracee, id: u64, start: u64, end: u64) -> Result<(), ShmemError> {
    remote::call(
        t,
        format!("unmap {start:#x}-{end:#x} of SysV segment {id}"),
        libc_nr::MUNMAP,
        [start, end - start, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// Injects `openat(path)` and `mmap` of it at `v`'s place and offset.
fn map_file(
    t: &mut Tracee,
    helper: &Helper,
    v: &SharedVma,
    path: &Path,
    open: u64,
    prot: u64,
    flags: u64,
) -> Result<(), ShmemError> {
    let pid = t.pid();
    let fd =
        crate::memory::open_in_target(t, helper, path, open | O_CLOEXEC).map_err(|e| match e {
            crate::memory::MemoryRestoreError::Remote(r) => ShmemError::Remote(r),
            other => ShmemError::OpenInTarget {
                pid,
                shmid: v.shmid,
                path: path.to_path_buf(),
                source: Box::new(other),
            },
        })?;
    let fd = remote::word(fd);
    let mapped = remote::call(
        t,
        format!(
            "map shared memory object {} at {:#x}-{:#x}",
            v.shmid, v.range.start, v.range.end
        ),
        libc_nr::MMAP,
        [
            v.range.start,
            v.range.len(),
            prot,
            flags | MAP_FIXED,
            fd,
            v.pgoff,
        ],
    );
    remote::call(
        t,
        "close a shared memory fd",
        libc_nr::CLOSE,
        [fd, 0, 0, 0, 0, 0],
    )?;
    check_placed(pid, "shared mapping", v.range.start, mapped?)
}

fn check_placed(pid: Pid, what: &'static str, start: u64, got: i64) -> Result<(), ShmemError> {
    let got = remote::word(got);
    if got == start {
        Ok(())
    } else {
        Err(ShmemError::Misplaced {
            pid,
            what,
            start,
            got,
        })
    }
}

fn round_page(v: u64) -> u64 {
    v.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// `/proc/<ckpt-restore>/fd/N`: the restored processes see our pid in their `/proc`.
fn our_fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ))
}

/// A memfd as `memfd.img` describes it, filled and sealed.
fn create_memfd(dir: &ImageDir, e: &pb::MemfdInodeEntry) -> Result<Memfd, ShmemError> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let err = |what| {
        let name = e.name.clone();
        move |source| ShmemError::Memfd { name, what, source }
    };
    let mut flags = MemfdFlags::CLOEXEC;
    if e.seals != F_SEAL_SEAL {
        flags |= MemfdFlags::ALLOW_SEALING;
    }
    let fd = rustix::fs::memfd_create(e.name.as_str(), flags).map_err(err("memfd_create"))?;
    let file = File::from(fd);
    fill_object(dir, u64::from(e.shmid), &file, e.size)?;
    rustix::fs::ftruncate(&file, e.size).map_err(err("set its size"))?;
    if let Some(mode) = e.mode {
        rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(mode & 0o7777))
            .map_err(err("set its mode"))?;
    }
    rustix::fs::fchown(
        &file,
        Some(rustix::process::Uid::from_raw(e.uid)),
        Some(rustix::process::Gid::from_raw(e.gid)),
    )
    .map_err(err("set its owner"))?;
    let mut pending_seals = 0;
    if e.seals != F_SEAL_SEAL && e.seals != 0 {
        if e.seals & WRITE_SEALS != 0 {
            // A shared writable mapping made before the seal outlives it, but a new one
            // is refused: sealed once every mapping is back (and all seals together, as
            // F_SEAL_SEAL would refuse the rest).
            pending_seals = e.seals;
        } else {
            rustix::fs::fcntl_add_seals(&file, SealFlags::from_bits_retain(e.seals))
                .map_err(err("add its seals"))?;
        }
    }
    tracing::debug!(name = %e.name, size = e.size, seals = e.seals, "memfd created");
    Ok(Memfd {
        file,
        name: e.name.clone(),
        pending_seals,
    })
}

/// Whether `segment` still exists with the same id, key and size (then it is used as it is).
fn segment_exists(segment: &Segment) -> Result<bool, ShmemError> {
    let id = u64::from(segment.entry.desc.id);
    let path = Path::new("/proc/sysvipc/shm");
    let text = std::fs::read_to_string(path).map_err(io_err(id, "read", path))?;
    let Some(live) = parse_sysvipc_shm(&text).into_iter().find(|s| s.id == id) else {
        return Ok(false);
    };
    if live.key == segment.entry.desc.key && live.size == segment.entry.size {
        return Ok(true);
    }
    Err(ShmemError::SegmentIdTaken {
        id,
        key: segment.entry.desc.key,
        other_key: live.key,
        other_size: live.size,
    })
}

/// Creates `segment` again under its old id, by an injected `shmget` in `t` while
/// `kernel.shm_next_id` names that id (and ckpt-restores hold a lock on that file). The kernel sets it back to -1 once an id is taken
/// from it (and refuses a write of -1 here), so a failed `shmget` is followed by a
/// throwaway segment that uses it up.
fn create_segment(t: &mut Tracee, segment: &Segment) -> Result<(), ShmemError> {
    let desc = &segment.entry.desc;
    let id = u64::from(desc.id);
    let next_id = Path::new(SHM_NEXT_ID);
    // Held until the shmget is done: two restores at once would take each other's ids.
    let mut knob = OpenOptions::new()
        .write(true)
        .open(next_id)
        .map_err(io_err(id, "open", next_id))?;
    rustix::fs::flock(&knob, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(id, "lock", next_id)(e.into()))?;
    knob.write_all(format!("{}\n", desc.id).as_bytes())
        .map_err(io_err(id, "write", next_id))?;
    let created = remote::call(
        t,
        format!("shmget(key {:#x}, {} bytes)", desc.key, segment.entry.size),
        SHMGET,
        [
            u64::from(desc.key),
            segment.entry.size,
            IPC_CREAT | IPC_EXCL | u64::from(desc.mode & 0o777),
            0,
            0,
            0,
        ],
    );
    let got = match created {
        Ok(got) => remote::word(got),
        Err(e) => {
            use_up_next_id(t);
            return Err(e.into());
        }
    };
    if got != id {
        remove_segment(t, got);
        return Err(ShmemError::SegmentIdMoved { id, got });
    }
    Ok(())
}

/// Takes the id `kernel.shm_next_id` names with a segment removed at once.
fn use_up_next_id(t: &mut Tracee) {
    const IPC_PRIVATE: u64 = 0;
    let throwaway = remote::call(
        t,
        "use up kernel.shm_next_id",
        SHMGET,
        [IPC_PRIVATE, PAGE_SIZE, IPC_CREAT | 0o600, 0, 0, 0],
    );
    match throwaway {
        Ok(id) => remove_segment(t, remote::word(id)),
        Err(error) => {
            tracing::warn!(%error, "kernel.shm_next_id stays set: the next new SysV segment gets that id")
        }
    }
}

fn remove_segment(t: &mut Tracee, id: u64) {
    if let Err(error) = remote::call(
        t,
        format!("remove SysV segment {id}"),
        SHMCTL,
        [id, IPC_RMID, 0, 0, 0, 0],
    ) {
        tracing::warn!(id, %error, "a SysV segment made by the restore stays behind");
    }
}

/// One segment of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LiveSegment {
    key: u32,
    id: u64,
    size: u64,
    /// The pid that created it, as seen from our pid namespace.
    cpid: u32,
}

/// Parses `/proc/sysvipc/shm` (a header line, then key (decimal, signed), id, perms, size...).
fn parse_sysvipc_shm(text: &str) -> Vec<LiveSegment> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let key: i32 = f.next()?.parse().ok()?;
            let id = f.next()?.parse().ok()?;
            let _perms = f.next()?;
            let size = f.next()?.parse().ok()?;
            let cpid = f.next()?.parse().ok()?;
            Some(LiveSegment {
                key: u32::from_ne_bytes(key.to_ne_bytes()),
                id,
                size,
                cpid,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(start: u64, status: VmaStatus, flags: MapFlags, shmid: u64) -> pb::VmaEntry {
        pb::VmaEntry {
            start,
            end: start + 0x2000,
            pgoff: 0x1000,
            shmid,
            prot: 3,
            flags: flags.bits(),
            status: status.bits(),
            fd: -1,
            madv: None,
            fdflags: None,
        }
    }

    #[test]
    fn shared_vmas_are_told_apart_and_memfds_found_through_files() {
        let mut files = HashMap::new();
        files.insert(
            7,
            pb::FileEntry {
                memfd: Some(pb::MemfdFileEntry {
                    id: 7,
                    inode_id: 42,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let shared = MapFlags::SHARED | MapFlags::ANONYMOUS;
        let vmas = [
            vma(
                0x1000_0000,
                VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE,
                MapFlags::PRIVATE,
                0,
            ),
            vma(
                0x2000_0000,
                VmaStatus::REGULAR | VmaStatus::ANON_SHARED,
                shared,
                99,
            ),
            vma(
                0x3000_0000,
                VmaStatus::REGULAR | VmaStatus::ANON_SHARED | VmaStatus::SYSVIPC,
                shared,
                5,
            ),
            vma(
                0x4000_0000,
                VmaStatus::REGULAR | VmaStatus::FILE_PRIVATE | VmaStatus::MEMFD,
                MapFlags::PRIVATE,
                7,
            ),
        ];
        let got = plan_vmas(1, &vmas, &files).unwrap();
        let kinds: Vec<_> = got.iter().map(|v| (v.kind, v.shmid, v.shared)).collect();
        assert_eq!(
            kinds,
            [
                (SharedKind::Anon, 99, true),
                (SharedKind::Sysv, 5, true),
                (SharedKind::Memfd { inode_id: 42 }, 7, false),
            ]
        );
        assert_eq!(got[0].pgoff, 0x1000);
        let mut broken = vmas[3];
        broken.shmid = 8;
        assert!(matches!(
            plan_vmas(1, &[broken], &files),
            Err(PlanError::MissingMappedFile { id: 8, .. })
        ));
    }

    #[test]
    fn sysvipc_keys_keep_their_bits() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                    \x20       -1          9   600                  4096  8362     0      0     0     0     0     0          0          0 1795317113                     0                     0\n";
        assert_eq!(
            parse_sysvipc_shm(text),
            [LiveSegment {
                key: u32::MAX,
                id: 9,
                size: 4096,
                cpid: 8362,
            }]
        );
    }

    #[test]
    fn objects_are_filled_from_their_shmem_pagemap_up_to_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
        let mut w = dir.pagemap_writer(ImageKind::ShmemPagemap, 77, 3).unwrap();
        w.add_present(PAGE_SIZE, &vec![5u8; 2 * PAGE_SIZE as usize])
            .unwrap();
        w.finish().unwrap();
        assert_eq!(saved_extent(&dir, 77), 3 * PAGE_SIZE);
        let file = tempfile::tempfile().unwrap();
        let written = fill_object(&dir, 77, &file, 2 * PAGE_SIZE + 10).unwrap();
        assert_eq!(written, PAGE_SIZE + 10);
        let mut back = vec![0u8; 4 * PAGE_SIZE as usize];
        let n = file.read_at(&mut back, 0).unwrap();
        assert_eq!(n as u64, 2 * PAGE_SIZE + 10);
        assert!(back[..PAGE_SIZE as usize].iter().all(|&b| b == 0));
        assert!(back[PAGE_SIZE as usize..n].iter().all(|&b| b == 5));
        // No pagemap: nothing to write.
        assert_eq!(fill_object(&dir, 78, &file, PAGE_SIZE).unwrap(), 0);
    }
}
