//! Pinning our own thread, and a target thread, to the CPU the target last ran on.
//!
//! Every ptrace stop/resume and userfaultfd wake that crosses CPUs costs tens
//! of microseconds in a VM (about 50 µs each way here); on the same CPU an
//! injected syscall round trip is 5-11 µs. So the tracer pins itself next to
//! the tracee for bursts of injection or fault service, and for injection pins
//! the tracee too (`cargo bench -p tracee --bench kernel_paths`: 45 µs per
//! injected getppid with only the tracer pinned, 11 µs with both).

use crate::ids::{Pid, Tid};
use crate::proc::{self, ProcError};
use rustix::io::Errno;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// Where the kernel lists the CPUs that may ever be online, and those online now.
pub const CPUS_POSSIBLE: &str = "/sys/devices/system/cpu/possible";
pub const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";

/// Parses a kernel CPU list (`0-3,8,10-11`); `None` if it is not one.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: usize = first.parse().ok()?;
                let last: usize = last.parse().ok()?;
                if last < first {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The CPU list in the sysfs file `path` ([`CPUS_ONLINE`], [`CPUS_POSSIBLE`]).
pub fn cpu_list(path: &str) -> Option<Vec<usize>> {
    parse_cpu_list(&std::fs::read_to_string(path).ok()?)
}

/// The CPUs of `cpus` but `here`.
pub fn cpus_but(cpus: &[usize], here: usize) -> Vec<usize> {
    cpus.iter().copied().filter(|&cpu| cpu != here).collect()
}

/// The CPUs online but the one the calling thread runs on; empty if it has none beside.
pub fn online_elsewhere() -> Vec<usize> {
    cpus_but(
        &cpu_list(CPUS_ONLINE).unwrap_or_default(),
        rustix::thread::sched_getcpu(),
    )
}

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

/// Where the kernel's cpuidle driver counts each CPU's time in each idle state.
const SYS_CPUS: &str = "/sys/devices/system/cpu";

/// Each CPU's idle time so far (µs, all idle states together), from the cpuidle counters.
/// Two readings tell which CPU idled most in between: there a burst of work neither
/// delays a busy task nor waits behind one.
#[derive(Debug, Clone)]
pub struct IdleTimes(Vec<(usize, u64)>);

impl IdleTimes {
    /// `None` where no cpuidle driver counts idle time.
    pub fn now() -> Option<IdleTimes> {
        let mut times = Vec::new();
        for entry in std::fs::read_dir(SYS_CPUS).ok()?.flatten() {
            let name = entry.file_name();
            let Some(cpu) = name
                .to_str()
                .and_then(|n| n.strip_prefix("cpu"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let Ok(states) = std::fs::read_dir(entry.path().join("cpuidle")) else {
                continue;
            };
            let idle: u64 = states
                .flatten()
                .filter_map(|state| std::fs::read_to_string(state.path().join("time")).ok())
                .filter_map(|text| text.trim().parse::<u64>().ok())
                .sum();
            times.push((cpu, idle));
        }
        (!times.is_empty()).then_some(IdleTimes(times))
    }

    /// Among `allowed`, the CPU that idled most since this reading; `prefer` on a tie
    /// (when none idled, say), else the first allowed. `None` without a second reading.
    pub fn idlest_since(&self, allowed: &[usize], prefer: usize) -> Option<usize> {
        self.idlest_until(&IdleTimes::now()?, allowed, prefer)
    }

    fn idlest_until(&self, now: &IdleTimes, allowed: &[usize], prefer: usize) -> Option<usize> {
        let idled = |cpu: usize| -> u64 {
            let at = |t: &IdleTimes| t.0.iter().find(|(c, _)| *c == cpu).map(|(_, us)| *us);
            match (at(self), at(now)) {
                (Some(before), Some(after)) => after.saturating_sub(before),
                _ => 0,
            }
        };
        // `max_by_key` keeps the last of equals: reversed, the first allowed wins a tie.
        let best = allowed
            .iter()
            .rev()
            .copied()
            .max_by_key(|&cpu| idled(cpu))?;
        Some(
            if idled(best) > idled(prefer) || !allowed.contains(&prefer) {
                best
            } else {
                prefer
            },
        )
    }
}

/// Our thread and one tracee thread both pinned to the CPU the tracee last ran on. Pinning
/// only ourselves is not enough: each wakeup of the tracee then finds that CPU busy with us
/// and the scheduler runs it on another one, about 50 µs each way. Dropping it gives both
/// their previous affinity back. A tracee not allowed on that CPU is left as it is.
#[derive(Debug)]
pub struct PairPin {
    tid: Tid,
    /// The tracee's affinity before, when we changed it.
    tracee_previous: Option<CpuSet>,
    // Dropped after the tracee's affinity is put back.
    _ours: CpuPin,
}

impl PairPin {
    /// Pins us and thread `tid` of `pid` to the CPU `tid` last ran on. Whoever reads the
    /// tracee's affinity meanwhile sees the pin: read it before.
    pub fn next_to(pid: Pid, tid: Tid) -> Result<PairPin, PinError> {
        PairPin::with(CpuPin::next_to(pid, tid)?, tid)
    }

    /// Pins us to the CPU we run on, and the stopped thread `tid` of `pid` there too, even
    /// where its own affinity leaves that CPU out (it gets its affinity back with the pin,
    /// before it runs its own code again). Nothing that runs moves: moving ourselves next
    /// to the tracee waits for the migration, and then behind whatever took the CPU the
    /// frozen tracee left idle (0.66 ms measured, behind the dump's own reader thread).
    /// Where the tracee may not come (a cpuset), as [`PairPin::next_to`]. Whoever reads
    /// the tracee's affinity meanwhile sees the pin: read it before.
    pub fn tracee_here(pid: Pid, tid: Tid) -> Result<PairPin, PinError> {
        let here = u32::try_from(rustix::thread::sched_getcpu()).unwrap_or(u32::MAX);
        let ours = CpuPin::to_cpu(here)?;
        let target = rustix::process::Pid::from_raw(tid.as_raw());
        let previous =
            sched_getaffinity(target).map_err(|errno| PinError::Affinity { cpu: here, errno })?;
        let idx = usize::try_from(here).map_err(|_| PinError::CpuRange { cpu: here })?;
        let mut one = CpuSet::new();
        one.set(idx);
        if previous == one {
            return Ok(PairPin {
                tid,
                tracee_previous: None,
                _ours: ours,
            });
        }
        if sched_setaffinity(target, &one).is_err() {
            drop(ours);
            return PairPin::next_to(pid, tid);
        }
        Ok(PairPin {
            tid,
            tracee_previous: Some(previous),
            _ours: ours,
        })
    }

    /// `ours`, and thread `tid` pinned to its CPU if it may run there and elsewhere too.
    fn with(ours: CpuPin, tid: Tid) -> Result<PairPin, PinError> {
        let cpu = ours.cpu();
        let target = rustix::process::Pid::from_raw(tid.as_raw());
        let previous =
            sched_getaffinity(target).map_err(|errno| PinError::Affinity { cpu, errno })?;
        let idx = usize::try_from(cpu).map_err(|_| PinError::CpuRange { cpu })?;
        let tracee_previous = if previous.is_set(idx) && previous.count() > 1 {
            let mut one = CpuSet::new();
            one.set(idx);
            sched_setaffinity(target, &one).map_err(|errno| PinError::Affinity { cpu, errno })?;
            Some(previous)
        } else {
            None
        };
        Ok(PairPin {
            tid,
            tracee_previous,
            _ours: ours,
        })
    }
}

impl Drop for PairPin {
    fn drop(&mut self) {
        let Some(previous) = &self.tracee_previous else {
            return;
        };
        let target = rustix::process::Pid::from_raw(self.tid.as_raw());
        if let Err(errno) = sched_setaffinity(target, previous) {
            tracing::warn!(tid = %self.tid, %errno, "could not give the thread its cpu affinity back");
        }
    }
}

impl crate::ptrace::Tracee {
    /// Pins the calling (tracer) thread and this tracee to one CPU for a burst of
    /// injected syscalls ([`PairPin`]); dropping the guard gives both their affinity back.
    pub fn pin_tracer(&self) -> Result<PairPin, PinError> {
        PairPin::next_to(self.pid(), self.tid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpus_elsewhere_leave_out_only_this_one() {
        let others = cpus_but(&[0, 1, 3], 1);
        assert!(others.contains(&0) && others.contains(&3));
        assert!(!others.contains(&1) && !others.contains(&2));
        assert!(cpus_but(&[2], 2).is_empty());
        assert!(cpus_but(&[], 0).is_empty());
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_idlest_cpu_is_the_one_that_idled_most_in_between() {
        let before = IdleTimes(vec![(0, 1_000), (1, 5_000), (2, 9_000), (3, 0)]);
        let after = IdleTimes(vec![(0, 1_010), (1, 5_900), (2, 9_400), (3, 0)]);
        assert_eq!(before.idlest_until(&after, &[0, 1, 2, 3], 0), Some(1));
        // Only among the allowed ones.
        assert_eq!(before.idlest_until(&after, &[0, 2, 3], 0), Some(2));
        // A tie (no CPU idled) keeps the preferred one, if it is allowed.
        assert_eq!(before.idlest_until(&after, &[3], 3), Some(3));
        assert_eq!(before.idlest_until(&before, &[0, 1, 2], 2), Some(2));
        assert_eq!(before.idlest_until(&before, &[0, 1], 2), Some(0));
        assert_eq!(before.idlest_until(&after, &[], 0), None);
    }

    #[test]
    fn idle_times_are_read_where_cpuidle_counts_them() {
        // Where a cpuidle driver exists, every online CPU has a counter.
        if std::path::Path::new("/sys/devices/system/cpu/cpu0/cpuidle").exists() {
            let times = IdleTimes::now().expect("idle times");
            assert!(times.0.iter().any(|(cpu, _)| *cpu == 0));
        }
    }

    /// A `sleep` child to pin, killed and reaped when dropped.
    struct Sleeper {
        child: std::process::Child,
        pid: Pid,
        target: rustix::process::Pid,
    }

    impl Sleeper {
        fn start() -> Sleeper {
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep");
            let raw = i32::try_from(child.id()).expect("pid fits");
            Sleeper {
                child,
                pid: Pid::from_raw(raw).expect("pid"),
                target: rustix::process::Pid::from_raw(raw).expect("pid"),
            }
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_tracee_pinned_here_shares_our_cpu_until_the_pin_goes() {
        let child = Sleeper::start();
        let (pid, target) = (child.pid, child.target);
        let ours_before = sched_getaffinity(None).expect("affinity");
        let theirs_before = sched_getaffinity(Some(target)).expect("affinity");
        {
            let pin = PairPin::tracee_here(pid, pid.leader()).expect("pin");
            let ours = sched_getaffinity(None).expect("affinity");
            assert_eq!(ours.count(), 1);
            assert_eq!(sched_getaffinity(Some(target)).expect("affinity"), ours);
            if theirs_before != ours {
                assert_eq!(pin.tracee_previous.as_ref(), Some(&theirs_before));
            }
        }
        assert_eq!(sched_getaffinity(None).expect("affinity"), ours_before);
        assert_eq!(
            sched_getaffinity(Some(target)).expect("affinity"),
            theirs_before
        );
    }

    #[test]
    fn a_tracee_kept_off_our_cpu_comes_to_it_for_the_pin_only() {
        let online = cpu_list(CPUS_ONLINE).unwrap_or_default();
        if online.len() < 2 {
            return;
        }
        let child = Sleeper::start();
        let (pid, target) = (child.pid, child.target);
        // Pinned first, so that our CPU stays the one the child is kept off.
        let here = u32::try_from(rustix::thread::sched_getcpu()).expect("cpu fits");
        let _outer = CpuPin::to_cpu(here).expect("pin");
        let elsewhere = cpus_but(&online, here as usize);
        let mut off = CpuSet::new();
        off.set(elsewhere[0]);
        sched_setaffinity(Some(target), &off).expect("keep the child off our cpu");
        {
            let _pin = PairPin::tracee_here(pid, pid.leader()).expect("pin");
            let theirs = sched_getaffinity(Some(target)).expect("affinity");
            assert_eq!(theirs.count(), 1);
            assert!(theirs.is_set(here as usize), "the tracee came to our cpu");
        }
        assert_eq!(sched_getaffinity(Some(target)).expect("affinity"), off);
    }

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
