//! The x86 FPU/vector state: the raw `NT_X86_XSTATE` area that `PTRACE_GETREGSET` returns and
//! `PTRACE_SETREGSET` takes, and CRIU's `user_x86_fpregs_entry` (with its
//! `user_x86_xsave_entry`), in both directions.
//!
//! The raw area is in the *standard* (non-compacted) XSAVE format:
//!
//! ```text
//! offset  size  contents
//!      0   512  legacy FXSAVE region
//!                 0 u16 cwd   2 u16 swd   4 u16 twd   6 u16 fop
//!                 8 u64 rip  16 u64 rdp  24 u32 mxcsr 28 u32 mxcsr_mask
//!                32 st_space  (8 x 16 bytes)   160 xmm_space (16 x 16 bytes)
//!               416 padding   464 sw_reserved (the kernel's xstate size and XCR0)
//!    512    64  XSAVE header: u64 xstate_bv, u64 xcomp_bv (0 here), reserved
//!    ...        each enabled component i at the offset CPUID(EAX=0xD, ECX=i).EBX
//! ```
//!
//! Component offsets differ between CPU vendors (AMD has no MPX and packs AVX-512 lower), so
//! they come from the CPU in an [`XsaveLayout`]. The image names each component by field
//! (`ymmh_space`, `opmask_reg`, ...), which is what makes images portable between layouts.

use crate::pb::{UserX86FpregsEntry, UserX86XsaveEntry};

/// Size of the legacy FXSAVE region.
pub const FXSAVE_SIZE: usize = 512;
/// Offset of the XSAVE header (right after the legacy region).
pub const XSAVE_HEADER_OFFSET: usize = 512;
/// Legacy region plus header: the smallest area that holds `xstate_bv`.
pub const XSAVE_MIN_SIZE: usize = 576;

/// x87 and SSE state live in the legacy region; their `xstate_bv` bits need no component.
const LEGACY_FEATURES: u64 = 0b11;
/// Bytes of the legacy region that carry state (`padding` and `sw_reserved` follow).
const FXSAVE_STATE_END: usize = 416;

/// An XSAVE state component CRIU's image has a field for, by its XCR0 bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// Upper halves of ymm0-15 (AVX), bit 2.
    Ymm,
    /// MPX bound registers, bit 3.
    BndRegs,
    /// MPX configuration and status, bit 4.
    BndCsr,
    /// AVX-512 opmask registers k0-k7, bit 5.
    Opmask,
    /// Upper 256 bits of zmm0-15, bit 6.
    ZmmHi256,
    /// zmm16-31 in full, bit 7.
    Hi16Zmm,
    /// Protection-key rights register, bit 9.
    Pkru,
}

impl Component {
    /// Every component, in XCR0 bit order.
    pub const ALL: [Component; 7] = [
        Component::Ymm,
        Component::BndRegs,
        Component::BndCsr,
        Component::Opmask,
        Component::ZmmHi256,
        Component::Hi16Zmm,
        Component::Pkru,
    ];

    /// Its bit number in XCR0 and `xstate_bv`.
    pub fn bit(self) -> u32 {
        match self {
            Component::Ymm => 2,
            Component::BndRegs => 3,
            Component::BndCsr => 4,
            Component::Opmask => 5,
            Component::ZmmHi256 => 6,
            Component::Hi16Zmm => 7,
            Component::Pkru => 9,
        }
    }

    /// The component for an XCR0 bit, if the image format has a field for it.
    pub fn from_bit(bit: u32) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.bit() == bit)
    }

    /// Bytes of the component the image keeps. For BNDCSR this is the 16 bytes of state, not
    /// the 64 the CPU reserves for it; PKRU keeps its 4-byte register and 4 bytes of padding.
    pub fn size(self) -> usize {
        match self {
            Component::Ymm => 256,
            Component::BndRegs => 64,
            Component::BndCsr => 16,
            Component::Opmask => 64,
            Component::ZmmHi256 => 512,
            Component::Hi16Zmm => 1024,
            Component::Pkru => 8,
        }
    }

    /// The image field that holds it, for error messages.
    pub fn field(self) -> &'static str {
        match self {
            Component::Ymm => "ymmh_space",
            Component::BndRegs => "bndreg_state",
            Component::BndCsr => "bndcsr_state",
            Component::Opmask => "opmask_reg",
            Component::ZmmHi256 => "zmm_upper",
            Component::Hi16Zmm => "hi16_zmm",
            Component::Pkru => "pkru",
        }
    }
}

/// Where each enabled component sits in the standard-format area of one CPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XsaveLayout {
    slots: Vec<(Component, usize)>,
}

impl XsaveLayout {
    /// A layout from `(XCR0 bit, offset)` pairs, as CPUID leaf 0xD reports them. Bits the image
    /// format has no field for (e.g. AMX tiles, supervisor states) are left out.
    pub fn new(offsets: impl IntoIterator<Item = (u32, usize)>) -> XsaveLayout {
        let mut slots: Vec<(Component, usize)> = offsets
            .into_iter()
            .filter_map(|(bit, offset)| Component::from_bit(bit).map(|c| (c, offset)))
            .collect();
        slots.sort();
        slots.dedup_by_key(|(c, _)| *c);
        XsaveLayout { slots }
    }

    /// The standard offsets of Intel CPUs for the components enabled in `xcr0`. Useful where the
    /// CPU cannot be asked (tests, decoding on another machine); AMD CPUs differ.
    pub fn intel_standard(xcr0: u64) -> XsaveLayout {
        const OFFSETS: [(u32, usize); 7] = [
            (2, 576),
            (3, 960),
            (4, 1024),
            (5, 1088),
            (6, 1152),
            (7, 1664),
            (9, 2688),
        ];
        XsaveLayout::new(
            OFFSETS
                .into_iter()
                .filter(|(bit, _)| xcr0 & (1u64 << bit) != 0),
        )
    }

    /// The offset of a component, if this CPU has it enabled.
    pub fn offset(&self, component: Component) -> Option<usize> {
        self.slots
            .iter()
            .find(|(c, _)| *c == component)
            .map(|(_, offset)| *offset)
    }

    /// The enabled components and their offsets, in bit order.
    pub fn components(&self) -> impl Iterator<Item = (Component, usize)> + '_ {
        self.slots.iter().copied()
    }

    /// The `xstate_bv` bits this layout can hold (legacy x87/SSE included).
    pub fn feature_mask(&self) -> u64 {
        self.slots
            .iter()
            .fold(LEGACY_FEATURES, |mask, (c, _)| mask | (1u64 << c.bit()))
    }
}

/// Why an FPU state could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XsaveError {
    #[error("xsave area of {len} bytes is shorter than the {need} bytes needed")]
    AreaTooShort { len: usize, need: usize },
    #[error("xsave component {field} at offset {offset} does not fit in the {len}-byte area")]
    ComponentOutOfArea {
        field: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("fpregs field {field} has {got} elements, expected {expected}")]
    BadFieldLength {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error(
        "image xsave state uses features {missing:#x} that this CPU does not enable \
         (xstate_bv {xstate_bv:#x}, cpu mask {mask:#x})"
    )]
    MissingFeature {
        missing: u64,
        xstate_bv: u64,
        mask: u64,
    },
}

fn u16_at(raw: &[u8], at: usize) -> u16 {
    let mut bytes = [0u8; 2];
    bytes.copy_from_slice(&raw[at..at + 2]);
    u16::from_le_bytes(bytes)
}

fn u32_at(raw: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&raw[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn u64_at(raw: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn words32(raw: &[u8]) -> Vec<u32> {
    raw.chunks_exact(4).map(|w| u32_at(w, 0)).collect()
}

fn words64(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(|w| u64_at(w, 0)).collect()
}

fn put32(out: &mut [u8], words: &[u32]) {
    for (dst, w) in out.chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
}

fn put64(out: &mut [u8], words: &[u64]) {
    for (dst, w) in out.chunks_exact_mut(8).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
}

/// Reads the legacy region (and, when the area holds an XSAVE header, every component of
/// `layout`) into CRIU's message. A component whose `xstate_bv` bit is clear is still copied:
/// the kernel writes its init state there, and restore gives `xstate_bv` back unchanged.
pub fn fpregs_from_raw(raw: &[u8], layout: &XsaveLayout) -> Result<UserX86FpregsEntry, XsaveError> {
    if raw.len() < FXSAVE_SIZE {
        return Err(XsaveError::AreaTooShort {
            len: raw.len(),
            need: FXSAVE_SIZE,
        });
    }
    let mut entry = UserX86FpregsEntry {
        cwd: u32::from(u16_at(raw, 0)),
        swd: u32::from(u16_at(raw, 2)),
        twd: u32::from(u16_at(raw, 4)),
        fop: u32::from(u16_at(raw, 6)),
        rip: u64_at(raw, 8),
        rdp: u64_at(raw, 16),
        mxcsr: u32_at(raw, 24),
        mxcsr_mask: u32_at(raw, 28),
        st_space: words32(&raw[32..160]),
        xmm_space: words32(&raw[160..416]),
        ..Default::default()
    };
    if raw.len() < XSAVE_MIN_SIZE {
        return Ok(entry);
    }
    let mut xsave = UserX86XsaveEntry {
        xstate_bv: u64_at(raw, XSAVE_HEADER_OFFSET),
        ..Default::default()
    };
    for (component, offset) in layout.components() {
        let bytes =
            raw.get(offset..offset + component.size())
                .ok_or(XsaveError::ComponentOutOfArea {
                    field: component.field(),
                    offset,
                    len: raw.len(),
                })?;
        match component {
            Component::Ymm => xsave.ymmh_space = words32(bytes),
            Component::BndRegs => xsave.bndreg_state = words64(bytes),
            Component::BndCsr => xsave.bndcsr_state = words64(bytes),
            Component::Opmask => xsave.opmask_reg = words64(bytes),
            Component::ZmmHi256 => xsave.zmm_upper = words64(bytes),
            Component::Hi16Zmm => xsave.hi16_zmm = words64(bytes),
            Component::Pkru => xsave.pkru = words32(bytes),
        }
    }
    entry.xsave = Some(xsave);
    Ok(entry)
}

fn check_len(field: &'static str, got: usize, expected: usize) -> Result<(), XsaveError> {
    if got == expected {
        Ok(())
    } else {
        Err(XsaveError::BadFieldLength {
            field,
            got,
            expected,
        })
    }
}

fn narrow16(field: &'static str, value: u32) -> Result<[u8; 2], XsaveError> {
    u16::try_from(value)
        .map(u16::to_le_bytes)
        .map_err(|_| XsaveError::BadFieldLength {
            field,
            got: 4,
            expected: 2,
        })
}

/// Writes the image's state into `raw`, an area of the restoring CPU's size (best obtained
/// from `PTRACE_GETREGSET` of the thread to restore, so reserved bytes are what the kernel
/// expects). The legacy padding and `sw_reserved` bytes are left as they are. Components the
/// image holds but the CPU does not enable are an error, since their state would be lost.
pub fn write_raw(
    entry: &UserX86FpregsEntry,
    layout: &XsaveLayout,
    raw: &mut [u8],
) -> Result<(), XsaveError> {
    if raw.len() < FXSAVE_SIZE {
        return Err(XsaveError::AreaTooShort {
            len: raw.len(),
            need: FXSAVE_SIZE,
        });
    }
    check_len("st_space", entry.st_space.len(), 32)?;
    check_len("xmm_space", entry.xmm_space.len(), 64)?;
    raw[0..2].copy_from_slice(&narrow16("cwd", entry.cwd)?);
    raw[2..4].copy_from_slice(&narrow16("swd", entry.swd)?);
    raw[4..6].copy_from_slice(&narrow16("twd", entry.twd)?);
    raw[6..8].copy_from_slice(&narrow16("fop", entry.fop)?);
    raw[8..16].copy_from_slice(&entry.rip.to_le_bytes());
    raw[16..24].copy_from_slice(&entry.rdp.to_le_bytes());
    raw[24..28].copy_from_slice(&entry.mxcsr.to_le_bytes());
    raw[28..32].copy_from_slice(&entry.mxcsr_mask.to_le_bytes());
    put32(&mut raw[32..160], &entry.st_space);
    put32(&mut raw[160..FXSAVE_STATE_END], &entry.xmm_space);
    if raw.len() < XSAVE_MIN_SIZE {
        return Ok(());
    }
    // Without an xsave entry the image only knows x87 and SSE state: mark just those as live.
    let Some(xsave) = &entry.xsave else {
        raw[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8]
            .copy_from_slice(&LEGACY_FEATURES.to_le_bytes());
        return Ok(());
    };
    let mask = layout.feature_mask();
    let missing = xsave.xstate_bv & !mask;
    if missing != 0 {
        return Err(XsaveError::MissingFeature {
            missing,
            xstate_bv: xsave.xstate_bv,
            mask,
        });
    }
    for (component, offset) in layout.components() {
        let len = raw.len();
        let out = raw.get_mut(offset..offset + component.size()).ok_or(
            XsaveError::ComponentOutOfArea {
                field: component.field(),
                offset,
                len,
            },
        )?;
        let present = xsave.xstate_bv & (1u64 << component.bit()) != 0;
        // A component absent from the image (older writer, other CPU) stays in init state,
        // which its cleared xstate_bv bit already says; only live components must be whole.
        let (got, expected) = match component {
            Component::Ymm | Component::Pkru => {
                let words = if component == Component::Ymm {
                    &xsave.ymmh_space
                } else {
                    &xsave.pkru
                };
                if words.is_empty() && !present {
                    continue;
                }
                if words.len() == component.size() / 4 {
                    put32(out, words);
                }
                (words.len(), component.size() / 4)
            }
            _ => {
                let words = match component {
                    Component::BndRegs => &xsave.bndreg_state,
                    Component::BndCsr => &xsave.bndcsr_state,
                    Component::Opmask => &xsave.opmask_reg,
                    Component::ZmmHi256 => &xsave.zmm_upper,
                    _ => &xsave.hi16_zmm,
                };
                if words.is_empty() && !present {
                    continue;
                }
                if words.len() == component.size() / 8 {
                    put64(out, words);
                }
                (words.len(), component.size() / 8)
            }
        };
        check_len(component.field(), got, expected)?;
    }
    raw[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8]
        .copy_from_slice(&xsave.xstate_bv.to_le_bytes());
    // The ptrace ABI takes the standard format only: xcomp_bv must be zero.
    raw[XSAVE_HEADER_OFFSET + 8..XSAVE_HEADER_OFFSET + 16].fill(0);
    Ok(())
}

/// Builds a fresh area of `size` bytes from the image's state (see [`write_raw`]).
pub fn raw_from_fpregs(
    entry: &UserX86FpregsEntry,
    layout: &XsaveLayout,
    size: usize,
) -> Result<Vec<u8>, XsaveError> {
    let mut raw = vec![0u8; size];
    write_raw(entry, layout, &mut raw)?;
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const XCR0: u64 = 0xe7;
    const SIZE: usize = 2688;

    fn patterned_area() -> Vec<u8> {
        let mut raw: Vec<u8> = (0..SIZE).map(|i| (i * 7 + 3) as u8).collect();
        // Keep the legacy padding and the header's reserved part as the kernel gives them.
        raw[FXSAVE_STATE_END..FXSAVE_SIZE].fill(0);
        raw[XSAVE_HEADER_OFFSET..XSAVE_HEADER_OFFSET + 8].copy_from_slice(&XCR0.to_le_bytes());
        raw[XSAVE_HEADER_OFFSET + 8..XSAVE_MIN_SIZE].fill(0);
        raw
    }

    #[test]
    fn raw_area_round_trips_through_the_image_entry() {
        let layout = XsaveLayout::intel_standard(XCR0);
        let raw = patterned_area();
        let entry = fpregs_from_raw(&raw, &layout).unwrap();
        let xsave = entry.xsave.as_ref().unwrap();
        assert_eq!(xsave.xstate_bv, XCR0);
        assert_eq!(xsave.ymmh_space.len(), 64);
        assert_eq!(xsave.opmask_reg.len(), 8);
        assert_eq!(xsave.zmm_upper.len(), 64);
        assert_eq!(xsave.hi16_zmm.len(), 128);
        assert!(xsave.bndreg_state.is_empty() && xsave.pkru.is_empty());
        let back = raw_from_fpregs(&entry, &layout, SIZE).unwrap();
        // Bytes outside the enabled components (the gap after AVX and the MPX area) are not
        // state: compare the rest.
        let mut expected = raw.clone();
        expected[832..1088].fill(0);
        assert_eq!(back, expected);
    }

    #[test]
    fn legacy_fields_land_at_their_fxsave_offsets() {
        let layout = XsaveLayout::intel_standard(XCR0);
        let mut raw = vec![0u8; SIZE];
        raw[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        raw[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        raw[160..164].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        let entry = fpregs_from_raw(&raw, &layout).unwrap();
        assert_eq!(entry.cwd, 0x037f);
        assert_eq!(entry.mxcsr, 0x1f80);
        assert_eq!(entry.xmm_space[0], 0xdead_beef);
    }

    #[test]
    fn components_move_between_layouts_by_name() {
        let intel = XsaveLayout::intel_standard(XCR0);
        // AMD-style packing: no MPX, AVX-512 right after AVX.
        let amd = XsaveLayout::new([(2, 576), (5, 832), (6, 896), (7, 1408)]);
        let raw = patterned_area();
        let entry = fpregs_from_raw(&raw, &intel).unwrap();
        let other = raw_from_fpregs(&entry, &amd, 2432).unwrap();
        assert_eq!(other[832..896], raw[1088..1152]);
        assert_eq!(fpregs_from_raw(&other, &amd).unwrap(), entry);
    }

    #[test]
    fn state_the_cpu_lacks_is_refused() {
        let layout = XsaveLayout::intel_standard(XCR0);
        let entry = fpregs_from_raw(&patterned_area(), &layout).unwrap();
        let avx_only = XsaveLayout::intel_standard(0x7);
        let err = raw_from_fpregs(&entry, &avx_only, 832).unwrap_err();
        assert!(matches!(
            err,
            XsaveError::MissingFeature { missing: 0xe0, .. }
        ));
    }

    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let layout = XsaveLayout::intel_standard(XCR0);
        let mut entry = fpregs_from_raw(&patterned_area(), &layout).unwrap();
        entry.xsave.as_mut().unwrap().zmm_upper.pop();
        assert!(matches!(
            raw_from_fpregs(&entry, &layout, SIZE),
            Err(XsaveError::BadFieldLength {
                field: "zmm_upper",
                ..
            })
        ));
        entry.st_space.clear();
        assert!(raw_from_fpregs(&entry, &layout, SIZE).is_err());
        assert!(fpregs_from_raw(&[0u8; 100], &layout).is_err());
        assert!(raw_from_fpregs(&UserX86FpregsEntry::default(), &layout, 10).is_err());
        let mut short = patterned_area();
        short.truncate(1200);
        assert!(matches!(
            fpregs_from_raw(&short, &layout),
            Err(XsaveError::ComponentOutOfArea { .. })
        ));
    }
}
