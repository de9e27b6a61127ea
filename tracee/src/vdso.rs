//! The vDSO and ELF build-ids.
//!
//! A restored process keeps calling into the vDSO it was dumped with (glibc
//! caches its function pointers), so the restoring kernel's vDSO must export
//! the same symbols at the same offsets. Mapped ELF files are checked by their
//! GNU build-id note.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

use crate::ids::{Pid, RemoteAddr};
use crate::memory::{self, MemoryError};
use crate::proc::{self, ProcError};

/// `NT_GNU_BUILD_ID`.
const NT_GNU_BUILD_ID: u32 = 3;
/// Largest vDSO image we read (the real one is two pages).
const VDSO_MAX: u64 = 1 << 20;

/// Reading or parsing a vDSO or ELF file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VdsoError {
    /// Reading the maps.
    #[error("pid {pid}: find its [vdso]")]
    Maps {
        pid: Pid,
        #[source]
        source: ProcError,
    },
    /// The process has no `[vdso]` mapping.
    #[error("pid {pid} has no [vdso]")]
    NoVdso { pid: Pid },
    /// Reading the vDSO's memory.
    #[error("pid {pid}: read its [vdso]")]
    Read {
        pid: Pid,
        #[source]
        source: MemoryError,
    },
    /// The vDSO image is not an ELF file we can read.
    #[error("pid {pid}: parse the [vdso] ELF image")]
    ParseVdso {
        pid: Pid,
        #[source]
        source: goblin::error::Error,
    },
    /// Reading an ELF file.
    #[error("read {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Parsing an ELF file.
    #[error("parse ELF {}", path.display())]
    ParseFile {
        path: PathBuf,
        #[source]
        source: goblin::error::Error,
    },
}

/// A process's vDSO: where it is and its dynamic symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vdso {
    /// Start of the `[vdso]` mapping.
    pub start: RemoteAddr,
    /// End of the `[vdso]` mapping.
    pub end: RemoteAddr,
    /// Dynamic symbol name (without its version) to offset from the image start.
    pub symbols: BTreeMap<String, u64>,
}

/// The defined dynamic symbols of an ELF image, name to value.
pub fn dynamic_symbols(image: &[u8]) -> Result<BTreeMap<String, u64>, goblin::error::Error> {
    let elf = Elf::parse(image)?;
    let mut out = BTreeMap::new();
    for sym in elf.dynsyms.iter() {
        if sym.st_value == 0 || sym.st_name == 0 {
            continue;
        }
        if let Some(name) = elf.dynstrtab.get_at(sym.st_name) {
            if !name.is_empty() {
                out.insert(name.to_string(), sym.st_value);
            }
        }
    }
    Ok(out)
}

/// Reads the `[vdso]` of `pid` and its symbols.
pub fn read_vdso(pid: Pid) -> Result<Vdso, VdsoError> {
    let maps = proc::maps::read(pid).map_err(|source| VdsoError::Maps { pid, source })?;
    let vma = maps
        .iter()
        .find(|v| v.special_name() == Some("[vdso]"))
        .ok_or(VdsoError::NoVdso { pid })?;
    let len = usize::try_from(vma.len().min(VDSO_MAX)).unwrap_or(0);
    let mut image = vec![0u8; len];
    memory::read_remote(pid, vma.start, &mut image)
        .map_err(|source| VdsoError::Read { pid, source })?;
    let symbols = dynamic_symbols(&image).map_err(|source| VdsoError::ParseVdso { pid, source })?;
    Ok(Vdso {
        start: vma.start,
        end: vma.end,
        symbols,
    })
}

/// Our own vDSO: what a process restored by us on this kernel gets.
pub fn own_vdso() -> Result<Vdso, VdsoError> {
    let pid = Pid::try_from(std::process::id()).map_err(|_| VdsoError::NoVdso {
        pid: Pid::from_raw(1).expect("1 is positive"),
    })?;
    read_vdso(pid)
}

impl Vdso {
    /// Size of the mapping.
    pub fn len(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get())
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Symbols that differ between `self` and `other`: missing on one side or
    /// at another offset. Empty means code compiled against one works with the other.
    pub fn differences(&self, other: &Vdso) -> Vec<String> {
        let mut diff = Vec::new();
        for (name, off) in &self.symbols {
            match other.symbols.get(name) {
                Some(o) if o == off => {}
                Some(o) => diff.push(format!("{name}: {off:#x} vs {o:#x}")),
                None => diff.push(format!("{name}: missing in the other")),
            }
        }
        for name in other.symbols.keys() {
            if !self.symbols.contains_key(name) {
                diff.push(format!("{name}: only in the other"));
            }
        }
        if self.len() != other.len() {
            diff.push(format!("size {:#x} vs {:#x}", self.len(), other.len()));
        }
        diff
    }
}

/// The GNU build-id of an ELF image, if it has one.
pub fn build_id_of_image(image: &[u8]) -> Result<Option<Vec<u8>>, goblin::error::Error> {
    let elf = Elf::parse(image)?;
    let notes = elf
        .iter_note_headers(image)
        .into_iter()
        .flatten()
        .chain(elf.iter_note_sections(image, None).into_iter().flatten());
    for note in notes {
        let note = note?;
        if note.n_type == NT_GNU_BUILD_ID && note.name == "GNU" {
            return Ok(Some(note.desc.to_vec()));
        }
    }
    Ok(None)
}

/// Bytes of a note segment read at most: build-ids sit in small ones.
const MAX_NOTES: u64 = 64 * 1024;

/// The GNU build-id of the ELF file at `path`, if it has one. Only the header, the program
/// headers and the note segments are read (a dump asks for every mapped library, and libc
/// alone is megabytes); a file that is not ELF has none. A file without program headers
/// (an object file) is parsed whole for its note sections.
pub fn build_id(path: &Path) -> Result<Option<Vec<u8>>, VdsoError> {
    use goblin::elf::header::{ELFMAG, SELFMAG};
    use goblin::elf::program_header::{ProgramHeader, PT_NOTE};
    use std::os::unix::fs::FileExt;
    let read_err = |source| VdsoError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let parse_err = |source| VdsoError::ParseFile {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let read_at = |offset: u64, len: u64| -> Result<Vec<u8>, VdsoError> {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    };
    let head = read_at(0, goblin::elf::header::header64::SIZEOF_EHDR as u64)?;
    if head.len() < SELFMAG || &head[..SELFMAG] != ELFMAG {
        return Ok(None);
    }
    let header = Elf::parse_header(&head).map_err(parse_err)?;
    if header.e_phnum == 0 {
        let image = std::fs::read(path).map_err(read_err)?;
        return build_id_of_image(&image).map_err(parse_err);
    }
    let ctx = goblin::container::Ctx::new(
        header.container().map_err(parse_err)?,
        header.endianness().map_err(parse_err)?,
    );
    let table_len = u64::from(header.e_phentsize) * u64::from(header.e_phnum);
    let table = read_at(header.e_phoff, table_len)?;
    let phdrs =
        ProgramHeader::parse(&table, 0, usize::from(header.e_phnum), ctx).map_err(parse_err)?;
    for ph in phdrs.iter().filter(|ph| ph.p_type == PT_NOTE) {
        let notes = read_at(ph.p_offset, ph.p_filesz.min(MAX_NOTES))?;
        if let Some(id) = gnu_build_id(&notes, ph.p_align, header.endianness().ok()) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// The build-id among the notes of one note segment (`align`: the segment's alignment, 4
/// or 8), in the file's byte order.
fn gnu_build_id(
    notes: &[u8],
    align: u64,
    endian: Option<goblin::container::Endian>,
) -> Option<Vec<u8>> {
    let big = matches!(endian, Some(goblin::container::Endian::Big));
    let word = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = notes.get(at..at + 4)?.try_into().ok()?;
        let value = if big {
            u32::from_be_bytes(raw)
        } else {
            u32::from_le_bytes(raw)
        };
        usize::try_from(value).ok()
    };
    let align = if align == 8 { 8 } else { 4 };
    let up = |n: usize| n.checked_add(align - 1).map(|n| n & !(align - 1));
    let mut at = 0;
    while at + 12 <= notes.len() {
        let (namesz, descsz, kind) = (word(at)?, word(at + 4)?, word(at + 8)?);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(up(namesz)?)?;
        let next = desc_at.checked_add(up(descsz)?)?;
        if kind == NT_GNU_BUILD_ID as usize && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
            return notes.get(desc_at..desc_at + descsz).map(<[u8]>::to_vec);
        }
        at = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_vdso_has_clock_gettime() {
        let v = own_vdso().expect("own vdso");
        assert!(
            v.symbols.keys().any(|k| k.contains("clock_gettime")),
            "{:?}",
            v.symbols
        );
        assert!(v.differences(&v).is_empty());
    }

    #[test]
    fn build_id_from_the_note_segments_matches_a_whole_parse() {
        let mut files = vec![std::env::current_exe().expect("current exe")];
        files.extend(
            ["/lib/x86_64-linux-gnu/libc.so.6", "/bin/sh"]
                .iter()
                .map(std::path::PathBuf::from)
                .filter(|p| p.exists()),
        );
        for path in files {
            let whole = build_id_of_image(&std::fs::read(&path).expect("read")).expect("parse");
            assert_eq!(build_id(&path).expect("notes"), whole, "{}", path.display());
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("text");
        std::fs::write(&text, b"not an ELF file at all").expect("write");
        assert_eq!(build_id(&text).expect("not ELF"), None);
    }

    #[test]
    fn own_executable_has_a_build_id() {
        let exe = std::env::current_exe().expect("current exe");
        let id = build_id(&exe).expect("parse own exe");
        // rustc passes --build-id to the linker on Linux.
        assert!(id.is_some_and(|b| !b.is_empty()));
    }
}
