//! Prepared post-copy end to end, destination side: `ckpt-restore --lazy-pages --prepared`
//! against a source played by this test. Two real lazy dumps of a running counter are taken
//! some milliseconds apart; the first is the prepared image set (its dump finds no daemon
//! and lets the counter run on), the second freezes the counter and serves its pages. The
//! test opens the switch for the restore, waits for READY, sends the images of the second
//! dump whose bytes differ from the first as the DELTA, and checks that the restored
//! counter carries on from the second dump's state: its count, kept in a register across
//! the loop, is at least what the frozen source's memory holds.
//!
//! Scenarios: the fast path (only registers, page lists and such changed); the fallback
//! (the counter maps a new region between the dumps, so the held tree is dropped and the
//! tree restored from the new images); an ABORT (the restore drops the tree and fails); a
//! delta made against another copy of the prepared images (the restore says FAILED).
//!
//! No test harness: scenarios run one after the other in this single-threaded process,
//! which also plays the dumper and the daemon (`prepared_e2e dump ...`, `prepared_e2e
//! daemon ...`, from the libraries).
#![forbid(unsafe_code)]

mod e2e;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use images_format::switch::{self, NamedImage, SwitchMessage};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use e2e::{
    free_addr, run_daemon, run_dump, run_scenarios, self_exe, stderr_of, strip_ansi, wait_child,
    wait_for_file, wait_images_committed, Scenario, Started,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dump") => return tool_dump(&args[1..]),
        Some("daemon") => return tool_daemon(&args[1..]),
        _ => {}
    }
    run_scenarios("prepared_e2e", &args, &scenarios())
}

fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("prepared_fast_path", fast_path),
        ("prepared_fast_path_hot_threads", fast_path_hot_threads),
        ("prepared_fallback", fallback),
        ("prepared_abort", abort),
        ("prepared_wrong_base", wrong_base),
    ]
}

/// `dump PID IMAGES ADDR CONNECT_TIMEOUT_MS`: a lazy dump serving on ADDR.
fn tool_dump(args: &[String]) -> ExitCode {
    let (Some(pid), Some(images), Some(addr), Some(ms)) = (
        args.first().and_then(|p| p.parse().ok()),
        args.get(1),
        args.get(2).and_then(|a| a.parse().ok()),
        args.get(3).and_then(|a| a.parse().ok()),
    ) else {
        eprintln!("prepared_e2e dump: PID IMAGES ADDR CONNECT_TIMEOUT_MS");
        return ExitCode::from(2);
    };
    let mut opts = ckpt_dump::DumpOptions::new(pid, images);
    opts.mode = ckpt_dump::DumpMode::Lazy;
    opts.lazy_listen = Some(addr);
    opts.lazy_connect_timeout = Duration::from_millis(ms);
    run_dump("prepared_e2e", &opts)
}

/// `daemon IMAGES WORK PAGE_SERVER_ADDR`
fn tool_daemon(args: &[String]) -> ExitCode {
    let (Some(images), Some(work), Some(addr)) = (
        args.first(),
        args.get(1),
        args.get(2).and_then(|a| a.parse().ok()),
    ) else {
        eprintln!("prepared_e2e daemon: IMAGES WORK ADDR");
        return ExitCode::from(2);
    };
    let opts = ckpt_lazy_pages::DaemonOptions {
        images_dir: images.into(),
        work_dir: work.into(),
        page_server: Some(addr),
        cpu: None,
        background_rate: None,
        background_delay: ckpt_lazy_pages::BACKGROUND_DELAY,
        background_quiet: ckpt_lazy_pages::BACKGROUND_QUIET,
    };
    run_daemon("prepared_e2e", &opts)
}

// ---------------------------------------------------------------------------------------
// Pieces.

fn workload_binary() -> Result<PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workload/prepared_counter.c");
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("prepared_counter");
            let status = Command::new("cc")
                .args(["-O2", "-Wall", "-pthread", "-o"])
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

/// The position of the fd of `pid` open on `path`.
fn log_position(pid: i32, path: &Path) -> Result<u64, String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| e.to_string())?;
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .map_err(|e| e.to_string())?;
        return info
            .lines()
            .find_map(|l| l.strip_prefix("pos:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no position in {info:?}"));
    }
    Err(format!("pid {pid} has no fd on {}", path.display()))
}

/// The count the process keeps in its page at `addr`.
fn count_of(pid: i32, addr: u64) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut word = [0u8; 8];
    mem.read_exact_at(&mut word, addr)
        .map_err(|e| format!("read the count of {pid}: {e}"))?;
    Ok(u64::from_ne_bytes(word))
}

/// A lazy dump of `pid` into `images`, serving on a free port for `timeout_ms`; returns
/// once the images are complete (the dump goes on serving, or gives up and lets the
/// process run on).
fn lazy_dump(
    pid: i32,
    images: &Path,
    timeout_ms: u64,
    started: &mut Started,
) -> Result<(usize, SocketAddr), String> {
    std::fs::create_dir_all(images).map_err(|e| e.to_string())?;
    let addr = free_addr()?;
    let child = Command::new(self_exe()?)
        .arg("dump")
        .arg(pid.to_string())
        .arg(images)
        .arg(addr.to_string())
        .arg(timeout_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the dump: {e}"))?;
    started.children.push(child);
    let i = started.children.len() - 1;
    wait_images_committed(images, &mut started.children[i])?;
    Ok((i, addr))
}

/// Every thread's core image in `images`.
fn core_images(images: &Path) -> Result<Vec<images_format::pb::CoreEntry>, String> {
    use images_format::{ImageDir, ImageKind, ImageName};
    let dir = ImageDir::new(images).map_err(|e| e.to_string())?;
    let mut cores = Vec::new();
    for e in std::fs::read_dir(images)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(ImageName {
            kind: ImageKind::Core,
            id: Some(tid),
        }) = ImageKind::from_file_name(&name)
        else {
            continue;
        };
        cores.push(
            dir.read_one(ImageKind::Core, tid)
                .map_err(|e| format!("{name}: {e}"))?,
        );
    }
    Ok(cores)
}

/// What a source sends as hot pages: per thread of the frozen `pid` (from its core images
/// in `images`), the pages at its instruction pointer, around its stack pointer and at
/// its thread pointer.
fn hot_pages(pid: i32, images: &Path) -> Result<Vec<switch::HotPages>, String> {
    use std::os::unix::fs::FileExt;
    let mut pages: Vec<u64> = Vec::new();
    for core in core_images(images)? {
        let Some(ti) = core.thread_info else { continue };
        let r = &ti.gpregs;
        for a in [
            r.ip,
            r.sp,
            r.sp - 4096,
            r.sp + 4096,
            r.fs_base,
            r.fs_base + 4096,
        ] {
            pages.push(a & !4095);
        }
    }
    pages.sort_unstable();
    pages.dedup();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for vaddr in pages {
        let mut data = vec![0u8; 4096];
        if mem.read_exact_at(&mut data, vaddr).is_ok() {
            out.push(switch::HotPages { pid, vaddr, data });
        }
    }
    Ok(out)
}

/// The images of `new` whose bytes differ from those of `old`, by file name.
fn delta(old: &Path, new: &Path) -> Result<Vec<NamedImage>, String> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(new)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    for name in names {
        let bytes = std::fs::read(new.join(&name)).map_err(|e| e.to_string())?;
        if std::fs::read(old.join(&name)).ok().as_ref() != Some(&bytes) {
            out.push(NamedImage { name, bytes });
        }
    }
    Ok(out)
}

/// The bytes of every image in `dir`, by name.
fn prepared_images(dir: &Path) -> Result<std::collections::HashMap<String, Vec<u8>>, String> {
    let mut out = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = std::fs::read(e.path()).map_err(|e| format!("{name}: {e}"))?;
        out.insert(name, bytes);
    }
    Ok(out)
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for e in std::fs::read_dir(from)
        .map_err(|e| e.to_string())?
        .flatten()
    {
        std::fs::copy(e.path(), to.join(e.file_name())).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Starts the prepared restore of `s` (`hot`: asking for hot pages) against a listener
/// of ours, and waits for its READY: the restore's index in `s.started.children`, the
/// switch connection, and whether it asked for hot pages.
fn switch_opened(s: &mut Setup, hot: bool) -> Result<(usize, TcpStream, bool), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let switch_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let r = start_restore(s, switch_addr, hot)?;
    let (link, wants_hot) = accept_ready(&listener, &mut s.started.children[r])?;
    Ok((r, link, wants_hot))
}

/// Accepts the restore's switch connection and reads its opening and READY (whether it
/// asks for hot pages).
fn accept_ready(listener: &TcpListener, restore: &mut Child) -> Result<(TcpStream, bool), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut link = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the restore never connected".into());
                }
                if let Ok(Some(status)) = restore.try_wait() {
                    return Err(format!(
                        "ckpt-restore ended ({status}) before connecting: {}",
                        stderr_of(restore)
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    link.set_nonblocking(false).map_err(|e| e.to_string())?;
    link.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    switch::read_magic(&mut link).map_err(|e| format!("the restore's magic: {e}"))?;
    match switch::read_message(&mut link) {
        Ok(SwitchMessage::Ready { hot_pages }) => Ok((link, hot_pages)),
        Ok(other) => Err(format!(
            "expected READY, got {other:?}: {}",
            stderr_of(restore)
        )),
        Err(e) => Err(format!("waiting for READY: {e}: {}", stderr_of(restore))),
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    dir2: PathBuf,
    work: PathBuf,
    pid: i32,
    addr: u64,
    started: Started,
}

/// The counter running (with `threads` more threads), its prepared images copied to `dir2`.
fn prepare(threads: u32) -> Result<Setup, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path().to_path_buf();
    let work = dir.join("work");
    std::fs::create_dir(&work).map_err(|e| e.to_string())?;
    let mut started = Started::default();
    let child = Command::new("setsid")
        .arg(workload_binary()?)
        .arg(&dir)
        .arg(threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn the workload: {e}"))?;
    started.children.push(child);
    let ready = wait_for_file(&dir.join("ready"), Duration::from_secs(20))?;
    let words: Vec<u64> = ready
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [pid, addr] = words[..] else {
        return Err(format!("bad ready file {ready:?}"));
    };
    let pid = i32::try_from(pid).map_err(|_| "pid".to_string())?;
    // The prepared images: no daemon comes, the counter runs on.
    let images1 = dir.join("images1");
    let (d1, _) = lazy_dump(pid, &images1, 200, &mut started)?;
    let status = wait_child(&mut started.children[d1], Duration::from_secs(30), "dump 1")?;
    if status.success() {
        return Err("dump 1 found a daemon nobody started".into());
    }
    let dir2 = dir.join("dir2");
    copy_dir(&images1, &dir2)?;
    Ok(Setup {
        _tmp: tmp,
        dir,
        dir2,
        work,
        pid,
        addr,
        started,
    })
}

fn start_restore(s: &mut Setup, switch_addr: SocketAddr, hot: bool) -> Result<usize, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpt-restore"));
    if hot {
        cmd.arg("--lazy-prefetch-hot");
    }
    let child = cmd
        .arg("-D")
        .arg(&s.dir2)
        .arg("--lazy-pages")
        .arg("--prepared")
        .arg(switch_addr.to_string())
        .arg("-W")
        .arg(&s.work)
        .arg("--pidfile")
        .arg(s.dir.join("restored.pid"))
        // The source still holds the pid.
        .arg("--new-pid-ns")
        .args(["-v", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn ckpt-restore: {e}"))?;
    s.started.children.push(child);
    Ok(s.started.children.len() - 1)
}

// ---------------------------------------------------------------------------------------
// Scenarios.

fn fast_path() -> Result<(), String> {
    fast_path_with(0, false)
}

/// Threads other than the leader stay held until the switch, and take their new
/// registers as the leader does; the hot pages sent with the delta go in first.
fn fast_path_hot_threads() -> Result<(), String> {
    fast_path_with(2, true)
}

fn fast_path_with(threads: u32, hot: bool) -> Result<(), String> {
    let log = switch_to_second_state(false, threads, hot)?;
    if !log.contains("prepared switch: fast path") {
        return Err(format!("no fast path in the restore's log:\n{log}"));
    }
    // The log's position moved between the dumps: set again on the description.
    if !strip_ansi(&log).contains("positions=1") {
        return Err(format!("the log's new position was not applied:\n{log}"));
    }
    Ok(())
}

fn fallback() -> Result<(), String> {
    let log = switch_to_second_state(true, 0, false)?;
    if !log.contains("cannot take the delta") || !log.contains("mm-") {
        return Err(format!(
            "no fallback for the changed memory layout in the restore's log:\n{log}"
        ));
    }
    Ok(())
}

/// The whole switch; `grow`: the counter changes its memory layout between the dumps.
/// Returns the restore's log.
fn switch_to_second_state(grow: bool, threads: u32, hot: bool) -> Result<String, String> {
    let mut s = prepare(threads)?;
    let after_first = count_of(s.pid, s.addr)?;
    let (r, mut link, wants_hot) = switch_opened(&mut s, hot)?;
    if wants_hot != hot {
        return Err(format!("READY asked for hot pages: {wants_hot}"));
    }
    if grow {
        std::fs::write(s.dir.join("grow"), "1").map_err(|e| e.to_string())?;
        wait_for_file(&s.dir.join("grown"), Duration::from_secs(10))?;
    }
    std::thread::sleep(Duration::from_millis(100));
    // The final state: the source frozen, serving its pages.
    let images2 = s.dir.join("images2");
    let (d2, pages_addr) = lazy_dump(s.pid, &images2, 30_000, &mut s.started)?;
    let frozen = count_of(s.pid, s.addr)?;
    let frozen_pos = log_position(s.pid, &s.dir.join("log"))?;
    if frozen < after_first + 20 {
        return Err(format!(
            "the counter went from {after_first} to only {frozen} between the dumps"
        ));
    }
    let images = delta(&s.dir.join("images1"), &images2)?;
    let names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
    let daemon = Command::new(self_exe()?)
        .arg("daemon")
        .arg(&s.dir2)
        .arg(&s.work)
        .arg(pages_addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn the daemon: {e}"))?;
    s.started.children.push(daemon);
    let d = s.started.children.len() - 1;
    let socket = s.work.join(ckpt_lazy_pages::SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the daemon never listened".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let hot = if hot {
        hot_pages(s.pid, &images2)?
    } else {
        Vec::new()
    };
    let msg = SwitchMessage::Delta { images, hot };
    // As the dump sends it: each image against its prepared version (the restore holds a
    // copy of it), most as their differences.
    let prepared = prepared_images(&s.dir.join("images1"))?;
    switch::write_message_based(&mut link, &msg, true, |name| {
        prepared.get(name).map(Vec::as_slice)
    })
    .map_err(|e| format!("send DELTA: {e}"))?;
    match switch::read_message(&mut link) {
        Ok(SwitchMessage::Resumed) => {}
        other => {
            return Err(format!(
                "expected RESUMED, got {other:?}\nrestore: {}\ndaemon: {}\ndump: {}",
                stderr_of(&mut s.started.children[r]),
                stderr_of(&mut s.started.children[d]),
                stderr_of(&mut s.started.children[d2])
            ))
        }
    }
    let rseq = rseq_as_dumped(&s.dir.join("restored.pid"), &images2)
        .map_err(|e| format!("{e}\nrestore: {}", stderr_of(&mut s.started.children[r])))?;
    std::fs::write(s.dir.join("report"), "1").map_err(|e| e.to_string())?;
    let status = wait_child(
        &mut s.started.children[r],
        Duration::from_secs(60),
        "ckpt-restore",
    )?;
    let log = stderr_of(&mut s.started.children[r]);
    if !status.success() {
        return Err(format!(
            "ckpt-restore: {status} (delta {names:?}):\n{log}\ndaemon: {}",
            stderr_of(&mut s.started.children[d])
        ));
    }
    let report = wait_for_file(&s.dir.join("count"), Duration::from_secs(10))?;
    let words: Vec<u64> = report
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [count, pos] = words[..] else {
        return Err(format!("bad count file {report:?}"));
    };
    // Written before the count: every thread's affinity as it started (the switch moves
    // the held threads off its CPU and gives their affinity back).
    let affinity = std::fs::read_to_string(s.dir.join("affinity")).map_err(|e| e.to_string())?;
    if affinity.trim() != "1" {
        return Err(format!(
            "a restored thread's CPU affinity is not the one it started with (delta {names:?})\n{log}"
        ));
    }
    if pos < frozen_pos {
        return Err(format!(
            "the restored counter's log is at {pos}, before the {frozen_pos} of the final dump \
             (delta {names:?})\n{log}"
        ));
    }
    if count < frozen {
        return Err(format!(
            "the restored counter reported {count}, below the {frozen} of the final dump \
             (the prepared one had at most {after_first}): it did not carry on from the final state \
             (delta {names:?})\n{log}"
        ));
    }
    // Every page moved: the daemon and the dump end, the source is killed.
    for (i, what) in [(d, "the daemon"), (d2, "dump 2")] {
        let status = wait_child(&mut s.started.children[i], Duration::from_secs(30), what)?;
        if !status.success() {
            return Err(format!(
                "{what}: {status}: {}",
                stderr_of(&mut s.started.children[i])
            ));
        }
    }
    let source = wait_child(
        &mut s.started.children[0],
        Duration::from_secs(10),
        "the source",
    )?;
    if std::os::unix::process::ExitStatusExt::signal(&source) != Some(Signal::SIGKILL as i32) {
        return Err(format!("the source ended with {source}, not SIGKILL"));
    }
    println!(
        "  delta {names:?}; counts: prepared <= {after_first}, final {frozen}, restored {count}; \
         log position: final {frozen_pos}, restored {pos}; rseq areas registered: {rseq}"
    );
    for line in log.lines().filter(|l| l.contains("prepared")) {
        println!("  {line}");
    }
    Ok(log)
}

/// Checks that every thread of the restored tree (root pid in `pidfile`) has the rseq
/// area its core image in `images` names registered (whether held before the switch or
/// deferred past it): glibc registers one per thread, and a thread without it would read
/// stale CPU numbers. Returns how many areas the images name.
fn rseq_as_dumped(pidfile: &Path, images: &Path) -> Result<usize, String> {
    let mut want: Vec<u64> = Vec::new();
    for core in core_images(images)? {
        if let Some(r) = core.thread_core.and_then(|t| t.rseq_entry) {
            if r.rseq_abi_pointer != 0 {
                want.push(r.rseq_abi_pointer);
            }
        }
    }
    let text = wait_for_file(pidfile, Duration::from_secs(10))?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(tracee::Pid::from_raw)
        .ok_or_else(|| format!("bad pidfile {text:?}"))?;
    let mut have: Vec<u64> = Vec::new();
    for tid in tracee::proc::task::list_tids(pid).map_err(|e| e.to_string())? {
        let t = tracee::Tracee::seize_and_interrupt(pid, tid, tracee::SeizeOptions::empty())
            .map_err(|e| format!("seize restored thread {tid}: {e}"))?;
        let config = t.rseq_config();
        t.detach()
            .map_err(|e| format!("detach restored thread {tid}: {e}"))?;
        match config.map_err(|e| format!("rseq of restored thread {tid}: {e}"))? {
            Some(c) => have.push(c.addr.0),
            None => return Err(format!("restored thread {tid} has no rseq area registered")),
        }
    }
    want.sort_unstable();
    have.sort_unstable();
    if have != want {
        return Err(format!(
            "restored rseq areas {have:x?}, the images name {want:x?}"
        ));
    }
    Ok(want.len())
}

fn abort() -> Result<(), String> {
    let mut s = prepare(0)?;
    let (r, mut link, _) = switch_opened(&mut s, false)?;
    let why = "the source keeps its process".to_string();
    switch::write_message(&mut link, &SwitchMessage::Abort { why: why.clone() }, false)
        .map_err(|e| format!("send ABORT: {e}"))?;
    let status = wait_child(
        &mut s.started.children[r],
        Duration::from_secs(30),
        "ckpt-restore",
    )?;
    let log = stderr_of(&mut s.started.children[r]);
    if status.success() || !log.contains(&why) {
        return Err(format!("ckpt-restore after ABORT: {status}:\n{log}"));
    }
    only_the_source_left(s.pid, "ABORT")?;
    let source = Pid::from_raw(s.pid);
    if kill(source, None).is_err() {
        return Err("the source died".into());
    }
    let before = count_of(s.pid, s.addr)?;
    std::thread::sleep(Duration::from_millis(50));
    let after = count_of(s.pid, s.addr)?;
    if after <= before {
        return Err(format!("the source stopped counting ({before} -> {after})"));
    }
    Ok(())
}

/// A delta whose images cross as differences from prepared images other than the ones the
/// restore holds: it must not build wrong images from them, but say FAILED (the source runs
/// on) and drop the held tree.
fn wrong_base() -> Result<(), String> {
    let mut s = prepare(0)?;
    let (r, mut link, _) = switch_opened(&mut s, false)?;
    let mut prepared = prepared_images(&s.dir.join("images1"))?;
    let name = "pages-1.img".to_string();
    let pages = prepared
        .get_mut(&name)
        .ok_or_else(|| format!("no {name} in the prepared images"))?;
    let mut now = pages.clone();
    let last = now.len() - 1;
    now[last] ^= 0xFF;
    // The source's copy differs from the restore's in one byte, far from the change.
    pages[0] ^= 1;
    let msg = SwitchMessage::Delta {
        images: vec![NamedImage { name, bytes: now }],
        hot: Vec::new(),
    };
    switch::write_message_based(&mut link, &msg, false, |n| {
        prepared.get(n).map(Vec::as_slice)
    })
    .map_err(|e| format!("send DELTA: {e}"))?;
    let answer = switch::read_message(&mut link);
    let status = wait_child(
        &mut s.started.children[r],
        Duration::from_secs(30),
        "ckpt-restore",
    )?;
    let log = stderr_of(&mut s.started.children[r]);
    match answer {
        Ok(SwitchMessage::Failed { why }) if why.contains("prepared image other than") => {}
        other => {
            return Err(format!(
                "expected FAILED for the base, got {other:?}:\n{log}"
            ))
        }
    }
    if status.success() {
        return Err(format!("ckpt-restore succeeded on a wrong base:\n{log}"));
    }
    only_the_source_left(s.pid, "FAILED")?;
    Ok(())
}

/// Checks that nothing of a dropped held tree is left: what ckpt-restore left alive would
/// have come to us, its subreaper, so only the source `pid` may be our child.
fn only_the_source_left(pid: i32, after: &str) -> Result<(), String> {
    let ours = our_children();
    if ours != vec![pid] {
        return Err(format!(
            "our children after {after}: {ours:?}, want only the source {pid}"
        ));
    }
    Ok(())
}

/// Our children (every thread's), from /proc.
fn our_children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse::<i32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out
}
