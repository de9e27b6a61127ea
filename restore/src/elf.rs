//! The GNU build-id of an ELF file, read from its program headers only.
//!
//! A restore checks every mapped ELF file; reading and parsing whole libraries for
//! that (tens of MB for an interpreter) cost more than the rest of the restore, while
//! the note sits in the first pages.
//!
//! ```text
//! Elf64_Ehdr: e_ident[16] ("\x7fELF", class 2 = 64-bit, data 1 = little endian) ...
//!             e_phoff u64 @32, e_phentsize u16 @54, e_phnum u16 @56
//! Elf64_Phdr: p_type u32 @0 (PT_NOTE = 4), p_offset u64 @8, p_filesz u64 @32
//! note:       namesz u32, descsz u32, type u32 (NT_GNU_BUILD_ID = 3), name, desc (4-aligned)
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PT_NOTE: u32 = 4;
const NT_GNU_BUILD_ID: u32 = 3;
/// Note segments larger than this are not build-id notes worth reading.
const MAX_NOTES: u64 = 64 << 10;
const MAX_PHNUM: u64 = 4096;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The build-id of the file at `path`; `None` if it is not a 64-bit little-endian
/// ELF file or has no build-id note.
pub fn build_id(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = File::open(path)?;
    let mut header = [0u8; 64];
    if file.read_at(&mut header, 0)? < header.len()
        || header[..4] != *b"\x7fELF"
        || header[4] != 2
        || header[5] != 1
    {
        return Ok(None);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(&header, 32),
        u16_at(&header, 54),
        u16_at(&header, 56),
    ) else {
        return Ok(None);
    };
    let (phentsize, phnum) = (u64::from(phentsize), u64::from(phnum));
    if phentsize < 56 || phnum > MAX_PHNUM {
        return Ok(None);
    }
    let mut phdrs = vec![0u8; usize::try_from(phentsize * phnum).unwrap_or(0)];
    file.read_exact_at(&mut phdrs, phoff)?;
    for ph in phdrs.chunks_exact(usize::try_from(phentsize).unwrap_or(56)) {
        if u32_at(ph, 0) != Some(PT_NOTE) {
            continue;
        }
        let (Some(offset), Some(size)) = (u64_at(ph, 8), u64_at(ph, 32)) else {
            continue;
        };
        if size > MAX_NOTES {
            continue;
        }
        let mut notes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        file.read_exact_at(&mut notes, offset)?;
        if let Some(id) = build_id_in_notes(&notes) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

/// Walks a note segment for the GNU build-id note.
pub fn build_id_in_notes(mut notes: &[u8]) -> Option<Vec<u8>> {
    while notes.len() >= 12 {
        let namesz = usize::try_from(u32_at(notes, 0)?).ok()?;
        let descsz = usize::try_from(u32_at(notes, 4)?).ok()?;
        let kind = u32_at(notes, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let desc_start = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = desc_start.checked_add(descsz)?;
        let name = notes.get(12..name_end)?;
        let desc = notes.get(desc_start..desc_end)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(desc.to_vec());
        }
        notes = notes.get(align4(desc_end)?..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(12 + align4(name.len()).unwrap(), 0);
        n.extend_from_slice(desc);
        n.resize(align4(n.len()).unwrap(), 0);
        n
    }

    #[test]
    fn finds_the_gnu_build_id_after_other_notes() {
        let mut notes = note(b"GNU\0", 5, &[1, 2, 3, 4, 5, 6, 7, 8]);
        notes.extend(note(b"GNU\0", NT_GNU_BUILD_ID, &[0xab; 20]));
        assert_eq!(build_id_in_notes(&notes), Some(vec![0xab; 20]));
    }

    #[test]
    fn truncated_or_hostile_notes_give_none() {
        let mut notes = note(b"GNU\0", NT_GNU_BUILD_ID, &[0xab; 20]);
        notes.truncate(20);
        assert_eq!(build_id_in_notes(&notes), None);
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(build_id_in_notes(&huge), None);
    }

    #[test]
    fn agrees_with_the_full_elf_parser_on_our_own_executable() {
        let exe = std::env::current_exe().expect("current exe");
        let ours = build_id(&exe).expect("read");
        let full = tracee::vdso::build_id(&exe).expect("parse");
        assert_eq!(ours, full);
    }
}
