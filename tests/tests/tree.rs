//! Process trees: every process of the tree comes back at its pid, under its parent, in its
//! session and group, with the zombies, stopped processes, threads, pipes and shared fd tables
//! it had; a restore that fails leaves no process behind.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::{proc_state, reap_killed, Workload};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The pids of the `family` tree, from its ready file (`name=pid ...`).
fn family_pids(w: &Workload) -> Vec<(String, Pid)> {
    w.ready_text()
        .split_whitespace()
        .filter_map(|item| {
            let (name, pid) = item.split_once('=')?;
            Some((name.to_owned(), Pid::from_raw(pid.parse().ok()?)))
        })
        .collect()
}

/// Starts the `family` tree; its nine processes' pids.
fn start_family() -> (Workload, Vec<(String, Pid)>) {
    let w = Workload::start("family", &[]);
    let pids = family_pids(&w);
    assert_eq!(pids.len(), 9, "ready file: {}", w.ready_text());
    (w, pids)
}

/// Reaps the processes of a tree the dump killed (the root is reaped by the harness).
fn reap_killed_tree(pids: &[(String, Pid)]) {
    for (_, pid) in pids {
        reap_killed(*pid);
    }
}

#[test]
fn tree_keeps_links_sessions_groups_zombies_stops_threads_pipes_and_shared_tables() {
    let (mut w, pids) = start_family();
    let images = w.dump(&[]);
    reap_killed_tree(&pids);
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn a_failed_restore_of_one_child_leaves_no_process_of_the_tree() {
    let (mut w, pids) = start_family();
    // The images were checked by the test above; here only the restore matters.
    let (images, _) = w.dump_unchecked(&[]);
    reap_killed_tree(&pids);
    // The grandchild's cwd is gone: it fails in the middle of the tree, once its parent and
    // grandparent (and their other children) exist.
    std::fs::remove_dir(w.dir().join("gdir")).expect("remove gdir");
    let run = w.run_restore(&images, &[], &[]);
    assert!(
        !run.success(),
        "restore without the grandchild's cwd succeeded"
    );
    assert!(
        run.stderr.contains("gdir"),
        "the error does not name the missing directory: {}",
        run.stderr
    );
    // Every process of the tree was killed and reaped (by ckpt-restore or, for the root, as
    // our child once ckpt-restore exited).
    let start = Instant::now();
    loop {
        let left: Vec<&(String, Pid)> = pids
            .iter()
            .filter(|(_, pid)| proc_state(*pid).is_some_and(|s| s != 'Z' && s != 'X'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "processes left behind after a failed restore: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tree_restored_in_a_new_pid_namespace_keeps_its_pids_there() {
    let (mut w, pids) = start_family();
    let (images, _) = w.dump_unchecked(&[]);
    reap_killed_tree(&pids);
    // Without -d: ckpt-restore waits for the root, exits with its status and reaps the
    // namespace's reaper.
    let pidfile = w.dir().join("root.pid");
    let log = images.with_extension("restore.log");
    let mut restore = Command::new(&w.tools().restore)
        .arg("-D")
        .arg(&images)
        .arg("--new-pid-ns")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("-v4")
        .arg("-o")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-restore");
    let start = Instant::now();
    let root = loop {
        let written = std::fs::read_to_string(&pidfile).ok();
        if let Some(pid) = written.and_then(|t| t.trim().parse::<i32>().ok()) {
            break Pid::from_raw(pid);
        }
        if let Ok(Some(status)) = restore.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = restore.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("ckpt-restore ended before the tree ran: {status:?}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore timed out"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Its pid here is not the image's: the image's is its pid in the namespace.
    let root_image_pid = pids.iter().find(|(n, _)| n == "R").map(|(_, p)| *p);
    assert_ne!(Some(root), root_image_pid, "the root kept its host pid");
    // Pending until the tree resumes, if it has not yet.
    kill(root, Signal::SIGUSR2).expect("SIGUSR2 to the restored root");
    let status = restore.wait().expect("wait for ckpt-restore");
    let verdict = w.result_text().unwrap_or_default();
    assert_eq!(
        verdict,
        "PASS",
        "ckpt-restore ended with {status:?}; restore log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "ckpt-restore ended with {status:?}");
}
