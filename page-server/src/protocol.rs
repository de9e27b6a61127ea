//! CRIU's page-server wire protocol: 32-byte `page_server_iov` frames, some followed by
//! page data, and the few small answers the server sends back.
//!
//! ```text
//! frame (host byte order, which is little-endian on every architecture we run on):
//!   0  u32 cmd       low 16 bits: the command; high 16 bits: PE_* flags (ADD_F only)
//!   4  u32 padding   the C struct aligns the next u64; written as zero, ignored on read
//!   8  u64 nr_pages
//!  16  u64 vaddr
//!  24  u64 dst_id    (id << 8) | type, type 1 = a process's pagemap, 2 = shared memory
//! ```
//!
//! Push: a dump or pre-dump sends its pages to `ckpt-page-server` (or `criu page-server`),
//! one TCP connection for the whole dump. The client corks the socket and forces out
//! (`TCP_NODELAY`) only the frames it waits an answer for.
//!
//! ```text
//! client (dump)                                        server (page server, DIR)
//!   connect, TCP_CORK
//!   per pagemap (one per process, one per shared memory object):
//!     PARENT {dst_id}                          ---->   DIR/parent/pagemap-<id>.img exists?
//!                                              <----   i32: 1 yes, 0 no
//!     OPEN2 {dst_id}                           ---->   create pagemap-<id>.img whose head names
//!                                                      pages-<n>.img, n counting from 0x10001
//!                                              <----   u8 has_parent
//!     ADD_F {flags<<16|6, nr_pages, vaddr, dst_id}
//!       + nr_pages * 4096 bytes if PE_PRESENT  ---->   one pagemap entry (and its pages)
//!     ...                                              PE_PARENT: the pages are in the parent
//!                                                      PE_LAZY alone: no data anywhere yet
//!   CLOSE                                      ---->   every image complete
//!                                              <----   i32 status, 0 = all data received
//!   close the socket                                   server reads EOF, exits
//! ```
//!
//! Older clients send `ADD` (PE_PRESENT implied), `HOLE` (PE_PARENT implied) and `OPEN`
//! (OPEN2 without the answer), or no OPEN at all: a frame for a `dst_id` that is not open
//! opens it. `FORCE_CLOSE` is CLOSE from a client whose socket was inherited and might stay
//! open in another process.
//!
//! Pull: a lazy-pages daemon asks the source for pages a restored process faulted on.
//!
//! ```text
//! client (lazy pages)                                  server (source, serving pages)
//!   GET {nr_pages, vaddr, dst_id = pid}        ---->   (dst_id is the raw pid here)
//!                                              <----   ADD_F {PE_PRESENT<<16|6, n, vaddr, dst_id}
//!                                              <----   n * 4096 bytes, n <= nr_pages
//! ```
//!
//! Compressed pages: our own extension, not CRIU's (see [`crate::compress`]). It is opt-in
//! per message, so a CRIU peer never sees it: without the options below, every byte on the
//! wire is as above.
//!
//! ```text
//! ADD_F {(PE_ZSTD|PE_PRESENT|...)<<16|6, n, vaddr, dst_id}    PE_ZSTD = 0x2000, n <= 1024
//!   + u32 L (little-endian), 1 <= L <= zstd's bound for n * 4096
//!   + L bytes: one zstd frame that decompresses to exactly n * 4096 bytes
//!
//! push (ckpt-dump --page-server --compress-pages):
//!   ADD_F with PE_ZSTD                         ---->   ckpt-page-server accepts both forms
//!
//! pull (ckpt-lazy-pages --page-server --compress-pages):
//!   GET {(GET_ZSTD|...)<<16|7, ...}            ---->   GET_ZSTD = 0x2000: "may compress"
//!                                              <----   ADD_F with PE_ZSTD + L + frame,
//!                                                      or the plain answer
//! ```
//!
//! A sender compresses only when asked to and only when L + 4 is smaller than the raw
//! pages; incompressible pages go raw in a plain frame. A receiver rejects a PE_ZSTD frame
//! of more than 1024 pages, a bad L, a frame that does not decompress, or one that
//! decompresses to another size, as a broken session (never a panic). The flag bits are
//! distinct from PE_PARENT/PE_LAZY/PE_PRESENT (1, 2, 4) and from our GET flags
//! 0x4000/0x8000 (the destination resumed or not, see the lazy-pages source).

use images_format::{PageFlags, PAGE_SIZE};

/// Bytes of one frame.
pub const FRAME_LEN: usize = 32;

/// The page-server numbers its pages images from here up, so that they cannot collide
/// with those a local dump into the same directory numbers from 1.
pub const FIRST_PAGES_ID: u32 = 0x10001;

/// Flags that may travel in a frame: the others describe a local image's layout.
pub const WIRE_FLAGS: PageFlags = PageFlags::PARENT
    .union(PageFlags::LAZY)
    .union(PageFlags::PRESENT);

/// ADD_F flag of our extension: the page data is compressed (see [`crate::compress`]).
pub const PE_ZSTD: u16 = 0x2000;

/// GET flag of our extension: the asker reads PE_ZSTD answers; the server may compress.
pub const GET_ZSTD: u16 = 0x2000;

const CMD_BITS: u32 = 16;
const CMD_MASK: u32 = (1 << CMD_BITS) - 1;
const TYPE_BITS: u32 = 8;
const TYPE_MASK: u64 = (1 << TYPE_BITS) - 1;
const TYPE_PID: u64 = 1;
const TYPE_SHMEM: u64 = 2;

/// A frame that cannot be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown page-server command {cmd:#x}")]
    UnknownCommand { cmd: u32 },
    #[error("unknown pagemap type {kind} in dst_id {dst_id:#x}")]
    UnknownPagemapType { dst_id: u64, kind: u64 },
    #[error("pagemap id {id} does not fit the 56 bits of a dst_id")]
    IdTooLarge { id: u64 },
}

/// The command in the low 16 bits of a frame's `cmd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Legacy ADD_F with PE_PRESENT.
    Add,
    /// Legacy ADD_F with PE_PARENT.
    Hole,
    /// Legacy OPEN2 without an answer.
    Open,
    Open2,
    Parent,
    AddF,
    Get,
    Close,
    ForceClose,
}

impl Command {
    pub fn code(self) -> u16 {
        match self {
            Command::Add => 1,
            Command::Hole => 2,
            Command::Open => 3,
            Command::Open2 => 4,
            Command::Parent => 5,
            Command::AddF => 6,
            Command::Get => 7,
            Command::Close => 0x1023,
            Command::ForceClose => 0x1024,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Command::Add,
            2 => Command::Hole,
            3 => Command::Open,
            4 => Command::Open2,
            5 => Command::Parent,
            6 => Command::AddF,
            7 => Command::Get,
            0x1023 => Command::Close,
            0x1024 => Command::ForceClose,
            _ => return None,
        })
    }
}

/// What a pagemap describes: the address space of a process or a shared memory object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagemapKind {
    /// `pagemap-<pid>.img`.
    Process,
    /// `pagemap-shmem-<shmid>.img`.
    Shmem,
}

/// The pagemap a push frame is about, as `dst_id` encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagemapId {
    pub kind: PagemapKind,
    pub id: u64,
}

impl PagemapId {
    pub fn process(pid: u64) -> Self {
        PagemapId {
            kind: PagemapKind::Process,
            id: pid,
        }
    }

    pub fn shmem(shmid: u64) -> Self {
        PagemapId {
            kind: PagemapKind::Shmem,
            id: shmid,
        }
    }

    /// `(id << 8) | type`.
    pub fn encode(self) -> Result<u64, ProtocolError> {
        if self.id >> (64 - TYPE_BITS) != 0 {
            return Err(ProtocolError::IdTooLarge { id: self.id });
        }
        let kind = match self.kind {
            PagemapKind::Process => TYPE_PID,
            PagemapKind::Shmem => TYPE_SHMEM,
        };
        Ok(self.id << TYPE_BITS | kind)
    }

    /// Reads a `dst_id`, including the type numbers of CRIU releases before 3.3, which sent
    /// their internal image numbers there.
    pub fn decode(dst_id: u64) -> Result<Self, ProtocolError> {
        let kind = match dst_id & TYPE_MASK {
            TYPE_PID | 10 | 11 | 16 | 17 => PagemapKind::Process,
            TYPE_SHMEM | 27 | 28 | 29 | 32 | 33 | 34 => PagemapKind::Shmem,
            other => {
                return Err(ProtocolError::UnknownPagemapType {
                    dst_id,
                    kind: other,
                })
            }
        };
        Ok(PagemapId {
            kind,
            id: dst_id >> TYPE_BITS,
        })
    }

    /// The image kind of its pagemap file.
    pub fn image_kind(self) -> images_format::ImageKind {
        match self.kind {
            PagemapKind::Process => images_format::ImageKind::Pagemap,
            PagemapKind::Shmem => images_format::ImageKind::ShmemPagemap,
        }
    }

    /// The pagemap file name (`pagemap-42.img`).
    pub fn file_name(self) -> String {
        self.image_kind().file_name(self.id)
    }
}

/// One `page_server_iov`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// The high 16 bits of `cmd`, as sent.
    pub flags: u16,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Frame {
    fn new(command: Command, dst_id: u64) -> Self {
        Frame {
            command,
            flags: 0,
            nr_pages: 0,
            vaddr: 0,
            dst_id,
        }
    }

    pub fn parent(dst_id: u64) -> Self {
        Frame::new(Command::Parent, dst_id)
    }

    pub fn open2(dst_id: u64) -> Self {
        Frame::new(Command::Open2, dst_id)
    }

    /// Pages with `flags`; with PE_PRESENT, `nr_pages * 4096` bytes of data follow it.
    pub fn add_f(dst_id: u64, vaddr: u64, nr_pages: u64, flags: u16) -> Self {
        Frame {
            command: Command::AddF,
            flags,
            nr_pages,
            vaddr,
            dst_id,
        }
    }

    /// A lazy-pages request; `pid` is sent as is, not as an encoded dst_id.
    pub fn get(pid: u64, vaddr: u64, nr_pages: u64) -> Self {
        Frame {
            command: Command::Get,
            flags: 0,
            nr_pages,
            vaddr,
            dst_id: pid,
        }
    }

    pub fn close() -> Self {
        Frame::new(Command::Close, 0)
    }

    /// The flags as pagemap flags. ADD and HOLE imply theirs; PE_ZSTD says how the data
    /// travels, not what it is, and is not among them.
    pub fn page_flags(&self) -> PageFlags {
        match self.command {
            Command::Add => PageFlags::PRESENT,
            Command::Hole => PageFlags::PARENT,
            Command::AddF => PageFlags::from_bits_retain(u32::from(self.flags & !PE_ZSTD)),
            _ => PageFlags::from_bits_retain(u32::from(self.flags)),
        }
    }

    /// An ADD_F whose page data is compressed ([`PE_ZSTD`]).
    pub fn is_zstd(&self) -> bool {
        self.command == Command::AddF && self.flags & PE_ZSTD != 0
    }

    /// Bytes of page data the frame stands for (before compression, for a PE_ZSTD frame).
    pub fn data_len(&self) -> Option<u64> {
        match self.command {
            Command::Add | Command::AddF if self.page_flags().contains(PageFlags::PRESENT) => {
                self.nr_pages.checked_mul(PAGE_SIZE)
            }
            _ => Some(0),
        }
    }

    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let cmd = u32::from(self.flags) << CMD_BITS | u32::from(self.command.code());
        let mut out = [0u8; FRAME_LEN];
        out[0..4].copy_from_slice(&cmd.to_le_bytes());
        out[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        out[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        out[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; FRAME_LEN]) -> Result<Self, ProtocolError> {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let cmd = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let code = u16::try_from(cmd & CMD_MASK).expect("masked to 16 bits");
        let flags = u16::try_from(cmd >> CMD_BITS).expect("shifted to 16 bits");
        let command = Command::from_code(code).ok_or(ProtocolError::UnknownCommand { cmd })?;
        Ok(Frame {
            command,
            flags,
            nr_pages: word(8),
            vaddr: word(16),
            dst_id: word(24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_f_layout_is_the_c_struct() {
        let f = Frame::add_f(
            PagemapId::process(42).encode().unwrap(),
            0x7f00_0000_1000,
            3,
            4,
        );
        let b = f.encode();
        assert_eq!(&b[0..4], &[6, 0, 4, 0]);
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &((42u64 << 8) | 1).to_le_bytes());
        assert_eq!(Frame::decode(&b), Ok(f));
        assert_eq!(f.data_len(), Some(3 * 4096));
    }

    #[test]
    fn close_codes_and_unknown_commands() {
        assert_eq!(&Frame::close().encode()[0..4], &[0x23, 0x10, 0, 0]);
        let mut b = [0u8; FRAME_LEN];
        b[0..4].copy_from_slice(&0x1024u32.to_le_bytes());
        assert_eq!(Frame::decode(&b).unwrap().command, Command::ForceClose);
        b[0..4].copy_from_slice(&0x0004_0008u32.to_le_bytes());
        assert_eq!(
            Frame::decode(&b),
            Err(ProtocolError::UnknownCommand { cmd: 0x0004_0008 })
        );
        b[0] = 0;
        assert!(Frame::decode(&b).is_err());
    }

    #[test]
    fn legacy_commands_imply_flags() {
        let mut b = Frame::close().encode();
        b[0..4].copy_from_slice(&1u32.to_le_bytes());
        b[8..16].copy_from_slice(&2u64.to_le_bytes());
        let add = Frame::decode(&b).unwrap();
        assert_eq!(add.page_flags(), PageFlags::PRESENT);
        assert_eq!(add.data_len(), Some(8192));
        b[0] = 2;
        let hole = Frame::decode(&b).unwrap();
        assert_eq!(hole.page_flags(), PageFlags::PARENT);
        assert_eq!(hole.data_len(), Some(0));
    }

    #[test]
    fn dst_ids_and_legacy_types() {
        assert_eq!(PagemapId::shmem(7).encode(), Ok(7 << 8 | 2));
        assert_eq!(PagemapId::decode(42 << 8 | 11), Ok(PagemapId::process(42)));
        assert_eq!(PagemapId::decode(5 << 8 | 34), Ok(PagemapId::shmem(5)));
        assert_eq!(
            PagemapId::decode(5 << 8 | 3),
            Err(ProtocolError::UnknownPagemapType {
                dst_id: 5 << 8 | 3,
                kind: 3
            })
        );
        assert!(PagemapId::process(1 << 56).encode().is_err());
        assert_eq!(PagemapId::shmem(9).file_name(), "pagemap-shmem-9.img");
    }
}
