//! `ckpt-restore`: recreate a process from CRIU-format images.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ckpt_cli::{IdlePoll, LogOptions, LogScope, Verbosity};
use ckpt_restore::{restore, FillMethod, RestoreOptions, RestoreOutcome};
use clap::Parser;

/// Recreate a checkpointed process (CRIU image format) with its original PID.
#[derive(Debug, Parser)]
#[command(name = "ckpt-restore", version)]
struct Cli {
    /// Directory holding the images.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    images_dir: PathBuf,
    /// Exit once the restored process runs instead of waiting for it.
    #[arg(short = 'd', long = "restore-detached")]
    detached: bool,
    /// Write the PID of the restored root to this file.
    #[arg(long = "pidfile", value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Log to this file instead of stderr.
    #[arg(short = 'o', long = "log-file", value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Verbosity: 0 errors, 1 warnings, 2 info, 3 debug, 4 trace.
    #[arg(
        short = 'v',
        value_name = "N",
        num_args = 0..=1,
        default_missing_value = "4",
        default_value = "2"
    )]
    verbosity: Verbosity,
    /// The process was a job of a shell: keep our session and process group.
    #[arg(long = "shell-job", short = 'j')]
    shell_job: bool,
    /// Restore into a new pid namespace (the image's pids are free there).
    #[arg(long = "new-pid-ns")]
    new_pid_ns: bool,
    /// Leave lazy pages missing: `ckpt-lazy-pages` fills them on demand.
    #[arg(long = "lazy-pages")]
    lazy_pages: bool,
    /// With --lazy-pages: before resuming, install the pages each thread touches first
    /// (at its instruction and stack pointers, and where its registers point).
    #[arg(long = "lazy-prefetch-hot", requires = "lazy_pages")]
    lazy_prefetch_hot: bool,
    /// Prepared migration: the images are the source's prepared ones. Connect to the
    /// source (`ckpt-dump --prepare`) at ADDR:PORT, rebuild the process and hold it; apply
    /// the changes the source sends once it freezes, then resume. With --lazy-pages, a
    /// prepared post-copy (the source's dump has --lazy-pages too).
    #[arg(long = "prepared", value_name = "ADDR:PORT")]
    prepared: Option<String>,
    /// Directory of `lazy-pages.socket` (default: the images directory).
    #[arg(short = 'W', long = "work-dir", value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Use our fd N for the object ID of the images (a pipe `pipe:[INODE]` or a file path),
    /// as CRIU's option: typically the other end of a pipe outside the dumped tree.
    #[arg(long = "inherit-fd", value_name = "fd[N]:ID")]
    inherit_fd: Vec<ckpt_restore::files::InheritFd>,
    /// Start, then wait for a line on standard input before reading the images. A
    /// migration starts the restorer this way before it freezes the source, so that
    /// starting it is not down time. Input that ends without a line aborts.
    #[arg(long = "wait-go")]
    wait_go: bool,
    /// How pages are written: parallel (default), preadv (by the target), writev or mem.
    #[arg(
        long = "fill-method",
        value_name = "METHOD",
        default_value = "parallel",
        hide = true
    )]
    fill_method: String,
    /// Let idle CPUs halt while this runs. By default the tool asks the kernel for a CPU
    /// wake-up latency of 0 (`/dev/cpu_dma_latency`) for as long as it runs: idle CPUs
    /// then poll, and no wake-up of a freeze or of an answered page fault waits for a
    /// halted CPU (in a virtual machine, up to milliseconds).
    #[arg(long = "no-idle-poll")]
    no_idle_poll: bool,
}

fn run(cli: &Cli) -> anyhow::Result<RestoreOutcome> {
    // A relative -o lands in the images directory, as CRIU's does.
    ckpt_cli::init_logging(&LogOptions {
        relative_to: Some(&cli.images_dir),
        scope: LogScope::Crates(&["ckpt_restore", "tracee", "images_format"]),
        ..LogOptions::new(cli.verbosity, cli.log_file.as_deref())
    })?;
    // Before the wait for the go: asking wakes every idle CPU.
    let _idle = IdlePoll::hold_if(!cli.no_idle_poll);
    let fill = match cli.fill_method.as_str() {
        "preadv" => FillMethod::Preadv,
        "writev" => FillMethod::Writev,
        "mem" => FillMethod::ProcMem,
        "parallel" => FillMethod::Parallel,
        other => anyhow::bail!("unknown --fill-method {other} (preadv, writev, mem or parallel)"),
    };
    if cli.wait_go {
        wait_go()?;
    }
    let opts = RestoreOptions {
        fill,
        lazy_pages: cli.lazy_pages,
        lazy_prefetch_hot: cli.lazy_prefetch_hot,
        new_pid_ns: cli.new_pid_ns,
        work_dir: cli.work_dir.clone(),
        images_dir: cli.images_dir.clone(),
        detached: cli.detached,
        pidfile: cli.pidfile.clone(),
        shell_job: cli.shell_job,
        inherit_fds: cli.inherit_fd.clone(),
    };
    match &cli.prepared {
        Some(source) => {
            ckpt_restore::prepared::restore_prepared(&opts, source).with_context(|| {
                format!(
                    "prepared restore from {} switching with {source}",
                    cli.images_dir.display()
                )
            })
        }
        None => {
            restore(&opts).with_context(|| format!("restore from {}", cli.images_dir.display()))
        }
    }
}

/// Blocks until a line arrives on standard input.
fn wait_go() -> anyhow::Result<()> {
    tracing::info!("waiting for the word to go on standard input");
    let mut line = String::new();
    let read = std::io::stdin()
        .read_line(&mut line)
        .context("read the word to go from standard input")?;
    if read == 0 {
        anyhow::bail!("standard input ended before the word to go: restore called off");
    }
    tracing::info!("go");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What a freeze allocates must not fault in fresh pages (see `tracee::heap`).
    tracee::heap::keep_freed_memory();
    match run(&cli) {
        Ok(RestoreOutcome::Detached { .. }) => ExitCode::SUCCESS,
        Ok(RestoreOutcome::Exited { code, .. }) => {
            ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
        }
        Ok(RestoreOutcome::Killed { signal, .. }) => {
            ExitCode::from(u8::try_from(128 + (signal & 0x7f)).unwrap_or(1))
        }
        Err(err) => {
            ckpt_cli::report_failure("ckpt-restore", &err, cli.log_file.is_some());
            ExitCode::FAILURE
        }
    }
}
