//! Post-copy on one machine: a process restored with its memory missing (`ckpt-restore
//! --lazy-pages`) while `ckpt-lazy-pages` serves each fault from the images and pushes the rest.
//!
//! A dump marks pages lazy only when it serves them itself (`--lazy-pages --port`), and then
//! the source keeps its pid, which a restore on the same machine needs. So these tests take an
//! ordinary dump and mark its large entries PE_LAZY|PE_PRESENT (lazy, and stored in the pages
//! image), which the daemon then serves from the images.

use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_tests::{run_tool, Workload};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

fn image(images: &Path, prefix: &str) -> std::path::PathBuf {
    ckpt_tests::image_files(images)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no {prefix}*.img in {}", images.display()))
}

/// `ckpt-img decode` of one image, as JSON.
fn decode(w: &Workload, file: &Path) -> serde_json::Value {
    let json = file.with_extension("json");
    let args = [
        "decode",
        "-i",
        file.to_str().expect("utf-8"),
        "-o",
        json.to_str().expect("utf-8"),
    ];
    let run = run_tool(&w.tools().img, &args.map(String::from), &[]);
    assert!(
        run.success(),
        "ckpt-img decode {}: {}",
        file.display(),
        run.stderr
    );
    let text = std::fs::read_to_string(&json).expect("read json");
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).expect("parse json")
}

/// The private anonymous VMAs that may be restored lazily (not the stack, vDSO or vvar), as
/// (start, end), from the mm image.
fn lazy_candidates(w: &Workload, mm_image: &Path) -> Vec<(u64, u64)> {
    const MAP_PRIVATE: u64 = 0x02;
    const MAP_ANONYMOUS: u64 = 0x20;
    const MAP_GROWSDOWN: u64 = 0x100;
    // CRIU's VMA_AREA_* status bits a lazy VMA must not have: stack, vsyscall, vdso, vvar.
    const SPECIAL: u64 = 0x2 | 0x4 | 0x8 | (1 << 12);
    let mm = decode(w, mm_image);
    let vmas = mm["entries"][0]["vmas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    vmas.iter()
        .filter(|v| {
            let flags = v["flags"].as_u64().unwrap_or(0);
            let status = v["status"].as_u64().unwrap_or(0);
            flags & (MAP_PRIVATE | MAP_ANONYMOUS) == MAP_PRIVATE | MAP_ANONYMOUS
                && flags & MAP_GROWSDOWN == 0
                && status & SPECIAL == 0
        })
        .filter_map(|v| Some((v["start"].as_u64()?, v["end"].as_u64()?)))
        .collect()
}

/// Marks the pagemap entries of at least `min_pages` pages that lie in lazy-capable VMAs as
/// PE_LAZY (their pages stay in the pages image, for the daemon to serve).
fn mark_lazy(w: &Workload, images: &Path, min_pages: u64) {
    let candidates = lazy_candidates(w, &image(images, "mm-"));
    let marked = mark_lazy_in(
        w,
        images,
        &image(images, "pagemap-"),
        &candidates,
        min_pages,
    );
    assert!(
        marked > 0,
        "no pagemap entry of {min_pages} pages or more to mark lazy"
    );
}

/// [`mark_lazy`] for every process of a tree dump (each `pagemap-N.img` with its
/// `mm-N.img`); returns how many processes got lazy pages.
fn mark_lazy_tree(w: &Workload, images: &Path, min_pages: u64) -> usize {
    let mut processes = 0;
    for pagemap in ckpt_tests::image_files(images) {
        let Some(pid) = pagemap
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("pagemap-"))
            .and_then(|n| n.strip_suffix(".img"))
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let candidates = lazy_candidates(w, &images.join(format!("mm-{pid}.img")));
        if mark_lazy_in(w, images, &pagemap, &candidates, min_pages) > 0 {
            processes += 1;
        }
    }
    processes
}

/// Marks the entries of one pagemap; returns how many it marked.
fn mark_lazy_in(
    w: &Workload,
    images: &Path,
    pagemap: &Path,
    candidates: &[(u64, u64)],
    min_pages: u64,
) -> usize {
    let mut doc = decode(w, pagemap);
    const PE_LAZY: u64 = 1 << 1;
    let mut marked = 0;
    for entry in doc["entries"]
        .as_array_mut()
        .expect("entries")
        .iter_mut()
        .skip(1)
    {
        let (Some(vaddr), Some(pages), Some(flags)) = (
            entry["vaddr"].as_u64(),
            entry["nr_pages"].as_u64(),
            entry["flags"].as_u64(),
        ) else {
            continue;
        };
        let end = vaddr + pages * 4096;
        let inside = candidates.iter().any(|&(s, e)| s <= vaddr && end <= e);
        if pages >= min_pages && inside {
            entry["flags"] = (flags | PE_LAZY).into();
            marked += 1;
        }
    }
    if marked == 0 {
        return 0;
    }
    let json = images.with_extension("pagemap.json");
    std::fs::write(&json, doc.to_string()).expect("write json");
    let args = [
        "encode",
        "-i",
        json.to_str().expect("utf-8"),
        "-o",
        pagemap.to_str().expect("utf-8"),
    ];
    let run = run_tool(&w.tools().img, &args.map(String::from), &[]);
    assert!(run.success(), "ckpt-img encode: {}", run.stderr);
    marked
}

/// How many bytes the daemon reported as lazy once the restore finished (its log's
/// `lazy_bytes=N`), to show the memory really was served and not restored eagerly.
fn lazy_bytes(images: &Path) -> Option<u64> {
    let log = std::fs::read_to_string(images.with_extension("lazy-pages.log")).ok()?;
    log.split_whitespace()
        .filter_map(|word| word.strip_prefix("lazy_bytes="))
        .filter_map(|n| n.parse().ok())
        .max()
}

/// A daemonised `ckpt-lazy-pages`, re-parented to us (a subreaper): killed and reaped on drop
/// if a test ends before it finished.
struct Daemon(Option<Pid>);

impl Daemon {
    /// Waits up to `timeout` for the daemon to exit; true if it did.
    fn finish(&mut self, timeout: Duration) -> bool {
        match self.0.take() {
            Some(pid) => reap_daemon(pid, timeout).is_some(),
            None => true,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// Starts `ckpt-lazy-pages` on `images` as a daemon; returns it once restore may connect.
fn start_lazy_pages(w: &Workload, images: &Path) -> Daemon {
    let daemon = w.tools().dump.with_file_name("ckpt-lazy-pages");
    let pidfile = images.with_extension("lazy-pages.pid");
    let run = run_tool(
        &daemon,
        &[
            "-D".into(),
            images.display().to_string(),
            "--daemon".into(),
            "--pidfile".into(),
            pidfile.display().to_string(),
            "-o".into(),
            images
                .with_extension("lazy-pages.log")
                .display()
                .to_string(),
            "-v".into(),
            "4".into(),
        ],
        &[],
    );
    assert!(
        run.success(),
        "ckpt-lazy-pages did not start: {}",
        run.stderr
    );
    Daemon(Some(ckpt_tests::read_pidfile(&pidfile)))
}

/// Waits up to `timeout` for a daemon re-parented to us (we are a subreaper) to exit.
fn reap_daemon(pid: Pid, timeout: Duration) -> Option<WaitStatus> {
    let start = Instant::now();
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(WaitStatus::StillAlive) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return None;
            }
            Ok(status) => return Some(status),
            // Not our child: it was reaped elsewhere.
            Err(_) => return Some(WaitStatus::StillAlive),
        }
    }
}

#[test]
fn lazily_restored_memory_arrives_intact() {
    let mut w = Workload::start("mem_large", &["--mib", "64"]);
    let images = w.dump(&[]);
    mark_lazy(&w, &images, 16);
    let mut daemon = start_lazy_pages(&w, &images);
    w.restore_with(&images, &["--lazy-pages"]);
    // The check touches every page at once, faulting in what the background push has not
    // brought in yet.
    w.assert_pass();
    assert!(
        daemon.finish(Duration::from_secs(30)),
        "ckpt-lazy-pages still runs 30 s after the process touched all its memory{}",
        w.logs()
    );
    let served = lazy_bytes(&images);
    assert!(
        served.is_some_and(|n| n >= 64 << 20),
        "ckpt-lazy-pages reports {served:?} lazy bytes, expected the 64 MiB region"
    );
}

#[test]
fn every_vma_kind_restores_lazily() {
    let mut w = Workload::start("mem_vmas", &[]);
    let images = w.dump(&[]);
    mark_lazy(&w, &images, 1);
    let mut daemon = start_lazy_pages(&w, &images);
    w.restore_with(&images, &["--lazy-pages"]);
    // Once every page is in, nothing of the lazy machinery may show: the check compares the
    // VmFlags of each region too (a userfaultfd left registered shows as "um").
    assert!(
        daemon.finish(Duration::from_secs(30)),
        "ckpt-lazy-pages does not finish{}",
        w.logs()
    );
    w.assert_pass();
    assert!(
        lazy_bytes(&images).is_some_and(|n| n > 0),
        "ckpt-lazy-pages served nothing"
    );
}

/// Dump, mark lazy, restore lazily with the daemon, wait for it to finish, check.
fn lazy_round_trip(name: &str, args: &[&str]) {
    let mut w = Workload::start(name, args);
    let images = w.dump(&[]);
    mark_lazy(&w, &images, 1);
    let mut daemon = start_lazy_pages(&w, &images);
    w.restore_with(&images, &["--lazy-pages"]);
    assert!(
        daemon.finish(Duration::from_secs(30)),
        "ckpt-lazy-pages does not finish{}",
        w.logs()
    );
    w.assert_pass();
}

#[test]
fn lazy_restore_leaves_no_extra_fd_behind() {
    // The files workload compares its whole fd table: a userfaultfd left in it shows.
    lazy_round_trip("files", &[]);
}

#[test]
fn threads_of_a_lazily_restored_process_run_intact() {
    lazy_round_trip("threads", &["--threads", "16"]);
}

/// A whole tree restored lazily: one hand-off session carries every process (zombies
/// included), each served from its own pagemap, and every process checks itself.
#[test]
fn a_lazily_restored_tree_runs_intact() {
    let mut w = Workload::start("family", &[]);
    let pids: Vec<Pid> = w
        .ready_text()
        .split_whitespace()
        .filter_map(|item| Some(Pid::from_raw(item.split_once('=')?.1.parse().ok()?)))
        .collect();
    let images = w.dump(&[]);
    // The dump killed the tree; its children came to us (a subreaper).
    for pid in pids {
        let start = Instant::now();
        while ckpt_tests::proc_state(pid).is_some() {
            let _ = waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pid {pid} of the dumped tree does not go away"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let processes = mark_lazy_tree(&w, &images, 1);
    assert!(
        processes >= 2,
        "only {processes} process(es) of the tree have lazy pages"
    );
    let mut daemon = start_lazy_pages(&w, &images);
    w.restore_with(&images, &["--lazy-pages"]);
    w.assert_pass();
    assert!(
        daemon.finish(Duration::from_secs(30)),
        "ckpt-lazy-pages does not finish{}",
        w.logs()
    );
    let log = std::fs::read_to_string(images.with_extension("lazy-pages.log")).unwrap_or_default();
    let tasks = log
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("tasks="))
        .filter_map(|n| n.parse::<u64>().ok())
        .max();
    assert!(
        tasks.is_some_and(|n| n >= processes as u64),
        "the daemon served {tasks:?} tasks, {processes} processes had lazy pages"
    );
}
