//! What the end-to-end binaries of restore (`lazy_e2e`, `prepared_e2e`) share: their
//! scenario runner (no test harness: they are single-threaded, so that a scenario's
//! children are ours alone to reap) and the small waits every scenario uses.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

pub type Scenario = fn() -> Result<(), String>;

/// Runs the scenarios whose names contain one of the non-option `args` (all without
/// any), or lists them with `--list`; prints one line per scenario, as libtest does.
pub fn run_scenarios(binary: &str, args: &[String], scenarios: &[(&str, Scenario)]) -> ExitCode {
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in scenarios {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    // Restored processes whose restorer exited come back to us, to be reaped.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("{binary}: become a subreaper: {e}");
        return ExitCode::FAILURE;
    }
    let (mut ran, mut failed) = (0, 0);
    for (name, scenario) in scenarios {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let start = Instant::now();
        match scenario() {
            Ok(()) => println!("test {name} ... ok ({} ms)", start.elapsed().as_millis()),
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}\n");
            }
        }
    }
    println!("{binary}: {ran} run, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What a scenario started: children and other pids, killed and reaped on the way out.
#[derive(Default)]
pub struct Started {
    pub children: Vec<Child>,
    pub pids: Vec<Pid>,
}

impl Drop for Started {
    fn drop(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for &pid in &self.pids {
            if kill(pid, None).is_ok() {
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Runs the dump a scenario asked for (this binary, re-executed as `BINARY dump ...`):
/// the error and its causes go to stderr, which the scenario reads.
pub fn run_dump(binary: &str, opts: &ckpt_dump::DumpOptions) -> ExitCode {
    match ckpt_dump::dump(opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary} dump: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the lazy-pages daemon a scenario asked for (`BINARY daemon ...`).
pub fn run_daemon(binary: &str, opts: &ckpt_lazy_pages::DaemonOptions) -> ExitCode {
    match ckpt_lazy_pages::LazyDaemon::bind(opts).and_then(|d| d.run()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary} daemon: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn self_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("current_exe: {e}"))
}

/// The contents of `path` once it exists and is not empty.
pub fn wait_for_file(path: &Path, limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return Ok(text);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {limit:?}",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_child(child: &mut Child, limit: Duration, what: &str) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait {what}: {e}"))? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} still runs after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What `child` wrote to its standard error; a child still running is killed first (the
/// pipe would not end before it does).
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// Waits until a dump's image set in `images` is committed (its inventory and its
/// statistics, written last, are there), for at most 30 s; `dump` is the dump's process,
/// whose error output tells why when it is not.
pub fn wait_images_committed(images: &Path, dump: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !images.join("inventory.img").exists() || !images.join("stats-dump").exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "the lazy dump wrote no images: {}",
                stderr_of(dump)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A loopback address nothing listens on right now.
pub fn free_addr() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

/// `text` without terminal colour sequences.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
