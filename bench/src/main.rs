//! `ckpt-bench dump-restore`: how long `ckpt-dump` and `ckpt-restore` take for processes of
//! 64 MiB, 1 GiB and 4 GiB of memory and for one with 256 threads, cold (page cache dropped
//! before each step) and warm (the same cycle again at once, min and median of N), next to
//! CRIU 4.2's measured figures and to the speed at which `process_vm_readv` alone reads the
//! same memory.
//!
//! The workloads are the test suite's self-checking programs: every restored process is asked
//! to verify its memory, so a fast but wrong run does not count. Needs root and the tools built
//! in the same profile (`cargo build --release --workspace`).
#![forbid(unsafe_code)]

mod migrate;
mod precopy;
mod tree;
mod wake;

use std::io::IoSliceMut;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_tests::{ToolRun, Workload};
use clap::{Parser, Subcommand};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};

/// CRIU 4.2 built from source, on this kind of machine (2 CPUs, kernel 6.18, images on ext4),
/// the same 1 GiB workload, warm, median of 4 sets (seconds): `criu dump` followed by `sync -f`
/// of its images (0.75-0.83; ckpt-dump syncs what a killing dump writes, CRIU does not: its dump
/// alone took 0.45-0.52), and `criu restore` (0.48-0.49).
const CRIU_DUMP_1G: f64 = 0.80;
const CRIU_RESTORE_1G: f64 = 0.48;

#[derive(Debug, Parser)]
#[command(name = "ckpt-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Dump and restore times for several memory sizes and a many-threaded process.
    DumpRestore {
        /// Memory sizes to measure, in MiB.
        #[arg(long, value_delimiter = ',', default_value = "64,1024,4096")]
        sizes: Vec<u64>,
        /// Thread count of the threaded workload (0 to skip it).
        #[arg(long, default_value_t = 256)]
        threads: u32,
        /// Warm dump/restore cycles per workload after the cold one.
        #[arg(long, default_value_t = 3)]
        warm_runs: usize,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Freeze time of a process that keeps writing: total copy against pre-copy.
    Precopy {
        /// Memory of the process, in MiB.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Random pages it writes per millisecond.
        #[arg(long, default_value_t = 16)]
        batch: u64,
        /// Pre-dump rounds before the final dump.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Milliseconds the process runs before the first dump and between rounds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Migration algorithms x workloads x bandwidths beside the thesis's tables.
    Migrate(migrate::MigrateArgs),
    /// State collection time of a tree of 100 processes with 100 descriptors each.
    Tree(tree::TreeArgs),
    /// Wake-up latency of a thread on an idle CPU: CPUs that halt, and CPUs that poll.
    Wake(wake::WakeArgs),
}

/// One measured dump + restore cycle.
#[derive(Debug, Clone)]
struct Row {
    workload: String,
    run: &'static str,
    mib: Option<u64>,
    dump: Duration,
    restore: Duration,
    image_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::DumpRestore {
            sizes,
            threads,
            warm_runs,
            json,
        } => dump_restore(&sizes, threads, warm_runs, json),
        Cmd::Migrate(args) => migrate::run(args),
        Cmd::Tree(args) => tree::run(args),
        Cmd::Wake(args) => wake::run(args),
        Cmd::Precopy {
            mib,
            batch,
            rounds,
            interval_ms,
        } => {
            if !nix::unistd::geteuid().is_root() {
                bail!("run as root: dumping and restoring need ptrace and clone3 with set_tid");
            }
            let setup = precopy::Setup {
                mib,
                batch,
                rounds,
                interval: Duration::from_millis(interval_ms),
            };
            let runs = ["total", "pre-copy"]
                .into_iter()
                .map(|algorithm| precopy::migrate(setup, algorithm))
                .collect::<anyhow::Result<Vec<_>>>()?;
            precopy::print(setup, &runs);
            Ok(())
        }
    }
}

fn dump_restore(
    sizes: &[u64],
    threads: u32,
    warm_runs: usize,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "run as root: dumping and restoring need ptrace of any process and clone3 with set_tid"
        );
    }
    println!(
        "kernel {}, {} CPUs",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut rows = Vec::new();
    let mut readv = Vec::new();
    for &mib in sizes {
        let mut w = Workload::start("mem_large", &["--mib", &mib.to_string()]);
        w.set_log_level(1);
        let rate = readv_rate(&w)
            .with_context(|| format!("process_vm_readv of the {mib} MiB workload"))?;
        readv.push((mib, rate));
        rows.extend(cycles(&mut w, &format!("{mib} MiB"), Some(mib), warm_runs)?);
    }
    if threads > 0 {
        let mut w = Workload::start("threads", &["--threads", &threads.to_string()]);
        w.set_log_level(1);
        rows.extend(cycles(
            &mut w,
            &format!("{threads} threads"),
            None,
            warm_runs,
        )?);
    }
    print_table(&rows, &readv);
    println!("{}", criu_status());
    if let Some(path) = json {
        std::fs::write(&path, to_json(&rows, &readv).to_string())
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// One cold dump/restore cycle of `w`, then `warm_runs` warm ones summarised as their minimum
/// and median; then the workload checks itself.
fn cycles(
    w: &mut Workload,
    label: &str,
    mib: Option<u64>,
    warm_runs: usize,
) -> anyhow::Result<Vec<Row>> {
    let mut cold = cycle(w, label, mib, true);
    cold.run = "cold";
    let mut warm: Vec<Row> = (0..warm_runs)
        .map(|_| cycle(w, label, mib, false))
        .collect();
    let verdict = w.finish();
    if verdict != "PASS" {
        bail!("{label}: the restored workload reports: {verdict}");
    }
    let mut rows = vec![cold];
    if !warm.is_empty() {
        let pick = |warm: &mut Vec<Row>, key: fn(&Row) -> Duration, at: usize| -> Duration {
            warm.sort_by_key(key);
            key(&warm[at])
        };
        let mid = warm.len() / 2;
        let mut min = warm[0].clone();
        min.run = "warm min";
        min.dump = pick(&mut warm, |r| r.dump, 0);
        min.restore = pick(&mut warm, |r| r.restore, 0);
        let mut median = warm[0].clone();
        median.run = "warm median";
        median.dump = pick(&mut warm, |r| r.dump, mid);
        median.restore = pick(&mut warm, |r| r.restore, mid);
        rows.push(min);
        rows.push(median);
    }
    Ok(rows)
}

/// Dumps `w` (which kills it) and restores it; `cold` drops the page cache before each step.
fn cycle(w: &mut Workload, label: &str, mib: Option<u64>, cold: bool) -> Row {
    if cold {
        drop_caches();
    }
    let (images, dump) = w.dump_unchecked(&[]);
    let image_bytes = dir_size(&images);
    if cold {
        drop_caches();
    }
    let restore: ToolRun = w.restore(&images);
    // Only the latest images matter; 4 GiB ones would fill the disk.
    let _ = std::fs::remove_dir_all(&images);
    Row {
        workload: label.to_owned(),
        run: "warm",
        mib,
        dump: dump.elapsed,
        restore: restore.elapsed,
        image_bytes,
    }
}

/// Writes back and drops the page cache, so the next step reads from disk. Best effort: in a
/// container without the right to do so, runs are warm anyway and say so.
fn drop_caches() {
    nix::unistd::sync();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("note: cannot drop the page cache; cold runs are warm");
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes per second at which `process_vm_readv` reads the workload's region in 4 MiB chunks
/// (best of three passes): the ceiling for a dump's memory copy.
fn readv_rate(w: &Workload) -> anyhow::Result<f64> {
    let ready = w.ready_text();
    let (addr, len) =
        parse_region(&ready).with_context(|| format!("region in ready file {ready:?}"))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut off = 0;
        while off < len {
            let n = buf.len().min(len - off);
            let got = process_vm_readv(
                w.pid(),
                &mut [IoSliceMut::new(&mut buf[..n])],
                &[RemoteIoVec {
                    base: addr + off,
                    len: n,
                }],
            )
            .with_context(|| format!("read {n} bytes at {:#x}", addr + off))?;
            if got == 0 {
                bail!("process_vm_readv read nothing at {:#x}", addr + off);
            }
            off += got;
        }
        best = best.min(start.elapsed());
    }
    Ok(len as f64 / best.as_secs_f64())
}

/// "addr=0x7f.. len=N" as written by the mem_large workload.
fn parse_region(text: &str) -> Option<(usize, usize)> {
    let mut addr = None;
    let mut len = None;
    for word in text.split_whitespace() {
        if let Some(v) = word.strip_prefix("addr=") {
            addr = usize::from_str_radix(v.trim_start_matches("0x"), 16).ok();
        } else if let Some(v) = word.strip_prefix("len=") {
            len = v.parse().ok();
        }
    }
    Some((addr?, len?))
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// CRIU's figure for this row, when there is one to compare with (the 1 GiB process).
fn criu(row: &Row) -> Option<(f64, f64)> {
    (row.mib == Some(1024)).then_some((CRIU_DUMP_1G, CRIU_RESTORE_1G))
}

fn print_table(rows: &[Row], readv: &[(u64, f64)]) {
    println!();
    println!(
        "{:<12} {:<11} {:>9} {:>10} {:>10} {:>13} {:>16} {:>11}",
        "workload",
        "run",
        "dump s",
        "restore s",
        "dump GB/s",
        "dump / CRIU",
        "restore / CRIU",
        "images MiB"
    );
    for row in rows {
        let rate = row
            .mib
            .map(|mib| format!("{:.2}", (mib << 20) as f64 / secs(row.dump) / 1e9))
            .unwrap_or_else(|| "-".into());
        let (d_ratio, r_ratio) = match criu(row) {
            Some((d, r)) => (
                format!("{:.2}x", secs(row.dump) / d),
                format!("{:.2}x", secs(row.restore) / r),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<12} {:<11} {:>9.3} {:>10.3} {:>10} {:>13} {:>16} {:>11.1}",
            row.workload,
            row.run,
            secs(row.dump),
            secs(row.restore),
            rate,
            d_ratio,
            r_ratio,
            row.image_bytes as f64 / f64::from(1u32 << 20)
        );
    }
    println!();
    println!(
        "CRIU 4.2, 1 GiB process, measured on this kind of machine: dump and sync \
         {CRIU_DUMP_1G:.2} s, restore {CRIU_RESTORE_1G:.2} s (ratio < 1: ckpt is faster)"
    );
    println!(
        "ckpt-dump writes pages with O_DIRECT: a restore right after reads them from disk, where \
         CRIU's restore reads what its buffered dump left in the page cache"
    );
    for (mib, rate) in readv {
        println!(
            "process_vm_readv of the same {mib} MiB: {:.2} GB/s ({:.3} s): \
             the ceiling for a dump's memory copy",
            rate / 1e9,
            (mib << 20) as f64 / rate
        );
    }
    println!("times are wall-clock runs of the tools, process start-up included; cold runs drop");
    println!("the page cache before the dump and before the restore (the restore reads from disk)");
}

/// Whether a CRIU that works is installed: the measured figures stand in for one that does not.
fn criu_status() -> String {
    match std::process::Command::new("criu").arg("check").output() {
        Err(_) => {
            "CRIU is not installed: the CRIU column uses CRIU 4.2's measured figures".to_owned()
        }
        Ok(out) if out.status.success() => {
            "a working CRIU is installed; this benchmark does not run it, the CRIU column uses \
             CRIU 4.2's measured figures"
                .to_owned()
        }
        Ok(_) => "the installed CRIU does not run on this kernel (`criu check` fails): the CRIU \
                  column uses CRIU 4.2's measured figures"
            .to_owned(),
    }
}

fn to_json(rows: &[Row], readv: &[(u64, f64)]) -> serde_json::Value {
    serde_json::json!({
        "criu_1g": { "dump_s": CRIU_DUMP_1G, "restore_s": CRIU_RESTORE_1G },
        "rows": rows.iter().map(|r| serde_json::json!({
            "workload": r.workload,
            "run": r.run,
            "mib": r.mib,
            "dump_s": secs(r.dump),
            "restore_s": secs(r.restore),
            "image_bytes": r.image_bytes,
        })).collect::<Vec<_>>(),
        "process_vm_readv": readv.iter().map(|(mib, rate)| serde_json::json!({
            "mib": mib, "bytes_per_s": rate,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_region;

    #[test]
    fn region_is_read_from_the_ready_file() {
        assert_eq!(
            parse_region("addr=0x7f0000001000 len=4096\n"),
            Some((0x7f00_0000_1000, 4096))
        );
        assert_eq!(parse_region("ready\n"), None);
    }
}
