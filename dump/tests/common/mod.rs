//! What the end-to-end tests of this crate share: the other tools, built beside
//! `ckpt-dump`, and small checks on processes and commands.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const DUMP: &str = env!("CARGO_BIN_EXE_ckpt-dump");

/// The other tools the tests run, built into the same target directory.
pub struct Tools {
    pub restore: PathBuf,
    pub img: PathBuf,
    pub page_server: PathBuf,
    pub lazy_pages: PathBuf,
}

/// The tools, built by cargo first when one is missing (a `cargo test -p ckpt-dump` alone
/// builds only this crate's binary).
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let bin_dir = Path::new(DUMP).parent().expect("target dir").to_path_buf();
        let tools = Tools {
            restore: bin_dir.join("ckpt-restore"),
            img: bin_dir.join("ckpt-img"),
            page_server: bin_dir.join("ckpt-page-server"),
            lazy_pages: bin_dir.join("ckpt-lazy-pages"),
        };
        let all = [
            &tools.restore,
            &tools.img,
            &tools.page_server,
            &tools.lazy_pages,
        ];
        if !all.iter().all(|p| p.is_file()) {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "ckpt-restore", "-p", "ckpt-img"])
                .args(["-p", "ckpt-page-server", "-p", "ckpt-lazy-pages"]);
            if bin_dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cannot build the other tools");
        }
        tools
    })
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `T`, `Z`...), `?` once it is gone.
pub fn proc_state(pid: u32) -> char {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .unwrap_or('?')
}

/// `kill -SIG PID`, which must succeed.
pub fn send(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Compiles the C workload `source` into `dir` as `name` and starts it there with `args`,
/// its output in `dir/out.log`.
pub fn start_c_workload(
    dir: &Path,
    source: &str,
    name: &str,
    cc_flags: &[&str],
    args: &[String],
) -> Child {
    start_c_workload_to(dir, source, name, cc_flags, args, None)
}

/// [`start_c_workload`] with its standard output on `stdout` instead of `dir/out.log`.
pub fn start_c_workload_to(
    dir: &Path,
    source: &str,
    name: &str,
    cc_flags: &[&str],
    args: &[String],
    stdout: Option<Stdio>,
) -> Child {
    let exe = dir.join(name);
    let cc = Command::new("cc")
        .args(cc_flags)
        .arg("-o")
        .arg(&exe)
        .arg(source)
        .status()
        .expect("run cc");
    assert!(cc.success(), "cannot compile the {name} workload");
    let log = fs::File::create(dir.join("out.log")).expect("log");
    let stdout = stdout.unwrap_or_else(|| log.try_clone().expect("dup").into());
    Command::new(&exe)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start the {name} workload: {e}"))
}

/// Waits until `restore` (a running `ckpt-restore`) has handed the process named `name`
/// over: it runs on its own, traced by nobody. `pid` says where to look each time (a new
/// PID namespace learns it from a pidfile); returns it.
pub fn wait_restored(restore: &mut Child, name: &str, mut pid: impl FnMut() -> u32) -> u32 {
    let start = Instant::now();
    loop {
        let pid = pid();
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if exe.ends_with(name)
            && matches!(proc_state(pid), 'S' | 'R')
            && status.contains("TracerPid:\t0")
        {
            return pid;
        }
        if let Ok(Some(status)) = restore.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("ckpt-restore ended before the process ran: {status:?}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore timed out"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A C workload of the workspace's `tests/workloads`.
pub fn selfcheck_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/workloads")
        .join(format!("{name}.c"))
}

/// A started workload, killed and reaped when dropped unless it was reaped already.
pub struct Workload {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub name: String,
    reaped: bool,
}

impl Workload {
    /// Compiles the self-checking workload `tests/workloads/NAME.c` (the `--ready FILE
    /// --result FILE` protocol of `workload.h`) and starts it in a fresh directory, its
    /// output in `out.log` unless `stdout` says otherwise; waits until it is ready.
    pub fn start(name: &str, stdout: Option<Stdio>) -> Workload {
        Workload::start_with(name, &[], stdout)
    }

    /// [`Workload::start`] with the workload's own `extra` arguments.
    pub fn start_with(name: &str, extra: &[String], stdout: Option<Stdio>) -> Workload {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |file: &str| dir.path().join(file).to_string_lossy().into_owned();
        let mut args = vec![
            "--ready".to_owned(),
            path("ready"),
            "--result".to_owned(),
            path("result"),
        ];
        args.extend_from_slice(extra);
        let source = selfcheck_source(name);
        let source = source.to_str().expect("workload path");
        Workload::spawn(dir, source, name, &["-O2"], &args, stdout)
    }

    /// Compiles the C program `source` as `name` with `cc_flags` and starts it without
    /// arguments in a fresh directory; waits until it wrote its `ready` file there.
    pub fn start_program(source: &str, name: &str, cc_flags: &[&str]) -> Workload {
        let dir = tempfile::tempdir().expect("tempdir");
        Workload::spawn(dir, source, name, cc_flags, &[], None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        source: &str,
        name: &str,
        cc_flags: &[&str],
        args: &[String],
        stdout: Option<Stdio>,
    ) -> Workload {
        let child = start_c_workload_to(dir.path(), source, name, cc_flags, args, stdout);
        let mut w = Workload {
            child,
            dir,
            name: name.to_owned(),
            reaped: false,
        };
        let start = Instant::now();
        // Non-empty: a workload that writes its file in place may be caught half way.
        while fs::read_to_string(w.path("ready")).map_or(true, |t| t.is_empty()) {
            if let Ok(Some(status)) = w.child.try_wait() {
                w.reaped = true;
                panic!(
                    "the workload could not set itself up: {status:?}: {}",
                    fs::read_to_string(w.path("out.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the workload never got ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn images(&self) -> PathBuf {
        self.path("images")
    }

    /// `ckpt-dump -t PID -D images` with `extra` arguments.
    pub fn dump(&self, extra: &[&str]) -> Output {
        dump_command(self.pid(), &self.images())
            .args(extra)
            .output()
            .expect("run ckpt-dump")
    }

    /// Reaps the process, which must have ended by now.
    pub fn reap(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        self.reaped = true;
        status
    }

    /// Reaps the process the dump killed, so that its pid is free again.
    pub fn reap_killed(&mut self) {
        let status = self.reap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the dump did not kill the process: {status:?}"
        );
    }

    /// Dumps (killing it), then reaps the killed process.
    pub fn dump_and_reap(&mut self, extra: &[&str]) {
        assert_ok(&self.dump(extra), "ckpt-dump");
        self.reap_killed();
    }

    /// Whether the process still runs (it was not reaped).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts `ckpt-restore -D images` with `extra` arguments and `stdout`, and waits until
    /// the restored process runs on its own.
    pub fn restore(&self, extra: &[&str], stdout: Stdio) -> Child {
        let mut restore = Command::new(&tools().restore)
            .arg("-D")
            .arg(self.images())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ckpt-restore");
        wait_restored(&mut restore, &self.name, || self.pid());
        restore
    }

    /// Tells the restored process to check itself and returns its verdict, once `restore`
    /// (which waits for it) is done.
    pub fn verdict(&self, restore: Child) -> String {
        let out = restore.wait_with_output().expect("wait for ckpt-restore");
        let verdict = fs::read_to_string(self.path("result")).unwrap_or_default();
        assert!(
            out.status.success(),
            "ckpt-restore: {:?}: {verdict} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        verdict
    }

    /// Sends SIGUSR2: check yourself now.
    pub fn go(&self) {
        send(self.pid(), "USR2");
    }

    /// The verdict of the process that still runs here (a dump left it or refused it): it
    /// checks itself, writes its verdict and must then exit successfully.
    pub fn verdict_here(&mut self) -> String {
        self.go();
        let start = Instant::now();
        let verdict = loop {
            let text = fs::read_to_string(self.path("result")).unwrap_or_default();
            if text.ends_with('\n') {
                break text;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no verdict");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(self.reap().success(), "{verdict}");
        verdict
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Both decoders accept `image` of `images` (crit only where it is installed).
pub fn decodes(images: &Path, image: &str) {
    let path = images.join(image);
    let ours = Command::new(&tools().img)
        .arg("decode")
        .arg("-i")
        .arg(&path)
        .output()
        .expect("run ckpt-img");
    assert_ok(&ours, &format!("ckpt-img decode {image}"));
    if Path::new(CRIT).is_file() {
        crit_decode(&path);
    } else {
        eprintln!("skipped the crit check of {image}: crit is not installed");
    }
}

/// CRIU's image decoder, where it is installed.
pub const CRIT: &str = "/usr/bin/crit";

/// `crit decode -i PATH`, which must succeed; what it printed.
pub fn crit_decode(path: &Path) -> String {
    let out = Command::new(CRIT)
        .arg("decode")
        .arg("-i")
        .arg(path)
        .output()
        .expect("run crit");
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    assert_ok(&out, &format!("crit decode {name}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ckpt-img check` accepts `images`, and crit (where it is installed) decodes each image of
/// `names` that was written; returns what crit printed for each (nothing without crit).
pub fn check_images_and_crit(images: &Path, names: &[&str]) -> Vec<(String, String)> {
    let check = Command::new(&tools().img)
        .arg("check")
        .arg(images)
        .output()
        .expect("run ckpt-img");
    assert_ok(&check, "ckpt-img check");
    if !Path::new(CRIT).is_file() {
        eprintln!("skipped the crit check: crit is not installed");
        return Vec::new();
    }
    names
        .iter()
        .map(|name| images.join(name))
        .filter(|path| path.exists())
        .map(|path| {
            let text = crit_decode(&path);
            (
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                text,
            )
        })
        .collect()
}

/// `ckpt-dump -t PID -D IMAGES`, with no fault injected, to add to and run.
pub fn dump_command(pid: u32, images: &Path) -> Command {
    let mut cmd = Command::new(DUMP);
    cmd.arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(images)
        .env_remove("CKPT_FAULT");
    cmd
}
