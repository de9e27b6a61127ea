//! SysV IPC from ckpt's own side: removing a shared memory segment by id. Neither rustix
//! nor nix wraps `shmctl`.
#![allow(unsafe_code)]

use crate::Errno;

/// `shmctl(id, IPC_RMID, NULL)`: marks SysV shared memory segment `id` for removal. It goes
/// at once if nothing has it attached, otherwise with its last detach; its key is free
/// again from now on.
///
/// # Warning
///
/// Segment ids are reused once a segment is gone: `id` must be known to be the segment the
/// caller means (e.g. checked against `/proc/sysvipc/shm` just before), or this removes
/// someone else's.
///
/// # References
///
/// [`shmctl(2)`](https://man7.org/linux/man-pages/man2/shmctl.2.html)
pub fn shm_remove(id: i32) -> Result<(), Errno> {
    // SAFETY: IPC_RMID reads and writes no buffer: the kernel ignores the pointer, and
    // null is what the man page passes.
    let ret = unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    if ret == -1 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: i32) -> bool {
        std::fs::read_to_string("/proc/sysvipc/shm")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(id.to_string().as_str()))
    }

    #[test]
    fn a_removed_segment_is_gone_and_a_second_removal_fails() {
        // SAFETY: shmget takes no pointer; a private 4 KiB segment of ours.
        let id = unsafe { libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600) };
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        assert!(listed(id));
        assert_eq!(shm_remove(id), Ok(()));
        assert!(!listed(id), "segment {id} is still listed");
        assert_eq!(shm_remove(id), Err(Errno::INVAL));
    }
}
