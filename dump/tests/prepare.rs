//! Prepared post-copy from the source side, end to end: `ckpt-dump --lazy-pages --prepare`
//! drives a real process through the first round (images while it runs on) and the
//! switch, with a hand-written switch client standing in for `ckpt-restore --prepared`
//! and, where pages are served, `ckpt-lazy-pages`' client for the daemon. Checked: the
//! delta carries the thread's core and hot pages equal to the frozen memory, the source
//! stays frozen from the delta until the destination says it runs and dies after the
//! daemon closes; with no READY, or a FAILED after the delta, the process runs on as it was.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use images_format::pb::StatsEntry;
use images_format::switch::{self, SwitchMessage};
use images_format::{ImageDir, ImageKind, PagesReader, PAGE_SIZE};

mod common;
use common::{proc_state, send, start_c_workload, DUMP};

/// Spins, bumping a counter, with its lazy area's address held in r12 (a hot page to
/// send); writes `ready` (the counter's and the area's addresses) once set up. On SIGUSR2
/// it checks the area and writes PASS or FAIL to `result`, and exits.
const SPINNER: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define AREA (4 << 20)
static volatile unsigned long counter;
static volatile sig_atomic_t check;
static unsigned char *area;

static void on_usr2(int sig) { (void)sig; check = 1; }

int main(void) {
    area = malloc(AREA);
    for (size_t i = 0; i < AREA; i++) area[i] = (unsigned char)(i * 7 + i / 4096);
    signal(SIGUSR2, on_usr2);
    FILE *f = fopen("ready.tmp", "w");
    fprintf(f, "%p %p\n", (void *)&counter, (void *)area);
    fclose(f);
    rename("ready.tmp", "ready");
    register unsigned char *p asm("r12") = area;
    while (!check) {
        counter++;
        __asm__ volatile("" : : "r"(p));
    }
    const char *verdict = "PASS\n";
    for (size_t i = 0; i < AREA; i++)
        if (area[i] != (unsigned char)(i * 7 + i / 4096)) { verdict = "FAIL: area\n"; break; }
    f = fopen("result.tmp", "w");
    fputs(verdict, f);
    fclose(f);
    rename("result.tmp", "result");
    return 0;
}
"#;

/// The spinner; killed and reaped when dropped.
struct Spinner {
    child: Child,
    dir: tempfile::TempDir,
    reaped: bool,
    counter: u64,
}

impl Spinner {
    fn start() -> Spinner {
        Spinner::start_source(SPINNER)
    }

    /// The spinner, also calling `umask` (a syscall the light S2 does not allow) now and
    /// then.
    fn start_umasking() -> Spinner {
        let source = SPINNER
            .replace(
                "#include <unistd.h>",
                "#include <unistd.h>\n#include <sys/stat.h>",
            )
            .replace(
                "counter++;",
                "counter++;\n        if ((counter & 0xfffff) == 0) umask(022);",
            );
        assert!(source.contains("umask(022)"));
        Spinner::start_source(&source)
    }

    fn start_source(source: &str) -> Spinner {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("spinner.c");
        fs::write(&src, source).expect("write the workload");
        let child = start_c_workload(
            dir.path(),
            src.to_str().expect("utf-8 path"),
            "spinner",
            &["-O2"],
            &[],
        );
        let ready = wait_file(&dir.path().join("ready"), Duration::from_secs(30));
        let counter = ready
            .split_whitespace()
            .next()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("no counter address in {ready:?}"));
        Spinner {
            child,
            dir,
            reaped: false,
            counter,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn counter(&self) -> u64 {
        let mem = fs::File::open(format!("/proc/{}/mem", self.pid())).expect("mem");
        let mut word = [0u8; 8];
        mem.read_exact_at(&mut word, self.counter)
            .expect("read the counter");
        u64::from_le_bytes(word)
    }

    /// Whether the counter moves within a while.
    fn runs(&self) -> bool {
        let before = self.counter();
        std::thread::sleep(Duration::from_millis(100));
        self.counter() != before
    }

    fn verdict(&mut self) -> String {
        send(self.pid(), "USR2");
        let text = wait_file(&self.dir.path().join("result"), Duration::from_secs(30));
        let _ = self.child.wait();
        self.reaped = true;
        text
    }

    fn reap_killed(&mut self) {
        let status = self.child.wait().expect("wait");
        self.reaped = true;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the dump did not kill the process: {status:?}"
        );
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_file(path: &Path, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(path) {
            if !text.is_empty() {
                return text;
            }
        }
        assert!(start.elapsed() < timeout, "{} never came", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `ckpt-dump --lazy-pages --prepare` and waits for its prepared images.
fn start_prepared(w: &Spinner, dir: &Path, port: u16, connect_timeout: u32) -> Child {
    start_prepared_faulty(w, dir, port, connect_timeout, None)
}

/// [`start_prepared`] with `CKPT_FAULT=fault` (which strikes the final round).
fn start_prepared_faulty(
    w: &Spinner,
    dir: &Path,
    port: u16,
    connect_timeout: u32,
    fault: Option<&str>,
) -> Child {
    let mut cmd = Command::new(DUMP);
    cmd.env_remove("CKPT_FAULT");
    if let Some(fault) = fault {
        cmd.env("CKPT_FAULT", fault);
    }
    let mut child = cmd
        .arg("-t")
        .arg(w.pid().to_string())
        .arg("-D")
        .arg(dir)
        .args([
            "--lazy-pages",
            "--prepare",
            "--address",
            "127.0.0.1",
            "--port",
        ])
        .arg(port.to_string())
        .arg("--lazy-connect-timeout")
        .arg(connect_timeout.to_string())
        .args(["--lazy-reconnect-window", "2", "-o", "dump.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-dump --prepare");
    let start = Instant::now();
    // stats-dump comes last, once the tree runs again.
    while !stats_written(dir) {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("ckpt-dump ended before its images were written: {status:?}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no prepared images"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn stats_written(dir: &Path) -> bool {
    ImageDir::new(dir)
        .ok()
        .and_then(|d| d.read_one::<StatsEntry>(ImageKind::StatsDump, 0).ok())
        .is_some_and(|e| e.dump.is_some())
}

/// Connects as the prepared restore does: magic, then READY.
/// The prepared images in `dir`, which a delta's images may be compressed against.
fn prepared_images(dir: &Path) -> std::collections::HashMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("the prepared images")
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| Some((e.file_name().into_string().ok()?, fs::read(e.path()).ok()?)))
        .collect()
}

/// Reads the delta as a destination holding `prepared` does.
fn read_delta(
    conn: &mut TcpStream,
    prepared: &std::collections::HashMap<String, Vec<u8>>,
) -> SwitchMessage {
    switch::read_message_based(conn, |name| prepared.get(name).map(Vec::as_slice))
        .expect("the delta")
}

fn switch_ready(port: u16, hot_pages: bool) -> TcpStream {
    let mut stream = TcpStream::connect(addr(port)).expect("connect the switch");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    switch::write_magic(&mut stream).expect("magic");
    switch::write_message(&mut stream, &SwitchMessage::Ready { hot_pages }, false).expect("READY");
    stream
}

fn wait_exit(dump: Child) -> (bool, String) {
    let out = dump.wait_with_output().expect("wait ckpt-dump");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn log_of(dir: &Path) -> String {
    fs::read_to_string(dir.join("dump.log")).unwrap_or_default()
}

#[test]
fn the_delta_arrives_and_the_source_waits_for_resumed_then_the_daemon() {
    let mut w = Spinner::start();
    let pid = w.pid();
    let root = tempfile::tempdir().expect("tempdir");
    let dir: PathBuf = root.path().join("img");
    let port = free_port();
    let dump = start_prepared(&w, &dir, port, 30);
    assert!(w.runs(), "the process does not run after the first round");
    let prepared_core = fs::read(dir.join(format!("core-{pid}.img"))).expect("S1 core");
    // The daemon connects first and says nothing yet: it must be kept for later.
    let daemon = TcpStream::connect(addr(port)).expect("connect the daemon");
    let prepared = prepared_images(&dir);
    let mut switch_conn = switch_ready(port, true);
    let (images, hot) = match read_delta(&mut switch_conn, &prepared) {
        SwitchMessage::Delta { images, hot } => (images, hot),
        other => panic!("expected DELTA, got {other:?}"),
    };
    let core_name = format!("core-{pid}.img");
    let core = images
        .iter()
        .find(|i| i.name == core_name)
        .unwrap_or_else(|| panic!("no {core_name} in {:?}", names(&images)));
    assert!(
        core.bytes != prepared_core,
        "a spinning thread's registers did not move"
    );
    // The source's directory gets the final images, soon after the delta is sent.
    let start = Instant::now();
    while fs::read(dir.join(&core_name)).expect("final core") != core.bytes {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "-D keeps the prepared core"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Frozen from the delta on, and it stays so while the destination has not run.
    assert_eq!(proc_state(pid), 't', "the source is not held after DELTA");
    let frozen_at = w.counter();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.counter(), frozen_at, "the source ran after DELTA");
    // Hot pages: the lazy area's first page (r12 points there), as the frozen memory has it.
    let images_dir = ImageDir::new(&dir).expect("dir");
    let lazy = ckpt_lazy_pages::source::lazy_ranges(
        &PagesReader::open(&images_dir, ImageKind::Pagemap, u64::from(pid)).expect("pagemap"),
    );
    assert!(!hot.is_empty(), "no hot pages");
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    for run in &hot {
        assert_eq!(run.pid, i32::try_from(pid).expect("pid"));
        let end = run.vaddr + run.data.len() as u64;
        assert!(
            lazy.iter()
                .any(|r| r.vaddr <= run.vaddr && end <= r.vaddr + r.len),
            "hot pages at {:#x} are not lazy",
            run.vaddr
        );
        let mut expected = vec![0u8; run.data.len()];
        mem.read_exact_at(&mut expected, run.vaddr).expect("read");
        assert!(expected == run.data, "hot pages at {:#x} differ", run.vaddr);
    }
    switch::write_message(&mut switch_conn, &SwitchMessage::Resumed, false).expect("RESUMED");
    // The daemon, connected before READY, is served now.
    let mut remote = ckpt_lazy_pages::RemotePages::from_stream(daemon).expect("daemon");
    remote.resumed();
    let first = lazy.first().expect("a lazy range");
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut expected = vec![0u8; PAGE_SIZE as usize];
    mem.read_exact_at(&mut expected, first.vaddr).expect("read");
    let got = remote
        .get(i32::try_from(pid).expect("pid"), first.vaddr, &mut page)
        .expect("GET");
    assert_eq!(got, page.len());
    assert!(page == expected, "the served page differs from the memory");
    remote.close().expect("CLOSE");
    let (ok, err) = wait_exit(dump);
    assert!(ok, "prepared dump: {err}\n{}", log_of(&dir));
    let log = log_of(&dir);
    assert!(log.contains("prepared images written"), "{log}");
    assert!(log.contains("delta sent"), "{log}");
    // A spinning thread makes no syscall at all: S2 reads it lightly, where the kernel
    // can watch syscalls.
    if syscalls_watchable() {
        assert!(log.contains("light=true"), "{log}");
    }
    w.reap_killed();
}

/// Whether the kernel shows the syscall tracepoint the light S2 watches: as root, it does
/// here whether or not tracefs is mounted.
fn syscalls_watchable() -> bool {
    tracee::syscall_watch::tracepoint_id().is_ok()
}

fn names(images: &[switch::NamedImage]) -> Vec<&str> {
    images.iter().map(|i| i.name.as_str()).collect()
}

#[test]
fn a_syscall_outside_the_allowlist_makes_s2_collect_in_full() {
    let mut w = Spinner::start_umasking();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("img");
    let port = free_port();
    let dump = start_prepared(&w, &dir, port, 30);
    assert!(w.runs(), "the process does not run after the first round");
    let prepared = prepared_images(&dir);
    let mut switch_conn = switch_ready(port, false);
    match read_delta(&mut switch_conn, &prepared) {
        SwitchMessage::Delta { images, .. } => {
            assert!(!images.is_empty(), "an empty delta from a running process");
        }
        other => panic!("expected DELTA, got {other:?}"),
    }
    let why = "the test stops here".to_owned();
    switch::write_message(&mut switch_conn, &SwitchMessage::Failed { why }, false).expect("FAILED");
    let (ok, err) = wait_exit(dump);
    assert!(!ok, "the dump claims success after FAILED: {err}");
    let log = log_of(&dir);
    assert!(log.contains("light=false"), "{log}");
    if syscalls_watchable() {
        // Seen at S2's freeze, or already between S1's two freezes.
        assert!(
            log.contains("S2 collects in full") || log.contains("S2 will collect in full"),
            "{log}"
        );
        assert!(log.contains("outside the allowlist"), "{log}");
    }
    assert!(w.runs(), "the process does not run on");
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn without_ready_the_process_runs_on_untouched() {
    let mut w = Spinner::start();
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("img");
    let port = free_port();
    let dump = start_prepared(&w, &dir, port, 1);
    // A restore that connects and never gets ready.
    let mut silent = TcpStream::connect(addr(port)).expect("connect");
    switch::write_magic(&mut silent).expect("magic");
    let (ok, err) = wait_exit(dump);
    assert!(!ok, "the dump claims success without READY");
    assert!(err.contains("READY"), "unexpected error: {err}");
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    match switch::read_message(&mut silent) {
        Ok(SwitchMessage::Abort { why }) => assert!(why.contains("READY"), "{why}"),
        other => panic!("expected ABORT, got {other:?}"),
    }
    assert!(
        matches!(proc_state(w.pid()), 'R' | 'S'),
        "{}",
        proc_state(w.pid())
    );
    assert!(w.runs(), "the process does not run on");
    assert_eq!(w.verdict().trim(), "PASS");
}

#[test]
fn failed_or_gone_after_the_delta_resumes_the_source() {
    for failed in [true, false] {
        let mut w = Spinner::start();
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("img");
        let port = free_port();
        let dump = start_prepared(&w, &dir, port, 30);
        let prepared = prepared_images(&dir);
        let mut switch_conn = switch_ready(port, false);
        match read_delta(&mut switch_conn, &prepared) {
            SwitchMessage::Delta { hot, .. } => assert!(hot.is_empty(), "hot pages unasked"),
            other => panic!("expected DELTA, got {other:?}"),
        }
        assert_eq!(
            proc_state(w.pid()),
            't',
            "the source is not held after DELTA"
        );
        if failed {
            let why = "no memory at the destination".to_owned();
            switch::write_message(&mut switch_conn, &SwitchMessage::Failed { why }, false)
                .expect("FAILED");
            switch_conn.flush().expect("flush");
        } else {
            drop(switch_conn);
        }
        let (ok, err) = wait_exit(dump);
        assert!(!ok, "the dump claims success (failed: {failed})");
        assert!(err.contains("resumed"), "unexpected error: {err}");
        if failed {
            assert!(err.contains("no memory at the destination"), "{err}");
        }
        assert!(w.runs(), "the process does not run on (failed: {failed})");
        assert_eq!(w.verdict().trim(), "PASS");
    }
}

#[test]
fn a_failed_final_round_aborts_the_switch_and_the_process_runs_on() {
    for fault in ["after-freeze", "mid-pages"] {
        let mut w = Spinner::start();
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("img");
        let port = free_port();
        let dump = start_prepared_faulty(&w, &dir, port, 30, Some(fault));
        let mut switch_conn = switch_ready(port, true);
        match switch::read_message(&mut switch_conn) {
            Ok(SwitchMessage::Abort { why }) => assert!(why.contains(fault), "{fault}: {why}"),
            other => panic!("{fault}: expected ABORT, got {other:?}"),
        }
        let (ok, err) = wait_exit(dump);
        assert!(!ok, "{fault}: the dump claims success");
        assert!(err.contains(fault), "{fault}: unexpected error: {err}");
        assert!(w.runs(), "{fault}: the process does not run on");
        assert_eq!(w.verdict().trim(), "PASS", "{fault}");
    }
}

#[test]
fn prepare_is_refused_where_it_cannot_hold() {
    let w = Spinner::start();
    let root = tempfile::tempdir().expect("tempdir");
    let port = free_port().to_string();
    let refused: [&[&str]; 4] = [
        // Lazy after a round needs the tracking that says what the round lacks.
        &["--lazy-pages", "--prev-images-dir", "../x"],
        // The destination runs it: the source must not run on as well.
        &["--leave-running"],
        &["--pre-dump"],
        &["--page-server", "--address", "127.0.0.1"],
    ];
    for extra in refused {
        let out = Command::new(DUMP)
            .arg("-t")
            .arg(w.pid().to_string())
            .arg("-D")
            .arg(root.path().join("img"))
            .args(["--prepare", "--port", &port])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run ckpt-dump");
        assert!(!out.status.success(), "{extra:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--prepare") || err.contains("cannot be used with"),
            "{extra:?}: {err}"
        );
    }
    assert!(w.runs(), "a refused dump touched the process");
}
