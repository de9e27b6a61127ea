//! FIFOs and pipe attributes end to end, and pipes whose other end is outside the dump.
//!
//! A process holding FIFOs (both ends, a read-write end, a lone write end) with unread
//! bytes, a pipe shrunk to one page and a packet-mode (`O_DIRECT`) pipe is dumped and
//! restored: every byte, capacity and flag comes back. A process writing into a pipe this
//! test reads is refused, naming this test's pid and fd, unless dumped with
//! `--external pipe:[INODE]`; restored with `--inherit-fd fd[1]:pipe:[INODE]`, it writes
//! into this test's pipe again.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;

use images_format::pb::{FileEntry, PipeDataEntry};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{decodes, Workload};

#[test]
fn fifos_and_pipe_capacity_and_flags_survive_dump_and_restore() {
    let mut w = Workload::start("fifo_pipes", None);
    w.dump_and_reap(&[]);
    let images = w.images();
    let dir = ImageDir::new(&images).expect("images");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    let fifos: Vec<_> = files.iter().filter_map(|f| f.fifo.as_ref()).collect();
    assert_eq!(fifos.len(), 4, "fifo (2 ends), fifo2, fifo3: {files:?}");
    for fifo in &fifos {
        let reg = files
            .iter()
            .find(|f| Some(f.id) == fifo.regf_id)
            .and_then(|f| f.reg.as_ref())
            .expect("each FIFO has its regular file entry");
        assert!(reg.name.contains("/fifo"), "{reg:?}");
    }
    let mut reader = dir
        .open_named(&ImageKind::FifoData.file_name(0))
        .expect("fifo-data.img");
    let mut sizes = Vec::new();
    while let Some(entry) = reader.read_entry::<PipeDataEntry>().expect("entry") {
        reader
            .read_payload(u64::from(entry.bytes))
            .expect("payload");
        sizes.push(entry.bytes);
    }
    sizes.sort_unstable();
    assert_eq!(sizes, vec![100, 300, 5000], "one data entry per FIFO");
    for image in ["files.img", "fifo-data.img", "pipes-data.img"] {
        decodes(&images, image);
    }

    let restore = w.restore(&[], Stdio::null());
    w.go();
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn a_pipe_to_this_test_is_refused_unless_external_and_then_inherited() {
    let (mut ours, theirs) = std::io::pipe().expect("pipe");
    let spare = theirs
        .try_clone()
        .expect("keep a write end for the restore");
    let ours_fd = std::os::fd::AsRawFd::as_raw_fd(&ours);
    let inode = std::fs::metadata(format!("/proc/self/fd/{ours_fd}"))
        .expect("stat our end")
        .ino();
    let mut w = Workload::start("fifo_outside", Some(theirs.into()));
    let mut before = [0u8; 7];
    ours.read_exact(&mut before).expect("before");
    assert_eq!(&before, b"before\n");

    let out = w.dump(&[]);
    assert!(!out.status.success(), "a pipe to us must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    let holder = format!("pid {} fd {ours_fd}", std::process::id());
    assert!(
        err.contains(&format!("pid {}: fd 1 is a pipe (pipe:[{inode}])", w.pid()))
            && err.contains("read end is outside")
            && err.contains(&holder)
            && err.contains("--external"),
        "{err}"
    );
    assert!(w.alive(), "a refused dump leaves the process running");

    let external = format!("pipe:[{inode}]");
    w.dump_and_reap(&["--external", &external]);
    // ckpt-restore's fd 1 is a write end of our pipe: it stands for the pipe.
    let restore = w.restore(
        &["--inherit-fd", &format!("fd[1]:{external}")],
        Stdio::from(spare),
    );
    w.go();
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
    let mut after = String::new();
    ours.read_to_string(&mut after).expect("after");
    assert_eq!(after, format!("after {}\n", w.pid()));
}
