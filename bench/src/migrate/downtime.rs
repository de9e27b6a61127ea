//! Where the down time goes: the workload's longest gap, cut at the moments the tools log
//! (the final dump's freeze, collect and write, restore's plan and its end) and the harness
//! notes (images transferred, restore let go).
//!
//! The tools stamp their logs with the wall clock (RFC 3339, UTC); the workloads and the
//! harness use CLOCK_MONOTONIC. One reading of both clocks at the request converts them.
//! A mark that is missing (a log line that changed, a step that did not happen) merges its
//! part into the next one; the parts always add up to the gap.

use std::path::Path;

/// A moment of the migration, CLOCK_MONOTONIC ns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// What ends at this moment (the part before it).
    pub part: &'static str,
    pub at: u64,
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, ns, now.
pub fn clock_offset_ns() -> i128 {
    let read = |id| {
        nix::time::clock_gettime(id)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0)
    };
    read(nix::time::ClockId::CLOCK_REALTIME) - read(nix::time::ClockId::CLOCK_MONOTONIC)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The wall-clock time (ns since the epoch) at the start of a log line
/// `2026-11-22T03:24:10.627543Z ...`.
fn wall_ns(line: &str) -> Option<i128> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(9).collect();
    let scale = 10i128.pow(9 - u32::try_from(digits.len()).ok()?);
    let nanos = digits.parse::<i128>().ok()? * scale;
    let secs = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + s;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

/// The monotonic time of the last line of `log` containing `needle`: a prepared dump
/// freezes twice, and the final freeze is the one inside the down time.
pub fn logged_at(log: &str, needle: &str, offset: i128) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(needle))?;
    u64::try_from(wall_ns(line)? - offset).ok()
}

/// The marks the tools logged: the final dump's (in `dump_log`) and restore's.
pub fn tool_marks(dump_log: &Path, restore_log: &Path, offset: i128) -> Vec<Mark> {
    let dump = std::fs::read_to_string(dump_log).unwrap_or_default();
    let restore = std::fs::read_to_string(restore_log).unwrap_or_default();
    let mut marks = Vec::new();
    for (part, text, needle) in [
        ("freeze", &dump, "}: frozen "),
        ("collect", &dump, "}: collected us="),
        ("write images", &dump, "}: written us="),
        ("restore: start, read images", &restore, " planned "),
        ("restore", &restore, " restored "),
    ] {
        if let Some(at) = logged_at(text, needle, offset) {
            marks.push(Mark { part, at });
        }
    }
    marks
}

/// What `ckpt-dump --prepare` logs once the delta of the final freeze is on its way, with
/// the freeze's length (`freezing_us`) and what followed it (`frozen_to_delta_sent_us`).
pub const DELTA_SENT: &str = "S2: delta sent";
/// What `ckpt-restore --prepared` logs once the tree it rebuilt runs again.
const SWITCHED: &str = "prepared switch: delta received to tree resumed";

/// The moments of a prepared post-copy's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    /// When the final freeze began.
    pub frozen: u64,
    pub marks: Vec<Mark>,
}

/// The value of `key=N` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|item| item.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The switch of a prepared post-copy from the dump's log (the delta's line, which says
/// when the final freeze began on the monotonic clock, how long the freeze took and how
/// long collecting and encoding what changed took after it) and restore's (logged once the
/// tree runs). The delta's line is logged after the send, which restore's real-time switch
/// may preempt: its own timestamp says nothing of when the delta left. Lines without
/// `freeze_start_ns` (older dumps) are read back from their timestamp.
pub fn switch_marks(dump_log: &str, restore_log: &str, offset: i128) -> Option<Switch> {
    let line = dump_log.lines().rev().find(|l| l.contains(DELTA_SENT))?;
    let freezing = field(line, "freezing_us")? * 1000;
    let (start, frozen_at, out, out_part) = match field(line, "freeze_start_ns") {
        Some(start) => {
            let frozen_at = start + freezing;
            let work: u64 = ["collect_us", "write_us", "delta_us"]
                .iter()
                .filter_map(|key| field(line, key))
                .sum();
            (
                start,
                frozen_at,
                frozen_at + work * 1000,
                "collect, encode what changed",
            )
        }
        None => {
            let sent = u64::try_from(wall_ns(line)? - offset).ok()?;
            let frozen_at = sent.saturating_sub(field(line, "frozen_to_delta_sent_us")? * 1000);
            (
                frozen_at.saturating_sub(freezing),
                frozen_at,
                sent,
                "collect, send what changed",
            )
        }
    };
    let mut marks = vec![
        Mark {
            part: "freeze",
            at: frozen_at,
        },
        Mark {
            part: out_part,
            at: out,
        },
    ];
    if let Some(at) = logged_at(restore_log, SWITCHED, offset) {
        marks.push(Mark {
            part: "send, apply it, resume",
            at,
        });
    }
    Some(Switch {
        frozen: start,
        marks,
    })
}

/// Cuts the gap `[start, end)` at the marks (in any order; those outside the gap count for
/// nothing) into named parts in time order; the last part, up to the end of the gap, is
/// "resume, first iteration (faults)". Zero-length parts are left out.
pub fn split(gap: (u64, u64), marks: &[Mark]) -> Vec<(String, f64)> {
    let (start, end) = gap;
    let mut sorted: Vec<&Mark> = marks.iter().collect();
    sorted.sort_by_key(|m| m.at);
    let mut parts = Vec::new();
    let mut at = start;
    for mark in sorted {
        let cut = mark.at.clamp(start, end);
        if cut > at {
            parts.push((mark.part.to_string(), (cut - at) as f64 / 1e6));
            at = cut;
        }
    }
    if end > at {
        parts.push((
            "resume, first iteration (faults)".to_string(),
            (end - at) as f64 / 1e6,
        ));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_stamps_convert_to_nanoseconds() {
        let ns = wall_ns("2026-11-22T03:24:10.627543Z  INFO x").expect("stamp");
        // 2026-11-22 is day 20779 since the epoch.
        assert_eq!(
            ns,
            (20779i128 * 86_400 + 3 * 3600 + 24 * 60 + 10) * 1_000_000_000 + 627_543_000
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert!(wall_ns("not a stamp").is_none());
    }

    #[test]
    fn the_switch_is_read_from_the_delta_line() {
        let restore = "2026-11-22T03:24:10.010600Z  INFO prepared switch: delta received to \
                       tree resumed pid=7 path=\"fast\" us=550";
        let base = wall_ns("2026-11-22T03:24:10.000000Z").expect("stamp");
        // Logged late (after a preempted send): the fields place the freeze and the delta.
        let dump = "2026-11-22T03:24:10.011000Z  INFO x: S2: delta sent \
                    freeze_start_ns=9000000 freezing_us=200 frozen_to_delta_sent_us=1900 \
                    light=true collect_us=300 write_us=90 delta_us=10 send_us=1500";
        let s = switch_marks(dump, restore, base).expect("a switch");
        assert_eq!(s.frozen, 9_000_000);
        let at: Vec<u64> = s.marks.iter().map(|m| m.at).collect();
        assert_eq!(at, [9_200_000, 9_600_000, 10_600_000]);
        // An older line: placed by its own timestamp.
        let dump = "2026-11-22T03:24:10.000100Z  INFO prepared images written s1_frozen_us=900\n\
                    2026-11-22T03:24:10.010000Z  INFO x: S2: delta sent freezing_us=200 \
                    frozen_to_delta_sent_us=1500 collect_us=1200";
        let s = switch_marks(dump, restore, base).expect("a switch");
        assert_eq!(s.frozen, 10_000_000 - 1_500_000 - 200_000);
        let at: Vec<u64> = s.marks.iter().map(|m| m.at).collect();
        assert_eq!(at, [10_000_000 - 1_500_000, 10_000_000, 10_600_000]);
        assert!(switch_marks("no switch here", restore, base).is_none());
    }

    #[test]
    fn parts_add_up_to_the_gap() {
        let marks = [
            Mark {
                part: "collect",
                at: 130,
            },
            Mark {
                part: "freeze",
                at: 110,
            },
            // Before the gap: counts for nothing.
            Mark {
                part: "early",
                at: 50,
            },
            Mark {
                part: "restore",
                at: 400,
            },
        ];
        let parts = split((100, 300), &marks);
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["freeze", "collect", "restore"]);
        let total: f64 = parts.iter().map(|(_, ms)| ms).sum();
        assert!((total - 200.0 / 1e6).abs() < 1e-12);
        let parts = split((100, 300), &marks[..2]);
        assert_eq!(
            parts.last().map(|(n, _)| n.as_str()),
            Some("resume, first iteration (faults)")
        );
    }
}
