//! The `vma_entry.status` bits (CRIU's `VMA_AREA_*`, `VMA_FILE_*`, `VMA_ANON_*`): what kind
//! of mapping a VMA is, as the dumper classified it.
//!
//! ```text
//! bit  0 REGULAR      1 STACK       2 VSYSCALL   3 VDSO        5 HEAP
//! bit  6 FILE_PRIVATE 7 FILE_SHARED 8 ANON_SHARED 9 ANON_PRIVATE
//! bit 10 SYSVIPC     11 SOCKET     12 VVAR      13 AIORING    14 MEMFD
//! bit 15 SHSTK       16 GUARD      17 UPROBES
//! bit 27 EXT_PLUGIN  28 CLOSE      29 NO_PROT_WRITE 30 PREMMAPED 31 UNSUPP
//! ```

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_bits_are_kept() {
        let s = VmaStatus::from_bits_retain(0x10_0201);
        assert!(s.contains(VmaStatus::REGULAR | VmaStatus::ANON_PRIVATE));
        assert_eq!(s.bits(), 0x10_0201);
    }
}
