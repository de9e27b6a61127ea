//! Shared memory objects of the dumped tree, saved once each, whichever processes map them
//! (CRIU's layout):
//!
//! - `MAP_SHARED|MAP_ANONYMOUS` memory: `pagemap-shmem-<inode>.img` + `pages-<n>.img`. Each
//!   entry's `vaddr` is a byte offset into the object, and the object spans the largest
//!   `pgoff + length` of any VMA of it in the tree (what a restore creates).
//! - memfds: `memfd.img` (`memfd_inode_entry`: name, size, seals, mode, `shmid`), contents in
//!   `pagemap-shmem-<shmid>.img` as above over the file's size.
//! - SysV segments attached in the tree: `ipcns-shm-<ipc ns id>.img`, one `ipc_shm_entry`
//!   (key, id, owner, mode, size) per segment followed by its contents, padded to 4 bytes.
//!
//! Contents are read through the object itself (`/proc/PID/map_files/...` or the memfd's
//! `/proc/PID/fd/N`), not through one process's page tables: a page another process wrote
//! need not be mapped in the one we look at. `SEEK_DATA`/`SEEK_HOLE` on the shmem file skip
//! the pages that were never written.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use images_format::pb::{
    FdTypes, FileEntry, FownEntry, IpcDescEntry, IpcShmEntry, MemfdFileEntry, MemfdInodeEntry,
};
use images_format::VmaStatus;
use tracee::{Pid, PAGE_SIZE};

use super::ProcessState;

/// Bytes read from an object at a time.
const READ_CHUNK: u64 = 8 << 20;
/// `shm_perm.mode` bits kept in the image: the permissions, and `SHM_DEST` (removed with
/// `IPC_RMID` while still attached: restore removes it again once attached).
const SHM_MODE_BITS: u32 = 0o1777;

#[derive(Debug, thiserror::Error)]
pub enum ShmemError {
    #[error("dump: pid {pid}: open shared memory object {} (inode {inode})", path.display())]
    Open {
        pid: Pid,
        inode: u64,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: read shared memory object {} (inode {inode}) at offset {offset}", path.display())]
    Read {
        inode: u64,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: read /proc/sysvipc/shm")]
    SysvList {
        #[source]
        source: std::io::Error,
    },
    #[error("dump: pid {pid}: SysV segment {id} is attached but not in /proc/sysvipc/shm (another IPC namespace?)")]
    SysvMissing { pid: Pid, id: u64 },
}

/// One object, open, and where its written pages are. Its bytes are read while the images
/// are written, a chunk at a time, never all at once.
#[derive(Debug)]
pub struct ShmemContents {
    /// The object's id in the images (`shmid`).
    pub shmid: u64,
    /// Bytes of the object the images cover.
    pub size: u64,
    /// `(offset, length)` of the runs to save, in offset order.
    pub runs: Vec<(u64, u64)>,
    file: File,
    path: PathBuf,
}

impl ShmemContents {
    /// Calls `f` with the bytes of every run, in pieces of at most 8 MiB, in offset order.
    /// Bytes past the end of the object (it shrank meanwhile) read as zero.
    pub fn for_each_chunk<E: From<ShmemError>>(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let largest = self.runs.iter().map(|r| r.1).max().unwrap_or(0);
        let mut buf = vec![0u8; usize::try_from(largest.min(READ_CHUNK)).unwrap_or(0)];
        for &(offset, len) in &self.runs {
            let mut done = 0;
            while done < len {
                let n = usize::try_from((len - done).min(READ_CHUNK)).unwrap_or(0);
                let chunk = buf.get_mut(..n).unwrap_or_default();
                self.read_at(offset + done, chunk)?;
                f(offset + done, chunk)?;
                done += n as u64;
            }
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ShmemError> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let at = offset + filled as u64;
            let got = self
                .file
                .read_at(&mut buf[filled..], at)
                .map_err(|source| ShmemError::Read {
                    inode: self.shmid,
                    path: self.path.clone(),
                    offset: at,
                    source,
                })?;
            if got == 0 {
                buf[filled..].fill(0);
                break;
            }
            filled += got;
        }
        Ok(())
    }
}

/// A SysV segment: its `ipc_shm_entry` and its `size` bytes (one run from 0).
#[derive(Debug)]
pub struct SysvSegment {
    pub entry: IpcShmEntry,
    pub contents: ShmemContents,
}

/// A memfd inode of the tree, with where to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemfdInode {
    pub entry: MemfdInodeEntry,
    /// `/proc/PID/fd/N` or `/proc/PID/map_files/...` of one of its users.
    pub source: PathBuf,
    pub pid: Pid,
}

/// Every shared memory object of the tree.
#[derive(Debug, Default)]
pub struct ShmemState {
    /// Anonymous shared memory and memfds: `pagemap-shmem-<shmid>.img` each.
    pub objects: Vec<ShmemContents>,
    /// `memfd.img`.
    pub memfds: Vec<MemfdInodeEntry>,
    /// `ipcns-shm-<id>.img`.
    pub sysv: Vec<SysvSegment>,
    /// The id of the `ipcns-shm` image (the IPC namespace's id in `ids-PID.img`).
    pub ipc_ns_id: u32,
}

/// One line of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysvInfo {
    pub key: i32,
    pub id: u64,
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
}

/// Parses `/proc/sysvipc/shm` (key decimal, perms octal; a header line first).
pub fn parse_sysvipc_shm(text: &str) -> Vec<SysvInfo> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(SysvInfo {
                key: f.first()?.parse().ok()?,
                id: f.get(1)?.parse().ok()?,
                mode: u32::from_str_radix(f.get(2)?, 8).ok()?,
                size: f.get(3)?.parse().ok()?,
                uid: f.get(7)?.parse().ok()?,
                gid: f.get(8)?.parse().ok()?,
                cuid: f.get(9)?.parse().ok()?,
                cgid: f.get(10)?.parse().ok()?,
            })
        })
        .collect()
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The runs of `[0, size)` of an open shmem file that hold written pages, page aligned.
fn written_runs(
    file: &File,
    inode: u64,
    path: &Path,
    size: u64,
) -> Result<Vec<(u64, u64)>, ShmemError> {
    use rustix::fs::SeekFrom;
    let seek_err = |offset| {
        move |e: rustix::io::Errno| ShmemError::Read {
            inode,
            path: path.to_path_buf(),
            offset,
            source: e.into(),
        }
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let data = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            // No data after `at`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(seek_err(at)(e)),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(file, SeekFrom::Hole(data)).map_err(seek_err(data))?;
        let start = data - data % PAGE_SIZE;
        let end = round_up(hole.min(size), PAGE_SIZE).max(start + PAGE_SIZE);
        match runs.last_mut() {
            Some((off, len)) if *off + *len >= start => *len = end - *off,
            _ => runs.push((start, end - start)),
        }
        at = end;
    }
    Ok(runs)
}

fn open(pid: Pid, inode: u64, path: &Path) -> Result<File, ShmemError> {
    File::open(path).map_err(|source| ShmemError::Open {
        pid,
        inode,
        path: path.to_path_buf(),
        source,
    })
}

/// Collects every shared memory object the processes map (and the memfds they hold), once
/// each. The processes must still be frozen.
pub fn collect(
    processes: &[ProcessState],
    memfds: &[MemfdInode],
) -> Result<ShmemState, ShmemError> {
    let mut state = ShmemState {
        ipc_ns_id: processes.first().and_then(|p| p.ids.ipc_ns_id).unwrap_or(0),
        ..ShmemState::default()
    };
    // Anonymous objects: inode -> (a mapping of it, largest pgoff + len).
    let mut anon: Vec<(u64, Pid, PathBuf, u64)> = Vec::new();
    let mut sysv: Vec<(u64, Pid, PathBuf)> = Vec::new();
    for p in processes {
        for v in &p.mm.vmas {
            let status = VmaStatus::from_bits_retain(v.status);
            if !status.contains(VmaStatus::ANON_SHARED) {
                continue;
            }
            let path = PathBuf::from(format!(
                "/proc/{}/map_files/{:x}-{:x}",
                p.pid, v.start, v.end
            ));
            if status.contains(VmaStatus::SYSVIPC) {
                if !sysv.iter().any(|s| s.0 == v.shmid) {
                    sysv.push((v.shmid, p.pid, path));
                }
                continue;
            }
            let end = v.pgoff.saturating_add(v.end.saturating_sub(v.start));
            match anon.iter_mut().find(|a| a.0 == v.shmid) {
                Some(a) => a.3 = a.3.max(end),
                None => anon.push((v.shmid, p.pid, path, end)),
            }
        }
    }
    for (inode, pid, path, size) in anon {
        let file = open(pid, inode, &path)?;
        let runs = written_runs(&file, inode, &path, size)?;
        tracing::debug!(inode, size, runs = runs.len(), "shared anonymous memory");
        state.objects.push(ShmemContents {
            shmid: inode,
            size,
            runs,
            file,
            path,
        });
    }
    let mut seen = std::collections::HashSet::new();
    for m in memfds.iter().filter(|m| seen.insert(m.entry.shmid)) {
        let inode = m.entry.shmid.into();
        let file = open(m.pid, inode, &m.source)?;
        let size = round_up(m.entry.size, PAGE_SIZE);
        let runs = written_runs(&file, inode, &m.source, size)?;
        state.objects.push(ShmemContents {
            shmid: inode,
            size,
            runs,
            file,
            path: m.source.clone(),
        });
        state.memfds.push(m.entry.clone());
    }
    if !sysv.is_empty() {
        let text = std::fs::read_to_string("/proc/sysvipc/shm")
            .map_err(|source| ShmemError::SysvList { source })?;
        let listed = parse_sysvipc_shm(&text);
        for (id, pid, path) in sysv {
            let info = listed
                .iter()
                .find(|i| i.id == id)
                .ok_or(ShmemError::SysvMissing { pid, id })?;
            let file = open(pid, id, &path)?;
            let contents = ShmemContents {
                shmid: id,
                size: info.size,
                runs: vec![(0, info.size)],
                file,
                path,
            };
            tracing::debug!(id, key = info.key, size = info.size, "SysV segment");
            state.sysv.push(SysvSegment {
                entry: IpcShmEntry {
                    desc: IpcDescEntry {
                        // The key's bits, as the kernel's key_t holds them.
                        key: u32::from_ne_bytes(info.key.to_ne_bytes()),
                        uid: info.uid,
                        gid: info.gid,
                        cuid: info.cuid,
                        cgid: info.cgid,
                        mode: info.mode & SHM_MODE_BITS,
                        id: u32::try_from(id).unwrap_or(u32::MAX),
                    },
                    size: info.size,
                    in_pagemaps: None,
                    hugetlb_flag: None,
                },
                contents,
            });
        }
    }
    Ok(state)
}

/// A memfd open file description (`files.img` id `id`) and the memfd inode behind it.
/// `source` is an fd or a mapping of `pid`; `shown` the kernel's `/memfd:NAME (deleted)`.
pub fn memfd_file(
    pid: Pid,
    source: PathBuf,
    shown: &str,
    id: u32,
    flags: u32,
    pos: u64,
) -> Result<(FileEntry, MemfdInode), ShmemError> {
    let name = shown.strip_prefix("/memfd:").unwrap_or(shown);
    let name = name.strip_suffix(" (deleted)").unwrap_or(name);
    let inode = memfd_inode(pid, source, name)?;
    let entry = FileEntry {
        r#type: FdTypes::Memfd as i32,
        id,
        memfd: Some(MemfdFileEntry {
            id,
            flags,
            pos,
            fown: FownEntry::default(),
            inode_id: inode.entry.shmid,
        }),
        ..FileEntry::default()
    };
    Ok((entry, inode))
}

/// The memfd inode behind `source` (an fd or a mapping of `pid`), as `memfd.img` has it.
pub fn memfd_inode(pid: Pid, source: PathBuf, name: &str) -> Result<MemfdInode, ShmemError> {
    let meta = std::fs::metadata(&source).map_err(|e| ShmemError::Open {
        pid,
        inode: 0,
        path: source.clone(),
        source: e,
    })?;
    let file = open(pid, meta.ino(), &source)?;
    // A memfd made without MFD_ALLOW_SEALING answers F_SEAL_SEAL alone, as on restore.
    let seals = rustix::fs::fcntl_get_seals(&file)
        .map(|s| s.bits())
        .unwrap_or(rustix::fs::SealFlags::SEAL.bits());
    let inode = u32::try_from(meta.ino()).unwrap_or(u32::MAX);
    Ok(MemfdInode {
        entry: MemfdInodeEntry {
            name: name.to_owned(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            shmid: inode,
            seals,
            inode_id: meta.ino(),
            hugetlb_flag: None,
            mode: Some(meta.mode() & 0o7777),
        },
        source,
        pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysvipc_lines_parse_with_octal_perms_and_signed_keys() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                    \x20     4660          7  1640                 10000  8362     0      1     5     6     7     8          0          0 1795317113                     0                     0\n\
                    \x20       -1          9   600                  4096  8362     0      0     0     0     0     0          0          0 1795317113                     0                     0\n";
        let got = parse_sysvipc_shm(text);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            SysvInfo {
                key: 4660,
                id: 7,
                mode: 0o1640,
                size: 10000,
                uid: 5,
                gid: 6,
                cuid: 7,
                cgid: 8
            }
        );
        assert_eq!(got[1].key, -1);
        assert_eq!(got[1].mode & SHM_MODE_BITS, 0o600);
        assert_eq!(got[0].mode & SHM_MODE_BITS, 0o1640, "SHM_DEST is kept");
    }

    #[test]
    fn only_written_pages_of_a_shmem_file_are_read() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(16 * PAGE_SIZE).unwrap();
        file.write_all_at(&[7u8; 10], 2 * PAGE_SIZE + 5).unwrap();
        file.write_all_at(&[9u8; 1], 9 * PAGE_SIZE).unwrap();
        let path = PathBuf::from("t");
        let runs = written_runs(&file, 1, &path, 8 * PAGE_SIZE).unwrap();
        // Filesystems may report data at a coarser grain; the written bytes must be there,
        // and nothing past the size asked for.
        assert!(runs
            .iter()
            .all(|(off, len)| off % PAGE_SIZE == 0 && off + len <= 8 * PAGE_SIZE));
        let object = ShmemContents {
            shmid: 1,
            size: 8 * PAGE_SIZE,
            runs,
            file,
            path,
        };
        let mut seen = Vec::new();
        object
            .for_each_chunk::<ShmemError>(|off, bytes| {
                seen.push((off, bytes.to_vec()));
                Ok(())
            })
            .unwrap();
        let byte_at = |addr: u64| {
            seen.iter()
                .find(|(off, b)| addr >= *off && addr < off + b.len() as u64)
                .map(|(off, b)| b[usize::try_from(addr - off).unwrap()])
        };
        assert_eq!(byte_at(2 * PAGE_SIZE + 5), Some(7));
        assert_eq!(byte_at(2 * PAGE_SIZE + 14), Some(7));
        assert_eq!(byte_at(9 * PAGE_SIZE), None);
    }
}
