//! An ordinary interpreter without children: bash holding variables, an associative array, a
//! file read up to a line and a trap.

use std::path::{Path, PathBuf};

use ckpt_tests::Workload;

fn bash() -> Option<PathBuf> {
    ["/bin/bash", "/usr/bin/bash"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

#[test]
fn bash_with_variables_an_open_file_and_a_trap_survives() {
    let Some(bash) = bash() else {
        eprintln!("note: bash is not installed; skipping");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/state.sh");
    let script = script.to_str().expect("utf-8 path");
    let mut w = Workload::start_program("bash", &bash, &[script], &[]);
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}
