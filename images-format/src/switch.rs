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
//! `len` bytes (`how` 0) or `packed_len: u32` and a zstd frame of them compressed with the
//! prepared image of the same name as its dictionary (`how` 1, [`BASED`]); then `count: u32`
//! and per run of hot pages `pid: i32, vaddr: u64, pages: u32` and the pages.
//!
//! Why against the prepared image: both sides hold it (the source wrote it, the destination
//! restored from its copy), and an image that changed mostly did not: a pages image where
//! the stack page moved, a core image where registers did. Only the differences then cross,
//! which is what a slow link needs. Frames carry zstd's checksum: a destination whose copy
//! of the prepared image differs gets an error, not wrong bytes.
//! Every length is checked against what is left before anything is allocated: a damaged
//! message is an error, never a panic or a huge allocation.

use std::io::{self, Read, Write};

/// What a switch connection opens with.
pub const SWITCH_MAGIC: [u8; 8] = *b"CKPTSWCH";
/// The payload is one zstd frame of the plain payload.
pub const FLAG_ZSTD: u32 = 1;
/// READY's flag: send the pages under each thread's instruction and stack pointers.
pub const FLAG_HOT_PAGES: u32 = 2;
/// The largest payload either side accepts (plain or compressed).
pub const MAX_PAYLOAD: u64 = 256 << 20;
/// An image is compressed against its prepared version only up to this size of that
/// version: the destination keeps the prepared images up to it for the switch.
pub const MAX_BASE: usize = 4 << 20;
/// An image of a DELTA compressed with its prepared version as the dictionary.
pub const BASED: u8 = 1;
const PLAIN: u8 = 0;
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

/// Pages of process `pid` (its image pid) from `vaddr` on, whole pages.
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
    let (kind, mut flags, mut payload) = match msg {
        SwitchMessage::Ready { hot_pages } => {
            let flags = if *hot_pages { FLAG_HOT_PAGES } else { 0 };
            (KIND_READY, flags, Vec::new())
        }
        SwitchMessage::Delta { images, hot } => (KIND_DELTA, 0, encode_delta(images, hot, &base)),
        SwitchMessage::Abort { why } => (KIND_ABORT, 0, why.as_bytes().to_vec()),
        SwitchMessage::Resumed => (KIND_RESUMED, 0, Vec::new()),
        SwitchMessage::Failed { why } => (KIND_FAILED, 0, why.as_bytes().to_vec()),
    };
    if compress && kind == KIND_DELTA {
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
    // Read in steps, so that a lying length costs only what really arrives.
    let mut payload = Vec::new();
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
            let (images, hot) = decode_delta(&payload, &base)?;
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
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(images.len() as u32).to_le_bytes());
    for image in images {
        out.extend_from_slice(&(image.name.len() as u16).to_le_bytes());
        out.extend_from_slice(image.name.as_bytes());
        let packed = base(&image.name)
            .filter(|b| b.len() <= MAX_BASE)
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

/// `bytes` as one zstd frame (with its checksum) whose dictionary is `base`.
fn compress_against(bytes: &[u8], base: &[u8]) -> Option<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::with_dictionary(1, base).ok()?;
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .ok()?;
    c.compress(bytes).ok()
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
            PLAIN => c.take(len, "image bytes")?.to_vec(),
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

    proptest! {
        #[test]
        fn flipped_bytes_never_panic(at in 0usize..9000, bit in 0u8..8, compress: bool) {
            let mut wire = Vec::new();
            write_message(&mut wire, &delta(), compress).unwrap();
            let at = at % wire.len();
            wire[at] ^= 1 << bit;
            let _ = read_message(&mut wire.as_slice());
        }

        #[test]
        fn flipped_bytes_of_a_based_image_never_panic(at in 0usize..2000, bit in 0u8..8) {
            let prepared: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 253) as u8).collect();
            let mut now = prepared.clone();
            now[100..200].fill(9);
            let msg = SwitchMessage::Delta {
                images: vec![NamedImage { name: "core-1.img".into(), bytes: now }],
                hot: Vec::new(),
            };
            let base = |_: &str| Some(prepared.as_slice());
            let mut wire = Vec::new();
            write_message_based(&mut wire, &msg, false, base).unwrap();
            let at = at % wire.len();
            wire[at] ^= 1 << bit;
            if let Ok(back) = read_message_based(&mut wire.as_slice(), base) {
                // A flip zstd's checksum cannot see is one in a length it then checked.
                let is_delta = matches!(back, SwitchMessage::Delta { .. });
                prop_assert!(is_delta);
            }
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
