//! Compressed page traffic (`--compress-pages`, our zstd extension of the page-server
//! protocol), end to end: pre-copy rounds pushed to `ckpt-page-server`, and post-copy pages
//! pulled by `ckpt-lazy-pages` from the lazy dump. The `precopy` workload stamps every word
//! of a page with the same number, so its pages shrink a lot; it checks every page after
//! the restore. The tools' logs say how many bytes the pages took on the wire.

use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_tests::{run_tool, Workload};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// The numbers of the last log line that holds `message`: `key=N` for each key.
fn logged(log: &Path, message: &str, keys: &[&str]) -> Vec<u64> {
    let text =
        std::fs::read_to_string(log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no \"{message}\" in {}:\n{text}", log.display()));
    keys.iter()
        .map(|key| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {key}= in {line}"))
        })
        .collect()
}

const PAGE_SERVER_LINE: &str = "pages received: raw vs wire bytes";
const DUMP_LINE: &str = "pages sent: raw vs wire bytes";
const TRAFFIC: [&str; 3] = ["raw_bytes", "wire_bytes", "zstd_frames"];

/// A pre-dump and a final dump through `ckpt-page-server`, both compressed: the restored
/// process finds every page as written, and the pages took a fraction of their size on the
/// wire (as both ends count them).
#[test]
fn compressed_precopy_through_the_page_server_restores_intact() {
    let mut w = Workload::start("precopy", &["--mib", "16"]);
    let first = ckpt_tests::page_server_round(
        &mut w,
        None,
        &["--pre-dump", "--track-mem", "--compress-pages"],
    );
    std::thread::sleep(Duration::from_millis(100));
    w.stop_precopy_writers();
    let last =
        ckpt_tests::page_server_round(&mut w, Some(&first), &["--track-mem", "--compress-pages"]);
    assert!(
        w.wait_exit(Duration::from_secs(10)).is_some(),
        "the process still runs after the final dump"
    );
    ckpt_tests::check_images(w.tools(), &last);
    w.restore(&last);
    w.assert_pass();

    for images in [&first, &last] {
        let server = logged(
            &images.with_extension("page-server.log"),
            PAGE_SERVER_LINE,
            &TRAFFIC,
        );
        let dump = logged(&images.with_extension("dump.log"), DUMP_LINE, &TRAFFIC);
        eprintln!("{}: server {server:?}, dump {dump:?}", images.display());
        assert_eq!(server, dump, "both ends count the same bytes");
        let [raw, wire, zstd_frames] = server[..] else {
            unreachable!("three keys")
        };
        assert!(zstd_frames > 0, "no compressed frame crossed");
        assert!(
            wire * 10 < raw,
            "{raw} bytes of pages took {wire} bytes on the wire"
        );
    }
    // The pre-dump carried the whole 16 MiB region.
    let first_raw = logged(&first.with_extension("dump.log"), DUMP_LINE, &TRAFFIC)[0];
    assert!(first_raw >= 16 << 20, "the pre-dump sent {first_raw} bytes");
}

/// Without the option, the same round sends its pages raw.
#[test]
fn without_the_option_pages_cross_raw() {
    let mut w = Workload::start("precopy", &["--mib", "4"]);
    let images = ckpt_tests::page_server_round(&mut w, None, &["--pre-dump", "--track-mem"]);
    let [raw, wire, zstd_frames] = logged(
        &images.with_extension("page-server.log"),
        PAGE_SERVER_LINE,
        &TRAFFIC,
    )[..] else {
        unreachable!("three keys")
    };
    assert_eq!((wire, zstd_frames), (raw, 0));
    assert!(raw >= 4 << 20);
    w.stop_precopy_writers();
    w.assert_pass();
}

/// A daemonised `ckpt-lazy-pages`, killed and reaped on drop if the test ends first.
struct Daemon(Option<Pid>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// `ckpt-dump --lazy-pages` serving on loopback; killed and reaped on drop if still there.
struct LazySource {
    child: std::process::Child,
}

impl Drop for LazySource {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Post-copy with compressed answers: the lazy dump serves the frozen source's pages, the
/// daemon asks with `--compress-pages`, the copy (in a new PID namespace, the source still
/// holds the pid) checks every page, and the pages crossed compressed.
#[test]
fn compressed_post_copy_restores_intact() {
    let mut w = Workload::start("precopy", &["--mib", "8"]);
    w.stop_precopy_writers();
    let images = w.new_images_dir();
    let port = ckpt_tests::free_port().to_string();
    let dump_log = images.with_extension("dump.log");
    let child = std::process::Command::new(&w.tools().dump)
        .arg("-t")
        .arg(w.pid().to_string())
        .arg("-D")
        .arg(&images)
        .args(["--lazy-pages", "--address", "127.0.0.1", "--port", &port])
        .args([
            "--lazy-connect-timeout",
            "60",
            "--lazy-reconnect-window",
            "2",
        ])
        .arg("-v4")
        .arg("-o")
        .arg(&dump_log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ckpt-dump --lazy-pages");
    let mut source = LazySource { child };
    let start = Instant::now();
    while !images.join("stats-dump").exists() {
        if let Ok(Some(status)) = source.child.try_wait() {
            panic!("the lazy dump ended before serving: {status:?}{}", w.logs());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the lazy dump never committed its images{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let daemon_log = images.with_extension("lazy-pages.log");
    let pidfile = images.with_extension("lazy-pages.pid");
    let args: Vec<String> = [
        "-D",
        &images.display().to_string(),
        "--page-server",
        "--compress-pages",
        "--address",
        "127.0.0.1",
        "--port",
        &port,
        "--daemon",
        "--pidfile",
        &pidfile.display().to_string(),
        "-o",
        &daemon_log.display().to_string(),
        "-v",
        "4",
    ]
    .map(String::from)
    .to_vec();
    let lazy_bin = w.tools().dump.with_file_name("ckpt-lazy-pages");
    let run = run_tool(&lazy_bin, &args, &[]);
    assert!(
        run.success(),
        "ckpt-lazy-pages did not start: {}",
        run.stderr
    );
    let mut daemon = Daemon(Some(ckpt_tests::read_pidfile(&pidfile)));

    let restore_log = images.with_extension("restore.log");
    let (mut restore, restored) =
        ckpt_tests::start_lazy_restore(&w, &images, &restore_log, String::new);
    assert_ne!(restored, w.pid(), "the copy kept the source's host pid");
    // The check reads every page, faulting in what the background transfer has not.
    kill(restored, Signal::SIGUSR2).expect("SIGUSR2 to the restored process");
    let status = restore.wait().expect("wait for ckpt-restore");
    let verdict = w.result_text().unwrap_or_default();
    assert_eq!(
        verdict,
        "PASS",
        "ckpt-restore ended with {status:?}; restore log:\n{}",
        std::fs::read_to_string(&restore_log).unwrap_or_default()
    );
    let daemon_pid = daemon.0.take().expect("daemon pid");
    assert!(
        ckpt_tests::reap_within(daemon_pid, Duration::from_secs(30)),
        "ckpt-lazy-pages does not finish{}",
        w.logs()
    );
    let start = Instant::now();
    let ended = loop {
        if let Ok(Some(status)) = source.child.try_wait() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the lazy dump does not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(ended.success(), "the lazy dump ended with {ended:?}");
    // The source was killed once the copy had every page.
    match w.wait_exit(Duration::from_secs(10)) {
        Some(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
        other => panic!("the source ended with {other:?}, not SIGKILL"),
    }

    let served = logged(&dump_log, "lazy pages sent: raw vs wire bytes", &TRAFFIC);
    let received = logged(&daemon_log, "pages received: raw vs wire bytes", &TRAFFIC);
    eprintln!("source sent {served:?}, daemon received {received:?}");
    assert_eq!(served, received, "both ends count the same bytes");
    let [raw, wire, zstd_frames] = served[..] else {
        unreachable!("three keys")
    };
    assert!(zstd_frames > 0, "no compressed answer was used");
    assert!(raw >= 8 << 20, "only {raw} bytes of lazy pages were served");
    assert!(
        wire * 10 < raw,
        "{raw} bytes of lazy pages took {wire} bytes on the wire"
    );
}
