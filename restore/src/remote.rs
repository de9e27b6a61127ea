//! Injected syscalls and remote writes with the step they served, for errors that
//! say what failed, in which thread, with which errno.

use tracee::memory::MemoryError;
use tracee::{InjectError, Pid, RemoteAddr, Tid, Tracee};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("tid {tid}: {step}")]
    Inject {
        tid: Tid,
        step: String,
        #[source]
        source: Box<InjectError>,
    },
    #[error("pid {pid}: {step}: {len} bytes do not fit the helper page's {room}")]
    TooLarge {
        pid: Pid,
        step: String,
        len: usize,
        room: u64,
    },
    #[error("pid {pid}: {step}")]
    Memory {
        pid: Pid,
        step: String,
        #[source]
        source: Box<MemoryError>,
    },
}

impl RemoteError {
    /// The errno of a failed injected syscall, if that is what failed.
    pub fn errno(&self) -> Option<tracee::Errno> {
        match self {
            RemoteError::Inject { source, .. } => source.errno(),
            RemoteError::Memory { .. } | RemoteError::TooLarge { .. } => None,
        }
    }
}

/// Runs syscall `nr` in the stopped thread `t`; `step` names it in an error.
pub fn call(
    t: &mut Tracee,
    step: impl Into<String>,
    nr: i64,
    args: [u64; 6],
) -> Result<i64, RemoteError> {
    t.syscall(nr, args).map_err(|source| RemoteError::Inject {
        tid: t.tid(),
        step: step.into(),
        source: Box::new(source),
    })
}

/// Like [`call`] but returns the raw result, `-errno` included, for calls whose
/// failure the caller handles (a feature the kernel may lack).
pub fn call_raw(
    t: &mut Tracee,
    step: impl Into<String>,
    nr: i64,
    args: [u64; 6],
) -> Result<i64, RemoteError> {
    t.syscall_raw(nr, args)
        .map_err(|source| RemoteError::Inject {
            tid: t.tid(),
            step: step.into(),
            source: Box::new(source),
        })
}

/// Writes `data` at `addr` in process `pid`, whatever the protection there.
pub fn put(pid: Pid, addr: u64, data: &[u8], step: impl Into<String>) -> Result<(), RemoteError> {
    tracee::memory::write_remote(pid, RemoteAddr(addr), data).map_err(|source| {
        RemoteError::Memory {
            pid,
            step: step.into(),
            source: Box::new(source),
        }
    })
}

/// Reads `buf.len()` bytes at `addr` in process `pid`.
pub fn get(
    pid: Pid,
    addr: u64,
    buf: &mut [u8],
    step: impl Into<String>,
) -> Result<(), RemoteError> {
    tracee::memory::read_remote(pid, RemoteAddr(addr), buf).map_err(|source| RemoteError::Memory {
        pid,
        step: step.into(),
        source: Box::new(source),
    })
}

/// Reinterprets a signed kernel value as the register word that carries it.
pub fn word(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}
