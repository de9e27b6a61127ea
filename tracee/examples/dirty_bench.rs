//! Collect time of dirty-page tracking for 1 GiB of a child's memory at
//! 0, 1, 10 and 100 % of its pages written between collects.
//!
//! `cargo run --release -p tracee --example dirty_bench [-- --hash]`
//! (`--hash` also measures the page-hash back-end; run as root).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use tracee::dirty::{BackendChoice, BackendKind, DirtyTracker, HolderOptions};
use tracee::ptrace::{SeizeOptions, SeizedProcess};
use tracee::{proc, Pid, RemoteAddr, PAGE_SIZE};

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB / PAGE_SIZE;
const RUNS: usize = 7;

fn pipe() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned these fds; each File takes one.
    let r = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { File::from_raw_fd(fds[1]) };
    (r, w)
}

/// The child: maps 1 GiB (no huge pages), fills it, reports its address,
/// then on each 8-byte command `step` writes every `step`-th page.
fn child(cmd: i32, reply: i32) -> ! {
    // SAFETY: a fresh anonymous mapping.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GIB as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    // SAFETY: advice on the mapping just made.
    unsafe { libc::madvise(base, GIB as usize, libc::MADV_NOHUGEPAGE) };
    let base = base as u64;
    let mut round = 0u8;
    let mut step = 1u64;
    loop {
        round = round.wrapping_add(1);
        if step != 0 {
            for p in (0..PAGES).step_by(usize::try_from(step).unwrap_or(1)) {
                let at = (base + p * PAGE_SIZE) as *mut u8;
                // SAFETY: inside the mapping.
                unsafe { at.write_volatile(round) };
            }
        }
        // SAFETY: writing a live local.
        unsafe { libc::write(reply, (&base as *const u64).cast(), 8) };
        let mut c = [0u8; 8];
        // SAFETY: reading into a live local.
        if unsafe { libc::read(cmd, c.as_mut_ptr().cast(), 8) } != 8 {
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) };
        }
        step = u64::from_ne_bytes(c);
    }
}

struct Child {
    pid: Pid,
    cmd: File,
    reply: File,
    base: u64,
}

impl Child {
    fn start() -> Child {
        let (cmd_r, cmd_w) = pipe();
        let (reply_r, reply_w) = pipe();
        // SAFETY: this program is single-threaded here; the child runs `child` only.
        let raw = unsafe { libc::fork() };
        assert!(raw >= 0, "fork");
        if raw == 0 {
            child(cmd_r.as_raw_fd(), reply_w.as_raw_fd());
        }
        let mut c = Child {
            pid: Pid::from_raw(raw).expect("pid"),
            cmd: cmd_w,
            reply: reply_r,
            base: 0,
        };
        c.base = c.wait_reply();
        c
    }

    fn wait_reply(&mut self) -> u64 {
        let mut r = [0u8; 8];
        self.reply.read_exact(&mut r).expect("child reply");
        u64::from_ne_bytes(r)
    }

    /// Writes every `step`-th page (0: none) and waits until done.
    fn dirty(&mut self, step: u64) {
        self.cmd.write_all(&step.to_ne_bytes()).expect("command");
        self.wait_reply();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill and reap our own child.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above.
        unsafe { libc::waitpid(self.pid.as_raw(), &mut status, 0) };
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench(kind: BackendKind) {
    let mut c = Child::start();
    let dir = std::env::temp_dir().join(format!("dirty-bench-{}", std::process::id()));
    let opts = HolderOptions {
        dir,
        idle_timeout: Duration::from_secs(60),
    };
    let maps: Vec<_> = proc::maps::read(c.pid)
        .expect("maps")
        .into_iter()
        .filter(|e| e.start == RemoteAddr(c.base))
        .collect();
    assert_eq!(maps.len(), 1, "the 1 GiB VMA");
    let mut frozen = SeizedProcess::freeze(c.pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::arm(leader, BackendChoice::Only(kind), &opts).expect("arm");
    let t0 = Instant::now();
    t.collect(&maps).expect("first collect");
    let first = t0.elapsed();
    frozen.resume().expect("resume");
    println!(
        "{kind:?}: arm + first collect (register, protect 1 GiB): {:.2} ms",
        ms(first)
    );
    for (label, step) in [("0%", 0), ("1%", 100), ("10%", 10), ("100%", 1)] {
        let mut times = Vec::new();
        let mut pages = 0;
        for _ in 0..RUNS {
            c.dirty(step);
            let t0 = Instant::now();
            let set = t.collect(&maps).expect("collect");
            times.push(t0.elapsed());
            pages = set.written_pages();
        }
        times.sort();
        println!(
            "{kind:?}: 1 GiB, {label:>4} dirty ({pages:>6} pages): collect min {:.3} ms, median {:.3} ms ({RUNS} runs)",
            ms(times[0]),
            ms(times[RUNS / 2]),
        );
    }
    t.release().expect("release");
}

fn main() {
    bench(BackendKind::UffdWp);
    if std::env::args().any(|a| a == "--hash") {
        bench(BackendKind::PageHash);
    }
}
