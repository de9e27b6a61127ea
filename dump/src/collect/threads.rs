//! Per-thread state: registers, the xsave area component by component, signal mask and
//! private pending signals, rseq, robust futex list, clear_child_tid, sigaltstack,
//! scheduling, pdeath signal, credentials, seccomp filters and comm, and ckpt's extensions
//! (affinity, timer slack, I/O priority). Together they form the
//! thread's `core-TID.img` (the leader's also carries the process-wide `tc`).

use images_format::pb::{
    self, CoreEntry, CredsEntry, RseqEntry, SeccompFilter as ImgSeccompFilter, ThreadCoreEntry,
    ThreadInfoX86, ThreadSasEntry, UserX86RegsEntry,
};
use images_format::xsave::{fpregs_from_raw, XsaveLayout as ImgXsaveLayout};
use tracee::proc::{stat, status};
use tracee::{Regs, Tid, Tracee, XsaveLayout};

use super::inject::{syscall, syscall_u64, Scratch};
use super::signals::signal_queue;
use super::CollectError;

const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_SECUREBITS: u64 = 27;
const PR_GET_TID_ADDRESS: u64 = 40;
const SCHED_FIFO: u32 = 1;
const SCHED_RR: u32 = 2;
const SCHED_RESET_ON_FORK: u32 = 0x4000_0000;
const SECCOMP_MODE_FILTER: u32 = 2;

/// Scratch offsets used by the per-thread syscalls (the area is reused thread after thread).
const OFF_SAS: u64 = 0;
const OFF_TID_ADDRESS: u64 = 64;
const OFF_PDEATHSIG: u64 = 72;
/// The bytes holding every answer.
const ANSWERS: u64 = OFF_PDEATHSIG + 4;

/// One thread's image: everything but the process-wide part of the core.
#[derive(Debug, Clone)]
pub struct ThreadState {
    pub tid: Tid,
    pub core: CoreEntry,
}

/// Every seccomp filter chain of the process, in `seccomp.img` order: each thread's chain
/// from its oldest filter to its newest, `prev` pointing at the filter installed before.
#[derive(Debug, Clone, Default)]
pub struct SeccompTable {
    pub filters: Vec<ImgSeccompFilter>,
}

/// CRIU's register message from ptrace's `user_regs_struct`.
pub fn gpregs(regs: &Regs) -> UserX86RegsEntry {
    UserX86RegsEntry {
        r15: regs.r15,
        r14: regs.r14,
        r13: regs.r13,
        r12: regs.r12,
        bp: regs.rbp,
        bx: regs.rbx,
        r11: regs.r11,
        r10: regs.r10,
        r9: regs.r9,
        r8: regs.r8,
        ax: regs.rax,
        cx: regs.rcx,
        dx: regs.rdx,
        si: regs.rsi,
        di: regs.rdi,
        orig_ax: regs.orig_rax,
        ip: regs.rip,
        cs: regs.cs,
        flags: regs.eflags,
        sp: regs.rsp,
        ss: regs.ss,
        fs_base: regs.fs_base,
        gs_base: regs.gs_base,
        ds: regs.ds,
        es: regs.es,
        fs: regs.fs,
        gs: regs.gs,
        mode: Some(pb::UserX86RegsMode::Native as i32),
    }
}

/// Capability sets travel as two 32-bit words, low word first.
fn cap_words(caps: u64) -> Vec<u32> {
    vec![(caps & 0xffff_ffff) as u32, (caps >> 32) as u32]
}

/// Credentials of one thread from its `status` plus the securebits only it can tell.
pub fn creds(st: &status::Status, secbits: u32) -> CredsEntry {
    CredsEntry {
        uid: st.uid[0],
        euid: st.uid[1],
        suid: st.uid[2],
        fsuid: st.uid[3],
        gid: st.gid[0],
        egid: st.gid[1],
        sgid: st.gid[2],
        fsgid: st.gid[3],
        cap_inh: cap_words(st.cap_inh),
        cap_prm: cap_words(st.cap_prm),
        cap_eff: cap_words(st.cap_eff),
        cap_bnd: cap_words(st.cap_bnd),
        cap_amb: cap_words(st.cap_amb),
        secbits,
        groups: st.groups.clone(),
        no_new_privs: Some(u32::from(st.no_new_privs)),
        ..CredsEntry::default()
    }
}

/// The image's view of this CPU's xsave layout for the area the kernel gave. Each layout is
/// worked out once per dump: it takes a `cpuid` per component, which a virtual machine
/// traps (microseconds each, for every thread).
fn image_layout(raw_xcr0: Option<u64>) -> ImgXsaveLayout {
    type Known = Vec<(Option<u64>, ImgXsaveLayout)>;
    static KNOWN: std::sync::Mutex<Known> = std::sync::Mutex::new(Vec::new());
    let known = |raw: Option<u64>| {
        KNOWN.lock().ok().and_then(|known| {
            known
                .iter()
                .find(|(x, _)| *x == raw)
                .map(|(_, layout)| layout.clone())
        })
    };
    if let Some(layout) = known(raw_xcr0) {
        return layout;
    }
    let layout = layout_of(raw_xcr0);
    if let Ok(mut known) = KNOWN.lock() {
        known.push((raw_xcr0, layout.clone()));
    }
    layout
}

fn layout_of(raw_xcr0: Option<u64>) -> ImgXsaveLayout {
    let xcr0 = raw_xcr0.unwrap_or_else(XsaveLayout::cpu_supported_mask);
    // In the standard format a component's offset does not depend on what else is
    // enabled: the layout of any XCR0 is the supported components it names.
    ImgXsaveLayout::new(
        supported_components()
            .iter()
            .filter(|(index, _)| *index < 64 && xcr0 & (1u64 << index) != 0)
            .copied(),
    )
}

/// Every xsave component this CPU supports, with its offset, asked once (see
/// [`image_layout`]).
fn supported_components() -> &'static [(u32, usize)] {
    static SUPPORTED: std::sync::OnceLock<Vec<(u32, usize)>> = std::sync::OnceLock::new();
    SUPPORTED.get_or_init(|| {
        XsaveLayout::for_xcr0(XsaveLayout::cpu_supported_mask())
            .components
            .iter()
            .filter_map(|c| usize::try_from(c.offset).ok().map(|off| (c.index, off)))
            .collect()
    })
}

/// Asks the CPU for its xsave layout now, while nothing waits for it, rather than in a
/// freeze.
pub fn learn_xsave_layout() {
    let _ = supported_components();
}

fn ptrace_err(tid: Tid, what: &'static str) -> impl FnOnce(tracee::PtraceError) -> CollectError {
    move |source| CollectError::Ptrace { tid, what, source }
}

/// `struct stack_t` (`void *ss_sp; int ss_flags; size_t ss_size`) as the kernel wrote it.
fn sigaltstack(raw: &[u8]) -> ThreadSasEntry {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        if let Some(bytes) = raw.get(i..i + 8) {
            b.copy_from_slice(bytes);
        }
        u64::from_ne_bytes(b)
    };
    ThreadSasEntry {
        ss_sp: word(0),
        ss_flags: (word(8) & 0xffff_ffff) as u32,
        ss_size: word(16),
    }
}

/// What the leader's thread reads of `/proc` is already known from the process's files,
/// which show the leader: its status and its comm.
#[derive(Clone, Copy)]
pub struct LeaderProc<'a> {
    pub status: &'a status::Status,
    pub comm: &'a str,
}

fn task_info(
    tid: Tid,
    what: &'static str,
) -> impl FnOnce(tracee::taskinfo::TaskInfoError) -> CollectError {
    move |source| CollectError::TaskInfo { tid, what, source }
}

/// Scheduling policy, real-time priority and nice, asked from outside: the kernel answers
/// them for any thread, without an injection round trip each.
fn sched(tid: Tid, tc: &mut ThreadCoreEntry) -> Result<(), CollectError> {
    let sched = tracee::taskinfo::sched(tid).map_err(task_info(tid, "scheduling"))?;
    let policy = u32::try_from(sched.policy).unwrap_or(0);
    tc.sched_policy = Some(policy);
    if matches!(policy & !SCHED_RESET_ON_FORK, SCHED_FIFO | SCHED_RR) {
        tc.sched_prio = Some(u32::try_from(sched.priority).unwrap_or(0));
    }
    tc.sched_nice = Some(sched.nice);
    Ok(())
}

/// The robust futex list, asked from outside (`get_robust_list` takes a tid).
fn robust_list(tid: Tid) -> Result<(u64, u32), CollectError> {
    let (head, len) =
        tracee::taskinfo::robust_list(tid).map_err(task_info(tid, "robust futex list"))?;
    Ok((head.get(), u32::try_from(len).unwrap_or(u32::MAX)))
}

fn rseq(thread: &Tracee) -> Result<Option<RseqEntry>, CollectError> {
    let tid = thread.tid();
    let Some(config) = thread
        .rseq_config()
        .map_err(ptrace_err(tid, "read the rseq configuration"))?
    else {
        return Ok(None);
    };
    // A thread inside an rseq critical section has `rseq_cs` set (struct rseq, offset 8);
    // restore needs it to decide where the thread resumes.
    let mut cs = [0u8; 8];
    let cs_addr = config.addr.saturating_add(8);
    tracee::memory::read_remote(thread.pid(), cs_addr, &mut cs).map_err(|source| {
        CollectError::Memory {
            pid: thread.pid(),
            what: "read the rseq area",
            source,
        }
    })?;
    Ok(Some(RseqEntry {
        rseq_abi_pointer: config.addr.get(),
        rseq_abi_size: config.len,
        signature: config.sig,
        rseq_cs_pointer: Some(u64::from_ne_bytes(cs)),
    }))
}

fn seccomp(
    thread: &Tracee,
    st: &status::Status,
    table: &mut SeccompTable,
    tc: &mut ThreadCoreEntry,
) -> Result<(), CollectError> {
    if st.seccomp == 0 {
        return Ok(());
    }
    tc.seccomp_mode = Some(i32::try_from(st.seccomp).unwrap_or(0));
    if st.seccomp != SECCOMP_MODE_FILTER {
        return Ok(());
    }
    let tid = thread.tid();
    // ptrace lists the newest filter first; the image wants the oldest first.
    let filters = thread
        .seccomp_filters()
        .map_err(ptrace_err(tid, "read seccomp filters"))?;
    let mut newest = None;
    for filter in filters.iter().rev() {
        let index = u32::try_from(table.filters.len()).unwrap_or(u32::MAX);
        table.filters.push(ImgSeccompFilter {
            filter: filter.insns.clone(),
            prev: newest,
            flags: Some(u32::try_from(filter.flags).unwrap_or(0)),
        });
        newest = Some(index);
    }
    tc.seccomp_filter = newest;
    Ok(())
}

/// Collects one stopped thread. `scratch` must be mapped in its process; `cpus` is the
/// thread's affinity, read before any pinning; `None`: what the kernel tells of the thread
/// from outside (robust list, scheduling, affinity, timer slack, I/O priority) is left
/// for [`outside_later`], once the thread runs again.
#[tracing::instrument(skip_all, fields(tid = %thread.tid()))]
pub fn collect(
    thread: &mut Tracee,
    scratch: Option<&Scratch>,
    cpus: Option<&[usize]>,
    seccomp_table: &mut SeccompTable,
    leader: Option<LeaderProc<'_>>,
) -> Result<ThreadState, CollectError> {
    let mut state = by_ptrace(thread, cpus, seccomp_table, leader)?;
    if let Some(scratch) = scratch {
        injected(thread, scratch, &mut state)?;
    }
    Ok(state)
}

/// What a thread changes by running: its registers, FPU state, signal mask and pending
/// signals (as the program sees them, not as an injection in progress left them).
struct Running {
    regs: Regs,
    fpregs: pb::UserX86FpregsEntry,
    sigmask: tracee::SigSet,
    pending: Vec<[u8; 128]>,
}

fn running(thread: &Tracee) -> Result<Running, CollectError> {
    let tid = thread.tid();
    let regs = thread
        .program_regs()
        .map_err(ptrace_err(tid, "read registers"))?;
    let xsave = thread
        .get_xsave()
        .map_err(ptrace_err(tid, "read the xsave area"))?;
    let fpregs = fpregs_from_raw(xsave.as_bytes(), &image_layout(xsave.xcr0()))
        .map_err(|source| CollectError::Xsave { tid, source })?;
    let sigmask = thread
        .program_sigmask()
        .map_err(ptrace_err(tid, "read the signal mask"))?;
    let pending = thread
        .peek_siginfo(false)
        .map_err(ptrace_err(tid, "read pending signals"))?;
    Ok(Running {
        regs,
        fpregs,
        sigmask,
        pending,
    })
}

/// What [`collect`] reads of a stopped thread with no injection.
fn by_ptrace(
    thread: &mut Tracee,
    cpus: Option<&[usize]>,
    seccomp_table: &mut SeccompTable,
    leader: Option<LeaderProc<'_>>,
) -> Result<ThreadState, CollectError> {
    let tid = thread.tid();
    let pid = thread.pid();
    let Running {
        regs,
        fpregs,
        sigmask,
        pending,
    } = running(thread)?;
    let read_status;
    let (thread_status, comm) = match leader {
        Some(known) => (known.status, known.comm.to_owned()),
        None => {
            read_status = status::read_thread(pid, tid).map_err(|source| CollectError::Proc {
                pid,
                what: "thread status",
                source,
            })?;
            let thread_stat = stat::read_thread(pid, tid).map_err(|source| CollectError::Proc {
                pid,
                what: "thread stat",
                source,
            })?;
            (&read_status, thread_stat.comm)
        }
    };

    let mut tc = ThreadCoreEntry {
        blk_sigset: Some(sigmask.0),
        comm: Some(comm),
        signals_p: Some(signal_queue(&pending)),
        rseq_entry: rseq(thread)?,
        ..ThreadCoreEntry::default()
    };
    if let Some(cpus) = cpus {
        let (head, len) = robust_list(tid)?;
        tc.futex_rla = head;
        tc.futex_rla_len = len;
        sched(tid, &mut tc)?;
        super::extras::thread(thread, cpus, &mut tc)?;
    }
    // Credentials with the securebits only the thread can tell, filled in by `injected`.
    tc.creds = Some(creds(thread_status, 0));
    seccomp(thread, thread_status, seccomp_table, &mut tc)?;
    tracing::debug!(
        rip = format_args!("{:#x}", regs.rip),
        orig_rax = regs.orig_rax as i64,
        rax = regs.rax as i64,
        "thread collected"
    );
    Ok(ThreadState {
        tid,
        core: CoreEntry {
            mtype: pb::core_entry::March::X8664 as i32,
            thread_info: Some(ThreadInfoX86 {
                clear_tid_addr: 0,
                gpregs: gpregs(&regs),
                fpregs,
                tls: Vec::new(),
            }),
            thread_core: Some(tc),
            ..CoreEntry::default()
        },
    })
}

/// What of the stopped `thread` only injected syscalls tell, into `state` (read by
/// [`collect`] without `scratch`): its alternate signal stack, parent-death signal,
/// securebits and clear-tid address. `scratch` must be mapped in its process.
pub fn injected(
    thread: &mut Tracee,
    scratch: &Scratch,
    state: &mut ThreadState,
) -> Result<(), CollectError> {
    let tid = thread.tid();
    // Every answer has its own slot, read at once at the end. The kernel fills the whole
    // `stack_t`, and prctl's getters store a whole int (a pointer for the tid address):
    // nothing to clear first.
    syscall(
        thread,
        "sigaltstack",
        libc::SYS_sigaltstack,
        [0, scratch.at(tid, OFF_SAS)?, 0, 0, 0, 0],
    )?;
    syscall(
        thread,
        "prctl(PR_GET_PDEATHSIG)",
        libc::SYS_prctl,
        [
            PR_GET_PDEATHSIG,
            scratch.at(tid, OFF_PDEATHSIG)?,
            0,
            0,
            0,
            0,
        ],
    )?;
    let secbits = syscall_u64(
        thread,
        "prctl(PR_GET_SECUREBITS)",
        libc::SYS_prctl,
        [PR_GET_SECUREBITS, 0, 0, 0, 0, 0],
    )?;
    syscall(
        thread,
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        [
            PR_GET_TID_ADDRESS,
            scratch.at(tid, OFF_TID_ADDRESS)?,
            0,
            0,
            0,
            0,
        ],
    )?;
    let answers = scratch.read::<{ ANSWERS as usize }>(tid, 0)?;
    let int_at = |off: u64| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&answers[off as usize..off as usize + 4]);
        i32::from_ne_bytes(b)
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(&answers[OFF_TID_ADDRESS as usize..OFF_TID_ADDRESS as usize + 8]);
    if let Some(info) = state.core.thread_info.as_mut() {
        info.clear_tid_addr = u64::from_ne_bytes(b);
    }
    if let Some(tc) = state.core.thread_core.as_mut() {
        tc.sas = Some(sigaltstack(&answers[OFF_SAS as usize..]));
        let pdeath = int_at(OFF_PDEATHSIG);
        tc.pdeath_sig = (pdeath != 0).then(|| u32::try_from(pdeath).ok()).flatten();
        if let Some(creds) = tc.creds.as_mut() {
            creds.secbits = u32::try_from(secbits).unwrap_or(0);
        }
    }
    Ok(())
}

/// What [`collect`] left for later (`cpus` was `None`), read into `state` from outside
/// while the thread runs: the robust list (which only the thread's own `set_robust_list`
/// changes), and scheduling, affinity, timer slack and I/O priority (which a light second
/// look reads again). `Err(why)` inside: the timer slack cannot be read from outside
/// (another user's needs `CAP_SYS_NICE`), which only an injection could tell.
pub fn outside_later(state: &mut ThreadState) -> Result<Result<(), String>, CollectError> {
    let tid = state.tid;
    let Some(tc) = state.core.thread_core.as_mut() else {
        return Ok(Err(format!("tid {tid} has no thread core")));
    };
    let (head, len) = robust_list(tid)?;
    tc.futex_rla = head;
    tc.futex_rla_len = len;
    sched(tid, tc)?;
    let cpus = tracee::taskinfo::affinity(tid).map_err(task_info(tid, "cpu affinity"))?;
    let Some(slack) = super::read_proc_number(&format!("/proc/{tid}/timerslack_ns"), 10) else {
        return Ok(Err(format!(
            "tid {tid}: its timer slack cannot be read from outside"
        )));
    };
    super::extras::outside(tid, &cpus, slack, tc)?;
    Ok(Ok(()))
}

/// What of a thread can change while it runs making only the syscalls the light second
/// look allows (see `super::refresh`), read again into a copy of `before`, its state from
/// the first look: registers, the xsave area, signal mask, private pending signals, the
/// rseq critical section pointer (plain memory the program writes), and what another
/// process may change from outside (scheduling, affinity, timer slack, I/O priority), by
/// the same calls as [`collect`]. `slack`: the timer slack if the caller read it already.
/// `None` if the timer slack cannot be read from outside (the full collection asks the
/// thread for it by injection).
pub fn refresh(
    thread: &Tracee,
    before: &ThreadState,
    slack: Option<u64>,
) -> Result<Option<ThreadState>, CollectError> {
    let tid = thread.tid();
    let Running {
        regs,
        fpregs,
        sigmask,
        pending,
    } = running(thread)?;
    let slack = match slack {
        Some(slack) => slack,
        None => match super::read_proc_number(&format!("/proc/{tid}/timerslack_ns"), 10) {
            Some(slack) => slack,
            None => return Ok(None),
        },
    };
    let mut core = before.core.clone();
    let Some(tc) = core.thread_core.as_mut() else {
        return Ok(None);
    };
    tc.blk_sigset = Some(sigmask.0);
    tc.signals_p = Some(signal_queue(&pending));
    tc.rseq_entry = rseq(thread)?;
    // `sched` sets the priority only for a real-time policy.
    tc.sched_prio = None;
    sched(tid, tc)?;
    let cpus = tracee::taskinfo::affinity(tid).map_err(task_info(tid, "cpu affinity"))?;
    super::extras::outside(tid, &cpus, slack, tc)?;
    let Some(info) = core.thread_info.as_mut() else {
        return Ok(None);
    };
    info.gpregs = gpregs(&regs);
    info.fpregs = fpregs;
    Ok(Some(ThreadState { tid, core }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tbusy-work\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t42\nNgid:\t0\n\
Pid:\t42\nPPid:\t1\nTracerPid:\t0\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\n\
FDSize:\t64\nGroups:\t4 24 27 \nNStgid:\t42\nNSpid:\t42\nNSpgid:\t42\nNSsid:\t42\nThreads:\t1\n\
SigQ:\t0/94546\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\n\
SigIgn:\t0000000000001000\nSigCgt:\t0000000000000000\nCapInh:\t0000000000000000\n\
CapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n\
CapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";

    #[test]
    fn creds_follow_status_order_and_split_caps() {
        let st = status::parse(STATUS).unwrap();
        let c = creds(&st, 0x2f);
        assert_eq!((c.uid, c.euid, c.suid, c.fsuid), (1000, 1001, 1002, 1003));
        assert_eq!((c.gid, c.egid, c.sgid, c.fsgid), (2000, 2001, 2002, 2003));
        assert_eq!(c.cap_eff, vec![0xfeff_ffff, 0x1ff]);
        assert_eq!(c.cap_inh, vec![0, 0]);
        assert_eq!(c.groups, vec![4, 24, 27]);
        assert_eq!(c.secbits, 0x2f);
        assert_eq!(c.no_new_privs, Some(1));
    }

    #[test]
    fn registers_keep_their_criu_names() {
        let regs = Regs {
            rip: 0x401000,
            orig_rax: 230,
            rax: (-516i64) as u64,
            rbp: 7,
            eflags: 0x246,
            fs_base: 0x7f00_0000_1000,
            ..Regs::default()
        };
        let r = gpregs(&regs);
        assert_eq!(
            (r.ip, r.orig_ax, r.ax, r.bp),
            (0x401000, 230, (-516i64) as u64, 7)
        );
        assert_eq!((r.flags, r.fs_base), (0x246, 0x7f00_0000_1000));
        assert_eq!(r.mode, Some(pb::UserX86RegsMode::Native as i32));
    }
}
