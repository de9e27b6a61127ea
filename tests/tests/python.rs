//! An ordinary dynamically linked interpreter: python3 with a large dict, an open file at an
//! offset, threads and a signal handler.

use std::path::Path;

use ckpt_tests::{python3, Workload};

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
