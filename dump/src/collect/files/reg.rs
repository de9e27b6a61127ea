//! Regular files (and directories, and character devices reopened by path) as CRIU's
//! `reg_file_entry`, and deleted files as ghost images.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use images_format::pb::{FdTypes, FileEntry, FownEntry, GhostFileEntry, RegFileEntry, Timeval};

/// A deleted file still open: its contents are copied into `ghost-file-<id>.img` at write
/// time, from `source` (the target's `/proc/PID/fd/N`, which still reaches the inode).
#[derive(Debug, Clone)]
pub struct Ghost {
    pub id: u32,
    pub entry: GhostFileEntry,
    pub source: PathBuf,
    pub size: u64,
}

/// CRIU stores a build-id as its bytes packed into native-endian u32 words, zero padded.
fn build_id_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|chunk| {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            u32::from_ne_bytes(word)
        })
        .collect()
}

/// The build-id of the file at `path` as [`BuildIds`] records it: empty if it has none or
/// is no ELF file.
pub fn build_id_of(path: &Path) -> Vec<u32> {
    match tracee::vdso::build_id(path) {
        Ok(Some(bytes)) => build_id_words(&bytes),
        Ok(None) | Err(_) => Vec::new(),
    }
}

/// Build-ids already read, by device and inode: a file opened many times in a tree (each
/// open its own description) is read once per dump, not once per open.
#[derive(Debug, Default)]
pub struct BuildIds(std::collections::HashMap<(u64, u64), Vec<u32>>);

impl BuildIds {
    fn of(&mut self, meta: &std::fs::Metadata, path: &Path) -> Vec<u32> {
        self.0
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| match tracee::vdso::build_id(path) {
                Ok(Some(bytes)) => build_id_words(&bytes),
                Ok(None) => Vec::new(),
                Err(err) => {
                    // Not an ELF file, or unreadable: the size alone validates it.
                    tracing::trace!(path = %path.display(), error = %err, "no build-id");
                    Vec::new()
                }
            })
            .clone()
    }
}

/// Describes a file. `elf` is where to read a build-id from, for regular files, with the
/// build-ids read so far.
pub fn describe(
    id: u32,
    name: &str,
    flags: u32,
    pos: u64,
    meta: &std::fs::Metadata,
    elf: Option<(&Path, &mut BuildIds)>,
) -> RegFileEntry {
    let build_id = match elf {
        Some((path, known)) if meta.is_file() => known.of(meta, path),
        _ => Vec::new(),
    };
    RegFileEntry {
        id,
        flags,
        pos,
        fown: FownEntry::default(),
        name: name.to_owned(),
        mnt_id: None,
        size: meta.is_file().then_some(meta.size()),
        ext: None,
        mode: Some(meta.mode()),
        build_id,
        checksum: None,
        checksum_config: None,
        checksum_parameter: None,
    }
}

/// Wraps a regular file in the `files.img` union.
pub fn file_entry(reg: RegFileEntry) -> FileEntry {
    FileEntry {
        r#type: FdTypes::Reg as i32,
        id: reg.id,
        reg: Some(reg),
        ..FileEntry::default()
    }
}

fn timeval(sec: i64, nsec: i64) -> Timeval {
    Timeval {
        tv_sec: u64::try_from(sec).unwrap_or(0),
        tv_usec: u64::try_from(nsec / 1000).unwrap_or(0),
    }
}

/// The ghost image header of a deleted file; the contents follow it raw (not in chunks).
pub fn ghost(id: u32, source: &Path, meta: &std::fs::Metadata) -> Ghost {
    Ghost {
        id,
        entry: GhostFileEntry {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
            dev: Some((meta.dev() & 0xffff_ffff) as u32),
            ino: Some(meta.ino()),
            rdev: None,
            atim: Some(timeval(meta.atime(), meta.atime_nsec())),
            mtim: Some(timeval(meta.mtime(), meta.mtime_nsec())),
            chunks: None,
            size: None,
            symlnk_target: None,
        },
        source: source.to_path_buf(),
        size: meta.size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_packs_into_padded_words() {
        let words = build_id_words(&[1, 2, 3, 4, 5]);
        assert_eq!(words, vec![u32::from_ne_bytes([1, 2, 3, 4]), 5u32.to_le()]);
    }
}
