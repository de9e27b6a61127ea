//! The workloads (C programs in `bench/workloads/`, built static at run time) and the stamps file
//! through which each one reports its progress, the gaps in its loop and its own verdict. The
//! file's layout is documented in `workloads/mig.h`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::testbed::SERVICE_ADDR;

pub const UDP_PORT: u16 = 7777;
const MAGIC: u64 = 0x504d_4154_5347_4d43;
const HEADER: usize = 256;
const GAP_SLOTS: u64 = 16384;
/// Where the ring of the gaps' iteration counts starts, after the ring of the gaps.
const GAP_ITERATIONS: usize = HEADER + 16 * GAP_SLOTS as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum WorkloadKind {
    /// The thesis's getpid() loop.
    Getpid,
    /// Random memory access over 4 MiB, as fast as it can.
    Rma,
    /// The thesis's 100 KB reference process.
    Reference,
    /// 1 GiB dirtied at a controlled rate.
    Dirtier,
    /// A UDP request/response server with deadline-bound clients.
    Udp,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 5] = [
        WorkloadKind::Getpid,
        WorkloadKind::Rma,
        WorkloadKind::Reference,
        WorkloadKind::Dirtier,
        WorkloadKind::Udp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Getpid => "getpid",
            WorkloadKind::Rma => "rma-4mib",
            WorkloadKind::Reference => "reference-100kb",
            WorkloadKind::Dirtier => "dirtier-1gib",
            WorkloadKind::Udp => "udp-server",
        }
    }

    /// For directory names.
    pub fn short_name(self) -> &'static str {
        match self {
            WorkloadKind::Getpid => "getpid",
            WorkloadKind::Rma => "rma",
            WorkloadKind::Reference => "ref",
            WorkloadKind::Dirtier => "dirty",
            WorkloadKind::Udp => "udp",
        }
    }

    fn program(self) -> &'static str {
        match self {
            WorkloadKind::Getpid => "getpid",
            WorkloadKind::Rma => "rma",
            WorkloadKind::Reference => "reference",
            WorkloadKind::Dirtier => "dirtier",
            WorkloadKind::Udp => "udp_server",
        }
    }

    /// Roughly the memory a dump of it moves, for time estimates.
    pub fn approx_bytes(self) -> u64 {
        match self {
            WorkloadKind::Getpid | WorkloadKind::Reference | WorkloadKind::Udp => 256 << 10,
            WorkloadKind::Rma => 5 << 20,
            WorkloadKind::Dirtier => 1 << 30,
        }
    }
}

/// The C sources, next to this crate's manifest.
pub fn sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads")
}

/// Builds every workload (and the UDP client) static into `bin_dir`.
pub fn build_all(bin_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    let src = sources_dir();
    let programs = WorkloadKind::ALL
        .iter()
        .map(|w| w.program())
        .chain(["udp_client"]);
    for program in programs {
        let source = src.join(format!("{program}.c"));
        let out = Command::new("cc")
            .args(["-O2", "-static", "-Wall", "-o"])
            .arg(bin_dir.join(program))
            .arg(&source)
            .output()
            .context("run cc (gcc and the static C library are needed)")?;
        if !out.status.success() {
            bail!(
                "cc {}: {}",
                source.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The command line that starts `kind` writing its stamps to `stamps`.
pub fn command(kind: WorkloadKind, bin_dir: &Path, stamps: &Path, dirty_rate: u64) -> Command {
    let mut cmd = Command::new(bin_dir.join(kind.program()));
    cmd.arg(stamps);
    match kind {
        WorkloadKind::Rma => {
            cmd.arg("4");
        }
        WorkloadKind::Dirtier => {
            cmd.arg("1024").arg(dirty_rate.to_string());
        }
        WorkloadKind::Udp => {
            cmd.arg(UDP_PORT.to_string());
        }
        WorkloadKind::Getpid | WorkloadKind::Reference => {}
    }
    cmd
}

/// The client program's command line (run in the clients' namespace).
pub fn client_command(bin_dir: &Path, stats: &Path) -> Command {
    let mut cmd = Command::new(bin_dir.join("udp_client"));
    cmd.arg(stats).arg(SERVICE_ADDR).arg(UDP_PORT.to_string());
    cmd
}

/// What a workload has published so far.
#[derive(Debug, Clone, Default)]
pub struct Stamps {
    pub iterations: u64,
    pub last_ns: u64,
    pub ready: bool,
    /// `None` while no verdict, `Some(true)` for a pass.
    pub passed: Option<bool>,
    pub message: String,
    /// Gaps longer than the workload's threshold, oldest first (the ring keeps the last 16384).
    pub gaps: Vec<(u64, u64)>,
    /// The iteration count at the end of each gap of `gaps`.
    pub gap_iterations: Vec<u64>,
}

impl Stamps {
    /// The iteration count alone, from the header: cheap enough to poll while the tools
    /// work (the whole file, gap rings included, is 384 KiB).
    pub fn iterations(path: &Path) -> Result<u64> {
        use std::io::Read as _;
        let mut head = [0u8; 16];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .with_context(|| format!("read {}", path.display()))?;
        let word = |i: usize| head.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok());
        if word(0).map(u64::from_ne_bytes) != Some(MAGIC) {
            return Ok(0);
        }
        Ok(word(1).map_or(0, u64::from_ne_bytes))
    }

    pub fn read(path: &Path) -> Result<Stamps> {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let field = |i: usize| -> u64 {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes)
        };
        if field(0) != MAGIC {
            return Ok(Stamps::default());
        }
        let ngaps = field(5);
        let first = ngaps.saturating_sub(GAP_SLOTS);
        let mut gaps = Vec::new();
        let mut gap_iterations = Vec::new();
        for n in first..ngaps {
            let Ok(slot) = usize::try_from(n % GAP_SLOTS) else {
                continue;
            };
            let at = HEADER + slot * 16;
            let word = |o: usize| {
                bytes
                    .get(o..o + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_ne_bytes)
            };
            if let (Some(start), Some(end)) = (word(at), word(at + 8)) {
                gaps.push((start, end));
                gap_iterations.push(word(GAP_ITERATIONS + slot * 8).unwrap_or(0));
            }
        }
        let message = bytes
            .get(80..HEADER)
            .map(|m| {
                let end = m.iter().position(|&b| b == 0).unwrap_or(m.len());
                String::from_utf8_lossy(&m[..end]).into_owned()
            })
            .unwrap_or_default();
        Ok(Stamps {
            iterations: field(1),
            last_ns: field(2),
            ready: field(9) == 1,
            passed: match field(4) {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            },
            message,
            gaps,
            gap_iterations,
        })
    }

    /// How many iterations the process had made when the gap ending at `end` (ns) ended.
    pub fn iterations_at_gap_end(&self, end: u64) -> Option<u64> {
        self.gaps
            .iter()
            .position(|&(_, e)| e == end)
            .and_then(|i| self.gap_iterations.get(i).copied())
    }

    /// The longest gap inside `[from, to]` (ns), in ns; a gap reaching outside counts only
    /// its part inside (a hiccup of the machine just before the request is not down time).
    pub fn longest_gap(&self, from: u64, to: u64) -> u64 {
        self.gaps
            .iter()
            .map(|&(s, e)| e.min(to).saturating_sub(s.max(from)))
            .max()
            .unwrap_or(0)
    }

    /// The longest gap inside `[from, to)`, clipped to it: `(start, end)`.
    pub fn longest_gap_bounds(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        self.gaps
            .iter()
            .map(|&(s, e)| (s.max(from), e.min(to)))
            .filter(|(s, e)| s < e)
            .max_by_key(|(s, e)| e - s)
    }

    /// The end of the longest gap ending after `after`: when the process ran again.
    pub fn resumed_at(&self, after: u64) -> Option<u64> {
        self.gaps
            .iter()
            .filter(|(_, e)| *e >= after)
            .max_by_key(|(s, e)| e - s)
            .map(|(_, e)| *e)
    }
}

/// Asks the workload (wherever it runs) to check itself, through its stamps file.
pub fn request_verify(stamps: &Path) -> Result<()> {
    let file = File::options()
        .write(true)
        .open(stamps)
        .with_context(|| format!("open {}", stamps.display()))?;
    file.write_all_at(&1u64.to_ne_bytes(), 24)
        .with_context(|| format!("write {}", stamps.display()))
}

/// Waits until the workload has built its state and runs its loop.
pub fn wait_ready(stamps: &Path, child: &mut Child, timeout: Duration) -> Result<Stamps> {
    let start = Instant::now();
    loop {
        let s = Stamps::read(stamps).unwrap_or_default();
        if s.ready && s.iterations > 0 {
            return Ok(s);
        }
        if let Some(status) = child.try_wait().context("wait for the workload")? {
            bail!("the workload exited before it was ready ({status})");
        }
        if start.elapsed() > timeout {
            bail!("the workload was not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for the workload's verdict after `request_verify`.
pub fn wait_verdict(stamps: &Path, timeout: Duration) -> Result<(bool, String)> {
    let start = Instant::now();
    loop {
        let s = Stamps::read(stamps)?;
        if let Some(passed) = s.passed {
            return Ok((passed, s.message));
        }
        if start.elapsed() > timeout {
            bail!("the workload gave no verdict within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Client counters: sent, answered, timed out, wrong, each per deadline class (10, 30, 50 ms).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientStats {
    pub sent: [u64; 3],
    pub answered: [u64; 3],
    pub timed_out: [u64; 3],
    pub wrong: [u64; 3],
}

impl ClientStats {
    pub fn read(path: &Path) -> Result<ClientStats> {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let word = |i: usize| {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes)
        };
        let row = |r: usize| [word(r * 3), word(r * 3 + 1), word(r * 3 + 2)];
        Ok(ClientStats {
            sent: row(0),
            answered: row(1),
            timed_out: row(2),
            wrong: row(3),
        })
    }

    pub fn since(&self, earlier: &ClientStats) -> ClientStats {
        let d = |a: [u64; 3], b: [u64; 3]| {
            [
                a[0].saturating_sub(b[0]),
                a[1].saturating_sub(b[1]),
                a[2].saturating_sub(b[2]),
            ]
        };
        ClientStats {
            sent: d(self.sent, earlier.sent),
            answered: d(self.answered, earlier.answered),
            timed_out: d(self.timed_out, earlier.timed_out),
            wrong: d(self.wrong, earlier.wrong),
        }
    }
}

/// Where a program of the testbed runs. Both hosts share this machine's CPUs; on two
/// machines the destination's work could not take the CPU from the process being
/// migrated. So the workload has the first CPU, and keeps it at the destination (its
/// affinity migrates with it); the destination's programs and the harness run on the
/// other CPUs. The source's tools start on the others too: every one of them starts while
/// the program runs (a pre-copy round, the dump that freezes it), and an exec placed on the
/// program's CPU took it from the program for 1.8 ms before the tool could move. What a
/// tool runs on the program's CPU while the program is frozen it places there itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The workload: the first CPU.
    Workload,
    /// The harness: the other CPUs (what it starts inherits that, unless placed).
    Harness,
    /// The source's tools: the other CPUs, from their exec on.
    Source,
    /// The clients of the UDP server, in a namespace of their own: any CPU.
    Anywhere,
    /// The destination's programs: the other CPUs.
    Destination,
}

impl Placement {
    /// Applies the placement to the calling thread, for a child to inherit. On a machine
    /// of one CPU, nothing.
    pub fn apply(self) -> Result<()> {
        // The machine's CPUs, not this thread's: it may have been placed already.
        let online = tracee::cpu::cpu_list(tracee::cpu::CPUS_ONLINE)
            .with_context(|| format!("read {}", tracee::cpu::CPUS_ONLINE))?;
        let (first, rest) = match online.split_first() {
            Some((first, rest)) if !rest.is_empty() => (std::slice::from_ref(first), rest),
            _ => return Ok(()),
        };
        let cpus = match self {
            Placement::Workload => first,
            Placement::Harness | Placement::Destination | Placement::Source => rest,
            Placement::Anywhere => &online[..],
        };
        let me = tracee::Tid::from_raw(rustix::thread::gettid().as_raw_nonzero().get());
        // Where a cpuset leaves some of them out, the inherited affinity stays: the
        // placement only sharpens the measurement, it is no condition of it.
        if me.is_none_or(|me| tracee::taskinfo::set_affinity(me, cpus).is_err()) {
            eprintln!("migrate: {self:?} not placed: the inherited affinity stays");
        }
        Ok(())
    }
}

/// Spawns `cmd` inside the network namespace at `ns` (and nothing else: `ip netns exec` would
/// also give it a mount namespace of its own), with output to `log`. From a thread that
/// enters the namespace first (a network namespace is a thread's own, and children start in
/// their parent thread's): `nsenter` would cost an exec more per program, a millisecond of
/// CPU, inside the measured preparation when it starts a tool, on this machine of two CPUs.
pub fn spawn_in(ns: &Path, cmd: &Command, log: &Path, placement: Placement) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone().context("dup log file")?;
    let mut full = Command::new(cmd.get_program());
    full.args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let netns = File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("enter {}", ns.display()))?;
                // The child inherits its parent thread's policy and affinity; this thread
                // ends here.
                placement.apply()?;
                full.spawn().context("spawn")
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the spawning thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::Stamps;

    #[test]
    fn down_time_counts_only_the_part_of_a_gap_inside_the_window() {
        let stamps = Stamps {
            gaps: vec![(50, 250), (300, 340), (900, 1500)],
            ..Stamps::default()
        };
        assert_eq!(stamps.longest_gap(200, 1000), 100);
        assert_eq!(stamps.longest_gap(0, 400), 200);
        assert_eq!(stamps.longest_gap(2000, 3000), 0);
        assert_eq!(stamps.resumed_at(280), Some(1500));
    }

    #[test]
    fn each_gap_carries_the_iteration_count_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps");
        let mut bytes = vec![0u8; super::GAP_ITERATIONS + 8 * super::GAP_SLOTS as usize];
        let mut put = |at: usize, v: u64| bytes[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        put(0, super::MAGIC);
        put(8, 5000);
        put(40, 2);
        put(super::HEADER, 100);
        put(super::HEADER + 8, 900);
        put(super::HEADER + 16, 1000);
        put(super::HEADER + 24, 1700);
        put(super::GAP_ITERATIONS, 40);
        put(super::GAP_ITERATIONS + 8, 2100);
        std::fs::write(&path, &bytes).unwrap();
        let stamps = Stamps::read(&path).unwrap();
        assert_eq!(stamps.gaps, vec![(100, 900), (1000, 1700)]);
        assert_eq!(stamps.iterations_at_gap_end(1700), Some(2100));
        assert_eq!(stamps.iterations_at_gap_end(900), Some(40));
        assert_eq!(stamps.iterations_at_gap_end(1000), None);
    }

    #[test]
    fn the_header_alone_gives_the_iterations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps");
        let mut bytes = vec![0u8; super::HEADER];
        bytes[..8].copy_from_slice(&super::MAGIC.to_ne_bytes());
        bytes[8..16].copy_from_slice(&4321u64.to_ne_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Stamps::iterations(&path).unwrap(), 4321);
        assert_eq!(Stamps::read(&path).unwrap().iterations, 4321);
        // Not started yet (no magic): nothing counted.
        std::fs::write(&path, vec![0u8; 16]).unwrap();
        assert_eq!(Stamps::iterations(&path).unwrap(), 0);
        std::fs::write(&path, b"short").unwrap();
        assert!(Stamps::iterations(&path).is_err());
    }
}
