//! What the forked child does before it stops for our tracer.
//!
//! The child is a fork of single-threaded `ckpt-restore`, so it may run ordinary code.
//! It puts its fd table, cwd, root, umask, session and process group in the dumped
//! shape, then stops itself. Credentials stay ours: injected syscalls that open images,
//! `set_tid` and `PR_SET_MM_MAP` with an exe fd all need them.
//!
//! A failure is written as text to the status pipe and the child exits with
//! [`CHILD_FAILED`]; the parent reads the pipe once it sees the exit.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::FdFlags;

use crate::plan::{ChildPlan, FdOpen, SessionPlan};

/// Exit status of a child whose preparation failed (its reason is on the status pipe).
pub const CHILD_FAILED: i32 = 121;

/// Runs in the forked child: prepares everything, then returns so the caller stops.
///
/// On error, returns the status pipe (moved to a high fd) and the reason, for the
/// caller to report before it exits.
pub fn prepare(plan: &ChildPlan, status: &OwnedFd) -> Result<(), (Option<OwnedFd>, String)> {
    // The status pipe must not sit on a number the image wants.
    let above = plan.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
    let status = match rustix::io::fcntl_dupfd_cloexec(status, above) {
        Ok(moved) => moved,
        Err(e) => {
            return Err((
                status.try_clone().ok(),
                format!("move status pipe above fd {above}: {e}"),
            ))
        }
    };
    if let Err(msg) = close_foreign_fds(status.as_raw_fd()) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = open_fds(&plan.fds) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = set_fs(plan) {
        return Err((Some(status), msg));
    }
    if let Err(msg) = set_session(&plan.session) {
        return Err((Some(status), msg));
    }
    Ok(())
}

/// Writes the failure reason to the parent.
pub fn report_failure(status: &OwnedFd, msg: &str) {
    let mut file = std::fs::File::from(match status.try_clone() {
        Ok(fd) => fd,
        Err(_) => return,
    });
    // Nothing more can be done if the parent is gone; the exit status still says it.
    let _ = file.write_all(msg.as_bytes());
}

/// Closes every fd we inherited from `ckpt-restore` (stdio, log file) but the status pipe.
pub(crate) fn close_foreign_fds(keep: RawFd) -> Result<(), String> {
    close_fds_except(&[keep])
}

/// Closes every fd of ours but those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> Result<(), String> {
    let mut open = BTreeSet::new();
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("list /proc/self/fd: {e}"))?;
    for entry in dir {
        let entry = entry.map_err(|e| format!("list /proc/self/fd: {e}"))?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        {
            open.insert(fd);
        }
    }
    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
        // EBADF is the directory fd of the listing, already closed.
        match nix::unistd::close(fd) {
            Ok(()) | Err(nix::errno::Errno::EBADF) => {}
            Err(e) => return Err(format!("close inherited fd {fd}: {e}")),
        }
    }
    Ok(())
}

/// Opens each dumped file and places it at its fd number. Fds that shared one open
/// file description (same file id: dup'ed, or inherited) share one again, offset
/// included.
fn open_fds(fds: &[FdOpen]) -> Result<(), String> {
    let mut placed: HashMap<u32, OwnedFd> = HashMap::new();
    let mut extra: Vec<OwnedFd> = Vec::new();
    for f in fds {
        let path = f.open_path();
        let fd = match placed.get(&f.file_id) {
            Some(first) => {
                let dup = rustix::io::fcntl_dupfd_cloexec(first, f.fd)
                    .map_err(|e| format!("fd {}: dup of {}: {e}", f.fd, path.display()))?;
                place_at(dup, f.fd, f.cloexec)
                    .map_err(|e| format!("fd {}: place {}: {e}", f.fd, path.display()))?
            }
            None => {
                let flags = OFlags::from_bits_retain(f.flags)
                    & !(OFlags::CREATE | OFlags::EXCL | OFlags::TRUNC);
                let opened = rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| format!("fd {}: open {}: {e}", f.fd, path.display()))?;
                if f.pos != 0 {
                    rustix::fs::seek(&opened, rustix::fs::SeekFrom::Start(f.pos)).map_err(|e| {
                        format!("fd {}: seek {} to {}: {e}", f.fd, path.display(), f.pos)
                    })?;
                }
                place_at(opened, f.fd, f.cloexec)
                    .map_err(|e| format!("fd {}: place {}: {e}", f.fd, path.display()))?
            }
        };
        match placed.entry(f.file_id) {
            std::collections::hash_map::Entry::Occupied(_) => extra.push(fd),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(fd);
            }
        }
    }
    // The fds now belong to the image's program, not to us: never close them.
    for fd in placed.into_values().chain(extra) {
        std::mem::forget(fd);
    }
    Ok(())
}

/// Moves `fd` to number `target`, which is free: everything else not yet placed is closed.
fn place_at(fd: OwnedFd, target: RawFd, cloexec: bool) -> rustix::io::Result<OwnedFd> {
    let placed = if fd.as_raw_fd() == target {
        fd
    } else {
        let moved = rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), target)?;
        drop(fd);
        if moved.as_raw_fd() != target {
            // Someone holds `target`: only a bug in the fd plan can cause this.
            return Err(rustix::io::Errno::BADF);
        }
        moved
    };
    let flags = if cloexec {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    rustix::io::fcntl_setfd(&placed, flags)?;
    Ok(placed)
}

fn set_fs(plan: &ChildPlan) -> Result<(), String> {
    if let Some(root) = &plan.root {
        if root.as_os_str() != "/" {
            rustix::process::chroot(root).map_err(|e| format!("chroot {}: {e}", root.display()))?;
        }
    }
    if let Some(cwd) = &plan.cwd {
        rustix::process::chdir(cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
    }
    rustix::process::umask(Mode::from_bits_truncate(plan.umask));
    Ok(())
}

fn set_session(session: &SessionPlan) -> Result<(), String> {
    match session {
        SessionPlan::Inherit => Ok(()),
        SessionPlan::NewSession => rustix::process::setsid()
            .map(drop)
            .map_err(|e| format!("setsid: {e}")),
        SessionPlan::NewGroup => {
            rustix::process::setpgid(None, None).map_err(|e| format!("setpgid: {e}"))
        }
    }
}
