//! Kernel-object primitives that no safe wrapper offers.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};

use rustix::io::Errno;

/// `TFD_IOC_SET_TICKS`: `_IOW('T', 0, u64)`.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// Sets the count of expirations a timerfd reports but that were not read yet, as a dump
/// saw them (the kernel offers this for checkpoint/restore only).
pub fn timerfd_set_ticks(fd: impl AsFd, ticks: u64) -> Result<(), Errno> {
    let value = ticks;
    // SAFETY: TFD_IOC_SET_TICKS reads one u64 through the pointer, which points at a
    // live local for the whole call.
    let ret = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), TFD_IOC_SET_TICKS, &raw const value) };
    if ret < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL));
    }
    Ok(())
}

/// `open_by_handle_at(mount, handle, O_PATH)`: reaches the inode behind a file handle (as an
/// inotify watch shows it in fdinfo) on the filesystem `mount` is on. Needs
/// CAP_DAC_READ_SEARCH.
pub fn open_by_handle(
    mount: impl AsFd,
    handle_type: i32,
    handle: &[u8],
) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    let bytes = u32::try_from(handle.len()).map_err(|_| Errno::INVAL)?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes. u64 words keep
    // the buffer aligned for the header.
    let mut words = vec![0u64; 1 + handle.len().div_ceil(8)];
    let mut buf: Vec<u8> = Vec::with_capacity(8 + handle.len());
    buf.extend_from_slice(&bytes.to_ne_bytes());
    buf.extend_from_slice(&handle_type.to_ne_bytes());
    buf.extend_from_slice(handle);
    for (word, chunk) in words.iter_mut().zip(buf.chunks(8)) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(w);
    }
    let ptr = words.as_mut_ptr().cast::<libc::file_handle>();
    // SAFETY: `ptr` points at a live, aligned buffer holding a file_handle header followed
    // by `handle_bytes` bytes, as the kernel reads it.
    let ret = unsafe {
        libc::open_by_handle_at(
            mount.as_fd().as_raw_fd(),
            ptr,
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL));
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ticks_shows_as_pending_expirations() {
        let fd = rustix::time::timerfd_create(
            rustix::time::TimerfdClockId::Monotonic,
            rustix::time::TimerfdFlags::NONBLOCK,
        )
        .expect("timerfd");
        timerfd_set_ticks(&fd, 5).expect("set ticks");
        let mut buf = [0u8; 8];
        assert_eq!(rustix::io::read(&fd, &mut buf).expect("read"), 8);
        assert_eq!(u64::from_ne_bytes(buf), 5);
    }
}
