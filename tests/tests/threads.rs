//! Threads: every thread comes back with its TID, TLS, name, signal mask, and runs.

use ckpt_tests::round_trip;

#[test]
fn threads_keep_tids_tls_names_and_masks() {
    round_trip("threads", &["--threads", "8"]);
}

#[test]
fn many_threads_all_come_back() {
    round_trip("threads", &["--threads", "100"]);
}
