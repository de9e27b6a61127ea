//! Page-content hashes: every present page is hashed each round (64-bit
//! xxh3) and compared with the previous round. Works on any kernel; costs a
//! read of all present memory per round, and needs the target frozen from
//! the collect until the pages are read (a write after hashing but before
//! the read would otherwise be missed).

use super::{DirtyError, VmaKey};
use crate::ids::{Pid, RemoteAddr};
use crate::memory::RemoteMem;
use crate::pagemap_scan::{entry, PageCategories, PageRegion, Pagemap, PagemapError, ScanRequest};
use crate::PAGE_SIZE;
use rustix::io::Errno;

/// The hash kept for a page that is absent.
const ABSENT: u64 = 0;
/// Bytes read per call.
const CHUNK: usize = 1 << 20;

fn page_hash(page: &[u8]) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(page) {
        // ABSENT is reserved; a real page hashing to it is moved aside.
        ABSENT => 1,
        h => h,
    }
}

#[derive(Debug)]
pub(crate) struct PageHash {
    pid: Pid,
    pagemap: Pagemap,
    mem: RemoteMem,
    buf: Vec<u8>,
    zero: u64,
}

impl PageHash {
    pub(crate) fn open(pid: Pid) -> Result<PageHash, DirtyError> {
        let pagemap = Pagemap::open(pid).map_err(|source| DirtyError::Pagemap { pid, source })?;
        let mem = RemoteMem::open_read(pid).map_err(|source| DirtyError::Memory { pid, source })?;
        Ok(PageHash {
            pid,
            pagemap,
            mem,
            buf: vec![0; CHUNK],
            zero: page_hash(&[0u8; PAGE_SIZE as usize]),
        })
    }

    /// One hash per page of the VMA (`ABSENT` where no page exists). For
    /// anonymous memory an absent page reads as zeroes, so a page of zeroes
    /// counts as absent: reading a hole in (the zero page) is no write.
    /// `None` if the VMA can no longer be read (it changed).
    pub(crate) fn hash(&mut self, key: &VmaKey) -> Result<Option<Vec<u64>>, DirtyError> {
        let pid = self.pid;
        let mut hashes = vec![ABSENT; usize::try_from(key.pages()).unwrap_or(0)];
        let present = match self.pagemap.scan(&ScanRequest::present(key.start, key.end)) {
            Ok(regions) => regions,
            // Kernels before 6.7 have no PAGEMAP_SCAN: read the entries.
            Err(PagemapError::Scan {
                errno: Errno::NOTTY | Errno::INVAL,
                ..
            }) => self.present_from_entries(key)?,
            Err(source) => return Err(DirtyError::Pagemap { pid, source }),
        };
        let anon = key.inode == 0;
        for region in present {
            if region.categories.contains(PageCategories::GUARD) {
                continue;
            }
            let mut addr = region.start.get();
            while addr < region.end.get() {
                let len = usize::try_from(region.end.get() - addr)
                    .unwrap_or(CHUNK)
                    .min(CHUNK);
                let buf = &mut self.buf[..len];
                if self.mem.read_at(RemoteAddr(addr), buf).is_err() {
                    return Ok(None);
                }
                for (i, page) in buf.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let index = (addr - key.start.get()) / PAGE_SIZE + i as u64;
                    let h = page_hash(page);
                    let h = if anon && h == self.zero { ABSENT } else { h };
                    if let Some(slot) = usize::try_from(index).ok().and_then(|i| hashes.get_mut(i))
                    {
                        *slot = h;
                    }
                }
                addr += len as u64;
            }
        }
        Ok(Some(hashes))
    }
}

impl PageHash {
    /// Present (or swapped, not guard) pages from the raw pagemap entries.
    fn present_from_entries(&self, key: &VmaKey) -> Result<Vec<PageRegion>, DirtyError> {
        let pages = usize::try_from(key.pages()).unwrap_or(0);
        let entries = self
            .pagemap
            .read_entries(key.start, pages)
            .map_err(|source| DirtyError::Pagemap {
                pid: self.pid,
                source,
            })?;
        Ok(present_regions(key.start, &entries))
    }
}

fn present_regions(start: RemoteAddr, entries: &[u64]) -> Vec<PageRegion> {
    let mut out: Vec<PageRegion> = Vec::new();
    for (i, &e) in entries.iter().enumerate() {
        if e & (entry::PRESENT | entry::SWAPPED) == 0 || e & entry::GUARD != 0 {
            continue;
        }
        let addr = start.get() + i as u64 * PAGE_SIZE;
        match out.last_mut() {
            Some(prev) if prev.end.get() == addr => prev.end = RemoteAddr(addr + PAGE_SIZE),
            _ => out.push(PageRegion {
                start: RemoteAddr(addr),
                end: RemoteAddr(addr + PAGE_SIZE),
                categories: PageCategories::PRESENT,
            }),
        }
    }
    out
}

/// The pages whose hash changed, as regions: `PRESENT` where a page exists
/// now, none where it went away.
pub(crate) fn changed(start: RemoteAddr, old: &[u64], new: &[u64]) -> Vec<PageRegion> {
    let mut out: Vec<PageRegion> = Vec::new();
    for (i, (&o, &n)) in old.iter().zip(new).enumerate() {
        if o == n {
            continue;
        }
        let addr = start.get() + i as u64 * PAGE_SIZE;
        let mut categories = PageCategories::WRITTEN;
        if n != ABSENT {
            categories |= PageCategories::PRESENT;
        }
        match out.last_mut() {
            Some(prev) if prev.end.get() == addr && prev.categories == categories => {
                prev.end = RemoteAddr(addr + PAGE_SIZE);
            }
            _ => out.push(PageRegion {
                start: RemoteAddr(addr),
                end: RemoteAddr(addr + PAGE_SIZE),
                categories,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_pages_split_by_presence() {
        let old = [5, 5, 0, 7, 7, 9];
        let new = [5, 6, 3, 0, 7, 8];
        let r = changed(RemoteAddr(0x1000), &old, &new);
        let got: Vec<(u64, u64, bool)> = r
            .iter()
            .map(|x| {
                (
                    x.start.get(),
                    x.end.get(),
                    x.categories.contains(PageCategories::PRESENT),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0x2000, 0x4000, true),
                (0x4000, 0x5000, false),
                (0x6000, 0x7000, true)
            ]
        );
    }

    #[test]
    fn entries_give_present_regions() {
        let p = entry::PRESENT;
        let r = present_regions(
            RemoteAddr(0x1000),
            &[p, p, 0, entry::SWAPPED, entry::SWAPPED | entry::GUARD, p],
        );
        let got: Vec<(u64, u64)> = r.iter().map(|x| (x.start.get(), x.end.get())).collect();
        assert_eq!(
            got,
            vec![(0x1000, 0x3000), (0x4000, 0x5000), (0x6000, 0x7000)]
        );
    }

    #[test]
    fn no_page_hashes_to_absent() {
        assert_ne!(page_hash(&[0u8; 4096]), ABSENT);
        assert_ne!(page_hash(&[1u8; 4096]), page_hash(&[2u8; 4096]));
    }
}
