//! `ckpt-bench wake`: how long a thread asleep on an idle CPU takes to run once another CPU
//! wakes it, with the CPUs left to halt when idle and with the tools' request that they poll
//! instead (`ckpt_cli::IdlePoll`, `/dev/cpu_dma_latency` at 0).
//!
//! Every step of a migration's down time that hands work from one tool to another, and every
//! page fault that a migrated program sleeps in until the lazy-pages daemon answers it, is
//! such a wake-up. A thread pinned to one CPU sleeps in a read on a socket; a thread pinned to
//! another writes the monotonic time into it, after a pause long enough for the first CPU to
//! go idle; the sleeper notes how late it read it. No published figure covers this: it is the
//! machine's own, and the reason the tools hold that request.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};
use ckpt_cli::IdlePoll;
use tracee::CpuPin;

use crate::migrate::now_ns;

#[derive(Debug, clap::Args)]
pub struct WakeArgs {
    /// Wake-ups measured per setting.
    #[arg(long, default_value_t = 2000)]
    wakes: usize,
    /// Pause before each wake-up, in µs: the sleeper's CPU idles that long.
    #[arg(long, default_value_t = 500)]
    pause_us: u64,
    /// CPU of the sleeping thread.
    #[arg(long, default_value_t = 0)]
    sleeper_cpu: u32,
    /// CPU of the waking thread.
    #[arg(long, default_value_t = 1)]
    waker_cpu: u32,
}

/// Latencies of one setting, in µs, sorted.
struct Latencies(Vec<f64>);

impl Latencies {
    fn at(&self, quantile: f64) -> f64 {
        let last = self.0.len() - 1;
        self.0[((last as f64) * quantile).round() as usize]
    }
}

pub fn run(args: WakeArgs) -> anyhow::Result<()> {
    if args.wakes == 0 {
        bail!("--wakes must be at least 1");
    }
    if args.sleeper_cpu == args.waker_cpu {
        bail!("the sleeper and the waker need two different CPUs");
    }
    let halting = measure(&args).context("wake-ups with idle CPUs halting")?;
    let hold = IdlePoll::hold();
    if !hold.is_held() {
        bail!("no CPU latency request (/dev/cpu_dma_latency needs root)");
    }
    let polling = measure(&args).context("wake-ups with idle CPUs polling")?;
    drop(hold);
    println!(
        "wake-up of a thread on idle CPU {} from CPU {}, {} each, {} µs apart (µs):",
        args.sleeper_cpu, args.waker_cpu, args.wakes, args.pause_us
    );
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>8}",
        "idle CPUs", "median", "p90", "p99", "max"
    );
    for (name, l) in [
        ("halt (kernel default)", &halting),
        ("poll (tools' request)", &polling),
    ] {
        println!(
            "{name:<26} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            l.at(0.5),
            l.at(0.9),
            l.at(0.99),
            l.at(1.0)
        );
    }
    println!(
        "median ratio halt/poll: {:.1}x; worst {:.1} ms against {:.1} ms",
        halting.at(0.5) / polling.at(0.5),
        halting.at(1.0) / 1000.0,
        polling.at(1.0) / 1000.0
    );
    Ok(())
}

fn measure(args: &WakeArgs) -> anyhow::Result<Latencies> {
    let (mut waker, mut sleeper) = UnixStream::pair().context("socketpair")?;
    let (cpu, wakes) = (args.sleeper_cpu, args.wakes);
    let sleeping = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        let _pin = CpuPin::to_cpu(cpu).with_context(|| format!("pin to CPU {cpu}"))?;
        let mut late = Vec::with_capacity(wakes);
        let mut sent = [0u8; 8];
        for _ in 0..wakes {
            sleeper.read_exact(&mut sent).context("read")?;
            let at = now_ns();
            late.push(at.saturating_sub(u64::from_ne_bytes(sent)) as f64 / 1000.0);
            sleeper.write_all(&[0]).context("answer")?;
        }
        Ok(late)
    });
    let waker_cpu = args.waker_cpu;
    let _pin = CpuPin::to_cpu(waker_cpu).with_context(|| format!("pin to CPU {waker_cpu}"))?;
    let mut answer = [0u8; 1];
    for _ in 0..wakes {
        std::thread::sleep(Duration::from_micros(args.pause_us));
        waker.write_all(&now_ns().to_ne_bytes()).context("write")?;
        waker.read_exact(&mut answer).context("read the answer")?;
    }
    let mut late = sleeping
        .join()
        .map_err(|_| anyhow::anyhow!("the sleeping thread panicked"))??;
    late.sort_by(f64::total_cmp);
    Ok(Latencies(late))
}
