//! Where a dump's pages go: the same calls write local images or feed a page server.
//!
//! ```text
//! PageStore (one per dump)         LocalImages (an ImageDir)   | PageServerClient (a connection)
//!   parent_has(id)                   DIR/parent/pagemap-<id>    |   PARENT
//!   open(id) -> PageSink             pagemap-<id>.img+pages-N   |   OPEN2
//!     add_pages / add_hole           PagemapWriter              |   ADD_F (+ data)
//!     finish                         flush both images          |   (nothing on the wire)
//!   close                            -                          |   CLOSE, status
//! ```

use std::fs::File;
use std::io::{BufWriter, IoSlice, Write};

use images_format::pagemap::PagemapStats;
use images_format::{ImageDir, PageFlags, PagemapWriter, PagesError, PAGE_SIZE};

use crate::client::{ClientError, PageServerClient, RemotePagemap};
use crate::protocol::PagemapId;

/// The pages of one pagemap, added in increasing address order.
pub trait PageSink {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Pages whose contents are the concatenation of `data` (whole pages in total);
    /// `flags` include PE_PRESENT.
    fn add_pages(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
    ) -> Result<(), Self::Error>;

    /// Pages without data here: PE_PARENT and/or PE_LAZY.
    fn add_hole(&mut self, vaddr: u64, nr_pages: u64, flags: PageFlags) -> Result<(), Self::Error>;

    /// Ends the pagemap.
    fn finish(self) -> Result<PagemapStats, Self::Error>
    where
        Self: Sized;
}

/// The destination of a whole dump's pages.
pub trait PageStore {
    type Error: std::error::Error + Send + Sync + 'static;
    type Sink<'a>: PageSink<Error = Self::Error>
    where
        Self: 'a;

    /// Whether the parent images hold this pagemap, so that unchanged pages may be
    /// recorded as PE_PARENT.
    fn parent_has(&mut self, id: PagemapId) -> Result<bool, Self::Error>;

    fn open(&mut self, id: PagemapId) -> Result<Self::Sink<'_>, Self::Error>;

    /// Ends the dump: for a page server, its confirmation that every image is complete.
    fn close(self) -> Result<(), Self::Error>
    where
        Self: Sized;
}

impl<W: Write, P: Write> PageSink for PagemapWriter<W, P> {
    type Error = PagesError;

    fn add_pages(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
    ) -> Result<(), PagesError> {
        if data
            .iter()
            .all(|s| (s.len() as u64).is_multiple_of(PAGE_SIZE))
        {
            let mut at = vaddr;
            for slice in data.iter().filter(|s| !s.is_empty()) {
                self.add_with_data(at, flags, slice)?;
                at += slice.len() as u64;
            }
            return Ok(());
        }
        // Buffers that split pages: gather them, since a pagemap entry covers whole pages.
        let joined: Vec<u8> = data.iter().flat_map(|s| s.iter().copied()).collect();
        self.add_with_data(vaddr, flags, &joined)
    }

    fn add_hole(&mut self, vaddr: u64, nr_pages: u64, flags: PageFlags) -> Result<(), PagesError> {
        PagemapWriter::add_hole(self, vaddr, nr_pages, flags)
    }

    fn finish(self) -> Result<PagemapStats, PagesError> {
        PagemapWriter::finish(self).map(|(_, _, stats)| stats)
    }
}

impl PageSink for RemotePagemap<'_> {
    type Error = ClientError;

    fn add_pages(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
    ) -> Result<(), ClientError> {
        RemotePagemap::add_pages(self, vaddr, flags, data)
    }

    fn add_hole(&mut self, vaddr: u64, nr_pages: u64, flags: PageFlags) -> Result<(), ClientError> {
        RemotePagemap::add_hole(self, vaddr, nr_pages, flags)
    }

    fn finish(self) -> Result<PagemapStats, ClientError> {
        Ok(RemotePagemap::finish(self))
    }
}

impl PageStore for PageServerClient {
    type Error = ClientError;
    type Sink<'a> = RemotePagemap<'a>;

    fn parent_has(&mut self, id: PagemapId) -> Result<bool, ClientError> {
        PageServerClient::parent_has(self, id)
    }

    fn open(&mut self, id: PagemapId) -> Result<RemotePagemap<'_>, ClientError> {
        PageServerClient::open(self, id)
    }

    fn close(self) -> Result<(), ClientError> {
        PageServerClient::close(self)
    }
}

/// Pages written as images into a local directory, numbering pages images from 1 up.
#[derive(Debug)]
pub struct LocalImages {
    dir: ImageDir,
}

impl LocalImages {
    pub fn new(dir: ImageDir) -> Self {
        LocalImages { dir }
    }

    pub fn dir(&self) -> &ImageDir {
        &self.dir
    }
}

impl PageStore for LocalImages {
    type Error = PagesError;
    type Sink<'a> = PagemapWriter<BufWriter<File>, BufWriter<File>>;

    fn parent_has(&mut self, id: PagemapId) -> Result<bool, PagesError> {
        Ok(self
            .dir
            .parent()?
            .is_some_and(|parent| parent.exists(id.image_kind(), id.id)))
    }

    fn open(&mut self, id: PagemapId) -> Result<Self::Sink<'_>, PagesError> {
        // One more than the largest in the directory, which includes those opened before.
        let pages_id = self.dir.next_pages_id()?;
        self.dir.pagemap_writer(id.image_kind(), id.id, pages_id)
    }

    fn close(self) -> Result<(), PagesError> {
        Ok(self.dir.sync()?)
    }
}

/// Either destination, chosen at run time (`ckpt-dump` with or without `--page-server`).
#[derive(Debug)]
pub enum PageDestination {
    Local(LocalImages),
    Server(PageServerClient),
}

/// A pagemap open in a [`PageDestination`].
#[derive(Debug)]
pub enum DestinationSink<'a> {
    Local(PagemapWriter<BufWriter<File>, BufWriter<File>>),
    Server(RemotePagemap<'a>),
}

/// A failure of either destination; each names its image or connection.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error(transparent)]
    Local(#[from] PagesError),
    #[error(transparent)]
    Server(#[from] ClientError),
}

impl PageSink for DestinationSink<'_> {
    type Error = DestinationError;

    fn add_pages(
        &mut self,
        vaddr: u64,
        flags: PageFlags,
        data: &[IoSlice<'_>],
    ) -> Result<(), DestinationError> {
        match self {
            DestinationSink::Local(w) => Ok(PageSink::add_pages(w, vaddr, flags, data)?),
            DestinationSink::Server(p) => Ok(p.add_pages(vaddr, flags, data)?),
        }
    }

    fn add_hole(
        &mut self,
        vaddr: u64,
        nr_pages: u64,
        flags: PageFlags,
    ) -> Result<(), DestinationError> {
        match self {
            DestinationSink::Local(w) => Ok(PageSink::add_hole(w, vaddr, nr_pages, flags)?),
            DestinationSink::Server(p) => Ok(p.add_hole(vaddr, nr_pages, flags)?),
        }
    }

    fn finish(self) -> Result<PagemapStats, DestinationError> {
        match self {
            DestinationSink::Local(w) => Ok(PageSink::finish(w)?),
            DestinationSink::Server(p) => Ok(p.finish()),
        }
    }
}

impl PageStore for PageDestination {
    type Error = DestinationError;
    type Sink<'a> = DestinationSink<'a>;

    fn parent_has(&mut self, id: PagemapId) -> Result<bool, DestinationError> {
        match self {
            PageDestination::Local(l) => Ok(l.parent_has(id)?),
            PageDestination::Server(s) => Ok(s.parent_has(id)?),
        }
    }

    fn open(&mut self, id: PagemapId) -> Result<DestinationSink<'_>, DestinationError> {
        match self {
            PageDestination::Local(l) => Ok(DestinationSink::Local(l.open(id)?)),
            PageDestination::Server(s) => Ok(DestinationSink::Server(s.open(id)?)),
        }
    }

    fn close(self) -> Result<(), DestinationError> {
        match self {
            PageDestination::Local(l) => Ok(PageStore::close(l)?),
            PageDestination::Server(s) => Ok(PageStore::close(s)?),
        }
    }
}
