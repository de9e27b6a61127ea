//! Reading the images of one process into plain data.
//!
//! Nothing here touches the kernel; the images directory is opened read-only and is
//! never modified.

use std::collections::HashMap;
use std::path::PathBuf;

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
    pub mm: pb::MmEntry,
    pub fdinfo: Vec<pb::FdinfoEntry>,
    /// `files.img` by file id.
    pub files: HashMap<u32, pb::FileEntry>,
    /// Files that were deleted but open, by original file id.
    pub ghosts: HashMap<u32, GhostImage>,
    pub fs: Option<pb::FsEntry>,
    /// `seccomp.img` filters, indexed as `thread_core.seccomp_filter` refers to them.
    pub seccomp_filters: Vec<pb::SeccompFilter>,
}

/// A ghost file's metadata and the image holding its contents.
#[derive(Debug, Clone, Default)]
pub struct GhostImage {
    pub remap_id: u32,
    pub entry: pb::GhostFileEntry,
    pub path: PathBuf,
}

/// Images of the tree to restore; a single process for now.
#[derive(Debug, Clone, Default)]
pub struct TreeImages {
    pub dir: PathBuf,
    pub root: ProcessImages,
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
    #[error("pstree.img has {count} processes; restoring process trees is not supported yet")]
    Tree { count: usize },
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
    let root = match pstree.as_slice() {
        [] => return Err(ReadError::NoProcess),
        [one] => one.clone(),
        more => return Err(ReadError::Tree { count: more.len() }),
    };
    let pid = u64::from(root.pid);
    let threads = if root.threads.is_empty() {
        vec![root.pid]
    } else {
        root.threads.clone()
    };
    let mut cores = Vec::with_capacity(threads.len());
    for tid in &threads {
        cores.push(dir.read_one::<pb::CoreEntry>(ImageKind::Core, u64::from(*tid))?);
    }
    let ids: Option<pb::TaskKobjIdsEntry> = dir.read_all(ImageKind::Ids, pid)?.into_iter().next();
    let ids = ids.or_else(|| cores.first().and_then(|c| c.ids));
    let mm = dir.read_one::<pb::MmEntry>(ImageKind::Mm, pid)?;
    // Old images name fd tables by pid; current ones by the fd table's id.
    let files_id = match (inventory.fdinfo_per_id, ids) {
        (Some(true), Some(i)) => u64::from(i.files_id),
        _ => pid,
    };
    let fdinfo = dir.read_all(ImageKind::Fdinfo, files_id)?;
    let files = dir
        .read_all::<pb::FileEntry>(ImageKind::Files, 0)?
        .into_iter()
        .map(|f| (f.id, f))
        .collect();
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
    let fs = dir
        .read_all::<pb::FsEntry>(ImageKind::Fs, pid)?
        .into_iter()
        .next();
    let seccomp_filters = dir
        .read_all::<pb::SeccompEntry>(ImageKind::Seccomp, 0)?
        .into_iter()
        .next()
        .map(|s| s.seccomp_filters)
        .unwrap_or_default();
    let pstree = pb::PstreeEntry { threads, ..root };
    Ok(TreeImages {
        dir: dir.path().to_path_buf(),
        root: ProcessImages {
            pstree,
            cores,
            ids,
            mm,
            fdinfo,
            files,
            ghosts,
            fs,
            seccomp_filters,
        },
    })
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
