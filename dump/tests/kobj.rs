//! Kernel objects without a path, end to end: a process holding a pipe with unread bytes
//! and a raised capacity, an empty pipe, an eventfd with count 7, a semaphore eventfd, a
//! signalfd, an armed timerfd, a fired one with an unread expiration, an epoll set over
//! three ready targets and an inotify watch with wd 2 (wd 1 removed) is dumped (once leaving it running, once killing it) and restored; it then
//! checks every object itself. A pipe whose other end lives elsewhere is refused.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use images_format::pb::{FileEntry, PipeDataEntry};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, check_images_and_crit, dump_command, Workload};

const WORKLOAD_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/kobj.c");

fn start() -> Workload {
    Workload::start_program(WORKLOAD_SRC, "kobj", &["-O2"])
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

    check_images_and_crit(images, &["files.img", "pipes-data.img", "fdinfo-2.img"]);
}

#[test]
fn leave_running_dump_consumes_nothing() {
    let mut w = start();
    let images = w.images();
    assert_ok(&w.dump(&["--leave-running"]), "ckpt-dump --leave-running");
    check_images(&images);
    let verdict = w.verdict_here();
    assert_eq!(
        verdict.trim(),
        "PASS",
        "the process after the dump: {verdict}"
    );
}

#[test]
fn pipes_eventfds_signalfd_timerfds_epoll_and_inotify_survive_dump_and_restore() {
    let mut w = start();
    let pid = w.pid();
    let images = w.images();
    w.dump_and_reap(&[]);
    check_images(&images);

    // ckpt-restore waits for the restored process and exits with its status.
    let restore = w.restore(&[], Stdio::piped());
    let fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for fd in ["30", "40"] {
        assert!(fds.iter().any(|f| f == fd), "pipe end at fd {fd}: {fds:?}");
    }
    w.go();
    let verdict = w.verdict(restore);
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
    let out = dump_command(pid, &dir.path().join("images"))
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
