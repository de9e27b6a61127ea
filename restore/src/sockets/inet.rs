//! IPv4 and IPv6 sockets from `inet_sk_entry`: UDP sockets (bound, connected) and TCP
//! sockets that were closed or listening, created by ckpt-restore with their options.
//!
//! Order matters, as in CRIU: options that change what `bind` accepts (`IPV6_V6ONLY`,
//! `SO_REUSEPORT`, `SO_BINDTODEVICE`, `IP_FREEBIND`) come first, and `SO_REUSEADDR` is on
//! while binding (the dumped socket's port may still be held by a socket on its way out),
//! then set to its dumped value once the socket is bound and listening or connected. An
//! address that is not on this host (yet: a migrated service's address moves after it) is
//! bound with `IP_FREEBIND` for the time of the `bind`.
//! Datagrams that were queued at dump time are gone (the dump drops them, as CRIU's does).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::OwnedFd;
use std::time::Duration;

use images_format::pb;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const SOL_SOCKET: i32 = 1;
const SO_BUF_LOCK: i32 = 72;
const SO_PRIORITY: i32 = 12;
const SO_RCVLOWAT: i32 = 18;

#[derive(Debug, thiserror::Error)]
pub enum InetError {
    #[error("inet socket {local}: {what}")]
    Step {
        local: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What a socket is to be made into, from its image entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    /// `true` for TCP, `false` for UDP.
    pub stream: bool,
    pub v6: bool,
    /// `TCP_CLOSE`, `TCP_LISTEN`, or (UDP) `TCP_ESTABLISHED` once connected.
    pub state: u32,
    pub local: SocketAddr,
    pub peer: Option<SocketAddr>,
    pub backlog: u32,
    pub v6only: bool,
    pub options: SocketOptions,
}

/// The options saved with the socket; `None` where the image says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketOptions {
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// `SO_BUF_LOCK`: which sizes the program set itself (the kernel tunes the others).
    pub buf_lock: Option<u32>,
    pub priority: Option<u32>,
    pub rcvlowat: Option<u32>,
    pub snd_timeout: Option<Duration>,
    pub rcv_timeout: Option<Duration>,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub broadcast: bool,
    pub keepalive: bool,
    pub oobinline: bool,
    pub passcred: bool,
    pub dontroute: bool,
    pub linger: Option<Duration>,
    pub mark: Option<u32>,
    pub bound_dev: Option<String>,
    pub freebind: bool,
    pub tos: Option<u8>,
    pub ttl: Option<u32>,
    pub tcp_nodelay: Option<bool>,
    pub tcp_cork: Option<bool>,
    pub tcp_keepcnt: Option<u32>,
    pub tcp_keepidle: Option<u32>,
    pub tcp_keepintvl: Option<u32>,
}

/// An address from CRIU's words (the bytes of `in_addr` or `in6_addr` in native words).
fn ip_of(words: &[u32], v6: bool) -> Option<IpAddr> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(octets)))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(octets)))
    }
}

/// The index of interface `name` here (`/sys/class/net/NAME/ifindex`).
fn interface_index(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn timeout(sec: u64, usec: u64) -> Option<Duration> {
    let d = Duration::from_secs(sec) + Duration::from_micros(usec);
    (!d.is_zero()).then_some(d)
}

impl InetSocket {
    /// The socket an entry describes, or `None` for one restore cannot make (another
    /// protocol or state, a malformed address).
    pub fn from_entry(e: &pb::InetSkEntry) -> Option<InetSocket> {
        let v6 = e.family == AF_INET6;
        let stream = match (e.r#type, e.proto) {
            (SOCK_STREAM, IPPROTO_TCP) => true,
            (SOCK_DGRAM, IPPROTO_UDP) => false,
            _ => return None,
        };
        let state_ok = match e.state {
            TCP_CLOSE => true,
            TCP_LISTEN => stream,
            TCP_ESTABLISHED => !stream,
            _ => false,
        };
        if !state_ok {
            return None;
        }
        let port = |p: u32| u16::try_from(p).ok();
        // A link-local IPv6 address is only whole with its interface.
        let scope = match &e.ifname {
            Some(name) if v6 => interface_index(name)?,
            _ => 0,
        };
        let addr = |ip: IpAddr, port: u16| match ip {
            IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)),
            IpAddr::V4(_) => SocketAddr::new(ip, port),
        };
        let local = addr(ip_of(&e.src_addr, v6)?, port(e.src_port)?);
        let peer = if e.state == TCP_ESTABLISHED {
            Some(addr(ip_of(&e.dst_addr, v6)?, port(e.dst_port)?))
        } else {
            None
        };
        let o = &e.opts;
        let ip = e.ip_opts.clone().unwrap_or_default();
        let tcp = e.tcp_opts.unwrap_or_default();
        let options = SocketOptions {
            sndbuf: o.so_sndbuf,
            rcvbuf: o.so_rcvbuf,
            buf_lock: o.so_buf_lock,
            priority: o.so_priority,
            rcvlowat: o.so_rcvlowat,
            snd_timeout: timeout(o.so_snd_tmo_sec, o.so_snd_tmo_usec),
            rcv_timeout: timeout(o.so_rcv_tmo_sec, o.so_rcv_tmo_usec),
            reuseaddr: o.reuseaddr.unwrap_or(false),
            reuseport: o.so_reuseport.unwrap_or(false),
            broadcast: o.so_broadcast.unwrap_or(false),
            keepalive: o.so_keepalive.unwrap_or(false),
            oobinline: o.so_oobinline.is_some_and(|v| v != 0),
            passcred: o.so_passcred.unwrap_or(false),
            dontroute: o.so_dontroute.unwrap_or(false),
            linger: o.so_linger.map(|s| Duration::from_secs(u64::from(s))),
            mark: o.so_mark,
            bound_dev: o.so_bound_dev.clone().filter(|d| !d.is_empty()),
            freebind: ip.freebind.unwrap_or(false),
            tos: ip.tos.and_then(|t| u8::try_from(t).ok()),
            ttl: ip.ttl,
            tcp_nodelay: tcp.nodelay,
            tcp_cork: tcp.cork,
            tcp_keepcnt: tcp.keepcnt,
            tcp_keepidle: tcp.keepidle,
            tcp_keepintvl: tcp.keepintvl,
        };
        Some(InetSocket {
            stream,
            v6,
            state: e.state,
            local,
            peer,
            backlog: e.backlog,
            v6only: e.v6only.unwrap_or(false),
            options,
        })
    }

    fn bound(&self) -> bool {
        self.local.port() != 0 || !self.local.ip().is_unspecified()
    }
}

/// Creates the socket: options, bind, then listen or connect.
pub fn create(sk: &InetSocket) -> Result<OwnedFd, InetError> {
    let local = sk.local;
    let family = if sk.v6 {
        AddressFamily::INET6
    } else {
        AddressFamily::INET
    };
    let kind = if sk.stream {
        SocketType::STREAM
    } else {
        SocketType::DGRAM
    };
    let fd = rustix::net::socket_with(family, kind, SocketFlags::CLOEXEC, None)
        .map_err(step(local, "socket"))?;
    let o = &sk.options;
    if sk.v6 {
        sockopt::set_ipv6_v6only(&fd, sk.v6only).map_err(step(local, "IPV6_V6ONLY"))?;
    }
    set_freebind(&fd, sk.v6, o.freebind).map_err(step(local, "IP_FREEBIND"))?;
    sockopt::set_socket_reuseport(&fd, o.reuseport).map_err(step(local, "SO_REUSEPORT"))?;
    if let Some(dev) = &o.bound_dev {
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::BindToDevice,
            &std::ffi::OsString::from(dev),
        )
        .map_err(step(local, "SO_BINDTODEVICE"))?;
    }
    set_options(&fd, sk).map_err(|(what, errno)| step(local, what)(errno))?;
    if let Some(mark) = o.mark {
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(step(local, "SO_MARK"))?;
    }
    if o.dontroute {
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::DontRoute, &true)
            .map_err(step(local, "SO_DONTROUTE"))?;
    }
    if sk.bound() {
        sockopt::set_socket_reuseaddr(&fd, true)
            .map_err(step(local, "SO_REUSEADDR while binding"))?;
        match rustix::net::bind(&fd, &sk.local) {
            // The address is not (yet) on this host: a migrated service whose address
            // moves over once it runs. Bind anyway, as IP_FREEBIND allows, and take the
            // dumped value back; packets come once the address is here.
            Err(rustix::io::Errno::ADDRNOTAVAIL) if !o.freebind => {
                tracing::warn!(local = %sk.local,
                    "address not on this host: bound with IP_FREEBIND, it serves once the address comes");
                set_freebind(&fd, sk.v6, true).map_err(step(local, "IP_FREEBIND for bind"))?;
                rustix::net::bind(&fd, &sk.local).map_err(step(local, "bind"))?;
                set_freebind(&fd, sk.v6, false).map_err(step(local, "IP_FREEBIND"))?;
            }
            other => other.map_err(step(local, "bind"))?,
        }
    }
    if sk.state == TCP_LISTEN {
        let backlog = i32::try_from(sk.backlog).unwrap_or(i32::MAX);
        rustix::net::listen(&fd, backlog).map_err(step(local, "listen"))?;
    }
    if let Some(peer) = sk.peer {
        rustix::net::connect(&fd, &peer).map_err(step(local, "connect"))?;
    }
    sockopt::set_socket_reuseaddr(&fd, o.reuseaddr).map_err(step(local, "SO_REUSEADDR"))?;
    tracing::debug!(local = %sk.local, peer = ?sk.peer, state = sk.state, "inet socket");
    Ok(fd)
}

/// What a failed `what` on the socket bound to `local` is reported as; the errno is rustix's
/// or nix's, whichever the option's setter uses.
fn step<E: Into<std::io::Error>>(
    local: SocketAddr,
    what: &'static str,
) -> impl FnOnce(E) -> InetError {
    move |errno| InetError::Step {
        local,
        what,
        source: errno.into(),
    }
}

fn set_freebind(fd: &OwnedFd, v6: bool, on: bool) -> rustix::io::Result<()> {
    if v6 {
        sockopt::set_ipv6_freebind(fd, on)
    } else {
        sockopt::set_ip_freebind(fd, on)
    }
}

/// The options that do not change how the socket binds. Buffer sizes are set with the
/// `FORCE` variants (we are privileged) to half the dumped value: the kernel doubles what
/// it is given, and the dump read the doubled value.
fn set_options(fd: &OwnedFd, sk: &InetSocket) -> Result<(), (&'static str, rustix::io::Errno)> {
    let o = &sk.options;
    let e = |what: &'static str| move |errno| (what, errno);
    if o.sndbuf > 0 {
        let size = usize::try_from(o.sndbuf / 2).unwrap_or(usize::MAX);
        sockopt::set_socket_send_buffer_size_force(fd, size)
            .or_else(|_| sockopt::set_socket_send_buffer_size(fd, size))
            .map_err(e("SO_SNDBUF"))?;
    }
    if o.rcvbuf > 0 {
        let size = usize::try_from(o.rcvbuf / 2).unwrap_or(usize::MAX);
        sockopt::set_socket_recv_buffer_size_force(fd, size)
            .or_else(|_| sockopt::set_socket_recv_buffer_size(fd, size))
            .map_err(e("SO_RCVBUF"))?;
    }
    if let Some(lock) = o.buf_lock.and_then(|l| i32::try_from(l).ok()) {
        // Setting a size locked it; the dumped locks say which sizes stay tuned by the kernel.
        tracee::sockdiag::set_sockopt_int(fd, SOL_SOCKET, SO_BUF_LOCK, lock)
            .map_err(e("SO_BUF_LOCK"))?;
    }
    sockopt::set_socket_timeout(fd, Timeout::Send, o.snd_timeout).map_err(e("SO_SNDTIMEO"))?;
    sockopt::set_socket_timeout(fd, Timeout::Recv, o.rcv_timeout).map_err(e("SO_RCVTIMEO"))?;
    sockopt::set_socket_broadcast(fd, o.broadcast).map_err(e("SO_BROADCAST"))?;
    sockopt::set_socket_keepalive(fd, o.keepalive).map_err(e("SO_KEEPALIVE"))?;
    sockopt::set_socket_oobinline(fd, o.oobinline).map_err(e("SO_OOBINLINE"))?;
    // Newer kernels refuse SO_PASSCRED on inet sockets (EOPNOTSUPP) even to clear it.
    if o.passcred {
        sockopt::set_socket_passcred(fd, true).map_err(e("SO_PASSCRED"))?;
    }
    sockopt::set_socket_linger(fd, o.linger).map_err(e("SO_LINGER"))?;
    if !sk.v6 {
        if let Some(tos) = o.tos {
            sockopt::set_ip_tos(fd, tos).map_err(e("IP_TOS"))?;
        }
        if let Some(ttl) = o.ttl {
            sockopt::set_ip_ttl(fd, ttl).map_err(e("IP_TTL"))?;
        }
    }
    if sk.stream {
        if let Some(on) = o.tcp_nodelay {
            sockopt::set_tcp_nodelay(fd, on).map_err(e("TCP_NODELAY"))?;
        }
        if let Some(on) = o.tcp_cork {
            sockopt::set_tcp_cork(fd, on).map_err(e("TCP_CORK"))?;
        }
        if let Some(n) = o.tcp_keepcnt {
            sockopt::set_tcp_keepcnt(fd, n).map_err(e("TCP_KEEPCNT"))?;
        }
        if let Some(s) = o.tcp_keepidle {
            sockopt::set_tcp_keepidle(fd, Duration::from_secs(u64::from(s)))
                .map_err(e("TCP_KEEPIDLE"))?;
        }
        if let Some(s) = o.tcp_keepintvl {
            sockopt::set_tcp_keepintvl(fd, Duration::from_secs(u64::from(s)))
                .map_err(e("TCP_KEEPINTVL"))?;
        }
    }
    // After IP_TOS, which sets the priority too. Only values that differ from what the
    // socket has now: raising the priority above 6 needs CAP_NET_ADMIN, which a restore
    // that does not change it should not need.
    for (name, value, what) in [
        (SO_PRIORITY, o.priority, "SO_PRIORITY"),
        (SO_RCVLOWAT, o.rcvlowat, "SO_RCVLOWAT"),
    ] {
        let Some(v) = value else { continue };
        let v = i32::try_from(v).map_err(|_| (what, rustix::io::Errno::INVAL))?;
        if tracee::sockdiag::sockopt_int(fd, SOL_SOCKET, name).map_err(e(what))? != v {
            tracee::sockdiag::set_sockopt_int(fd, SOL_SOCKET, name, v).map_err(e(what))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_entry(port: u16) -> pb::InetSkEntry {
        pb::InetSkEntry {
            family: 2,
            r#type: SOCK_DGRAM,
            proto: IPPROTO_UDP,
            state: TCP_CLOSE,
            src_port: u32::from(port),
            src_addr: vec![u32::from_ne_bytes([127, 0, 0, 1])],
            opts: pb::SkOptsEntry {
                so_rcvbuf: 65536,
                so_buf_lock: Some(0),
                so_broadcast: Some(true),
                ..pb::SkOptsEntry::default()
            },
            ..pb::InetSkEntry::default()
        }
    }

    #[test]
    fn entries_to_sockets() {
        let sk = InetSocket::from_entry(&udp_entry(5000)).expect("udp");
        assert_eq!(sk.local, "127.0.0.1:5000".parse().expect("addr"));
        assert!(!sk.stream && sk.peer.is_none() && sk.options.broadcast);
        let mut tcp = udp_entry(5000);
        tcp.r#type = SOCK_STREAM;
        assert!(InetSocket::from_entry(&tcp).is_none(), "TCP over UDP");
        tcp.proto = IPPROTO_TCP;
        tcp.state = TCP_ESTABLISHED;
        assert!(
            InetSocket::from_entry(&tcp).is_none(),
            "an established connection"
        );
        tcp.src_addr = vec![1, 2];
        tcp.state = TCP_LISTEN;
        assert!(InetSocket::from_entry(&tcp).is_none(), "a bad address");
    }

    #[test]
    fn a_restored_udp_socket_is_bound_with_its_options() {
        let sk = InetSocket::from_entry(&udp_entry(0)).expect("udp");
        let fd = create(&sk).expect("socket");
        assert!(sockopt::socket_broadcast(&fd).expect("broadcast"));
        assert_eq!(
            sockopt::socket_recv_buffer_size(&fd).expect("rcvbuf"),
            65536
        );
        assert!(!sockopt::socket_reuseaddr(&fd).expect("reuseaddr"));
        let lock = tracee::sockdiag::sockopt_int(&fd, SOL_SOCKET, SO_BUF_LOCK).expect("lock");
        assert_eq!(
            lock, 0,
            "sizes not set by the program stay tuned by the kernel"
        );
    }

    #[test]
    fn an_address_not_on_this_host_is_bound_all_the_same() {
        // 192.0.2.0/24 is TEST-NET-1: never configured here.
        let mut e = udp_entry(0);
        e.src_addr = vec![u32::from_ne_bytes([192, 0, 2, 7])];
        e.src_port = 4242;
        let fd = create(&InetSocket::from_entry(&e).expect("udp")).expect("socket");
        let bound = rustix::net::getsockname(&fd).expect("name");
        assert_eq!(
            SocketAddr::try_from(bound).expect("inet"),
            "192.0.2.7:4242".parse().expect("addr")
        );
        assert!(
            !sockopt::ip_freebind(&fd).expect("freebind"),
            "freebind taken back"
        );
    }

    #[test]
    fn a_link_local_address_gets_its_interface_back() {
        let mut e = udp_entry(0);
        e.family = AF_INET6;
        e.src_addr = addr_words_v6("fe80::1");
        e.ifname = Some("lo".to_owned());
        let sk = InetSocket::from_entry(&e).expect("udp6");
        let SocketAddr::V6(local) = sk.local else {
            panic!("not v6: {:?}", sk.local)
        };
        assert_eq!(Some(local.scope_id()), interface_index("lo"));
        e.ifname = Some("no-such-interface".to_owned());
        assert!(InetSocket::from_entry(&e).is_none());
    }

    fn addr_words_v6(text: &str) -> Vec<u32> {
        let ip: Ipv6Addr = text.parse().expect("ip");
        ip.octets()
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn a_restored_listener_accepts_on_its_port() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let mut e = udp_entry(addr.port());
        e.r#type = SOCK_STREAM;
        e.proto = IPPROTO_TCP;
        e.state = TCP_LISTEN;
        e.backlog = 7;
        e.opts.reuseaddr = Some(true);
        let fd = create(&InetSocket::from_entry(&e).expect("listener")).expect("socket");
        assert!(sockopt::socket_reuseaddr(&fd).expect("reuseaddr"));
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = rustix::net::accept(&fd).map(|a| (a, ())).expect("accept");
        drop((client, accepted));
    }
}
