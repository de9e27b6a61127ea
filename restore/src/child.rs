//! What a forked process does with its own code before it waits for our tracer (the
//! order is [`crate::fork`]'s).
//!
//! Each is a fork of single-threaded `ckpt-restore` (or of a restored parent, itself
//! such a fork), so it may run ordinary code. It sets its session or group, and, once
//! its children are forked, dups its fds from the table of open file descriptions into
//! place, adds the epoll targets, closes everything else, and sets cwd, root and umask.
//! Credentials stay ours: injected syscalls that open images, `set_tid` and
//! `PR_SET_MM_MAP` with an exe fd all need them.
//!
//! A failure is reported as text through the status pipe and the process exits with
//! [`CHILD_FAILED`].

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::Mode;
use rustix::io::FdFlags;

use crate::files::FdSource;
use crate::objects::{kobj_name, Objects};
use crate::plan::{ChildPlan, FdOpen, SessionPlan};

/// Exit status of a child whose preparation failed (its reason is on the status pipe).
pub const CHILD_FAILED: i32 = 121;

/// Closes every fd we inherited from `ckpt-restore` (stdio, log file) but the status pipe.
pub(crate) fn close_foreign_fds(keep: RawFd) -> Result<(), String> {
    close_fds_except(&[keep])
}

/// Closes every fd of ours but those in `keep`: one `close_range` per gap between kept
/// numbers (the table of open files alone may hold thousands), or one by one from
/// /proc/self/fd where the kernel has no `close_range`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> Result<(), String> {
    let mut kept: Vec<u32> = keep.iter().filter_map(|&k| u32::try_from(k).ok()).collect();
    kept.sort_unstable();
    kept.dedup();
    // Fd numbers are below 2^31: `k + 1` cannot overflow.
    let mut gaps: Vec<(u32, u32)> = Vec::with_capacity(kept.len() + 1);
    let mut from = 0u32;
    for &k in &kept {
        if k > from {
            gaps.push((from, k - 1));
        }
        from = k + 1;
    }
    gaps.push((from, u32::MAX));
    let mut ranged = true;
    for (first, last) in gaps {
        match tracee::spawn::close_range(first, last) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOSYS) => {
                ranged = false;
                break;
            }
            Err(e) => return Err(format!("close fds {first}..={last}: {e}")),
        }
    }
    if ranged {
        return Ok(());
    }
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

/// Dups each fd of the table from `objects` to its number and adds the epoll targets.
/// Fds sharing a file id share the description, offset included, with every other
/// process holding that id. Every number planned is below the table's floor: placing
/// one never hits an entry. Returns the placed fds, which the caller must never close
/// (they are the restored program's): see [`release_placed`].
pub fn place_fds(fds: &[FdOpen], objects: &Objects) -> Result<Vec<OwnedFd>, String> {
    let mut placed = Vec::with_capacity(fds.len());
    for f in fds {
        let name = || match f.source {
            FdSource::Path => f.open_path().display().to_string(),
            ref other => kobj_name(other).to_string(),
        };
        let object = objects
            .get(f.file_id)
            .ok_or_else(|| format!("fd {}: file id {} was not created", f.fd, f.file_id))?;
        let fd = place_at(object, f.fd, f.cloexec)
            .map_err(|e| format!("fd {}: place {}: {e}", f.fd, name()))?;
        placed.push(fd);
    }
    match add_epoll_targets(fds, placed.iter()) {
        Ok(()) => Ok(placed),
        Err(e) => {
            release_placed(placed);
            Err(e)
        }
    }
}

/// The fds now belong to the image's program, not to us: forgotten, never closed.
pub fn release_placed(placed: Vec<OwnedFd>) {
    for fd in placed {
        std::mem::forget(fd);
    }
}

/// Dups `fd` to number `target`, closing whatever we inherited there (stdio).
fn place_at(fd: &OwnedFd, target: RawFd, cloexec: bool) -> rustix::io::Result<OwnedFd> {
    match nix::unistd::close(target) {
        Ok(()) | Err(nix::errno::Errno::EBADF) => {}
        Err(e) => return Err(rustix::io::Errno::from_raw_os_error(e as i32)),
    }
    let placed = rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), target)?;
    if placed.as_raw_fd() != target {
        // Someone holds `target`: only a bug in the fd plan can cause this.
        return Err(rustix::io::Errno::BADF);
    }
    let flags = if cloexec {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    rustix::io::fcntl_setfd(&placed, flags)?;
    Ok(placed)
}

pub fn set_fs(plan: &ChildPlan) -> Result<(), String> {
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

pub fn set_session(session: &SessionPlan) -> Result<(), String> {
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

/// Adds every epoll target through the fd number it was added with, now that all of them
/// are in place.
fn add_epoll_targets<'a>(
    fds: &[FdOpen],
    open: impl Iterator<Item = &'a OwnedFd>,
) -> Result<(), String> {
    let by_number: HashMap<RawFd, &OwnedFd> = open.map(|fd| (fd.as_raw_fd(), fd)).collect();
    let mut done = BTreeSet::new();
    for f in fds {
        let FdSource::Epoll { targets } = &f.source else {
            continue;
        };
        // Dups of one epoll share its set: fill it once.
        if !done.insert(f.file_id) {
            continue;
        }
        let epoll = by_number
            .get(&f.fd)
            .ok_or_else(|| format!("epoll fd {} is not open", f.fd))?;
        for &(target, events, data) in targets {
            let watched = by_number
                .get(&target)
                .ok_or_else(|| format!("epoll fd {}: target fd {target} is not open", f.fd))?;
            rustix::event::epoll::add(
                epoll,
                watched,
                rustix::event::epoll::EventData::new_u64(data),
                rustix::event::epoll::EventFlags::from_bits_retain(events),
            )
            .map_err(|e| format!("epoll fd {}: add target fd {target}: {e}", f.fd))?;
        }
    }
    Ok(())
}
