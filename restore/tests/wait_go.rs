//! `ckpt-restore --wait-go`: started before the images exist, it reads them only once a line
//! arrives on its standard input, and gives up when the input ends without one.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn restore_waiting(images: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ckpt-restore"))
        .arg("--wait-go")
        .arg("-D")
        .arg(images)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ckpt-restore")
}

/// Waits up to `limit` for `child` to exit; `None` if it still runs.
fn exited_within(child: &mut std::process::Child, limit: Duration) -> Option<bool> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status.success());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn waits_for_the_word_before_reading_the_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("not-there-yet");
    let mut child = restore_waiting(&images);
    // No images and no word: it must still be waiting, not failing on the missing directory.
    assert_eq!(exited_within(&mut child, Duration::from_millis(300)), None);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write the word");
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Past the gate: it went on to the images directory.
    assert!(err.contains("not-there-yet"), "{err}");
}

#[test]
fn input_ending_without_the_word_calls_the_restore_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = restore_waiting(dir.path());
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("called off"), "{err}");
}
