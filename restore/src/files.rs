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

use crate::plan::{GhostPlan, Plan};

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
