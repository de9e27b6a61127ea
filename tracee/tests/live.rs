//! Live tests on child processes this test starts, kills and reaps itself.

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracee::inject::RemoteScratch;
use tracee::memory::{self, RemoteRange};
use tracee::pagemap_scan::{self, PageCategories, ScanRequest};
use tracee::proc;
use tracee::ptrace::{SeizeOptions, SeizedProcess, Tracee};
use tracee::spawn::{self, CloneFlags, ThreadCloneRequest};
use tracee::{Errno, InjectError, Pid, RemoteAddr, Tid, PAGE_SIZE};

/// A forked child that only calls `pause()` (async-signal-safe, so forking
/// from the multi-threaded test harness is sound). Killed and reaped on drop.
struct Pauser {
    pid: Pid,
}

impl Pauser {
    fn start() -> Pauser {
        // SAFETY: the child only loops on pause(), which is async-signal-safe.
        let raw = unsafe { libc::fork() };
        assert!(raw >= 0, "fork failed");
        if raw == 0 {
            loop {
                // SAFETY: pause has no arguments.
                unsafe { libc::pause() };
            }
        }
        Pauser {
            pid: Pid::from_raw(raw).expect("fork returned a pid"),
        }
    }
}

impl Drop for Pauser {
    fn drop(&mut self) {
        kill_and_reap(self.pid);
    }
}

fn kill_and_reap(pid: Pid) {
    // SAFETY: kill and waitpid on our own child; `status` is a live local.
    unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: as above.
    unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL) };
}

fn state_of(pid: Pid) -> char {
    proc::status::read(pid).expect("status").state
}

/// Waits until the child is asleep (past fork, inside pause()).
fn wait_sleeping(pid: Pid) {
    let t = Instant::now();
    while state_of(pid) != 'S' {
        assert!(t.elapsed() < Duration::from_secs(5), "child never slept");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn seize_interrupt_detach_leaves_it_running() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    assert_eq!(frozen.tids(), vec![child.pid.leader()]);
    assert!(!frozen.threads()[0].in_group_stop());
    assert_eq!(state_of(child.pid), 't');
    // SAFETY: gettid has no arguments.
    let me = unsafe { libc::gettid() };
    assert_eq!(
        proc::status::read(child.pid).expect("status").tracer_pid,
        me
    );
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
    assert_eq!(proc::status::read(child.pid).expect("status").tracer_pid, 0);
}

#[test]
fn dropping_a_frozen_process_resumes_it() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    {
        let _frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
        assert_eq!(state_of(child.pid), 't');
    }
    wait_sleeping(child.pid);
}

#[test]
fn registers_xsave_and_mask_round_trip() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let regs = t.get_regs().expect("getregs");
    // Stopped inside pause(): the syscall number is kept in orig_rax.
    assert_eq!(regs.orig_rax, libc::SYS_pause as u64);
    assert!(regs.fs_base != 0);
    let mut changed = regs;
    changed.r15 = 0x1234_5678;
    t.set_regs(&changed).expect("setregs");
    assert_eq!(t.get_regs().expect("getregs").r15, 0x1234_5678);
    t.set_regs(&regs).expect("setregs back");
    assert_eq!(t.get_regs().expect("getregs"), regs);

    let xsave = t.get_xsave().expect("xsave");
    assert!(xsave.len() >= 576);
    assert_eq!(xsave.fxsave().len(), 512);
    assert!(xsave.xcr0().is_some_and(|x| x & 3 == 3));
    t.set_xsave(&xsave).expect("set xsave");
    assert_eq!(t.get_xsave().expect("xsave"), xsave);

    let mask = t.get_sigmask().expect("sigmask");
    let mut blocked = mask;
    blocked.insert(libc::SIGUSR1);
    t.set_sigmask(blocked).expect("set sigmask");
    assert!(t.get_sigmask().expect("sigmask").contains(libc::SIGUSR1));
    t.set_sigmask(mask).expect("restore sigmask");

    assert!(t.seccomp_filters().expect("seccomp").is_empty());
    // An interrupt stop is not a syscall stop.
    assert_eq!(
        t.syscall_info().expect("syscall info"),
        tracee::SyscallInfo::None
    );
    assert!(t.peek_siginfo(false).expect("peek").is_empty());
    // A forked child of a glibc program keeps the parent thread's rseq area.
    let _ = t.rseq_config().expect("rseq config");
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

#[test]
fn pending_signals_are_visible_without_dequeuing() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let mask = t.get_sigmask().expect("mask");
    let mut blocked = mask;
    blocked.insert(libc::SIGUSR2);
    t.set_sigmask(blocked).expect("block SIGUSR2");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(child.pid.as_raw(), libc::SIGUSR2) };
    let shared = t.peek_siginfo(true).expect("peek shared");
    assert_eq!(shared.len(), 1);
    let signo = i32::from_ne_bytes(shared[0][..4].try_into().expect("4 bytes"));
    assert_eq!(signo, libc::SIGUSR2);
    assert_eq!(t.peek_siginfo(true).expect("peek again").len(), 1);
    // Unblocking it on resume would kill the child: leave it blocked, kill it in drop.
}

#[test]
fn injected_syscalls_run_in_the_target() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let before = t.get_regs().expect("regs");
    let mask_before = t.get_sigmask().expect("mask");
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    assert_eq!(
        t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid"),
        i64::from(std::process::id())
    );
    let err = t
        .syscall(libc::SYS_close, [u64::MAX, 0, 0, 0, 0, 0])
        .expect_err("close(-1)");
    assert_eq!(err.errno(), Some(Errno::BADF));
    assert!(matches!(err, InjectError::Failed { .. }));
    assert_eq!(t.get_regs().expect("regs"), before);
    assert_eq!(t.get_sigmask().expect("mask"), mask_before);
    frozen.resume().expect("resume");
    // The interrupted pause() restarted: the child sleeps again rather than dying.
    wait_sleeping(child.pid);
}

#[test]
fn scratch_pages_are_mapped_written_and_released() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let scratch = RemoteScratch::map(t, 5000).expect("map scratch");
    assert_eq!(scratch.len(), 2 * PAGE_SIZE);
    let maps = proc::maps::read(child.pid).expect("maps");
    assert!(maps
        .iter()
        .any(|v| v.start <= scratch.addr() && scratch.addr() < v.end && v.perms.write));
    scratch.write(100, b"hello scratch").expect("write");
    let mut back = [0u8; 13];
    scratch.read(100, &mut back).expect("read");
    assert_eq!(&back, b"hello scratch");
    assert!(scratch.write(2 * PAGE_SIZE - 2, b"abc").is_err());
    // The scratch page is an in/out buffer for an injected syscall.
    let name_addr = scratch.at(200);
    t.syscall(
        libc::SYS_prctl,
        [libc::PR_GET_NAME as u64, name_addr.get(), 0, 0, 0, 0],
    )
    .expect("prctl(PR_GET_NAME)");
    let mut name = [0u8; 16];
    memory::read_remote(child.pid, name_addr, &mut name).expect("read name");
    let comm = proc::stat::read(child.pid).expect("stat").comm;
    assert!(name.starts_with(comm.as_bytes()), "{name:?} vs {comm}");
    let addr = scratch.addr();
    scratch.release(t).expect("release");
    let maps = proc::maps::read(child.pid).expect("maps");
    assert!(!maps.iter().any(|v| v.start <= addr && addr < v.end));
}

#[test]
fn remote_memory_matches_a_forked_copy() {
    let pattern: Vec<u8> = (0..3 * PAGE_SIZE as usize + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let base = RemoteAddr(pattern.as_ptr() as u64);
    let child = Pauser::start();
    let mut got = vec![0u8; pattern.len()];
    memory::read_remote(child.pid, base, &mut got).expect("read_remote");
    assert_eq!(got, pattern);

    let ranges = [
        RemoteRange {
            addr: base,
            len: 10,
        },
        RemoteRange {
            addr: base.saturating_add(5000),
            len: 4096,
        },
        RemoteRange {
            addr: base.saturating_add(100),
            len: 1,
        },
    ];
    let mut out = vec![0u8; 10 + 4096 + 1];
    memory::read_remote_vectored(child.pid, &ranges, &mut out).expect("vectored");
    assert_eq!(&out[..10], &pattern[..10]);
    assert_eq!(&out[10..4106], &pattern[5000..9096]);
    assert_eq!(out[4106], pattern[100]);
    let mut wrong = vec![0u8; 3];
    assert!(memory::read_remote_vectored(child.pid, &ranges, &mut wrong).is_err());

    memory::write_remote(child.pid, base.saturating_add(1), b"XYZ").expect("write_remote");
    memory::write_remote_fast(child.pid, base.saturating_add(10), b"fast").expect("write fast");
    let mut back = [0u8; 14];
    memory::read_remote(child.pid, base, &mut back).expect("read back");
    assert_eq!(&back[1..4], b"XYZ");
    assert_eq!(&back[10..14], b"fast");
    // Our own copy is untouched: the child's pages were copied on write.
    assert_eq!(&pattern[1..4], &got[1..4]);
}

#[test]
fn remote_read_falls_back_for_prot_none_and_writes_text() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let scratch = RemoteScratch::map(t, PAGE_SIZE).expect("map");
    scratch.write(0, b"hidden").expect("write");
    t.syscall(
        libc::SYS_mprotect,
        [scratch.addr().get(), PAGE_SIZE, 0, 0, 0, 0],
    )
    .expect("mprotect PROT_NONE");
    let mut buf = [0u8; 6];
    memory::read_remote(child.pid, scratch.addr(), &mut buf).expect("read PROT_NONE");
    assert_eq!(&buf, b"hidden");
    memory::write_remote(child.pid, scratch.addr(), b"HIDDEN").expect("write PROT_NONE");
    memory::read_remote(child.pid, scratch.addr(), &mut buf).expect("read again");
    assert_eq!(&buf, b"HIDDEN");
    // A vectored read whose middle range is unreadable for process_vm_readv.
    let stack_top = RemoteAddr(t.get_regs().expect("regs").rsp);
    let ranges = [
        RemoteRange {
            addr: stack_top,
            len: 16,
        },
        RemoteRange {
            addr: scratch.addr(),
            len: 6,
        },
        RemoteRange {
            addr: stack_top,
            len: 8,
        },
    ];
    let mut out = [0u8; 30];
    memory::read_remote_vectored(child.pid, &ranges, &mut out).expect("vectored across PROT_NONE");
    assert_eq!(&out[16..22], b"HIDDEN");
    assert_eq!(&out[..8], &out[22..30]);
    // And a vectored write into the same mix of writable and PROT_NONE memory.
    let below = RemoteAddr(stack_top.get() - 256);
    let wranges = [
        RemoteRange {
            addr: below,
            len: 4,
        },
        RemoteRange {
            addr: scratch.addr().saturating_add(10),
            len: 5,
        },
        RemoteRange {
            addr: below.saturating_add(8),
            len: 3,
        },
    ];
    memory::write_remote_vectored(child.pid, &wranges, b"abcdVWXYZxyz").expect("vectored write");
    let mut back = [0u8; 12];
    memory::read_remote_vectored(child.pid, &wranges, &mut back).expect("read back");
    assert_eq!(&back, b"abcdVWXYZxyz");
    scratch.release(t).expect("release");
}

#[test]
fn pagemap_scan_finds_present_pages_of_a_child() {
    let mut region = vec![0u8; 16 * PAGE_SIZE as usize];
    let start = (region.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let off = (start - region.as_ptr() as u64) as usize;
    for page in [0usize, 1, 5] {
        region[off + page * PAGE_SIZE as usize] = 1;
    }
    let child = Pauser::start();
    let req = ScanRequest::present(RemoteAddr(start), RemoteAddr(start + 8 * PAGE_SIZE));
    let regions = pagemap_scan::scan(child.pid, &req).expect("scan");
    let pages: Vec<u64> = regions
        .iter()
        .flat_map(|r| (r.start.get()..r.end.get()).step_by(PAGE_SIZE as usize))
        .map(|a| (a - start) / PAGE_SIZE)
        .collect();
    assert!(
        pages.contains(&0) && pages.contains(&1) && pages.contains(&5),
        "{regions:?}"
    );
    for r in &regions {
        assert!(r.categories.contains(PageCategories::PRESENT));
    }
    std::hint::black_box(&region);
}

fn free_pid() -> Pid {
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("number");
    // Pick from a pseudo-random start so parallel tests do not collide.
    let seed = (std::process::id() as i32).wrapping_mul(7919)
        ^ (Instant::now().elapsed().subsec_nanos() as i32);
    let mut candidate = 1000 + seed.rem_euclid(max - 2000);
    loop {
        if !std::path::Path::new(&format!("/proc/{candidate}")).exists() {
            return Pid::from_raw(candidate).expect("positive");
        }
        candidate = 1000 + (candidate + 97 - 1000).rem_euclid(max - 2000);
    }
}

/// `_exit(code)`: the only thing some forked test children do.
fn exit_now(code: i32) -> Infallible {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// A restore-style child: stop for the tracer, then exit 0 (3 if TRACEME failed).
fn stop_then_exit() -> Infallible {
    let code = if spawn::stop_self_for_tracer().is_ok() {
        0
    } else {
        3
    };
    exit_now(code)
}

fn wait_exit(pid: Pid) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a live status local.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL) };
    assert_eq!(r, pid.as_raw());
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    libc::WEXITSTATUS(status)
}

#[test]
fn fork_with_pid_gives_the_chosen_pid() {
    for _attempt in 0..5 {
        let want = free_pid();
        // SAFETY: the child only calls _exit, async-signal-safe.
        let result = unsafe {
            spawn::fork_with_pids_unchecked(&[want], CloneFlags::empty(), || exit_now(7))
        };
        match result {
            Ok(pid) => {
                assert_eq!(pid, want);
                assert_eq!(wait_exit(pid), 7);
                return;
            }
            // Someone took it between our check and clone3: try another.
            Err(spawn::SpawnError::PidInUse { .. }) => continue,
            Err(e) => panic!("fork_with_pid: {e}"),
        }
    }
    panic!("no free pid found in 5 attempts");
}

#[test]
fn fork_with_pid_reports_a_busy_pid() {
    let me = Pid::try_from(std::process::id()).expect("own pid");
    // SAFETY: the child never runs: the pid is ours, so clone3 fails with EEXIST.
    let r = unsafe { spawn::fork_with_pids_unchecked(&[me], CloneFlags::empty(), || exit_now(1)) };
    assert!(
        matches!(r, Err(spawn::SpawnError::PidInUse { pid }) if pid == me),
        "{r:?}"
    );
    let too_big = Pid::from_raw(4_194_304 + 1).expect("positive");
    // SAFETY: as above, the pid is invalid so no child is created.
    let r =
        unsafe { spawn::fork_with_pids_unchecked(&[too_big], CloneFlags::empty(), || exit_now(1)) };
    assert!(
        matches!(r, Err(spawn::SpawnError::PidInvalid { .. })),
        "{r:?}"
    );
    // SAFETY: rejected before clone3: no child is created.
    let r = unsafe { spawn::fork_with_pids_unchecked(&[me], CloneFlags::VM, || exit_now(1)) };
    assert!(matches!(r, Err(spawn::SpawnError::Flags { .. })), "{r:?}");
    let threads = std::fs::read_dir("/proc/self/task").expect("tasks").count();
    if threads > 1 {
        let r = spawn::fork_with_pid(me, CloneFlags::empty(), || exit_now(1));
        assert!(
            matches!(r, Err(spawn::SpawnError::MultiThreaded { .. })),
            "{r:?}"
        );
    }
}

#[test]
fn restore_child_is_rebuilt_by_injection_with_a_chosen_thread_id() {
    let pid = loop {
        let want = free_pid();
        // SAFETY: the child only calls ptrace, raise and _exit (async-signal-safe).
        match unsafe {
            spawn::fork_with_pids_unchecked(&[want], CloneFlags::empty(), stop_then_exit)
        } {
            Ok(pid) => break pid,
            Err(spawn::SpawnError::PidInUse { .. }) => continue,
            Err(e) => panic!("fork: {e}"),
        }
    };
    let mut t = Tracee::from_stopped_child(pid, SeizeOptions::RESTORE).expect("take child");
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(pid.as_raw())
    );

    let stack = RemoteScratch::map(&mut t, 4 * PAGE_SIZE).expect("stack");
    let args = RemoteScratch::map(&mut t, PAGE_SIZE).expect("args");
    let new_tid = loop {
        let want = free_pid();
        let req = ThreadCloneRequest {
            tid: Tid::from(want),
            flags: CloneFlags::THREAD_DEFAULT,
            stack: stack.addr(),
            stack_size: stack.len(),
            args_addr: args.addr(),
        };
        match t.inject_clone3_thread(&req) {
            Ok(thread) => break thread,
            Err(InjectError::Failed {
                errno: Errno::EXIST,
                ..
            }) => continue,
            Err(e) => panic!("inject clone3: {e}"),
        }
    };
    let tids = proc::task::list_tids(pid).expect("tasks");
    assert!(tids.contains(&new_tid.tid()), "{tids:?}");
    // Make the new thread run exit(0) as soon as it is let go.
    let mut thread = new_tid;
    assert_eq!(
        thread
            .syscall(libc::SYS_gettid, [0; 6])
            .expect("gettid in the new thread"),
        i64::from(thread.tid().as_raw())
    );
    let insn = t.syscall_insn().expect("insn");
    let mut regs = thread.get_regs().expect("thread regs");
    assert_eq!(regs.rax, 0, "the child side of clone3 returns 0");
    regs.rip = insn.get();
    regs.rax = libc::SYS_exit as u64;
    regs.rdi = 0;
    thread.set_regs(&regs).expect("set thread regs");
    let gone = thread.tid();
    thread.detach().expect("detach thread");
    let t0 = Instant::now();
    while proc::task::list_tids(pid).expect("tasks").contains(&gone) {
        assert!(t0.elapsed() < Duration::from_secs(5), "thread did not exit");
        std::thread::sleep(Duration::from_millis(2));
    }
    stack.release(&mut t).expect("release stack");
    args.release(&mut t).expect("release args");
    // The main thread resumes from its SIGSTOP (swallowed) and exits 0.
    t.detach().expect("detach");
    assert_eq!(wait_exit(pid), 0);
}

/// Not a test: the body of the multi-threaded target process other tests
/// start by re-running this binary with `--ignored --exact helper_threads`.
#[test]
#[ignore = "entry point of a helper process, started by other tests"]
fn helper_threads() {
    let Some(mode) = std::env::var_os("TRACEE_TEST_HELPER") else {
        return;
    };
    if mode == "churn" {
        // Threads that keep being born and dying while we freeze.
        for _ in 0..2 {
            std::thread::spawn(|| loop {
                let _ = std::thread::spawn(|| std::hint::black_box(1)).join();
            });
        }
    }
    for _ in 0..3 {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
        });
    }
    std::thread::spawn(|| loop {
        std::hint::spin_loop();
    });
    std::thread::sleep(Duration::from_secs(60));
}

struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_helper(mode: &str) -> Helper {
    let exe = std::env::current_exe().expect("test exe");
    Helper(
        Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "helper_threads",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TRACEE_TEST_HELPER", mode)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn helper"),
    )
}

#[test]
fn freeze_stops_every_thread_and_injects_in_each() {
    let helper = start_helper("plain");
    let pid = Pid::try_from(helper.0.id()).expect("pid");
    let t0 = Instant::now();
    while proc::task::list_tids(pid).expect("tasks").len() < 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "helper threads never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP).expect("freeze");
    let tids = proc::task::list_tids(pid).expect("tasks");
    assert_eq!(frozen.tids().len(), tids.len());
    assert_eq!(frozen.tids()[0], pid.leader());
    for t in frozen.threads_mut() {
        assert!(t.is_stopped());
        let got = t.syscall(libc::SYS_gettid, [0; 6]).expect("gettid");
        assert_eq!(got, i64::from(t.tid().as_raw()));
    }
    frozen.resume().expect("resume");
    let other = Pid::from_raw(tids[1].as_raw()).expect("tid");
    assert!(matches!(
        SeizedProcess::freeze(other, SeizeOptions::DUMP),
        Err(tracee::FreezeError::NotLeader { .. })
    ));
    // Still alive and running after the freeze.
    assert!(proc::task::list_tids(pid).expect("tasks").len() >= 6);
}

#[test]
fn a_job_stopped_process_stays_stopped_after_injection() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    // SAFETY: kill on our own child.
    unsafe { libc::kill(child.pid.as_raw(), libc::SIGSTOP) };
    let t0 = Instant::now();
    while state_of(child.pid) != 'T' {
        assert!(t0.elapsed() < Duration::from_secs(5), "never stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    assert_eq!(t.group_stop_signal(), Some(libc::SIGSTOP));
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    assert!(t.in_group_stop());
    frozen.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(state_of(child.pid), 'T');
}

#[test]
fn killing_a_frozen_process_collects_it() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    frozen.kill().expect("kill");
    // We are the parent too: the exit is now ours to reap as a parent.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a live status local.
    let r = unsafe { libc::waitpid(child.pid.as_raw(), &mut status, libc::__WALL) };
    assert_eq!(r, child.pid.as_raw());
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    // Reaped: its pid may be reused, so the guard must not kill it again.
    std::mem::forget(child);
}

#[test]
fn leave_stopped_ends_in_a_group_stop() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    frozen.leave_stopped().expect("leave stopped");
    let t0 = Instant::now();
    while state_of(child.pid) != 'T' {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "never stopped: {}",
            state_of(child.pid)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn xsave_of_another_size_is_fitted() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let xsave = t.get_xsave().expect("xsave");
    let mut longer = xsave.as_bytes().to_vec();
    longer.extend_from_slice(&[0u8; 256]);
    t.set_xsave(&tracee::ptrace::Xsave::from_bytes(longer))
        .expect("longer area");
    assert_eq!(t.get_xsave().expect("xsave"), xsave);
    let short = tracee::ptrace::Xsave::from_bytes(vec![0u8; 100]);
    assert!(t.set_xsave(&short).is_err());
}

#[test]
fn injection_works_pinned_and_unpinned() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let rounds = 200;
    let t0 = Instant::now();
    for _ in 0..rounds {
        t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid");
    }
    let unpinned = t0.elapsed() / rounds;
    let pin = t.pin_tracer().expect("pin");
    let t0 = Instant::now();
    for _ in 0..rounds {
        t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid");
    }
    let pinned = t0.elapsed() / rounds;
    drop(pin);
    eprintln!("injected getppid: {unpinned:?} unpinned, {pinned:?} pinned to cpu");
}

#[test]
fn pair_pin_pins_both_and_gives_the_tracee_its_affinity_back() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let tid = child.pid.leader();
    let affinity = || tracee::taskinfo::affinity(tid).expect("affinity");
    let before = affinity();
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    {
        let pin = tracee::cpu::PairPin::next_to(child.pid, tid).expect("pin both");
        let during = affinity();
        if before.len() > 1 {
            assert_eq!(during.len(), 1, "the tracee is pinned: {during:?}");
        } else {
            assert_eq!(during, before, "a tracee on one CPU is left alone");
        }
        let t = frozen.leader_mut().expect("leader");
        assert_eq!(
            t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
            i64::from(child.pid.as_raw())
        );
        drop(pin);
    }
    assert_eq!(affinity(), before, "the tracee's affinity is given back");
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

#[test]
fn batched_injection_restores_state_at_the_end() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let regs = t.get_regs().expect("regs");
    let mask = t.get_sigmask().expect("mask");
    let _pin = t.pin_tracer().expect("pin");
    t.begin_batch().expect("begin");
    // Everything but SIGKILL and SIGSTOP, which the kernel never blocks, and SIGTRAP: a
    // single-step trap while it is blocked would reset the program's handler.
    let blocked = t.get_sigmask().expect("mask");
    assert!(
        (1..=64)
            .all(|s| blocked.contains(s)
                != matches!(s, libc::SIGKILL | libc::SIGSTOP | libc::SIGTRAP))
    );
    let rounds = 200;
    let t0 = Instant::now();
    for _ in 0..rounds {
        assert_eq!(
            t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
            i64::from(child.pid.as_raw())
        );
    }
    eprintln!(
        "injected getpid in a batch, pinned: {:?}",
        t0.elapsed() / rounds
    );
    // The thread holds injected registers now; the program's are the saved ones.
    assert_ne!(t.get_regs().expect("regs"), regs);
    assert_eq!(t.program_regs().expect("program regs"), regs);
    assert_eq!(t.program_sigmask().expect("program mask"), mask);
    t.end_batch().expect("end");
    assert_eq!(t.program_regs().expect("program regs"), regs);
    assert_eq!(t.program_sigmask().expect("program mask"), mask);
    assert_eq!(t.get_regs().expect("regs"), regs);
    assert_eq!(t.get_sigmask().expect("mask"), mask);
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

/// A forked child that installs a seccomp filter making getppid fail with
/// EPERM, then pauses. Only raw syscalls on stack data run in the child.
fn start_filtered() -> Pauser {
    // SAFETY: the child only makes raw syscalls (prctl, seccomp, pause, _exit)
    // on data in its own stack frame, all async-signal-safe.
    let raw = unsafe { libc::fork() };
    assert!(raw >= 0, "fork failed");
    if raw == 0 {
        let filter = [
            libc::sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 0,
            },
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: libc::SYS_getppid as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x0005_0000 | libc::EPERM as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            },
        ];
        let prog = libc::sock_fprog {
            len: 4,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            exit_now(2);
        }
        // SAFETY: `prog` points at `filter`, both live in this frame for the call.
        if unsafe { libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog) } != 0
        {
            exit_now(3);
        }
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
    Pauser {
        pid: Pid::from_raw(raw).expect("fork returned a pid"),
    }
}

#[test]
fn seccomp_filters_are_read_and_suspended_for_injection() {
    let child = start_filtered();
    let t0 = Instant::now();
    while proc::status::read(child.pid).expect("status").seccomp != 2 || state_of(child.pid) != 'S'
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "filter never installed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let filters = t.seccomp_filters().expect("filters");
    assert_eq!(filters.len(), 1);
    assert_eq!(filters[0].insns.len(), 4 * 8);
    assert_eq!(filters[0].flags, 0);
    // PTRACE_O_SUSPEND_SECCOMP: the filter does not see our getppid.
    assert_eq!(
        t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid"),
        i64::from(std::process::id())
    );
    let rseq = t.rseq_config().expect("rseq");
    if let Some(r) = rseq {
        assert_eq!(r.sig, 0x5305_3053, "glibc's rseq signature");
        assert!(r.len >= 32);
    }
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

#[test]
fn without_suspend_seccomp_the_filter_applies() {
    let child = start_filtered();
    let t0 = Instant::now();
    while proc::status::read(child.pid).expect("status").seccomp != 2 || state_of(child.pid) != 'S'
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "filter never installed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::TRACESYSGOOD).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let err = t.syscall(libc::SYS_getppid, [0; 6]).expect_err("filtered");
    assert_eq!(err.errno(), Some(Errno::PERM));
}

#[test]
fn freeze_settles_while_threads_come_and_go() {
    let helper = start_helper("churn");
    let pid = Pid::try_from(helper.0.id()).expect("pid");
    let t0 = Instant::now();
    while proc::task::list_tids(pid).expect("tasks").len() < 7 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "helper threads never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for _round in 0..5 {
        let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP).expect("freeze");
        // Frozen: nothing can be created or exit any more.
        let tids = proc::task::list_tids(pid).expect("tasks");
        assert_eq!(
            frozen
                .tids()
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            tids.iter().copied().collect()
        );
        for t in frozen.threads_mut() {
            let got = t.syscall(libc::SYS_gettid, [0; 6]).expect("gettid");
            assert_eq!(got, i64::from(t.tid().as_raw()));
        }
        frozen.resume().expect("resume");
    }
}

#[test]
fn dropping_mid_batch_puts_registers_back() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let regs_before;
    {
        let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
        let t = frozen.leader_mut().expect("leader");
        regs_before = t.get_regs().expect("regs");
        t.begin_batch().expect("begin");
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid");
        assert_ne!(t.get_regs().expect("regs"), regs_before);
    }
    // Had the injected registers stayed, the child would have run on from the
    // vdso with garbage and died; it sleeps in pause() again instead.
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze again");
    let regs = frozen
        .leader_mut()
        .expect("leader")
        .get_regs()
        .expect("regs");
    assert_eq!(regs.orig_rax, libc::SYS_pause as u64);
}

#[test]
fn a_bad_syscall_address_faults_and_leaves_the_thread_intact() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let regs = t.get_regs().expect("regs");
    let good = t.syscall_insn().expect("vdso insn");
    t.set_syscall_insn(RemoteAddr(0x1000));
    let err = t
        .syscall(libc::SYS_getpid, [0; 6])
        .expect_err("unmapped insn");
    assert!(
        matches!(
            err,
            InjectError::Faulted {
                sig: libc::SIGSEGV,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(t.get_regs().expect("regs"), regs);
    t.set_syscall_insn(good);
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    frozen.resume().expect("resume");
    // The fault was ours, not the program's: it was not delivered.
    wait_sleeping(child.pid);
}

#[test]
fn a_helper_page_can_unmap_itself() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let helper = RemoteScratch::map(t, PAGE_SIZE).expect("helper page");
    memory::write_remote(child.pid, helper.addr(), &[0x0f, 0x05, 0xcc, 0xcc]).expect("code");
    let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
    t.syscall(
        libc::SYS_mprotect,
        [helper.addr().get(), PAGE_SIZE, rx, 0, 0, 0],
    )
    .expect("mprotect r-x");
    let vdso = t.syscall_insn().expect("vdso insn");
    t.set_syscall_insn(helper.addr());
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    // The single-step trap comes before the next instruction is fetched.
    let addr = helper.leak();
    assert_eq!(
        t.syscall(libc::SYS_munmap, [addr.get(), PAGE_SIZE, 0, 0, 0, 0])
            .expect("munmap"),
        0
    );
    t.set_syscall_insn(vdso);
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

extern "C" fn pause_forever(_: *mut libc::c_void) -> libc::c_int {
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

/// A forked child whose leader thread exits (a zombie leader) after creating
/// one thread that pauses. Only raw syscalls run in the child.
fn start_zombie_leader() -> Pauser {
    // SAFETY: the child makes only raw syscalls (mmap, clone, exit).
    let raw = unsafe { libc::fork() };
    assert!(raw >= 0, "fork failed");
    if raw == 0 {
        let size = 64 * 1024;
        // SAFETY: a fresh anonymous mapping for the new thread's stack.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            exit_now(2);
        }
        let top = stack.cast::<u8>().wrapping_add(size).cast::<libc::c_void>();
        let flags = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        // SAFETY: the new thread runs `pause_forever` on its own fresh stack
        // and touches nothing else of ours.
        let tid = unsafe { libc::clone(pause_forever, top, flags, std::ptr::null_mut()) };
        if tid < 0 {
            exit_now(3);
        }
        // SAFETY: exit (not exit_group) ends only the leader thread.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        exit_now(4);
    }
    Pauser {
        pid: Pid::from_raw(raw).expect("fork returned a pid"),
    }
}

#[test]
fn freeze_skips_a_zombie_leader() {
    let child = start_zombie_leader();
    let pid = child.pid;
    let t0 = Instant::now();
    loop {
        let zombie = proc::stat::read(pid)
            .map(|s| s.state == 'Z')
            .unwrap_or(false);
        if zombie
            && proc::task::list_tids(pid)
                .map(|t| t.len() == 2)
                .unwrap_or(false)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "leader never became a zombie"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP).expect("freeze");
    assert_eq!(frozen.tids().len(), 1);
    assert_ne!(frozen.tids()[0], pid.leader());
    let t = frozen.leader_mut().expect("a live thread");
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(pid.as_raw())
    );
    frozen.resume().expect("resume");
}

#[test]
fn a_seized_process_gets_an_injected_thread() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::RESTORE).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let stack = RemoteScratch::map(t, 4 * PAGE_SIZE).expect("stack");
    let args = RemoteScratch::map(t, PAGE_SIZE).expect("args");
    let mut thread = loop {
        let req = ThreadCloneRequest {
            tid: Tid::from(free_pid()),
            flags: CloneFlags::THREAD_DEFAULT,
            stack: stack.addr(),
            stack_size: stack.len(),
            args_addr: args.addr(),
        };
        match t.inject_clone3_thread(&req) {
            Ok(thread) => break thread,
            Err(InjectError::Failed {
                errno: Errno::EXIST,
                ..
            }) => continue,
            Err(e) => panic!("inject clone3: {e}"),
        }
    };
    assert_eq!(thread.attach_kind(), tracee::AttachKind::Seized);
    assert_eq!(
        thread.syscall(libc::SYS_gettid, [0; 6]).expect("gettid"),
        i64::from(thread.tid().as_raw())
    );
    let insn = t.syscall_insn().expect("insn");
    let mut regs = thread.get_regs().expect("regs");
    regs.rip = insn.get();
    regs.rax = libc::SYS_exit as u64;
    regs.rdi = 0;
    thread.set_regs(&regs).expect("set regs");
    let gone = thread.tid();
    thread.detach().expect("detach thread");
    let t0 = Instant::now();
    while proc::task::list_tids(child.pid)
        .expect("tasks")
        .contains(&gone)
    {
        assert!(t0.elapsed() < Duration::from_secs(5), "thread did not exit");
        std::thread::sleep(Duration::from_millis(2));
    }
    stack.release(t).expect("release");
    args.release(t).expect("release");
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
}

#[test]
fn a_userfaultfd_made_in_the_target_tracks_its_writes() {
    use tracee::pidfd::PidFd;
    use tracee::uffd::{Features, RegisterMode, Userfaultfd};
    let mut region = vec![1u8; 12 * PAGE_SIZE as usize];
    let start = (region.as_ptr() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let off = (start - region.as_ptr() as u64) as usize;
    for p in 0..8 {
        region[off + p * PAGE_SIZE as usize] = 2;
    }
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let target_fd = t.inject_userfaultfd(0).expect("userfaultfd in the target");
    let uffd = Userfaultfd::from_fd(
        PidFd::open(child.pid)
            .expect("pidfd")
            .getfd(target_fd)
            .expect("getfd"),
    );
    t.syscall(libc::SYS_close, [target_fd.as_raw() as u64, 0, 0, 0, 0, 0])
        .expect("close the target's copy");
    let (granted, _) = uffd
        .api(Features::WP_ASYNC | Features::WP_UNPOPULATED)
        .expect("api");
    assert!(granted.contains(Features::WP_ASYNC));
    let len = 8 * PAGE_SIZE;
    uffd.register(RemoteAddr(start), len, RegisterMode::WP)
        .expect("register in the target's mm");
    uffd.writeprotect(RemoteAddr(start), len, true)
        .expect("protect");
    frozen.resume().expect("resume");

    let end = RemoteAddr(start + len);
    let req = ScanRequest::written_and_reprotect(RemoteAddr(start), end);
    assert!(pagemap_scan::scan(child.pid, &req)
        .expect("scan")
        .is_empty());
    memory::write_remote_fast(child.pid, RemoteAddr(start + 3 * PAGE_SIZE), b"dirty")
        .expect("write");
    memory::write_remote_fast(child.pid, RemoteAddr(start + 7 * PAGE_SIZE + 100), b"dirty")
        .expect("write");
    let written = pagemap_scan::scan(child.pid, &req).expect("scan");
    let pages: Vec<u64> = written
        .iter()
        .flat_map(|r| (r.start.get()..r.end.get()).step_by(PAGE_SIZE as usize))
        .map(|a| (a - start) / PAGE_SIZE)
        .collect();
    assert_eq!(pages, vec![3, 7]);
    assert!(pagemap_scan::scan(child.pid, &req)
        .expect("rescan")
        .is_empty());
    std::hint::black_box(&region);
}

/// A forked child that forks a pausing grandchild and a grandchild that exits
/// at once (left a zombie), then pauses. Only raw syscalls run in the children.
fn start_family() -> Pauser {
    // SAFETY: the child makes only raw syscalls (fork, pause, _exit).
    let raw = unsafe { libc::fork() };
    assert!(raw >= 0, "fork failed");
    if raw == 0 {
        // SAFETY: as above.
        if unsafe { libc::fork() } == 0 {
            loop {
                // SAFETY: pause has no arguments.
                unsafe { libc::pause() };
            }
        }
        // SAFETY: as above.
        if unsafe { libc::fork() } == 0 {
            exit_now(0);
        }
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
    Pauser {
        pid: Pid::from_raw(raw).expect("fork returned a pid"),
    }
}

#[test]
fn a_tree_is_frozen_with_its_zombies_apart() {
    // Orphans of the killed family come back to us, to be reaped here.
    assert_eq!(
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let root = start_family();
    let t0 = Instant::now();
    let (live, zombie) = loop {
        let kids = proc::task::children(root.pid).expect("children");
        if kids.len() == 2 {
            let states: Vec<char> = kids.iter().map(|&k| state_of(k)).collect();
            if states.contains(&'Z') && states.contains(&'S') {
                let z = states.iter().position(|&s| s == 'Z').expect("zombie");
                break (kids[1 - z], kids[z]);
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "family never formed");
        std::thread::sleep(Duration::from_millis(2));
    };
    let tree = tracee::SeizedTree::freeze(root.pid, SeizeOptions::DUMP).expect("freeze tree");
    let pids: Vec<Pid> = tree.processes().map(|p| p.pid()).collect();
    assert_eq!(pids, vec![root.pid, live]);
    assert_eq!(tree.zombies(), &[(root.pid, zombie)]);
    assert_eq!(tree.parent_of(live), Some(root.pid));
    assert_eq!(tree.parent_of(root.pid), None);
    assert_eq!(state_of(live), 't');
    tree.resume().expect("resume");
    wait_sleeping(live);
    // Kill and reap the root; its children are then reparented to us.
    drop(root);
    kill_and_reap(live);
    let mut status = 0;
    // SAFETY: waitpid on a zombie reparented to us; `status` is a live local.
    let r = unsafe { libc::waitpid(zombie.as_raw(), &mut status, 0) };
    assert_eq!(r, zombie.as_raw());
}

#[test]
fn a_paused_restore_child_is_seized_rebuilt_and_exits() {
    let pid = loop {
        let want = free_pid();
        // SAFETY: the child only loops on pause(), async-signal-safe.
        match unsafe {
            spawn::fork_with_pids_unchecked(&[want], CloneFlags::empty(), spawn::pause_for_tracer)
        } {
            Ok(pid) => break pid,
            Err(spawn::SpawnError::PidInUse { .. }) => continue,
            Err(e) => panic!("fork: {e}"),
        }
    };
    let mut t =
        Tracee::seize_paused(pid, SeizeOptions::RESTORE, Duration::from_secs(5)).expect("seize");
    assert_eq!(t.attach_kind(), tracee::AttachKind::Seized);
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(pid.as_raw())
    );
    // As a restore ends: registers that make it run exit(5), then detach.
    let insn = t.syscall_insn().expect("insn");
    let mut regs = t.get_regs().expect("regs");
    regs.rip = insn.get();
    regs.rax = libc::SYS_exit_group as u64;
    regs.rdi = 5;
    regs.orig_rax = u64::MAX;
    t.set_regs(&regs).expect("set regs");
    t.detach().expect("detach");
    assert_eq!(wait_exit(pid), 5);
}

#[test]
fn a_stop_signal_during_injection_is_kept_for_the_program() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(child.pid.as_raw(), libc::SIGSTOP) };
    let t = frozen.leader_mut().expect("leader");
    // SIGSTOP cannot be blocked: it stops the injection's step, is held back,
    // and the syscall still completes.
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    assert_eq!(
        t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid"),
        i64::from(std::process::id())
    );
    frozen.resume().expect("resume");
    // Re-sent on detach: the program stops as the sender wanted.
    let t0 = Instant::now();
    while state_of(child.pid) != 'T' {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "SIGSTOP was lost: {}",
            state_of(child.pid)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_blocked_signal_sent_during_injection_stays_pending() {
    let child = Pauser::start();
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    // SAFETY: kill on our own child.
    unsafe { libc::kill(child.pid.as_raw(), libc::SIGUSR1) };
    let t = frozen.leader_mut().expect("leader");
    assert_eq!(
        t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid"),
        i64::from(child.pid.as_raw())
    );
    // Not delivered inside the injection window; still queued for the program.
    assert_eq!(t.peek_siginfo(true).expect("peek").len(), 1);
    frozen.resume().expect("resume");
    // Delivered after detach: SIGUSR1's default action kills the child.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a live status local.
    let r = unsafe { libc::waitpid(child.pid.as_raw(), &mut status, libc::__WALL) };
    assert_eq!(r, child.pid.as_raw());
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGUSR1,
        "{status:#x}"
    );
    std::mem::forget(child);
}

#[test]
fn an_interrupted_relative_sleep_restarts_after_injection() {
    // SAFETY: the child only loops on nanosleep with a stack timespec.
    let raw = unsafe { libc::fork() };
    assert!(raw >= 0, "fork failed");
    if raw == 0 {
        loop {
            let ts = libc::timespec {
                tv_sec: 100,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is live for the call; no remaining-time pointer.
            unsafe { libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, 0usize) };
        }
    }
    let child = Pauser {
        pid: Pid::from_raw(raw).expect("pid"),
    };
    wait_sleeping(child.pid);
    let mut frozen = SeizedProcess::freeze(child.pid, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let regs = t.get_regs().expect("regs");
    assert_eq!(regs.orig_rax, libc::SYS_nanosleep as u64);
    assert_eq!(
        regs.rax_signed(),
        tracee::ptrace::restart::ERESTART_RESTARTBLOCK
    );
    t.syscall(libc::SYS_getpid, [0; 6]).expect("getpid");
    assert_eq!(t.get_regs().expect("regs"), regs);
    frozen.resume().expect("resume");
    wait_sleeping(child.pid);
    // Back in the sleep through restart_syscall, not woken early.
    let text =
        std::fs::read_to_string(format!("/proc/{}/syscall", child.pid)).expect("syscall file");
    let nr: i64 = text
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number");
    assert!(
        nr == libc::SYS_restart_syscall || nr == libc::SYS_nanosleep,
        "{text}"
    );
}
