//! IPv4 and IPv6 sockets: UDP sockets (bound or not, connected or not) and TCP sockets that
//! are closed or listening, as CRIU's `inet_sk_entry` in `files.img`.
//!
//! Everything is read from a `pidfd_getfd` duplicate of the very socket (its addresses and
//! options), from the target's own `/proc/PID/net/{tcp,udp}{,6}` (its state, the accept
//! queue of a listener, queued UDP bytes) and, for a listener's backlog, from `inet_diag`
//! (asked in the target's network namespace), so the socket is never touched.
//!
//! What is not saved, as in CRIU: datagrams queued in a UDP socket are dropped (a restored
//! socket starts empty, which a datagram protocol must tolerate anyway). What is refused: a
//! TCP socket that is connected or connecting (established TCP connections are not supported
//! yet), a listener with connections waiting in its accept queue (those are established
//! connections too), and any other protocol (raw, SCTP, UDP-Lite...).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use images_format::pb::{
    FdTypes, FileEntry, FownEntry, InetSkEntry, IpOptsEntry, SkOptsEntry, TcpOptsEntry,
};
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketType};
use tracee::{Pid, TargetFd};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOL_SOCKET: i32 = 1;
const SO_BUF_LOCK: i32 = 72;
const SO_PRIORITY: i32 = 12;
const SO_RCVLOWAT: i32 = 18;

/// The kernel's TCP states as `/proc/net/tcp` prints them (and as `inet_sk_entry.state`
/// keeps them); a UDP socket shows `ESTABLISHED` (1) once connected and `CLOSE` otherwise.
pub const TCP_CLOSE: u32 = 7;
pub const TCP_LISTEN: u32 = 10;

/// Why an inet socket cannot be dumped.
#[derive(Debug, thiserror::Error)]
pub enum InetError {
    #[error("dump: pid {pid}: fd {fd}: get a copy of the socket")]
    Duplicate {
        pid: Pid,
        fd: TargetFd,
        #[source]
        source: tracee::pidfd::PidfdError,
    },
    #[error("dump: pid {pid}: fd {fd}: read the socket's {what}")]
    Sockopt {
        pid: Pid,
        fd: TargetFd,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "dump: pid {pid}: fd {fd}: socket inode {ino} is not in its network namespace's {table}"
    )]
    NotListed {
        pid: Pid,
        fd: TargetFd,
        ino: u64,
        table: &'static str,
    },
    #[error(
        "dump: pid {pid}: fd {fd} is a TCP connection {local} -> {peer} in state {state}: \
         established TCP connections are not supported yet"
    )]
    Established {
        pid: Pid,
        fd: TargetFd,
        local: SocketAddr,
        peer: SocketAddr,
        state: &'static str,
    },
    #[error(
        "dump: pid {pid}: fd {fd} is a TCP listener on {local} with {waiting} connection(s) \
         waiting to be accepted: established TCP connections are not supported yet"
    )]
    PendingConnections {
        pid: Pid,
        fd: TargetFd,
        local: SocketAddr,
        waiting: u64,
    },
    #[error("dump: pid {pid}: fd {fd}: read the TCP listener's backlog")]
    Diag {
        pid: Pid,
        fd: TargetFd,
        #[source]
        source: tracee::inetdiag::InetDiagError,
    },
    #[error(
        "dump: pid {pid}: fd {fd} is an inet socket of type {kind}, which cannot be dumped yet"
    )]
    Unsupported {
        pid: Pid,
        fd: TargetFd,
        kind: String,
    },
}

/// What `/proc/PID/net/{tcp,udp}{,6}` says about one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetLine {
    pub state: u32,
    pub tx_queue: u64,
    /// For a listener: connections waiting to be accepted; for UDP: bytes queued.
    pub rx_queue: u64,
}

/// Finds the line of socket inode `ino` in the text of a `/proc/net/{tcp,udp}{,6}` table.
pub fn find_line(text: &str, ino: u64) -> Option<NetLine> {
    text.lines().skip(1).find_map(|line| {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        if words.get(9)?.parse::<u64>().ok()? != ino {
            return None;
        }
        let state = u32::from_str_radix(words.get(3)?, 16).ok()?;
        let (tx, rx) = words.get(4)?.split_once(':')?;
        Some(NetLine {
            state,
            tx_queue: u64::from_str_radix(tx, 16).ok()?,
            rx_queue: u64::from_str_radix(rx, 16).ok()?,
        })
    })
}

/// `socket:[INODE]` to the inode.
pub fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn state_name(state: u32) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// A duplicate of the target's socket `fd`.
fn duplicate(pid: Pid, fd: TargetFd) -> Result<OwnedFd, InetError> {
    let pidfd = tracee::pidfd::PidFd::open(pid).map_err(|source| InetError::Duplicate {
        pid,
        fd,
        source,
    })?;
    pidfd
        .getfd(fd)
        .map_err(|source| InetError::Duplicate { pid, fd, source })
}

/// Whether the target's socket `fd` is an IPv4 or IPv6 socket (and so one for this module).
pub fn is_inet(pid: Pid, fd: TargetFd) -> Result<bool, InetError> {
    let dup = duplicate(pid, fd)?;
    let domain = sockopt::socket_domain(&dup).map_err(opt_err(pid, fd, "SO_DOMAIN"))?;
    Ok(domain == AddressFamily::INET || domain == AddressFamily::INET6)
}

fn opt_err(
    pid: Pid,
    fd: TargetFd,
    what: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> InetError {
    move |errno| InetError::Sockopt {
        pid,
        fd,
        what,
        source: errno.into(),
    }
}

/// An address as CRIU keeps it: the bytes of `in_addr` / `in6_addr` as native 32-bit words.
pub fn addr_words(ip: IpAddr) -> Vec<u32> {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn socket_addr(
    pid: Pid,
    fd: TargetFd,
    what: &'static str,
    any: rustix::net::SocketAddrAny,
) -> Result<SocketAddr, InetError> {
    SocketAddr::try_from(any).map_err(|errno| InetError::Sockopt {
        pid,
        fd,
        what,
        source: errno.into(),
    })
}

/// `(sec, usec)` of a socket timeout, zero for none.
fn timeout_parts(t: Option<Duration>) -> (u64, u64) {
    t.map_or((0, 0), |d| (d.as_secs(), u64::from(d.subsec_micros())))
}

/// The socket-level options of `sock`.
fn socket_opts(pid: Pid, fd: TargetFd, sock: &OwnedFd) -> Result<SkOptsEntry, InetError> {
    let e = |what| opt_err(pid, fd, what);
    let sndbuf = sockopt::socket_send_buffer_size(sock).map_err(e("SO_SNDBUF"))?;
    let rcvbuf = sockopt::socket_recv_buffer_size(sock).map_err(e("SO_RCVBUF"))?;
    let (snd_sec, snd_usec) =
        timeout_parts(sockopt::socket_timeout(sock, Timeout::Send).map_err(e("SO_SNDTIMEO"))?);
    let (rcv_sec, rcv_usec) =
        timeout_parts(sockopt::socket_timeout(sock, Timeout::Recv).map_err(e("SO_RCVTIMEO"))?);
    let linger = sockopt::socket_linger(sock).map_err(e("SO_LINGER"))?;
    let nix_err = |what: &'static str| {
        move |errno: nix::errno::Errno| InetError::Sockopt {
            pid,
            fd,
            what,
            source: std::io::Error::from(errno),
        }
    };
    use nix::sys::socket::{getsockopt, sockopt as nixopt};
    let mark = getsockopt(sock, nixopt::Mark).map_err(nix_err("SO_MARK"))?;
    let dontroute = getsockopt(sock, nixopt::DontRoute).map_err(nix_err("SO_DONTROUTE"))?;
    let int_opt = |name: i32, what: &'static str| {
        tracee::sockdiag::sockopt_int(sock, SOL_SOCKET, name)
            .map_err(e(what))
            .map(|v| u32::try_from(v).unwrap_or(0))
    };
    let priority = int_opt(SO_PRIORITY, "SO_PRIORITY")?;
    let rcvlowat = int_opt(SO_RCVLOWAT, "SO_RCVLOWAT")?;
    // Which buffer sizes the program set itself (5.14+; older kernels do not say).
    let buf_lock = tracee::sockdiag::sockopt_int(sock, SOL_SOCKET, SO_BUF_LOCK)
        .ok()
        .and_then(|v| u32::try_from(v).ok());
    let bound_dev = getsockopt(sock, nixopt::BindToDevice)
        .map_err(nix_err("SO_BINDTODEVICE"))?
        .to_string_lossy()
        .into_owned();
    Ok(SkOptsEntry {
        so_sndbuf: u32::try_from(sndbuf).unwrap_or(u32::MAX),
        so_rcvbuf: u32::try_from(rcvbuf).unwrap_or(u32::MAX),
        so_snd_tmo_sec: snd_sec,
        so_snd_tmo_usec: snd_usec,
        so_rcv_tmo_sec: rcv_sec,
        so_rcv_tmo_usec: rcv_usec,
        reuseaddr: Some(sockopt::socket_reuseaddr(sock).map_err(e("SO_REUSEADDR"))?),
        so_reuseport: Some(sockopt::socket_reuseport(sock).map_err(e("SO_REUSEPORT"))?),
        so_broadcast: Some(sockopt::socket_broadcast(sock).map_err(e("SO_BROADCAST"))?),
        so_keepalive: Some(sockopt::socket_keepalive(sock).map_err(e("SO_KEEPALIVE"))?),
        // Newer kernels answer EOPNOTSUPP for SO_PASSCRED on inet sockets: it is off.
        so_passcred: match sockopt::socket_passcred(sock) {
            Ok(on) => Some(on),
            Err(rustix::io::Errno::OPNOTSUPP) => None,
            Err(errno) => return Err(e("SO_PASSCRED")(errno)),
        },
        so_oobinline: Some(u32::from(
            sockopt::socket_oobinline(sock).map_err(e("SO_OOBINLINE"))?,
        )),
        so_linger: linger.map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        so_mark: (mark != 0).then_some(mark),
        so_dontroute: Some(dontroute),
        so_bound_dev: (!bound_dev.is_empty()).then_some(bound_dev),
        so_buf_lock: buf_lock,
        so_priority: Some(priority),
        so_rcvlowat: Some(rcvlowat),
        ..SkOptsEntry::default()
    })
}

/// The IP-level options of `sock`; IPv6 sockets keep their IPv4 options too (they matter
/// for IPv4-mapped traffic), but only those the kernel answers for them.
fn ip_opts(pid: Pid, fd: TargetFd, sock: &OwnedFd, v6: bool) -> Result<IpOptsEntry, InetError> {
    let e = |what| opt_err(pid, fd, what);
    let (freebind, tos, ttl) = if v6 {
        (
            sockopt::ipv6_freebind(sock).map_err(e("IPV6_FREEBIND"))?,
            None,
            None,
        )
    } else {
        (
            sockopt::ip_freebind(sock).map_err(e("IP_FREEBIND"))?,
            Some(u32::from(sockopt::ip_tos(sock).map_err(e("IP_TOS"))?)),
            Some(sockopt::ip_ttl(sock).map_err(e("IP_TTL"))?).filter(|&ttl| {
                // Unset, IP_TTL reads as the system default: saving that would pin it.
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl")
                    .ok()
                    .and_then(|d| d.trim().parse::<u32>().ok())
                    != Some(ttl)
            }),
        )
    };
    Ok(IpOptsEntry {
        freebind: Some(freebind),
        tos,
        ttl,
        ..IpOptsEntry::default()
    })
}

fn tcp_opts(pid: Pid, fd: TargetFd, sock: &OwnedFd) -> Result<TcpOptsEntry, InetError> {
    let e = |what| opt_err(pid, fd, what);
    Ok(TcpOptsEntry {
        cork: Some(sockopt::tcp_cork(sock).map_err(e("TCP_CORK"))?),
        nodelay: Some(sockopt::tcp_nodelay(sock).map_err(e("TCP_NODELAY"))?),
        keepcnt: Some(sockopt::tcp_keepcnt(sock).map_err(e("TCP_KEEPCNT"))?),
        keepidle: Some(
            u32::try_from(
                sockopt::tcp_keepidle(sock)
                    .map_err(e("TCP_KEEPIDLE"))?
                    .as_secs(),
            )
            .unwrap_or(u32::MAX),
        ),
        keepintvl: Some(
            u32::try_from(
                sockopt::tcp_keepintvl(sock)
                    .map_err(e("TCP_KEEPINTVL"))?
                    .as_secs(),
            )
            .unwrap_or(u32::MAX),
        ),
    })
}

/// The name of interface `index` in the target's network namespace, from the interface
/// column of its `/proc/PID/net/if_inet6` (every interface with an IPv6 address is there).
fn interface_name(pid: Pid, fd: TargetFd, index: u32) -> Result<String, InetError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/if_inet6")).map_err(|source| {
        InetError::Sockopt {
            pid,
            fd,
            what: "interfaces in /proc/PID/net/if_inet6",
            source,
        }
    })?;
    find_interface(&text, index).ok_or(InetError::Unsupported {
        pid,
        fd,
        kind: format!("link-local IPv6 on interface index {index}, which has no name here"),
    })
}

/// The interface name of index `index` in the text of `/proc/net/if_inet6`.
pub fn find_interface(text: &str, index: u32) -> Option<String> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let found = u32::from_str_radix(words.get(1)?, 16).ok()?;
        (found == index).then(|| words.get(5).map(|n| (*n).to_owned()))?
    })
}

/// The state line of the socket in the target's own network namespace.
fn net_line(pid: Pid, fd: TargetFd, ino: u64, table: &'static str) -> Result<NetLine, InetError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).map_err(|source| {
        InetError::Sockopt {
            pid,
            fd,
            what: "state in /proc/PID/net",
            source,
        }
    })?;
    find_line(&text, ino).ok_or(InetError::NotListed {
        pid,
        fd,
        ino,
        table,
    })
}

/// The backlog of the listener `ino`, which only sock_diag tells (asked in the target's
/// network namespace).
fn listen_backlog(pid: Pid, fd: TargetFd, ino: u64, local: SocketAddr) -> Result<u32, InetError> {
    let listeners = tracee::inetdiag::listeners_of(pid).map_err(|source| InetError::Diag {
        pid,
        fd,
        source,
    })?;
    let listener = listeners.get(&ino).ok_or(InetError::NotListed {
        pid,
        fd,
        ino,
        table: "inet_diag",
    })?;
    if listener.waiting > 0 {
        return Err(InetError::PendingConnections {
            pid,
            fd,
            local,
            waiting: u64::from(listener.waiting),
        });
    }
    Ok(listener.backlog)
}

/// Describes the target's IPv4 or IPv6 socket `fd` (inode `ino`) as file object `id`.
/// `flags` are its file status flags (`O_NONBLOCK`...).
pub fn entry(
    pid: Pid,
    fd: TargetFd,
    id: u32,
    flags: u32,
    ino: u64,
) -> Result<FileEntry, InetError> {
    let sock = duplicate(pid, fd)?;
    let domain = sockopt::socket_domain(&sock).map_err(opt_err(pid, fd, "SO_DOMAIN"))?;
    let v6 = domain == AddressFamily::INET6;
    let family = if v6 { AF_INET6 } else { AF_INET };
    let kind = sockopt::socket_type(&sock).map_err(opt_err(pid, fd, "SO_TYPE"))?;
    let protocol = sockopt::socket_protocol(&sock)
        .map_err(opt_err(pid, fd, "SO_PROTOCOL"))?
        .map_or(0, |p| p.as_raw().get());
    let (sock_type, table) = match (kind, protocol) {
        (SocketType::DGRAM, IPPROTO_UDP) => (SOCK_DGRAM, if v6 { "udp6" } else { "udp" }),
        (SocketType::STREAM, IPPROTO_TCP) => (SOCK_STREAM, if v6 { "tcp6" } else { "tcp" }),
        _ => {
            return Err(InetError::Unsupported {
                pid,
                fd,
                kind: format!("{kind:?} protocol {protocol}"),
            })
        }
    };
    let local = socket_addr(
        pid,
        fd,
        "local address",
        rustix::net::getsockname(&sock).map_err(opt_err(pid, fd, "local address"))?,
    )?;
    // A socket never bound nor connected is in no table; any other must be.
    let line = match net_line(pid, fd, ino, table) {
        Err(InetError::NotListed { .. }) if local.port() == 0 => NetLine {
            state: TCP_CLOSE,
            tx_queue: 0,
            rx_queue: 0,
        },
        other => other?,
    };
    let peer = match rustix::net::getpeername(&sock) {
        Ok(Some(any)) => Some(socket_addr(pid, fd, "peer address", any)?),
        Ok(None) | Err(rustix::io::Errno::NOTCONN) => None,
        Err(errno) => return Err(opt_err(pid, fd, "peer address")(errno)),
    };
    let mut backlog = 0;
    if sock_type == SOCK_STREAM {
        match line.state {
            TCP_LISTEN if line.rx_queue > 0 => {
                return Err(InetError::PendingConnections {
                    pid,
                    fd,
                    local,
                    waiting: line.rx_queue,
                })
            }
            TCP_LISTEN => backlog = listen_backlog(pid, fd, ino, local)?,
            TCP_CLOSE => {}
            other => {
                return Err(InetError::Established {
                    pid,
                    fd,
                    local,
                    peer: peer.unwrap_or(local),
                    state: state_name(other),
                })
            }
        }
    } else if line.rx_queue > 0 {
        tracing::info!(fd = fd.as_raw(), %local, bytes = line.rx_queue,
            "UDP socket: queued datagrams are dropped, as CRIU does");
    }
    let v6only = if v6 {
        Some(sockopt::ipv6_v6only(&sock).map_err(opt_err(pid, fd, "IPV6_V6ONLY"))?)
    } else {
        None
    };
    // A link-local IPv6 address needs its interface, kept by name (indexes change).
    let ifname = match local {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => Some(interface_name(pid, fd, v6.scope_id())?),
        _ => None,
    };
    let entry = InetSkEntry {
        id,
        ino: ino as u32,
        family,
        r#type: sock_type,
        proto: if sock_type == SOCK_STREAM {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        },
        state: line.state,
        src_port: u32::from(local.port()),
        dst_port: peer.map_or(0, |p| u32::from(p.port())),
        flags,
        backlog,
        src_addr: addr_words(local.ip()),
        dst_addr: peer.map_or_else(Vec::new, |p| addr_words(p.ip())),
        fown: FownEntry::default(),
        opts: socket_opts(pid, fd, &sock)?,
        v6only,
        ip_opts: Some(ip_opts(pid, fd, &sock, v6)?),
        ifname,
        tcp_opts: if sock_type == SOCK_STREAM {
            Some(tcp_opts(pid, fd, &sock)?)
        } else {
            None
        },
        ..InetSkEntry::default()
    };
    tracing::debug!(fd = fd.as_raw(), %local, ?peer, state = state_name(line.state), backlog,
        "inet socket");
    Ok(FileEntry {
        r#type: FdTypes::Inetsk as i32,
        id,
        isk: Some(entry),
        ..FileEntry::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000080:00000002 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1\n";

    #[test]
    fn listener_line_gives_backlog_and_waiting_connections() {
        assert_eq!(
            find_line(TCP, 4242),
            Some(NetLine {
                state: TCP_LISTEN,
                tx_queue: 128,
                rx_queue: 2
            })
        );
        assert_eq!(find_line(TCP, 4243).map(|l| l.state), Some(1));
        assert_eq!(find_line(TCP, 1), None);
        assert_eq!(find_line("garbage\n0: x y", 0), None);
    }

    #[test]
    fn addresses_are_native_words_of_network_bytes() {
        let v4: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(addr_words(v4), vec![u32::from_ne_bytes([127, 0, 0, 1])]);
        let v6: IpAddr = "::1".parse().expect("ip");
        assert_eq!(
            addr_words(v6),
            vec![0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        );
    }

    #[test]
    fn interface_names_by_index() {
        let text = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(find_interface(text, 4).as_deref(), Some("eth0"));
        assert_eq!(find_interface(text, 1).as_deref(), Some("lo"));
        assert_eq!(find_interface(text, 9), None);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[77]"), Some(77));
        assert_eq!(socket_inode("pipe:[77]"), None);
    }
}
