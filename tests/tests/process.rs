//! Process-wide state: rlimits, cwd and umask, credentials and capabilities, seccomp, and
//! threads blocked in system calls when they were dumped.

use std::time::Duration;

use ckpt_tests::{round_trip, Workload};
use nix::sys::signal::{kill, Signal};

#[test]
fn lowered_rlimits_survive() {
    round_trip("rlimits", &[]);
}

#[test]
fn cwd_and_umask_survive() {
    round_trip("fsctx", &[]);
}

#[test]
fn unprivileged_credentials_and_dropped_capabilities_survive() {
    round_trip("unpriv", &[]);
}

#[test]
fn seccomp_filter_survives_and_does_not_kill_during_dump() {
    round_trip("seccomp", &[]);
}

/// Starts the sleeper in `mode`, waits until it is blocked in `syscall`, then round-trips it.
fn blocked_round_trip(mode: &str, syscall: u64) {
    let mut w = Workload::start("sleeper", &["--mode", mode]);
    w.wait_blocked_in(syscall);
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}

const SYS_POLL: u64 = 7;
const SYS_RT_SIGSUSPEND: u64 = 130;
const SYS_PSELECT6: u64 = 270;
const SYS_FUTEX: u64 = 202;
const SYS_CLOCK_NANOSLEEP: u64 = 230;

#[test]
fn relative_sleep_ends_early_with_eintr() {
    blocked_round_trip("relative", SYS_CLOCK_NANOSLEEP);
}

#[test]
fn absolute_sleep_restarts_until_its_deadline() {
    blocked_round_trip("absolute", SYS_CLOCK_NANOSLEEP);
}

#[test]
fn thread_blocked_on_futex_wakes_after_restore() {
    blocked_round_trip("futex", SYS_FUTEX);
}

#[test]
fn sigsuspend_waiter_gets_its_signal_after_restore() {
    blocked_round_trip("pause", SYS_RT_SIGSUSPEND);
}

/// A signal that reaches a thread restored inside `sigsuspend` before the thread is back
/// in the call interrupts it, as it would have interrupted the original: its handler runs
/// and the call returns `EINTR`. Re-issuing the call after the handler would leave the
/// thread asleep until a second signal. The process is dumped and restored stopped, so
/// that SIGUSR2 is queued before it runs again; its loop must then end on that signal
/// alone, and no other is sent.
#[test]
fn a_signal_sent_before_a_restored_sigsuspend_runs_again_interrupts_it() {
    let mut w = Workload::start("sleeper", &["--mode", "pause"]);
    w.wait_blocked_in(SYS_RT_SIGSUSPEND);
    kill(w.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    w.wait_state('T', "stop before the dump");
    let images = w.dump(&[]);
    w.restore(&images);
    w.wait_state('T', "come back stopped");
    kill(w.pid(), Signal::SIGUSR2).expect("SIGUSR2");
    kill(w.pid(), Signal::SIGCONT).expect("SIGCONT");
    let verdict = w.wait_verdict(Duration::from_secs(10));
    assert_eq!(verdict, "PASS", "{}", w.logs());
}

#[test]
fn poll_with_a_timeout_ends_early_with_eintr() {
    blocked_round_trip("poll", SYS_POLL);
}

#[test]
fn select_restarts_with_the_time_it_had_left() {
    blocked_round_trip("select", SYS_PSELECT6);
}

#[test]
fn robust_mutex_of_a_thread_that_dies_after_restore_reports_owner_dead() {
    round_trip("sleeper", &["--mode", "robust"]);
}

#[test]
fn exe_cmdline_auxv_mm_fields_scheduling_and_prctl_state_survive() {
    round_trip("attrs", &[]);
}
