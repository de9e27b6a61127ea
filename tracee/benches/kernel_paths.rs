//! Throughput and latency of the paths a dump and a restore lean on: remote
//! reads, injected syscalls and PAGEMAP_SCAN, against a forked child.
//! Run with `cargo bench -p tracee`; prints min and median of several runs.

use std::time::{Duration, Instant};

use tracee::memory::{self, RemoteRange};
use tracee::pagemap_scan::{self, ScanRequest};
use tracee::{Pid, RemoteAddr, SeizeOptions, SeizedProcess, PAGE_SIZE};

const SIZE: usize = 256 << 20;
const RUNS: usize = 7;

struct Child(Pid);

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child; `status` is a live local.
        unsafe { libc::kill(self.0.as_raw(), libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above.
        unsafe { libc::waitpid(self.0.as_raw(), &mut status, 0) };
    }
}

fn fork_pauser() -> Child {
    // SAFETY: the child only loops on pause(), which is async-signal-safe.
    let raw = unsafe { libc::fork() };
    assert!(raw >= 0, "fork");
    if raw == 0 {
        loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        }
    }
    Child(Pid::from_raw(raw).expect("pid"))
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2])
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    // The child shares these pages copy-on-write, so they are present in it.
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let base = RemoteAddr(data.as_ptr() as u64);
    let child = fork_pauser();
    std::thread::sleep(Duration::from_millis(50));
    let mut buf = vec![0u8; SIZE];

    let (min, med) = stats(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                memory::read_remote(child.0, base, &mut buf).expect("read_remote");
                t.elapsed()
            })
            .collect(),
    );
    assert_eq!(buf, data);
    println!(
        "read_remote 256 MiB: min {:.2} GB/s, median {:.2} GB/s",
        gbps(SIZE, min),
        gbps(SIZE, med)
    );

    let ranges: Vec<RemoteRange> = (0..SIZE / PAGE_SIZE as usize)
        .map(|i| RemoteRange {
            addr: base.saturating_add(i as u64 * PAGE_SIZE),
            len: PAGE_SIZE as usize,
        })
        .collect();
    let (min, med) = stats(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                memory::read_remote_vectored(child.0, &ranges, &mut buf).expect("vectored");
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "read_remote_vectored 4 KiB ranges, 256 MiB: min {:.2} GB/s, median {:.2} GB/s",
        gbps(SIZE, min),
        gbps(SIZE, med)
    );

    let start = RemoteAddr(base.get().div_ceil(PAGE_SIZE) * PAGE_SIZE);
    let end = RemoteAddr((base.get() + SIZE as u64) / PAGE_SIZE * PAGE_SIZE);
    let (min, med) = stats(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                let r =
                    pagemap_scan::scan(child.0, &ScanRequest::present(start, end)).expect("scan");
                std::hint::black_box(r);
                t.elapsed()
            })
            .collect(),
    );
    println!("PAGEMAP_SCAN of 256 MiB present: min {min:?}, median {med:?}");

    let mut frozen = SeizedProcess::freeze(child.0, SeizeOptions::DUMP).expect("freeze");
    let t = frozen.leader_mut().expect("leader");
    let rounds = 1000u32;
    let measure = |t: &mut tracee::Tracee| {
        let start = Instant::now();
        for _ in 0..rounds {
            t.syscall(libc::SYS_getppid, [0; 6]).expect("getppid");
        }
        start.elapsed() / rounds
    };
    let unpinned = measure(t);
    let pin = tracee::cpu::CpuPin::next_to(t.pid(), t.tid()).expect("pin");
    let pinned = measure(t);
    t.begin_batch().expect("batch");
    let batched = measure(t);
    t.end_batch().expect("end batch");
    drop(pin);
    let pair = t.pin_tracer().expect("pin both");
    t.begin_batch().expect("batch");
    let both = measure(t);
    t.end_batch().expect("end batch");
    drop(pair);
    println!(
        "injected getppid: unpinned {unpinned:?}, tracer pinned {pinned:?}, tracer pinned+batch \
         {batched:?}, tracer and tracee pinned+batch {both:?}"
    );
    frozen.resume().expect("resume");
}
