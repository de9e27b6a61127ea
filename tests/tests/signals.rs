//! Signals: handlers with their flags and masks, ignored signals, sigaltstack, the blocked mask
//! and pending signals with their queued values.

use ckpt_tests::round_trip;

#[test]
fn handlers_mask_and_pending_signals_survive() {
    round_trip("signals", &[]);
}

#[test]
fn handler_running_on_the_altstack_resumes_and_returns_to_its_caller() {
    round_trip("inhandler", &[]);
}
