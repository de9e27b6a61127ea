//! Listening TCP sockets seen from outside: `NETLINK_SOCK_DIAG` with `inet_diag`, for what
//! no socket option and no `/proc/net/tcp` column tells: the backlog a listener was given
//! (`sk_max_ack_backlog`) beside the connections waiting in its accept queue.
//!
//! Message sequence (one per address family):
//! ```text
//! us -> kernel   nlmsghdr{SOCK_DIAG_BY_FAMILY, REQUEST|DUMP} inet_diag_req_v2{family, TCP, LISTEN}
//! kernel -> us   nlmsghdr{SOCK_DIAG_BY_FAMILY} inet_diag_msg   (once per listener, many per read)
//! kernel -> us   nlmsghdr{NLMSG_DONE}                          (or NLMSG_ERROR)
//! ```
//! For a listener, `inet_diag_msg.idiag_rqueue` is the accept queue's length and
//! `idiag_wqueue` its limit. The answer covers the network namespace of the caller, so
//! [`listeners_of`] asks from inside the target's.
//!
//! References: [sock_diag(7)](https://man7.org/linux/man-pages/man7/sock_diag.7.html).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use crate::ids::Pid;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IPPROTO_TCP: u8 = 6;
const TCP_LISTEN: u32 = 10;
/// `inet_diag_msg`: family, state, timer, retrans, a 48-byte `inet_diag_sockid`, then
/// expires, rqueue, wqueue, uid and inode (u32 each).
const INET_DIAG_MSG_LEN: usize = 4 + 48 + 20;
const RQUEUE_AT: usize = 4 + 48 + 4;
const WQUEUE_AT: usize = RQUEUE_AT + 4;
const INODE_AT: usize = WQUEUE_AT + 8;

#[derive(Debug, thiserror::Error)]
pub enum InetDiagError {
    #[error("inet_diag: {op}")]
    Socket {
        op: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("inet_diag: the kernel answered error {errno}")]
    Kernel { errno: i32 },
    #[error("inet_diag: malformed answer: {why}")]
    Malformed { why: &'static str },
    #[error("inet_diag: pid {pid}: {op}")]
    Namespace {
        pid: Pid,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A listening socket's accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Connections waiting to be accepted.
    pub waiting: u32,
    /// The backlog it listens with.
    pub backlog: u32,
}

/// The dump request for every TCP listener of `family` (`AF_INET` or `AF_INET6`).
fn request(family: u8) -> Vec<u8> {
    let len = NLMSG_HDRLEN + 8 + 48;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.resize(len, 0); // any socket id
    req
}

fn word(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}

/// Adds the listeners of one read of the answer to `out`; true once the answer is complete.
pub fn parse_messages(
    mut buf: &[u8],
    out: &mut HashMap<u64, Listener>,
) -> Result<bool, InetDiagError> {
    let bad = |why| InetDiagError::Malformed { why };
    while buf.len() >= NLMSG_HDRLEN {
        let len = usize::try_from(word(buf, 0).ok_or(bad("header"))?).unwrap_or(usize::MAX);
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(bad("message length"));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = word(body, 0).map_or(0, |e| i32::from_ne_bytes(e.to_ne_bytes()));
                return Err(InetDiagError::Kernel { errno: -errno });
            }
            SOCK_DIAG_BY_FAMILY => {
                if body.len() < INET_DIAG_MSG_LEN {
                    return Err(bad("inet_diag_msg"));
                }
                let listener = Listener {
                    waiting: word(body, RQUEUE_AT).ok_or(bad("rqueue"))?,
                    backlog: word(body, WQUEUE_AT).ok_or(bad("wqueue"))?,
                };
                let inode = word(body, INODE_AT).ok_or(bad("inode"))?;
                out.insert(u64::from(inode), listener);
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    Ok(false)
}

/// Every TCP listener (IPv4 and IPv6) of the network namespace of `pid`, by socket inode.
/// When it is not ours, the question is asked from a short-lived thread that enters it
/// (`setns` moves only the calling thread; needs `CAP_SYS_ADMIN`).
pub fn listeners_of(pid: Pid) -> Result<HashMap<u64, Listener>, InetDiagError> {
    let theirs = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|source| {
        InetDiagError::Namespace {
            pid,
            op: "open its network namespace",
            source,
        }
    })?;
    let same = match (
        theirs.metadata(),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    if same {
        return listeners();
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                rustix::thread::move_into_link_name_space(
                    theirs.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|errno| InetDiagError::Namespace {
                    pid,
                    op: "enter its network namespace",
                    source: errno.into(),
                })?;
                listeners()
            })
            .join()
            .unwrap_or(Err(InetDiagError::Malformed {
                why: "the thread in the other namespace panicked",
            }))
    })
}

/// Every TCP listener (IPv4 and IPv6) of our network namespace, by socket inode.
pub fn listeners() -> Result<HashMap<u64, Listener>, InetDiagError> {
    let mut out = HashMap::new();
    for family in [AddressFamily::INET, AddressFamily::INET6] {
        let sock = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(rustix::net::netlink::SOCK_DIAG),
        )
        .map_err(|errno| InetDiagError::Socket {
            op: "socket(AF_NETLINK)",
            errno,
        })?;
        let family = u8::try_from(family.as_raw()).unwrap_or(0);
        rustix::net::send(&sock, &request(family), SendFlags::empty()).map_err(|errno| {
            InetDiagError::Socket {
                op: "send the request",
                errno,
            }
        })?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (n, _) =
                rustix::net::recv(&sock, &mut buf[..], RecvFlags::empty()).map_err(|errno| {
                    InetDiagError::Socket {
                        op: "read the answer",
                        errno,
                    }
                })?;
            let got = buf.get(..n).ok_or(InetDiagError::Malformed {
                why: "read longer than the buffer",
            })?;
            if n == 0 || parse_messages(got, &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_shows_its_backlog_and_waiting_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let ino = std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&listener)
        ))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("inode");
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let all = listeners().expect("inet_diag");
        // std listens with a backlog of 128.
        assert_eq!(
            all.get(&ino),
            Some(&Listener {
                waiting: 1,
                backlog: 128
            })
        );
    }

    #[test]
    fn another_network_namespace_is_entered_to_ask() {
        if !std::path::Path::new("/usr/bin/unshare").exists()
            && !std::path::Path::new("/bin/unshare").exists()
        {
            eprintln!("skipped: no unshare(1) to make a network namespace");
            return;
        }
        // A listener inside a fresh network namespace, invisible from ours.
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "python3", "-c"])
            .arg(
                "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\n\
                 s.listen(9)\nprint(s.fileno(),flush=True)\ntime.sleep(30)",
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        let read = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        );
        let pid = Pid::try_from(child.id()).expect("pid");
        let ino = std::fs::metadata(format!("/proc/{pid}/fd/{}", line.trim())).map(|m| m.ino());
        let theirs = listeners_of(pid);
        let ours = listeners();
        let _ = child.kill();
        let _ = child.wait();
        let (Ok(_), Ok(ino)) = (read, ino) else {
            eprintln!("skipped: python3 in a new network namespace did not start");
            return;
        };
        assert_eq!(
            theirs
                .expect("inet_diag there")
                .get(&ino)
                .map(|l| l.backlog),
            Some(9)
        );
        assert!(!ours.expect("inet_diag here").contains_key(&ino));
    }

    #[test]
    fn garbage_answers_are_errors() {
        let mut out = HashMap::new();
        assert!(parse_messages(&[0xff; 40], &mut out).is_err());
        let mut short = vec![0u8; 20];
        short[..4].copy_from_slice(&20u32.to_ne_bytes());
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse_messages(&short, &mut out).is_err());
        assert_eq!(parse_messages(&[], &mut out).ok(), Some(false));
    }
}
