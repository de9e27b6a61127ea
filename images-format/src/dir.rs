//! An image directory: one file per image, named by [`ImageKind`] templates, and an optional
//! `parent` symlink to the image directory of the previous (pre-)dump.
//!
//! ```text
//! DIR/inventory.img  DIR/pstree.img  DIR/core-<tid>.img  DIR/mm-<pid>.img
//! DIR/pagemap-<pid>.img  DIR/pages-<n>.img  DIR/files.img  DIR/fdinfo-<files_id>.img ...
//! DIR/parent -> ../previous-dump          (pre-dump chains)
//! ```
//!
//! Images hold process memory, so files are created mode 0600 and the directory 0700. A
//! file is created afresh: an existing file or symlink of that name is removed first, so a
//! planted symlink cannot redirect a write outside the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::entry::{ImageReader, ImageWriter};
use crate::error::{ImageError, PagesError};
use crate::kind::{ImageKind, ImageName};
use crate::pagemap::PagemapWriter;

/// Name of the link to the previous image directory.
pub const PARENT_LINK: &str = "parent";

/// How many `parent` links [`ImageDir::parent_chain`] follows before it calls the chain a
/// loop.
pub const MAX_PARENT_DEPTH: usize = 512;

/// Buffer size of image readers and writers: large enough that page data goes to the kernel
/// in big writes.
const IO_BUFFER: usize = 1 << 20;

/// An existing directory of images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageDir {
    path: PathBuf,
}

/// Reader type of [`ImageDir::open`].
pub type FileReader = ImageReader<BufReader<File>>;
/// Writer type of [`ImageDir::create`].
pub type FileWriter = ImageWriter<BufWriter<File>>;

/// A file of an image directory whose name is an image name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    pub file_name: String,
    pub name: ImageName,
}

impl ImageDir {
    /// Opens an existing directory.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let path = path.into();
        let meta = fs::metadata(&path)
            .map_err(|source| io_error(&path, "open image directory", source))?;
        if !meta.is_dir() {
            return Err(io_error(
                &path,
                "open image directory",
                std::io::Error::new(ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        Ok(ImageDir { path })
    }

    /// Creates the directory (mode 0700, parents as needed) if it does not exist, and opens it.
    pub fn create_dir(path: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let path = path.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|source| io_error(&path, "create image directory", source))?;
        ImageDir::new(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of the `kind` image with `id` (ignored by kinds with a fixed name).
    pub fn file_path(&self, kind: ImageKind, id: u64) -> PathBuf {
        self.path.join(kind.file_name(id))
    }

    pub fn exists(&self, kind: ImageKind, id: u64) -> bool {
        self.file_path(kind, id).is_file()
    }

    /// Creates (or replaces) the `kind` image with `id`, mode 0600, and writes its header.
    pub fn create(&self, kind: ImageKind, id: u64) -> Result<FileWriter, ImageError> {
        let name = kind.file_name(id);
        let file = self.create_file(&name)?;
        ImageWriter::new(BufWriter::with_capacity(IO_BUFFER, file), kind, name)
    }

    /// Opens the `kind` image with `id` and checks its header.
    pub fn open(&self, kind: ImageKind, id: u64) -> Result<FileReader, ImageError> {
        let name = kind.file_name(id);
        let (file, len) = self.open_file(&name)?;
        ImageReader::new(
            BufReader::with_capacity(IO_BUFFER, file),
            kind,
            name,
            Some(len),
        )
    }

    /// Like [`ImageDir::open`], but a missing file is `None`: CRIU treats a missing
    /// image as one without entries.
    pub fn open_optional(
        &self,
        kind: ImageKind,
        id: u64,
    ) -> Result<Option<FileReader>, ImageError> {
        match self.open(kind, id) {
            Ok(reader) => Ok(Some(reader)),
            Err(ImageError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens an image by file name, finding its kind from the name.
    pub fn open_named(&self, file_name: &str) -> Result<FileReader, ImageError> {
        let name = ImageKind::from_file_name(file_name).ok_or_else(|| ImageError::UnknownName {
            image: file_name.to_owned(),
        })?;
        let (file, len) = self.open_file(file_name)?;
        ImageReader::new(
            BufReader::with_capacity(IO_BUFFER, file),
            name.kind,
            file_name,
            Some(len),
        )
    }

    /// Creates `pagemap-<id>.img` (or the shared memory pagemap, with `kind`
    /// [`ImageKind::ShmemPagemap`]) and `pages-<pages_id>.img`, ready for pages.
    pub fn pagemap_writer(
        &self,
        kind: ImageKind,
        id: u64,
        pages_id: u32,
    ) -> Result<PagemapWriter<BufWriter<File>, BufWriter<File>>, PagesError> {
        let pagemap = self.create(kind, id)?;
        let pages = self.create(ImageKind::Pages, u64::from(pages_id))?;
        PagemapWriter::new(pagemap, pages, pages_id)
    }

    /// A pages image id not used by any `pages-N.img` of this directory (one more than the
    /// largest), for a new pagemap.
    pub fn next_pages_id(&self) -> Result<u32, ImageError> {
        let largest = self
            .list()?
            .iter()
            .filter(|f| f.name.kind == ImageKind::Pages)
            .filter_map(|f| f.name.id)
            .max();
        Ok(largest.map_or(1, |n| {
            u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX)
        }))
    }

    /// Writes a single-entry image.
    pub fn write_one<M: Message>(
        &self,
        kind: ImageKind,
        id: u64,
        message: &M,
    ) -> Result<(), ImageError> {
        let mut writer = self.create(kind, id)?;
        writer.write_entry(message)?;
        writer.finish()?;
        Ok(())
    }

    /// Reads the first entry of an image that must have one.
    pub fn read_one<M: Message + Default>(
        &self,
        kind: ImageKind,
        id: u64,
    ) -> Result<M, ImageError> {
        let mut reader = self.open(kind, id)?;
        reader.read_entry()?.ok_or_else(|| ImageError::Empty {
            image: kind.file_name(id),
        })
    }

    /// Reads every entry of an image; a missing image has none.
    pub fn read_all<M: Message + Default>(
        &self,
        kind: ImageKind,
        id: u64,
    ) -> Result<Vec<M>, ImageError> {
        let Some(mut reader) = self.open_optional(kind, id)? else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        while let Some(entry) = reader.read_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Every file whose name is an image name, sorted by kind then id. Other files
    /// (logs, `parent`) are left out.
    pub fn list(&self) -> Result<Vec<ImageFile>, ImageError> {
        let entries = fs::read_dir(&self.path)
            .map_err(|source| io_error(&self.path, "list image directory", source))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|source| io_error(&self.path, "list image directory", source))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(name) = ImageKind::from_file_name(&file_name) {
                files.push(ImageFile { file_name, name });
            }
        }
        files.sort_by_key(|f| (f.name.kind, f.name.id));
        Ok(files)
    }

    /// The directory the `parent` link points to, if there is a link.
    pub fn parent(&self) -> Result<Option<ImageDir>, ImageError> {
        let link = self.path.join(PARENT_LINK);
        match fs::symlink_metadata(&link) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_error(&link, "stat parent link", source)),
            Ok(_) => {}
        }
        // Resolved through the link itself: a relative target is relative to this
        // directory, and the kernel resolves it so. The result is a real path, so that
        // paths of parent images read well in messages and stay valid if handed on.
        let target = fs::canonicalize(&link)
            .map_err(|source| io_error(&link, "resolve parent link", source))?;
        ImageDir::new(target).map(Some)
    }

    /// This directory and its ancestors through `parent` links, nearest first. Fails on a
    /// loop or a chain deeper than [`MAX_PARENT_DEPTH`].
    pub fn parent_chain(&self) -> Result<Vec<ImageDir>, ImageError> {
        let mut chain = vec![self.clone()];
        let mut seen = vec![self.canonical()?];
        while let Some(parent) = chain.last().map(ImageDir::parent).transpose()?.flatten() {
            let canonical = parent.canonical()?;
            if seen.contains(&canonical) || chain.len() > MAX_PARENT_DEPTH {
                return Err(ImageError::ParentChain {
                    path: self.path.clone(),
                    limit: MAX_PARENT_DEPTH,
                });
            }
            seen.push(canonical);
            chain.push(parent);
        }
        Ok(chain)
    }

    /// Makes `parent` a symlink to `target` (replacing an existing link). A relative target
    /// is relative to this directory, as CRIU's `--prev-images-dir` is.
    pub fn set_parent(&self, target: impl AsRef<Path>) -> Result<(), ImageError> {
        let link = self.path.join(PARENT_LINK);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&link, "remove old parent link", source)),
        }
        std::os::unix::fs::symlink(target.as_ref(), &link)
            .map_err(|source| io_error(&link, "create parent link", source))
    }

    /// Creates a file for writing, mode 0600, removing any file or link of that name first.
    pub fn create_file(&self, file_name: &str) -> Result<File, ImageError> {
        let path = self.path.join(file_name);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                fs::remove_file(&path)
                    .map_err(|source| io_error(&path, "replace image", source))?;
                open()
            }
            other => other,
        }
        .map_err(|source| io_error(&path, "create image", source))?;
        // The umask may have taken bits away, never added any; still, say it explicitly.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|source| io_error(&path, "set image mode", source))?;
        Ok(file)
    }

    /// Opens a file of the directory for reading, with its size.
    pub fn open_file(&self, file_name: &str) -> Result<(File, u64), ImageError> {
        let path = self.path.join(file_name);
        let file = File::open(&path).map_err(|source| io_error(&path, "open image", source))?;
        let len = file
            .metadata()
            .map_err(|source| io_error(&path, "stat image", source))?
            .len();
        Ok((file, len))
    }

    /// Makes the directory's entries (files created, links made) durable: without it a
    /// crash can lose a complete image's name even though its data was synced.
    pub fn sync(&self) -> Result<(), ImageError> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(|source| io_error(&self.path, "sync image directory", source))
    }

    fn canonical(&self) -> Result<PathBuf, ImageError> {
        fs::canonicalize(&self.path)
            .map_err(|source| io_error(&self.path, "resolve image directory", source))
    }
}

impl FileWriter {
    /// Flushes, writes the file's data to stable storage and returns the file.
    pub fn finish_synced(self) -> Result<File, ImageError> {
        let name = self.name().to_owned();
        let index = self.index();
        let file = self
            .finish()?
            .into_inner()
            .map_err(|e| ImageError::EntryIo {
                image: name.clone(),
                op: "flush after",
                index,
                source: e.into_error(),
            })?;
        file.sync_all().map_err(|source| ImageError::EntryIo {
            image: name,
            op: "sync after",
            index,
            source,
        })?;
        Ok(file)
    }
}

fn io_error(path: &Path, op: &'static str, source: std::io::Error) -> ImageError {
    ImageError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn write_read_list() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
        let fs_entry = pb::FsEntry {
            cwd_id: 1,
            root_id: 2,
            umask: Some(0o22),
        };
        dir.write_one(ImageKind::Fs, 42, &fs_entry).unwrap();
        let mut w = dir.create(ImageKind::Fs, 43).unwrap();
        w.write_entry(&fs_entry).unwrap();
        w.finish_synced().unwrap();
        dir.sync().unwrap();
        assert_eq!(
            dir.read_one::<pb::FsEntry>(ImageKind::Fs, 43).unwrap(),
            fs_entry
        );
        fs::remove_file(dir.file_path(ImageKind::Fs, 43)).unwrap();
        assert!(dir.exists(ImageKind::Fs, 42));
        assert!(!dir.exists(ImageKind::Fs, 43));
        assert_eq!(
            dir.read_one::<pb::FsEntry>(ImageKind::Fs, 42).unwrap(),
            fs_entry
        );
        let mode = fs::metadata(dir.file_path(ImageKind::Fs, 42))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(dir.open_optional(ImageKind::Fs, 43).unwrap().is_none());
        assert!(dir
            .read_all::<pb::FsEntry>(ImageKind::Fs, 43)
            .unwrap()
            .is_empty());

        dir.create(ImageKind::Pstree, 0).unwrap().finish().unwrap();
        assert!(matches!(
            dir.read_one::<pb::PstreeEntry>(ImageKind::Pstree, 0),
            Err(ImageError::Empty { .. })
        ));
        fs::write(dir.path().join("dump.log"), "x").unwrap();
        let names: Vec<_> = dir
            .list()
            .unwrap()
            .into_iter()
            .map(|f| f.file_name)
            .collect();
        assert_eq!(names, ["pstree.img", "fs-42.img"]);
        let reader = dir.open_named("fs-42.img").unwrap();
        assert_eq!(reader.kind(), ImageKind::Fs);
    }

    #[test]
    fn create_replaces_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
        let outside = tmp.path().join("outside");
        fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, dir.file_path(ImageKind::Pstree, 0)).unwrap();
        dir.write_one(ImageKind::Pstree, 0, &pb::PstreeEntry::default())
            .unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
    }

    #[test]
    fn parent_chain_follows_links() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ImageDir::create_dir(tmp.path().join("1")).unwrap();
        let b = ImageDir::create_dir(tmp.path().join("2")).unwrap();
        let c = ImageDir::create_dir(tmp.path().join("3")).unwrap();
        b.set_parent("../1").unwrap();
        c.set_parent("../2").unwrap();
        assert!(a.parent().unwrap().is_none());
        let chain = c.parent_chain().unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(
            fs::canonicalize(chain[2].path()).unwrap(),
            fs::canonicalize(a.path()).unwrap()
        );
        a.set_parent("../3").unwrap();
        assert!(matches!(
            c.parent_chain(),
            Err(ImageError::ParentChain { .. })
        ));
    }
}
