//! Keeping ckpt-dump off the CPU its program last ran on.

use tracee::Pid;

/// ckpt-dump kept off the CPU the program last ran on, until dropped (best effort: with
/// no other CPU allowed, nothing changes).
///
/// While the program runs, that CPU is its own. The injections pin ckpt-dump next to the
/// thread they run in; once the tree is let go, ckpt-dump would otherwise go on there,
/// reading `/proc` for milliseconds, while the program waits for its turn on that CPU: a
/// gap as long as the freeze's, or longer. After the switch the program runs again, on
/// this machine too when the migration is local, and its affinity brings it back to that
/// CPU: its faults are served from another, not from behind it.
pub(crate) struct Aside {
    previous: Option<rustix::thread::CpuSet>,
}

impl Aside {
    pub(crate) fn from_cpu_of(pid: Pid) -> Aside {
        let none = Aside { previous: None };
        let Ok(stat) = tracee::proc::stat::read(pid) else {
            return none;
        };
        let Ok(cpu) = usize::try_from(stat.processor) else {
            return none;
        };
        let Ok(previous) = rustix::thread::sched_getaffinity(None) else {
            return none;
        };
        let mut elsewhere = previous;
        if cpu < rustix::thread::CpuSet::MAX_CPU {
            elsewhere.unset(cpu);
        }
        if elsewhere.count() == 0 || rustix::thread::sched_setaffinity(None, &elsewhere).is_err() {
            return none;
        }
        Aside {
            previous: Some(previous),
        }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            if let Err(errno) = rustix::thread::sched_setaffinity(None, previous) {
                tracing::warn!(%errno, "could not take back our CPU affinity");
            }
        }
    }
}
