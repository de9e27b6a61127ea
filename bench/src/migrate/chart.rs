//! PNG charts: for each workload and bandwidth, one stacked bar per algorithm made of its
//! median preparation, down and post-processing times.
//!
//! Text needs a TrueType font, which plotters' bitmap backend does not bring: the DejaVu font
//! of Debian's fonts-dejavu-core is loaded at run time, and without it the charts are drawn
//! without text.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::spread;
use super::{bw_name, Algorithm, Run, WorkloadKind};

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the font once; false when none is installed.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            let Ok(bytes) = std::fs::read(path) else {
                return false;
            };
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

const PERIODS: [(&str, RGBColor); 3] = [
    ("preparation", RGBColor(0x4c, 0x78, 0xa8)),
    ("down", RGBColor(0xe4, 0x57, 0x56)),
    ("post-processing", RGBColor(0x72, 0xb7, 0xb2)),
];

/// Draws every chart into `out`; returns how many.
pub fn draw_all(out: &Path, runs: &[Run]) -> Result<usize> {
    let mut groups: BTreeMap<(u32, WorkloadKind), Vec<&Run>> = BTreeMap::new();
    for run in runs.iter().filter(|r| r.error.is_none()) {
        groups
            .entry((run.bandwidth_mbit.unwrap_or(u32::MAX), run.workload))
            .or_default()
            .push(run);
    }
    let mut drawn = 0;
    for ((bw, kind), group) in groups {
        let bandwidth = (bw != u32::MAX).then_some(bw);
        let bars: Vec<(String, [f64; 3])> = Algorithm::ALL
            .iter()
            .flat_map(|&a| [(a, false), (a, true)])
            .filter_map(|(a, prepared)| {
                let runs: Vec<&&Run> = group
                    .iter()
                    .filter(|r| r.algorithm == a && r.prepared == prepared)
                    .collect();
                let of = |f: fn(&Run) -> f64| {
                    let v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
                    spread(&v).map(|(m, _, _)| m.max(0.0))
                };
                let label = if prepared {
                    format!("{} (prepared)", a.name())
                } else {
                    a.name().to_string()
                };
                Some((
                    label,
                    [
                        of(|r| r.preparation_ms)?,
                        of(|r| r.downtime_ms)?,
                        of(|r| r.postprocessing_ms)?,
                    ],
                ))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let path = out.join(format!("chart-{}-{}.png", kind.name(), bw_name(bandwidth)));
        draw(
            &path,
            &format!("{} at {}", kind.name(), bw_name(bandwidth)),
            &bars,
        )?;
        drawn += 1;
    }
    Ok(drawn)
}

fn draw(path: &Path, title: &str, bars: &[(String, [f64; 3])]) -> Result<()> {
    let text = font_available();
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let top = bars
        .iter()
        .map(|(_, p)| p.iter().sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let count = bars.len();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder
            .caption(format!("{title}: time periods (ms)"), ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..count as f64, 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    if text {
        let names: Vec<&str> = bars.iter().map(|(a, _)| a.as_str()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(count * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor();
                // One label per bar, at its middle.
                if (x - i - 0.5).abs() < 1e-6 && i >= 0.0 {
                    names
                        .get(i as usize)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("ms")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (index, (name, color)) in PERIODS.iter().enumerate() {
        let series = chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, periods))| {
                let below: f64 = periods[..index].iter().sum();
                let x = i as f64;
                Rectangle::new(
                    [(x + 0.15, below), (x + 0.85, below + periods[index])],
                    color.filled(),
                )
            }))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            series.label(*name).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
