//! Pushes 1 GiB of pages through `PageServerClient` to a `PageServer` on 127.0.0.1 and
//! prints the rate, for each way the server can receive, next to CRIU's published figure
//! (1 GiB through its page server in about 1.8 s). The server thread's CPU time is
//! printed too: unlike wall time, it barely moves when other work shares the machine.
//!
//! Then the same for scattered pages, as the final dump of a pre-copy sends them: 54,000
//! single pages with a page of hole between each two, so one frame per page and the per-frame
//! cost dominates.
//!
//! `cargo run --release -p ckpt-page-server --example throughput [MiB] [pages per frame] [splice|copy]`

use std::io::IoSlice;
use std::time::{Duration, Instant};

use ckpt_page_server::{
    PageFlags, PageServer, PageServerClient, PagemapId, ReceiveMode, ServerOptions,
};
use rustix::time::{clock_gettime, ClockId};

const PAGE: usize = 4096;
const CRIU_SECS_PER_GIB: f64 = 1.8;
const ROUNDS: usize = 5;
/// Pages of the scattered case.
const SCATTERED_PAGES: usize = 54_000;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let per_frame: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let only = args.next();
    let total_pages = mib * 256;
    // One batch buffer, as the dumper reuses its process_vm_readv buffer.
    let batch: Vec<u8> = (0..per_frame * PAGE)
        .map(|i| (i / PAGE) as u8 ^ 0x5a)
        .collect();
    let bytes = (total_pages * PAGE) as f64;
    let criu_secs = CRIU_SECS_PER_GIB * bytes / (1u64 << 30) as f64;
    println!(
        "{mib} MiB in frames of {per_frame} pages, {ROUNDS} rounds; CRIU: {:.2} GB/s",
        bytes / criu_secs / 1e9
    );
    let modes: Vec<_> = [
        (ReceiveMode::Splice, false),
        (ReceiveMode::Copy, false),
        (ReceiveMode::Splice, true),
        (ReceiveMode::Copy, true),
    ]
    .into_iter()
    .filter(|(mode, _)| {
        only.as_deref()
            .is_none_or(|o| o.eq_ignore_ascii_case(&format!("{mode:?}")))
    })
    .collect();
    measure(&modes, bytes, criu_secs, |mode, sync| {
        push_once(mode, sync, total_pages, per_frame, 0, &batch)
    })?;
    let bytes = (SCATTERED_PAGES * PAGE) as f64;
    let criu_secs = CRIU_SECS_PER_GIB * bytes / (1u64 << 30) as f64;
    println!("{SCATTERED_PAGES} scattered pages, one frame each, {ROUNDS} rounds");
    measure(&modes, bytes, criu_secs, |mode, sync| {
        push_once(mode, sync, SCATTERED_PAGES, 1, 1, &batch)
    })?;
    Ok(())
}

/// Runs `push` ROUNDS times per mode and prints min, median and the server's CPU time.
fn measure(
    modes: &[(ReceiveMode, bool)],
    bytes: f64,
    criu_secs: f64,
    push: impl Fn(ReceiveMode, bool) -> Result<(f64, f64), Error>,
) -> Result<(), Error> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    // Modes alternate within each round, so that a busy moment hits them all alike.
    for _ in 0..ROUNDS {
        for (i, &(mode, sync)) in modes.iter().enumerate() {
            runs[i].push(push(mode, sync)?);
        }
    }
    for (&(mode, sync), r) in modes.iter().zip(&mut runs) {
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (min, median) = (r[0].0, r[r.len() / 2].0);
        let mut cpu: Vec<f64> = r.iter().map(|x| x.1).collect();
        cpu.sort_by(f64::total_cmp);
        println!(
            "{:<6} sync={:<5} min {:>6.3} s ({:>5.2} GB/s, {:>4.1}x CRIU)  median {:>6.3} s ({:>5.2} GB/s)  server CPU {:>6.3} s",
            format!("{mode:?}"),
            sync,
            min,
            bytes / min / 1e9,
            criu_secs / min,
            median,
            bytes / median / 1e9,
            cpu[cpu.len() / 2],
        );
    }
    Ok(())
}

/// One session sending frames of `per_frame` pages with `gap` pages of hole between them;
/// returns the seconds from connect to the server's answer to CLOSE, and the server thread's
/// CPU seconds.
fn push_once(
    mode: ReceiveMode,
    sync: bool,
    total_pages: usize,
    per_frame: usize,
    gap: usize,
    batch: &[u8],
) -> Result<(f64, f64), Error> {
    let tmp = tempfile::tempdir()?;
    let mut opts = ServerOptions::new(tmp.path().join("imgs"));
    opts.receive = mode;
    opts.sync = sync;
    let server = PageServer::bind("127.0.0.1:0".parse()?, opts)?;
    let addr = server.local_addr()?;
    let handle = std::thread::spawn(move || {
        let cpu = || Duration::try_from(clock_gettime(ClockId::ThreadCPUTime)).unwrap_or_default();
        let before = cpu();
        server.serve_one().map(|stats| (stats, cpu() - before))
    });

    let started = Instant::now();
    let mut client = PageServerClient::connect(addr)?;
    let mut pagemap = client.open(PagemapId::process(1))?;
    let mut sent = 0;
    let mut vaddr = 0x7f00_0000_0000u64;
    while sent < total_pages {
        let n = per_frame.min(total_pages - sent);
        pagemap.add_pages(
            vaddr,
            PageFlags::PRESENT,
            &[IoSlice::new(&batch[..n * PAGE])],
        )?;
        sent += n;
        vaddr += ((n + gap) * PAGE) as u64;
    }
    pagemap.finish();
    client.close()?;
    let secs = started.elapsed().as_secs_f64();
    let (stats, cpu) = handle.join().expect("server thread")?;
    assert_eq!(stats.pages_received, total_pages as u64);
    Ok((secs, cpu.as_secs_f64()))
}
