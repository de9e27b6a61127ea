//! `ckpt-img show` and `ckpt-img check` on image directories written with `images_format`.

mod fixture;

use std::process::{Command, Output};

use fixture::{write_all, write_images, write_pagemap, BINARY, HEAP};
use images_format::pb::FdinfoEntry;
use images_format::{ImageKind, PageFlags, PAGE_SIZE};

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run ckpt-img")
}

fn check(dir: &std::path::Path) -> (bool, String) {
    let out = run(&["check".as_ref(), dir.as_os_str()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_accepts_consistent_images() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path());
    let (ok, report) = check(tmp.path());
    assert!(ok, "unexpected problems:\n{report}");
    assert!(report.ends_with(": ok\n"), "{report}");
}

#[test]
fn check_reports_missing_pages_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path());
    std::fs::remove_file(tmp.path().join("pages-1.img")).expect("remove pages");
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(report.contains("pages-1.img: missing"), "{report}");
    assert!(!report.contains("pages-2.img"), "{report}");
}

#[test]
fn check_reports_short_pages_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path());
    let pages = tmp.path().join("pages-2.img");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .expect("open");
    file.set_len(PAGE_SIZE).expect("truncate");
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(report.contains("pages-2.img: holds 4096 bytes"), "{report}");
}

#[test]
fn check_reports_pagemap_outside_vmas() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = write_images(tmp.path());
    // the heap VMA is 4 pages long: the last two pages run past it
    write_pagemap(
        &dir,
        102,
        2,
        &[(HEAP + 3 * PAGE_SIZE, 2, PageFlags::PRESENT)],
    );
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(
        report.contains("pagemap-102.img: pages 0x603000-0x605000 are outside the VMAs of pid 102"),
        "{report}"
    );
}

#[test]
fn check_reports_dangling_fd() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = write_images(tmp.path());
    let fd = FdinfoEntry {
        id: 9,
        flags: 0,
        r#type: 1,
        fd: 5,
        ..FdinfoEntry::default()
    };
    write_all(&dir, ImageKind::Fdinfo, 2, &[fd]);
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(
        report.contains("fdinfo-2.img: pid 102 fd 5: file id 9 is not in files.img"),
        "{report}"
    );
}

#[test]
fn check_reports_missing_thread_core_and_every_other_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path());
    std::fs::remove_file(tmp.path().join("core-101.img")).expect("remove core");
    std::fs::remove_file(tmp.path().join("pages-1.img")).expect("remove pages");
    std::fs::write(tmp.path().join("mm-102.img"), b"\x19\x43\x56\x54").expect("damage mm");
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(
        report.contains("core-101.img: missing (thread 101 of pid 100)"),
        "{report}"
    );
    assert!(report.contains("pages-1.img: missing"), "{report}");
    assert!(report.contains("mm-102.img:"), "{report}");
}

#[test]
fn check_follows_parent_pages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let parent = tmp.path().join("0");
    let child = tmp.path().join("1");
    write_images(&parent);
    let dir = write_images(&child);
    dir.set_parent("../0").expect("parent link");
    // page 0 of the heap is present in the parent; page 3 is not saved anywhere
    write_pagemap(&dir, 100, 1, &[(HEAP, 1, PageFlags::PARENT)]);
    let (ok, report) = check(&child);
    assert!(ok, "{report}");

    write_pagemap(
        &dir,
        100,
        1,
        &[(HEAP + 3 * PAGE_SIZE, 1, PageFlags::PARENT)],
    );
    let (ok, report) = check(&child);
    assert!(!ok);
    assert!(report.contains("pagemap-100.img: "), "{report}");
    assert!(report.contains("0x603000"), "{report}");

    std::fs::remove_file(child.join("parent")).expect("unlink parent");
    let (ok, report) = check(&child);
    assert!(!ok);
    assert!(report.contains("there is no parent link"), "{report}");
}

#[test]
fn show_summarises_tree_memory_files_and_parents() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let parent = tmp.path().join("0");
    let child = tmp.path().join("1");
    write_images(&parent);
    let dir = write_images(&child);
    dir.set_parent("../0").expect("parent link");
    let out = run(&["show".as_ref(), child.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // not a terminal: tab-separated columns
    assert!(
        text.contains("100\t0\t100\t100\talive\t100,101\tserver\n"),
        "{text}"
    );
    assert!(
        text.contains("102\t100\t100\t100\talive\t102\t  worker\n"),
        "{text}"
    );
    assert!(
        text.contains("100\t2\t24.0 KiB\t3\t2\t1\t0\tpages-1.img\n"),
        "{text}"
    );
    assert!(text.contains("100\t1\tREG\t3\t/tmp/server.log\n"), "{text}");
    assert!(text.contains("102\t0\tPIPE\t2\tpipe:[77]\n"), "{text}");
    assert!(
        text.contains("Parent chain\nDEPTH\tDIRECTORY\n1\t"),
        "{text}"
    );
}

#[test]
fn check_reports_stray_images() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = write_images(tmp.path());
    write_pagemap(&dir, 555, 9, &[(HEAP, 1, PageFlags::PRESENT)]);
    std::fs::write(tmp.path().join("pages-12.img"), [0u8; 4096]).expect("stray pages");
    std::fs::copy(
        tmp.path().join("core-102.img"),
        tmp.path().join("core-103.img"),
    )
    .expect("copy");
    std::fs::copy(
        tmp.path().join("core-102.img"),
        tmp.path().join("mm-102.img"),
    )
    .expect("copy");
    let (ok, report) = check(tmp.path());
    assert!(!ok);
    assert!(
        report.contains("pagemap-555.img: no process of pstree.img has this pagemap"),
        "{report}"
    );
    assert!(
        report.contains("pages-12.img: no pagemap refers to this pages image"),
        "{report}"
    );
    assert!(
        report.contains("core-103.img: no thread of pstree.img has this core image"),
        "{report}"
    );
    assert!(
        report.contains("mm-102.img: holds a CORE image, not MM"),
        "{report}"
    );
}
