//! An ordinary dynamically linked interpreter: python3 with a large dict, an open file at an
//! offset, threads and a signal handler.

use std::path::{Path, PathBuf};
use std::process::Command;

use ckpt_tests::Workload;

/// The real interpreter (not a launcher script that would exec it), if python3 is installed.
fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

#[test]
fn python_interpreter_with_threads_dict_file_and_handler_survives() {
    let Some(python) = python3() else {
        eprintln!("note: python3 is not installed; skipping");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/state.py");
    let script = script.to_str().expect("utf-8 path");
    let mut w = Workload::start_program("python", &python, &[script], &[]);
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}
