//! Pre-copy and post-copy from the dump side, end to end: a process that keeps rewriting its
//! memory (and, in one test, unmapping and mapping memory) is pre-dumped with `--track-mem`,
//! final-dumped, killed and restored, and then checks every page itself; the same through
//! `ckpt-page-server`; tracking leaves nothing behind; a page server that is unreachable or
//! dies mid-stream costs the process nothing; a lazy dump serves exactly the process's memory
//! and is killed once every page is taken, or resumes if the link breaks before that.
//!
//! Where a test bounds how many pages a round leaves to its parent or serves lazily, the
//! writer is `gated`: it writes a known set of pages between two dumps, on command, and
//! nothing while they run, so that the bound holds however loaded the machine is.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use images_format::pb::StatsEntry;
use images_format::{ImageDir, ImageKind, PagesReader, PAGE_SIZE};

mod common;
use common::{assert_ok, proc_state, send, start_c_workload, tools, DUMP};

const WRITER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/writer.c");

/// The writer workload; killed and reaped when dropped.
struct Writer {
    child: Child,
    dir: tempfile::TempDir,
    reaped: bool,
}

impl Writer {
    /// `mib` MiB rewritten at `per_tick` pages every `tick_us` µs; `churn` also remaps.
    fn start(mib: u32, per_tick: u32, tick_us: u32, churn: bool) -> Writer {
        Writer::start_with(mib, per_tick, tick_us, if churn { &["churn"] } else { &[] })
    }

    fn start_with(mib: u32, per_tick: u32, tick_us: u32, extra: &[&str]) -> Writer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = vec![mib.to_string(), per_tick.to_string(), tick_us.to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = start_c_workload(dir.path(), WRITER_SRC, "writer", &["-O2"], &args);
        let w = Writer {
            child,
            dir,
            reaped: false,
        };
        w.wait_file("ready", Duration::from_secs(30));
        w
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_file(&self, name: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(text) = fs::read_to_string(self.path(name)) {
                if !text.is_empty() {
                    return text;
                }
            }
            assert!(start.elapsed() < timeout, "the writer never wrote {name}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn dump(&self, images: &Path, args: &[&str]) -> Output {
        Command::new(DUMP)
            .arg("-t")
            .arg(self.pid().to_string())
            .arg("-D")
            .arg(images)
            .args(args)
            .env_remove("CKPT_FAULT")
            .output()
            .expect("run ckpt-dump")
    }

    /// The original process, killed by a dump, is reaped so that its pid is free again.
    fn reap_killed(&mut self) {
        let status = self.child.wait().expect("wait");
        self.reaped = true;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the dump did not kill the process: {status:?}"
        );
    }

    /// Asks the running process to check itself; it exits with its verdict.
    fn verdict(&mut self) -> String {
        send(self.pid(), "USR2");
        let text = self.wait_file("result", Duration::from_secs(30));
        let _ = self.child.wait();
        self.reaped = true;
        text
    }

    fn state(&self) -> char {
        proc_state(self.pid())
    }

    /// The address of the written area, from `ready`.
    fn area(&self) -> u64 {
        let ready = self.wait_file("ready", Duration::from_secs(1));
        ready
            .split_whitespace()
            .nth(1)
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("no area address in ready: {ready:?}"))
    }

    /// The ticks done by a `gated` writer and the area pages they wrote, from `ticks`.
    fn ticks_done(&self) -> (u64, Vec<u64>) {
        // Renamed into place whole by the writer: never half written.
        let text = fs::read_to_string(self.path("ticks")).unwrap_or_default();
        let mut numbers = text
            .lines()
            .map(|l| l.parse::<u64>().expect("a number in ticks"));
        let done = numbers.next().unwrap_or(0);
        (done, numbers.collect())
    }

    /// Has a `gated` writer run `n` more ticks, one at a time (signals sent at once would
    /// merge), and returns the area pages written by every gated tick so far.
    fn run_ticks(&self, n: u64) -> Vec<u64> {
        let (mut done, _) = self.ticks_done();
        for _ in 0..n {
            send(self.pid(), "USR1");
            let start = Instant::now();
            loop {
                let (now, _) = self.ticks_done();
                if now > done {
                    done = now;
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the writer did not run tick {}",
                    done + 1
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.ticks_done().1
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `(pages_written, pages_skipped_parent, pages_lazy)` from `stats-dump`.
fn stats(dir: &Path) -> (u64, u64, u64) {
    let images = ImageDir::new(dir).expect("dir");
    let entry: StatsEntry = images
        .read_one(ImageKind::StatsDump, 0)
        .expect("stats-dump");
    let d = entry.dump.expect("dump stats");
    (d.pages_written, d.pages_skipped_parent, d.pages_lazy)
}

/// Whether `dir` holds a whole `stats-dump`.
fn stats_readable(dir: &Path) -> bool {
    ImageDir::new(dir)
        .ok()
        .and_then(|images| images.read_one::<StatsEntry>(ImageKind::StatsDump, 0).ok())
        .is_some_and(|entry| entry.dump.is_some())
}

/// Restores `dir` with `ckpt-restore` (which waits for the restored process), has the
/// process check every page, and returns its verdict.
fn restore_and_check(images: &Path, pid: u32, result: &Path) -> String {
    let mut restore = Command::new(&tools().restore)
        .arg("-D")
        .arg(images)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-restore");
    let start = Instant::now();
    // Restored: the process runs its own code again (not stopped, not our restore helper).
    loop {
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.ends_with("writer") && matches!(proc_state(pid), 'S' | 'R') {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.contains("TracerPid:\t0") {
                break;
            }
        }
        if let Ok(Some(status)) = restore.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("ckpt-restore ended before the process ran: {status:?}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore timed out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send(pid, "USR2");
    let out = restore.wait_with_output().expect("wait for ckpt-restore");
    let verdict = fs::read_to_string(result).unwrap_or_default();
    assert!(
        !verdict.is_empty(),
        "no verdict; ckpt-restore: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    verdict
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something listens on 127.0.0.1:`port` (without connecting to it).
fn wait_listening(port: u16) {
    let needle = format!(":{port:04X} ");
    let start = Instant::now();
    loop {
        let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if table
            .lines()
            .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing listens on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `ckpt-page-server` for one session into `dir`; reaped when it ends.
fn page_server(dir: &Path, port: u16, parent: Option<&str>) -> Child {
    fs::create_dir_all(dir).expect("mkdir");
    let mut cmd = Command::new(&tools().page_server);
    cmd.arg("-D")
        .arg(dir)
        .args(["--address", "127.0.0.1", "--port", &port.to_string()]);
    if let Some(parent) = parent {
        cmd.args(["--prev-images-dir", parent]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ckpt-page-server");
    wait_listening(port);
    child
}

fn holder_sockets(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("track-{pid}-");
    fs::read_dir("/run/ckpt")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn tracked_vmas(pid: u32) -> usize {
    fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        .count()
}

/// Three pre-dump rounds and a final dump, locally or through a page server.
///
/// `gated`: the writer writes only between rounds, a fixed number of pages, so that how much
/// each round leaves to its parent can be asserted whatever the load. Otherwise it writes on
/// its timer, also while the rounds freeze and release it, and only its own check after the
/// restore can tell (how much it wrote between rounds depends on how long the rounds took).
fn precopy_rounds(churn: bool, through_server: bool, gated: bool) {
    let mut extra = Vec::new();
    if churn {
        extra.push("churn");
    }
    if gated {
        extra.push("gated");
    }
    let mut w = Writer::start_with(32, 10, if gated { 0 } else { 10_000 }, &extra);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let mut previous: Option<String> = None;
    let mut parent_rounds = 0u32;
    for round in 1..=4 {
        let name = format!("{round}");
        let dir = root.path().join(&name);
        let mut args: Vec<String> = vec!["--track-mem".into()];
        if round < 4 {
            args.push("--pre-dump".into());
        }
        if let Some(prev) = &previous {
            args.push("--prev-images-dir".into());
            args.push(format!("../{prev}"));
        }
        let server = through_server.then(|| {
            let port = free_port();
            args.extend(
                ["--page-server", "--address", "127.0.0.1", "--port"]
                    .iter()
                    .map(|s| (*s).to_owned()),
            );
            args.push(port.to_string());
            let parent = previous.as_ref().map(|p| format!("../{p}"));
            page_server(&dir, port, parent.as_deref())
        });
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.dump(&dir, &argv);
        if let Some(server) = server {
            let out = server.wait_with_output().expect("page server");
            assert!(
                out.status.success(),
                "page server: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_ok(&out, &format!("round {round}"));
        let (written, parent, _) = stats(&dir);
        eprintln!("round {round}: {written} pages written, {parent} left to the parent");
        if round == 1 {
            assert_eq!(parent, 0, "the first round has no parent");
            assert!(written >= 32 * 256, "round 1 saved {written} pages");
        } else if gated && churn {
            // Unmapping a slot splits whatever VMA it had merged with: that VMA is saved
            // whole, so a round may leave little to the parent, never nothing at all.
            parent_rounds += u32::from(parent > written);
        } else if gated {
            assert!(
                parent > written,
                "round {round}: only {parent} pages left to the parent, {written} written"
            );
        }
        if round < 4 {
            assert!(
                matches!(w.state(), 'S' | 'R'),
                "a pre-dump left the process {}",
                w.state()
            );
            assert!(
                tracked_vmas(pid) > 0,
                "tracking is not armed after round {round}"
            );
            if gated {
                // 300 writes between rounds (and 8 remappings with churn).
                w.run_ticks(30);
            } else {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        previous = Some(name);
    }
    if churn && gated {
        assert!(parent_rounds > 0, "no round left most pages to the parent");
    }
    w.reap_killed();
    let final_dir = root.path().join("4");
    // The final dump released the tracking: its holder is gone.
    let start = Instant::now();
    while !holder_sockets(pid).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(holder_sockets(pid).is_empty(), "a tracking holder was left");
    let verdict = restore_and_check(&final_dir, pid, &w.path("result"));
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn precopy_rounds_restore_every_page() {
    precopy_rounds(false, false, true);
}

#[test]
fn precopy_with_mappings_coming_and_going() {
    precopy_rounds(true, false, true);
}

#[test]
fn precopy_through_the_page_server() {
    precopy_rounds(true, true, true);
}

#[test]
fn precopy_loses_no_page_written_while_rounds_freeze_and_release() {
    precopy_rounds(true, false, false);
}

#[test]
fn leave_running_without_track_mem_releases_tracking() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let out = w.dump(&root.path().join("1"), &["--pre-dump", "--track-mem"]);
    assert_ok(&out, "pre-dump");
    assert!(tracked_vmas(pid) > 0, "tracking was not armed");
    assert!(
        !holder_sockets(pid).is_empty(),
        "no holder keeps the tracking"
    );
    let holder = holder_pid(&out);
    let out = w.dump(
        &root.path().join("2"),
        &["--leave-running", "--prev-images-dir", "../1"],
    );
    assert_ok(&out, "dump --leave-running");
    assert_eq!(tracked_vmas(pid), 0, "write protection left on the process");
    let start = Instant::now();
    while !holder_sockets(pid).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(holder_sockets(pid).is_empty(), "the holder is still there");
    while !matches!(proc_state(holder), '?' | 'Z') {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the holder process {holder} is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without --track-mem nothing is left to the parent.
    assert_eq!(stats(&root.path().join("2")).1, 0);
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn unreachable_page_server_leaves_the_process_running() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().to_string();
    for extra in [&["--pre-dump"][..], &[][..]] {
        let mut args = vec!["--page-server", "--address", "127.0.0.1", "--port", &port];
        args.extend_from_slice(extra);
        let out = w.dump(&root.path().join("d"), &args);
        assert!(!out.status.success(), "dump to nowhere succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("page server"), "unexpected error: {err}");
        assert!(matches!(w.state(), 'S' | 'R'), "process left {}", w.state());
    }
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn page_server_dying_mid_stream_fails_the_dump_and_the_process_runs() {
    let mut w = Writer::start(32, 10, 10_000, false);
    let root = tempfile::tempdir().expect("tempdir");
    for pre_dump in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // A page server that answers PARENT and OPEN2, takes 1 MiB of pages, then dies.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut frame = [0u8; 32];
            loop {
                s.read_exact(&mut frame).expect("a frame");
                match u16::from_le_bytes([frame[0], frame[1]]) {
                    // PARENT: no parent here.
                    5 => std::io::Write::write_all(&mut s, &0i32.to_le_bytes()).expect("answer"),
                    // OPEN2: opened, no parent; then the pages come.
                    4 => {
                        std::io::Write::write_all(&mut s, &[0u8]).expect("answer");
                        break;
                    }
                    other => panic!("unexpected command {other}"),
                }
            }
            let mut sink = vec![0u8; 1 << 20];
            s.read_exact(&mut sink).expect("pages");
        });
        let port = port.to_string();
        let mut args = vec!["--page-server", "--address", "127.0.0.1", "--port", &port];
        if pre_dump {
            args.push("--pre-dump");
        }
        let out = w.dump(&root.path().join(format!("d{pre_dump}")), &args);
        server.join().expect("server thread");
        assert!(
            !out.status.success(),
            "the dump did not notice the lost server"
        );
        assert!(matches!(w.state(), 'S' | 'R'), "process left {}", w.state());
    }
    assert_eq!(w.verdict().trim(), "PASS");
}

/// Starts `ckpt-dump --lazy-pages` and waits for its images; returns the dump and the lazy
/// ranges of the pagemap.
fn start_lazy(w: &Writer, dir: &Path, port: u16) -> (Child, Vec<ckpt_lazy_pages::LazyRange>) {
    start_lazy_with(w, dir, port, &[])
}

fn start_lazy_with(
    w: &Writer,
    dir: &Path,
    port: u16,
    extra: &[&str],
) -> (Child, Vec<ckpt_lazy_pages::LazyRange>) {
    start_lazy_window(w, dir, port, 2, extra)
}

/// `window`: the reconnection window in seconds, short where a test waits for it to close.
fn start_lazy_window(
    w: &Writer,
    dir: &Path,
    port: u16,
    window: u32,
    extra: &[&str],
) -> (Child, Vec<ckpt_lazy_pages::LazyRange>) {
    let child = Command::new(DUMP)
        .arg("-t")
        .arg(w.pid().to_string())
        .arg("-D")
        .arg(dir)
        .args(["--lazy-pages", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--lazy-connect-timeout", "30", "--lazy-reconnect-window"])
        .arg(window.to_string())
        .args(extra)
        .env_remove("CKPT_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-dump --lazy-pages");
    // stats-dump is written last, after every other image; it may exist before it is whole.
    let start = Instant::now();
    while !stats_readable(dir) {
        assert!(start.elapsed() < Duration::from_secs(60), "no lazy images");
        std::thread::sleep(Duration::from_millis(20));
    }
    let images = ImageDir::new(dir).expect("dir");
    let reader = PagesReader::open(&images, ImageKind::Pagemap, u64::from(w.pid())).expect("pm");
    (child, ckpt_lazy_pages::source::lazy_ranges(&reader))
}

/// Fetches every lazy page as the lazy-pages daemon does, comparing each with the frozen
/// process's memory, then closes the session.
fn take_every_lazy_page(pid: u32, port: u16, ranges: &[ckpt_lazy_pages::LazyRange]) {
    wait_listening(port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut remote = ckpt_lazy_pages::RemotePages::connect(addr).expect("connect");
    remote.resumed();
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut buf = vec![0u8; 64 * PAGE_SIZE as usize];
    let mut expected = vec![0u8; buf.len()];
    for range in ranges {
        let mut at = range.vaddr;
        while at < range.vaddr + range.len {
            let want = ((range.vaddr + range.len - at) as usize).min(buf.len());
            // Read the frozen process's memory before the last request kills it.
            std::os::unix::fs::FileExt::read_exact_at(&mem, &mut expected[..want], at)
                .expect("read /proc/PID/mem");
            let got = remote
                .get(i32::try_from(pid).expect("pid"), at, &mut buf[..want])
                .expect("GET");
            assert!(got > 0 && got <= want);
            assert!(
                buf[..got] == expected[..got],
                "page at {at:#x} differs from the process's memory"
            );
            at += got as u64;
        }
    }
    remote.close().expect("CLOSE");
}

#[test]
fn lazy_dump_serves_exactly_the_memory_and_dies_when_all_is_taken() {
    let mut w = Writer::start(16, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("lazy");
    let port = free_port();
    let (dump, ranges) = start_lazy(&w, &dir, port);
    let lazy_pages: u64 = ranges.iter().map(|r| r.len / PAGE_SIZE).sum();
    assert!(lazy_pages >= 16 * 256, "only {lazy_pages} lazy pages");
    assert_eq!(
        stats(&dir).2,
        lazy_pages,
        "stats-dump counts the lazy pages"
    );
    take_every_lazy_page(pid, port, &ranges);
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(
        out.status.success(),
        "lazy dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.reap_killed();
}

#[test]
fn lazy_dump_resumes_the_source_when_the_link_breaks_before_resume() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("lazy");
    let port = free_port();
    let (dump, _) = start_lazy(&w, &dir, port);
    wait_listening(port);
    // The daemon connects and goes away before asking for anything.
    drop(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(!out.status.success(), "the lazy dump claims success");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resumed"), "unexpected error: {err}");
    assert!(matches!(w.state(), 'S' | 'R'), "source left {}", w.state());
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn lazy_source_is_killed_when_the_link_is_lost_after_resume() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("lazy");
    let port = free_port();
    let (dump, ranges) = start_lazy(&w, &dir, port);
    wait_listening(port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut remote = ckpt_lazy_pages::RemotePages::connect(addr).expect("connect");
    // Restore's end marker, passed on by the daemon: the destination runs from here.
    remote.resumed();
    let first = ranges.first().expect("a lazy range");
    let mut page = vec![0u8; PAGE_SIZE as usize];
    remote
        .get(i32::try_from(pid).expect("pid"), first.vaddr, &mut page)
        .expect("GET");
    // The destination runs now; the link goes and does not come back.
    drop(remote);
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.reap_killed();
}

#[test]
fn assisted_postcopy_serves_only_pages_written_since_the_pre_dump() {
    // Gated: the writer writes only when told, so what it wrote since the pre-dump is known
    // exactly, whatever the load (on a timer it wrote as many pages as the dumps took time).
    let mut w = Writer::start_with(16, 10, 0, &["nozap", "gated"]);
    let pid = w.pid();
    let area = w.area();
    let root = tempfile::tempdir().expect("tempdir");
    let out = w.dump(&root.path().join("1"), &["--pre-dump", "--track-mem"]);
    assert_ok(&out, "pre-dump");
    let mut written_pages: Vec<u64> = w
        .run_ticks(20)
        .iter()
        .map(|i| area + i * PAGE_SIZE)
        .collect();
    written_pages.sort_unstable();
    written_pages.dedup();
    let dir = root.path().join("2");
    let port = free_port();
    let (dump, ranges) = start_lazy_with(
        &w,
        &dir,
        port,
        &["--track-mem", "--prev-images-dir", "../1", "-o", "dump.log"],
    );
    let (written, parent, lazy) = stats(&dir);
    let lazy_in_pagemap: u64 = ranges.iter().map(|r| r.len / PAGE_SIZE).sum();
    eprintln!(
        "assisted post-copy: {written} written, {parent} from the parent, {lazy} lazy, \
         {} area pages written since the pre-dump",
        written_pages.len()
    );
    assert_eq!(lazy, lazy_in_pagemap);
    let missed: Vec<u64> = written_pages
        .iter()
        .copied()
        .filter(|&page| {
            !ranges
                .iter()
                .any(|r| r.vaddr <= page && page < r.vaddr + r.len)
        })
        .collect();
    assert!(
        missed.is_empty(),
        "pages written since the pre-dump are not served lazily: {missed:#x?}"
    );
    // Besides the area, the writer touches a few pages of its own (its page journal, stack,
    // stdio buffers); none of the rest of the 16 MiB may come from the source.
    let others = lazy.saturating_sub(written_pages.len() as u64);
    assert!(
        others <= 32,
        "{others} lazy pages besides the {} written ones",
        written_pages.len()
    );
    assert!(
        parent > 10 * lazy,
        "{parent} pages from the parent, {lazy} lazy: {}",
        fs::read_to_string(dir.join("dump.log")).unwrap_or_default()
    );
    take_every_lazy_page(pid, port, &ranges);
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(
        out.status.success(),
        "lazy dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.reap_killed();
    let start = Instant::now();
    while !holder_sockets(pid).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(holder_sockets(pid).is_empty(), "a tracking holder was left");
}

/// Every process running `exe` but `except`.
fn processes_running(exe: &Path, except: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&pid| pid != except)
                .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postcopy_end_to_end_through_the_lazy_pages_daemon() {
    // The restore runs in a PID namespace of its own: the source keeps its pid until every
    // page has moved, so the copy needs the same pid elsewhere.
    let mut w = Writer::start_with(16, 10, 10_000, &["nozap"]);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("lazy");
    let port = free_port();
    let (dump, ranges) = start_lazy(&w, &dir, port);
    assert!(!ranges.is_empty());
    wait_listening(port);
    let daemon = Command::new(&tools().lazy_pages)
        .arg("-D")
        .arg(&dir)
        .args(["--page-server", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ckpt-lazy-pages");
    let start = Instant::now();
    while !dir.join("lazy-pages.socket").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no lazy-pages socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let restore = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(&tools().restore)
        .arg("-D")
        .arg(&dir)
        .arg("--lazy-pages")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run unshare + ckpt-restore --lazy-pages");
    let exe = w.path("writer");
    let start = Instant::now();
    let copy = loop {
        let found: Vec<u32> = processes_running(&exe, pid)
            .into_iter()
            .filter(|p| matches!(proc_state(*p), 'S' | 'R'))
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/status"))
                    .is_ok_and(|s| s.contains("TracerPid:\t0"))
            })
            .collect();
        if let Some(&p) = found.first() {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the copy never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    send(copy, "USR2");
    let verdict = w.wait_file("result", Duration::from_secs(60));
    assert_eq!(verdict.trim(), "PASS", "the restored copy: {verdict}");
    let restored = restore.wait_with_output().expect("wait restore");
    assert!(
        restored.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let daemon = daemon.wait_with_output().expect("wait daemon");
    assert!(
        daemon.status.success(),
        "lazy-pages: {}",
        String::from_utf8_lossy(&daemon.stderr)
    );
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(
        out.status.success(),
        "lazy dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The source was killed once the destination had every page.
    w.reap_killed();
}

/// The pid of the tracking holder, from the dump's log line that hands the tracking over.
fn holder_pid(out: &Output) -> u32 {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find(|l| l.contains("dirty tracking kept"))
        .and_then(|l| l.split("pid(").last())
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no holder pid in the log: {err}"))
}

#[test]
fn a_failed_final_dump_releases_tracking_and_the_process_runs() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let out = w.dump(&root.path().join("1"), &["--pre-dump", "--track-mem"]);
    assert_ok(&out, "pre-dump");
    assert!(tracked_vmas(pid) > 0);
    let out = Command::new(DUMP)
        .arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(root.path().join("2"))
        .args(["--track-mem", "--prev-images-dir", "../1"])
        .env("CKPT_FAULT", "before-inventory")
        .output()
        .expect("run ckpt-dump");
    assert!(
        !out.status.success(),
        "the injected fault did not fail the dump"
    );
    assert!(matches!(w.state(), 'S' | 'R'), "process left {}", w.state());
    assert_eq!(
        tracked_vmas(pid),
        0,
        "write protection left after a failed dump"
    );
    let start = Instant::now();
    while !holder_sockets(pid).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        holder_sockets(pid).is_empty(),
        "the holder outlived the failure"
    );
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn lost_tracking_means_a_full_dump_with_a_warning() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let root = tempfile::tempdir().expect("tempdir");
    let out = w.dump(&root.path().join("1"), &["--pre-dump", "--track-mem"]);
    assert_ok(&out, "pre-dump");
    // The holder dies between rounds: nothing proves any page clean any more.
    let holder = holder_pid(&out);
    send(holder, "KILL");
    let start = Instant::now();
    while proc_state(holder) != '?' && proc_state(holder) != 'Z' {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "holder survives SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = w.dump(
        &root.path().join("2"),
        &["--pre-dump", "--track-mem", "--prev-images-dir", "../1"],
    );
    assert_ok(&out, "pre-dump after the holder died");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lost"),
        "no warning about lost tracking: {err}"
    );
    let (written, parent, _) = stats(&root.path().join("2"));
    assert_eq!(parent, 0, "pages left to the parent without proof");
    assert!(written >= 8 * 256);
    // A last dump without --track-mem leaves it running and untracked.
    let out = w.dump(
        &root.path().join("3"),
        &["--leave-running", "--prev-images-dir", "../2"],
    );
    assert_ok(&out, "final dump");
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn tracking_ends_when_the_process_exits() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let out = w.dump(&root.path().join("1"), &["--pre-dump", "--track-mem"]);
    assert_ok(&out, "pre-dump");
    let holder = holder_pid(&out);
    assert_eq!(w.verdict().trim(), "PASS");
    let start = Instant::now();
    while !matches!(proc_state(holder), '?' | 'Z') || !holder_sockets(pid).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the holder outlived its process"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lazy_daemon_may_reconnect_within_the_window() {
    let mut w = Writer::start(8, 10, 10_000, false);
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("lazy");
    let port = free_port();
    // A window far longer than the pause below: the reconnection must land in it however
    // slowly this test runs.
    let (dump, ranges) = start_lazy_window(&w, &dir, port, 30, &[]);
    wait_listening(port);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut remote = ckpt_lazy_pages::RemotePages::connect(addr).expect("connect");
    // Restore's end marker, passed on by the daemon: the destination runs from here.
    remote.resumed();
    let first = ranges.first().expect("a lazy range");
    let mut page = vec![0u8; PAGE_SIZE as usize];
    remote
        .get(i32::try_from(pid).expect("pid"), first.vaddr, &mut page)
        .expect("GET");
    drop(remote);
    // The source stays stopped while the link is down: it never runs again.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.state(), 't', "the source runs while the link is down");
    take_every_lazy_page(pid, port, &ranges);
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.reap_killed();
}
