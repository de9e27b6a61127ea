//! The x86 extended state (`XSAVE` area) of a thread and its layout.
//!
//! `PTRACE_GETREGSET` with `NT_X86_XSTATE` returns the standard (non-compacted)
//! layout: the 512-byte legacy `FXSAVE` region, the 64-byte xsave header, then
//! each enabled component at the offset CPUID leaf 0xD gives for it.

/// Offset of the software-reserved bytes in the legacy region; for ptrace the
/// kernel writes the user XCR0 into their first u64.
const SW_RESERVED_XCR0: usize = 464;
/// Offset of the xsave header (`xstate_bv`, then `xcomp_bv`).
const HEADER: usize = 512;
/// Size of the legacy `FXSAVE` region.
pub const FXSAVE_SIZE: usize = 512;

/// A thread's xsave area as the kernel gave it (its length is the kernel's
/// xstate size, 2688 bytes with AVX-512 and no PKU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xsave {
    bytes: Vec<u8>,
}

impl Xsave {
    /// Wraps raw xsave bytes, e.g. read back from an image.
    pub fn from_bytes(bytes: Vec<u8>) -> Xsave {
        Xsave { bytes }
    }

    /// The raw area.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Consumes the area into its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Length of the area in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the area is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The legacy `FXSAVE` region (x87 and SSE state): the first 512 bytes.
    pub fn fxsave(&self) -> &[u8] {
        &self.bytes[..self.bytes.len().min(FXSAVE_SIZE)]
    }

    /// The XCR0 the kernel recorded in the software-reserved bytes.
    pub fn xcr0(&self) -> Option<u64> {
        read_u64(&self.bytes, SW_RESERVED_XCR0)
    }

    /// The header's `xstate_bv`: which components hold non-initial state.
    pub fn xstate_bv(&self) -> Option<u64> {
        read_u64(&self.bytes, HEADER)
    }

    /// The layout of this area on this CPU, from the XCR0 it records.
    pub fn layout(&self) -> Option<XsaveLayout> {
        self.xcr0().map(XsaveLayout::for_xcr0)
    }

    /// The bytes of component `index` under `layout`, if the area holds them.
    pub fn component<'a>(&'a self, layout: &XsaveLayout, index: u32) -> Option<&'a [u8]> {
        let c = layout.components.iter().find(|c| c.index == index)?;
        let start = usize::try_from(c.offset).ok()?;
        let end = start.checked_add(usize::try_from(c.size).ok()?)?;
        self.bytes.get(start..end)
    }
}

fn read_u64(bytes: &[u8], off: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Where one xsave component lives in the standard layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XsaveComponent {
    /// Component (XCR0 bit) number: 0 x87, 1 SSE, 2 AVX, 5-7 AVX-512, 9 PKRU...
    pub index: u32,
    /// Byte offset in the area.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// The xsave layout of a CPU for a given XCR0, from CPUID leaf 0xD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsaveLayout {
    /// The enabled user state components.
    pub xcr0: u64,
    /// Components in index order, legacy ones (0, 1) included.
    pub components: Vec<XsaveComponent>,
    /// Size of the area for this XCR0 (end of the last component).
    pub size: u32,
}

impl XsaveLayout {
    /// The layout this CPU uses for the components in `xcr0` (CPUID leaf 0xD,
    /// sub-leaf `i` gives size in eax and offset in ebx for component `i >= 2`).
    pub fn for_xcr0(xcr0: u64) -> XsaveLayout {
        let mut components = Vec::new();
        if xcr0 & 1 != 0 {
            components.push(XsaveComponent {
                index: 0,
                offset: 0,
                size: 160,
            });
        }
        if xcr0 & 2 != 0 {
            components.push(XsaveComponent {
                index: 1,
                offset: 160,
                size: 256,
            });
        }
        let mut size = 576u32;
        for index in 2..63u32 {
            if xcr0 & (1u64 << index) == 0 {
                continue;
            }
            let leaf = std::arch::x86_64::__cpuid_count(0xd, index);
            if leaf.eax == 0 {
                continue;
            }
            size = size.max(leaf.ebx.saturating_add(leaf.eax));
            components.push(XsaveComponent {
                index,
                offset: leaf.ebx,
                size: leaf.eax,
            });
        }
        XsaveLayout {
            xcr0,
            components,
            size,
        }
    }

    /// The user state components this CPU supports (CPUID 0xD.0 edx:eax).
    /// The kernel may enable fewer; the XCR0 in a thread's [`Xsave`] is exact.
    pub fn cpu_supported_mask() -> u64 {
        let leaf = std::arch::x86_64::__cpuid_count(0xd, 0);
        u64::from(leaf.eax) | (u64::from(leaf.edx) << 32)
    }

    /// Components in `other_xcr0` that this layout's XCR0 lacks: state a dump
    /// made there holds but this CPU cannot restore.
    pub fn missing_from(&self, other_xcr0: u64) -> u64 {
        other_xcr0 & !self.xcr0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_legacy_parts_and_fits() {
        let layout = XsaveLayout::for_xcr0(XsaveLayout::cpu_supported_mask() & 0xff);
        assert_eq!(layout.components[0].index, 0);
        assert!(layout.size >= 576);
        for c in &layout.components {
            assert!(c.offset + c.size <= layout.size);
        }
    }

    #[test]
    fn reads_header_fields() {
        let mut bytes = vec![0u8; 1024];
        bytes[464..472].copy_from_slice(&0xe7u64.to_le_bytes());
        bytes[512..520].copy_from_slice(&3u64.to_le_bytes());
        let x = Xsave::from_bytes(bytes);
        assert_eq!(x.xcr0(), Some(0xe7));
        assert_eq!(x.xstate_bv(), Some(3));
        assert_eq!(x.fxsave().len(), 512);
        assert_eq!(Xsave::from_bytes(vec![0; 100]).xcr0(), None);
        let layout = x.layout().expect("xcr0 recorded");
        assert_eq!(layout.xcr0, 0xe7);
        assert_eq!(x.component(&layout, 1).map(<[u8]>::len), Some(256));
    }
}
