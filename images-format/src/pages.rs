//! Finding saved pages: for one pagemap (a process or a shared memory object), where each
//! page's contents are, following PE_PARENT through the chain of `parent` directories.
//!
//! ```text
//! DIR/pagemap-<id>.img        ranges, in address order        DIR/pages-<n>.img
//!   [a, b) PE_PRESENT    ---- data at offset o -------------> | ...o: (b-a) bytes |
//!   [b, c) PE_PARENT     ---- DIR/parent/pagemap-<id>.img: the range [b, c) there, whose
//!                             entries are PE_PRESENT (data in DIR/parent/pages-<m>.img)
//!                             or PE_PARENT again (one level further)
//!   [c, d) PE_LAZY       ---- no data: a page server supplies it
//! ```
//!
//! The offset of a range's data in its pages image is the sum of the lengths of the
//! PE_PRESENT ranges before it. Restore reads the resolved [`PageSegment`]s straight into
//! the target (`preadv` of each segment's file at its offset to its address).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::dir::ImageDir;
pub use crate::error::PagesError;
use crate::kind::ImageKind;
use crate::pagemap::{PageFlags, Pagemap, PAGE_SIZE};

/// Where the contents of a run of pages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSource {
    /// In the pages image of layer `layer` (0 is the directory opened, 1 its parent...), at
    /// byte `offset`.
    File { layer: usize, offset: u64 },
    /// Not in any image: marked PE_LAZY (here, or in the parent a PE_PARENT entry points
    /// to), to be fetched from a page server.
    Lazy,
}

/// A run of pages whose contents come from one place, contiguously.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSegment {
    pub vaddr: u64,
    /// Bytes, a multiple of the page size.
    pub len: u64,
    pub source: PageSource,
}

impl PageSegment {
    pub fn end(&self) -> u64 {
        self.vaddr + self.len
    }
}

/// One directory of the chain, with its pagemap for our id.
#[derive(Debug)]
struct Layer {
    dir: ImageDir,
    pagemap_name: String,
    pagemap: Pagemap,
    /// Offset in the pages image of each range's data (for ranges without data, where it
    /// would start).
    offsets: Vec<u64>,
    pages_path: PathBuf,
    /// Open only when the layer has data.
    pages: Option<File>,
}

/// The saved pages of one pagemap, across the parent chain.
#[derive(Debug)]
pub struct PagesReader {
    kind: ImageKind,
    id: u64,
    layers: Vec<Layer>,
}

impl PagesReader {
    /// Opens `pagemap-<id>.img` of `dir` (or, with `kind` [`ImageKind::ShmemPagemap`], the
    /// shared memory pagemap), the pages image it names, and the same pagemap in each
    /// parent directory as long as one exists.
    pub fn open(dir: &ImageDir, kind: ImageKind, id: u64) -> Result<Self, PagesError> {
        let mut layers = Vec::new();
        for layer_dir in dir.parent_chain()? {
            let Some(mut reader) = layer_dir.open_optional(kind, id)? else {
                if layers.is_empty() {
                    // The opened directory itself must have the pagemap.
                    layer_dir.open(kind, id)?;
                }
                break;
            };
            let pagemap = Pagemap::read(&mut reader)?;
            layers.push(Layer::new(layer_dir, kind.file_name(id), pagemap)?);
        }
        Ok(PagesReader { kind, id, layers })
    }

    /// The pagemap of the directory opened.
    pub fn pagemap(&self) -> &Pagemap {
        &self.top().pagemap
    }

    /// Number of directories whose pagemap was found (1 + parents).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Path of the pages image of a layer (see [`PageSource::File`]).
    pub fn pages_path(&self, layer: usize) -> Option<&Path> {
        self.layers.get(layer).map(|l| l.pages_path.as_path())
    }

    /// The open pages image of a layer, if that layer has data.
    pub fn pages_file(&self, layer: usize) -> Option<&File> {
        self.layers.get(layer).and_then(|l| l.pages.as_ref())
    }

    /// Where every page of the opened pagemap is, in address order, with adjacent runs from
    /// the same place merged. PE_PARENT pages are resolved through the chain; a page that
    /// no layer holds is an error.
    pub fn resolve(&self) -> Result<Vec<PageSegment>, PagesError> {
        let mut out = Vec::new();
        self.resolve_in(0, 0, u64::MAX, false, &mut out)?;
        Ok(out)
    }

    /// Like [`PagesReader::resolve`], for the pages of `[vaddr, vaddr + len)` that the
    /// pagemap lists (pages it does not list were not saved and are left out).
    pub fn resolve_range(&self, vaddr: u64, len: u64) -> Result<Vec<PageSegment>, PagesError> {
        let mut out = Vec::new();
        self.resolve_in(0, vaddr, vaddr.saturating_add(len), false, &mut out)?;
        Ok(out)
    }

    /// Reads the contents of `buf.len()` bytes at `vaddr`; every page of the range must have
    /// saved contents (present here or in a parent). `vaddr` and the length need not be
    /// page aligned.
    pub fn read_pages(&self, vaddr: u64, buf: &mut [u8]) -> Result<(), PagesError> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = vaddr.saturating_add(buf.len() as u64);
        let first = vaddr - vaddr % PAGE_SIZE;
        let mut segments = Vec::new();
        self.resolve_in(0, first, end, true, &mut segments)?;
        for seg in segments {
            let PageSource::File { layer, offset } = seg.source else {
                return Err(PagesError::NotSaved {
                    image: self.top().pagemap_name.clone(),
                    id: self.id,
                    vaddr: seg.vaddr,
                });
            };
            let start = seg.vaddr.max(vaddr);
            let stop = seg.end().min(end);
            let into = &mut buf[offset_in(vaddr, start)..offset_in(vaddr, stop)];
            let at = offset + (start - seg.vaddr);
            let layer = &self.layers[layer];
            let file = layer
                .pages
                .as_ref()
                .expect("layers with data segments have their pages open");
            file.read_exact_at(into, at)
                .map_err(|source| PagesError::Read {
                    path: layer.pages_path.clone(),
                    offset: at,
                    len: into.len() as u64,
                    source,
                })?;
        }
        Ok(())
    }

    fn top(&self) -> &Layer {
        self.layers
            .first()
            .expect("open() fails unless the first layer exists")
    }

    /// Appends the segments of `[start, end)` in layer `i`. With `complete`, every page of
    /// the interval must be listed (true below the top layer, and for reads); otherwise
    /// pages not listed are skipped.
    fn resolve_in(
        &self,
        i: usize,
        start: u64,
        end: u64,
        complete: bool,
        out: &mut Vec<PageSegment>,
    ) -> Result<(), PagesError> {
        let Some(layer) = self.layers.get(i) else {
            return Err(self.not_in_parent(start, i));
        };
        let map = &layer.pagemap;
        let mut cursor = start;
        let mut idx = map.first_ending_after(cursor);
        while cursor < end {
            let Some(range) = map.ranges.get(idx) else {
                break;
            };
            if range.vaddr >= end {
                break;
            }
            if range.vaddr > cursor {
                if complete {
                    return Err(self.missing(i, cursor));
                }
                cursor = range.vaddr;
            }
            let stop = range.end().min(end);
            if range.flags.contains(PageFlags::PRESENT) {
                let offset = layer.offsets[idx] + (cursor - range.vaddr);
                push(
                    out,
                    PageSegment {
                        vaddr: cursor,
                        len: stop - cursor,
                        source: PageSource::File { layer: i, offset },
                    },
                );
            } else if range.flags.contains(PageFlags::PARENT) {
                self.resolve_in(i + 1, cursor, stop, true, out)?;
            } else if range.flags.contains(PageFlags::LAZY) {
                push(
                    out,
                    PageSegment {
                        vaddr: cursor,
                        len: stop - cursor,
                        source: PageSource::Lazy,
                    },
                );
            } else if complete {
                return Err(self.missing(i, cursor));
            }
            cursor = stop;
            idx += 1;
        }
        if complete && cursor < end {
            return Err(self.missing(i, cursor));
        }
        Ok(())
    }

    fn missing(&self, layer: usize, vaddr: u64) -> PagesError {
        if layer == 0 {
            PagesError::NotSaved {
                image: self.top().pagemap_name.clone(),
                id: self.id,
                vaddr,
            }
        } else {
            self.not_in_parent(vaddr, layer)
        }
    }

    fn not_in_parent(&self, vaddr: u64, searched: usize) -> PagesError {
        PagesError::NotInParent {
            image: self
                .top()
                .dir
                .path()
                .join(self.kind.file_name(self.id))
                .display()
                .to_string(),
            id: self.id,
            vaddr,
            searched,
        }
    }
}

impl Layer {
    fn new(dir: ImageDir, pagemap_name: String, pagemap: Pagemap) -> Result<Self, PagesError> {
        let mut offsets = Vec::with_capacity(pagemap.ranges.len());
        let mut offset = 0u64;
        for range in &pagemap.ranges {
            offsets.push(offset);
            if range.has_data() {
                offset += range.len();
            }
        }
        let pages_path = dir.file_path(ImageKind::Pages, u64::from(pagemap.pages_id));
        let pages = if offset > 0 {
            let file = File::open(&pages_path).map_err(|source| PagesError::Read {
                path: pages_path.clone(),
                offset: 0,
                len: offset,
                source,
            })?;
            let len = file
                .metadata()
                .map_err(|source| PagesError::Read {
                    path: pages_path.clone(),
                    offset: 0,
                    len: offset,
                    source,
                })?
                .len();
            if len < offset {
                return Err(PagesError::PagesShort {
                    path: pages_path,
                    len,
                    needed: offset,
                });
            }
            Some(file)
        } else {
            None
        };
        Ok(Layer {
            dir,
            pagemap_name,
            pagemap,
            offsets,
            pages_path,
            pages,
        })
    }
}

/// Appends a segment, merging it into the previous one when it continues it.
fn push(out: &mut Vec<PageSegment>, seg: PageSegment) {
    if let Some(last) = out.last_mut() {
        if last.end() == seg.vaddr {
            match (last.source, seg.source) {
                (PageSource::Lazy, PageSource::Lazy) => {
                    last.len += seg.len;
                    return;
                }
                (
                    PageSource::File {
                        layer: a,
                        offset: o,
                    },
                    PageSource::File {
                        layer: b,
                        offset: p,
                    },
                ) if a == b && o + last.len == p => {
                    last.len += seg.len;
                    return;
                }
                _ => {}
            }
        }
    }
    out.push(seg);
}

fn offset_in(base: u64, addr: u64) -> usize {
    usize::try_from(addr - base).expect("within a buffer of usize length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::PagemapWriter;

    const P: u64 = PAGE_SIZE;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; P as usize]
    }

    /// Writes pagemap-1.img and pages-<pages_id>.img into `dir` with the given ranges; data
    /// pages are filled with `fill`.
    fn write(dir: &ImageDir, pages_id: u32, ranges: &[(u64, u64, PageFlags)], fill: u8) {
        let pm = dir.create(ImageKind::Pagemap, 1).unwrap();
        let pages = dir.create(ImageKind::Pages, u64::from(pages_id)).unwrap();
        let mut w = PagemapWriter::new(pm, pages, pages_id).unwrap();
        for &(vaddr, n, flags) in ranges {
            if flags.contains(PageFlags::PRESENT) {
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| page(fill.wrapping_add(i as u8)))
                    .collect();
                w.add_with_data(vaddr, flags, &data).unwrap();
            } else {
                w.add_hole(vaddr, n, flags).unwrap();
            }
        }
        w.finish().unwrap();
    }

    #[test]
    fn parent_pages_resolve_through_the_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let d1 = ImageDir::create_dir(tmp.path().join("1")).unwrap();
        let d2 = ImageDir::create_dir(tmp.path().join("2")).unwrap();
        let d3 = ImageDir::create_dir(tmp.path().join("3")).unwrap();
        d2.set_parent("../1").unwrap();
        d3.set_parent("../2").unwrap();
        // 1: pages 0x10000..0x14000 with 0x10, 0x11, 0x12, 0x13
        write(&d1, 1, &[(0x10000, 4, PageFlags::PRESENT)], 0x10);
        // 2: first two from parent, third rewritten (0x20), fourth from parent
        write(
            &d2,
            2,
            &[
                (0x10000, 2, PageFlags::PARENT),
                (0x12000, 1, PageFlags::PRESENT),
                (0x13000, 1, PageFlags::PARENT),
            ],
            0x20,
        );
        // 3: page 0 rewritten (0x30), the rest from the parent, plus a lazy page
        write(
            &d3,
            3,
            &[
                (0x10000, 1, PageFlags::PRESENT),
                (0x11000, 3, PageFlags::PARENT),
                (0x20000, 1, PageFlags::LAZY),
            ],
            0x30,
        );
        let reader = PagesReader::open(&d3, ImageKind::Pagemap, 1).unwrap();
        assert_eq!(reader.layers(), 3);
        let segs = reader.resolve().unwrap();
        let file = |layer, offset| PageSource::File { layer, offset };
        assert_eq!(
            segs,
            [
                PageSegment {
                    vaddr: 0x10000,
                    len: P,
                    source: file(0, 0)
                },
                PageSegment {
                    vaddr: 0x11000,
                    len: P,
                    source: file(2, P)
                },
                PageSegment {
                    vaddr: 0x12000,
                    len: P,
                    source: file(1, 0)
                },
                PageSegment {
                    vaddr: 0x13000,
                    len: P,
                    source: file(2, 3 * P)
                },
                PageSegment {
                    vaddr: 0x20000,
                    len: P,
                    source: PageSource::Lazy
                },
            ]
        );
        let mut buf = vec![0u8; 4 * P as usize];
        reader.read_pages(0x10000, &mut buf).unwrap();
        let firsts: Vec<u8> = buf.chunks(P as usize).map(|c| c[0]).collect();
        assert_eq!(firsts, [0x30, 0x11, 0x20, 0x13]);
        // unaligned read across a layer boundary
        let mut small = [0u8; 4];
        reader.read_pages(0x11ffe, &mut small).unwrap();
        assert_eq!(small, [0x11, 0x11, 0x20, 0x20]);
        assert!(matches!(
            reader.read_pages(0x20000, &mut small),
            Err(PagesError::NotSaved { vaddr: 0x20000, .. })
        ));
        assert!(matches!(
            reader.read_pages(0x30000, &mut small),
            Err(PagesError::NotSaved { vaddr: 0x30000, .. })
        ));
        let part = reader.resolve_range(0x11000, 0x10000).unwrap();
        assert_eq!(part.len(), 4);
        assert_eq!(part[0].vaddr, 0x11000);
        assert_eq!(
            reader.pages_path(2).unwrap(),
            std::fs::canonicalize(d1.path())
                .unwrap()
                .join("pages-1.img")
        );
    }

    #[test]
    fn adjacent_file_segments_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let d1 = ImageDir::create_dir(tmp.path().join("1")).unwrap();
        let d2 = ImageDir::create_dir(tmp.path().join("2")).unwrap();
        d2.set_parent(d1.path()).unwrap();
        write(&d1, 1, &[(0x1000, 4, PageFlags::PRESENT)], 0);
        write(
            &d2,
            2,
            &[
                (0x1000, 2, PageFlags::PARENT),
                (0x3000, 2, PageFlags::PARENT | PageFlags::LAZY),
            ],
            0,
        );
        let reader = PagesReader::open(&d2, ImageKind::Pagemap, 1).unwrap();
        assert_eq!(
            reader.resolve().unwrap(),
            [PageSegment {
                vaddr: 0x1000,
                len: 4 * P,
                source: PageSource::File {
                    layer: 1,
                    offset: 0
                }
            }]
        );
    }

    #[test]
    fn a_page_missing_from_the_chain_names_pid_and_address() {
        let tmp = tempfile::tempdir().unwrap();
        let d1 = ImageDir::create_dir(tmp.path().join("1")).unwrap();
        let d2 = ImageDir::create_dir(tmp.path().join("2")).unwrap();
        d2.set_parent("../1").unwrap();
        write(&d1, 1, &[(0x1000, 1, PageFlags::PRESENT)], 0);
        write(&d2, 2, &[(0x1000, 2, PageFlags::PARENT)], 0);
        let reader = PagesReader::open(&d2, ImageKind::Pagemap, 1).unwrap();
        let err = reader.resolve().unwrap_err();
        assert!(
            matches!(
                err,
                PagesError::NotInParent {
                    id: 1,
                    vaddr: 0x2000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("0x2000"), "{err}");

        // no parent directory at all
        let d3 = ImageDir::create_dir(tmp.path().join("3")).unwrap();
        write(&d3, 3, &[(0x1000, 1, PageFlags::PARENT)], 0);
        let reader = PagesReader::open(&d3, ImageKind::Pagemap, 1).unwrap();
        assert!(matches!(
            reader.resolve(),
            Err(PagesError::NotInParent { vaddr: 0x1000, .. })
        ));
    }

    #[test]
    fn a_short_pages_image_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let d = ImageDir::create_dir(tmp.path().join("1")).unwrap();
        write(&d, 1, &[(0x1000, 2, PageFlags::PRESENT)], 0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.file_path(ImageKind::Pages, 1))
            .unwrap();
        f.set_len(P).unwrap();
        assert!(matches!(
            PagesReader::open(&d, ImageKind::Pagemap, 1),
            Err(PagesError::PagesShort {
                len: 4096,
                needed: 8192,
                ..
            })
        ));
        assert!(PagesReader::open(&d, ImageKind::Pagemap, 2).is_err());
    }
}
