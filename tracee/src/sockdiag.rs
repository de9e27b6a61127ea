//! Unix sockets seen from outside: `NETLINK_SOCK_DIAG` with `unix_diag`, the socket
//! options a dump reads and a restore sets that no safe wrapper offers, and the bound file
//! of a socket (`SIOCUNIXFILE`).
//!
//! One dump request lists every unix socket of the network namespace with its name, the
//! inode of its bound file, its peer, the pending connections of a listener, its queue
//! lengths and its shutdown state; callers then look sockets up by inode, so a dump of
//! many processes with many sockets costs one netlink walk.
//!
//! Message sequence:
//! ```text
//! us -> kernel   nlmsghdr{SOCK_DIAG_BY_FAMILY, REQUEST|DUMP} unix_diag_req{AF_UNIX, all states, show}
//! kernel -> us   nlmsghdr{SOCK_DIAG_BY_FAMILY} unix_diag_msg + nlattrs   (once per socket, many per read)
//! kernel -> us   nlmsghdr{NLMSG_DONE}                                    (or NLMSG_ERROR)
//! ```
//!
//! References: [sock_diag(7)](https://man7.org/linux/man-pages/man7/sock_diag.7.html),
//! [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use crate::ids::{Pid, TargetFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const AF_UNIX: u8 = 1;

const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_ICONS: u32 = 0x8;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UDIAG_SHOW_MEMINFO: u32 = 0x20;

const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_MEMINFO: u16 = 5;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
/// `unix_diag_msg`: family, type, state, pad (u8 each), inode, cookie[2] (u32 each).
const UNIX_DIAG_MSG_LEN: usize = 16;
/// `SIOCPROTOPRIVATE + 0`: opens the file a unix socket is bound to, `O_PATH`.
const SIOCUNIXFILE: libc::c_ulong = 0x89E0;

/// `SO_PEEK_OFF` (unix(7), socket(7)): where the next `MSG_PEEK` starts.
pub const SO_PEEK_OFF: i32 = 42;

/// A sock_diag request failed or answered something we cannot read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SockDiagError {
    #[error("sock_diag: {op}")]
    Socket {
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("sock_diag: the kernel refused the unix_diag dump")]
    Refused {
        #[source]
        errno: Errno,
    },
    #[error("sock_diag: malformed answer: {why}")]
    Malformed { why: &'static str },
}

/// What `unix_diag` says about one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocketDiag {
    /// The socket's inode, as `socket:[INO]` shows it.
    pub ino: u32,
    /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2) or `SOCK_SEQPACKET` (5).
    pub sock_type: u8,
    /// `TCP_ESTABLISHED` (1), `TCP_CLOSE` (7) or `TCP_LISTEN` (10).
    pub state: u8,
    /// Bound name: a path, or an abstract name starting with NUL. `None` if unbound.
    pub name: Option<Vec<u8>>,
    /// Inode and device of the bound file (path names only).
    pub vfs: Option<(u32, u32)>,
    /// The peer's inode (0: its peer is gone).
    pub peer: Option<u32>,
    /// Listeners only: for each connection waiting to be accepted, the inode of the socket
    /// that connected (the waiting socket itself has none yet; 0 if the connecting socket
    /// is closed).
    pub icons: Vec<u32>,
    /// Receive queue (bytes; for a listener: pending connections) and send queue (for a
    /// listener: its backlog).
    pub rqlen: Option<(u32, u32)>,
    /// `RCV_SHUTDOWN` (1) | `SEND_SHUTDOWN` (2).
    pub shutdown: Option<u8>,
    /// The receive and send buffer sizes (`SK_MEMINFO_RCVBUF` and `SK_MEMINFO_SNDBUF`):
    /// what `getsockopt(SO_RCVBUF)` and `SO_SNDBUF` answer, without asking each socket.
    pub buffers: Option<(u32, u32)>,
}

/// Every unix socket of our network namespace, by inode.
#[derive(Debug, Clone, Default)]
pub struct UnixSockets {
    by_ino: HashMap<u32, UnixSocketDiag>,
    /// Connecting socket (whose connection is not accepted yet) to its listener.
    listener_of: HashMap<u32, u32>,
}

impl UnixSockets {
    /// Lists every unix socket with one `SOCK_DIAG_BY_FAMILY` dump.
    pub fn dump() -> Result<UnixSockets, SockDiagError> {
        let sock = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::SOCK_DIAG),
        )
        .map_err(|errno| SockDiagError::Socket {
            op: "socket(AF_NETLINK)",
            errno,
        })?;
        let show = UDIAG_SHOW_NAME
            | UDIAG_SHOW_VFS
            | UDIAG_SHOW_PEER
            | UDIAG_SHOW_ICONS
            | UDIAG_SHOW_RQLEN
            | UDIAG_SHOW_MEMINFO;
        rustix::net::send(&sock, &request(show), SendFlags::empty()).map_err(|errno| {
            SockDiagError::Socket {
                op: "send the unix_diag request",
                errno,
            }
        })?;
        let mut sockets = UnixSockets::default();
        // The kernel fills each read with as many whole messages as fit.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) =
                rustix::net::recv(&sock, &mut buf[..], RecvFlags::empty()).map_err(|errno| {
                    SockDiagError::Socket {
                        op: "read the unix_diag answer",
                        errno,
                    }
                })?;
            let got = buf.get(..n).ok_or(SockDiagError::Malformed {
                why: "read longer than the buffer",
            })?;
            if n == 0 || parse_messages(got, &mut sockets)? {
                break;
            }
        }
        Ok(sockets)
    }

    /// A table from known entries (for tests and for callers that filter).
    pub fn from_entries(entries: impl IntoIterator<Item = UnixSocketDiag>) -> UnixSockets {
        let mut sockets = UnixSockets::default();
        for e in entries {
            sockets.insert(e);
        }
        sockets
    }

    fn insert(&mut self, e: UnixSocketDiag) {
        for icon in &e.icons {
            self.listener_of.insert(*icon, e.ino);
        }
        self.by_ino.insert(e.ino, e);
    }

    /// The socket with inode `ino`.
    pub fn get(&self, ino: u32) -> Option<&UnixSocketDiag> {
        self.by_ino.get(&ino)
    }

    /// The listener whose accept queue holds the connection made by socket `ino`. Such a
    /// socket's peer is the not yet accepted socket, which has no inode (peer 0): only the
    /// listener's list names the connection.
    pub fn listener_of(&self, ino: u32) -> Option<&UnixSocketDiag> {
        self.listener_of.get(&ino).and_then(|l| self.by_ino.get(l))
    }

    /// How many sockets were listed.
    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    /// Whether none were.
    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

/// `nlmsghdr` + `unix_diag_req` asking for every state.
fn request(show: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + 24);
    let len = u32::try_from(NLMSG_HDRLEN + 24).unwrap_or(0);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.push(AF_UNIX);
    msg.push(0); // protocol
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    msg.extend_from_slice(&show.to_ne_bytes());
    msg.extend_from_slice(&[0xff; 8]); // no cookie
    msg
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses one read of the dump into `out`; `true` once `NLMSG_DONE` is seen.
pub fn parse_messages(mut buf: &[u8], out: &mut UnixSockets) -> Result<bool, SockDiagError> {
    let bad = |why| SockDiagError::Malformed { why };
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0).ok_or(bad("header"))? as usize;
        let kind = u16_at(buf, 4).ok_or(bad("header"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("message length out of range"));
        }
        let body = buf.get(NLMSG_HDRLEN..len).ok_or(bad("message body"))?;
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or(bad("error message"))? as i32;
                if code == 0 {
                    return Ok(true);
                }
                return Err(SockDiagError::Refused {
                    errno: Errno::from_raw_os_error(code.saturating_neg()),
                });
            }
            SOCK_DIAG_BY_FAMILY => out.insert(parse_socket(body)?),
            _ => {}
        }
        buf = buf.get(align4(len).min(buf.len())..).unwrap_or_default();
    }
    Ok(false)
}

fn parse_socket(body: &[u8]) -> Result<UnixSocketDiag, SockDiagError> {
    let bad = |why| SockDiagError::Malformed { why };
    let head = body.get(..UNIX_DIAG_MSG_LEN).ok_or(bad("unix_diag_msg"))?;
    let mut sk = UnixSocketDiag {
        sock_type: head[1],
        state: head[2],
        ino: u32_at(head, 4).ok_or(bad("inode"))?,
        ..UnixSocketDiag::default()
    };
    let mut attrs = body.get(UNIX_DIAG_MSG_LEN..).unwrap_or_default();
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0).ok_or(bad("attribute"))?);
        let kind = u16_at(attrs, 2).ok_or(bad("attribute"))? & 0x3fff;
        if len < 4 || len > attrs.len() {
            return Err(bad("attribute length out of range"));
        }
        let data = &attrs[4..len];
        match kind {
            UNIX_DIAG_NAME => sk.name = Some(data.to_vec()),
            UNIX_DIAG_VFS => {
                let ino = u32_at(data, 0).ok_or(bad("vfs"))?;
                let dev = u32_at(data, 4).ok_or(bad("vfs"))?;
                sk.vfs = Some((ino, dev));
            }
            UNIX_DIAG_PEER => sk.peer = Some(u32_at(data, 0).ok_or(bad("peer"))?),
            UNIX_DIAG_ICONS => {
                sk.icons = data
                    .chunks_exact(4)
                    .filter_map(|c| Some(u32::from_ne_bytes(c.try_into().ok()?)))
                    .collect();
            }
            UNIX_DIAG_RQLEN => {
                let r = u32_at(data, 0).ok_or(bad("rqlen"))?;
                let w = u32_at(data, 4).ok_or(bad("rqlen"))?;
                sk.rqlen = Some((r, w));
            }
            UNIX_DIAG_SHUTDOWN => sk.shutdown = data.first().copied(),
            // `sk_meminfo`: u32 values indexed by SK_MEMINFO_*: RCVBUF is 1, SNDBUF 3.
            UNIX_DIAG_MEMINFO => {
                let rcvbuf = u32_at(data, 4).ok_or(bad("meminfo"))?;
                let sndbuf = u32_at(data, 12).ok_or(bad("meminfo"))?;
                sk.buffers = Some((rcvbuf, sndbuf));
            }
            _ => {}
        }
        attrs = attrs
            .get(align4(len).min(attrs.len())..)
            .unwrap_or_default();
    }
    Ok(sk)
}

/// `ioctl(SIOCUNIXFILE)`: an `O_PATH` fd on the file a unix socket is bound to (Linux
/// 4.20+, needs CAP_NET_ADMIN). Its `/proc/self/fd` link gives the absolute path, with
/// ` (deleted)` once unlinked; `fstat` gives its mode and owner.
pub fn bound_file(sock: impl AsFd) -> Result<OwnedFd, Errno> {
    // SAFETY: SIOCUNIXFILE takes no argument and returns a new fd or -1.
    let ret = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), SIOCUNIXFILE) };
    if ret < 0 {
        return Err(last_errno());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::INVAL)
}

/// `getsockopt(level, name)` of an `int` option.
pub fn sockopt_int(sock: impl AsFd, level: i32, name: i32) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: value and len are live locals of the sizes the kernel is told.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if ret < 0 {
        return Err(last_errno());
    }
    Ok(value)
}

/// `setsockopt(level, name)` of an `int` option.
pub fn set_sockopt_int(sock: impl AsFd, level: i32, name: i32, value: i32) -> Result<(), Errno> {
    let value: libc::c_int = value;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: value is a live local of the size the kernel is told.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            len,
        )
    };
    if ret < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// Every `(pid, fd)` of the system whose fd is `socket:[ino]`, found through `/proc/*/fd`:
/// used to name who holds the other end of a connection when it is outside the dump.
pub fn holders(ino: u32) -> Vec<(Pid, TargetFd)> {
    let wanted = format!("socket:[{ino}]");
    crate::proc::fd::holders(|t| (t.as_os_str() == wanted.as_str()).then_some(()))
        .into_iter()
        .map(|(pid, fd, ())| (pid, fd))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino_of(fd: &impl AsRawFd) -> u32 {
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("stat");
        u32::try_from(meta.ino()).expect("socket inodes fit in 32 bits")
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut out = UnixSockets::default();
        // A header claiming more bytes than there are.
        let mut msg = vec![0u8; 16];
        msg[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse_messages(&msg, &mut out).is_err());
        // A socket message too short for unix_diag_msg.
        msg[0..4].copy_from_slice(&18u32.to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&[1, 2]);
        assert!(parse_messages(&msg, &mut out).is_err());
        // An attribute longer than its message.
        let mut body = vec![1u8, 1, 1, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        body.extend_from_slice(&200u16.to_ne_bytes());
        body.extend_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
        assert!(parse_socket(&body).is_err());
        for cut in 0..msg.len() {
            let _ = parse_messages(&msg[..cut], &mut out);
        }
    }

    #[test]
    fn done_and_error_end_the_dump() {
        let mut out = UnixSockets::default();
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(parse_messages(&done, &mut out).expect("done"));
        let mut err = done.clone();
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-13i32).to_ne_bytes());
        assert!(matches!(
            parse_messages(&err, &mut out),
            Err(SockDiagError::Refused {
                errno: Errno::ACCESS
            })
        ));
    }

    #[test]
    fn dump_finds_a_pair_a_listener_and_its_pending_connection() {
        use rustix::net::{SocketAddrUnix, SocketType};
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        rustix::io::write(&a, b"abc").expect("write");
        rustix::net::shutdown(&b, rustix::net::Shutdown::Write).expect("shutdown");
        rustix::net::sockopt::set_socket_send_buffer_size(&a, 50_000).expect("sndbuf");
        rustix::net::sockopt::set_socket_recv_buffer_size(&a, 70_000).expect("rcvbuf");
        let name = format!("ckpt-sockdiag-test-{}", std::process::id());
        let addr = SocketAddrUnix::new_abstract_name(name.as_bytes()).expect("addr");
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        rustix::net::bind(&listener, &addr).expect("bind");
        rustix::net::listen(&listener, 7).expect("listen");
        let client = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        rustix::net::connect(&client, &addr).expect("connect");

        let all = UnixSockets::dump().expect("dump");
        let (ia, ib) = (ino_of(&a), ino_of(&b));
        let sa = all.get(ia).expect("a listed");
        assert_eq!(sa.peer, Some(ib));
        assert_eq!((sa.sock_type, sa.state), (1, 1));
        assert_eq!(sa.shutdown, Some(1), "a cannot receive once b shut writing");
        let (rcvbuf, sndbuf) = sa.buffers.expect("a's buffer sizes");
        assert_eq!(
            (rcvbuf, sndbuf),
            (
                u32::try_from(rustix::net::sockopt::socket_recv_buffer_size(&a).expect("rcv"))
                    .expect("fits"),
                u32::try_from(rustix::net::sockopt::socket_send_buffer_size(&a).expect("snd"))
                    .expect("fits")
            ),
            "what getsockopt answers"
        );
        let sb = all.get(ib).expect("b listed");
        assert_eq!(sb.rqlen.map(|r| r.0), Some(3));
        assert_eq!(sb.shutdown, Some(2));
        let sl = all.get(ino_of(&listener)).expect("listener listed");
        assert_eq!(sl.state, 10);
        assert_eq!(sl.rqlen, Some((1, 7)));
        let mut abstract_name = vec![0u8];
        abstract_name.extend_from_slice(name.as_bytes());
        assert_eq!(sl.name.as_deref(), Some(abstract_name.as_slice()));
        let ic = ino_of(&client);
        let sc = all.get(ic).expect("client listed");
        // Its peer is the not yet accepted socket, which has no inode.
        assert_eq!(sc.peer, Some(0));
        assert_eq!(sl.icons, vec![ic]);
        assert_eq!(all.listener_of(ic).map(|l| l.ino), Some(sl.ino));
        assert!(holders(ia).iter().any(|(p, fd)| p.as_raw()
            == i32::try_from(std::process::id()).unwrap_or(0)
            && fd.as_raw() == a.as_raw_fd()));
    }

    #[test]
    fn peek_offset_round_trips() {
        let (a, _b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        assert_eq!(sockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF), Ok(-1));
        set_sockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF, 0).expect("set");
        assert_eq!(sockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF), Ok(0));
    }
}
