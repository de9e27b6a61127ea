//! The page server: accepts one connection and either receives the pages of a dump into an
//! image directory (push) or serves saved pages to a lazy-pages daemon (pull). See
//! [`crate::protocol`] for the message sequence.
//!
//! Receiving, every image of the session is written under a temporary name
//! (`.pagemap-42.img.part`) and renamed into place only when CLOSE arrives, pages images
//! before the pagemaps that name them. A session that ends any other way (the connection
//! drops, a frame is bad, a write fails) removes what it wrote: a restore never finds a
//! pagemap whose pages were cut short.
//!
//! Frames are read through a 256 KiB input buffer, so that one read(2) brings in many of the
//! small frames of scattered pages; their page data is gathered and written to the pages
//! image in 1 MiB writes. Large runs of pages go straight from the socket to the file
//! (splice, or the copy buffer), and the read after one fetches only the next frame header.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use images_format::pb::PagemapHead;
use images_format::{
    ImageDir, ImageError, ImageKind, ImageWriter, PageFlags, PageRange, PageSource, Pagemap,
    PagesError, PagesReader, PAGE_SIZE,
};
use rustix::pipe::{self, PipeFlags, SpliceFlags};

use crate::compress::{self, PageCompressor, PageDecompressor, PageTraffic, ZstdError};
use crate::protocol::{
    Command, Frame, PagemapId, ProtocolError, FIRST_PAGES_ID, FRAME_LEN, GET_ZSTD, WIRE_FLAGS,
};

/// Most pages one GET is answered with (CRIU's lazy-pages daemon asks for at most 4 MiB).
pub const MAX_GET_PAGES: u64 = 1024;

/// Size of the pipe the splice path moves pages through, and of the copy path's buffer.
const CHUNK: usize = 1 << 20;
/// The input buffer frames are read through: one read(2) brings in many small frames.
const INPUT: usize = 256 << 10;
/// Page data still to come beyond this goes straight from the socket to the file (splice or
/// the copy buffer); less is read through the input buffer with the frames that follow it.
const DIRECT: u64 = 64 << 10;

/// What the server does with its one connection.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where images are written (push) or read (pull).
    pub images_dir: PathBuf,
    /// Made the target of `images_dir/parent`, relative to `images_dir` if relative.
    pub prev_images_dir: Option<PathBuf>,
    /// Serve GET requests from the images instead of receiving a dump.
    pub lazy_pages: bool,
    /// fsync every image and the directory before answering CLOSE.
    pub sync: bool,
    pub receive: ReceiveMode,
    /// Accept only a connection from this address; others are closed unserved.
    pub peer: Option<IpAddr>,
}

impl ServerOptions {
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        ServerOptions {
            images_dir: images_dir.into(),
            prev_images_dir: None,
            lazy_pages: false,
            sync: false,
            receive: ReceiveMode::default(),
            peer: None,
        }
    }
}

/// How page data goes from the socket to the pages image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReceiveMode {
    /// socket -> pipe -> file with splice(2): the data is never copied to user space.
    #[default]
    Splice,
    /// read(2) into a 1 MiB buffer, write(2) to the file.
    Copy,
}

/// What a session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub pagemaps: u64,
    pub entries: u64,
    pub pages_received: u64,
    pub pages_served: u64,
    /// Bytes read from the connection.
    pub bytes: u64,
    /// The page data received (push) or served (pull): raw size and bytes on the wire,
    /// which are fewer for PE_ZSTD frames (see [`crate::compress`]).
    pub page_traffic: PageTraffic,
    pub elapsed: Duration,
}

/// A failure of the page server. Offsets count the bytes read from the connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("accept a connection")]
    Accept(#[source] io::Error),
    #[error("prepare the image directory")]
    ImageDir(#[source] ImageError),
    #[error("read a frame at stream offset {offset}")]
    Receive {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("connection lost at stream offset {offset}, {got} bytes into a frame")]
    TruncatedFrame { offset: u64, got: usize },
    #[error("connection closed at stream offset {offset} without CLOSE{}; nothing was kept",
        image.as_ref().map(|i| format!(" while {i} was open")).unwrap_or_default())]
    Disconnected { offset: u64, image: Option<String> },
    #[error("{image}: connection lost at stream offset {offset} after {received} of {expected} bytes of the pages at {vaddr:#x}; nothing was kept")]
    PagesCut {
        image: String,
        vaddr: u64,
        received: u64,
        expected: u64,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("bad frame at stream offset {offset}")]
    Frame {
        offset: u64,
        #[source]
        source: ProtocolError,
    },
    #[error("{image}: {nr_pages} pages at {vaddr:#x} with flags {flags:#x} (stream offset {offset}): {reason}")]
    BadRange {
        image: String,
        offset: u64,
        vaddr: u64,
        nr_pages: u64,
        flags: u32,
        reason: &'static str,
    },
    #[error("{image}: the pages at {missing:#x} (in a hole of {nr_pages} pages at {vaddr:#x}) are not in the parent images")]
    HoleNotInParent {
        image: String,
        vaddr: u64,
        nr_pages: u64,
        missing: u64,
    },
    #[error("{image}: opened a second time in one session")]
    Reopened { image: String },
    #[error("{command:?} at stream offset {offset} is not served by a page server that {mode}")]
    UnexpectedCommand {
        offset: u64,
        command: Command,
        mode: &'static str,
    },
    #[error("send the answer to {command:?} at stream offset {offset}")]
    Answer {
        offset: u64,
        command: Command,
        #[source]
        source: io::Error,
    },
    #[error("write images")]
    Image(#[from] ImageError),
    #[error("{path}: write pages")]
    WritePages {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op}")]
    Commit {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("unexpected data after CLOSE at stream offset {offset}")]
    DataAfterClose { offset: u64 },
    #[error("pid {pid}: read saved pages")]
    ReadPages {
        pid: u64,
        #[source]
        source: PagesError,
    },
    #[error("pid {pid}: no saved page at {vaddr:#x} to serve")]
    NotSaved { pid: u64, vaddr: u64 },
    #[error("{image}: the compressed pages at {vaddr:#x} (stream offset {offset}) are unusable")]
    BadCompressed {
        image: String,
        vaddr: u64,
        offset: u64,
        #[source]
        source: ZstdError,
    },
    #[error("set up compression for GET {vaddr:#x} of pid {pid}")]
    Compression {
        pid: u64,
        vaddr: u64,
        #[source]
        source: ZstdError,
    },
    #[error("create the pipe pages are spliced through")]
    Pipe(#[source] io::Error),
}

/// A listening page server.
#[derive(Debug)]
pub struct PageServer {
    listener: TcpListener,
    dir: ImageDir,
    opts: ServerOptions,
}

impl PageServer {
    /// Listens on `addr` (that address only) and prepares the image directory.
    pub fn bind(addr: SocketAddr, opts: ServerOptions) -> Result<Self, ServerError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ServerError::Listen { addr, source })?;
        PageServer::with_listener(listener, opts)
    }

    /// Uses an already listening socket (the daemon's parent bound it).
    pub fn with_listener(listener: TcpListener, opts: ServerOptions) -> Result<Self, ServerError> {
        let dir = if opts.lazy_pages {
            ImageDir::new(&opts.images_dir)
        } else {
            ImageDir::create_dir(&opts.images_dir)
        }
        .map_err(ServerError::ImageDir)?;
        if let Some(prev) = &opts.prev_images_dir {
            dir.set_parent(prev).map_err(ServerError::ImageDir)?;
        }
        Ok(PageServer {
            listener,
            dir,
            opts,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Accepts one connection, stops listening, and serves it to its end.
    pub fn serve_one(self) -> Result<SessionStats, ServerError> {
        let (stream, peer) = loop {
            let (stream, peer) = self.listener.accept().map_err(ServerError::Accept)?;
            // Pages are process memory: they go to, or come from, the named peer only.
            if self.opts.peer.is_none_or(|allowed| allowed == peer.ip()) {
                break (stream, peer);
            }
            tracing::warn!(%peer, "connection from another peer refused");
        };
        drop(self.listener);
        let _span = tracing::info_span!("session", %peer).entered();
        tracing::info!("accepted");
        let stats = serve_tcp(stream, &self.dir, &self.opts)?;
        tracing::info!(
            pagemaps = stats.pagemaps,
            pages_received = stats.pages_received,
            pages_served = stats.pages_served,
            bytes = stats.bytes,
            secs = stats.elapsed.as_secs_f64(),
            "session over"
        );
        let what = if self.opts.lazy_pages {
            "pages served: raw vs wire bytes"
        } else {
            "pages received: raw vs wire bytes"
        };
        stats.page_traffic.log(what);
        Ok(stats)
    }
}

/// Serves one TCP connection.
pub fn serve_tcp(
    stream: TcpStream,
    dir: &ImageDir,
    opts: &ServerOptions,
) -> Result<SessionStats, ServerError> {
    // The only things we send are small answers the client is waiting for.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::warn!(%error, "cannot set TCP_NODELAY");
    }
    serve(stream, dir, opts)
}

/// Serves one connection (any stream socket) to its end.
pub fn serve<S: Read + Write + AsFd>(
    stream: S,
    dir: &ImageDir,
    opts: &ServerOptions,
) -> Result<SessionStats, ServerError> {
    let started = Instant::now();
    let mut session = Session {
        stream,
        dir,
        opts,
        offset: 0,
        open: None,
        done: Vec::new(),
        staging: Staging::default(),
        next_pages_id: FIRST_PAGES_ID,
        input: Input::default(),
        receiver: Receiver::new(opts.receive)?,
        readers: HashMap::new(),
        compressor: None,
        decompressor: None,
        compressed: Vec::new(),
        stats: SessionStats::default(),
    };
    let result = session.run();
    session.stats.bytes = session.offset;
    session.stats.elapsed = started.elapsed();
    result.map(|()| session.stats)
}

struct Session<'a, S> {
    stream: S,
    dir: &'a ImageDir,
    opts: &'a ServerOptions,
    /// Bytes of the stream consumed so far (read and not just buffered).
    offset: u64,
    open: Option<Incoming>,
    /// Pagemaps written and closed in this session.
    done: Vec<PagemapId>,
    staging: Staging,
    next_pages_id: u32,
    input: Input,
    receiver: Receiver,
    readers: HashMap<u64, PagesReader>,
    /// Made at the first GET flagged GET_ZSTD, and the first PE_ZSTD frame.
    compressor: Option<PageCompressor>,
    decompressor: Option<PageDecompressor>,
    /// The compressed bytes of the PE_ZSTD frame being received.
    compressed: Vec<u8>,
    stats: SessionStats,
}

/// The pagemap being received.
struct Incoming {
    id: PagemapId,
    dst_id: u64,
    name: String,
    pagemap: ImageWriter<BufWriter<File>>,
    pages: File,
    /// Page data received and not yet written to `pages`: small runs are gathered into
    /// one write.
    pending: Vec<u8>,
    pages_path: PathBuf,
    /// End of the last range: a pagemap lists its ranges in increasing order.
    last_end: u64,
    parent: Option<Pagemap>,
}

impl Incoming {
    /// Writes the gathered page data to the pages file.
    fn write_pending(&mut self) -> Result<(), ServerError> {
        (&self.pages)
            .write_all(&self.pending)
            .map_err(|source| ServerError::WritePages {
                path: self.pages_path.clone(),
                source,
            })?;
        self.pending.clear();
        Ok(())
    }
}

impl<S: Read + Write + AsFd> Session<'_, S> {
    fn run(&mut self) -> Result<(), ServerError> {
        let mode = if self.opts.lazy_pages {
            "serves lazy pages"
        } else {
            "receives a dump"
        };
        loop {
            let at = self.offset;
            let Some(frame) = self.read_frame()? else {
                if self.opts.lazy_pages {
                    return Ok(());
                }
                return Err(ServerError::Disconnected {
                    offset: self.offset,
                    image: self.open.as_ref().map(|o| o.name.clone()),
                });
            };
            match (frame.command, self.opts.lazy_pages) {
                (Command::Close | Command::ForceClose, _) => {
                    let status = if self.opts.lazy_pages {
                        Ok(())
                    } else {
                        self.commit()
                    };
                    let code: i32 = if status.is_ok() { 0 } else { -1 };
                    // The status answers "did every byte arrive and land": only then 0.
                    self.answer(frame.command, at, &code.to_le_bytes())?;
                    status?;
                    // FORCE_CLOSE comes over a socket another process may keep open:
                    // its end of file may never come.
                    if frame.command == Command::ForceClose {
                        return Ok(());
                    }
                    return self.wait_for_close();
                }
                (Command::Get, true) => self.serve_get(&frame, at)?,
                (Command::Open, false) => self.open(&frame, at, false)?,
                (Command::Open2, false) => self.open(&frame, at, true)?,
                (Command::Parent, false) => self.answer_parent(&frame, at)?,
                (Command::Add | Command::Hole | Command::AddF, false) => self.add(&frame, at)?,
                (command, _) => {
                    return Err(ServerError::UnexpectedCommand {
                        offset: at,
                        command,
                        mode,
                    })
                }
            }
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    fn read_frame(&mut self) -> Result<Option<Frame>, ServerError> {
        while self.input.len() < FRAME_LEN {
            match self.input.fill(&mut self.stream) {
                Ok(0) if self.input.is_empty() => return Ok(None),
                Ok(0) => {
                    return Err(ServerError::TruncatedFrame {
                        offset: self.offset + self.input.len() as u64,
                        got: self.input.len(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ServerError::Receive {
                        offset: self.offset + self.input.len() as u64,
                        source,
                    })
                }
            }
        }
        let offset = self.offset;
        let mut bytes = [0u8; FRAME_LEN];
        bytes.copy_from_slice(self.input.take(FRAME_LEN));
        self.offset += FRAME_LEN as u64;
        Frame::decode(&bytes)
            .map(Some)
            .map_err(|source| ServerError::Frame { offset, source })
    }

    fn answer(&mut self, command: Command, offset: u64, bytes: &[u8]) -> Result<(), ServerError> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|source| ServerError::Answer {
                offset,
                command,
                source,
            })
    }

    fn decode_id(&self, frame: &Frame, offset: u64) -> Result<PagemapId, ServerError> {
        PagemapId::decode(frame.dst_id).map_err(|source| ServerError::Frame { offset, source })
    }

    fn answer_parent(&mut self, frame: &Frame, at: u64) -> Result<(), ServerError> {
        let id = self.decode_id(frame, at)?;
        let exists = match self.dir.parent().map_err(ServerError::ImageDir)? {
            Some(parent) => parent.file_path(id.image_kind(), id.id).exists(),
            None => false,
        };
        tracing::debug!(image = %id.file_name(), exists, "parent query");
        self.answer(Command::Parent, at, &i32::from(exists).to_le_bytes())
    }

    fn open(&mut self, frame: &Frame, at: u64, answer: bool) -> Result<(), ServerError> {
        let id = self.decode_id(frame, at)?;
        self.finish_open()?;
        let name = id.file_name();
        if self.done.contains(&id) {
            return Err(ServerError::Reopened { image: name });
        }
        let pages_id = self.take_pages_id();
        let pages_name = ImageKind::Pages.file_name(u64::from(pages_id));
        let pages = self.staging.create(self.dir, &pages_name)?;
        let pagemap_file = self.staging.create(self.dir, &name)?;
        let mut pagemap = ImageWriter::new(
            BufWriter::with_capacity(64 << 10, pagemap_file),
            id.image_kind(),
            name.clone(),
        )?;
        pagemap.write_entry(&PagemapHead { pages_id })?;
        let parent = self.parent_pagemap(id);
        tracing::debug!(image = %name, pages_id, has_parent = parent.is_some(), "open");
        self.open = Some(Incoming {
            id,
            dst_id: frame.dst_id,
            name,
            pagemap,
            pages,
            pending: Vec::new(),
            pages_path: self.dir.path().join(pages_name),
            last_end: 0,
            parent,
        });
        self.stats.pagemaps += 1;
        if answer {
            let has_parent = u8::from(self.open.as_ref().is_some_and(|o| o.parent.is_some()));
            self.answer(Command::Open2, at, &[has_parent])?;
        }
        Ok(())
    }

    /// The parent's pagemap for `id`: holes are checked against it. A parent that cannot
    /// be read counts as none, so the client sends every page.
    fn parent_pagemap(&self, id: PagemapId) -> Option<Pagemap> {
        let read = || -> Result<Option<Pagemap>, PagesError> {
            let Some(parent) = self.dir.parent()? else {
                return Ok(None);
            };
            let Some(mut reader) = parent.open_optional(id.image_kind(), id.id)? else {
                return Ok(None);
            };
            Pagemap::read(&mut reader).map(Some)
        };
        read().unwrap_or_else(|error| {
            tracing::warn!(image = %id.file_name(), %error, "parent pagemap unreadable; no holes accepted");
            None
        })
    }

    fn take_pages_id(&mut self) -> u32 {
        // Skip ids a file in the directory already has: a later rename would replace it.
        while self.next_pages_id < u32::MAX
            && self
                .dir
                .exists(ImageKind::Pages, u64::from(self.next_pages_id))
        {
            self.next_pages_id += 1;
        }
        let id = self.next_pages_id;
        self.next_pages_id = self.next_pages_id.saturating_add(1);
        id
    }

    /// Closes the open pagemap (its files stay staged until CLOSE).
    fn finish_open(&mut self) -> Result<(), ServerError> {
        if let Some(mut open) = self.open.take() {
            open.write_pending()?;
            let file =
                open.pagemap
                    .finish()?
                    .into_inner()
                    .map_err(|e| ServerError::WritePages {
                        path: self.dir.path().join(&open.name),
                        source: e.into_error(),
                    })?;
            self.staging.keep(file);
            self.staging.keep(open.pages);
            self.done.push(open.id);
        }
        Ok(())
    }

    fn add(&mut self, frame: &Frame, at: u64) -> Result<(), ServerError> {
        if self.open.as_ref().is_none_or(|o| o.dst_id != frame.dst_id) {
            // Clients from before OPEN2 send pages without opening first.
            self.open(frame, at, false)?;
        }
        let open = self.open.as_mut().expect("opened above");
        let flags = frame.page_flags();
        let bad = |reason| ServerError::BadRange {
            image: open.name.clone(),
            offset: at,
            vaddr: frame.vaddr,
            nr_pages: frame.nr_pages,
            flags: flags.bits(),
            reason,
        };
        let range = check_range(frame, flags).map_err(bad)?;
        if range.vaddr < open.last_end {
            return Err(bad("below the end of the previous range"));
        }
        if flags.contains(PageFlags::PARENT) {
            check_in_parent(open, &range)?;
        }
        for entry in range.to_entries() {
            open.pagemap.write_entry(&entry)?;
            self.stats.entries += 1;
        }
        open.last_end = range.end();
        if !flags.contains(PageFlags::PRESENT) {
            return Ok(());
        }
        if frame.is_zstd() {
            return self.add_compressed(frame, at);
        }
        let open = self.open.as_mut().expect("opened above");
        let expected = range.len();
        let mut received = 0u64;
        let result = receive_pages(
            &mut self.input,
            &mut self.receiver,
            &mut self.stream,
            &open.pages,
            &mut open.pending,
            expected,
            &mut received,
        );
        self.offset += received;
        match result {
            Ok(()) => {
                self.stats.pages_received += range.nr_pages;
                self.stats.page_traffic.add_raw(expected);
                Ok(())
            }
            Err(ReceiveError::Socket(source)) => Err(ServerError::PagesCut {
                image: open.name.clone(),
                vaddr: range.vaddr,
                received,
                expected,
                offset: self.offset,
                source,
            }),
            Err(ReceiveError::File(source)) => Err(ServerError::WritePages {
                path: open.pages_path.clone(),
                source,
            }),
        }
    }

    /// The data of a PE_ZSTD frame (its pagemap entry is written): L and the zstd frame,
    /// read through the input buffer (they are small, and the frames after them come in
    /// the same read), decompressed into the pending page data.
    fn add_compressed(&mut self, frame: &Frame, at: u64) -> Result<(), ServerError> {
        let open = self.open.as_mut().expect("the caller opened it");
        let bad = |offset, source| ServerError::BadCompressed {
            image: open.name.clone(),
            vaddr: frame.vaddr,
            offset,
            source,
        };
        let raw = compress::raw_len(frame).map_err(|e| bad(at, e))?;
        let cut = |received: u64, expected: u64, offset, source| ServerError::PagesCut {
            image: open.name.clone(),
            vaddr: frame.vaddr,
            received,
            expected,
            offset,
            source,
        };
        let mut len = [0u8; compress::LEN_BYTES];
        read_through(&mut self.input, &mut self.stream, &mut len)
            .map_err(|(got, e)| cut(got, len.len() as u64, self.offset + got, e))?;
        self.offset += len.len() as u64;
        let n =
            compress::check_len(u32::from_le_bytes(len), raw).map_err(|e| bad(self.offset, e))?;
        self.compressed.resize(n, 0);
        read_through(&mut self.input, &mut self.stream, &mut self.compressed)
            .map_err(|(got, e)| cut(got, n as u64, self.offset + got, e))?;
        self.offset += n as u64;
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self
                .decompressor
                .insert(PageDecompressor::new().map_err(|e| bad(at, e))?),
        };
        let start = open.pending.len();
        open.pending.resize(start + raw, 0);
        decompressor
            .decompress(&self.compressed, &mut open.pending[start..])
            .map_err(|e| bad(at, e))?;
        if open.pending.len() >= CHUNK {
            open.write_pending()?;
        }
        self.stats.pages_received += frame.nr_pages;
        self.stats
            .page_traffic
            .add_zstd(raw as u64, (compress::LEN_BYTES + n) as u64);
        Ok(())
    }

    /// Renames every staged image into place, pages before pagemaps.
    fn commit(&mut self) -> Result<(), ServerError> {
        self.finish_open()?;
        self.staging.commit(self.dir, self.opts.sync)?;
        tracing::info!(
            pagemaps = self.stats.pagemaps,
            pages = self.stats.pages_received,
            "images complete"
        );
        Ok(())
    }

    /// Waits for the client to close first, so that the TIME_WAIT state stays on its side.
    fn wait_for_close(&mut self) -> Result<(), ServerError> {
        if !self.input.is_empty() {
            return Err(ServerError::DataAfterClose {
                offset: self.offset,
            });
        }
        let mut byte = [0u8; 1];
        loop {
            return match self.stream.read(&mut byte) {
                Ok(0) => Ok(()),
                Ok(_) => Err(ServerError::DataAfterClose {
                    offset: self.offset,
                }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client may reset rather than close; the images are complete either way.
                Err(error) => {
                    tracing::warn!(%error, "connection ended badly after CLOSE");
                    Ok(())
                }
            };
        }
    }

    fn serve_get(&mut self, frame: &Frame, at: u64) -> Result<(), ServerError> {
        let pid = frame.dst_id;
        if !self.readers.contains_key(&pid) {
            let reader = PagesReader::open(self.dir, ImageKind::Pagemap, pid)
                .map_err(|source| ServerError::ReadPages { pid, source })?;
            self.readers.insert(pid, reader);
        }
        let reader = &self.readers[&pid];
        let want = frame.nr_pages.min(MAX_GET_PAGES);
        let segments = reader
            .resolve_range(frame.vaddr, want * PAGE_SIZE)
            .map_err(|source| ServerError::ReadPages { pid, source })?;
        // Answer with the saved pages that follow one another from vaddr on; the client
        // asks again for the rest.
        let mut len = 0u64;
        for seg in &segments {
            if seg.vaddr != frame.vaddr + len || !matches!(seg.source, PageSource::File { .. }) {
                break;
            }
            len += seg.len;
        }
        if len == 0 || !frame.vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(ServerError::NotSaved {
                pid,
                vaddr: frame.vaddr,
            });
        }
        let mut data = vec![0u8; usize::try_from(len).expect("at most MAX_GET_PAGES pages")];
        reader
            .read_pages(frame.vaddr, &mut data)
            .map_err(|source| ServerError::ReadPages { pid, source })?;
        let nr_pages = len / PAGE_SIZE;
        let header = Frame::add_f(
            frame.dst_id,
            frame.vaddr,
            nr_pages,
            u16::try_from(PageFlags::PRESENT.bits()).expect("PE_PRESENT fits 16 bits"),
        );
        if frame.flags & GET_ZSTD != 0 {
            let compressor = match &mut self.compressor {
                Some(c) => c,
                None => self
                    .compressor
                    .insert(
                        PageCompressor::new().map_err(|source| ServerError::Compression {
                            pid,
                            vaddr: frame.vaddr,
                            source,
                        })?,
                    ),
            };
            if let Some(bytes) = compressor.encode(&header, &data) {
                self.stream
                    .write_all(bytes)
                    .map_err(|source| ServerError::Answer {
                        offset: at,
                        command: Command::Get,
                        source,
                    })?;
                self.stats
                    .page_traffic
                    .add_zstd(len, (bytes.len() - FRAME_LEN) as u64);
                self.stats.pages_served += nr_pages;
                return Ok(());
            }
        }
        let reply = header.encode();
        write_all_vectored(
            &mut self.stream,
            &mut [IoSlice::new(&reply), IoSlice::new(&data)],
        )
        .map_err(|source| ServerError::Answer {
            offset: at,
            command: Command::Get,
            source,
        })?;
        self.stats.page_traffic.add_raw(len);
        self.stats.pages_served += nr_pages;
        Ok(())
    }
}

/// Fills `out` from what `input` holds, then through `input` from `stream`; on failure,
/// the bytes that did arrive and the error.
fn read_through<S: Read>(
    input: &mut Input,
    stream: &mut S,
    out: &mut [u8],
) -> Result<(), (u64, io::Error)> {
    let mut got = 0;
    while got < out.len() {
        if input.is_empty() {
            match input.fill(stream) {
                Ok(0) => return Err((got as u64, io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((got as u64, e)),
            }
        }
        let data = input.take(out.len() - got);
        out[got..got + data.len()].copy_from_slice(data);
        got += data.len();
    }
    Ok(())
}

/// The range of an ADD/HOLE/ADD_F frame, if it is one a dumper can send.
fn check_range(frame: &Frame, flags: PageFlags) -> Result<PageRange, &'static str> {
    if !WIRE_FLAGS.contains(flags) {
        return Err("unknown flags");
    }
    if flags.is_empty() {
        return Err("no flags: neither present, in the parent, nor lazy");
    }
    if flags.contains(PageFlags::PRESENT | PageFlags::PARENT) {
        return Err("both present and in the parent");
    }
    if frame.is_zstd() && !flags.contains(PageFlags::PRESENT) {
        return Err("PE_ZSTD without data");
    }
    if frame.nr_pages == 0 || !frame.vaddr.is_multiple_of(PAGE_SIZE) {
        return Err("not a page-aligned, non-empty range");
    }
    frame
        .nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| frame.vaddr.checked_add(len))
        .ok_or("range wraps around the address space")?;
    Ok(PageRange {
        vaddr: frame.vaddr,
        nr_pages: frame.nr_pages,
        flags,
    })
}

/// A PE_PARENT range must be covered by the parent's pagemap, or restore would find no
/// data for it.
fn check_in_parent(open: &Incoming, range: &PageRange) -> Result<(), ServerError> {
    let missing = |at| ServerError::HoleNotInParent {
        image: open.name.clone(),
        vaddr: range.vaddr,
        nr_pages: range.nr_pages,
        missing: at,
    };
    let Some(parent) = &open.parent else {
        return Err(missing(range.vaddr));
    };
    let mut cursor = range.vaddr;
    while cursor < range.end() {
        let i = parent.find(cursor).ok_or_else(|| missing(cursor))?;
        cursor = parent.ranges[i].end();
    }
    Ok(())
}

/// Images written in this session under temporary names; removed on drop unless
/// committed.
#[derive(Default)]
struct Staging {
    /// (temporary path, final path)
    paths: Vec<(PathBuf, PathBuf)>,
    files: Vec<File>,
    committed: bool,
}

impl Staging {
    fn create(&mut self, dir: &ImageDir, name: &str) -> Result<File, ServerError> {
        let temp = format!(".{name}.part");
        let file = dir.create_file(&temp)?;
        self.paths
            .push((dir.path().join(temp), dir.path().join(name)));
        Ok(file)
    }

    fn keep(&mut self, file: File) {
        self.files.push(file);
    }

    fn commit(&mut self, dir: &ImageDir, sync: bool) -> Result<(), ServerError> {
        if sync {
            for file in &self.files {
                file.sync_all().map_err(|source| ServerError::Commit {
                    path: dir.path().to_owned(),
                    op: "sync an image",
                    source,
                })?;
            }
        }
        // Pages images first: a pagemap in place always names pages that are in place.
        let (pages, pagemaps): (Vec<_>, Vec<_>) = self.paths.iter().partition(|(_, path)| {
            path.file_name()
                .and_then(|n| n.to_str())
                .and_then(ImageKind::from_file_name)
                .is_some_and(|n| n.kind == ImageKind::Pages)
        });
        for (temp, path) in pages.into_iter().chain(pagemaps) {
            fs::rename(temp, path).map_err(|source| ServerError::Commit {
                path: path.clone(),
                op: "rename into place",
                source,
            })?;
        }
        self.committed = true;
        if sync {
            dir.sync()?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for (temp, _) in &self.paths {
            match fs::remove_file(temp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => tracing::warn!(path = %temp.display(), %error, "cannot remove"),
            }
        }
    }
}

/// Bytes read from the stream and not consumed yet.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The next read stops at the end of a frame header: large pages came last, and more
    /// likely follow, which should go straight to the file rather than through here.
    header_only: bool,
}

impl Default for Input {
    fn default() -> Self {
        Input {
            buf: vec![0u8; INPUT],
            start: 0,
            end: 0,
            header_only: false,
        }
    }
}

impl Input {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// One read into the free space (what is buffered moved to the front first); the bytes
    /// read, 0 at the end of the stream.
    fn fill<S: Read>(&mut self, stream: &mut S) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let limit = if self.header_only {
            FRAME_LEN.max(self.end + 1)
        } else {
            self.buf.len()
        };
        self.header_only = false;
        let n = stream.read(&mut self.buf[self.end..limit])?;
        self.end += n;
        Ok(n)
    }

    /// Consumes `n` buffered bytes (at most what is buffered).
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.len());
        let at = self.start;
        self.start += n;
        &self.buf[at..at + n]
    }
}

/// Moves `len` bytes of page data to the end of `file`: what `input` holds first, then a
/// large rest straight from `stream` with `receiver`, a small one (a page or a few, as
/// scattered pages come) through `input`, whose one read also brings the frames after it.
/// Data taken from `input` is gathered in `pending` and written once it reaches [`CHUNK`]
/// (or before data goes to `file` another way); the caller writes what is left at the end.
fn receive_pages<S: Read + AsFd>(
    input: &mut Input,
    receiver: &mut Receiver,
    stream: &mut S,
    mut file: &File,
    pending: &mut Vec<u8>,
    len: u64,
    received: &mut u64,
) -> Result<(), ReceiveError> {
    while *received < len {
        let rest = len - *received;
        if input.is_empty() && rest > DIRECT {
            file.write_all(pending).map_err(ReceiveError::File)?;
            pending.clear();
            input.header_only = true;
            let mut direct = 0;
            let result = receiver.receive(stream, file, rest, &mut direct);
            *received += direct;
            return result;
        }
        if input.is_empty() {
            match input.fill(stream) {
                Ok(0) => return Err(ReceiveError::Socket(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReceiveError::Socket(e)),
            }
        }
        let data = input.take(usize::try_from(rest).unwrap_or(usize::MAX));
        pending.extend_from_slice(data);
        *received += data.len() as u64;
        if pending.len() >= CHUNK {
            file.write_all(pending).map_err(ReceiveError::File)?;
            pending.clear();
        }
    }
    Ok(())
}

enum ReceiveError {
    Socket(io::Error),
    File(io::Error),
}

enum Receiver {
    Splice {
        read: OwnedFd,
        write: OwnedFd,
        size: usize,
    },
    Copy(Vec<u8>),
}

impl Receiver {
    fn new(mode: ReceiveMode) -> Result<Self, ServerError> {
        Ok(match mode {
            ReceiveMode::Copy => Receiver::Copy(vec![0u8; CHUNK]),
            ReceiveMode::Splice => {
                let (read, write) =
                    pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| ServerError::Pipe(e.into()))?;
                // Larger than the default 64 KiB means fewer splice calls; the limit for
                // unprivileged users (fs.pipe-max-size) is 1 MiB by default.
                let size = pipe::fcntl_setpipe_size(&write, CHUNK)
                    .or_else(|_| pipe::fcntl_getpipe_size(&write))
                    .map_err(|e| ServerError::Pipe(e.into()))?;
                Receiver::Splice { read, write, size }
            }
        })
    }

    /// Moves `len` bytes from `stream` to the end of `file`, counting in `received`.
    fn receive<S: Read + AsFd>(
        &mut self,
        stream: &mut S,
        file: &File,
        len: u64,
        received: &mut u64,
    ) -> Result<(), ReceiveError> {
        match self {
            Receiver::Copy(buf) => copy_pages(stream, file, buf, len, received),
            Receiver::Splice { read, write, size } => {
                match splice_pages(stream, file, read, write, *size, len, received) {
                    // Not every stream splices (EINVAL): fall back once, for good.
                    Err(ReceiveError::Socket(e))
                        if *received == 0
                            && e.raw_os_error()
                                == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                    {
                        tracing::debug!("splice refused; copying instead");
                        *self = Receiver::Copy(vec![0u8; CHUNK]);
                        self.receive(stream, file, len, received)
                    }
                    other => other,
                }
            }
        }
    }
}

fn copy_pages<S: Read>(
    stream: &mut S,
    mut file: &File,
    buf: &mut [u8],
    len: u64,
    received: &mut u64,
) -> Result<(), ReceiveError> {
    while *received < len {
        let want = usize::try_from(len - *received).map_or(buf.len(), |n| n.min(buf.len()));
        let n = match stream.read(&mut buf[..want]) {
            Ok(0) => return Err(ReceiveError::Socket(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReceiveError::Socket(e)),
        };
        file.write_all(&buf[..n]).map_err(ReceiveError::File)?;
        *received += n as u64;
    }
    Ok(())
}

fn splice_pages<S: AsFd>(
    stream: &S,
    file: &File,
    read: &OwnedFd,
    write: &OwnedFd,
    size: usize,
    len: u64,
    received: &mut u64,
) -> Result<(), ReceiveError> {
    while *received < len {
        let want = usize::try_from(len - *received).map_or(size, |n| n.min(size));
        // The pipe is empty here, so this blocks only until the socket has data.
        let n = match pipe::splice(stream, None, write, None, want, SpliceFlags::MOVE) {
            Ok(0) => return Err(ReceiveError::Socket(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(ReceiveError::Socket(e.into())),
        };
        let mut out = 0;
        while out < n {
            match pipe::splice(read, None, file, None, n - out, SpliceFlags::MOVE) {
                Ok(0) => {
                    return Err(ReceiveError::File(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice to the pages image wrote nothing",
                    )))
                }
                Ok(m) => out += m,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ReceiveError::File(e.into())),
            }
        }
        *received += n as u64;
    }
    Ok(())
}

/// `write_all` for a list of buffers: one writev(2) per round instead of one write per
/// buffer.
pub(crate) fn write_all_vectored<W: Write>(
    out: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn frame(flags: PageFlags, vaddr: u64, nr_pages: u64) -> Frame {
        let bits = u16::try_from(flags.bits()).unwrap_or(u16::MAX);
        Frame::add_f(1 << 8 | 1, vaddr, nr_pages, bits)
    }

    #[test]
    fn ranges_are_checked_like_criu() {
        let ok = |f: PageFlags, v, n| check_range(&frame(f, v, n), f);
        assert!(ok(PageFlags::PRESENT | PageFlags::LAZY, 0x1000, 2).is_ok());
        assert!(ok(PageFlags::LAZY, 0x1000, 1).is_ok());
        assert!(ok(PageFlags::empty(), 0x1000, 1).is_err());
        assert!(ok(PageFlags::PRESENT, 0x1000, 0).is_err());
        assert!(ok(PageFlags::PRESENT, 0x1800, 1).is_err());
        assert!(ok(PageFlags::PRESENT, u64::MAX - 0xfff, 2).is_err());
        assert!(ok(PageFlags::PRESENT | PageFlags::PARENT, 0x1000, 1).is_err());
        assert!(ok(PageFlags::from_bits_retain(8), 0x1000, 1).is_err());
    }

    #[test]
    fn staged_files_vanish_unless_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
        {
            let mut staging = Staging::default();
            staging.create(&dir, "pagemap-1.img").unwrap();
            assert!(dir.path().join(".pagemap-1.img.part").exists());
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut staging = Staging::default();
        staging.create(&dir, "pages-65537.img").unwrap();
        staging.create(&dir, "pagemap-1.img").unwrap();
        staging.commit(&dir, true).unwrap();
        drop(staging);
        assert!(dir.exists(ImageKind::Pages, 65537));
        assert!(dir.exists(ImageKind::Pagemap, 1));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    /// The session is not tied to TCP: a unix socket (CRIU's --ps-socket may be one)
    /// splices as well.
    /// Single pages (read with their frames through the input buffer, written in batches)
    /// and large runs (straight to the file) mixed, in both receive modes: every page lands
    /// in order.
    #[test]
    fn small_and_large_frames_mixed_land_in_order() {
        for mode in [ReceiveMode::Splice, ReceiveMode::Copy] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
            let (mut client, server) = UnixStream::pair().unwrap();
            let mut opts = ServerOptions::new(dir.path());
            opts.receive = mode;
            let dst = PagemapId::process(3).encode().unwrap();
            let page = PAGE_SIZE as usize;
            // (first page, pages): 400 single pages with holes, a 300-page run, 10 more.
            let mut runs: Vec<(u64, u64)> = (0..400).map(|i| (2 * i, 1)).collect();
            runs.push((1000, 300));
            runs.extend((0..10).map(|i| (2000 + 2 * i, 1)));
            let fill = |p: u64| -> Vec<u8> { vec![(p % 251) as u8; page] };
            let mut bytes = Frame::open2(dst).encode().to_vec();
            for &(first, n) in &runs {
                bytes.extend_from_slice(&Frame::add_f(dst, first * PAGE_SIZE, n, 4).encode());
                for p in first..first + n {
                    bytes.extend_from_slice(&fill(p));
                }
            }
            bytes.extend_from_slice(&Frame::close().encode());
            let writer = std::thread::spawn(move || {
                client.write_all(&bytes).unwrap();
                let mut answers = [0u8; 5];
                client.read_exact(&mut answers).unwrap();
                answers
            });
            let stats = serve(server, &dir, &opts).unwrap();
            assert_eq!(writer.join().unwrap(), [0, 0, 0, 0, 0]);
            assert_eq!(stats.pages_received, 710);
            let reader = PagesReader::open(&dir, ImageKind::Pagemap, 3).unwrap();
            for &(first, n) in &runs {
                let mut buf = vec![0u8; page * n as usize];
                reader.read_pages(first * PAGE_SIZE, &mut buf).unwrap();
                for (k, chunk) in buf.chunks(page).enumerate() {
                    assert!(chunk == fill(first + k as u64), "{mode:?} page {first}+{k}");
                }
            }
        }
    }

    #[test]
    fn a_session_over_a_unix_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ImageDir::create_dir(tmp.path().join("d")).unwrap();
        let (mut client, server) = UnixStream::pair().unwrap();
        let opts = ServerOptions::new(dir.path());
        let dst = PagemapId::process(3).encode().unwrap();
        let data = vec![0x33u8; 3 * PAGE_SIZE as usize];
        let mut bytes = Frame::open2(dst).encode().to_vec();
        bytes.extend_from_slice(&Frame::add_f(dst, 0x5000, 3, 4).encode());
        bytes.extend_from_slice(&data);
        bytes.extend_from_slice(&Frame::close().encode());
        let writer = std::thread::spawn(move || {
            client.write_all(&bytes).unwrap();
            let mut answers = [0u8; 5];
            client.read_exact(&mut answers).unwrap();
            answers
        });
        let stats = serve(server, &dir, &opts).unwrap();
        assert_eq!(writer.join().unwrap(), [0, 0, 0, 0, 0]);
        assert_eq!((stats.pagemaps, stats.pages_received), (1, 3));
        assert_eq!(stats.bytes, 3 * 32 + 3 * PAGE_SIZE);
        let reader = PagesReader::open(&dir, ImageKind::Pagemap, 3).unwrap();
        let mut buf = vec![0u8; data.len()];
        reader.read_pages(0x5000, &mut buf).unwrap();
        assert!(buf == data);
    }
}
