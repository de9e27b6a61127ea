//! Post-copy restore timings: from the `ckpt-restore --lazy-pages -d` command to the
//! restored process's first answer, fault latency, background transfer throughput and
//! the time until every page is in, from local images and over loopback from a lazy
//! `ckpt-dump`.
//!
//! ```text
//! cargo build --release -p ckpt-restore
//! cargo run --release -p ckpt-restore --example lazy_restore_bench \
//!     [-- [--runs N] [--fault-runs N] [--no-answer] [--no-faults] [--no-tcp]
//!         [--background-delay MS] [MIB...]]
//! ```
//!
//! Sizes default to 64, 1024 and 4096 MiB, each restored `--runs` times (10) from local
//! images and from a lazy dump over loopback; the first run of each finds fresh memory,
//! the later ones find the images in the page cache and free pages at hand. The dumper
//! and the daemon are this program (`lazy_restore_bench dump|daemon ...`), built from the
//! libraries; `ckpt-restore` is the binary beside this example's directory.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use images_format::{ImageDir, ImageKind, PageFlags, PageRange, Pagemap, PagesReader};

/// The daemon's background delay in ms (`--background-delay`), passed down to `daemon`.
const BG_DELAY_ENV: &str = "LAZY_RESTORE_BENCH_BG_DELAY_MS";

/// What to run: `[--runs N] [--fault-runs N] [--no-answer] [--no-faults] [--no-tcp]
/// [--background-delay MS] [MIB...]`.
struct Args {
    sizes: Vec<u64>,
    runs: usize,
    fault_runs: usize,
    answer: bool,
    faults: bool,
    tcp: bool,
    background_delay: Option<u64>,
}

fn parse_args(args: &[String]) -> anyhow::Result<Args> {
    let mut out = Args {
        sizes: Vec::new(),
        runs: 10,
        fault_runs: 3,
        answer: true,
        faults: true,
        tcp: true,
        background_delay: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => out.runs = it.next().context("--runs N")?.parse()?,
            "--fault-runs" => out.fault_runs = it.next().context("--fault-runs N")?.parse()?,
            "--no-answer" => out.answer = false,
            "--no-faults" => out.faults = false,
            "--no-tcp" => out.tcp = false,
            "--background-delay" => {
                out.background_delay = Some(it.next().context("--background-delay MS")?.parse()?);
            }
            size => out.sizes.push(size.parse().context("sizes are MiB")?),
        }
    }
    if out.sizes.is_empty() {
        out.sizes = vec![64, 1024, 4096];
    }
    out.runs = out.runs.max(1);
    out.fault_runs = out.fault_runs.max(1);
    Ok(out)
}

/// Median, min and max.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    match values {
        [] => (f64::NAN, f64::NAN, f64::NAN),
        [only] => (*only, *only, *only),
        v => (v[v.len() / 2], v[0], v[v.len() - 1]),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("dump") => return tool_dump(&args[1..]),
        Some("daemon") => return tool_daemon(&args[1..]),
        _ => {}
    }
    let args = parse_args(&args)?;
    if let Some(ms) = args.background_delay {
        // Read by the `daemon` children; set while this process has one thread.
        std::env::set_var(BG_DELAY_ENV, ms.to_string());
    }
    nix::sys::prctl::set_child_subreaper(true).context("subreaper")?;
    let workload = build_workload()?;
    let result = measure(&args, &workload);
    let _ = std::fs::remove_file(&workload);
    result
}

fn measure(args: &Args, workload: &Path) -> anyhow::Result<()> {
    let sources: &[bool] = if args.tcp { &[false, true] } else { &[false] };
    if args.answer {
        println!(
            "restore command to first answer, ms ({} runs each: the first on fresh memory, then median/min/max of all):",
            args.runs
        );
        println!(
            "{:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9}",
            "MiB", "source", "first", "median", "min", "max", "all_in_ms", "bg_MB/s"
        );
        for &mib in &args.sizes {
            for &remote in sources {
                let mut answers = Vec::new();
                let mut all_in = Vec::new();
                let mut rates = Vec::new();
                for _ in 0..args.runs {
                    let r = one_run(workload, mib, remote, "idle", 0, false)?;
                    answers.push(r.answer.as_secs_f64() * 1e3);
                    if let Some(t) = r.all_in {
                        all_in.push(t.as_secs_f64() * 1e3);
                        let secs = t.saturating_sub(r.answer).as_secs_f64().max(1e-6);
                        rates.push(mib as f64 * 1048576.0 / secs / 1e6);
                    }
                }
                let first = answers[0];
                let (median, min, max) = spread(&mut answers);
                let (all_in, _, _) = spread(&mut all_in);
                let (rate, _, _) = spread(&mut rates);
                println!(
                    "{:>6} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>12.1} {:>9.0}",
                    mib,
                    if remote { "tcp" } else { "local" },
                    first,
                    median,
                    min,
                    max,
                    all_in,
                    rate
                );
            }
        }
    }
    if args.faults {
        println!(
            "\nfault latency, us (2000 faults spread over 1 GiB, background held back; median of {} runs' medians, and the worst p99 and max):",
            args.fault_runs
        );
        for pinned in [false, true] {
            for &remote in sources {
                let mut medians = Vec::new();
                let mut p99 = 0;
                let mut max = 0;
                for _ in 0..args.fault_runs {
                    let r = one_run(workload, 1024, remote, "fault", 1, pinned)?;
                    medians.push(r.faults[0] as f64 / 1e3);
                    p99 = p99.max(r.faults[1] / 1000);
                    max = max.max(r.faults[2] / 1000);
                }
                let (median, _, _) = spread(&mut medians);
                println!(
                    "  {:>5} {:>13}: median {median:.1} us, p99 {p99} us, max {max} us",
                    if remote { "tcp" } else { "local" },
                    if pinned { "one CPU" } else { "CPUs apart" },
                );
            }
        }
    }
    Ok(())
}

struct RunResult {
    /// From the restore command to the restored process's first answer.
    answer: Duration,
    /// From the restore command to the daemon's exit (every page in).
    all_in: Option<Duration>,
    /// Median, p99 and max fault latency, ns.
    faults: [u64; 3],
}

/// Kills and reaps on the way out what a run started.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        // The daemon first: it must not see its source go away and complain.
        for c in self.0.iter_mut().rev() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn one_run(
    workload: &Path,
    mib: u64,
    remote: bool,
    mode: &str,
    rate: u64,
    pinned: bool,
) -> anyhow::Result<RunResult> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let images = dir.join("images");
    let work = dir.join("work");
    std::fs::create_dir(&images)?;
    std::fs::create_dir(&work)?;
    let mut started = Started(Vec::new());
    started.0.push(
        Command::new("setsid")
            .arg(workload)
            .arg(dir)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let ready = wait_file(&dir.join("ready"), Duration::from_secs(120))?;
    let words: Vec<u64> = ready
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [pid, addr, len] = words[..] else {
        bail!("bad ready file {ready:?}");
    };
    let exe = std::env::current_exe()?;
    let mut restore_args: Vec<String> = Vec::new();
    let page_server = if remote {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        started.0.push(
            pinned_command(&exe, pinned)
                .args(["dump", &pid.to_string()])
                .arg(&images)
                .args(["lazy", &port.to_string()])
                .stderr(Stdio::inherit())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(300);
        while !images.join("stats-dump").exists() {
            if Instant::now() > deadline {
                bail!("the lazy dump did not finish its images");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // The source still holds the pid.
        restore_args.push("--new-pid-ns".into());
        Some(port)
    } else {
        let status = Command::new(&exe)
            .args(["dump", &pid.to_string()])
            .arg(&images)
            .status()?;
        if !status.success() {
            bail!("dump failed: {status}");
        }
        started.0[0].wait()?;
        mark_lazy(&images, i32::try_from(pid)?, addr, addr + len)?;
        None
    };
    // Pinned: the daemon, the restored process and a lazy dump serving its pages share
    // CPU 0 (ckpt-restore hands its own affinity to the process it restores).
    let mut daemon = Command::new(&exe);
    daemon
        .arg("daemon")
        .arg(&images)
        .arg(&work)
        .arg(rate.to_string())
        .arg(if pinned { "0" } else { "-" });
    if let Some(p) = page_server {
        daemon.arg(p.to_string());
    }
    started.0.push(daemon.stderr(Stdio::inherit()).spawn()?);
    let d = started.0.len() - 1;
    let socket = work.join(ckpt_lazy_pages::SOCKET_NAME);
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::write(dir.join("go"), mode)?;
    let restore_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("ckpt-restore"))
        .context("where is ckpt-restore")?;
    let t0 = SystemTime::now();
    let start = Instant::now();
    let mut restore = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(&restore_bin);
        c
    } else {
        Command::new(&restore_bin)
    };
    let status = restore
        .arg("-D")
        .arg(&images)
        .arg("--lazy-pages")
        .arg("-W")
        .arg(&work)
        .arg("-d")
        .args(&restore_args)
        .arg("--pidfile")
        .arg(dir.join("restored.pid"))
        .args(
            // CKPT_BENCH_RESTORE_LOG=FILE: ckpt-restore's debug log of the last run.
            std::env::var_os("CKPT_BENCH_RESTORE_LOG")
                .map(|f| vec!["-v".into(), "3".into(), "-o".into(), f])
                .unwrap_or_else(|| vec!["-v".into(), "1".into()]),
        )
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run {}", restore_bin.display()))?;
    if !status.success() {
        bail!("ckpt-restore: {status}");
    }
    let answer_ns: u128 = wait_file(&dir.join("answer"), Duration::from_secs(60))?
        .trim()
        .parse()?;
    let answer = Duration::from_nanos(
        u64::try_from(answer_ns.saturating_sub(t0.duration_since(UNIX_EPOCH)?.as_nanos()))
            .unwrap_or(0),
    );
    let mut result = RunResult {
        answer,
        all_in: None,
        faults: [0; 3],
    };
    if mode == "fault" {
        let text = wait_file(&dir.join("faults"), Duration::from_secs(120))?;
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [a, b, c] = v[..] {
            result.faults = [a, b, c];
        }
    } else {
        let deadline = Instant::now() + Duration::from_secs(600);
        while started.0[d].try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the daemon never finished");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        result.all_in = Some(start.elapsed());
    }
    std::fs::write(dir.join("quit"), "1")?;
    // It checks its pages, then exits; it came back to us (the subreaper) when
    // ckpt-restore returned. It must be gone before its directory is.
    let restored = std::fs::read_to_string(dir.join("restored.pid"))?;
    let restored = nix::unistd::Pid::from_raw(restored.trim().parse()?);
    reap(restored, Duration::from_secs(60));
    Ok(result)
}

/// Waits for `pid` to exit (reaping whatever else comes back to us), kills it after
/// `limit`.
fn reap(pid: nix::unistd::Pid, limit: Duration) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + limit;
    loop {
        while let Ok(status) = waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `program`, under `taskset -c 0` if `pinned`.
fn pinned_command(program: &Path, pinned: bool) -> Command {
    if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn wait_file(path: &Path, limit: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            if !t.is_empty() {
                return Ok(t);
            }
        }
        if Instant::now() > deadline {
            bail!("{} never appeared", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn build_workload() -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lazy_bench_workload.c");
    let out = std::env::temp_dir().join(format!("lazy_bench_workload.{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()?;
    if !status.success() {
        bail!("cc {} failed", src.display());
    }
    Ok(out)
}

/// Marks the region's pagemap entries PE_LAZY (data kept in the pages image).
fn mark_lazy(images: &Path, pid: i32, start: u64, end: u64) -> anyhow::Result<()> {
    let dir = ImageDir::new(images)?;
    let id = u64::try_from(pid)?;
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, id)?;
    let mut out = Pagemap {
        pages_id: reader.pagemap().pages_id,
        ranges: Vec::new(),
    };
    for r in &reader.pagemap().ranges {
        let mut cuts = vec![r.vaddr, r.end()];
        cuts.extend(
            [start, end]
                .into_iter()
                .filter(|&e| r.vaddr < e && e < r.end()),
        );
        cuts.sort_unstable();
        for w in cuts.windows(2) {
            let mut flags = r.flags;
            if start <= w[0] && w[1] <= end && flags.contains(PageFlags::PRESENT) {
                flags |= PageFlags::LAZY;
            }
            out.ranges.push(PageRange {
                vaddr: w[0],
                nr_pages: (w[1] - w[0]) / 4096,
                flags,
            });
        }
    }
    drop(reader);
    let mut w = dir.create(ImageKind::Pagemap, id)?;
    out.write(&mut w)?;
    w.finish()?;
    Ok(())
}

/// `dump PID IMAGES [lazy ADDR]`
fn tool_dump(args: &[String]) -> anyhow::Result<()> {
    let (Some(pid), Some(images)) = (args.first(), args.get(1)) else {
        bail!("dump PID IMAGES [lazy ADDR]");
    };
    let mut opts = ckpt_dump::DumpOptions::new(pid.parse()?, images);
    if args.get(2).map(String::as_str) == Some("lazy") {
        opts.mode = ckpt_dump::DumpMode::Lazy;
        opts.lazy_listen = Some(args.get(3).context("address")?.parse()?);
    }
    ckpt_dump::dump(&opts)?;
    Ok(())
}

/// `daemon IMAGES WORK RATE_BYTES CPU|- [PAGE_SERVER]`
fn tool_daemon(args: &[String]) -> anyhow::Result<()> {
    let (Some(images), Some(work), Some(rate)) = (args.first(), args.get(1), args.get(2)) else {
        bail!("daemon IMAGES WORK RATE CPU|- [ADDR]");
    };
    let rate: u64 = rate.parse()?;
    let cpu: Option<u32> = args.get(3).and_then(|c| c.parse().ok());
    let page_server: Option<SocketAddr> = args.get(4).map(|a| a.parse()).transpose()?;
    let opts = ckpt_lazy_pages::DaemonOptions {
        images_dir: images.into(),
        work_dir: work.into(),
        page_server,
        cpu,
        background_rate: (rate > 0).then_some(rate),
        background_delay: std::env::var(BG_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(ckpt_lazy_pages::BACKGROUND_DELAY, Duration::from_millis),
        background_quiet: ckpt_lazy_pages::BACKGROUND_QUIET,
    };
    ckpt_lazy_pages::LazyDaemon::bind(&opts)?.run()?;
    Ok(())
}
