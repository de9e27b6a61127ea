//! Unix sockets: every unix socket of the tree is made by one call, [`create_all`], in
//! ckpt-restore before the tree is forked, because sockets refer to each other (peers,
//! connections waiting on a listener) and their queues are refilled from their peers.
//!
//! From `files.img` (`unix_sk_entry`) and `sk-queues.img` (`sk_packet_entry` + payload):
//! - connected stream and seqpacket sockets, and unnamed connected datagram pairs, come back
//!   as `socketpair`s;
//! - a bound socket is bound to the same path (a stale socket file nobody listens on is
//!   unlinked first; the file gets its mode and owner back; a relative name is bound from
//!   the directory it was bound in) or abstract name; a listener listens with its backlog;
//! - a connection that waited to be accepted is made again by connecting its socket to the
//!   listener, so that `accept()` returns it after restore. Several waiting on one listener
//!   come back in inode order, which need not be the order they connected in: the images do
//!   not record the accept queue's order, and the kernel hands out socket inode numbers in
//!   per-CPU batches (a socket made later on another CPU may get a smaller number);
//! - named datagram sockets connect to their peer's name (an external peer, dumped with
//!   `--ext-unix-sk`, is reached only by its name);
//! - queued data is sent again from the peer in order, datagram by datagram (a datagram
//!   socket without a connected peer gets its queue from a temporary socket, sent to its
//!   name);
//! - file descriptors in flight (`sk_packet_entry.scm`, file ids) go with their packet by
//!   `SCM_RIGHTS`, taken from the table of objects made before the sockets
//!   ([`crate::objects`]) or from the sockets made here; an object that only rides in a
//!   queue, held by no process, is described to the table by [`UnixSocket::carried`];
//! - options (buffer sizes, timeouts, SO_PASSCRED, ...), then shutdown, then file flags.
//!
//! What restore cannot tell apart is named in [`UnixError`]; nothing here trusts the images:
//! an inconsistent set of sockets is an error, never a panic.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use images_format::dir::ImageDir;
use images_format::error::ImageError;
use images_format::kind::ImageKind;
use images_format::pb;
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown, SocketAddrUnix,
    SocketFlags, SocketType,
};

use crate::files::FdSource;
use crate::plan::FdOpen;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_SEQPACKET: u32 = 5;
const TCP_ESTABLISHED: u32 = 1;
const TCP_LISTEN: u32 = 10;
/// `unix_sk_entry.uflags`: a socket outside the dump, reached by its name.
const USK_EXTERN: u32 = 1;
/// Socket options (socket(7)) without a safe setter elsewhere.
const SOL_SOCKET: i32 = 1;
const SO_PRIORITY: i32 = 12;
const SO_RCVLOWAT: i32 = 18;
const SO_PASSSEC: i32 = 34;
const SO_MARK: i32 = 36;
/// Longest `sun_path`.
const UNIX_PATH_MAX: usize = 108;
/// `scm_entry.type` of file descriptors in flight.
const SCM_RIGHTS: u32 = 1;
/// The most fds one message carries (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
const FD_CLOEXEC: u32 = 1;

/// Why the unix sockets could not be made.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("restore: read {image}")]
    Image {
        image: String,
        #[source]
        source: ImageError,
    },
    #[error("restore: unix socket socket:[{ino}] (file id {id}): {op}")]
    Socket {
        ino: u32,
        id: u32,
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("restore: unix socket socket:[{ino}]: bind to {name}")]
    Bind {
        ino: u32,
        name: String,
        #[source]
        errno: Errno,
    },
    #[error("restore: unix socket socket:[{ino}]: {name} is in use by a live socket (stop its owner or remove it)")]
    InUse { ino: u32, name: String },
    #[error("restore: unix socket socket:[{ino}]: {name} exists and is not a socket")]
    NotASocket { ino: u32, name: String },
    #[error("restore: unix socket socket:[{ino}]: {why}")]
    Inconsistent { ino: u32, why: String },
    #[error("restore: unix socket socket:[{ino}]: refill {bytes} queued bytes: {why}")]
    Queue { ino: u32, bytes: usize, why: String },
}

/// Socket options as the dump read them (buffer sizes as `getsockopt` shows them, twice
/// what was set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixOptions {
    pub sndbuf: u32,
    pub rcvbuf: u32,
    pub snd_timeout: Option<Duration>,
    pub rcv_timeout: Option<Duration>,
    pub passcred: bool,
    pub passsec: bool,
    pub priority: u32,
    pub rcvlowat: u32,
    pub mark: u32,
}

/// One unix socket of the images (`unix_sk_entry`), with its queued packets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocket {
    /// File id.
    pub id: u32,
    pub ino: u32,
    pub sock_type: u32,
    pub state: u32,
    /// File status flags (`O_NONBLOCK`...).
    pub flags: u32,
    pub backlog: u32,
    /// Peer inode (for a connection waiting to be accepted: its listener's).
    pub peer: u32,
    /// Path or abstract name (leading NUL) as bound; empty if unbound.
    pub name: Vec<u8>,
    /// Directory a relative name was bound in.
    pub name_dir: Option<PathBuf>,
    /// Mode, uid and gid of the socket file.
    pub perms: Option<(u32, u32, u32)>,
    /// The socket file was unlinked after bind.
    pub deleted: bool,
    /// `RCV_SHUTDOWN` (1) | `SEND_SHUTDOWN` (2).
    pub shutdown: u8,
    pub opts: UnixOptions,
    /// Outside the dump: only its name is known (`--ext-unix-sk`).
    pub external: bool,
    /// The name of the external peer, from [`UnixImages`].
    pub external_peer: Option<Vec<u8>>,
    /// Queued packets in order (a stream's bytes may come as one), from [`UnixImages`].
    pub queue: Vec<Vec<u8>>,
    /// File ids in flight, by the index of the packet in `queue` they ride with.
    pub rights: BTreeMap<usize, Vec<u32>>,
    /// How to make each object named in `rights` (from `files.img`), for the objects no
    /// process holds: [`crate::objects::create`] makes those too.
    pub carried: Vec<FdOpen>,
    /// Objects named in `rights` that restore can make only through a process that holds
    /// them, with the reason (for the error if none does).
    pub uncarried: BTreeMap<u32, String>,
}

fn timeout(sec: u64, usec: u64) -> Option<Duration> {
    let t = Duration::from_secs(sec).saturating_add(Duration::from_micros(usec));
    (!t.is_zero()).then_some(t)
}

impl UnixSocket {
    /// The socket a `unix_sk_entry` describes (its queue comes later, from [`UnixImages`]).
    pub fn from_entry(e: &pb::UnixSkEntry) -> UnixSocket {
        let o = &e.opts;
        UnixSocket {
            id: e.id,
            ino: e.ino,
            sock_type: e.r#type,
            state: e.state,
            flags: e.flags,
            backlog: e.backlog,
            peer: e.peer,
            name: e.name.clone(),
            name_dir: e.name_dir.as_ref().map(PathBuf::from),
            perms: e.file_perms.as_ref().map(|p| (p.mode, p.uid, p.gid)),
            deleted: e.deleted.unwrap_or(false),
            shutdown: e.shutdown.and_then(|s| u8::try_from(s).ok()).unwrap_or(0) & 3,
            opts: UnixOptions {
                sndbuf: o.so_sndbuf,
                rcvbuf: o.so_rcvbuf,
                snd_timeout: timeout(o.so_snd_tmo_sec, o.so_snd_tmo_usec),
                rcv_timeout: timeout(o.so_rcv_tmo_sec, o.so_rcv_tmo_usec),
                passcred: o.so_passcred.unwrap_or(false),
                passsec: o.so_passsec.unwrap_or(false),
                priority: o.so_priority.unwrap_or(0),
                rcvlowat: o.so_rcvlowat.unwrap_or(0),
                mark: o.so_mark.unwrap_or(0),
            },
            external: e.uflags & USK_EXTERN != 0,
            external_peer: None,
            queue: Vec::new(),
            rights: BTreeMap::new(),
            carried: Vec::new(),
            uncarried: BTreeMap::new(),
        }
    }

    fn is_abstract(&self) -> bool {
        self.name.first() == Some(&0)
    }

    fn has_name(&self) -> bool {
        !self.name.is_empty()
    }

    /// The name for messages: a path, or `@name` for an abstract one.
    fn shown_name(&self) -> String {
        shown(&self.name)
    }
}

fn shown(name: &[u8]) -> String {
    match name.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(path_bytes(name)).into_owned(),
    }
}

/// A path name up to its first NUL (a program may bind with trailing NULs).
fn path_bytes(name: &[u8]) -> &[u8] {
    name.split(|b| *b == 0).next().unwrap_or_default()
}

/// What the images say about unix sockets beyond their own entries: queued packets and the
/// names of external peers. Read once per restore, then given to each process's fds.
#[derive(Debug, Default)]
pub struct UnixImages {
    queues: HashMap<u32, Vec<Packet>>,
    externals: HashMap<u32, Vec<u8>>,
    /// Every object in flight, by file id, as an fd plan, or why it has none.
    carried: HashMap<u32, Result<FdOpen, String>>,
}

/// One queued packet of `sk-queues.img`: its bytes and the file ids sent with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub rights: Vec<u32>,
}

impl UnixImages {
    /// Reads `sk-queues.img` (if `files`, every file object of the tree, has a unix socket).
    pub fn read(
        dir: &ImageDir,
        files: &HashMap<u32, pb::FileEntry>,
    ) -> Result<UnixImages, UnixError> {
        let sockets: Vec<&pb::UnixSkEntry> =
            files.values().filter_map(|f| f.usk.as_ref()).collect();
        if sockets.is_empty() {
            return Ok(UnixImages::default());
        }
        let externals = sockets
            .iter()
            .filter(|u| u.uflags & USK_EXTERN != 0)
            .map(|u| (u.ino, u.name.clone()))
            .collect();
        let queues = read_queues(dir)?;
        let mut carried = HashMap::new();
        let mut ghosts = None;
        for id in queues.values().flatten().flat_map(|p| p.rights.iter()) {
            if carried.contains_key(id) {
                continue;
            }
            if ghosts.is_none() {
                ghosts = Some(ghost_ids(dir)?);
            }
            let ghost = ghosts.as_ref().is_some_and(|g| g.contains(id));
            carried.insert(*id, carried_fd(files, *id, ghost)?);
        }
        Ok(UnixImages {
            queues,
            externals,
            carried,
        })
    }

    /// The pipe and FIFO ends in flight: one of them may be the only end left, so
    /// [`crate::files::load_pipe_data`] gives them their unread data with the others.
    pub(crate) fn carried_sources(&mut self) -> impl Iterator<Item = &mut FdSource> {
        self.carried.values_mut().flatten().map(|f| &mut f.source)
    }

    /// Gives each unix socket among `fds` its queue and the name of its external peer.
    pub fn fill(&self, fds: &mut [FdOpen]) {
        for f in fds.iter_mut() {
            if let FdSource::UnixSocket(sk) = &mut f.source {
                self.fill_socket(sk);
            }
        }
    }

    /// Its queue, the fds in flight in it, and every object reachable through them (a
    /// socket in flight carries a queue too), each once: the table makes those no process
    /// holds.
    fn fill_socket(&self, sk: &mut UnixSocket) {
        self.fill_queue(sk);
        let mut seen = std::collections::HashSet::new();
        let mut todo: Vec<u32> = sk.rights.values().flatten().copied().collect();
        let mut carried = Vec::new();
        while let Some(id) = todo.pop() {
            if !seen.insert(id) {
                continue;
            }
            let planned = match self.carried.get(&id) {
                Some(Ok(planned)) => planned,
                Some(Err(why)) => {
                    sk.uncarried.insert(id, why.clone());
                    continue;
                }
                None => continue,
            };
            let mut planned = planned.clone();
            if let FdSource::UnixSocket(inner) = &mut planned.source {
                self.fill_queue(inner);
                todo.extend(inner.rights.values().flatten().copied());
            }
            carried.push(planned);
        }
        carried.sort_by_key(|c| c.file_id);
        sk.carried = carried;
    }

    fn fill_queue(&self, sk: &mut UnixSocket) {
        let packets = self
            .queues
            .get(&sk.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        sk.queue = packets.iter().map(|p| p.bytes.clone()).collect();
        sk.rights = packets
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.rights.is_empty())
            .map(|(i, p)| (i, p.rights.clone()))
            .collect();
        sk.external_peer = self.externals.get(&sk.peer).cloned();
    }
}

/// The `files.img` ids of deleted files saved as ghosts (`remap-fpath.img`).
fn ghost_ids(dir: &ImageDir) -> Result<std::collections::HashSet<u32>, UnixError> {
    let remaps = dir
        .read_all::<pb::RemapFilePathEntry>(ImageKind::RemapFpath, 0)
        .map_err(|source| UnixError::Image {
            image: ImageKind::RemapFpath.file_name(0),
            source,
        })?;
    Ok(remaps.iter().map(|r| r.orig_id).collect())
}

/// The fd plan of file `id` of `files.img`, sent in flight: made like the fds of processes,
/// but placed at no fd number (only the table of objects holds it). `Ok(Err(why))`: an
/// object restore makes only through a process that holds it (a deleted file, whose
/// stand-in copy is named per process; a memfd, made with the tree's shared memory).
fn carried_fd(
    files: &HashMap<u32, pb::FileEntry>,
    id: u32,
    ghost: bool,
) -> Result<Result<FdOpen, String>, UnixError> {
    let missing = |why: &str| UnixError::Inconsistent {
        ino: 0,
        why: format!("file id {id} is in flight in a queue, but {why}"),
    };
    let file = files
        .get(&id)
        .ok_or_else(|| missing("files.img has no such file"))?;
    if ghost {
        return Ok(Err(
            "a deleted file in flight is restored only if a process holds it too".into(),
        ));
    }
    if file.memfd.is_some() {
        return Ok(Err(
            "a memfd in flight is restored only if a process holds it too".into(),
        ));
    }
    if let Some(reg) = &file.reg {
        return Ok(Ok(FdOpen {
            fd: -1,
            file_id: id,
            path: PathBuf::from(&reg.name),
            flags: reg.flags,
            pos: reg.pos,
            cloexec: true,
            ghost: None,
            source: FdSource::Path,
        }));
    }
    let fdi = pb::FdinfoEntry {
        id,
        flags: FD_CLOEXEC,
        r#type: file.r#type,
        fd: 0,
        xattr_security_selinux: None,
    };
    let Some(mut planned) = crate::files::plan_kobj(Some(file), &fdi) else {
        return Ok(Err(format!(
            "restore cannot make a file of type {}",
            file.r#type
        )));
    };
    planned.fd = -1;
    crate::files::name_fifo(files, &mut planned)
        .map_err(|_| missing("its FIFO has no path in files.img"))?;
    Ok(Ok(planned))
}

/// `sk-queues.img`: packets by the file id of the socket that had them queued, in order,
/// with the file ids in flight beside each.
pub fn read_queues(dir: &ImageDir) -> Result<HashMap<u32, Vec<Packet>>, UnixError> {
    let name = ImageKind::SkQueues.file_name(0);
    let mut queues: HashMap<u32, Vec<Packet>> = HashMap::new();
    if !dir.path().join(&name).exists() {
        return Ok(queues);
    }
    let image_err = |source| UnixError::Image {
        image: name.clone(),
        source,
    };
    let mut reader = dir.open_named(&name).map_err(image_err)?;
    while let Some(entry) = reader
        .read_entry::<pb::SkPacketEntry>()
        .map_err(image_err)?
    {
        let bytes = reader
            .read_payload(u64::from(entry.length))
            .map_err(image_err)?;
        let mut rights = Vec::new();
        for scm in &entry.scm {
            if scm.r#type != SCM_RIGHTS {
                return Err(UnixError::Inconsistent {
                    ino: 0,
                    why: format!(
                        "a packet of file id {} carries control message type {}, not SCM_RIGHTS",
                        entry.id_for, scm.r#type
                    ),
                });
            }
            rights.extend_from_slice(&scm.rights);
        }
        queues
            .entry(entry.id_for)
            .or_default()
            .push(Packet { bytes, rights });
    }
    Ok(queues)
}

fn sock_type(t: u32) -> Option<SocketType> {
    match t {
        SOCK_STREAM => Some(SocketType::STREAM),
        SOCK_DGRAM => Some(SocketType::DGRAM),
        SOCK_SEQPACKET => Some(SocketType::SEQPACKET),
        _ => None,
    }
}

/// Everything being made, by inode.
struct Making<'a> {
    sockets: BTreeMap<u32, &'a UnixSocket>,
    made: HashMap<u32, OwnedFd>,
    /// The far end of a connection whose peer had closed, until its queue is refilled.
    closed_ends: HashMap<u32, OwnedFd>,
    /// Sockets bound to a path that was unlinked afterwards, unlinked again at the end.
    unlink_after: Vec<PathBuf>,
}

impl<'a> Making<'a> {
    fn fd(&self, s: &UnixSocket) -> Result<&OwnedFd, UnixError> {
        self.made
            .get(&s.ino)
            .ok_or_else(|| UnixError::Inconsistent {
                ino: s.ino,
                why: "was not made".into(),
            })
    }
}

fn err(s: &UnixSocket, op: &'static str) -> impl FnOnce(Errno) -> UnixError {
    let (ino, id) = (s.ino, s.id);
    move |errno| UnixError::Socket { ino, id, op, errno }
}

fn new_socket(s: &UnixSocket, flags: SocketFlags) -> Result<OwnedFd, UnixError> {
    let kind = sock_type(s.sock_type).ok_or_else(|| UnixError::Inconsistent {
        ino: s.ino,
        why: format!("type {} is not stream, datagram or seqpacket", s.sock_type),
    })?;
    rustix::net::socket_with(
        AddressFamily::UNIX,
        kind,
        flags | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(err(s, "socket"))
}

/// Creates every unix socket the fds of the tree refer to (each file id once), connected,
/// listening, bound and filled as dumped. Returns `(file id, fd)` for each. `others` gives
/// the objects made before, by file id: the files in flight that are not unix sockets.
pub fn create_all<'a, 'o>(
    fds: impl IntoIterator<Item = &'a FdOpen>,
    others: impl Fn(u32) -> Option<BorrowedFd<'o>>,
) -> Result<Vec<(u32, OwnedFd)>, UnixError> {
    let mut sockets = BTreeMap::new();
    let mut external_names: HashMap<u32, &'a [u8]> = HashMap::new();
    for f in fds {
        if let FdSource::UnixSocket(sk) = &f.source {
            if let Some(name) = &sk.external_peer {
                external_names.insert(sk.peer, name);
            }
            if !sk.external {
                sockets.insert(sk.ino, sk.as_ref());
            }
        }
    }
    if sockets.is_empty() {
        return Ok(Vec::new());
    }
    let mut m = Making {
        sockets,
        made: HashMap::new(),
        closed_ends: HashMap::new(),
        unlink_after: Vec::new(),
    };
    let all: Vec<&UnixSocket> = m.sockets.values().copied().collect();
    // Connected pairs first, then bound and listening sockets, then what connects to them.
    for s in &all {
        make_pair_or_single(&mut m, s)?;
    }
    for s in &all {
        connect_pending(&mut m, s)?;
    }
    for s in &all {
        set_options(m.fd(s)?, s)?;
    }
    // Queues are refilled before datagram sockets connect: a connected datagram socket
    // accepts data from its peer only, and the sender may be a temporary socket.
    for s in &all {
        refill(&m, s, &others)?;
    }
    m.closed_ends.clear();
    for s in &all {
        connect_datagram(&m, s, &external_names)?;
    }
    for s in &all {
        finish(&m, s)?;
    }
    for path in &m.unlink_after {
        // The socket keeps working without its file, as it did at dump time.
        let _ = std::fs::remove_file(path);
    }
    let mut out = Vec::with_capacity(m.sockets.len());
    for s in &all {
        let fd = m
            .made
            .remove(&s.ino)
            .ok_or_else(|| UnixError::Inconsistent {
                ino: s.ino,
                why: "was not made".into(),
            })?;
        out.push((s.id, fd));
    }
    tracing::info!(sockets = out.len(), "unix sockets made");
    Ok(out)
}

/// A socketpair for two sockets connected to each other, or one socket bound (and
/// listening) as it was.
fn make_pair_or_single(m: &mut Making<'_>, s: &UnixSocket) -> Result<(), UnixError> {
    if m.made.contains_key(&s.ino) {
        return Ok(());
    }
    let connected = s.state == TCP_ESTABLISHED || s.sock_type == SOCK_DGRAM;
    let mutual = m
        .sockets
        .get(&s.peer)
        .copied()
        .filter(|p| p.peer == s.ino && p.ino != s.ino && p.state != TCP_LISTEN);
    if let Some(p) = mutual.filter(|_| connected && s.state != TCP_LISTEN) {
        if p.sock_type != s.sock_type {
            return Err(UnixError::Inconsistent {
                ino: s.ino,
                why: format!("its peer socket:[{}] has another type", p.ino),
            });
        }
        // A stream connection is a pair whatever the names say (an accepted socket shows
        // its listener's name without being bound); named datagram sockets are bound and
        // connect to each other by name later.
        if s.sock_type != SOCK_DGRAM || (!s.has_name() && !p.has_name()) {
            let kind = sock_type(s.sock_type).ok_or_else(|| UnixError::Inconsistent {
                ino: s.ino,
                why: format!("type {} is not supported", s.sock_type),
            })?;
            let (a, b) =
                rustix::net::socketpair(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None)
                    .map_err(err(s, "socketpair"))?;
            m.made.insert(s.ino, a);
            m.made.insert(p.ino, b);
            return Ok(());
        }
    }
    let stream_like = s.sock_type != SOCK_DGRAM;
    if stream_like && s.state == TCP_ESTABLISHED {
        if s.peer == 0 {
            // Its peer had closed: a pair whose other end goes once the queue is back.
            let kind = sock_type(s.sock_type).unwrap_or(SocketType::STREAM);
            let (a, b) =
                rustix::net::socketpair(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None)
                    .map_err(err(s, "socketpair"))?;
            m.made.insert(s.ino, a);
            m.closed_ends.insert(s.ino, b);
            return Ok(());
        }
        let waits_on_listener = m
            .sockets
            .get(&s.peer)
            .is_some_and(|l| l.state == TCP_LISTEN);
        if waits_on_listener {
            // Connected once its listener exists.
            return Ok(());
        }
        return Err(UnixError::Inconsistent {
            ino: s.ino,
            why: format!(
                "is connected to socket:[{}], which is not in the images",
                s.peer
            ),
        });
    }
    let fd = new_socket(s, SocketFlags::empty())?;
    if s.has_name() {
        bind(&fd, s, &mut m.unlink_after)?;
    }
    if s.state == TCP_LISTEN {
        let backlog = i32::try_from(s.backlog).unwrap_or(i32::MAX);
        rustix::net::listen(&fd, backlog).map_err(err(s, "listen"))?;
    }
    m.made.insert(s.ino, fd);
    Ok(())
}

/// The address of a named socket (a relative path is made absolute with its directory).
fn address_of(ino: u32, name: &[u8], name_dir: Option<&Path>) -> Result<SocketAddrUnix, UnixError> {
    let bad = |errno| UnixError::Bind {
        ino,
        name: shown(name),
        errno,
    };
    if let Some(rest) = name.strip_prefix(&[0]) {
        return SocketAddrUnix::new_abstract_name(rest).map_err(bad);
    }
    let path = Path::new(OsStr::from_bytes(path_bytes(name)));
    let full = match name_dir {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    };
    if full.as_os_str().len() >= UNIX_PATH_MAX {
        return Err(bad(Errno::NAMETOOLONG));
    }
    SocketAddrUnix::new(full.as_path()).map_err(bad)
}

/// Binds `fd` to the name of `s`. A path that holds a socket file nobody serves (the
/// dumped process's own, left behind when it was killed) is unlinked first.
fn bind(fd: &OwnedFd, s: &UnixSocket, unlink_after: &mut Vec<PathBuf>) -> Result<(), UnixError> {
    if s.is_abstract() {
        let addr = address_of(s.ino, &s.name, None)?;
        return rustix::net::bind(fd, &addr).map_err(|errno| match errno {
            Errno::ADDRINUSE => UnixError::InUse {
                ino: s.ino,
                name: s.shown_name(),
            },
            errno => UnixError::Bind {
                ino: s.ino,
                name: s.shown_name(),
                errno,
            },
        });
    }
    let path = Path::new(OsStr::from_bytes(path_bytes(&s.name)));
    // A relative name is bound from its directory, so that it reads the same afterwards.
    let relative_in = s.name_dir.as_deref().filter(|_| path.is_relative());
    let full = match relative_in {
        Some(dir) => dir.join(path),
        None => path.to_path_buf(),
    };
    remove_stale(s, &full)?;
    let bind_err = |errno| UnixError::Bind {
        ino: s.ino,
        name: full.display().to_string(),
        errno,
    };
    match relative_in {
        Some(dir) => {
            let here = rustix::fs::open(
                ".",
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(bind_err)?;
            rustix::process::chdir(dir).map_err(bind_err)?;
            let bound = SocketAddrUnix::new(path)
                .and_then(|addr| rustix::net::bind(fd, &addr))
                .map_err(bind_err);
            // Put our cwd back whatever happened: the rest of restore uses paths.
            rustix::process::fchdir(&here).map_err(bind_err)?;
            bound?;
        }
        None => {
            let addr = address_of(s.ino, &s.name, None)?;
            rustix::net::bind(fd, &addr).map_err(bind_err)?;
        }
    }
    if let Some((mode, uid, gid)) = s.perms {
        let io = |e: std::io::Error| UnixError::Bind {
            ino: s.ino,
            name: full.display().to_string(),
            errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
        };
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io)?;
        std::os::unix::fs::chown(&full, Some(uid), Some(gid)).map_err(io)?;
    }
    if s.deleted {
        unlink_after.push(full);
    }
    Ok(())
}

/// Unlinks a socket file at `path` if no socket serves it (a connect is refused).
fn remove_stale(s: &UnixSocket, path: &Path) -> Result<(), UnixError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let name = path.display().to_string();
    if !meta.file_type().is_socket() {
        return Err(UnixError::NotASocket { ino: s.ino, name });
    }
    let probe = new_socket(s, SocketFlags::NONBLOCK)?;
    let addr = SocketAddrUnix::new(path).map_err(|errno| UnixError::Bind {
        ino: s.ino,
        name: name.clone(),
        errno,
    })?;
    match rustix::net::connect(&probe, &addr) {
        Err(Errno::CONNREFUSED) => {
            std::fs::remove_file(path).map_err(|e| UnixError::Bind {
                ino: s.ino,
                name: name.clone(),
                errno: Errno::from_io_error(&e).unwrap_or(Errno::IO),
            })?;
            tracing::debug!(path = %name, "stale socket file removed");
            Ok(())
        }
        // A socket of another type there is as good as a live one: not ours to remove.
        _ => Err(UnixError::InUse { ino: s.ino, name }),
    }
}

/// A connection that waited in a listener's accept queue: connected to the listener again.
fn connect_pending(m: &mut Making<'_>, s: &UnixSocket) -> Result<(), UnixError> {
    if m.made.contains_key(&s.ino) {
        return Ok(());
    }
    let Some(listener) = m.sockets.get(&s.peer).copied() else {
        return Err(UnixError::Inconsistent {
            ino: s.ino,
            why: "was not made".into(),
        });
    };
    let addr = address_of(listener.ino, &listener.name, listener.name_dir.as_deref())?;
    // Non-blocking: a full backlog fails instead of hanging restore.
    let fd = new_socket(s, SocketFlags::NONBLOCK)?;
    rustix::net::connect(&fd, &addr).map_err(err(s, "connect to its listener"))?;
    rustix::fs::fcntl_setfl(&fd, OFlags::empty()).map_err(err(s, "fcntl(F_SETFL)"))?;
    m.made.insert(s.ino, fd);
    Ok(())
}

/// `setsockopt` of what the dump saved. Buffer sizes are forced (as root may) to half the
/// dumped value, which the kernel doubles again.
fn set_options(fd: &OwnedFd, s: &UnixSocket) -> Result<(), UnixError> {
    use rustix::net::sockopt;
    let o = &s.opts;
    let half = |v: u32| usize::try_from(v / 2).unwrap_or(usize::MAX);
    if o.sndbuf != 0 {
        sockopt::set_socket_send_buffer_size_force(fd, half(o.sndbuf))
            .or_else(|_| sockopt::set_socket_send_buffer_size(fd, half(o.sndbuf)))
            .map_err(err(s, "setsockopt(SO_SNDBUF)"))?;
    }
    if o.rcvbuf != 0 {
        sockopt::set_socket_recv_buffer_size_force(fd, half(o.rcvbuf))
            .or_else(|_| sockopt::set_socket_recv_buffer_size(fd, half(o.rcvbuf)))
            .map_err(err(s, "setsockopt(SO_RCVBUF)"))?;
    }
    if o.snd_timeout.is_some() {
        sockopt::set_socket_timeout(fd, sockopt::Timeout::Send, o.snd_timeout)
            .map_err(err(s, "setsockopt(SO_SNDTIMEO)"))?;
    }
    if o.rcv_timeout.is_some() {
        sockopt::set_socket_timeout(fd, sockopt::Timeout::Recv, o.rcv_timeout)
            .map_err(err(s, "setsockopt(SO_RCVTIMEO)"))?;
    }
    if o.passcred {
        sockopt::set_socket_passcred(fd, true).map_err(err(s, "setsockopt(SO_PASSCRED)"))?;
    }
    let int = |name, value: u32, op| {
        let value = i32::try_from(value).unwrap_or(i32::MAX);
        tracee::sockdiag::set_sockopt_int(fd, SOL_SOCKET, name, value).map_err(err(s, op))
    };
    if o.passsec {
        int(SO_PASSSEC, 1, "setsockopt(SO_PASSSEC)")?;
    }
    if o.priority != 0 {
        int(SO_PRIORITY, o.priority, "setsockopt(SO_PRIORITY)")?;
    }
    if o.rcvlowat > 1 {
        int(SO_RCVLOWAT, o.rcvlowat, "setsockopt(SO_RCVLOWAT)")?;
    }
    if o.mark != 0 {
        int(SO_MARK, o.mark, "setsockopt(SO_MARK)")?;
    }
    Ok(())
}

/// The unix socket of file `id` made here, if it is one.
fn made_socket<'m>(m: &'m Making<'_>, id: u32) -> Option<BorrowedFd<'m>> {
    m.sockets
        .values()
        .find(|s| s.id == id)
        .and_then(|s| m.made.get(&s.ino))
        .map(|fd| fd.as_fd())
}

/// Sends the queued packets of `s` again, from whoever can reach it: its connected peer,
/// the far end of a closed connection, or a temporary socket sending to its name. Fds in
/// flight go with their packet (`SCM_RIGHTS`).
fn refill<'o>(
    m: &Making<'_>,
    s: &UnixSocket,
    others: &impl Fn(u32) -> Option<BorrowedFd<'o>>,
) -> Result<(), UnixError> {
    if s.queue.is_empty() {
        return Ok(());
    }
    let bytes: usize = s.queue.iter().map(Vec::len).sum();
    let queue_err = |why: String| UnixError::Queue {
        ino: s.ino,
        bytes,
        why,
    };
    let mutual = m.sockets.get(&s.peer).copied().filter(|p| p.peer == s.ino);
    let temporary;
    let (sender, to): (&OwnedFd, Option<SocketAddrUnix>) =
        if let Some(end) = m.closed_ends.get(&s.ino) {
            (end, None)
        } else if let Some(p) = mutual {
            let fd = m
                .made
                .get(&p.ino)
                .ok_or_else(|| queue_err("its peer was not made".into()))?;
            if s.sock_type == SOCK_DGRAM && s.has_name() {
                // Named datagram sockets connect to each other later: address it.
                let addr = address_of(s.ino, &s.name, s.name_dir.as_deref())?;
                (fd, Some(addr))
            } else {
                (fd, None)
            }
        } else if s.sock_type == SOCK_DGRAM && s.has_name() {
            temporary = new_socket(s, SocketFlags::empty())?;
            let addr = address_of(s.ino, &s.name, s.name_dir.as_deref())?;
            (&temporary, Some(addr))
        } else {
            return Err(queue_err(
                "no socket of the images is connected to it and it has no name to send to".into(),
            ));
        };
    for (index, packet) in s.queue.iter().enumerate() {
        let mut left = packet.as_slice();
        let mut rights: Vec<BorrowedFd<'_>> = Vec::new();
        for id in s.rights.get(&index).map(Vec::as_slice).unwrap_or_default() {
            let fd = made_socket(m, *id).or_else(|| others(*id)).ok_or_else(|| {
                let why = s
                    .uncarried
                    .get(id)
                    .map_or("it was not made", String::as_str);
                queue_err(format!("file id {id} in flight in it: {why}"))
            })?;
            rights.push(fd);
        }
        if rights.len() > SCM_MAX_FD {
            return Err(queue_err(format!(
                "{} fds in flight with one packet",
                rights.len()
            )));
        }
        loop {
            let sent = if rights.is_empty() {
                match &to {
                    Some(addr) => rustix::net::sendto(sender, left, SendFlags::DONTWAIT, addr),
                    None => rustix::net::send(sender, left, SendFlags::DONTWAIT),
                }
            } else {
                // The fds ride with the first part sent; a stream's rest goes without.
                let mut space = vec![
                    std::mem::MaybeUninit::uninit();
                    rustix::cmsg_space!(ScmRights(rights.len()))
                ];
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !control.push(SendAncillaryMessage::ScmRights(&rights)) {
                    return Err(queue_err("the fds in flight do not fit a message".into()));
                }
                let iov = [std::io::IoSlice::new(left)];
                let sent = match &to {
                    Some(addr) => rustix::net::sendmsg_addr(
                        sender,
                        addr,
                        &iov,
                        &mut control,
                        SendFlags::DONTWAIT,
                    ),
                    None => rustix::net::sendmsg(sender, &iov, &mut control, SendFlags::DONTWAIT),
                };
                if sent.is_ok() {
                    rights.clear();
                }
                sent
            };
            let n = sent.map_err(|errno| {
                queue_err(match errno {
                    Errno::AGAIN => "the queue does not fit in the socket's buffers (or in net.unix.max_dgram_qlen)".into(),
                    errno => format!("send: {errno}"),
                })
            })?;
            // Datagrams go whole or not at all; a stream may take part of a write.
            if s.sock_type != SOCK_STREAM || n >= left.len() {
                break;
            }
            left = left.get(n..).unwrap_or_default();
        }
    }
    tracing::debug!(
        ino = s.ino,
        packets = s.queue.len(),
        bytes,
        "unix socket queue refilled"
    );
    Ok(())
}

/// Connects a datagram socket to its peer by name (a socket of the images, or one outside).
fn connect_datagram(
    m: &Making<'_>,
    s: &UnixSocket,
    external: &HashMap<u32, &[u8]>,
) -> Result<(), UnixError> {
    if s.sock_type != SOCK_DGRAM || s.peer == 0 {
        return Ok(());
    }
    let fd = m.fd(s)?;
    let addr = match (m.sockets.get(&s.peer), external.get(&s.peer)) {
        (Some(p), _) => {
            if !p.has_name() {
                // Unnamed pairs are socketpairs, connected already; any other unnamed
                // peer cannot be reached.
                if p.peer == s.ino {
                    return Ok(());
                }
                return Err(UnixError::Inconsistent {
                    ino: s.ino,
                    why: format!("is connected to socket:[{}], which has no name", p.ino),
                });
            }
            address_of(p.ino, &p.name, p.name_dir.as_deref())?
        }
        (None, Some(name)) => address_of(s.peer, name, None)?,
        (None, None) => {
            return Err(UnixError::Inconsistent {
                ino: s.ino,
                why: format!(
                    "is connected to socket:[{}], which is not in the images",
                    s.peer
                ),
            })
        }
    };
    rustix::net::connect(fd, &addr).map_err(err(s, "connect to its peer"))
}

/// Shutdown and file status flags, last: a shut down socket could not be refilled.
fn finish(m: &Making<'_>, s: &UnixSocket) -> Result<(), UnixError> {
    let fd = m.fd(s)?;
    let how = match s.shutdown & 3 {
        1 => Some(Shutdown::Read),
        2 => Some(Shutdown::Write),
        3 => Some(Shutdown::Both),
        _ => None,
    };
    if let Some(how) = how {
        match rustix::net::shutdown(fd, how) {
            // A socket that is not connected has nothing to shut down.
            Ok(()) | Err(Errno::NOTCONN) => {}
            Err(errno) => return Err(err(s, "shutdown")(errno)),
        }
    }
    let flags = OFlags::from_bits_retain(s.flags) & (OFlags::NONBLOCK | OFlags::ASYNC);
    rustix::fs::fcntl_setfl(fd.as_fd(), flags).map_err(err(s, "fcntl(F_SETFL)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::RecvFlags;

    fn sock(id: u32, ino: u32, sock_type: u32, state: u32, peer: u32) -> UnixSocket {
        UnixSocket {
            id,
            ino,
            sock_type,
            state,
            peer,
            flags: 2,
            ..UnixSocket::default()
        }
    }

    fn fd_of(s: UnixSocket, fd: i32) -> FdOpen {
        FdOpen {
            fd,
            file_id: s.id,
            path: PathBuf::new(),
            flags: s.flags,
            pos: 0,
            cloexec: false,
            ghost: None,
            source: FdSource::UnixSocket(Box::new(s)),
        }
    }

    fn by_id(made: &[(u32, OwnedFd)], id: u32) -> &OwnedFd {
        &made.iter().find(|(i, _)| *i == id).expect("made").1
    }

    fn recv(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let (n, _) = rustix::net::recv(fd, &mut buf, RecvFlags::DONTWAIT).expect("recv");
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_pair_gets_its_queues_back_both_ways_and_its_shutdown() {
        let mut a = sock(1, 100, SOCK_STREAM, TCP_ESTABLISHED, 101);
        let mut b = sock(2, 101, SOCK_STREAM, TCP_ESTABLISHED, 100);
        a.queue = vec![b"to a".to_vec()];
        b.queue = vec![b"to b".to_vec(), b" more".to_vec()];
        b.shutdown = 2;
        let fds = [fd_of(a, 3), fd_of(b, 4)];
        let made = create_all(&fds, |_| None).expect("create");
        assert_eq!(recv(by_id(&made, 1)), b"to a");
        assert_eq!(recv(by_id(&made, 2)), b"to b more");
        // b cannot send any more: a reads end of stream.
        assert_eq!(recv(by_id(&made, 1)), b"");
    }

    #[test]
    fn datagrams_keep_their_boundaries() {
        let mut a = sock(1, 200, SOCK_DGRAM, TCP_ESTABLISHED, 201);
        let b = sock(2, 201, SOCK_DGRAM, TCP_ESTABLISHED, 200);
        a.queue = vec![b"1".to_vec(), b"22".to_vec(), b"333".to_vec()];
        let made = create_all(&[fd_of(a, 3), fd_of(b, 4)], |_| None).expect("create");
        let got: Vec<_> = (0..3).map(|_| recv(by_id(&made, 1))).collect();
        assert_eq!(got, vec![b"1".to_vec(), b"22".to_vec(), b"333".to_vec()]);
    }

    #[test]
    fn a_pending_connection_is_accepted_after_restore() {
        let name = format!("\0ckpt-unix-restore-test-{}", std::process::id()).into_bytes();
        let mut l = sock(1, 300, SOCK_STREAM, TCP_LISTEN, 0);
        l.name = name;
        l.backlog = 5;
        let c = sock(2, 301, SOCK_STREAM, TCP_ESTABLISHED, 300);
        let made = create_all(&[fd_of(l, 3), fd_of(c, 4)], |_| None).expect("create");
        let accepted = rustix::net::accept(by_id(&made, 1)).expect("accept");
        rustix::net::send(by_id(&made, 2), b"hi", SendFlags::empty()).expect("send");
        assert_eq!(recv(&accepted), b"hi");
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_gets_its_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("srv.sock");
        {
            let old =
                rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).expect("socket");
            rustix::net::bind(&old, &SocketAddrUnix::new(path.as_path()).expect("addr"))
                .expect("bind");
        }
        let mut l = sock(1, 400, SOCK_STREAM, TCP_LISTEN, 0);
        l.name = path.as_os_str().as_bytes().to_vec();
        l.perms = Some((0o140_640, 0, 0));
        l.backlog = 1;
        let made = create_all(&[fd_of(l.clone(), 3)], |_| None).expect("create");
        let meta = std::fs::symlink_metadata(&path).expect("socket file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        // Now it is served: a second restore refuses to steal it.
        assert!(matches!(
            create_all(&[fd_of(l, 3)], |_| None),
            Err(UnixError::InUse { .. })
        ));
        drop(made);
    }

    #[test]
    fn fds_in_flight_go_with_their_packet_and_nowhere_else() {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage};
        let mut a = sock(1, 600, SOCK_STREAM, TCP_ESTABLISHED, 601);
        let b = sock(2, 601, SOCK_STREAM, TCP_ESTABLISHED, 600);
        // A lone datagram socket, in flight only.
        let c = sock(3, 602, SOCK_DGRAM, 7, 0);
        a.queue = vec![b"plain".to_vec(), b"P".to_vec()];
        a.rights = BTreeMap::from([(1, vec![9, 3])]);
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        rustix::io::write(&w, b"piped").expect("write");
        let fds = [
            fd_of(a.clone(), 3),
            fd_of(b.clone(), 4),
            fd_of(c.clone(), 5),
        ];
        let made = create_all(&fds, |id| (id == 9).then(|| r.as_fd())).expect("create");
        let got = by_id(&made, 1);
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut buf = [0u8; 5];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let first = rustix::net::recvmsg(
            got,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::DONTWAIT,
        )
        .expect("recvmsg");
        assert_eq!(
            (&buf[..first.bytes], control.drain().count()),
            (&b"plain"[..], 0)
        );
        drop(control);
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let second = rustix::net::recvmsg(
            got,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::DONTWAIT,
        )
        .expect("recvmsg");
        assert_eq!(&buf[..second.bytes], b"P");
        let received: Vec<OwnedFd> = control
            .drain()
            .flat_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(received.len(), 2);
        let mut piped = [0u8; 8];
        let n = rustix::io::read(&received[0], &mut piped).expect("read the pipe");
        assert_eq!(&piped[..n], b"piped");
        assert_eq!(
            rustix::net::sockopt::socket_type(&received[1]),
            Ok(SocketType::DGRAM)
        );
        // A file id in flight that nothing made is an error, not a packet without it.
        let fds = [fd_of(a, 3), fd_of(b, 4)];
        assert!(matches!(
            create_all(&fds, |_| None),
            Err(UnixError::Queue { .. })
        ));
    }

    #[test]
    fn a_peer_missing_from_the_images_is_an_error() {
        let a = sock(1, 500, SOCK_STREAM, TCP_ESTABLISHED, 999);
        assert!(matches!(
            create_all(&[fd_of(a, 3)], |_| None),
            Err(UnixError::Inconsistent { .. })
        ));
    }
}
