//! Images to crit's JSON and back.
//!
//! An image is `{"magic": NAME, "entries": [...]}`. Each entry is its message as a JSON object;
//! bytes that follow an entry in the file are in its `"extra"` key (see [`Layout`]).
//!
//! ```text
//! file   : [common or service magic] kind magic  entry*      (u32 little endian magics)
//! entry  : u32 length, message of that length, [raw payload]
//! ```

pub mod decode;
pub mod encode;
pub mod text;

#[cfg(test)]
mod tests;

use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use serde_json::{Map, Value as Json};

use crate::format::{self, Format, Layout};
use crate::schema::{Schema, SchemaError};
use decode::{message_to_json, ToJsonError};
use encode::{json_to_message, FromJsonError};

/// The largest entry we accept; CRIU's largest entries (core images) are a few kilobytes.
const MAX_ENTRY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the image is empty")]
    Empty,
    #[error("the image ends inside its header")]
    TruncatedHeader,
    #[error("unknown magic {magic:#x} (a raw image such as pages-N.img has no entries to decode)")]
    UnknownMagic { magic: u32 },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("entry {index}: truncated {what} at offset {offset}")]
    Truncated {
        index: usize,
        what: &'static str,
        offset: usize,
    },
    #[error("entry {index}: length {len} at offset {offset} is larger than the rest of the image")]
    TooLarge {
        index: usize,
        len: usize,
        offset: usize,
    },
    #[error("entry {index}: decoding {message}")]
    Message {
        index: usize,
        message: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("entry {index}")]
    ToJson {
        index: usize,
        #[source]
        source: ToJsonError,
    },
    #[error("entry {index}: field {field} is missing or not a number")]
    LengthField { index: usize, field: &'static str },
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("expected an object with \"magic\" and \"entries\"")]
    Shape,
    #[error("unknown magic name {name:?}")]
    UnknownMagic { name: String },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("entry {index}")]
    FromJson {
        index: usize,
        #[source]
        source: FromJsonError,
    },
    #[error("entry {index}: bad \"extra\": {reason}")]
    Extra { index: usize, reason: &'static str },
    #[error("entry {index}: {len} bytes do not fit a u32 length")]
    TooLarge { index: usize, len: usize },
    #[error("entry {index}: \"extra\" holds {len} bytes, but the entry says {expected:?}")]
    PayloadLength {
        index: usize,
        len: usize,
        expected: Option<u64>,
    },
}

/// Decodes a whole image file to crit's JSON value.
pub fn decode_image(schema: &Schema, bytes: &[u8], pretty: bool) -> Result<Json, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut input = Input { bytes, pos: 0 };
    let first = input.u32().ok_or(DecodeError::TruncatedHeader)?;
    let magic = if first == format::COMMON_MAGIC || first == format::SERVICE_MAGIC {
        input.u32().ok_or(DecodeError::TruncatedHeader)?
    } else {
        first
    };
    let fmt = format::by_magic(magic).ok_or(DecodeError::UnknownMagic { magic })?;
    let mut decoder = Decoder {
        schema,
        pretty,
        input,
        index: 0,
    };
    let entries = decoder.entries(&fmt)?;
    let mut image = Map::new();
    image.insert("magic".into(), Json::String(fmt.name.into()));
    image.insert("entries".into(), Json::Array(entries));
    Ok(Json::Object(image))
}

struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(len)?;
        let slice = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }

    fn u32(&mut self) -> Option<u32> {
        let word = self.take(4)?.try_into().ok()?;
        Some(u32::from_le_bytes(word))
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        self.pos = self.bytes.len();
        rest
    }
}

struct Decoder<'a> {
    schema: &'a Schema,
    pretty: bool,
    input: Input<'a>,
    index: usize,
}

impl Decoder<'_> {
    fn entries(&mut self, fmt: &Format) -> Result<Vec<Json>, DecodeError> {
        let first = self.schema.message(fmt.message)?;
        let mut out = Vec::new();
        match fmt.layout {
            Layout::Pagemap => {
                let entry = self.schema.message(fmt.rest)?;
                while let Some(m) = self.message(if out.is_empty() { &first } else { &entry })? {
                    out.push(Json::Object(self.to_json(&m, self.pretty)?));
                }
            }
            Layout::GhostFile => self.ghost_file(&first, fmt.rest, &mut out)?,
            layout => {
                while let Some(m) = self.message(&first)? {
                    let mut object = self.to_json(&m, self.pretty)?;
                    if let Some(extra) = self.extra(layout, &m)? {
                        object.insert("extra".into(), extra);
                    }
                    out.push(Json::Object(object));
                }
            }
        }
        Ok(out)
    }

    fn ghost_file(
        &mut self,
        head: &MessageDescriptor,
        chunk: &str,
        out: &mut Vec<Json>,
    ) -> Result<(), DecodeError> {
        let Some(file) = self.message(head)? else {
            return Err(self.truncated("ghost file entry"));
        };
        let mut object = self.to_json(&file, self.pretty)?;
        let chunked = file
            .get_field_by_name("chunks")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if !chunked {
            object.insert(
                "extra".into(),
                Json::String(text::encode_base64(self.input.rest())),
            );
            out.push(Json::Object(object));
            return Ok(());
        }
        out.push(Json::Object(object));
        let chunk = self.schema.message(chunk)?;
        while let Some(m) = self.message(&chunk)? {
            let mut object = self.to_json(&m, self.pretty)?;
            let len = self.length(&m, "len")?;
            let data = self.bytes(len, "ghost chunk")?;
            object.insert("extra".into(), Json::String(text::encode_base64(data)));
            out.push(Json::Object(object));
        }
        Ok(())
    }

    /// The next framed message, or `None` at the end of the image.
    fn message(
        &mut self,
        descriptor: &MessageDescriptor,
    ) -> Result<Option<DynamicMessage>, DecodeError> {
        if self.input.at_end() {
            return Ok(None);
        }
        let offset = self.input.pos;
        let len = self.input.u32().ok_or(DecodeError::Truncated {
            index: self.index,
            what: "entry length",
            offset,
        })?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > MAX_ENTRY || len > self.input.remaining() {
            return Err(DecodeError::TooLarge {
                index: self.index,
                len,
                offset,
            });
        }
        let body = self.bytes(len, "entry")?;
        let message = DynamicMessage::decode(descriptor.clone(), body).map_err(|source| {
            DecodeError::Message {
                index: self.index,
                message: descriptor.full_name().to_owned(),
                source,
            }
        })?;
        self.index += 1;
        Ok(Some(message))
    }

    fn to_json(
        &self,
        message: &DynamicMessage,
        pretty: bool,
    ) -> Result<Map<String, Json>, DecodeError> {
        message_to_json(self.schema, message, pretty).map_err(|source| DecodeError::ToJson {
            index: self.index.saturating_sub(1),
            source,
        })
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        let offset = self.input.pos;
        let index = self.index;
        self.input.take(len).ok_or(DecodeError::Truncated {
            index,
            what,
            offset,
        })
    }

    fn truncated(&self, what: &'static str) -> DecodeError {
        DecodeError::Truncated {
            index: self.index,
            what,
            offset: self.input.pos,
        }
    }

    fn length(&self, message: &DynamicMessage, field: &'static str) -> Result<usize, DecodeError> {
        let value = message.get_field_by_name(field);
        let number = value.as_deref().and_then(|v| match v {
            prost_reflect::Value::U32(n) => Some(u64::from(*n)),
            prost_reflect::Value::U64(n) => Some(*n),
            prost_reflect::Value::I32(n) => u64::try_from(*n).ok(),
            prost_reflect::Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        });
        number
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(DecodeError::LengthField {
                index: self.index.saturating_sub(1),
                field,
            })
    }

    fn extra(
        &mut self,
        layout: Layout,
        message: &DynamicMessage,
    ) -> Result<Option<Json>, DecodeError> {
        match layout {
            Layout::Entries | Layout::Pagemap | Layout::GhostFile => Ok(None),
            Layout::Payload(fields) => {
                let mut len = 0usize;
                for field in fields {
                    len = len.saturating_add(self.length(message, field)?);
                }
                let data = self.bytes(len, "payload")?;
                Ok(Some(Json::String(text::encode_base64(data))))
            }
            Layout::TcpStream => {
                let inq_len = self.length(message, "inq_len")?;
                let outq_len = self.length(message, "outq_len")?;
                let inq = text::encode_base64(self.bytes(inq_len, "input queue")?);
                let outq = text::encode_base64(self.bytes(outq_len, "output queue")?);
                let mut queues = Map::new();
                queues.insert("inq".into(), Json::String(inq));
                queues.insert("outq".into(), Json::String(outq));
                Ok(Some(Json::Object(queues)))
            }
            Layout::IpcShm => {
                let size = self.length(message, "size")?;
                let data = text::encode_base64(self.bytes(size, "segment")?);
                self.skip_padding(size, 4)?;
                Ok(Some(Json::String(data)))
            }
            Layout::IpcSem => {
                let count = self.length(message, "nsems")?;
                let size = count.saturating_mul(2);
                let raw = self.bytes(size, "semaphores")?;
                let values = raw
                    .chunks_exact(2)
                    .map(|c| Json::from(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                self.skip_padding(size, 8)?;
                Ok(Some(Json::Array(values)))
            }
            Layout::IpcMsg => {
                let count = self.length(message, "qnum")?;
                let descriptor = self.schema.message("criu.ipc_msg")?;
                let mut items = Vec::new();
                for _ in 0..count {
                    let Some(msg) = self.message(&descriptor)? else {
                        return Err(self.truncated("queued message"));
                    };
                    // crit prints queued messages plainly, even with --pretty
                    let object = self.to_json(&msg, false)?;
                    let size = self.length(&msg, "msize")?;
                    let data = text::encode_base64(self.bytes(size, "message text")?);
                    self.skip_padding(size, 8)?;
                    items.push(Json::Object(object));
                    items.push(Json::String(data));
                }
                Ok(Some(Json::Array(items)))
            }
        }
    }

    fn skip_padding(&mut self, size: usize, align: usize) -> Result<(), DecodeError> {
        let padding = size.next_multiple_of(align) - size;
        self.bytes(padding, "padding").map(|_| ())
    }
}

/// Encodes crit's JSON value of an image back into the image file's bytes.
pub fn encode_image(schema: &Schema, image: &Json) -> Result<Vec<u8>, EncodeError> {
    let name = image
        .get("magic")
        .and_then(Json::as_str)
        .ok_or(EncodeError::Shape)?;
    let entries = image
        .get("entries")
        .and_then(Json::as_array)
        .ok_or(EncodeError::Shape)?;
    let unknown = || EncodeError::UnknownMagic {
        name: name.to_owned(),
    };
    let fmt = format::by_name(name).ok_or_else(unknown)?;
    let mut out = Vec::new();
    if let Some(first) = fmt.header {
        out.extend_from_slice(&first.to_le_bytes());
    }
    out.extend_from_slice(&fmt.magic.to_le_bytes());
    let mut encoder = Encoder { schema, out };
    encoder.entries(&fmt, entries)?;
    Ok(encoder.out)
}

struct Encoder<'a> {
    schema: &'a Schema,
    out: Vec<u8>,
}

impl Encoder<'_> {
    fn entries(&mut self, fmt: &Format, entries: &[Json]) -> Result<(), EncodeError> {
        let first = self.schema.message(fmt.message)?;
        let rest = self.schema.message(fmt.rest)?;
        let mut chunked = false;
        for (index, entry) in entries.iter().enumerate() {
            let descriptor = if index == 0 { &first } else { &rest };
            let message = self.message(index, descriptor, entry)?;
            let extra = entry.get("extra");
            match fmt.layout {
                Layout::Entries | Layout::Pagemap => {}
                Layout::GhostFile if index == 0 => {
                    chunked = message
                        .get_field_by_name("chunks")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                    if !chunked {
                        self.base64(index, extra)?;
                        // without chunks the contents end the file: nothing may follow
                        return Ok(());
                    }
                }
                Layout::GhostFile => {
                    if chunked {
                        let len = length(&message, &["len"]);
                        self.payload(index, extra, len)?;
                    }
                }
                Layout::Payload(fields) => {
                    let len = length(&message, fields);
                    // crit writes no payload for a missing or empty extra
                    if extra.is_some_and(|e| e.as_str() != Some("")) || len != Some(0) {
                        self.payload(index, extra, len)?;
                    }
                }
                Layout::TcpStream => {
                    let queues = extra.unwrap_or(&Json::Null);
                    let inq = length(&message, &["inq_len"]);
                    let outq = length(&message, &["outq_len"]);
                    self.payload(index, queues.get("inq"), inq)?;
                    self.payload(index, queues.get("outq"), outq)?;
                }
                Layout::IpcShm => {
                    let size = u64_field(&message, "size").ok_or(EncodeError::Extra {
                        index,
                        reason: "no segment size",
                    })?;
                    let data = decode_extra(index, extra)?;
                    let size = usize::try_from(size).unwrap_or(usize::MAX);
                    self.out.extend_from_slice(&data[..size.min(data.len())]);
                    pad(&mut self.out, size, 4);
                }
                Layout::IpcSem => {
                    let values = extra.and_then(Json::as_array).ok_or(EncodeError::Extra {
                        index,
                        reason: "expected a list of semaphore values",
                    })?;
                    for v in values {
                        let v = v.as_u64().and_then(|v| u16::try_from(v).ok()).ok_or(
                            EncodeError::Extra {
                                index,
                                reason: "semaphore values are u16",
                            },
                        )?;
                        self.out.extend_from_slice(&v.to_le_bytes());
                    }
                    pad(&mut self.out, values.len() * 2, 8);
                }
                Layout::IpcMsg => self.ipc_messages(index, extra)?,
            }
        }
        Ok(())
    }

    fn message(
        &mut self,
        index: usize,
        descriptor: &MessageDescriptor,
        entry: &Json,
    ) -> Result<DynamicMessage, EncodeError> {
        let message = json_to_message(self.schema, descriptor, entry)
            .map_err(|source| EncodeError::FromJson { index, source })?;
        let body = message.encode_to_vec();
        let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge {
            index,
            len: body.len(),
        })?;
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(&body);
        Ok(message)
    }

    fn base64(&mut self, index: usize, extra: Option<&Json>) -> Result<(), EncodeError> {
        let data = decode_extra(index, extra)?;
        self.out.extend_from_slice(&data);
        Ok(())
    }

    /// Writes a payload that must be as long as the entry says, or the image could not be
    /// read back (crit writes whatever it is given).
    fn payload(
        &mut self,
        index: usize,
        extra: Option<&Json>,
        expected: Option<u64>,
    ) -> Result<(), EncodeError> {
        let data = decode_extra(index, extra)?;
        if expected != u64::try_from(data.len()).ok() {
            return Err(EncodeError::PayloadLength {
                index,
                len: data.len(),
                expected,
            });
        }
        self.out.extend_from_slice(&data);
        Ok(())
    }

    fn ipc_messages(&mut self, index: usize, extra: Option<&Json>) -> Result<(), EncodeError> {
        let items = extra.and_then(Json::as_array).ok_or(EncodeError::Extra {
            index,
            reason: "expected a list of messages and texts",
        })?;
        let descriptor = self.schema.message("criu.ipc_msg")?;
        for pair in items.chunks(2) {
            let message = self.message(index, &descriptor, &pair[0])?;
            let size = u64_field(&message, "msize")
                .and_then(|s| usize::try_from(s).ok())
                .ok_or(EncodeError::Extra {
                    index,
                    reason: "no message size",
                })?;
            let data = decode_extra(index, pair.get(1))?;
            self.out.extend_from_slice(&data[..size.min(data.len())]);
            pad(&mut self.out, size, 8);
        }
        Ok(())
    }
}

fn decode_extra(index: usize, extra: Option<&Json>) -> Result<Vec<u8>, EncodeError> {
    let text = extra.and_then(Json::as_str).ok_or(EncodeError::Extra {
        index,
        reason: "expected a base64 string",
    })?;
    text::decode_base64(text).ok_or(EncodeError::Extra {
        index,
        reason: "invalid base64",
    })
}

/// Pads a `size`-byte area to a multiple of `align` with zeroes.
fn pad(out: &mut Vec<u8>, size: usize, align: usize) {
    out.resize(out.len() + (size.next_multiple_of(align) - size), 0);
}

/// The sum of the length fields of an entry.
fn length(message: &DynamicMessage, fields: &[&str]) -> Option<u64> {
    fields
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(u64_field(message, f)?))
}

fn u64_field(message: &DynamicMessage, name: &str) -> Option<u64> {
    match message.get_field_by_name(name)?.as_ref() {
        prost_reflect::Value::U32(n) => Some(u64::from(*n)),
        prost_reflect::Value::U64(n) => Some(*n),
        prost_reflect::Value::I32(n) => u64::try_from(*n).ok(),
        prost_reflect::Value::I64(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}
