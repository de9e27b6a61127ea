//! CRIU's page-server protocol, both halves, and what `ckpt-page-server` runs.
//!
//! - [`protocol`]: the frames and the message sequences of push (dump to page server) and
//!   pull (lazy pages from a page server).
//! - [`client`]: [`PageServerClient`], used by `ckpt-dump --page-server` to push pages and
//!   by a lazy-pages daemon to pull them.
//! - [`server`]: [`PageServer`], which receives one dump into an image directory, or serves
//!   saved pages.
//! - [`sink`]: [`PageStore`] and [`PageSink`], the calls a dumper makes whether its pages
//!   go to local images ([`LocalImages`]) or to a page server ([`PageServerClient`]), and
//!   [`PageDestination`], either one chosen at run time.
//! - [`daemon`]: `--daemon`, `--pidfile` and `--status-fd`.
//! - [`compress`]: our opt-in extension, zstd-compressed page data ([`PageCompressor`],
//!   [`PageDecompressor`]) and what pages cost on the wire ([`PageTraffic`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod compress;
pub mod daemon;
pub mod protocol;
pub mod server;
pub mod sink;

pub use client::{ClientError, PageServerClient, PagesReply, RemotePagemap};
pub use compress::{PageCompressor, PageDecompressor, PageTraffic, ZstdError};
pub use images_format::PageFlags;
pub use protocol::{Command, Frame, PagemapId, PagemapKind, ProtocolError, GET_ZSTD, PE_ZSTD};
pub use server::{PageServer, ReceiveMode, ServerError, ServerOptions, SessionStats};
pub use sink::{
    DestinationError, DestinationSink, LocalImages, PageDestination, PageSink, PageStore,
};
