//! Reading and writing another process's memory.
//!
//! `process_vm_readv` is the fast path (several GB/s with large iovecs) but it
//! honours VMA protection; `/proc/PID/mem` goes through `FOLL_FORCE` and reads
//! `PROT_NONE` pages and writes read-only or executable private pages (COW),
//! so it is the fallback for reads and the path for writes into text.
//!
//! These functions are safe because the memory is another process's: the
//! caller must not point them at ckpt's own pid, whose memory Rust owns (as
//! with `/proc/self/mem`, that is outside what the type system can check).
//!
//! References: [process_vm_readv(2)](https://man7.org/linux/man-pages/man2/process_vm_readv.2.html),
//! [proc_pid_mem(5)](https://man7.org/linux/man-pages/man5/proc_pid_mem.5.html).

use std::fs::{File, OpenOptions};
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use rustix::io::Errno;

use crate::ids::{Pid, RemoteAddr};

/// Bytes moved per `process_vm_readv` call: 4 MiB measured fastest here.
const CHUNK: usize = 4 << 20;
/// The kernel's limit on iovecs per call (`UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// A failed access to another process's memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Opening `/proc/PID/mem`.
    #[error("pid {pid}: open {}", path.display())]
    Open {
        pid: Pid,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The memory could not be read (unmapped, or an I/O error on a file mapping).
    #[error("pid {pid}: read {len} bytes at {addr}")]
    Read {
        pid: Pid,
        addr: RemoteAddr,
        len: usize,
        #[source]
        errno: Errno,
    },
    /// The memory could not be written.
    #[error("pid {pid}: write {len} bytes at {addr}")]
    Write {
        pid: Pid,
        addr: RemoteAddr,
        len: usize,
        #[source]
        errno: Errno,
    },
    /// Part of the range is not mapped.
    #[error("pid {pid}: {addr} is not mapped ({done} of {len} bytes done)")]
    Short {
        pid: Pid,
        addr: RemoteAddr,
        done: usize,
        len: usize,
    },
    /// A vectored read whose buffer does not match the ranges' total length.
    #[error("pid {pid}: buffer of {buf} bytes for ranges totalling {total}")]
    BufferSize { pid: Pid, buf: usize, total: usize },
    /// An access beyond the end of a scratch area.
    #[error("pid {pid}: {len} bytes at offset {offset} exceed the {size}-byte area at {addr}")]
    OutOfRange {
        pid: Pid,
        addr: RemoteAddr,
        offset: u64,
        len: usize,
        size: u64,
    },
}

/// A contiguous range of another process's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRange {
    /// First byte.
    pub addr: RemoteAddr,
    /// Length in bytes.
    pub len: usize,
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_raw_os_error(e as i32)
}

fn mem_path(pid: Pid) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/mem"))
}

fn addr_offset(addr: RemoteAddr, done: usize) -> RemoteAddr {
    addr.saturating_add(u64::try_from(done).unwrap_or(u64::MAX))
}

fn to_usize(addr: RemoteAddr) -> usize {
    usize::try_from(addr.get()).unwrap_or(usize::MAX)
}

/// Reads `buf.len()` bytes at `addr` with `process_vm_readv`, falling back to
/// `/proc/PID/mem` for what that cannot read (`PROT_NONE` pages).
pub fn read_remote(pid: Pid, addr: RemoteAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
    let done = read_vm(pid, addr, buf)?;
    if done < buf.len() {
        let mem = RemoteMem::open_read(pid)?;
        mem.read_at(addr_offset(addr, done), &mut buf[done..])?;
    }
    Ok(())
}

/// `process_vm_readv` in chunks; returns how many bytes it read before the first
/// unreadable page.
fn read_vm(pid: Pid, addr: RemoteAddr, buf: &mut [u8]) -> Result<usize, MemoryError> {
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(CHUNK);
        let at = addr_offset(addr, done);
        let remote = [RemoteIoVec {
            base: to_usize(at),
            len: n,
        }];
        let mut local = [IoSliceMut::new(&mut buf[done..done + n])];
        match process_vm_readv(npid, &mut local, &remote) {
            Ok(0) => break,
            Ok(got) => done += got,
            Err(nix::errno::Errno::EFAULT) => break,
            Err(e) => {
                return Err(MemoryError::Read {
                    pid,
                    addr: at,
                    len: n,
                    errno: nix_errno(e),
                })
            }
        }
    }
    Ok(done)
}

/// Reads many ranges into `buf` (their concatenation) with few
/// `process_vm_readv` calls of up to 4 MiB and 1024 iovecs each; ranges it
/// cannot read are read through `/proc/PID/mem`.
pub fn read_remote_vectored(
    pid: Pid,
    ranges: &[RemoteRange],
    buf: &mut [u8],
) -> Result<(), MemoryError> {
    check_total(pid, ranges, buf.len())?;
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    let mut buf_off = 0;
    for (batch, bytes) in batches(ranges) {
        let remote = iovecs(batch);
        let dst = &mut buf[buf_off..buf_off + bytes];
        let got = {
            let mut local = [IoSliceMut::new(dst)];
            match process_vm_readv(npid, &mut local, &remote) {
                Ok(n) => n,
                Err(nix::errno::Errno::EFAULT) => 0,
                Err(e) => {
                    return Err(MemoryError::Read {
                        pid,
                        addr: batch[0].addr,
                        len: bytes,
                        errno: nix_errno(e),
                    })
                }
            }
        };
        // The kernel stops at the first unreadable page: finish range by range.
        for (addr, part) in unfinished(batch, got) {
            read_remote(pid, addr, &mut dst[part])?;
        }
        buf_off += bytes;
    }
    Ok(())
}

/// Fails unless the ranges add up to `len`, the local buffer's size.
fn check_total(pid: Pid, ranges: &[RemoteRange], len: usize) -> Result<(), MemoryError> {
    let total = ranges
        .iter()
        .try_fold(0usize, |acc, r| acc.checked_add(r.len))
        .unwrap_or(usize::MAX);
    if total != len {
        return Err(MemoryError::BufferSize {
            pid,
            buf: len,
            total,
        });
    }
    Ok(())
}

/// Splits `ranges` into the batches of one `process_vm_readv`/`process_vm_writev` call
/// each, with their byte counts: whole ranges, at most `MAX_IOV` of them and `CHUNK`
/// bytes (a single larger range goes alone).
fn batches(ranges: &[RemoteRange]) -> impl Iterator<Item = (&[RemoteRange], usize)> {
    let mut rest = ranges;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = 0;
        let mut bytes = 0usize;
        while end < rest.len() && end < MAX_IOV {
            let len = rest[end].len;
            if end > 0 && bytes + len > CHUNK {
                break;
            }
            bytes += len;
            end += 1;
        }
        let (batch, tail) = rest.split_at(end);
        rest = tail;
        Some((batch, bytes))
    })
}

fn iovecs(batch: &[RemoteRange]) -> Vec<RemoteIoVec> {
    batch
        .iter()
        .map(|r| RemoteIoVec {
            base: to_usize(r.addr),
            len: r.len,
        })
        .collect()
}

/// What a call that moved only the first `done` bytes of `batch` left: for each range
/// not finished, where its rest starts in the target and which bytes of the batch's
/// buffer it is.
fn unfinished(
    batch: &[RemoteRange],
    done: usize,
) -> impl Iterator<Item = (RemoteAddr, std::ops::Range<usize>)> + '_ {
    batch
        .iter()
        .scan(0usize, |off, r| {
            let start = *off;
            *off += r.len;
            Some((r, start))
        })
        .filter(move |(r, start)| start + r.len > done)
        .map(move |(r, start)| {
            let skip = done.saturating_sub(start);
            (addr_offset(r.addr, skip), start + skip..start + r.len)
        })
}

/// Writes `data` at `addr` through `/proc/PID/mem`, which ignores the VMA's
/// protection: it can change the target's code. Returns an error if any part
/// is unmapped (or a read-only shared file mapping: EIO).
pub fn write_remote(pid: Pid, addr: RemoteAddr, data: &[u8]) -> Result<(), MemoryError> {
    RemoteMem::open(pid)?.write_at(addr, data)
}

/// Writes `data` at `addr` with `process_vm_writev` (faster, but only into
/// writable memory), falling back to `/proc/PID/mem` for the rest.
pub fn write_remote_fast(pid: Pid, addr: RemoteAddr, data: &[u8]) -> Result<(), MemoryError> {
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(CHUNK);
        let at = addr_offset(addr, done);
        let remote = [RemoteIoVec {
            base: to_usize(at),
            len: n,
        }];
        let local = [std::io::IoSlice::new(&data[done..done + n])];
        match process_vm_writev(npid, &local, &remote) {
            Ok(0) | Err(nix::errno::Errno::EFAULT) => break,
            Ok(got) => done += got,
            Err(e) => {
                return Err(MemoryError::Write {
                    pid,
                    addr: at,
                    len: n,
                    errno: nix_errno(e),
                })
            }
        }
    }
    if done < data.len() {
        RemoteMem::open(pid)?.write_at(addr_offset(addr, done), &data[done..])?;
    }
    Ok(())
}

/// Writes `data` (the concatenation of the ranges' contents) into many
/// ranges with few `process_vm_writev` calls of up to 4 MiB and 1024 iovecs
/// each; ranges it cannot write (not writable) go through `/proc/PID/mem`.
pub fn write_remote_vectored(
    pid: Pid,
    ranges: &[RemoteRange],
    data: &[u8],
) -> Result<(), MemoryError> {
    check_total(pid, ranges, data.len())?;
    let npid = nix::unistd::Pid::from_raw(pid.as_raw());
    let mut data_off = 0;
    let mut mem: Option<RemoteMem> = None;
    for (batch, bytes) in batches(ranges) {
        let remote = iovecs(batch);
        let src = &data[data_off..data_off + bytes];
        let done = match process_vm_writev(npid, &[std::io::IoSlice::new(src)], &remote) {
            Ok(n) => n,
            Err(nix::errno::Errno::EFAULT) => 0,
            Err(e) => {
                return Err(MemoryError::Write {
                    pid,
                    addr: batch[0].addr,
                    len: bytes,
                    errno: nix_errno(e),
                })
            }
        };
        // Stopped at the first page it may not write: finish range by range.
        for (addr, part) in unfinished(batch, done) {
            let mem = match &mut mem {
                Some(m) => m,
                None => mem.insert(RemoteMem::open(pid)?),
            };
            mem.write_at(addr, &src[part])?;
        }
        data_off += bytes;
    }
    Ok(())
}

/// An open `/proc/PID/mem`, for many accesses to one process.
#[derive(Debug)]
pub struct RemoteMem {
    pid: Pid,
    file: File,
}

impl RemoteMem {
    /// Opens `/proc/PID/mem` for reading and writing.
    pub fn open(pid: Pid) -> Result<RemoteMem, MemoryError> {
        Self::open_with(pid, true)
    }

    /// Opens `/proc/PID/mem` for reading only.
    pub fn open_read(pid: Pid) -> Result<RemoteMem, MemoryError> {
        Self::open_with(pid, false)
    }

    fn open_with(pid: Pid, write: bool) -> Result<RemoteMem, MemoryError> {
        let path = mem_path(pid);
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|source| MemoryError::Open { pid, path, source })?;
        Ok(RemoteMem { pid, file })
    }

    /// The process whose memory this is.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// `pread` of `buf.len()` bytes at `addr`; bypasses protection.
    pub fn read_at(&self, addr: RemoteAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let pid = self.pid;
        let len = buf.len();
        self.whole(
            addr,
            len,
            |done, offset| self.file.read_at(&mut buf[done..], offset),
            |addr, len, errno| MemoryError::Read {
                pid,
                addr,
                len,
                errno,
            },
        )
    }

    /// `pwrite` of `data` at `addr`; bypasses protection (writes into text COW).
    pub fn write_at(&self, addr: RemoteAddr, data: &[u8]) -> Result<(), MemoryError> {
        let pid = self.pid;
        self.whole(
            addr,
            data.len(),
            |done, offset| self.file.write_at(&data[done..], offset),
            |addr, len, errno| MemoryError::Write {
                pid,
                addr,
                len,
                errno,
            },
        )
    }

    /// Repeats `io(done, offset)`, one `pread` or `pwrite` of what is left, until `len`
    /// bytes are moved: the kernel may move fewer at a time. `failed` names the error
    /// with the address and length still to go.
    fn whole(
        &self,
        addr: RemoteAddr,
        len: usize,
        mut io: impl FnMut(usize, u64) -> std::io::Result<usize>,
        failed: impl Fn(RemoteAddr, usize, Errno) -> MemoryError,
    ) -> Result<(), MemoryError> {
        let mut done = 0;
        while done < len {
            let at = addr_offset(addr, done);
            match io(done, at.get()) {
                Ok(0) => {
                    return Err(MemoryError::Short {
                        pid: self.pid,
                        addr: at,
                        done,
                        len,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(at, len - done, io_errno(&e))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(addr: u64, len: usize) -> RemoteRange {
        RemoteRange {
            addr: RemoteAddr::from(addr),
            len,
        }
    }

    #[test]
    fn batches_hold_whole_ranges_up_to_a_chunk() {
        let ranges = [
            range(0x1000, CHUNK - 4096),
            range(0x10_0000_0000, 4096),
            range(0x20_0000_0000, 4096),
            range(0x30_0000_0000, 2 * CHUNK),
        ];
        let sizes: Vec<_> = batches(&ranges).map(|(b, n)| (b.len(), n)).collect();
        assert_eq!(sizes, [(2, CHUNK), (1, 4096), (1, 2 * CHUNK)]);
    }

    #[test]
    fn batches_hold_at_most_max_iov_ranges() {
        let ranges: Vec<_> = (0..MAX_IOV as u64 + 1)
            .map(|i| range(0x1000 * (2 * i + 1), 16))
            .collect();
        let sizes: Vec<_> = batches(&ranges).map(|(b, n)| (b.len(), n)).collect();
        assert_eq!(sizes, [(MAX_IOV, MAX_IOV * 16), (1, 16)]);
    }

    #[test]
    fn unfinished_starts_where_the_call_stopped() {
        let batch = [range(0x1000, 100), range(0x5000, 200), range(0x9000, 50)];
        let rest: Vec<_> = unfinished(&batch, 150).map(|(a, r)| (a.get(), r)).collect();
        assert_eq!(rest, [(0x5032, 150..300), (0x9000, 300..350)]);
        assert_eq!(unfinished(&batch, 350).count(), 0);
        assert_eq!(unfinished(&batch, 0).count(), 3);
    }
}
