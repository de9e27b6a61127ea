//! Files: fd numbers, flags, offsets and shared descriptions; deleted files; pipes, sockets and
//! anonymous-inode fds, which are either restored or refused without harm.

use std::time::Duration;

use ckpt_tests::{image_files, round_trip, Workload};

#[test]
fn open_files_keep_numbers_flags_and_offsets() {
    round_trip("files", &[]);
}

#[test]
fn deleted_open_file_comes_back_deleted_with_contents() {
    round_trip("ghost", &[]);
}

#[test]
fn deleted_mapped_file_keeps_its_contents() {
    round_trip("ghost", &["--mapped", "1"]);
}

/// A process holding an fd of `kind` (and, for some kinds, a second fd that goes with it) either
/// dumps and restores intact, or the dump refuses it naming the pid and an fd, writes no image,
/// and leaves the process exactly as it was.
fn restored_or_refused_without_harm(kind: &str) {
    let mut w = Workload::start("fdkinds", &["--kind", kind]);
    let images = w.new_images_dir();
    let run = w.run_dump(&images, &[], &[]);
    if run.success() {
        assert!(
            w.wait_exit(Duration::from_secs(10)).is_some(),
            "ckpt-dump succeeded but the process still runs"
        );
        ckpt_tests::check_images(w.tools(), &images);
        w.restore(&images);
    } else {
        eprintln!("note: {kind}: dump refused: {}", run.stderr.trim());
        assert!(
            run.stderr.contains(&w.pid().to_string()) && run.stderr.contains("fd "),
            "a refusal should name the pid and the fd: {}",
            run.stderr
        );
        let leftovers = image_files(&images);
        assert!(
            leftovers.is_empty(),
            "a refused dump left images: {leftovers:?}"
        );
        assert!(w.is_alive(), "the process died when its dump was refused");
    }
    w.assert_pass();
}

#[test]
fn pipe_with_queued_data_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("pipe");
}

#[test]
fn socketpair_with_queued_data_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("socketpair");
}

#[test]
fn eventfd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("eventfd");
}

#[test]
fn epoll_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("epoll");
}

#[test]
fn timerfd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("timerfd");
}

#[test]
fn signalfd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("signalfd");
}

#[test]
fn inotify_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("inotify");
}

#[test]
fn terminal_job_keeps_its_terminal_with_shell_job() {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut w = Workload::start_with_stdio(
        "tty",
        &ckpt_tests::workload_path("tty"),
        &[],
        &[],
        Some(pty.slave),
    );
    let images = w.dump(&["--shell-job"]);
    w.restore_with(&images, &["--shell-job"]);
    w.assert_pass();
    // The master is ours until here: the terminal must outlive the process.
    drop(pty.master);
}

#[test]
fn directory_fd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("directory");
}

#[test]
fn o_path_fd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("opath");
}

#[test]
fn memfd_is_restored_or_refused_without_harm() {
    restored_or_refused_without_harm("memfd");
}
