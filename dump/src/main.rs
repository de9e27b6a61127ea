//! `ckpt-dump`: freeze a process tree, write it as CRIU-format images, then kill it or let it
//! run.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use ckpt_cli::{IdlePoll, LogOptions, LogScope, Verbosity};
use ckpt_dump::{DumpMode, DumpOptions, FaultPoint, FinalState};
use clap::Parser;

/// Checkpoint a running process into an image directory (CRIU's format).
#[derive(Debug, Parser)]
#[command(name = "ckpt-dump", version)]
struct Cli {
    /// The root of the process tree to dump (every process below it is dumped too).
    #[arg(short = 't', long = "tree", value_name = "PID")]
    tree: i32,
    /// Directory to write the images into (created if missing).
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    images_dir: PathBuf,
    /// Write the log to this file instead of stderr (relative to the images directory, as
    /// CRIU does).
    #[arg(short = 'o', long = "log-file", value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Log level 0..4 (error, warn, info, debug, trace), default 2; CRIU spelling: `-v4`,
    /// or `-v`, `-vv` to raise it by one per `v`.
    #[arg(
        short = 'v',
        value_name = "N",
        num_args = 0..=1,
        default_missing_value = "",
        default_value = "2"
    )]
    verbosity: Verbosity,
    /// Let the process run on after the dump.
    #[arg(short = 'R', long = "leave-running", conflicts_with = "leave_stopped")]
    leave_running: bool,
    /// Leave the process stopped after the dump. The images are not synced to disk then
    /// (the process is still there): a migration moves them on at once.
    #[arg(short = 's', long = "leave-stopped")]
    leave_stopped: bool,
    /// Allow the process to use the controlling terminal of its session.
    #[arg(short = 'j', long = "shell-job")]
    shell_job: bool,
    /// An object whose other side stays outside the dumped tree, e.g. `pipe:[INODE]` for a
    /// pipe whose other end is held elsewhere (restore it with --inherit-fd).
    #[arg(long = "external", value_name = "TYPE[ID]")]
    external: Vec<String>,
    /// Allow datagram unix sockets connected to a named socket outside the dumped tree:
    /// restore connects them to that name again.
    #[arg(short = 'x', long = "ext-unix-sk")]
    ext_unix_sk: bool,
    /// Pre-copy round: write only memory, read while the process runs on.
    #[arg(long = "pre-dump", conflicts_with_all = ["lazy_pages", "leave_stopped"])]
    pre_dump: bool,
    /// Track the pages written from now on, for the next round (kept between runs).
    #[arg(long = "track-mem")]
    track_mem: bool,
    /// Queued pre-copy round: send only pages not written since the previous round, hold
    /// back the others for a later round or the final dump.
    #[arg(long = "hold-hot-pages", requires_all = ["pre_dump", "track_mem"])]
    hold_hot_pages: bool,
    /// The previous round's image directory (relative paths are relative to -D); becomes
    /// the `parent` link, and pages unchanged since then refer to it.
    #[arg(long = "prev-images-dir", value_name = "DIR")]
    prev_images_dir: Option<PathBuf>,
    /// Send the pages to the page server at --address:--port instead of -D.
    #[arg(long = "page-server", requires = "port")]
    page_server: bool,
    /// With --page-server: send pages zstd-compressed where that makes them smaller (an
    /// extension of the protocol that ckpt-page-server reads, CRIU's page server does not).
    /// A lazy dump answers compressed whenever the lazy-pages daemon asks for it.
    #[arg(long = "compress-pages")]
    compress_pages: bool,
    /// Post-copy: leave private anonymous pages lazy and serve them (those of every process
    /// of the tree), frozen, to the lazy-pages daemon that connects to --address:--port.
    #[arg(long = "lazy-pages", requires = "port", conflicts_with = "page_server")]
    lazy_pages: bool,
    /// Prepared migration: write the images while the tree runs on, wait for the
    /// destination's `ckpt-restore --prepared` (connecting to --address:--port) to rebuild
    /// it and say READY, then freeze and send only what changed. With --lazy-pages
    /// (post-copy), then serve the lazy pages; not with --prev-images-dir or --track-mem.
    /// Without (the end of a pre-copy: one process, --prev-images-dir naming the last
    /// round, which the destination holds), the pages written since the first images
    /// cross with the change, found by dirty tracking.
    #[arg(long = "prepare", requires = "port")]
    prepare: bool,
    /// Address of the page server, or to serve lazy pages on (default: 0.0.0.0 to serve,
    /// required to send).
    #[arg(long, value_name = "ADDR")]
    address: Option<IpAddr>,
    /// Port of the page server, or to serve lazy pages on.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Lazy pages: seconds to wait for the daemon before resuming the source.
    #[arg(
        long = "lazy-connect-timeout",
        value_name = "SECS",
        default_value_t = 300
    )]
    lazy_connect_timeout: u64,
    /// Lazy pages: seconds to wait for the daemon to reconnect once the destination runs,
    /// before the source is killed.
    #[arg(
        long = "lazy-reconnect-window",
        value_name = "SECS",
        default_value_t = 30
    )]
    lazy_reconnect_window: u64,
    /// Let idle CPUs halt while this runs. By default the tool asks the kernel for a CPU
    /// wake-up latency of 0 (`/dev/cpu_dma_latency`) for as long as it runs: idle CPUs
    /// then poll, and no wake-up of a freeze or of an answered page fault waits for a
    /// halted CPU (in a virtual machine, up to milliseconds).
    #[arg(long = "no-idle-poll")]
    no_idle_poll: bool,
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // Like CRIU, a relative -o names a file in the images directory.
    ckpt_cli::init_logging(&LogOptions {
        relative_to: Some(&cli.images_dir),
        scope: LogScope::Crates(&["ckpt_dump", "tracee", "images_format", "ckpt_page_server"]),
        ..LogOptions::new(cli.verbosity, cli.log_file.as_deref())
    })?;
    let _idle = IdlePoll::hold_if(!cli.no_idle_poll);
    let final_state = if cli.leave_running {
        FinalState::Running
    } else if cli.leave_stopped {
        FinalState::Stopped
    } else {
        FinalState::Killed
    };
    let mode = if cli.pre_dump {
        DumpMode::PreDump
    } else if cli.lazy_pages {
        DumpMode::Lazy
    } else {
        DumpMode::Full
    };
    let page_server = match (cli.page_server, cli.address, cli.port) {
        (false, _, _) => None,
        (true, Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
        (true, None, _) => bail!("--page-server needs --address (pages go only where named)"),
        (true, _, None) => bail!("--page-server needs --port"),
    };
    let lazy_listen = match (cli.lazy_pages || cli.prepare, cli.port) {
        (true, Some(port)) => Some(SocketAddr::new(
            cli.address.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port,
        )),
        _ => None,
    };
    let mut opts = DumpOptions::new(cli.tree, cli.images_dir.clone());
    opts.final_state = final_state;
    opts.shell_job = cli.shell_job;
    opts.external = cli.external.clone();
    opts.ext_unix_sk = cli.ext_unix_sk;
    opts.fault = FaultPoint::from_env()?;
    opts.mode = mode;
    opts.prev_images_dir = cli.prev_images_dir.clone();
    opts.track_mem = cli.track_mem;
    opts.hold_hot_pages = cli.hold_hot_pages;
    opts.page_server = page_server;
    opts.compress_pages = cli.compress_pages;
    opts.lazy_listen = lazy_listen;
    opts.lazy_connect_timeout = Duration::from_secs(cli.lazy_connect_timeout);
    opts.lazy_reconnect_window = Duration::from_secs(cli.lazy_reconnect_window);
    opts.prepare = cli.prepare;
    let stats = ckpt_dump::dump(&opts).with_context(|| format!("dump of pid {}", cli.tree))?;
    tracing::info!(
        frozen_us = stats.frozen_time_us,
        pages_written = stats.pages_written,
        pages_parent = stats.pages_skipped_parent,
        pages_lazy = stats.pages_lazy,
        "dump finished"
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What a freeze allocates must not fault in fresh pages (see `tracee::heap`).
    tracee::heap::keep_freed_memory();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            ckpt_cli::report_failure("Dumping FAILED", &err, cli.log_file.is_some());
            ExitCode::FAILURE
        }
    }
}
