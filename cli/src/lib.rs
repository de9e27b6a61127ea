//! What every ckpt binary does around its one library call: read CRIU's `-v` spellings,
//! install the log subscriber behind `-v`/`-o`, keep idle CPUs polling while it works
//! ([`IdlePoll`]), and report a failure once.
//!
//! Only binaries use this crate: libraries log through `tracing` and never install a
//! subscriber.
#![forbid(unsafe_code)]

mod idle;

pub use idle::IdlePoll;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

/// A log level from CRIU's `-v` option: 0 errors, 1 warnings, 2 information, 3 debug,
/// 4 trace.
///
/// Parses `N` (above 4 means 4), and the bare forms CRIU accepts: an empty value (a lone
/// `-v`, where the binary's clap attribute sets `default_missing_value = ""`) is one above
/// the default, and each `v` of `-vv`, `-vvv`... adds one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Verbosity(u8);

impl Verbosity {
    /// Information: what CRIU logs without `-v`.
    pub const DEFAULT: Verbosity = Verbosity(2);
    const MAX: u8 = 4;

    /// The level, 0 to 4.
    pub fn get(self) -> u8 {
        self.0
    }

    fn directive(self) -> &'static str {
        match self.0 {
            0 => "error",
            1 => "warn",
            2 => "info",
            3 => "debug",
            _ => "trace",
        }
    }
}

impl Default for Verbosity {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for Verbosity {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.chars().all(|c| c == 'v') {
            let extra = u8::try_from(value.len()).unwrap_or(u8::MAX);
            let level = Self::DEFAULT.0.saturating_add(1).saturating_add(extra);
            return Ok(Verbosity(level.min(Self::MAX)));
        }
        value
            .parse::<u8>()
            .map(|n| Verbosity(n.min(Self::MAX)))
            .map_err(|_| format!("{value:?} is not a log level (0..4)"))
    }
}

impl fmt::Display for Verbosity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which events reach the log.
#[derive(Debug, Clone, Copy)]
pub enum LogScope<'a> {
    /// Events of every crate at the chosen level, each line naming its module.
    All,
    /// Events of these crates (Rust names, `ckpt_dump`) at the chosen level; of the
    /// others (the ELF parser...) only warnings and errors.
    Crates(&'a [&'a str]),
}

/// Where and how much to log.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions<'a> {
    pub verbosity: Verbosity,
    /// `-o`: the log file; standard error without one.
    pub file: Option<&'a Path>,
    /// The directory a relative `file` is in, created with the file's parents if missing
    /// (CRIU's dump and restore put the log in the images directory). `None`: the current
    /// directory, and the file's directory must exist.
    pub relative_to: Option<&'a Path>,
    pub scope: LogScope<'a>,
}

impl<'a> LogOptions<'a> {
    /// Every crate's events at `verbosity`, to `file` (a relative one in the current
    /// directory) or to standard error.
    pub fn new(verbosity: Verbosity, file: Option<&'a Path>) -> Self {
        LogOptions {
            verbosity,
            file,
            relative_to: None,
            scope: LogScope::All,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("create the log directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create log file {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("install the log subscriber")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where the log goes: `file` resolved against `relative_to` (an absolute `file` stays
/// as it is).
pub fn log_path(file: &Path, relative_to: Option<&Path>) -> PathBuf {
    match relative_to {
        Some(dir) => dir.join(file),
        None => file.to_path_buf(),
    }
}

/// Installs the process-wide `tracing` subscriber; call once, first thing in `main`.
pub fn init_logging(opts: &LogOptions<'_>) -> Result<(), LogError> {
    let level = opts.verbosity.directive();
    let (filter, with_target) = match opts.scope {
        LogScope::All => (level.to_owned(), true),
        LogScope::Crates(crates) => {
            let mut filter = String::from("warn");
            for name in crates {
                filter.push_str(&format!(",{name}={level}"));
            }
            (filter, false)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(with_target);
    let installed = match opts.file {
        Some(file) => {
            let path = log_path(file, opts.relative_to);
            if opts.relative_to.is_some() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| LogError::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
            }
            let file = File::create(&path).map_err(|source| LogError::CreateFile {
                path: path.clone(),
                source,
            })?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .try_init()
        }
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    installed.map_err(LogError::Install)
}

/// Reports a failure once: `PREFIX: chain` on standard error and, when the log goes to a
/// file, in the log too (standard error already is the log otherwise). `error` is shown
/// with `{:#}`, which for `anyhow` prints the whole chain of causes.
pub fn report_failure(prefix: &str, error: &impl fmt::Display, logs_to_file: bool) {
    let text = format!("{error:#}");
    if logs_to_file {
        tracing::error!("{prefix}: {text}");
    }
    eprintln!("{prefix}: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<u8, String> {
        value.parse::<Verbosity>().map(Verbosity::get)
    }

    #[test]
    fn verbosity_takes_criu_spellings() {
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("2"), Ok(2));
        assert_eq!(parse("4"), Ok(4));
        assert_eq!(parse("9"), Ok(4));
        assert_eq!(parse(""), Ok(3));
        assert_eq!(parse("v"), Ok(4));
        assert_eq!(parse("vvvv"), Ok(4));
        assert!(parse("x").is_err());
        assert!(parse("-1").is_err());
        assert_eq!(Verbosity::default().get(), 2);
    }

    #[test]
    fn levels_map_to_tracing_directives() {
        let names: Vec<_> = (0..=4).map(|n| Verbosity(n).directive()).collect();
        assert_eq!(names, ["error", "warn", "info", "debug", "trace"]);
    }

    #[test]
    fn a_relative_log_goes_where_the_tool_says() {
        let images = Path::new("/images");
        assert_eq!(
            log_path(Path::new("dump.log"), Some(images)),
            Path::new("/images/dump.log")
        );
        assert_eq!(
            log_path(Path::new("/var/log/dump.log"), Some(images)),
            Path::new("/var/log/dump.log")
        );
        assert_eq!(
            log_path(Path::new("server.log"), None),
            Path::new("server.log")
        );
    }

    #[test]
    fn a_log_in_a_missing_images_directory_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("images");
        init_logging(&LogOptions {
            verbosity: Verbosity(4),
            file: Some(Path::new("logs/dump.log")),
            relative_to: Some(&images),
            scope: LogScope::Crates(&["ckpt_cli"]),
        })
        .expect("init logging");
        report_failure("Dumping FAILED", &"no such process", true);
        let log = std::fs::read_to_string(images.join("logs/dump.log")).expect("read log");
        assert!(log.contains("Dumping FAILED: no such process"), "{log}");
    }
}
