//! File descriptors in flight on unix sockets (`SCM_RIGHTS` sent, not received yet), end to
//! end. The workload (`tests/workloads/unix_scm.c`) queues a file it then closes, a pipe's
//! read end with bytes in the pipe, an eventfd it keeps open, and one end of another
//! socketpair with bytes queued; after restore it receives them all and checks each one
//! (offset, bytes, the same eventfd as its own fd, the connection to the kept end). The
//! images say it as CRIU does: each packet's `scm` names files of `files.img`, the kept
//! eventfd by the id of the process's own fd. A dump that leaves the process running takes
//! nothing out of the queues.

use std::path::Path;
use std::process::{Command, Stdio};

use images_format::pb::{FdinfoEntry, FileEntry, SkPacketEntry};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, tools, Workload};

const SCM_RIGHTS: u32 = 1;

fn start(extra: &[String]) -> Workload {
    Workload::start_with("unix_scm", extra, None)
}

/// Every packet of `sk-queues.img`: its entry and bytes.
fn packets(dir: &ImageDir) -> Vec<(SkPacketEntry, Vec<u8>)> {
    let mut reader = dir
        .open_named(&ImageKind::SkQueues.file_name(0))
        .expect("sk-queues.img");
    let mut out = Vec::new();
    while let Some(entry) = reader.read_entry::<SkPacketEntry>().expect("entry") {
        let bytes = reader
            .read_payload(u64::from(entry.length))
            .expect("payload");
        out.push((entry, bytes));
    }
    out
}

fn check_images(images: &Path, workdir: &Path) {
    let dir = ImageDir::new(images).expect("images dir");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    let file = |id: u32| {
        files
            .iter()
            .find(|f| f.id == id)
            .expect("a files.img entry")
    };
    let rights_of = |tag: &[u8]| -> Vec<u32> {
        let all = packets(&dir);
        let (entry, _) = all
            .iter()
            .find(|(_, bytes)| bytes.as_slice() == tag)
            .unwrap_or_else(|| panic!("no packet {tag:?} in {all:?}"));
        assert!(entry.scm.iter().all(|s| s.r#type == SCM_RIGHTS));
        entry.scm.iter().flat_map(|s| s.rights.clone()).collect()
    };

    let f = rights_of(b"F");
    assert_eq!(f.len(), 1);
    let reg = file(f[0])
        .reg
        .clone()
        .expect("the file in flight is a regular file");
    assert_eq!(
        (Path::new(&reg.name), reg.pos),
        (workdir.join("data.txt").as_path(), 7)
    );

    let e = rights_of(b"E");
    assert_eq!(e.len(), 2);
    assert!(file(e[0]).pipe.is_some(), "a pipe end: {:?}", file(e[0]));
    assert!(file(e[1]).efd.is_some(), "an eventfd: {:?}", file(e[1]));
    // The eventfd in flight is the process's own open eventfd: one object, one id.
    let mut fdinfo: Vec<FdinfoEntry> = Vec::new();
    for image in std::fs::read_dir(images).expect("images").flatten() {
        let name = image.file_name().to_string_lossy().into_owned();
        if !name.starts_with("fdinfo-") {
            continue;
        }
        let mut reader = dir.open_named(&name).expect("fdinfo image");
        while let Some(entry) = reader.read_entry::<FdinfoEntry>().expect("fdinfo entry") {
            fdinfo.push(entry);
        }
    }
    assert!(
        fdinfo.iter().any(|d| d.id == e[1]),
        "the eventfd in flight has the id of an fd of the process: {fdinfo:?}"
    );
    assert!(
        !fdinfo.iter().any(|d| d.id == f[0] || d.id == e[0]),
        "the file and the pipe are held by no process"
    );
    assert_eq!(rights_of(b"dgram"), vec![e[1]], "the same eventfd again");

    let s = rights_of(b"S");
    let usk = file(s[0]).usk.clone().expect("a unix socket in flight");
    let kept = files
        .iter()
        .filter_map(|f| f.usk.as_ref())
        .find(|u| u.ino == usk.peer)
        .expect("its peer is in the images");
    assert_eq!(kept.peer, usk.ino);
    assert!(
        packets(&dir)
            .iter()
            .any(|(p, bytes)| p.id_for == usk.id && bytes.as_slice() == b"inner"),
        "the socket in flight has its own queue saved"
    );

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
    let out = Command::new("/usr/bin/crit")
        .arg("decode")
        .arg("-i")
        .arg(images.join("sk-queues.img"))
        .output()
        .expect("run crit");
    assert_ok(&out, "crit decode sk-queues.img");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"rights\"").count(), 4, "{text}");
}

#[test]
fn fds_in_flight_survive_dump_and_restore() {
    let mut w = start(&[]);
    let images = w.images();
    assert_ok(&w.dump(&[]), "ckpt-dump");
    check_images(&images, w.dir.path());
    w.reap_killed();
    let restore = w.restore(&[], Stdio::piped());
    w.go();
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn leave_running_dump_takes_no_fd_out_of_flight() {
    let mut w = start(&[]);
    assert_ok(&w.dump(&["--leave-running"]), "ckpt-dump");
    let verdict = w.verdict_here();
    assert_eq!(verdict.trim(), "PASS", "after the dump: {verdict}");
}

/// A file in flight that the dump cannot save (a pidfd) fails the dump with a message that
/// names the process and the socket whose queue holds it, writes no image, and leaves the
/// process running with everything still queued.
#[test]
fn an_unsupported_file_in_flight_is_refused_without_harm() {
    let mut w = start(&["--pidfd".to_owned()]);
    let images = w.images();
    let out = w.dump(&[]);
    assert!(!out.status.success(), "a pidfd in flight cannot be dumped");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}: fd ", w.pid()))
            && err.contains("in flight")
            && err.contains("pidfd"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a refused dump left images: {left:?}");
    let verdict = w.verdict_here();
    assert_eq!(verdict.trim(), "PASS", "after the refused dump: {verdict}");
}
