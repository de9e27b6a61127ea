//! Kernel objects without a path, end to end: a process holding a pipe with unread bytes
//! and a raised capacity, an empty pipe, an eventfd with count 7, a semaphore eventfd, a
//! signalfd, an armed timerfd, a fired one with an unread expiration, an epoll set over
//! three ready targets and an inotify watch with wd 2 (wd 1 removed) is dumped (once leaving it running, once killing it) and restored; it then
//! checks every object itself. A pipe whose other end lives elsewhere is refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use images_format::pb::{FileEntry, PipeDataEntry};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, proc_state, send, start_c_workload, tools, DUMP};

const WORKLOAD_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/kobj.c");

/// The workload; killed and reaped when dropped unless it was reaped already.
struct Workload {
    child: Child,
    dir: tempfile::TempDir,
    reaped: bool,
}

impl Workload {
    fn start() -> Workload {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = start_c_workload(dir.path(), WORKLOAD_SRC, "kobj", &["-O2"], &[]);
        let mut w = Workload {
            child,
            dir,
            reaped: false,
        };
        let start = Instant::now();
        while !w.path("ready").exists() {
            if let Ok(Some(status)) = w.child.try_wait() {
                w.reaped = true;
                panic!("the workload could not set itself up: {status:?}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the workload never got ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn dump(&self, images: &Path, leave_running: bool) -> Output {
        let mut cmd = Command::new(DUMP);
        cmd.arg("-t")
            .arg(self.pid().to_string())
            .arg("-D")
            .arg(images)
            .env_remove("CKPT_FAULT");
        if leave_running {
            cmd.arg("--leave-running");
        }
        cmd.output().expect("run ckpt-dump")
    }

    fn reap(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        self.reaped = true;
        status
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

fn wait_verdict(result: &Path) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(result).unwrap_or_default();
        if text.ends_with('\n') {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no verdict in {}",
            result.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The images hold the objects as CRIU's entries, and both decoders accept them.
fn check_images(images: &Path) {
    let dir = ImageDir::new(images).expect("images dir");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    let pipes: Vec<_> = files.iter().filter_map(|f| f.pipe.as_ref()).collect();
    assert_eq!(pipes.len(), 4, "two pipes, two ends each: {files:?}");
    let counters: Vec<u64> = files
        .iter()
        .filter_map(|f| f.efd.as_ref().map(|e| e.counter))
        .collect();
    assert_eq!(counters, vec![7, 3]);
    let sigmask = files
        .iter()
        .find_map(|f| f.sgfd.as_ref().map(|s| s.sigmask));
    assert_eq!(sigmask, Some(1 << (10 - 1)), "SIGUSR1 only");
    let timers: Vec<_> = files.iter().filter_map(|f| f.tfd.as_ref()).collect();
    assert_eq!(timers.len(), 2, "{files:?}");
    let armed = timers[0];
    assert!(
        armed.ticks == 0 && armed.vsec < 3 && (armed.vsec, armed.vnsec) != (0, 0),
        "armed 3 s timer: {armed:?}"
    );
    assert_eq!(
        (timers[1].ticks, timers[1].vsec, timers[1].vnsec),
        (1, 0, 0)
    );
    let epoll = files
        .iter()
        .find_map(|f| f.epfd.as_ref())
        .expect("an epoll entry");
    let mut targets: Vec<(u32, u64)> = epoll.tfd.iter().map(|t| (t.events, t.data)).collect();
    targets.sort_unstable();
    let inotify = files
        .iter()
        .find_map(|f| f.ify.as_ref())
        .expect("an inotify entry");
    let watches: Vec<_> = inotify
        .wd
        .iter()
        .map(|w| (w.wd, w.f_handle.path.clone().unwrap_or_default()))
        .collect();
    assert!(
        watches.len() == 1 && watches[0].0 == 2 && watches[0].1.ends_with("/w2"),
        "one watch, wd 2 on w2: {watches:?}"
    );
    // The kernel always adds EPOLLERR | EPOLLHUP (0x18) to what was asked.
    assert_eq!(
        targets,
        vec![(0x19, 101), (0x19, 103), (0x1c, 102)],
        "{epoll:?}"
    );

    let mut reader = dir
        .open_named(&ImageKind::PipesData.file_name(0))
        .expect("pipes-data.img");
    let mut sizes = Vec::new();
    while let Some(entry) = reader.read_entry::<PipeDataEntry>().expect("entry") {
        let bytes = reader
            .read_payload(u64::from(entry.bytes))
            .expect("payload");
        if !bytes.is_empty() {
            let expected: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
            assert_eq!(bytes, expected, "pipe bytes");
            assert_eq!(entry.size, Some(128 * 1024));
        }
        sizes.push(bytes.len());
    }
    sizes.sort_unstable();
    assert_eq!(sizes, vec![0, 3000]);

    let check = Command::new(&tools().img)
        .arg("check")
        .arg(images)
        .output()
        .expect("run ckpt-img");
    assert_ok(&check, "ckpt-img check");
    if !Path::new("/usr/bin/crit").is_file() {
        eprintln!("skipped the crit check: crit is not installed");
        return;
    }
    for image in ["files.img", "pipes-data.img", "fdinfo-2.img"] {
        let path = images.join(image);
        if !path.exists() {
            continue;
        }
        let out = Command::new("/usr/bin/crit")
            .arg("decode")
            .arg("-i")
            .arg(&path)
            .output()
            .expect("run crit");
        assert_ok(&out, &format!("crit decode {image}"));
    }
}

#[test]
fn leave_running_dump_consumes_nothing() {
    let mut w = Workload::start();
    let images = w.path("images");
    assert_ok(&w.dump(&images, true), "ckpt-dump --leave-running");
    check_images(&images);
    send(w.pid(), "USR2");
    let verdict = wait_verdict(&w.path("result"));
    assert!(w.reap().success());
    assert_eq!(
        verdict.trim(),
        "PASS",
        "the process after the dump: {verdict}"
    );
}

#[test]
fn pipes_eventfds_signalfd_timerfds_epoll_and_inotify_survive_dump_and_restore() {
    let mut w = Workload::start();
    let pid = w.pid();
    let images = w.path("images");
    assert_ok(&w.dump(&images, false), "ckpt-dump");
    let status = w.reap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the dump did not kill the process: {status:?}"
    );
    check_images(&images);

    // ckpt-restore waits for the restored process and exits with its status.
    let mut restore = Command::new(&tools().restore)
        .arg("-D")
        .arg(&images)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ckpt-restore");
    let start = Instant::now();
    loop {
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if exe.ends_with("kobj")
            && matches!(proc_state(pid), 'S' | 'R')
            && status.contains("TracerPid:\t0")
        {
            break;
        }
        if let Ok(Some(status)) = restore.try_wait() {
            let out = restore.wait_with_output().expect("output");
            panic!(
                "ckpt-restore ended before the process ran: {status:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore timed out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for fd in ["30", "40"] {
        assert!(fds.iter().any(|f| f == fd), "pipe end at fd {fd}: {fds:?}");
    }
    send(pid, "USR2");
    let out = restore.wait_with_output().expect("wait for ckpt-restore");
    let verdict = fs::read_to_string(w.path("result")).unwrap_or_default();
    assert!(
        out.status.success(),
        "ckpt-restore: {:?}: {verdict} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

/// A pipe shared with another process cannot be rebuilt from one side: the dump names the
/// fd and the pipe, and leaves the process running untouched.
#[test]
fn pipe_to_another_process_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("sleep")
        .arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sleep");
    let pid = child.id();
    // Only the write end is in `sleep` (its stdout); the read end stays with us.
    let out = Command::new(DUMP)
        .arg("-t")
        .arg(child.id().to_string())
        .arg("-D")
        .arg(dir.path().join("images"))
        .env_remove("CKPT_FAULT")
        .output()
        .expect("run ckpt-dump");
    let alive = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!out.status.success(), "the dump must refuse the pipe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {pid}"))
            && err.contains("fd 1 is a pipe")
            && err.contains("read end is outside"),
        "{err}"
    );
    assert!(alive, "a refused dump must leave the process running");
}
