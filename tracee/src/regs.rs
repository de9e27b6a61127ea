//! The general-purpose registers of an x86_64 thread and the signal mask.

/// x86_64 `struct user_regs_struct`, as `PTRACE_GETREGS` returns it
/// (including `fs_base`/`gs_base` and `orig_rax`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The syscall number while the thread is inside a syscall, else `-1` as u64.
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// Kernel-internal restart codes a thread stopped inside a syscall can hold in `rax`.
pub mod restart {
    /// `-ERESTARTSYS`: restart if the handler has `SA_RESTART`.
    pub const ERESTARTSYS: i64 = -512;
    /// `-ERESTARTNOINTR`: always restart.
    pub const ERESTARTNOINTR: i64 = -513;
    /// `-ERESTARTNOHAND`: restart if no handler ran.
    pub const ERESTARTNOHAND: i64 = -514;
    /// `-ERESTART_RESTARTBLOCK`: restart via `restart_syscall` and the task's restart block.
    pub const ERESTART_RESTARTBLOCK: i64 = -516;
}

/// What [`Regs::fix_syscall_restart`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartFixup {
    /// The thread was not stopped inside a restartable syscall.
    None,
    /// `rip` went back over the `syscall` instruction and `rax` holds the syscall
    /// number again: the call is re-issued when the thread resumes.
    Rewound,
    /// The call returns `-EINTR`, because its restart block (relative timeouts of
    /// `nanosleep`, `poll`, `futex`) is kernel state that does not survive a restore.
    Interrupted,
}

impl Regs {
    /// Whether the thread stopped inside a syscall (`orig_rax >= 0`).
    pub fn in_syscall(&self) -> bool {
        as_signed(self.orig_rax) >= 0
    }

    /// The syscall return value (or restart code) in `rax`, signed.
    pub fn rax_signed(&self) -> i64 {
        as_signed(self.rax)
    }

    /// Prepares registers saved from a thread stopped inside a syscall for a
    /// resume in a new process, doing what the kernel's signal-return path would
    /// have done, then sets `orig_rax = -1` so no further restart logic applies.
    pub fn fix_syscall_restart(&mut self) -> RestartFixup {
        let fixup = if !self.in_syscall() {
            RestartFixup::None
        } else {
            match self.rax_signed() {
                restart::ERESTARTSYS | restart::ERESTARTNOINTR | restart::ERESTARTNOHAND => {
                    self.rax = self.orig_rax;
                    self.rip = self.rip.wrapping_sub(2);
                    RestartFixup::Rewound
                }
                restart::ERESTART_RESTARTBLOCK => {
                    self.rax = as_unsigned(-i64::from(libc::EINTR));
                    RestartFixup::Interrupted
                }
                _ => RestartFixup::None,
            }
        };
        self.orig_rax = u64::MAX;
        fixup
    }
}

fn as_signed(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn as_unsigned(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// `Regs` mirrors `user_regs_struct` field by field, so both conversions copy the same
/// list; a field missing on either side fails to compile.
macro_rules! convert_user_regs {
    ($($field:ident),* $(,)?) => {
        impl From<libc::user_regs_struct> for Regs {
            fn from(r: libc::user_regs_struct) -> Self {
                Regs { $($field: r.$field),* }
            }
        }

        impl From<Regs> for libc::user_regs_struct {
            fn from(r: Regs) -> Self {
                libc::user_regs_struct { $($field: r.$field),* }
            }
        }
    };
}

convert_user_regs!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs,
);

/// A 64-bit signal set as the kernel stores it: bit `n - 1` is signal `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SigSet(pub u64);

impl SigSet {
    /// Every signal (the kernel ignores SIGKILL and SIGSTOP in a mask).
    pub const ALL: SigSet = SigSet(u64::MAX);
    /// No signal.
    pub const EMPTY: SigSet = SigSet(0);

    /// Whether signal `sig` (1..=64) is in the set.
    pub fn contains(self, sig: i32) -> bool {
        (1..=64).contains(&sig) && self.0 & (1u64 << (sig - 1)) != 0
    }

    /// Adds signal `sig` (1..=64); other values are ignored.
    pub fn insert(&mut self, sig: i32) {
        if (1..=64).contains(&sig) {
            self.0 |= 1u64 << (sig - 1);
        }
    }

    /// The signal numbers in the set, ascending.
    pub fn signals(self) -> impl Iterator<Item = i32> {
        (1..=64).filter(move |&s| self.contains(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_syscall(nr: u64, rax: i64) -> Regs {
        Regs {
            orig_rax: nr,
            rax: as_unsigned(rax),
            rip: 0x1002,
            ..Regs::default()
        }
    }

    #[test]
    fn restart_rewinds_erestartsys() {
        let mut r = in_syscall(0, restart::ERESTARTSYS);
        assert_eq!(r.fix_syscall_restart(), RestartFixup::Rewound);
        assert_eq!((r.rip, r.rax, r.orig_rax), (0x1000, 0, u64::MAX));
    }

    #[test]
    fn restartblock_becomes_eintr() {
        let mut r = in_syscall(230, restart::ERESTART_RESTARTBLOCK);
        assert_eq!(r.fix_syscall_restart(), RestartFixup::Interrupted);
        assert_eq!(r.rax_signed(), -4);
        assert_eq!(r.rip, 0x1002);
    }

    #[test]
    fn no_fixup_outside_syscall() {
        let mut r = in_syscall(u64::MAX, restart::ERESTARTSYS);
        assert_eq!(r.fix_syscall_restart(), RestartFixup::None);
        assert_eq!(r.rip, 0x1002);
        let mut r = in_syscall(1, 5);
        assert_eq!(r.fix_syscall_restart(), RestartFixup::None);
        assert_eq!(r.rax, 5);
    }

    #[test]
    fn sigset_bits() {
        let mut s = SigSet::EMPTY;
        s.insert(1);
        s.insert(64);
        s.insert(65);
        assert!(s.contains(1) && s.contains(64) && !s.contains(2));
        assert_eq!(s.signals().collect::<Vec<_>>(), vec![1, 64]);
    }
}
