//! What happens to the process after a dump: killed (default), left running, left stopped; and a
//! restored process is an ordinary process that can be dumped again.

use std::time::Duration;

use ckpt_tests::{proc_state, proc_status_field, Workload};
use nix::sys::signal::{kill, Signal};

#[test]
fn leave_running_dump_keeps_process_running_and_its_images_restore() {
    let mut w = Workload::start("mem_vmas", &[]);
    let images = w.dump(&["--leave-running"]);
    assert!(
        w.is_alive(),
        "the process is gone after --leave-running{}",
        w.logs()
    );
    let state = proc_state(w.pid());
    assert!(
        matches!(state, Some('S') | Some('R')),
        "state {state:?} after --leave-running{}",
        w.logs()
    );
    assert_eq!(
        proc_status_field(w.pid(), "TracerPid").as_deref(),
        Some("0"),
        "still traced after the dump"
    );
    // The original carries on unchanged...
    w.assert_pass();
    // ...and the images restore into a second, equally intact life.
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn leave_stopped_dump_leaves_process_stopped_and_intact() {
    let mut w = Workload::start("signals", &[]);
    let _images = w.dump(&["--leave-stopped"]);
    std::thread::sleep(Duration::from_millis(50));
    let state = proc_state(w.pid());
    assert!(
        matches!(state, Some('T') | Some('t')),
        "state {state:?} after --leave-stopped{}",
        w.logs()
    );
    kill(w.pid(), Signal::SIGCONT).expect("SIGCONT");
    w.assert_pass();
}

#[test]
fn restored_process_can_be_dumped_and_restored_again() {
    let mut w = Workload::start("threads", &["--threads", "4"]);
    let first = w.dump(&[]);
    w.restore(&first);
    let second = w.dump(&[]);
    w.restore(&second);
    w.assert_pass();
}

#[test]
fn restore_without_detach_waits_for_the_process_and_returns_its_status() {
    let mut w = Workload::start("fsctx", &[]);
    let images = w.dump(&[]);
    let mut restorer = std::process::Command::new(&w.tools().restore)
        .arg("-D")
        .arg(&images)
        .arg("-o")
        .arg(images.with_extension("restore.log"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start ckpt-restore");
    let restorer_pid = restorer.id().to_string();
    let _guard = KillOnDrop(w.pid());
    let start = std::time::Instant::now();
    while proc_status_field(w.pid(), "PPid").as_deref() != Some(restorer_pid.as_str()) {
        if let Some(status) = restorer.try_wait().expect("poll ckpt-restore") {
            panic!(
                "ckpt-restore exited with {status} before the process ran{}",
                w.logs()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the restored process never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Still waiting for its child, as the process runs on.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        restorer.try_wait().expect("poll ckpt-restore").is_none(),
        "ckpt-restore did not wait"
    );
    kill(w.pid(), Signal::SIGUSR2).expect("SIGUSR2");
    let status = restorer.wait().expect("wait for ckpt-restore");
    assert_eq!(
        w.result_text().as_deref(),
        Some("PASS"),
        "the restored process's verdict"
    );
    assert!(
        status.success(),
        "ckpt-restore exited with {status}, the process with 0"
    );
}

/// Kills a process we do not reap ourselves (its parent does) when the test ends early.
struct KillOnDrop(nix::unistd::Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if proc_state(self.0).is_some_and(|s| s != 'Z') {
            let _ = kill(self.0, Signal::SIGKILL);
        }
    }
}

#[test]
fn restore_leaves_the_images_unchanged() {
    let mut w = Workload::start("mem_vmas", &[]);
    let images = w.dump(&[]);
    let before = ckpt_tests::dir_digest(&images);
    w.restore(&images);
    // ckpt-restore may add its statistics, as CRIU does; it changes nothing else.
    let after: Vec<_> = ckpt_tests::dir_digest(&images)
        .into_iter()
        .filter(|(name, ..)| name != "stats-restore")
        .collect();
    assert_eq!(after, before, "the restore changed the images");
    // ...and the statistics it adds are CRIU's, readable by crit.
    let stats = images.join("stats-restore");
    assert!(stats.exists(), "ckpt-restore wrote no stats-restore");
    if let Some(crit) = ckpt_tests::crit() {
        let run = ckpt_tests::run_tool(
            &crit,
            &["decode".into(), "-i".into(), stats.display().to_string()],
            &[],
        );
        assert!(
            run.success(),
            "crit cannot decode stats-restore: {}",
            run.stderr
        );
    }
    w.assert_pass();
}

#[test]
fn stopped_process_comes_back_stopped() {
    let mut w = Workload::start("signals", &[]);
    kill(w.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    w.wait_state('T', "stop");
    let images = w.dump(&[]);
    w.restore(&images);
    std::thread::sleep(Duration::from_millis(100));
    let state = proc_state(w.pid());
    assert_eq!(
        state,
        Some('T'),
        "a process dumped while stopped runs after the restore{}",
        w.logs()
    );
    kill(w.pid(), Signal::SIGCONT).expect("SIGCONT");
    w.assert_pass();
}
