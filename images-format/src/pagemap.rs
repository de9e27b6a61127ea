//! Pagemap images: which pages of an address space (or of a shared memory object) were
//! saved, and where their contents are.
//!
//! ```text
//! pagemap-<pid>.img : header | pagemap_head { pages_id }
//!                            | pagemap_entry { vaddr, compat_nr_pages, flags, nr_pages } ...
//! pages-<pages_id>.img : raw 4 KiB pages of every PE_PRESENT entry, in entry order
//!
//! flags: PE_PARENT  = 1  the pages are as in the parent image directory (no data here)
//!        PE_LAZY    = 2  the pages may be restored on first touch
//!        PE_PRESENT = 4  the pages' contents are in pages-<pages_id>.img
//! ```
//!
//! Entries are in increasing address order and do not overlap. The page count was first a
//! u32 (`compat_nr_pages`, field 2, required) and is now a u64 (`nr_pages`, field 5); we
//! write both, so that old and new readers agree, and read the new one when it is present.
//! Entries from before `flags` existed say PE_PARENT with `in_parent` and otherwise mean
//! PE_PRESENT.

use std::io::{Read, Write};

use crate::entry::{ImageReader, ImageWriter};
use crate::error::{ImageError, PagesError};
use crate::kind::ImageKind;
use crate::pb::{PagemapEntry, PagemapHead};

/// The page size of the image format (x86_64 and the other 4 KiB architectures).
pub const PAGE_SIZE: u64 = 4096;

bitflags::bitflags! {
    /// `pagemap_entry.flags`. Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct PageFlags: u32 {
        const PARENT = 1 << 0;
        const LAZY = 1 << 1;
        const PRESENT = 1 << 2;
        const _ = !0;
    }
}

/// A run of pages with the same flags, as one pagemap entry describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: PageFlags,
}

impl PageRange {
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    /// First address after the range.
    pub fn end(&self) -> u64 {
        self.vaddr + self.len()
    }

    /// True when the pages' contents are in this directory's pages image.
    pub fn has_data(&self) -> bool {
        self.flags.contains(PageFlags::PRESENT)
    }

    /// Checks an entry read from `image` (entry number `index`) and turns it into a range.
    pub fn from_entry(entry: &PagemapEntry, image: &str, index: u64) -> Result<Self, PagesError> {
        let nr_pages = entry.nr_pages.unwrap_or(u64::from(entry.compat_nr_pages));
        let flags = match entry.flags {
            Some(bits) => PageFlags::from_bits_retain(bits),
            None if entry.in_parent() => PageFlags::PARENT,
            None => PageFlags::PRESENT,
        };
        let flags = if entry.in_parent() {
            flags | PageFlags::PARENT
        } else {
            flags
        };
        let bad = |reason: &'static str| PagesError::BadEntry {
            image: image.to_owned(),
            index,
            vaddr: entry.vaddr,
            nr_pages,
            reason,
        };
        if !entry.vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(bad("address is not page aligned"));
        }
        if nr_pages == 0 {
            return Err(bad("no pages"));
        }
        nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| entry.vaddr.checked_add(len))
            .ok_or_else(|| bad("range wraps around the address space"))?;
        Ok(PageRange {
            vaddr: entry.vaddr,
            nr_pages,
            flags,
        })
    }

    /// The entries that describe this range. A range of more than `u32::MAX` pages is
    /// split, since old readers take the count from the u32 field.
    pub fn to_entries(&self) -> impl Iterator<Item = PagemapEntry> + '_ {
        let max = u64::from(u32::MAX);
        let mut vaddr = self.vaddr;
        let mut left = self.nr_pages;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let n = left.min(max);
            let entry = PagemapEntry {
                vaddr,
                compat_nr_pages: u32::try_from(n).expect("n is at most u32::MAX"),
                in_parent: None,
                flags: Some(self.flags.bits()),
                nr_pages: Some(n),
            };
            vaddr += n * PAGE_SIZE;
            left -= n;
            Some(entry)
        })
    }
}

/// A whole pagemap image: the pages image id and the ranges, sorted and disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub ranges: Vec<PageRange>,
}

impl Pagemap {
    /// Reads a pagemap image to its end and checks that its ranges are page aligned, in
    /// increasing order and disjoint.
    pub fn read<R: Read>(reader: &mut ImageReader<R>) -> Result<Self, PagesError> {
        let head: PagemapHead = reader.read_entry()?.ok_or_else(|| ImageError::Empty {
            image: reader.name().to_owned(),
        })?;
        let mut ranges: Vec<PageRange> = Vec::new();
        loop {
            let index = reader.index();
            let Some(entry) = reader.read_entry::<PagemapEntry>()? else {
                break;
            };
            let range = PageRange::from_entry(&entry, reader.name(), index)?;
            if let Some(prev) = ranges.last() {
                if range.vaddr < prev.end() {
                    return Err(PagesError::BadEntry {
                        image: reader.name().to_owned(),
                        index,
                        vaddr: range.vaddr,
                        nr_pages: range.nr_pages,
                        reason: "overlaps or precedes the previous entry",
                    });
                }
            }
            ranges.push(range);
        }
        Ok(Pagemap {
            pages_id: head.pages_id,
            ranges,
        })
    }

    /// Writes the pagemap as an image (head, then one or more entries per range).
    pub fn write<W: Write>(&self, writer: &mut ImageWriter<W>) -> Result<(), ImageError> {
        writer.write_entry(&PagemapHead {
            pages_id: self.pages_id,
        })?;
        for range in &self.ranges {
            for entry in range.to_entries() {
                writer.write_entry(&entry)?;
            }
        }
        Ok(())
    }

    /// Index of the range that contains `vaddr`.
    pub fn find(&self, vaddr: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.end() <= vaddr);
        self.ranges.get(i).filter(|r| r.vaddr <= vaddr).map(|_| i)
    }

    /// Index of the first range that ends after `vaddr`.
    pub fn first_ending_after(&self, vaddr: u64) -> usize {
        self.ranges.partition_point(|r| r.end() <= vaddr)
    }

    /// Pages whose data is in this directory's pages image.
    pub fn present_pages(&self) -> u64 {
        self.pages_with(PageFlags::PRESENT)
    }

    /// Pages with all of `flags`.
    pub fn pages_with(&self, flags: PageFlags) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.flags.contains(flags))
            .map(|r| r.nr_pages)
            .sum()
    }
}

/// Counts of what a [`PagemapWriter`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagemapStats {
    /// Pagemap entries, the head not counted.
    pub entries: u64,
    /// Pages written to the pages image.
    pub pages_present: u64,
    pub pages_parent: u64,
    /// Pages marked lazy, with or without data.
    pub pages_lazy: u64,
}

/// The ranges added to one pagemap, in order. The pagemap writer and the page-server
/// client (which checks before it sends, to report a mistake with its address rather than
/// as a dropped connection) hold ranges to the same rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeOrder {
    /// End of the last range accepted.
    last_end: u64,
}

impl RangeOrder {
    /// Accepts `nr_pages` pages at `vaddr` if the range is page-aligned, non-empty and not
    /// below the end of the one before; otherwise says why.
    pub fn accept(&mut self, vaddr: u64, nr_pages: u64) -> Result<(), &'static str> {
        let end = nr_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| vaddr.checked_add(len));
        let Some(end) = end.filter(|_| nr_pages > 0 && vaddr.is_multiple_of(PAGE_SIZE)) else {
            return Err("not a page-aligned, non-empty range");
        };
        if vaddr < self.last_end {
            return Err("below the end of the previous range");
        }
        self.last_end = end;
        Ok(())
    }
}

/// How many pages `len` bytes of page data flagged `flags` are: data needs PE_PRESENT and
/// whole pages.
pub fn data_pages(flags: PageFlags, len: u64) -> Result<u64, &'static str> {
    if !flags.contains(PageFlags::PRESENT) || !len.is_multiple_of(PAGE_SIZE) {
        return Err("data needs PE_PRESENT and whole pages");
    }
    Ok(len / PAGE_SIZE)
}

/// Pages without data here (PE_PARENT, PE_LAZY) cannot be PE_PRESENT.
pub fn check_hole(flags: PageFlags) -> Result<(), &'static str> {
    if flags.contains(PageFlags::PRESENT) {
        return Err("PE_PRESENT pages need data");
    }
    Ok(())
}

/// Writes a pagemap image and its pages image together, streaming: page data goes straight
/// to the pages image, and adjacent runs with the same flags become one entry.
#[derive(Debug)]
pub struct PagemapWriter<W: Write, P: Write> {
    pagemap: ImageWriter<W>,
    pages: ImageWriter<P>,
    pending: Option<PageRange>,
    order: RangeOrder,
    stats: PagemapStats,
}

impl<W: Write, P: Write> PagemapWriter<W, P> {
    /// Starts a pagemap whose present pages go to `pages` (a raw image of kind
    /// [`ImageKind::Pages`], whose id is `pages_id`); writes the head.
    pub fn new(
        mut pagemap: ImageWriter<W>,
        pages: ImageWriter<P>,
        pages_id: u32,
    ) -> Result<Self, PagesError> {
        if pages.kind() != ImageKind::Pages {
            return Err(PagesError::NotPagesImage {
                image: pages.name().to_owned(),
            });
        }
        pagemap.write_entry(&PagemapHead { pages_id })?;
        Ok(PagemapWriter {
            pagemap,
            pages,
            pending: None,
            order: RangeOrder::default(),
            stats: PagemapStats::default(),
        })
    }

    /// Adds pages whose contents are `data` (a whole number of pages), flagged PE_PRESENT.
    pub fn add_present(&mut self, vaddr: u64, data: &[u8]) -> Result<(), PagesError> {
        self.add_with_data(vaddr, PageFlags::PRESENT, data)
    }

    /// Adds pages with contents and any flags that include PE_PRESENT (e.g. lazy pages that
    /// are also stored: PE_LAZY | PE_PRESENT).
    pub fn add_with_data(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[u8],
    ) -> Result<(), PagesError> {
        let len = data.len() as u64;
        let nr_pages =
            data_pages(flags, len).map_err(|reason| self.rejected(vaddr, len, flags, reason))?;
        self.add_range(vaddr, nr_pages, flags)?;
        self.pages.write_payload(data)?;
        Ok(())
    }

    /// Adds pages without contents here: PE_PARENT (unchanged since the parent image) or
    /// PE_LAZY (served later by a page server).
    pub fn add_hole(
        &mut self,
        vaddr: u64,
        nr_pages: u64,
        flags: PageFlags,
    ) -> Result<(), PagesError> {
        check_hole(flags).map_err(|reason| {
            self.rejected(vaddr, nr_pages.saturating_mul(PAGE_SIZE), flags, reason)
        })?;
        self.add_range(vaddr, nr_pages, flags)
    }

    /// Writes the last entry, flushes both images and returns them with the counts.
    pub fn finish(mut self) -> Result<(W, P, PagemapStats), PagesError> {
        self.flush_pending()?;
        let pages = self.pages.finish()?;
        let pagemap = self.pagemap.finish()?;
        Ok((pagemap, pages, self.stats))
    }

    pub fn stats(&self) -> PagemapStats {
        self.stats
    }

    fn add_range(&mut self, vaddr: u64, nr_pages: u64, flags: PageFlags) -> Result<(), PagesError> {
        let accepted = self.order.accept(vaddr, nr_pages);
        accepted.map_err(|reason| {
            self.rejected(vaddr, nr_pages.saturating_mul(PAGE_SIZE), flags, reason)
        })?;
        if flags.contains(PageFlags::PRESENT) {
            self.stats.pages_present += nr_pages;
        }
        if flags.contains(PageFlags::PARENT) {
            self.stats.pages_parent += nr_pages;
        }
        if flags.contains(PageFlags::LAZY) {
            self.stats.pages_lazy += nr_pages;
        }
        match self.pending.as_mut() {
            Some(p) if p.flags == flags && p.end() == vaddr => p.nr_pages += nr_pages,
            _ => {
                self.flush_pending()?;
                self.pending = Some(PageRange {
                    vaddr,
                    nr_pages,
                    flags,
                });
            }
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), PagesError> {
        if let Some(range) = self.pending.take() {
            for entry in range.to_entries() {
                self.pagemap.write_entry(&entry)?;
                self.stats.entries += 1;
            }
        }
        Ok(())
    }

    fn rejected(&self, vaddr: u64, len: u64, flags: PageFlags, reason: &'static str) -> PagesError {
        PagesError::BadRange {
            image: self.pagemap.name().to_owned(),
            vaddr,
            len,
            flags: flags.bits(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_go_up_page_aligned_and_non_empty() {
        let mut order = RangeOrder::default();
        assert_eq!(order.accept(0x2000, 2), Ok(()));
        assert_eq!(order.accept(0x4000, 1), Ok(()));
        assert!(order.accept(0x3000, 1).is_err(), "below the last end");
        assert!(order.accept(0x5001, 1).is_err(), "unaligned");
        assert!(order.accept(0x6000, 0).is_err(), "empty");
        assert!(order.accept(!0xfff, 2).is_err(), "past the address space");
        assert_eq!(order.accept(0x5000, 1), Ok(()));
    }

    #[test]
    fn data_is_present_whole_pages_and_holes_are_not_present() {
        assert_eq!(data_pages(PageFlags::PRESENT, 3 * PAGE_SIZE), Ok(3));
        assert_eq!(data_pages(PageFlags::PRESENT | PageFlags::LAZY, 0), Ok(0));
        assert!(data_pages(PageFlags::LAZY, PAGE_SIZE).is_err());
        assert!(data_pages(PageFlags::PRESENT, PAGE_SIZE + 1).is_err());
        assert_eq!(check_hole(PageFlags::PARENT | PageFlags::LAZY), Ok(()));
        assert!(check_hole(PageFlags::PRESENT).is_err());
    }

    fn writer() -> PagemapWriter<Vec<u8>, Vec<u8>> {
        let pm = ImageWriter::new(Vec::new(), ImageKind::Pagemap, "pagemap-1.img").unwrap();
        let pages = ImageWriter::new(Vec::new(), ImageKind::Pages, "pages-1.img").unwrap();
        PagemapWriter::new(pm, pages, 1).unwrap()
    }

    fn read_back(bytes: &[u8]) -> Pagemap {
        let mut r = ImageReader::new(bytes, ImageKind::Pagemap, "pagemap-1.img", None).unwrap();
        Pagemap::read(&mut r).unwrap()
    }

    #[test]
    fn adjacent_runs_coalesce() {
        let mut w = writer();
        let page = vec![7u8; PAGE_SIZE as usize];
        w.add_present(0x1000, &page).unwrap();
        w.add_present(0x2000, &page).unwrap();
        w.add_hole(0x3000, 2, PageFlags::PARENT).unwrap();
        w.add_hole(0x5000, 1, PageFlags::PARENT).unwrap();
        w.add_present(0x7000, &page).unwrap();
        w.add_with_data(0x8000, PageFlags::PRESENT | PageFlags::LAZY, &page)
            .unwrap();
        let (pm, pages, stats) = w.finish().unwrap();
        assert_eq!(pages.len(), 4 * PAGE_SIZE as usize);
        assert_eq!(stats.entries, 4);
        assert_eq!(
            (stats.pages_present, stats.pages_parent, stats.pages_lazy),
            (4, 3, 1)
        );
        let map = read_back(&pm);
        assert_eq!(map.pages_id, 1);
        let got: Vec<_> = map
            .ranges
            .iter()
            .map(|r| (r.vaddr, r.nr_pages, r.flags.bits()))
            .collect();
        assert_eq!(
            got,
            [
                (0x1000, 2, 4),
                (0x3000, 3, 1),
                (0x7000, 1, 4),
                (0x8000, 1, 6)
            ]
        );
    }

    #[test]
    fn both_counts_are_written_and_the_new_one_wins() {
        let mut w = writer();
        w.add_hole(0x10000, 5, PageFlags::LAZY).unwrap();
        let (pm, _, _) = w.finish().unwrap();
        let mut r = ImageReader::new(pm.as_slice(), ImageKind::Pagemap, "p", None).unwrap();
        let _: PagemapHead = r.read_entry().unwrap().unwrap();
        let e: PagemapEntry = r.read_entry().unwrap().unwrap();
        assert_eq!(
            (e.compat_nr_pages, e.nr_pages, e.in_parent),
            (5, Some(5), None)
        );

        let old = PagemapEntry {
            vaddr: 0x1000,
            compat_nr_pages: 3,
            in_parent: Some(true),
            flags: None,
            nr_pages: None,
        };
        let r = PageRange::from_entry(&old, "p", 1).unwrap();
        assert_eq!((r.nr_pages, r.flags), (3, PageFlags::PARENT));
        let old = PagemapEntry {
            in_parent: None,
            ..old
        };
        assert_eq!(
            PageRange::from_entry(&old, "p", 1).unwrap().flags,
            PageFlags::PRESENT
        );
        let new = PagemapEntry {
            nr_pages: Some(1 << 33),
            compat_nr_pages: 0,
            flags: Some(4),
            ..old
        };
        assert_eq!(
            PageRange::from_entry(&new, "p", 1).unwrap().nr_pages,
            1 << 33
        );
    }

    #[test]
    fn huge_ranges_split_for_old_readers() {
        let r = PageRange {
            vaddr: 0,
            nr_pages: u64::from(u32::MAX) + 2,
            flags: PageFlags::PARENT,
        };
        let entries: Vec<_> = r.to_entries().collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].compat_nr_pages, u32::MAX);
        assert_eq!(entries[1].vaddr, u64::from(u32::MAX) * PAGE_SIZE);
        assert_eq!(entries[1].nr_pages, Some(2));
    }

    #[test]
    fn bad_input_is_rejected() {
        let mut w = writer();
        assert!(w.add_present(0x1001, &[0; 4096]).is_err());
        assert!(w.add_present(0x1000, &[0; 100]).is_err());
        assert!(w.add_hole(0x1000, 1, PageFlags::PRESENT).is_err());
        assert!(w.add_hole(0x1000, 0, PageFlags::PARENT).is_err());
        w.add_hole(0x5000, 1, PageFlags::PARENT).unwrap();
        assert!(w.add_hole(0x4000, 1, PageFlags::PARENT).is_err());
        assert!(w.add_hole(!0xfff, 2, PageFlags::PARENT).is_err());

        let mut pm = ImageWriter::new(Vec::new(), ImageKind::Pagemap, "p").unwrap();
        pm.write_entry(&PagemapHead { pages_id: 1 }).unwrap();
        for vaddr in [0x2000u64, 0x1000] {
            pm.write_entry(&PagemapEntry {
                vaddr,
                compat_nr_pages: 1,
                in_parent: None,
                flags: Some(4),
                nr_pages: Some(1),
            })
            .unwrap();
        }
        let bytes = pm.finish().unwrap();
        let mut r = ImageReader::new(bytes.as_slice(), ImageKind::Pagemap, "p", None).unwrap();
        assert!(matches!(
            Pagemap::read(&mut r),
            Err(PagesError::BadEntry { index: 2, .. })
        ));
    }

    #[test]
    fn find_locates_pages() {
        let map = Pagemap {
            pages_id: 1,
            ranges: vec![
                PageRange {
                    vaddr: 0x1000,
                    nr_pages: 2,
                    flags: PageFlags::PRESENT,
                },
                PageRange {
                    vaddr: 0x5000,
                    nr_pages: 1,
                    flags: PageFlags::PRESENT,
                },
            ],
        };
        assert_eq!(map.find(0x0fff), None);
        assert_eq!(map.find(0x1000), Some(0));
        assert_eq!(map.find(0x2fff), Some(0));
        assert_eq!(map.find(0x3000), None);
        assert_eq!(map.find(0x5000), Some(1));
        assert_eq!(map.find(0x6000), None);
    }
}
