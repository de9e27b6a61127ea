//! Post-copy end to end: a self-checking C program is dumped, restored with
//! `ckpt-restore --lazy-pages` while `ckpt-lazy-pages` serves its memory, and checks
//! every word of it (after forking, munmap/mremap, read() into missing pages), from
//! local images or pulled from a lazy `ckpt-dump`; a daemon killed midway must take
//! the restored tree with it. The `session_` scenarios drive the library's hand-off of
//! several processes ([`ckpt_restore::lazy::LazySession`]) on a small live tree.
//!
//! No test harness: scenarios run one after the other in this single-threaded process,
//! which also plays the dumper and the daemon (`lazy_e2e dump ...`, `lazy_e2e daemon
//! ...`, from the libraries) so that every tool is the one just built. Arguments that
//! are not a mode filter scenarios by name, as the usual harness does.
#![forbid(unsafe_code)]

mod e2e;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use images_format::{ImageDir, ImageKind, PageFlags, PageRange, Pagemap, PagesReader};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use e2e::{
    free_addr, run_daemon, run_dump, run_scenarios, self_exe, stderr_of, strip_ansi, wait_child,
    wait_for_file, wait_images_committed, Scenario, Started,
};

const MIB: u64 = 64;

/// Not an option of `ckpt-restore`: the pages around the main thread's stack pointer are
/// lazy too, so that the stack's VMA is registered with present pages in it.
const LAZY_STACK: &str = "lazy-stack";

/// Not an option of `ckpt-restore`: run it as init of a fresh pid namespace
/// (`unshare --pid --fork`), waiting for the process, as a destination host may.
const AS_INIT: &str = "as-init";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dump") => return tool_dump(&args[1..]),
        Some("daemon") => return tool_daemon(&args[1..]),
        _ => {}
    }
    run_scenarios("lazy_e2e", &args, &scenarios())
}

fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("local_every_page_checked", || {
            local("check", Daemon::Runs, &[])
        }),
        ("local_fork_while_pages_missing", || {
            local("fork", Daemon::Runs, &[])
        }),
        ("local_munmap_mremap_dontneed_missing", || {
            local("mm", Daemon::Runs, &[])
        }),
        ("local_read_syscall_into_lazy_page", || {
            local("read", Daemon::Runs, &[])
        }),
        ("local_prefetch_hot_pages_before_resume", local_prefetch_hot),
        ("local_detached_every_page_checked", || {
            local("check", Daemon::Runs, &["-d"])
        }),
        ("local_new_pid_ns_every_page_checked", || {
            local("check", Daemon::Runs, &["--new-pid-ns"])
        }),
        ("local_waited_as_init_of_a_fresh_pid_ns", || {
            local("check", Daemon::Runs, &[AS_INIT])
        }),
        ("local_waited_as_init_stack_registered", || {
            local("check", Daemon::Runs, &[AS_INIT, LAZY_STACK])
        }),
        ("local_waited_stack_registered", || {
            local("check", Daemon::Runs, &[LAZY_STACK])
        }),
        ("local_waited_stack_registered_read", || {
            local("read", Daemon::Runs, &[LAZY_STACK])
        }),
        ("daemon_killed_kills_the_waited_tree", || {
            local("slow", Daemon::Killed, &[])
        }),
        ("daemon_killed_kills_forked_children_too", || {
            local("forkslow", Daemon::Killed, &["-d"])
        }),
        ("daemon_killed_kills_the_detached_tree", || {
            local("slow", Daemon::Killed, &["-d"])
        }),
        ("daemon_killed_kills_the_waited_tree_in_its_pid_ns", || {
            local("slow", Daemon::Killed, &["--new-pid-ns"])
        }),
        ("daemon_killed_kills_the_tree_in_its_pid_ns", || {
            local("slow", Daemon::Killed, &["--new-pid-ns", "-d"])
        }),
        (
            "new_pid_ns_threads_restored_twice_at_once",
            twice_in_namespaces,
        ),
        ("session_tree_of_three_every_page_checked", || {
            session_tree(Daemon::Runs)
        }),
        ("session_daemon_killed_kills_orphaned_processes", || {
            session_tree(Daemon::Killed)
        }),
        ("remote_every_page_checked", remote_every_page),
        ("remote_on_a_pre_dump_chain", || {
            remote_check(true, &["--new-pid-ns"])
        }),
        ("remote_waited_as_init_of_a_fresh_pid_ns", || {
            remote_check(false, &[AS_INIT])
        }),
        ("remote_threads_waited_as_init_of_a_fresh_pid_ns", || {
            remote_check_threads(false, &[AS_INIT], 3)
        }),
        ("remote_threads_waited_in_a_new_pid_ns", || {
            remote_check_threads(false, &["--new-pid-ns"], 3)
        }),
        (
            "remote_link_broken_before_resume_resumes_source",
            remote_broken_before,
        ),
        (
            "remote_restore_failing_after_fetching_pages_resumes_source",
            remote_failed_after_gets,
        ),
        (
            "remote_link_broken_after_resume_kills_source",
            remote_broken_after,
        ),
    ]
}

/// The daemon serves to the end, or is killed once the restored process runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Runs,
    Killed,
}

// ---------------------------------------------------------------------------------------
// The tools this process also plays.

/// `dump PID IMAGES [lazy ADDR RECONNECT_MS [PARENT] | predump]`
fn tool_dump(args: &[String]) -> ExitCode {
    let (Some(pid), Some(images)) = (args.first().and_then(|p| p.parse().ok()), args.get(1)) else {
        eprintln!("lazy_e2e dump: PID IMAGES [lazy ADDR RECONNECT_MS]");
        return ExitCode::from(2);
    };
    let mut opts = ckpt_dump::DumpOptions::new(pid, images);
    match args.get(2).map(String::as_str) {
        Some("lazy") => {
            opts.mode = ckpt_dump::DumpMode::Lazy;
            opts.lazy_listen = args.get(3).and_then(|a| a.parse().ok());
            opts.lazy_connect_timeout = Duration::from_secs(20);
            if let Some(ms) = args.get(4).and_then(|a| a.parse().ok()) {
                opts.lazy_reconnect_window = Duration::from_millis(ms);
            }
            if let Some(parent) = args.get(5) {
                opts.prev_images_dir = Some(parent.into());
                opts.track_mem = true;
            }
        }
        Some("predump") => {
            opts.mode = ckpt_dump::DumpMode::PreDump;
            opts.track_mem = true;
        }
        _ => {}
    }
    run_dump("lazy_e2e", &opts)
}

/// `daemon IMAGES WORK RATE_BYTES [PAGE_SERVER_ADDR]`
fn tool_daemon(args: &[String]) -> ExitCode {
    let (Some(images), Some(work), Some(rate)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|r| r.parse::<u64>().ok()),
    ) else {
        eprintln!("lazy_e2e daemon: IMAGES WORK RATE [ADDR]");
        return ExitCode::from(2);
    };
    let opts = ckpt_lazy_pages::DaemonOptions {
        images_dir: images.into(),
        work_dir: work.into(),
        page_server: args.get(3).and_then(|a| a.parse().ok()),
        cpu: None,
        background_rate: (rate > 0).then_some(rate),
        background_delay: ckpt_lazy_pages::BACKGROUND_DELAY,
        background_quiet: ckpt_lazy_pages::BACKGROUND_QUIET,
    };
    run_daemon("lazy_e2e", &opts)
}

// ---------------------------------------------------------------------------------------
// Pieces of a scenario.

/// The workload, compiled once per run of this binary.
fn workload_binary() -> Result<PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_workload).clone()
}

fn build_workload() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workload/lazy_check.c");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lazy_check");
    {
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .map_err(|e| format!("run cc: {e}"))?;
        if !status.success() {
            return Err(format!("cc {} failed", src.display()));
        }
    }
    Ok(out)
}

struct Ready {
    pid: i32,
    addr: u64,
    len: u64,
    /// An address on the main thread's stack.
    stack: u64,
}

/// Waits for a process that is not a `Child` of ours (re-parented to us).
fn wait_pid(pid: Pid, limit: Duration) -> Result<WaitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => return Ok(status),
            Err(e) => return Err(format!("waitpid {pid}: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!("pid {pid} still runs after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start_workload(dir: &Path, started: &mut Started) -> Result<Ready, String> {
    start_workload_with(dir, 0, started)
}

fn start_workload_with(dir: &Path, threads: u32, started: &mut Started) -> Result<Ready, String> {
    let bin = workload_binary()?;
    // Its own session (setsid(1) does not fork a non-leader): restore recreates it.
    let child = Command::new("setsid")
        .arg(&bin)
        .arg(dir)
        .arg(MIB.to_string())
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the workload: {e}"))?;
    started.children.push(child);
    let text = wait_for_file(&dir.join("ready"), Duration::from_secs(20))?;
    let words: Vec<u64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [pid, addr, len, stack] = words[..] else {
        return Err(format!("bad ready file: {text:?}"));
    };
    Ok(Ready {
        pid: i32::try_from(pid).map_err(|_| "bad pid".to_string())?,
        addr,
        len,
        stack,
    })
}

/// Marks the pagemap entries inside the region PE_LAZY (their data stays in the pages
/// image, for the daemon to serve), as a dump for local post-copy would.
fn mark_lazy(images: &Path, ready: &Ready) -> Result<u64, String> {
    mark_lazy_with(images, ready, false)
}

/// With `stack`, 32 pages around the main thread's stack pointer are lazy too (the
/// entries there may span the stack's VMA and its neighbour).
fn mark_lazy_with(images: &Path, ready: &Ready, stack: bool) -> Result<u64, String> {
    let dir = ImageDir::new(images).map_err(|e| format!("{e}"))?;
    let id = u64::try_from(ready.pid).map_err(|_| "pid".to_string())?;
    let reader =
        PagesReader::open(&dir, ImageKind::Pagemap, id).map_err(|e| format!("pagemap: {e}"))?;
    let (start, end) = (ready.addr, ready.addr + ready.len);
    let sp = ready.stack & !4095;
    let (sstart, send) = if stack {
        (sp - 16 * 4096, sp + 16 * 4096)
    } else {
        (0, 0)
    };
    let mut out = Pagemap {
        pages_id: reader.pagemap().pages_id,
        ranges: Vec::new(),
    };
    let mut marked = 0;
    for r in &reader.pagemap().ranges {
        // Split each range at the region's edges; the data stays in the same order.
        let mut cuts = vec![r.vaddr];
        for edge in [start, end, sstart, send] {
            if r.vaddr < edge && edge < r.end() {
                cuts.push(edge);
            }
        }
        cuts.push(r.end());
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let mut flags = r.flags;
            let in_region = start <= w[0] && w[1] <= end;
            let in_stack = sstart <= w[0] && w[1] <= send;
            if (in_region || in_stack) && r.flags.contains(PageFlags::PRESENT) {
                flags |= PageFlags::LAZY;
                if in_region {
                    marked += w[1] - w[0];
                }
            }
            out.ranges.push(PageRange {
                vaddr: w[0],
                nr_pages: (w[1] - w[0]) / 4096,
                flags,
            });
        }
    }
    drop(reader);
    let mut writer = dir
        .create(ImageKind::Pagemap, id)
        .map_err(|e| format!("rewrite pagemap: {e}"))?;
    out.write(&mut writer).map_err(|e| format!("{e}"))?;
    writer.finish().map_err(|e| format!("{e}"))?;
    if marked < ready.len {
        return Err(format!(
            "only {marked} of the region's {} bytes were in the pagemap",
            ready.len
        ));
    }
    Ok(marked)
}

fn start_daemon(
    images: &Path,
    work: &Path,
    rate: u64,
    page_server: Option<SocketAddr>,
    started: &mut Started,
) -> Result<usize, String> {
    let mut cmd = Command::new(self_exe()?);
    cmd.arg("daemon")
        .arg(images)
        .arg(work)
        .arg(rate.to_string());
    if let Some(addr) = page_server {
        cmd.arg(addr.to_string());
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the daemon: {e}"))?;
    started.children.push(child);
    let socket = work.join(ckpt_lazy_pages::SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the daemon never listened".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(started.children.len() - 1)
}

fn start_restore(
    images: &Path,
    work: &Path,
    pidfile: &Path,
    extra: &[&str],
    started: &mut Started,
) -> Result<usize, String> {
    let as_init = extra.contains(&AS_INIT);
    let extra: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|a| *a != AS_INIT && *a != LAZY_STACK)
        .collect();
    let mut cmd = if as_init {
        let mut cmd = Command::new("unshare");
        // --kill-child: the namespace dies with unshare, which the test kills on failure.
        cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
            .arg(env!("CARGO_BIN_EXE_ckpt-restore"));
        cmd
    } else {
        Command::new(env!("CARGO_BIN_EXE_ckpt-restore"))
    };
    let child = cmd
        .arg("-D")
        .arg(images)
        .arg("--lazy-pages")
        .arg("-W")
        .arg(work)
        .arg("--pidfile")
        .arg(pidfile)
        .args(["-v", "2"])
        .args(&extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn ckpt-restore: {e}"))?;
    started.children.push(child);
    Ok(started.children.len() - 1)
}

fn read_result(dir: &Path, name: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join(name))
        .map_err(|e| format!("no {name} from the workload: {e}"))?;
    if text.trim() == "ok" {
        Ok(())
    } else {
        Err(format!("the workload's {name}: {text}"))
    }
}

fn dump_full(ready: &Ready, images: &Path, started: &mut Started) -> Result<(), String> {
    let mut dump = Command::new(self_exe()?)
        .arg("dump")
        .arg(ready.pid.to_string())
        .arg(images)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the dump: {e}"))?;
    let status = wait_child(&mut dump, Duration::from_secs(60), "the dump")?;
    if !status.success() {
        return Err(format!("dump: {status}: {}", stderr_of(&mut dump)));
    }
    // The dump killed it; free its pid for the restore.
    for child in &mut started.children {
        let _ = child.wait();
    }
    started.children.clear();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios.

fn local(mode: &str, daemon: Daemon, restore_args: &[&str]) -> Result<(), String> {
    local_log(mode, daemon, restore_args).map(|_| ())
}

/// Freeze-free start: the pages registers point into are in before resume.
fn local_prefetch_hot() -> Result<(), String> {
    let log = local_log("check", Daemon::Runs, &["--lazy-prefetch-hot"])?;
    let line = log
        .lines()
        .find(|l| l.contains("hot lazy pages prefetched"))
        .ok_or_else(|| format!("no prefetch in the restore log:\n{log}"))?;
    let pages: u64 = line
        .split_whitespace()
        .find_map(|w| {
            strip_ansi(w)
                .strip_prefix("pages=")
                .and_then(|n| n.parse().ok())
        })
        .ok_or_else(|| format!("no page count in {line:?}"))?;
    if pages == 0 {
        return Err(format!("nothing prefetched: {line}"));
    }
    Ok(())
}

/// Runs a local scenario; returns what `ckpt-restore` logged when it waited and succeeded.
fn local_log(mode: &str, daemon: Daemon, restore_args: &[&str]) -> Result<String, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let images = dir.join("images");
    let work = dir.join("work");
    std::fs::create_dir(&images).map_err(|e| e.to_string())?;
    std::fs::create_dir(&work).map_err(|e| e.to_string())?;
    let mut started = Started {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let ready = start_workload(&dir, &mut started)?;
    dump_full(&ready, &images, &mut started)?;
    mark_lazy_with(
        &images,
        &ready,
        restore_args.contains(&"--lazy-prefetch-hot") || restore_args.contains(&LAZY_STACK),
    )?;

    // A killed daemon must still have pages to serve: cap its background transfer.
    let rate = if daemon == Daemon::Killed { 1 << 20 } else { 0 };
    let d = start_daemon(&images, &work, rate, None, &mut started)?;
    let pidfile = dir.join("restored.pid");
    std::fs::write(dir.join("go"), mode).map_err(|e| e.to_string())?;
    let r = start_restore(&images, &work, &pidfile, restore_args, &mut started)?;
    let detached = restore_args.contains(&"-d");
    let pid = Pid::from_raw(
        wait_for_file(&pidfile, Duration::from_secs(30))
            .map_err(|e| format!("{e}: {}", stderr_of(&mut started.children[r])))?
            .trim()
            .parse()
            .map_err(|_| "bad pidfile".to_string())?,
    );
    // Inside its own pid namespace the pid is not ours: unshare takes it along.
    if !restore_args.contains(&AS_INIT) {
        started.pids.push(pid);
    }

    if daemon == Daemon::Killed {
        // Let the check start and fault, then take the daemon away mid-transfer.
        std::thread::sleep(Duration::from_millis(300));
        if dir.join("result").exists() {
            return Err("the workload finished before the daemon could be killed".into());
        }
        let _ = started.children[d].kill();
        let _ = started.children[d].wait();
        let killed = if detached {
            if restore_args.contains(&"--new-pid-ns") {
                // The root is the restorer's child in its own namespace; it is gone
                // once kill(pid, 0) fails and the namespace's init was reaped by us.
                wait_gone(pid, Duration::from_secs(10))?;
                true
            } else {
                matches!(
                    wait_pid(pid, Duration::from_secs(10))?,
                    WaitStatus::Signaled(_, Signal::SIGKILL, _)
                )
            }
        } else {
            let status = match wait_child(
                &mut started.children[r],
                Duration::from_secs(10),
                "ckpt-restore",
            ) {
                Ok(status) => status,
                Err(e) => {
                    let _ = started.children[r].kill();
                    let _ = started.children[r].wait();
                    return Err(format!("{e}: {}", stderr_of(&mut started.children[r])));
                }
            };
            status.code() == Some(137)
        };
        if !killed {
            return Err("the restored process was not killed".into());
        }
        for name in ["result", "result.child"] {
            if dir.join(name).exists() {
                return Err(format!(
                    "a restored process ran on: {name}: {:?}",
                    std::fs::read_to_string(dir.join(name))
                ));
            }
        }
        if mode == "forkslow" {
            // The child was forked in the tree: its userfaultfd came back to the watch,
            // and it died with the rest (re-parented to us, we reap it).
            let child: i32 = wait_for_file(&dir.join("child.pid"), Duration::from_secs(1))?
                .trim()
                .parse()
                .map_err(|_| "bad child.pid".to_string())?;
            wait_gone(Pid::from_raw(child), Duration::from_secs(5))
                .map_err(|e| format!("the forked child survived the daemon: {e}"))?;
        }
        return Ok(String::new());
    }

    let mut log = String::new();
    if detached {
        let status = wait_child(
            &mut started.children[r],
            Duration::from_secs(30),
            "ckpt-restore",
        )?;
        if !status.success() {
            return Err(format!(
                "ckpt-restore -d: {status}: {}",
                stderr_of(&mut started.children[r])
            ));
        }
        if restore_args.contains(&"--new-pid-ns") {
            wait_gone(pid, Duration::from_secs(30))?;
        } else {
            let st = wait_pid(pid, Duration::from_secs(30))?;
            if !matches!(st, WaitStatus::Exited(_, 0)) {
                return Err(format!("restored process: {st:?}"));
            }
        }
    } else {
        let status = wait_child(
            &mut started.children[r],
            Duration::from_secs(60),
            "ckpt-restore",
        )?;
        if !status.success() {
            return Err(format!(
                "ckpt-restore: {status}: {}\nresult: {:?}",
                stderr_of(&mut started.children[r]),
                std::fs::read_to_string(dir.join("result"))
            ));
        }
        log = stderr_of(&mut started.children[r]);
    }
    read_result(&dir, "result")?;
    if mode == "fork" {
        read_result(&dir, "result.child")?;
    }
    let status = wait_child(
        &mut started.children[d],
        Duration::from_secs(30),
        "the daemon",
    )?;
    if !status.success() {
        return Err(format!(
            "daemon: {status}: {}",
            stderr_of(&mut started.children[d])
        ));
    }
    Ok(log)
}

/// A multi-threaded process restored twice at once from the same images, each copy in
/// a pid namespace of its own with its own daemon; every thread of both checks memory.
fn twice_in_namespaces() -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let images = dir.join("images");
    std::fs::create_dir(&images).map_err(|e| e.to_string())?;
    let mut started = Started {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let ready = start_workload_with(&dir, 3, &mut started)?;
    dump_full(&ready, &images, &mut started)?;
    mark_lazy(&images, &ready)?;
    std::fs::write(dir.join("go"), "check").map_err(|e| e.to_string())?;
    let mut copies = Vec::new();
    for i in 0..2 {
        let work = dir.join(format!("work{i}"));
        std::fs::create_dir(&work).map_err(|e| e.to_string())?;
        let d = start_daemon(&images, &work, 0, None, &mut started)?;
        let pidfile = dir.join(format!("restored{i}.pid"));
        let r = start_restore(&images, &work, &pidfile, &["--new-pid-ns"], &mut started)?;
        copies.push((d, r));
    }
    for (d, r) in copies {
        let status = wait_child(
            &mut started.children[r],
            Duration::from_secs(60),
            "ckpt-restore",
        )?;
        if !status.success() {
            return Err(format!(
                "ckpt-restore: {status}: {}\nresult: {:?}",
                stderr_of(&mut started.children[r]),
                std::fs::read_to_string(dir.join("result"))
            ));
        }
        let status = wait_child(
            &mut started.children[d],
            Duration::from_secs(30),
            "the daemon",
        )?;
        if !status.success() {
            return Err(format!(
                "daemon: {status}: {}",
                stderr_of(&mut started.children[d])
            ));
        }
    }
    read_result(&dir, "result")
}

fn wait_gone(pid: Pid, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        // Reap whatever came back to us (the namespace's init).
        while let Ok(status) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if kill(pid, None).is_err() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("pid {pid} still exists after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Remote {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    images: PathBuf,
    work: PathBuf,
    addr: SocketAddr,
    source: Pid,
    dump: usize,
    started: Started,
}

/// A workload dumped lazily: its source is frozen, serving on `addr`.
fn remote_source(reconnect_ms: u64) -> Result<Remote, String> {
    remote_source_with(reconnect_ms, false)
}

/// With `predump`, a pre-dump comes first (`images/../pre`) and the lazy dump only
/// leaves lazy what was written since, the region's first quarter among it.
fn remote_source_with(reconnect_ms: u64, predump: bool) -> Result<Remote, String> {
    remote_source_threads(reconnect_ms, predump, 0)
}

/// With `threads` more threads in the workload: their stacks are lazy VMAs whose pages
/// around the stack pointer the dump keeps present.
fn remote_source_threads(reconnect_ms: u64, predump: bool, threads: u32) -> Result<Remote, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let images = dir.join("images");
    let work = dir.join("work");
    std::fs::create_dir(&images).map_err(|e| e.to_string())?;
    std::fs::create_dir(&work).map_err(|e| e.to_string())?;
    let mut started = Started {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let ready = start_workload_with(&dir, threads, &mut started)?;
    let addr = free_addr()?;
    let pre = dir.join("pre");
    if predump {
        std::fs::create_dir(&pre).map_err(|e| e.to_string())?;
        let mut run = Command::new(self_exe()?)
            .arg("dump")
            .arg(ready.pid.to_string())
            .arg(&pre)
            .arg("predump")
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn the pre-dump: {e}"))?;
        let status = wait_child(&mut run, Duration::from_secs(60), "the pre-dump")?;
        if !status.success() {
            return Err(format!("pre-dump: {status}: {}", stderr_of(&mut run)));
        }
        std::fs::write(dir.join("poke"), "1").map_err(|e| e.to_string())?;
        wait_for_file(&dir.join("poked"), Duration::from_secs(10))?;
    }
    let mut cmd = Command::new(self_exe()?);
    cmd.arg("dump")
        .arg(ready.pid.to_string())
        .arg(&images)
        .arg("lazy")
        .arg(addr.to_string())
        .arg(reconnect_ms.to_string());
    if predump {
        cmd.arg(&pre);
    }
    let dump = cmd
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the lazy dump: {e}"))?;
    started.children.push(dump);
    let dump = started.children.len() - 1;
    // Serving once the images are committed (a probing connection would count as a
    // destination leaving before it resumed).
    wait_images_committed(&images, &mut started.children[dump])?;
    if predump {
        check_parent_and_lazy(&images, &ready)?;
    }
    Ok(Remote {
        _tmp: tmp,
        dir,
        images,
        work,
        addr,
        source: Pid::from_raw(ready.pid),
        dump,
        started,
    })
}

/// The region in the lazy dump: its first quarter (written since the pre-dump) lazy, the
/// rest in the parent.
fn check_parent_and_lazy(images: &Path, ready: &Ready) -> Result<(), String> {
    let dir = ImageDir::new(images).map_err(|e| format!("{e}"))?;
    let id = u64::try_from(ready.pid).map_err(|_| "pid".to_string())?;
    let reader =
        PagesReader::open(&dir, ImageKind::Pagemap, id).map_err(|e| format!("pagemap: {e}"))?;
    let quarter = ready.addr + ready.len / 4;
    let (mut lazy, mut parent) = (0, 0);
    for r in &reader.pagemap().ranges {
        let start = r.vaddr.max(ready.addr);
        let end = r.end().min(ready.addr + ready.len);
        if start >= end {
            continue;
        }
        if r.flags.contains(PageFlags::LAZY) {
            lazy += end - start;
            if end > quarter {
                return Err(format!(
                    "{:#x}..{end:#x} is lazy, not written since the pre-dump",
                    start
                ));
            }
        } else if r.flags.contains(PageFlags::PARENT) {
            parent += end - start;
        }
    }
    if lazy != ready.len / 4 || parent != ready.len - ready.len / 4 {
        return Err(format!(
            "region: {lazy} bytes lazy, {parent} in the parent; want {} and {}",
            ready.len / 4,
            ready.len - ready.len / 4
        ));
    }
    Ok(())
}

fn remote_every_page() -> Result<(), String> {
    remote_check(false, &["--new-pid-ns"])
}

fn remote_check(predump: bool, restore_args: &[&str]) -> Result<(), String> {
    remote_check_threads(predump, restore_args, 0)
}

fn remote_check_threads(predump: bool, restore_args: &[&str], threads: u32) -> Result<(), String> {
    let mut s = remote_source_threads(2000, predump, threads)?;
    let d = start_daemon(&s.images, &s.work, 0, Some(s.addr), &mut s.started)?;
    let pidfile = s.dir.join("restored.pid");
    std::fs::write(s.dir.join("go"), "check").map_err(|e| e.to_string())?;
    // The source still holds the pid here: the copy gets a namespace of its own.
    let r = start_restore(&s.images, &s.work, &pidfile, restore_args, &mut s.started)?;
    let status = wait_child(
        &mut s.started.children[r],
        Duration::from_secs(60),
        "ckpt-restore",
    )?;
    if !status.success() {
        return Err(format!(
            "ckpt-restore: {status}: {}\ndaemon: {}\ndump: {}",
            stderr_of(&mut s.started.children[r]),
            stderr_of(&mut s.started.children[d]),
            stderr_of(&mut s.started.children[s.dump])
        ));
    }
    read_result(&s.dir, "result")?;
    let status = wait_child(
        &mut s.started.children[d],
        Duration::from_secs(30),
        "the daemon",
    )?;
    if !status.success() {
        return Err(format!(
            "daemon: {status}: {}",
            stderr_of(&mut s.started.children[d])
        ));
    }
    let status = wait_child(
        &mut s.started.children[s.dump],
        Duration::from_secs(30),
        "the dump",
    )?;
    if !status.success() {
        return Err(format!(
            "dump: {status}: {}",
            stderr_of(&mut s.started.children[s.dump])
        ));
    }
    // Every page moved: the source is gone, killed.
    let source = wait_child(
        &mut s.started.children[0],
        Duration::from_secs(10),
        "the source",
    )?;
    if std::os::unix::process::ExitStatusExt::signal(&source) != Some(libc_sigkill()) {
        return Err(format!("the source ended with {source}, not SIGKILL"));
    }
    Ok(())
}

fn libc_sigkill() -> i32 {
    Signal::SIGKILL as i32
}

fn remote_broken_before() -> Result<(), String> {
    let mut s = remote_source(2000)?;
    // A peer that connects and leaves without asking for a page.
    drop(TcpStream::connect(s.addr).map_err(|e| format!("connect: {e}"))?);
    let status = wait_child(
        &mut s.started.children[s.dump],
        Duration::from_secs(30),
        "the dump",
    )?;
    if status.success() {
        return Err("the dump reported success though no destination resumed".into());
    }
    // The source runs on: still alive, not stopped, and it keeps working.
    std::thread::sleep(Duration::from_millis(100));
    if s.started.children[0]
        .try_wait()
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("the source died".into());
    }
    let state =
        std::fs::read_to_string(format!("/proc/{}/stat", s.source)).map_err(|e| e.to_string())?;
    let st = state
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    if st == "T" || st == "t" {
        return Err(format!("the source is left stopped ({st})"));
    }
    std::fs::write(s.dir.join("go"), "check").map_err(|e| e.to_string())?;
    let status = wait_child(
        &mut s.started.children[0],
        Duration::from_secs(30),
        "the source",
    )?;
    if !status.success() {
        return Err(format!("the resumed source: {status}"));
    }
    read_result(&s.dir, "result")
}

/// Checks that the source runs on, not stopped, and passes its own check.
fn source_runs_on(s: &mut Remote) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(100));
    if s.started.children[0]
        .try_wait()
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("the source died".into());
    }
    let state =
        std::fs::read_to_string(format!("/proc/{}/stat", s.source)).map_err(|e| e.to_string())?;
    let st = state
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
        .to_string();
    if st == "T" || st == "t" {
        return Err(format!("the source is left stopped ({st})"));
    }
    std::fs::write(s.dir.join("go"), "check").map_err(|e| e.to_string())?;
    let status = wait_child(
        &mut s.started.children[0],
        Duration::from_secs(30),
        "the source",
    )?;
    if !status.success() {
        return Err(format!("the resumed source: {status}"));
    }
    read_result(&s.dir, "result")
}

/// A restore that fetches lazy pages before resuming (as restore itself touching lazy
/// memory makes the daemon do), then fails: the GETs say the destination does not run yet,
/// so the source must be resumed, not kept frozen.
fn remote_failed_after_gets() -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = remote_source(300)?;
    let dir = ImageDir::new(&s.images).map_err(|e| format!("{e}"))?;
    let id = u64::try_from(s.source.as_raw()).map_err(|_| "pid".to_string())?;
    let reader =
        PagesReader::open(&dir, ImageKind::Pagemap, id).map_err(|e| format!("pagemap: {e}"))?;
    let lazy: Vec<(u64, u64)> = reader
        .pagemap()
        .ranges
        .iter()
        .filter(|r| r.flags.contains(PageFlags::LAZY))
        .map(|r| (r.vaddr, r.nr_pages))
        .take(3)
        .collect();
    if lazy.is_empty() {
        return Err("the lazy dump left no page lazy".into());
    }
    let mut link = TcpStream::connect(s.addr).map_err(|e| format!("connect: {e}"))?;
    for &(vaddr, pages) in &lazy {
        let nr = pages.min(4);
        // GET as the daemon sends it before restore's end marker.
        let cmd = u32::from(ckpt_lazy_pages::source::GET_BEFORE_RESUME) << 16 | 7;
        let mut frame = [0u8; 32];
        frame[0..4].copy_from_slice(&cmd.to_le_bytes());
        frame[8..16].copy_from_slice(&nr.to_le_bytes());
        frame[16..24].copy_from_slice(&vaddr.to_le_bytes());
        frame[24..32].copy_from_slice(&id.to_le_bytes());
        link.write_all(&frame)
            .map_err(|e| format!("send a GET: {e}"))?;
        let mut reply = [0u8; 32];
        link.read_exact(&mut reply)
            .map_err(|e| format!("read the answer: {e}"))?;
        let got = u64::from_le_bytes(reply[8..16].try_into().map_err(|_| "frame")?);
        if got == 0 {
            return Err(format!("no page served at {vaddr:#x}"));
        }
        let mut data = vec![0u8; usize::try_from(got * 4096).map_err(|_| "len")?];
        link.read_exact(&mut data)
            .map_err(|e| format!("read the pages: {e}"))?;
    }
    // Restore failed: the daemon goes away without the end marker's notice.
    drop(link);
    let status = wait_child(
        &mut s.started.children[s.dump],
        Duration::from_secs(30),
        "the dump",
    )?;
    if status.success() {
        return Err("the dump reported success though the destination never resumed".into());
    }
    source_runs_on(&mut s)
}

fn remote_broken_after() -> Result<(), String> {
    let mut s = remote_source(500)?;
    let d = start_daemon(&s.images, &s.work, 1 << 20, Some(s.addr), &mut s.started)?;
    let pidfile = s.dir.join("restored.pid");
    std::fs::write(s.dir.join("go"), "slow").map_err(|e| e.to_string())?;
    let r = start_restore(
        &s.images,
        &s.work,
        &pidfile,
        &["--new-pid-ns"],
        &mut s.started,
    )?;
    wait_for_file(&pidfile, Duration::from_secs(30))
        .map_err(|e| format!("{e}: {}", stderr_of(&mut s.started.children[r])))?;
    std::thread::sleep(Duration::from_millis(300));
    let _ = s.started.children[d].kill();
    let _ = s.started.children[d].wait();
    // The destination dies with its daemon...
    let status = wait_child(
        &mut s.started.children[r],
        Duration::from_secs(10),
        "ckpt-restore",
    )?;
    if status.code() != Some(137) {
        return Err(format!(
            "the restored tree ended with {status}, not SIGKILL"
        ));
    }
    // ...and the source, which the destination had taken over from, is killed, never
    // resumed.
    let source = wait_child(
        &mut s.started.children[0],
        Duration::from_secs(10),
        "the source",
    )?;
    if std::os::unix::process::ExitStatusExt::signal(&source) != Some(libc_sigkill()) {
        return Err(format!("the source ended with {source}, not SIGKILL"));
    }
    if s.dir.join("result").exists() {
        return Err("a copy ran on to write a result".into());
    }
    let _ = wait_child(
        &mut s.started.children[s.dump],
        Duration::from_secs(10),
        "the dump",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Several processes over one hand-off session (the library API a tree restore uses).

const SESSION_REGION: u64 = 0x5000_0000_0000;
const SESSION_PAGES: u64 = 1024;

/// Process `n` of lazy_session.c has image pid 4000 + n and this in its region.
fn session_pattern(n: u64) -> Vec<u8> {
    (0..SESSION_PAGES * 4096 / 8)
        .flat_map(|i| {
            let addr = SESSION_REGION + i * 8;
            (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n).to_ne_bytes()
        })
        .collect()
}

fn session_binary() -> Result<PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workload/lazy_session.c");
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lazy_session");
            let status = Command::new("cc")
                .args(["-O1", "-Wall", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .map_err(|e| format!("run cc: {e}"))?;
            if !status.success() {
                return Err(format!("cc {} failed", src.display()));
            }
            Ok(out)
        })
        .clone()
}

/// Two live processes (a parent and its child) seized and handed over on one session,
/// a zombie announced, the end marker sent; the child forks while pages are missing.
/// With the daemon killed midway, the parent has exited first: the watch must still kill
/// the orphaned child and grandchild, which are no longer below the root.
fn session_tree(daemon: Daemon) -> Result<(), String> {
    use ckpt_restore::lazy::{LazySession, Victim, WatchEnd};
    use ckpt_restore::plan::Range;

    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = tmp.path();
    let images = dir.join("images");
    let work = dir.join("work");
    std::fs::create_dir(&work).map_err(|e| e.to_string())?;
    let image_dir = ImageDir::create_dir(&images).map_err(|e| e.to_string())?;
    for n in [1u64, 2] {
        let mut w = image_dir
            .pagemap_writer(ImageKind::Pagemap, 4000 + n, u32::try_from(n).unwrap_or(1))
            .map_err(|e| format!("pagemap writer: {e}"))?;
        w.add_with_data(
            SESSION_REGION,
            PageFlags::LAZY | PageFlags::PRESENT,
            &session_pattern(n),
        )
        .map_err(|e| format!("lazy pages: {e}"))?;
        w.finish().map_err(|e| format!("finish images: {e}"))?;
    }
    let mut started = Started {
        children: Vec::new(),
        pids: Vec::new(),
    };
    let mode = if daemon == Daemon::Killed {
        "slow"
    } else {
        "check"
    };
    let child = Command::new(session_binary()?)
        .arg(dir)
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn lazy_session: {e}"))?;
    started.children.push(child);
    let text = wait_for_file(&dir.join("ready"), Duration::from_secs(20))?;
    let pids: Vec<i32> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [one, two] = pids[..] else {
        return Err(format!("bad ready file: {text:?}"));
    };
    started.pids.push(Pid::from_raw(two));
    // A killed daemon must still have pages to serve.
    let rate = if daemon == Daemon::Killed { 4096 } else { 0 };
    let d = start_daemon(&images, &work, rate, None, &mut started)?;

    let region = [Range {
        start: SESSION_REGION,
        end: SESSION_REGION + SESSION_PAGES * 4096,
    }];
    let mut session = LazySession::open(&work).map_err(|e| format!("open: {e:#}"))?;
    let mut seized = Vec::new();
    for (n, pid) in [(1, one), (2, two)] {
        let pid = tracee::Pid::from_raw(pid).ok_or("pid 0")?;
        let mut t =
            tracee::Tracee::seize_and_interrupt(pid, pid.leader(), tracee::SeizeOptions::empty())
                .map_err(|e| format!("seize {pid}: {e}"))?;
        session
            .add(&mut t, 4000 + n, &region)
            .map_err(|e| format!("add {pid}: {}", chain(&e)))?;
        seized.push(t);
    }
    session
        .add_zombie(4003)
        .map_err(|e| format!("zombie: {e}"))?;
    if session.uffds().len() != 2 {
        return Err(format!("{} userfaultfds held", session.uffds().len()));
    }
    let watch = session.finish().map_err(|e| format!("finish: {e}"))?;
    // Detached: they run on.
    drop(seized);
    let root = tracee::Pid::from_raw(one).ok_or("pid 0")?;
    let watcher = std::thread::spawn(move || watch.run(Victim::Tree(root)));
    std::fs::write(dir.join("go"), "1").map_err(|e| e.to_string())?;

    if daemon == Daemon::Runs {
        let status = wait_child(
            &mut started.children[0],
            Duration::from_secs(30),
            "lazy_session",
        )?;
        for n in 1..=3 {
            read_result(dir, &format!("result-{n}"))?;
        }
        if !status.success() {
            return Err(format!("lazy_session: {status}"));
        }
        let status = wait_child(
            &mut started.children[d],
            Duration::from_secs(30),
            "the daemon",
        )?;
        if !status.success() {
            return Err(format!(
                "daemon: {status}: {}",
                stderr_of(&mut started.children[d])
            ));
        }
        return match watcher.join() {
            Ok(WatchEnd::AllIn) => Ok(()),
            Ok(end) => Err(format!("the watch ended with {end:?}")),
            Err(_) => Err("the watch panicked".into()),
        };
    }

    // Process 1 exits once its page came; 2 forks 3 and both go on faulting.
    let status = wait_child(
        &mut started.children[0],
        Duration::from_secs(20),
        "process 1",
    )?;
    if !status.success() {
        return Err(format!("process 1: {status}"));
    }
    let text = wait_for_file(&dir.join("pids"), Duration::from_secs(20))?;
    let three: i32 = text
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("bad pids file: {text:?}"))?;
    started.pids.push(Pid::from_raw(three));
    // Let process 3's fork reach the watch (the daemon hands its userfaultfd back as it
    // reads the fork event), and a few faults be served.
    std::thread::sleep(Duration::from_millis(100));
    let _ = started.children[d].kill();
    let _ = started.children[d].wait();
    match watcher.join() {
        Ok(WatchEnd::DaemonGone) => {}
        Ok(end) => return Err(format!("the watch ended with {end:?}")),
        Err(_) => return Err("the watch panicked".into()),
    }
    // Both were re-parented to us (the subreaper) when 1 exited.
    for pid in [two, three] {
        match wait_pid(Pid::from_raw(pid), Duration::from_secs(10))? {
            WaitStatus::Signaled(_, Signal::SIGKILL, _) => {}
            other => return Err(format!("pid {pid}: {other:?}, not killed")),
        }
    }
    for n in 2..=3 {
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("result-{n}"))) {
            return Err(format!("process {n} ran on with missing pages: {text}"));
        }
    }
    Ok(())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
