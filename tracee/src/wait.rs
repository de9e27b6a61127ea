//! `waitpid(2)` on one thread with `__WALL`, decoded for ptrace use.
#![allow(unsafe_code)]

use crate::ids::Tid;
use rustix::io::Errno;

/// What `waitpid` reported about one traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEvent {
    /// The thread exited with this code.
    Exited(i32),
    /// The thread was killed by this signal.
    Signaled(i32),
    /// A ptrace stop. `event` is the `PTRACE_EVENT_*` from bits 16..24 (0 for a
    /// signal-delivery-stop), `sig` the stop signal (`SIGTRAP | 0x80` for a
    /// syscall stop under `PTRACE_O_TRACESYSGOOD`).
    Stopped { sig: i32, event: i32 },
}

impl WaitEvent {
    pub(crate) fn decode(status: i32) -> WaitEvent {
        if status & 0xff == 0x7f {
            WaitEvent::Stopped {
                sig: (status >> 8) & 0xff,
                event: (status >> 16) & 0xff,
            }
        } else if status & 0x7f == 0 {
            WaitEvent::Exited((status >> 8) & 0xff)
        } else {
            WaitEvent::Signaled(status & 0x7f)
        }
    }
}

/// Waits for the next state change of `tid` (any child kind, `__WALL`).
pub(crate) fn wait_tid(tid: Tid) -> Result<WaitEvent, Errno> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live local the kernel writes one int into.
        let ret = unsafe { libc::waitpid(tid.as_raw(), &mut status, libc::__WALL) };
        if ret < 0 {
            let errno =
                Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL);
            if errno == Errno::INTR {
                continue;
            }
            return Err(errno);
        }
        return Ok(WaitEvent::decode(status));
    }
}

/// The errno of the last failed libc call of this thread.
pub(crate) fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_statuses() {
        assert_eq!(WaitEvent::decode(0x0300), WaitEvent::Exited(3));
        assert_eq!(WaitEvent::decode(9), WaitEvent::Signaled(9));
        assert_eq!(
            WaitEvent::decode(0x8057f),
            WaitEvent::Stopped { sig: 5, event: 8 }
        );
        assert_eq!(
            WaitEvent::decode(0x137f),
            WaitEvent::Stopped {
                sig: 0x13,
                event: 0
            }
        );
    }
}
