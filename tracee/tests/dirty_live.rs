//! Dirty-page tracking on live child processes this test starts, drives over
//! a pipe, kills and reaps itself.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use tracee::dirty::{
    Attach, BackendChoice, BackendKind, DirtySet, DirtyTracker, HolderOptions, LostReason,
    PageRange, VmaDirty, WholeReason,
};
use tracee::ptrace::{SeizeOptions, SeizedProcess};
use tracee::{proc, Pid, RemoteAddr, PAGE_SIZE};

const OP_WRITE: u64 = 1;
const OP_MMAP: u64 = 2;
const OP_MUNMAP: u64 = 3;
const OP_MREMAP: u64 = 4;
const OP_DONTNEED: u64 = 5;
const OP_HUGEPAGE: u64 = 6;
const OP_SPRAY: u64 = 7;
const OP_EXEC: u64 = 8;
const OP_MPROTECT: u64 = 9;

/// Words of the shared page the spraying child and the test use.
const SHARED_STOP: usize = 0;
const SHARED_WRITES: usize = 1;
/// Bitmap of pages the child sprayed, after the two words.
const SHARED_BITMAP_PAGES: usize = 16;

/// A forked child that runs commands from a pipe with raw syscalls only (so
/// forking from the multi-threaded test harness is sound). Killed and reaped
/// on drop.
struct Workload {
    pid: Pid,
    cmd: File,
    reply: File,
    shared: *mut u64,
}

fn pipe() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a live array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned these two fds; each File takes one.
    let r = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { File::from_raw_fd(fds[1]) };
    (r, w)
}

/// The child's loop: read a 32-byte command, act, answer 8 bytes.
fn child_loop(cmd: i32, reply: i32, shared: *mut u64) -> ! {
    // Other tests fork too: drop what this child inherited from them (a
    // tracking userfaultfd kept open here would outlive its release).
    for fd in 3..4096 {
        if fd != cmd && fd != reply {
            // SAFETY: closing inherited fds this child never uses.
            unsafe { libc::close(fd) };
        }
    }
    loop {
        let mut c = [0u64; 4];
        // SAFETY: reading into a live local array of 32 bytes.
        let n = unsafe { libc::read(cmd, c.as_mut_ptr().cast(), 32) };
        if n != 32 {
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(0) };
        }
        let [op, a, b, s] = c;
        let answer: u64 = match op {
            OP_WRITE => {
                // Pages a + i*s*4096 for i in 0..b, one byte each.
                for i in 0..b {
                    let p = (a + i * s * PAGE_SIZE) as *mut u8;
                    // SAFETY: the test only names pages it had the child map;
                    // the content changes, so that page hashes see the write.
                    let old = unsafe { p.read_volatile() };
                    // SAFETY: as above.
                    unsafe { p.write_volatile(old.wrapping_add(1)) };
                }
                0
            }
            OP_MMAP => {
                // A page of hole on each side, so that the kernel does not
                // merge it with a neighbour.
                let len = a as usize + 2 * PAGE_SIZE as usize;
                // SAFETY: a fresh anonymous mapping; no memory is passed.
                let r = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if r == libc::MAP_FAILED {
                    u64::MAX
                } else {
                    let start = r as u64;
                    // SAFETY: trimming the mapping just made.
                    unsafe { libc::munmap(r, PAGE_SIZE as usize) };
                    // SAFETY: as above.
                    unsafe { libc::munmap((start + PAGE_SIZE + a) as *mut _, PAGE_SIZE as usize) };
                    start + PAGE_SIZE
                }
            }
            OP_MUNMAP => {
                // SAFETY: unmapping a range the test had the child map.
                let r = unsafe { libc::munmap(a as *mut _, b as usize) };
                r as u64
            }
            OP_MREMAP => {
                // SAFETY: moving a mapping the test had the child map.
                let r = unsafe {
                    libc::mremap(
                        a as *mut _,
                        b as usize,
                        b as usize,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        s as *mut libc::c_void,
                    )
                };
                r as u64
            }
            OP_DONTNEED => {
                // SAFETY: dropping pages of a mapping the test had the child map.
                let r = unsafe { libc::madvise(a as *mut _, b as usize, libc::MADV_DONTNEED) };
                r as u64
            }
            OP_HUGEPAGE => {
                // SAFETY: advice on a mapping the test had the child map.
                let r = unsafe { libc::madvise(a as *mut _, b as usize, libc::MADV_HUGEPAGE) };
                r as u64
            }
            OP_SPRAY => {
                // Random pages of [a, a + b pages) until told to stop; each
                // is recorded in the shared bitmap after it is written.
                let mut x = s | 1;
                let stop = shared.wrapping_add(SHARED_STOP);
                // SAFETY: `shared` is the live shared mapping set up before fork.
                while unsafe { stop.read_volatile() } == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let page = x % b;
                    // SAFETY: inside the mapping the test named.
                    unsafe { ((a + page * PAGE_SIZE) as *mut u8).write_volatile(x as u8) };
                    // SAFETY: the bitmap lies in the shared mapping (b <= its capacity).
                    let w = shared.wrapping_add(2 + (page / 64) as usize);
                    // SAFETY: as above.
                    let bits = unsafe { w.read_volatile() };
                    // SAFETY: as above.
                    unsafe { w.write_volatile(bits | 1 << (page % 64)) };
                    // SAFETY: as above.
                    let n = shared.wrapping_add(SHARED_WRITES);
                    // SAFETY: as above.
                    let count = unsafe { n.read_volatile() };
                    // SAFETY: as above.
                    unsafe { n.write_volatile(count + 1) };
                }
                0
            }
            OP_MPROTECT => {
                // SAFETY: changing the protection of a mapping the test had the child map.
                let r = unsafe { libc::mprotect(a as *mut _, b as usize, s as i32) };
                r as u64
            }
            OP_EXEC => {
                let path = c"/bin/sleep";
                let arg = c"100";
                let argv = [path.as_ptr(), arg.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                // SAFETY: NUL-terminated strings and arrays that live until exec.
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                u64::MAX
            }
            _ => u64::MAX,
        };
        // SAFETY: writing a live local u64.
        unsafe { libc::write(reply, (&answer as *const u64).cast(), 8) };
    }
}

impl Workload {
    fn start() -> Workload {
        let (cmd_r, cmd_w) = pipe();
        let (reply_r, reply_w) = pipe();
        let shared_len = (SHARED_BITMAP_PAGES + 1) * PAGE_SIZE as usize;
        // SAFETY: a fresh shared anonymous mapping, leaked for the test's life.
        let shared = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                shared_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(shared, libc::MAP_FAILED);
        let shared = shared.cast::<u64>();
        // SAFETY: the child runs only `child_loop`, which makes raw syscalls
        // and touches memory, nothing that needs a lock another thread held.
        let raw = unsafe { libc::fork() };
        assert!(raw >= 0, "fork");
        if raw == 0 {
            child_loop(cmd_r.as_raw_fd(), reply_w.as_raw_fd(), shared);
        }
        Workload {
            pid: Pid::from_raw(raw).expect("child pid"),
            cmd: cmd_w,
            reply: reply_r,
            shared,
        }
    }

    fn run(&mut self, op: u64, a: u64, b: u64, s: u64) -> u64 {
        let mut bytes = Vec::with_capacity(32);
        for w in [op, a, b, s] {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        self.cmd.write_all(&bytes).expect("command");
        let mut r = [0u8; 8];
        self.reply.read_exact(&mut r).expect("reply");
        u64::from_ne_bytes(r)
    }

    fn mmap(&mut self, pages: u64) -> u64 {
        let addr = self.run(OP_MMAP, pages * PAGE_SIZE, 0, 0);
        assert_ne!(addr, u64::MAX, "mmap in the child");
        addr
    }

    /// Writes `count` pages from page `first` of `base`, every `step` pages.
    fn write(&mut self, base: u64, first: u64, count: u64, step: u64) {
        self.run(OP_WRITE, base + first * PAGE_SIZE, count, step);
    }

    fn shared_word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: the shared mapping holds (SHARED_BITMAP_PAGES+1) pages of
        // u64 words, aligned, alive for the test's life; the child writes
        // them concurrently, hence atomics.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.shared.wrapping_add(i)) }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // SAFETY: kill and reap our own child; `status` is a live local.
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above.
        unsafe { libc::waitpid(self.pid.as_raw(), &mut status, 0) };
    }
}

fn holder_opts(dir: &tempfile::TempDir) -> HolderOptions {
    HolderOptions {
        dir: dir.path().to_path_buf(),
        idle_timeout: Duration::from_secs(60),
    }
}

/// Freezes the child, arms (or attaches), collects, resumes.
fn arm_and_collect(
    w: &Workload,
    choice: BackendChoice,
    opts: &HolderOptions,
) -> (DirtyTracker, DirtySet) {
    let mut frozen = SeizedProcess::freeze(w.pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::arm(leader, choice, opts).expect("arm");
    let maps = proc::maps::read(w.pid).expect("maps");
    let set = t.collect(&maps).expect("first collect");
    frozen.resume().expect("resume");
    (t, set)
}

fn collect(t: &mut DirtyTracker, pid: Pid) -> DirtySet {
    let maps = proc::maps::read(pid).expect("maps");
    t.collect(&maps).expect("collect")
}

/// The page indices (relative to `base`) reported written and zeroed in the
/// VMA that starts at `base`.
fn pages_of(set: &DirtySet, base: u64) -> (Vec<u64>, Vec<u64>) {
    let v = set.find(RemoteAddr(base)).expect("the VMA is in the set");
    let idx = |ranges: &[PageRange]| -> Vec<u64> {
        ranges
            .iter()
            .flat_map(|r| (r.start.get()..r.end.get()).step_by(PAGE_SIZE as usize))
            .map(|a| (a - base) / PAGE_SIZE)
            .collect()
    };
    match &v.dirty {
        VmaDirty::Pages { written, zeroed } => (idx(written), idx(zeroed)),
        VmaDirty::Whole(r) => panic!("VMA at {base:#x} is whole ({r:?})"),
    }
}

fn whole_reason(set: &DirtySet, base: u64) -> Option<WholeReason> {
    match &set.find(RemoteAddr(base))?.dirty {
        VmaDirty::Whole(r) => Some(*r),
        VmaDirty::Pages { .. } => None,
    }
}

fn exact_rounds(choice: BackendChoice) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let base = w.mmap(256);
    w.write(base, 0, 128, 1); // half populated, half never touched
    let (mut t, first) = arm_and_collect(&w, choice, &opts);
    assert!(first.is_full());
    assert_eq!(
        whole_reason(&first, base),
        Some(WholeReason::FirstRound),
        "{first:?}"
    );
    let (written, zeroed) = pages_of(&collect(&mut t, w.pid), base);
    assert!(written.is_empty() && zeroed.is_empty(), "{written:?}");

    w.write(base, 3, 1, 1);
    w.write(base, 7, 1, 1);
    w.write(base, 100, 10, 1); // populated pages
    w.write(base, 200, 3, 5); // never-touched pages 200, 205, 210
    let set = collect(&mut t, w.pid);
    let (written, zeroed) = pages_of(&set, base);
    let mut expect = vec![3, 7];
    expect.extend(100..110);
    expect.extend([200, 205, 210]);
    assert_eq!(written, expect);
    assert!(zeroed.is_empty());
    let hist = &set.find(RemoteAddr(base)).expect("vma").history;
    assert_eq!(hist.rounds, 2);
    assert_eq!(hist.counts[3], 1);
    assert_eq!(hist.counts[4], 0);

    // MADV_DONTNEED: reported, but as gone.
    w.write(base, 3, 1, 1);
    w.run(OP_DONTNEED, base + 50 * PAGE_SIZE, 4 * PAGE_SIZE, 0);
    let set = collect(&mut t, w.pid);
    let (written, zeroed) = pages_of(&set, base);
    assert_eq!(written, vec![3]);
    assert_eq!(zeroed, vec![50, 51, 52, 53]);
    assert_eq!(
        set.find(RemoteAddr(base)).expect("vma").history.counts[3],
        2
    );

    let (written, zeroed) = pages_of(&collect(&mut t, w.pid), base);
    assert!(
        written.is_empty() && zeroed.is_empty(),
        "{written:?} {zeroed:?}"
    );
    t.release().expect("release");
}

#[test]
fn uffd_reports_exactly_the_written_pages() {
    exact_rounds(BackendChoice::Only(BackendKind::UffdWp));
}

#[test]
fn page_hash_reports_the_same_pages() {
    exact_rounds(BackendChoice::Only(BackendKind::PageHash));
}

#[test]
fn auto_picks_write_protect_here() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Workload::start();
    let (t, _) = arm_and_collect(&w, BackendChoice::Auto, &holder_opts(&dir));
    assert_eq!(t.backend(), BackendKind::UffdWp);
}

#[test]
fn no_write_is_missed_while_the_target_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::start();
    let pages = 4096; // 16 MiB; the bitmap holds 16 pages * 32768 bits
    let base = w.mmap(pages);
    w.write(base, 0, pages, 1);
    let (mut t, _) = arm_and_collect(
        &w,
        BackendChoice::Only(BackendKind::UffdWp),
        &opts_for(&dir),
    );
    // The spray blocks the child's command loop: send it without waiting.
    let mut cmd = Vec::new();
    for v in [OP_SPRAY, base, pages, 0x9e37_79b9_7f4a_7c15] {
        cmd.extend_from_slice(&v.to_ne_bytes());
    }
    w.cmd.write_all(&cmd).expect("spray");
    let mut seen = vec![false; pages as usize];
    let mut rounds = 0;
    let started = Instant::now();
    let mut mark = |set: &DirtySet| {
        let (written, zeroed) = pages_of(set, base);
        assert!(zeroed.is_empty());
        for p in written {
            seen[p as usize] = true;
        }
    };
    while started.elapsed() < Duration::from_millis(300) {
        let set = collect(&mut t, w.pid);
        mark(&set);
        rounds += 1;
    }
    w.shared_word(SHARED_STOP)
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let mut r = [0u8; 8];
    w.reply.read_exact(&mut r).expect("spray ended");
    mark(&collect(&mut t, w.pid));
    let mut missed = 0;
    let mut extra = 0;
    for (p, &seen) in seen.iter().enumerate() {
        let bit = w
            .shared_word(2 + p / 64)
            .load(std::sync::atomic::Ordering::SeqCst)
            >> (p % 64)
            & 1;
        match (bit == 1, seen) {
            (true, false) => missed += 1,
            (false, true) => extra += 1,
            _ => {}
        }
    }
    let writes = w
        .shared_word(SHARED_WRITES)
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(writes > 1000, "the child wrote only {writes} times");
    assert_eq!((missed, extra), (0, 0), "{rounds} rounds, {writes} writes");
    t.release().expect("release");
}

fn opts_for(dir: &tempfile::TempDir) -> HolderOptions {
    holder_opts(dir)
}

#[test]
fn new_moved_and_unmapped_vmas_are_whole_or_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::start();
    let a = w.mmap(16);
    let b = w.mmap(16);
    w.write(a, 0, 16, 1);
    w.write(b, 0, 16, 1);
    let (mut t, _) = arm_and_collect(
        &w,
        BackendChoice::Only(BackendKind::UffdWp),
        &holder_opts(&dir),
    );
    let c = w.mmap(8);
    w.write(c, 0, 2, 1);
    w.run(OP_MUNMAP, a, 16 * PAGE_SIZE, 0);
    // Move b into the middle of a fresh 64-page mapping.
    let dest = w.mmap(64) + 24 * PAGE_SIZE;
    let moved = w.run(OP_MREMAP, b, 16 * PAGE_SIZE, dest);
    assert_eq!(moved, dest);
    let set = collect(&mut t, w.pid);
    assert_eq!(whole_reason(&set, c), Some(WholeReason::New));
    assert!(
        set.find(RemoteAddr(a)).is_none(),
        "unmapped VMA still listed"
    );
    assert!(
        set.find(RemoteAddr(b)).is_none(),
        "moved VMA still at its old place"
    );
    let at_new = set.find(RemoteAddr(moved)).expect("moved VMA");
    assert_eq!(at_new.vma.start, RemoteAddr(moved));
    assert_eq!(whole_reason(&set, moved), Some(WholeReason::New));
    // Now they are tracked: the next round reports pages.
    w.write(moved, 5, 1, 1);
    w.write(c, 7, 1, 1);
    let set = collect(&mut t, w.pid);
    assert_eq!(pages_of(&set, moved).0, vec![5]);
    assert_eq!(pages_of(&set, c).0, vec![7]);
    t.release().expect("release");
}

/// A tracked VMA whose bounds move (a neighbour that had merged into it is
/// unmapped, `mprotect` splits and rejoins it) keeps its tracking: only the
/// written pages are reported, not the whole VMA as new.
fn bounds_move(choice: BackendChoice) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::start();
    // 40 pages of region and 8 of a short-lived neighbour, one VMA when armed.
    let base = w.mmap(48);
    w.write(base, 0, 48, 1);
    let (mut t, first) = arm_and_collect(&w, choice, &holder_opts(&dir));
    assert!(first.is_full());
    let page = |i: u64| base + i * PAGE_SIZE;

    w.run(OP_MUNMAP, page(40), 8 * PAGE_SIZE, 0);
    w.write(base, 5, 1, 1);
    let set = collect(&mut t, w.pid);
    let vma = set.find(RemoteAddr(base)).expect("vma").vma;
    assert_eq!(vma.end, RemoteAddr(page(40)), "{set:?}");
    assert_eq!(pages_of(&set, base), (vec![5], vec![]));

    let read_only = u64::try_from(libc::PROT_READ).expect("prot");
    let read_write = u64::try_from(libc::PROT_READ | libc::PROT_WRITE).expect("prot");
    assert_eq!(w.run(OP_MPROTECT, page(16), 8 * PAGE_SIZE, read_only), 0);
    w.write(base, 30, 1, 1);
    let set = collect(&mut t, w.pid);
    assert_eq!(pages_of(&set, base), (vec![], vec![]));
    assert_eq!(pages_of(&set, page(16)), (vec![], vec![]));
    assert_eq!(pages_of(&set, page(24)), (vec![6], vec![]));

    assert_eq!(w.run(OP_MPROTECT, page(16), 8 * PAGE_SIZE, read_write), 0);
    w.write(base, 20, 1, 1);
    let set = collect(&mut t, w.pid);
    let report = set.find(RemoteAddr(base)).expect("vma");
    assert_eq!(report.vma.end, RemoteAddr(page(40)), "{set:?}");
    assert_eq!(pages_of(&set, base), (vec![20], vec![]));
    let counts = &report.history.counts;
    assert_eq!((counts[5], counts[20], counts[30], counts[0]), (1, 1, 1, 0));

    if choice == BackendChoice::Only(BackendKind::UffdWp) {
        // Other memory moved onto tracked addresses is not the memory that
        // was tracked there: whole, never its pages left to the parent.
        let other = w.mmap(8);
        w.write(other, 0, 8, 1);
        assert_eq!(w.run(OP_MREMAP, other, 8 * PAGE_SIZE, page(8)), page(8));
        let set = collect(&mut t, w.pid);
        assert_eq!(pages_of(&set, base), (vec![], vec![]));
        assert_eq!(whole_reason(&set, page(8)), Some(WholeReason::Changed));
        assert_eq!(pages_of(&set, page(16)), (vec![], vec![]));
    }
    t.release().expect("release");
}

#[test]
fn a_vma_whose_bounds_move_keeps_its_tracking() {
    bounds_move(BackendChoice::Only(BackendKind::UffdWp));
}

#[test]
fn page_hashes_follow_a_vma_whose_bounds_move() {
    bounds_move(BackendChoice::Only(BackendKind::PageHash));
}

#[test]
fn huge_pages_are_reported_per_small_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::start();
    let raw = w.mmap(6 * 512);
    let base = raw.div_ceil(2 << 20) * (2 << 20);
    w.run(OP_HUGEPAGE, base, 4 * (2 << 20), 0);
    w.write(base, 0, 4 * 512, 1);
    let huge_kb: u64 = proc::smaps::read(w.pid)
        .expect("smaps")
        .iter()
        .map(|e| e.bytes("AnonHugePages") / 1024)
        .sum();
    if huge_kb == 0 {
        eprintln!("skipped: the kernel gave no transparent huge page");
        return;
    }
    let (mut t, _) = arm_and_collect(
        &w,
        BackendChoice::Only(BackendKind::UffdWp),
        &holder_opts(&dir),
    );
    w.write(base, 1, 1, 1);
    w.write(base, 512 + 300, 1, 1);
    w.write(base, 3 * 512 + 511, 1, 1);
    let set = collect(&mut t, w.pid);
    let vma = set.find(RemoteAddr(base)).expect("vma").vma.start.get();
    let (written, _) = pages_of(&set, vma);
    let off = (base - vma) / PAGE_SIZE;
    assert_eq!(written, vec![off + 1, off + 812, off + 2047]);
    t.release().expect("release");
}

#[test]
fn more_regions_than_one_scan_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = Workload::start();
    let pages = 12_000;
    let base = w.mmap(pages);
    w.write(base, 0, pages, 1);
    let (mut t, _) = arm_and_collect(
        &w,
        BackendChoice::Only(BackendKind::UffdWp),
        &holder_opts(&dir),
    );
    w.write(base, 0, pages / 2, 2); // 6000 separate one-page regions
    let (written, _) = pages_of(&collect(&mut t, w.pid), base);
    let expect: Vec<u64> = (0..pages).step_by(2).collect();
    assert_eq!(written.len(), expect.len());
    assert_eq!(written, expect);
    t.release().expect("release");
}

fn uw_vmas(pid: Pid) -> usize {
    proc::smaps::read(pid)
        .expect("smaps")
        .iter()
        .filter(|e| e.has_flag("uw"))
        .count()
}

fn wait_gone(holder: Pid) -> bool {
    let Ok(pidfd) = tracee::PidFd::open(holder) else {
        return true;
    };
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::time::Timespec {
        tv_sec: 5,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(1))
}

#[test]
fn the_holder_keeps_tracking_between_processes_and_release_ends_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let base = w.mmap(64);
    w.write(base, 0, 64, 1);
    // Another process arms, collects and commits, then exits.
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "arm_commit_and_exit", "--ignored", "--nocapture"])
        .env("CKPT_DIRTY_PID", w.pid.to_string())
        .env("CKPT_DIRTY_DIR", dir.path())
        .output()
        .expect("run the arming process");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        uw_vmas(w.pid) > 0,
        "tracking did not survive the arming process"
    );
    w.write(base, 9, 3, 1);
    let mut t = match DirtyTracker::attach(w.pid, &opts).expect("attach") {
        Attach::Tracking(t) => *t,
        Attach::Lost(r) => panic!("lost: {r:?}"),
    };
    let holder = t.holder_pid().expect("holder pid");
    let set = collect(&mut t, w.pid);
    assert_eq!(set.round, 2);
    assert_eq!(pages_of(&set, base).0, vec![9, 10, 11]);
    t.commit().expect("commit");
    // A third round, then the final one releases.
    w.write(base, 1, 1, 1);
    let mut t = match DirtyTracker::attach(w.pid, &opts).expect("attach") {
        Attach::Tracking(t) => *t,
        Attach::Lost(r) => panic!("lost: {r:?}"),
    };
    assert_eq!(pages_of(&collect(&mut t, w.pid), base).0, vec![1]);
    t.release().expect("release");
    assert_eq!(
        uw_vmas(w.pid),
        0,
        "the target still has write-protected VMAs"
    );
    assert!(wait_gone(holder), "the holder did not exit on release");
    assert!(matches!(
        DirtyTracker::attach(w.pid, &opts).expect("attach"),
        Attach::Lost(LostReason::NoHolder)
    ));
}

/// Run by the test above in a separate process: arms tracking of
/// `CKPT_DIRTY_PID`, collects once, commits and exits.
#[test]
#[ignore = "helper run by the_holder_keeps_tracking_between_processes_and_release_ends_it"]
fn arm_commit_and_exit() {
    let pid: i32 = std::env::var("CKPT_DIRTY_PID")
        .expect("CKPT_DIRTY_PID")
        .parse()
        .expect("pid");
    let dir = std::env::var("CKPT_DIRTY_DIR").expect("CKPT_DIRTY_DIR");
    let opts = HolderOptions {
        dir: dir.into(),
        idle_timeout: Duration::from_secs(60),
    };
    let pid = Pid::from_raw(pid).expect("pid");
    let mut frozen = SeizedProcess::freeze(pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::attach_or_arm(leader, BackendChoice::Auto, &opts).expect("arm");
    let maps = proc::maps::read(pid).expect("maps");
    assert!(t.collect(&maps).expect("collect").is_full());
    frozen.resume().expect("resume");
    t.commit().expect("commit");
}

#[test]
fn a_killed_holder_means_a_full_dump() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let base = w.mmap(8);
    w.write(base, 0, 8, 1);
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::UffdWp), &opts);
    let holder = t.commit().expect("commit").expect("holder");
    // SAFETY: killing the holder this test started.
    unsafe { libc::kill(holder.as_raw(), libc::SIGKILL) };
    assert!(wait_gone(holder));
    assert!(matches!(
        DirtyTracker::attach(w.pid, &opts).expect("attach"),
        Attach::Lost(LostReason::NoHolder)
    ));
    let mut frozen = SeizedProcess::freeze(w.pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::attach_or_arm(leader, BackendChoice::Auto, &opts).expect("re-arm");
    let set = collect(&mut t, w.pid);
    frozen.resume().expect("resume");
    assert!(set.is_full());
    assert_eq!(
        whole_reason(&set, base),
        Some(WholeReason::Lost(LostReason::NoHolder))
    );
    // And tracking works again from there.
    w.write(base, 2, 1, 1);
    assert_eq!(pages_of(&collect(&mut t, w.pid), base).0, vec![2]);
    t.release().expect("release");
}

#[test]
fn the_holder_exits_with_its_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let w = Workload::start();
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::PageHash), &opts);
    let holder = t.commit().expect("commit").expect("holder");
    let path = dir.path().to_path_buf();
    drop(w);
    assert!(wait_gone(holder), "the holder outlived its target");
    let left: Vec<_> = std::fs::read_dir(&path).expect("dir").collect();
    assert!(left.is_empty(), "the holder left its socket");
}

#[test]
fn an_exec_means_a_full_dump() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::UffdWp), &opts);
    let holder = t.commit().expect("commit").expect("holder");
    let cmd: Vec<u8> = [OP_EXEC, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    w.cmd.write_all(&cmd).expect("exec");
    let started = Instant::now();
    while proc::misc::exe(w.pid).is_ok_and(|p| !p.ends_with("sleep")) {
        assert!(started.elapsed() < Duration::from_secs(5), "no exec");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut frozen = SeizedProcess::freeze(w.pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::attach_or_arm(leader, BackendChoice::Auto, &opts).expect("re-arm");
    let set = collect(&mut t, w.pid);
    frozen.resume().expect("resume");
    assert!(set.is_full());
    assert!(
        set.vmas.iter().all(|v| matches!(
            v.dirty,
            VmaDirty::Whole(
                WholeReason::Lost(LostReason::Exec) | WholeReason::Shared | WholeReason::Untracked
            )
        )),
        "{set:?}"
    );
    assert!(wait_gone(holder), "the old holder was not released");
    t.release().expect("release");
}

#[test]
fn dropping_an_uncommitted_round_releases_tracking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let base = w.mmap(8);
    w.write(base, 0, 8, 1);
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::UffdWp), &opts);
    t.commit().expect("commit");
    let mut t = match DirtyTracker::attach(w.pid, &opts).expect("attach") {
        Attach::Tracking(t) => *t,
        Attach::Lost(r) => panic!("lost: {r:?}"),
    };
    let _ = collect(&mut t, w.pid);
    drop(t); // as a failing dump would
    assert_eq!(uw_vmas(w.pid), 0);
    assert!(matches!(
        DirtyTracker::attach(w.pid, &opts).expect("attach"),
        Attach::Lost(LostReason::NoHolder)
    ));
}

#[test]
fn a_round_that_dies_before_commit_means_a_full_dump() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = holder_opts(&dir);
    let mut w = Workload::start();
    let base = w.mmap(8);
    w.write(base, 0, 8, 1);
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::UffdWp), &opts);
    t.commit().expect("commit");
    w.write(base, 4, 1, 1);
    // Another process takes the round, collects (re-protecting page 4) and
    // dies before it commits.
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "attach_collect_and_die",
            "--ignored",
            "--nocapture",
        ])
        .env("CKPT_DIRTY_PID", w.pid.to_string())
        .env("CKPT_DIRTY_DIR", dir.path())
        .output()
        .expect("run the dying process");
    assert!(!out.status.success(), "the helper was meant to die");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("collected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(matches!(
        DirtyTracker::attach(w.pid, &opts).expect("attach"),
        Attach::Lost(LostReason::Interrupted)
    ));
    let mut frozen = SeizedProcess::freeze(w.pid, SeizeOptions::DUMP).expect("freeze");
    let leader = frozen.leader_mut().expect("leader");
    let mut t = DirtyTracker::attach_or_arm(leader, BackendChoice::Auto, &opts).expect("re-arm");
    let set = collect(&mut t, w.pid);
    frozen.resume().expect("resume");
    assert_eq!(
        whole_reason(&set, base),
        Some(WholeReason::Lost(LostReason::Interrupted))
    );
    t.release().expect("release");
}

/// Run by the test above in a separate process: attaches, collects, and
/// exits without committing or releasing.
#[test]
#[ignore = "helper run by a_round_that_dies_before_commit_means_a_full_dump"]
fn attach_collect_and_die() {
    let pid: i32 = std::env::var("CKPT_DIRTY_PID")
        .expect("CKPT_DIRTY_PID")
        .parse()
        .expect("pid");
    let dir = std::env::var("CKPT_DIRTY_DIR").expect("CKPT_DIRTY_DIR");
    let opts = HolderOptions {
        dir: dir.into(),
        idle_timeout: Duration::from_secs(60),
    };
    let pid = Pid::from_raw(pid).expect("pid");
    let mut t = match DirtyTracker::attach(pid, &opts).expect("attach") {
        Attach::Tracking(t) => *t,
        Attach::Lost(r) => panic!("lost: {r:?}"),
    };
    let set = collect(&mut t, pid);
    assert!(set.written_pages() > 0);
    println!("collected");
    // Exit without running destructors, as a crash would (without a core file).
    std::process::exit(3);
}

#[test]
fn an_idle_holder_releases_tracking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = HolderOptions {
        dir: dir.path().to_path_buf(),
        idle_timeout: Duration::from_millis(300),
    };
    let mut w = Workload::start();
    let base = w.mmap(8);
    w.write(base, 0, 8, 1);
    let (t, _) = arm_and_collect(&w, BackendChoice::Only(BackendKind::UffdWp), &opts);
    let holder = t.commit().expect("commit").expect("holder");
    assert!(uw_vmas(w.pid) > 0);
    assert!(wait_gone(holder), "the idle holder did not exit");
    assert_eq!(uw_vmas(w.pid), 0);
}
