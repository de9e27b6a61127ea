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

/// The GNU build-id of the ELF file at `path`, if it has one.
pub fn build_id(path: &Path) -> Result<Option<Vec<u8>>, VdsoError> {
    let image = std::fs::read(path).map_err(|source| VdsoError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    build_id_of_image(&image).map_err(|source| VdsoError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
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
    fn own_executable_has_a_build_id() {
        let exe = std::env::current_exe().expect("current exe");
        let id = build_id(&exe).expect("parse own exe");
        // rustc passes --build-id to the linker on Linux.
        assert!(id.is_some_and(|b| !b.is_empty()));
    }
}
