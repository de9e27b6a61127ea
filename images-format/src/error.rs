//! Errors of reading and writing one image file or an image directory.
//!
//! Every variant names the image (its file name, or the path for directory operations) and,
//! where entries are involved, the 0-based index of the entry, so that a message alone tells
//! which byte range of which file was wrong.

use std::path::PathBuf;

/// A failure to read, write or find an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The operating system refused an operation on the image or the directory.
    #[error("{path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Reading or writing the bytes of an entry or its payload failed.
    #[error("{image}: {op} entry {index}")]
    EntryIo {
        image: String,
        op: &'static str,
        index: u64,
        #[source]
        source: std::io::Error,
    },

    /// The file ended inside the header, a length, an entry or a payload.
    #[error(
        "{image}: truncated {what} of entry {index}: expected {expected} bytes, found {found}"
    )]
    Truncated {
        image: String,
        what: &'static str,
        index: u64,
        expected: u64,
        found: u64,
    },

    /// The file ended inside its magic header.
    #[error("{image}: truncated header: expected {expected} bytes, found {found}")]
    TruncatedHeader {
        image: String,
        expected: u64,
        found: u64,
    },

    /// The header is not the one the image kind requires.
    #[error("{image}: bad magic: expected {expected:#010x}, found {found:#010x}")]
    BadMagic {
        image: String,
        expected: u32,
        found: u32,
    },

    /// The header names no image kind we know.
    #[error("{image}: unknown magic {magic:#010x}")]
    UnknownMagic { image: String, magic: u32 },

    /// An entry claims more bytes than any valid entry has, or than the file holds.
    #[error("{image}: entry {index} claims {len} bytes, more than the {limit} allowed")]
    EntryTooLarge {
        image: String,
        index: u64,
        len: u64,
        limit: u64,
    },

    /// A payload claims more bytes than the file holds.
    #[error("{image}: payload of entry {index} claims {len} bytes, more than the {limit} left")]
    PayloadTooLarge {
        image: String,
        index: u64,
        len: u64,
        limit: u64,
    },

    /// The bytes of an entry are not a valid encoding of the expected message.
    #[error("{image}: entry {index} is not a valid {message}")]
    Decode {
        image: String,
        index: u64,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },

    /// An entry is too large to frame (its length does not fit the u32 length prefix).
    #[error("{image}: entry {index} is {len} bytes, too large to frame")]
    EncodeTooLarge { image: String, index: u64, len: u64 },

    /// A single-entry image holds no entry.
    #[error("{image}: no entry in the image")]
    Empty { image: String },

    /// The kind is raw (no entries): it cannot be read or written entry by entry.
    #[error("{image}: {kind} is a raw image and holds no entries")]
    RawImage { image: String, kind: &'static str },

    /// A name has no image kind (ImageDir::open_path).
    #[error("{image}: not the name of a known image")]
    UnknownName { image: String },

    /// The `parent` links form a loop or are deeper than we follow.
    #[error("{path}: parent chain is longer than {limit} links or loops")]
    ParentChain { path: PathBuf, limit: usize },
}

/// A failure to write, read or resolve saved pages.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error(transparent)]
    Image(#[from] ImageError),

    /// A pagemap entry that no dumper writes.
    #[error("{image}: entry {index} ({vaddr:#x}, {nr_pages} pages): {reason}")]
    BadEntry {
        image: String,
        index: u64,
        vaddr: u64,
        nr_pages: u64,
        reason: &'static str,
    },

    /// A range given to the pagemap writer that cannot be recorded.
    #[error("{image}: cannot add {len:#x} bytes at {vaddr:#x} with flags {flags:#x}: {reason}")]
    BadRange {
        image: String,
        vaddr: u64,
        len: u64,
        flags: u32,
        reason: &'static str,
    },

    /// Page data must go to a raw pages image.
    #[error("{image}: page data must go to a pages image")]
    NotPagesImage { image: String },

    /// A page marked PE_PARENT is in no image of the parent chain.
    #[error("{image}: page {vaddr:#x} of {id} is marked in-parent but no parent image holds it (searched {searched} directories)")]
    NotInParent {
        image: String,
        id: u64,
        vaddr: u64,
        searched: usize,
    },

    /// A page that was asked for has no saved contents (not dumped, or lazy).
    #[error("{image}: page {vaddr:#x} of {id} has no saved contents")]
    NotSaved { image: String, id: u64, vaddr: u64 },

    /// The pages image is shorter than its pagemap says.
    #[error("{path}: holds {len} bytes, but its pagemap needs {needed}")]
    PagesShort {
        path: PathBuf,
        len: u64,
        needed: u64,
    },

    /// Reading page contents failed.
    #[error("{path}: read {len} bytes at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}
