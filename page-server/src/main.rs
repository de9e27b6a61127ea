//! `ckpt-page-server`: receives the pages of one dump or pre-dump over TCP into an image
//! directory (or, with `--lazy-pages`, serves saved pages), speaking CRIU's protocol.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{Context, Result};
use ckpt_cli::{IdlePoll, LogOptions, Verbosity};
use ckpt_page_server::daemon;
use ckpt_page_server::{PageServer, ReceiveMode, ServerOptions};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "ckpt-page-server", version, about)]
struct Cli {
    /// Image directory the pages are written to (or served from).
    #[arg(short = 'D', long = "images-dir")]
    images_dir: PathBuf,
    /// Address to listen on, and only there (0.0.0.0 for every interface).
    #[arg(long)]
    address: IpAddr,
    #[arg(long)]
    port: u16,
    /// Images of the previous pre-dump; becomes DIR/parent (relative to DIR if relative).
    #[arg(long)]
    prev_images_dir: Option<PathBuf>,
    /// Return once listening; the server runs on in the background (pid in --pidfile).
    #[arg(short = 'd', long)]
    daemon: bool,
    /// Write one zero byte to this inherited fd once listening.
    #[arg(long)]
    status_fd: Option<i32>,
    /// Write the server's pid here.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Log here instead of standard error.
    #[arg(short = 'o', long)]
    log_file: Option<PathBuf>,
    /// Log level 0 (errors) to 4 (everything); -v alone is 4.
    #[arg(short = 'v', num_args = 0..=1, default_missing_value = "4", default_value = "2")]
    verbosity: Verbosity,
    /// Serve GET requests from the images instead of receiving a dump.
    #[arg(long)]
    lazy_pages: bool,
    /// fsync the images before confirming CLOSE.
    #[arg(long)]
    sync: bool,
    /// Serve only a connection from this address.
    #[arg(long)]
    peer: Option<IpAddr>,
    /// Receive with read/write instead of splice.
    #[arg(long)]
    no_splice: bool,
    /// Let idle CPUs halt while this runs. By default the tool asks the kernel for a CPU
    /// wake-up latency of 0 (`/dev/cpu_dma_latency`) for as long as it runs: idle CPUs
    /// then poll, and no wake-up of a freeze or of an answered page fault waits for a
    /// halted CPU (in a virtual machine, up to milliseconds).
    #[arg(long = "no-idle-poll")]
    no_idle_poll: bool,
    /// Set by --daemon on the background copy (see `daemon::LISTENER_ON_STDIN`).
    #[arg(long = "listener-on-stdin", hide = true)]
    listener_on_stdin: bool,
}

fn main() {
    let cli = Cli::parse();
    let logs_to_file = cli.log_file.is_some();
    let logging = ckpt_cli::init_logging(&LogOptions::new(cli.verbosity, cli.log_file.as_deref()));
    if let Err(error) = logging.map_err(anyhow::Error::from).and_then(|()| run(cli)) {
        ckpt_cli::report_failure("ckpt-page-server", &error, logs_to_file);
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let addr = SocketAddr::new(cli.address, cli.port);
    let listener = if cli.listener_on_stdin {
        daemon::adopt_listener()?
    } else {
        TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?
    };
    if cli.daemon && !cli.listener_on_stdin {
        // The copy gets the same arguments and knows from the hidden flag to serve.
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let pid = daemon::spawn_background(listener, &args)?;
        if let Some(path) = &cli.pidfile {
            daemon::write_pidfile(path, pid)?;
        }
        return Ok(());
    }
    if let (Some(path), false) = (&cli.pidfile, cli.listener_on_stdin) {
        daemon::write_pidfile(path, std::process::id())?;
    }
    // Here, in the copy that serves, after --daemon's parent returned.
    let _idle = IdlePoll::hold_if(!cli.no_idle_poll);
    let opts = ServerOptions {
        images_dir: cli.images_dir.clone(),
        prev_images_dir: cli.prev_images_dir.clone(),
        lazy_pages: cli.lazy_pages,
        sync: cli.sync,
        peer: cli.peer,
        receive: if cli.no_splice {
            ReceiveMode::Copy
        } else {
            ReceiveMode::Splice
        },
    };
    let server = PageServer::with_listener(listener, opts)
        .with_context(|| format!("page server for {}", cli.images_dir.display()))?;
    tracing::info!(addr = %server.local_addr()?, dir = %cli.images_dir.display(), "listening");
    if let Some(fd) = cli.status_fd {
        daemon::notify_status_fd(fd)?;
    }
    server
        .serve_one()
        .with_context(|| format!("page server for {}", cli.images_dir.display()))?;
    Ok(())
}
