//! Pre-copy benchmark: a 1 GiB process that keeps rewriting its memory at a fixed rate is
//! pre-dumped three times with `--track-mem` through `ckpt-page-server` on 127.0.0.1, then
//! final-dumped; the final dump's frozen time is compared with a plain full dump of the same
//! process (through the page server too), at several dirty rates.
//!
//! `cargo run --release -p ckpt-dump --example precopy_bench [-- RATES_MB_S...]`
//! (default rates: 5 20 100 500). Images go to /dev/shm when it exists, so that the numbers
//! are the tools' and the loopback's, not the disk's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use images_format::pb::StatsEntry;
use images_format::{ImageDir, ImageKind, PAGE_SIZE};

const WRITER_SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workloads/writer.c");
const MIB: u32 = 1024;
/// The writer's tick: it writes its pages, then sleeps this long.
const TICK_US: u64 = 10_000;

struct Tools {
    dump: PathBuf,
    page_server: PathBuf,
}

fn tools() -> anyhow::Result<Tools> {
    let exe = std::env::current_exe()?;
    // target/PROFILE/examples/precopy_bench -> target/PROFILE
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("where is the target directory?")?
        .to_path_buf();
    let t = Tools {
        dump: dir.join("ckpt-dump"),
        page_server: dir.join("ckpt-page-server"),
    };
    if !t.dump.is_file() || !t.page_server.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "ckpt-dump", "-p", "ckpt-page-server"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            bail!("cannot build ckpt-dump and ckpt-page-server");
        }
    }
    Ok(t)
}

/// The writer workload, killed and reaped when dropped.
struct Writer {
    child: Child,
    dir: PathBuf,
}

impl Writer {
    fn start(exe: &Path, work: &Path, mb_per_s: u64) -> anyhow::Result<Writer> {
        let dir = work.join(format!("writer-{mb_per_s}"));
        fs::create_dir_all(&dir)?;
        let per_tick = (mb_per_s * 1_000_000 / PAGE_SIZE * TICK_US / 1_000_000).max(1);
        let child = Command::new(exe)
            .args([MIB.to_string(), per_tick.to_string(), TICK_US.to_string()])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let w = Writer { child, dir };
        let start = Instant::now();
        while !w.dir.join("ready").exists() {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("the writer never got ready");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(w)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_listening(port: u16) -> anyhow::Result<()> {
    let needle = format!(":{port:04X} ");
    let start = Instant::now();
    loop {
        let table = fs::read_to_string("/proc/net/tcp")?;
        if table
            .lines()
            .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the page server does not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One dump's numbers.
#[derive(Debug, Clone, Copy)]
struct Round {
    wall: Duration,
    frozen_us: u32,
    written: u64,
    parent: u64,
}

/// One `ckpt-dump` through a fresh `ckpt-page-server` into `dir`.
fn dump_via_server(
    t: &Tools,
    pid: u32,
    dir: &Path,
    parent: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Round> {
    fs::create_dir_all(dir)?;
    let port = free_port()?;
    let mut server = Command::new(&t.page_server);
    server
        .arg("-D")
        .arg(dir)
        .args(["--address", "127.0.0.1", "--port", &port.to_string(), "-v0"]);
    if let Some(p) = parent {
        server.args(["--prev-images-dir", p]);
    }
    let mut server = server.stdin(Stdio::null()).spawn()?;
    wait_listening(port)?;
    let mut dump = Command::new(&t.dump);
    dump.arg("-t")
        .arg(pid.to_string())
        .arg("-D")
        .arg(dir)
        .args(["-v1", "--page-server", "--address", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(extra);
    if let Some(p) = parent {
        dump.args(["--prev-images-dir", p]);
    }
    let started = Instant::now();
    let out = dump.output()?;
    let wall = started.elapsed();
    let served = server.wait()?;
    if !out.status.success() || !served.success() {
        bail!(
            "dump into {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let entry: StatsEntry = ImageDir::new(dir)?.read_one(ImageKind::StatsDump, 0)?;
    let d = entry.dump.context("stats-dump without dump stats")?;
    Ok(Round {
        wall,
        frozen_us: d.frozen_time,
        written: d.pages_written,
        parent: d.pages_skipped_parent,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / 1e6
}

/// Pre-copy of one writer at `rate` MB/s; returns (plain frozen ms, final frozen ms).
fn run_rate(t: &Tools, writer: &Path, work: &Path, rate: u64) -> anyhow::Result<(f64, f64)> {
    let w = Writer::start(writer, work, rate)?;
    let pid = w.child.id();
    let root = work.join(format!("rate-{rate}"));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    println!("\n## {rate} MB/s dirty rate (1 GiB process, pid {pid})\n");
    println!("| dump | wall ms | frozen ms | pages sent | MB sent | pages left to parent | MB/s on the wire |");
    println!("|---|---|---|---|---|---|---|");
    let plain = dump_via_server(t, pid, &root.join("plain"), None, &["--leave-running"])?;
    let row = |name: &str, r: &Round| {
        println!(
            "| {name} | {:.1} | {:.1} | {} | {:.1} | {} | {:.0} |",
            ms(r.wall),
            f64::from(r.frozen_us) / 1e3,
            r.written,
            mb(r.written),
            r.parent,
            mb(r.written) / r.wall.as_secs_f64()
        );
    };
    row("plain full dump (--leave-running)", &plain);
    fs::remove_dir_all(root.join("plain"))?;
    let mut previous: Option<String> = None;
    let mut last = plain;
    for round in 1..=4u32 {
        let name = round.to_string();
        let parent = previous.as_ref().map(|p| format!("../{p}"));
        let mut extra = vec!["--track-mem"];
        if round < 4 {
            extra.push("--pre-dump");
        }
        last = dump_via_server(t, pid, &root.join(&name), parent.as_deref(), &extra)?;
        let label = if round < 4 {
            format!("pre-dump {round}")
        } else {
            "final dump".to_owned()
        };
        row(&label, &last);
        previous = Some(name);
    }
    let plain_ms = f64::from(plain.frozen_us) / 1e3;
    let final_ms = f64::from(last.frozen_us) / 1e3;
    println!(
        "\nfinal frozen {final_ms:.1} ms vs plain {plain_ms:.1} ms: {:.1}% ({})",
        final_ms / plain_ms * 100.0,
        if final_ms * 10.0 <= plain_ms {
            "goal met: at most a tenth"
        } else {
            "goal missed: more than a tenth"
        }
    );
    drop(w);
    fs::remove_dir_all(&root)?;
    Ok((plain_ms, final_ms))
}

fn main() -> anyhow::Result<()> {
    let rates: Vec<u64> = match std::env::args().skip(1).map(|a| a.parse()).collect() {
        Ok(r) if !Vec::<u64>::is_empty(&r) => r,
        Ok(_) => vec![5, 20, 100, 500],
        Err(e) => bail!("rates are MB/s integers: {e}"),
    };
    let t = tools()?;
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work = tempfile::Builder::new()
        .prefix("ckpt-precopy-bench-")
        .tempdir_in(base)?;
    let writer = work.path().join("writer");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&writer)
        .arg(WRITER_SRC)
        .status()?;
    if !cc.success() {
        bail!("cannot compile the writer workload");
    }
    println!(
        "# pre-copy through ckpt-page-server on 127.0.0.1, images in {}",
        work.path().display()
    );
    let mut summary = Vec::new();
    for rate in rates {
        summary.push((rate, run_rate(&t, &writer, work.path(), rate)?));
    }
    println!("\n## final frozen time by dirty rate\n");
    println!("| dirty MB/s | plain full dump frozen ms | pre-copy final frozen ms | ratio |");
    println!("|---|---|---|---|");
    for (rate, (plain, fin)) in summary {
        println!(
            "| {rate} | {plain:.1} | {fin:.1} | {:.3} |",
            fin / plain.max(1e-9)
        );
    }
    Ok(())
}
