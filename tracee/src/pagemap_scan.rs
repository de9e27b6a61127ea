//! Which pages of another process exist, are written or swapped: the
//! `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` (Linux 6.7+), which answers
//! in ranges, and a fallback that reads the 8-byte pagemap entries.
//!
//! References: [Documentation/admin-guide/mm/pagemap.rst](https://docs.kernel.org/admin-guide/mm/pagemap.html).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::ids::{Pid, RemoteAddr};
use crate::wait::last_errno;
use crate::PAGE_SIZE;
use rustix::io::Errno;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
/// Regions per ioctl call.
const VEC_LEN: usize = 4096;
/// The first walk's buffer, in entries (see [`Pagemap::scan`]).
const FIRST_VEC_LEN: usize = 128;

bitflags::bitflags! {
    /// `PAGE_IS_*` page categories.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageCategories: u64 {
        /// Write protection can be tracked (uffd-wp async registered).
        const WPALLOWED = 1 << 0;
        /// Written since write protection was last applied.
        const WRITTEN = 1 << 1;
        /// File-backed (or shared anonymous) page.
        const FILE = 1 << 2;
        /// Present in memory.
        const PRESENT = 1 << 3;
        /// Swapped out.
        const SWAPPED = 1 << 4;
        /// The shared zero page.
        const PFNZERO = 1 << 5;
        /// Part of a huge page.
        const HUGE = 1 << 6;
        /// Soft-dirty (always clear where `CONFIG_MEM_SOFT_DIRTY` is off).
        const SOFT_DIRTY = 1 << 7;
        /// A guard region (`MADV_GUARD_INSTALL`).
        const GUARD = 1 << 8;
    }
}

bitflags::bitflags! {
    /// `PM_SCAN_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// Write-protect the matching pages while reporting them (uffd-wp async).
        const WP_MATCHING = 1 << 0;
        /// Fail with EPERM if a VMA in range is not registered for async WP.
        const CHECK_WPASYNC = 1 << 1;
    }
}

/// A range of pages sharing the same returned categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: RemoteAddr,
    /// One past the last byte.
    pub end: RemoteAddr,
    /// The categories (masked by the request's `return_mask`).
    pub categories: PageCategories,
}

impl PageRegion {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get()) / PAGE_SIZE
    }
}

/// One `PAGEMAP_SCAN` query. A page matches when
/// `((categories ^ inverted) & mask) == mask` and, if `anyof_mask` is set,
/// `(categories ^ inverted) & anyof_mask != 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    /// First address (page aligned).
    pub start: RemoteAddr,
    /// End address (page aligned, exclusive).
    pub end: RemoteAddr,
    /// `PM_SCAN_*` flags.
    pub flags: ScanFlags,
    /// Categories to invert before matching.
    pub inverted: PageCategories,
    /// Categories that must all be set.
    pub mask: PageCategories,
    /// Categories of which one must be set (empty: no condition).
    pub anyof_mask: PageCategories,
    /// Categories reported back in each region.
    pub return_mask: PageCategories,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
}

impl ScanRequest {
    /// Present or swapped pages in `[start, end)`, reporting all categories.
    pub fn present(start: RemoteAddr, end: RemoteAddr) -> ScanRequest {
        ScanRequest {
            start,
            end,
            flags: ScanFlags::empty(),
            inverted: PageCategories::empty(),
            mask: PageCategories::empty(),
            anyof_mask: PageCategories::PRESENT | PageCategories::SWAPPED,
            return_mask: PageCategories::all(),
            max_pages: 0,
        }
    }

    /// Pages written since their write protection (an async-WP userfaultfd's), left as
    /// they are: a look that the next [`ScanRequest::written_and_reprotect`] still sees.
    /// Outside a registered range every present page counts as written.
    pub fn written(start: RemoteAddr, end: RemoteAddr) -> ScanRequest {
        ScanRequest {
            start,
            end,
            flags: ScanFlags::empty(),
            inverted: PageCategories::empty(),
            mask: PageCategories::WRITTEN,
            anyof_mask: PageCategories::PRESENT | PageCategories::SWAPPED,
            return_mask: PageCategories::WRITTEN,
            max_pages: 0,
        }
    }

    /// Written pages, write-protected again as they are reported (one pre-copy
    /// round). Needs the range registered with an async-WP userfaultfd.
    pub fn written_and_reprotect(start: RemoteAddr, end: RemoteAddr) -> ScanRequest {
        ScanRequest {
            start,
            end,
            flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
            inverted: PageCategories::empty(),
            mask: PageCategories::WRITTEN,
            anyof_mask: PageCategories::empty(),
            return_mask: PageCategories::WRITTEN
                | PageCategories::PRESENT
                | PageCategories::SWAPPED,
            max_pages: 0,
        }
    }
}

/// A pagemap query failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PagemapError {
    /// Opening `/proc/PID/pagemap`.
    #[error("pid {pid}: open {}", path.display())]
    Open {
        pid: Pid,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The ioctl failed (ENOTTY/EINVAL: kernel without PAGEMAP_SCAN; EPERM with
    /// CHECK_WPASYNC: a VMA in range is not registered for async write-protect).
    #[error("pid {pid}: PAGEMAP_SCAN of {start}..{end}")]
    Scan {
        pid: Pid,
        start: RemoteAddr,
        end: RemoteAddr,
        #[source]
        errno: Errno,
    },
    /// Reading pagemap entries.
    #[error("pid {pid}: read pagemap entries at {addr}")]
    Read {
        pid: Pid,
        addr: RemoteAddr,
        #[source]
        source: std::io::Error,
    },
    /// Unaligned or inverted range.
    #[error("pid {pid}: bad range {start}..{end}")]
    Range {
        pid: Pid,
        start: RemoteAddr,
        end: RemoteAddr,
    },
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RawRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    pid: Pid,
    file: File,
}

/// Bits of a `/proc/PID/pagemap` entry.
pub mod entry {
    /// Page present in RAM.
    pub const PRESENT: u64 = 1 << 63;
    /// Page swapped out.
    pub const SWAPPED: u64 = 1 << 62;
    /// File page or shared anonymous page.
    pub const FILE: u64 = 1 << 61;
    /// Guard region.
    pub const GUARD: u64 = 1 << 58;
    /// uffd write-protected.
    pub const UFFD_WP: u64 = 1 << 57;
    /// Mapped exclusively.
    pub const EXCLUSIVE: u64 = 1 << 56;
    /// Soft-dirty.
    pub const SOFT_DIRTY: u64 = 1 << 55;
    /// The page frame number (bits 0-54; zero without CAP_SYS_ADMIN).
    pub const PFN_MASK: u64 = (1 << 55) - 1;
}

impl Pagemap {
    /// Opens `/proc/PID/pagemap`.
    pub fn open(pid: Pid) -> Result<Pagemap, PagemapError> {
        let path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let file = File::open(&path).map_err(|source| PagemapError::Open { pid, path, source })?;
        Ok(Pagemap { pid, file })
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Runs `req` to completion and returns the matching regions in address
    /// order, adjacent regions with equal categories merged.
    pub fn scan(&self, req: &ScanRequest) -> Result<Vec<PageRegion>, PagemapError> {
        let pid = self.pid;
        if !req.start.is_page_aligned() || !req.end.is_page_aligned() || req.end < req.start {
            return Err(PagemapError::Range {
                pid,
                start: req.start,
                end: req.end,
            });
        }
        let mut out: Vec<PageRegion> = Vec::new();
        // Small at first, doubled while the kernel fills it: most walks find a few runs,
        // and a fresh zeroed 96 KiB buffer per scan costs more in page faults (tens of
        // microseconds in a VM) than the walk itself.
        let mut buf = vec![RawRegion::default(); FIRST_VEC_LEN];
        let mut start = req.start.get();
        let mut pages_left = req.max_pages;
        while start < req.end.get() {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: req.flags.bits(),
                start,
                end: req.end.get(),
                walk_end: 0,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                max_pages: pages_left,
                category_inverted: req.inverted.bits(),
                category_mask: req.mask.bits(),
                category_anyof_mask: req.anyof_mask.bits(),
                return_mask: req.return_mask.bits(),
            };
            // SAFETY: `arg` is a live pm_scan_arg whose `vec` points at `buf`,
            // which has room for `vec_len` page_region entries and outlives the call.
            let ret = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN,
                    &mut arg as *mut PmScanArg,
                )
            };
            if ret < 0 {
                return Err(PagemapError::Scan {
                    pid,
                    start: RemoteAddr(start),
                    end: req.end,
                    errno: last_errno(),
                });
            }
            let n = usize::try_from(ret).unwrap_or(0).min(buf.len());
            let full = n == buf.len();
            let mut last_end = start;
            for r in &buf[..n] {
                let region = PageRegion {
                    start: RemoteAddr(r.start),
                    end: RemoteAddr(r.end),
                    categories: PageCategories::from_bits_retain(r.categories),
                };
                if req.max_pages != 0 {
                    pages_left = pages_left.saturating_sub(region.pages());
                }
                last_end = last_end.max(r.end);
                match out.last_mut() {
                    Some(prev)
                        if prev.end == region.start && prev.categories == region.categories =>
                    {
                        prev.end = region.end;
                    }
                    _ => out.push(region),
                }
            }
            // A short answer means the walk is done. `walk_end` is not reset by
            // the kernel after its internal buffer filled once, so it can lag
            // behind what was reported: never go back before the last region.
            if !full || (req.max_pages != 0 && pages_left == 0) {
                break;
            }
            let next = arg.walk_end.max(last_end);
            if next <= start {
                break;
            }
            start = next;
            if buf.len() < VEC_LEN {
                buf.resize((buf.len() * 2).min(VEC_LEN), RawRegion::default());
            }
        }
        Ok(out)
    }

    /// Reads the raw pagemap entries of `npages` pages from `start` (the
    /// fallback where `PAGEMAP_SCAN` is missing).
    pub fn read_entries(&self, start: RemoteAddr, npages: usize) -> Result<Vec<u64>, PagemapError> {
        let mut bytes = vec![0u8; npages.saturating_mul(8)];
        let off = (start.get() / PAGE_SIZE).saturating_mul(8);
        self.file
            .read_exact_at(&mut bytes, off)
            .map_err(|source| PagemapError::Read {
                pid: self.pid,
                addr: start,
                source,
            })?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_ne_bytes(b)
            })
            .collect())
    }
}

/// Opens the pagemap of `pid` and runs one scan.
pub fn scan(pid: Pid, req: &ScanRequest) -> Result<Vec<PageRegion>, PagemapError> {
    Pagemap::open(pid)?.scan(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_touched_pages() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        // A page-aligned buffer with pages 0 and 2 touched, 1 and 3 not.
        let mut v = vec![0u8; 8 * PAGE_SIZE as usize];
        let base = (v.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let off = usize::try_from(base - v.as_ptr() as u64).expect("fits");
        // Make sure the untouched pages are really absent.
        let pm = Pagemap::open(me).expect("open pagemap");
        v[off] = 1;
        v[off + 2 * PAGE_SIZE as usize] = 1;
        let regions = pm
            .scan(&ScanRequest::present(
                RemoteAddr(base),
                RemoteAddr(base + PAGE_SIZE),
            ))
            .expect("scan");
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].start, RemoteAddr(base));
        assert!(regions[0].categories.contains(PageCategories::PRESENT));
        let entries = pm.read_entries(RemoteAddr(base), 1).expect("entries");
        assert_ne!(entries[0] & entry::PRESENT, 0);
        std::hint::black_box(&v);
    }

    #[test]
    fn a_scan_with_more_runs_than_its_first_buffer_goes_on() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let runs = 4 * FIRST_VEC_LEN;
        let page = PAGE_SIZE as usize;
        let len = 2 * runs * page;
        // A mapping of our own, whose pages are absent until touched (a Vec's may be
        // memory our allocator touched before).
        // SAFETY: a new private anonymous mapping chosen by the kernel; nothing else uses
        // it, and it is unmapped below.
        let start = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap");
        // SAFETY: advice on the mapping made above (no huge pages, which would make the
        // untouched neighbours present); no memory is read or written.
        unsafe { rustix::mm::madvise(start, len, rustix::mm::Advice::LinuxNoHugepage) }
            .expect("madvise");
        let base = start as u64;
        // SAFETY: the mapping made above, `len` bytes, readable and writable, which
        // nothing else holds while this slice lives.
        let bytes = unsafe { std::slice::from_raw_parts_mut(start.cast::<u8>(), len) };
        for run in 0..runs {
            bytes[2 * run * page] = 1;
        }
        std::hint::black_box(&bytes);
        let regions = Pagemap::open(me)
            .expect("open pagemap")
            .scan(&ScanRequest::present(
                RemoteAddr(base),
                RemoteAddr(base + len as u64),
            ))
            .expect("scan");
        let starts: Vec<u64> = regions.iter().map(|r| r.start.get()).collect();
        let expected: Vec<u64> = (0..runs as u64).map(|r| base + 2 * r * PAGE_SIZE).collect();
        assert_eq!(starts, expected);
        // SAFETY: the mapping made above, no longer used.
        unsafe { rustix::mm::munmap(start, len) }.expect("munmap");
    }

    #[test]
    fn rejects_unaligned() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let r = scan(me, &ScanRequest::present(RemoteAddr(1), RemoteAddr(4096)));
        assert!(matches!(r, Err(PagemapError::Range { .. })));
    }
}
