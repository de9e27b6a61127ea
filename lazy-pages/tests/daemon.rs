//! End-to-end tests of `ckpt-lazy-pages` without ckpt-restore: a small C program plays a
//! lazily restored process that is its own restorer (it registers its memory and hands the
//! userfaultfd over with the hand-off protocol), and checks every byte it reads against
//! the pattern written into the images here.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ckpt_page_server::{Command as PsCommand, Frame};
use images_format::{ImageDir, ImageKind, PageFlags, PagesReader, PAGE_SIZE};

const A_ADDR: u64 = 0x5000_0000_0000;
const A_PAGES: u64 = 256;
const B_ADDR: u64 = 0x5000_1000_0000;
const B_LAZY: u64 = 8;
const D_ADDR: u64 = 0x5000_3000_0000;
/// The pid in the images; deliberately not a host pid of anything.
const IMAGE_PID: i32 = 4242;

fn pattern_pages(image_addr: u64, pages: u64) -> Vec<u8> {
    (0..pages * PAGE_SIZE / 8)
        .flat_map(|i| {
            (image_addr + i * 8)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .to_ne_bytes()
        })
        .collect()
}

/// The C workload, built once per test binary.
fn child_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workload/lazy_child.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lazy_child");
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("run cc");
        assert!(status.success(), "cc {} failed", src.display());
        out
    })
}

/// Images of IMAGE_PID: region A all lazy, B's first pages lazy, D present but not lazy.
/// With `with_data` false the lazy pages have no data (a remote source serves them).
fn write_images(dir: &ImageDir, with_data: bool) {
    write_images_of(dir, IMAGE_PID, 1, with_data);
}

fn write_images_of(dir: &ImageDir, pid: i32, pages_id: u32, with_data: bool) {
    let mut w = dir
        .pagemap_writer(ImageKind::Pagemap, pid as u64, pages_id)
        .expect("pagemap writer");
    for (addr, pages) in [(A_ADDR, A_PAGES), (B_ADDR, B_LAZY)] {
        if with_data {
            w.add_with_data(
                addr,
                PageFlags::LAZY | PageFlags::PRESENT,
                &pattern_pages(addr, pages),
            )
            .expect("lazy pages");
        } else {
            w.add_hole(addr, pages, PageFlags::LAZY).expect("lazy hole");
        }
    }
    w.add_present(D_ADDR, &pattern_pages(D_ADDR, 1))
        .expect("present page");
    w.finish().expect("finish images");
}

/// Kills and reaps what a test started, by pid, if it is still running.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn wait_timeout(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text
}

struct Setup {
    _tmp: tempfile::TempDir,
    images: PathBuf,
    work: PathBuf,
}

fn setup(with_data: bool) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let dir = ImageDir::create_dir(&images).expect("image dir");
    write_images(&dir, with_data);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).expect("work dir");
    Setup {
        _tmp: tmp,
        images,
        work,
    }
}

fn start_daemon(s: &Setup, extra: &[String]) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_ckpt-lazy-pages"))
        .arg("-D")
        .arg(&s.images)
        .arg("-W")
        .arg(&s.work)
        .args(["-v", "1"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ckpt-lazy-pages");
    let socket = s.work.join(ckpt_lazy_pages::SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn start_child(s: &Setup, mode: &str) -> Child {
    start_child_as(s, mode, IMAGE_PID)
}

fn start_child_as(s: &Setup, mode: &str, image_pid: i32) -> Child {
    Command::new(child_binary())
        .arg(s.work.join(ckpt_lazy_pages::SOCKET_NAME))
        .arg(mode)
        .arg(image_pid.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lazy_child")
}

/// Runs a mode to the end; both the workload and the daemon must exit 0.
fn run_mode(mode: &str, s: &Setup, daemon_args: &[String]) {
    let daemon = start_daemon(s, daemon_args);
    let mut running = Running(vec![daemon]);
    running.0.push(start_child(s, mode));
    let child_status = wait_timeout(&mut running.0[1], Duration::from_secs(30), "lazy_child");
    let daemon_status = wait_timeout(&mut running.0[0], Duration::from_secs(30), "the daemon");
    let child_err = stderr_of(&mut running.0[1]);
    let daemon_err = stderr_of(&mut running.0[0]);
    assert!(
        child_status.success(),
        "{mode}: workload {child_status}: {child_err}\ndaemon: {daemon_err}"
    );
    assert!(
        daemon_status.success(),
        "{mode}: daemon {daemon_status}: {daemon_err}"
    );
}

#[test]
fn faults_are_served_byte_exact_including_kernel_mode_reads() {
    run_mode("basic", &setup(true), &[]);
}

#[test]
fn a_fault_block_crossing_a_vma_boundary_is_served() {
    // Regression: the whole-block UFFDIO_COPY failed with ENOENT, pages were dropped from
    // the front of the block and the faulting thread waited forever.
    run_mode("split", &setup(true), &[]);
}

#[test]
fn a_fork_while_pages_are_missing_gives_both_processes_their_pages() {
    run_mode("fork", &setup(true), &[]);
}

#[test]
fn munmap_mremap_and_dontneed_of_missing_pages_are_followed() {
    run_mode("mm", &setup(true), &[]);
}

#[test]
fn threads_faulting_on_the_same_pages_at_once() {
    run_mode("threads", &setup(true), &[]);
}

#[test]
fn a_process_exiting_early_does_not_keep_the_daemon() {
    run_mode("early_exit", &setup(true), &[]);
}

#[test]
fn the_daemon_exits_once_the_background_transfer_is_done() {
    let s = setup(true);
    let daemon = start_daemon(&s, &[]);
    let mut running = Running(vec![daemon]);
    running.0.push(start_child(&s, "background"));
    // The workload does not touch its memory until told: every page goes in the
    // background, and the daemon must exit on its own.
    let daemon_status = wait_timeout(&mut running.0[0], Duration::from_secs(30), "the daemon");
    let daemon_err = stderr_of(&mut running.0[0]);
    assert!(
        daemon_status.success(),
        "daemon {daemon_status}: {daemon_err}"
    );
    let mut stdin = running.0[1].stdin.take().expect("stdin");
    stdin.write_all(b"g").expect("tell the workload");
    let child_status = wait_timeout(&mut running.0[1], Duration::from_secs(30), "lazy_child");
    let child_err = stderr_of(&mut running.0[1]);
    assert!(
        child_status.success(),
        "workload {child_status}: {child_err}"
    );
}

#[test]
fn the_background_transfer_waits_its_delay_after_the_end_marker() {
    let took =
        background_transfer_with(&["--background-delay", "400", "--background-quiet", "400"]);
    assert!(
        took >= Duration::from_millis(400),
        "every page was in after {took:?}, before the 400 ms delay"
    );
}

/// A tree that does not fault after the end marker has had its first steps: the rest of
/// its pages come once the faults stay quiet (1 ms), not after the whole delay.
#[test]
fn the_background_transfer_starts_early_when_no_fault_comes() {
    let took = background_transfer_with(&["--background-delay", "2000"]);
    assert!(
        took < Duration::from_millis(1500),
        "the quiet tree waited {took:?} for its pages, the whole 2 s delay"
    );
}

/// Runs the daemon (with `options`) for a child that touches nothing until every page is
/// in, which it then checks; returns how long the daemon took to have every page.
fn background_transfer_with(options: &[&str]) -> Duration {
    let s = setup(true);
    let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    let daemon = start_daemon(&s, &options);
    let mut running = Running(vec![daemon]);
    let start = Instant::now();
    running.0.push(start_child(&s, "background"));
    // A megabyte of pages takes milliseconds; the daemon exits once they are in.
    let daemon_status = wait_timeout(&mut running.0[0], Duration::from_secs(30), "the daemon");
    let took = start.elapsed();
    let daemon_err = stderr_of(&mut running.0[0]);
    assert!(
        daemon_status.success(),
        "daemon {daemon_status}: {daemon_err}"
    );
    let mut stdin = running.0[1].stdin.take().expect("stdin");
    stdin.write_all(b"g").expect("tell the workload");
    let child_status = wait_timeout(&mut running.0[1], Duration::from_secs(30), "lazy_child");
    let child_err = stderr_of(&mut running.0[1]);
    assert!(
        child_status.success(),
        "workload {child_status}: {child_err}"
    );
    took
}

#[test]
fn restore_going_away_before_the_end_marker_is_an_error() {
    let s = setup(true);
    let daemon = start_daemon(&s, &[]);
    let mut running = Running(vec![daemon]);
    let stream = std::os::unix::net::UnixStream::connect(s.work.join(ckpt_lazy_pages::SOCKET_NAME))
        .expect("connect");
    let mut handoff = ckpt_lazy_pages::LazyHandoff::from_stream(stream);
    handoff.send_zombie(7).expect("zombie");
    drop(handoff);
    let status = wait_timeout(&mut running.0[0], Duration::from_secs(10), "the daemon");
    let err = stderr_of(&mut running.0[0]);
    assert!(!status.success(), "the daemon exited 0");
    assert!(err.contains("before every task was restored"), "{err}");
}

/// Serves `PS_IOV_GET` from `source`'s images, at most [`MAX_ANSWER`] pages per answer,
/// until CLOSE.
/// Fewer pages than a fault block: faults and background requests alike get short answers
/// and must ask again for the rest.
const MAX_ANSWER: u64 = 3;

fn page_server(listener: TcpListener, source: PathBuf) -> u64 {
    let (mut s, _) = listener.accept().expect("accept");
    // Each answer is two writes: without this, Nagle holds the second for an ACK.
    s.set_nodelay(true).expect("nodelay");
    let dir = ImageDir::new(source).expect("source dir");
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, IMAGE_PID as u64).expect("pagemap");
    let mut gets = 0;
    loop {
        let mut req = [0u8; 32];
        s.read_exact(&mut req).expect("request");
        let request = Frame::decode(&req).expect("a frame");
        match request.command {
            PsCommand::Get => {
                gets += 1;
                assert_eq!(request.dst_id, IMAGE_PID as u64);
                let n = request.nr_pages.min(MAX_ANSWER);
                let mut data = vec![0u8; (n * PAGE_SIZE) as usize];
                reader.read_pages(request.vaddr, &mut data).expect("pages");
                s.write_all(&Frame::add_f(request.dst_id, request.vaddr, n, 4).encode())
                    .expect("reply");
                s.write_all(&data).expect("data");
            }
            PsCommand::Close => {
                s.write_all(&0i32.to_ne_bytes()).expect("status");
                return gets;
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
}

fn remote_run(mode: &str) {
    // The daemon's images say which pages are lazy but hold none of them.
    let s = setup(false);
    let source = tempfile::tempdir().expect("tempdir");
    let source_dir = ImageDir::create_dir(source.path().join("src")).expect("source dir");
    write_images(&source_dir, true);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let path = source_dir.path().to_owned();
    let server = std::thread::spawn(move || page_server(listener, path));
    run_mode(
        mode,
        &s,
        &[
            "--page-server".into(),
            "--address".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ],
    );
    let gets = server.join().expect("page server");
    assert!(
        gets >= (A_PAGES + B_LAZY) / MAX_ANSWER,
        "only {gets} requests"
    );
}

#[test]
fn remote_pages_come_from_the_page_server() {
    remote_run("basic");
}

#[test]
fn remote_background_transfer_with_short_answers() {
    remote_run("mm");
}

/// Remote answers arrive while requests are in flight: a fork, a VMA split and threads
/// faulting on pages already asked for must still get every page right.
#[test]
fn remote_pages_with_requests_in_flight_through_fork_split_and_threads() {
    for mode in ["fork", "split", "threads"] {
        remote_run(mode);
    }
}

#[test]
fn a_missing_pagemap_fails_with_the_pid() {
    let s = setup(true);
    let daemon = start_daemon(&s, &[]);
    let mut running = Running(vec![daemon]);
    let stream = std::os::unix::net::UnixStream::connect(s.work.join(ckpt_lazy_pages::SOCKET_NAME))
        .expect("connect");
    let mut handoff = ckpt_lazy_pages::LazyHandoff::from_stream(stream);
    use std::os::fd::AsFd;
    let file = tempfile::tempfile().expect("any fd");
    handoff.send_uffd(999, file.as_fd()).expect("send");
    let status = wait_timeout(&mut running.0[0], Duration::from_secs(10), "the daemon");
    let err = stderr_of(&mut running.0[0]);
    assert!(!status.success());
    assert!(err.contains("pid 999"), "{err}");
}

#[test]
fn several_tasks_handed_over_on_one_connection_taken_with_pidfd_getfd() {
    use std::io::{BufRead, BufReader};
    use tracee::{PidFd, TargetFd};

    let s = setup(true);
    let dir = ImageDir::new(&s.images).expect("images");
    write_images_of(&dir, 4343, 2, true);
    let daemon = start_daemon(&s, &[]);
    let mut running = Running(vec![daemon]);
    for pid in [IMAGE_PID, 4343] {
        running.0.push(start_child_as(&s, "external", pid));
    }
    let stream = std::os::unix::net::UnixStream::connect(s.work.join(ckpt_lazy_pages::SOCKET_NAME))
        .expect("connect");
    let mut handoff = ckpt_lazy_pages::LazyHandoff::from_stream(stream);
    for (i, image_pid) in [(1, IMAGE_PID), (2, 4343)] {
        let child = &mut running.0[i];
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("uffd number");
        let target_fd: i32 = line.trim().parse().expect("an fd number");
        let host_pid = tracee::Pid::from_raw(i32::try_from(child.id()).expect("pid")).expect("pid");
        let uffd = PidFd::open(host_pid)
            .expect("pidfd")
            .getfd(TargetFd(target_fd))
            .expect("pidfd_getfd");
        use std::os::fd::AsFd;
        handoff.send_uffd(image_pid, uffd.as_fd()).expect("send");
    }
    handoff.send_zombie(4444).expect("zombie");
    handoff.finish().expect("finish");
    for i in [1, 2] {
        let mut stdin = running.0[i].stdin.take().expect("stdin");
        stdin.write_all(b"g").expect("go");
    }
    for i in [1, 2] {
        let status = wait_timeout(&mut running.0[i], Duration::from_secs(30), "lazy_child");
        let err = stderr_of(&mut running.0[i]);
        assert!(status.success(), "task {i}: {status}: {err}");
    }
    let status = wait_timeout(&mut running.0[0], Duration::from_secs(30), "the daemon");
    let err = stderr_of(&mut running.0[0]);
    assert!(status.success(), "daemon {status}: {err}");
}

#[test]
fn pages_from_ckpt_page_server_serving_lazy_pages() {
    use ckpt_page_server::{PageServer, ServerOptions};

    let s = setup(false);
    let source = tempfile::tempdir().expect("tempdir");
    let source_dir = ImageDir::create_dir(source.path().join("src")).expect("source dir");
    write_images(&source_dir, true);
    let mut opts = ServerOptions::new(source_dir.path());
    opts.lazy_pages = true;
    let server = PageServer::bind("127.0.0.1:0".parse().expect("addr"), opts).expect("bind");
    let port = server.local_addr().expect("addr").port();
    let serving = std::thread::spawn(move || server.serve_one());
    run_mode(
        "fork",
        &s,
        &[
            "--page-server".into(),
            "--address".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ],
    );
    let stats = serving.join().expect("server thread").expect("session");
    assert!(stats.pages_served >= A_PAGES + B_LAZY, "{stats:?}");
}
