//! Compiles the C workloads in `workloads/` into executables beside the build output; the tests
//! find them through the `CKPT_WORKLOADS_DIR` environment variable set here at compile time.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let src = Path::new("workloads");
    println!("cargo:rerun-if-changed=workloads");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("workloads");
    std::fs::create_dir_all(&out).expect("create the workload output directory");

    let mut build = cc::Build::new();
    build
        .opt_level(2)
        .debug(true)
        .warnings(true)
        .extra_warnings(true);
    let compiler = build.get_compiler();

    let mut sources: Vec<PathBuf> = std::fs::read_dir(src)
        .expect("read the workloads directory")
        .map(|e| e.expect("read a workloads directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    for source in sources {
        let name = source.file_stem().expect("a .c file has a stem");
        let exe = out.join(name);
        let mut cmd: Command = compiler.to_command();
        cmd.arg("-Wno-missing-field-initializers")
            .arg("-pthread")
            .arg("-o")
            .arg(&exe)
            .arg(&source)
            .arg("-lrt");
        let status = cmd.status().expect("run the C compiler");
        assert!(status.success(), "compiling {} failed", source.display());
    }
    println!("cargo:rustc-env=CKPT_WORKLOADS_DIR={}", out.display());
}
