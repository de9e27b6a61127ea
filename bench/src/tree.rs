//! `ckpt-bench tree`: how long `ckpt-dump` takes to collect the state of a wide process tree
//! (by default 100 processes holding 100 descriptors each: regular files, pipes, eventfds and
//! unix socketpairs, of which ten are open file descriptions shared by every process), dumped N
//! times with `--leave-running`.
//!
//! Per run: the state-collection time (the dump log's `collected us=N`: from the frozen tree to
//! every process's state in memory, images not yet written), the image-writing time (`written
//! us=N`), the freezing and frozen times of `stats-dump`, and the wall-clock time of the whole
//! `ckpt-dump` command; then the median, the extremes and the spread of each. Every run is
//! checked to hold the whole tree (pstree.img entries, fdinfo entries), and at the end the tree
//! checks its own descriptors, so that a fast but partial dump does not count.
//!
//! CRIU's figures are measured on this kind of machine (2 CPUs, kernel 6.18) with CRIU 4.2 built
//! from source, dumping the same tree (default arguments) with `criu dump --leave-running`, images
//! on tmpfs, 10 runs, medians of its stats-dump. Unchanged, CRIU 4.2 refuses this tree ("OOM
//! storing pipe": it keeps at most 1024 distinct pipes, and the tree has 1502); the figures are
//! from a build whose only change raises that limit to 4096. CRIU has no separate collection
//! phase: frozen_time minus memdump_time (reading and writing the pages) is what comes closest
//! to our state collection, and frozen_time is the same span as ours.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ckpt_tests::{run_tool, ToolRun, Workload};
use nix::unistd::Pid;

/// CRIU 4.2's frozen time minus its memory dump, for the default tree, in ms (median of 10;
/// 374.7-464.9).
const CRIU_COLLECT_MS: f64 = 419.2;
/// CRIU 4.2's frozen time for the default tree, in ms (median of 10; 415.3-525.3).
const CRIU_FROZEN_MS: f64 = 468.3;

#[derive(Debug, clap::Args)]
pub struct TreeArgs {
    /// Processes in the tree (root included).
    #[arg(long, default_value_t = 100)]
    procs: u32,
    /// Open descriptors per process (stdin, stdout and stderr included).
    #[arg(long, default_value_t = 100)]
    fds: u32,
    /// Children per process (the tree is as wide as this and as deep as it must be).
    #[arg(long, default_value_t = 10)]
    fanout: u32,
    /// Descriptors the root opens before forking, shared by every process.
    #[arg(long, default_value_t = 10)]
    inherit: u32,
    /// Include unix socketpairs in the mix of descriptors (`--sockets false` to leave them
    /// out).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sockets: bool,
    /// Measured dumps (after one unmeasured warm-up dump).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measured dump.
#[derive(Debug, Clone, Copy)]
struct Run {
    collect_ms: f64,
    write_ms: f64,
    freezing_ms: f64,
    frozen_ms: f64,
    total_ms: f64,
}

/// Median, extremes and relative spread of one quantity.
#[derive(Debug, Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(values: impl Iterator<Item = f64>) -> Summary {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// (max - min) / median, in percent.
    fn spread_pct(&self) -> f64 {
        (self.max - self.min) / self.median * 100.0
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "median": self.median, "min": self.min, "max": self.max,
            "spread_pct": self.spread_pct(),
        })
    }
}

pub fn run(args: TreeArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root: dumping needs ptrace of every process of the tree");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut w = Workload::start(
        "tree_fanout",
        &[
            "--procs",
            &args.procs.to_string(),
            "--fds",
            &args.fds.to_string(),
            "--fanout",
            &args.fanout.to_string(),
            "--inherit",
            &args.inherit.to_string(),
            "--sockets",
            if args.sockets { "1" } else { "0" },
        ],
    );
    // Info level: the log must hold the collection time, and tracing every step costs time.
    w.set_log_level(2);
    let procs = count_tree(w.pid());
    if procs != args.procs as usize {
        bail!("the workload runs {procs} processes, {} asked", args.procs);
    }
    println!(
        "tree of {procs} processes (fanout {}), {} descriptors each ({} shared by all{}), {} \
         dumps with --leave-running",
        args.fanout,
        args.fds,
        args.inherit,
        if args.sockets {
            "; files, pipes, eventfds, socketpairs"
        } else {
            "; files, pipes, eventfds"
        },
        args.runs
    );

    let warm_up = dump_once(&mut w, &args)?;
    println!(
        "warm-up dump: collect {:.1} ms, total {:.1} ms (not counted)",
        warm_up.collect_ms, warm_up.total_ms
    );
    let runs = (0..args.runs)
        .map(|_| dump_once(&mut w, &args))
        .collect::<anyhow::Result<Vec<Run>>>()?;
    let verdict = w.finish();
    if verdict != "PASS" {
        bail!("after {} dumps the tree reports: {verdict}", args.runs + 1);
    }

    let collect = Summary::of(runs.iter().map(|r| r.collect_ms));
    let write = Summary::of(runs.iter().map(|r| r.write_ms));
    let freezing = Summary::of(runs.iter().map(|r| r.freezing_ms));
    let frozen = Summary::of(runs.iter().map(|r| r.frozen_ms));
    let total = Summary::of(runs.iter().map(|r| r.total_ms));
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "ms", "median", "min", "max", "spread"
    );
    for (label, s) in [
        ("state collection (log: collected)", collect),
        ("image writing (log: written)", write),
        ("freezing (stats-dump)", freezing),
        ("frozen (stats-dump)", frozen),
        ("whole ckpt-dump command", total),
    ] {
        println!(
            "{label:<34} {:>9.2} {:>9.2} {:>9.2} {:>8.0}%",
            s.median,
            s.min,
            s.max,
            s.spread_pct()
        );
    }
    println!();
    // CRIU's figures are for the default tree only.
    let criu_shape = args.procs == 100
        && args.fds == 100
        && args.fanout == 10
        && args.inherit == 10
        && args.sockets;
    if criu_shape {
        println!(
            "state collection / CRIU: {:.2}x (median {:.2} ms against CRIU 4.2's frozen time \
             minus its memory dump, {CRIU_COLLECT_MS:.1} ms, measured on this kind of machine; \
             ratio < 1: ckpt is faster)",
            collect.median / CRIU_COLLECT_MS,
            collect.median
        );
        println!(
            "frozen / CRIU: {:.2}x (median {:.2} ms against CRIU 4.2's {CRIU_FROZEN_MS:.1} ms)",
            frozen.median / CRIU_FROZEN_MS,
            frozen.median
        );
    } else {
        println!("no CRIU ratio: CRIU's figures are for the default tree");
    }
    println!(
        "per process: {:.3} ms collect; per descriptor: {:.1} µs",
        collect.median / procs as f64,
        collect.median * 1000.0 / (procs as f64 * f64::from(args.fds))
    );
    println!("the whole command includes starting ckpt-dump, writing the images and letting go");
    if let Some(path) = &args.json {
        let value = serde_json::json!({
            "procs": procs,
            "fds_per_process": args.fds,
            "fanout": args.fanout,
            "shared_fds": args.inherit,
            "sockets": args.sockets,
            "runs": args.runs,
            "collect_ms": collect.json(),
            "write_ms": write.json(),
            "freezing_ms": freezing.json(),
            "frozen_ms": frozen.json(),
            "total_ms": total.json(),
            "criu_collect_ms": criu_shape.then_some(CRIU_COLLECT_MS),
            "ratio_to_criu": criu_shape.then(|| collect.median / CRIU_COLLECT_MS),
            "criu_frozen_ms": criu_shape.then_some(CRIU_FROZEN_MS),
            "frozen_ratio_to_criu": criu_shape.then(|| frozen.median / CRIU_FROZEN_MS),
        });
        std::fs::write(path, value.to_string())
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// One `ckpt-dump --leave-running` of the tree, checked to hold every process and descriptor,
/// its images removed afterwards.
fn dump_once(w: &mut Workload, args: &TreeArgs) -> anyhow::Result<Run> {
    let (images, run) = w.dump_unchecked(&["--leave-running"]);
    let log_path = images.with_extension("dump.log");
    let log = std::fs::read_to_string(&log_path)
        .with_context(|| format!("read {}", log_path.display()))?;
    let collect_us = logged_us(&log, "collected")
        .with_context(|| format!("no `collected us=N` line in {}", log_path.display()))?;
    let write_us = logged_us(&log, "written")
        .with_context(|| format!("no `written us=N` line in {}", log_path.display()))?;
    let stats = decode(w, &images.join("stats-dump"))?;
    let dump = &stats["entries"][0]["dump"];
    let field = |name: &str| -> anyhow::Result<f64> {
        dump[name]
            .as_f64()
            .with_context(|| format!("stats-dump has no {name}: {stats}"))
    };
    let processes = decode(w, &images.join("pstree.img"))?["entries"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    if processes != args.procs as usize {
        bail!(
            "pstree.img lists {processes} processes, the tree has {}",
            args.procs
        );
    }
    let fds = count_fdinfo(w, &images)?;
    // A pair opened last may overshoot the count by one.
    let want = args.procs as usize * args.fds as usize;
    if fds < want {
        bail!("the fdinfo images hold {fds} descriptors, the tree has at least {want}");
    }
    let result = Run {
        collect_ms: collect_us / 1000.0,
        write_ms: write_us / 1000.0,
        freezing_ms: field("freezing_time")? / 1000.0,
        frozen_ms: field("frozen_time")? / 1000.0,
        total_ms: ms(&run),
    };
    std::fs::remove_dir_all(&images).with_context(|| format!("remove {}", images.display()))?;
    Ok(result)
}

fn ms(run: &ToolRun) -> f64 {
    run.elapsed.as_secs_f64() * 1000.0
}

/// The `WHAT us=N` of the dump's log: `collected` (the whole tree's state read, frozen) or
/// `written` (the images written, still frozen).
fn logged_us(log: &str, what: &str) -> Option<f64> {
    let key = format!(": {what} us=");
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once(&key)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// An image as JSON, through `ckpt-img decode`.
fn decode(w: &Workload, image: &Path) -> anyhow::Result<serde_json::Value> {
    let run = run_tool(
        &w.tools().img,
        &["decode".into(), "-i".into(), image.display().to_string()],
        &[],
    );
    if !run.success() {
        bail!("ckpt-img decode {}: {}", image.display(), run.stderr.trim());
    }
    serde_json::from_str(&run.stdout).with_context(|| format!("JSON of {}", image.display()))
}

/// Descriptors in every fdinfo image of a dump.
fn count_fdinfo(w: &Workload, images: &Path) -> anyhow::Result<usize> {
    let mut total = 0;
    for entry in std::fs::read_dir(images)? {
        let path = entry?.path();
        let is_fdinfo = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("fdinfo-"));
        if is_fdinfo {
            total += decode(w, &path)?["entries"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Processes of the tree below `root`, root included, from /proc's children lists.
fn count_tree(root: Pid) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for task in tasks.into_iter().flatten().flatten() {
            let children = std::fs::read_to_string(task.path().join("children"));
            next.extend(
                children
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::{logged_us, Summary};

    #[test]
    fn collection_time_is_read_from_the_dump_log() {
        let log = "2026-01-01T00:00:00Z  INFO full_dump{pid=1}:tree{pid=1}:collect{pid=1}: files \
                   collected fds=3 files=20 ghosts=0\n\
                   2026-01-01T00:00:00Z  INFO full_dump{pid=1}: collected us=6855\n\
                   2026-01-01T00:00:00Z  INFO full_dump{pid=1}: written us=4511 pages=30\n";
        assert_eq!(logged_us(log, "collected"), Some(6855.0));
        assert_eq!(logged_us(log, "written"), Some(4511.0));
        assert_eq!(
            logged_us("INFO memory collected vmas=3\n", "collected"),
            None
        );
    }

    #[test]
    fn summary_takes_the_middle_value() {
        let s = Summary::of([3.0, 1.0, 2.0].into_iter());
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Summary::of([4.0, 1.0, 2.0, 3.0].into_iter());
        assert_eq!(s.median, 2.5);
        assert!((s.spread_pct() - 120.0).abs() < 1e-9);
    }
}
