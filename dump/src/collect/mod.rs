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
    InjectError, Pid, PtraceError, RemoteAddr, SeizedProcess, SeizedTree, TargetFd, Tid, PAGE_SIZE,
};

use crate::fault::{self, FaultPoint, InjectedFault};
use crate::DumpOptions;

pub use files::{FilesState, Ghost, PipeData};
pub use memory::{MemoryState, PageRun, VmaScan, VmaSource};
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
    let Some(base) = auxv
        .iter()
        .find(|(key, _)| *key == AT_SYSINFO_EHDR)
        .map(|(_, value)| *value)
        .filter(|base| *base != 0)
    else {
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
    // The vdso's first page is its ELF header and tables, mapped executable with the rest:
    // any `0f 05` in it runs as a `syscall`.
    let mut page = vec![0u8; PAGE_SIZE as usize];
    if tracee::memory::read_remote(pid, RemoteAddr(base), &mut page).is_err() {
        return;
    }
    if let Some(at) = page.windows(2).position(|w| w == [0x0f, 0x05]) {
        let at = at as u64;
        leader.set_syscall_insn(RemoteAddr(base).saturating_add(at));
        *offset = Some(at);
    }
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
    let mut limits = proc::limits::read(pid).map_err(proc_err(pid, "limits"))?;
    limits.sort_by_key(|l| l.resource);
    Ok(TaskRlimitsEntry {
        rlimits: limits
            .iter()
            .map(|l| RlimitEntry {
                cur: l.soft,
                max: l.hard,
            })
            .collect(),
    })
}

/// What is read of a process without ptrace, by the reader thread of [`tree`], while the
/// tracer injects: nothing the injections do shows in it.
struct ProcReads {
    memory: MemoryState,
    rlimits: TaskRlimitsEntry,
    oom_score_adj: Option<i32>,
    /// ckpt-dump's namespaces (the same for every process) and the process's.
    own_ns: kobj::NsKeys,
    ns: kobj::NsKeys,
}

impl ProcReads {
    fn read(pid: Pid, vmas: VmaSource, own_ns: kobj::NsKeys) -> Result<ProcReads, CollectError> {
        Ok(ProcReads {
            ns: kobj::ns_keys(&pid.to_string()),
            memory: memory::collect(pid, vmas)?,
            rlimits: rlimits(pid)?,
            oom_score_adj: read_i32_file(pid, "oom_score_adj"),
            own_ns,
        })
    }
}

/// Process-wide values only the process itself can tell, read through its leader.
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

fn leader_values(
    leader: &mut tracee::Tracee,
    scratch: &inject::Scratch,
) -> Result<LeaderValues, CollectError> {
    let tid = leader.tid();
    // `/proc/PID/personality` spares an injection (the tracer may read it).
    let personality = match read_proc_number(&format!("/proc/{tid}/personality"), 16) {
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
    let mdwe = extras::mdwe(leader)?;
    Ok(LeaderValues {
        mdwe,
        personality: u32::try_from(personality).unwrap_or(0),
        brk,
        dumpable: i32::try_from(dumpable).unwrap_or(0),
        thp_disabled: thp != 0,
        child_subreaper: subreaper != 0,
        membarrier: u32::try_from(membarrier).unwrap_or(0),
    })
}

/// Pins ckpt-dump to the CPU the thread last ran on: an injected syscall then costs a few
/// microseconds instead of a cross-CPU wakeup each way. Unpinned still works, only slower.
fn pin_next_to(pid: Pid, tid: Tid) -> Option<tracee::cpu::PairPin> {
    tracee::cpu::PairPin::next_to(pid, tid)
        .map_err(|err| tracing::debug!(%tid, error = %err, "not pinned next to the thread"))
        .ok()
}

/// Reads only the address space of the frozen process `pid`: its VMAs and the pages to save
/// (what a pre-dump needs).
pub fn memory(pid: Pid) -> Result<MemoryState, CollectError> {
    memory::collect(pid, VmaSource::MapsOnly)
}

/// Reads the whole state of every process of the frozen `tree`, parents first; `root_vmas`
/// says where the root's VMA list comes from (the others read smaps).
#[tracing::instrument(skip_all, fields(pid = %tree.root().pid()))]
pub fn tree(
    tree: &mut SeizedTree,
    opts: &DumpOptions,
    root_vmas: VmaSource,
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
    // What needs no ptrace (the address space above all) is read by a second thread, in
    // tree order, while this one (the tracer) checks the files and injects: on two CPUs the
    // two halves overlap. The injections leave no trace in what it reads (their buffers are
    // on the threads' stacks, or a page the memory collection leaves out).
    let processes = std::thread::scope(|scope| {
        let (sender, reads) = std::sync::mpsc::channel();
        scope.spawn(move || {
            let own_ns = kobj::ns_keys("self");
            for (pid, vmas) in order {
                // A closed channel means the tracer gave up: stop reading.
                if sender.send(ProcReads::read(pid, vmas, own_ns)).is_err() {
                    break;
                }
            }
        });
        let mut tables = TreeTables::default();
        // Refuse what cannot be saved anywhere in the tree before spending time on the rest.
        let ends = files::precheck_all(&mut tables.files, &pids, opts.shell_job)?;
        files::check_pipe_peers(&ends, &opts.external)?;
        let mut processes = Vec::with_capacity(parents.len());
        for (pid, parent) in &parents {
            let Some(process) = tree.process_mut(*pid) else {
                // Keeps the reader's answers in step with the processes.
                let _ = reads.recv();
                continue;
            };
            let late = || {
                reads
                    .recv()
                    .map_err(|_| CollectError::ReaderGone { pid: *pid })?
            };
            processes.push(collect_one(process, *parent, late, &mut tables, opts)?);
        }
        Ok::<_, CollectError>((processes, tables))
    });
    let (mut processes, mut tables) = processes?;
    // Unix socket peers are known once every process was read.
    let outside = files::check_unix_peers(&mut tables.files, opts.ext_unix_sk)?;
    if let Some(root) = processes.first_mut() {
        root.files.files.extend(outside);
    }
    let zombies = tree
        .zombies()
        .iter()
        .map(|(parent, pid)| zombie(*pid, *parent))
        .collect::<Result<Vec<_>, _>>()?;
    // Only a statistic: failing to read it must not fail the dump.
    let cow_shared_bytes = if processes.len() > 1 {
        cow_shared(&processes).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "copy-on-write sharing not measured; counted as 0");
            0
        })
    } else {
        0
    };
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
    let stat = proc::stat::read(pid).map_err(proc_err(pid, "stat"))?;
    let status = proc::status::read(pid).map_err(proc_err(pid, "status"))?;
    // The memory and files of the process are only reachable through a live leader's
    // /proc.
    if status.state == 'Z' {
        return Err(CollectError::ZombieLeader { pid });
    }
    let auxv = proc::auxv::read(pid).map_err(proc_err(pid, "auxv"))?;
    let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
    let stopped = leader.in_group_stop();
    let stop_signo = match leader.stop_state() {
        tracee::ptrace::StopState::Stopped { sig, .. } if stopped => u32::try_from(sig).ok(),
        _ => None,
    };
    let leader_mask = leader
        .get_sigmask()
        .map_err(|source| CollectError::Ptrace {
            tid: leader.tid(),
            what: "read the signal mask",
            source,
        })?;
    let shared_pending = leader
        .peek_siginfo(true)
        .map_err(|source| CollectError::Ptrace {
            tid: leader.tid(),
            what: "read shared pending signals",
            source,
        })?;

    let (mut ids, shared) = tables.ids.objects(pid)?;
    if let Some(with) = shared.vm {
        return Err(CollectError::SharedVm { pid, with });
    }
    let mut seccomp = SeccompTable::default();
    // Pinned from the scratch mapping on (the first injection) to its unmapping: unpinned,
    // each wakeup of the tracee may wait for another CPU's time slice, milliseconds under load.
    let leader_tid = tree.leader_mut().map(|l| l.tid());
    // Read before the pins change it.
    let affinities = tree
        .threads_mut()
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
    let leader_pin = leader_tid.and_then(|tid| pin_next_to(pid, tid));
    if let Some(leader) = tree.leader_mut() {
        point_at_vdso_syscall(leader, &auxv, &mut tables.vdso_insn);
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
    let injected = inject::with_scratch(tree, &mut wait_reads, |tree, scratch| {
        let leader = tree.leader_mut().ok_or(CollectError::NoThreads { pid })?;
        let values = leader_values(leader, scratch)?;
        fault::check(opts.fault, FaultPoint::AfterInject)?;
        let sigactions = signals::sigactions(leader, scratch, status.sig_cgt | status.sig_ign)?;
        let timers = signals::timers(pid, leader, scratch)?;
        let mut threads = Vec::new();
        for thread in tree.threads_mut() {
            let _pin = (Some(thread.tid()) != leader_tid)
                .then(|| pin_next_to(pid, thread.tid()))
                .flatten();
            let cpus = affinities.get(&thread.tid()).map_or(&[][..], Vec::as_slice);
            let known = (Some(thread.tid()) == leader_tid).then_some(threads::LeaderProc {
                status: &status,
                comm: &stat.comm,
            });
            threads.push(threads::collect(
                thread,
                scratch,
                cpus,
                &mut seccomp,
                known,
            )?);
        }
        Ok((threads, sigactions, timers, values))
    });
    drop(leader_pin);
    let (mut threads, sigactions, timers, values) = injected?;
    wait_reads()?;
    let ProcReads {
        mut memory,
        rlimits,
        oom_score_adj,
        own_ns,
        ns,
    } = reads.ok_or(CollectError::ReaderGone { pid })?;
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

    let mm = MmEntry {
        mm_start_code: stat.start_code,
        mm_end_code: stat.end_code,
        mm_start_data: stat.start_data,
        mm_end_data: stat.end_data,
        mm_start_stack: stat.start_stack,
        mm_start_brk: stat.start_brk,
        mm_brk: values.brk,
        mm_arg_start: stat.arg_start,
        mm_arg_end: stat.arg_end,
        mm_env_start: stat.env_start,
        mm_env_end: stat.env_end,
        exe_file_id: files.exe_file_id,
        mm_saved_auxv: auxv.iter().flat_map(|(k, v)| [*k, *v]).collect(),
        vmas: memory.vmas.clone(),
        dumpable: Some(values.dumpable),
        aios: Vec::new(),
        thp_disabled: Some(values.thp_disabled),
    };
    let tc = TaskCoreEntry {
        task_state: if stopped { TASK_STOPPED } else { TASK_ALIVE },
        exit_code: 0,
        personality: values.personality,
        flags: stat.flags,
        blk_sigset: leader_mask.0,
        comm: stat.comm.clone(),
        timers: Some(timers),
        rlimits: Some(rlimits),
        signals_s: Some(signals::signal_queue(&shared_pending)),
        oom_score_adj,
        sigactions,
        child_subreaper: Some(values.child_subreaper),
        // CRIU records the mask only when something is registered.
        membarrier_registration_mask: (values.membarrier != 0).then_some(values.membarrier),
        stop_signo,
        mdwe_flags: values.mdwe,
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
    Ok(ProcessState {
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
    })
}
