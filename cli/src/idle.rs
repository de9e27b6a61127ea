//! Idle CPUs that poll instead of halting while a tool runs.
//!
//! In a virtual machine an idle CPU halts, which hands it back to the hypervisor, and a
//! wake-up sent to it waits until the host runs that CPU again. On this project's test
//! machines a migrated program asleep in a page fault ran again 15 µs after the
//! lazy-pages daemon answered it at the median, and up to 5 ms after, because its CPU had
//! halted (`ckpt-bench wake` measures such wake-ups). A freeze or a switch is a string of
//! them.
//!
//! A PM QoS request for a CPU wake-up latency of 0 makes the idle loop poll (the
//! `POLL` idle state), so a wake-up is seen at once. The request is the kernel's
//! `/dev/cpu_dma_latency` interface: it holds while the file stays open, and ends when
//! it is closed, also when the process dies. Asking wakes every idle CPU once, which
//! is why each tool asks when it starts, before any freeze.

use std::fs::{File, OpenOptions};
use std::io::Write;

const DEVICE: &str = "/dev/cpu_dma_latency";

/// A request that idle CPUs poll, in force until dropped. Best effort: where the device
/// is missing or not ours to open (not root), the hold holds nothing.
#[derive(Debug)]
pub struct IdlePoll(Option<File>);

impl IdlePoll {
    /// Asks for a wake-up latency of 0 on every CPU.
    pub fn hold() -> IdlePoll {
        let opened = OpenOptions::new().write(true).open(DEVICE);
        let held = opened.and_then(|mut file| {
            file.write_all(&0i32.to_ne_bytes())?;
            Ok(file)
        });
        match held {
            Ok(file) => IdlePoll(Some(file)),
            Err(error) => {
                tracing::debug!(%error, "idle CPUs halt as usual: no latency request");
                IdlePoll(None)
            }
        }
    }

    /// [`IdlePoll::hold`] if `wanted` (a binary's `--no-idle-poll` says not), else nothing.
    pub fn hold_if(wanted: bool) -> IdlePoll {
        if wanted {
            IdlePoll::hold()
        } else {
            IdlePoll(None)
        }
    }

    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The wake-up latency in force, in µs: the smallest of all requests (the kernel's
    /// default when there is none).
    fn latency_limit_us() -> std::io::Result<i32> {
        let mut value = [0u8; 4];
        File::open(DEVICE)?.read_exact(&mut value)?;
        Ok(i32::from_ne_bytes(value))
    }

    #[test]
    fn a_hold_sets_the_limit_to_zero() {
        let hold = IdlePoll::hold();
        if !hold.is_held() {
            // Not root, or no such device: nothing to check here.
            assert!(OpenOptions::new().write(true).open(DEVICE).is_err());
            return;
        }
        assert_eq!(latency_limit_us().unwrap(), 0);
        // A second request, dropped, leaves the first in force.
        drop(IdlePoll::hold());
        assert_eq!(latency_limit_us().unwrap(), 0);
    }
}
