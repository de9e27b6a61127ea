//! The `PROCMAP_QUERY` ioctl on `/proc/PID/maps` (Linux 6.11+): one VMA per
//! call, without text parsing, with the build-id of file-backed VMAs.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::ids::{Pid, RemoteAddr};
use crate::wait::last_errno;
use rustix::io::Errno;

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xc068_6611;
const COVERING_OR_NEXT_VMA: u64 = 0x10;
const NAME_MAX_LEN: u32 = 4096;
const BUILD_ID_MAX: u32 = 64;

/// A `PROCMAP_QUERY` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcmapError {
    /// Opening `/proc/PID/maps`.
    #[error("pid {pid}: open {}", path.display())]
    Open {
        pid: Pid,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The ioctl failed (ENOTTY: kernel older than 6.11).
    #[error("pid {pid}: PROCMAP_QUERY at {addr}")]
    Query {
        pid: Pid,
        addr: RemoteAddr,
        #[source]
        errno: Errno,
    },
}

/// One VMA as `PROCMAP_QUERY` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueriedVma {
    /// First byte.
    pub start: RemoteAddr,
    /// One past the last byte.
    pub end: RemoteAddr,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared.
    pub shared: bool,
    /// Page size of the mapping.
    pub page_size: u64,
    /// File offset in bytes.
    pub offset: u64,
    /// Inode of the backing file (0 if none).
    pub inode: u64,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Path or kernel name (`[heap]`...), `None` for plain anonymous memory.
    pub name: Option<String>,
    /// GNU build-id of the backing ELF file, if the kernel found one.
    pub build_id: Option<Vec<u8>>,
}

#[repr(C)]
#[derive(Default)]
struct RawQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// An open `/proc/PID/maps` for `PROCMAP_QUERY`.
#[derive(Debug)]
pub struct Procmap {
    pid: Pid,
    file: File,
}

impl Procmap {
    /// Opens `/proc/PID/maps`.
    pub fn open(pid: Pid) -> Result<Procmap, ProcmapError> {
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let file = File::open(&path).map_err(|source| ProcmapError::Open { pid, path, source })?;
        Ok(Procmap { pid, file })
    }

    /// The VMA covering `addr`, or the next one above it; `None` past the last.
    pub fn query(&self, addr: RemoteAddr) -> Result<Option<QueriedVma>, ProcmapError> {
        let mut name = vec![0u8; NAME_MAX_LEN as usize];
        let mut build_id = [0u8; BUILD_ID_MAX as usize];
        let mut q = RawQuery {
            size: std::mem::size_of::<RawQuery>() as u64,
            query_flags: COVERING_OR_NEXT_VMA,
            query_addr: addr.get(),
            vma_name_size: NAME_MAX_LEN,
            vma_name_addr: name.as_mut_ptr() as u64,
            build_id_size: BUILD_ID_MAX,
            build_id_addr: build_id.as_mut_ptr() as u64,
            ..RawQuery::default()
        };
        // SAFETY: `q` is a live procmap_query whose name and build-id pointers
        // point at `name` and `build_id` with the sizes given; both outlive the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                PROCMAP_QUERY,
                &mut q as *mut RawQuery,
            )
        };
        if ret < 0 {
            let errno = last_errno();
            if errno == Errno::NOENT {
                return Ok(None);
            }
            return Err(ProcmapError::Query {
                pid: self.pid,
                addr,
                errno,
            });
        }
        // Sizes are outputs now: name length including its NUL, build-id length.
        let name_len = usize::try_from(q.vma_name_size.min(NAME_MAX_LEN)).unwrap_or(0);
        let name =
            (name_len > 1).then(|| String::from_utf8_lossy(&name[..name_len - 1]).into_owned());
        let id_len = usize::try_from(q.build_id_size.min(BUILD_ID_MAX)).unwrap_or(0);
        Ok(Some(QueriedVma {
            start: RemoteAddr(q.vma_start),
            end: RemoteAddr(q.vma_end),
            read: q.vma_flags & 1 != 0,
            write: q.vma_flags & 2 != 0,
            exec: q.vma_flags & 4 != 0,
            shared: q.vma_flags & 8 != 0,
            page_size: q.vma_page_size,
            offset: q.vma_offset,
            inode: q.inode,
            dev_major: q.dev_major,
            dev_minor: q.dev_minor,
            name,
            build_id: (id_len > 0).then(|| build_id[..id_len].to_vec()),
        }))
    }

    /// Every VMA, ascending.
    pub fn all(&self) -> Result<Vec<QueriedVma>, ProcmapError> {
        let mut out = Vec::new();
        let mut addr = RemoteAddr(0);
        while let Some(v) = self.query(addr)? {
            addr = v.end;
            out.push(v);
            if addr.get() == 0 {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_maps_text() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let pm = Procmap::open(me).expect("open");
        let queried = match pm.all() {
            Ok(v) => v,
            Err(ProcmapError::Query {
                errno: Errno::NOTTY,
                ..
            }) => {
                eprintln!("skipped: PROCMAP_QUERY needs Linux 6.11");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let text = crate::proc::maps::read(me).expect("maps");
        // Our own maps change as the test harness allocates; compare a stable VMA.
        let vdso = text
            .iter()
            .find(|v| v.special_name() == Some("[vdso]"))
            .expect("vdso in maps");
        let q = queried
            .iter()
            .find(|v| v.start == vdso.start)
            .expect("vdso in query");
        assert_eq!(q.end, vdso.end);
        assert_eq!(q.name.as_deref(), Some("[vdso]"));
        assert!(q.exec && q.read && !q.write);
        // The test binary itself is file-backed with a build-id.
        let exe = std::env::current_exe().expect("exe");
        let exe = exe.to_string_lossy();
        let text_vma = queried
            .iter()
            .find(|v| v.name.as_deref() == Some(&*exe) && v.exec)
            .expect("our text");
        let from_file = crate::vdso::build_id(std::path::Path::new(&*exe)).expect("build id");
        assert_eq!(text_vma.build_id, from_file);
    }
}
