//! What [`collect`](super::collect) needs of the executable, cwd, root and file mappings of a
//! process, read by the worker after its fds, ahead of the tracer: the `readlink` and `stat`
//! of the three links, and how the file of each mapping was opened (the mode of its
//! `map_files` link, one `statx` per mapping). `collect` then only files them; whatever could
//! not be read ahead is read again there, which reports the error.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, Mode, OFlags};
use tracee::Pid;

/// The links of a process to a file, in the order their file objects are made.
pub(super) const LINKS: [&str; 3] = ["exe", "cwd", "root"];

/// One process's paths, read ahead.
#[derive(Debug, Default)]
pub(super) struct PathsAhead {
    /// What each of [`LINKS`] shows and the `stat` of its file.
    links: [Option<(String, std::fs::Metadata)>; 3],
    /// The mode of each `map_files` link, by the start of its mapping.
    modes: HashMap<u64, u32>,
}

impl PathsAhead {
    /// Reads what it can of `pid`'s links and mappings.
    pub(super) fn read(pid: Pid) -> PathsAhead {
        let link = |name: &str| {
            let path = format!("/proc/{pid}/{name}");
            let shown = std::fs::read_link(&path).ok()?;
            let meta = std::fs::metadata(&path).ok()?;
            Some((shown.to_string_lossy().into_owned(), meta))
        };
        PathsAhead {
            links: LINKS.map(link),
            modes: map_files_modes(pid).unwrap_or_default(),
        }
    }

    /// What link `LINKS[which]` showed and the `stat` of its file, if read.
    pub(super) fn take_link(&mut self, which: usize) -> Option<(String, std::fs::Metadata)> {
        self.links.get_mut(which).and_then(Option::take)
    }

    /// The mode of the `map_files` link of the mapping starting at `start`, if read.
    pub(super) fn mode(&self, start: u64) -> Option<u32> {
        self.modes.get(&start).copied()
    }
}

/// The mode of every `/proc/PID/map_files` link, by mapping start, from one listing of the
/// directory and a `statx` relative to it per mapping.
fn map_files_modes(pid: Pid) -> Option<HashMap<u64, u32>> {
    let dir: OwnedFd = rustix::fs::open(
        format!("/proc/{pid}/map_files"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut modes = HashMap::new();
    let mut entries = rustix::fs::Dir::read_from(&dir).ok()?;
    while let Some(Ok(entry)) = entries.read() {
        let name = entry.file_name();
        let Some(start) = name
            .to_str()
            .ok()
            .and_then(|n| n.split_once('-'))
            .and_then(|(start, _)| u64::from_str_radix(start, 16).ok())
        else {
            continue;
        };
        if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            modes.insert(start, st.st_mode);
        }
    }
    Some(modes)
}
