//! `stats-restore`, as CRIU writes it: times in microseconds and page counts.

use std::time::Duration;

use images_format::dir::ImageDir;
use images_format::kind::ImageKind;
use images_format::pb;

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Writes the stats; a failure is only logged, as the restore itself succeeded.
pub fn write(dir: &ImageDir, forking: Duration, restore: Duration, pages_restored: u64) {
    let entry = pb::StatsEntry {
        dump: None,
        restore: Some(pb::RestoreStatsEntry {
            pages_compared: 0,
            pages_skipped_cow: 0,
            forking_time: micros(forking),
            restore_time: micros(restore),
            pages_restored: Some(pages_restored),
        }),
    };
    if let Err(e) = dir.write_one(ImageKind::StatsRestore, 0, &entry) {
        tracing::warn!(error = %e, "could not write stats-restore");
    }
}
