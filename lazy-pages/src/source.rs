//! Where lazy pages come from: the local image directory, or the page server of the dump
//! side asked with `PS_IOV_GET`.
//!
//! Either way the daemon reads `pagemap-<pid>.img` locally to know which pages are lazy:
//! the entries flagged PE_LAZY. Pages that are present but not lazy were filled by restore
//! and are never served here.
//!
//! Pull protocol (CRIU's `page_server_iov`, 32 bytes, host order):
//!
//! ```text
//! daemon                                               source
//!   GET {cmd 7, nr_pages, vaddr, dst_id = pid} ---->
//!                                              <----   ADD_F {PE_PRESENT<<16 | 6, n, vaddr, pid}
//!                                              <----   n * 4096 bytes, 1 <= n <= nr_pages
//!                                                      (n = 0: the source has no such pages)
//!   ...
//!   CLOSE {cmd 0x1023}                         ---->
//!                                              <----   i32 status
//! ```
//!
//! Several GETs may be in flight: the source answers them in order (CRIU's page server
//! reads and answers one request after the other, and so does ours), and the daemon
//! matches each answer to the oldest GET not answered yet. [`RemotePages::request`] sends
//! a GET without waiting; [`RemotePages::answer_ready`] says, without waiting, whether the
//! oldest answer has arrived whole; [`RemotePages::receive`] reads it.
//!
//! Our extension, so that the source knows when the destination resumes: a GET's flag bits
//! (the high 16 bits of `cmd`, which CRIU's page server and ours do not read for GET) say
//! where restore is. [`GET_BEFORE_RESUME`] is set on every GET sent before restore's end
//! marker (restore itself, or a fault of a task not resumed yet, touched lazy memory), and
//! [`GET_RESUMED`] on every GET after it (restore sends the marker just before the tasks
//! resume), and on the CLOSE that ends the session after it. When no GET followed the end
//! marker, the daemon must get that CLOSE through before it may tell restore that every page
//! is in (see [`RemotePages::told_resumed`]). A source that sees neither bit
//! talks to a daemon without the extension (CRIU's), and can only take its first GET for the
//! destination having resumed.
//!
//! Compression, also ours (see `ckpt_page_server::compress`): with
//! [`Pages::set_compress_pages`] (`--compress-pages`) every GET also carries [`GET_ZSTD`]
//! (bit 13), and a source that knows it may answer with a PE_ZSTD ADD_F: L, then one zstd
//! frame of the pages. Answers of both kinds are read; the raw and wire bytes of the pages
//! received are logged when the session closes.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ckpt_page_server::{ClientError, Command, Frame, PageServerClient, PageTraffic};
use images_format::{ImageDir, ImageKind, PageFlags, PagesError, PagesReader, PAGE_SIZE};

/// A run of lazy pages of the image, `[vaddr, vaddr + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyRange {
    pub vaddr: u64,
    pub len: u64,
}

/// Getting pages failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("pid {pid}: read its pagemap")]
    Pagemap {
        pid: i32,
        #[source]
        source: PagesError,
    },
    #[error("pid {pid}: no pagemap was opened for it")]
    UnknownPid { pid: i32 },
    #[error("pid {pid}: read pages at {vaddr:#x} ({len} bytes) from the images")]
    Read {
        pid: i32,
        vaddr: u64,
        len: u64,
        #[source]
        source: PagesError,
    },
    #[error(transparent)]
    Connect(ClientError),
    #[error("pid {pid}: ask the page server for {vaddr:#x} ({nr_pages} pages)")]
    Remote {
        pid: i32,
        vaddr: u64,
        nr_pages: u64,
        #[source]
        source: ClientError,
    },
    #[error("close the page server session")]
    Close(#[source] ClientError),
    #[error("share the page server connection")]
    Notify(#[source] std::io::Error),
    #[error("pages of local images are read, not requested")]
    NotRemote,
}

/// GET flag: restore has not sent its end marker yet; the destination does not run.
pub const GET_BEFORE_RESUME: u16 = 0x4000;
/// GET flag: restore sent its end marker; the tasks run.
pub const GET_RESUMED: u16 = 0x8000;
/// GET flag: the source may answer with compressed pages.
pub use ckpt_page_server::GET_ZSTD;

/// The lazy ranges of a pagemap: entries flagged PE_LAZY, adjacent ones merged.
pub fn lazy_ranges(reader: &PagesReader) -> Vec<LazyRange> {
    let mut out: Vec<LazyRange> = Vec::new();
    for range in &reader.pagemap().ranges {
        if !range.flags.contains(PageFlags::LAZY) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.vaddr + last.len == range.vaddr => last.len += range.len(),
            _ => out.push(LazyRange {
                vaddr: range.vaddr,
                len: range.len(),
            }),
        }
    }
    out
}

/// A file's device and inode: the same path names another file once renamed over.
type FileId = (u64, u64);

fn file_id(path: &std::path::Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The source of page contents.
#[derive(Debug)]
pub enum PageSource {
    /// The image directory (PE_LAZY entries with data, here or in a parent).
    Local,
    /// The dump side's page server.
    Remote(RemotePages),
}

/// The pagemaps of the tasks being served, and where their pages come from.
#[derive(Debug)]
pub struct Pages {
    dir: ImageDir,
    readers: HashMap<i32, PagesReader>,
    /// Pagemaps opened before their task was handed over ([`Pages::open_early`]), with
    /// the identity of the file each was read from.
    early: HashMap<i32, (FileId, PagesReader)>,
    source: PageSource,
    /// Tells the read-ahead threads to stop when we go.
    stop: StopOnDrop,
}

#[derive(Debug, Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Read-ahead step: the page cache is asked for this much of a pages image at a time.
const READAHEAD_CHUNK: u64 = 8 << 20;

impl Pages {
    pub fn new(dir: ImageDir, source: PageSource) -> Pages {
        Pages {
            dir,
            readers: HashMap::new(),
            early: HashMap::new(),
            source,
            stop: StopOnDrop::default(),
        }
    }

    /// Opens every pagemap image the directory holds now, before restore hands their
    /// tasks over: a prepared restore hands them over at the switch, where the tree's
    /// first faults wait for [`Pages::open_task`]. Restore replaces a pagemap the switch
    /// changed by a rename, so each is kept with the identity of its file, and one
    /// replaced since is opened again. Best effort: what cannot be opened now is opened
    /// at the hand-off, whose error then counts.
    pub fn open_early(&mut self) {
        let Ok(files) = self.dir.list() else {
            return;
        };
        for file in files.iter().filter(|f| f.name.kind == ImageKind::Pagemap) {
            let Some(id) = file.name.id else {
                continue;
            };
            let Ok(pid) = i32::try_from(id) else {
                continue;
            };
            // Identified before it is read: a file replaced in between reads as newer
            // than its identity, and is opened again at the hand-off.
            let Some(identity) = file_id(&self.dir.file_path(ImageKind::Pagemap, id)) else {
                continue;
            };
            if let Ok(reader) = PagesReader::open(&self.dir, ImageKind::Pagemap, id) {
                self.early.insert(pid, (identity, reader));
            }
        }
    }

    /// Opens `pagemap-<pid>.img` (and its parents) and returns its lazy ranges. Local
    /// lazy pages are read ahead into the page cache from now on (see `read_ahead`).
    pub fn open_task(&mut self, pid: i32) -> Result<Vec<LazyRange>, SourceError> {
        let id = u64::try_from(pid).map_err(|_| SourceError::UnknownPid { pid })?;
        let early = self.early.remove(&pid).and_then(|(file, reader)| {
            (file_id(&self.dir.file_path(ImageKind::Pagemap, id)) == Some(file)).then_some(reader)
        });
        let reader = match early {
            Some(reader) => reader,
            None => PagesReader::open(&self.dir, ImageKind::Pagemap, id)
                .map_err(|source| SourceError::Pagemap { pid, source })?,
        };
        let ranges = lazy_ranges(&reader);
        if matches!(self.source, PageSource::Local) {
            read_ahead(pid, &reader, &ranges, &self.stop.0);
        }
        self.readers.insert(pid, reader);
        Ok(ranges)
    }

    /// Fills the start of `buf` (a whole number of pages) with the image's pages from
    /// `vaddr` on; returns the bytes filled, at least one page. A remote source may
    /// return fewer pages than asked.
    pub fn fetch(&mut self, pid: i32, vaddr: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        match &mut self.source {
            PageSource::Local => {
                let reader = self
                    .readers
                    .get(&pid)
                    .ok_or(SourceError::UnknownPid { pid })?;
                reader
                    .read_pages(vaddr, buf)
                    .map_err(|source| SourceError::Read {
                        pid,
                        vaddr,
                        len: buf.len() as u64,
                        source,
                    })?;
                Ok(buf.len())
            }
            PageSource::Remote(remote) => remote.get(pid, vaddr, buf),
        }
    }

    /// Ask a remote source for compressed pages (GET_ZSTD); nothing for local images.
    pub fn set_compress_pages(&mut self, on: bool) {
        if let PageSource::Remote(remote) = &mut self.source {
            remote.compress = on;
        }
    }

    /// The pages a remote source sent so far, raw and on the wire (zero for local images).
    pub fn remote_traffic(&self) -> PageTraffic {
        match &self.source {
            PageSource::Local => PageTraffic::default(),
            PageSource::Remote(remote) => remote.traffic(),
        }
    }

    /// Restore sent its end marker: from now on a remote source's GETs say the tasks run.
    pub fn restore_finished(&mut self) {
        if let PageSource::Remote(remote) = &mut self.source {
            remote.resumed();
        }
    }

    /// Whether a remote source surely knows that the destination runs (a GET after the end
    /// marker was answered); always true for local images.
    pub fn source_told(&self) -> bool {
        match &self.source {
            PageSource::Local => true,
            PageSource::Remote(remote) => remote.told_resumed(),
        }
    }

    /// The connection of a remote source, to wait on for answers; `None` for local images.
    pub fn remote_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.source {
            PageSource::Local => None,
            PageSource::Remote(remote) => Some(remote.raw.as_fd()),
        }
    }

    /// Asks a remote source for `nr_pages` from `vaddr` without waiting for them: the
    /// answers come in the order asked, each read with [`Pages::receive`]. Local images
    /// have nothing to ask (use [`Pages::fetch`]).
    pub fn request(&mut self, pid: i32, vaddr: u64, nr_pages: u64) -> Result<(), SourceError> {
        match &mut self.source {
            PageSource::Local => Err(SourceError::NotRemote),
            PageSource::Remote(remote) => remote.request(pid, vaddr, nr_pages),
        }
    }

    /// Whether the whole answer to the oldest request has arrived (see
    /// [`RemotePages::answer_ready`]); always true for local images.
    pub fn answer_ready(&self) -> Result<bool, SourceError> {
        match &self.source {
            PageSource::Local => Ok(true),
            PageSource::Remote(remote) => remote.answer_ready(),
        }
    }

    /// Reads the answer to the oldest request not answered yet, which asked for the pages
    /// of `pid` from `vaddr` on, as many as `buf` holds; returns the bytes received.
    pub fn receive(&mut self, pid: i32, vaddr: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        match &mut self.source {
            PageSource::Local => Err(SourceError::NotRemote),
            PageSource::Remote(remote) => remote.receive(pid, vaddr, buf),
        }
    }

    /// Ends a remote session; nothing to do for local images.
    pub fn close(self) -> Result<(), SourceError> {
        match self.source {
            PageSource::Local => Ok(()),
            PageSource::Remote(remote) => remote.close(),
        }
    }
}

/// Asks the kernel, from a thread of its own, to bring the local images' lazy pages into
/// the page cache, in file order, a chunk at a time.
///
/// The dump writes pages images with `O_DIRECT`, so they are usually not cached: each
/// fault answered from them then waited for the disk (50-70 µs per 16 KiB block here,
/// most of the 86-113 µs measured per fault in a full restore). `POSIX_FADV_WILLNEED`
/// starts the reads without waiting for them and copies nothing; the faults and the
/// background transfer then find the pages in memory. Best effort, at the lowest
/// priority (setting up the reads costs CPU: ~2 ms per 64 MiB here, which must not delay
/// the restore or the restored process's first steps); any failure only leaves pages to
/// be read from the disk when needed.
fn read_ahead(pid: i32, reader: &PagesReader, ranges: &[LazyRange], stop: &Arc<AtomicBool>) {
    let mut extents: Vec<(usize, u64, u64)> = Vec::new();
    for r in ranges {
        let Ok(segments) = reader.resolve_range(r.vaddr, r.len) else {
            continue;
        };
        for seg in segments {
            if let images_format::PageSource::File { layer, offset } = seg.source {
                match extents.last_mut() {
                    Some((l, o, len)) if *l == layer && *o + *len == offset => *len += seg.len,
                    _ => extents.push((layer, offset, seg.len)),
                }
            }
        }
    }
    let mut files: Vec<(std::fs::File, Vec<(u64, u64)>)> = Vec::new();
    for layer in 0..reader.layers() {
        let mine: Vec<(u64, u64)> = extents
            .iter()
            .filter(|e| e.0 == layer)
            .map(|e| (e.1, e.2))
            .collect();
        if mine.is_empty() {
            continue;
        }
        if let Some(file) = reader.pages_file(layer).and_then(|f| f.try_clone().ok()) {
            files.push((file, mine));
        }
    }
    if files.is_empty() {
        return;
    }
    let stop = Arc::clone(stop);
    let spawned = std::thread::Builder::new()
        .name(format!("readahead-{pid}"))
        .spawn(move || {
            // Only spare CPU time: the pages are wanted soon, the restore and the faults
            // now. On Linux this lowers this thread alone.
            if let Err(errno) = rustix::process::setpriority_process(None, 19) {
                tracing::debug!(pid, %errno, "read-ahead at normal priority");
            }
            for (file, extents) in files {
                for (offset, len) in extents {
                    let mut at = offset;
                    while at < offset + len {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let step = READAHEAD_CHUNK.min(offset + len - at);
                        let advised = rustix::fs::fadvise(
                            &file,
                            at,
                            std::num::NonZeroU64::new(step),
                            rustix::fs::Advice::WillNeed,
                        );
                        if let Err(errno) = advised {
                            tracing::debug!(pid, %errno, "read-ahead of the pages image stopped");
                            return;
                        }
                        at += step;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        tracing::debug!(pid, %error, "no read-ahead of the pages image");
    }
}

/// A connection to the dump side's page server, asking for pages with `PS_IOV_GET`.
#[derive(Debug)]
pub struct RemotePages {
    client: PageServerClient,
    /// The same connection, for the flagged frames the client does not write.
    raw: TcpStream,
    /// Restore sent its end marker.
    resumed: bool,
    /// A GET flagged [`GET_RESUMED`] was answered.
    told: bool,
    /// Flag every GET with [`GET_ZSTD`].
    compress: bool,
    /// Per GET not answered yet, oldest first: whether it said the tasks run, and the
    /// pages it asked for.
    asked: VecDeque<(bool, u64)>,
}

impl RemotePages {
    /// Connects to the page server.
    pub fn connect(addr: SocketAddr) -> Result<RemotePages, SourceError> {
        let stream = TcpStream::connect(addr)
            .map_err(|source| SourceError::Connect(ClientError::Connect { addr, source }))?;
        RemotePages::from_stream(stream)
    }

    /// Uses a connected stream.
    pub fn from_stream(stream: TcpStream) -> Result<RemotePages, SourceError> {
        let raw = stream.try_clone().map_err(SourceError::Notify)?;
        let client = PageServerClient::from_stream(stream).map_err(SourceError::Connect)?;
        // Only requests go this way, each of them awaited: no cork, no Nagle. The client
        // corked the socket for pushing pages, which a daemon never does.
        rustix::net::sockopt::set_tcp_cork(&raw, false)
            .map_err(|e| SourceError::Notify(e.into()))?;
        raw.set_nodelay(true).map_err(SourceError::Notify)?;
        Ok(RemotePages {
            client,
            raw,
            resumed: false,
            told: false,
            compress: false,
            asked: VecDeque::new(),
        })
    }

    /// Writes a frame of ours (the socket is neither corked nor delayed: it leaves now).
    fn send_raw(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.raw.write_all(&frame.encode())
    }

    /// One `PS_IOV_GET` for as many pages as `buf` holds; returns the bytes received.
    /// Answers to earlier [`RemotePages::request`]s must have been read.
    pub fn get(&mut self, pid: i32, vaddr: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        self.request(pid, vaddr, buf.len() as u64 / PAGE_SIZE)?;
        self.receive(pid, vaddr, buf)
    }

    /// Sends a `PS_IOV_GET` for `nr_pages` from `vaddr` without waiting for the answer.
    /// The source answers in order; several GETs in flight keep the link busy while the
    /// daemon copies what came.
    pub fn request(&mut self, pid: i32, vaddr: u64, nr_pages: u64) -> Result<(), SourceError> {
        let id = u64::try_from(pid).map_err(|_| SourceError::UnknownPid { pid })?;
        let mut get = Frame::get(id, vaddr, nr_pages);
        get.flags = if self.resumed {
            GET_RESUMED
        } else {
            GET_BEFORE_RESUME
        };
        if self.compress {
            get.flags |= GET_ZSTD;
        }
        self.send_raw(&get).map_err(|source| SourceError::Remote {
            pid,
            vaddr,
            nr_pages,
            source: ClientError::Send {
                command: Command::Get,
                sent: 0,
                source,
            },
        })?;
        self.asked.push_back((self.resumed, nr_pages));
        Ok(())
    }

    /// Whether the whole answer to the oldest GET has arrived, so that
    /// [`RemotePages::receive`] will not wait for the link; also true when the connection
    /// ended or the answer is malformed (receiving reports it). Never waits.
    ///
    /// A daemon that read an answer as soon as its first bytes came would stop hearing
    /// faults for as long as the rest takes on the wire (1.8 ms for 16 KiB at 10 Mbit/s),
    /// and ask for them only behind the next answer.
    pub fn answer_ready(&self) -> Result<bool, SourceError> {
        use ckpt_page_server::compress::LEN_BYTES;
        use ckpt_page_server::protocol::FRAME_LEN;
        let mut head = [0u8; FRAME_LEN + LEN_BYTES];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        let got = match rustix::net::recv(&self.raw, &mut head[..], flags) {
            Ok((got, _)) => got,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ok(false),
            // The read that follows reports it.
            Err(_) => return Ok(true),
        };
        if got == 0 {
            return Ok(true);
        }
        let Some(frame) = head.first_chunk::<FRAME_LEN>().filter(|_| got >= FRAME_LEN) else {
            return Ok(false);
        };
        let Ok(frame) = Frame::decode(frame) else {
            return Ok(true);
        };
        let asked = self.asked.front().map_or(0, |&(_, n)| n);
        if frame.command != Command::AddF || frame.nr_pages == 0 || frame.nr_pages > asked {
            return Ok(true);
        }
        let needed = if frame.is_zstd() {
            if got < FRAME_LEN + LEN_BYTES {
                return Ok(false);
            }
            let mut len = [0u8; LEN_BYTES];
            len.copy_from_slice(&head[FRAME_LEN..]);
            let len = u64::from(u32::from_le_bytes(len));
            if len > frame.nr_pages * PAGE_SIZE + PAGE_SIZE {
                return Ok(true);
            }
            (FRAME_LEN + LEN_BYTES) as u64 + len
        } else {
            FRAME_LEN as u64 + frame.nr_pages * PAGE_SIZE
        };
        let queued = rustix::io::ioctl_fionread(&self.raw).unwrap_or(u64::MAX);
        Ok(queued >= needed)
    }

    /// Reads the answer to the oldest GET not answered yet, asked for `pid`'s pages from
    /// `vaddr` on, as many as `buf` holds; returns the bytes received (at least a page).
    pub fn receive(&mut self, pid: i32, vaddr: u64, buf: &mut [u8]) -> Result<usize, SourceError> {
        let nr_pages = buf.len() as u64 / PAGE_SIZE;
        let id = u64::try_from(pid).map_err(|_| SourceError::UnknownPid { pid })?;
        let said_resumed = self
            .asked
            .pop_front()
            .map_or(self.resumed, |(said, _)| said);
        let reply = self
            .client
            .receive_pages(id, vaddr, buf)
            .map_err(|source| SourceError::Remote {
                pid,
                vaddr,
                nr_pages,
                source,
            })?;
        self.told |= said_resumed;
        usize::try_from(reply.nr_pages * PAGE_SIZE).map_err(|_| SourceError::UnknownPid { pid })
    }

    /// GETs sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.asked.len()
    }

    /// Restore sent its end marker: the GETs from now on say so.
    pub fn resumed(&mut self) {
        self.resumed = true;
    }

    /// Ask for compressed answers (GET_ZSTD) from now on.
    pub fn set_compress_pages(&mut self, on: bool) {
        self.compress = on;
    }

    /// The pages received so far: raw size and bytes on the wire.
    pub fn traffic(&self) -> PageTraffic {
        self.client.pages_pulled()
    }

    /// Whether the source answered a GET that said the destination runs.
    pub fn told_resumed(&self) -> bool {
        self.told
    }

    /// Sends `PS_IOV_CLOSE` (flagged [`GET_RESUMED`] after restore's end marker, so that
    /// the source knows the destination runs even if no GET followed) and waits for the
    /// server's status.
    pub fn close(mut self) -> Result<(), SourceError> {
        self.traffic().log("pages received: raw vs wire bytes");
        if !self.resumed {
            return self.client.close().map_err(SourceError::Close);
        }
        let mut close = Frame::close();
        close.flags = GET_RESUMED;
        let io = |source| {
            SourceError::Close(ClientError::Send {
                command: Command::Close,
                sent: 0,
                source,
            })
        };
        self.send_raw(&close).map_err(io)?;
        let mut answer = [0u8; 4];
        std::io::Read::read_exact(&mut self.raw, &mut answer).map_err(io)?;
        match i32::from_le_bytes(answer) {
            0 => Ok(()),
            status => Err(SourceError::Close(ClientError::Status { status })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const P: u64 = PAGE_SIZE;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; P as usize]
    }

    fn images() -> (tempfile::TempDir, ImageDir) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = ImageDir::create_dir(tmp.path().join("img")).expect("dir");
        let mut w = dir
            .pagemap_writer(ImageKind::Pagemap, 10, 1)
            .expect("writer");
        w.add_present(0x10000, &page(1)).expect("present");
        w.add_with_data(
            0x11000,
            PageFlags::PRESENT | PageFlags::LAZY,
            &[page(2), page(3)].concat(),
        )
        .expect("lazy");
        w.add_with_data(0x20000, PageFlags::PRESENT | PageFlags::LAZY, &page(4))
            .expect("lazy");
        w.add_hole(0x30000, 2, PageFlags::LAZY)
            .expect("remote lazy");
        w.finish().expect("finish");
        (tmp, dir)
    }

    #[test]
    fn a_pagemap_opened_early_is_used_unless_replaced_since() {
        let (tmp, dir) = images();
        let path = dir.path().to_path_buf();
        let mut kept = Pages::new(ImageDir::new(&path).expect("dir"), PageSource::Local);
        kept.open_early();
        assert!(kept.early.contains_key(&10));
        assert_eq!(kept.open_task(10).expect("open").len(), 3);
        assert!(kept.early.is_empty());
        let mut replaced = Pages::new(dir, PageSource::Local);
        replaced.open_early();
        // Restore's way: the new pagemap written aside, then renamed over the old one.
        let aside = ImageDir::create_dir(tmp.path().join("aside")).expect("dir");
        let mut w = aside
            .pagemap_writer(ImageKind::Pagemap, 10, 2)
            .expect("writer");
        w.add_with_data(0x50000, PageFlags::PRESENT | PageFlags::LAZY, &page(5))
            .expect("lazy");
        w.finish().expect("finish");
        for name in ["pagemap-10.img", "pages-2.img"] {
            std::fs::rename(aside.path().join(name), path.join(name)).expect("rename");
        }
        assert_eq!(
            replaced.open_task(10).expect("open"),
            [LazyRange {
                vaddr: 0x50000,
                len: P
            }]
        );
        let mut buf = vec![0u8; P as usize];
        replaced.fetch(10, 0x50000, &mut buf).expect("fetch");
        assert_eq!(buf[0], 5);
    }

    #[test]
    fn only_lazy_entries_are_lazy_ranges() {
        let (_tmp, dir) = images();
        let mut pages = Pages::new(dir, PageSource::Local);
        let ranges = pages.open_task(10).expect("open");
        assert_eq!(
            ranges,
            [
                LazyRange {
                    vaddr: 0x11000,
                    len: 2 * P
                },
                LazyRange {
                    vaddr: 0x20000,
                    len: P
                },
                LazyRange {
                    vaddr: 0x30000,
                    len: 2 * P
                },
            ]
        );
        let mut buf = vec![0u8; 2 * P as usize];
        assert_eq!(
            pages.fetch(10, 0x11000, &mut buf).expect("fetch"),
            buf.len()
        );
        assert_eq!((buf[0], buf[P as usize]), (2, 3));
        // Lazy pages without data cannot come from local images.
        assert!(matches!(
            pages.fetch(10, 0x30000, &mut buf),
            Err(SourceError::Read { pid: 10, .. })
        ));
        assert!(matches!(
            pages.fetch(11, 0x11000, &mut buf),
            Err(SourceError::UnknownPid { pid: 11 })
        ));
        assert!(matches!(
            pages.open_task(12),
            Err(SourceError::Pagemap { pid: 12, .. })
        ));
    }

    #[test]
    fn remote_get_reads_a_short_reply_and_close_reads_the_status() {
        use ckpt_page_server::Frame;
        use std::io::{Read, Write};

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = [0u8; 32];
            s.read_exact(&mut req).expect("get");
            let get = Frame::decode(&req).expect("frame");
            // Before restore's end marker: flagged, so the source stays ready to resume.
            let mut want = Frame::get(33, 0x5000, 4);
            want.flags = GET_BEFORE_RESUME;
            assert_eq!(get, want);
            // Only two of the four pages.
            s.write_all(&Frame::add_f(33, 0x5000, 2, 4).encode())
                .expect("reply");
            s.write_all(&[page(9), page(8)].concat()).expect("data");
            // After restore's end marker, GETs say the destination runs.
            s.read_exact(&mut req).expect("get");
            assert_eq!(Frame::decode(&req).expect("frame").flags, GET_RESUMED);
            s.write_all(&Frame::add_f(33, 0x9000, 0, 4).encode())
                .expect("none");
            // The session is unusable after a bad reply: the client drops it.
        });
        let mut remote = RemotePages::connect(addr).expect("connect");
        let mut buf = vec![0u8; 4 * P as usize];
        assert_eq!(
            remote.get(33, 0x5000, &mut buf).expect("get"),
            2 * P as usize
        );
        assert_eq!((buf[0], buf[P as usize]), (9, 8));
        remote.resumed();
        assert!(!remote.told_resumed());
        assert!(matches!(
            remote.get(33, 0x9000, &mut buf),
            Err(SourceError::Remote {
                pid: 33,
                vaddr: 0x9000,
                ..
            })
        ));
        server.join().expect("server");
    }

    /// Polls `ready` until it says yes, for at most five seconds.
    fn eventually(remote: &RemotePages) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if remote.answer_ready().expect("peek") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn pipelined_answers_are_read_in_order_once_whole() {
        use ckpt_page_server::Frame;
        use std::io::{Read, Write};
        use std::sync::mpsc;

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // The client says when it has looked, so that the server's next write comes after.
        let (step_tx, step_rx) = mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = [0u8; 32];
            s.read_exact(&mut req).expect("first get");
            assert_eq!(Frame::decode(&req).expect("frame").flags, GET_BEFORE_RESUME);
            s.read_exact(&mut req).expect("second get");
            assert_eq!(Frame::decode(&req).expect("frame").flags, GET_RESUMED);
            // The first answer in two parts: not whole after the first.
            s.write_all(&Frame::add_f(33, 0x5000, 2, 4).encode())
                .expect("header");
            s.write_all(&page(1)).expect("page");
            step_rx.recv().expect("looked");
            s.write_all(&page(2)).expect("page");
            s.write_all(&Frame::add_f(33, 0x9000, 1, 4).encode())
                .expect("header");
            s.write_all(&page(3)).expect("page");
            step_rx.recv().expect("read");
            // The end of the connection is ready too: reading reports it.
        });
        let mut remote = RemotePages::connect(addr).expect("connect");
        assert!(!remote.answer_ready().expect("nothing asked"));
        remote.request(33, 0x5000, 2).expect("first");
        remote.resumed();
        remote.request(33, 0x9000, 1).expect("second");
        assert_eq!(remote.in_flight(), 2);
        // The header and one of two pages: give them time to arrive, and still not whole.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rustix::io::ioctl_fionread(&remote.raw).expect("fionread") < 32 + P
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!remote.answer_ready().expect("half"));
        step_tx.send(()).expect("step");
        assert!(eventually(&remote));
        let mut buf = vec![0u8; 2 * P as usize];
        assert_eq!(
            remote.receive(33, 0x5000, &mut buf).expect("first"),
            buf.len()
        );
        assert_eq!((buf[0], buf[P as usize]), (1, 2));
        // Asked before the end marker: the source does not know the tasks run yet.
        assert!(!remote.told_resumed());
        assert!(eventually(&remote));
        assert_eq!(
            remote
                .receive(33, 0x9000, &mut buf[..P as usize])
                .expect("second"),
            P as usize
        );
        assert_eq!(buf[0], 3);
        assert!(remote.told_resumed());
        assert_eq!(remote.in_flight(), 0);
        step_tx.send(()).expect("step");
        server.join().expect("server");
        assert!(eventually(&remote), "the end is ready to be read");
    }

    #[test]
    fn compressed_answers_are_asked_for_and_read() {
        use ckpt_page_server::{Frame, PageCompressor, PE_ZSTD};
        use std::io::{Read, Write};

        // Mostly zero, as lazy pages of a real process often are.
        let mut data = vec![0u8; 4 * P as usize];
        for (i, b) in data.iter_mut().enumerate().step_by(512) {
            *b = (i / 512) as u8 + 1;
        }
        let sent = data.clone();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = [0u8; 32];
            s.read_exact(&mut req).expect("get");
            let get = Frame::decode(&req).expect("frame");
            assert_eq!(get.flags, GET_BEFORE_RESUME | GET_ZSTD);
            let mut compressor = PageCompressor::new().expect("compressor");
            let reply = Frame::add_f(33, 0x5000, 4, 4);
            let bytes = compressor.encode(&reply, &sent).expect("compressible");
            assert_eq!(bytes[2..4], (PE_ZSTD | 4).to_le_bytes()[..]);
            s.write_all(bytes).expect("reply");
            // A raw answer is still read after a compressed one.
            s.read_exact(&mut req).expect("get");
            assert_eq!(
                Frame::decode(&req).expect("frame").flags,
                GET_RESUMED | GET_ZSTD
            );
            s.write_all(&Frame::add_f(33, 0x9000, 1, 4).encode())
                .expect("raw");
            s.write_all(&page(7)).expect("page");
            s.read_exact(&mut req).expect("close");
            s.write_all(&0i32.to_le_bytes()).expect("status");
        });
        let mut remote = RemotePages::connect(addr).expect("connect");
        remote.set_compress_pages(true);
        let mut buf = vec![0u8; 4 * P as usize];
        assert_eq!(remote.get(33, 0x5000, &mut buf).expect("get"), buf.len());
        assert!(buf == data);
        remote.resumed();
        assert_eq!(
            remote.get(33, 0x9000, &mut buf[..P as usize]).expect("get"),
            P as usize
        );
        assert!(buf[..P as usize] == page(7)[..]);
        let traffic = remote.traffic();
        assert_eq!((traffic.frames, traffic.zstd_frames), (2, 1));
        assert_eq!(traffic.raw_bytes, 5 * P);
        assert!(traffic.wire_bytes < 2 * P, "{traffic:?}");
        remote.close().expect("close");
        server.join().expect("server");
    }
}
