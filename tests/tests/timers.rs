//! Timers: itimers and POSIX timers keep their ids and remaining time, and fire after restore.

use ckpt_tests::round_trip;

#[test]
fn itimers_and_posix_timers_keep_ids_and_remaining_time() {
    round_trip("timers", &[]);
}
