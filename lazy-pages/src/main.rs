//! `ckpt-lazy-pages`: the userfaultfd daemon of a lazy (post-copy) restore.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use ckpt_cli::{IdlePoll, LogOptions, Verbosity};
use std::time::{Duration, Instant};

use ckpt_lazy_pages::{DaemonError, DaemonOptions, LazyDaemon, SourceError};
use ckpt_page_server::ClientError;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ckpt-lazy-pages",
    version,
    about = "Serve the page faults of a lazily restored process tree"
)]
struct Cli {
    /// Image directory (pagemaps, and pages unless --page-server)
    #[arg(short = 'D', long = "images-dir")]
    images_dir: PathBuf,
    /// Directory of lazy-pages.socket (default: the image directory)
    #[arg(short = 'W', long = "work-dir")]
    work_dir: Option<PathBuf>,
    /// Fetch pages from the dump side's page server at --address:--port
    #[arg(long = "page-server")]
    page_server: bool,
    /// With --page-server: ask for zstd-compressed pages, which a ckpt-dump source answers
    /// with when they are smaller (an extension; a CRIU source ignores the request)
    #[arg(long = "compress-pages", requires = "page_server")]
    compress_pages: bool,
    #[arg(long)]
    address: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// Detach and run in the background
    #[arg(short = 'd', long)]
    daemon: bool,
    /// Write one zero byte to this fd once restore may connect
    #[arg(long = "status-fd")]
    status_fd: Option<i32>,
    /// Write our pid here (after --daemon)
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Log file (default: standard error)
    #[arg(short = 'o', long = "log-file")]
    log_file: Option<PathBuf>,
    /// Verbosity 0-4 (error, warn, info, debug, trace)
    #[arg(short = 'v', default_value = "2")]
    verbosity: Verbosity,
    /// Pin the daemon to this CPU (put the restored tree there too for ~5 µs faults)
    #[arg(long)]
    cpu: Option<u32>,
    /// Cap the background transfer at this many KiB per second (faults are not capped)
    #[arg(long = "background-rate", value_name = "KIB_PER_S")]
    background_rate: Option<u64>,
    /// Start the background transfer this long after restore's end marker (faults are
    /// served at once), so that the restored tree's first steps have the CPUs
    #[arg(long = "background-delay", value_name = "MS", default_value_t = 10)]
    background_delay: u64,
    /// Or sooner, once no fault came for this long (after the end marker and the last
    /// fault): the first steps are over
    #[arg(long = "background-quiet", value_name = "MS", default_value_t = 1)]
    background_quiet: u64,
    /// With --page-server: retry a refused connection for this long, so that the daemon
    /// can be started before the dump listens (its start then costs the source no frozen
    /// time)
    #[arg(long = "connect-wait", value_name = "MS", default_value_t = 0)]
    connect_wait: u64,
    /// Let idle CPUs halt while this runs. By default the tool asks the kernel for a CPU
    /// wake-up latency of 0 (`/dev/cpu_dma_latency`) for as long as it runs: idle CPUs
    /// then poll, and no wake-up of a freeze or of an answered page fault waits for a
    /// halted CPU (in a virtual machine, up to milliseconds).
    #[arg(long = "no-idle-poll")]
    no_idle_poll: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What a freeze allocates must not fault in fresh pages (see `tracee::heap`).
    tracee::heap::keep_freed_memory();
    let logs_to_file = cli.log_file.is_some();
    let logging = ckpt_cli::init_logging(&LogOptions::new(cli.verbosity, cli.log_file.as_deref()));
    match logging.map_err(anyhow::Error::from).and_then(|()| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            ckpt_cli::report_failure("ckpt-lazy-pages", &error, logs_to_file);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let page_server = if cli.page_server {
        let (Some(address), Some(port)) = (cli.address.as_deref(), cli.port) else {
            bail!("--page-server needs --address and --port");
        };
        Some(resolve(address, port)?)
    } else {
        None
    };
    let opts = DaemonOptions {
        work_dir: cli
            .work_dir
            .clone()
            .unwrap_or_else(|| cli.images_dir.clone()),
        images_dir: cli.images_dir.clone(),
        page_server,
        cpu: cli.cpu,
        background_rate: cli.background_rate.map(|k| k.saturating_mul(1024)),
        background_delay: Duration::from_millis(cli.background_delay),
        background_quiet: Duration::from_millis(cli.background_quiet),
    };
    let mut daemon = bind(&opts, Duration::from_millis(cli.connect_wait)).with_context(|| {
        format!(
            "lazy-pages: start serving {} (socket in {})",
            opts.images_dir.display(),
            opts.work_dir.display()
        )
    })?;
    daemon.set_compress_pages(cli.compress_pages);
    if cli.daemon {
        nix::unistd::daemon(true, cli.log_file.is_none()).context("lazy-pages: daemonize")?;
    }
    let _idle = IdlePoll::hold_if(!cli.no_idle_poll);
    if let Some(path) = &cli.pidfile {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("lazy-pages: write pid file {}", path.display()))?;
    }
    if let Some(fd) = cli.status_fd {
        // Reopened through /proc: the inherited fd number is not ours to take over
        // without unsafe code, and the reader only waits for the byte.
        let path = format!("/proc/self/fd/{fd}");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&[0]))
            .with_context(|| format!("lazy-pages: write the status fd {fd}"))?;
    }
    let stats = daemon.run().context("lazy-pages")?;
    tracing::info!(
        tasks = stats.tasks,
        forks = stats.forks,
        faults_copied = stats.faults_copied,
        faults_zero = stats.faults_zero,
        fault_bytes = stats.fault_bytes,
        background_bytes = stats.background_bytes,
        exited = stats.exited,
        ms = stats.total.as_millis(),
        "done"
    );
    Ok(())
}

/// Binds the daemon, retrying while the page server refuses the connection, up to `wait`.
fn bind(opts: &DaemonOptions, wait: Duration) -> Result<LazyDaemon, DaemonError> {
    let started = Instant::now();
    loop {
        match LazyDaemon::bind(opts) {
            Err(DaemonError::Source(SourceError::Connect(ClientError::Connect {
                source, ..
            }))) if source.kind() == std::io::ErrorKind::ConnectionRefused
                && started.elapsed() < wait =>
            {
                // The dump listens within milliseconds of its start: poll finely, as
                // every tenth of a millisecond here is the source's frozen time later.
                std::thread::sleep(Duration::from_micros(200));
            }
            other => return other,
        }
    }
}

fn resolve(address: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (address, port)
        .to_socket_addrs()
        .with_context(|| format!("lazy-pages: resolve {address}:{port}"))?
        .next()
        .with_context(|| format!("lazy-pages: {address}:{port} has no address"))
}
