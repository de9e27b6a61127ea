//! Soft-dirty bits: pagemap bit 55 set by the first write after `4` was
//! written to `/proc/PID/clear_refs`. Needs `CONFIG_MEM_SOFT_DIRTY`, and the
//! target frozen from the read of the bits to the clear (a write in between
//! would be cleared unseen).
//!
//! References: [Documentation/admin-guide/mm/soft-dirty.rst](https://docs.kernel.org/admin-guide/mm/soft-dirty.html).

use super::{DirtyError, VmaKey};
use crate::ids::{Pid, RemoteAddr};
use crate::pagemap_scan::{entry, PageCategories, PageRegion, Pagemap};
use crate::PAGE_SIZE;

/// Whether this kernel keeps soft-dirty bits: a page we just wrote is
/// soft-dirty there (new anonymous pages are), and never elsewhere.
pub fn soft_dirty_available() -> bool {
    let Ok(me) = Pid::try_from(std::process::id()) else {
        return false;
    };
    let Ok(pm) = Pagemap::open(me) else {
        return false;
    };
    let mut page = vec![0u8; 2 * PAGE_SIZE as usize];
    let base = (page.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let Ok(off) = usize::try_from(base - page.as_ptr() as u64) else {
        return false;
    };
    page[off] = 1;
    let bit = pm
        .read_entries(RemoteAddr(base), 1)
        .ok()
        .and_then(|e| e.first().copied())
        .is_some_and(|e| e & entry::SOFT_DIRTY != 0);
    std::hint::black_box(&page);
    bit
}

/// The soft-dirty pages among raw pagemap `entries` of consecutive pages
/// from `start`, as regions (merged where adjacent with equal presence);
/// `PRESENT` is set where the page is present or swapped.
pub fn soft_dirty_regions(start: RemoteAddr, entries: &[u64]) -> Vec<PageRegion> {
    let mut out: Vec<PageRegion> = Vec::new();
    let mut addr = start.get();
    for &e in entries {
        let next = addr.saturating_add(PAGE_SIZE);
        if e & entry::SOFT_DIRTY != 0 {
            let mut categories = PageCategories::WRITTEN;
            if e & (entry::PRESENT | entry::SWAPPED) != 0 && e & entry::GUARD == 0 {
                categories |= PageCategories::PRESENT;
            }
            match out.last_mut() {
                Some(prev) if prev.end.get() == addr && prev.categories == categories => {
                    prev.end = RemoteAddr(next);
                }
                _ => out.push(PageRegion {
                    start: RemoteAddr(addr),
                    end: RemoteAddr(next),
                    categories,
                }),
            }
        }
        addr = next;
    }
    out
}

#[derive(Debug)]
pub(crate) struct SoftDirty {
    pid: Pid,
    pagemap: Pagemap,
}

impl SoftDirty {
    pub(crate) fn open(pid: Pid) -> Result<SoftDirty, DirtyError> {
        let pagemap = Pagemap::open(pid).map_err(|source| DirtyError::Pagemap { pid, source })?;
        Ok(SoftDirty { pid, pagemap })
    }

    /// Written pages of the VMA since the last [`SoftDirty::clear`].
    pub(crate) fn scan(&mut self, key: &VmaKey) -> Result<Vec<PageRegion>, DirtyError> {
        let pages = usize::try_from(key.pages()).unwrap_or(0);
        let entries = self
            .pagemap
            .read_entries(key.start, pages)
            .map_err(|source| DirtyError::Pagemap {
                pid: self.pid,
                source,
            })?;
        Ok(soft_dirty_regions(key.start, &entries))
    }

    /// Clears every soft-dirty bit of the process (the end of a round).
    pub(crate) fn clear(&mut self) -> Result<(), DirtyError> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), b"4").map_err(|source| {
            DirtyError::ClearRefs {
                pid: self.pid,
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_dirty_entries_become_regions() {
        let sd = entry::SOFT_DIRTY;
        let p = entry::PRESENT;
        let entries = [
            0,
            sd | p,
            sd | p,
            sd,
            sd | entry::SWAPPED,
            p,
            sd | entry::SWAPPED | entry::GUARD,
        ];
        let r = soft_dirty_regions(RemoteAddr(0x10000), &entries);
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
                (0x11000, 0x13000, true),
                (0x13000, 0x14000, false),
                (0x14000, 0x15000, true),
                (0x16000, 0x17000, false),
            ]
        );
        assert!(soft_dirty_regions(RemoteAddr(0), &[p, 0, p]).is_empty());
    }

    #[test]
    fn detection_matches_the_kernel_config() {
        // This machine's kernel is built without CONFIG_MEM_SOFT_DIRTY; where
        // /proc/config.gz says otherwise the probe must agree.
        let config = std::process::Command::new("sh")
            .args([
                "-c",
                "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r) 2>/dev/null",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !config.contains("CONFIG_MEM_SOFT_DIRTY") {
            eprintln!("skipped: no kernel config to compare with");
            return;
        }
        let configured = config.contains("CONFIG_MEM_SOFT_DIRTY=y");
        assert_eq!(soft_dirty_available(), configured);
    }
}
