//! Prepared post-copy on one machine: `ckpt-dump --lazy-pages --prepare` writes a first image
//! set while the process runs on; a copy of it is restored in a new PID namespace by
//! `ckpt-restore --prepared`, which holds the rebuilt process and connects back; only then is
//! the source frozen, and what changed since crosses on that connection. The pages come from
//! the frozen source through `ckpt-lazy-pages`, as in any remote post-copy.
//!
//! The end of a pre-copy the same way (`ckpt-dump --prepare --track-mem --prev-images-dir`,
//! no lazy pages): the first image set has the pages written since the last round, the
//! rest is that round's; the pages written after the first set cross with the final state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_tests::{start_remote_lazy_pages, LazySource, Workload};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// Copies the prepared images as an orchestrator would send them to the destination (the
/// `parent` link pointing where the source's does).
fn copy_images(from: &Path) -> PathBuf {
    let to = from.with_extension("dst");
    std::fs::create_dir_all(&to).expect("create the destination directory");
    for entry in std::fs::read_dir(from).expect("read the prepared images") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().expect("a file name");
        if path.is_symlink() {
            let target = std::fs::canonicalize(&path).expect("resolve the parent link");
            std::os::unix::fs::symlink(target, to.join(name)).expect("link the parent");
        } else if path.is_file() {
            std::fs::copy(&path, to.join(name)).expect("copy an image");
        }
    }
    to
}

/// Where the destination's pages come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    /// Lazily, from the frozen source (post-copy).
    Lazy,
    /// Held already: one pre-copy round before the prepared images.
    AfterRound,
    /// One pre-copy round, then post-copy: the destination holds the pages unwritten since
    /// the round, the others are lazy (assisted post-copy).
    LazyAfterRound,
}

/// One pre-copy round of `w` into a new image directory; returns it as the next one's
/// `--prev-images-dir`.
fn pre_round(w: &mut Workload) -> String {
    let round = w.new_images_dir();
    let run = w.run_dump(&round, &["--pre-dump", "--track-mem"], &[]);
    assert!(run.success(), "pre-dump failed: {}{}", run.stderr, w.logs());
    format!(
        "../{}",
        round.file_name().and_then(|n| n.to_str()).expect("a name")
    )
}

/// Migrates `w` by prepared post-copy (`restore_extra`: more `ckpt-restore` options), asks
/// the copy to check itself (with the signals `check`, 100 ms apart) and returns the restore's log once it passed. The source must
/// be gone by SIGKILL, and the dump and the daemon must have finished cleanly.
fn prepared_post_copy(w: &mut Workload, restore_extra: &[&str], check: &[Signal]) -> String {
    prepared_migration(w, Pages::Lazy, restore_extra, check)
}

/// [`prepared_post_copy`], or with `Pages::AfterRound` the prepared end of a pre-copy.
fn prepared_migration(
    w: &mut Workload,
    pages: Pages,
    restore_extra: &[&str],
    check: &[Signal],
) -> String {
    let (mut source, mode) = match pages {
        Pages::Lazy => (
            LazySource::start_until(w, &["--prepare"], "inventory.img"),
            ["--lazy-pages"].as_slice(),
        ),
        Pages::AfterRound | Pages::LazyAfterRound => {
            let prev = pre_round(w);
            let dump = ["--prepare", "--track-mem", "--prev-images-dir", &prev];
            let mode = if pages == Pages::AfterRound {
                [].as_slice()
            } else {
                ["--lazy-pages"].as_slice()
            };
            (
                LazySource::start_mode(w, mode, &dump, "inventory.img"),
                mode,
            )
        }
    };
    let images = copy_images(&source.images);
    let mut daemon = (!mode.is_empty()).then(|| start_remote_lazy_pages(w, &images, source.port));
    let address = format!("127.0.0.1:{}", source.port);
    let mut extra = vec!["--prepared", address.as_str()];
    extra.extend(restore_extra);
    let log = images.with_extension("restore.log");
    let (mut restore, root) =
        ckpt_tests::start_restore_in_pid_ns(w, &images, &log, mode, &extra, || {
            format!("dump: {}\n{}", source.stderr(), source.log())
        });
    assert_ne!(root, w.pid(), "the copy kept the source's host pid");
    assert!(
        !holds_latency_request(root),
        "the copy has the restore's CPU latency request open"
    );
    // Some time at the destination, writing, before the check.
    for &signal in check {
        std::thread::sleep(Duration::from_millis(100));
        kill(root, signal).expect("signal the restored root");
    }
    let status = restore.wait().expect("wait for ckpt-restore");
    let restore_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        w.result_text().unwrap_or_default(),
        "PASS",
        "ckpt-restore ended with {status:?}; restore log:\n{restore_log}\ndump log:\n{}",
        source.log()
    );
    assert!(status.success(), "ckpt-restore ended with {status:?}");
    if let Some(daemon) = daemon.as_mut() {
        assert!(
            daemon.finish(Duration::from_secs(30)),
            "ckpt-lazy-pages does not finish{}",
            w.logs()
        );
    }
    let ended = source.wait(Duration::from_secs(30));
    assert!(
        ended.is_some_and(|s| s.success()),
        "the dump ended with {ended:?}: {}",
        source.stderr()
    );
    match w.wait_exit(Duration::from_secs(10)) {
        Some(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
        other => panic!("the source ended with {other:?}, not SIGKILL"),
    }
    restore_log
}

/// Whether `pid` has `/dev/cpu_dma_latency` open. The tools hold a request there while they
/// run (`ckpt_cli::IdlePoll`); the process a restore makes must not keep it alive.
fn holds_latency_request(pid: Pid) -> bool {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list the copy's fds");
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|to| to == Path::new("/dev/cpu_dma_latency"))
    })
}

/// Threads rewrite pages as fast as they can, the mappings never change: the destination
/// applies the registers and signal masks of the final freeze to the process it rebuilt from
/// the first images, and every page comes from the moment of that freeze.
#[test]
fn a_prepared_post_copy_applies_the_final_state_to_the_rebuilt_process() {
    let mut w = Workload::start("rewriter", &["--threads", "3", "--mib", "8"]);
    let log = prepared_post_copy(&mut w, &[], &[Signal::SIGUSR2]);
    assert!(
        !log.contains("fallback"),
        "unchanged mappings should not need a full restore:\n{log}"
    );
}

/// The same with the pages under each thread's registers sent with the final state.
#[test]
fn a_prepared_freeze_free_start_installs_the_hot_pages_from_the_final_freeze() {
    let mut w = Workload::start("rewriter", &["--threads", "2", "--mib", "4"]);
    prepared_post_copy(&mut w, &["--lazy-prefetch-hot"], &[Signal::SIGUSR2]);
}

/// A process that maps and unmaps all the time has other mappings at the final freeze than
/// in the first images: the destination drops what it built and restores the final images.
#[test]
fn a_prepared_restore_starts_over_when_the_mappings_changed() {
    let mut w = Workload::start("precopy", &["--mib", "4"]);
    // SIGUSR1 stops its writers, SIGUSR2 has it check itself.
    let log = prepared_post_copy(&mut w, &[], &[Signal::SIGUSR1, Signal::SIGUSR2]);
    assert!(
        log.contains("fallback"),
        "the mappings changed between the two freezes, yet no full restore:\n{log}"
    );
}

/// Threads rewrite pages as fast as they can after a pre-copy round: the destination
/// rebuilds the process from the round and the first images, and takes the pages written
/// since with the final registers, without starting over.
#[test]
fn a_prepared_pre_copy_end_writes_the_pages_written_since_into_the_rebuilt_process() {
    let mut w = Workload::start("rewriter", &["--threads", "3", "--mib", "8"]);
    let log = prepared_migration(&mut w, Pages::AfterRound, &[], &[Signal::SIGUSR2]);
    assert_fast_with_written_pages(&log);
}

/// Pages first touched while the migration goes on, some between the first images' look
/// at what was written and their page scan: none may pass for one of the round's, which
/// the destination does not have.
#[test]
fn a_prepared_pre_copy_end_takes_the_pages_first_touched_meanwhile() {
    let args = [
        "--threads",
        "2",
        "--mib",
        "16",
        "--pace",
        "10",
        "--untouched",
        "1",
    ];
    for pages in [Pages::AfterRound, Pages::LazyAfterRound] {
        let mut w = Workload::start("rewriter", &args);
        prepared_migration(&mut w, pages, &[], &[Signal::SIGUSR2]);
    }
}

/// Assisted post-copy, prepared: the pages written before the first images are lazy, those
/// written after cross with the final state, the rest are the round's.
#[test]
fn a_prepared_assisted_post_copy_takes_the_round_the_lazy_pages_and_those_written_since() {
    // A page every 20 us a thread: most pages are the round's when the first images are
    // taken, and some of those are written before the final freeze.
    let args = ["--threads", "2", "--mib", "8", "--pace", "20"];
    let mut w = Workload::start("rewriter", &args);
    let log = prepared_migration(&mut w, Pages::LazyAfterRound, &[], &[Signal::SIGUSR2]);
    assert_fast_with_written_pages(&log);
}

/// The restore's `log` took the fast path, and the delta put pages into the held tree.
fn assert_fast_with_written_pages(log: &str) {
    assert!(
        log.contains("fast path") && !log.contains("fallback"),
        "unchanged mappings should take the fast path:\n{log}"
    );
    let pages = log
        .split("hot_pages=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        pages.is_some_and(|n| n > 0),
        "no page written since the first images reached the destination:\n{log}"
    );
}

/// The same when the mappings change all the time: the final dump saves the memory
/// whole, and the destination restores from the final images.
#[test]
fn a_prepared_pre_copy_end_starts_over_when_the_mappings_changed() {
    let mut w = Workload::start("precopy", &["--mib", "4"]);
    let log = prepared_migration(
        &mut w,
        Pages::AfterRound,
        &[],
        &[Signal::SIGUSR1, Signal::SIGUSR2],
    );
    assert!(
        log.contains("fallback"),
        "the mappings changed between the two freezes, yet no full restore:\n{log}"
    );
}

/// No destination ever connects: the dump gives up and the process runs on, intact.
#[test]
fn the_source_runs_on_when_no_prepared_restore_comes() {
    let mut w = Workload::start("rewriter", &["--threads", "2", "--mib", "2"]);
    let source = LazySource::start_until(
        &mut w,
        &["--prepare", "--lazy-connect-timeout", "1"],
        "inventory.img",
    );
    runs_on_after(w, source);
}

/// The same at the end of a pre-copy: the dirty tracking comes off, and it runs on.
#[test]
fn the_source_runs_on_when_no_prepared_restore_comes_after_a_round() {
    let mut w = Workload::start("rewriter", &["--threads", "2", "--mib", "2"]);
    let prev = pre_round(&mut w);
    let dump = [
        "--prepare",
        "--track-mem",
        "--prev-images-dir",
        &prev,
        "--lazy-connect-timeout",
        "1",
    ];
    let source = LazySource::start_mode(&mut w, &[], &dump, "inventory.img");
    runs_on_after(w, source);
}

/// `source`, a prepared dump of `w` that no destination connects to, fails, and `w` runs
/// on and passes its check.
fn runs_on_after(mut w: Workload, mut source: LazySource) {
    let ended = source.wait(Duration::from_secs(30));
    assert!(
        ended.is_some_and(|s| !s.success()),
        "the dump ended with {ended:?} though no destination came"
    );
    let state = ckpt_tests::proc_state(w.pid());
    assert!(
        state.is_some_and(|s| s != 'T' && s != 't' && s != 'Z'),
        "the source is in state {state:?} after the migration gave up"
    );
    w.assert_pass();
}
