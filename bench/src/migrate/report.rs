//! results.json and results.md, with the thesis's figures beside ours.
//!
//! Thesis figures: M. Noack, "Comparison of Process Migration Algorithms" (diploma thesis,
//! TU Dresden, 2003), Tables 5.1 (getpid() process, 1 Gbit/s), 5.3 (Random Memory Access
//! process, 1 Gbit/s), 5.6 (100 KB Reference process, 10 Mbit/s) and, for the execution delay,
//! 5.2 and 5.4. The thesis prints its bandwidths as "10 MB/s", "100 Mb/s" and "1 GB/s"; its
//! own numbers (100 KB in 88.5 ms, 4 MB in 82.9 ms) only fit 10, 100 and 1000 Mbit/s, which is
//! how they are compared here. Values in milliseconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{bw_name, Algorithm, Run, WorkloadKind};

/// Preparation, down, post-processing, total (ms) of one algorithm in one thesis table.
#[derive(Debug, Clone, Copy)]
pub struct ThesisPeriods {
    pub preparation: f64,
    pub down: f64,
    pub post: f64,
    pub total: f64,
}

const fn p(preparation: f64, down: f64, post: f64, total: f64) -> Option<ThesisPeriods> {
    Some(ThesisPeriods {
        preparation,
        down,
        post,
        total,
    })
}

/// The thesis's time periods for a cell, where it measured one.
pub fn thesis_periods(
    workload: WorkloadKind,
    bandwidth: Option<u32>,
    algorithm: Algorithm,
) -> Option<ThesisPeriods> {
    use Algorithm::*;
    match (workload, bandwidth, algorithm) {
        // Table 5.1: getpid() process at 1 Gbit/s.
        (WorkloadKind::Getpid, Some(1000), TotalCopy) => p(0.0, 2.6, 0.0, 2.6),
        (WorkloadKind::Getpid, Some(1000), PreCopy) => p(1.9, 1.0, 0.0, 2.9),
        (WorkloadKind::Getpid, Some(1000), QueuedPreCopy) => p(0.9, 1.8, 0.0, 2.7),
        (WorkloadKind::Getpid, Some(1000), PostCopy) => p(0.0, 0.9, 5.7, 6.6),
        (WorkloadKind::Getpid, Some(1000), AssistedPostCopy) => p(1.9, 0.8, 1.4, 4.1),
        // Table 5.3: RMA process at 1 Gbit/s.
        (WorkloadKind::Rma, Some(1000), TotalCopy) => p(0.0, 82.9, 0.0, 82.9),
        (WorkloadKind::Rma, Some(1000), PreCopy) => p(365.5, 58.0, 0.0, 423.5),
        (WorkloadKind::Rma, Some(1000), QueuedPreCopy) => p(36.1, 56.3, 0.0, 92.4),
        (WorkloadKind::Rma, Some(1000), PostCopy) => p(0.0, 1.0, 390.1, 391.1),
        (WorkloadKind::Rma, Some(1000), AssistedPostCopy) => p(79.1, 6.3, 435.8, 521.2),
        // Table 5.6: Reference process at 10 Mbit/s.
        (WorkloadKind::Reference, Some(10), TotalCopy) => p(0.0, 88.5, 0.0, 88.5),
        (WorkloadKind::Reference, Some(10), PreCopy) => p(52.4, 36.5, 0.0, 88.9),
        (WorkloadKind::Reference, Some(10), QueuedPreCopy) => p(37.1, 51.4, 0.0, 88.5),
        (WorkloadKind::Reference, Some(10), PostCopy) => p(0.0, 4.9, 93.4, 98.3),
        (WorkloadKind::Reference, Some(10), AssistedPostCopy) => p(52.4, 33.4, 3.5, 89.3),
        _ => None,
    }
}

/// Tables 5.2 and 5.4: execution delay (ms) of post-copy and assisted post-copy.
pub fn thesis_delay(
    workload: WorkloadKind,
    bandwidth: Option<u32>,
    algorithm: Algorithm,
) -> Option<f64> {
    let column = match bandwidth {
        Some(10) => 0,
        Some(100) => 1,
        Some(1000) => 2,
        _ => return None,
    };
    let row: [f64; 3] = match (workload, algorithm) {
        (WorkloadKind::Getpid, Algorithm::PostCopy) => [7.4, 0.9, 0.8],
        (WorkloadKind::Getpid, Algorithm::AssistedPostCopy) => [0.6, 0.5, 0.4],
        (WorkloadKind::Rma, Algorithm::PostCopy) => [3700.0, 500.0, 400.0],
        (WorkloadKind::Rma, Algorithm::AssistedPostCopy) => [2800.0, 400.0, 300.0],
        _ => return None,
    };
    Some(row[column])
}

fn run_json(run: &Run) -> Value {
    json!({
        "algorithm": run.algorithm.name(),
        "workload": run.workload.name(),
        "bandwidth_mbit": run.bandwidth_mbit,
        "preparation_ms": run.preparation_ms,
        "downtime_ms": run.downtime_ms,
        "postprocessing_ms": run.postprocessing_ms,
        "total_ms": run.total_ms,
        "bytes": run.bytes,
        "execution_delay_ms": run.execution_delay_ms,
        "delay_after_resume_ms": run.delay_after_resume_ms,
        "verified": run.verified,
        "repetition": run.repetition,
        "verdict": run.verdict,
        "pages_per_round": run.round_pages,
        "held_per_round": run.round_held,
        "compressed": run.compressed,
        "prepared": run.prepared,
        "downtime_parts_ms": run.downtime_parts.iter().map(|(part, ms)| json!([part, ms])).collect::<Vec<_>>(),
        "final_pages": run.final_pages,
        "pages_resent": run.pages_resent,
        "precopy_stop": run.stop_reason,
        "client_timeouts": run.client_timeouts.map(|t| json!({"10ms": t[0], "30ms": t[1], "50ms": t[2]})),
        "error": run.error,
        "source_intact": run.source_intact,
        "steps": run.steps,
    })
}

pub fn write_json(path: &Path, runs: &[Run]) -> Result<()> {
    let value = Value::Array(runs.iter().map(run_json).collect());
    let text = serde_json::to_string_pretty(&value).context("encode results")?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
}

/// Median, minimum and maximum.
pub fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if mid * 2 == v.len() {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Some((median, v[0], v[v.len() - 1]))
}

fn cell(values: &[f64], thesis: Option<f64>) -> String {
    let ours = match spread(values) {
        Some((m, lo, hi)) if values.len() > 1 => format!("{m:.1} ({lo:.1}-{hi:.1})"),
        Some((m, _, _)) => format!("{m:.1}"),
        None => "-".to_string(),
    };
    match thesis {
        Some(t) => format!("{ours} / {t}"),
        None => ours,
    }
}

/// The execution delay after the resume beside the thesis's figure (its tables hold that
/// part), then the whole delay from the request in brackets.
fn delay_cell(runs: &[&&Run], thesis: Option<f64>) -> String {
    let after: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.delay_after_resume_ms)
        .collect();
    let total: Vec<f64> = runs.iter().map(|r| r.execution_delay_ms).collect();
    let total = spread(&total)
        .map(|(m, _, _)| format!(" (from the request: {m:.1})"))
        .unwrap_or_default();
    format!("{}{total}", cell(&after, thesis))
}

type Key = (Option<u32>, WorkloadKind);

pub fn write_markdown(path: &Path, runs: &[Run], repetitions: u32) -> Result<()> {
    let mut groups: BTreeMap<(u32, WorkloadKind), Vec<&Run>> = BTreeMap::new();
    for run in runs {
        let key: Key = (run.bandwidth_mbit, run.workload);
        groups
            .entry((key.0.unwrap_or(u32::MAX), key.1))
            .or_default()
            .push(run);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Migration algorithms: time periods per workload and bandwidth\n"
    );
    let _ = writeln!(
        md,
        "Each cell: ours (median, and min-max over {repetitions} repetition(s)) / the thesis's \
         figure where it measured one (Noack 2003, Tables 5.1, 5.3, 5.6; execution delay 5.2, \
         5.4). Milliseconds. Execution delay: how much longer the workload's work took than \
         unmigrated after it resumed at the destination, as the thesis's tables count it (\"the \
         additional execution time needed after migration\", the down time apart), then in \
         brackets the whole delay from the request, preparation and down time included. \
         Down time is the longest gap in the workload's own loop during the migration. \
         Bytes: everything on the migration link, both directions, headers included. \
         A failed cell shows the step that failed; it is never left out. \"(prepared)\": the \
         destination rebuilt the process from a first dump before the freeze \
         (`ckpt-dump --prepare`, `ckpt-restore --prepared`), so its preparation includes that.\n"
    );
    let _ = writeln!(md, "Kernel: {}\n", kernel_release());
    for ((bw, kind), group) in &groups {
        let bandwidth = (*bw != u32::MAX).then_some(*bw);
        let compressed = if group.iter().any(|r| r.compressed) {
            " (images and pages compressed on the wire: `ssh -C`, `--compress-pages`)"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "## {} at {}{compressed}\n",
            kind.name(),
            bw_name(bandwidth)
        );
        let _ = writeln!(
            md,
            "| algorithm | preparation | down | post-processing | total | bytes | execution delay | verified | client timeouts (10/30/50 ms) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        let mut failures = Vec::new();
        let rows = Algorithm::ALL.iter().flat_map(|&a| [(a, false), (a, true)]);
        for (algorithm, prepared) in rows {
            let all: Vec<&&Run> = group
                .iter()
                .filter(|r| r.algorithm == algorithm && r.prepared == prepared)
                .collect();
            let Some(first) = all.first() else {
                continue;
            };
            let name = first.label();
            let ok: Vec<&&Run> = all.iter().copied().filter(|r| r.error.is_none()).collect();
            for failed in all.iter().filter(|r| r.error.is_some()) {
                failures.push(format!(
                    "- {} (repetition {}): {}{}",
                    name,
                    failed.repetition,
                    failed.error.as_deref().unwrap_or(""),
                    match failed.source_intact {
                        Some(true) => " — the source ran on and passed its check",
                        Some(false) => " — the source did NOT run on intact",
                        None => "",
                    }
                ));
            }
            let thesis = thesis_periods(*kind, bandwidth, algorithm);
            let col = |f: fn(&Run) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
            if ok.is_empty() {
                let _ = writeln!(
                    md,
                    "| {} | failed{} | | | | | | | |",
                    name,
                    thesis
                        .map(|t| format!(
                            " (thesis: {} / {} / {} / {})",
                            t.preparation, t.down, t.post, t.total
                        ))
                        .unwrap_or_default()
                );
                continue;
            }
            let bytes = spread(&ok.iter().map(|r| r.bytes as f64).collect::<Vec<_>>())
                .map(|(m, _, _)| format!("{m:.0}"))
                .unwrap_or_default();
            let verified = ok.iter().filter(|r| r.verified).count();
            let timeouts = ok
                .iter()
                .filter_map(|r| r.client_timeouts)
                .map(|t| format!("{}/{}/{}", t[0], t[1], t[2]))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} |",
                name,
                cell(&col(|r| r.preparation_ms), thesis.map(|t| t.preparation)),
                cell(&col(|r| r.downtime_ms), thesis.map(|t| t.down)),
                cell(&col(|r| r.postprocessing_ms), thesis.map(|t| t.post)),
                cell(&col(|r| r.total_ms), thesis.map(|t| t.total)),
                bytes,
                delay_cell(&ok, thesis_delay(*kind, bandwidth, algorithm)),
                verified,
                ok.len(),
                timeouts,
            );
        }
        let rounds: Vec<String> = group
            .iter()
            .filter(|r| r.error.is_none() && r.stop_reason.is_some())
            .map(|r| {
                let held = if r.round_held.is_empty() {
                    String::new()
                } else {
                    format!(", held back {:?}", r.round_held)
                };
                format!(
                    "- {} (repetition {}): pages sent per round {:?}{held}, final {}; stopped: {}",
                    r.label(),
                    r.repetition,
                    r.round_pages,
                    r.final_pages,
                    r.stop_reason.as_deref().unwrap_or("")
                )
            })
            .collect();
        let parts: Vec<String> = group
            .iter()
            .filter(|r| r.error.is_none() && !r.downtime_parts.is_empty())
            .map(|r| {
                let cut: Vec<String> = r
                    .downtime_parts
                    .iter()
                    .map(|(part, ms)| format!("{part} {ms:.1}"))
                    .collect();
                format!(
                    "- {} (repetition {}), {:.1} ms: {}",
                    r.label(),
                    r.repetition,
                    r.downtime_ms,
                    cut.join(", ")
                )
            })
            .collect();
        if !parts.is_empty() {
            let _ = writeln!(
                md,
                "\nWhere the down time went (ms; each part ends when the step named finished):\n"
            );
            for line in parts {
                let _ = writeln!(md, "{line}");
            }
        }
        if !rounds.is_empty() {
            let _ = writeln!(md, "\nPre-copy rounds:\n");
            for line in rounds {
                let _ = writeln!(md, "{line}");
            }
        }
        if !failures.is_empty() {
            let _ = writeln!(md, "\nFailed runs:\n");
            for f in failures {
                let _ = writeln!(md, "{}", f.replace('\n', " "));
            }
        }
        let _ = writeln!(md);
    }
    std::fs::write(path, md).with_context(|| format!("write {}", path.display()))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_gives_median_and_range() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(spread(&[4.0, 1.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn thesis_tables_are_where_the_thesis_measured() {
        let rma = thesis_periods(WorkloadKind::Rma, Some(1000), Algorithm::TotalCopy).unwrap();
        assert_eq!(rma.down, 82.9);
        let reference =
            thesis_periods(WorkloadKind::Reference, Some(10), Algorithm::PostCopy).unwrap();
        assert_eq!(reference.down, 4.9);
        assert!(thesis_periods(WorkloadKind::Rma, Some(10), Algorithm::TotalCopy).is_none());
        assert!(thesis_periods(WorkloadKind::Udp, Some(1000), Algorithm::PostCopy).is_none());
        assert_eq!(
            thesis_delay(WorkloadKind::Rma, Some(10), Algorithm::PostCopy),
            Some(3700.0)
        );
    }
}
