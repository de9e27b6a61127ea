//! The client halves of the protocol (see [`crate::protocol`]): pushing a dump's pages to a
//! page server, and pulling pages from one for a lazy restore.
//!
//! ```no_run
//! use std::io::IoSlice;
//! use ckpt_page_server::{PageServerClient, PagemapId, PageFlags};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = PageServerClient::connect("192.0.2.1:27".parse()?)?;
//! let id = PagemapId::process(4242);
//! let parent = client.parent_has(id)?;   // may this dump leave unchanged pages to the parent?
//! let mut pagemap = client.open(id)?;
//! let data = vec![0u8; 8192];
//! pagemap.add_pages(0x7f00_0000_0000, PageFlags::PRESENT, &[IoSlice::new(&data)])?;
//! if parent && pagemap.has_parent() {
//!     pagemap.add_hole(0x7f00_0000_2000, 16, PageFlags::PARENT)?;
//! }
//! pagemap.finish();
//! client.close()?;
//! # Ok(())
//! # }
//! ```

use std::io::{self, IoSlice, Read};
use std::net::{SocketAddr, TcpStream};

use images_format::pagemap::{check_hole, data_pages, PagemapStats, RangeOrder};
use images_format::{PageFlags, PAGE_SIZE};

use crate::compress::{
    PageCompressor, PageDecompressor, PageTraffic, ReadZstdError, ZstdError, MAX_ZSTD_PAGES,
};
use crate::protocol::{Command, Frame, PagemapId, ProtocolError, FRAME_LEN, GET_ZSTD, WIRE_FLAGS};
use crate::server::write_all_vectored;

/// Most buffers handed to one writev(2) (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// A failure talking to a page server. `sent` counts the bytes written to the connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to the page server at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("set {option} on the page-server socket")]
    SocketOption {
        option: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("send {command:?} to the page server (after {sent} bytes)")]
    Send {
        command: Command,
        sent: u64,
        #[source]
        source: io::Error,
    },
    #[error("read the page server's answer to {command:?}")]
    Answer {
        command: Command,
        #[source]
        source: io::Error,
    },
    #[error("the page server answered CLOSE with status {status}: it did not keep the images")]
    Status { status: i32 },
    #[error("{image}: cannot send {len:#x} bytes at {vaddr:#x} with flags {flags:#x}: {reason}")]
    BadRange {
        image: String,
        vaddr: u64,
        len: u64,
        flags: u32,
        reason: &'static str,
    },
    #[error("bad pagemap id")]
    Id(#[source] ProtocolError),
    #[error("the page server's reply to GET {vaddr:#x} of pid {pid} is not one")]
    BadReply {
        pid: u64,
        vaddr: u64,
        #[source]
        source: Option<ProtocolError>,
    },
    #[error("the page server's compressed answer to GET {vaddr:#x} of pid {pid} is unusable")]
    BadCompressedReply {
        pid: u64,
        vaddr: u64,
        #[source]
        source: ReadZstdError,
    },
    #[error("compress pages for the page server")]
    Compression(#[source] ZstdError),
    #[error("the page server answered GET {vaddr:#x} x{asked} of pid {pid} with {got} pages at {reply_vaddr:#x} of {reply_pid}")]
    WrongReply {
        pid: u64,
        vaddr: u64,
        asked: u64,
        got: u64,
        reply_vaddr: u64,
        reply_pid: u64,
    },
}

/// One connection to a page server.
#[derive(Debug)]
pub struct PageServerClient {
    stream: TcpStream,
    /// Bytes written so far.
    sent: u64,
    /// Set by [`PageServerClient::set_compress_pages`]: pushed pages go as PE_ZSTD frames
    /// when that is smaller, and GETs carry GET_ZSTD.
    compressor: Option<Box<PageCompressor>>,
    compress_gets: bool,
    /// Made at the first PE_ZSTD answer.
    decompressor: Option<Box<PageDecompressor>>,
    pushed: PageTraffic,
    pulled: PageTraffic,
}

/// Pages a GET was answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesReply {
    pub vaddr: u64,
    /// At most the number asked for; their data is at the start of the buffer.
    pub nr_pages: u64,
}

impl PageServerClient {
    /// Connects and corks the socket: frames and pages leave in full segments, and only
    /// the requests we wait an answer for are pushed out at once.
    pub fn connect(addr: SocketAddr) -> Result<Self, ClientError> {
        let stream =
            TcpStream::connect(addr).map_err(|source| ClientError::Connect { addr, source })?;
        PageServerClient::from_stream(stream)
    }

    /// Uses a connected socket (an ssh tunnel, say: CRIU's `--ps-socket`).
    pub fn from_stream(stream: TcpStream) -> Result<Self, ClientError> {
        rustix::net::sockopt::set_tcp_cork(&stream, true).map_err(|e| {
            ClientError::SocketOption {
                option: "TCP_CORK",
                source: e.into(),
            }
        })?;
        Ok(PageServerClient {
            stream,
            sent: 0,
            compressor: None,
            compress_gets: false,
            decompressor: None,
            pushed: PageTraffic::default(),
            pulled: PageTraffic::default(),
        })
    }

    /// Our extension (see [`crate::compress`]): push pages as zstd-compressed PE_ZSTD
    /// frames where that is smaller, and flag GETs with GET_ZSTD so that the server may
    /// answer so. Only for a peer that reads them (ours): off, the wire is CRIU's.
    pub fn set_compress_pages(&mut self, on: bool) -> Result<(), ClientError> {
        self.compress_gets = on;
        if !on {
            self.compressor = None;
        } else if self.compressor.is_none() {
            let compressor = PageCompressor::new().map_err(ClientError::Compression)?;
            self.compressor = Some(Box::new(compressor));
        }
        Ok(())
    }

    /// Whether [`PageServerClient::set_compress_pages`] is on.
    pub fn compresses_pages(&self) -> bool {
        self.compress_gets
    }

    /// The pages pushed so far (ADD_F data): raw size, and bytes on the wire.
    pub fn pages_pushed(&self) -> PageTraffic {
        self.pushed
    }

    /// The pages received in GET answers so far: raw size, and bytes on the wire.
    pub fn pages_pulled(&self) -> PageTraffic {
        self.pulled
    }

    /// Bytes written to the connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// PARENT: whether the server's parent image directory has this pagemap, so that
    /// unchanged pages may be sent as PE_PARENT holes.
    pub fn parent_has(&mut self, id: PagemapId) -> Result<bool, ClientError> {
        let dst_id = id.encode().map_err(ClientError::Id)?;
        self.request(Command::Parent, &Frame::parent(dst_id))?;
        let mut answer = [0u8; 4];
        self.read_answer(Command::Parent, &mut answer)?;
        Ok(i32::from_le_bytes(answer) != 0)
    }

    /// OPEN2: starts the pagemap of `id` on the server.
    pub fn open(&mut self, id: PagemapId) -> Result<RemotePagemap<'_>, ClientError> {
        let dst_id = id.encode().map_err(ClientError::Id)?;
        self.request(Command::Open2, &Frame::open2(dst_id))?;
        let mut answer = [0u8; 1];
        self.read_answer(Command::Open2, &mut answer)?;
        Ok(RemotePagemap {
            client: self,
            id,
            dst_id,
            has_parent: answer[0] != 0,
            order: RangeOrder::default(),
            stats: PagemapStats::default(),
        })
    }

    /// CLOSE: the server answers once every image is complete; then the connection is
    /// closed from our side, as the server waits for.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.request(Command::Close, &Frame::close())?;
        let mut answer = [0u8; 4];
        self.read_answer(Command::Close, &mut answer)?;
        match i32::from_le_bytes(answer) {
            0 => Ok(()),
            status => Err(ClientError::Status { status }),
        }
    }

    /// GET: asks for `nr_pages` pages of `pid` from `vaddr`; read the answer with
    /// [`PageServerClient::receive_pages`]. Several requests may be in flight.
    pub fn request_pages(
        &mut self,
        pid: u64,
        vaddr: u64,
        nr_pages: u64,
    ) -> Result<(), ClientError> {
        let mut get = Frame::get(pid, vaddr, nr_pages);
        if self.compress_gets {
            get.flags |= GET_ZSTD;
        }
        self.request(Command::Get, &get)
    }

    /// Reads the answer to the oldest GET into `buf`, which must hold the pages asked
    /// for. The server may send fewer.
    pub fn receive_pages(
        &mut self,
        pid: u64,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<PagesReply, ClientError> {
        let asked = buf.len() as u64 / PAGE_SIZE;
        let mut header = [0u8; FRAME_LEN];
        self.read_answer(Command::Get, &mut header)?;
        let frame = Frame::decode(&header).map_err(|source| ClientError::BadReply {
            pid,
            vaddr,
            source: Some(source),
        })?;
        if frame.command != Command::AddF || !frame.page_flags().contains(PageFlags::PRESENT) {
            return Err(ClientError::BadReply {
                pid,
                vaddr,
                source: None,
            });
        }
        if frame.nr_pages == 0
            || frame.nr_pages > asked
            || frame.vaddr != vaddr
            || frame.dst_id != pid
        {
            return Err(ClientError::WrongReply {
                pid,
                vaddr,
                asked,
                got: frame.nr_pages,
                reply_vaddr: frame.vaddr,
                reply_pid: frame.dst_id,
            });
        }
        let len = usize::try_from(frame.nr_pages * PAGE_SIZE).expect("at most buf.len()");
        if frame.is_zstd() {
            let bad = |source| ClientError::BadCompressedReply { pid, vaddr, source };
            let decompressor = match &mut self.decompressor {
                Some(d) => d,
                None => self.decompressor.insert(Box::new(
                    PageDecompressor::new().map_err(|e| bad(ReadZstdError::Zstd(e)))?,
                )),
            };
            let wire = decompressor
                .read_pages(&mut self.stream, &frame, &mut buf[..len])
                .map_err(bad)?;
            self.pulled.add_zstd(len as u64, wire);
        } else {
            self.read_answer(Command::Get, &mut buf[..len])?;
            self.pulled.add_raw(len as u64);
        }
        Ok(PagesReply {
            vaddr: frame.vaddr,
            nr_pages: frame.nr_pages,
        })
    }

    /// GET and its answer.
    pub fn get_pages(
        &mut self,
        pid: u64,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<PagesReply, ClientError> {
        self.request_pages(pid, vaddr, buf.len() as u64 / PAGE_SIZE)?;
        self.receive_pages(pid, vaddr, buf)
    }

    /// Sends a frame that is answered, and pushes it out through the cork: setting
    /// TCP_NODELAY flushes pending output even on a corked socket (tcp(7)).
    fn request(&mut self, command: Command, frame: &Frame) -> Result<(), ClientError> {
        self.send(command, &mut [IoSlice::new(&frame.encode())])?;
        rustix::net::sockopt::set_tcp_nodelay(&self.stream, true).map_err(|e| {
            ClientError::SocketOption {
                option: "TCP_NODELAY",
                source: e.into(),
            }
        })
    }

    fn send(&mut self, command: Command, slices: &mut [IoSlice<'_>]) -> Result<(), ClientError> {
        let len: usize = slices.iter().map(|s| s.len()).sum();
        write_all_vectored(&mut self.stream, slices).map_err(|source| ClientError::Send {
            command,
            sent: self.sent,
            source,
        })?;
        self.sent += len as u64;
        Ok(())
    }

    fn read_answer(&mut self, command: Command, buf: &mut [u8]) -> Result<(), ClientError> {
        self.stream
            .read_exact(buf)
            .map_err(|source| ClientError::Answer { command, source })
    }
}

/// A pagemap open on the server: ranges go in increasing address order.
#[derive(Debug)]
pub struct RemotePagemap<'a> {
    client: &'a mut PageServerClient,
    id: PagemapId,
    dst_id: u64,
    has_parent: bool,
    order: RangeOrder,
    stats: PagemapStats,
}

impl RemotePagemap<'_> {
    /// Whether the server found this pagemap in its parent images (OPEN2's answer).
    pub fn has_parent(&self) -> bool {
        self.has_parent
    }

    pub fn id(&self) -> PagemapId {
        self.id
    }

    pub fn stats(&self) -> PagemapStats {
        self.stats
    }

    /// Sends pages whose contents are the concatenation of `data` (whole pages in total),
    /// with `flags` that include PE_PRESENT: one ADD_F frame and the data in one
    /// writev(2) per 1024 buffers.
    pub fn add_pages(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
    ) -> Result<(), ClientError> {
        let len: u64 = data.iter().map(|s| s.len() as u64).sum();
        let nr_pages =
            data_pages(flags, len).map_err(|reason| self.rejected(vaddr, len, flags, reason))?;
        if let Some(mut compressor) = self.client.compressor.take() {
            let sent = self.add_compressed(&mut compressor, vaddr, flags, data, len);
            self.client.compressor = Some(compressor);
            sent?;
        } else {
            let frame = self.frame(vaddr, nr_pages, flags)?;
            let parts: Vec<&[u8]> = data.iter().map(|s| &**s).collect();
            self.send_raw(&frame, &parts)?;
        }
        self.stats.pages_present += nr_pages;
        if flags.contains(PageFlags::LAZY) {
            self.stats.pages_lazy += nr_pages;
        }
        Ok(())
    }

    /// One ADD_F with the raw pages `parts`: the frame and the data in one writev(2) per
    /// 1024 buffers (CRIU's wire format).
    fn send_raw(&mut self, frame: &Frame, parts: &[&[u8]]) -> Result<(), ClientError> {
        let header = frame.encode();
        let mut slices = Vec::with_capacity(parts.len().min(MAX_IOV) + 1);
        slices.push(IoSlice::new(&header));
        for chunk in parts.chunks(MAX_IOV - 1) {
            slices.extend(chunk.iter().map(|s| IoSlice::new(s)));
            self.client.send(Command::AddF, &mut slices)?;
            slices.clear();
        }
        self.client.pushed.add_raw(frame.nr_pages * PAGE_SIZE);
        Ok(())
    }

    /// Pages as PE_ZSTD frames of at most [`MAX_ZSTD_PAGES`] pages each (a receiver
    /// decompresses a frame in memory), each one raw instead if it does not shrink.
    fn add_compressed(
        &mut self,
        compressor: &mut PageCompressor,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
        len: u64,
    ) -> Result<(), ClientError> {
        let step = MAX_ZSTD_PAGES * PAGE_SIZE;
        let mut off = 0u64;
        while off < len {
            let n = step.min(len - off);
            let frame = self.frame(vaddr + off, n / PAGE_SIZE, flags)?;
            let parts = byte_range(data, off, n);
            match compressor.encode_slices(&frame, &parts) {
                Some(bytes) => {
                    self.client
                        .send(Command::AddF, &mut [IoSlice::new(bytes)])?;
                    let wire = (bytes.len() - FRAME_LEN) as u64;
                    self.client.pushed.add_zstd(n, wire);
                }
                None => self.send_raw(&frame, &parts)?,
            }
            off += n;
        }
        Ok(())
    }

    /// Sends pages without data: PE_PARENT (as in the parent images) and/or PE_LAZY.
    pub fn add_hole(
        &mut self,
        vaddr: u64,
        nr_pages: u64,
        flags: PageFlags,
    ) -> Result<(), ClientError> {
        check_hole(flags).map_err(|reason| {
            self.rejected(vaddr, nr_pages.saturating_mul(PAGE_SIZE), flags, reason)
        })?;
        if flags.contains(PageFlags::PARENT) && !self.has_parent {
            return Err(self.rejected(
                vaddr,
                nr_pages.saturating_mul(PAGE_SIZE),
                flags,
                "the server has no parent pagemap for PE_PARENT pages",
            ));
        }
        let frame = self.frame(vaddr, nr_pages, flags)?.encode();
        self.client
            .send(Command::AddF, &mut [IoSlice::new(&frame)])?;
        if flags.contains(PageFlags::PARENT) {
            self.stats.pages_parent += nr_pages;
        }
        if flags.contains(PageFlags::LAZY) {
            self.stats.pages_lazy += nr_pages;
        }
        Ok(())
    }

    /// Ends the pagemap; the server closes it at the next OPEN2 or CLOSE.
    pub fn finish(self) -> PagemapStats {
        self.stats
    }

    /// Checks a range as the server will, so that a mistake is reported here with its
    /// address rather than as a dropped connection.
    fn frame(&mut self, vaddr: u64, nr_pages: u64, flags: PageFlags) -> Result<Frame, ClientError> {
        let len = nr_pages.saturating_mul(PAGE_SIZE);
        if !WIRE_FLAGS.contains(flags) || flags.contains(PageFlags::PRESENT | PageFlags::PARENT) {
            return Err(self.rejected(vaddr, len, flags, "flags the protocol cannot carry"));
        }
        let accepted = self.order.accept(vaddr, nr_pages);
        accepted.map_err(|reason| self.rejected(vaddr, len, flags, reason))?;
        self.stats.entries += 1;
        let bits = u16::try_from(flags.bits()).expect("wire flags fit 16 bits");
        Ok(Frame::add_f(self.dst_id, vaddr, nr_pages, bits))
    }

    fn rejected(
        &self,
        vaddr: u64,
        len: u64,
        flags: PageFlags,
        reason: &'static str,
    ) -> ClientError {
        ClientError::BadRange {
            image: self.id.file_name(),
            vaddr,
            len,
            flags: flags.bits(),
            reason,
        }
    }
}

/// The bytes `[off, off + len)` of the concatenation of `data`, as pieces of its buffers.
fn byte_range<'a>(data: &'a [IoSlice<'_>], off: u64, len: u64) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let (mut skip, mut want) = (off, len);
    for slice in data {
        if want == 0 {
            break;
        }
        let n = slice.len() as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(want);
        // Both within the slice's length, which is a usize.
        let (from, to) = (skip as usize, (skip + take) as usize);
        out.push(&slice[from..to]);
        want -= take;
        skip = 0;
    }
    out
}
