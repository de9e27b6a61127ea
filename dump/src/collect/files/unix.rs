//! Unix sockets: every fd on one becomes a `files.img` entry of type UNIXSK (`unix_sk_entry`)
//! and its unread data goes to `sk-queues.img` (`sk_packet_entry` + payload), as CRIU writes
//! them.
//!
//! What the kernel says about a socket (type, state, name, peer, pending connections, queue
//! lengths, shutdown) comes from one `unix_diag` dump for the whole tree
//! ([`tracee::sockdiag::UnixSockets`]), looked up by inode. The rest is read through a
//! `pidfd_getfd` duplicate of the very same socket: options with `getsockopt`, the bound
//! file with `SIOCUNIXFILE`, and the queue with `MSG_PEEK` stepping through it with
//! `SO_PEEK_OFF`, which is put back as it was: nothing is consumed.
//!
//! Peers:
//! - a connected socket's `peer` is its peer's inode;
//! - a socket whose connection waits in a listener's accept queue gets the listener's inode
//!   as its peer (the waiting socket has none), so that restore connects it again;
//! - a peer outside the dumped tree is an error naming who holds it, unless the user passed
//!   `--ext-unix-sk` and the peer is a named datagram socket: it is then recorded as an
//!   external socket (`uflags` EXTERN) and restore connects to it by name.
//!
//! File descriptors in flight (`SCM_RIGHTS` queued with a packet): peeking a packet with
//! `MSG_PEEK` installs copies of its files in our own fd table. They are handed back to the
//! caller ([`InFlight`]), which describes each one as a file of the tree (the same id as a
//! process's fd on the same open file description) and puts the ids in the packet's `scm`.
//! A stream's bytes are cut into packets where fds ride along, so that restore sends each
//! group of fds with the bytes they came with. The kernel shows no boundary between a
//! message with fds and plain messages sent just before it on a stream: those plain bytes
//! come back as part of the message with fds (a program that reads them without room for
//! fds then loses the fds; one that reads with room gets them a few bytes early).
//!
//! Not supported (clear errors): data sent on a connection not accepted yet, pending
//! connections whose connecting socket is closed, sockets in another network namespace.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use images_format::pb::{
    FdTypes, FileEntry, FilePermsEntry, FownEntry, ScmEntry, SkOptsEntry, SkPacketEntry,
    UnixSkEntry,
};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
pub use tracee::sockdiag::UnixSockets;
use tracee::sockdiag::{self, UnixSocketDiag, SO_PEEK_OFF};
use tracee::{Errno, Pid, PidFd, TargetFd};

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_SEQPACKET: u32 = 5;
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_LISTEN: u32 = 10;
/// `unix_sk_entry.uflags`: the socket is outside the dump, reached by its name.
pub const USK_EXTERN: u32 = 1;
/// `sk_shutdown` values, which are the kernel's `RCV_SHUTDOWN | SEND_SHUTDOWN` bits.
const SHUTDOWN_BOTH: u8 = 3;
/// `scm_entry.type` of file descriptors in flight.
pub const SCM_RIGHTS: u32 = 1;
/// The most fds one message carries (the kernel's `SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// The most a single datagram can be here (`SO_SNDBUF` caps it far lower in practice).
const MAX_DATAGRAM: usize = 16 << 20;
const FIRST_BUFFER: usize = 64 << 10;

/// Why a unix socket cannot be dumped.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error("dump: list the unix sockets (sock_diag)")]
    Diag(#[source] sockdiag::SockDiagError),
    #[error("dump: pid {pid}: fd {fd} is unix socket socket:[{ino}], which sock_diag does not list (a socket of another network namespace?)")]
    NotListed { pid: Pid, fd: TargetFd, ino: u32 },
    #[error("dump: pid {pid}: fd {fd}: take a duplicate of unix socket socket:[{ino}]")]
    Duplicate {
        pid: Pid,
        fd: TargetFd,
        ino: u32,
        #[source]
        source: tracee::pidfd::PidfdError,
    },
    #[error("dump: pid {pid}: fd {fd}: unix socket socket:[{ino}]: {op}")]
    Socket {
        pid: Pid,
        fd: TargetFd,
        ino: u32,
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("dump: pid {pid}: fd {fd}: unix socket socket:[{ino}] {why}")]
    Unsupported {
        pid: Pid,
        fd: TargetFd,
        ino: u32,
        why: String,
    },
    #[error(
        "dump: pid {pid}: fd {fd}: unix socket socket:[{ino}]: a queued message carries more \
         file descriptors than a peek can take"
    )]
    RightsTruncated { pid: Pid, fd: TargetFd, ino: u32 },
    #[error("dump: our own pid, to describe files in flight")]
    OwnPid(#[source] tracee::InvalidId),
    /// A file in flight in the queue of this socket cannot be dumped (the cause names it as
    /// an fd of ckpt-dump, where the peek put a copy of it).
    #[error(
        "dump: pid {pid}: fd {fd}: a file in flight in the queue of unix socket socket:[{ino}]"
    )]
    InFlight {
        pid: Pid,
        fd: TargetFd,
        ino: u64,
        #[source]
        source: Box<crate::collect::CollectError>,
    },
    #[error(
        "dump: pid {pid}: fd {fd}: unix socket socket:[{ino}] is connected to socket:[{peer}], \
         held by {holders} outside the dumped tree ({hint})"
    )]
    ExternalPeer {
        pid: Pid,
        fd: TargetFd,
        ino: u32,
        peer: u32,
        holders: String,
        hint: &'static str,
    },
}

/// A queued packet (or the whole byte stream of a stream socket), for `sk-queues.img`.
#[derive(Debug, Clone)]
pub struct SkPacket {
    pub entry: SkPacketEntry,
    pub bytes: Vec<u8>,
}

/// Our copies of the files queued with one packet (`SCM_RIGHTS`), installed in our fd
/// table by the peek. `packet` indexes the queue vector given to [`describe`]; the caller
/// describes each file and fills that packet's `scm`, then keeps the copies open until the
/// whole tree is described (other fds are compared with them by `kcmp`).
#[derive(Debug)]
pub struct InFlight {
    pub packet: usize,
    pub fds: Vec<OwnedFd>,
}

/// Our own pid, under which files in flight are described (their copies are our fds).
pub fn our_pid() -> Result<Pid, UnixError> {
    Pid::try_from(std::process::id()).map_err(UnixError::OwnPid)
}

/// Adds the file ids of a packet's fds in flight to its `scm`, in the order they were sent.
pub fn set_rights(packet: &mut SkPacket, rights: Vec<u32>) {
    packet.entry.scm.push(ScmEntry {
        r#type: SCM_RIGHTS,
        rights,
    });
}

/// A socket described so far, for the peer check once the whole tree is known.
#[derive(Debug, Clone)]
struct Dumped {
    pid: Pid,
    fd: TargetFd,
    sock_type: u32,
    peer: u32,
    /// A listener's connections waiting to be accepted (their connecting sockets).
    icons: Vec<u32>,
    /// Bound to a name others can connect to.
    named: bool,
}

/// The unix sockets of the tree: the `unix_diag` listing (taken at the first socket) and
/// what was dumped of it.
#[derive(Debug, Default)]
pub struct UnixTable {
    diag: Option<UnixSockets>,
    dumped: HashMap<u32, Dumped>,
    /// One pidfd per process whose sockets are read (`pidfd_open` costs more than the rest).
    pidfds: HashMap<Pid, PidFd>,
}

impl UnixTable {
    /// Takes `listing` as the listing of the tree's sockets, instead of dumping them again
    /// at the first socket described.
    pub fn set_listing(&mut self, listing: UnixSockets) {
        tracing::debug!(sockets = listing.len(), "unix_diag listing");
        self.diag = Some(listing);
    }

    fn diag(&mut self) -> Result<&UnixSockets, UnixError> {
        if self.diag.is_none() {
            let listed = UnixSockets::dump().map_err(UnixError::Diag)?;
            tracing::debug!(sockets = listed.len(), "unix_diag listing");
            self.diag = Some(listed);
        }
        self.diag
            .as_ref()
            .ok_or(UnixError::Diag(sockdiag::SockDiagError::Malformed {
                why: "no listing",
            }))
    }
}

fn dup_err(
    pid: Pid,
    fd: TargetFd,
    ino: u32,
) -> impl FnOnce(tracee::pidfd::PidfdError) -> UnixError {
    move |source| UnixError::Duplicate {
        pid,
        fd,
        ino,
        source,
    }
}

/// Duplicates `fd` of the process behind `pidfd`.
fn duplicate(pidfd: &PidFd, fd: TargetFd, ino: u32) -> Result<OwnedFd, UnixError> {
    pidfd.getfd(fd).map_err(dup_err(pidfd.pid(), fd, ino))
}

/// Whether the socket behind `fd` of `pid` (shown as `target`, `socket:[INO]`) is a unix
/// socket. Linux 6.x shows `scm_fds:` in the fdinfo of unix sockets only, which costs a read
/// of that file; without it, `SO_DOMAIN` is asked of a duplicate.
pub fn is_unix(pid: Pid, fd: TargetFd, target: &str) -> Result<bool, UnixError> {
    let ino = target
        .strip_prefix("socket:[")
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let in_flight = tracee::proc::fd::read_fdinfo(pid, fd)
        .ok()
        .and_then(|info| info.get("scm_fds").map(|v| v.trim().parse::<u64>()));
    if in_flight.is_some() {
        return Ok(true);
    }
    let dup = duplicate(&PidFd::open(pid).map_err(dup_err(pid, fd, ino))?, fd, ino)?;
    let family = rustix::net::sockopt::socket_domain(&dup).map_err(|errno| UnixError::Socket {
        pid,
        fd,
        ino,
        op: "getsockopt(SO_DOMAIN)",
        errno,
    })?;
    Ok(family == rustix::net::AddressFamily::UNIX)
}

/// Describes unix socket `fd` of `pid` (inode `ino`) as file object `id`; its queued data
/// is appended to `queues`. `flags` are its file status flags. Returns the entry, and our
/// copies of the files in flight in its queue, for the caller to describe.
pub fn describe(
    table: &mut UnixTable,
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    ino: u64,
    queues: &mut Vec<SkPacket>,
) -> Result<(FileEntry, Vec<InFlight>), UnixError> {
    let ino = u32::try_from(ino).map_err(|_| UnixError::NotListed {
        pid,
        fd,
        ino: u32::MAX,
    })?;
    let diag = table.diag()?;
    let sk = diag
        .get(ino)
        .ok_or(UnixError::NotListed { pid, fd, ino })?
        .clone();
    let unsupported = |why: String| UnixError::Unsupported { pid, fd, ino, why };
    let sock_type = u32::from(sk.sock_type);
    let state = u32::from(sk.state);
    if !matches!(sock_type, SOCK_STREAM | SOCK_DGRAM | SOCK_SEQPACKET) {
        return Err(unsupported(format!("has type {sock_type}")));
    }
    if !matches!(state, TCP_ESTABLISHED | TCP_CLOSE | TCP_LISTEN) {
        return Err(unsupported(format!("is in state {state}")));
    }
    let (rqlen, wqlen) = sk.rqlen.unwrap_or((0, 0));
    let shutdown = sk.shutdown.unwrap_or(0);
    let peer = match sk.peer.unwrap_or(0) {
        0 if state == TCP_ESTABLISHED && sock_type != SOCK_DGRAM => {
            match diag.listener_of(ino) {
                // Its connection waits in the listener's queue: restore connects again.
                Some(listener) => {
                    if wqlen != 0 {
                        return Err(unsupported(format!(
                            "sent {wqlen} bytes on a connection that is not accepted yet; \
                             they cannot be read back"
                        )));
                    }
                    listener.ino
                }
                // The peer closed: only a fully shut down socket is left, with what it
                // has not read yet.
                None if shutdown == SHUTDOWN_BOTH => 0,
                None => return Err(unsupported("is connected to nothing".into())),
            }
        }
        peer => peer,
    };
    if state == TCP_LISTEN && sk.icons.contains(&0) {
        return Err(unsupported(
            "has a pending connection whose connecting socket is closed".into(),
        ));
    }
    let pidfd = match table.pidfds.entry(pid) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(PidFd::open(pid).map_err(dup_err(pid, fd, ino))?)
        }
    };
    let dup = duplicate(pidfd, fd, ino)?;
    let sock_err = |op: &'static str| {
        move |errno| UnixError::Socket {
            pid,
            fd,
            ino,
            op,
            errno,
        }
    };
    let mut entry = UnixSkEntry {
        id,
        ino,
        r#type: sock_type,
        state,
        flags,
        uflags: 0,
        backlog: wqlen,
        peer,
        fown: FownEntry::default(),
        opts: options(&dup, sk.buffers).map_err(sock_err("getsockopt"))?,
        name: sk.name.clone().unwrap_or_default(),
        shutdown: (shutdown != 0).then_some(i32::from(shutdown)),
        ..UnixSkEntry::default()
    };
    // A connected stream or seqpacket socket comes back as one end of a pair: its name (an
    // accepted socket shows its listener's) is not bound again.
    let rebinds = sock_type == SOCK_DGRAM || state != TCP_ESTABLISHED;
    let mut carried = Vec::new();
    let bound = if rebinds {
        bound_path(&sk, &dup, pid, fd, ino)?
    } else {
        None
    };
    if let Some(bound) = bound {
        entry.file_perms = Some(bound.perms);
        entry.name_dir = bound.name_dir;
        entry.deleted = bound.deleted.then_some(true);
    }
    // A stream's or seqpacket's queue length counts every byte: an empty one needs no
    // peeking. A datagram queue shows only its first datagram's length, which may be 0.
    if state != TCP_LISTEN && (rqlen != 0 || sock_type == SOCK_DGRAM) {
        let before = queues.len();
        peek_queue(&dup, sock_type, id, queues, &mut carried).map_err(|e| match e {
            PeekError::Errno(op, errno) => UnixError::Socket {
                pid,
                fd,
                ino,
                op,
                errno,
            },
            PeekError::Truncated => UnixError::RightsTruncated { pid, fd, ino },
        })?;
        let queued: usize = queues[before..].iter().map(|p| p.bytes.len()).sum();
        // A stream's queue length counts every byte; anything else would mean a packet
        // could not be stepped over (a zero-length datagram stops SO_PEEK_OFF).
        if sock_type != SOCK_DGRAM && u64::try_from(queued).ok() != Some(u64::from(rqlen)) {
            return Err(unsupported(format!(
                "has {rqlen} bytes queued but only {queued} could be read back"
            )));
        }
        tracing::debug!(
            fd = fd.as_raw(),
            ino,
            bytes = queued,
            packets = queues.len() - before,
            in_flight = carried.iter().map(|c| c.fds.len()).sum::<usize>(),
            "unix socket queue"
        );
    }
    table.dumped.insert(
        ino,
        Dumped {
            pid,
            fd,
            sock_type,
            peer,
            icons: sk.icons.clone(),
            named: sk.name.as_ref().is_some_and(|n| !n.is_empty()),
        },
    );
    tracing::debug!(fd = fd.as_raw(), ino, sock_type, state, peer, "unix socket");
    Ok((
        FileEntry {
            r#type: FdTypes::Unixsk as i32,
            id,
            usk: Some(entry),
            ..FileEntry::default()
        },
        carried,
    ))
}

struct Bound {
    perms: FilePermsEntry,
    name_dir: Option<String>,
    deleted: bool,
}

/// The file a socket bound to a path made: its mode and owner, whether it was unlinked,
/// and for a relative name the directory it was bound in.
fn bound_path(
    sk: &UnixSocketDiag,
    dup: &OwnedFd,
    pid: Pid,
    fd: TargetFd,
    ino: u32,
) -> Result<Option<Bound>, UnixError> {
    let Some(name) = sk
        .name
        .as_deref()
        .filter(|n| n.first().is_some_and(|b| *b != 0))
    else {
        return Ok(None);
    };
    // Only a path bound by this socket (not one an accepted socket shares with its
    // listener) is bound again at restore.
    if sk.vfs.is_none() {
        return Ok(None);
    }
    let name = name.split(|b| *b == 0).next().unwrap_or_default();
    let name = String::from_utf8_lossy(name).into_owned();
    let file = sockdiag::bound_file(dup).map_err(|errno| UnixError::Socket {
        pid,
        fd,
        ino,
        op: "open its bound file (SIOCUNIXFILE)",
        errno,
    })?;
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let io_err = |what: &str, e: std::io::Error| UnixError::Unsupported {
        pid,
        fd,
        ino,
        why: format!("bound to {name}: {what}: {e}"),
    };
    let meta = std::fs::metadata(&link).map_err(|e| io_err("stat", e))?;
    let shown = std::fs::read_link(&link).map_err(|e| io_err("readlink", e))?;
    let shown = shown.to_string_lossy();
    let (path, deleted) = match shown.strip_suffix(" (deleted)") {
        Some(p) => (p.to_owned(), true),
        None => (shown.into_owned(), false),
    };
    let name_dir = if name.starts_with('/') {
        None
    } else {
        let dir = path
            .strip_suffix(name.as_str())
            .map(|d| d.strip_suffix('/').unwrap_or(d))
            .filter(|d| !d.is_empty())
            .ok_or_else(|| UnixError::Unsupported {
                pid,
                fd,
                ino,
                why: format!("relative name {name} is not the end of its file's path {path}"),
            })?;
        Some(dir.to_owned())
    };
    Ok(Some(Bound {
        perms: FilePermsEntry {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
        },
        name_dir,
        deleted,
    }))
}

fn micros_of(t: Option<std::time::Duration>) -> (u64, u64) {
    t.map_or((0, 0), |d| (d.as_secs(), u64::from(d.subsec_micros())))
}

/// The socket options CRIU keeps for every socket. Buffer sizes are as `getsockopt` shows
/// them (twice what was set); `buffers` (receive, send), from the unix_diag listing, spares
/// asking for them.
fn options(sock: &OwnedFd, buffers: Option<(u32, u32)>) -> Result<SkOptsEntry, Errno> {
    use rustix::net::sockopt;
    let int = |name| sockdiag::sockopt_int(sock, libc::SOL_SOCKET, name);
    let as_u32 = |v: i32| u32::try_from(v).unwrap_or(0);
    let (so_rcvbuf, so_sndbuf) = match buffers {
        Some(sizes) => sizes,
        None => (
            u32::try_from(sockopt::socket_recv_buffer_size(sock)?).unwrap_or(u32::MAX),
            u32::try_from(sockopt::socket_send_buffer_size(sock)?).unwrap_or(u32::MAX),
        ),
    };
    let (snd_sec, snd_usec) = micros_of(sockopt::socket_timeout(sock, sockopt::Timeout::Send)?);
    let (rcv_sec, rcv_usec) = micros_of(sockopt::socket_timeout(sock, sockopt::Timeout::Recv)?);
    Ok(SkOptsEntry {
        so_sndbuf,
        so_rcvbuf,
        so_snd_tmo_sec: snd_sec,
        so_snd_tmo_usec: snd_usec,
        so_rcv_tmo_sec: rcv_sec,
        so_rcv_tmo_usec: rcv_usec,
        reuseaddr: Some(sockopt::socket_reuseaddr(sock)?),
        so_priority: Some(as_u32(int(libc::SO_PRIORITY)?)),
        so_rcvlowat: Some(as_u32(int(libc::SO_RCVLOWAT)?)),
        so_mark: Some(as_u32(int(libc::SO_MARK)?)),
        so_passcred: Some(sockopt::socket_passcred(sock)?),
        so_passsec: Some(int(libc::SO_PASSSEC)? != 0),
        ..SkOptsEntry::default()
    })
}

enum PeekError {
    Errno(&'static str, Errno),
    /// More fds rode with a packet than our control buffer holds (`MSG_CTRUNC`).
    Truncated,
}

/// Puts `SO_PEEK_OFF` back as the program had it, whatever happens while we peek.
struct PeekOffset<'a> {
    sock: &'a OwnedFd,
    saved: i32,
}

impl Drop for PeekOffset<'_> {
    fn drop(&mut self) {
        if let Err(errno) =
            sockdiag::set_sockopt_int(self.sock, libc::SOL_SOCKET, SO_PEEK_OFF, self.saved)
        {
            tracing::warn!(%errno, saved = self.saved, "could not put SO_PEEK_OFF back");
        }
    }
}

/// Copies the receive queue of `sock` without consuming it: each `MSG_PEEK` starts where the
/// previous one ended (`SO_PEEK_OFF`), one datagram at a time for datagram and seqpacket
/// sockets, the byte stream for a stream socket (one packet, cut after each message that
/// carries fds: the kernel ends a peek there and hands us copies of them, which go to
/// `carried` with the index of their packet in `out`).
fn peek_queue(
    sock: &OwnedFd,
    sock_type: u32,
    id: u32,
    out: &mut Vec<SkPacket>,
    carried: &mut Vec<InFlight>,
) -> Result<(), PeekError> {
    let saved = sockdiag::sockopt_int(sock, libc::SOL_SOCKET, SO_PEEK_OFF)
        .map_err(|e| PeekError::Errno("getsockopt(SO_PEEK_OFF)", e))?;
    sockdiag::set_sockopt_int(sock, libc::SOL_SOCKET, SO_PEEK_OFF, 0)
        .map_err(|e| PeekError::Errno("setsockopt(SO_PEEK_OFF)", e))?;
    let _restore = PeekOffset { sock, saved };
    let stream = sock_type == SOCK_STREAM;
    let mut buf = vec![0u8; FIRST_BUFFER];
    let mut stream_bytes = Vec::new();
    let mut offset: i32 = 0;
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut flags = RecvFlags::PEEK | RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC;
        if !stream {
            flags |= RecvFlags::TRUNC;
        }
        let got = match rustix::net::recvmsg(
            sock.as_fd(),
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            flags,
        ) {
            Ok(got) => got,
            Err(Errno::AGAIN) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(PeekError::Errno("recvmsg(MSG_PEEK)", e)),
        };
        // Peeking installed copies of the files in flight in our table (close-on-exec).
        let mut fds: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(PeekError::Truncated);
        }
        if !stream && got.bytes > buf.len() {
            // Truncated: the peek offset moved past the part we got. Step back, read the
            // whole datagram with a bigger buffer.
            if got.bytes > MAX_DATAGRAM {
                return Err(PeekError::Errno(
                    "datagram larger than 16 MiB",
                    Errno::MSGSIZE,
                ));
            }
            sockdiag::set_sockopt_int(sock, libc::SOL_SOCKET, SO_PEEK_OFF, offset)
                .map_err(|e| PeekError::Errno("setsockopt(SO_PEEK_OFF)", e))?;
            buf.resize(got.bytes, 0);
            continue;
        }
        let data = buf.get(..got.bytes).unwrap_or_default();
        if stream {
            if data.is_empty() {
                // The peer shut its sending side and everything was read.
                break;
            }
            if fds.is_empty() {
                stream_bytes.extend_from_slice(data);
            } else {
                // A peek ends at a message with fds, but glues to it the plain messages
                // right before it (and hands the fds over whatever its length: where
                // that message starts cannot be seen). They become one packet with the
                // fds; the bytes before them, from earlier peeks, stay one without.
                if !stream_bytes.is_empty() {
                    out.push(packet(id, std::mem::take(&mut stream_bytes)));
                }
                carried.push(InFlight {
                    packet: out.len(),
                    fds: std::mem::take(&mut fds),
                });
                out.push(packet(id, data.to_vec()));
            }
        } else {
            if data.is_empty() {
                // A zero-length datagram does not move the peek offset: nothing after it
                // can be reached. The caller compares with the queue length.
                break;
            }
            if !fds.is_empty() {
                carried.push(InFlight {
                    packet: out.len(),
                    fds: std::mem::take(&mut fds),
                });
            }
            out.push(packet(id, data.to_vec()));
        }
        offset = offset.saturating_add(i32::try_from(got.bytes).unwrap_or(i32::MAX));
    }
    if !stream_bytes.is_empty() {
        out.push(packet(id, stream_bytes));
    }
    Ok(())
}

fn packet(id: u32, bytes: Vec<u8>) -> SkPacket {
    SkPacket {
        entry: SkPacketEntry {
            id_for: id,
            length: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            scm: Vec::new(),
        },
        bytes,
    }
}

/// Once every process of the tree was collected: each dumped socket's peer must be a socket
/// of the tree too. With `ext_unix_sk`, a named datagram peer outside the tree is recorded
/// as an external socket instead (its entry is returned, with an id from `fresh_id`), and
/// restore connects to it by name.
pub fn check_peers(
    table: &mut UnixTable,
    mut fresh_id: impl FnMut() -> u32,
    ext_unix_sk: bool,
) -> Result<Vec<FileEntry>, UnixError> {
    let mut external: HashMap<u32, FileEntry> = HashMap::new();
    let mut sockets: Vec<(&u32, &Dumped)> = table.dumped.iter().collect();
    sockets.sort_by_key(|(ino, d)| (d.pid, d.fd.as_raw(), **ino));
    for (&ino, d) in sockets {
        for icon in d.icons.iter().filter(|i| !table.dumped.contains_key(i)) {
            // Its connecting side stays behind: the connection cannot be made again.
            tracing::warn!(pid = %d.pid, fd = d.fd.as_raw(), ino, from = icon,
                "a connection waiting on this listener comes from outside the dumped tree; it is dropped");
        }
        if let Some(p) = table.dumped.get(&d.peer) {
            // Restore reconnects a socket to its peer by name, or makes the two a pair.
            if p.peer != ino && !p.named && d.sock_type == SOCK_DGRAM {
                return Err(UnixError::Unsupported {
                    pid: d.pid,
                    fd: d.fd,
                    ino,
                    why: format!(
                        "is connected to socket:[{}], which has no name and another peer",
                        d.peer
                    ),
                });
            }
            continue;
        }
        if d.peer == 0 || external.contains_key(&d.peer) {
            continue;
        }
        let outside = table.diag.as_ref().and_then(|l| l.get(d.peer));
        let named_dgram = outside.filter(|p| {
            u32::from(p.sock_type) == SOCK_DGRAM && p.name.as_ref().is_some_and(|n| !n.is_empty())
        });
        if let (true, Some(peer)) = (ext_unix_sk, named_dgram) {
            let id = fresh_id();
            tracing::info!(
                ino,
                peer = peer.ino,
                "external unix peer: restore connects to it by name"
            );
            external.insert(
                peer.ino,
                FileEntry {
                    r#type: FdTypes::Unixsk as i32,
                    id,
                    usk: Some(UnixSkEntry {
                        id,
                        ino: peer.ino,
                        r#type: SOCK_DGRAM,
                        state: TCP_LISTEN,
                        uflags: USK_EXTERN,
                        name: peer.name.clone().unwrap_or_default(),
                        ..UnixSkEntry::default()
                    }),
                    ..FileEntry::default()
                },
            );
            continue;
        }
        let holders = sockdiag::holders(d.peer)
            .iter()
            .map(|(pid, fd)| format!("pid {pid} fd {fd}"))
            .collect::<Vec<_>>();
        let holders = if holders.is_empty() {
            "no process (it is not open anywhere we can see)".to_owned()
        } else {
            holders.join(", ")
        };
        let hint = match (d.sock_type, named_dgram.is_some()) {
            (SOCK_DGRAM, true) => {
                "dump that process too, or pass --ext-unix-sk to reconnect by name at restore"
            }
            (SOCK_DGRAM, false) => {
                "dump that process too; --ext-unix-sk needs a peer bound to a name"
            }
            _ => "dump that process too; --ext-unix-sk cannot reconnect a stream connection",
        };
        return Err(UnixError::ExternalPeer {
            pid: d.pid,
            fd: d.fd,
            ino,
            peer: d.peer,
            holders,
            hint,
        });
    }
    let mut entries: Vec<FileEntry> = external.into_values().collect();
    entries.sort_by_key(|e| e.id);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    fn pair(kind: SocketType) -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC, None)
            .expect("socketpair")
    }

    #[test]
    fn peeking_keeps_datagram_boundaries_and_consumes_nothing() {
        let (a, b) = pair(SocketType::DGRAM);
        for d in [&b"one"[..], b"two two", &[7u8; 100_000]] {
            rustix::net::send(&a, d, rustix::net::SendFlags::empty()).expect("send");
        }
        sockdiag::set_sockopt_int(&b, libc::SOL_SOCKET, SO_PEEK_OFF, 5).expect("set");
        let mut out = Vec::new();
        assert!(peek_queue(&b, SOCK_DGRAM, 9, &mut out, &mut Vec::new()).is_ok());
        let sizes: Vec<_> = out.iter().map(|p| p.bytes.len()).collect();
        assert_eq!(sizes, vec![3, 7, 100_000]);
        assert_eq!(out[1].bytes, b"two two");
        assert!(out.iter().all(|p| p.entry.id_for == 9));
        assert_eq!(
            sockdiag::sockopt_int(&b, libc::SOL_SOCKET, SO_PEEK_OFF),
            Ok(5),
            "the program's peek offset is put back"
        );
        sockdiag::set_sockopt_int(&b, libc::SOL_SOCKET, SO_PEEK_OFF, -1).expect("set");
        let mut buf = [0u8; 16];
        let (n, _) = rustix::net::recv(&b, &mut buf, RecvFlags::empty()).expect("recv");
        assert_eq!(&buf[..n], b"one");
    }

    #[test]
    fn peeking_a_stream_gives_every_byte_once() {
        let (a, b) = pair(SocketType::STREAM);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        rustix::net::sockopt::set_socket_send_buffer_size(&a, 1 << 20).expect("sndbuf");
        let mut left = &data[..];
        while !left.is_empty() {
            let n = rustix::net::send(&a, left, rustix::net::SendFlags::DONTWAIT).expect("send");
            left = &left[n..];
        }
        let mut out = Vec::new();
        assert!(peek_queue(&b, SOCK_STREAM, 1, &mut out, &mut Vec::new()).is_ok());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes, data);
        assert_eq!(
            sockdiag::sockopt_int(&b, libc::SOL_SOCKET, SO_PEEK_OFF),
            Ok(-1)
        );
    }

    fn table_with(outside: UnixSocketDiag, peer_type: u32) -> UnixTable {
        let pid = Pid::try_from(1u32).expect("pid");
        let mut table = UnixTable {
            diag: Some(UnixSockets::from_entries([outside.clone()])),
            dumped: HashMap::new(),
            pidfds: HashMap::new(),
        };
        table.dumped.insert(
            10,
            Dumped {
                pid,
                fd: TargetFd(4),
                sock_type: peer_type,
                peer: outside.ino,
                icons: Vec::new(),
                named: false,
            },
        );
        table
    }

    #[test]
    fn outside_peers_need_ext_unix_sk_and_a_named_datagram_socket() {
        let named_dgram = UnixSocketDiag {
            ino: 77,
            sock_type: 2,
            state: 7,
            name: Some(b"/dev/log".to_vec()),
            ..UnixSocketDiag::default()
        };
        let mut ids = 100..;
        let mut next = || ids.next().unwrap_or(0);
        let err = check_peers(
            &mut table_with(named_dgram.clone(), SOCK_DGRAM),
            &mut next,
            false,
        )
        .expect_err("refused without --ext-unix-sk");
        let text = err.to_string();
        assert!(
            text.contains("pid 1: fd 4")
                && text.contains("socket:[77]")
                && text.contains("--ext-unix-sk"),
            "{text}"
        );
        let external = check_peers(
            &mut table_with(named_dgram.clone(), SOCK_DGRAM),
            &mut next,
            true,
        )
        .expect("allowed with --ext-unix-sk");
        let usk = external
            .first()
            .and_then(|f| f.usk.as_ref())
            .expect("an external entry");
        assert_eq!(
            (usk.ino, usk.uflags, usk.state, usk.name.as_slice()),
            (77, USK_EXTERN, TCP_LISTEN, &b"/dev/log"[..])
        );
        let stream = UnixSocketDiag {
            sock_type: 1,
            ..named_dgram
        };
        assert!(check_peers(&mut table_with(stream, SOCK_STREAM), &mut next, true).is_err());
    }

    fn send_with_fds(sock: &OwnedFd, data: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        rustix::net::sendmsg(
            sock,
            &[std::io::IoSlice::new(data)],
            &mut control,
            rustix::net::SendFlags::empty(),
        )
        .expect("sendmsg");
    }

    #[test]
    fn fds_in_flight_come_back_with_their_packet_and_stay_queued() {
        let (a, b) = pair(SocketType::STREAM);
        let (x, _y) = pair(SocketType::STREAM);
        let (r, w) = rustix::pipe::pipe().expect("pipe");
        send_with_fds(&a, b"before", &[]);
        send_with_fds(&a, b"xy", &[x.as_fd(), r.as_fd()]);
        send_with_fds(&a, b"after", &[w.as_fd()]);
        let mut out = Vec::new();
        let mut carried = Vec::new();
        assert!(peek_queue(&b, SOCK_STREAM, 1, &mut out, &mut carried).is_ok());
        let bytes: Vec<&[u8]> = out.iter().map(|p| p.bytes.as_slice()).collect();
        // Plain bytes just before a message with fds cannot be told apart from it.
        assert_eq!(bytes, vec![&b"beforexy"[..], b"after"]);
        let at: Vec<(usize, usize)> = carried.iter().map(|c| (c.packet, c.fds.len())).collect();
        assert_eq!(at, vec![(0, 2), (1, 1)]);
        // Our copies are the very same open files.
        let me = Pid::try_from(std::process::id()).expect("pid");
        let same = |ours: &OwnedFd, theirs: &OwnedFd| {
            let idx = |f: &OwnedFd| u64::try_from(f.as_raw_fd()).unwrap_or(0);
            tracee::pidfd::kcmp(
                me,
                me,
                tracee::pidfd::KcmpType::File,
                idx(ours),
                idx(theirs),
            )
        };
        assert!(matches!(
            same(&carried[0].fds[1], &r),
            Ok(std::cmp::Ordering::Equal)
        ));
        assert!(matches!(
            same(&carried[1].fds[0], &w),
            Ok(std::cmp::Ordering::Equal)
        ));
        // Nothing was consumed: the program still receives the bytes and the fds.
        let mut buf = [0u8; 6];
        let (n, _) = rustix::net::recv(&b, &mut buf, RecvFlags::empty()).expect("recv");
        assert_eq!(&buf[..n], b"before");
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            &b,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("recvmsg");
        assert_eq!(got.bytes, 2);
        let received: usize = control
            .drain()
            .map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => fds.count(),
                _ => 0,
            })
            .sum();
        assert_eq!(received, 2);
    }
}
