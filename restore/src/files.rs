//! What stands behind each fd of the images ([`FdSource`], from `files.img` by [`plan_kobj`])
//! and the file-side work around it: deleted-but-open files are recreated from their ghost
//! image under a temporary name next to where they were (as CRIU does); pipes and FIFOs get
//! their unread bytes and capacity ([`load_pipe_data`]); FIFOs are reopened by path without
//! waiting for a peer ([`open_fifo`]); and `--inherit-fd` puts one of ckpt-restore's own
//! fds in place of an object of the images ([`InheritFd`], [`inherited`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use images_format::dir::ImageDir;
use images_format::error::ImageError;
use images_format::kind::ImageKind;
use images_format::pb;

use crate::plan::{FdOpen, GhostPlan, Plan};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("ghost file {path}: {op}")]
    Ghost {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ghost file {path}: reading its image")]
    Image {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("fd {fd}: the FIFO's file entry {id} is not in files.img")]
    FifoPath { fd: i32, id: u32 },
    #[error("--inherit-fd {option}")]
    Inherit {
        option: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a failed read of the image at `path` is reported.
fn image_err(path: &Path) -> impl Fn(ImageError) -> FilesError + Copy + '_ {
    move |source| FilesError::Image {
        path: path.to_path_buf(),
        source,
    }
}

/// Recreated ghost files, removed on drop if the child did not take them.
#[derive(Debug, Default)]
pub struct Ghosts {
    paths: Vec<PathBuf>,
    /// File id to the path it was recreated at.
    pub placed: Vec<(u32, PathBuf)>,
}

impl Ghosts {
    /// Makes the fds and mappings of each ghost file use the copy actually created.
    pub fn point_plan_at_copies(&self, plan: &mut Plan) {
        for (id, path) in &self.placed {
            for fd in plan.child.fds.iter_mut().filter(|f| f.file_id == *id) {
                fd.ghost = Some(path.clone());
            }
            if plan.mm.exe_file_id == *id {
                plan.mm.exe = Some(path.clone());
            }
            let mapped = plan.memory.vmas.iter_mut().filter_map(|v| v.file.as_mut());
            for file in mapped.filter(|f| f.file_id == *id) {
                file.ghost = Some(path.clone());
            }
        }
    }
}

impl Drop for Ghosts {
    fn drop(&mut self) {
        for p in &self.paths {
            // The child unlinks them once open; whatever is left is ours to clean.
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes every ghost file's contents to its temporary path.
pub fn create_ghosts(dir: &ImageDir, ghosts: &[GhostPlan]) -> Result<Ghosts, FilesError> {
    let mut made = Ghosts::default();
    for g in ghosts {
        let path = create_ghost(dir, g)?;
        made.paths.push(path.clone());
        made.placed.push((g.file_id, path));
    }
    Ok(made)
}

/// Recreates one ghost file, at its original path if that is free, and returns where.
fn create_ghost(dir: &ImageDir, g: &GhostPlan) -> Result<PathBuf, FilesError> {
    let create = |p: &Path| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
    };
    let (mut out, path) = match create(&g.original) {
        Ok(f) => (f, g.original.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let f = create(&g.temp_path).map_err(|source| FilesError::Ghost {
                path: g.temp_path.clone(),
                op: "create",
                source,
            })?;
            (f, g.temp_path.clone())
        }
        Err(source) => {
            return Err(FilesError::Ghost {
                path: g.original.clone(),
                op: "create",
                source,
            })
        }
    };
    let path = &path;
    let ghost_err = |op| {
        move |source| FilesError::Ghost {
            path: path.clone(),
            op,
            source,
        }
    };
    let image_err = image_err(path);
    let name = image_file_name(&g.image);
    let mut reader = dir.open_named(&name).map_err(image_err)?;
    let _entry: Option<pb::GhostFileEntry> = reader.read_entry().map_err(image_err)?;
    if g.chunks {
        while let Some(chunk) = reader
            .read_entry::<pb::GhostChunkEntry>()
            .map_err(image_err)?
        {
            out.seek(SeekFrom::Start(chunk.off))
                .map_err(ghost_err("seek"))?;
            reader
                .copy_payload(chunk.len, &mut out)
                .map_err(image_err)?;
        }
    } else {
        let len = reader.remaining().unwrap_or(0);
        reader.copy_payload(len, &mut out).map_err(image_err)?;
    }
    if let Some(size) = g.size {
        out.set_len(size).map_err(ghost_err("set size"))?;
    }
    out.flush().map_err(ghost_err("write"))?;
    set_owner_mode(&out, g).map_err(ghost_err("set owner and mode"))?;
    Ok(path.clone())
}

fn image_file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ImageKind::GhostFile.file_name(0))
}

fn set_owner_mode(f: &File, g: &GhostPlan) -> std::io::Result<()> {
    std::os::unix::fs::fchown(f, Some(g.uid), Some(g.gid))?;
    f.set_permissions(std::fs::Permissions::from_mode(g.mode & 0o7777))
}

/// What stands behind an fd the child sets up: a path to open, or a kernel object to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FdSource {
    #[default]
    Path,
    /// One end of a pipe; both ends share `pipe_id`. `data` is what was unread in it.
    Pipe {
        pipe_id: u32,
        write: bool,
        /// Capacity (`F_GETPIPE_SZ`), when dumped.
        size: Option<u32>,
        data: Vec<u8>,
    },
    Eventfd {
        counter: u64,
        semaphore: bool,
    },
    Signalfd {
        sigmask: u64,
    },
    /// Its targets `(fd, events, data)` are added once every fd of the process is in place.
    Epoll {
        targets: Vec<(i32, u32, u64)>,
    },
    /// Watches `(wd, path, mask)` in increasing wd order, added again with the same wds.
    Inotify {
        watches: Vec<(i32, PathBuf, u32)>,
    },
    /// Armed relative to now with the time that was left at dump time.
    Timerfd {
        clockid: u32,
        ticks: u64,
        value: (u64, u64),
        interval: (u64, u64),
    },
    /// A named pipe, reopened by path ([`open_fifo`]); the path and open flags are those of
    /// the regular file entry `regf_id` ([`load_pipe_data`] fills them into the fd).
    Fifo {
        pipe_id: u32,
        regf_id: u32,
        /// Capacity (`F_GETPIPE_SZ`), when dumped.
        size: Option<u32>,
        data: Vec<u8>,
    },
    /// A UDP socket, or a TCP socket closed or listening.
    Inet(crate::sockets::inet::InetSocket),
    /// A unix socket; every one of the tree is made at once by
    /// [`crate::sockets::unix::create_all`] (after [`crate::sockets::unix::UnixImages`]
    /// filled in its queue).
    UnixSocket(Box<crate::sockets::unix::UnixSocket>),
}

/// `EFD_SEMAPHORE` as the dump keeps it in bit 0 of `eventfd_file_entry.flags` (an
/// eventfd's access-mode bits are always `O_RDWR` and say nothing).
const EFD_SEMAPHORE_BIT: u32 = 1;
const O_ACCMODE: u32 = 3;
const O_WRONLY: u32 = 1;

/// The fd of a kernel object described by `file`, or `None` if it is not one restore knows.
pub fn plan_kobj(file: Option<&pb::FileEntry>, fdi: &pb::FdinfoEntry) -> Option<FdOpen> {
    let file = file?;
    let (flags, source) = if let Some(pipe) = &file.pipe {
        let write = pipe.flags & O_ACCMODE == O_WRONLY;
        let source = FdSource::Pipe {
            pipe_id: pipe.pipe_id,
            write,
            size: None,
            data: Vec::new(),
        };
        (pipe.flags, source)
    } else if let Some(efd) = &file.efd {
        let source = FdSource::Eventfd {
            counter: efd.counter,
            semaphore: efd.flags & EFD_SEMAPHORE_BIT != 0,
        };
        (efd.flags & !EFD_SEMAPHORE_BIT, source)
    } else if let Some(sgfd) = &file.sgfd {
        let source = FdSource::Signalfd {
            sigmask: sgfd.sigmask,
        };
        (sgfd.flags, source)
    } else if let Some(epfd) = &file.epfd {
        let targets = epfd
            .tfd
            .iter()
            .map(|t| Some((i32::try_from(t.tfd).ok()?, t.events, t.data)))
            .collect::<Option<Vec<_>>>()?;
        (epfd.flags, FdSource::Epoll { targets })
    } else if let Some(ify) = &file.ify {
        let mut watches = ify
            .wd
            .iter()
            .map(|w| {
                let path = w.f_handle.path.as_ref()?;
                Some((i32::try_from(w.wd).ok()?, PathBuf::from(path), w.mask))
            })
            .collect::<Option<Vec<_>>>()?;
        watches.sort_by_key(|w| w.0);
        (ify.flags, FdSource::Inotify { watches })
    } else if let Some(tfd) = &file.tfd {
        let source = FdSource::Timerfd {
            clockid: tfd.clockid,
            ticks: tfd.ticks,
            value: (tfd.vsec, tfd.vnsec),
            interval: (tfd.isec, tfd.insec),
        };
        (tfd.flags, source)
    } else if let Some(fifo) = &file.fifo {
        let source = FdSource::Fifo {
            pipe_id: fifo.pipe_id,
            regf_id: fifo.regf_id?,
            size: None,
            data: Vec::new(),
        };
        (0, source)
    } else if let Some(isk) = &file.isk {
        let socket = crate::sockets::inet::InetSocket::from_entry(isk)?;
        (isk.flags, FdSource::Inet(socket))
    } else if let Some(usk) = &file.usk {
        let socket = crate::sockets::unix::UnixSocket::from_entry(usk);
        (usk.flags, FdSource::UnixSocket(Box::new(socket)))
    } else if let Some(memfd) = &file.memfd {
        // A reopen of the memfd ckpt-restore made, once
        // `shmem::SharedMaps::point_plan_at_memfds` names it.
        return Some(FdOpen {
            fd: i32::try_from(fdi.fd).ok()?,
            file_id: fdi.id,
            path: PathBuf::new(),
            flags: memfd.flags,
            pos: memfd.pos,
            cloexec: fdi.flags & FD_CLOEXEC != 0,
            ghost: None,
            source: FdSource::Path,
        });
    } else {
        return None;
    };
    Some(FdOpen {
        fd: i32::try_from(fdi.fd).ok()?,
        file_id: fdi.id,
        path: PathBuf::new(),
        flags,
        pos: 0,
        cloexec: fdi.flags & FD_CLOEXEC != 0,
        ghost: None,
        source,
    })
}

const FD_CLOEXEC: u32 = 1;

/// Reads `pipes-data.img` and `fifo-data.img` once into every pipe and FIFO end of the tree
/// (every end of a pipe carries its data): the fds of `plans` and the ends in flight,
/// `carried`. Each FIFO end of the plans first gets the path and open flags of its regular
/// file entry among `files`.
pub(crate) fn load_pipe_data<'a>(
    dir: &ImageDir,
    files: &HashMap<u32, pb::FileEntry>,
    plans: impl Iterator<Item = &'a mut Plan>,
    carried: impl Iterator<Item = &'a mut FdSource>,
) -> Result<(), FilesError> {
    let mut sources: Vec<&mut FdSource> = Vec::new();
    for plan in plans {
        for fd in plan.child.fds.iter_mut() {
            name_fifo(files, fd)?;
            sources.push(&mut fd.source);
        }
    }
    sources.extend(carried);
    fill_pipe_data(dir, &mut sources)
}

/// Gives every pipe and FIFO end among `sources` its unread bytes and capacity from
/// `pipes-data.img` and `fifo-data.img` (every end of a pipe carries them).
fn fill_pipe_data(dir: &ImageDir, sources: &mut [&mut FdSource]) -> Result<(), FilesError> {
    fill_pipes(dir, ImageKind::PipesData, sources)?;
    fill_pipes(dir, ImageKind::FifoData, sources)
}

/// The data slot of a pipe end (`PipesData`) or FIFO end (`FifoData`).
fn data_slot(
    source: &mut FdSource,
    kind: ImageKind,
) -> Option<(u32, &mut Option<u32>, &mut Vec<u8>)> {
    match (source, kind) {
        (
            FdSource::Pipe {
                pipe_id,
                size,
                data,
                ..
            },
            ImageKind::PipesData,
        )
        | (
            FdSource::Fifo {
                pipe_id,
                size,
                data,
                ..
            },
            ImageKind::FifoData,
        ) => Some((*pipe_id, size, data)),
        _ => None,
    }
}

fn fill_pipes(
    dir: &ImageDir,
    kind: ImageKind,
    sources: &mut [&mut FdSource],
) -> Result<(), FilesError> {
    if !sources.iter_mut().any(|s| data_slot(s, kind).is_some()) {
        return Ok(());
    }
    let name = kind.file_name(0);
    let path = dir.path().join(&name);
    let image_err = image_err(&path);
    let mut reader = match dir.open_named(&name) {
        Ok(r) => r,
        // A dump of empty pipes may have written none.
        Err(_) if !path.exists() => return Ok(()),
        Err(source) => return Err(image_err(source)),
    };
    while let Some(entry) = reader
        .read_entry::<pb::PipeDataEntry>()
        .map_err(image_err)?
    {
        let bytes = reader
            .read_payload(u64::from(entry.bytes))
            .map_err(image_err)?;
        for source in sources.iter_mut() {
            if let Some((pipe_id, size, data)) = data_slot(source, kind) {
                if pipe_id == entry.pipe_id {
                    *size = entry.size;
                    data.clone_from(&bytes);
                }
            }
        }
    }
    Ok(())
}

/// Gives a FIFO end the path and flags of its regular file entry among `files` (other fds
/// are left as they are).
pub(crate) fn name_fifo(
    files: &HashMap<u32, pb::FileEntry>,
    fd: &mut FdOpen,
) -> Result<(), FilesError> {
    let FdSource::Fifo { regf_id, .. } = fd.source else {
        return Ok(());
    };
    let reg = files
        .get(&regf_id)
        .and_then(|f| f.reg.as_ref())
        .ok_or(FilesError::FifoPath {
            fd: fd.fd,
            id: regf_id,
        })?;
    fd.path = PathBuf::from(&reg.name);
    fd.flags = reg.flags;
    Ok(())
}

/// Opens one end of a FIFO by its path, with its dumped flags, and fills the FIFO with its
/// unread data the first time (CRIU's way). Opening a FIFO for reading blocks until a writer
/// comes and vice versa, so a read-write holder is opened first, without blocking: every
/// open after it finds its peer. The capacity is set and the data written through the
/// holder; a FIFO found already holding bytes was filled by an earlier end of it.
pub fn open_fifo(f: &FdOpen) -> Result<OwnedFd, String> {
    use rustix::fs::{Mode, OFlags};
    let FdSource::Fifo { size, data, .. } = &f.source else {
        return Err("not a FIFO".into());
    };
    let path = f.open_path();
    let holder = rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {} read-write: {e}", path.display()))?;
    let meta = rustix::fs::fstat(&holder).map_err(|e| format!("stat {}: {e}", path.display()))?;
    if rustix::fs::FileType::from_raw_mode(meta.st_mode) != rustix::fs::FileType::Fifo {
        return Err(format!("{} is no longer a FIFO", path.display()));
    }
    if let Some(size) = size {
        set_pipe_size(&holder, *size)?;
    }
    let queued = rustix::io::ioctl_fionread(&holder).map_err(|e| format!("FIONREAD: {e}"))?;
    if queued == 0 {
        write_all(&holder, data)?;
    }
    let flags =
        OFlags::from_bits_retain(f.flags) & !(OFlags::CREATE | OFlags::EXCL | OFlags::TRUNC);
    let end = rustix::fs::open(path, flags | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    Ok(end)
}

/// Sets a pipe's capacity to `size`, up or down (`F_SETPIPE_SZ` rounds to pages).
pub fn set_pipe_size(pipe: &OwnedFd, size: u32) -> Result<(), String> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if rustix::pipe::fcntl_getpipe_size(pipe).ok() != Some(size) {
        rustix::pipe::fcntl_setpipe_size(pipe, size)
            .map_err(|e| format!("F_SETPIPE_SZ {size}: {e}"))?;
    }
    Ok(())
}

/// Writes all of `data` into a non-blocking pipe that has room for it.
pub(crate) fn write_all(pipe: &OwnedFd, data: &[u8]) -> Result<(), String> {
    let mut left = data;
    while !left.is_empty() {
        let n = rustix::io::write(pipe, left).map_err(|e| format!("refill: {e}"))?;
        left = left.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// `--inherit-fd fd[N]:ID`: ckpt-restore's own fd `N` stands for the object `ID` of the
/// images (CRIU's syntax and meaning): `pipe:[INODE]` for a pipe (one whose other end was
/// outside the dumped tree, typically), or the path of a file (with or without its leading
/// `/`). Every fd of every process that had that object gets ours instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritFd {
    pub fd: RawFd,
    pub id: String,
}

impl std::str::FromStr for InheritFd {
    type Err = String;

    fn from_str(s: &str) -> Result<InheritFd, String> {
        let bad = || format!("{s:?} is not fd[N]:ID");
        let rest = s.strip_prefix("fd[").ok_or_else(bad)?;
        let (number, id) = rest.split_once("]:").ok_or_else(bad)?;
        let fd = number.parse().map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(InheritFd {
            fd,
            id: id.to_owned(),
        })
    }
}

impl InheritFd {
    /// Whether the fd `f` of the plan is the object this option names.
    pub fn matches(&self, f: &FdOpen) -> bool {
        match &f.source {
            FdSource::Pipe { pipe_id, .. } => {
                pipe_inode(&self.id).is_some_and(|inode| inode as u32 == *pipe_id)
            }
            FdSource::Path | FdSource::Fifo { .. } => {
                let trim = |p: &str| p.trim_start_matches('/').to_owned();
                trim(&self.id) == trim(&f.path.to_string_lossy())
            }
            _ => false,
        }
    }
}

fn pipe_inode(id: &str) -> Option<u64> {
    id.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// For each file id of `fds` that an `--inherit-fd` names, the open file description to use
/// for it, for the table of objects. Our fd is reopened through `/proc/self/fd` with the
/// access mode and status flags of the dumped one (as CRIU reopens inherited pipes): the
/// restored program gets its own description of our pipe or file, which stays ours too. An
/// option whose fd is not open, or that names nothing in the images, is an error.
pub fn inherited<'a>(
    fds: impl IntoIterator<Item = &'a FdOpen>,
    options: &[InheritFd],
) -> Result<Vec<(u32, OwnedFd)>, FilesError> {
    use rustix::fs::{Mode, OFlags};
    let fds: Vec<&FdOpen> = fds.into_iter().collect();
    let mut out: Vec<(u32, OwnedFd)> = Vec::new();
    for option in options {
        let spelled = || format!("fd[{}]:{}", option.fd, option.id);
        let ours = PathBuf::from(format!("/proc/self/fd/{}", option.fd));
        let mut used = false;
        for f in fds.iter().filter(|f| option.matches(f)) {
            used = true;
            if out.iter().any(|(id, _)| *id == f.file_id) {
                continue;
            }
            let flags = OFlags::from_bits_retain(f.flags)
                & (OFlags::RWMODE | OFlags::APPEND | OFlags::NONBLOCK);
            let failed = |source: rustix::io::Errno| FilesError::Inherit {
                option: spelled(),
                source: source.into(),
            };
            // Reopening a pipe or FIFO for reading would wait for a writer: never block,
            // then give the description its dumped status flags.
            let reopened = rustix::fs::open(
                &ours,
                flags | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(failed)?;
            rustix::fs::fcntl_setfl(&reopened, flags & !OFlags::RWMODE).map_err(failed)?;
            tracing::info!(fd = option.fd, id = %option.id, file_id = f.file_id, "inherited fd");
            out.push((f.file_id, reopened));
        }
        if !used {
            return Err(FilesError::Inherit {
                option: spelled(),
                source: std::io::Error::other("no fd of the images refers to this object"),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo_end(path: &Path, flags: u32, data: &[u8]) -> FdOpen {
        FdOpen {
            fd: 3,
            file_id: 1,
            path: path.to_path_buf(),
            flags,
            pos: 0,
            cloexec: false,
            ghost: None,
            source: FdSource::Fifo {
                pipe_id: 9,
                regf_id: 2,
                size: Some(64 * 1024),
                data: data.to_vec(),
            },
        }
    }

    #[test]
    fn fifo_ends_open_without_a_peer_and_hold_their_data_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        const O_WRONLY: u32 = 1;
        const O_NONBLOCK: u32 = 0o4000;
        // A read end alone: a plain open would wait for a writer.
        let read = open_fifo(&fifo_end(&path, O_NONBLOCK, b"queued")).expect("read end");
        let write = open_fifo(&fifo_end(&path, O_WRONLY, b"queued")).expect("write end");
        rustix::io::write(&write, b"+").expect("write");
        let mut buf = [0u8; 32];
        let n = rustix::io::read(&read, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"queued+", "the data is put in once");
        assert_eq!(
            rustix::pipe::fcntl_getpipe_size(&read).ok(),
            Some(64 * 1024)
        );
    }

    #[test]
    fn inherit_fd_options_name_a_pipe_or_a_path() {
        let opt: InheritFd = "fd[7]:pipe:[4242]".parse().expect("pipe");
        assert_eq!((opt.fd, opt.id.as_str()), (7, "pipe:[4242]"));
        let pipe = |pipe_id| FdOpen {
            source: FdSource::Pipe {
                pipe_id,
                write: true,
                size: None,
                data: Vec::new(),
            },
            ..fifo_end(Path::new(""), 1, b"")
        };
        assert!(opt.matches(&pipe(4242)) && !opt.matches(&pipe(4243)));
        let file: InheritFd = "fd[3]:tmp/log".parse().expect("path");
        let reg = FdOpen {
            source: FdSource::Path,
            ..fifo_end(Path::new("/tmp/log"), 1, b"")
        };
        assert!(file.matches(&reg));
        for bad in ["fd[x]:pipe:[1]", "fd[3]", "3:pipe:[1]", "fd[3]:"] {
            assert!(bad.parse::<InheritFd>().is_err(), "{bad}");
        }
    }
}
