//! Post-copy on one machine: a process restored with its memory missing (`ckpt-restore
//! --lazy-pages`) while `ckpt-lazy-pages` serves each fault from the images and pushes the rest.
//!
//! A dump marks pages lazy only when it serves them itself (`--lazy-pages --port`), and then
//! the source keeps its pid, which a restore on the same machine needs. So these tests take an
//! ordinary dump and mark its large entries PE_LAZY|PE_PRESENT (lazy, and stored in the pages
//! image), which the daemon then serves from the images.

use std::path::Path;
use std::time::{Duration, Instant};

use ckpt_tests::{run_tool, start_remote_lazy_pages, Daemon, LazySource, Workload};
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
/// Starts `ckpt-lazy-pages` on `images` as a daemon; returns it once restore may connect.
fn start_lazy_pages(w: &Workload, images: &Path) -> Daemon {
    ckpt_tests::start_lazy_pages(w, images, None)
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

/// The pids of a `lazy_tree` workload, from its ready file (`R=.. c1=.. g=..`).
fn tree_pids(w: &Workload) -> Vec<Pid> {
    w.ready_text()
        .split_whitespace()
        .filter_map(|item| Some(Pid::from_raw(item.split_once('=')?.1.parse().ok()?)))
        .collect()
}

/// A loopback port nothing listens on right now.
/// Waits until every pid is gone (reaping those re-parented to us), asserting that each
/// died of SIGKILL when we were the one to reap it.
fn reap_killed_tree(pids: &[Pid], what: &str) {
    for &pid in pids {
        let start = Instant::now();
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => break,
                Ok(WaitStatus::StillAlive) | Ok(WaitStatus::Stopped(..)) => {}
                Ok(other) => panic!("{what}: pid {pid} ended with {other:?}, not SIGKILL"),
                // Not (or no longer) our child: its parent in the tree died before it.
                Err(_) if ckpt_tests::proc_state(pid).is_none() => break,
                Err(_) => {}
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: pid {pid} does not go away"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `PE_LAZY` in a pagemap entry's flags.
const PAGEMAP_LAZY: u64 = 2;

/// Remote post-copy of a process tree on one host: the frozen source tree serves the lazy
/// pages of each of its processes (asked for by image pid), the copy runs in a new PID
/// namespace while the source still holds the pids, every process checks all of its
/// memory, and the source tree is killed once the daemon has every page.
#[test]
fn a_tree_migrates_by_remote_post_copy() {
    let mut w = Workload::start("lazy_tree", &["--mib", "4", "--children", "2"]);
    let pids = tree_pids(&w);
    assert_eq!(pids.len(), 4, "ready file: {}", w.ready_text());
    let mut source = LazySource::start(&mut w, &["--lazy-reconnect-window", "2"]);
    let images = source.images.clone();
    // Every process left at least its regions (4 MiB each: 1024 pages) to the daemon.
    for pid in &pids {
        let pagemap = decode(&w, &images.join(format!("pagemap-{pid}.img")));
        let lazy: u64 = pagemap["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["flags"].as_u64().is_some_and(|f| f & PAGEMAP_LAZY != 0))
            .filter_map(|e| e["nr_pages"].as_u64())
            .sum();
        assert!(
            lazy >= 1024,
            "pid {pid} left only {lazy} pages lazy: {pagemap}"
        );
    }
    let mut daemon = start_remote_lazy_pages(&w, &images, source.port);
    let log = images.with_extension("restore.log");
    let (mut restore, root) =
        ckpt_tests::start_lazy_restore(&w, &images, &log, || format!("dump: {}", source.stderr()));
    assert_ne!(root, w.pid(), "the copy kept the source's host pid");
    kill(root, Signal::SIGUSR2).expect("SIGUSR2 to the restored root");
    let status = restore.wait().expect("wait for ckpt-restore");
    let verdict = w.result_text().unwrap_or_default();
    assert_eq!(
        verdict,
        "PASS",
        "ckpt-restore ended with {status:?}; restore log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "ckpt-restore ended with {status:?}");
    assert!(
        daemon.finish(Duration::from_secs(30)),
        "ckpt-lazy-pages does not finish{}",
        w.logs()
    );
    let ended = source.wait(Duration::from_secs(30));
    assert!(
        ended.is_some_and(|s| s.success()),
        "the lazy dump ended with {ended:?}: {}",
        source.stderr()
    );
    // Two running copies never exist: the whole source tree was killed.
    match w.wait_exit(Duration::from_secs(10)) {
        Some(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
        other => panic!("the source root ended with {other:?}, not SIGKILL"),
    }
    reap_killed_tree(&pids[1..], "the source tree");
    let dump_log = std::fs::read_to_string(images.with_extension("dump.log")).unwrap_or_default();
    assert!(
        dump_log.contains("processes=4"),
        "the dump did not serve four processes"
    );
}

/// The daemon dies before the destination resumed: the whole source tree runs on, intact.
#[test]
fn a_tree_source_resumes_when_the_daemon_dies_before_the_destination_runs() {
    let mut w = Workload::start("lazy_tree", &["--mib", "2", "--children", "2"]);
    let pids = tree_pids(&w);
    let mut source = LazySource::start(&mut w, &["--lazy-reconnect-window", "2"]);
    let images = source.images.clone();
    let daemon = start_remote_lazy_pages(&w, &images, source.port);
    // It connected to the source on start; it dies before any restore hands it a task.
    drop(daemon);
    let ended = source.wait(Duration::from_secs(30));
    assert!(
        ended.is_some_and(|s| !s.success()),
        "the lazy dump ended with {ended:?} though no destination ran"
    );
    let stderr = source.stderr();
    assert!(
        stderr.contains("resumed"),
        "the dump's error does not say the source resumed: {stderr}"
    );
    for pid in &pids {
        let state = ckpt_tests::proc_state(*pid);
        assert!(
            state.is_some_and(|s| s != 'T' && s != 't' && s != 'Z'),
            "source pid {pid} is in state {state:?} after the failed migration"
        );
    }
    w.assert_pass();
}

/// One page-server GET of our daemon's kind (flagged: the destination runs), as the source
/// answers it: the page count of its reply and the bytes that follow.
fn get_page(stream: &mut std::net::TcpStream, pid: u64, vaddr: u64) -> (u64, Vec<u8>) {
    use std::io::{Read, Write};
    const PS_IOV_GET: u32 = 7;
    const GET_RESUMED: u32 = 0x8000;
    let mut frame = [0u8; 32];
    frame[0..4].copy_from_slice(&(GET_RESUMED << 16 | PS_IOV_GET).to_le_bytes());
    frame[8..16].copy_from_slice(&1u64.to_le_bytes());
    frame[16..24].copy_from_slice(&vaddr.to_le_bytes());
    frame[24..32].copy_from_slice(&pid.to_le_bytes());
    stream.write_all(&frame).expect("send a GET");
    let mut reply = [0u8; 32];
    stream.read_exact(&mut reply).expect("read the reply");
    let mut word = [0u8; 8];
    word.copy_from_slice(&reply[8..16]);
    let pages = u64::from_le_bytes(word);
    word.copy_from_slice(&reply[24..32]);
    assert_eq!(u64::from_le_bytes(word), pid, "the reply names another pid");
    let mut data = vec![0u8; usize::try_from(pages * 4096).expect("a small reply")];
    stream.read_exact(&mut data).expect("read the pages");
    (pages, data)
}

/// A daemon that asked for pages of the tree's processes after the destination resumed, then
/// vanished: each pid was served from its own memory (the same address holds different
/// bytes in the root and its children), a pid outside the tree got nothing, the tree stays
/// stopped while a reconnection may come, then every process is killed, none resumed.
#[test]
fn a_tree_source_serves_each_pid_and_dies_whole_when_the_link_is_lost_after_resume() {
    let mut w = Workload::start("lazy_tree", &["--mib", "1", "--children", "2"]);
    let pids = tree_pids(&w);
    assert_eq!(pids.len(), 4, "ready file: {}", w.ready_text());
    let mut source = LazySource::start(&mut w, &["--lazy-reconnect-window", "1"]);
    // Region A: mapped by the root before forking, at the same address in every process.
    let a = w
        .ready_text()
        .split_whitespace()
        .find_map(|item| u64::from_str_radix(item.strip_prefix("A=0x")?, 16).ok())
        .unwrap_or_else(|| panic!("no A= in the ready file: {}", w.ready_text()));
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", source.port)).expect("connect to the source");
    // Its first word is the pattern of whoever wrote it last: the root 1, child k 10 + k,
    // the grandchild its parent's (child 1's) 11.
    for (name, seed) in [("R", 1u64), ("c1", 11), ("c2", 12), ("g", 11)] {
        let pid = u64::try_from(w.ready_field(name)).expect("positive pid");
        let (n, data) = get_page(&mut stream, pid, a);
        assert_eq!(
            n, 1,
            "{name} (pid {pid}): the page at {a:#x} was not served"
        );
        let mut first = [0u8; 8];
        first.copy_from_slice(&data[..8]);
        assert_eq!(
            u64::from_le_bytes(first),
            seed << 48,
            "{name} (pid {pid}) was served another process's page at {a:#x}"
        );
    }
    let (n, _) = get_page(&mut stream, 1, a);
    assert_eq!(n, 0, "pages served for a pid outside the tree");
    drop(stream);
    // Within the reconnection window the source tree stays stopped.
    std::thread::sleep(Duration::from_millis(200));
    for pid in &pids {
        let state = ckpt_tests::proc_state(*pid);
        assert!(
            state.is_some_and(|s| s == 'T' || s == 't'),
            "source pid {pid} is in state {state:?} while the daemon may come back"
        );
    }
    let ended = source.wait(Duration::from_secs(30));
    assert!(
        ended.is_some_and(|s| s.success()),
        "the lazy dump ended with {ended:?}: {}",
        source.stderr()
    );
    match w.wait_exit(Duration::from_secs(10)) {
        Some(WaitStatus::Signaled(_, Signal::SIGKILL, _)) => {}
        other => panic!("the source root ended with {other:?}, not SIGKILL"),
    }
    reap_killed_tree(&pids[1..], "the source tree");
}
