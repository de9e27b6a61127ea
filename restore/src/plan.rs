//! From images to a list of operations: a pure function, tested without a kernel.
//!
//! Everything the rebuild needs is decided here: which fds the child opens, which VMAs
//! are mapped how, where the vDSO block goes, what each thread gets. The rebuild then
//! follows the plan step by step and decides nothing.

use std::path::PathBuf;

use images_format::pb;
use images_format::vma::{MapFlags, VmaStatus};
use tracee::ptrace::RestartFixup;
use tracee::Regs;

use crate::read::{ProcessImages, TreeImages};

pub const PAGE_SIZE: u64 = 4096;

/// `fdinfo_entry.type` values (CRIU's fd_types) that we restore.
const FD_TYPE_REG: i32 = 1;
/// `fdinfo_entry.flags`: close-on-exec.
const FD_CLOEXEC: u32 = 1;

/// Bits of [`VmaPlan::map_flags`] that the rebuild and lazy restore test.
pub const MAP_PRIVATE: u32 = MapFlags::PRIVATE.bits();
pub const MAP_ANONYMOUS: u32 = MapFlags::ANONYMOUS.bits();
pub const PROT_WRITE: u32 = 0x2;

/// Number of signals a sigaction table holds (1..=64).
pub const NSIG: usize = 64;
const SIGKILL: usize = 9;
/// `task_core_entry.task_state` of a process stopped by job control.
const TASK_STOPPED: u32 = 3;
const SIGSTOP: usize = 19;

/// The whole restore of one process, decided before anything is created.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pid: i32,
    pub child: ChildPlan,
    pub ghosts: Vec<GhostPlan>,
    pub memory: MemoryPlan,
    pub mm: MmPlan,
    pub task: TaskPlan,
    /// The leader first, then the other threads in image order.
    pub threads: Vec<ThreadPlan>,
}

/// What the forked child does with its own code before it stops.
#[derive(Debug, Clone, Default)]
pub struct ChildPlan {
    /// In increasing fd order.
    pub fds: Vec<FdOpen>,
    pub cwd: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub umask: u32,
    pub session: SessionPlan,
}

/// What a process does about its session and process group before forking its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionPlan {
    /// It led its own session: `setsid`.
    NewSession,
    /// It led its own group inside another session: `setpgid(0, 0)`.
    NewGroup,
    /// It stays in the session and group it was forked into (the root of a shell job:
    /// ckpt-restore's).
    #[default]
    Inherit,
}

/// One fd the child opens and places at its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdOpen {
    pub fd: i32,
    /// `files.img` id: fds with the same id share one open file description.
    pub file_id: u32,
    pub path: PathBuf,
    /// open(2) flags as dumped (access mode, O_APPEND, ...).
    pub flags: u32,
    pub pos: u64,
    pub cloexec: bool,
    /// For a deleted file: the recreated copy to open (and unlink) instead of `path`.
    pub ghost: Option<PathBuf>,
    /// A path to open, or a pipe, eventfd... to create.
    pub source: crate::files::FdSource,
}

impl FdOpen {
    pub fn open_path(&self) -> &std::path::Path {
        self.ghost.as_deref().unwrap_or(&self.path)
    }
}

impl MappedFile {
    pub fn open_path(&self) -> &std::path::Path {
        self.ghost.as_deref().unwrap_or(&self.path)
    }
}

/// A deleted-but-open file, recreated under a temporary name before the fork.
#[derive(Debug, Clone)]
pub struct GhostPlan {
    pub file_id: u32,
    pub image: PathBuf,
    /// Where the file was; used when free, so that the restored fd reads the same
    /// `(deleted)` path as before.
    pub original: PathBuf,
    /// Where it goes when the original name is taken.
    pub temp_path: PathBuf,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub chunks: bool,
}

/// The dumped address space.
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    /// Every VMA to map, in address order, without the vDSO block and vsyscall.
    pub vmas: Vec<VmaPlan>,
    /// `[vvar]`, `[vvar_vclock]` and `[vdso]`: moved together to where they were.
    pub vdso_block: Option<VdsoBlock>,
    /// MADV_GUARD_INSTALL ranges.
    pub guards: Vec<Range>,
    /// Everything the dumped process had mapped, vsyscall and the vDSO block included:
    /// the helper page must avoid all of it.
    pub occupied: Vec<Range>,
    /// The VMAs of shared memory objects (mapped through [`crate::shmem`]).
    pub shmem: Vec<crate::shmem::SharedVma>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn overlaps(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// The vDSO block as it was, part by part (each part's status and range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdsoBlock {
    pub range: Range,
    pub parts: Vec<(u32, Range)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmaPlan {
    pub range: Range,
    pub prot: u32,
    /// MAP_* flags for the mmap, MAP_FIXED included.
    pub map_flags: u32,
    pub file: Option<MappedFile>,
    pub madv: u64,
    pub status: u32,
    /// Mapped writable first and write-protected once filled, so that the kernel
    /// accounts it (`ac` in smaps) as it did the original, which was writable once.
    pub write_then_protect: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    pub file_id: u32,
    pub path: PathBuf,
    /// For a deleted file: the recreated copy to map instead of `path`.
    pub ghost: Option<PathBuf>,
    /// Flags to open it with in the target (O_RDONLY or O_RDWR).
    pub open_flags: u32,
    pub pgoff: u64,
    pub size: Option<u64>,
    /// `reg_file_entry.build_id` as stored: the id's bytes packed into u32 words.
    pub build_id: Vec<u32>,
}

/// `PR_SET_MM_MAP` and the exe file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MmPlan {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_stack: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
    pub exe: Option<PathBuf>,
    /// `files.img` id of the executable (a deleted one is opened from its ghost copy).
    pub exe_file_id: u32,
    pub thp_disabled: bool,
    pub dumpable: Option<i32>,
}

/// Process-wide state, set once through the leader.
#[derive(Debug, Clone, Default)]
pub struct TaskPlan {
    /// Signals 1..=64, index = signal - 1; SIGKILL and SIGSTOP are left alone.
    pub sigactions: Vec<Option<SigAction>>,
    pub itimers: Option<[pb::ItimerEntry; 3]>,
    pub posix_timers: Vec<pb::PosixTimerEntry>,
    /// Resource number (RLIMIT_*) and limit.
    pub rlimits: Vec<(u32, pb::RlimitEntry)>,
    pub oom_score_adj: Option<i32>,
    pub personality: u32,
    pub child_subreaper: bool,
    pub comm: String,
    pub shared_pending: Vec<Vec<u8>>,
    /// The process was stopped (job control) when dumped: it is left stopped.
    pub stopped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// One thread, with everything set on it before it runs.
#[derive(Debug, Clone)]
pub struct ThreadPlan {
    pub tid: i32,
    /// Registers with the syscall restart already resolved and `orig_rax = -1`.
    pub regs: Regs,
    pub restart: RestartFixup,
    /// For a thread stopped in a syscall that is restarted unless a signal handler runs
    /// first ([`RestartFixup::Rewound`]), its registers as dumped: loaded into a thread
    /// that will be let go from a stop in signal delivery, they leave that choice to the
    /// kernel, as for the original (see `resume::regs_for`).
    pub as_dumped: Option<Regs>,
    pub fpregs: pb::UserX86FpregsEntry,
    pub clear_tid_addr: u64,
    pub sigmask: u64,
    pub pending: Vec<Vec<u8>>,
    pub robust_list: Option<(u64, u32)>,
    pub rseq: Option<pb::RseqEntry>,
    pub sigaltstack: Option<pb::ThreadSasEntry>,
    pub sched: Option<Sched>,
    pub pdeath_sig: u32,
    pub comm: Option<String>,
    pub creds: Option<pb::CredsEntry>,
    /// Filters in the order they were installed (the oldest first).
    pub seccomp: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sched {
    pub policy: u32,
    pub prio: u32,
    pub nice: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("pid {pid}: image has no threads")]
    NoThreads { pid: u32 },
    #[error("pid {pid}: tid {tid}: core image has no {what}")]
    MissingCore {
        pid: u32,
        tid: u32,
        what: &'static str,
    },
    #[error("pid {pid}: core image of tid {tid} is for architecture {mtype}, not x86_64")]
    Arch { pid: u32, tid: u32, mtype: i32 },
    #[error("pid {pid}: tid {tid}: 32-bit (compat) tasks are not supported")]
    Compat { pid: u32, tid: u32 },
    #[error("pid {pid}: fd {fd}: file id {id} is not in files.img")]
    MissingFile { pid: u32, fd: u32, id: u32 },
    #[error("pid {pid}: fd {fd}: file type {kind} is not supported yet")]
    UnsupportedFd { pid: u32, fd: u32, kind: i32 },
    #[error("pid {pid}: file id {id} has no path")]
    NoPath { pid: u32, id: u32 },
    #[error("pid {pid}: vma {start:#x}-{end:#x} is malformed")]
    BadVma { pid: u32, start: u64, end: u64 },
    #[error("pid {pid}: vmas {first:#x} and {second:#x} overlap")]
    Overlap { pid: u32, first: u64, second: u64 },
    #[error("pid {pid}: vma {start:#x}: kind {status:#x} is not supported yet")]
    UnsupportedVma { pid: u32, start: u64, status: u32 },
    #[error("pid {pid}: vma {start:#x}: mapped file id {id} is not in files.img")]
    MissingMappedFile { pid: u32, start: u64, id: u32 },
    #[error("pid {pid}: vdso parts are not contiguous at {addr:#x}")]
    VdsoGap { pid: u32, addr: u64 },
    #[error("pid {pid}: tid {tid}: seccomp filter index {index} is not in seccomp.img")]
    SeccompIndex { pid: u32, tid: u32, index: u32 },
    #[error("pid {pid}: tid {tid}: seccomp filters form a loop")]
    SeccompLoop { pid: u32, tid: u32 },
}

/// The restore of a whole tree, decided before anything is created.
///
/// Ordering rules, all decided here:
/// - a process is forked by its restored parent, parents before children, in
///   `pstree.img` order;
/// - a process leading its session calls `setsid`, one leading its group in its parent's
///   session `setpgid(0, 0)`, both before forking its children, who inherit them;
/// - a process in a group led by another process (neither its own nor the one it
///   inherits at fork) joins it once every process exists;
/// - a child forked with `CLONE_FILES` (its fd table is its parent's) leaves placing the
///   fds to the first process of that table, which waits for it; `CLONE_FS` likewise for
///   cwd, root and umask;
/// - zombies are forked like the others, and exit with their status last of all, once
///   every group is joined; nothing can be below them.
#[derive(Debug, Clone)]
pub struct TreePlan {
    /// In `pstree.img` order: every parent before its children, the root first.
    pub procs: Vec<ProcPlan>,
}

impl TreePlan {
    pub fn root(&self) -> Option<&ProcPlan> {
        self.procs.first()
    }

    /// Every live process's plan, in tree order.
    pub fn live(&self) -> impl Iterator<Item = &Plan> {
        self.procs.iter().filter_map(|p| match &p.kind {
            ProcKind::Live(plan) => Some(plan.as_ref()),
            ProcKind::Zombie { .. } => None,
        })
    }

    pub fn live_mut(&mut self) -> impl Iterator<Item = &mut Plan> {
        self.procs.iter_mut().filter_map(|p| match &mut p.kind {
            ProcKind::Live(plan) => Some(plan.as_mut()),
            ProcKind::Zombie { .. } => None,
        })
    }
}

/// One process of the tree and its place in it.
#[derive(Debug, Clone)]
pub struct ProcPlan {
    pub pid: i32,
    /// Index of the parent in [`TreePlan::procs`]; `None` for the root.
    pub parent: Option<usize>,
    /// Indexes of the children, in the order they are forked.
    pub children: Vec<usize>,
    pub pgid: i32,
    pub sid: i32,
    /// What it does about its session and group before forking its children.
    pub session: SessionPlan,
    /// The group it joins once every process exists.
    pub join_group: Option<i32>,
    /// Forked with `CLONE_FILES`: its fd table is its parent's.
    pub shares_files: bool,
    /// Forked with `CLONE_FS`: its cwd, root and umask are its parent's.
    pub shares_fs: bool,
    pub kind: ProcKind,
}

impl ProcPlan {
    /// It places the fds of its table (it is the first process holding it).
    pub fn places_fds(&self) -> bool {
        !self.shares_files && matches!(self.kind, ProcKind::Live(_))
    }
}

#[derive(Debug, Clone)]
pub enum ProcKind {
    Live(Box<Plan>),
    /// Exits with `status` (a raw wait status: exit code, or the killing signal).
    Zombie {
        status: u32,
    },
}

/// Why a tree cannot be restored as dumped.
#[derive(Debug, thiserror::Error)]
pub enum TreePlanError {
    #[error("pstree.img has no process")]
    Empty,
    #[error("pid {pid}: its parent {ppid} is not listed before it in pstree.img")]
    Orphan { pid: u32, ppid: u32 },
    #[error("pid {pid}: the root of the tree is a zombie")]
    ZombieRoot { pid: u32 },
    #[error("pid {pid}: a zombie with children in pstree.img (child {child})")]
    ZombieParent { pid: u32, child: u32 },
    #[error("pid {pid}: shares its address space with pid {other} (CLONE_VM without CLONE_THREAD is not supported)")]
    SharedVm { pid: u32, other: u32 },
    #[error("pid {pid}: shares its signal handlers with pid {other} (CLONE_SIGHAND needs CLONE_VM, which is not supported)")]
    SharedSighand { pid: u32, other: u32 },
    #[error("pid {pid}: shares its {what} with pid {other}, which is not its parent (only tables shared since fork can be restored)")]
    SharedNotFromParent {
        pid: u32,
        other: u32,
        what: &'static str,
    },
    #[error("pid {pid}: its session {sid} is neither its own nor its parent's (a session whose leader is gone is not supported)")]
    Session { pid: u32, sid: u32 },
    #[error("pid {pid}: leads session {pid} but is in process group {pgid}")]
    LeaderGroup { pid: u32, pgid: u32 },
    #[error("pid {pid}: its process group {pgid} has no leader in session {sid} of the tree")]
    NoGroupLeader { pid: u32, pgid: u32, sid: u32 },
    #[error("pid {pid}: a fork is refused at the limit of kernel pid numbers (pid {pid} is not a valid pid)")]
    BadPid { pid: u32 },
    #[error(transparent)]
    Process(#[from] PlanError),
}

/// `task_core_entry.task_state` of a zombie (CRIU's TASK_DEAD).
const TASK_DEAD: u32 = 2;

/// Decides the restore of the whole tree: each live process's [`Plan`], who forks whom
/// with which shared tables, sessions, groups and zombies. `shell_job`: the root keeps
/// ckpt-restore's session and group.
pub fn plan_tree(images: &TreeImages, shell_job: bool) -> Result<TreePlan, TreePlanError> {
    let procs_in = &images.processes;
    if procs_in.is_empty() {
        return Err(TreePlanError::Empty);
    }
    let mut index: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let mut procs: Vec<ProcPlan> = Vec::with_capacity(procs_in.len());
    // Per process: the group it is in once forked and its own setsid/setpgid are done.
    let mut early_pgid: Vec<u32> = Vec::with_capacity(procs_in.len());
    for (i, p) in procs_in.iter().enumerate() {
        let e = &p.pstree;
        let pid = i32::try_from(e.pid)
            .ok()
            .filter(|&v| v > 0)
            .ok_or(TreePlanError::BadPid { pid: e.pid })?;
        let parent = if i == 0 {
            None
        } else {
            Some(*index.get(&e.ppid).ok_or(TreePlanError::Orphan {
                pid: e.pid,
                ppid: e.ppid,
            })?)
        };
        let tc = p.cores.first().and_then(|c| c.tc.as_ref());
        let zombie = tc.is_some_and(|tc| tc.task_state == TASK_DEAD);
        if let Some(pi) = parent {
            let pp: &ProcPlan = &procs[pi];
            if matches!(pp.kind, ProcKind::Zombie { .. }) {
                return Err(TreePlanError::ZombieParent {
                    pid: pp.pid.unsigned_abs(),
                    child: e.pid,
                });
            }
        } else if zombie {
            return Err(TreePlanError::ZombieRoot { pid: e.pid });
        }
        let (session, early, join) = match parent {
            None => {
                let session = if shell_job {
                    SessionPlan::Inherit
                } else if e.sid == e.pid {
                    SessionPlan::NewSession
                } else if e.pgid == e.pid {
                    SessionPlan::NewGroup
                } else {
                    SessionPlan::Inherit
                };
                (session, e.pgid, None)
            }
            Some(pi) => {
                let parent_sid = procs_in[pi].pstree.sid;
                let inherited = early_pgid[pi];
                if e.sid == e.pid {
                    if e.pgid != e.pid {
                        return Err(TreePlanError::LeaderGroup {
                            pid: e.pid,
                            pgid: e.pgid,
                        });
                    }
                    (SessionPlan::NewSession, e.pid, None)
                } else if e.sid != parent_sid {
                    return Err(TreePlanError::Session {
                        pid: e.pid,
                        sid: e.sid,
                    });
                } else if e.pgid == e.pid {
                    (SessionPlan::NewGroup, e.pid, None)
                } else if e.pgid == inherited {
                    (SessionPlan::Inherit, inherited, None)
                } else {
                    let led = procs_in.iter().any(|o| {
                        o.pstree.pid == e.pgid && o.pstree.pgid == e.pgid && o.pstree.sid == e.sid
                    });
                    if !led {
                        return Err(TreePlanError::NoGroupLeader {
                            pid: e.pid,
                            pgid: e.pgid,
                            sid: e.sid,
                        });
                    }
                    let pgid =
                        i32::try_from(e.pgid).map_err(|_| TreePlanError::BadPid { pid: e.pgid })?;
                    (SessionPlan::Inherit, inherited, Some(pgid))
                }
            }
        };
        let (shares_files, shares_fs) = if zombie {
            (false, false)
        } else {
            shared_with_parent(procs_in, i, parent)?
        };
        let kind = if zombie {
            ProcKind::Zombie {
                status: tc.map(|tc| tc.exit_code).unwrap_or(0),
            }
        } else {
            let mut plan = plan_process(p)?;
            plan.child.session = session;
            ProcKind::Live(Box::new(plan))
        };
        index.insert(e.pid, i);
        early_pgid.push(early);
        if let Some(pi) = parent {
            procs[pi].children.push(i);
        }
        procs.push(ProcPlan {
            pid,
            parent,
            children: Vec::new(),
            pgid: i32::try_from(e.pgid).unwrap_or(0),
            sid: i32::try_from(e.sid).unwrap_or(0),
            session,
            join_group: join,
            shares_files,
            shares_fs,
            kind,
        });
    }
    Ok(TreePlan { procs })
}

/// Which of its parent's tables process `i` shares (`CLONE_FILES`, `CLONE_FS`), from
/// the kernel object ids of `ids-PID.img`. Sharing with anyone but the parent, and
/// sharing memory or signal handlers, cannot be made by a fork.
fn shared_with_parent(
    procs: &[ProcessImages],
    i: usize,
    parent: Option<usize>,
) -> Result<(bool, bool), TreePlanError> {
    let me = &procs[i];
    let pid = me.pstree.pid;
    let Some(ids) = me.ids else {
        return Ok((false, false));
    };
    let parent_ids = parent.and_then(|pi| procs.get(pi)).and_then(|p| p.ids);
    let mut files = false;
    let mut fs = false;
    for (j, other) in procs.iter().enumerate().take(i) {
        let Some(o) = other.ids else { continue };
        if other.is_zombie() {
            continue;
        }
        let opid = other.pstree.pid;
        if o.vm_id == ids.vm_id {
            return Err(TreePlanError::SharedVm { pid, other: opid });
        }
        if o.sighand_id == ids.sighand_id {
            return Err(TreePlanError::SharedSighand { pid, other: opid });
        }
        let is_parent = Some(j) == parent;
        if o.files_id == ids.files_id {
            if !is_parent && parent_ids.map(|p| p.files_id) != Some(ids.files_id) {
                return Err(TreePlanError::SharedNotFromParent {
                    pid,
                    other: opid,
                    what: "fd table",
                });
            }
            files = true;
        }
        if o.fs_id == ids.fs_id {
            if !is_parent && parent_ids.map(|p| p.fs_id) != Some(ids.fs_id) {
                return Err(TreePlanError::SharedNotFromParent {
                    pid,
                    other: opid,
                    what: "cwd and root (fs)",
                });
            }
            fs = true;
        }
    }
    let files = files && parent_ids.is_some_and(|p| p.files_id == ids.files_id);
    let fs = fs && parent_ids.is_some_and(|p| p.fs_id == ids.fs_id);
    Ok((files, fs))
}

/// Decides every operation of the restore of one live process.
pub fn plan_process(p: &ProcessImages) -> Result<Plan, PlanError> {
    let pid = p.pstree.pid;
    if p.cores.is_empty() || p.pstree.threads.is_empty() {
        return Err(PlanError::NoThreads { pid });
    }
    let ghosts = plan_ghosts(p);
    let child = plan_files(p, &ghosts)?;
    let memory = plan_memory(p, &ghosts)?;
    let mm = plan_mm(p, &ghosts);
    let task = plan_task(p)?;
    let threads = p
        .cores
        .iter()
        .zip(p.pstree.threads.iter())
        .map(|(core, &tid)| plan_thread(p, tid, core))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        pid: i32::try_from(pid).unwrap_or(i32::MAX),
        child,
        ghosts,
        memory,
        mm,
        task,
        threads,
    })
}

fn reg_file(p: &ProcessImages, id: u32) -> Option<&pb::RegFileEntry> {
    p.files.get(&id).and_then(|f| f.reg.as_ref())
}

/// Every deleted-but-open (or mapped) file, with the temporary name it gets when its
/// original name is taken.
fn plan_ghosts(p: &ProcessImages) -> Vec<GhostPlan> {
    let mut ghosts: Vec<GhostPlan> = p
        .ghosts
        .iter()
        .filter_map(|(&id, g)| {
            let path = PathBuf::from(&reg_file(p, id)?.name);
            let mut name = path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            name.push(format!(".ckpt-ghost.{:x}", g.remap_id));
            Some(GhostPlan {
                file_id: id,
                image: g.path.clone(),
                temp_path: path.with_file_name(name),
                original: path,
                mode: g.entry.mode,
                uid: g.entry.uid,
                gid: g.entry.gid,
                size: g.entry.size,
                chunks: g.entry.chunks.unwrap_or(false),
            })
        })
        .collect();
    ghosts.sort_by_key(|g| g.file_id);
    ghosts
}

fn ghost_path(ghosts: &[GhostPlan], id: u32) -> Option<PathBuf> {
    ghosts
        .iter()
        .find(|g| g.file_id == id)
        .map(|g| g.temp_path.clone())
}

fn plan_files(p: &ProcessImages, ghosts: &[GhostPlan]) -> Result<ChildPlan, PlanError> {
    let pid = p.pstree.pid;
    let mut fds = Vec::new();
    for fdi in &p.fdinfo {
        if fdi.r#type != FD_TYPE_REG {
            if let Some(fd) = crate::files::plan_kobj(p.files.get(&fdi.id), fdi) {
                fds.push(fd);
                continue;
            }
            return Err(PlanError::UnsupportedFd {
                pid,
                fd: fdi.fd,
                kind: fdi.r#type,
            });
        }
        let reg = reg_file(p, fdi.id).ok_or(PlanError::MissingFile {
            pid,
            fd: fdi.fd,
            id: fdi.id,
        })?;
        let path = PathBuf::from(&reg.name);
        let ghost = ghost_path(ghosts, fdi.id);
        fds.push(FdOpen {
            file_id: fdi.id,
            fd: i32::try_from(fdi.fd).map_err(|_| PlanError::MissingFile {
                pid,
                fd: fdi.fd,
                id: fdi.id,
            })?,
            path,
            flags: reg.flags,
            pos: reg.pos,
            cloexec: fdi.flags & FD_CLOEXEC != 0,
            ghost,
            source: crate::files::FdSource::Path,
        });
    }
    fds.sort_by_key(|f| f.fd);
    let dir_of = |id: u32| -> Result<PathBuf, PlanError> {
        reg_file(p, id)
            .map(|r| PathBuf::from(&r.name))
            .ok_or(PlanError::NoPath { pid, id })
    };
    let (cwd, root, umask) = match &p.fs {
        Some(fs) => (
            Some(dir_of(fs.cwd_id)?),
            Some(dir_of(fs.root_id)?),
            fs.umask.unwrap_or(0o022),
        ),
        None => (None, None, 0o022),
    };
    let session = if p.pstree.sid == pid {
        SessionPlan::NewSession
    } else if p.pstree.pgid == pid {
        SessionPlan::NewGroup
    } else {
        SessionPlan::Inherit
    };
    Ok(ChildPlan {
        fds,
        cwd,
        root,
        umask,
        session,
    })
}

fn plan_memory(p: &ProcessImages, ghosts: &[GhostPlan]) -> Result<MemoryPlan, PlanError> {
    let pid = p.pstree.pid;
    let mut vmas = Vec::new();
    let mut guards = Vec::new();
    let mut occupied = Vec::new();
    let mut vdso_parts: Vec<(u32, Range)> = Vec::new();
    for v in &p.mm.vmas {
        let range = Range {
            start: v.start,
            end: v.end,
        };
        if v.start >= v.end || v.start % PAGE_SIZE != 0 || v.end % PAGE_SIZE != 0 {
            return Err(PlanError::BadVma {
                pid,
                start: v.start,
                end: v.end,
            });
        }
        let status = VmaStatus::from_bits_retain(v.status);
        let flags = MapFlags::from_bits_retain(v.flags);
        if status.contains(VmaStatus::GUARD) {
            guards.push(range);
            continue;
        }
        occupied.push(range);
        if status.contains(VmaStatus::VSYSCALL) {
            continue;
        }
        if status.intersects(VmaStatus::VDSO | VmaStatus::VVAR) {
            vdso_parts.push((v.status, range));
            continue;
        }
        let unsupported =
            VmaStatus::SOCKET | VmaStatus::AIORING | VmaStatus::SHSTK | VmaStatus::UPROBES;
        if status.intersects(unsupported) {
            return Err(PlanError::UnsupportedVma {
                pid,
                start: v.start,
                status: v.status,
            });
        }
        // A memfd's mapping is mapped through `crate::shmem`, like shared memory.
        let file = if status.maps_file() && !status.contains(VmaStatus::MEMFD) {
            let id = u32::try_from(v.shmid).map_err(|_| PlanError::MissingMappedFile {
                pid,
                start: v.start,
                id: u32::MAX,
            })?;
            let reg = reg_file(p, id).ok_or(PlanError::MissingMappedFile {
                pid,
                start: v.start,
                id,
            })?;
            let shared_writable = flags.contains(MapFlags::SHARED) && v.prot & PROT_WRITE != 0;
            Some(MappedFile {
                file_id: id,
                path: PathBuf::from(&reg.name),
                ghost: ghost_path(ghosts, id),
                open_flags: if shared_writable { 2 } else { 0 },
                pgoff: v.pgoff,
                size: reg.size,
                build_id: reg.build_id.clone(),
            })
        } else {
            None
        };
        let mut map_flags = flags.difference(MapFlags::GROWSDOWN) | MapFlags::FIXED;
        // A private writable mapping the kernel did not account was made with MAP_NORESERVE.
        if status.contains(VmaStatus::NOT_ACCOUNTABLE)
            && flags.contains(MapFlags::PRIVATE)
            && v.prot & PROT_WRITE != 0
        {
            map_flags |= MapFlags::NORESERVE;
        }
        if file.is_none() {
            map_flags |= MapFlags::ANONYMOUS;
        }
        if status.contains(VmaStatus::STACK) || flags.contains(MapFlags::GROWSDOWN) {
            map_flags |= MapFlags::GROWSDOWN;
        }
        vmas.push(VmaPlan {
            range,
            prot: v.prot,
            map_flags: map_flags.bits(),
            file,
            madv: v.madv.unwrap_or(0),
            status: v.status,
            write_then_protect: false,
        });
    }
    vmas.sort_by_key(|v| v.range.start);
    for pair in vmas.windows(2) {
        if pair[0].range.overlaps(&pair[1].range) {
            return Err(PlanError::Overlap {
                pid,
                first: pair[0].range.start,
                second: pair[1].range.start,
            });
        }
    }
    vdso_parts.sort_by_key(|(_, r)| r.start);
    let vdso_block = match (vdso_parts.first(), vdso_parts.last()) {
        (Some(first), Some(last)) => {
            for pair in vdso_parts.windows(2) {
                if pair[0].1.end != pair[1].1.start {
                    return Err(PlanError::VdsoGap {
                        pid,
                        addr: pair[0].1.end,
                    });
                }
            }
            Some(VdsoBlock {
                range: Range {
                    start: first.1.start,
                    end: last.1.end,
                },
                parts: vdso_parts.clone(),
            })
        }
        _ => None,
    };
    occupied.sort();
    Ok(MemoryPlan {
        vmas,
        vdso_block,
        guards,
        occupied,
        shmem: crate::shmem::plan_vmas(pid, &p.mm.vmas, &p.files)?,
    })
}

fn plan_mm(p: &ProcessImages, ghosts: &[GhostPlan]) -> MmPlan {
    let mm = &p.mm;
    MmPlan {
        start_code: mm.mm_start_code,
        end_code: mm.mm_end_code,
        start_data: mm.mm_start_data,
        end_data: mm.mm_end_data,
        start_stack: mm.mm_start_stack,
        start_brk: mm.mm_start_brk,
        brk: mm.mm_brk,
        arg_start: mm.mm_arg_start,
        arg_end: mm.mm_arg_end,
        env_start: mm.mm_env_start,
        env_end: mm.mm_env_end,
        auxv: mm.mm_saved_auxv.clone(),
        exe: ghost_path(ghosts, mm.exe_file_id)
            .or_else(|| reg_file(p, mm.exe_file_id).map(|r| PathBuf::from(&r.name))),
        exe_file_id: mm.exe_file_id,
        thp_disabled: mm.thp_disabled.unwrap_or(false),
        dumpable: mm.dumpable,
    }
}

fn plan_task(p: &ProcessImages) -> Result<TaskPlan, PlanError> {
    let pid = p.pstree.pid;
    let tid = p.pstree.threads.first().copied().unwrap_or(pid);
    let tc = p
        .cores
        .first()
        .and_then(|c| c.tc.as_ref())
        .ok_or(PlanError::MissingCore {
            pid,
            tid,
            what: "task core",
        })?;
    // CRIU's list skips SIGKILL and SIGSTOP (no handler can be set for them): 62
    // entries for signals 1..=64 without 9 and 19.
    let mut sigactions = vec![None; NSIG];
    let settable = (1..=NSIG).filter(|&sig| sig != SIGKILL && sig != SIGSTOP);
    for (sig, sa) in settable.zip(tc.sigactions.iter()) {
        sigactions[sig - 1] = Some(SigAction {
            handler: sa.sigaction,
            flags: sa.flags,
            restorer: sa.restorer,
            mask: sa.mask,
        });
    }
    let (itimers, posix_timers) = match &tc.timers {
        Some(t) => {
            let real = t.real;
            let virt = t.virt;
            let prof = t.prof;
            (Some([real, virt, prof]), t.posix.clone())
        }
        None => (None, Vec::new()),
    };
    let rlimits = tc
        .rlimits
        .as_ref()
        .map(|r| {
            r.rlimits
                .iter()
                .enumerate()
                .filter_map(|(i, l)| Some((u32::try_from(i).ok()?, *l)))
                .collect()
        })
        .unwrap_or_default();
    Ok(TaskPlan {
        sigactions,
        itimers,
        posix_timers,
        rlimits,
        oom_score_adj: tc.oom_score_adj,
        personality: tc.personality,
        child_subreaper: tc.child_subreaper.unwrap_or(false),
        comm: tc.comm.clone(),
        shared_pending: tc
            .signals_s
            .as_ref()
            .map(|q| q.signals.iter().map(|s| s.siginfo.clone()).collect())
            .unwrap_or_default(),
        stopped: tc.task_state == TASK_STOPPED,
    })
}

fn plan_thread(p: &ProcessImages, tid: u32, core: &pb::CoreEntry) -> Result<ThreadPlan, PlanError> {
    let pid = p.pstree.pid;
    if core.mtype != pb::core_entry::March::X8664 as i32 {
        return Err(PlanError::Arch {
            pid,
            tid,
            mtype: core.mtype,
        });
    }
    let ti = core.thread_info.as_ref().ok_or(PlanError::MissingCore {
        pid,
        tid,
        what: "x86 thread info",
    })?;
    let gpregs = &ti.gpregs;
    if gpregs.mode == Some(pb::UserX86RegsMode::Compat as i32) {
        return Err(PlanError::Compat { pid, tid });
    }
    let fpregs = ti.fpregs.clone();
    let tcore = core.thread_core.as_ref().ok_or(PlanError::MissingCore {
        pid,
        tid,
        what: "thread core",
    })?;
    let leader_tc = p.cores.first().and_then(|c| c.tc.as_ref());
    let sigmask = tcore
        .blk_sigset
        .or_else(|| {
            if tid == pid {
                leader_tc.map(|t| t.blk_sigset)
            } else {
                None
            }
        })
        .unwrap_or(0);
    let sched = tcore.sched_policy.map(|policy| Sched {
        policy,
        prio: tcore.sched_prio.unwrap_or(0),
        nice: tcore.sched_nice.unwrap_or(0),
    });
    let seccomp = seccomp_chain(p, tid, tcore)?;
    let (regs, restart, as_dumped) = thread_regs(gpregs);
    Ok(ThreadPlan {
        tid: i32::try_from(tid).unwrap_or(i32::MAX),
        regs,
        restart,
        as_dumped,
        fpregs,
        clear_tid_addr: ti.clear_tid_addr,
        sigmask,
        pending: tcore
            .signals_p
            .as_ref()
            .map(|q| q.signals.iter().map(|s| s.siginfo.clone()).collect())
            .unwrap_or_default(),
        robust_list: (tcore.futex_rla != 0).then_some((tcore.futex_rla, tcore.futex_rla_len)),
        rseq: tcore.rseq_entry.filter(|r| r.rseq_abi_pointer != 0),
        sigaltstack: tcore.sas,
        sched,
        pdeath_sig: tcore.pdeath_sig.unwrap_or(0),
        // Older images name only the process (in the task core): the leader takes it.
        comm: tcore.comm.clone().or_else(|| {
            if tid == pid {
                leader_tc.map(|t| t.comm.clone())
            } else {
                None
            }
        }),
        creds: tcore.creds.clone(),
        seccomp,
    })
}

/// The thread's filter chain from `seccomp.img`, oldest first (install order).
fn seccomp_chain(
    p: &ProcessImages,
    tid: u32,
    tcore: &pb::ThreadCoreEntry,
) -> Result<Vec<Vec<u8>>, PlanError> {
    let pid = p.pstree.pid;
    if tcore.seccomp_mode != Some(pb::SeccompMode::Filter as i32) {
        return Ok(Vec::new());
    }
    let mut chain = Vec::new();
    let mut next = tcore.seccomp_filter;
    while let Some(index) = next {
        let f = usize::try_from(index)
            .ok()
            .and_then(|i| p.seccomp_filters.get(i))
            .ok_or(PlanError::SeccompIndex { pid, tid, index })?;
        chain.push(f.filter.clone());
        if chain.len() > p.seccomp_filters.len() {
            return Err(PlanError::SeccompLoop { pid, tid });
        }
        next = f.prev;
    }
    chain.reverse();
    Ok(chain)
}

/// The image's general registers in the kernel's layout, with the syscall the thread
/// was stopped in resolved the way the kernel's signal-return path would have done
/// (see [`Regs::fix_syscall_restart`]): the restored thread starts in user mode. And for
/// a call rewound so, the registers as dumped ([`ThreadPlan::as_dumped`]).
pub fn thread_regs(r: &pb::UserX86RegsEntry) -> (Regs, RestartFixup, Option<Regs>) {
    let dumped = Regs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.bp,
        rbx: r.bx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.ax,
        rcx: r.cx,
        rdx: r.dx,
        rsi: r.si,
        rdi: r.di,
        orig_rax: r.orig_ax,
        rip: r.ip,
        cs: r.cs,
        eflags: r.flags,
        rsp: r.sp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    };
    let mut regs = dumped;
    let fixup = regs.fix_syscall_restart();
    let as_dumped = (fixup == RestartFixup::Rewound).then_some(dumped);
    (regs, fixup, as_dumped)
}

/// Decides which private, now read-only VMAs were writable once, and so accounted
/// by the kernel: the image says so where its writer recorded `NOT_ACCOUNTABLE` (as
/// CRIU does); otherwise a VMA with saved pages was written, hence writable.
pub fn mark_accounting(memory: &mut MemoryPlan, saved: &[Range]) {
    let not_accountable =
        |v: &VmaPlan| VmaStatus::from_bits_retain(v.status).contains(VmaStatus::NOT_ACCOUNTABLE);
    let recorded = memory.vmas.iter().any(not_accountable);
    for v in &mut memory.vmas {
        if v.map_flags & MAP_PRIVATE == 0
            || v.prot & PROT_WRITE != 0
            || VmaStatus::from_bits_retain(v.status).contains(VmaStatus::STACK)
        {
            continue;
        }
        v.write_then_protect = if recorded {
            !not_accountable(v)
        } else {
            saved.iter().any(|r| r.overlaps(&v.range))
        };
    }
}

/// Finds `len` bytes free in every one of `taken`, page aligned, at or above `from`.
pub fn pick_hole(taken: &[Range], len: u64, from: u64, below: u64) -> Option<u64> {
    let mut sorted: Vec<Range> = taken.to_vec();
    sorted.sort();
    let mut cand = from;
    loop {
        let want = Range {
            start: cand,
            end: cand.checked_add(len)?,
        };
        if want.end > below {
            return None;
        }
        match sorted.iter().find(|r| r.overlaps(&want)) {
            None => return Some(cand),
            Some(r) => cand = r.end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::GhostImage;

    const PID: u32 = 4242;

    fn vma(start: u64, end: u64, prot: u32, flags: u32, status: u32, shmid: u64) -> pb::VmaEntry {
        pb::VmaEntry {
            start,
            end,
            pgoff: 0,
            shmid,
            prot,
            flags,
            status,
            fd: -1,
            madv: None,
            fdflags: None,
        }
    }

    fn reg(id: u32, name: &str, flags: u32, pos: u64) -> pb::FileEntry {
        pb::FileEntry {
            r#type: FD_TYPE_REG,
            id,
            reg: Some(pb::RegFileEntry {
                id,
                flags,
                pos,
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn regs(ip: u64, ax: i64, orig_ax: i64) -> pb::UserX86RegsEntry {
        pb::UserX86RegsEntry {
            ip,
            ax: remote_word(ax),
            orig_ax: remote_word(orig_ax),
            ..Default::default()
        }
    }

    fn remote_word(v: i64) -> u64 {
        u64::from_ne_bytes(v.to_ne_bytes())
    }

    fn core(tc: bool, gpregs: pb::UserX86RegsEntry) -> pb::CoreEntry {
        pb::CoreEntry {
            mtype: pb::core_entry::March::X8664 as i32,
            thread_info: Some(pb::ThreadInfoX86 {
                gpregs,
                ..Default::default()
            }),
            tc: tc.then(|| pb::TaskCoreEntry {
                comm: "demo".into(),
                blk_sigset: 0x4000,
                // 62 entries: SIGKILL and SIGSTOP have none; entry 8 is SIGUSR1 (10).
                sigactions: (0..62)
                    .map(|i| pb::SaEntry {
                        sigaction: if i == 8 { 0x401000 } else { 0 },
                        flags: 0x0400_0000,
                        restorer: 0x402000,
                        mask: 0,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            thread_core: Some(pb::ThreadCoreEntry {
                futex_rla: 0x7000,
                futex_rla_len: 24,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One process, planned as the tree's root.
    struct Im {
        root: ProcessImages,
    }

    fn plan(im: &Im) -> Result<Plan, PlanError> {
        plan_process(&im.root)
    }

    fn images() -> Im {
        let mut files = std::collections::HashMap::new();
        for f in [
            reg(1, "/bin/demo", 0, 0),
            reg(2, "/tmp/log", 0o2001, 77),
            reg(3, "/", 0o200000, 0),
            reg(4, "/tmp/gone", 2, 5),
        ] {
            files.insert(f.id, f);
        }
        let mut ghosts = std::collections::HashMap::new();
        ghosts.insert(
            4,
            GhostImage {
                remap_id: 9,
                entry: pb::GhostFileEntry {
                    mode: 0o100644,
                    ..Default::default()
                },
                path: "/img/ghost-file-9.img".into(),
            },
        );
        Im {
            root: ProcessImages {
                pstree: pb::PstreeEntry {
                    pid: PID,
                    ppid: 0,
                    pgid: PID,
                    sid: 1,
                    threads: vec![PID, PID + 1],
                },
                cores: vec![
                    core(true, regs(0x401002, -516, 35)),
                    core(false, regs(0x401100, -512, 202)),
                ],
                mm: pb::MmEntry {
                    exe_file_id: 1,
                    vmas: vec![
                        vma(
                            0x400000,
                            0x401000,
                            1,
                            MAP_PRIVATE,
                            (VmaStatus::REGULAR | VmaStatus::FILE_PRIVATE).bits(),
                            1,
                        ),
                        vma(
                            0x401000,
                            0x403000,
                            5,
                            MAP_PRIVATE,
                            (VmaStatus::REGULAR | VmaStatus::FILE_PRIVATE).bits(),
                            1,
                        ),
                        vma(
                            0x7ff0_0000_0000,
                            0x7ff0_0002_1000,
                            3,
                            MAP_PRIVATE | MAP_ANONYMOUS,
                            (VmaStatus::REGULAR | VmaStatus::STACK | VmaStatus::ANON_PRIVATE)
                                .bits(),
                            0,
                        ),
                        vma(
                            0x7ff0_1000_0000,
                            0x7ff0_1000_4000,
                            1,
                            MAP_PRIVATE | MAP_ANONYMOUS,
                            VmaStatus::VVAR.bits(),
                            0,
                        ),
                        vma(
                            0x7ff0_1000_4000,
                            0x7ff0_1000_6000,
                            1,
                            MAP_PRIVATE | MAP_ANONYMOUS,
                            VmaStatus::VVAR.bits(),
                            0,
                        ),
                        vma(
                            0x7ff0_1000_6000,
                            0x7ff0_1000_8000,
                            5,
                            MAP_PRIVATE | MAP_ANONYMOUS,
                            (VmaStatus::REGULAR | VmaStatus::VDSO).bits(),
                            0,
                        ),
                        vma(
                            0xffff_ffff_ff60_0000,
                            0xffff_ffff_ff60_1000,
                            4,
                            MAP_PRIVATE | MAP_ANONYMOUS,
                            VmaStatus::VSYSCALL.bits(),
                            0,
                        ),
                        vma(0x500000, 0x502000, 0, 0, VmaStatus::GUARD.bits(), 0),
                    ],
                    ..Default::default()
                },
                fdinfo: vec![
                    pb::FdinfoEntry {
                        id: 2,
                        flags: 0,
                        r#type: FD_TYPE_REG,
                        fd: 1,
                        ..Default::default()
                    },
                    pb::FdinfoEntry {
                        id: 4,
                        flags: FD_CLOEXEC,
                        r#type: FD_TYPE_REG,
                        fd: 0,
                        ..Default::default()
                    },
                ],
                files: std::sync::Arc::new(files),
                ghosts: std::sync::Arc::new(ghosts),
                fs: Some(pb::FsEntry {
                    cwd_id: 3,
                    root_id: 3,
                    umask: Some(0o077),
                }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn fds_are_sorted_with_flags_positions_and_ghosts() {
        let p = plan(&images()).expect("plan");
        let fds = &p.child.fds;
        assert_eq!(fds.iter().map(|f| f.fd).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(fds[1].flags, 0o2001, "O_APPEND|O_WRONLY kept");
        assert_eq!(fds[1].pos, 77);
        assert!(fds[0].cloexec && !fds[1].cloexec);
        let ghost = fds[0]
            .ghost
            .as_deref()
            .expect("deleted file opens its ghost copy");
        assert_eq!(ghost, std::path::Path::new("/tmp/gone.ckpt-ghost.9"));
        assert_eq!(p.ghosts.len(), 1);
        assert_eq!(p.child.umask, 0o077);
        assert_eq!(p.child.cwd.as_deref(), Some(std::path::Path::new("/")));
        assert_eq!(p.child.session, SessionPlan::NewGroup);
    }

    #[test]
    fn special_vmas_form_one_vdso_block_and_stay_out_of_the_mappings() {
        let p = plan(&images()).expect("plan");
        let m = &p.memory;
        assert_eq!(m.vmas.len(), 3);
        let block = m.vdso_block.as_ref().expect("vdso block");
        assert_eq!(
            block.range,
            Range {
                start: 0x7ff0_1000_0000,
                end: 0x7ff0_1000_8000
            }
        );
        assert_eq!(block.parts.len(), 3);
        assert_eq!(
            m.guards,
            vec![Range {
                start: 0x500000,
                end: 0x502000
            }]
        );
        let stack = &m.vmas[2];
        assert_ne!(stack.map_flags & MapFlags::GROWSDOWN.bits(), 0);
        assert_ne!(stack.map_flags & MAP_ANONYMOUS, 0);
        let text = &m.vmas[1];
        assert_eq!(
            text.file.as_ref().map(|f| f.path.as_path()),
            Some(std::path::Path::new("/bin/demo"))
        );
        assert_eq!(text.map_flags & MAP_ANONYMOUS, 0);
        assert_ne!(text.map_flags & MapFlags::FIXED.bits(), 0);
        assert_eq!(p.mm.exe.as_deref(), Some(std::path::Path::new("/bin/demo")));
    }

    #[test]
    fn a_gap_inside_the_vdso_block_is_refused() {
        let mut im = images();
        im.root
            .mm
            .vmas
            .retain(|v| !(v.status == VmaStatus::VVAR.bits() && v.start == 0x7ff0_1000_4000));
        assert!(matches!(plan(&im), Err(PlanError::VdsoGap { .. })));
    }

    #[test]
    fn overlapping_vmas_are_refused() {
        let mut im = images();
        im.root.mm.vmas.push(vma(
            0x400800,
            0x401800,
            3,
            MAP_PRIVATE | MAP_ANONYMOUS,
            VmaStatus::ANON_PRIVATE.bits(),
            0,
        ));
        assert!(matches!(
            plan(&im),
            Err(PlanError::BadVma { .. }) | Err(PlanError::Overlap { .. })
        ));
    }

    #[test]
    fn syscall_restart_rewinds_or_interrupts() {
        let p = plan(&images()).expect("plan");
        // nanosleep stopped with a restart block: returns EINTR where it stood.
        let leader = &p.threads[0];
        assert_eq!(leader.regs.rip, 0x401002);
        assert_eq!(leader.regs.rax, remote_word(-4));
        assert_eq!(leader.regs.orig_rax, u64::MAX);
        assert_eq!(leader.restart, RestartFixup::Interrupted);
        // futex with ERESTARTSYS: re-issued.
        let other = &p.threads[1];
        assert_eq!(other.regs.rip, 0x401100 - 2);
        assert_eq!(other.regs.rax, 202);
        assert_eq!(other.restart, RestartFixup::Rewound);
        assert_eq!(other.tid, (PID + 1) as i32);
    }

    #[test]
    fn sigactions_cover_64_signals_but_kill_and_stop() {
        let p = plan(&images()).expect("plan");
        assert_eq!(p.task.sigactions.len(), NSIG);
        assert_eq!(p.task.sigactions[9].map(|a| a.handler), Some(0x401000));
        assert!(p.task.sigactions[8].is_none() && p.task.sigactions[18].is_none());
        assert!(
            p.task.sigactions[63].is_some(),
            "signal 64 is the 62nd entry"
        );
        // The leader's mask comes from the task core when the thread core has none.
        assert_eq!(p.threads[0].sigmask, 0x4000);
        assert_eq!(p.threads[0].robust_list, Some((0x7000, 24)));
    }

    #[test]
    fn seccomp_chain_is_installed_oldest_first_and_loops_are_refused() {
        let mut im = images();
        im.root.seccomp_filters = std::sync::Arc::new(vec![
            pb::SeccompFilter {
                filter: vec![1; 8],
                prev: None,
                flags: None,
            },
            pb::SeccompFilter {
                filter: vec![2; 8],
                prev: Some(0),
                flags: None,
            },
        ]);
        if let Some(tc) = im.root.cores[0].thread_core.as_mut() {
            tc.seccomp_mode = Some(pb::SeccompMode::Filter as i32);
            tc.seccomp_filter = Some(1);
        }
        let p = plan(&im).expect("plan");
        assert_eq!(p.threads[0].seccomp, vec![vec![1; 8], vec![2; 8]]);
        std::sync::Arc::make_mut(&mut im.root.seccomp_filters)[0].prev = Some(1);
        assert!(matches!(plan(&im), Err(PlanError::SeccompLoop { .. })));
    }

    #[test]
    fn unsupported_fd_types_are_refused_by_number() {
        let mut im = images();
        im.root.fdinfo.push(pb::FdinfoEntry {
            id: 7,
            flags: 0,
            r#type: 2,
            fd: 5,
            ..Default::default()
        });
        match plan(&im) {
            Err(PlanError::UnsupportedFd { fd, kind, .. }) => assert_eq!((fd, kind), (5, 2)),
            other => panic!("expected UnsupportedFd, got {other:?}"),
        }
    }

    #[test]
    fn holes_avoid_every_taken_range() {
        let taken = [
            Range {
                start: 0x1000,
                end: 0x3000,
            },
            Range {
                start: 0x4000,
                end: 0x5000,
            },
        ];
        assert_eq!(pick_hole(&taken, 0x1000, 0x1000, 0x10000), Some(0x3000));
        assert_eq!(pick_hole(&taken, 0x2000, 0x1000, 0x10000), Some(0x5000));
        assert_eq!(pick_hole(&taken, 0x2000, 0x1000, 0x6000), None);
    }

    #[test]
    fn read_only_private_vmas_with_saved_pages_are_mapped_writable_first() {
        let mut m = plan(&images()).expect("plan").memory;
        // 0x400000 r--p file: pages saved there (relocated data) => it was writable once.
        mark_accounting(
            &mut m,
            &[Range {
                start: 0x400000,
                end: 0x401000,
            }],
        );
        assert!(m.vmas[0].write_then_protect);
        assert!(
            !m.vmas[1].write_then_protect,
            "text without saved pages stays as it was"
        );
        assert!(!m.vmas[2].write_then_protect, "writable vmas need nothing");
        // An image that records accounting is followed instead.
        m.vmas[0].status |= VmaStatus::NOT_ACCOUNTABLE.bits();
        mark_accounting(
            &mut m,
            &[Range {
                start: 0x400000,
                end: 0x401000,
            }],
        );
        assert!(!m.vmas[0].write_then_protect);
        assert!(m.vmas[1].write_then_protect, "recorded as accountable");
    }

    proptest::proptest! {
        /// Images are untrusted: any values give a plan or an error, never a panic.
        #[test]
        fn hostile_vmas_and_fds_never_panic(
            vmas in proptest::collection::vec((proptest::num::u64::ANY, proptest::num::u64::ANY, proptest::num::u32::ANY, proptest::num::u32::ANY, proptest::num::u32::ANY, proptest::num::u64::ANY), 0..12),
            fds in proptest::collection::vec((proptest::num::u32::ANY, proptest::num::u32::ANY, proptest::num::i32::ANY), 0..6),
            sigactions in 0usize..80,
        ) {
            let mut im = images();
            im.root.mm.vmas = vmas
                .into_iter()
                .map(|(start, end, prot, flags, status, shmid)| pb::VmaEntry { start, end, pgoff: 0, shmid, prot, flags, status, fd: -1, madv: None, fdflags: None })
                .collect();
            im.root.fdinfo = fds.into_iter().map(|(id, fd, kind)| pb::FdinfoEntry { id, flags: 0, r#type: kind, fd, ..Default::default() }).collect();
            if let Some(tc) = im.root.cores[0].tc.as_mut() {
                tc.sigactions = vec![pb::SaEntry::default(); sigactions];
            }
            if let Ok(mut p) = plan(&im) {
                let saved: Vec<Range> = p.memory.vmas.iter().map(|v| v.range).collect();
                mark_accounting(&mut p.memory, &saved);
                let _ = pick_hole(&p.memory.occupied, 0x3000, 0x1_0000_0000, 0x7fff_ffff_f000);
            }
        }
    }
    /// A live process of a constructed tree: one thread, nothing mapped, no fds.
    fn live(pid: u32, ppid: u32, pgid: u32, sid: u32, ids: (u32, u32, u32)) -> ProcessImages {
        let (vm_id, files_id, fs_id) = ids;
        ProcessImages {
            pstree: pb::PstreeEntry {
                pid,
                ppid,
                pgid,
                sid,
                threads: vec![pid],
            },
            cores: vec![core(true, regs(0x401000, 0, -1))],
            ids: Some(pb::TaskKobjIdsEntry {
                vm_id,
                files_id,
                fs_id,
                sighand_id: vm_id,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn zombie(pid: u32, ppid: u32, pgid: u32, sid: u32, status: u32) -> ProcessImages {
        ProcessImages {
            pstree: pb::PstreeEntry {
                pid,
                ppid,
                pgid,
                sid,
                threads: vec![pid],
            },
            cores: vec![pb::CoreEntry {
                mtype: pb::core_entry::March::X8664 as i32,
                tc: Some(pb::TaskCoreEntry {
                    task_state: TASK_DEAD,
                    exit_code: status,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn tree(processes: Vec<ProcessImages>) -> TreeImages {
        TreeImages {
            dir: "/img".into(),
            processes,
        }
    }

    #[test]
    fn tree_links_sessions_and_groups_follow_the_ordering_rules() {
        // 10 leads session and group; 11 leads its own group; 12 (child of 11) called
        // setsid; 13 (child of 11) is in 11's group by inheritance; 14 (child of 10) is in
        // 11's group, which it must join once 11 exists; 15 is a zombie in 10's group.
        let im = tree(vec![
            live(10, 0, 10, 10, (1, 101, 201)),
            live(11, 10, 11, 10, (2, 102, 202)),
            live(12, 11, 12, 12, (3, 103, 203)),
            live(13, 11, 11, 10, (4, 104, 204)),
            live(14, 10, 11, 10, (5, 105, 205)),
            zombie(15, 10, 10, 10, 7 << 8),
        ]);
        let t = plan_tree(&im, false).expect("plan");
        let pids: Vec<i32> = t.procs.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [10, 11, 12, 13, 14, 15]);
        assert_eq!(t.procs[0].children, [1, 4, 5]);
        assert_eq!(t.procs[1].children, [2, 3]);
        assert_eq!(t.procs[3].parent, Some(1));
        let sessions: Vec<SessionPlan> = t.procs.iter().map(|p| p.session).collect();
        assert_eq!(
            sessions,
            [
                SessionPlan::NewSession,
                SessionPlan::NewGroup,
                SessionPlan::NewSession,
                SessionPlan::Inherit,
                SessionPlan::Inherit,
                SessionPlan::Inherit,
            ]
        );
        let joins: Vec<Option<i32>> = t.procs.iter().map(|p| p.join_group).collect();
        assert_eq!(joins, [None, None, None, None, Some(11), None]);
        assert!(matches!(t.procs[5].kind, ProcKind::Zombie { status } if status == 7 << 8));
        assert_eq!(t.live().count(), 5);
        // The process's own plan does what the tree decided.
        assert!(t.live().all(|p| {
            let node = t.procs.iter().find(|n| n.pid == p.pid);
            node.is_some_and(|n| n.session == p.child.session)
        }));
        // A shell job's root keeps our session; its children still do their own.
        let t = plan_tree(&im, true).expect("plan");
        assert_eq!(t.procs[0].session, SessionPlan::Inherit);
        assert_eq!(t.procs[1].session, SessionPlan::NewGroup);
    }

    #[test]
    fn tables_shared_since_fork_are_cloned_and_others_refused() {
        // 21 shares 20's fd table and fs; 22 shares 21's (so 20's) fd table only.
        let ok = tree(vec![
            live(20, 0, 20, 20, (1, 100, 200)),
            live(21, 20, 20, 20, (2, 100, 200)),
            live(22, 21, 20, 20, (3, 100, 203)),
            live(23, 20, 20, 20, (4, 104, 204)),
        ]);
        let t = plan_tree(&ok, false).expect("plan");
        let shared: Vec<(bool, bool)> = t
            .procs
            .iter()
            .map(|p| (p.shares_files, p.shares_fs))
            .collect();
        assert_eq!(
            shared,
            [(false, false), (true, true), (true, false), (false, false)]
        );
        let placers: Vec<bool> = t.procs.iter().map(ProcPlan::places_fds).collect();
        assert_eq!(placers, [true, false, false, true]);
        // Siblings sharing a table their parent does not have: no fork makes that.
        let siblings = refused(vec![
            live(20, 0, 20, 20, (1, 100, 200)),
            live(21, 20, 20, 20, (2, 109, 201)),
            live(22, 20, 20, 20, (3, 109, 202)),
        ]);
        assert!(
            matches!(
                siblings,
                TreePlanError::SharedNotFromParent {
                    pid: 22,
                    other: 21,
                    ..
                }
            ),
            "{siblings:?}"
        );
        let vm = refused(vec![
            live(20, 0, 20, 20, (1, 100, 200)),
            live(21, 20, 20, 20, (1, 101, 201)),
        ]);
        assert!(
            matches!(vm, TreePlanError::SharedVm { pid: 21, other: 20 }),
            "{vm:?}"
        );
    }

    /// Plans `processes`, which must be refused.
    fn refused(processes: Vec<ProcessImages>) -> TreePlanError {
        match plan_tree(&tree(processes), false) {
            Ok(t) => panic!("planned a tree no fork can make: {t:?}"),
            Err(e) => e,
        }
    }

    /// [`refused`] for `rest` under a live root 30 that leads session and group 30.
    fn refused_under_root(rest: Vec<ProcessImages>) -> TreePlanError {
        let mut processes = vec![live(30, 0, 30, 30, (1, 101, 201))];
        processes.extend(rest);
        refused(processes)
    }

    #[test]
    fn trees_no_fork_can_make_are_refused_by_pid() {
        use TreePlanError as E;
        type Case = (&'static str, TreePlanError, fn(&TreePlanError) -> bool);
        let cases: [Case; 8] = [
            (
                "orphan",
                refused_under_root(vec![live(31, 99, 30, 30, (2, 102, 202))]),
                |e| matches!(e, E::Orphan { pid: 31, ppid: 99 }),
            ),
            // A child listed before its parent is an orphan too.
            (
                "order",
                refused_under_root(vec![
                    live(32, 31, 30, 30, (3, 103, 203)),
                    live(31, 30, 30, 30, (2, 102, 202)),
                ]),
                |e| matches!(e, E::Orphan { pid: 32, .. }),
            ),
            (
                "zombie parent",
                refused_under_root(vec![
                    zombie(31, 30, 30, 30, 0),
                    live(32, 31, 30, 30, (3, 103, 203)),
                ]),
                |e| matches!(e, E::ZombieParent { pid: 31, child: 32 }),
            ),
            (
                "zombie root",
                refused(vec![zombie(30, 0, 30, 30, 0)]),
                |e| matches!(e, E::ZombieRoot { pid: 30 }),
            ),
            // In a session that is neither its own nor its parent's (its leader is gone).
            (
                "session",
                refused_under_root(vec![live(31, 30, 31, 77, (2, 102, 202))]),
                |e| matches!(e, E::Session { pid: 31, sid: 77 }),
            ),
            // In a group whose leader is not in the tree.
            (
                "group",
                refused_under_root(vec![live(31, 30, 88, 30, (2, 102, 202))]),
                |e| {
                    matches!(
                        e,
                        E::NoGroupLeader {
                            pid: 31,
                            pgid: 88,
                            ..
                        }
                    )
                },
            ),
            // A session leader outside its own group cannot exist.
            (
                "leader",
                refused_under_root(vec![live(31, 30, 30, 31, (2, 102, 202))]),
                |e| matches!(e, E::LeaderGroup { pid: 31, pgid: 30 }),
            ),
            ("empty", refused(Vec::new()), |e| matches!(e, E::Empty)),
        ];
        for (what, err, expected) in cases {
            assert!(expected(&err), "{what}: {err:?}");
        }
    }
}
