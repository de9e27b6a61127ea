//! Entry framing: the header of an image file and the length-prefixed entries after it.
//!
//! ```text
//! header (see kind.rs)
//! entry  : u32 len (little-endian) | len bytes of a protobuf message
//!          [ payload: raw bytes whose length a field of the message gives ]
//! ...    : entries until the end of the file; a file that ends exactly after an entry
//!          (or its payload) is complete, one that ends anywhere else is truncated
//! ```
//!
//! Readers trust nothing in the file: every length is checked against [`MAX_ENTRY_LEN`] and,
//! when the size of the file is known, against the bytes left, before anything is allocated.

use std::io::{self, Read, Write};

use prost::Message;

use crate::error::ImageError;
use crate::kind::{Header, ImageKind, IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC};

/// Largest entry a reader accepts. The largest real entries (an mm_entry with thousands of
/// VMAs, a seccomp chain) are a few MiB.
pub const MAX_ENTRY_LEN: u64 = 64 << 20;

/// Largest payload read into memory at once by [`ImageReader::read_payload`]; larger ones
/// must be streamed with [`ImageReader::copy_payload`].
pub const MAX_PAYLOAD_LEN: u64 = 1 << 30;

/// Reads the header and entries of one image.
#[derive(Debug)]
pub struct ImageReader<R> {
    inner: R,
    name: String,
    kind: ImageKind,
    /// Index of the next entry.
    index: u64,
    /// Bytes left in the file after what was consumed, when the size is known.
    remaining: Option<u64>,
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the header of an image of `kind`. `name` is what errors call the
    /// image (usually its file name). For raw kinds nothing is read.
    pub fn new(
        inner: R,
        kind: ImageKind,
        name: impl Into<String>,
        len: Option<u64>,
    ) -> Result<Self, ImageError> {
        let mut reader = ImageReader {
            inner,
            name: name.into(),
            kind,
            index: 0,
            remaining: len,
        };
        match kind.header() {
            Header::Raw => {}
            Header::Single => {
                let found = reader.read_header_word()?;
                reader.expect_magic(kind.magic(), found)?;
            }
            Header::Common | Header::Service => {
                let first = reader.read_header_word()?;
                let lead = if kind.header() == Header::Common {
                    IMG_COMMON_MAGIC
                } else {
                    IMG_SERVICE_MAGIC
                };
                reader.expect_magic(lead, first)?;
                let found = reader.read_header_word()?;
                reader.expect_magic(kind.magic(), found)?;
            }
        }
        Ok(reader)
    }

    /// Reads a header of any kind and finds the kind from its magic, as crit does: a leading
    /// `IMG_COMMON_MAGIC` or `IMG_SERVICE_MAGIC` is skipped, and the next word names the
    /// kind. Like crit, this does not insist on the lead word a kind is written with (old
    /// images had none). Kinds that share a magic come back as the one viewers print (see
    /// [`ImageKind::from_magic`]).
    pub fn detect(inner: R, name: impl Into<String>, len: Option<u64>) -> Result<Self, ImageError> {
        let mut reader = ImageReader {
            inner,
            name: name.into(),
            kind: ImageKind::Inventory,
            index: 0,
            remaining: len,
        };
        let first = reader.read_header_word()?;
        let magic = match first {
            IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC => reader.read_header_word()?,
            other => other,
        };
        reader.kind = ImageKind::from_magic(magic).ok_or_else(|| ImageError::UnknownMagic {
            image: reader.name.clone(),
            magic,
        })?;
        Ok(reader)
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Index of the next entry to be read (the number read so far).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Bytes left in the image, when its size is known.
    pub fn remaining(&self) -> Option<u64> {
        self.remaining
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next entry's message bytes, or `None` at the end of the image.
    pub fn read_raw_entry(&mut self) -> Result<Option<Vec<u8>>, ImageError> {
        check_has_entries(self.kind, &self.name)?;
        let mut len_bytes = [0u8; 4];
        let got = self.read_up_to(&mut len_bytes, "read length of")?;
        if got == 0 {
            return Ok(None);
        }
        if got < len_bytes.len() {
            return Err(self.truncated("length", 4, got as u64));
        }
        let len = u64::from(u32::from_le_bytes(len_bytes));
        let limit = self
            .remaining
            .map_or(MAX_ENTRY_LEN, |left| left.min(MAX_ENTRY_LEN));
        if len > limit {
            return Err(ImageError::EntryTooLarge {
                image: self.name.clone(),
                index: self.index,
                len,
                limit,
            });
        }
        let buf = self.read_exact_vec(len, "message", "read")?;
        self.index += 1;
        Ok(Some(buf))
    }

    /// The next entry decoded as `M`, or `None` at the end of the image.
    ///
    /// prost does not check required fields, so a message missing one decodes with the
    /// field's default; callers that depend on a field check it.
    pub fn read_entry<M: Message + Default>(&mut self) -> Result<Option<M>, ImageError> {
        let Some(bytes) = self.read_raw_entry()? else {
            return Ok(None);
        };
        M::decode(bytes.as_slice())
            .map(Some)
            .map_err(|source| ImageError::Decode {
                image: self.name.clone(),
                index: self.index - 1,
                message: std::any::type_name::<M>(),
                source,
            })
    }

    /// The payload of `len` bytes after the last entry, in memory.
    pub fn read_payload(&mut self, len: u64) -> Result<Vec<u8>, ImageError> {
        self.check_payload_len(len, MAX_PAYLOAD_LEN)?;
        self.read_exact_vec(len, "payload", "read payload of")
    }

    /// Reads exactly `len` bytes. The buffer grows with the data that arrives, so a length
    /// that lies about a short stream costs no more memory than the stream holds.
    fn read_exact_vec(
        &mut self,
        len: u64,
        what: &'static str,
        op: &'static str,
    ) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        if let Some(left) = self.remaining {
            buf.reserve_exact(usize::try_from(len.min(left)).unwrap_or(0));
        }
        let got = (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::EntryIo {
                image: self.name.clone(),
                op,
                index: self.index,
                source,
            })? as u64;
        self.consume(got);
        if got < len {
            return Err(self.truncated(what, len, got));
        }
        Ok(buf)
    }

    /// Fills `buf` with the next payload bytes.
    pub fn read_payload_into(&mut self, buf: &mut [u8]) -> Result<(), ImageError> {
        let len = buf.len() as u64;
        self.check_payload_len(len, u64::MAX)?;
        let got = self.read_up_to(buf, "read payload of")?;
        if got < buf.len() {
            return Err(self.truncated("payload", len, got as u64));
        }
        Ok(())
    }

    /// Streams `len` payload bytes into `out` without holding them in memory.
    pub fn copy_payload(&mut self, len: u64, out: &mut impl Write) -> Result<(), ImageError> {
        self.check_payload_len(len, u64::MAX)?;
        let index = self.index.saturating_sub(1);
        let copied = io::copy(&mut (&mut self.inner).take(len), out).map_err(|source| {
            ImageError::EntryIo {
                image: self.name.clone(),
                op: "copy payload of",
                index,
                source,
            }
        })?;
        self.consume(copied);
        if copied < len {
            return Err(self.truncated("payload", len, copied));
        }
        Ok(())
    }

    /// Skips `len` payload bytes.
    pub fn skip_payload(&mut self, len: u64) -> Result<(), ImageError> {
        self.copy_payload(len, &mut io::sink())
    }

    /// Everything left in the image (a ghost file without chunks, a raw image), at most
    /// [`MAX_PAYLOAD_LEN`] bytes.
    pub fn read_to_end(&mut self) -> Result<Vec<u8>, ImageError> {
        let mut buf = Vec::new();
        let index = self.index.saturating_sub(1);
        let limit = MAX_PAYLOAD_LEN + 1;
        if let Some(left) = self.remaining {
            buf.reserve(usize::try_from(left.min(MAX_PAYLOAD_LEN)).unwrap_or(0));
        }
        let got = (&mut self.inner)
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::EntryIo {
                image: self.name.clone(),
                op: "read rest after",
                index,
                source,
            })? as u64;
        if got > MAX_PAYLOAD_LEN {
            return Err(ImageError::PayloadTooLarge {
                image: self.name.clone(),
                index,
                len: got,
                limit: MAX_PAYLOAD_LEN,
            });
        }
        self.consume(got);
        Ok(buf)
    }

    /// Reads the next entry together with the payload its kind says follows it. Ghost
    /// chunks and the contents of a chunk-less ghost file are returned as the payload of
    /// their entry. `None` at the end of the image.
    pub fn read_entry_with_payload(&mut self) -> Result<Option<RawEntry>, ImageError> {
        let Some(message) = self.read_raw_entry()? else {
            return Ok(None);
        };
        let index = self.index - 1;
        let payload = match payload_layout(self.kind, index, &message).map_err(|source| {
            ImageError::Decode {
                image: self.name.clone(),
                index,
                message: self.kind.message_name().unwrap_or("entry"),
                source,
            }
        })? {
            PayloadLayout::Bytes(len) => self.read_payload(len)?,
            PayloadLayout::RestOfFile => self.read_to_end()?,
            PayloadLayout::IpcMessages(count) => self.read_ipc_messages(count)?,
        };
        Ok(Some(RawEntry { message, payload }))
    }

    /// Reads `count` framed ipc_msg records with their padded data, returned verbatim.
    fn read_ipc_messages(&mut self, count: u32) -> Result<Vec<u8>, ImageError> {
        let mut out = Vec::new();
        for _ in 0..count {
            let mut len_bytes = [0u8; 4];
            self.read_payload_into(&mut len_bytes)?;
            let len = u64::from(u32::from_le_bytes(len_bytes));
            if len > MAX_ENTRY_LEN {
                return Err(ImageError::EntryTooLarge {
                    image: self.name.clone(),
                    index: self.index.saturating_sub(1),
                    len,
                    limit: MAX_ENTRY_LEN,
                });
            }
            let msg = self.read_payload(len)?;
            let header =
                crate::pb::IpcMsg::decode(msg.as_slice()).map_err(|source| ImageError::Decode {
                    image: self.name.clone(),
                    index: self.index.saturating_sub(1),
                    message: "criu.ipc_msg",
                    source,
                })?;
            let data = self.read_payload(round_up(u64::from(header.msize), 8))?;
            out.extend_from_slice(&len_bytes);
            out.extend_from_slice(&msg);
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    fn check_payload_len(&self, len: u64, cap: u64) -> Result<(), ImageError> {
        let limit = self.remaining.map_or(cap, |left| left.min(cap));
        if len > limit {
            return Err(ImageError::PayloadTooLarge {
                image: self.name.clone(),
                index: self.index.saturating_sub(1),
                len,
                limit,
            });
        }
        Ok(())
    }

    fn read_header_word(&mut self) -> Result<u32, ImageError> {
        let mut word = [0u8; 4];
        let got = self.read_up_to(&mut word, "read header of")?;
        if got < word.len() {
            return Err(ImageError::TruncatedHeader {
                image: self.name.clone(),
                expected: self.kind.header().len().max(4),
                found: got as u64,
            });
        }
        Ok(u32::from_le_bytes(word))
    }

    fn expect_magic(&self, expected: u32, found: u32) -> Result<(), ImageError> {
        if expected == found {
            Ok(())
        } else {
            Err(ImageError::BadMagic {
                image: self.name.clone(),
                expected,
                found,
            })
        }
    }

    /// Reads until `buf` is full or the file ends; returns the bytes read.
    fn read_up_to(&mut self, buf: &mut [u8], op: &'static str) -> Result<usize, ImageError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImageError::EntryIo {
                        image: self.name.clone(),
                        op,
                        index: self.index,
                        source,
                    })
                }
            }
        }
        self.consume(filled as u64);
        Ok(filled)
    }

    fn consume(&mut self, n: u64) {
        if let Some(left) = self.remaining.as_mut() {
            *left = left.saturating_sub(n);
        }
    }

    /// A short read: of entry number `self.index` while reading its length or message, of
    /// the entry before it while reading a payload.
    fn truncated(&self, what: &'static str, expected: u64, found: u64) -> ImageError {
        let index = match what {
            "length" | "message" => self.index,
            _ => self.index.saturating_sub(1),
        };
        ImageError::Truncated {
            image: self.name.clone(),
            what,
            index,
            expected,
            found,
        }
    }
}

impl<R: Read> Iterator for ImageReader<R> {
    type Item = Result<Vec<u8>, ImageError>;

    /// Raw entries; stops after the first error.
    fn next(&mut self) -> Option<Self::Item> {
        self.read_raw_entry().transpose()
    }
}

/// An entry's message bytes and the raw payload that followed it (empty if none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub message: Vec<u8>,
    pub payload: Vec<u8>,
}

/// How many payload bytes follow an entry, as found from the entry itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadLayout {
    /// This many raw bytes (including any padding).
    Bytes(u64),
    /// Everything up to the end of the image.
    RestOfFile,
    /// This many framed `ipc_msg` records, each with its data padded to 8 bytes.
    IpcMessages(u32),
}

/// Where the payload after entry number `index` of a `kind` image ends, from the entry's
/// bytes. Entries without payload give `Bytes(0)`.
pub fn payload_layout(
    kind: ImageKind,
    index: u64,
    message: &[u8],
) -> Result<PayloadLayout, prost::DecodeError> {
    use crate::kind::Payload;
    use crate::pb;
    Ok(match kind.payload() {
        Payload::None => PayloadLayout::Bytes(0),
        Payload::PipeData => {
            PayloadLayout::Bytes(u64::from(pb::PipeDataEntry::decode(message)?.bytes))
        }
        Payload::SkQueue => {
            PayloadLayout::Bytes(u64::from(pb::SkPacketEntry::decode(message)?.length))
        }
        Payload::TcpQueues => {
            let e = pb::TcpStreamEntry::decode(message)?;
            PayloadLayout::Bytes(u64::from(e.inq_len) + u64::from(e.outq_len))
        }
        Payload::BpfmapData => {
            let e = pb::BpfmapDataEntry::decode(message)?;
            PayloadLayout::Bytes(u64::from(e.keys_bytes) + u64::from(e.values_bytes))
        }
        Payload::IpcShm => {
            PayloadLayout::Bytes(round_up(pb::IpcShmEntry::decode(message)?.size, 4))
        }
        Payload::IpcSem => {
            let nsems = u64::from(pb::IpcSemEntry::decode(message)?.nsems);
            PayloadLayout::Bytes(round_up(nsems * 2, 8))
        }
        Payload::IpcMsg => PayloadLayout::IpcMessages(pb::IpcMsgEntry::decode(message)?.qnum),
        Payload::Ghost if index == 0 => {
            if pb::GhostFileEntry::decode(message)?.chunks() {
                PayloadLayout::Bytes(0)
            } else {
                PayloadLayout::RestOfFile
            }
        }
        Payload::Ghost => PayloadLayout::Bytes(pb::GhostChunkEntry::decode(message)?.len),
    })
}

/// Rounds up to a multiple of `to` (a power of two), saturating.
fn round_up(n: u64, to: u64) -> u64 {
    n.checked_add(to - 1).map_or(!(to - 1), |v| v & !(to - 1))
}

/// Writes the header and entries of one image.
#[derive(Debug)]
pub struct ImageWriter<W: Write> {
    inner: W,
    name: String,
    kind: ImageKind,
    index: u64,
    /// Bytes written, header included.
    written: u64,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the header of a `kind` image (nothing for raw kinds).
    pub fn new(inner: W, kind: ImageKind, name: impl Into<String>) -> Result<Self, ImageError> {
        let mut writer = ImageWriter {
            inner,
            name: name.into(),
            kind,
            index: 0,
            written: 0,
        };
        let mut header = Vec::with_capacity(8);
        match kind.header() {
            Header::Raw => {}
            Header::Single => header.extend_from_slice(&kind.magic().to_le_bytes()),
            Header::Common => {
                header.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
                header.extend_from_slice(&kind.magic().to_le_bytes());
            }
            Header::Service => {
                header.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
                header.extend_from_slice(&kind.magic().to_le_bytes());
            }
        }
        writer.write_all(&header, "write header of")?;
        Ok(writer)
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of entries written so far.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes one entry: the length, then the encoded message.
    pub fn write_entry<M: Message>(&mut self, message: &M) -> Result<(), ImageError> {
        self.write_raw_entry(&message.encode_to_vec())
    }

    /// Writes one entry from already encoded message bytes.
    pub fn write_raw_entry(&mut self, message: &[u8]) -> Result<(), ImageError> {
        check_has_entries(self.kind, &self.name)?;
        let len = u32::try_from(message.len()).map_err(|_| ImageError::EncodeTooLarge {
            image: self.name.clone(),
            index: self.index,
            len: message.len() as u64,
        })?;
        self.write_all(&len.to_le_bytes(), "write length of")?;
        self.write_all(message, "write")?;
        self.index += 1;
        Ok(())
    }

    /// Writes payload bytes after the last entry, or raw bytes of a raw image.
    pub fn write_payload(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.write_all(bytes, "write payload of")
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> Result<W, ImageError> {
        let index = self.index;
        self.inner.flush().map_err(|source| ImageError::EntryIo {
            image: self.name.clone(),
            op: "flush after",
            index,
            source,
        })?;
        Ok(self.inner)
    }

    fn write_all(&mut self, bytes: &[u8], op: &'static str) -> Result<(), ImageError> {
        self.inner
            .write_all(bytes)
            .map_err(|source| ImageError::EntryIo {
                image: self.name.clone(),
                op,
                index: self.index,
                source,
            })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Raw images (pages, pipe data...) hold bytes, not protobuf entries.
fn check_has_entries(kind: ImageKind, name: &str) -> Result<(), ImageError> {
    if kind.is_raw() {
        return Err(ImageError::RawImage {
            image: name.to_owned(),
            kind: kind.desc().template,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn image(kind: ImageKind, entries: &[&[u8]]) -> Vec<u8> {
        let mut w = ImageWriter::new(Vec::new(), kind, "test").unwrap();
        for e in entries {
            w.write_raw_entry(e).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn headers_are_as_criu_writes_them() {
        let core = image(ImageKind::Core, &[]);
        assert_eq!(core, [0x19, 0x43, 0x56, 0x54, 0x47, 0x38, 0x05, 0x55]);
        let inv = image(ImageKind::Inventory, &[]);
        assert_eq!(inv, 0x5831_3116u32.to_le_bytes());
        let stats = image(ImageKind::StatsDump, &[]);
        assert_eq!(&stats[..4], &IMG_SERVICE_MAGIC.to_le_bytes());
        assert!(image(ImageKind::Pages, &[]).is_empty());
    }

    #[test]
    fn entries_round_trip() {
        let e = pb::PstreeEntry {
            pid: 7,
            ppid: 1,
            pgid: 7,
            sid: 7,
            threads: vec![7, 8],
        };
        let mut w = ImageWriter::new(Vec::new(), ImageKind::Pstree, "pstree.img").unwrap();
        w.write_entry(&e).unwrap();
        w.write_entry(&e).unwrap();
        let bytes = w.finish().unwrap();
        let len = bytes.len() as u64;
        let mut r =
            ImageReader::new(bytes.as_slice(), ImageKind::Pstree, "pstree.img", Some(len)).unwrap();
        assert_eq!(r.read_entry::<pb::PstreeEntry>().unwrap(), Some(e.clone()));
        assert_eq!(r.read_entry::<pb::PstreeEntry>().unwrap(), Some(e));
        assert_eq!(r.read_entry::<pb::PstreeEntry>().unwrap(), None);
        assert_eq!(r.remaining(), Some(0));
    }

    #[test]
    fn damage_is_reported() {
        let good = image(ImageKind::Pstree, &[b"\x08\x01"]);
        let err = ImageReader::new(good.as_slice(), ImageKind::Core, "x", None).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::BadMagic {
                    found: 0x5027_3030,
                    ..
                }
            ),
            "{err}"
        );

        let mut r =
            ImageReader::new(&good[..good.len() - 1], ImageKind::Pstree, "x", None).unwrap();
        let err = r.read_raw_entry().unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated {
                    what: "message",
                    index: 0,
                    ..
                }
            ),
            "{err}"
        );

        let mut r = ImageReader::new(&good[..10], ImageKind::Pstree, "x", None).unwrap();
        assert!(matches!(
            r.read_raw_entry(),
            Err(ImageError::Truncated { what: "length", .. })
        ));

        let mut huge = image(ImageKind::Pstree, &[]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = ImageReader::new(huge.as_slice(), ImageKind::Pstree, "x", None).unwrap();
        assert!(matches!(
            r.read_raw_entry(),
            Err(ImageError::EntryTooLarge { .. })
        ));

        let mut short = image(ImageKind::Pstree, &[]);
        short.extend_from_slice(&100u32.to_le_bytes());
        let len = short.len() as u64;
        let mut r = ImageReader::new(short.as_slice(), ImageKind::Pstree, "x", Some(len)).unwrap();
        assert!(matches!(
            r.read_raw_entry(),
            Err(ImageError::EntryTooLarge { limit: 0, .. })
        ));

        let err = ImageReader::detect(&[1u8, 2, 3, 4][..], "x", None).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::UnknownMagic {
                    magic: 0x0403_0201,
                    ..
                }
            ),
            "{err}"
        );

        let mut r = ImageReader::new(good.as_slice(), ImageKind::Pstree, "x", None).unwrap();
        r.read_raw_entry().unwrap();
        let err = r.read_payload(1).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Truncated {
                    what: "payload",
                    index: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn detect_finds_the_kind() {
        for kind in [
            ImageKind::Inventory,
            ImageKind::Core,
            ImageKind::StatsDump,
            ImageKind::Pagemap,
        ] {
            let bytes = image(kind, &[]);
            let r = ImageReader::detect(bytes.as_slice(), "x", None).unwrap();
            assert_eq!(r.kind(), kind);
        }
    }

    #[test]
    fn payloads_follow_their_entries() {
        let entry = pb::PipeDataEntry {
            pipe_id: 3,
            bytes: 5,
            size: Some(4096),
        };
        let mut w = ImageWriter::new(Vec::new(), ImageKind::PipesData, "pipes-data.img").unwrap();
        w.write_entry(&entry).unwrap();
        w.write_payload(b"hello").unwrap();
        w.write_entry(&pb::PipeDataEntry { bytes: 0, ..entry })
            .unwrap();
        let bytes = w.finish().unwrap();
        let mut r = ImageReader::new(bytes.as_slice(), ImageKind::PipesData, "p", None).unwrap();
        let first = r.read_entry_with_payload().unwrap().unwrap();
        assert_eq!(first.payload, b"hello");
        assert_eq!(
            pb::PipeDataEntry::decode(first.message.as_slice()).unwrap(),
            entry
        );
        let second = r.read_entry_with_payload().unwrap().unwrap();
        assert!(second.payload.is_empty());
        assert_eq!(r.read_entry_with_payload().unwrap(), None);
    }

    #[test]
    fn ghost_file_without_chunks_runs_to_the_end() {
        let mut w = ImageWriter::new(Vec::new(), ImageKind::GhostFile, "g").unwrap();
        w.write_entry(&pb::GhostFileEntry {
            uid: 1,
            gid: 2,
            mode: 0o100644,
            ..Default::default()
        })
        .unwrap();
        w.write_payload(b"contents").unwrap();
        let bytes = w.finish().unwrap();
        let mut r = ImageReader::new(bytes.as_slice(), ImageKind::GhostFile, "g", None).unwrap();
        assert_eq!(
            r.read_entry_with_payload().unwrap().unwrap().payload,
            b"contents"
        );
        assert_eq!(r.read_entry_with_payload().unwrap(), None);
    }

    #[test]
    fn round_up_saturates() {
        assert_eq!(round_up(0, 8), 0);
        assert_eq!(round_up(1, 8), 8);
        assert_eq!(round_up(8, 8), 8);
        assert_eq!(round_up(u64::MAX, 4), !3);
    }
}
