//! State only a thread can see from inside, read by injected syscalls. Their out-buffers
//! are a few bytes of each thread's own stack below the red zone, saved first and written
//! back after; where that is not safe for some thread, a scratch page mapped in the target
//! serves all of them instead, unmapped again whatever happens. Either way the process is
//! left as it was.

use std::collections::HashMap;

use tracee::pagemap_scan::{entry, Pagemap};
use tracee::procmap::Procmap;
use tracee::{InjectError, Pid, RemoteAddr, RemoteScratch, SeizedProcess, Tid, Tracee, PAGE_SIZE};

use super::CollectError;

/// Bytes of a mapped scratch area: room for all 64 `struct sigaction`s (32 bytes each).
const SCRATCH_LEN: u64 = 2 * 4096;
/// Bytes of a thread's stack lent as out-buffer: every offset the collectors use is below.
pub const STACK_AREA: u64 = 128;
/// The x86-64 ABI lets a function keep data in the 128 bytes below its `rsp` without moving
/// it (the red zone): the area lies below that.
const RED_ZONE: u64 = 128;

/// Where a thread's out-buffers are.
enum Area {
    /// Each thread's stack: the area's address and the bytes it held.
    Stacks(HashMap<Tid, (RemoteAddr, Vec<u8>)>),
    /// One mapped page for all the threads (their mm is one).
    Mapped(RemoteScratch),
}

/// The out-buffers seen by the collectors: `offset`s are relative to the calling thread's
/// area, below [`STACK_AREA`] except for the leader's sigactions, which ask
/// [`Scratch::room`] first.
pub struct Scratch {
    pid: Pid,
    area: Area,
}

fn as_u64(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

fn scratch_err(tid: Tid, what: &'static str) -> impl FnOnce(InjectError) -> CollectError {
    move |source| CollectError::Inject { tid, what, source }
}

impl Scratch {
    fn base(&self, tid: Tid) -> Result<RemoteAddr, CollectError> {
        match &self.area {
            Area::Mapped(area) => Ok(area.addr()),
            Area::Stacks(stacks) => stacks
                .get(&tid)
                .map(|(addr, _)| *addr)
                .ok_or(CollectError::NoThreads { pid: self.pid }),
        }
    }

    /// How many bytes from offset 0 every thread's area holds.
    pub fn room(&self) -> u64 {
        match &self.area {
            Area::Mapped(area) => area.len(),
            Area::Stacks(_) => STACK_AREA,
        }
    }

    /// The target address of `offset` in the area of `tid`.
    pub fn at(&self, tid: Tid, offset: u64) -> Result<u64, CollectError> {
        Ok(self.base(tid)?.saturating_add(offset).get())
    }

    fn check(&self, tid: Tid, offset: u64, len: usize) -> Result<RemoteAddr, CollectError> {
        let end = offset.saturating_add(len as u64);
        if end > self.room() {
            return Err(CollectError::Memory {
                pid: self.pid,
                what: "use scratch memory past its end",
                source: tracee::MemoryError::OutOfRange {
                    pid: self.pid,
                    addr: self.base(tid)?,
                    offset,
                    len,
                    size: self.room(),
                },
            });
        }
        Ok(self.base(tid)?.saturating_add(offset))
    }

    /// Reads `N` bytes at `offset`.
    pub fn read<const N: usize>(&self, tid: Tid, offset: u64) -> Result<[u8; N], CollectError> {
        let at = self.check(tid, offset, N)?;
        let mut buf = [0u8; N];
        tracee::memory::read_remote(self.pid, at, &mut buf).map_err(|source| {
            CollectError::Memory {
                pid: self.pid,
                what: "read scratch memory",
                source,
            }
        })?;
        Ok(buf)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read_vec(&self, tid: Tid, offset: u64, len: usize) -> Result<Vec<u8>, CollectError> {
        let at = self.check(tid, offset, len)?;
        let mut buf = vec![0u8; len];
        tracee::memory::read_remote(self.pid, at, &mut buf).map_err(|source| {
            CollectError::Memory {
                pid: self.pid,
                what: "read scratch memory",
                source,
            }
        })?;
        Ok(buf)
    }

    /// Reads a native-endian i32 at `offset`.
    pub fn read_i32(&self, tid: Tid, offset: u64) -> Result<i32, CollectError> {
        self.read::<4>(tid, offset).map(i32::from_ne_bytes)
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

/// Finds out-buffers for every thread (their stacks, else a mapped page, after calling
/// `before_map`), points every thread's injections at the leader's `syscall` instruction,
/// runs `body`, then gives the buffers back (the stacks' bytes, or unmapping) even if `body`
/// failed. Registers and masks are saved once for the whole batch.
pub fn with_scratch<T>(
    tree: &mut SeizedProcess,
    before_map: &mut dyn FnMut() -> Result<(), CollectError>,
    body: impl FnOnce(&mut SeizedProcess, &Scratch) -> Result<T, CollectError>,
) -> Result<T, CollectError> {
    begin_batches(tree)?;
    let result = prepared(tree, before_map, body);
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

/// The stack area of one thread, with the bytes it holds, if writing there is invisible:
/// below the red zone, inside one private writable VMA, on pages present and mapped by
/// this process alone (no copy-on-write to break, no page to populate) and not
/// write-protected by a userfaultfd (whose handler would have to answer the write).
fn stack_area(
    pid: Pid,
    thread: &Tracee,
    procmap: &Procmap,
    pagemap: &Pagemap,
) -> Option<(RemoteAddr, Vec<u8>)> {
    let rsp = thread.program_regs().ok()?.rsp;
    let start = rsp.checked_sub(RED_ZONE + STACK_AREA)? & !15;
    let end = start + STACK_AREA;
    let vma = procmap.query(RemoteAddr(start)).ok()??;
    if vma.start.get() > start || vma.end.get() < end || !vma.write || !vma.read || vma.shared {
        return None;
    }
    let first = start / PAGE_SIZE * PAGE_SIZE;
    let pages = usize::try_from((end - 1) / PAGE_SIZE - first / PAGE_SIZE + 1).ok()?;
    let entries = pagemap.read_entries(RemoteAddr(first), pages).ok()?;
    let usable = |e: &u64| {
        e & entry::PRESENT != 0
            && e & entry::EXCLUSIVE != 0
            && e & (entry::UFFD_WP | entry::FILE | entry::GUARD) == 0
    };
    if !entries.iter().all(usable) {
        return None;
    }
    let mut saved = vec![0u8; STACK_AREA as usize];
    tracee::memory::read_remote(pid, RemoteAddr(start), &mut saved).ok()?;
    Some((RemoteAddr(start), saved))
}

/// The stack areas of every thread, or `None` if one thread has none.
fn stack_areas(tree: &SeizedProcess) -> Option<HashMap<Tid, (RemoteAddr, Vec<u8>)>> {
    let pid = tree.pid();
    let procmap = Procmap::open(pid).ok()?;
    let pagemap = Pagemap::open(pid).ok()?;
    tree.threads()
        .iter()
        .map(|t| stack_area(pid, t, &procmap, &pagemap).map(|area| (t.tid(), area)))
        .collect()
}

fn prepared<T>(
    tree: &mut SeizedProcess,
    before_map: &mut dyn FnMut() -> Result<(), CollectError>,
    body: impl FnOnce(&mut SeizedProcess, &Scratch) -> Result<T, CollectError>,
) -> Result<T, CollectError> {
    let pid = tree.pid();
    let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
    let tid = leader.tid();
    let insn = leader
        .syscall_insn()
        .map_err(scratch_err(tid, "find a syscall instruction"))?;
    let area = match stack_areas(tree) {
        Some(stacks) => Area::Stacks(stacks),
        None => {
            tracing::debug!(%pid, "no stack room for every thread: mapping a scratch page");
            before_map()?;
            let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
            Area::Mapped(
                RemoteScratch::map(leader, SCRATCH_LEN)
                    .map_err(scratch_err(tid, "map a scratch page"))?,
            )
        }
    };
    for thread in tree.threads_mut() {
        thread.set_syscall_insn(insn);
    }
    let scratch = Scratch { pid, area };
    let result = body(tree, &scratch);
    let released = release(tree, scratch);
    let value = result?;
    released?;
    Ok(value)
}

fn release(tree: &mut SeizedProcess, scratch: Scratch) -> Result<(), CollectError> {
    let pid = scratch.pid;
    match scratch.area {
        Area::Stacks(stacks) => {
            // Every area is written back even if one fails.
            let mut first = Ok(());
            for (addr, saved) in stacks.values() {
                if let Err(source) = tracee::memory::write_remote_fast(pid, *addr, saved) {
                    if first.is_ok() {
                        first = Err(CollectError::Memory {
                            pid,
                            what: "put back the stack bytes lent to injected syscalls",
                            source,
                        });
                    }
                }
            }
            first
        }
        Area::Mapped(area) => {
            let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
            let tid = leader.tid();
            area.release(leader)
                .map_err(scratch_err(tid, "unmap the scratch page"))
        }
    }
}
