//! `ckpt-bench precopy`: how long a process is frozen when it is moved in one piece (total
//! copy: dump, then restore) and with pre-copy (rounds of `--pre-dump --track-mem` while it runs,
//! then a final dump of what changed since the last round), for a process that keeps writing
//! its memory. The workload stops writing just before the final dump (so that it can check every
//! page afterwards); the downtime is the final dump plus the restore.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ckpt_tests::{ToolRun, Workload};
use nix::sys::signal::{kill, Signal};

/// What one migration run measured.
#[derive(Debug)]
pub struct Migration {
    pub algorithm: &'static str,
    /// Time and pages bytes of each pre-dump round.
    pub rounds: Vec<(Duration, u64)>,
    pub final_dump: Duration,
    pub final_bytes: u64,
    pub restore: Duration,
}

impl Migration {
    pub fn downtime(&self) -> Duration {
        self.final_dump + self.restore
    }
}

/// Parameters of the workload and the rounds.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub mib: u64,
    /// Pages the workload writes per millisecond.
    pub batch: u64,
    pub rounds: usize,
    /// The process runs this long before the first dump and between rounds.
    pub interval: Duration,
}

fn start(setup: Setup) -> Workload {
    let mut w = Workload::start(
        "precopy",
        &[
            "--mib",
            &setup.mib.to_string(),
            "--batch",
            &setup.batch.to_string(),
        ],
    );
    w.set_log_level(1);
    w
}

fn pages_bytes(dir: &Path) -> u64 {
    ckpt_tests::image_files(dir)
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-"))
        })
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn sibling(dir: &Path) -> String {
    format!(
        "../{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or_default()
    )
}

/// Asks the workload to stop writing and waits until it has.
fn quiesce(w: &Workload) -> anyhow::Result<()> {
    kill(w.pid(), Signal::SIGUSR1).context("SIGUSR1 to the workload")?;
    let quiet = w.dir().join("quiet");
    let start = Instant::now();
    while !quiet.exists() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the workload's writers do not stop");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Runs one migration with `rounds` pre-dump rounds (0: total copy) and checks the result.
pub fn migrate(setup: Setup, algorithm: &'static str) -> anyhow::Result<Migration> {
    let mut w = start(setup);
    std::thread::sleep(setup.interval);
    let rounds = if algorithm == "pre-copy" {
        setup.rounds
    } else {
        0
    };
    let mut prev: Option<PathBuf> = None;
    let mut measured = Vec::new();
    for _ in 0..rounds {
        let images = w.new_images_dir();
        let mut args = vec!["--pre-dump".to_owned(), "--track-mem".to_owned()];
        if let Some(p) = &prev {
            args.extend(["--prev-images-dir".to_owned(), sibling(p)]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = w.run_dump(&images, &refs, &[]);
        if !run.success() {
            bail!("pre-dump failed: {}", run.stderr);
        }
        measured.push((run.elapsed, pages_bytes(&images)));
        prev = Some(images);
        std::thread::sleep(setup.interval);
    }
    quiesce(&w)?;
    let mut args: Vec<String> = Vec::new();
    if let Some(p) = &prev {
        args.extend([
            "--track-mem".to_owned(),
            "--prev-images-dir".to_owned(),
            sibling(p),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (images, dump): (PathBuf, ToolRun) = w.dump_unchecked(&refs);
    let final_bytes = pages_bytes(&images);
    let restore = w.restore(&images);
    let verdict = w.finish();
    if verdict != "PASS" {
        bail!("{algorithm}: the restored workload reports: {verdict}");
    }
    Ok(Migration {
        algorithm,
        rounds: measured,
        final_dump: dump.elapsed,
        final_bytes,
        restore: restore.elapsed,
    })
}

pub fn print(setup: Setup, runs: &[Migration]) {
    println!(
        "process: {} MiB, writing {} random pages per ms; {:?} between rounds",
        setup.mib, setup.batch, setup.interval
    );
    println!(
        "{:<10} {:>6} {:>12} {:>13} {:>12} {:>10} {:>11}",
        "algorithm", "rounds", "pre-dump s", "final dump s", "final MiB", "restore s", "downtime s"
    );
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    for m in runs {
        let pre = if m.rounds.is_empty() {
            "-".to_owned()
        } else {
            let total: f64 = m.rounds.iter().map(|(d, _)| d.as_secs_f64()).sum();
            format!("{total:.3}")
        };
        println!(
            "{:<10} {:>6} {:>12} {:>13.3} {:>12.1} {:>10.3} {:>11.3}",
            m.algorithm,
            m.rounds.len(),
            pre,
            m.final_dump.as_secs_f64(),
            mib(m.final_bytes),
            m.restore.as_secs_f64(),
            m.downtime().as_secs_f64()
        );
        for (n, (d, b)) in m.rounds.iter().enumerate() {
            println!(
                "{:<10} round {}: {:.3} s, {:.1} MiB",
                "",
                n + 1,
                d.as_secs_f64(),
                mib(*b)
            );
        }
    }
    println!("downtime = final dump + restore (the process is frozen from one to the other)");
}
