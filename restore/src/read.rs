//! Reading the images of one process into plain data.
//!
//! Nothing here touches the kernel; the images directory is opened read-only and is
//! never modified.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use images_format::dir::ImageDir;
use images_format::error::{ImageError, PagesError};
use images_format::kind::ImageKind;
use images_format::pagemap::{PageFlags, PAGE_SIZE};
use images_format::pages::{PageSource as SegmentSource, PagesReader};
use images_format::pb;

use crate::memory::PageSource;
use crate::plan::Range;

/// Everything the images say about one process.
#[derive(Debug, Clone, Default)]
pub struct ProcessImages {
    pub pstree: pb::PstreeEntry,
    /// One core entry per thread, in `pstree.threads` order; the leader's first.
    pub cores: Vec<pb::CoreEntry>,
    pub ids: Option<pb::TaskKobjIdsEntry>,
    /// Empty for a zombie.
    pub mm: pb::MmEntry,
    /// The fd table (`fdinfo-<files_id>.img`), the same for processes sharing it.
    pub fdinfo: Vec<pb::FdinfoEntry>,
    /// `files.img` by file id: one table for the whole tree (file ids are global).
    pub files: Arc<HashMap<u32, pb::FileEntry>>,
    /// Files that were deleted but open, by original file id (the whole tree's).
    pub ghosts: Arc<HashMap<u32, GhostImage>>,
    pub fs: Option<pb::FsEntry>,
    /// `seccomp.img` filters, indexed as `thread_core.seccomp_filter` refers to them.
    pub seccomp_filters: Arc<Vec<pb::SeccompFilter>>,
}

/// `task_core_entry.task_state` of a zombie (CRIU's TASK_DEAD).
pub const TASK_DEAD: u32 = 2;

impl ProcessImages {
    /// The process had exited and was not yet reaped when dumped.
    pub fn is_zombie(&self) -> bool {
        self.cores
            .first()
            .and_then(|c| c.tc.as_ref())
            .is_some_and(|tc| tc.task_state == TASK_DEAD)
    }
}

/// A ghost file's metadata and the image holding its contents.
#[derive(Debug, Clone, Default)]
pub struct GhostImage {
    pub remap_id: u32,
    pub entry: pb::GhostFileEntry,
    pub path: PathBuf,
}

/// Images of the tree to restore, in `pstree.img` order (every parent before its
/// children; the root first).
#[derive(Debug, Clone, Default)]
pub struct TreeImages {
    pub dir: PathBuf,
    pub processes: Vec<ProcessImages>,
}

impl TreeImages {
    /// The root of the tree (`images` refuses an empty tree).
    pub fn root(&self) -> Option<&ProcessImages> {
        self.processes.first()
    }
}

/// `inventory_entry.img_version` of the image format we read (CRIU's CRTOOLS_IMAGES_V1_1).
const IMAGES_V1_1: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "inventory.img: image format version {version} is not supported (expected {IMAGES_V1_1})"
    )]
    Version { version: u32 },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Pages(#[from] PagesError),
    #[error("pstree.img has no process")]
    NoProcess,
    #[error("pstree.img lists pid {pid} twice")]
    DuplicatePid { pid: u32 },
    #[error("pid {pid}: pages image of parent layer {layer} is missing")]
    MissingLayer { pid: u32, layer: usize },
    #[error("pid {pid}: pages {vaddr:#x}+{len:#x} are lazy and not in the images; restore with --lazy-pages and ckpt-lazy-pages")]
    Lazy { pid: u32, vaddr: u64, len: u64 },
}

/// Reads every image the restore of the tree in `dir` needs.
pub fn images(dir: &ImageDir) -> Result<TreeImages, ReadError> {
    let inventory = dir.read_one::<pb::InventoryEntry>(ImageKind::Inventory, 0)?;
    if inventory.img_version != IMAGES_V1_1 {
        return Err(ReadError::Version {
            version: inventory.img_version,
        });
    }
    let pstree: Vec<pb::PstreeEntry> = dir.read_all(ImageKind::Pstree, 0)?;
    if pstree.is_empty() {
        return Err(ReadError::NoProcess);
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = pstree.iter().find(|e| !seen.insert(e.pid)) {
        return Err(ReadError::DuplicatePid { pid: twice.pid });
    }
    let files: HashMap<u32, pb::FileEntry> = dir
        .read_all::<pb::FileEntry>(ImageKind::Files, 0)?
        .into_iter()
        .map(|f| (f.id, f))
        .collect();
    let files = Arc::new(files);
    let ghosts = Arc::new(read_ghosts(dir)?);
    let seccomp_filters = Arc::new(
        dir.read_all::<pb::SeccompEntry>(ImageKind::Seccomp, 0)?
            .into_iter()
            .next()
            .map(|s| s.seccomp_filters)
            .unwrap_or_default(),
    );
    let shared = Shared {
        per_id: inventory.fdinfo_per_id == Some(true),
        files,
        ghosts,
        seccomp_filters,
    };
    // Processes sharing an fd table share its image: read once.
    let mut tables: HashMap<u64, Vec<pb::FdinfoEntry>> = HashMap::new();
    let processes = pstree
        .into_iter()
        .map(|entry| process(dir, entry, &shared, &mut tables))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TreeImages {
        dir: dir.path().to_path_buf(),
        processes,
    })
}

/// What every process of the tree refers to.
struct Shared {
    /// `inventory.fdinfo_per_id`: fd tables are named by their id, not by a pid.
    per_id: bool,
    files: Arc<HashMap<u32, pb::FileEntry>>,
    ghosts: Arc<HashMap<u32, GhostImage>>,
    seccomp_filters: Arc<Vec<pb::SeccompFilter>>,
}

fn process(
    dir: &ImageDir,
    entry: pb::PstreeEntry,
    shared: &Shared,
    tables: &mut HashMap<u64, Vec<pb::FdinfoEntry>>,
) -> Result<ProcessImages, ReadError> {
    let pid = u64::from(entry.pid);
    let threads = if entry.threads.is_empty() {
        vec![entry.pid]
    } else {
        entry.threads.clone()
    };
    let leader = dir.read_one::<pb::CoreEntry>(ImageKind::Core, pid)?;
    let zombie = leader
        .tc
        .as_ref()
        .is_some_and(|tc| tc.task_state == TASK_DEAD);
    let mut images = ProcessImages {
        files: Arc::clone(&shared.files),
        ghosts: Arc::clone(&shared.ghosts),
        seccomp_filters: Arc::clone(&shared.seccomp_filters),
        ..ProcessImages::default()
    };
    if zombie {
        // A zombie has nothing left but its exit status: no memory, files or threads.
        images.ids = leader.ids;
        images.cores = vec![leader];
        images.pstree = pb::PstreeEntry {
            threads: vec![entry.pid],
            ..entry
        };
        return Ok(images);
    }
    let mut cores = Vec::with_capacity(threads.len());
    cores.push(leader);
    for tid in threads.iter().filter(|&&t| t != entry.pid) {
        cores.push(dir.read_one::<pb::CoreEntry>(ImageKind::Core, u64::from(*tid))?);
    }
    // The leader's core must come first, as `threads` lists it.
    if threads.first() != Some(&entry.pid) {
        if let Some(at) = threads.iter().position(|&t| t == entry.pid) {
            let leader = cores.remove(0);
            cores.insert(at, leader);
        }
    }
    let ids: Option<pb::TaskKobjIdsEntry> = dir.read_all(ImageKind::Ids, pid)?.into_iter().next();
    let ids = ids.or_else(|| cores.first().and_then(|c| c.ids));
    let mm = dir.read_one::<pb::MmEntry>(ImageKind::Mm, pid)?;
    // Old images name fd tables by pid; current ones by the fd table's id.
    let table = match (shared.per_id, ids) {
        (true, Some(i)) => u64::from(i.files_id),
        _ => pid,
    };
    let fdinfo = match tables.get(&table) {
        Some(t) => t.clone(),
        None => {
            let t: Vec<pb::FdinfoEntry> = dir.read_all(ImageKind::Fdinfo, table)?;
            tables.insert(table, t.clone());
            t
        }
    };
    let fs = dir
        .read_all::<pb::FsEntry>(ImageKind::Fs, pid)?
        .into_iter()
        .next();
    images.pstree = pb::PstreeEntry { threads, ..entry };
    images.cores = cores;
    images.ids = ids;
    images.mm = mm;
    images.fdinfo = fdinfo;
    images.fs = fs;
    Ok(images)
}

fn read_ghosts(dir: &ImageDir) -> Result<HashMap<u32, GhostImage>, ReadError> {
    let mut ghosts = HashMap::new();
    for remap in dir.read_all::<pb::RemapFilePathEntry>(ImageKind::RemapFpath, 0)? {
        if remap.remap_type != Some(pb::RemapType::Ghost as i32) {
            continue;
        }
        let mut reader = dir.open(ImageKind::GhostFile, u64::from(remap.remap_id))?;
        let entry: pb::GhostFileEntry = reader.read_entry()?.ok_or_else(|| ImageError::Empty {
            image: ImageKind::GhostFile.file_name(u64::from(remap.remap_id)),
        })?;
        let path = dir.file_path(ImageKind::GhostFile, u64::from(remap.remap_id));
        ghosts.insert(
            remap.orig_id,
            GhostImage {
                remap_id: remap.remap_id,
                entry,
                path,
            },
        );
    }
    Ok(ghosts)
}

/// Where every dumped page of `pid` is, following `parent` links for pages an
/// incremental dump left in an earlier image, and which ranges are lazy (PE_LAZY).
///
/// With `lazy`, lazy pages are left out (`ckpt-lazy-pages` serves them); without it,
/// lazy pages must have their data in the images.
pub fn page_sources(
    dir: &ImageDir,
    pid: u32,
    lazy: bool,
) -> Result<(Vec<PageSource>, Vec<Range>), ReadError> {
    let reader = PagesReader::open(dir, ImageKind::Pagemap, u64::from(pid))?;
    let lazy_ranges: Vec<Range> = reader
        .pagemap()
        .ranges
        .iter()
        .filter(|r| r.flags.contains(PageFlags::LAZY))
        .map(|r| Range {
            start: r.vaddr,
            end: r.end(),
        })
        .collect();
    let mut out = Vec::new();
    for seg in reader.resolve()? {
        match seg.source {
            SegmentSource::File { layer, offset } => {
                let file = reader
                    .pages_path(layer)
                    .ok_or(ReadError::MissingLayer { pid, layer })?
                    .to_path_buf();
                let source = PageSource {
                    vaddr: seg.vaddr,
                    len: seg.len,
                    file,
                    offset,
                };
                if lazy {
                    out.extend(subtract(&source, &lazy_ranges));
                } else {
                    out.push(source);
                }
            }
            SegmentSource::Lazy if lazy => {}
            SegmentSource::Lazy => {
                return Err(ReadError::Lazy {
                    pid,
                    vaddr: seg.vaddr,
                    len: seg.len,
                })
            }
        }
    }
    Ok((out, if lazy { lazy_ranges } else { Vec::new() }))
}

/// The parts of `s` outside every range of `cut` (sorted, disjoint).
pub fn subtract(s: &PageSource, cut: &[Range]) -> Vec<PageSource> {
    let mut out = Vec::new();
    let end = s.vaddr + s.len;
    let mut at = s.vaddr;
    for c in cut.iter().filter(|c| c.end > s.vaddr && c.start < end) {
        if c.start > at {
            out.push(s.part(at, c.start));
        }
        at = at.max(c.end);
    }
    if at < end {
        out.push(s.part(at, end));
    }
    out
}

/// Number of pages `sources` cover.
pub fn page_count(sources: &[PageSource]) -> u64 {
    sources.iter().map(|s| s.len / PAGE_SIZE).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_ranges_are_cut_out_of_a_run_with_offsets_kept() {
        let s = PageSource {
            vaddr: 0x1000,
            len: 0x5000,
            file: "p".into(),
            offset: 0x10000,
        };
        let got = subtract(
            &s,
            &[
                Range {
                    start: 0x2000,
                    end: 0x3000,
                },
                Range {
                    start: 0x5000,
                    end: 0x9000,
                },
            ],
        );
        assert_eq!(
            got,
            vec![
                PageSource {
                    vaddr: 0x1000,
                    len: 0x1000,
                    file: "p".into(),
                    offset: 0x10000
                },
                PageSource {
                    vaddr: 0x3000,
                    len: 0x2000,
                    file: "p".into(),
                    offset: 0x12000
                },
            ]
        );
        assert_eq!(subtract(&s, &[]), vec![s.clone()]);
        assert!(subtract(
            &s,
            &[Range {
                start: 0,
                end: 0x10000
            }]
        )
        .is_empty());
    }
}
