//! Files the child opens: deleted-but-open files are recreated from their ghost
//! image under a temporary name next to where they were (as CRIU does); the child
//! opens them at their fd numbers and unlinks them.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
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
    let image_err = |source| FilesError::Image {
        path: path.clone(),
        source,
    };
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

/// Reads `pipes-data.img` into the pipe ends of the plan (both ends of a pipe carry its
/// data; the child fills the pipe once).
pub fn load_pipe_data(dir: &ImageDir, plan: &mut Plan) -> Result<(), FilesError> {
    let has_pipes = plan
        .child
        .fds
        .iter()
        .any(|f| matches!(f.source, FdSource::Pipe { .. }));
    if !has_pipes {
        return Ok(());
    }
    let name = ImageKind::PipesData.file_name(0);
    let path = dir.path().join(&name);
    let image_err = |source| FilesError::Image {
        path: path.clone(),
        source,
    };
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
        for fd in plan.child.fds.iter_mut() {
            if let FdSource::Pipe {
                pipe_id,
                size,
                data,
                ..
            } = &mut fd.source
            {
                if *pipe_id == entry.pipe_id {
                    *size = entry.size;
                    data.clone_from(&bytes);
                }
            }
        }
    }
    Ok(())
}
