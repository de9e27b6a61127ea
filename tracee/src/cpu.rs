//! Pinning our own thread to the CPU a target thread last ran on.
//!
//! Every ptrace stop/resume and userfaultfd wake that crosses CPUs costs tens
//! of microseconds in a VM (about 50 µs each way here); on the same CPU an
//! injected syscall round trip is 5-8 µs. So the tracer pins itself next to
//! the tracee for bursts of injection or fault service.

use crate::ids::{Pid, Tid};
use crate::proc::{self, ProcError};
use rustix::io::Errno;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// Pinning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// Reading the target thread's last CPU.
    #[error("tid {tid}: find its cpu")]
    Stat {
        tid: Tid,
        #[source]
        source: ProcError,
    },
    /// The CPU number is out of range for a cpu set.
    #[error("cpu {cpu} out of range")]
    CpuRange { cpu: u32 },
    /// `sched_getaffinity`/`sched_setaffinity` on our own thread.
    #[error("sched_setaffinity to cpu {cpu}")]
    Affinity {
        cpu: u32,
        #[source]
        errno: Errno,
    },
}

/// Our thread, pinned to one CPU; dropping it restores the previous affinity.
#[derive(Debug)]
pub struct CpuPin {
    cpu: u32,
    previous: CpuSet,
}

impl CpuPin {
    /// Pins the calling thread to `cpu` (`sched_setaffinity(0, ...)`).
    pub fn to_cpu(cpu: u32) -> Result<CpuPin, PinError> {
        let idx = usize::try_from(cpu).map_err(|_| PinError::CpuRange { cpu })?;
        if idx >= CpuSet::MAX_CPU {
            return Err(PinError::CpuRange { cpu });
        }
        let previous =
            sched_getaffinity(None).map_err(|errno| PinError::Affinity { cpu, errno })?;
        let mut set = CpuSet::new();
        set.set(idx);
        sched_setaffinity(None, &set).map_err(|errno| PinError::Affinity { cpu, errno })?;
        Ok(CpuPin { cpu, previous })
    }

    /// Pins the calling thread to the CPU `tid` of `pid` last ran on (field 39
    /// of `/proc/PID/task/TID/stat`). A stopped thread wakes on that CPU.
    pub fn next_to(pid: Pid, tid: Tid) -> Result<CpuPin, PinError> {
        let stat =
            proc::stat::read_thread(pid, tid).map_err(|source| PinError::Stat { tid, source })?;
        CpuPin::to_cpu(stat.processor)
    }

    /// The CPU we are pinned to.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        if let Err(errno) = sched_setaffinity(None, &self.previous) {
            tracing::warn!(%errno, "could not restore our cpu affinity");
        }
    }
}

impl crate::ptrace::Tracee {
    /// Pins the calling (tracer) thread next to this tracee for a burst of
    /// injected syscalls; dropping the guard restores our affinity.
    pub fn pin_tracer(&self) -> Result<CpuPin, PinError> {
        CpuPin::next_to(self.pid(), self.tid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_and_restore() {
        let before = sched_getaffinity(None).expect("affinity");
        let cpu = u32::try_from(rustix::thread::sched_getcpu()).expect("cpu fits");
        {
            let pin = CpuPin::to_cpu(cpu).expect("pin");
            assert_eq!(pin.cpu(), cpu);
            let now = sched_getaffinity(None).expect("affinity");
            assert_eq!(now.count(), 1);
        }
        assert_eq!(sched_getaffinity(None).expect("affinity"), before);
    }
}
