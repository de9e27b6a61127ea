//! Reading the whole state of a frozen process tree. Nothing here writes an image; every
//! process is left exactly as it was (the scratch page used for injected syscalls is unmapped
//! again). Everything a dump cannot save is found here, so an unsupported process fails
//! before any image exists.
//!
//! A tree ([`tree`]) is read process by process, parents first, with one file table and one
//! table of kernel object ids for all of them: an open file description inherited through
//! fork is one `files.img` object whichever processes hold it, and processes sharing an fd
//! table (`CLONE_FILES`) get one `fdinfo` image. Zombies are only their exit status.

mod extras;
mod files;
mod inject;
mod kobj;
mod memory;
mod reader;
pub mod refresh;
pub mod shmem;
mod signals;
mod threads;

use std::collections::HashMap;
use std::path::PathBuf;

use images_format::pb::{
    self, CoreEntry, MmEntry, PstreeEntry, RlimitEntry, TaskCoreEntry, TaskKobjIdsEntry,
    TaskRlimitsEntry,
};
use images_format::xsave::XsaveError;
use tracee::memory::MemoryError;
use tracee::pagemap_scan::PagemapError;
use tracee::pidfd::PidfdError;
use tracee::proc::{self, ProcError};
use tracee::{
    InjectError, Pid, PtraceError, RemoteAddr, SeizedProcess, SeizedTree, TargetFd, Tid, Tracee,
    PAGE_SIZE,
};

use crate::fault::{self, FaultPoint, InjectedFault};
use crate::DumpOptions;

pub use files::{FilesState, Ghost, PipeData};
pub use memory::{MemoryState, PageRun, VmaScan, VmaSource};
use reader::ProcReads;
pub use reader::TreeReader;
pub use threads::{SeccompTable, ThreadState};

const PR_GET_DUMPABLE: u64 = 3;
const PR_GET_CHILD_SUBREAPER: u64 = 37;
const PR_GET_THP_DISABLE: u64 = 42;
const TASK_ALIVE: u32 = 1;
const TASK_DEAD: u32 = 2;
const TASK_STOPPED: u32 = 3;
/// `membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS)` (Linux 6.3+) lists the registered commands.
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;
/// `personality(0xffffffff)` reads the persona without changing it.
const PERSONALITY_QUERY: u64 = 0xffff_ffff;
/// Scratch offset for the leader's one-word answers.
const OFF_LEADER_WORD: u64 = 0;

/// Why the state of a process could not be read (or cannot be saved).
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("dump: pid {pid} has no threads left")]
    NoThreads { pid: Pid },
    #[error(
        "dump: pid {pid}: its main thread has exited while others run on; such a process \
         cannot be dumped yet"
    )]
    ZombieLeader { pid: Pid },
    /// The thread reading /proc ahead stopped before it got to this process (it panicked).
    #[error("dump: pid {pid}: the /proc reader thread ended early")]
    ReaderGone { pid: Pid },
    #[error("dump: start the /proc reader thread")]
    ReaderThread { source: std::io::Error },
    #[error("dump: pid {pid}: read /proc {what}")]
    Proc {
        pid: Pid,
        what: &'static str,
        #[source]
        source: ProcError,
    },
    #[error("dump: tid {tid}: {what}")]
    Ptrace {
        tid: Tid,
        what: &'static str,
        #[source]
        source: PtraceError,
    },
    #[error("dump: tid {tid}: read its {what}")]
    TaskInfo {
        tid: Tid,
        what: &'static str,
        #[source]
        source: tracee::taskinfo::TaskInfoError,
    },
    #[error("dump: tid {tid}: injected {what}")]
    Inject {
        tid: Tid,
        what: &'static str,
        #[source]
        source: InjectError,
    },
    #[error("dump: pid {pid}: {what}")]
    Memory {
        pid: Pid,
        what: &'static str,
        #[source]
        source: MemoryError,
    },
    #[error("dump: pid {pid}: scan the pagemap")]
    Pagemap {
        pid: Pid,
        #[source]
        source: PagemapError,
    },
    #[error("dump: tid {tid}: convert the xsave area")]
    Xsave {
        tid: Tid,
        #[source]
        source: XsaveError,
    },
    #[error("dump: pid {pid}: VMA {start}-{end} {path}: {why}")]
    UnsupportedVma {
        pid: Pid,
        start: RemoteAddr,
        end: RemoteAddr,
        path: String,
        why: &'static str,
    },
    #[error("dump: pid {pid}: fd {fd} is a {kind} ({target}), which cannot be dumped yet")]
    UnsupportedFd {
        pid: Pid,
        fd: TargetFd,
        kind: &'static str,
        target: String,
    },
    #[error("dump: pid {pid}: fd {fd} is the terminal {path} (run with --shell-job)")]
    Tty {
        pid: Pid,
        fd: TargetFd,
        path: String,
    },
    #[error("dump: pid {pid}: stat {} (fd {fd:?})", path.display())]
    Stat {
        pid: Pid,
        fd: Option<TargetFd>,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: pid {pid}: fd {fd}: {what}")]
    Kobj {
        pid: Pid,
        fd: TargetFd,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: pid {pid}: fd {fd} is a pipe (pipe:[{inode}]) whose {missing} end is outside the process")]
    PipePeer {
        pid: Pid,
        fd: TargetFd,
        inode: u64,
        missing: &'static str,
    },
    #[error("dump: pid {pid}: compare fd {fd} with the other fds")]
    Kcmp {
        pid: Pid,
        fd: TargetFd,
        #[source]
        source: PidfdError,
    },
    #[error("dump: pid {pid}: compare its {what} with pid {with}'s")]
    KcmpObject {
        pid: Pid,
        with: Pid,
        what: &'static str,
        #[source]
        source: PidfdError,
    },
    #[error(
        "dump: pid {pid} shares its address space with pid {with} (CLONE_VM, e.g. a vfork \
         child that has not called exec yet): such a tree cannot be dumped yet"
    )]
    SharedVm { pid: Pid, with: Pid },
    #[error(transparent)]
    Fault(#[from] InjectedFault),
    #[error(transparent)]
    Shmem(#[from] shmem::ShmemError),
    #[error(transparent)]
    Inet(#[from] files::InetError),
    #[error(transparent)]
    Lock(#[from] files::LockError),
    #[error(transparent)]
    PipeOutside(#[from] files::PipePeerError),
    #[error(transparent)]
    Unix(#[from] files::UnixError),
}

/// Everything the images of one process hold, as plain data.
#[derive(Debug, Clone)]
pub struct ProcessState {
    pub pid: Pid,
    pub pstree: PstreeEntry,
    /// Which kernel objects the process uses, for `ids-PID.img`.
    pub ids: TaskKobjIdsEntry,
    /// The same for ckpt-dump itself: `inventory.img` compares them to tell shared namespaces.
    pub root_ids: TaskKobjIdsEntry,
    /// Every thread, the leader first; the leader's core carries `tc`.
    pub threads: Vec<ThreadState>,
    pub mm: MmEntry,
    pub pages: Vec<PageRun>,
    /// Where each page goes; every present page is saved unless the caller decides better.
    pub plan: Vec<crate::pages::PlannedRun>,
    pub pages_scanned: u64,
    /// The maps lines of the VMAs (for dirty tracking).
    pub maps: Vec<tracee::proc::maps::MapsEntry>,
    /// How each VMA's pages were found (for a light second look, `refresh`).
    pub scans: Vec<VmaScan>,
    pub files: FilesState,
    pub seccomp: SeccompTable,
}

/// A zombie of the tree: exited, not yet reaped by its parent. Only its exit status and
/// its place in the tree are saved (`pstree.img` and `core-PID.img` with `TASK_DEAD`).
#[derive(Debug, Clone)]
pub struct ZombieState {
    pub pid: Pid,
    pub pstree: PstreeEntry,
    pub core: CoreEntry,
}

/// All the state of every process of the tree.
#[derive(Debug, Clone)]
pub struct TreeState {
    /// Live processes, parents before children, the root first.
    pub processes: Vec<ProcessState>,
    /// Zombies; their parents are in `processes`.
    pub zombies: Vec<ZombieState>,
    /// Private anonymous memory present in more than one process (copy-on-write after
    /// fork) at dump time: restore makes one copy per process of it.
    pub cow_shared_bytes: u64,
}

/// What every process of a tree is read with: one file table and one id table.
#[derive(Default)]
struct TreeTables {
    files: files::FileTable,
    ids: kobj::TreeIds,
    /// Where a `syscall` instruction sits in `[vdso]`: one kernel image serves every process,
    /// so after the first the offset is only checked, not searched for again.
    vdso_insn: Option<u64>,
}

/// `AT_SYSINFO_EHDR`: where the `[vdso]` begins.
const AT_SYSINFO_EHDR: u64 = 33;

/// Points the leader's injections at a `syscall` instruction of its `[vdso]`, found from the
/// auxiliary vector without reading the maps: one kernel image serves every process, so the
/// offset found in the first process is only checked in the next. Left alone (the injection
/// then searches the maps) where that fails.
fn point_at_vdso_syscall(
    leader: &mut tracee::Tracee,
    auxv: &[(u64, u64)],
    offset: &mut Option<u64>,
) {
    let Some(base) = vdso_base(auxv) else {
        return;
    };
    let pid = leader.pid();
    if let Some(off) = *offset {
        let mut bytes = [0u8; 2];
        let insn = RemoteAddr(base).saturating_add(off);
        if tracee::memory::read_remote(pid, insn, &mut bytes).is_ok() && bytes == [0x0f, 0x05] {
            leader.set_syscall_insn(insn);
            return;
        }
    }
    if let Some(at) = vdso_syscall_offset(pid, auxv) {
        leader.set_syscall_insn(RemoteAddr(base).saturating_add(at));
        *offset = Some(at);
    }
}

fn vdso_base(auxv: &[(u64, u64)]) -> Option<u64> {
    auxv.iter()
        .find(|(key, _)| *key == AT_SYSINFO_EHDR)
        .map(|(_, value)| *value)
        .filter(|base| *base != 0)
}

/// The offset of a `syscall` instruction in the `[vdso]` of `pid`, whose auxiliary vector
/// is `auxv`. The vdso's first page is its ELF header and tables, mapped executable with
/// the rest: any `0f 05` in it runs as a `syscall`.
fn vdso_syscall_offset(pid: Pid, auxv: &[(u64, u64)]) -> Option<u64> {
    let base = vdso_base(auxv)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    tracee::memory::read_remote(pid, RemoteAddr(base), &mut page).ok()?;
    let at = page.windows(2).position(|w| w == [0x0f, 0x05])?;
    u64::try_from(at).ok()
}

fn proc_err(pid: Pid, what: &'static str) -> impl FnOnce(ProcError) -> CollectError {
    move |source| CollectError::Proc { pid, what, source }
}

/// A number alone in a /proc file, in `radix`; `None` if it cannot be read.
pub(crate) fn read_proc_number(path: &str, radix: u32) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    u64::from_str_radix(text.trim(), radix).ok()
}

fn read_i32_file(pid: Pid, name: &'static str) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn rlimits(pid: Pid) -> Result<TaskRlimitsEntry, CollectError> {
    let limits = proc::limits::read(pid).map_err(proc_err(pid, "limits"))?;
    Ok(rlimits_entry(limits))
}

/// The image's limits, in resource order.
pub(crate) fn rlimits_entry(mut limits: Vec<proc::limits::Limit>) -> TaskRlimitsEntry {
    limits.sort_by_key(|l| l.resource);
    TaskRlimitsEntry {
        rlimits: limits
            .iter()
            .map(|l| RlimitEntry {
                cur: l.soft,
                max: l.hard,
            })
            .collect(),
    }
}

/// Process-wide values only the process itself can tell, read through its leader.
#[derive(Default, Clone)]
struct LeaderValues {
    personality: u32,
    brk: u64,
    dumpable: i32,
    thp_disabled: bool,
    child_subreaper: bool,
    membarrier: u32,
    /// Memory-deny-write-execute flags, if any is set.
    mdwe: Option<u32>,
}

/// Which of [`LeaderValues`] are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    /// Personality, brk, dumpable, THP: what `mm` holds.
    Mm,
    /// Child subreaper, membarrier registrations, MDWE.
    Flags,
    Both,
}

/// The values of `half` (the others left default); `personality`, if read already.
fn leader_values(
    leader: &mut tracee::Tracee,
    scratch: &inject::Scratch,
    half: Half,
    personality: Option<u64>,
) -> Result<LeaderValues, CollectError> {
    let mut values = LeaderValues::default();
    if half != Half::Flags {
        leader_mm_values(leader, personality, &mut values)?;
    }
    if half != Half::Mm {
        leader_flag_values(leader, scratch, &mut values)?;
    }
    Ok(values)
}

/// `/proc/PID/personality` (the tracer may read it): an injection spared.
fn personality_of(tid: Tid) -> Option<u64> {
    read_proc_number(&format!("/proc/{tid}/personality"), 16)
}

fn leader_mm_values(
    leader: &mut tracee::Tracee,
    personality: Option<u64>,
    values: &mut LeaderValues,
) -> Result<(), CollectError> {
    let tid = leader.tid();
    let personality = match personality.or_else(|| personality_of(tid)) {
        Some(value) => value,
        None => inject::syscall_u64(
            leader,
            "personality",
            libc::SYS_personality,
            [PERSONALITY_QUERY, 0, 0, 0, 0, 0],
        )?,
    };
    let brk = inject::syscall_u64(leader, "brk", libc::SYS_brk, [0; 6])?;
    let dumpable = inject::syscall(
        leader,
        "prctl(PR_GET_DUMPABLE)",
        libc::SYS_prctl,
        [PR_GET_DUMPABLE, 0, 0, 0, 0, 0],
    )?;
    let thp = inject::syscall(
        leader,
        "prctl(PR_GET_THP_DISABLE)",
        libc::SYS_prctl,
        [PR_GET_THP_DISABLE, 0, 0, 0, 0, 0],
    )?;
    values.personality = u32::try_from(personality).unwrap_or(0);
    values.brk = brk;
    values.dumpable = i32::try_from(dumpable).unwrap_or(0);
    values.thp_disabled = thp != 0;
    Ok(())
}

fn leader_flag_values(
    leader: &mut tracee::Tracee,
    scratch: &inject::Scratch,
    values: &mut LeaderValues,
) -> Result<(), CollectError> {
    let tid = leader.tid();
    // prctl stores a whole int: nothing to clear first.
    inject::syscall(
        leader,
        "prctl(PR_GET_CHILD_SUBREAPER)",
        libc::SYS_prctl,
        [
            PR_GET_CHILD_SUBREAPER,
            scratch.at(tid, OFF_LEADER_WORD)?,
            0,
            0,
            0,
            0,
        ],
    )?;
    let subreaper = scratch.read_i32(tid, OFF_LEADER_WORD)?;
    // Older kernels answer EINVAL: then nothing can have been registered that we could see.
    let membarrier = match leader.syscall(
        libc::SYS_membarrier,
        [MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, 0, 0, 0],
    ) {
        Ok(mask) => mask,
        Err(err) if err.errno().is_some() => 0,
        Err(source) => {
            return Err(CollectError::Inject {
                tid,
                what: "membarrier(GET_REGISTRATIONS)",
                source,
            })
        }
    };
    values.mdwe = extras::mdwe(leader)?;
    values.child_subreaper = subreaper != 0;
    values.membarrier = u32::try_from(membarrier).unwrap_or(0);
    Ok(())
}

/// Pins ckpt-dump to the CPU the thread last ran on: an injected syscall then costs a few
/// microseconds instead of a cross-CPU wakeup each way. Unpinned still works, only slower.
fn pin_next_to(pid: Pid, tid: Tid) -> Option<tracee::cpu::PairPin> {
    tracee::cpu::PairPin::next_to(pid, tid)
        .map_err(|err| tracing::debug!(%tid, error = %err, "not pinned next to the thread"))
        .ok()
}

/// Pins the stopped thread to ckpt-dump's CPU, and ckpt-dump there: the same saving as
/// [`pin_next_to`] without moving ckpt-dump, which would wait behind whatever took the CPU
/// the frozen tree left idle (the reader thread of [`tree`] above all).
fn pin_here(pid: Pid, tid: Tid) -> Option<tracee::cpu::PairPin> {
    tracee::cpu::PairPin::tracee_here(pid, tid)
        .map_err(|err| tracing::debug!(%tid, error = %err, "not pinned with the thread"))
        .ok()
}

/// Reads only the address space of the frozen process `pid`: its VMAs and the pages to save
/// (what a pre-dump needs).
pub fn memory(pid: Pid) -> Result<MemoryState, CollectError> {
    memory::collect(pid, VmaSource::MapsOnly)
}

/// Asks the CPU for its xsave layout now, while nothing waits for it, rather than in a
/// freeze (CPUID traps to the hypervisor in a virtual machine).
pub fn learn_xsave_layout() {
    threads::learn_xsave_layout();
}

/// Reads the whole state of every process of the frozen `tree`, parents first; `root_vmas`
/// says where the root's VMA list comes from (the others read smaps).
pub fn tree(
    tree: &mut SeizedTree,
    opts: &DumpOptions,
    root_vmas: VmaSource,
) -> Result<TreeState, CollectError> {
    tree_read_by(tree, opts, root_vmas, TreeReader::start()?)
}

/// [`tree`], with what needs no ptrace read by `reader`, made before the freeze.
#[tracing::instrument(skip_all, fields(pid = %tree.root().pid()))]
pub fn tree_read_by(
    tree: &mut SeizedTree,
    opts: &DumpOptions,
    root_vmas: VmaSource,
    reader: TreeReader,
) -> Result<TreeState, CollectError> {
    let root = tree.root().pid();
    let pids: Vec<Pid> = tree.processes().map(|p| p.pid()).collect();
    let parents: Vec<(Pid, Option<Pid>)> = tree
        .with_parents()
        .map(|(parent, p)| (p.pid(), parent))
        .collect();
    let mut root_vmas = Some(root_vmas);
    let order: Vec<(Pid, VmaSource)> = parents
        .iter()
        .map(|(pid, _)| {
            let vmas = if *pid == root {
                root_vmas.take().unwrap_or(VmaSource::Smaps)
            } else {
                VmaSource::Smaps
            };
            (*pid, vmas)
        })
        .collect();
    // The injections leave no trace in what the reader reads (their buffers are on the
    // threads' stacks, or a page the memory collection leaves out).
    reader.read(order);
    let mut tables = TreeTables::default();
    // Refuse what cannot be saved anywhere in the tree before spending time on the rest.
    let ends = files::precheck_all(&mut tables.files, &pids, opts.shell_job)?;
    files::check_pipe_peers(&ends, &opts.external)?;
    let mut processes = Vec::with_capacity(parents.len());
    for (pid, parent) in &parents {
        let Some(process) = tree.process_mut(*pid) else {
            // Keeps the reader's answers in step with the processes.
            let _ = reader.next(*pid);
            continue;
        };
        let late = || reader.next(*pid);
        processes.push(collect_one(process, *parent, late, &mut tables, opts)?);
    }
    let (zombies, cow_shared_bytes) = tree_wide(&mut processes, &mut tables, tree.zombies(), opts)?;
    tracing::info!(
        processes = processes.len(),
        zombies = zombies.len(),
        files = processes.iter().map(|p| p.files.files.len()).sum::<usize>(),
        "restore duplicates {cow_shared_bytes} bytes of private memory shared copy-on-write \
         between processes at dump time"
    );
    Ok(TreeState {
        processes,
        zombies,
        cow_shared_bytes,
    })
}

/// The address-space bounds `/proc/PID/stat` tells (code, data, stack, heap start,
/// arguments, environment) into `mm`.
pub(crate) fn mm_from_stat(mm: &mut MmEntry, stat: &proc::stat::Stat) {
    mm.mm_start_code = stat.start_code;
    mm.mm_end_code = stat.end_code;
    mm.mm_start_data = stat.start_data;
    mm.mm_end_data = stat.end_data;
    mm.mm_start_stack = stat.start_stack;
    mm.mm_start_brk = stat.start_brk;
    mm.mm_arg_start = stat.arg_start;
    mm.mm_arg_end = stat.arg_end;
    mm.mm_env_start = stat.env_start;
    mm.mm_env_end = stat.env_end;
}

/// What is known once every process of the tree was read: the unix socket peers outside
/// it (given to the root), the zombies' states, and the private memory shared
/// copy-on-write between processes (only a statistic: failing to read it fails nothing).
fn tree_wide(
    processes: &mut [ProcessState],
    tables: &mut TreeTables,
    zombies: &[(Pid, Pid)],
    opts: &DumpOptions,
) -> Result<(Vec<ZombieState>, u64), CollectError> {
    let outside = files::check_unix_peers(&mut tables.files, opts.ext_unix_sk)?;
    if let Some(root) = processes.first_mut() {
        root.files.files.extend(outside);
    }
    let zombies = zombies
        .iter()
        .map(|(parent, pid)| zombie(*pid, *parent))
        .collect::<Result<Vec<_>, _>>()?;
    let cow_shared_bytes = if processes.len() > 1 {
        cow_shared(processes).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "copy-on-write sharing not measured; counted as 0");
            0
        })
    } else {
        0
    };
    Ok((zombies, cow_shared_bytes))
}

/// A zombie's exit status, from `/proc/PID/stat` (field 52: the raw wait status).
fn zombie(pid: Pid, parent: Pid) -> Result<ZombieState, CollectError> {
    let stat = proc::stat::read(pid).map_err(proc_err(pid, "stat"))?;
    let raw = |v: i32| u32::from_ne_bytes(v.to_ne_bytes());
    let tc = TaskCoreEntry {
        task_state: TASK_DEAD,
        exit_code: raw(stat.exit_code),
        flags: stat.flags,
        comm: stat.comm.clone(),
        ..TaskCoreEntry::default()
    };
    tracing::debug!(%pid, %parent, status = stat.exit_code, "zombie");
    Ok(ZombieState {
        pid,
        pstree: PstreeEntry {
            pid: raw(pid.as_raw()),
            ppid: raw(parent.as_raw()),
            pgid: raw(stat.pgrp),
            sid: raw(stat.session),
            threads: vec![raw(pid.as_raw())],
        },
        core: CoreEntry {
            mtype: pb::core_entry::March::X8664 as i32,
            tc: Some(tc),
            ..CoreEntry::default()
        },
    })
}

/// Bytes of private anonymous memory that restore duplicates: pages present in several
/// processes of the tree at once (a parent and child still sharing them copy-on-write after
/// fork; the pagemap entry lacks `EXCLUSIVE`), each counted once per process but the
/// first. The page frame number tells which mappings are one page; where it is hidden (no
/// CAP_SYS_ADMIN), every shared mapping counts, an upper bound. Only the present runs
/// already found are read.
fn cow_shared(processes: &[ProcessState]) -> Result<u64, CollectError> {
    use tracee::pagemap_scan::entry::{EXCLUSIVE, FILE, PFN_MASK, PRESENT};
    let mut frames: Vec<u64> = Vec::new();
    let mut hidden = 0u64;
    for process in processes {
        let pid = process.pid;
        let map = tracee::pagemap_scan::Pagemap::open(pid)
            .map_err(|source| CollectError::Pagemap { pid, source })?;
        for run in &process.pages {
            let n = usize::try_from(run.pages).unwrap_or(usize::MAX);
            let entries = map
                .read_entries(RemoteAddr(run.start), n)
                .map_err(|source| CollectError::Pagemap { pid, source })?;
            for e in entries {
                if e & PRESENT == 0 || e & FILE != 0 || e & EXCLUSIVE != 0 {
                    continue;
                }
                match e & PFN_MASK {
                    0 => hidden += 1,
                    pfn => frames.push(pfn),
                }
            }
        }
    }
    let mappings = frames.len() as u64;
    frames.sort_unstable();
    frames.dedup();
    let duplicated = mappings - frames.len() as u64 + hidden;
    Ok(duplicated * PAGE_SIZE)
}

/// The process-wide signal state its stopped leader shows: group stop, the leader's mask
/// and the shared pending queue.
pub(crate) struct SignalState {
    pub stopped: bool,
    pub stop_signo: Option<u32>,
    pub leader_mask: tracee::SigSet,
    pub shared_pending: Vec<[u8; 128]>,
}

pub(crate) fn signal_state(leader: &tracee::Tracee) -> Result<SignalState, CollectError> {
    let stopped = leader.in_group_stop();
    let stop_signo = match leader.stop_state() {
        tracee::ptrace::StopState::Stopped { sig, .. } if stopped => u32::try_from(sig).ok(),
        _ => None,
    };
    let ptrace_err = |what| {
        move |source| CollectError::Ptrace {
            tid: leader.tid(),
            what,
            source,
        }
    };
    Ok(SignalState {
        stopped,
        stop_signo,
        leader_mask: leader
            .get_sigmask()
            .map_err(ptrace_err("read the signal mask"))?,
        shared_pending: leader
            .peek_siginfo(true)
            .map_err(ptrace_err("read shared pending signals"))?,
    })
}

/// What of one process needs its threads stopped: the stop state, masks and pending
/// signals, and everything read by injection (leader values, sigactions, timers, the
/// threads). With it, what `/proc` told the injections: `stat` (the leader's comm),
/// `status` (which sigactions to read, credentials, seccomp) and `auxv` (where the vdso's
/// `syscall` is).
pub struct FrozenProcess {
    pid: Pid,
    parent: Option<Pid>,
    stat: proc::stat::Stat,
    status: proc::status::Status,
    auxv: Vec<(u64, u64)>,
    stopped: bool,
    stop_signo: Option<u32>,
    leader_mask: u64,
    shared_pending: Vec<[u8; 128]>,
    threads: Vec<ThreadState>,
    /// Left default when read in a freeze of its own (see [`injected_in_freeze`]).
    leader: LeaderPart,
    seccomp: SeccompTable,
    /// The leader's personality, if read between freezes ([`between_freezes`]).
    personality: Option<u64>,
}

/// What [`frozen_one`] reads besides the ptrace reads.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// The injections (else left for [`injected_in_freeze`]).
    inject: bool,
    /// What the kernel tells of a thread from outside (else left for
    /// [`threads::outside_later`]).
    outside_now: bool,
}

/// Reads what of one frozen process needs it frozen (see [`FrozenProcess`]);
/// `before_map` runs before a scratch page is mapped into it, if one must be.
fn frozen_one(
    tree: &mut SeizedProcess,
    parent: Option<Pid>,
    ahead: Option<Ahead>,
    before_map: &mut dyn FnMut() -> Result<(), CollectError>,
    vdso_insn: &mut Option<u64>,
    reading: Reading,
    opts: &DumpOptions,
) -> Result<FrozenProcess, CollectError> {
    let Reading {
        inject,
        outside_now,
    } = reading;
    let pid = tree.pid();
    let (stat, status, auxv) = match ahead {
        Some(Ahead { stat, status, auxv }) => (stat, status, auxv),
        None => (
            proc::stat::read(pid).map_err(proc_err(pid, "stat"))?,
            proc::status::read(pid).map_err(proc_err(pid, "status"))?,
            Vec::new(),
        ),
    };
    // The memory and files of the process are only reachable through a live leader's
    // /proc.
    if status.state == 'Z' {
        return Err(CollectError::ZombieLeader { pid });
    }
    let auxv = if auxv.is_empty() {
        proc::auxv::read(pid).map_err(proc_err(pid, "auxv"))?
    } else {
        auxv
    };
    let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
    let SignalState {
        stopped,
        stop_signo,
        leader_mask,
        shared_pending,
    } = signal_state(leader)?;

    let mut seccomp = SeccompTable::default();
    // Pinned from the scratch mapping on (the first injection) to its unmapping: unpinned,
    // each wakeup of the tracee may wait for another CPU's time slice, milliseconds under load.
    let leader_tid = tree.leader_mut().map(|l| l.tid());
    // Read before the pins change it.
    let outside: &[Tracee] = if outside_now { tree.threads() } else { &[] };
    let affinities = outside
        .iter()
        .map(|t| {
            let tid = t.tid();
            tracee::taskinfo::affinity(tid)
                .map(|cpus| (tid, cpus))
                .map_err(|source| CollectError::TaskInfo {
                    tid,
                    what: "cpu affinity",
                    source,
                })
        })
        .collect::<Result<HashMap<Tid, Vec<usize>>, _>>()?;
    let cpus_of =
        |tid: Tid| outside_now.then(|| affinities.get(&tid).map_or(&[][..], Vec::as_slice));
    let known = threads::LeaderProc {
        status: &status,
        comm: &stat.comm,
    };
    let injected = if inject {
        let leader_pin = leader_tid.and_then(|tid| pin_here(pid, tid));
        if let Some(leader) = tree.leader_mut() {
            point_at_vdso_syscall(leader, &auxv, vdso_insn);
        }
        let caught = status.sig_cgt | status.sig_ign;
        let injected = inject::with_scratch(tree, before_map, |tree, scratch| {
            let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
            let leader_part = leader_part(leader, scratch, caught, opts)?;
            let mut threads = Vec::new();
            for thread in tree.threads_mut() {
                let tid = thread.tid();
                let _pin = (Some(tid) != leader_tid)
                    .then(|| pin_here(pid, tid))
                    .flatten();
                let known = (Some(tid) == leader_tid).then_some(known);
                threads.push(threads::collect(
                    thread,
                    Some(scratch),
                    cpus_of(tid),
                    &mut seccomp,
                    known,
                )?);
            }
            Ok((threads, leader_part))
        });
        drop(leader_pin);
        injected
    } else {
        // No injection, hence no scratch and no pins: what only injections tell is
        // read in a freeze of its own (`injected_in_freeze`).
        tree.threads_mut()
            .iter_mut()
            .map(|thread| {
                let tid = thread.tid();
                let known = (Some(tid) == leader_tid).then_some(known);
                threads::collect(thread, None, cpus_of(tid), &mut seccomp, known)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|threads| (threads, LeaderPart::default()))
    };
    let (threads, leader) = injected?;
    Ok(FrozenProcess {
        pid,
        parent,
        stat,
        status,
        auxv,
        stopped,
        stop_signo,
        leader_mask: leader_mask.0,
        shared_pending,
        threads,
        leader,
        seccomp,
        personality: None,
    })
}

/// What of a process is read by injections into its leader alone: values only the process
/// can tell, its signal dispositions and its timers.
#[derive(Default)]
pub struct LeaderPart {
    /// Read with the first half valid ([`Half::Mm`]).
    mm_values: Option<LeaderValues>,
    /// Read with the second half valid ([`Half::Flags`]).
    flag_values: Option<LeaderValues>,
    sigactions: Option<Vec<pb::SaEntry>>,
    timers: Option<pb::TaskTimersEntry>,
}

impl LeaderPart {
    /// Takes what `other` holds.
    fn merge(&mut self, other: LeaderPart) {
        let LeaderPart {
            mm_values,
            flag_values,
            sigactions,
            timers,
        } = other;
        if mm_values.is_some() {
            self.mm_values = mm_values;
        }
        if flag_values.is_some() {
            self.flag_values = flag_values;
        }
        if sigactions.is_some() {
            self.sigactions = sigactions;
        }
        if timers.is_some() {
            self.timers = timers;
        }
    }
}

/// Reads the [`LeaderPart`] of a frozen process through its leader, the dispositions of
/// the signals in `caught` (caught or ignored) by injection.
fn leader_part(
    leader: &mut tracee::Tracee,
    scratch: &inject::Scratch,
    caught: u64,
    opts: &DumpOptions,
) -> Result<LeaderPart, CollectError> {
    let values = leader_values(leader, scratch, Half::Both, None)?;
    fault::check(opts.fault, FaultPoint::AfterInject)?;
    let mut part = leader_signals(leader, scratch, caught)?;
    part.mm_values = Some(values.clone());
    part.flag_values = Some(values);
    Ok(part)
}

/// The signal dispositions (of the signals in `caught`) and the timers of a frozen
/// process, through its leader.
fn leader_signals(
    leader: &mut tracee::Tracee,
    scratch: &inject::Scratch,
    caught: u64,
) -> Result<LeaderPart, CollectError> {
    let pid = leader.pid();
    let sigactions = signals::sigactions(leader, scratch, caught)?;
    let timers = signals::timers(pid, leader, scratch)?;
    Ok(LeaderPart {
        sigactions: Some(sigactions),
        timers: Some(timers),
        ..LeaderPart::default()
    })
}

/// Puts what the [`LeaderPart`] `part` holds into `process`'s `mm` and its leader's task
/// core.
fn apply_leader(process: &mut ProcessState, part: LeaderPart) {
    let LeaderPart {
        mm_values,
        flag_values,
        sigactions,
        timers,
    } = part;
    if let Some(values) = &mm_values {
        process.mm.mm_brk = values.brk;
        process.mm.dumpable = Some(values.dumpable);
        process.mm.thp_disabled = Some(values.thp_disabled);
    }
    let Some(tc) = process.threads.first_mut().and_then(|t| t.core.tc.as_mut()) else {
        return;
    };
    if let Some(values) = mm_values {
        tc.personality = values.personality;
    }
    if let Some(values) = flag_values {
        tc.child_subreaper = Some(values.child_subreaper);
        // CRIU records the mask only when something is registered.
        tc.membarrier_registration_mask = (values.membarrier != 0).then_some(values.membarrier);
        tc.mdwe_flags = values.mdwe;
    }
    if let Some(timers) = timers {
        tc.timers = Some(timers);
    }
    if let Some(sigactions) = sigactions {
        tc.sigactions = sigactions;
    }
}

/// Completes the state of one process from what was read of it frozen (`frozen`) and
/// what needs no ptrace (`reads`, its object ids `ids` and what it shares, `shared`).
fn finish_one(
    frozen: FrozenProcess,
    reads: ProcReads,
    mut ids: TaskKobjIdsEntry,
    shared: &kobj::Shared,
    tables: &mut TreeTables,
    opts: &DumpOptions,
) -> Result<ProcessState, CollectError> {
    let FrozenProcess {
        pid,
        parent,
        stat,
        status,
        auxv,
        stopped,
        stop_signo,
        leader_mask,
        shared_pending,
        mut threads,
        leader,
        seccomp,
        personality: _,
    } = frozen;
    let ProcReads {
        mut memory,
        rlimits,
        oom_score_adj,
        own_ns,
        ns,
    } = reads;
    tables.ids.namespaces(pid, &own_ns, &ns, &mut ids);
    let root_ids = tables.ids.root_ids();
    let files = files::collect(
        &mut tables.files,
        pid,
        status.umask.unwrap_or(0o022),
        &mut memory,
        opts.shell_job,
        !shared.files,
    )?;

    let mut mm = MmEntry {
        mm_brk: 0,
        exe_file_id: files.exe_file_id,
        mm_saved_auxv: auxv.iter().flat_map(|(k, v)| [*k, *v]).collect(),
        vmas: memory.vmas.clone(),
        dumpable: None,
        aios: Vec::new(),
        thp_disabled: None,
        ..MmEntry::default()
    };
    mm_from_stat(&mut mm, &stat);
    let tc = TaskCoreEntry {
        task_state: if stopped { TASK_STOPPED } else { TASK_ALIVE },
        exit_code: 0,
        flags: stat.flags,
        blk_sigset: leader_mask,
        comm: stat.comm.clone(),
        rlimits: Some(rlimits),
        signals_s: Some(signals::signal_queue(&shared_pending)),
        oom_score_adj,
        stop_signo,
        ..TaskCoreEntry::default()
    };
    if let Some(leader) = threads.first_mut() {
        leader.core.tc = Some(tc);
    }
    let pstree = PstreeEntry {
        pid: u32::try_from(pid.as_raw()).unwrap_or(0),
        // The root of the dumped tree has no parent in the images.
        ppid: parent.map_or(0, |p| u32::try_from(p.as_raw()).unwrap_or(0)),
        pgid: u32::try_from(stat.pgrp).unwrap_or(0),
        sid: u32::try_from(stat.session).unwrap_or(0),
        threads: threads
            .iter()
            .map(|t| u32::try_from(t.tid.as_raw()).unwrap_or(0))
            .collect(),
    };
    let mut process = ProcessState {
        pid,
        pstree,
        ids,
        root_ids,
        threads,
        mm,
        plan: crate::pages::plan(&memory.pages, &[]),
        pages: memory.pages,
        maps: memory.maps,
        scans: memory.scans,
        pages_scanned: memory.pages_scanned,
        files,
        seccomp,
    };
    apply_leader(&mut process, leader);
    Ok(process)
}

/// Reads the state of one frozen process of a tree (`parent`: its parent, `None` for the
/// root), with the tree's tables; `late` waits for what the reader thread read of it.
fn collect_one(
    tree: &mut SeizedProcess,
    parent: Option<Pid>,
    late: impl FnOnce() -> Result<ProcReads, CollectError>,
    tables: &mut TreeTables,
    opts: &DumpOptions,
) -> Result<ProcessState, CollectError> {
    let pid = tree.pid();
    let (ids, shared) = tables.ids.objects(pid)?;
    if let Some(with) = shared.vm {
        return Err(CollectError::SharedVm { pid, with });
    }
    // Taken before a scratch page is mapped, if one must be: it must not be in the dump.
    let mut late = Some(late);
    let mut reads = None;
    let mut wait_reads = || -> Result<(), CollectError> {
        if let Some(late) = late.take() {
            reads = Some(late()?);
        }
        Ok(())
    };
    let frozen = frozen_one(
        tree,
        parent,
        None,
        &mut wait_reads,
        &mut tables.vdso_insn,
        Reading {
            inject: true,
            outside_now: true,
        },
        opts,
    )?;
    wait_reads()?;
    let reads = reads.ok_or(CollectError::ReaderGone { pid })?;
    finish_one(frozen, reads, ids, &shared, tables, opts)
}

/// The first half of a tree's state read in two ([`in_freeze`], then [`after_release`]):
/// what needs the tree frozen.
pub struct InFreeze {
    /// Parents before children, the root first.
    processes: Vec<FrozenProcess>,
    /// `(parent, zombie)`.
    zombies: Vec<(Pid, Pid)>,
    /// The processes whose `/proc` files were read ahead of the freeze, with what of them
    /// steered the frozen reads.
    steered: Vec<(Pid, Steering)>,
    vdso_insn: Option<u64>,
}

impl InFreeze {
    /// The most threads a process of the tree has.
    pub fn most_threads(&self) -> usize {
        self.processes
            .iter()
            .map(|p| p.threads.len())
            .max()
            .unwrap_or(0)
    }
}

/// What a process's `status` tells the frozen reads: which dispositions are read by
/// injection (the caught and ignored signals) and whether seccomp filters are read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Steering {
    sig_cgt: u64,
    sig_ign: u64,
    seccomp: u32,
    seccomp_filters: u32,
}

impl Steering {
    fn of(status: &proc::status::Status) -> Steering {
        Steering {
            sig_cgt: status.sig_cgt,
            sig_ign: status.sig_ign,
            seccomp: status.seccomp,
            seccomp_filters: status.seccomp_filters,
        }
    }
}

/// A process's `/proc` files the frozen reads need, read while it still runs.
struct Ahead {
    stat: proc::stat::Stat,
    status: proc::status::Status,
    auxv: Vec<(u64, u64)>,
}

/// What [`read_ahead`] read of a running tree.
#[derive(Default)]
pub struct ReadAhead {
    processes: HashMap<Pid, Ahead>,
    /// Where a `syscall` instruction sits in `[vdso]` (see [`point_at_vdso_syscall`]).
    vdso_insn: Option<u64>,
}

/// Reads, while the tree under `root` still runs, the `/proc` files that steer its frozen
/// reads ([`in_freeze`]), and finds the vdso's `syscall` instruction, so that the freeze
/// holds the tree only for what needs it stopped. Best effort: what is not read here is
/// read frozen. Whatever changes between these reads and the freeze, [`after_release`]
/// finds changed by reading them again (see [`Settled::moved`]).
pub fn read_ahead(root: Pid) -> ReadAhead {
    learn_xsave_layout();
    let mut ahead = ReadAhead::default();
    let mut pids = vec![root];
    while let Some(pid) = pids.pop() {
        if let Ok(children) = proc::task::children(pid) {
            pids.extend(children);
        }
        let read = || -> Result<Ahead, ProcError> {
            Ok(Ahead {
                stat: proc::stat::read(pid)?,
                status: proc::status::read(pid)?,
                auxv: proc::auxv::read(pid)?,
            })
        };
        let Ok(early) = read() else {
            continue;
        };
        if ahead.vdso_insn.is_none() {
            ahead.vdso_insn = vdso_syscall_offset(pid, &early.auxv);
        }
        ahead.processes.insert(pid, early);
    }
    ahead
}

/// What [`after_release`] read.
pub struct Settled {
    pub state: TreeState,
    /// Why the state may not be what the tree had frozen: a `/proc` file read ahead of the
    /// freeze said otherwise once read again (see [`read_ahead`]). `None`: it is.
    pub moved: Option<String>,
}

/// Which injections a freeze of [`injected_in_freeze`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// The leaders' values that `mm` holds: brk, personality, dumpable, THP.
    LeaderMm,
    /// The leaders' other values: child subreaper, membarrier registrations, MDWE.
    LeaderFlags,
    /// The leaders' dispositions and timers.
    LeaderSignals,
    /// The own injected state of each process's threads `from..to` (leader first).
    Threads { from: usize, to: usize },
}

/// Reads by injection, into `frozen` (read of the tree by [`in_freeze`] without
/// injections), what only injected syscalls tell of the frozen `tree`, the part `step`
/// says: of each process's [`LeaderPart`] and each thread's [`threads::injected`] state.
/// `false` (and `frozen` not to be used) if the tree's processes or threads are not those
/// of `frozen`.
#[tracing::instrument(skip_all, fields(pid = %tree.root().pid()))]
pub fn injected_in_freeze(
    tree: &mut SeizedTree,
    frozen: &mut InFreeze,
    step: Injected,
    opts: &DumpOptions,
) -> Result<bool, CollectError> {
    let shape: Vec<(Pid, Vec<Tid>)> = tree.processes().map(|p| (p.pid(), p.tids())).collect();
    let expected: Vec<(Pid, Vec<Tid>)> = frozen
        .processes
        .iter()
        .map(|p| (p.pid, p.threads.iter().map(|t| t.tid).collect()))
        .collect();
    if shape != expected || tree.zombies() != frozen.zombies.as_slice() {
        return Ok(false);
    }
    let mut vdso_insn = frozen.vdso_insn;
    for process_state in &mut frozen.processes {
        let pid = process_state.pid;
        if matches!(step, Injected::Threads { from, .. } if from >= process_state.threads.len()) {
            continue;
        }
        let Some(process) = tree.process_mut(pid) else {
            return Ok(false);
        };
        let leader = process
            .leader_mut()
            .ok_or(CollectError::NoThreads { pid })?;
        let leader_tid = leader.tid();
        let leader_pin = pin_next_to(pid, leader_tid);
        point_at_vdso_syscall(leader, &process_state.auxv, &mut vdso_insn);
        let caught = process_state.status.sig_cgt | process_state.status.sig_ign;
        let personality = process_state.personality;
        let threads = &mut process_state.threads;
        let mut nothing = || Ok(());
        let part = inject::with_scratch(process, &mut nothing, |process, scratch| {
            let leader = process
                .leader_mut()
                .ok_or(CollectError::NoThreads { pid })?;
            match step {
                Injected::LeaderMm => {
                    let values = leader_values(leader, scratch, Half::Mm, personality)?;
                    fault::check(opts.fault, FaultPoint::AfterInject)?;
                    Ok(LeaderPart {
                        mm_values: Some(values),
                        ..LeaderPart::default()
                    })
                }
                Injected::LeaderFlags => {
                    let values = leader_values(leader, scratch, Half::Flags, None)?;
                    Ok(LeaderPart {
                        flag_values: Some(values),
                        ..LeaderPart::default()
                    })
                }
                Injected::LeaderSignals => leader_signals(leader, scratch, caught),
                Injected::Threads { from, to } => {
                    let chosen = process
                        .threads_mut()
                        .iter_mut()
                        .zip(threads.iter_mut())
                        .skip(from)
                        .take(to.saturating_sub(from));
                    for (thread, thread_state) in chosen {
                        let tid = thread.tid();
                        let _pin = (tid != leader_tid).then(|| pin_next_to(pid, tid)).flatten();
                        threads::injected(thread, scratch, thread_state)?;
                    }
                    Ok(LeaderPart::default())
                }
            }
        });
        drop(leader_pin);
        process_state.leader.merge(part?);
    }
    frozen.vdso_insn = vdso_insn;
    Ok(true)
}

/// Reads, the tree running between two freezes, what spares the next ones an injection:
/// each leader's personality, from `/proc` (it changes only by a syscall the watch counts).
pub fn between_freezes(frozen: &mut InFreeze) {
    for process in &mut frozen.processes {
        process.personality = personality_of(process.pid.leader());
    }
}

/// Reads of the frozen `tree` only what needs it frozen (see [`FrozenProcess`]), for a
/// tree let go right after, whose state [`after_release`] completes while it runs; with
/// `inject` false, what only injections tell is left for [`injected_in_freeze`], in a
/// freeze of its own. `ahead`: what [`read_ahead`] read before the freeze. The result is
/// a state read over a stretch of time, not at one instant: it serves where a later look
/// corrects what moved meanwhile (the first round of a prepared dump), never where the
/// images must be one consistent moment (a plain dump reads with [`tree`]).
#[tracing::instrument(skip_all, fields(pid = %tree.root().pid()))]
pub fn in_freeze(
    tree: &mut SeizedTree,
    mut ahead: ReadAhead,
    inject: bool,
    opts: &DumpOptions,
) -> Result<InFreeze, CollectError> {
    let parents: Vec<(Pid, Option<Pid>)> = tree
        .with_parents()
        .map(|(parent, p)| (p.pid(), parent))
        .collect();
    let mut vdso_insn = ahead.vdso_insn;
    let mut steered = Vec::new();
    let mut processes = Vec::with_capacity(parents.len());
    for (pid, parent) in parents {
        let Some(process) = tree.process_mut(pid) else {
            continue;
        };
        // Nothing of the address space is read while frozen: a scratch page is unmapped
        // again before the memory is read.
        let mut nothing = || Ok(());
        let early = ahead.processes.remove(&pid);
        if let Some(early) = &early {
            steered.push((pid, Steering::of(&early.status)));
        }
        processes.push(frozen_one(
            process,
            parent,
            early,
            &mut nothing,
            &mut vdso_insn,
            Reading {
                inject,
                outside_now: false,
            },
            opts,
        )?);
    }
    Ok(InFreeze {
        processes,
        zombies: tree.zombies().to_vec(),
        steered,
        vdso_insn,
    })
}

/// Completes, from `/proc`, `pidfd_getfd` and the address space, with no ptrace, the state
/// of a tree of which [`in_freeze`] read the rest: the tree may run meanwhile.
/// `root_vmas` says where the root's VMA list comes from (the others read smaps).
#[tracing::instrument(skip_all)]
pub fn after_release(
    frozen: InFreeze,
    opts: &DumpOptions,
    root_vmas: VmaSource,
) -> Result<Settled, CollectError> {
    let pids: Vec<Pid> = frozen.processes.iter().map(|p| p.pid).collect();
    let mut tables = TreeTables::default();
    let ends = files::precheck_all(&mut tables.files, &pids, opts.shell_job)?;
    files::check_pipe_peers(&ends, &opts.external)?;
    let own_ns = kobj::ns_keys("self");
    let mut root_vmas = Some(root_vmas);
    let mut moved = None;
    let mut processes = Vec::with_capacity(frozen.processes.len());
    for mut process in frozen.processes {
        let pid = process.pid;
        if let Some((_, steering)) = frozen.steered.iter().find(|(p, _)| *p == pid) {
            if let Some(why) = read_again(&mut process, steering)? {
                moved.get_or_insert(why);
            }
        }
        for thread in &mut process.threads {
            if let Err(why) = threads::outside_later(thread)? {
                moved.get_or_insert(why);
            }
        }
        let (ids, shared) = tables.ids.objects(pid)?;
        if let Some(with) = shared.vm {
            return Err(CollectError::SharedVm { pid, with });
        }
        let vmas = root_vmas.take().unwrap_or(VmaSource::Smaps);
        let reads = ProcReads::read(pid, vmas, own_ns)?;
        processes.push(finish_one(process, reads, ids, &shared, &mut tables, opts)?);
    }
    let (zombies, cow_shared_bytes) =
        tree_wide(&mut processes, &mut tables, &frozen.zombies, opts)?;
    Ok(Settled {
        state: TreeState {
            processes,
            zombies,
            cow_shared_bytes,
        },
        moved,
    })
}

/// Reads again, the tree running, the `/proc` files of `process` that [`read_ahead`] read
/// before the freeze, and takes their values now: what the images keep of them (the
/// leader's comm and credentials, the `mm` fields, flags, process group, umask, the
/// auxiliary vector) can only change by a syscall the watch counts, or is read again by a
/// light second look. What steered the frozen reads (`steering`) must be as it was: else
/// `Some(why)`.
fn read_again(
    process: &mut FrozenProcess,
    steering: &Steering,
) -> Result<Option<String>, CollectError> {
    let pid = process.pid;
    let stat = proc::stat::read(pid).map_err(proc_err(pid, "stat"))?;
    let status = proc::status::read(pid).map_err(proc_err(pid, "status"))?;
    if status.state == 'Z' {
        return Err(CollectError::ZombieLeader { pid });
    }
    let auxv = proc::auxv::read(pid).map_err(proc_err(pid, "auxv"))?;
    let why = (Steering::of(&status) != *steering).then(|| {
        format!("pid {pid}: its signal dispositions or seccomp mode changed while S1 read it")
    });
    if let Some(thread_core) = process
        .threads
        .first_mut()
        .and_then(|t| t.core.thread_core.as_mut())
    {
        thread_core.comm = Some(stat.comm.clone());
        if let Some(creds) = thread_core.creds.as_mut() {
            *creds = threads::creds(&status, creds.secbits);
        }
    }
    process.stat = stat;
    process.status = status;
    process.auxv = auxv;
    Ok(why)
}
