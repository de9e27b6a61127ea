//! Pre-copy: memory dumped in rounds while the process runs (`--pre-dump --track-mem`), each
//! round's images pointing to the previous one's, then a final dump. Pages written between the
//! rounds must all reach the final image chain; none may be lost. The same through
//! `ckpt-page-server`, the receiving end of a migration.

use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_tests::{image_files, Workload};
use nix::sys::signal::{kill, Signal};

/// Bytes of raw pages in an image directory.
fn pages_bytes(dir: &Path) -> u64 {
    image_files(dir)
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-"))
        })
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// One pre-dump round into a new image directory, on top of `prev` (a sibling directory).
fn pre_dump(w: &mut Workload, prev: Option<&Path>) -> std::path::PathBuf {
    let images = w.new_images_dir();
    let mut args = vec!["--pre-dump", "--track-mem"];
    let prev_arg;
    if let Some(prev) = prev {
        prev_arg = format!(
            "../{}",
            prev.file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name")
        );
        args.extend(["--prev-images-dir", prev_arg.as_str()]);
    }
    let run = w.run_dump(&images, &args, &[]);
    assert!(
        run.success(),
        "pre-dump failed: {:?}\n{}{}",
        run.status,
        run.stderr,
        w.logs()
    );
    assert!(w.is_alive(), "the process does not run on after a pre-dump");
    // A pre-dump directory holds memory only; it is checked as part of the final dump's parent
    // chain (`ckpt-img check` resolves every PE_PARENT page through it).
    let pagemaps = image_files(&images)
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pagemap-"))
        })
        .count();
    assert!(
        pagemaps > 0,
        "the pre-dump wrote no pagemap in {}",
        images.display()
    );
    images
}

/// Has the workload, started with `--gated 1`, write `n` more batches of pages, one at a time
/// (a signal sent while another is pending would be lost in it).
fn run_batches(w: &Workload, n: u64) {
    let ticks = w.dir().join("ticks");
    // Written whole (renamed into place) by the workload.
    let done = || -> u64 {
        std::fs::read_to_string(&ticks)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    for _ in 0..n {
        let before = done();
        kill(w.pid(), Signal::SIGWINCH).expect("SIGWINCH");
        let start = Instant::now();
        while done() == before {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the workload did not write batch {}",
                before + 1
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Two pre-dump rounds and a final dump of the precopy workload (`fence`: whether its written
/// region is fenced off from the VMAs it maps and unmaps); returns the final dump's page bytes.
/// `gated`: the writer writes 100 batches of 64 pages between the rounds and 50 after the
/// second, and nothing while they run, so that the final dump's size is known whatever the
/// load; otherwise it writes all the time, also while the rounds freeze and release it.
fn precopy_rounds(fence: bool, gated: bool) -> u64 {
    let mut w = Workload::start(
        "precopy",
        &[
            "--fence",
            if fence { "1" } else { "0" },
            "--gated",
            if gated { "1" } else { "0" },
        ],
    );
    let first = pre_dump(&mut w, None);
    if gated {
        run_batches(&w, 100);
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    let second = pre_dump(&mut w, Some(&first));
    if gated {
        run_batches(&w, 50);
    } else {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Round 2 follows the writes since round 1: a fraction of the 64 MiB, not all of it.
    let second_bytes = pages_bytes(&second);
    eprintln!("second round: {} KiB of pages", second_bytes / 1024);

    // Stop the writers so that what the final dump sees is what the check will see.
    w.stop_precopy_writers();
    let prev = format!(
        "../{}",
        second
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
    );
    let last = w.dump(&["--track-mem", "--prev-images-dir", &prev]);
    assert!(
        last.join("parent").exists(),
        "the final dump has no parent link"
    );
    let written: u64 = image_files(&last)
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-"))
        })
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    w.restore(&last);
    w.assert_pass();
    written
}

#[test]
fn precopy_loses_no_dirty_page() {
    let written = precopy_rounds(true, true);
    // The writer wrote 3200 pages (12.5 MiB at most) of its 64 MiB since the last round: the
    // final dump must carry only those, the mapper's small regions (2 MiB at most), the
    // journal (128 KiB) and a few pages of stacks and libc, and take the rest from its
    // parents.
    eprintln!("final dump: {} KiB of pages", written / 1024);
    assert!(
        written < 20 << 20,
        "the final dump wrote {} MiB of pages: dirty tracking did not spare the unchanged ones",
        written >> 20
    );
}

#[test]
fn precopy_with_vmas_changing_next_to_written_memory_loses_no_page() {
    // Small regions mapped and unmapped beside the written one may merge with it and change
    // its bounds; the rounds may then dump more, but never lose a page, even while the writer
    // writes as the rounds freeze and release it.
    precopy_rounds(false, false);
}

#[test]
fn dump_through_the_page_server_restores_intact() {
    let mut w = Workload::start("mem_vmas", &[]);
    let images = ckpt_tests::page_server_round(&mut w, None, &[]);
    assert!(
        w.wait_exit(Duration::from_secs(10)).is_some(),
        "the dumped process still runs"
    );
    ckpt_tests::check_images(w.tools(), &images);
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn precopy_through_the_page_server_loses_no_dirty_page() {
    let mut w = Workload::start("precopy", &[]);
    let first = ckpt_tests::page_server_round(&mut w, None, &["--pre-dump", "--track-mem"]);
    std::thread::sleep(Duration::from_millis(200));
    let second =
        ckpt_tests::page_server_round(&mut w, Some(&first), &["--pre-dump", "--track-mem"]);
    std::thread::sleep(Duration::from_millis(50));
    w.stop_precopy_writers();
    let last = ckpt_tests::page_server_round(&mut w, Some(&second), &["--track-mem"]);
    assert!(
        w.wait_exit(Duration::from_secs(10)).is_some(),
        "the process still runs after the final dump"
    );
    assert!(
        last.join("parent").exists(),
        "the final images have no parent link"
    );
    ckpt_tests::check_images(w.tools(), &last);
    w.restore(&last);
    w.assert_pass();
}

/// Queued pre-copy (`--hold-hot-pages`): each round sends only pages not written since the
/// round before and holds the others back; the first round proves nothing and sends nothing.
/// The page server refuses any `PE_PARENT` page its parent lacks, and the final dump must
/// send every page still held: the restored workload checks every page against its journal.
#[test]
fn queued_precopy_holds_hot_pages_and_loses_none() {
    // Gated: 400 pages written between rounds, however long the rounds take.
    let mut w = Workload::start("precopy", &["--mib", "16", "--batch", "8", "--gated", "1"]);
    let queued = ["--pre-dump", "--track-mem", "--hold-hot-pages"];
    let first = ckpt_tests::page_server_round(&mut w, None, &queued);
    assert_eq!(
        pages_bytes(&first),
        0,
        "the first queued round sent pages it could not know to be cold"
    );
    run_batches(&w, 50);
    let second = ckpt_tests::page_server_round(&mut w, Some(&first), &queued);
    // At most 400 of the 4096 pages (1.6 MiB) were written since the first round: the others
    // are cold and must all be sent.
    let second_bytes = pages_bytes(&second);
    eprintln!("second queued round: {} KiB of pages", second_bytes >> 10);
    assert!(
        second_bytes > 12 << 20,
        "the second queued round sent only {} KiB: cold pages were held",
        second_bytes >> 10
    );
    run_batches(&w, 50);
    let third = ckpt_tests::page_server_round(&mut w, Some(&second), &queued);
    w.stop_precopy_writers();
    let last = ckpt_tests::page_server_round(&mut w, Some(&third), &["--track-mem"]);
    assert!(
        w.wait_exit(Duration::from_secs(10)).is_some(),
        "the process still runs after the final dump"
    );
    ckpt_tests::check_images(w.tools(), &last);
    w.restore(&last);
    w.assert_pass();
}
