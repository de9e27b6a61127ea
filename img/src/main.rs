//! `ckpt-img`: inspect checkpoint images. `decode` and `encode` convert between image files and
//! the JSON that CRIU's `crit` prints and reads; `show` summarises an image directory; `check`
//! validates one.
#![forbid(unsafe_code)]

mod check;
mod flags;
mod format;
mod json;
mod model;
mod schema;
mod show;

use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ckpt-img", version, about = "Inspect checkpoint images")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image file to JSON, as `crit decode` does
    Decode {
        /// Image file (default: standard input)
        #[arg(short = 'i', long = "in")]
        input: Option<PathBuf>,
        /// JSON file to write (default: standard output)
        #[arg(short = 'o', long = "out")]
        output: Option<PathBuf>,
        /// Indent, and print addresses, flags and device numbers symbolically
        #[arg(long)]
        pretty: bool,
    },
    /// Convert JSON (plain or pretty) back to an image file, as `crit encode` does
    Encode {
        /// JSON file (default: standard input)
        #[arg(short = 'i', long = "in")]
        input: Option<PathBuf>,
        /// Image file to write (default: standard output)
        #[arg(short = 'o', long = "out")]
        output: Option<PathBuf>,
    },
    /// Summarise an image directory: processes, threads, memory, files, parent images
    Show {
        /// Image directory
        dir: PathBuf,
    },
    /// Validate every image of a directory and the references between them
    Check {
        /// Image directory
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ckpt-img: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Decode {
            input,
            output,
            pretty,
        } => {
            let schema = schema::Schema::images()?;
            let bytes = read_input(input.as_deref())?;
            let name = display(input.as_deref());
            let image = json::decode_image(&schema, &bytes, pretty)
                .with_context(|| format!("decoding {name}"))?;
            let mut text = json::text::to_python_json(&image, pretty.then_some(4));
            // crit ends its output with a newline on standard output only
            if output.is_none() {
                text.push('\n');
            }
            write_output(output.as_deref(), text.as_bytes())?;
        }
        Command::Encode { input, output } => {
            let schema = schema::Schema::images()?;
            let bytes = read_input(input.as_deref())?;
            let name = display(input.as_deref());
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading JSON from {name}"))?;
            let image =
                json::encode_image(&schema, &value).with_context(|| format!("encoding {name}"))?;
            write_output(output.as_deref(), &image)?;
        }
        Command::Show { dir } => {
            let summary =
                show::summarize(&dir).with_context(|| format!("reading {}", dir.display()))?;
            let tty = std::io::stdout().is_terminal();
            write_output(None, show::render(&summary, tty).as_bytes())?;
        }
        Command::Check { dir } => {
            let problems = check::check_dir(&dir);
            for problem in &problems {
                println!("{problem}");
            }
            if !problems.is_empty() {
                eprintln!("ckpt-img: {}: {} problem(s)", dir.display(), problems.len());
                return Ok(ExitCode::FAILURE);
            }
            println!("{}: ok", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn display(path: Option<&Path>) -> String {
    path.map_or_else(|| "standard input".to_owned(), |p| p.display().to_string())
}

fn read_input(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = path {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading standard input")?;
    Ok(bytes)
}

/// Writes to `path` (created 0600: images and their JSON hold process memory) or stdout.
fn write_output(path: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    match path {
        Some(path) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(bytes))
            .with_context(|| format!("writing {}", path.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)
                .and_then(|()| out.flush())
                .context("writing standard output")
        }
    }
}
