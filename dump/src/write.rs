//! Writing the collected state as an image directory. Nothing here uses ptrace: page contents
//! are read with `process_vm_readv` while they stream into `pages-N.img` or to a page server
//! ([`crate::pages::stream`]). When the images outlive the process (it is killed, or it runs
//! on and they are its checkpoint), every file is synced before the process may be killed;
//! see [`needs_sync`] for the dumps that skip it. If anything fails, the files this dump
//! created are removed again ([`WrittenImages`] does it when dropped).
//!
//! The same image set can be encoded in memory instead ([`images_in_memory`]): the final
//! round of a prepared dump compares it with the prepared images and sends what differs,
//! inside the down time, where creating, filling and reading back files is pure cost.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_page_server::{ClientError, PageServerClient, PagemapId};
use images_format::pb::{
    self, DumpStatsEntry, InventoryEntry, SeccompEntry, StatsEntry, TimensEntry, Timespec,
};
use images_format::{ImageDir, ImageError, ImageKind, ImageWriter, PagemapWriter, PagesError};
use tracee::{Pid, PAGE_SIZE};

use crate::collect::{Ghost, ProcessState, TreeState};

/// `tracing::info!`, but `debug!` when `$frozen`: an image set kept in memory is a prepared
/// dump's S2, encoded while the program is frozen, where each log line is tens of
/// microseconds of its down time (S2's own line, once the delta is sent, has the counts).
macro_rules! info_unless_frozen {
    ($frozen:expr, $($arg:tt)+) => {
        if $frozen {
            tracing::debug!($($arg)+)
        } else {
            tracing::info!($($arg)+)
        }
    };
}
use crate::direct::DirectFile;
use crate::fault::{self, FaultPoint, InjectedFault};
use crate::pages::{self, PlannedRun, StreamError};
use crate::{DumpOptions, DumpStats};

/// CRIU's `PRE_DUMP_READ`: pages were read with process_vm_readv after the unfreeze.
const PRE_DUMP_READ: u32 = 2;

/// CRIU's pages image ids start at 1.
const FIRST_PAGES_ID: u32 = 1;

/// Writing the images failed; the files written so far are removed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("dump: write images into {}", dir.display())]
    Image {
        dir: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("dump: write pages into {}", dir.display())]
    Pages {
        dir: PathBuf,
        #[source]
        source: PagesError,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("dump: pid {pid}: send the pages to the page server")]
    Server {
        pid: Pid,
        #[source]
        source: ClientError,
    },
    #[error("dump: link {} to the parent images {}", dir.display(), parent.display())]
    Parent {
        dir: PathBuf,
        parent: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("dump: copy ghost file {} into {}", from.display(), image.display())]
    Ghost {
        from: PathBuf,
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: sync {}", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: read the {clock} clock")]
    Clock {
        clock: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("dump: the {what} thread panicked")]
    ThreadPanicked { what: &'static str },
    #[error(transparent)]
    Fault(#[from] InjectedFault),
    #[error(transparent)]
    Shmem(#[from] crate::collect::shmem::ShmemError),
}

/// The buffer of an image file, as `ImageDir::create` gives it.
const IO_BUFFER: usize = 1 << 20;

/// Where the bytes of one image go.
#[derive(Debug)]
enum Sink {
    File(BufWriter<File>),
    Memory(Vec<u8>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Memory(v) => v.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.write_all(buf),
            Sink::Memory(v) => v.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Memory(_) => Ok(()),
        }
    }
}

/// Where the bytes of a pages image go.
enum PagesSink {
    Direct(DirectFile),
    Memory(Vec<u8>),
}

impl Write for PagesSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PagesSink::Direct(f) => f.write(buf),
            PagesSink::Memory(v) => v.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PagesSink::Direct(f) => f.flush(),
            PagesSink::Memory(_) => Ok(()),
        }
    }
}

/// The images of a dump in progress. Until [`WrittenImages::commit`], dropping it removes
/// every file it created (and the directory, if the dump created it and it is empty).
/// In memory ([`images_in_memory`]), no file is made: the images are kept by name.
#[derive(Debug)]
pub struct WrittenImages {
    dir: ImageDir,
    /// `Some` for an image set kept in memory: file name -> contents.
    memory: Option<BTreeMap<String, Vec<u8>>>,
    created: Vec<PathBuf>,
    /// Not synced with the files: it may point to a directory only the page server has.
    parent_link: Option<PathBuf>,
    created_dir: bool,
    committed: bool,
    /// Sync the files (see [`needs_sync`]).
    durable: bool,
}

/// Whether the images of a dump with `opts` must be made durable before it ends.
///
/// Not when they are a step of a migration: a lazy dump keeps the process frozen and
/// serves its pages from memory until the destination runs (its directory is not an
/// archive), and a dump that leaves the process stopped keeps the process itself. Syncing
/// those would only lengthen the time the process is frozen (CRIU does not sync at all).
/// A dump that kills the process, and a checkpoint of one that runs on, are synced; so is
/// a pre-dump, whose pages a later, durable dump may refer to.
pub fn needs_sync(opts: &DumpOptions) -> bool {
    opts.mode != crate::DumpMode::Lazy && opts.final_state != crate::FinalState::Stopped
}

impl WrittenImages {
    fn open(path: &Path, durable: bool) -> Result<WrittenImages, WriteError> {
        let created_dir = !path.exists();
        let dir = ImageDir::create_dir(path).map_err(|source| WriteError::Image {
            dir: path.to_path_buf(),
            source,
        })?;
        Ok(WrittenImages {
            dir,
            memory: None,
            created: Vec::new(),
            parent_link: None,
            created_dir,
            committed: false,
            durable,
        })
    }

    /// An image set in memory, named as in `path` (which must exist; nothing is made
    /// there).
    fn in_memory(path: &Path) -> Result<WrittenImages, WriteError> {
        let dir = ImageDir::new(path).map_err(|source| WriteError::Image {
            dir: path.to_path_buf(),
            source,
        })?;
        Ok(WrittenImages {
            dir,
            memory: Some(BTreeMap::new()),
            created: Vec::new(),
            parent_link: None,
            created_dir: false,
            committed: false,
            durable: false,
        })
    }

    /// The images kept in memory (file name -> contents), taken out; empty for a set
    /// written into files.
    pub fn take_memory(&mut self) -> BTreeMap<String, Vec<u8>> {
        self.memory.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn image_err(&self) -> impl FnOnce(ImageError) -> WriteError + '_ {
        move |source| WriteError::Image {
            dir: self.dir.path().to_path_buf(),
            source,
        }
    }

    /// `parent` -> `--prev-images-dir`, as given (CRIU keeps a relative path relative).
    fn link_parent(&mut self, opts: &DumpOptions) -> Result<(), WriteError> {
        let Some(parent) = &opts.prev_images_dir else {
            return Ok(());
        };
        if self.memory.is_some() {
            // Nothing of a set in memory goes into the directory.
            return Ok(());
        }
        self.dir
            .set_parent(parent)
            .map_err(|source| WriteError::Parent {
                dir: self.dir.path().to_path_buf(),
                parent: parent.clone(),
                source,
            })?;
        self.parent_link = Some(self.dir.path().join(images_format::PARENT_LINK));
        Ok(())
    }

    /// Creates an image and remembers it for cleanup.
    fn create(&mut self, kind: ImageKind, id: u64) -> Result<ImageWriter<Sink>, WriteError> {
        let name = kind.file_name(id);
        let sink = if self.memory.is_some() {
            Sink::Memory(Vec::new())
        } else {
            let file = self.dir.create_file(&name).map_err(self.image_err())?;
            self.created.push(self.dir.file_path(kind, id));
            Sink::File(BufWriter::with_capacity(IO_BUFFER, file))
        };
        ImageWriter::new(sink, kind, name).map_err(self.image_err())
    }

    /// Writes an image of one or more entries, synced.
    fn write_all<M: prost::Message>(
        &mut self,
        kind: ImageKind,
        id: u64,
        entries: &[M],
    ) -> Result<(), WriteError> {
        let mut writer = self.create(kind, id)?;
        for entry in entries {
            writer.write_entry(entry).map_err(self.image_err())?;
        }
        let buffered = writer.finish().map_err(self.image_err())?;
        self.close(kind, id, buffered)
    }

    /// Flushes a finished image into its file. Syncing waits for [`Self::sync_created`],
    /// which syncs every file at once.
    /// Creates `pages-N.img`, written straight to the disk (see `DirectFile`); returns it
    /// with its path for [`Self::close_pages`].
    fn create_pages(
        &mut self,
        pages_id: u32,
    ) -> Result<(ImageWriter<PagesSink>, PathBuf), WriteError> {
        let name = ImageKind::Pages.file_name(u64::from(pages_id));
        let path = self.dir.file_path(ImageKind::Pages, u64::from(pages_id));
        let sink = if self.memory.is_some() {
            PagesSink::Memory(Vec::new())
        } else {
            let file = self.dir.create_file(&name).map_err(self.image_err())?;
            self.created.push(path.clone());
            PagesSink::Direct(DirectFile::new(file))
        };
        let pages = ImageWriter::new(sink, ImageKind::Pages, name).map_err(self.image_err())?;
        Ok((pages, path))
    }

    fn close(&mut self, kind: ImageKind, id: u64, buffered: Sink) -> Result<(), WriteError> {
        match buffered {
            Sink::File(buffered) => buffered
                .into_inner()
                .map(drop)
                .map_err(|e| WriteError::Sync {
                    path: self.dir.file_path(kind, id),
                    source: e.into_error(),
                }),
            Sink::Memory(bytes) => {
                if let Some(memory) = self.memory.as_mut() {
                    memory.insert(kind.file_name(id), bytes);
                }
                Ok(())
            }
        }
    }

    /// Ends a pages image from [`Self::create_pages`]: its last block reaches the disk.
    fn close_pages(&mut self, pages: PagesSink, path: PathBuf) -> Result<(), WriteError> {
        match pages {
            PagesSink::Direct(pages) => pages
                .into_file()
                .map(drop)
                .map_err(|source| WriteError::Sync { path, source }),
            PagesSink::Memory(bytes) => {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_owned)
                    .unwrap_or_default();
                if let Some(memory) = self.memory.as_mut() {
                    memory.insert(name, bytes);
                }
                Ok(())
            }
        }
    }

    /// Makes every image written so far durable, then the directory entries. The files are
    /// synced from several threads at once: the filesystem then commits them together,
    /// where one `fdatasync` after another cost ~4 ms per file (1 s for 258 threads).
    fn sync_created(&self, from: usize) -> Result<(), WriteError> {
        const SYNC_THREADS: usize = 8;
        if !self.durable {
            return Ok(());
        }
        let paths = self.created.get(from..).unwrap_or(&[]);
        let chunk = paths.len().div_ceil(SYNC_THREADS).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().try_for_each(|p| sync_path(p))))
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or(Err(WriteError::ThreadPanicked { what: "sync" }))
            })
        })?;
        sync_path(self.dir.path())
    }

    /// The file names of the images written so far (what a prepared dump compares).
    pub fn file_names(&self) -> Vec<String> {
        self.created
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    }

    /// Keeps the images: writes `stats-dump` and stops the cleanup.
    pub fn commit(mut self, stats: &DumpStats) -> Result<(), WriteError> {
        self.committed = true;
        let synced = self.created.len();
        self.write_stats(stats)?;
        self.sync_created(synced)
    }

    /// [`Self::commit`] of a set in memory: returns what is left of it (`stats-dump`, and
    /// any image not taken yet).
    pub fn commit_memory(
        mut self,
        stats: &DumpStats,
    ) -> Result<BTreeMap<String, Vec<u8>>, WriteError> {
        self.committed = true;
        self.write_stats(stats)?;
        Ok(self.take_memory())
    }

    fn write_stats(&mut self, stats: &DumpStats) -> Result<(), WriteError> {
        let entry = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: stats.freezing_time_us,
                frozen_time: stats.frozen_time_us,
                memdump_time: stats.memdump_time_us,
                memwrite_time: stats.memwrite_time_us,
                pages_scanned: stats.pages_scanned,
                pages_skipped_parent: stats.pages_skipped_parent,
                pages_written: stats.pages_written,
                pages_lazy: stats.pages_lazy,
                shpages_written: (stats.shpages_written > 0).then_some(stats.shpages_written),
                cow_shared_bytes: (stats.cow_shared_bytes > 0).then_some(stats.cow_shared_bytes),
                ..DumpStatsEntry::default()
            }),
            restore: None,
        };
        self.write_all(ImageKind::StatsDump, 0, &[entry])
    }
}

impl Drop for WrittenImages {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for path in self.created.iter().rev().chain(&self.parent_link) {
            if let Err(err) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove partial image");
            }
        }
        if self.created_dir {
            // Only if empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(self.dir.path());
        }
    }
}

/// One part of every process's state, in process order (images that hold the whole tree).
fn gather<T: Clone>(state: &TreeState, part: impl Fn(&ProcessState) -> &Vec<T>) -> Vec<T> {
    state
        .processes
        .iter()
        .flat_map(|p| part(p).iter().cloned())
        .collect()
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `fdatasync` of a file (or `fsync` of a directory) by path.
fn sync_path(path: &Path) -> Result<(), WriteError> {
    let err = |source| WriteError::Sync {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    if path.is_dir() {
        file.sync_all().map_err(err)
    } else {
        file.sync_data().map_err(err)
    }
}

/// Where the pages of this dump go: the image directory, or a page server (only the
/// pagemaps and pages; every other image stays in the directory).
#[derive(Debug)]
pub enum PagesTo<'a> {
    Local,
    Server(&'a mut PageServerClient),
}

/// The pages of one process to write.
struct PagesJob<'a> {
    pid: Pid,
    plan: &'a [PlannedRun],
    pages_id: u32,
    /// The process runs (pre-dump): ranges it unmaps meanwhile are left out.
    running: bool,
}

/// Streams the pages of one process into `pagemap-PID.img` and `pages-N.img`, or to the
/// page server. `running`: the process is not frozen (pre-dump).
fn write_pages(
    images: &mut WrittenImages,
    job: PagesJob<'_>,
    to: &mut PagesTo<'_>,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<(), WriteError> {
    let PagesJob {
        pid,
        plan,
        pages_id,
        running,
    } = job;
    let id = u64::try_from(pid.as_raw()).unwrap_or(0);
    let dir_path = images.dir.path().to_path_buf();
    let pages_err = |source| WriteError::Pages {
        dir: dir_path.clone(),
        source,
    };
    let mut write_time = Duration::ZERO;
    let (streamed, counts) = match to {
        PagesTo::Local => {
            let pagemap = images.create(ImageKind::Pagemap, id)?;
            let (pages, pages_path) = images.create_pages(pages_id)?;
            let mut writer = PagemapWriter::new(pagemap, pages, pages_id).map_err(pages_err)?;
            let streamed = pages::stream(pid, plan, &mut writer, running, opts.fault)?;
            let started = Instant::now();
            let (pagemap, pages, counts) = writer.finish().map_err(pages_err)?;
            images.close(ImageKind::Pagemap, id, pagemap)?;
            images.close_pages(pages, pages_path)?;
            write_time += started.elapsed();
            (streamed, counts)
        }
        PagesTo::Server(client) => {
            let server_err = |source| WriteError::Server { pid, source };
            let mut remote = client.open(PagemapId::process(id)).map_err(server_err)?;
            let streamed = pages::stream(pid, plan, &mut remote, running, opts.fault)?;
            let counts = remote.finish();
            (streamed, counts)
        }
    };
    write_time += streamed.write_time;
    stats.memdump_time_us = stats
        .memdump_time_us
        .saturating_add(micros(streamed.read_time));
    stats.memwrite_time_us = stats.memwrite_time_us.saturating_add(micros(write_time));
    stats.pages_written += streamed.written;
    stats.pages_skipped_parent += streamed.parent;
    stats.pages_lazy += streamed.lazy;
    let bytes = streamed.written * PAGE_SIZE;
    info_unless_frozen!(
        images.memory.is_some(),
        %pid,
        pages = streamed.written,
        parent = streamed.parent,
        lazy = streamed.lazy,
        vanished = streamed.vanished,
        entries = counts.entries,
        read_us = streamed.read_time.as_micros() as u64,
        write_us = write_time.as_micros() as u64,
        mb_per_s = (bytes as f64 / 1e6) / (streamed.read_time + write_time).as_secs_f64().max(1e-9),
        "pages written"
    );
    Ok(())
}

/// Writes the shared memory objects (see [`crate::collect::shmem`]): a shmem pagemap and
/// pages image per object, `memfd.img`, and the SysV segments with their contents.
fn write_shmem(
    images: &mut WrittenImages,
    shmem: &crate::collect::shmem::ShmemState,
    first_pages_id: u32,
    stats: &mut DumpStats,
) -> Result<(), WriteError> {
    let dir = images.dir.path().to_path_buf();
    let pages_err = |source| WriteError::Pages {
        dir: dir.clone(),
        source,
    };
    for (pages_id, object) in (first_pages_id..).zip(&shmem.objects) {
        let pagemap = images.create(ImageKind::ShmemPagemap, object.shmid)?;
        let (pages, pages_path) = images.create_pages(pages_id)?;
        let mut writer = PagemapWriter::new(pagemap, pages, pages_id).map_err(pages_err)?;
        object
            .for_each_chunk(|offset, bytes| writer.add_present(offset, bytes).map_err(pages_err))?;
        let (pagemap, pages, _) = writer.finish().map_err(pages_err)?;
        stats.shpages_written += object.runs.iter().map(|r| r.1 / PAGE_SIZE).sum::<u64>();
        images.close(ImageKind::ShmemPagemap, object.shmid, pagemap)?;
        images.close_pages(pages, pages_path)?;
    }
    if !shmem.memfds.is_empty() {
        images.write_all(ImageKind::MemfdInode, 0, &shmem.memfds)?;
    }
    if !shmem.sysv.is_empty() {
        let id = u64::from(shmem.ipc_ns_id);
        let mut writer = images.create(ImageKind::IpcnsShm, id)?;
        for segment in &shmem.sysv {
            writer
                .write_entry(&segment.entry)
                .map_err(images.image_err())?;
            segment.contents.for_each_chunk(|_, bytes| {
                writer.write_payload(bytes).map_err(images.image_err())
            })?;
            let size = segment.entry.size;
            let pad = usize::try_from(size.next_multiple_of(4) - size).unwrap_or(0);
            writer
                .write_payload(&[0u8; 4][..pad])
                .map_err(images.image_err())?;
        }
        let buffered = writer.finish().map_err(images.image_err())?;
        images.close(ImageKind::IpcnsShm, id, buffered)?;
    }
    if !shmem.objects.is_empty() || !shmem.sysv.is_empty() {
        tracing::info!(
            objects = shmem.objects.len(),
            memfds = shmem.memfds.len(),
            sysv = shmem.sysv.len(),
            pages = stats.shpages_written,
            "shared memory written"
        );
    }
    Ok(())
}

/// Copies a deleted file's contents after its ghost entry.
fn write_ghost(images: &mut WrittenImages, ghost: &Ghost) -> Result<(), WriteError> {
    let id = u64::from(ghost.id);
    let image = images.dir.file_path(ImageKind::GhostFile, id);
    let mut writer = images.create(ImageKind::GhostFile, id)?;
    writer
        .write_entry(&ghost.entry)
        .map_err(images.image_err())?;
    let mut buffered = writer.finish().map_err(images.image_err())?;
    let copy_err = |source| WriteError::Ghost {
        from: ghost.source.clone(),
        image: image.clone(),
        source,
    };
    let mut source = File::open(&ghost.source).map_err(copy_err)?;
    let copied = std::io::copy(&mut source, &mut buffered).map_err(copy_err)?;
    buffered.flush().map_err(copy_err)?;
    if copied != ghost.size {
        tracing::warn!(path = %ghost.source.display(), copied, size = ghost.size,
            "deleted file changed size while being copied");
    }
    images.close(ImageKind::GhostFile, id, buffered)
}

/// Writes the unread bytes of pipes (or FIFOs) as `kind`, each entry followed by its bytes;
/// nothing when there are none.
fn write_pipe_data<'a>(
    images: &mut WrittenImages,
    kind: ImageKind,
    data: impl Iterator<Item = &'a crate::collect::PipeData>,
) -> Result<(), WriteError> {
    let mut data = data.peekable();
    if data.peek().is_none() {
        return Ok(());
    }
    let mut writer = images.create(kind, 0)?;
    for one in data {
        writer.write_entry(&one.entry).map_err(images.image_err())?;
        writer
            .write_payload(&one.bytes)
            .map_err(images.image_err())?;
    }
    let buffered = writer.finish().map_err(images.image_err())?;
    images.close(kind, 0, buffered)
}

fn clock(id: rustix::time::ClockId, name: &'static str) -> Result<Timespec, WriteError> {
    let now = rustix::time::clock_gettime(id);
    Ok(Timespec {
        tv_sec: u64::try_from(now.tv_sec).map_err(|_| WriteError::Clock {
            clock: name,
            source: std::io::Error::other("negative time"),
        })?,
        tv_nsec: u64::try_from(now.tv_nsec).unwrap_or(0),
    })
}

/// Writes the images of one live process. `fdinfo` is false when an earlier process of the
/// tree shares its fd table and wrote `fdinfo-<files_id>.img` already.
/// How one process's images are written: its pages image, whether its fd table is
/// written with it (the first process of a shared table), whether it runs meanwhile.
struct ProcessJob {
    pages_id: u32,
    fdinfo: bool,
    running: bool,
}

fn write_process(
    images: &mut WrittenImages,
    process: &ProcessState,
    job: ProcessJob,
    to: &mut PagesTo<'_>,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<(), WriteError> {
    let ProcessJob {
        pages_id,
        fdinfo,
        running,
    } = job;
    let id = u64::try_from(process.pid.as_raw()).unwrap_or(0);
    for thread in &process.threads {
        let tid = u64::try_from(thread.tid.as_raw()).unwrap_or(0);
        images.write_all(ImageKind::Core, tid, std::slice::from_ref(&thread.core))?;
    }
    images.write_all(ImageKind::Ids, id, &[process.ids])?;
    images.write_all(ImageKind::Mm, id, std::slice::from_ref(&process.mm))?;
    images.write_all(ImageKind::Fs, id, std::slice::from_ref(&process.files.fs))?;
    if fdinfo {
        images.write_all(
            ImageKind::Fdinfo,
            u64::from(process.ids.files_id),
            &process.files.fdinfo,
        )?;
    }
    stats.pages_scanned += process.pages_scanned;
    let job = PagesJob {
        pid: process.pid,
        plan: &process.plan,
        pages_id,
        running,
    };
    write_pages(images, job, to, opts, stats)
}

/// Writes every image of the tree (all but `stats-dump`, which [`WrittenImages::commit`]
/// adds once the process is released and the frozen time is known).
#[tracing::instrument(skip_all, fields(dir = %opts.images_dir.display()))]
pub fn images(
    state: &TreeState,
    opts: &DumpOptions,
    to: &mut PagesTo<'_>,
    stats: &mut DumpStats,
) -> Result<WrittenImages, WriteError> {
    let images = WrittenImages::open(&opts.images_dir, needs_sync(opts))?;
    images_into(images, state, opts, to, stats, false)
}

/// [`images`] of a tree already let go (the first round of a prepared dump): its pages are
/// read while it runs, and a range it unmapped meanwhile is left out rather than failing
/// the dump. What changes meanwhile is caught by the next round's comparison.
#[tracing::instrument(skip_all, fields(dir = %opts.images_dir.display()))]
pub fn images_of_running(
    state: &TreeState,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<WrittenImages, WriteError> {
    let images = WrittenImages::open(&opts.images_dir, needs_sync(opts))?;
    images_into(images, state, opts, &mut PagesTo::Local, stats, true)
}

/// [`images`] encoded in memory: no file is made (`opts.images_dir` must exist: errors
/// name it); take them with [`WrittenImages::take_memory`]. Pages are read as for files.
// S2's images, encoded inside its freeze: a span at the info level would cost it
// microseconds to make.
#[tracing::instrument(level = "debug", skip_all)]
pub fn images_in_memory(
    state: &TreeState,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<WrittenImages, WriteError> {
    let images = WrittenImages::in_memory(&opts.images_dir)?;
    images_into(images, state, opts, &mut PagesTo::Local, stats, false)
}

/// The names of the pagemap and pages images [`images`] gives the `index`-th process of a
/// tree, `pid`: each process has a pages image of its own, numbered in tree order.
pub fn process_page_images(index: usize, pid: Pid) -> [String; 2] {
    let pages_id = FIRST_PAGES_ID.saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
    [
        ImageKind::Pagemap.file_name(u64::try_from(pid.as_raw()).unwrap_or(0)),
        ImageKind::Pages.file_name(u64::from(pages_id)),
    ]
}

fn images_into(
    mut images: WrittenImages,
    state: &TreeState,
    opts: &DumpOptions,
    to: &mut PagesTo<'_>,
    stats: &mut DumpStats,
    running: bool,
) -> Result<WrittenImages, WriteError> {
    images.link_parent(opts)?;
    // Each process gets its own pages image, numbered from CRIU's first id.
    let mut fd_tables = std::collections::HashSet::new();
    for (pages_id, process) in (FIRST_PAGES_ID..).zip(&state.processes) {
        let fdinfo = fd_tables.insert(process.ids.files_id);
        let job = ProcessJob {
            pages_id,
            fdinfo,
            running,
        };
        write_process(&mut images, process, job, to, opts, stats)?;
    }
    // A zombie is its core alone (TASK_DEAD and the exit status).
    for zombie in &state.zombies {
        let pid = u64::try_from(zombie.pid.as_raw()).unwrap_or(0);
        images.write_all(ImageKind::Core, pid, std::slice::from_ref(&zombie.core))?;
    }
    let files: Vec<_> = gather(state, |p| &p.files.files);
    images.write_all(ImageKind::Files, 0, &files)?;
    for process in &state.processes {
        for ghost in &process.files.ghosts {
            write_ghost(&mut images, ghost)?;
        }
    }
    let pipe_data = state
        .processes
        .iter()
        .flat_map(|p| p.files.pipe_data.iter());
    write_pipe_data(&mut images, ImageKind::PipesData, pipe_data)?;
    let fifo_data = state
        .processes
        .iter()
        .flat_map(|p| p.files.fifo_data.iter());
    write_pipe_data(&mut images, ImageKind::FifoData, fifo_data)?;
    let mut sk_queues = state
        .processes
        .iter()
        .flat_map(|p| p.files.sk_queues.iter())
        .peekable();
    if sk_queues.peek().is_some() {
        let mut writer = images.create(ImageKind::SkQueues, 0)?;
        for packet in sk_queues {
            writer
                .write_entry(&packet.entry)
                .map_err(images.image_err())?;
            writer
                .write_payload(&packet.bytes)
                .map_err(images.image_err())?;
        }
        let buffered = writer.finish().map_err(images.image_err())?;
        images.close(ImageKind::SkQueues, 0, buffered)?;
    }
    let locks: Vec<_> = gather(state, |p| &p.files.locks);
    if !locks.is_empty() {
        images.write_all(ImageKind::FileLocks, 0, &locks)?;
    }
    // Shared memory objects: each once, whichever processes map it.
    let memfds: Vec<_> = gather(state, |p| &p.files.memfds);
    let shmem = crate::collect::shmem::collect(&state.processes, &memfds)?;
    let shmem_pages_id =
        FIRST_PAGES_ID.saturating_add(u32::try_from(state.processes.len()).unwrap_or(u32::MAX));
    write_shmem(&mut images, &shmem, shmem_pages_id, stats)?;
    let remaps: Vec<_> = gather(state, |p| &p.files.remaps);
    if !remaps.is_empty() {
        images.write_all(ImageKind::RemapFpath, 0, &remaps)?;
    }
    let filters: Vec<_> = gather(state, |p| &p.seccomp.filters);
    if !filters.is_empty() {
        images.write_all(
            ImageKind::Seccomp,
            0,
            &[SeccompEntry {
                seccomp_filters: filters,
            }],
        )?;
    }
    // Parents before children: zombies have none, and their parents are live processes.
    let pstree: Vec<_> = state
        .processes
        .iter()
        .map(|p| p.pstree.clone())
        .chain(state.zombies.iter().map(|z| z.pstree.clone()))
        .collect();
    images.write_all(ImageKind::Pstree, 0, &pstree)?;
    // Like CRIU without a time namespace of its own: the clocks at dump time, so a restore
    // elsewhere can keep CLOCK_MONOTONIC and CLOCK_BOOTTIME from jumping back.
    let timens = TimensEntry {
        monotonic: clock(rustix::time::ClockId::Monotonic, "monotonic")?,
        boottime: clock(rustix::time::ClockId::Boottime, "boottime")?,
    };
    images.write_all(ImageKind::Timens, 0, &[timens])?;
    fault::check(opts.fault, FaultPoint::BeforeInventory)?;
    // Everything else must be on disk before the inventory says the dump is complete.
    images.sync_created(0)?;
    // The inventory goes last: a directory without one is not a finished dump.
    let root_ids = state.processes.first().map(|p| p.root_ids);
    let inventory = InventoryEntry {
        img_version: images_format::kind::IMAGES_V1_1,
        fdinfo_per_id: Some(true),
        root_ids,
        ns_per_id: Some(true),
        lsmtype: Some(pb::Lsmtype::NoLsm as i32),
        ..InventoryEntry::default()
    };
    let synced = images.created.len();
    images.write_all(ImageKind::Inventory, 0, &[inventory])?;
    images.sync_created(synced)?;
    info_unless_frozen!(
        images.memory.is_some(),
        pages = stats.pages_written,
        "images written"
    );
    Ok(images)
}

/// Writes a pre-dump: only memory (the pages of `pid` after `plan`) and an inventory with
/// `pre_dump_mode`, read while the process runs.
#[tracing::instrument(skip_all, fields(dir = %opts.images_dir.display()))]
pub fn predump_images(
    pid: Pid,
    plan: &[PlannedRun],
    opts: &DumpOptions,
    to: &mut PagesTo<'_>,
    stats: &mut DumpStats,
) -> Result<WrittenImages, WriteError> {
    let mut images = WrittenImages::open(&opts.images_dir, needs_sync(opts))?;
    images.link_parent(opts)?;
    let job = PagesJob {
        pid,
        plan,
        pages_id: FIRST_PAGES_ID,
        running: true,
    };
    write_pages(&mut images, job, to, opts, stats)?;
    images.sync_created(0)?;
    let inventory = InventoryEntry {
        img_version: images_format::kind::IMAGES_V1_1,
        fdinfo_per_id: Some(true),
        ns_per_id: Some(true),
        lsmtype: Some(pb::Lsmtype::NoLsm as i32),
        pre_dump_mode: Some(PRE_DUMP_READ),
        ..InventoryEntry::default()
    };
    let synced = images.created.len();
    images.write_all(ImageKind::Inventory, 0, &[inventory])?;
    images.sync_created(synced)?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_that_outlive_the_process_are_synced() {
        use crate::{DumpMode, FinalState};
        let mut opts = DumpOptions::new(1, PathBuf::from("img"));
        assert!(needs_sync(&opts), "killed: the images are the process now");
        opts.final_state = FinalState::Running;
        assert!(needs_sync(&opts), "a checkpoint of a process that runs on");
        opts.mode = DumpMode::PreDump;
        assert!(needs_sync(&opts), "a later dump may refer to its pages");
        opts.mode = DumpMode::Full;
        opts.final_state = FinalState::Stopped;
        assert!(!needs_sync(&opts), "the stopped process is still there");
        opts.final_state = FinalState::Killed;
        opts.mode = DumpMode::Lazy;
        assert!(!needs_sync(&opts), "lazy: served from the frozen process");
    }

    #[test]
    fn an_image_set_in_memory_has_the_bytes_of_the_files_and_makes_none() {
        let dir = tempfile::tempdir().unwrap();
        let entry = pb::PstreeEntry {
            pid: 7,
            ppid: 0,
            pgid: 7,
            sid: 7,
            threads: vec![7, 8],
        };
        let mut memory = WrittenImages::in_memory(dir.path()).unwrap();
        memory
            .write_all(ImageKind::Pstree, 0, std::slice::from_ref(&entry))
            .unwrap();
        let (mut pages, path) = memory.create_pages(3).unwrap();
        pages.write_payload(&[5u8; 4096]).unwrap();
        memory.close_pages(pages.finish().unwrap(), path).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let kept = memory.take_memory();
        let mut files = WrittenImages::open(dir.path(), false).unwrap();
        files
            .write_all(ImageKind::Pstree, 0, std::slice::from_ref(&entry))
            .unwrap();
        assert_eq!(
            kept.get("pstree.img"),
            Some(&std::fs::read(dir.path().join("pstree.img")).unwrap())
        );
        assert_eq!(kept.get("pages-3.img"), Some(&vec![5u8; 4096]));
        let rest = memory.commit_memory(&DumpStats::default()).unwrap();
        assert_eq!(rest.keys().collect::<Vec<_>>(), ["stats-dump"]);
    }

    #[test]
    fn failed_dump_removes_only_its_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"mine").unwrap();
        {
            let mut images = WrittenImages::open(dir.path(), true).unwrap();
            images
                .write_all(ImageKind::Pstree, 0, &[pb::PstreeEntry::default()])
                .unwrap();
            assert!(dir.path().join("pstree.img").exists());
        }
        assert!(!dir.path().join("pstree.img").exists());
        assert!(dir.path().join("keep.txt").exists());
    }
}
