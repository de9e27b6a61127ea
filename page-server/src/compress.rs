//! Our extension of the protocol: zstd-compressed page data (see [`crate::protocol`] for
//! where it sits on the wire).
//!
//! An ADD_F frame whose flags include [`PE_ZSTD`] carries, instead of `nr_pages * 4096`
//! raw bytes, a little-endian `u32` L and then L bytes of one zstd frame that
//! decompresses to exactly `nr_pages * 4096` bytes. A sender uses it only when asked to,
//! and only when the result is smaller than the raw pages; a receiver bounds L and the
//! page count before it reads or allocates anything, and checks the decompressed size.
//!
//! [`PageCompressor`] builds such frames (header, L and data contiguous, for one write);
//! [`PageDecompressor`] reads them back. [`PageTraffic`] counts what the pages cost on the
//! wire against their raw size.

use std::io::{self, Read};

use images_format::{PageFlags, PAGE_SIZE};
use zstd::bulk::{Compressor, Decompressor};

use crate::protocol::{Command, Frame, FRAME_LEN, PE_ZSTD};

/// Most pages one PE_ZSTD frame may carry (4 MiB): the receiver decompresses a frame in
/// memory, so this bounds what a peer can make it allocate. Larger sends are split.
pub const MAX_ZSTD_PAGES: u64 = 1024;

/// zstd's fastest level: on a link where compression pays, it should not be the CPU that
/// waits.
pub const ZSTD_LEVEL: i32 = 1;

/// Bytes of the length that precedes the zstd frame.
pub const LEN_BYTES: usize = 4;

/// Compressed pages that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZstdError {
    #[error("a compressed frame of {nr_pages} pages: at most {max} may be sent compressed")]
    TooManyPages { nr_pages: u64, max: u64 },
    #[error("a compressed frame without pages (flags {flags:#x})")]
    NotPages { flags: u16 },
    #[error("compressed length {len} for {raw} bytes of pages is out of bounds (1..={bound})")]
    BadLength { len: u32, raw: u64, bound: u64 },
    #[error("{len} bytes of compressed pages do not decompress to {raw} bytes: {reason}")]
    Corrupt {
        len: usize,
        raw: u64,
        reason: String,
    },
    #[error("compressed pages decompress to {got} bytes, not the {expected} the frame announces")]
    SizeMismatch { got: u64, expected: u64 },
    #[error("set up a zstd context: {reason}")]
    Context { reason: String },
}

/// The bytes of data a PE_ZSTD frame of `nr_pages` pages stands for, once its page count
/// is known to be within bounds.
pub fn raw_len(frame: &Frame) -> Result<usize, ZstdError> {
    if !frame.page_flags().contains(PageFlags::PRESENT) || !matches!(frame.command, Command::AddF) {
        return Err(ZstdError::NotPages { flags: frame.flags });
    }
    if frame.nr_pages == 0 || frame.nr_pages > MAX_ZSTD_PAGES {
        return Err(ZstdError::TooManyPages {
            nr_pages: frame.nr_pages,
            max: MAX_ZSTD_PAGES,
        });
    }
    // At most MAX_ZSTD_PAGES pages: 4 MiB fits usize everywhere we run.
    Ok(usize::try_from(frame.nr_pages * PAGE_SIZE).unwrap_or(usize::MAX))
}

/// Checks the length L a PE_ZSTD frame announces for `raw` bytes of pages: no zstd frame
/// of that content is longer than zstd's bound for it, and none is empty.
pub fn check_len(len: u32, raw: usize) -> Result<usize, ZstdError> {
    let bound = zstd::zstd_safe::compress_bound(raw);
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n == 0 || n > bound {
        return Err(ZstdError::BadLength {
            len,
            raw: raw as u64,
            bound: bound as u64,
        });
    }
    Ok(n)
}

/// What pages cost on the wire. Frame headers are not counted: they are the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageTraffic {
    /// Bytes of page contents (4096 per page).
    pub raw_bytes: u64,
    /// Bytes those contents took on the wire: the raw bytes, or L + 4 when compressed.
    pub wire_bytes: u64,
    /// Frames with page data, and those of them compressed.
    pub frames: u64,
    pub zstd_frames: u64,
}

impl PageTraffic {
    pub fn add_raw(&mut self, bytes: u64) {
        self.raw_bytes += bytes;
        self.wire_bytes += bytes;
        self.frames += 1;
    }

    pub fn add_zstd(&mut self, raw: u64, wire: u64) {
        self.raw_bytes += raw;
        self.wire_bytes += wire;
        self.frames += 1;
        self.zstd_frames += 1;
    }

    /// Wire bytes per raw byte (1.0 when nothing was sent).
    pub fn ratio(&self) -> f64 {
        if self.raw_bytes == 0 {
            1.0
        } else {
            self.wire_bytes as f64 / self.raw_bytes as f64
        }
    }

    /// Logs the totals at info level (the end of a session).
    pub fn log(&self, what: &'static str) {
        tracing::info!(
            raw_bytes = self.raw_bytes,
            wire_bytes = self.wire_bytes,
            frames = self.frames,
            zstd_frames = self.zstd_frames,
            ratio = format_args!("{:.3}", self.ratio()),
            "{what}"
        );
    }
}

/// Compresses pages into PE_ZSTD frames with one reused zstd context.
pub struct PageCompressor {
    ctx: Compressor<'static>,
    /// Header, L and zstd frame of the last frame built; grows to the largest needed.
    out: Vec<u8>,
    /// Pages given in several buffers, joined.
    joined: Vec<u8>,
}

impl std::fmt::Debug for PageCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCompressor")
            .field("level", &ZSTD_LEVEL)
            .finish_non_exhaustive()
    }
}

impl PageCompressor {
    pub fn new() -> Result<Self, ZstdError> {
        let ctx = Compressor::new(ZSTD_LEVEL).map_err(|e| ZstdError::Context {
            reason: e.to_string(),
        })?;
        Ok(PageCompressor {
            ctx,
            out: Vec::new(),
            joined: Vec::new(),
        })
    }

    /// `frame` (an ADD_F with PE_PRESENT, at most [`MAX_ZSTD_PAGES`] pages) and its pages
    /// `data` as a PE_ZSTD frame: the 32 header bytes, L and the zstd frame, contiguous so
    /// that they leave in one write. `None` when that would not be smaller than the frame
    /// with the raw pages (or the frame cannot be compressed): send it raw then.
    pub fn encode(&mut self, frame: &Frame, data: &[u8]) -> Option<&[u8]> {
        let raw = raw_len(frame).ok()?;
        if data.len() != raw {
            return None;
        }
        // Worth it only if L and the frame together are smaller than the pages.
        let room = raw.checked_sub(LEN_BYTES + 1)?;
        let start = FRAME_LEN + LEN_BYTES;
        if self.out.len() < start + room {
            self.out.resize(start + room, 0);
        }
        // A frame that does not fit `room` is an error from zstd: incompressible pages
        // cost one attempt and are then sent raw.
        let n = self
            .ctx
            .compress_to_buffer(data, &mut self.out[start..start + room])
            .ok()?;
        let len = u32::try_from(n).ok()?;
        let mut header = *frame;
        header.flags |= PE_ZSTD;
        self.out[..FRAME_LEN].copy_from_slice(&header.encode());
        self.out[FRAME_LEN..start].copy_from_slice(&len.to_le_bytes());
        Some(&self.out[..start + n])
    }

    /// [`PageCompressor::encode`] for pages given in several buffers.
    pub fn encode_slices(&mut self, frame: &Frame, data: &[&[u8]]) -> Option<&[u8]> {
        if let [one] = data {
            return self.encode(frame, one);
        }
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        for slice in data {
            joined.extend_from_slice(slice);
        }
        // The result borrows `self.out`, not `joined`: put the buffer back first.
        let ok = self.encode(frame, &joined).map(<[u8]>::len);
        self.joined = joined;
        ok.map(|n| &self.out[..n])
    }
}

/// Reads PE_ZSTD frames' data back, with one reused zstd context.
pub struct PageDecompressor {
    ctx: Decompressor<'static>,
    /// The compressed bytes of the frame being read.
    input: Vec<u8>,
}

impl std::fmt::Debug for PageDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageDecompressor").finish_non_exhaustive()
    }
}

/// Reading compressed pages from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadZstdError {
    #[error("read compressed pages")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Zstd(#[from] ZstdError),
}

impl PageDecompressor {
    pub fn new() -> Result<Self, ZstdError> {
        let ctx = Decompressor::new().map_err(|e| ZstdError::Context {
            reason: e.to_string(),
        })?;
        Ok(PageDecompressor {
            ctx,
            input: Vec::new(),
        })
    }

    /// Decompresses the zstd frame `compressed` into `out`, which it must fill exactly.
    pub fn decompress(&mut self, compressed: &[u8], out: &mut [u8]) -> Result<(), ZstdError> {
        let expected = out.len() as u64;
        // A frame that records its size says early whether it is the one announced.
        if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(compressed) {
            if size != expected {
                return Err(ZstdError::SizeMismatch {
                    got: size,
                    expected,
                });
            }
        }
        let got = self
            .ctx
            .decompress_to_buffer(compressed, out)
            .map_err(|e| ZstdError::Corrupt {
                len: compressed.len(),
                raw: expected,
                reason: e.to_string(),
            })?;
        if got as u64 != expected {
            return Err(ZstdError::SizeMismatch {
                got: got as u64,
                expected,
            });
        }
        Ok(())
    }

    /// Reads L and the zstd frame that follow the PE_ZSTD `frame` from `stream` into
    /// `out` (exactly the frame's pages long); returns the bytes read from the stream.
    pub fn read_pages<R: Read>(
        &mut self,
        stream: &mut R,
        frame: &Frame,
        out: &mut [u8],
    ) -> Result<u64, ReadZstdError> {
        let raw = raw_len(frame)?;
        if out.len() != raw {
            return Err(ZstdError::SizeMismatch {
                got: out.len() as u64,
                expected: raw as u64,
            }
            .into());
        }
        let mut len = [0u8; LEN_BYTES];
        stream.read_exact(&mut len).map_err(ReadZstdError::Io)?;
        let n = check_len(u32::from_le_bytes(len), raw)?;
        let mut input = std::mem::take(&mut self.input);
        input.resize(n, 0);
        let result = stream
            .read_exact(&mut input)
            .map_err(ReadZstdError::Io)
            .and_then(|()| Ok(self.decompress(&input, out)?));
        self.input = input;
        result.map(|()| (LEN_BYTES + n) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = PAGE_SIZE as usize;

    /// Pages the way the reference workload leaves them: a few words written, the rest 0.
    fn sparse_pages(n: usize) -> Vec<u8> {
        let mut data = vec![0u8; n * P];
        for (i, page) in data.chunks_mut(P).enumerate() {
            for w in 0..8 {
                let v = (i * 8 + w) as u64 ^ 0x9e37_79b9_7f4a_7c15;
                page[w * 512..w * 512 + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        data
    }

    /// Bytes no compressor can shrink (xorshift).
    fn random_pages(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..n * P / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    fn add_f(nr_pages: u64) -> Frame {
        Frame::add_f(7 << 8 | 1, 0x7f00_0000_0000, nr_pages, 4)
    }

    /// Splits an encoded PE_ZSTD frame into its header and what follows it.
    fn split(bytes: &[u8]) -> (Frame, &[u8]) {
        let mut h = [0u8; FRAME_LEN];
        h.copy_from_slice(&bytes[..FRAME_LEN]);
        (Frame::decode(&h).expect("header"), &bytes[FRAME_LEN..])
    }

    #[test]
    fn compressed_frames_round_trip() {
        let mut c = PageCompressor::new().expect("compressor");
        let mut d = PageDecompressor::new().expect("decompressor");
        for n in [1usize, 3, 64, MAX_ZSTD_PAGES as usize] {
            let data = sparse_pages(n);
            let frame = add_f(n as u64);
            let bytes = c.encode(&frame, &data).expect("compressible").to_vec();
            assert!(
                bytes.len() < FRAME_LEN + data.len() / 4,
                "{n} pages: {}",
                bytes.len()
            );
            let (header, rest) = split(&bytes);
            assert_eq!(header.flags, 4 | PE_ZSTD);
            assert_eq!(header.page_flags(), PageFlags::PRESENT);
            assert_eq!(
                (header.nr_pages, header.vaddr, header.dst_id),
                (frame.nr_pages, frame.vaddr, frame.dst_id)
            );
            let l = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            assert_eq!(l as usize + LEN_BYTES, rest.len());
            let mut out = vec![0xffu8; data.len()];
            let mut stream = rest;
            let wire = d.read_pages(&mut stream, &header, &mut out).expect("read");
            assert_eq!(wire as usize, rest.len());
            assert!(stream.is_empty(), "read exactly the payload");
            assert!(out == data, "{n} pages come back as sent");
        }
        // Several buffers give the same frame as one.
        let data = sparse_pages(4);
        let one = c.encode(&add_f(4), &data).expect("one").to_vec();
        let parts: Vec<&[u8]> = data.chunks(3000).collect();
        assert_eq!(c.encode_slices(&add_f(4), &parts).expect("parts"), &one[..]);
    }

    #[test]
    fn incompressible_or_unfit_pages_are_not_compressed() {
        let mut c = PageCompressor::new().expect("compressor");
        assert!(c.encode(&add_f(8), &random_pages(8)).is_none());
        // The context is still usable after a failed attempt.
        assert!(c.encode(&add_f(2), &sparse_pages(2)).is_some());
        // Wrong length, too many pages, no pages, not ADD_F: never compressed.
        assert!(c.encode(&add_f(2), &sparse_pages(1)).is_none());
        let big = MAX_ZSTD_PAGES as usize + 1;
        assert!(c.encode(&add_f(big as u64), &vec![0; big * P]).is_none());
        let hole = Frame::add_f(7 << 8 | 1, 0x1000, 1, 2);
        assert!(c.encode(&hole, &[0; P]).is_none());
        let get = Frame::get(7, 0x1000, 1);
        assert!(c.encode(&get, &[0; P]).is_none());
    }

    #[test]
    fn bad_lengths_are_refused_before_reading() {
        let mut d = PageDecompressor::new().expect("decompressor");
        let mut out = vec![0u8; P];
        for l in [
            0u32,
            u32::MAX,
            (zstd::zstd_safe::compress_bound(P) + 1) as u32,
        ] {
            let mut wire = l.to_le_bytes().to_vec();
            wire.extend_from_slice(&[0u8; 64]);
            let err = d.read_pages(&mut &wire[..], &add_f(1), &mut out);
            assert!(
                matches!(err, Err(ReadZstdError::Zstd(ZstdError::BadLength { len, .. })) if len == l),
                "{l}: {err:?}"
            );
        }
        // A page count beyond the bound is refused before any length is read.
        let big = add_f(MAX_ZSTD_PAGES + 1);
        let err = d.read_pages(&mut &[1u8, 0, 0, 0][..], &big, &mut out);
        assert!(matches!(
            err,
            Err(ReadZstdError::Zstd(ZstdError::TooManyPages { .. }))
        ));
        assert!(matches!(
            raw_len(&add_f(0)),
            Err(ZstdError::TooManyPages { nr_pages: 0, .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_payloads_are_errors() {
        let mut c = PageCompressor::new().expect("compressor");
        let mut d = PageDecompressor::new().expect("decompressor");
        let data = sparse_pages(16);
        let frame = add_f(16);
        let bytes = c.encode(&frame, &data).expect("compressible").to_vec();
        let payload = &bytes[FRAME_LEN..];
        let mut out = vec![0u8; data.len()];
        // The stream ends anywhere inside L or the frame.
        for cut in 0..payload.len() {
            let err = d.read_pages(&mut &payload[..cut], &frame, &mut out);
            assert!(matches!(err, Err(ReadZstdError::Io(_))), "cut at {cut}");
        }
        // L shorter than the frame: a truncated zstd frame.
        let l = payload.len() - LEN_BYTES;
        for short in [1, l / 2, l - 1] {
            let mut wire = (short as u32).to_le_bytes().to_vec();
            wire.extend_from_slice(&payload[LEN_BYTES..LEN_BYTES + short]);
            let err = d.read_pages(&mut &wire[..], &frame, &mut out);
            assert!(
                matches!(err, Err(ReadZstdError::Zstd(_))),
                "L {short}: {err:?}"
            );
        }
        // Every byte of the frame flipped in turn, and plain garbage: errors or the exact
        // size, never a panic. Some flips land in literals and still decode; those must
        // still fill exactly the pages.
        for at in 0..l {
            let mut wire = payload.to_vec();
            wire[LEN_BYTES + at] ^= 0x5a;
            if d.read_pages(&mut &wire[..], &frame, &mut out).is_ok() {
                assert_eq!(out.len(), data.len());
            }
        }
        let mut x = 1u32;
        for len in 1..200u32 {
            let mut wire = len.to_le_bytes().to_vec();
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                wire.push((x >> 16) as u8);
            }
            assert!(d.read_pages(&mut &wire[..], &frame, &mut out).is_err());
        }
        // The context still works after all that.
        let mut stream = payload;
        d.read_pages(&mut stream, &frame, &mut out)
            .expect("good frame");
        assert!(out == data);
    }

    #[test]
    fn a_frame_of_another_size_is_a_size_mismatch() {
        let mut c = PageCompressor::new().expect("compressor");
        let mut d = PageDecompressor::new().expect("decompressor");
        let three = c.encode(&add_f(3), &sparse_pages(3)).expect("3").to_vec();
        let payload = &three[FRAME_LEN..];
        // Announced as 2 pages, or as 4: the content is 3.
        for n in [2u64, 4] {
            let mut out = vec![0u8; n as usize * P];
            let err = d.read_pages(&mut &payload[..], &add_f(n), &mut out);
            assert!(
                matches!(
                    err,
                    Err(ReadZstdError::Zstd(ZstdError::SizeMismatch {
                        got: 12288,
                        ..
                    }))
                ),
                "{n}: {err:?}"
            );
        }
        // A frame that does not record its size is caught by the decompressed length.
        let mut plain = Compressor::new(1).expect("ctx");
        plain
            .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .expect("flag");
        let frame = plain.compress(&sparse_pages(3)).expect("compress");
        let mut out = vec![0u8; 4 * P];
        let err = d.decompress(&frame, &mut out);
        assert_eq!(
            err,
            Err(ZstdError::SizeMismatch {
                got: 3 * P as u64,
                expected: 4 * P as u64
            })
        );
        let mut out = vec![0u8; 2 * P];
        assert!(matches!(
            d.decompress(&frame, &mut out),
            Err(ZstdError::Corrupt { .. })
        ));
    }
}
