//! `/proc` parsers: pure functions over the text (unit-tested on saved files)
//! and thin readers that apply them to a live process.
//!
//! References: [proc(5)](https://man7.org/linux/man-pages/man5/proc.5.html).

use std::path::{Path, PathBuf};

pub mod auxv;
pub mod fd;
pub mod limits;
pub mod maps;
pub mod misc;
pub mod mountinfo;
pub mod smaps;
pub mod stat;
pub mod status;
pub mod task;
pub mod timers;

/// `/proc` text that does not have the expected shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: line {line}: {reason}: {text:?}")]
pub struct ParseError {
    /// Which kind of file (`maps`, `status`...).
    pub file: &'static str,
    /// 1-based line number (0 for binary files).
    pub line: usize,
    /// What was wrong.
    pub reason: &'static str,
    /// The offending text, cut to a reasonable length.
    pub text: String,
}

impl ParseError {
    pub(crate) fn new(file: &'static str, line: usize, reason: &'static str, text: &str) -> Self {
        ParseError {
            file,
            line,
            reason,
            text: text.chars().take(200).collect(),
        }
    }
}

/// Reading or parsing a `/proc` file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The file could not be read (ENOENT/ESRCH: the process is gone).
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's contents could not be parsed.
    #[error("parse {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

impl ProcError {
    /// Whether the error means the process (or thread, or fd) no longer exists.
    pub fn is_gone(&self) -> bool {
        match self {
            ProcError::Read { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            ProcError::Parse { .. } => false,
        }
    }
}

pub(crate) fn read_text(path: &Path) -> Result<String, ProcError> {
    let err = |source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    read_open(file, path)
}

/// The text of `file`, already open (`path` names it in errors).
pub(crate) fn read_open(mut file: std::fs::File, path: &Path) -> Result<String, ProcError> {
    let err = |source| ProcError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Read in plain chunks: `std::fs::read` first asks the size (a statx, always 0 for
    // /proc), which costs a syscall per file for nothing, thousands of times per tree dump.
    let mut bytes = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut file, &mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(e)),
        }
    }
    // /proc text is bytes: file names need not be UTF-8. Keep what we can.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub(crate) fn parse_with<T>(
    path: &Path,
    text: &str,
    parse: impl FnOnce(&str) -> Result<T, ParseError>,
) -> Result<T, ProcError> {
    parse(text).map_err(|source| ProcError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `/proc/PID/<name>` (or `/proc/PID/task/TID/<name>` when `tid` is given).
pub(crate) fn proc_path(pid: crate::Pid, tid: Option<crate::Tid>, name: &str) -> PathBuf {
    match tid {
        Some(tid) => PathBuf::from(format!("/proc/{pid}/task/{tid}/{name}")),
        None => PathBuf::from(format!("/proc/{pid}/{name}")),
    }
}

/// Undoes the octal escapes (`\040` for a space, `\012` newline, `\134` backslash)
/// `/proc` uses in mount paths.
pub fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = u32::from(digits[0] - b'0') * 64
                    + u32::from(digits[1] - b'0') * 8
                    + u32::from(digits[2] - b'0');
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_octal(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_octal(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_octal(r"/tail\04"), r"/tail\04");
        assert_eq!(unescape_octal(r"\"), r"\");
    }
}
