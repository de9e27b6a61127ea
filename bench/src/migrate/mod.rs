//! `ckpt-bench migrate`: every migration algorithm, as a composition of the tools, over every
//! workload and bandwidth, measured the way Noack's thesis (TU Dresden, 2003, Tables 5.1-5.6)
//! measured its five algorithms, and written next to its figures.
//!
//! Source and destination are network namespaces joined by a veth pair shaped with `tc tbf`
//! (`testbed`); the destination restores into a fresh PID namespace. Both share this
//! machine's CPUs: the workload has the first, the destination and the harness the others
//! (`workload::Placement`). Each workload stamps
//! CLOCK_MONOTONIC every iteration (`workloads/mig.h`), so the down time is the longest gap in
//! its own loop during the migration, wherever it ran, faults included; after the migration it
//! checks its own memory. A cell whose tool step fails is recorded as failed with the error.
//! The tools ask that idle CPUs poll while they run (`ckpt_cli::IdlePoll`), as they do outside
//! the benchmark; the harness asks nothing of the kind, and between runs idle CPUs halt.
//!
//! Periods, as the thesis defines them (Fig. 2.1), from the request (t0):
//! preparation = t0 .. final freeze; down time = longest loop gap in t0 .. end;
//! post-processing = resumed at the destination .. last page moved and source gone;
//! total = t0 .. end. Execution delay = wall time from t0 to a point after the end, minus the
//! time the same iterations took before the migration; and its part after the resume (resume
//! .. end), which is what the thesis's Tables 5.2 and 5.4 hold.

mod chart;
mod downtime;
mod pipeline;
mod report;
mod testbed;
mod transfer;
mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use pipeline::{now_ns, Algorithm};
use pipeline::{Migration, PrecopyOptions, Tools};
use testbed::{Side, Testbed};
pub use workload::WorkloadKind;
use workload::{ClientStats, Stamps};

/// Arguments of `ckpt-bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// One repetition per cell, the 1 GiB workload only at 1 Gbit/s and unlimited.
    #[arg(long)]
    pub quick: bool,
    /// Directory for results.json, results.md and the charts.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Repetitions per cell in the full mode.
    #[arg(long, default_value_t = 5)]
    pub repetitions: u32,
    /// Only these algorithms (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub algorithms: Vec<Algorithm>,
    /// Only these workloads (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workloads: Vec<WorkloadKind>,
    /// Only these bandwidths in Mbit/s, `unlimited` for none (default: 10,100,1000,unlimited).
    #[arg(long, value_delimiter = ',')]
    pub bandwidths: Vec<String>,
    /// Pre-copy: at most this many rounds (the thesis used 6).
    #[arg(long, default_value_t = 6)]
    pub rounds: u32,
    /// Pre-copy: stop when the dirty set is at most this share of the address space, in percent
    /// (the thesis used 30).
    #[arg(long, default_value_t = 30)]
    pub max_dirty: u32,
    /// Dirty rate of the 1 GiB workload, MB/s.
    #[arg(long, default_value_t = 64)]
    pub dirty_rate: u64,
    /// Keep the images and logs of every cell under DIR/cells.
    #[arg(long)]
    pub keep: bool,
    /// Compress what crosses the link: the images (zlib, fastest level, as `ssh -C`) and the
    /// pages between the tools (`--compress-pages`, zstd). `auto` on links of 100 Mbit/s or
    /// less, where the wire costs more than the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    pub compress: Compress,
    /// Which algorithms run with a prepared destination (`ckpt-dump --prepare`,
    /// `ckpt-restore --prepared`): the process is rebuilt at the destination from a first
    /// image set while it runs on at the source, and only what changed crosses after the
    /// freeze (after the rounds, with the pages written since that first set). `none`: the
    /// plain pipelines (freeze, dump, transfer, restore); `post-copy`: post-copy and
    /// freeze-free prepared; `all`: those, and pre-copy, queued pre-copy and assisted
    /// post-copy measured both ways (preparation traded for down time).
    #[arg(long, value_enum, default_value = "all")]
    pub prepared: Prepared,
}

/// Which algorithms run prepared (see [`MigrateArgs::prepared`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prepared {
    None,
    PostCopy,
    All,
}

impl Prepared {
    /// How `algorithm` is measured: plain (`false`), prepared (`true`), or both.
    pub fn variants(self, algorithm: Algorithm) -> &'static [bool] {
        match (self, algorithm) {
            (Prepared::None, _) | (_, Algorithm::TotalCopy) => &[false],
            (_, Algorithm::PostCopy | Algorithm::FreezeFree) => &[true],
            (Prepared::PostCopy, _) => &[false],
            (Prepared::All, _) => &[false, true],
        }
    }
}

/// When images and pages are compressed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Auto,
    Always,
    Never,
}

impl Compress {
    /// Whether to compress on a link of `bandwidth` Mbit/s (`None`: unlimited).
    pub fn on(self, bandwidth: Option<u32>) -> bool {
        match self {
            Compress::Always => true,
            Compress::Never => false,
            Compress::Auto => bandwidth.is_some_and(|mbit| mbit <= 100),
        }
    }
}

/// One measured migration (or a failed attempt).
#[derive(Debug, Clone)]
pub struct Run {
    pub algorithm: Algorithm,
    pub workload: WorkloadKind,
    pub bandwidth_mbit: Option<u32>,
    pub repetition: u32,
    pub preparation_ms: f64,
    pub downtime_ms: f64,
    pub postprocessing_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    /// The time the fixed work took longer than unmigrated, from the request on: the
    /// preparation's cost to the process, the down time and what follows the resume.
    pub execution_delay_ms: f64,
    /// The part of it after the process resumed at the destination (its faults, cold
    /// caches, the tools still at work beside it): the thesis's Tables 5.2 and 5.4, "the
    /// additional execution time needed after migration", which leave the down time out.
    /// `None` if the resume's gap is not in the workload's ring.
    pub delay_after_resume_ms: Option<f64>,
    pub verified: bool,
    pub verdict: String,
    pub round_pages: Vec<u64>,
    /// Queued pre-copy: pages each round held back.
    pub round_held: Vec<u64>,
    /// The images and pages crossed the link compressed.
    pub compressed: bool,
    /// Ran with a prepared destination.
    pub prepared: bool,
    /// The down time cut into what happened meanwhile, ms (see `downtime`).
    pub downtime_parts: Vec<(String, f64)>,
    pub final_pages: u64,
    pub pages_resent: Option<u64>,
    pub stop_reason: Option<String>,
    /// Requests timed out during the migration, per deadline class (10, 30, 50 ms).
    pub client_timeouts: Option<[u64; 3]>,
    /// The failing step's error, when the migration did not complete.
    pub error: Option<String>,
    /// After a failure: whether the source ran on and passed its own check.
    pub source_intact: Option<bool>,
    pub steps: Vec<String>,
}

impl Run {
    /// The algorithm's name, and "(prepared)" for a prepared destination.
    pub fn label(&self) -> String {
        if self.prepared {
            format!("{} (prepared)", self.algorithm.name())
        } else {
            self.algorithm.name().to_string()
        }
    }
}

pub fn run(args: MigrateArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("migrate needs root: it creates network and PID namespaces and ptraces");
    }
    let tools = Tools::locate()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)
        .with_context(|| format!("resolve {}", args.out.display()))?;
    let tag = std::process::id();
    // tmpfs: images should not wait for a disk; both namespaces see it.
    let scratch = PathBuf::from(format!("/dev/shm/ckm-{tag}"));
    let scratch_guard = Scratch(scratch.clone(), args.keep.then(|| out.join("cells")));
    let bin = scratch.join("bin");
    workload::build_all(&bin)?;

    let algorithms = if args.algorithms.is_empty() {
        Algorithm::ALL.to_vec()
    } else {
        args.algorithms.clone()
    };
    let workloads = if args.workloads.is_empty() {
        WorkloadKind::ALL.to_vec()
    } else {
        args.workloads.clone()
    };
    let bandwidths = parse_bandwidths(&args.bandwidths)?;
    let repetitions = if args.quick {
        1
    } else {
        args.repetitions.max(1)
    };
    let cells = plan(
        &algorithms,
        &workloads,
        &bandwidths,
        args.quick,
        args.prepared,
    );
    let estimate: f64 = cells
        .iter()
        .map(|(a, w, b, _)| estimate_seconds(*a, *w, *b))
        .sum::<f64>()
        * f64::from(repetitions);
    println!(
        "migrate: {} cells x {repetitions} repetition(s); estimated {:.0} min (tools: {})",
        cells.len(),
        estimate / 60.0,
        tools
            .dump
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );

    let bed = Testbed::create(tag)?;
    let precopy = PrecopyOptions {
        rounds: args.rounds.max(1),
        max_dirty_percent: args.max_dirty.min(100),
    };
    // The harness keeps off the workload's CPU; what it starts inherits that.
    workload::Placement::Harness.apply()?;
    let mut runs = Vec::new();
    let started = Instant::now();
    let mut current_bw = None;
    let mut port = 20000u16;
    for (n, &(algorithm, kind, bandwidth, prepared)) in cells.iter().enumerate() {
        if current_bw != Some(bandwidth) {
            bed.set_bandwidth(bandwidth)?;
            current_bw = Some(bandwidth);
        }
        for repetition in 0..repetitions {
            // Short: the lazy-pages socket lives in it, and unix socket paths have 108 bytes.
            let cell_dir = scratch.join(format!(
                "{}{}-{}-{}-{repetition}",
                algorithm.short_name(),
                if prepared { "p" } else { "" },
                kind.short_name(),
                bandwidth.map_or("unl".to_string(), |b| b.to_string())
            ));
            let cell = Cell {
                bed: &bed,
                tools: &tools,
                bin: &bin,
                dir: &cell_dir,
                algorithm,
                kind,
                bandwidth,
                repetition,
                precopy,
                dirty_rate: args.dirty_rate,
                compress: args.compress,
                prepared,
            };
            let run = cell.measure(&mut port);
            println!(
                "[{}/{} {:.0}s] {} {} {}: {}",
                n + 1,
                cells.len(),
                started.elapsed().as_secs_f64(),
                run.label(),
                kind.name(),
                bw_name(bandwidth),
                summary(&run)
            );
            runs.push(run);
            if !args.keep {
                let _ = std::fs::remove_dir_all(&cell_dir);
            }
            report::write_json(&out.join("results.json"), &runs)?;
        }
    }
    drop(bed);
    report::write_markdown(&out.join("results.md"), &runs, repetitions)?;
    let charts = chart::draw_all(&out, &runs)?;
    println!(
        "migrate: wrote {}, {} and {} chart(s)",
        out.join("results.json").display(),
        out.join("results.md").display(),
        charts
    );
    drop(scratch_guard);
    Ok(())
}

/// The scratch directory, removed (or moved to `--out DIR/cells` with `--keep`) at the end.
struct Scratch(PathBuf, Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(keep) = &self.1 {
            let _ = std::fs::remove_dir_all(keep);
            // A rename cannot leave tmpfs; copy instead.
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(&self.0)
                .arg(keep)
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse_bandwidths(given: &[String]) -> Result<Vec<Option<u32>>> {
    if given.is_empty() {
        return Ok(vec![Some(10), Some(100), Some(1000), None]);
    }
    given
        .iter()
        .map(|b| match b.as_str() {
            "unlimited" | "none" => Ok(None),
            n => n
                .parse::<u32>()
                .map(Some)
                .with_context(|| format!("bandwidth {n:?} is not a number of Mbit/s")),
        })
        .collect()
}

/// The matrix, grouped by bandwidth so the qdisc changes rarely: algorithm, workload,
/// bandwidth, prepared.
fn plan(
    algorithms: &[Algorithm],
    workloads: &[WorkloadKind],
    bandwidths: &[Option<u32>],
    quick: bool,
    prepared: Prepared,
) -> Vec<(Algorithm, WorkloadKind, Option<u32>, bool)> {
    let mut cells = Vec::new();
    for &bandwidth in bandwidths {
        for &kind in workloads {
            // 1 GiB at 10 Mbit/s is 15 minutes of wire time per copy.
            if quick && kind == WorkloadKind::Dirtier && bandwidth.is_some_and(|mbit| mbit < 1000) {
                continue;
            }
            for &algorithm in algorithms {
                for &variant in prepared.variants(algorithm) {
                    cells.push((algorithm, kind, bandwidth, variant));
                }
            }
        }
    }
    cells
}

fn estimate_seconds(algorithm: Algorithm, kind: WorkloadKind, bandwidth: Option<u32>) -> f64 {
    let wire = match bandwidth {
        Some(mbit) => kind.approx_bytes() as f64 * 8.0 / (f64::from(mbit) * 1e6),
        None => kind.approx_bytes() as f64 / 1.5e9,
    };
    let copies = match algorithm {
        Algorithm::TotalCopy | Algorithm::PostCopy | Algorithm::FreezeFree => 1.0,
        Algorithm::AssistedPostCopy => 2.0,
        Algorithm::PreCopy | Algorithm::QueuedPreCopy => 3.0,
    };
    let setup = if kind == WorkloadKind::Dirtier {
        4.0
    } else {
        1.5
    };
    setup + wire * copies
}

pub fn bw_name(bandwidth: Option<u32>) -> String {
    match bandwidth {
        Some(mbit) => format!("{mbit}mbit"),
        None => "unlimited".to_string(),
    }
}

fn summary(run: &Run) -> String {
    match &run.error {
        Some(e) => format!("FAILED: {e}"),
        None => format!(
            "prep {:.1} ms, down {:.1} ms, post {:.1} ms, total {:.1} ms, {} bytes, {}",
            run.preparation_ms,
            run.downtime_ms,
            run.postprocessing_ms,
            run.total_ms,
            run.bytes,
            if run.verified {
                "verified"
            } else {
                "NOT VERIFIED"
            }
        ),
    }
}

struct Cell<'a> {
    bed: &'a Testbed,
    tools: &'a Tools,
    bin: &'a Path,
    dir: &'a Path,
    algorithm: Algorithm,
    kind: WorkloadKind,
    bandwidth: Option<u32>,
    repetition: u32,
    precopy: PrecopyOptions,
    dirty_rate: u64,
    compress: Compress,
    prepared: bool,
}

/// The workload at the source: our child, killed and reaped when dropped.
struct SourceGuard(std::process::Child);

impl SourceGuard {
    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).unwrap_or(i32::MAX)
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Cell<'_> {
    fn measure(&self, port: &mut u16) -> Run {
        let mut run = Run {
            algorithm: self.algorithm,
            workload: self.kind,
            bandwidth_mbit: self.bandwidth,
            repetition: self.repetition,
            preparation_ms: 0.0,
            downtime_ms: 0.0,
            postprocessing_ms: 0.0,
            total_ms: 0.0,
            bytes: 0,
            execution_delay_ms: 0.0,
            delay_after_resume_ms: None,
            verified: false,
            verdict: String::new(),
            round_pages: Vec::new(),
            round_held: Vec::new(),
            downtime_parts: Vec::new(),
            compressed: self.compress.on(self.bandwidth),
            prepared: self.prepared,
            final_pages: 0,
            pages_resent: None,
            stop_reason: None,
            client_timeouts: None,
            error: None,
            source_intact: None,
            steps: Vec::new(),
        };
        if let Err(e) = self.measure_into(&mut run, port) {
            run.error = Some(format!("{e:#}"));
        }
        run
    }

    fn step_timeout(&self) -> Duration {
        let bytes = self.kind.approx_bytes() as f64;
        let wire = match self.bandwidth {
            Some(mbit) => bytes * 8.0 / (f64::from(mbit) * 1e6),
            None => bytes / 1e9,
        };
        Duration::from_secs_f64(30.0 + wire * 4.0)
    }

    fn measure_into(&self, run: &mut Run, port: &mut u16) -> Result<()> {
        std::fs::create_dir_all(self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let stamps = self.dir.join("stamps");
        let udp = self.kind == WorkloadKind::Udp;
        if udp {
            self.bed.reset_service_address()?;
        }
        let cmd = workload::command(self.kind, self.bin, &stamps, self.dirty_rate);
        let mut source = SourceGuard(workload::spawn_in(
            &self.bed.ns_path(Side::Source),
            &cmd,
            &self.dir.join("workload.out"),
            workload::Placement::Workload,
        )?);
        workload::wait_ready(&stamps, &mut source.0, Duration::from_secs(120))?;
        let client_stats = self.dir.join("client.stats");
        let _client = if udp {
            let child = workload::spawn_in(
                &self.bed.ns_path(Side::Clients),
                &workload::client_command(self.bin, &client_stats),
                &self.dir.join("client.out"),
                workload::Placement::Anywhere,
            )?;
            Some(SourceGuard(child))
        } else {
            None
        };

        // The unmigrated rate: iterations per ns over half a second before the request.
        std::thread::sleep(Duration::from_millis(300));
        let before = Stamps::read(&stamps)?;
        let clients_before = if udp {
            let stats = ClientStats::read(&client_stats)?;
            if stats.answered.iter().sum::<u64>() == 0 {
                bail!("the UDP clients got no answer before the migration");
            }
            Some(stats)
        } else {
            None
        };
        std::thread::sleep(Duration::from_millis(500));
        let baseline = Stamps::read(&stamps)?;
        let rate = (baseline.iterations.saturating_sub(before.iterations)) as f64
            / (baseline.last_ns.saturating_sub(before.last_ns)).max(1) as f64;

        let bytes_before = self.bed.link_bytes()?;
        let start = Stamps::read(&stamps)?;
        let mut migration = Migration {
            bed: self.bed,
            tools: self.tools,
            dir: self.dir,
            pid: source.pid(),
            stamps: &stamps,
            precopy: self.precopy,
            step_timeout: self.step_timeout(),
            next_port: *port,
            move_service: udp,
            compress: self.compress.on(self.bandwidth),
            prepared: self.prepared,
            outcome: Default::default(),
        };
        let result = migration.run(self.algorithm);
        *port = migration.next_port;
        let outcome = std::mem::take(&mut migration.outcome);
        // The workload's progress as the migration ends, published after the resume: what
        // it did since the resume, against the time since, is the delay after the resume.
        let at_done = match &result {
            Ok(_) => progress_since(&stamps, outcome.t_resumed),
            Err(_) => None,
        };
        run.steps = outcome.steps.clone();
        run.round_pages = outcome.round_pages.clone();
        run.round_held = outcome.round_held.clone();
        run.final_pages = outcome.final_pages;
        run.prepared = self.prepared;
        run.stop_reason = outcome.stop_reason.clone();
        let restored = match result {
            Ok(restored) => restored,
            Err(e) => {
                run.source_intact = Some(self.source_intact(&stamps, &mut source));
                if udp {
                    let _ = self.bed.reset_service_address();
                }
                return Err(e);
            }
        };
        // The destination runs: nothing may remain at the source.
        let _ = kill(Pid::from_raw(source.pid()), Signal::SIGKILL);
        let _ = source.0.wait();

        std::thread::sleep(Duration::from_millis(300));
        let after = Stamps::read(&stamps)?;
        let bytes_after = self.bed.link_bytes()?;
        if let Some(c0) = clients_before {
            let delta = ClientStats::read(&client_stats)?.since(&c0);
            run.client_timeouts = Some(delta.timed_out);
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        let t0 = outcome.t_request;
        run.preparation_ms = ms(outcome.t_freeze.saturating_sub(t0));
        let window_end = outcome.t_done.max(outcome.t_resumed);
        run.downtime_ms = ms(after.longest_gap(t0, window_end));
        if let Some(gap) = after.longest_gap_bounds(t0, window_end) {
            run.downtime_parts = downtime::split(gap, &outcome.all_marks());
        }
        run.postprocessing_ms = ms(outcome.t_done.saturating_sub(outcome.t_resumed));
        run.total_ms = ms(outcome.t_done.saturating_sub(t0));
        run.bytes = bytes_after.saturating_sub(bytes_before);
        let did = after.iterations.saturating_sub(start.iterations) as f64;
        let wall = after.last_ns.saturating_sub(start.last_ns) as f64;
        if rate > 0.0 {
            run.execution_delay_ms = (wall - did / rate) / 1e6;
            run.delay_after_resume_ms = at_done.as_ref().and_then(|done| {
                let at_resume = after.iterations_at_gap_end(outcome.t_resumed)?;
                let wall = done.last_ns.saturating_sub(outcome.t_resumed) as f64;
                let did = done.iterations.saturating_sub(at_resume) as f64;
                Some((wall - did / rate) / 1e6)
            });
        }
        run.pages_resent = match self.algorithm {
            // Round 1 sends every page: what follows is sent again.
            Algorithm::PreCopy | Algorithm::AssistedPostCopy => Some(
                run.round_pages.iter().skip(1).sum::<u64>()
                    + if self.algorithm == Algorithm::PreCopy {
                        run.final_pages
                    } else {
                        0
                    },
            ),
            Algorithm::TotalCopy | Algorithm::PostCopy | Algorithm::FreezeFree => Some(0),
            // The first round held every page: whatever was sent beyond that count was sent
            // again (pages mapped during the migration count as resent too).
            Algorithm::QueuedPreCopy => Some(
                (run.round_pages.iter().sum::<u64>() + run.final_pages)
                    .saturating_sub(run.round_held.first().copied().unwrap_or(0)),
            ),
        };

        workload::request_verify(&stamps)?;
        // Checking 1 GiB takes about a second; a process that gives no verdict in this time
        // hangs (a page that never arrives).
        let verdict_timeout = Duration::from_secs(if self.kind == WorkloadKind::Dirtier {
            15
        } else {
            5
        });
        let (passed, message) = workload::wait_verdict(&stamps, verdict_timeout)?;
        run.verified = passed;
        run.verdict = message;
        // The workload exited after its verdict; its namespace goes with `restored`.
        drop(restored);
        Ok(())
    }

    /// After a failed migration: does the source run on, with its memory intact?
    fn source_intact(&self, stamps: &Path, source: &mut SourceGuard) -> bool {
        if matches!(source.0.try_wait(), Ok(Some(_))) {
            return false;
        }
        let a = Stamps::read(stamps).map(|s| s.iterations).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(200));
        let b = Stamps::read(stamps).map(|s| s.iterations).unwrap_or(0);
        if b <= a || workload::request_verify(stamps).is_err() {
            return false;
        }
        matches!(
            workload::wait_verdict(stamps, Duration::from_secs(30)),
            Ok((true, _))
        )
    }
}

/// The workload's progress once it has published some after `resumed` (it publishes every
/// millisecond), within 100 ms; `None` if it did not.
fn progress_since(stamps: &Path, resumed: u64) -> Option<Stamps> {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        let now = Stamps::read(stamps).ok()?;
        if now.last_ns > resumed {
            return Some(now);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plan_runs_the_large_workload_only_on_fast_links() {
        let cells = plan(
            &[Algorithm::TotalCopy],
            &[WorkloadKind::Dirtier, WorkloadKind::Rma],
            &[Some(10), Some(1000), None],
            true,
            Prepared::All,
        );
        let large: Vec<_> = cells
            .iter()
            .filter(|c| c.1 == WorkloadKind::Dirtier)
            .map(|c| c.2)
            .collect();
        assert_eq!(large, vec![Some(1000), None]);
        assert_eq!(cells.iter().filter(|c| c.1 == WorkloadKind::Rma).count(), 3);
    }

    #[test]
    fn the_round_based_algorithms_run_both_ways_when_all_are_prepared() {
        let algorithms = [
            Algorithm::TotalCopy,
            Algorithm::PreCopy,
            Algorithm::PostCopy,
        ];
        let variants = |p: Prepared| -> Vec<(Algorithm, bool)> {
            plan(&algorithms, &[WorkloadKind::Rma], &[None], false, p)
                .iter()
                .map(|c| (c.0, c.3))
                .collect()
        };
        assert_eq!(
            variants(Prepared::All),
            vec![
                (Algorithm::TotalCopy, false),
                (Algorithm::PreCopy, false),
                (Algorithm::PreCopy, true),
                (Algorithm::PostCopy, true)
            ]
        );
        assert_eq!(
            variants(Prepared::PostCopy),
            vec![
                (Algorithm::TotalCopy, false),
                (Algorithm::PreCopy, false),
                (Algorithm::PostCopy, true)
            ]
        );
        assert!(variants(Prepared::None).iter().all(|&(_, p)| !p));
    }

    #[test]
    fn bandwidths_parse_numbers_and_unlimited() {
        let parsed = parse_bandwidths(&["10".into(), "unlimited".into()]).unwrap();
        assert_eq!(parsed, vec![Some(10), None]);
        assert!(parse_bandwidths(&["fast".into()]).is_err());
    }
}
