//! Restores from images built here with the image writer: the checks that must hold
//! before anything runs (a taken pid, damaged images) leave nothing behind.

use std::path::Path;

use ckpt_restore::{restore, RestoreError, RestoreOptions};
use images_format::kind::ImageKind;
use images_format::pb;
use images_format::ImageDir;

/// The smallest image set of one single-threaded process with pid `pid`.
fn write_images(dir: &Path, pid: u32) -> ImageDir {
    let d = ImageDir::new(dir).expect("image dir");
    let inventory = pb::InventoryEntry {
        img_version: 2,
        fdinfo_per_id: Some(true),
        ..Default::default()
    };
    d.write_one(ImageKind::Inventory, 0, &inventory)
        .expect("inventory");
    let pstree = pb::PstreeEntry {
        pid,
        ppid: 0,
        pgid: pid,
        sid: pid,
        threads: vec![pid],
    };
    d.write_one(ImageKind::Pstree, 0, &pstree).expect("pstree");
    let core = pb::CoreEntry {
        mtype: pb::core_entry::March::X8664 as i32,
        thread_info: Some(pb::ThreadInfoX86::default()),
        tc: Some(pb::TaskCoreEntry {
            comm: "constructed".into(),
            ..Default::default()
        }),
        thread_core: Some(pb::ThreadCoreEntry::default()),
        ..Default::default()
    };
    d.write_one(ImageKind::Core, u64::from(pid), &core)
        .expect("core");
    let mm = pb::MmEntry {
        vmas: vec![pb::VmaEntry {
            start: 0x10_0000,
            end: 0x10_1000,
            prot: 3,
            flags: 0x22,
            status: 0x201,
            fd: -1,
            ..Default::default()
        }],
        ..Default::default()
    };
    d.write_one(ImageKind::Mm, u64::from(pid), &mm).expect("mm");
    let mut pagemap = d
        .create(ImageKind::Pagemap, u64::from(pid))
        .expect("pagemap");
    pagemap
        .write_entry(&pb::PagemapHead { pages_id: 1 })
        .expect("pagemap head");
    pagemap
        .write_entry(&pb::PagemapEntry {
            vaddr: 0x10_0000,
            compat_nr_pages: 1,
            in_parent: None,
            flags: Some(4),
            nr_pages: Some(1),
        })
        .expect("pagemap entry");
    pagemap.finish().expect("pagemap");
    std::fs::write(dir.join("pages-1.img"), vec![0x5a; 4096]).expect("pages");
    d
}

fn options(dir: &Path) -> RestoreOptions {
    RestoreOptions {
        images_dir: dir.to_path_buf(),
        detached: true,
        ..Default::default()
    }
}

#[test]
fn a_pid_in_use_is_refused_by_number() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Our own pid is certainly taken.
    let pid = std::process::id();
    write_images(tmp.path(), pid);
    let err = restore(&options(tmp.path())).expect_err("our pid is in use");
    let text = format!("{err:#}");
    assert!(matches!(err, RestoreError::Fork(_)), "{text}");
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert!(chain.contains(&format!("pid {pid} is in use")), "{chain}");
}

#[test]
fn truncated_pages_fail_before_anything_is_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path(), std::process::id());
    std::fs::write(tmp.path().join("pages-1.img"), vec![0x5a; 100]).expect("truncate pages");
    let err = restore(&options(tmp.path())).expect_err("pages are short");
    assert!(matches!(err, RestoreError::Read(_)), "{err:?}");
}

#[test]
fn a_wrong_image_version_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = write_images(tmp.path(), std::process::id());
    d.write_one(
        ImageKind::Inventory,
        0,
        &pb::InventoryEntry {
            img_version: 1,
            ..Default::default()
        },
    )
    .expect("inventory");
    let err = restore(&options(tmp.path())).expect_err("version 1");
    assert!(
        matches!(
            err,
            RestoreError::Read(ckpt_restore::read::ReadError::Version { version: 1 })
        ),
        "{err:?}"
    );
}

#[test]
fn images_are_left_unchanged_by_a_failed_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path(), std::process::id());
    let list = |p: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(p)
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = list(tmp.path());
    restore(&options(tmp.path())).expect_err("pid in use");
    assert_eq!(before, list(tmp.path()));
}
