//! The pages of one address space that are still missing, and where each comes from in
//! the image.
//!
//! A restored process may `mremap` memory before its pages arrive: the page now at
//! address `a` is then the image's page at another address. Each run keeps both: `[start,
//! end)` in the live address space, and `image`, the image address of `start`.

use std::collections::BTreeMap;

use images_format::PAGE_SIZE;

/// A run of missing pages: `[start, end)` now, whose contents are the image's pages from
/// `image` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingRun {
    pub start: u64,
    pub end: u64,
    pub image: u64,
}

impl MissingRun {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The image address of the live address `addr` (inside the run).
    pub fn image_of(&self, addr: u64) -> u64 {
        self.image + (addr - self.start)
    }
}

/// Disjoint runs of missing pages, by live start address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MissingPages {
    runs: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
}

impl MissingPages {
    pub fn new() -> MissingPages {
        MissingPages::default()
    }

    /// Adds `[start, end)`, still at its image address. Overlaps replace what was there.
    pub fn insert(&mut self, start: u64, end: u64, image: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        self.runs.insert(start, (end, image));
        self.bytes += end - start;
    }

    /// Bytes still missing.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The run containing `addr`.
    pub fn find(&self, addr: u64) -> Option<MissingRun> {
        let (&start, &(end, image)) = self.runs.range(..=addr).next_back()?;
        (addr < end).then_some(MissingRun { start, end, image })
    }

    /// The first run that ends after `addr`, or the first of all if none does.
    pub fn next_from(&self, addr: u64) -> Option<MissingRun> {
        let after = self.find(addr).or_else(|| {
            self.runs
                .range(addr..)
                .next()
                .map(|(&start, &(end, image))| MissingRun { start, end, image })
        });
        after.or_else(|| {
            self.runs
                .iter()
                .next()
                .map(|(&start, &(end, image))| MissingRun { start, end, image })
        })
    }

    /// Forgets `[start, end)`: filled, unmapped or dropped by the process.
    pub fn remove(&mut self, start: u64, end: u64) {
        for run in self.take(start, end) {
            self.bytes -= run.len();
        }
    }

    /// `mremap` moved `[from, from + len)` to `to`: the runs there move with it (the
    /// destination's old contents were unmapped by the kernel).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let (Some(from_end), Some(to_end)) = (from.checked_add(len), to.checked_add(len)) else {
            return;
        };
        let moved = self.take(from, from_end);
        for run in &moved {
            self.bytes -= run.len();
        }
        self.remove(to, to_end);
        for run in moved {
            let start = to + (run.start - from);
            self.insert(start, start + run.len(), run.image);
        }
    }

    /// Removes the parts of runs inside `[start, end)` and returns them, clipped.
    fn take(&mut self, start: u64, end: u64) -> Vec<MissingRun> {
        if start >= end {
            return Vec::new();
        }
        let first = self
            .runs
            .range(..=start)
            .next_back()
            .filter(|(_, &(e, _))| e > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let keys: Vec<u64> = self.runs.range(first..end).map(|(&s, _)| s).collect();
        let mut taken = Vec::new();
        for key in keys {
            let Some((run_end, image)) = self.runs.remove(&key) else {
                continue;
            };
            let run = MissingRun {
                start: key,
                end: run_end,
                image,
            };
            if run.start < start {
                self.runs.insert(run.start, (start, run.image));
            }
            if run.end > end {
                self.runs.insert(end, (run.end, run.image_of(end)));
            }
            let cut_start = run.start.max(start);
            let cut_end = run.end.min(end);
            taken.push(MissingRun {
                start: cut_start,
                end: cut_end,
                image: run.image_of(cut_start),
            });
        }
        taken
    }
}

/// The page containing `addr`.
pub fn page_of(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn runs(m: &MissingPages) -> Vec<(u64, u64, u64)> {
        m.runs.iter().map(|(&s, &(e, i))| (s, e, i)).collect()
    }

    #[test]
    fn remove_splits_runs() {
        let mut m = MissingPages::new();
        m.insert(0x10000, 0x20000, 0x10000);
        m.remove(0x12000, 0x13000);
        assert_eq!(
            runs(&m),
            [(0x10000, 0x12000, 0x10000), (0x13000, 0x20000, 0x13000)]
        );
        assert_eq!(m.bytes(), 0x10000 - P);
        assert_eq!(m.find(0x12800), None);
        assert_eq!(m.find(0x13000).map(|r| r.start), Some(0x13000));
        m.remove(0, u64::MAX);
        assert!(m.is_empty());
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn remap_keeps_image_addresses() {
        let mut m = MissingPages::new();
        m.insert(0x10000, 0x14000, 0x10000);
        m.insert(0x50000, 0x52000, 0x50000);
        // Move the middle two pages over the second run.
        m.remap(0x11000, 0x50000, 2 * P);
        assert_eq!(
            runs(&m),
            [
                (0x10000, 0x11000, 0x10000),
                (0x13000, 0x14000, 0x13000),
                (0x50000, 0x52000, 0x11000),
            ]
        );
        assert_eq!(m.bytes(), 4 * P);
        let run = m.find(0x51000).expect("moved run");
        assert_eq!(run.image_of(0x51000), 0x12000);
    }

    #[test]
    fn next_from_wraps_around() {
        let mut m = MissingPages::new();
        m.insert(0x10000, 0x11000, 0x10000);
        m.insert(0x30000, 0x32000, 0x30000);
        assert_eq!(m.next_from(0x31000).map(|r| r.start), Some(0x30000));
        assert_eq!(m.next_from(0x20000).map(|r| r.start), Some(0x30000));
        assert_eq!(m.next_from(0x40000).map(|r| r.start), Some(0x10000));
        assert_eq!(MissingPages::new().next_from(0), None);
    }
}
