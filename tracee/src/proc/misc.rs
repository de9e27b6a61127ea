//! Small one-value `/proc/PID` files and links.

use std::path::{Path, PathBuf};

use super::{proc_path, read_text, ParseError, ProcError};
use crate::ids::Pid;

fn parse_value<T: std::str::FromStr>(
    path: &Path,
    text: &str,
    file: &'static str,
) -> Result<T, ProcError> {
    text.trim().parse().map_err(|_| ProcError::Parse {
        path: path.to_path_buf(),
        source: ParseError::new(file, 1, "not a number", text),
    })
}

fn read_link(path: PathBuf) -> Result<PathBuf, ProcError> {
    std::fs::read_link(&path).map_err(|source| ProcError::Read { path, source })
}

/// `/proc/PID/personality` (hex).
pub fn personality(pid: Pid) -> Result<u32, ProcError> {
    let path = proc_path(pid, None, "personality");
    let text = read_text(&path)?;
    u32::from_str_radix(text.trim(), 16).map_err(|_| ProcError::Parse {
        path: path.clone(),
        source: ParseError::new("personality", 1, "not hex", &text),
    })
}

/// `/proc/PID/oom_score_adj`.
pub fn oom_score_adj(pid: Pid) -> Result<i32, ProcError> {
    let path = proc_path(pid, None, "oom_score_adj");
    let text = read_text(&path)?;
    parse_value(&path, &text, "oom_score_adj")
}

/// `/proc/PID/timerslack_ns` (also writable from outside, to restore it).
pub fn timerslack_ns(pid: Pid) -> Result<u64, ProcError> {
    let path = proc_path(pid, None, "timerslack_ns");
    let text = read_text(&path)?;
    parse_value(&path, &text, "timerslack_ns")
}

/// `/proc/PID/loginuid`.
pub fn loginuid(pid: Pid) -> Result<u32, ProcError> {
    let path = proc_path(pid, None, "loginuid");
    let text = read_text(&path)?;
    parse_value(&path, &text, "loginuid")
}

/// `/proc/PID/comm` without its newline.
pub fn comm(pid: Pid) -> Result<String, ProcError> {
    let path = proc_path(pid, None, "comm");
    Ok(read_text(&path)?.trim_end_matches('\n').to_string())
}

/// The raw `/proc/PID/cmdline` (NUL-separated arguments).
pub fn cmdline(pid: Pid) -> Result<Vec<u8>, ProcError> {
    let path = proc_path(pid, None, "cmdline");
    std::fs::read(&path).map_err(|source| ProcError::Read { path, source })
}

/// `/proc/PID/cwd`.
pub fn cwd(pid: Pid) -> Result<PathBuf, ProcError> {
    read_link(proc_path(pid, None, "cwd"))
}

/// `/proc/PID/root`.
pub fn root(pid: Pid) -> Result<PathBuf, ProcError> {
    read_link(proc_path(pid, None, "root"))
}

/// `/proc/PID/exe` (may end in ` (deleted)`).
pub fn exe(pid: Pid) -> Result<PathBuf, ProcError> {
    read_link(proc_path(pid, None, "exe"))
}

/// `/proc/PID/map_files/START-END`: a path that opens the very file mapped
/// there (also for deleted files, memfds and shared anonymous memory).
pub fn map_file_path(pid: Pid, start: crate::RemoteAddr, end: crate::RemoteAddr) -> PathBuf {
    proc_path(
        pid,
        None,
        &format!("map_files/{:x}-{:x}", start.get(), end.get()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_values() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        assert_eq!(personality(me).expect("personality") & 0xff, 0);
        let _ = oom_score_adj(me).expect("oom_score_adj");
        assert!(timerslack_ns(me).expect("timerslack") > 0);
        assert!(!comm(me).expect("comm").is_empty());
        assert!(!cmdline(me).expect("cmdline").is_empty());
        assert_eq!(
            cwd(me).expect("cwd"),
            std::env::current_dir().expect("our cwd")
        );
        assert_eq!(root(me).expect("root"), PathBuf::from("/"));
        assert_eq!(
            exe(me).expect("exe"),
            std::env::current_exe().expect("our exe")
        );
    }
}
