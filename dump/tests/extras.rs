//! ckpt's extension state end to end: a process whose two threads each set their own CPU
//! affinity, timer slack and I/O priority, and which sets memory-deny-write-execute, is
//! dumped, killed and restored, and then checks every value itself. The images keep the
//! values in ckpt's extension fields, which `crit` skips and `ckpt-img` prints.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use images_format::pb::CoreEntry;
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, send, tools, wait_restored, Workload};

const WORKLOAD_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/extras.c");
const IOPRIO_BE_3: u32 = (2 << 13) | 3;
const IOPRIO_IDLE: u32 = 3 << 13;
const MDWE_REFUSE_EXEC_GAIN: u32 = 1;

/// The CPUs the workload pinned its main thread and its other thread to.
fn cpus(w: &Workload) -> (usize, usize) {
    let text = fs::read_to_string(w.path("ready")).expect("ready");
    let mut it = text.split_whitespace().map(|n| n.parse().expect("a cpu"));
    (it.next().expect("main cpu"), it.next().expect("thread cpu"))
}

fn mask(cpu: usize) -> Vec<u64> {
    let mut words = vec![0u64; cpu / 64 + 1];
    words[cpu / 64] = 1 << (cpu % 64);
    words
}

/// Checks the extension fields of both threads' core images.
fn check_images(images: &Path, pid: u32, (main_cpu, thread_cpu): (usize, usize)) {
    let dir = ImageDir::new(images).expect("images dir");
    let tree: images_format::pb::PstreeEntry = dir.read_one(ImageKind::Pstree, 0).expect("pstree");
    assert_eq!(tree.threads.len(), 2, "{tree:?}");
    let thread_tid = tree.threads[1];
    let leader: CoreEntry = dir
        .read_one(ImageKind::Core, u64::from(pid))
        .expect("leader core");
    let other: CoreEntry = dir
        .read_one(ImageKind::Core, u64::from(thread_tid))
        .expect("thread core");
    let tc = leader.tc.expect("tc");
    assert_eq!(tc.mdwe_flags, Some(MDWE_REFUSE_EXEC_GAIN));
    let lt = leader.thread_core.expect("leader thread_core");
    let ot = other.thread_core.expect("thread thread_core");
    assert_eq!(lt.timer_slack_ns, Some(123_456));
    assert_eq!(ot.timer_slack_ns, Some(654_321));
    assert_eq!(lt.ioprio, Some(IOPRIO_BE_3));
    assert_eq!(ot.ioprio, Some(IOPRIO_IDLE));
    if main_cpu != thread_cpu {
        assert_eq!(lt.cpu_affinity, mask(main_cpu));
        assert_eq!(ot.cpu_affinity, mask(thread_cpu));
    } else {
        eprintln!("one CPU only: the affinity is not restricted, so it is not saved");
    }
}

/// `crit` still decodes the core images, without the extension fields; `ckpt-img` prints
/// them.
fn check_decoders(images: &Path, pid: u32) {
    let core = images.join(format!("core-{pid}.img"));
    let ours = Command::new(&tools().img)
        .arg("decode")
        .arg("-i")
        .arg(&core)
        .output()
        .expect("run ckpt-img");
    assert_ok(&ours, "ckpt-img decode");
    let json: serde_json::Value = serde_json::from_slice(&ours.stdout).expect("ckpt-img JSON");
    let entry = &json["entries"][0];
    assert_eq!(entry["thread_core"]["timer_slack_ns"], 123_456, "{json}");
    assert_eq!(entry["thread_core"]["ioprio"], IOPRIO_BE_3, "{json}");
    assert!(entry["tc"].get("mdwe_flags").is_some(), "{json}");

    if !Path::new("/usr/bin/crit").is_file() {
        eprintln!("skipped the crit check: crit is not installed");
        return;
    }
    let theirs = Command::new("/usr/bin/crit")
        .arg("decode")
        .arg("-i")
        .arg(&core)
        .output()
        .expect("run crit");
    assert_ok(&theirs, "crit decode");
    let json: serde_json::Value = serde_json::from_slice(&theirs.stdout).expect("crit JSON");
    let entry = &json["entries"][0];
    assert_eq!(entry["thread_core"]["futex_rla_len"], 24, "{json}");
    assert!(
        entry["thread_core"].get("timer_slack_ns").is_none(),
        "{json}"
    );
    assert!(entry["tc"].get("mdwe_flags").is_none(), "{json}");
}

/// Restores `images` with `ckpt-restore` (which waits for the restored process), checks
/// from outside once it runs, has it check itself, and returns its verdict. With
/// `new_pid_ns` the process gets other ids here than its own: they come from the pidfile.
fn restore_and_check(
    images: &Path,
    image_pid: u32,
    new_pid_ns: bool,
    cpus: (usize, usize),
    result: &Path,
) -> String {
    let pidfile = images.with_extension("pid");
    let mut cmd = Command::new(&tools().restore);
    cmd.arg("-D").arg(images).arg("--pidfile").arg(&pidfile);
    if new_pid_ns {
        cmd.arg("--new-pid-ns");
    }
    let mut restore = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-restore");
    let pid = wait_restored(&mut restore, "extras", || {
        if new_pid_ns {
            fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0)
        } else {
            image_pid
        }
    });
    let thread_tid: u32 = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .find(|&t| t != pid)
        .expect("the restored thread");
    // What any observer sees, before the process looks at itself.
    let slack = |tid: u32| fs::read_to_string(format!("/proc/{tid}/timerslack_ns"));
    assert_eq!(slack(pid).expect("leader slack").trim(), "123456");
    assert_eq!(slack(thread_tid).expect("thread slack").trim(), "654321");
    let allowed = |tid: u32| {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .expect("thread status")
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:\t").map(str::to_owned))
            .expect("Cpus_allowed_list")
    };
    if cpus.0 != cpus.1 {
        assert_eq!(allowed(pid), cpus.0.to_string());
        assert_eq!(allowed(thread_tid), cpus.1.to_string());
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
    assert!(
        out.status.success(),
        "ckpt-restore (the restored process's exit status): {:?}: {verdict}",
        out.status
    );
    verdict
}

fn dump_restore_check(new_pid_ns: bool) {
    let mut w = Workload::start_program(WORKLOAD_SRC, "extras", &["-O2", "-pthread"]);
    let pid = w.pid();
    let cpus = cpus(&w);
    let images = w.images();
    w.dump_and_reap(&[]);

    check_images(&images, pid, cpus);
    check_decoders(&images, pid);

    let verdict = restore_and_check(&images, pid, new_pid_ns, cpus, &w.path("result"));
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn affinity_timer_slack_ioprio_and_mdwe_survive_dump_and_restore() {
    dump_restore_check(false);
}

/// The same with other thread ids on our side than in the images.
#[test]
fn extras_reach_the_right_threads_in_a_new_pid_namespace() {
    dump_restore_check(true);
}
