//! Our own heap's hold on the memory it frees.
//!
//! glibc gives freed memory back to the kernel: the top of the heap once more than
//! 128 KiB of it is free, and blocks of 128 KiB or more, which it maps apart, at once.
//! Whatever is then allocated again is a fresh page, zeroed by a fault (2-3 µs each on
//! this kind of virtual machine). A prepared dump's final freeze and a prepared restore's
//! switch allocate afresh what the first round had freed, and in a freeze of 0.5 ms,
//! some 40 such faults were a sixth of it. Kept, those pages are touched already.
#![allow(unsafe_code)]

/// The largest block glibc still takes from its heap instead of a mapping of its own
/// (its own ceiling, 32 MiB on 64-bit): above it, a buffer is freed for good.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is kept up to this much.
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Keeps freed memory in this process's heap, for the allocations that follow (see the
/// module's documentation). `false` if the allocator refused (it is not glibc's, or a
/// value is out of its range): nothing changed then.
pub fn keep_freed_memory() -> bool {
    // SAFETY: mallopt only changes two tunables of the allocator, which takes its own
    // lock for it; no memory is handed out or taken back here.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
    // SAFETY: as above.
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
    mmap == 1 && trim == 1
}

/// Touches `bytes` of heap and frees them, kept by [`keep_freed_memory`]: the faults
/// are taken now, not by the allocations that follow.
pub fn warm(bytes: usize) {
    let mut block = vec![0u8; bytes];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&block);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minor_faults() -> i64 {
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
            .expect("getrusage")
            .minor_page_faults()
    }

    #[test]
    fn memory_freed_once_warm_is_allocated_again_without_faults() {
        assert!(keep_freed_memory(), "glibc takes both tunables");
        // Larger than glibc's default threshold for a mapping of its own (128 KiB).
        const BLOCK: usize = 1 << 20;
        warm(BLOCK * 2);
        let before = minor_faults();
        for _ in 0..8 {
            let mut block = vec![0u8; BLOCK];
            block.iter_mut().step_by(4096).for_each(|b| *b = 1);
            std::hint::black_box(&block);
        }
        let faults = minor_faults() - before;
        assert!(
            faults < 16,
            "{faults} faults for 8 MiB allocated in the warm heap (256 pages a round otherwise)"
        );
    }
}
