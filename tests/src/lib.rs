//! End-to-end test harness: runs a self-checking workload, dumps it with `ckpt-dump`, restores it
//! with `ckpt-restore`, and asks the workload whether it survived intact.
//!
//! The workload protocol (see `workloads/workload.h`): `WORKLOAD --ready F --result F [args]`
//! writes `F` (ready) once its state is set up, waits for SIGUSR2, checks itself and writes
//! "PASS" or "FAIL: ..." to the result file.
//!
//! Tests of one binary run in parallel threads, so every wait here targets one exact pid, and
//! the test process is a child subreaper: a process restored with `ckpt-restore -d` becomes
//! our child when `ckpt-restore` exits, and we reap it ourselves.
#![forbid(unsafe_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long a workload may take to set up its state.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a workload may take to check itself after SIGUSR2.
pub const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The project's binaries, built next to the running test or benchmark executable.
#[derive(Debug, Clone)]
pub struct Tools {
    pub dump: PathBuf,
    pub restore: PathBuf,
    pub img: PathBuf,
}

impl Tools {
    /// Finds the binaries in the target directory this executable was built into
    /// (`target/PROFILE/deps/test-HASH` for tests, `target/PROFILE/NAME` for binaries).
    ///
    /// # Panics
    /// When a binary is missing: tests do not build the binaries they run.
    pub fn locate() -> Tools {
        let exe = std::env::current_exe().expect("the path of the running executable");
        let candidates: Vec<PathBuf> = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(Path::to_path_buf)
            .collect();
        let find = |name: &str| -> PathBuf {
            let found = candidates
                .iter()
                .map(|dir| dir.join(name))
                .find(|p| p.is_file());
            found.unwrap_or_else(|| {
                let searched: Vec<String> =
                    candidates.iter().map(|d| d.display().to_string()).collect();
                panic!(
                    "{name} not found in {}: run `cargo build --workspace` (or `cargo build \
                     --release --workspace` for release runs) before the tests, they run the \
                     built binaries",
                    searched.join(" or ")
                )
            })
        };
        Tools {
            dump: find("ckpt-dump"),
            restore: find("ckpt-restore"),
            img: find("ckpt-img"),
        }
    }
}

/// The compiled C workload called `name` (a file in `workloads/`, without `.c`).
pub fn workload_path(name: &str) -> PathBuf {
    Path::new(env!("CKPT_WORKLOADS_DIR")).join(name)
}

/// Makes this process a child subreaper, once: restored processes are re-parented to it.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

/// Where a workload process stands, so that `Drop` knows whether it must kill and reap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Running (or stopped) and our child: we must reap it.
    Ours,
    /// Reaped, or never ours to reap.
    Gone,
}

/// The result of running one of the tools.
#[derive(Debug)]
pub struct ToolRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Command line, for messages.
    pub command: String,
}

impl ToolRun {
    /// Whether the tool exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a tool to completion with captured output.
pub fn run_tool(program: &Path, args: &[String], env: &[(&str, &str)]) -> ToolRun {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let command = format!(
        "{}{} {}",
        env.iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>(),
        program.display(),
        args.join(" ")
    );
    let start = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    ToolRun {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: start.elapsed(),
        command,
    }
}

/// One workload process under test, with its scratch directory. Dropping it kills and reaps
/// the process if it is still ours.
#[derive(Debug)]
pub struct Workload {
    name: String,
    pid: Pid,
    life: Life,
    dir: tempfile::TempDir,
    ready: PathBuf,
    result: PathBuf,
    tools: Tools,
    /// Image directories written so far, numbered.
    dumps: usize,
    /// Successful restores so far: 0 while the original process runs.
    restores: usize,
    /// `-vN` passed to the tools: 4 (trace) for tests, lower for timing.
    log_level: u8,
}

impl Workload {
    /// Starts the C workload `name` with extra `args` and waits until it is ready.
    pub fn start(name: &str, args: &[&str]) -> Workload {
        Workload::start_program(name, &workload_path(name), &[], args)
    }

    /// Starts any program speaking the workload protocol:
    /// `program PREFIX.. --ready F --result F ARGS..`.
    pub fn start_program(name: &str, program: &Path, prefix: &[&str], args: &[&str]) -> Workload {
        Workload::start_with_stdio(name, program, prefix, args, None)
    }

    /// `start_program` with stdin and stdout on `terminal` (a terminal's slave side) instead of
    /// /dev/null and a log file.
    pub fn start_with_stdio(
        name: &str,
        program: &Path,
        prefix: &[&str],
        args: &[&str],
        terminal: Option<std::os::fd::OwnedFd>,
    ) -> Workload {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests need root: ptrace of any process, clone3 with set_tid, \
             /proc/PID/mem"
        );
        become_subreaper();
        let tools = Tools::locate();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-{name}-"))
            .tempdir()
            .expect("create a temp dir");
        // World-writable so that a workload that drops its privileges can still report.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))
            .expect("chmod the temp dir");
        let ready = dir.path().join("ready");
        let result = dir.path().join("result");
        let stderr = fs::File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        let (stdin, stdout) = match terminal {
            Some(fd) => {
                let again = fd.try_clone().expect("dup the terminal");
                (Stdio::from(fd), Stdio::from(again))
            }
            None => {
                let log =
                    fs::File::create(dir.path().join("stdout.log")).expect("create stdout.log");
                (Stdio::null(), Stdio::from(log))
            }
        };
        // Reaped by pid (`try_reap`), never through `Child`: a restored incarnation has the
        // same pid but no `Child`.
        #[allow(clippy::zombie_processes)]
        let child = Command::new(program)
            .args(prefix)
            .arg("--ready")
            .arg(&ready)
            .arg("--result")
            .arg(&result)
            .args(args)
            .current_dir(dir.path())
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start workload {}: {e}", program.display()));
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
        // `child` is dropped without waiting: we reap by pid ourselves.
        let mut w = Workload {
            name: name.to_owned(),
            pid,
            life: Life::Ours,
            dir,
            ready,
            result,
            tools,
            dumps: 0,
            restores: 0,
            log_level: 4,
        };
        w.wait_ready(READY_TIMEOUT);
        w
    }

    /// Sets the tools' log level (`-vN`); tracing every injected syscall costs time.
    pub fn set_log_level(&mut self, level: u8) {
        self.log_level = level;
    }

    /// The workload's pid: the same before the dump and after every restore.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The scratch directory: ready and result files, logs, image directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The binaries this workload is dumped and restored with.
    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// The verdict, once the workload has written one.
    pub fn result_text(&self) -> Option<String> {
        fs::read_to_string(&self.result)
            .ok()
            .map(|t| t.trim_end().to_owned())
    }

    /// Text of the ready file (some workloads report addresses there).
    pub fn ready_text(&self) -> String {
        fs::read_to_string(&self.ready).unwrap_or_default()
    }

    /// The number `N` of the word `KEY=N` of the ready file (a pid, an id), which must be there.
    pub fn ready_field(&self, key: &str) -> i32 {
        let text = self.ready_text();
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in the ready file: {text:?}"))
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while !self.ready.exists() {
            if let Some(status) = self.try_reap() {
                panic!(
                    "workload {} exited before it was ready ({status:?}){}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "workload {} not ready after {timeout:?}{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reaps the process if it has exited; `None` while it runs.
    fn try_reap(&mut self) -> Option<WaitStatus> {
        if self.life != Life::Ours {
            return None;
        }
        match waitpid(self.pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) => None,
            Ok(WaitStatus::Stopped(..)) | Ok(WaitStatus::Continued(_)) => None,
            Ok(status) => {
                self.life = Life::Gone;
                Some(status)
            }
            Err(Errno::ECHILD) => {
                self.life = Life::Gone;
                Some(WaitStatus::StillAlive)
            }
            Err(e) => panic!("waitpid({}): {e}", self.pid),
        }
    }

    /// Waits up to `timeout` for the process to end and reaps it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<WaitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_reap() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, then reap that exact pid.
    pub fn kill_and_reap(&mut self) {
        if self.life != Life::Ours {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(30));
    }

    /// Waits until one of the process's threads is blocked in system call `nr` (as
    /// /proc/PID/task/TID/syscall shows), so that a dump surely catches it there.
    pub fn wait_blocked_in(&self, nr: u64) {
        let start = Instant::now();
        loop {
            let blocked = fs::read_dir(format!("/proc/{}/task", self.pid))
                .into_iter()
                .flatten()
                .flatten()
                .any(|task| {
                    fs::read_to_string(task.path().join("syscall")).is_ok_and(|text| {
                        text.split_whitespace().next() == Some(nr.to_string().as_str())
                    })
                });
            if blocked {
                return;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "{} never blocked in system call {nr}{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// True while /proc shows the process and it is neither a zombie nor gone.
    /// Waits up to 10 s until the process is in `state` (as /proc shows it), else fails
    /// saying that it does not `what`.
    pub fn wait_state(&self, state: char, what: &str) {
        let start = Instant::now();
        while proc_state(self.pid) != Some(state) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the workload does not {what}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_alive(&self) -> bool {
        proc_state(self.pid).is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// The `precopy` workload's writers stop at SIGUSR1 and say so in `DIR/quiet`: from then
    /// on its memory no longer changes. Waits for that, 10 s at most.
    pub fn stop_precopy_writers(&self) {
        kill(self.pid(), Signal::SIGUSR1).expect("SIGUSR1");
        let quiet = self.dir().join("quiet");
        let start = Instant::now();
        while !quiet.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the workload's writers do not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The next fresh image directory, created empty as CRIU expects.
    pub fn new_images_dir(&mut self) -> PathBuf {
        self.dumps += 1;
        let dir = self.dir.path().join(format!("images-{}", self.dumps));
        fs::create_dir(&dir).expect("create the images dir");
        dir
    }

    /// Runs `ckpt-dump -t PID -D DIR` with `extra` arguments and environment.
    pub fn run_dump(&self, images: &Path, extra: &[&str], env: &[(&str, &str)]) -> ToolRun {
        let log = images.with_extension("dump.log");
        let mut args: Vec<String> = vec![
            "-t".into(),
            self.pid.to_string(),
            "-D".into(),
            images.display().to_string(),
            format!("-v{}", self.log_level),
            "-o".into(),
            log.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_tool(&self.tools.dump, &args, env)
    }

    /// Dumps into a new image directory, asserts success and checks the images. Without
    /// `--leave-running`/`--leave-stopped` the dumper kills the process: this reaps it.
    pub fn dump(&mut self, extra: &[&str]) -> PathBuf {
        let (images, _) = self.dump_unchecked(extra);
        check_images(&self.tools, &images);
        images
    }

    /// `dump` without the image checks (for benchmarks); also returns the tool's run.
    pub fn dump_unchecked(&mut self, extra: &[&str]) -> (PathBuf, ToolRun) {
        let images = self.new_images_dir();
        let run = self.run_dump(&images, extra, &[]);
        assert!(
            run.success(),
            "dump of {} failed: {}{}",
            self.name,
            run.describe(),
            self.logs()
        );
        let leaves = extra
            .iter()
            .any(|a| *a == "--leave-running" || *a == "--leave-stopped");
        if !leaves {
            match self.wait_exit(Duration::from_secs(10)) {
                Some(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
                Some(other) => panic!(
                    "after the dump {} ended with {other:?}, expected SIGKILL{}",
                    self.name,
                    self.logs()
                ),
                None => {
                    self.kill_and_reap();
                    panic!(
                        "ckpt-dump returned but {} (pid {}) still runs",
                        self.name, self.pid
                    );
                }
            }
        }
        (images, run)
    }

    /// Runs `ckpt-restore -D DIR -d` with `extra` arguments.
    pub fn run_restore(&self, images: &Path, extra: &[&str], env: &[(&str, &str)]) -> ToolRun {
        let log = images.with_extension("restore.log");
        let mut args: Vec<String> = vec![
            "-D".into(),
            images.display().to_string(),
            "-d".into(),
            format!("-v{}", self.log_level),
            "-o".into(),
            log.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run_tool(&self.tools.restore, &args, env)
    }

    /// Restores from `images` (the old pid must be free: reap first) and checks that the
    /// process is back, with its pid, as our child.
    pub fn restore(&mut self, images: &Path) -> ToolRun {
        self.restore_with(images, &[])
    }

    /// `restore` with extra `ckpt-restore` arguments.
    pub fn restore_with(&mut self, images: &Path, extra: &[&str]) -> ToolRun {
        assert_eq!(
            self.life,
            Life::Gone,
            "restore of a workload that is still ours: reap it first"
        );
        let _ = fs::remove_file(&self.result);
        let run = self.run_restore(images, extra, &[]);
        if proc_state(self.pid).is_some() {
            // Whatever came back is our child now (ckpt-restore exited); own it before asserting,
            // so that Drop cleans it up on failure.
            self.life = Life::Ours;
        }
        assert!(
            run.success(),
            "restore of {} failed: {}{}",
            self.name,
            run.describe(),
            self.logs()
        );
        assert!(
            self.is_alive(),
            "ckpt-restore succeeded but pid {} does not run{}",
            self.pid,
            self.logs()
        );
        let ppid = proc_status_field(self.pid, "PPid");
        assert_eq!(
            ppid.as_deref(),
            Some(std::process::id().to_string().as_str()),
            "the restored process is not our child (are we a subreaper?)"
        );
        self.restores += 1;
        run
    }

    /// Sends SIGUSR2, waits for the verdict and reaps the process; returns the verdict text.
    pub fn finish(&mut self) -> String {
        kill(self.pid, Signal::SIGUSR2)
            .unwrap_or_else(|e| panic!("SIGUSR2 to {}: {e}{}", self.pid, self.logs()));
        self.wait_verdict(RESULT_TIMEOUT)
    }

    /// Waits up to `timeout` for the verdict the process gives once it got SIGUSR2, and
    /// reaps it; returns the verdict text.
    pub fn wait_verdict(&mut self, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(text) = fs::read_to_string(&self.result) {
                let _ = self.wait_exit(Duration::from_secs(10));
                return text.trim_end().to_owned();
            }
            if let Some(status) = self.try_reap() {
                // It may have written the result just before exiting.
                if let Ok(text) = fs::read_to_string(&self.result) {
                    return text.trim_end().to_owned();
                }
                let hint = if matches!(status, WaitStatus::Signaled(_, Signal::SIGUSR2, _)) {
                    " (SIGUSR2 killed it: its handler was not restored)"
                } else {
                    ""
                };
                panic!(
                    "workload {} died after SIGUSR2 without a verdict: {status:?}{hint}{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no verdict from {} after {timeout:?} (state {:?}){}",
                self.name,
                proc_state(self.pid),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `finish` and assert the verdict is PASS.
    pub fn assert_pass(&mut self) {
        let verdict = self.finish();
        assert!(
            verdict == "PASS",
            "workload {} ({}) reports: {verdict}{}",
            self.name,
            match self.restores {
                0 => "the original process".to_owned(),
                n => format!("after restore {n}"),
            },
            self.logs()
        );
    }

    /// The workload's stderr and the tools' logs, for failure messages: every warning and error
    /// line of a log, then its last lines.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let dir = self.dir.path();
        log_excerpt(&mut text, "workload stderr", &dir.join("stderr.log"), 12);
        tool_logs(&mut text, dir, self.dumps, 12);
        text
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Appends the log at `path` (if there is one) under a `label` header to `text`, for failure
/// messages: its warning and error lines (20 at most), then its last `tail` lines.
pub fn log_excerpt(text: &mut String, label: &str, path: &Path, tail: usize) {
    let Ok(content) = fs::read_to_string(path) else {
        return;
    };
    text.push_str(&format!("\n--- {label} ({}) ---\n", path.display()));
    let lines: Vec<&str> = content.lines().collect();
    let tail_from = lines.len().saturating_sub(tail);
    let notable = lines[..tail_from]
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .take(20);
    for line in notable
        .chain(["..."].iter())
        .chain(lines[tail_from..].iter())
    {
        text.push_str(line);
        text.push('\n');
    }
}

/// Appends [`log_excerpt`]s of the logs of the `dumps` dumps and restores made with images
/// `dir/images-N` (numbered from 1) to `text`.
pub fn tool_logs(text: &mut String, dir: &Path, dumps: usize, tail: usize) {
    for n in 1..=dumps {
        let images = dir.join(format!("images-{n}"));
        for (label, ext) in [("dump log", "dump.log"), ("restore log", "restore.log")] {
            log_excerpt(text, label, &images.with_extension(ext), tail);
        }
    }
}

/// Reaps a process of a tree the dump killed, waiting up to 10 s for it to go: its parent
/// died with it, so it came to us (the tests are subreapers).
pub fn reap_killed(pid: Pid) {
    let start = Instant::now();
    while proc_state(pid).is_some() {
        let _ = waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pid {pid} of the dumped tree does not go away"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The real python3 interpreter (not a launcher script that would exec it), if installed.
pub fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

/// The pid a daemon wrote to `pidfile`, waiting up to 5 s for it to appear (a daemon may return
/// to its caller just before its child writes the file).
pub fn read_pidfile(pidfile: &Path) -> Pid {
    let start = Instant::now();
    loop {
        if let Some(pid) = fs::read_to_string(pidfile)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            return Pid::from_raw(pid);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no pid in {}",
            pidfile.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A loopback port nothing listens on right now (the caller's server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free loopback port")
}

/// Waits up to `timeout` for a daemonised tool re-parented to us (a subreaper) to exit;
/// kills it then. True if it exited by itself.
pub fn reap_within(pid: Pid, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return false;
            }
            _ => return true,
        }
    }
}

/// Starts `ckpt-page-server -d` on `port` writing into `images` (on top of the previous
/// round's directory `prev`, relative to it); returns its pid once it listens.
pub fn start_page_server(w: &Workload, images: &Path, port: u16, prev: Option<&str>) -> Pid {
    let server = w.tools().dump.with_file_name("ckpt-page-server");
    let pidfile = images.with_extension("page-server.pid");
    let log = images.with_extension("page-server.log");
    let mut args: Vec<String> = vec![
        "-D".into(),
        images.display().to_string(),
        "--address".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "--daemon".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
        "-o".into(),
        log.display().to_string(),
    ];
    if let Some(prev) = prev {
        args.extend(["--prev-images-dir".to_owned(), prev.to_owned()]);
    }
    let run = run_tool(&server, &args, &[]);
    assert!(
        run.success(),
        "ckpt-page-server did not start: {}",
        run.stderr
    );
    read_pidfile(&pidfile)
}

/// One dump (`extra`: its options) whose pages go through a fresh `ckpt-page-server` into a
/// new image directory on top of `prev`; returns that directory once both are done.
pub fn page_server_round(w: &mut Workload, prev: Option<&Path>, extra: &[&str]) -> PathBuf {
    let images = w.new_images_dir();
    let port = free_port();
    let prev_arg = prev.map(|p| {
        format!(
            "../{}",
            p.file_name().and_then(|n| n.to_str()).expect("utf-8")
        )
    });
    let server = start_page_server(w, &images, port, prev_arg.as_deref());
    let port_arg = port.to_string();
    let mut args: Vec<&str> = vec![
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port_arg,
    ];
    args.extend(extra);
    if let Some(prev) = &prev_arg {
        args.extend(["--prev-images-dir", prev.as_str()]);
    }
    let run = w.run_dump(&images, &args, &[]);
    let server_done = reap_within(server, Duration::from_secs(10));
    assert!(
        run.success(),
        "dump round {args:?} failed: {}{}",
        run.stderr,
        w.logs()
    );
    assert!(
        server_done,
        "the page server still ran 10 s after its round"
    );
    images
}

/// Runs `ckpt-restore --lazy-pages --new-pid-ns` of `images` without -d (it waits for the
/// restored root and exits with its status), logging to `log`; returns it with the root's
/// host pid once that runs. `context` adds to the failure message (the source's side).
pub fn start_lazy_restore(
    w: &Workload,
    images: &Path,
    log: &Path,
    context: impl FnMut() -> String,
) -> (std::process::Child, Pid) {
    start_lazy_restore_with(w, images, log, &[], context)
}

/// [`start_lazy_restore`] with `extra` options.
pub fn start_lazy_restore_with(
    w: &Workload,
    images: &Path,
    log: &Path,
    extra: &[&str],
    context: impl FnMut() -> String,
) -> (std::process::Child, Pid) {
    start_restore_in_pid_ns(w, images, log, &["--lazy-pages"], extra, context)
}

/// `ckpt-restore -D images MODE --new-pid-ns EXTRA`, logging to `log`; returns it and the
/// restored root's host pid once it runs (`context` explains a failure).
pub fn start_restore_in_pid_ns(
    w: &Workload,
    images: &Path,
    log: &Path,
    mode: &[&str],
    extra: &[&str],
    mut context: impl FnMut() -> String,
) -> (std::process::Child, Pid) {
    let pidfile = images.with_extension("restored.pid");
    let mut restore = Command::new(&w.tools().restore)
        .arg("-D")
        .arg(images)
        .args(mode)
        .args(["--new-pid-ns", "--pidfile"])
        .arg(&pidfile)
        .args(extra)
        .arg("-v4")
        .arg("-o")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run ckpt-restore");
    let start = Instant::now();
    loop {
        let written = fs::read_to_string(&pidfile).ok();
        if let Some(pid) = written.and_then(|t| t.trim().parse::<i32>().ok()) {
            return (restore, Pid::from_raw(pid));
        }
        if let Ok(Some(status)) = restore.try_wait() {
            panic!(
                "ckpt-restore ended before the tree ran: {status:?}\nrestore log:\n{}\n{}",
                fs::read_to_string(log).unwrap_or_default(),
                context()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore timed out"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The one-letter state of a process from /proc/PID/stat, `None` when it does not exist.
pub fn proc_state(pid: Pid) -> Option<char> {
    state_from_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter of a /proc/PID/stat line.
fn state_from_stat(stat: &str) -> Option<char> {
    // comm may hold spaces and parentheses: the state follows the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.trim_start().chars().next()
}

/// A field of /proc/PID/status, trimmed.
pub fn proc_status_field(pid: Pid, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim().to_owned())
    })
}

/// The image files of a directory, sorted.
pub fn image_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect();
    files.sort();
    files
}

fn is_raw_pages(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("pages-"))
}

/// CRIU's image decoder, if installed.
pub fn crit() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("crit"))
        .find(|p| p.is_file())
}

/// Every check an image directory written by a test must pass: private file modes,
/// `ckpt-img check` and `show`, `crit decode` of each image but the raw pages, and a byte-exact
/// decode/encode round trip through `ckpt-img`.
pub fn check_images(tools: &Tools, dir: &Path) {
    let files = image_files(dir);
    assert!(!files.is_empty(), "no images in {}", dir.display());
    for file in &files {
        let mode = fs::metadata(file).expect("stat image").permissions().mode();
        assert!(
            mode & 0o077 == 0,
            "{} is readable by others (mode {:o}): images hold process memory",
            file.display(),
            mode & 0o777
        );
    }
    let run = run_tool(
        &tools.img,
        &["check".into(), dir.display().to_string()],
        &[],
    );
    assert!(
        run.success(),
        "images in {} fail `ckpt-img check`: {}",
        dir.display(),
        run.describe()
    );

    let show = run_tool(&tools.img, &["show".into(), dir.display().to_string()], &[]);
    assert!(
        show.success() && !show.stdout.trim().is_empty(),
        "`ckpt-img show` cannot summarise {}: {}",
        dir.display(),
        show.describe()
    );

    match crit() {
        Some(crit) => {
            for file in files.iter().filter(|f| !is_raw_pages(f)) {
                let run = run_tool(
                    &crit,
                    &["decode".into(), "-i".into(), file.display().to_string()],
                    &[],
                );
                assert!(
                    run.success(),
                    "crit cannot decode {}: {}",
                    file.display(),
                    run.describe()
                );
            }
        }
        None => eprintln!(
            "note: crit is not installed; skipping the crit decode of {}",
            dir.display()
        ),
    }

    let scratch = tempfile::tempdir().expect("temp dir");
    for file in files.iter().filter(|f| !is_raw_pages(f)) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("image");
        let json = scratch.path().join(format!("{name}.json"));
        let again = scratch.path().join(name);
        let decode = run_tool(
            &tools.img,
            &[
                "decode".into(),
                "-i".into(),
                file.display().to_string(),
                "-o".into(),
                json.display().to_string(),
            ],
            &[],
        );
        assert!(
            decode.success(),
            "ckpt-img cannot decode {}: {}",
            file.display(),
            decode.describe()
        );
        let encode = run_tool(
            &tools.img,
            &[
                "encode".into(),
                "-i".into(),
                json.display().to_string(),
                "-o".into(),
                again.display().to_string(),
            ],
            &[],
        );
        assert!(
            encode.success(),
            "ckpt-img cannot re-encode {}: {}",
            file.display(),
            encode.describe()
        );
        let original = fs::read(file).expect("read image");
        let recoded = fs::read(&again).expect("read re-encoded image");
        assert!(
            original == recoded,
            "{} changes when decoded and encoded again by ckpt-img",
            file.display()
        );
    }
}

/// A hash of every file in a directory (names and contents), to show images were not changed.
pub fn dir_digest(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let mut entries: Vec<(String, u64, Vec<u8>)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let data = fs::read(e.path()).unwrap_or_default();
            (
                e.file_name().to_string_lossy().into_owned(),
                data.len() as u64,
                fnv(&data).to_le_bytes().to_vec(),
            )
        })
        .collect();
    entries.sort();
    entries
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The whole round trip most tests need: start, dump (which kills), restore, check.
pub fn round_trip(name: &str, args: &[&str]) {
    let mut w = Workload::start(name, args);
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}

/// A daemonised tool re-parented to us (a subreaper): killed and reaped on drop unless
/// [`Daemon::finish`] saw it exit.
pub struct Daemon(pub Option<Pid>);

impl Daemon {
    /// Waits up to `timeout` for the daemon to exit; true if it did.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        match self.0.take() {
            Some(pid) => reap_within(pid, timeout),
            None => true,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// `ckpt-dump --lazy-pages` of a running workload's tree, serving its pages on loopback.
/// Killed and reaped on drop if a test ends before it did.
pub struct LazySource {
    pub child: std::process::Child,
    pub port: u16,
    pub images: PathBuf,
}

impl LazySource {
    /// Starts the lazy dump of `w` with `extra` options and returns once its images are
    /// committed (it serves from then on).
    pub fn start(w: &mut Workload, extra: &[&str]) -> LazySource {
        LazySource::start_until(w, extra, "stats-dump")
    }

    /// `start`, returning once the image `committed` exists and is not empty.
    pub fn start_until(w: &mut Workload, extra: &[&str], committed: &str) -> LazySource {
        LazySource::start_mode(w, &["--lazy-pages"], extra, committed)
    }

    /// `start_until` with `mode` (`--lazy-pages`, or nothing for a prepared dump whose
    /// destination holds every page) before `extra`.
    pub fn start_mode(
        w: &mut Workload,
        mode: &[&str],
        extra: &[&str],
        committed: &str,
    ) -> LazySource {
        let images = w.new_images_dir();
        let port = free_port();
        let timeout: &[&str] = if extra.contains(&"--lazy-connect-timeout") {
            &[]
        } else {
            &["--lazy-connect-timeout", "60"]
        };
        let child = Command::new(&w.tools().dump)
            .arg("-t")
            .arg(w.pid().to_string())
            .arg("-D")
            .arg(&images)
            .args(mode)
            .args(["--address", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(timeout)
            .args(extra)
            .arg("-v4")
            .arg("-o")
            .arg(images.with_extension("dump.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ckpt-dump --lazy-pages");
        let mut source = LazySource {
            child,
            port,
            images,
        };
        let start = Instant::now();
        while !fs::metadata(source.images.join(committed)).is_ok_and(|m| m.len() > 0) {
            if let Ok(Some(status)) = source.child.try_wait() {
                panic!(
                    "the lazy dump ended before serving: {status:?}: {}{}",
                    source.stderr(),
                    w.logs()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the lazy dump never committed its images{}",
                w.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        source
    }

    /// What the dump wrote to stderr (once: it reads to the end).
    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }

    /// Its log file.
    pub fn log(&self) -> String {
        fs::read_to_string(self.images.with_extension("dump.log")).unwrap_or_default()
    }

    /// Waits up to `timeout` for the dump to end.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LazySource {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ckpt-lazy-pages --page-server` on `images`, fetching from the lazy dump on `port`.
pub fn start_remote_lazy_pages(w: &Workload, images: &Path, port: u16) -> Daemon {
    start_lazy_pages(w, images, Some(port))
}

/// `ckpt-lazy-pages -d` on `images`: pages from the images, or with `page_server` from the
/// lazy dump on that loopback port. Returns once restore may connect.
pub fn start_lazy_pages(w: &Workload, images: &Path, page_server: Option<u16>) -> Daemon {
    let daemon = w.tools().dump.with_file_name("ckpt-lazy-pages");
    let pidfile = images.with_extension("lazy-pages.pid");
    let mut args: Vec<String> = vec!["-D".into(), images.display().to_string()];
    if let Some(port) = page_server {
        args.extend([
            "--page-server".into(),
            "--address".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ]);
    }
    args.extend([
        "--daemon".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
        "-o".into(),
        images
            .with_extension("lazy-pages.log")
            .display()
            .to_string(),
        "-v".into(),
        "4".into(),
    ]);
    let run = run_tool(&daemon, &args, &[]);
    assert!(
        run.success(),
        "ckpt-lazy-pages did not start: {}",
        run.stderr
    );
    Daemon(Some(read_pidfile(&pidfile)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_follows_the_last_parenthesis_of_comm() {
        assert_eq!(state_from_stat("42 (a) b) (c) t 1 2 3"), Some('t'));
        assert_eq!(state_from_stat("7 (sleep) S 1 7 7 0"), Some('S'));
        assert_eq!(state_from_stat("garbage"), None);
    }

    #[test]
    fn digest_changes_with_one_byte() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("a.img"), b"abc").expect("write");
        let before = dir_digest(dir.path());
        fs::write(dir.path().join("a.img"), b"abd").expect("write");
        assert_ne!(before, dir_digest(dir.path()));
    }
}
