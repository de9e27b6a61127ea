//! How crit lays out each image kind in JSON, derived from `images_format`'s kind table: the
//! entry message, the magic printed as `"magic"`, and what follows an entry in the file.

use images_format::{Header, ImageKind, Payload};

/// What an image holds after its header, as the JSON shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Entries of one message type.
    Entries,
    /// A head message (`pagemap_head`), then entries of the kind's message.
    Pagemap,
    /// A `ghost_file_entry`; then, if its `chunks` is set, `ghost_chunk_entry` entries each
    /// followed by `len` bytes, otherwise the file's contents up to the end.
    GhostFile,
    /// Each entry is followed by raw bytes, as many as the sum of these fields of the entry.
    Payload(&'static [&'static str]),
    /// Each entry is followed by its socket's input queue (`inq_len` bytes), then its output
    /// queue (`outq_len` bytes); the JSON `extra` is `{"inq": .., "outq": ..}`.
    TcpStream,
    /// Each entry is followed by `size` bytes of the segment, padded to 4.
    IpcShm,
    /// Each entry is followed by `nsems` u16 semaphore values, padded to 8; `extra` is the list.
    IpcSem,
    /// Each entry is followed by `qnum` framed `ipc_msg` entries, each followed by `msize` bytes
    /// padded to 8; `extra` alternates message objects and base64 texts.
    IpcMsg,
}

/// One image kind as its JSON shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub kind: ImageKind,
    /// crit's magic name, the JSON `magic`.
    pub name: &'static str,
    /// The kind's magic, the second u32 of the file (the first of `inventory.img`).
    pub magic: u32,
    /// The magic before it, if any.
    pub header: Option<u32>,
    /// The first entry's message (full name).
    pub message: &'static str,
    /// The message of the other entries (for pagemaps and ghost files, not the first's).
    pub rest: &'static str,
    pub layout: Layout,
}

/// First magic of most images.
pub const COMMON_MAGIC: u32 = images_format::kind::IMG_COMMON_MAGIC;
/// First magic of the images a dump writes about itself (stats, irmap cache).
pub const SERVICE_MAGIC: u32 = images_format::kind::IMG_SERVICE_MAGIC;

impl Format {
    fn of(kind: ImageKind) -> Option<Format> {
        let desc = kind.desc();
        let header = match desc.header {
            Header::Raw => return None,
            Header::Single => None,
            Header::Common => Some(COMMON_MAGIC),
            Header::Service => Some(SERVICE_MAGIC),
        };
        let entry = desc.message?;
        let (message, rest, layout) = match (desc.head_message, desc.payload) {
            (Some(head), _) => (head, entry, Layout::Pagemap),
            (None, Payload::Ghost) => (entry, "criu.ghost_chunk_entry", Layout::GhostFile),
            (None, payload) => (entry, entry, layout_of(payload)),
        };
        Some(Format {
            kind,
            name: desc.magic_name,
            magic: desc.magic,
            header,
            message,
            rest,
            layout,
        })
    }
}

fn layout_of(payload: Payload) -> Layout {
    match payload {
        Payload::None | Payload::Ghost => Layout::Entries,
        Payload::PipeData => Layout::Payload(&["bytes"]),
        Payload::SkQueue => Layout::Payload(&["length"]),
        Payload::BpfmapData => Layout::Payload(&["keys_bytes", "values_bytes"]),
        Payload::TcpQueues => Layout::TcpStream,
        Payload::IpcShm => Layout::IpcShm,
        Payload::IpcSem => Layout::IpcSem,
        Payload::IpcMsg => Layout::IpcMsg,
    }
}

/// The format of the kind crit names `name`.
pub fn by_name(name: &str) -> Option<Format> {
    ImageKind::from_magic_name(name).and_then(Format::of)
}

/// The format of the kind whose magic is `magic`.
pub fn by_magic(magic: u32) -> Option<Format> {
    ImageKind::from_magic(magic).and_then(Format::of)
}

/// Every kind with a JSON form, one per magic name.
#[cfg(test)]
pub fn all() -> Vec<Format> {
    let mut out: Vec<Format> = Vec::new();
    for desc in images_format::IMAGE_KINDS {
        if let Some(f) = Format::of(desc.kind) {
            if !out.iter().any(|o| o.name == f.name) {
                out.push(f);
            }
        }
    }
    out
}
