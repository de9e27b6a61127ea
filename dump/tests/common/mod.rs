//! What the end-to-end tests of this crate share: the other tools, built beside
//! `ckpt-dump`, and small checks on processes and commands.
// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

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
    Command::new(&exe)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start the {name} workload: {e}"))
}
