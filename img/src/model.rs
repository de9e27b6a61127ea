//! An image directory read into plain data for `show` and `check`: the process tree with each
//! process's core, ids, memory, pagemap and open files, plus the directory's file objects.
//!
//! Reading does not stop at the first damaged image: what cannot be read is left empty and
//! recorded as a [`Problem`], so that `check` reports everything and `show` shows what it can.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use images_format::pb::{
    CoreEntry, FdinfoEntry, FileEntry, FsEntry, InventoryEntry, MmEntry, PstreeEntry,
    TaskKobjIdsEntry,
};
use images_format::{ImageDir, ImageError, ImageKind, Pagemap, PagesError};

/// Something wrong with an image or between images.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Problem {
    /// The image file (or directory entry) the problem is in.
    pub image: String,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.image, self.what)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("opening the image directory")]
    Dir(#[source] ImageError),
}

/// One process of the tree.
#[derive(Debug, Default)]
pub struct Process {
    pub entry: PstreeEntry,
    /// The leader's core image.
    pub core: Option<CoreEntry>,
    pub ids: Option<TaskKobjIdsEntry>,
    pub mm: Option<MmEntry>,
    pub pagemap: Option<Pagemap>,
    pub fs: Option<FsEntry>,
    pub fds: Vec<FdinfoEntry>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.entry.pid
    }

    pub fn comm(&self) -> &str {
        self.core
            .as_ref()
            .and_then(|c| c.tc.as_ref())
            .map_or("?", |tc| tc.comm.as_str())
    }

    /// The task state of the core image (1 alive, 2 dead, 3 stopped, 6 zombie).
    pub fn task_state(&self) -> Option<u32> {
        self.core
            .as_ref()
            .and_then(|c| c.tc.as_ref())
            .map(|tc| tc.task_state)
    }

    /// Zombies and dead tasks have no memory, files or ids images.
    pub fn has_resources(&self) -> bool {
        !matches!(self.task_state(), Some(2 | 6))
    }
}

/// Everything `show` and `check` look at.
#[derive(Debug, Default)]
pub struct ImageSet {
    pub inventory: Option<InventoryEntry>,
    pub processes: Vec<Process>,
    /// `files.img` by file id.
    pub files: BTreeMap<u32, FileEntry>,
    /// The directories of the `parent` chain, this one first.
    pub chain: Vec<ImageDir>,
    pub problems: Vec<Problem>,
}

impl ImageSet {
    pub fn process(&self, pid: u32) -> Option<&Process> {
        self.processes.iter().find(|p| p.pid() == pid)
    }
}

/// Reads what `show` and `check` need from `path`.
pub fn load(path: &Path) -> Result<(ImageDir, ImageSet), LoadError> {
    let dir = ImageDir::new(path).map_err(LoadError::Dir)?;
    let mut set = ImageSet::default();
    let mut problems = Problems::default();

    set.inventory = problems.one(&dir, ImageKind::Inventory, 0, true);
    let tree: Vec<PstreeEntry> = problems.all(&dir, ImageKind::Pstree, 0, true);
    let file_entries: Vec<FileEntry> = problems.all(&dir, ImageKind::Files, 0, false);
    for file in file_entries {
        if set.files.insert(file.id, file).is_some() {
            problems.push(
                ImageKind::Files.file_name(0),
                "two file entries share one id".into(),
            );
        }
    }

    for entry in tree {
        let pid = u64::from(entry.pid);
        let mut process = Process {
            entry,
            ..Process::default()
        };
        process.core = problems.one(&dir, ImageKind::Core, pid, true);
        if process.has_resources() {
            process.ids = problems.one(&dir, ImageKind::Ids, pid, true);
            process.mm = problems.one(&dir, ImageKind::Mm, pid, true);
            process.fs = problems.one(&dir, ImageKind::Fs, pid, false);
            process.pagemap = problems.pagemap(&dir, pid);
            if let Some(ids) = &process.ids {
                process.fds = problems.all(&dir, ImageKind::Fdinfo, u64::from(ids.files_id), false);
            }
        }
        set.processes.push(process);
    }

    match dir.parent_chain() {
        Ok(chain) => set.chain = chain,
        Err(err) => {
            problems.push("parent".into(), error_chain(&err));
            set.chain = vec![dir.clone()];
        }
    }
    set.problems = problems.list;
    Ok((dir, set))
}

/// Collects the problems met while reading.
#[derive(Default)]
struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn push(&mut self, image: String, what: String) {
        self.list.push(Problem { image, what });
    }

    fn missing(&mut self, kind: ImageKind, id: u64) {
        self.push(kind.file_name(id), "missing".into());
    }

    /// The only entry of an image, recording a problem if it cannot be read (or is missing
    /// when `required`).
    fn one<M: prost::Message + Default>(
        &mut self,
        dir: &ImageDir,
        kind: ImageKind,
        id: u64,
        required: bool,
    ) -> Option<M> {
        if !dir.exists(kind, id) {
            if required {
                self.missing(kind, id);
            }
            return None;
        }
        match dir.read_one(kind, id) {
            Ok(m) => Some(m),
            Err(err) => {
                self.push(kind.file_name(id), error_chain(&err));
                None
            }
        }
    }

    fn all<M: prost::Message + Default>(
        &mut self,
        dir: &ImageDir,
        kind: ImageKind,
        id: u64,
        required: bool,
    ) -> Vec<M> {
        if !dir.exists(kind, id) {
            if required {
                self.missing(kind, id);
            }
            return Vec::new();
        }
        dir.read_all(kind, id).unwrap_or_else(|err| {
            self.push(kind.file_name(id), error_chain(&err));
            Vec::new()
        })
    }

    fn pagemap(&mut self, dir: &ImageDir, pid: u64) -> Option<Pagemap> {
        let kind = ImageKind::Pagemap;
        if !dir.exists(kind, pid) {
            self.missing(kind, pid);
            return None;
        }
        let read = dir
            .open(kind, pid)
            .map_err(PagesError::from)
            .and_then(|mut reader| Pagemap::read(&mut reader));
        match read {
            Ok(pagemap) => Some(pagemap),
            Err(err) => {
                self.push(kind.file_name(pid), error_chain(&err));
                None
            }
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // thiserror's transparent variants repeat their cause's text
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
