//! Post-copy restore: `ckpt-lazy-pages` serves the page faults of lazily restored
//! processes with `UFFDIO_COPY` from the images or from the dump side's page server, and
//! pushes every remaining page in the background until none is missing.
//!
//! - [`handoff`]: how restore hands each task's userfaultfd to the daemon
//!   ([`LazyHandoff`] on restore's side).
//! - [`source`]: where page contents come from.
//! - [`missing`]: the bookkeeping of missing pages through fork, mremap and munmap.
//! - [`daemon`]: the event loop.
//! - [`pace`]: background chunk and fault block sizes from the measured source speed.
//!
//! Restore's side, in order:
//!
//! ```no_run
//! # fn f(work_dir: &std::path::Path, uffd: std::os::fd::BorrowedFd<'_>) -> Result<(), ckpt_lazy_pages::HandoffError> {
//! use ckpt_lazy_pages::LazyHandoff;
//! let mut handoff = LazyHandoff::connect(work_dir)?;
//! handoff.send_uffd(42, uffd)?;   // per restored task, its image pid and userfaultfd
//! handoff.send_zombie(43)?;       // per zombie
//! handoff.watch()?;               // optional: hear forks and the end back
//! let mut back = handoff.finish_and_watch()?; // all restored, about to resume
//! while let Some(message) = back.receive()? {
//!     // Task { uffd, .. }: a fork's userfaultfd, to hold; Finished: every page is in.
//! #   let _ = message;
//! }
//! // None before Finished: the daemon died; kill the tree, then close the fds.
//! # Ok(()) }
//! ```
//!
//! Restore holds a reference to every userfaultfd of the tree, its own duplicates and the
//! fork userfaultfds the daemon hands back, so that the tree can be killed before the fds
//! close if the daemon dies (a userfaultfd that closes turns the missing pages into
//! zeroes). When the daemon says every lazy page is in (the final marker on the hand-off
//! connection), restore closes them at once, because a registered page that was never
//! lazy (never written before the dump) faults until the last reference to the
//! userfaultfd is gone. A restore that does not send the watch marker (CRIU's) gets
//! nothing back and the connection is closed after the end marker, as before.
//!
//! A fault block (or background chunk) that crosses a VMA boundary, which `UFFDIO_COPY`
//! refuses whole with ENOENT, is copied in halves until each piece fits one VMA.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod handoff;
pub mod missing;
pub mod pace;
pub mod source;

pub use daemon::{
    DaemonError, DaemonOptions, DaemonStats, LazyDaemon, BACKGROUND_DELAY, BACKGROUND_QUIET,
};
pub use handoff::{
    HandoffError, HandoffListener, HandoffMessage, HandoffReceiver, LazyHandoff, END_MARKER,
    SOCKET_NAME,
};
pub use source::{LazyRange, PageSource, Pages, RemotePages, SourceError};
