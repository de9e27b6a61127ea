//! Running as a background server for shell scripts, as `criu page-server -d` does: the
//! command returns once the server listens, with the server's pid in `--pidfile`.
//!
//! The listening socket is bound before anything else, by the process the user started.
//! With `--daemon` that process starts a copy of itself with the socket as its standard
//! input (no other fd needs passing, and no fork of a running Rust program), writes the
//! copy's pid and exits; the copy starts a new session and serves.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Hidden flag the background copy is started with.
pub const LISTENER_ON_STDIN: &str = "--listener-on-stdin";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("start the background server {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("find our own executable")]
    CurrentExe(#[source] io::Error),
    #[error("standard input is not the listening socket")]
    Stdin(#[source] io::Error),
    #[error("start a new session")]
    Setsid(#[source] io::Error),
    #[error("{path}: write pid file")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("status fd {fd}: report readiness")]
    StatusFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
}

/// Starts this program again with `args` and `listener` as its standard input, and
/// returns the new process's pid. Its output goes nowhere: it logs with `-o`.
pub fn spawn_background(listener: TcpListener, args: &[OsString]) -> Result<u32, DaemonError> {
    let exe = std::env::current_exe().map_err(DaemonError::CurrentExe)?;
    let child = Command::new(&exe)
        .args(args)
        .arg(LISTENER_ON_STDIN)
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| DaemonError::Spawn { exe, source })?;
    Ok(child.id())
}

/// In the background copy: leaves the caller's session (and its terminal's signals) and
/// takes the listening socket from standard input.
pub fn adopt_listener() -> Result<TcpListener, DaemonError> {
    rustix::process::setsid().map_err(|e| DaemonError::Setsid(e.into()))?;
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(DaemonError::Stdin)?;
    let listener = TcpListener::from(fd);
    // A socket that is not listening fails here rather than at accept.
    listener.local_addr().map_err(DaemonError::Stdin)?;
    Ok(listener)
}

/// Writes `pid` and a newline to `path`.
pub fn write_pidfile(path: &Path, pid: u32) -> Result<(), DaemonError> {
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)?;
        writeln!(file, "{pid}")?;
        file.sync_all()
    };
    write().map_err(|source| DaemonError::Pidfile {
        path: path.to_owned(),
        source,
    })
}

/// `--status-fd`: one zero byte once the server listens. The fd is one we inherited, so
/// it is reached through /proc rather than adopted as ours; the byte is all a waiting
/// reader needs (runc reads exactly one).
pub fn notify_status_fd(fd: i32) -> Result<(), DaemonError> {
    let path = format!("/proc/self/fd/{fd}");
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file: File| file.write_all(&[0]))
        .map_err(|source| DaemonError::StatusFd { fd, source })
}
