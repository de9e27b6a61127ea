//! CPU state: vector, opmask, x87 and callee-saved registers of a thread caught in user space.

use ckpt_tests::Workload;

#[test]
fn avx512_zmm_and_opmask_registers_survive() {
    let mut w = Workload::start("cpu", &["--isa", "auto"]);
    if w.ready_text().trim() != "isa=avx512" {
        eprintln!("note: this CPU has no AVX-512; checking AVX registers only");
    }
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}

#[test]
fn avx_ymm_and_x87_registers_survive() {
    let mut w = Workload::start("cpu", &["--isa", "avx"]);
    let images = w.dump(&[]);
    w.restore(&images);
    w.assert_pass();
}
