//! Lazy-pages benchmark: fault service latency (same CPU, other CPU, unpinned) and
//! background transfer throughput (64 MiB and 1 GiB, fresh and warmed memory), with the
//! daemon in this process and a small C program as the lazily restored process.
//!
//! cargo run --release -p ckpt-lazy-pages --example lazy_bench
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use ckpt_lazy_pages::{DaemonOptions, DaemonStats, LazyDaemon, SOCKET_NAME};
use ckpt_page_server::{PageServer, ServerOptions};
use images_format::{ImageDir, ImageKind, PageFlags, PAGE_SIZE};

const BASE: u64 = 0x5000_0000_0000;
const IMAGE_PID: i32 = 4242;
const NFAULTS: u64 = 5000;

/// Runs of each case; min and median are printed.
const RUNS: usize = 3;

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let child = build_child(tmp.path())?;
    println!(
        "lazy-pages benchmark: {} CPUs, min / median of {RUNS} runs",
        cpus()
    );
    println!("reference: CRIU lazy restore, restore-to-first-answer ~43 ms whatever the size;");
    println!("           raw probe (no daemon): 4 KiB fault 5.2 us same CPU, 84 us across CPUs");
    println!();

    let small = images(tmp.path(), "64M", 64)?;
    let large = images(tmp.path(), "1G", 1024)?;
    println!("fault service (64 MiB image, {NFAULTS} scattered faults, 16 KiB per answer):");
    println!(
        "  {:<34} {:>22} {:>20}",
        "placement", "first answer (us)", "per fault (us)"
    );
    for (label, daemon_cpu, child_cpu, remote) in [
        ("local, unpinned", None, -1, false),
        ("local, same CPU (0, 0)", Some(0), 0, false),
        ("local, other CPU (daemon 0)", Some(0), 1, false),
        ("remote 127.0.0.1, unpinned", None, -1, true),
        ("remote 127.0.0.1, same CPU", Some(0), 0, true),
    ] {
        let mut firsts = Vec::new();
        let mut avgs = Vec::new();
        for _ in 0..RUNS {
            let (first, avg) = latency(&child, &small, daemon_cpu, child_cpu, remote)?;
            firsts.push(first);
            avgs.push(avg);
        }
        let (f_min, f_med) = min_median(&mut firsts);
        let (a_min, a_med) = min_median(&mut avgs);
        println!("  {label:<34} {f_min:>10.1} / {f_med:>9.1} {a_min:>9.1} / {a_med:>8.1}");
    }
    println!();

    println!("background transfer (end marker to last page in; MB/s best / median):");
    for remote in [false, true] {
        for warm in [false, true] {
            for (dir, mib) in [(&small, 64u64), (&large, 1024)] {
                let mut rates = Vec::new();
                let mut times = Vec::new();
                for _ in 0..RUNS {
                    if warm {
                        warm_guest_memory();
                    }
                    let (ms, rate) = background(&child, dir, mib, remote)?;
                    times.push(ms);
                    rates.push(-rate);
                }
                let (best, median) = min_median(&mut rates);
                let (t_min, t_med) = min_median(&mut times);
                let label = format!(
                    "{}, {mib} MiB, {}",
                    if remote { "remote" } else { "local" },
                    if warm { "warmed" } else { "fresh" }
                );
                println!(
                    "  {label:<34} {:>6.0} / {:>6.0} MB/s  ({t_min:.0} / {t_med:.0} ms)",
                    -best, -median
                );
            }
        }
    }
    Ok(())
}

fn min_median(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[0], values[values.len() / 2])
}

/// First answer after the hand-off and mean time per fault, in microseconds.
fn latency(
    child: &Path,
    dir: &Path,
    daemon_cpu: Option<u32>,
    child_cpu: i32,
    remote: bool,
) -> anyhow::Result<(f64, f64)> {
    let (out, _) = run(child, dir, "latency", 64, daemon_cpu, child_cpu, remote)?;
    let fields: Vec<f64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("child output {out:?}"))?;
    let [first, avg, bad] = fields[..] else {
        bail!("child output {out:?}");
    };
    if bad != 0.0 {
        bail!("{bad} wrong pages");
    }
    Ok((first, avg))
}

/// Milliseconds from the end marker to the last page, and MB/s.
fn background(child: &Path, dir: &Path, mib: u64, remote: bool) -> anyhow::Result<(f64, f64)> {
    let (out, stats) = run(child, dir, "background", mib, None, -1, remote)?;
    if out.trim() != "0" {
        bail!("{} wrong pages after the background transfer", out.trim());
    }
    let after = stats.total - stats.until_finished.unwrap_or_default();
    let bytes = stats.background_bytes + stats.fault_bytes;
    Ok((
        after.as_secs_f64() * 1e3,
        bytes as f64 / after.as_secs_f64() / 1e6,
    ))
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn build_child(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lazy_bench_child.c");
    let out = dir.join("lazy_bench_child");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("run cc")?;
    if !status.success() {
        bail!("cc {} failed", src.display());
    }
    Ok(out)
}

/// An image directory whose pagemap for IMAGE_PID is `mib` MiB of lazy pages at BASE, each
/// page's first word its own address.
fn images(root: &Path, name: &str, mib: u64) -> anyhow::Result<PathBuf> {
    let path = root.join(name);
    let dir = ImageDir::create_dir(&path)?;
    let mut w = dir.pagemap_writer(ImageKind::Pagemap, IMAGE_PID as u64, 1)?;
    let chunk_pages = 1024u64;
    let mut data = vec![0u8; (chunk_pages * PAGE_SIZE) as usize];
    let mut addr = BASE;
    for _ in 0..mib * 256 / chunk_pages {
        for (i, page) in data.chunks_mut(PAGE_SIZE as usize).enumerate() {
            page[..8].copy_from_slice(&(addr + i as u64 * PAGE_SIZE).to_ne_bytes());
        }
        w.add_with_data(addr, PageFlags::LAZY | PageFlags::PRESENT, &data)?;
        addr += chunk_pages * PAGE_SIZE;
    }
    w.finish()?;
    std::fs::create_dir_all(path.join("work"))?;
    Ok(path)
}

/// Runs the daemon here and the child; returns the child's output and the daemon's stats.
fn run(
    child: &Path,
    images: &Path,
    mode: &str,
    mib: u64,
    daemon_cpu: Option<u32>,
    child_cpu: i32,
    remote: bool,
) -> anyhow::Result<(String, DaemonStats)> {
    let work = images.join("work");
    let mut page_server = None;
    let mut serving = None;
    if remote {
        let mut opts = ServerOptions::new(images);
        opts.lazy_pages = true;
        let server = PageServer::bind("127.0.0.1:0".parse()?, opts)?;
        page_server = Some(server.local_addr()?);
        serving = Some(std::thread::spawn(move || server.serve_one()));
    }
    let opts = DaemonOptions {
        images_dir: images.to_owned(),
        work_dir: work.clone(),
        page_server,
        cpu: daemon_cpu,
        background_rate: None,
        // Throughput from the end marker on, not the grace period restore's tree gets.
        background_delay: std::time::Duration::ZERO,
        background_quiet: std::time::Duration::ZERO,
    };
    let daemon = LazyDaemon::bind(&opts)?;
    let server = std::thread::spawn(move || daemon.run());
    let mut proc = Command::new(child)
        .arg(work.join(SOCKET_NAME))
        .arg(mode)
        .arg(IMAGE_PID.to_string())
        .arg(mib.to_string())
        .arg(child_cpu.to_string())
        .arg(NFAULTS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn the bench child")?;
    let stats = match server.join() {
        Ok(result) => result,
        Err(_) => bail!("the daemon thread panicked"),
    };
    let stats = match stats {
        Ok(stats) => stats,
        Err(e) => {
            let _ = proc.kill();
            let _ = proc.wait();
            return Err(e.into());
        }
    };
    if let Some(mut stdin) = proc.stdin.take() {
        // In latency mode the child may be gone already.
        let _ = stdin.write_all(b"g");
    }
    let mut out = String::new();
    if let Some(mut stdout) = proc.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    let status = proc.wait()?;
    if !status.success() {
        bail!("bench child {mode}: {status}: {out}");
    }
    if let Some(serving) = serving {
        match serving.join() {
            Ok(session) => {
                session?;
            }
            Err(_) => bail!("the page server thread panicked"),
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    Ok((out, stats))
}

/// The VM hands freed guest memory back to the host, so first touches of "fresh" memory
/// cost several times more; touching and freeing 2 GiB first fills the free lists with
/// host-backed pages.
fn warm_guest_memory() {
    let mut v = vec![0u8; 2 << 30];
    for i in (0..v.len()).step_by(PAGE_SIZE as usize) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}
