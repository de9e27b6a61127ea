//! Identifiers of kernel objects in another process.
//!
//! Pids are reused by the kernel: a `Pid` names a process only while something
//! (a ptrace attachment, a pidfd, being its parent) keeps it from being reaped.

use std::fmt;
use std::num::NonZeroI32;

/// An id that is zero or negative where a positive one is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value} is not a positive id")]
pub struct InvalidId {
    /// Which kind of id was expected.
    pub kind: &'static str,
    /// The rejected value.
    pub value: i64,
}

macro_rules! positive_id {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(NonZeroI32);

        impl $name {
            /// The id, if `raw` is positive.
            pub fn from_raw(raw: i32) -> Option<Self> {
                if raw > 0 {
                    NonZeroI32::new(raw).map(Self)
                } else {
                    None
                }
            }

            /// The id as the kernel spells it.
            pub fn as_raw(self) -> i32 {
                self.0.get()
            }
        }

        impl TryFrom<i32> for $name {
            type Error = InvalidId;
            fn try_from(raw: i32) -> Result<Self, InvalidId> {
                Self::from_raw(raw).ok_or(InvalidId {
                    kind: $kind,
                    value: i64::from(raw),
                })
            }
        }

        impl TryFrom<u32> for $name {
            type Error = InvalidId;
            fn try_from(raw: u32) -> Result<Self, InvalidId> {
                i32::try_from(raw)
                    .ok()
                    .and_then(Self::from_raw)
                    .ok_or(InvalidId {
                        kind: $kind,
                        value: i64::from(raw),
                    })
            }
        }

        impl TryFrom<i64> for $name {
            type Error = InvalidId;
            fn try_from(raw: i64) -> Result<Self, InvalidId> {
                i32::try_from(raw)
                    .ok()
                    .and_then(Self::from_raw)
                    .ok_or(InvalidId {
                        kind: $kind,
                        value: raw,
                    })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", $kind, self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                let raw: i64 = s.trim().parse().map_err(|_| InvalidId {
                    kind: $kind,
                    value: 0,
                })?;
                Self::try_from(raw)
            }
        }
    };
}

positive_id!(
    Pid,
    "pid",
    "A process (thread group) id, as seen in the caller's pid namespace."
);
positive_id!(
    Tid,
    "tid",
    "A thread id. The leader's tid equals its process's pid; other tids are not pids."
);

impl Pid {
    /// The tid of this process's group leader (always equal to the pid).
    pub fn leader(self) -> Tid {
        Tid(self.0)
    }
}

impl Tid {
    /// This thread's tid as a pid, which is right only if it leads its thread group
    /// `tgid`; `None` otherwise.
    pub fn as_leader_of(self, tgid: Pid) -> Option<Pid> {
        (self.0 == tgid.0).then_some(tgid)
    }

    /// Treats this tid as a pid for interfaces (`/proc/TID`, `process_vm_readv`,
    /// `kill`-free calls) that accept any thread id where a pid is asked for.
    pub fn as_proc_pid(self) -> Pid {
        Pid(self.0)
    }
}

impl From<Pid> for Tid {
    fn from(pid: Pid) -> Self {
        pid.leader()
    }
}

/// An address in another process's address space; never dereferenced by us.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RemoteAddr(pub u64);

impl RemoteAddr {
    /// The raw address.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `self + off`, or `None` if it overflows.
    pub fn checked_add(self, off: u64) -> Option<RemoteAddr> {
        self.0.checked_add(off).map(RemoteAddr)
    }

    /// `self + off`, saturating at the top of the address space.
    pub fn saturating_add(self, off: u64) -> RemoteAddr {
        RemoteAddr(self.0.saturating_add(off))
    }

    /// Whether the address is a multiple of the page size.
    pub fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(crate::PAGE_SIZE)
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteAddr({:#x})", self.0)
    }
}

impl From<u64> for RemoteAddr {
    fn from(v: u64) -> Self {
        RemoteAddr(v)
    }
}

/// A file descriptor number in another process's fd table. It is never one of
/// ours: turn it into an fd we hold with [`crate::pidfd::PidFd::getfd`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TargetFd(pub i32);

impl TargetFd {
    /// The raw number in the target's table.
    pub fn as_raw(self) -> i32 {
        self.0
    }
}

impl fmt::Display for TargetFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_non_positive() {
        assert!(Pid::from_raw(0).is_none());
        assert!(Pid::from_raw(-3).is_none());
        assert_eq!(Pid::try_from(7).map(Pid::as_raw), Ok(7));
        assert!(Tid::try_from(u32::MAX).is_err());
        assert!(Pid::try_from(i64::from(i32::MAX) + 1).is_err());
        assert_eq!("42".parse::<Pid>().map(Pid::as_raw), Ok(42));
    }

    #[test]
    fn leader_conversion() {
        let pid = Pid::from_raw(10).expect("positive");
        let other = Tid::from_raw(11).expect("positive");
        assert_eq!(pid.leader().as_leader_of(pid), Some(pid));
        assert_eq!(other.as_leader_of(pid), None);
    }
}
