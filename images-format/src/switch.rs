//! The switch of a prepared post-copy: the messages between `ckpt-dump --lazy-pages
//! --prepare` at the source and `ckpt-restore --prepared` at the destination. This is ours;
//! CRIU has no prepared restore.
//!
//! The source writes a whole image set while its process runs on (the "prepared images"),
//! the destination rebuilds the process from it and holds it stopped; only then is the
//! source frozen, and what changed since (registers, at least) crosses as a delta of
//! images on a connection that is already open. Down time is then the final freeze and
//! collection, one message and the few writes that apply it.
//!
//! The restore connects to the dump's lazy-pages listener and opens with [`SWITCH_MAGIC`]
//! (a lazy-pages daemon opens with a page-server frame, whose first word is a small
//! command number, never these bytes). Then frames, each `kind: u32, flags: u32,
//! len: u64` (little-endian) and `len` bytes of payload:
//!
//! ```text
//! restore (destination)                          dump (source)
//!   SWITCH_MAGIC, READY {wants hot pages}  ---->   the tree is rebuilt and held
//!                                                  freeze, collect
//!                                          <----   DELTA {changed images, hot pages}
//!                                                  (or ABORT {why}: the source runs on)
//!   RESUMED                                ---->   the destination runs: never resume
//!   (or FAILED {why}, or the link closing:         the source again
//!    the source runs on)
//! ```
//!
//! A DELTA's payload may be one zstd frame ([`FLAG_ZSTD`]) of its plain encoding:
//! `count: u32`, then per image `name_len: u16, name, how: u8, len: u32` and either the
//! `len` bytes (`how` 0), or `packed_len: u32` and a zstd frame of them compressed with the
//! prepared image of the same name as its dictionary (`how` 1, [`BASED`]), or, for an image
//! as long as its prepared version, `base_hash: u64, hash: u64, runs: u32` and per run
//! `offset: u32, run_len: u32` and `run_len` bytes XORed into the prepared bytes there
//! (`how` 2, [`XORED`]; the hashes are XXH3-64 of the prepared bytes and of the result),
//! or `base_hash: u64, hash: u64, prefix: u32, suffix: u32` and the bytes between: the
//! image is the prepared one's first `prefix` and last `suffix` bytes with these between
//! (`how` 3, [`SPLICED`]); then `count: u32` and per run of hot pages `pid: i32, vaddr:
//! u64, pages: u32` and the pages.
//!
//! Why against the prepared image: both sides hold it (the source wrote it, the destination
//! restored from its copy), and an image that changed mostly did not: a pages image where
//! the stack page moved, a core image where registers did. Only the differences then cross,
//! which is what a slow link needs. An image whose length did not change (a pages image)
//! crosses as the XOR of the byte runs that changed; one whose length changed in one place
//! (a core image whose registers' varints grew, the clocks) as the bytes between what
//! it shares with the prepared one at both ends. Finding either is one comparison, applying
//! it one copy, where a zstd dictionary must first be built from the prepared image on
//! each side (100-200 microseconds in a process that never built one, while the source is
//! frozen): BASED is left for larger images changed in many places. Likewise a small
//! payload is not compressed. A BASED frame carries zstd's checksum, a XORED or SPLICED
//! image the hashes: a destination whose copy of the prepared image differs gets an error,
//! not wrong bytes.
//! Every length is checked against what is left before anything is allocated: a damaged
//! message is an error, never a panic or a huge allocation.

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::xxh3_64;

/// What a switch connection opens with.
pub const SWITCH_MAGIC: [u8; 8] = *b"CKPTSWCH";
/// The payload is one zstd frame of the plain payload.
pub const FLAG_ZSTD: u32 = 1;
/// READY's flag: send the pages under each thread's instruction and stack pointers.
pub const FLAG_HOT_PAGES: u32 = 2;
/// The largest payload either side accepts (plain or compressed): the delta at the end of a
/// pre-copy carries every page written since the prepared images, a gigabyte or more for a
/// large busy process. Nothing is allocated for a length before its bytes arrive, so a
/// damaged length costs only what really comes.
pub const MAX_PAYLOAD: u64 = 16 << 30;
/// An image is compressed against its prepared version only up to this size of that
/// version: the destination keeps the prepared images up to it for the switch.
pub const MAX_BASE: usize = 4 << 20;
/// An image of a DELTA compressed with its prepared version as the dictionary.
pub const BASED: u8 = 1;
/// An image of a DELTA as the XOR of its changed byte runs with its prepared version.
pub const XORED: u8 = 2;
const PLAIN: u8 = 0;
/// Images are compared with their prepared versions in blocks of this size (a memory
/// comparison each); only within a block that differs byte by byte.
const XOR_BLOCK: usize = 64;
/// A XORED image's own header: the two hashes and the run count.
const XORED_HEADER: usize = 8 + 8 + 4;
/// An image of a DELTA as its prepared version with the bytes between a common start and
/// a common end replaced (an image whose length changed in one place: a core image whose
/// registers' encodings grew or shrank).
pub const SPLICED: u8 = 3;
/// A SPLICED image's own header: the two hashes and the lengths of the common ends.
const SPLICED_HEADER: usize = 8 + 8 + 4 + 4;
/// An image crosses SPLICED when what changed is at most this share of it (1/n); beyond,
/// a dictionary finds what moved within the changed part.
const SPLICE_SHARE: usize = 4;
/// A run's header: offset and length.
const RUN_HEADER: usize = 4 + 4;
const PAGE: usize = 4096;
const HEADER_LEN: usize = 16;

const KIND_READY: u32 = 1;
const KIND_DELTA: u32 = 2;
const KIND_ABORT: u32 = 3;
const KIND_RESUMED: u32 = 4;
const KIND_FAILED: u32 = 5;

/// One image file of the delta: its name in the image directory and its whole contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedImage {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Pages of process `pid` (its image pid) from `vaddr` on, whole pages. In the delta of a
/// prepared post-copy, lazy pages the destination installs before it resumes; where the
/// destination holds every page (the end of a pre-copy), pages written since the prepared
/// images, which it writes over its copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotPages {
    pub pid: i32,
    pub vaddr: u64,
    pub data: Vec<u8>,
}

/// One message of the switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchMessage {
    /// The destination holds the rebuilt tree and waits.
    Ready { hot_pages: bool },
    /// The images that differ from the prepared ones, and the hot pages asked for.
    Delta {
        images: Vec<NamedImage>,
        hot: Vec<HotPages>,
    },
    /// The source will not switch (it runs on); the destination drops what it built.
    Abort { why: String },
    /// The destination runs.
    Resumed,
    /// The destination could not apply the delta and dropped what it built.
    Failed { why: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("switch: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("switch: the connection does not open with the switch magic")]
    BadMagic,
    #[error("switch: unknown message kind {kind}")]
    UnknownKind { kind: u32 },
    #[error("switch: a payload of {len} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge { len: u64 },
    #[error("switch: damaged {what} at byte {at} of the payload")]
    Damaged { what: &'static str, at: usize },
    #[error("switch: decompress the delta")]
    Decompress(#[source] io::Error),
    #[error("switch: the peer closed the connection")]
    Closed,
    #[error("switch: {name} comes compressed against a prepared image that is not here")]
    NoBase { name: String },
    #[error("switch: {name} comes as a difference from a prepared image other than the one here")]
    BaseDiffers { name: String },
}

/// The bytes a DELTA of `images` and `hot` takes on the wire uncompressed, header
/// included: what compression is measured against.
pub fn delta_plain_len(images: &[NamedImage], hot: &[HotPages]) -> usize {
    let images: usize = images
        .iter()
        .map(|i| 2 + i.name.len() + 1 + 4 + i.bytes.len())
        .sum();
    let hot: usize = hot
        .iter()
        .map(|h| 4 + 8 + 4 + h.data.len() / PAGE * PAGE)
        .sum();
    HEADER_LEN + 4 + images + 4 + hot
}

/// Writes the opening of a switch connection (the restore's side).
pub fn write_magic(w: &mut impl Write) -> Result<(), SwitchError> {
    w.write_all(&SWITCH_MAGIC)
        .map_err(|source| SwitchError::Io {
            what: "write the magic",
            source,
        })
}

/// Whether the first bytes of a connection are the switch's.
pub fn is_switch_magic(first: &[u8]) -> bool {
    first == SWITCH_MAGIC
}

/// Sends `msg` in one write. `compress` applies to a DELTA only, and is used only where
/// it makes the payload smaller.
pub fn write_message(
    w: &mut impl Write,
    msg: &SwitchMessage,
    compress: bool,
) -> Result<(), SwitchError> {
    write_message_based(w, msg, compress, |_| None)
}

/// [`write_message`], where a DELTA's images are compressed against `base(name)`, the
/// prepared image of that name, when there is one (up to [`MAX_BASE`]) and that is smaller.
pub fn write_message_based<'b>(
    w: &mut impl Write,
    msg: &SwitchMessage,
    compress: bool,
    base: impl Fn(&str) -> Option<&'b [u8]>,
) -> Result<(), SwitchError> {
    write_frame(w, msg, compress, &base, true)
}

/// [`write_message_based`]; `xor`: images as long as their base may cross XORED (off
/// only to measure the dictionary against it).
fn write_frame<'b>(
    w: &mut impl Write,
    msg: &SwitchMessage,
    compress: bool,
    base: &impl Fn(&str) -> Option<&'b [u8]>,
    xor: bool,
) -> Result<(), SwitchError> {
    let (kind, mut flags, mut payload) = match msg {
        SwitchMessage::Ready { hot_pages } => {
            let flags = if *hot_pages { FLAG_HOT_PAGES } else { 0 };
            (KIND_READY, flags, Vec::new())
        }
        SwitchMessage::Delta { images, hot } => {
            (KIND_DELTA, 0, encode_delta(images, hot, base, xor))
        }
        SwitchMessage::Abort { why } => (KIND_ABORT, 0, why.as_bytes().to_vec()),
        SwitchMessage::Resumed => (KIND_RESUMED, 0, Vec::new()),
        SwitchMessage::Failed { why } => (KIND_FAILED, 0, why.as_bytes().to_vec()),
    };
    if compress && kind == KIND_DELTA && payload.len() > SMALL_PAYLOAD {
        if let Ok(packed) = zstd::bulk::compress(&payload, 1) {
            if packed.len() < payload.len() {
                payload = packed;
                flags |= FLAG_ZSTD;
            }
        }
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&kind.to_le_bytes());
    frame.extend_from_slice(&flags.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame).map_err(|source| SwitchError::Io {
        what: "send a message",
        source,
    })?;
    w.flush().map_err(|source| SwitchError::Io {
        what: "send a message",
        source,
    })
}

/// How much of a payload is made room for before any of it arrives.
const FIRST_READ: usize = 64 << 10;
/// A DELTA payload up to this size crosses as it is: compressing it would save at most
/// this many bytes (16 us at 1 Gbit/s) and cost a compression context on each side (some
/// 100 us in a process that never made one: its tables fault in).
const SMALL_PAYLOAD: usize = 2048;
/// An image up to this size never crosses BASED: building a dictionary costs more than
/// its bytes do on the wire.
const SMALL_IMAGE: usize = 512;

/// Reads the magic a switch connection opens with.
pub fn read_magic(r: &mut impl Read) -> Result<(), SwitchError> {
    let mut magic = [0u8; 8];
    read_exact(r, &mut magic, "read the magic")?;
    if !is_switch_magic(&magic) {
        return Err(SwitchError::BadMagic);
    }
    Ok(())
}

/// Reads one message. A connection closed between messages is [`SwitchError::Closed`].
pub fn read_message(r: &mut impl Read) -> Result<SwitchMessage, SwitchError> {
    read_message_based(r, |_| None)
}

/// [`read_message`], where `base(name)` is the prepared image a DELTA's image of that name
/// may be compressed against.
pub fn read_message_based<'b>(
    r: &mut impl Read,
    base: impl Fn(&str) -> Option<&'b [u8]>,
) -> Result<SwitchMessage, SwitchError> {
    read_message_reusing(r, base, &mut Vec::new())
}

/// [`read_message_based`], where a DELTA's images are decoded into buffers taken from
/// `spare` (the smallest empty one with room, when there is one) rather than fresh ones:
/// a fresh allocation's pages fault in as they are first written, some microseconds a
/// page in a virtual machine, and the destination of a switch reads its delta inside the
/// down time. Buffers whose pages are in already (written once) are taken first.
pub fn read_message_reusing<'b>(
    r: &mut impl Read,
    base: impl Fn(&str) -> Option<&'b [u8]>,
    spare: &mut Vec<Vec<u8>>,
) -> Result<SwitchMessage, SwitchError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(r, &mut header, "read a message header")?;
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let (kind, flags) = (word(0), word(4));
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[8..16]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(SwitchError::TooLarge { len });
    }
    if !matches!(
        kind,
        KIND_READY | KIND_DELTA | KIND_ABORT | KIND_RESUMED | KIND_FAILED
    ) {
        return Err(SwitchError::UnknownKind { kind });
    }
    // Read in steps, so that a lying length costs only what really arrives; a usual
    // message fits the first step (one read, no probing).
    let mut payload =
        Vec::with_capacity(usize::try_from(len).map_or(FIRST_READ, |l| l.min(FIRST_READ)));
    r.take(len)
        .read_to_end(&mut payload)
        .map_err(|source| SwitchError::Io {
            what: "read a payload",
            source,
        })?;
    if payload.len() as u64 != len {
        return Err(SwitchError::Io {
            what: "read a payload",
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    let text = |p: Vec<u8>| String::from_utf8_lossy(&p).into_owned();
    Ok(match kind {
        KIND_READY => SwitchMessage::Ready {
            hot_pages: flags & FLAG_HOT_PAGES != 0,
        },
        KIND_DELTA => {
            if flags & FLAG_ZSTD != 0 {
                payload = decompress(&payload)?;
            }
            let (images, hot) = decode_delta(&payload, &base, &mut Spare(spare))?;
            SwitchMessage::Delta { images, hot }
        }
        KIND_ABORT => SwitchMessage::Abort { why: text(payload) },
        KIND_RESUMED => SwitchMessage::Resumed,
        _ => SwitchMessage::Failed { why: text(payload) },
    })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), SwitchError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(SwitchError::Closed),
        Err(source) => Err(SwitchError::Io { what, source }),
    }
}

fn decompress(packed: &[u8]) -> Result<Vec<u8>, SwitchError> {
    let mut out = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(packed).map_err(SwitchError::Decompress)?;
    // One byte over the limit tells an oversized frame from one exactly at it.
    decoder
        .take(MAX_PAYLOAD + 1)
        .read_to_end(&mut out)
        .map_err(SwitchError::Decompress)?;
    if out.len() as u64 > MAX_PAYLOAD {
        return Err(SwitchError::TooLarge {
            len: out.len() as u64,
        });
    }
    Ok(out)
}

fn encode_delta<'b>(
    images: &[NamedImage],
    hot: &[HotPages],
    base: &impl Fn(&str) -> Option<&'b [u8]>,
    xor: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(images.len() as u32).to_le_bytes());
    for image in images {
        out.extend_from_slice(&(image.name.len() as u16).to_le_bytes());
        out.extend_from_slice(image.name.as_bytes());
        let base = base(&image.name).filter(|b| b.len() <= MAX_BASE);
        if let Some(b) = base.filter(|b| xor && b.len() == image.bytes.len()) {
            let runs = changed_runs(&image.bytes, b);
            let xored_len = XORED_HEADER + runs.iter().map(|r| RUN_HEADER + r.len()).sum::<usize>();
            if xored_len < image.bytes.len() {
                out.push(XORED);
                out.extend_from_slice(&(image.bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&xxh3_64(b).to_le_bytes());
                out.extend_from_slice(&xxh3_64(&image.bytes).to_le_bytes());
                out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for run in runs {
                    out.extend_from_slice(&(run.start as u32).to_le_bytes());
                    out.extend_from_slice(&(run.len() as u32).to_le_bytes());
                    out.extend(
                        image.bytes[run.clone()]
                            .iter()
                            .zip(&b[run])
                            .map(|(x, y)| x ^ y),
                    );
                }
                continue;
            }
        }
        if let Some(b) = base.filter(|_| xor) {
            let (prefix, suffix) = common_ends(&image.bytes, b);
            let middle = image.bytes.len() - prefix - suffix;
            let small = image.bytes.len() <= SMALL_IMAGE;
            if (middle <= image.bytes.len() / SPLICE_SHARE || small)
                && SPLICED_HEADER + middle < image.bytes.len()
            {
                out.push(SPLICED);
                out.extend_from_slice(&(image.bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&xxh3_64(b).to_le_bytes());
                out.extend_from_slice(&xxh3_64(&image.bytes).to_le_bytes());
                out.extend_from_slice(&(prefix as u32).to_le_bytes());
                out.extend_from_slice(&(suffix as u32).to_le_bytes());
                out.extend_from_slice(&image.bytes[prefix..prefix + middle]);
                continue;
            }
        }
        let packed = base
            .filter(|_| image.bytes.len() > SMALL_IMAGE)
            .and_then(|b| compress_against(&image.bytes, b))
            .filter(|p| p.len() < image.bytes.len());
        match packed {
            Some(packed) => {
                out.push(BASED);
                out.extend_from_slice(&(image.bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
                out.extend_from_slice(&packed);
            }
            None => {
                out.push(PLAIN);
                out.extend_from_slice(&(image.bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&image.bytes);
            }
        }
    }
    out.extend_from_slice(&(hot.len() as u32).to_le_bytes());
    for run in hot {
        out.extend_from_slice(&run.pid.to_le_bytes());
        out.extend_from_slice(&run.vaddr.to_le_bytes());
        out.extend_from_slice(&((run.data.len() / PAGE) as u32).to_le_bytes());
        out.extend_from_slice(&run.data[..run.data.len() / PAGE * PAGE]);
    }
    out
}

/// How many bytes `now` and `base` have in common at their start, and then at their end
/// (the two never overlap: together at most the shorter one's length).
fn common_ends(now: &[u8], base: &[u8]) -> (usize, usize) {
    let shorter = now.len().min(base.len());
    let prefix = common_start(&now[..shorter], &base[..shorter]);
    let rest = shorter - prefix;
    let suffix = common_end(&now[now.len() - rest..], &base[base.len() - rest..]);
    (prefix, suffix)
}

/// How many bytes `a` and `b` (as long) share at their start: block by block (a memory
/// comparison), then byte by byte in the first block that differs.
fn common_start(a: &[u8], b: &[u8]) -> usize {
    let at: usize = a
        .chunks(XOR_BLOCK)
        .zip(b.chunks(XOR_BLOCK))
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len())
        .sum();
    at + a[at..]
        .iter()
        .zip(&b[at..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` (as long) share at their end.
fn common_end(a: &[u8], b: &[u8]) -> usize {
    let matched: usize = a
        .rchunks(XOR_BLOCK)
        .zip(b.rchunks(XOR_BLOCK))
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len())
        .sum();
    let at = a.len() - matched;
    matched
        + a[..at]
            .iter()
            .rev()
            .zip(b[..at].iter().rev())
            .take_while(|(x, y)| x == y)
            .count()
}

/// The byte ranges where `now` and `base` (as long) differ, found block by block
/// ([`XOR_BLOCK`]); ranges closer than a run's header are one range (the bytes between
/// cost less than another header).
fn changed_runs(now: &[u8], base: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (a, b)) in now
        .chunks(XOR_BLOCK)
        .zip(base.chunks(XOR_BLOCK))
        .enumerate()
    {
        if a == b {
            continue;
        }
        let differs = |(x, y): (&u8, &u8)| x != y;
        let (Some(first), Some(last)) = (
            a.iter().zip(b).position(differs),
            a.iter().zip(b).rposition(differs),
        ) else {
            continue;
        };
        let (start, end) = (i * XOR_BLOCK + first, i * XOR_BLOCK + last + 1);
        match runs.last_mut() {
            Some(run) if start - run.end <= RUN_HEADER => run.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// `bytes` as one zstd frame (with its checksum) whose dictionary is `base`.
fn compress_against(bytes: &[u8], base: &[u8]) -> Option<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::with_dictionary(1, base).ok()?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .ok()?;
    c.compress(bytes).ok()
}

/// Buffers to decode into (see [`read_message_reusing`]).
struct Spare<'a>(&'a mut Vec<Vec<u8>>);

impl Spare<'_> {
    /// An empty buffer with room for `len` bytes: the smallest spare one that has it, or
    /// a new one. `len` is one the caller checked against what it has.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let best = self
            .0
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let mut b = self.0.swap_remove(i);
                b.clear();
                b
            }
            None => Vec::with_capacity(len),
        }
    }
}

/// A cursor over a payload that fails, rather than panics, past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SwitchError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(SwitchError::Damaged { what, at: self.at })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SwitchError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SwitchError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SwitchError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, SwitchError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

fn decode_delta<'b>(
    payload: &[u8],
    base: &impl Fn(&str) -> Option<&'b [u8]>,
    spare: &mut Spare<'_>,
) -> Result<(Vec<NamedImage>, Vec<HotPages>), SwitchError> {
    let mut c = Cursor {
        bytes: payload,
        at: 0,
    };
    let count = c.u32("image count")?;
    let mut images = Vec::new();
    for _ in 0..count {
        let name_len = c.u16("image name length")?;
        let at = c.at;
        let name =
            std::str::from_utf8(c.take(usize::from(name_len), "image name")?).map_err(|_| {
                SwitchError::Damaged {
                    what: "image name",
                    at,
                }
            })?;
        // A name is one file of the image directory, nothing outside it.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(SwitchError::Damaged {
                what: "image name",
                at,
            });
        }
        let how_at = c.at;
        let how = c.array::<1>("image encoding")?[0];
        let len = c.u32("image length")? as usize;
        let bytes = match how {
            PLAIN => {
                let plain = c.take(len, "image bytes")?;
                let mut bytes = spare.take(len);
                bytes.extend_from_slice(plain);
                bytes
            }
            BASED => {
                let packed_len = c.u32("compressed image length")? as usize;
                let at = c.at;
                let packed = c.take(packed_len, "compressed image")?;
                if len as u64 > MAX_PAYLOAD {
                    return Err(SwitchError::TooLarge { len: len as u64 });
                }
                let dict = base(name).ok_or(SwitchError::NoBase {
                    name: name.to_string(),
                })?;
                let bytes = zstd::bulk::Decompressor::with_dictionary(dict)
                    .and_then(|mut d| d.decompress(packed, len))
                    .map_err(SwitchError::Decompress)?;
                if bytes.len() != len {
                    return Err(SwitchError::Damaged {
                        what: "compressed image",
                        at,
                    });
                }
                bytes
            }
            XORED => {
                let base_hash = c.u64("prepared image hash")?;
                let hash = c.u64("image hash")?;
                let runs = c.u32("xored run count")?;
                let dict = base(name).ok_or(SwitchError::NoBase {
                    name: name.to_string(),
                })?;
                // Checked before the copy: a length over the base's is no base of ours.
                if dict.len() != len || xxh3_64(dict) != base_hash {
                    return Err(SwitchError::BaseDiffers {
                        name: name.to_string(),
                    });
                }
                let mut bytes = spare.take(len);
                bytes.extend_from_slice(dict);
                for _ in 0..runs {
                    let at = c.at;
                    let offset = c.u32("xored run offset")? as usize;
                    let run_len = c.u32("xored run length")? as usize;
                    let xor = c.take(run_len, "xored run")?;
                    let Some(dst) = offset
                        .checked_add(run_len)
                        .and_then(|end| bytes.get_mut(offset..end))
                    else {
                        return Err(SwitchError::Damaged {
                            what: "xored run offset",
                            at,
                        });
                    };
                    for (d, x) in dst.iter_mut().zip(xor) {
                        *d ^= x;
                    }
                }
                if xxh3_64(&bytes) != hash {
                    return Err(SwitchError::Damaged {
                        what: "xored image hash",
                        at: how_at,
                    });
                }
                bytes
            }
            SPLICED => {
                let base_hash = c.u64("prepared image hash")?;
                let hash = c.u64("image hash")?;
                let ends_at = c.at;
                let prefix = c.u32("common start")? as usize;
                let suffix = c.u32("common end")? as usize;
                let dict = base(name).ok_or(SwitchError::NoBase {
                    name: name.to_string(),
                })?;
                if xxh3_64(dict) != base_hash {
                    return Err(SwitchError::BaseDiffers {
                        name: name.to_string(),
                    });
                }
                let damaged = SwitchError::Damaged {
                    what: "common ends",
                    at: ends_at,
                };
                // Both ends come from the base, the middle from the payload: the length
                // is checked against what is here before anything is allocated.
                let middle_len = len
                    .checked_sub(prefix)
                    .and_then(|l| l.checked_sub(suffix))
                    .ok_or(SwitchError::Damaged {
                        what: "common ends",
                        at: ends_at,
                    })?;
                let head = dict.get(..prefix).ok_or(SwitchError::Damaged {
                    what: "common ends",
                    at: ends_at,
                })?;
                let tail = dict
                    .len()
                    .checked_sub(suffix)
                    .filter(|&from| from >= prefix)
                    .and_then(|from| dict.get(from..))
                    .ok_or(damaged)?;
                let middle = c.take(middle_len, "spliced bytes")?;
                let mut bytes = spare.take(len);
                bytes.extend_from_slice(head);
                bytes.extend_from_slice(middle);
                bytes.extend_from_slice(tail);
                if xxh3_64(&bytes) != hash {
                    return Err(SwitchError::Damaged {
                        what: "spliced image hash",
                        at: how_at,
                    });
                }
                bytes
            }
            _ => {
                return Err(SwitchError::Damaged {
                    what: "image encoding",
                    at: how_at,
                })
            }
        };
        images.push(NamedImage {
            name: name.to_string(),
            bytes,
        });
    }
    let runs = c.u32("hot run count")?;
    let mut hot = Vec::new();
    for _ in 0..runs {
        let pid = c.u32("hot run pid")? as i32;
        let vaddr = c.u64("hot run address")?;
        let at = c.at;
        if vaddr % PAGE as u64 != 0 {
            return Err(SwitchError::Damaged {
                what: "hot run address",
                at,
            });
        }
        let pages = c.u32("hot run length")? as usize;
        let len = pages.checked_mul(PAGE).ok_or(SwitchError::Damaged {
            what: "hot run length",
            at,
        })?;
        let data = c.take(len, "hot pages")?.to_vec();
        hot.push(HotPages { pid, vaddr, data });
    }
    if c.at != payload.len() {
        return Err(SwitchError::Damaged {
            what: "trailing bytes",
            at: c.at,
        });
    }
    Ok((images, hot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn delta() -> SwitchMessage {
        SwitchMessage::Delta {
            images: vec![
                NamedImage {
                    name: "core-42.img".into(),
                    bytes: vec![7; 3000],
                },
                NamedImage {
                    name: "pagemap-42.img".into(),
                    bytes: (0..200u8).collect(),
                },
            ],
            hot: vec![HotPages {
                pid: 42,
                vaddr: 0x7fff_0000,
                data: (0..2 * PAGE).map(|i| (i % 251) as u8).collect(),
            }],
        }
    }

    fn round_trip(msg: &SwitchMessage, compress: bool) -> SwitchMessage {
        let mut wire = Vec::new();
        write_message(&mut wire, msg, compress).unwrap();
        let mut r = wire.as_slice();
        let back = read_message(&mut r).unwrap();
        assert!(r.is_empty(), "the whole frame is read, no more");
        back
    }

    #[test]
    fn every_message_comes_back_as_sent() {
        let all = [
            SwitchMessage::Ready { hot_pages: true },
            SwitchMessage::Ready { hot_pages: false },
            delta(),
            SwitchMessage::Delta {
                images: Vec::new(),
                hot: Vec::new(),
            },
            SwitchMessage::Abort {
                why: "tree changed".into(),
            },
            SwitchMessage::Resumed,
            SwitchMessage::Failed {
                why: "no memory".into(),
            },
        ];
        for msg in &all {
            assert_eq!(&round_trip(msg, false), msg);
            assert_eq!(&round_trip(msg, true), msg);
        }
    }

    #[test]
    fn the_plain_length_is_the_plain_frame() {
        let SwitchMessage::Delta { images, hot } = delta() else {
            unreachable!()
        };
        let mut wire = Vec::new();
        write_message(&mut wire, &delta(), false).unwrap();
        assert_eq!(delta_plain_len(&images, &hot), wire.len());
    }

    #[test]
    fn a_compressible_delta_crosses_smaller() {
        let (mut plain, mut packed) = (Vec::new(), Vec::new());
        write_message(&mut plain, &delta(), false).unwrap();
        write_message(&mut packed, &delta(), true).unwrap();
        assert!(
            packed.len() * 2 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(
            u32::from_le_bytes(packed[4..8].try_into().unwrap()),
            FLAG_ZSTD
        );
    }

    #[test]
    fn an_image_crosses_as_its_difference_from_the_prepared_one() {
        let prepared: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut now = prepared.clone();
        now[5000..5100].fill(0xAB);
        let msg = SwitchMessage::Delta {
            images: vec![NamedImage {
                name: "pages-1.img".into(),
                bytes: now.clone(),
            }],
            hot: Vec::new(),
        };
        let base = |name: &str| (name == "pages-1.img").then_some(prepared.as_slice());
        let mut wire = Vec::new();
        write_message_based(&mut wire, &msg, false, base).unwrap();
        assert!(
            wire.len() < 1000,
            "{} bytes for a 100-byte change",
            wire.len()
        );
        assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
        // Without the prepared image, or with another one, it is an error, not wrong bytes.
        assert!(matches!(
            read_message(&mut wire.as_slice()),
            Err(SwitchError::NoBase { .. })
        ));
        let other = vec![1u8; prepared.len()];
        assert!(read_message_based(&mut wire.as_slice(), |_| Some(other.as_slice())).is_err());
    }

    #[test]
    fn an_image_of_another_length_crosses_compressed_against_the_prepared_one() {
        let prepared: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut now = prepared.clone();
        now.truncate(60 * 1024);
        now[5000..5100].fill(0xAB);
        let msg = SwitchMessage::Delta {
            images: vec![NamedImage {
                name: "pages-1.img".into(),
                bytes: now,
            }],
            hot: Vec::new(),
        };
        let base = |_: &str| Some(prepared.as_slice());
        let mut wire = Vec::new();
        write_message_based(&mut wire, &msg, false, base).unwrap();
        assert!(wire.len() < 1000, "{} bytes", wire.len());
        let how_at = HEADER_LEN + 4 + 2 + "pages-1.img".len();
        assert_eq!(wire[how_at], BASED);
        assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
    }

    /// A prepared image and its final version, as long, changed in a few places.
    fn changed_image(len: usize) -> (Vec<u8>, Vec<u8>) {
        let prepared: Vec<u8> = (0..len).map(|i| (i * 13 % 247) as u8).collect();
        let mut now = prepared.clone();
        for at in [0, 100, 101, 4000, len / 2, len - 1] {
            if let Some(b) = now.get_mut(at) {
                *b ^= 0x5A;
            }
        }
        (prepared, now)
    }

    #[test]
    fn an_image_as_long_as_the_prepared_one_crosses_as_the_xor_of_its_changed_blocks() {
        let (prepared, now) = changed_image(48 * 1024 + 17);
        let (msg, wire) = one_image_delta("core-1.img", &prepared, now, false);
        let base = |name: &str| (name == "core-1.img").then_some(prepared.as_slice());
        let how_at = HEADER_LEN + 4 + 2 + "core-1.img".len();
        assert_eq!(wire[how_at], XORED);
        // Six changed bytes, two of them neighbours: five runs.
        let runs = u32::from_le_bytes(wire[how_at + 21..how_at + 25].try_into().unwrap());
        assert_eq!(runs, 5);
        // Header, name, hashes, five run headers and six bytes.
        assert_eq!(
            wire.len(),
            HEADER_LEN + 4 + 12 + 25 + 5 * RUN_HEADER + 6 + 4
        );
        assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
        for compress in [false, true] {
            let mut packed = Vec::new();
            write_message_based(&mut packed, &msg, compress, base).unwrap();
            assert_eq!(
                read_message_based(&mut packed.as_slice(), base).unwrap(),
                msg
            );
        }
        assert!(matches!(
            read_message(&mut wire.as_slice()),
            Err(SwitchError::NoBase { .. })
        ));
        // A prepared copy that differs by one byte, or in length, is not the base.
        let mut other = prepared.clone();
        other[30_000] ^= 1;
        assert!(matches!(
            read_message_based(&mut wire.as_slice(), |_| Some(other.as_slice())),
            Err(SwitchError::BaseDiffers { .. })
        ));
        let shorter = &prepared[..prepared.len() - 1];
        assert!(matches!(
            read_message_based(&mut wire.as_slice(), |_| Some(shorter)),
            Err(SwitchError::BaseDiffers { .. })
        ));
        for cut in 0..wire.len() {
            assert!(
                read_message_based(&mut &wire[..cut], base).is_err(),
                "cut at {cut}"
            );
        }
    }

    /// A prepared image, and its final version where 8 bytes at 1000 became 11 (a varint
    /// that grew).
    fn grown_image() -> (Vec<u8>, Vec<u8>) {
        let prepared: Vec<u8> = (0..3000u32).map(|i| (i * 11 % 241) as u8).collect();
        let mut now = prepared[..1000].to_vec();
        now.extend_from_slice(&[0xF0; 11]);
        now.extend_from_slice(&prepared[1008..]);
        (prepared, now)
    }

    #[test]
    fn an_image_whose_length_changed_in_one_place_crosses_spliced() {
        let (prepared, now) = grown_image();
        let (msg, wire) = one_image_delta("core-1.img", &prepared, now, true);
        let base = |name: &str| (name == "core-1.img").then_some(prepared.as_slice());
        let how_at = HEADER_LEN + 4 + 2 + "core-1.img".len();
        assert_eq!(wire[how_at], SPLICED);
        // Header, name, hashes, the two ends and the 11 new bytes.
        assert_eq!(
            wire.len(),
            HEADER_LEN + 4 + 12 + 5 + SPLICED_HEADER + 11 + 4
        );
        assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
        assert!(matches!(
            read_message(&mut wire.as_slice()),
            Err(SwitchError::NoBase { .. })
        ));
        let mut other = prepared.clone();
        other[2000] ^= 1;
        assert!(matches!(
            read_message_based(&mut wire.as_slice(), |_| Some(other.as_slice())),
            Err(SwitchError::BaseDiffers { .. })
        ));
        for cut in 0..wire.len() {
            assert!(
                read_message_based(&mut &wire[..cut], base).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn images_are_decoded_into_the_spare_buffers_that_fit() {
        let (prepared, now) = changed_image(48 * 1024);
        let (core_prepared, core_now) = grown_image();
        let msg = SwitchMessage::Delta {
            images: vec![
                NamedImage {
                    name: "pages-1.img".into(),
                    bytes: now,
                },
                NamedImage {
                    name: "core-1.img".into(),
                    bytes: core_now,
                },
                NamedImage {
                    name: "stats-dump".into(),
                    bytes: vec![5; 10],
                },
            ],
            hot: Vec::new(),
        };
        let base = |name: &str| match name {
            "pages-1.img" => Some(prepared.as_slice()),
            "core-1.img" => Some(core_prepared.as_slice()),
            _ => None,
        };
        let mut wire = Vec::new();
        write_message_based(&mut wire, &msg, false, base).unwrap();
        let big = vec![9u8; 64 * 1024];
        let small = vec![9u8; 4096];
        let too_small = vec![9u8; 8];
        let ptrs = [big.as_ptr(), small.as_ptr()];
        let mut spare = vec![too_small, big, small];
        let back = read_message_reusing(&mut wire.as_slice(), base, &mut spare).unwrap();
        assert_eq!(back, msg);
        let SwitchMessage::Delta { images, .. } = back else {
            unreachable!()
        };
        // The pages in the large buffer, the core in the small one, the rest in the one
        // left that fits (none but the 8 bytes: a new one).
        assert_eq!(images[0].bytes.as_ptr(), ptrs[0]);
        assert_eq!(images[1].bytes.as_ptr(), ptrs[1]);
        assert_eq!(spare.len(), 1);
        assert_eq!(spare[0].len(), 8);
    }

    #[test]
    fn the_common_ends_never_overlap() {
        // A repeated pattern matches at both ends: together at most the shorter length.
        let base = vec![7u8; 100];
        let now = vec![7u8; 130];
        assert_eq!(common_ends(&now, &base), (100, 0));
        assert_eq!(common_ends(&base, &now), (100, 0));
        let (a, b) = grown_image();
        assert_eq!(common_ends(&b, &a), (1000, 1992));
        assert_eq!(common_ends(&a, &a), (3000, 0));
        assert_eq!(common_ends(&[], &a), (0, 0));
    }

    #[test]
    fn an_image_that_changed_everywhere_crosses_plain() {
        let prepared = vec![0u8; 1000];
        let now = vec![1u8; 1000];
        let msg = SwitchMessage::Delta {
            images: vec![NamedImage {
                name: "timens-0.img".into(),
                bytes: now,
            }],
            hot: Vec::new(),
        };
        let base = |_: &str| Some(prepared.as_slice());
        let mut wire = Vec::new();
        write_frame(&mut wire, &msg, false, &base, true).unwrap();
        let how_at = HEADER_LEN + 4 + 2 + "timens-0.img".len();
        // XORED would be longer, and a dictionary of zeroes does not help with ones much.
        assert_ne!(wire[how_at], XORED);
        assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
    }

    /// Prints what a delta like the RMA workload's costs to send and to read, the XORED
    /// way and with the prepared images as zstd dictionaries:
    /// `cargo test --release -p images-format -- --ignored --nocapture delta_timing`.
    #[test]
    #[ignore]
    fn delta_timing() {
        // A pages image of the present pages (stack, TLS, data: 12 pages) where two pages
        // changed in a few words, a core image where registers did, the clocks.
        let pages_base: Vec<u8> = (0..12 * PAGE)
            .map(|i| {
                if i % 4096 < 2048 {
                    (i * 31 % 253) as u8
                } else {
                    0
                }
            })
            .collect();
        let mut pages_now = pages_base.clone();
        for at in [
            3 * PAGE + 200,
            3 * PAGE + 208,
            3 * PAGE + 3000,
            11 * PAGE + 40,
        ] {
            pages_now[at..at + 8].copy_from_slice(&0xdead_beef_u64.to_le_bytes());
        }
        // The registers' varints grew by a byte.
        let core_base: Vec<u8> = (0..2800).map(|i| (i * 7 % 199) as u8).collect();
        let mut core_now = core_base[..120].to_vec();
        core_now.extend_from_slice(&[0x91; 297]);
        core_now.extend_from_slice(&core_base[416..]);
        let timens_base = vec![3u8; 40];
        let mut timens_now = timens_base.clone();
        timens_now[20..28].copy_from_slice(&123_456_u64.to_le_bytes());
        let bases: std::collections::HashMap<&str, &[u8]> = [
            ("pages-1.img", pages_base.as_slice()),
            ("core-1.img", core_base.as_slice()),
            ("timens-0.img", timens_base.as_slice()),
        ]
        .into_iter()
        .collect();
        let base = |name: &str| bases.get(name).copied();
        let msg = SwitchMessage::Delta {
            images: vec![
                NamedImage {
                    name: "core-1.img".into(),
                    bytes: core_now,
                },
                NamedImage {
                    name: "pages-1.img".into(),
                    bytes: pages_now,
                },
                NamedImage {
                    name: "timens-0.img".into(),
                    bytes: timens_now,
                },
            ],
            hot: Vec::new(),
        };
        // The first delta of a process pays for its allocations (a zstd context's tables
        // fault in): that is the one a switch sends.
        for (label, xor, compress) in [
            ("xored or spliced", true, false),
            ("xored or spliced, compressed", true, true),
            ("dictionary, compressed", false, true),
        ] {
            let mut wire = Vec::new();
            let start = std::time::Instant::now();
            write_frame(&mut wire, &msg, compress, &base, xor).unwrap();
            let send = start.elapsed();
            let start = std::time::Instant::now();
            read_message_based(&mut wire.as_slice(), base).unwrap();
            let read = start.elapsed();
            println!(
                "first {label}: {} bytes on the wire, send {:.1} us, read {:.1} us",
                wire.len(),
                send.as_secs_f64() * 1e6,
                read.as_secs_f64() * 1e6
            );
        }
        const ROUNDS: u32 = 200;
        for (label, xor, compress) in [
            ("dictionary, compressed", false, true),
            ("xored or spliced, compressed", true, true),
            ("xored or spliced", true, false),
        ] {
            let mut wire = Vec::new();
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                wire.clear();
                write_frame(&mut wire, &msg, compress, &base, xor).unwrap();
            }
            let send = start.elapsed() / ROUNDS;
            let start = std::time::Instant::now();
            for _ in 0..ROUNDS {
                let back = read_message_based(&mut wire.as_slice(), base).unwrap();
                assert_eq!(back, msg);
            }
            let read = start.elapsed() / ROUNDS;
            println!(
                "{label}: {} bytes on the wire, send {:.1} us, read {:.1} us per delta",
                wire.len(),
                send.as_secs_f64() * 1e6,
                read.as_secs_f64() * 1e6
            );
        }
    }

    #[test]
    fn the_magic_opens_only_a_switch() {
        let mut wire = Vec::new();
        write_magic(&mut wire).unwrap();
        assert!(read_magic(&mut wire.as_slice()).is_ok());
        // A page-server frame's first word is a small command number.
        let get = [7u8, 0, 0, 0x40, 1, 0, 0, 0];
        assert!(matches!(
            read_magic(&mut get.as_slice()),
            Err(SwitchError::BadMagic)
        ));
    }

    #[test]
    fn every_cut_of_a_message_is_an_error() {
        for compress in [false, true] {
            let mut wire = Vec::new();
            write_message(&mut wire, &delta(), compress).unwrap();
            for cut in 0..wire.len() {
                assert!(read_message(&mut &wire[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn names_outside_the_directory_are_refused() {
        for name in ["../core-1.img", "a/b", "", ".."] {
            let msg = SwitchMessage::Delta {
                images: vec![NamedImage {
                    name: name.into(),
                    bytes: vec![1],
                }],
                hot: Vec::new(),
            };
            let mut wire = Vec::new();
            write_message(&mut wire, &msg, false).unwrap();
            assert!(
                matches!(
                    read_message(&mut wire.as_slice()),
                    Err(SwitchError::Damaged { .. })
                ),
                "{name:?}"
            );
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_reading_on() {
        let mut big = Vec::new();
        big.extend_from_slice(&KIND_DELTA.to_le_bytes());
        big.extend_from_slice(&0u32.to_le_bytes());
        big.extend_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_message(&mut big.as_slice()),
            Err(SwitchError::TooLarge { .. })
        ));
        let mut unknown = Vec::new();
        unknown.extend_from_slice(&99u32.to_le_bytes());
        unknown.extend_from_slice(&[0; 12]);
        assert!(matches!(
            read_message(&mut unknown.as_slice()),
            Err(SwitchError::UnknownKind { kind: 99 })
        ));
        assert!(matches!(
            read_message(&mut [].as_slice()),
            Err(SwitchError::Closed)
        ));
    }

    /// Whether a DELTA read back from a damaged frame has, under every name it shares with
    /// `sent`, the bytes sent (anything else but a DELTA is another message altogether).
    fn same_or_renamed(back: &SwitchMessage, sent: &SwitchMessage) -> bool {
        let (SwitchMessage::Delta { images: back, .. }, SwitchMessage::Delta { images: sent, .. }) =
            (back, sent)
        else {
            return true;
        };
        back.iter()
            .all(|b| sent.iter().all(|s| s.name != b.name || s.bytes == b.bytes))
    }

    /// A DELTA of one image `now`, named `name`, and its frame against `prepared`.
    fn one_image_delta(
        name: &str,
        prepared: &[u8],
        now: Vec<u8>,
        compress: bool,
    ) -> (SwitchMessage, Vec<u8>) {
        let msg = SwitchMessage::Delta {
            images: vec![NamedImage {
                name: name.into(),
                bytes: now,
            }],
            hot: Vec::new(),
        };
        let mut wire = Vec::new();
        write_message_based(&mut wire, &msg, compress, |n| {
            (n == name).then_some(prepared)
        })
        .unwrap();
        (msg, wire)
    }

    /// Flips bit `bit` of the byte at `at` (modulo the length) of a non-empty frame.
    fn flip(wire: &mut [u8], at: usize, bit: u8) {
        let at = at % wire.len();
        wire[at] ^= 1 << bit;
    }

    proptest! {
        #[test]
        fn flipped_bytes_never_panic(at in 0usize..9000, bit in 0u8..8, compress: bool) {
            let mut wire = Vec::new();
            write_message(&mut wire, &delta(), compress).unwrap();
            flip(&mut wire, at, bit);
            let _ = read_message(&mut wire.as_slice());
        }

        #[test]
        fn flipped_bytes_of_a_based_image_never_panic(at in 0usize..2000, bit in 0u8..8) {
            let prepared: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 253) as u8).collect();
            let mut now = prepared.clone();
            now[100..200].fill(9);
            // Longer than the prepared image: BASED, not XORED.
            now.extend_from_slice(&[1, 2, 3]);
            let (msg, mut wire) = one_image_delta("core-1.img", &prepared, now, false);
            prop_assert_eq!(wire[HEADER_LEN + 4 + 2 + "core-1.img".len()], BASED);
            flip(&mut wire, at, bit);
            let base = |name: &str| (name == "core-1.img").then_some(prepared.as_slice());
            if let Ok(back) = read_message_based(&mut wire.as_slice(), base) {
                // zstd's checksum sees a flip in the frame, the decompressed length one in
                // the lengths; a flip in the name's length shifts everything after it (what
                // TCP's own checks are for), and only another name comes back then.
                prop_assert!(same_or_renamed(&back, &msg));
            }
        }

        #[test]
        fn flipped_bytes_of_a_xored_image_are_errors_or_the_same_delta(at in 0usize..2000, bit in 0u8..8, compress: bool) {
            let (prepared, now) = changed_image(9000);
            let (msg, mut wire) = one_image_delta("pages-1.img", &prepared, now, compress);
            flip(&mut wire, at, bit);
            // As at the destination: another name has another prepared image, or none.
            let base = |name: &str| (name == "pages-1.img").then_some(prepared.as_slice());
            if let Ok(back) = read_message_based(&mut wire.as_slice(), base) {
                // The hashes see a flip in the runs or the base; see above for the name.
                prop_assert!(same_or_renamed(&back, &msg));
            }
        }

        #[test]
        fn flipped_bytes_of_a_spliced_image_are_errors_or_the_same_delta(at in 0usize..200, bit in 0u8..8) {
            let (prepared, now) = grown_image();
            let (msg, mut wire) = one_image_delta("core-1.img", &prepared, now, false);
            flip(&mut wire, at, bit);
            let base = |name: &str| (name == "core-1.img").then_some(prepared.as_slice());
            if let Ok(back) = read_message_based(&mut wire.as_slice(), base) {
                prop_assert!(same_or_renamed(&back, &msg));
            }
        }

        #[test]
        fn any_edit_of_a_prepared_image_comes_back(
            prepared in proptest::collection::vec(any::<u8>(), 0..3000),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..20),
            new_len in proptest::option::of(0usize..3000),
            splice in proptest::option::of((any::<usize>(), 0usize..40, proptest::collection::vec(any::<u8>(), 0..40))),
            compress: bool,
        ) {
            let mut now = prepared.clone();
            if let Some((at, removed, inserted)) = splice {
                let at = at % (now.len() + 1);
                let end = (at + removed).min(now.len());
                now.splice(at..end, inserted);
            }
            if let Some(n) = new_len {
                now.resize(n, 0xEE);
            }
            for (at, b) in edits {
                if !now.is_empty() {
                    let i = at % now.len();
                    now[i] = b;
                }
            }
            let msg = SwitchMessage::Delta {
                images: vec![NamedImage { name: "core-9.img".into(), bytes: now }],
                hot: Vec::new(),
            };
            let base = |_: &str| Some(prepared.as_slice());
            let mut wire = Vec::new();
            write_message_based(&mut wire, &msg, compress, base).unwrap();
            prop_assert_eq!(read_message_based(&mut wire.as_slice(), base).unwrap(), msg);
        }

        #[test]
        fn random_payloads_never_panic(kind in 1u32..6, flags in 0u32..4, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut wire = Vec::new();
            wire.extend_from_slice(&kind.to_le_bytes());
            wire.extend_from_slice(&flags.to_le_bytes());
            wire.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            wire.extend_from_slice(&payload);
            let _ = read_message(&mut wire.as_slice());
        }
    }
}
