//! State only a thread can see from inside, read by injected syscalls. A scratch page mapped
//! in the target holds the out-buffers; it is unmapped again whatever happens, so the
//! process is left as it was.

use tracee::{InjectError, Pid, RemoteScratch, SeizedProcess, Tid, Tracee};

use super::CollectError;

/// Bytes of scratch memory: room for all 64 `struct sigaction`s (32 bytes each) at once.
const SCRATCH_LEN: u64 = 2 * 4096;

/// The scratch area seen by the collectors. Every thread of the process shares the mm, so
/// one area serves all of them.
pub struct Scratch<'a> {
    area: &'a RemoteScratch,
}

fn as_u64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

impl Scratch<'_> {
    /// The target address of `offset` in the area.
    pub fn at(&self, offset: u64) -> u64 {
        self.area.at(offset).get()
    }

    /// Reads `N` bytes at `offset`.
    pub fn read<const N: usize>(&self, tid: Tid, offset: u64) -> Result<[u8; N], CollectError> {
        let mut buf = [0u8; N];
        self.area
            .read(offset, &mut buf)
            .map_err(|source| CollectError::Inject {
                tid,
                what: "read scratch memory",
                source,
            })?;
        Ok(buf)
    }

    /// Reads a native-endian u64 at `offset`.
    pub fn read_u64(&self, tid: Tid, offset: u64) -> Result<u64, CollectError> {
        self.read::<8>(tid, offset).map(u64::from_ne_bytes)
    }

    /// Reads a native-endian i32 at `offset`.
    pub fn read_i32(&self, tid: Tid, offset: u64) -> Result<i32, CollectError> {
        self.read::<4>(tid, offset).map(i32::from_ne_bytes)
    }

    /// Zeroes `len` bytes at `offset`, so a syscall that writes less leaves no stale bytes.
    pub fn clear(&self, tid: Tid, offset: u64, len: usize) -> Result<(), CollectError> {
        self.area
            .write(offset, &vec![0u8; len])
            .map_err(|source| CollectError::Inject {
                tid,
                what: "clear scratch memory",
                source,
            })
    }
}

/// Runs syscall `nr` in `thread`; `what` names it in errors.
pub fn syscall(
    thread: &mut Tracee,
    what: &'static str,
    nr: i64,
    args: [u64; 6],
) -> Result<i64, CollectError> {
    let tid = thread.tid();
    thread
        .syscall(nr, args)
        .map_err(|source| CollectError::Inject { tid, what, source })
}

/// Like [`syscall`] with the return value as the unsigned register.
pub fn syscall_u64(
    thread: &mut Tracee,
    what: &'static str,
    nr: i64,
    args: [u64; 6],
) -> Result<u64, CollectError> {
    syscall(thread, what, nr, args).map(as_u64)
}

/// Maps a scratch area through the leader, points every thread's injections at the same
/// `syscall` instruction, runs `body`, then unmaps the area even if `body` failed.
pub fn with_scratch<T>(
    tree: &mut SeizedProcess,
    body: impl FnOnce(&mut SeizedProcess, &Scratch<'_>) -> Result<T, CollectError>,
) -> Result<T, CollectError> {
    begin_batches(tree)?;
    let result = mapped(tree, body);
    let ended = end_batches(tree);
    let value = result?;
    ended?;
    Ok(value)
}

/// Saves every thread's registers and mask once for all the injections to come: each then
/// costs four ptrace calls instead of nine (the collectors read the program's own registers
/// and mask through `program_regs`/`program_sigmask` meanwhile).
fn begin_batches(tree: &mut SeizedProcess) -> Result<(), CollectError> {
    for thread in tree.threads_mut() {
        let tid = thread.tid();
        thread
            .begin_batch()
            .map_err(|source| CollectError::Inject {
                tid,
                what: "save the registers for injection",
                source,
            })?;
    }
    Ok(())
}

/// Puts every thread's registers and mask back, all of them even if one fails.
fn end_batches(tree: &mut SeizedProcess) -> Result<(), CollectError> {
    let mut first = Ok(());
    for thread in tree.threads_mut() {
        let tid = thread.tid();
        if let Err(source) = thread.end_batch() {
            if first.is_ok() {
                first = Err(CollectError::Inject {
                    tid,
                    what: "put the registers back after injection",
                    source,
                });
            }
        }
    }
    first
}

fn mapped<T>(
    tree: &mut SeizedProcess,
    body: impl FnOnce(&mut SeizedProcess, &Scratch<'_>) -> Result<T, CollectError>,
) -> Result<T, CollectError> {
    let pid = tree.pid();
    let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
    let tid = leader.tid();
    let insn = leader
        .syscall_insn()
        .map_err(|source| CollectError::Inject {
            tid,
            what: "find a syscall instruction",
            source,
        })?;
    let area = RemoteScratch::map(leader, SCRATCH_LEN).map_err(|source| CollectError::Inject {
        tid,
        what: "map a scratch page",
        source,
    })?;
    for thread in tree.threads_mut() {
        thread.set_syscall_insn(insn);
    }
    let result = body(tree, &Scratch { area: &area });
    let released = release(tree, pid, area);
    let value = result?;
    released?;
    Ok(value)
}

fn release(tree: &mut SeizedProcess, pid: Pid, area: RemoteScratch) -> Result<(), CollectError> {
    let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
    let tid = leader.tid();
    area.release(leader)
        .map_err(|source: InjectError| CollectError::Inject {
            tid,
            what: "unmap the scratch page",
            source,
        })
}
