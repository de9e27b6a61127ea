//! Writing the collected state as an image directory. Nothing here uses ptrace: page contents
//! are read with `process_vm_readv` while they stream into `pages-N.img` (a reader thread
//! fills 4 MiB buffers while this thread writes the previous one). Every file is synced
//! before the process may be killed. If anything fails, the files this dump created are
//! removed again ([`WrittenImages`] does it when dropped).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use images_format::pb::{
    self, DumpStatsEntry, InventoryEntry, SeccompEntry, StatsEntry, TimensEntry, Timespec,
};
use images_format::{ImageDir, ImageError, ImageKind, ImageWriter, PagemapWriter, PagesError};
use tracee::memory::{self, MemoryError, RemoteRange};
use tracee::{Pid, RemoteAddr, PAGE_SIZE};

use crate::collect::{Ghost, PageRun, ProcessState, TreeState};
use crate::direct::DirectFile;
use crate::fault::{self, FaultPoint, InjectedFault};
use crate::{DumpOptions, DumpStats};

/// Bytes read from the target per batch: process_vm_readv measured fastest with 4 MiB.
const BATCH_BYTES: u64 = 4 << 20;
/// The kernel's limit on iovecs per call.
const BATCH_RUNS: usize = 1024;
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
    #[error("dump: pid {pid}: read pages")]
    ReadPages {
        pid: Pid,
        #[source]
        source: MemoryError,
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
}

/// The images of a dump in progress. Until [`WrittenImages::commit`], dropping it removes
/// every file it created (and the directory, if the dump created it and it is empty).
#[derive(Debug)]
pub struct WrittenImages {
    dir: ImageDir,
    created: Vec<PathBuf>,
    created_dir: bool,
    committed: bool,
}

impl WrittenImages {
    fn open(path: &Path) -> Result<WrittenImages, WriteError> {
        let created_dir = !path.exists();
        let dir = ImageDir::create_dir(path).map_err(|source| WriteError::Image {
            dir: path.to_path_buf(),
            source,
        })?;
        Ok(WrittenImages {
            dir,
            created: Vec::new(),
            created_dir,
            committed: false,
        })
    }

    fn image_err(&self) -> impl FnOnce(ImageError) -> WriteError + '_ {
        move |source| WriteError::Image {
            dir: self.dir.path().to_path_buf(),
            source,
        }
    }

    /// Creates an image and remembers it for cleanup.
    fn create(
        &mut self,
        kind: ImageKind,
        id: u64,
    ) -> Result<ImageWriter<BufWriter<File>>, WriteError> {
        let path = self.dir.file_path(kind, id);
        let writer = self.dir.create(kind, id).map_err(self.image_err())?;
        self.created.push(path);
        Ok(writer)
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
    fn close(&self, kind: ImageKind, id: u64, buffered: BufWriter<File>) -> Result<(), WriteError> {
        buffered
            .into_inner()
            .map(drop)
            .map_err(|e| WriteError::Sync {
                path: self.dir.file_path(kind, id),
                source: e.into_error(),
            })
    }

    /// Makes every image written so far durable, then the directory entries. The files are
    /// synced from several threads at once: the filesystem then commits them together,
    /// where one `fdatasync` after another cost ~4 ms per file (1 s for 258 threads).
    fn sync_created(&self, from: usize) -> Result<(), WriteError> {
        const SYNC_THREADS: usize = 8;
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

    /// Keeps the images: writes `stats-dump` and stops the cleanup.
    pub fn commit(mut self, stats: &DumpStats) -> Result<(), WriteError> {
        self.committed = true;
        let entry = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: stats.freezing_time_us,
                frozen_time: stats.frozen_time_us,
                memdump_time: stats.memdump_time_us,
                memwrite_time: stats.memwrite_time_us,
                pages_scanned: stats.pages_scanned,
                pages_skipped_parent: stats.pages_skipped_parent,
                pages_written: stats.pages_written,
                pages_lazy: 0,
                ..DumpStatsEntry::default()
            }),
            restore: None,
        };
        let synced = self.created.len();
        self.write_all(ImageKind::StatsDump, 0, &[entry])?;
        self.sync_created(synced)
    }
}

impl Drop for WrittenImages {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for path in self.created.iter().rev() {
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

/// A batch of page runs and their contents, read in one go. The contents start at a page
/// boundary of `data` (at `offset`), so that they can go to an `O_DIRECT` file as they are.
struct Batch {
    runs: Vec<(u64, usize)>,
    data: Vec<u8>,
    offset: usize,
}

/// A read buffer for one batch, with room to start its contents at a page boundary.
fn batch_buffer() -> Vec<u8> {
    vec![0u8; usize::try_from(BATCH_BYTES + PAGE_SIZE).unwrap_or(0)]
}

/// Splits the runs into batches of at most [`BATCH_BYTES`] and [`BATCH_RUNS`] runs.
fn plan_batches(runs: &[PageRun]) -> Vec<Vec<(u64, usize)>> {
    let mut batches = Vec::new();
    let mut current: Vec<(u64, usize)> = Vec::new();
    let mut bytes = 0u64;
    for run in runs {
        let mut start = run.start;
        let end = run.end();
        while start < end {
            let room = BATCH_BYTES - bytes;
            let take = (end - start).min(room);
            current.push((start, usize::try_from(take).unwrap_or(usize::MAX)));
            bytes += take;
            start += take;
            if bytes == BATCH_BYTES || current.len() == BATCH_RUNS {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Streams the pages of one process into `pagemap-PID.img` and `pages-N.img`.
fn write_pages(
    images: &mut WrittenImages,
    process: &ProcessState,
    pages_id: u32,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<(), WriteError> {
    let pid = process.pid;
    let id = u64::try_from(pid.as_raw()).unwrap_or(0);
    let dir_path = images.dir.path().to_path_buf();
    let pages_err = |source| WriteError::Pages {
        dir: dir_path.clone(),
        source,
    };
    let pagemap = images.create(ImageKind::Pagemap, id)?;
    let pages_name = ImageKind::Pages.file_name(u64::from(pages_id));
    let pages_path = images.dir.file_path(ImageKind::Pages, u64::from(pages_id));
    let pages_file = images
        .dir
        .create_file(&pages_name)
        .map_err(images.image_err())?;
    images.created.push(pages_path.clone());
    let pages = ImageWriter::new(DirectFile::new(pages_file), ImageKind::Pages, pages_name)
        .map_err(images.image_err())?;
    let mut writer = PagemapWriter::new(pagemap, pages, pages_id).map_err(pages_err)?;

    let batches = plan_batches(&process.pages);
    let mut read_time = Duration::ZERO;
    let mut write_time = Duration::ZERO;
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(Batch, Duration), WriteError>>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    // Two buffers in flight: one being read from the target, one being written out.
    for _ in 0..2 {
        let _ = empty_tx.send(batch_buffer());
    }
    let result = std::thread::scope(|scope| -> Result<(), WriteError> {
        let reader = scope.spawn(move || {
            for runs in batches {
                let Ok(mut data) = empty_rx.recv() else {
                    return;
                };
                let total: usize = runs.iter().map(|(_, len)| len).sum();
                let offset = data.as_ptr().align_offset(PAGE_SIZE as usize);
                let ranges: Vec<RemoteRange> = runs
                    .iter()
                    .map(|&(addr, len)| RemoteRange {
                        addr: RemoteAddr(addr),
                        len,
                    })
                    .collect();
                let started = Instant::now();
                let read =
                    memory::read_remote_vectored(pid, &ranges, &mut data[offset..offset + total])
                        .map_err(|source| WriteError::ReadPages { pid, source })
                        .map(|()| (Batch { runs, data, offset }, started.elapsed()));
                let failed = read.is_err();
                if full_tx.send(read).is_err() || failed {
                    return;
                }
            }
        });
        let mut written_batches = 0u64;
        for message in full_rx.iter() {
            let (batch, took) = message?;
            read_time += took;
            let started = Instant::now();
            let mut off = batch.offset;
            for &(addr, len) in &batch.runs {
                writer
                    .add_present(addr, &batch.data[off..off + len])
                    .map_err(pages_err)?;
                off += len;
            }
            write_time += started.elapsed();
            written_batches += 1;
            if written_batches == 1 {
                fault::check(opts.fault, FaultPoint::MidPages)?;
            }
            let _ = empty_tx.send(batch.data);
        }
        // This closure owns `empty_tx`: dropping it here, or on an early `?`, ends the
        // reader's wait for a free buffer, so the scope can always join it.
        drop(empty_tx);
        reader.join().map_err(|_| WriteError::ThreadPanicked {
            what: "page reader",
        })
    });
    result?;
    let started = Instant::now();
    let (pagemap, pages, counts) = writer.finish().map_err(pages_err)?;
    images.close(ImageKind::Pagemap, id, pagemap)?;
    pages
        .into_file()
        .map(drop)
        .map_err(|source| WriteError::Sync {
            path: pages_path.clone(),
            source,
        })?;
    write_time += started.elapsed();
    stats.memdump_time_us = stats.memdump_time_us.saturating_add(micros(read_time));
    stats.memwrite_time_us = stats.memwrite_time_us.saturating_add(micros(write_time));
    stats.pages_written += counts.pages_present;
    stats.pages_scanned += process.pages_scanned;
    let bytes = counts.pages_present * PAGE_SIZE;
    tracing::info!(
        %pid,
        pages = counts.pages_present,
        entries = counts.entries,
        read_us = read_time.as_micros() as u64,
        write_us = write_time.as_micros() as u64,
        mb_per_s = (bytes as f64 / 1e6) / (read_time + write_time).as_secs_f64().max(1e-9),
        "pages written"
    );
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

fn write_process(
    images: &mut WrittenImages,
    process: &ProcessState,
    pages_id: u32,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<(), WriteError> {
    let id = u64::try_from(process.pid.as_raw()).unwrap_or(0);
    for thread in &process.threads {
        let tid = u64::try_from(thread.tid.as_raw()).unwrap_or(0);
        images.write_all(ImageKind::Core, tid, std::slice::from_ref(&thread.core))?;
    }
    images.write_all(ImageKind::Ids, id, &[process.ids])?;
    images.write_all(ImageKind::Mm, id, std::slice::from_ref(&process.mm))?;
    images.write_all(ImageKind::Fs, id, std::slice::from_ref(&process.files.fs))?;
    images.write_all(
        ImageKind::Fdinfo,
        u64::from(process.ids.files_id),
        &process.files.fdinfo,
    )?;
    write_pages(images, process, pages_id, opts, stats)
}

/// Writes every image of the tree (all but `stats-dump`, which [`WrittenImages::commit`]
/// adds once the process is released and the frozen time is known).
#[tracing::instrument(skip_all, fields(dir = %opts.images_dir.display()))]
pub fn images(
    state: &TreeState,
    opts: &DumpOptions,
    stats: &mut DumpStats,
) -> Result<WrittenImages, WriteError> {
    let mut images = WrittenImages::open(&opts.images_dir)?;
    // Each process gets its own pages image, numbered from CRIU's first id.
    for (pages_id, process) in (FIRST_PAGES_ID..).zip(&state.processes) {
        write_process(&mut images, process, pages_id, opts, stats)?;
    }
    let files: Vec<_> = state
        .processes
        .iter()
        .flat_map(|p| p.files.files.iter().cloned())
        .collect();
    images.write_all(ImageKind::Files, 0, &files)?;
    for process in &state.processes {
        for ghost in &process.files.ghosts {
            write_ghost(&mut images, ghost)?;
        }
    }
    let remaps: Vec<_> = state
        .processes
        .iter()
        .flat_map(|p| p.files.remaps.iter().cloned())
        .collect();
    if !remaps.is_empty() {
        images.write_all(ImageKind::RemapFpath, 0, &remaps)?;
    }
    let filters: Vec<_> = state
        .processes
        .iter()
        .flat_map(|p| p.seccomp.filters.iter().cloned())
        .collect();
    if !filters.is_empty() {
        images.write_all(
            ImageKind::Seccomp,
            0,
            &[SeccompEntry {
                seccomp_filters: filters,
            }],
        )?;
    }
    let pstree: Vec<_> = state.processes.iter().map(|p| p.pstree.clone()).collect();
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
    tracing::info!(pages = stats.pages_written, "images written");
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_size_and_split_big_runs() {
        let runs = [
            PageRun {
                start: 0x1000,
                pages: 1,
            },
            PageRun {
                start: 0x10_0000,
                pages: 2048, // 8 MiB
            },
        ];
        let batches = plan_batches(&runs);
        assert_eq!(batches.len(), 3);
        assert_eq!(
            batches[0],
            vec![(0x1000, 4096), (0x10_0000, (4 << 20) - 4096)]
        );
        let total: usize = batches.iter().flatten().map(|(_, l)| l).sum();
        assert_eq!(total, 4096 + (8 << 20));
        assert!(batches
            .iter()
            .all(|b| b.iter().map(|(_, l)| l).sum::<usize>() <= 4 << 20));
    }

    #[test]
    fn many_small_runs_respect_the_iovec_limit() {
        let runs: Vec<PageRun> = (0..2500u64)
            .map(|i| PageRun {
                start: i * 2 * PAGE_SIZE,
                pages: 1,
            })
            .collect();
        let batches = plan_batches(&runs);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1024, 1024, 452]
        );
    }

    #[test]
    fn failed_dump_removes_only_its_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"mine").unwrap();
        {
            let mut images = WrittenImages::open(dir.path()).unwrap();
            images
                .write_all(ImageKind::Pstree, 0, &[pb::PstreeEntry::default()])
                .unwrap();
            assert!(dir.path().join("pstree.img").exists());
        }
        assert!(!dir.path().join("pstree.img").exists());
        assert!(dir.path().join("keep.txt").exists());
    }
}
