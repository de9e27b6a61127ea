//! `ckpt-dump`: freeze a process, write it as CRIU-format images, then kill it or let it run.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ckpt_dump::{DumpOptions, FaultPoint, FinalState};
use clap::Parser;

/// Checkpoint a running process into an image directory (CRIU's format).
#[derive(Debug, Parser)]
#[command(name = "ckpt-dump", version)]
struct Cli {
    /// The process to dump.
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
    #[arg(short = 'v', value_name = "N", num_args = 0..=1, default_missing_value = "",
          value_parser = parse_verbosity)]
    verbosity: Option<u8>,
    /// Let the process run on after the dump.
    #[arg(short = 'R', long = "leave-running", conflicts_with = "leave_stopped")]
    leave_running: bool,
    /// Leave the process stopped after the dump.
    #[arg(short = 's', long = "leave-stopped")]
    leave_stopped: bool,
    /// Allow the process to use the controlling terminal of its session.
    #[arg(short = 'j', long = "shell-job")]
    shell_job: bool,
}

/// `-vN` sets the level; `-v`, `-vv`... raise the default of 2 by one per `v`.
fn parse_verbosity(value: &str) -> Result<u8, String> {
    if value.chars().all(|c| c == 'v') {
        let extra = u8::try_from(value.len()).unwrap_or(u8::MAX);
        return Ok(3u8.saturating_add(extra).min(4));
    }
    value
        .parse::<u8>()
        .map(|n| n.min(4))
        .map_err(|_| format!("{value:?} is not a log level (0..4)"))
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = match cli.verbosity.unwrap_or(2) {
        0 => "error",
        1 => "warn",
        2 => "info",
        3 => "debug",
        _ => "trace",
    };
    // Our crates at the chosen level; libraries (ELF parsing...) only when they warn.
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "warn,ckpt_dump={level},tracee={level},images_format={level}"
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &cli.log_file {
        Some(path) => {
            let path = cli.images_dir.join(path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    init_logging(cli)?;
    let final_state = if cli.leave_running {
        FinalState::Running
    } else if cli.leave_stopped {
        FinalState::Stopped
    } else {
        FinalState::Killed
    };
    let opts = DumpOptions {
        pid: cli.tree,
        images_dir: cli.images_dir.clone(),
        final_state,
        shell_job: cli.shell_job,
        fault: FaultPoint::from_env()?,
    };
    let stats = ckpt_dump::dump(&opts).with_context(|| format!("dump of pid {}", cli.tree))?;
    tracing::info!(
        frozen_us = stats.frozen_time_us,
        pages_written = stats.pages_written,
        "dump finished"
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The log file, when there is one, gets the reason too; stderr gets it once.
            if cli.log_file.is_some() {
                tracing::error!("Dumping FAILED: {err:#}");
            }
            eprintln!("Dumping FAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_verbosity;

    #[test]
    fn verbosity_takes_criu_spellings() {
        assert_eq!(parse_verbosity("0"), Ok(0));
        assert_eq!(parse_verbosity("4"), Ok(4));
        assert_eq!(parse_verbosity("9"), Ok(4));
        assert_eq!(parse_verbosity(""), Ok(3));
        assert_eq!(parse_verbosity("v"), Ok(4));
        assert!(parse_verbosity("x").is_err());
    }
}
