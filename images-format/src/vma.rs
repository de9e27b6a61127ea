//! The `vma_entry.status` bits (CRIU's `VMA_AREA_*`, `VMA_FILE_*`, `VMA_ANON_*`): what kind
//! of mapping a VMA is, as the dumper classified it.
//!
//! ```text
//! bit  0 REGULAR      1 STACK       2 VSYSCALL   3 VDSO        5 HEAP
//! bit  6 FILE_PRIVATE 7 FILE_SHARED 8 ANON_SHARED 9 ANON_PRIVATE
//! bit 10 SYSVIPC     11 SOCKET     12 VVAR      13 AIORING    14 MEMFD
//! bit 15 SHSTK       16 GUARD      17 UPROBES   18 NOT_ACCOUNTABLE
//! bit 27 EXT_PLUGIN  28 CLOSE      29 NO_PROT_WRITE 30 PREMMAPED 31 UNSUPP
//! ```
//!
//! and the `vma_entry.flags` bits: the `MAP_*` flags of mmap(2) the mapping was made with,
//! with x86-64's values, so that dump and restore agree on them without the C library.

bitflags::bitflags! {
    /// `vma_entry.status`. Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct VmaStatus: u32 {
        /// A mapping we can dump and restore (unset for `[vsyscall]` and unsupported ones).
        const REGULAR = 1 << 0;
        const STACK = 1 << 1;
        const VSYSCALL = 1 << 2;
        const VDSO = 1 << 3;
        const HEAP = 1 << 5;
        const FILE_PRIVATE = 1 << 6;
        const FILE_SHARED = 1 << 7;
        const ANON_SHARED = 1 << 8;
        const ANON_PRIVATE = 1 << 9;
        const SYSVIPC = 1 << 10;
        const SOCKET = 1 << 11;
        const VVAR = 1 << 12;
        const AIORING = 1 << 13;
        const MEMFD = 1 << 14;
        /// A shadow stack.
        const SHSTK = 1 << 15;
        /// Not a kernel VMA: a range covered by MADV_GUARD_INSTALL guards.
        const GUARD = 1 << 16;
        /// The kernel's `[uprobes]` mapping; its contents are not saved.
        const UPROBES = 1 << 17;
        /// The kernel did not account the mapping's memory (no `ac` in smaps' `VmFlags`):
        /// a private writable one was made with MAP_NORESERVE.
        const NOT_ACCOUNTABLE = 1 << 18;
        const EXT_PLUGIN = 1 << 27;
        // Bits 28-31 are used by CRIU only while it runs; they appear in images only by
        // accident, but are named so that printers can show them.
        const CLOSE = 1 << 28;
        const NO_PROT_WRITE = 1 << 29;
        const PREMMAPED = 1 << 30;
        const UNSUPP = 1 << 31;
        const _ = !0;
    }
}

impl VmaStatus {
    /// A mapping of a file, private or shared.
    pub fn maps_file(self) -> bool {
        self.intersects(Self::FILE_PRIVATE | Self::FILE_SHARED)
    }

    /// Anonymous memory, private or shared.
    pub fn is_anon(self) -> bool {
        self.intersects(Self::ANON_PRIVATE | Self::ANON_SHARED)
    }
}

bitflags::bitflags! {
    /// `vma_entry.flags`: mmap(2)'s `MAP_*` flags (x86-64 values). Unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MapFlags: u32 {
        const SHARED = 0x01;
        const PRIVATE = 0x02;
        const DROPPABLE = 0x08;
        const FIXED = 0x10;
        const ANONYMOUS = 0x20;
        const GROWSDOWN = 0x100;
        const LOCKED = 0x2000;
        const NORESERVE = 0x4000;
        const HUGETLB = 0x4_0000;
        const _ = !0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bits_are_kept() {
        let s = VmaStatus::from_bits_retain(0x10_0201);
        assert!(s.contains(VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE));
        assert_eq!(s.bits(), 0x10_0201);
    }

    #[test]
    fn kinds_of_mapping() {
        assert!((VmaStatus::REGULAR | VmaStatus::FILE_SHARED).maps_file());
        assert!(!(VmaStatus::REGULAR | VmaStatus::FILE_SHARED).is_anon());
        assert!((VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE).is_anon());
        assert!(!VmaStatus::VVAR.maps_file() && !VmaStatus::VVAR.is_anon());
    }

    #[test]
    fn map_flags_are_the_kernel_values() {
        let all = MapFlags::SHARED
            | MapFlags::PRIVATE
            | MapFlags::DROPPABLE
            | MapFlags::FIXED
            | MapFlags::ANONYMOUS
            | MapFlags::GROWSDOWN
            | MapFlags::LOCKED
            | MapFlags::NORESERVE
            | MapFlags::HUGETLB;
        assert_eq!(all.bits(), 0x4_613b);
    }
}
