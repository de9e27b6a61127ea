//! File locks end to end: a process holding an flock, a shared flock, an OFD lock and a
//! POSIX lock is dumped and restored; the restored locks still keep a second open file
//! description out (the workload checks flock and OFD itself), and the POSIX lock is still
//! held by the restored pid, as this test sees with `F_GETLK` from outside.

use std::os::fd::AsFd;
use std::process::Stdio;

use images_format::pb::FileLockEntry;
use images_format::{ImageDir, ImageKind};

mod common;
use common::{decodes, Workload};

/// Who holds a lock conflicting with a write lock on `start..start+len` of `path`:
/// `(pid, type, start, len)` as `F_GETLK` reports it.
fn posix_holder(path: &std::path::Path, start: i64, len: i64) -> Option<(i32, i16, i64, i64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut probe = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut probe)).expect("F_GETLK");
    (probe.l_type != nix::libc::F_UNLCK as i16).then_some((
        probe.l_pid,
        probe.l_type,
        probe.l_start,
        probe.l_len,
    ))
}

#[test]
fn flock_ofd_and_posix_locks_are_held_again_after_restore() {
    let mut w = Workload::start("locks_files", None);
    let pid = i32::try_from(w.pid()).expect("pid");
    let posix = w.path("posix");
    let write = nix::libc::F_WRLCK as i16;
    assert_eq!(posix_holder(&posix, 0, 0), Some((pid, write, 10, 10)));
    w.dump_and_reap(&[]);
    assert_eq!(
        posix_holder(&posix, 0, 0),
        None,
        "the lock died with the process"
    );

    let images = w.images();
    let dir = ImageDir::new(&images).expect("images");
    let locks: Vec<FileLockEntry> = dir
        .read_all(ImageKind::FileLocks, 0)
        .expect("filelocks.img");
    let mut short: Vec<_> = locks
        .iter()
        .map(|l| (l.fd, l.flag, l.r#type, l.start, l.len, l.pid))
        .collect();
    short.sort_unstable();
    // CRIU's kinds: POSIX 1, flock 2, OFD 4; types F_RDLCK 0, F_WRLCK 1.
    assert_eq!(
        short,
        vec![
            (10, 2, 1, 0, 0, pid),
            (11, 4, 1, 0, 100, pid),
            (12, 1, 1, 10, 10, pid),
            (13, 2, 0, 0, 0, pid),
        ]
    );
    decodes(&images, "filelocks.img");

    let restore = w.restore(&[], Stdio::null());
    assert_eq!(
        posix_holder(&posix, 0, 0),
        Some((pid, write, 10, 10)),
        "the restored process holds its POSIX lock again"
    );
    assert_eq!(posix_holder(&posix, 20, 10), None, "and no more than it");
    w.go();
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}
