//! `scripts/ckpt-migrate` against a real sshd: the destination is Debian's OpenSSH server with
//! key authentication, in network, PID and mount namespaces of its own (a network namespace
//! alone would share the host's PIDs, and the restore would collide with the frozen source).
//! The script runs in a second network namespace joined to the first by a veth pair.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ckpt_tests::Workload;

const SSHD: &str = "/usr/sbin/sshd";
const SSH_PORT: &str = "2222";
const SRC_ADDR: &str = "198.18.9.1";
const DST_ADDR: &str = "198.18.9.2";

/// The two namespaces and the sshd in the destination; all removed on drop.
struct Hosts {
    src: String,
    dst: String,
    sshd: Option<Child>,
}

impl Hosts {
    fn create() -> Hosts {
        // Tests of this file run in parallel threads of one process.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hosts = Hosts {
            src: format!("ckt-src-{tag}"),
            dst: format!("ckt-dst-{tag}"),
            sshd: None,
        };
        for ns in [&hosts.src, &hosts.dst] {
            run("ip", &["netns", "add", ns]);
        }
        run(
            "ip",
            &[
                "link", "add", "vmsrc", "netns", &hosts.src, "type", "veth", "peer", "name",
                "vmdst", "netns", &hosts.dst,
            ],
        );
        for (ns, link, addr) in [
            (&hosts.src, "vmsrc", format!("{SRC_ADDR}/24")),
            (&hosts.dst, "vmdst", format!("{DST_ADDR}/24")),
        ] {
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", link]);
            run("ip", &["-n", ns, "link", "set", link, "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    fn ns(&self, name: &str) -> String {
        format!("--net=/run/netns/{name}")
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Some(mut sshd) = self.sshd.take() {
            // unshare --kill-child takes sshd, the PID namespace's init, and all in it along.
            let _ = sshd.kill();
            let _ = sshd.wait();
        }
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn keygen(path: &Path) {
    let path = path.to_str().expect("UTF-8 temp path");
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", path]);
}

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (namespaces, ptrace)".into());
    }
    for tool in [
        SSHD,
        "/usr/bin/ssh",
        "/usr/bin/ssh-keygen",
        "/usr/bin/unshare",
    ] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing (Debian: openssh-server, openssh-client)"
            ));
        }
    }
    None
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ckpt-migrate")
}

#[test]
fn total_copy_over_ssh_moves_the_process_and_leaves_nothing_at_the_source() {
    migrate_over_ssh(&["-a", "total"]);
}

#[test]
fn precopy_through_an_ssh_tunnel_moves_the_process_and_leaves_nothing_at_the_source() {
    migrate_over_ssh(&[
        "-a", "precopy", "--rounds", "3", "--tunnel", "--port", "27101",
    ]);
}

#[test]
fn queued_precopy_over_ssh_compressed_moves_the_process_and_leaves_nothing_at_the_source() {
    // Rounds hold back what was written since the round before; the final dump sends them.
    // Images and pages cross compressed.
    migrate_over_ssh(&[
        "-a",
        "queued",
        "--rounds",
        "4",
        "--port",
        "27301",
        "--compress",
    ]);
}

#[test]
fn postcopy_over_ssh_compressed_moves_the_process_and_leaves_nothing_at_the_source() {
    // The lazy pages are pulled compressed.
    migrate_over_ssh(&["-a", "postcopy", "--port", "27201", "--compress"]);
}

#[test]
fn prepared_postcopy_over_ssh_moves_the_process_and_leaves_nothing_at_the_source() {
    // The destination rebuilds the process before the freeze; the freeze moves what changed.
    migrate_over_ssh(&["-a", "postcopy", "--prepared", "--port", "27401"]);
}

#[test]
fn prepared_queued_precopy_over_ssh_moves_the_process_and_leaves_nothing_at_the_source() {
    // The rounds, then the first images on the last round; the freeze moves the change and
    // the pages written since.
    migrate_over_ssh(&[
        "-a",
        "queued",
        "--rounds",
        "3",
        "--prepared",
        "--port",
        "27601",
    ]);
}

#[test]
fn prepared_assisted_postcopy_over_ssh_moves_the_process_and_leaves_nothing_at_the_source() {
    migrate_over_ssh(&["-a", "assisted", "--prepared", "--port", "27701"]);
}

#[test]
fn prepared_freeze_free_through_an_ssh_tunnel_compressed_moves_the_process() {
    // The switch and the pages go through the tunnel, compressed; the hot pages come with the
    // switch.
    migrate_over_ssh(&[
        "-a",
        "freeze-free",
        "--prepared",
        "--tunnel",
        "--compress",
        "--port",
        "27501",
    ]);
}

/// Starts sshd at a destination of its own, migrates a self-checking workload there with
/// `ckpt-migrate ALGORITHM_ARGS`, and checks it runs there, intact, and nowhere else.
fn migrate_over_ssh(algorithm_args: &[&str]) {
    if let Some(reason) = missing_prerequisite() {
        println!("skipped: {reason}");
        return;
    }
    let keys = tempfile::tempdir().expect("temp dir");
    let dir = keys.path();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    keygen(&dir.join("host_key"));
    keygen(&dir.join("user_key"));
    fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).expect("authorized_keys");
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {SSH_PORT}\nListenAddress {DST_ADDR}\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             StrictModes no\nUsePAM no\nPidFile {pid}\n",
            host = dir.join("host_key").display(),
            auth = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
        ),
    )
    .expect("write sshd_config");
    // sshd insists on its privilege separation directory.
    fs::create_dir_all("/run/sshd").expect("create /run/sshd");

    let mut hosts = Hosts::create();
    let sshd_log = fs::File::create(dir.join("sshd.log")).expect("sshd.log");
    let sshd = Command::new("nsenter")
        .arg(hosts.ns(&hosts.dst))
        .args([
            "--",
            "unshare",
            "--pid",
            "--mount",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ])
        .args([SSHD, "-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(sshd_log.try_clone().expect("dup"))
        .stderr(sshd_log)
        .spawn()
        .expect("start sshd");
    hosts.sshd = Some(sshd);

    let ssh = format!(
        "ssh -i {} -p {SSH_PORT} -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5",
        dir.join("user_key").display()
    );
    let target = format!("root@{DST_ADDR}");
    let in_src = |args: &[&str]| -> Output {
        Command::new("nsenter")
            .arg(hosts.ns(&hosts.src))
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run in the source namespace")
    };
    // Wait until sshd answers.
    let start = Instant::now();
    loop {
        let mut args: Vec<&str> = ssh.split_whitespace().collect();
        args.extend([target.as_str(), "true"]);
        if in_src(&args).status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sshd did not accept a key login: {}",
            fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut w = Workload::start("mem_vmas", &[]);
    let pid = w.pid().as_raw().to_string();
    let bin = w.tools().dump.parent().expect("tools dir").to_path_buf();
    let script = script();
    let mut args = vec![script.to_str().expect("UTF-8 path")];
    args.extend(algorithm_args);
    args.extend([
        "--ssh",
        &ssh,
        "--bin",
        bin.to_str().expect("UTF-8 path"),
        &pid,
        &target,
    ]);
    let out = in_src(&args);
    assert!(
        out.status.success(),
        "ckpt-migrate failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.logs()
    );
    println!("ckpt-migrate: {}", String::from_utf8_lossy(&out.stderr));

    // Nothing left at the source: the original, our child, was killed.
    let status = w.wait_exit(Duration::from_secs(10));
    assert!(
        matches!(
            status,
            Some(nix::sys::wait::WaitStatus::Signaled(
                _,
                nix::sys::signal::Signal::SIGKILL,
                _
            ))
        ),
        "the source process is not gone: {status:?}"
    );
    // It runs at the destination, with the same pid in sshd's PID namespace, and passes its
    // own check there.
    let remote = |command: &str| -> Output {
        let mut args: Vec<&str> = ssh.split_whitespace().collect();
        args.extend([target.as_str(), command]);
        in_src(&args)
    };
    let state = remote(&format!("cat /proc/{pid}/comm"));
    assert!(
        state.status.success() && String::from_utf8_lossy(&state.stdout).trim() == "mem_vmas",
        "no mem_vmas runs as pid {pid} at the destination: {}",
        String::from_utf8_lossy(&state.stderr)
    );
    assert!(remote(&format!("kill -USR2 {pid}")).status.success());
    let start = Instant::now();
    let verdict = loop {
        if let Some(text) = w.result_text().filter(|t| !t.is_empty()) {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the migrated process gave no verdict{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(verdict, "PASS", "the migrated process failed its check");
}
