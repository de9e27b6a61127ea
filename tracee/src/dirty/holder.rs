//! The holder: a small process that keeps dirty tracking alive between
//! separate `ckpt-dump` runs.
//!
//! Closing the last reference to a tracking userfaultfd unregisters it, and
//! the page-hash table lives in memory, so something must outlive each dump
//! run. The first run that commits forks a holder (double fork and `setsid`,
//! stdio on `/dev/null`, every other fd closed) that inherits the userfaultfd
//! and the tracker state, and listens on a unix socket named after the
//! target's pid and start time (so a reused pid never finds it):
//! `<dir>/track-<pid>-<starttime>.sock`, the directory mode 0700, the socket 0600.
//!
//! Protocol (each frame: tag `u8`, length `u64` LE, payload; one client at a time):
//!
//! ```text
//! dumper                         holder
//!   GET            ───────────▶
//!                  ◀───────────  STATE(holder pid, state) + SCM_RIGHTS(uffd)
//!                                 or LOST(reason): a client took the state
//!                                 and went away without PUT
//!   ... collect, dump pages ...
//!   PUT(state)     ───────────▶  (keeps it for the next round)
//!                  ◀───────────  OK
//!   RELEASE        ───────────▶  unregisters everything, exits
//!                  ◀───────────  OK
//! ```
//!
//! The holder exits when the target exits (its pidfd polls readable), when
//! released, or after an idle timeout; each time it unregisters what it
//! tracked and removes its socket. A connection that closes after GET but
//! before PUT leaves the holder in the lost state: the pages of that round
//! were re-protected but maybe never written, so the next round must be full.
#![allow(unsafe_code)]

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::state::{DecodeError, TrackState};
use super::LostReason;
use crate::ids::{Pid, RemoteAddr};
use crate::uffd::Userfaultfd;
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

const GET: u8 = 1;
const PUT: u8 = 2;
const RELEASE: u8 = 3;
const STATE: u8 = 0x10;
const OK: u8 = 0x11;
const LOST: u8 = 0x12;
/// A state larger than this is not one we wrote (1 GiB of hashes covers 512 GiB).
const MAX_FRAME: u64 = 1 << 30;
/// How long a dumper waits for a holder's answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where holders listen and how long they wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderOptions {
    /// The directory of the sockets (created 0700).
    pub dir: PathBuf,
    /// A holder nobody talks to for this long releases tracking and exits.
    pub idle_timeout: Duration,
}

impl Default for HolderOptions {
    fn default() -> HolderOptions {
        HolderOptions {
            dir: PathBuf::from("/run/ckpt"),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// The socket of the holder of `pid` started at `start_time` (clock ticks after boot).
pub fn socket_path(dir: &Path, pid: Pid, start_time: u64) -> PathBuf {
    dir.join(format!("track-{pid}-{start_time}.sock"))
}

/// Talking to a holder, or starting one, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HolderError {
    /// Creating the socket directory or socket.
    #[error("create the socket")]
    Socket(#[source] std::io::Error),
    /// Connecting to a holder that exists.
    #[error("connect")]
    Connect(#[source] std::io::Error),
    /// Sending or receiving.
    #[error("exchange with the holder")]
    Io(#[source] std::io::Error),
    /// An answer out of protocol.
    #[error("unexpected answer: {what}")]
    Protocol { what: &'static str },
    /// The state the holder kept does not decode.
    #[error("kept state")]
    Decode(#[source] DecodeError),
    /// Opening the target's pidfd, which the holder polls for its exit.
    #[error("open the target's pidfd")]
    Pidfd(#[source] crate::pidfd::PidfdError),
    /// Forking the holder.
    #[error("fork the holder")]
    Fork(#[source] Errno),
}

/// What a holder answered to GET.
pub(crate) enum GetReply {
    State {
        holder: Option<Pid>,
        state: Vec<u8>,
        uffd: Option<OwnedFd>,
    },
    Lost(LostReason),
}

fn lost_code(r: LostReason) -> u8 {
    match r {
        LostReason::NoHolder => 1,
        LostReason::PidReused => 2,
        LostReason::Exec => 3,
        LostReason::Interrupted => 4,
        LostReason::UffdDead => 5,
    }
}

fn lost_from(code: u8) -> LostReason {
    match code {
        2 => LostReason::PidReused,
        3 => LostReason::Exec,
        4 => LostReason::Interrupted,
        5 => LostReason::UffdDead,
        _ => LostReason::NoHolder,
    }
}

fn header(tag: u8, len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = tag;
    h[1..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn write_frame(s: &mut UnixStream, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&header(tag, payload.len()))?;
    s.write_all(payload)
}

/// Reads a frame; the fds that came with its first bytes are returned too.
fn read_frame(s: &mut UnixStream) -> std::io::Result<(u8, Vec<u8>, Vec<OwnedFd>)> {
    let mut h = [0u8; 9];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &*s,
        &mut [IoSliceMut::new(&mut h)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?
    .bytes;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    s.read_exact(&mut h[got..])?;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&h[1..]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too long",
        ));
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    s.read_exact(&mut payload)?;
    Ok((h[0], payload, fds))
}

/// A connection to a holder, held for one round.
#[derive(Debug)]
pub(crate) struct Lease {
    stream: UnixStream,
}

impl Lease {
    /// Connects; `None` if no holder listens at `path`.
    pub(crate) fn connect(path: &Path) -> Result<Option<Lease>, HolderError> {
        match UnixStream::connect(path) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(CLIENT_TIMEOUT))
                    .map_err(HolderError::Io)?;
                Ok(Some(Lease { stream }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(HolderError::Connect(e)),
        }
    }

    pub(crate) fn get(&mut self) -> Result<GetReply, HolderError> {
        write_frame(&mut self.stream, GET, &[]).map_err(HolderError::Io)?;
        let (tag, payload, mut fds) = read_frame(&mut self.stream).map_err(HolderError::Io)?;
        match tag {
            STATE => {
                if payload.len() < 5 {
                    return Err(HolderError::Protocol {
                        what: "short STATE",
                    });
                }
                let mut p = [0u8; 4];
                p.copy_from_slice(&payload[..4]);
                let has_fd = payload[4] != 0;
                let uffd = if has_fd {
                    Some(fds.pop().ok_or(HolderError::Protocol {
                        what: "STATE without its userfaultfd",
                    })?)
                } else {
                    None
                };
                Ok(GetReply::State {
                    holder: Pid::from_raw(i32::from_le_bytes(p)),
                    state: payload[5..].to_vec(),
                    uffd,
                })
            }
            LOST => Ok(GetReply::Lost(lost_from(
                payload.first().copied().unwrap_or(0),
            ))),
            _ => Err(HolderError::Protocol {
                what: "not STATE or LOST",
            }),
        }
    }

    fn expect_ok(&mut self, tag: u8, payload: &[u8]) -> Result<(), HolderError> {
        write_frame(&mut self.stream, tag, payload).map_err(HolderError::Io)?;
        match read_frame(&mut self.stream).map_err(HolderError::Io)? {
            (OK, _, _) => Ok(()),
            _ => Err(HolderError::Protocol { what: "not OK" }),
        }
    }

    pub(crate) fn put(&mut self, state: &[u8]) -> Result<(), HolderError> {
        self.expect_ok(PUT, state)
    }

    pub(crate) fn release(&mut self) -> Result<(), HolderError> {
        self.expect_ok(RELEASE, &[])
    }
}

/// Tells the holder at `path`, if any, to release tracking and exit.
pub(crate) fn release_at(path: &Path) -> Result<bool, HolderError> {
    match Lease::connect(path)? {
        Some(mut lease) => lease.release().map(|()| true),
        None => {
            // A holder that was killed leaves its socket behind.
            let _ = std::fs::remove_file(path);
            Ok(false)
        }
    }
}

/// Forks a holder for `pid` that keeps `state` and `uffd`; returns its pid
/// once it listens.
pub(crate) fn spawn(
    path: &Path,
    opts: &HolderOptions,
    pid: Pid,
    state: Vec<u8>,
    uffd: Option<&OwnedFd>,
) -> Result<Pid, HolderError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&opts.dir)
        .map_err(HolderError::Socket)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(HolderError::Socket)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(HolderError::Socket)?;
    let pidfd = crate::pidfd::PidFd::open(pid).map_err(HolderError::Pidfd)?;
    let (ready_r, ready_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(HolderError::Fork)?;
    let keep = [
        listener.as_raw_fd(),
        pidfd.as_fd().as_raw_fd(),
        ready_w.as_raw_fd(),
        uffd.map_or(-1, |u| u.as_raw_fd()),
    ];
    // SAFETY: the child (and its child) only run this module's code: they
    // close the fds they do not keep, never return into the caller's frames,
    // and leave with `_exit`. glibc makes malloc usable after fork; no other
    // lock of ours is taken in the child.
    let first = unsafe { libc::fork() };
    if first < 0 {
        return Err(HolderError::Fork(crate::wait::last_errno()));
    }
    if first == 0 {
        let _ = rustix::process::setsid();
        // SAFETY: as above; the intermediate child only exits.
        let second = unsafe { libc::fork() };
        if second != 0 {
            // SAFETY: `_exit` skips atexit handlers and destructors, which
            // belong to the parent's state.
            unsafe { libc::_exit(0) };
        }
        detach_stdio_and_close_others(&keep);
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let _ = rustix::io::write(&ready_w, &me.to_le_bytes());
        drop(ready_w);
        let uffd = uffd.map(|u| Userfaultfd::from_fd(u.try_clone().unwrap_or_else(|_| exit_now())));
        serve(listener, pidfd, uffd, state, opts.idle_timeout, path);
        exit_now();
    }
    drop(ready_w);
    let mut status = 0;
    // SAFETY: reaping our own intermediate child; `status` is a live local.
    unsafe { libc::waitpid(first, &mut status, 0) };
    let mut buf = [0u8; 4];
    let n = rustix::io::read(&ready_r, &mut buf).map_err(HolderError::Fork)?;
    if n != 4 {
        return Err(HolderError::Fork(Errno::CHILD));
    }
    Pid::from_raw(i32::from_le_bytes(buf)).ok_or(HolderError::Fork(Errno::CHILD))
}

fn exit_now() -> ! {
    // SAFETY: `_exit` ends the holder without running the forked-from
    // process's destructors.
    unsafe { libc::_exit(0) }
}

fn detach_stdio_and_close_others(keep: &[i32]) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: the fd belongs to objects of the process we forked from,
            // which this process never uses or drops (it leaves by `_exit`).
            unsafe { libc::close(fd) };
        }
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for target in 0..3 {
            // SAFETY: dup2 onto the standard fds, which nothing here uses.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

/// The holder's loop; returns when it should exit.
fn serve(
    listener: UnixListener,
    pidfd: crate::pidfd::PidFd,
    uffd: Option<Userfaultfd>,
    mut state: Vec<u8>,
    idle: Duration,
    path: &Path,
) {
    let _ = rustix::thread::set_name(c"ckpt-track");
    let mut lost: Option<LostReason> = None;
    let timeout = rustix::time::Timespec {
        tv_sec: i64::try_from(idle.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(idle.subsec_nanos()),
    };
    loop {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(&pidfd, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => break,
        }
        if !fds[1].revents().is_empty() {
            break;
        }
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(idle));
        if serve_one(&mut conn, uffd.as_ref(), &mut state, &mut lost) {
            // Gone from the file system first, so that nobody connects to a
            // holder that is about to exit; answer once nothing is tracked.
            let _ = std::fs::remove_file(path);
            if let Some(uffd) = &uffd {
                unregister_all(uffd, &state);
            }
            let _ = write_frame(&mut conn, OK, &[]);
            return;
        }
    }
    let _ = std::fs::remove_file(path);
    if let Some(uffd) = &uffd {
        unregister_all(uffd, &state);
    }
}

/// Serves one client; `true` if it asked for release (not answered yet).
fn serve_one(
    conn: &mut UnixStream,
    uffd: Option<&Userfaultfd>,
    state: &mut Vec<u8>,
    lost: &mut Option<LostReason>,
) -> bool {
    let mut checked_out = false;
    loop {
        let Ok((tag, payload, _)) = read_frame(conn) else {
            if checked_out {
                *lost = Some(LostReason::Interrupted);
            }
            return false;
        };
        let sent = match tag {
            GET => match *lost {
                Some(r) => write_frame(conn, LOST, &[lost_code(r)]),
                None => {
                    checked_out = true;
                    send_state(conn, uffd, state)
                }
            },
            PUT => {
                *state = payload;
                *lost = None;
                checked_out = false;
                write_frame(conn, OK, &[])
            }
            RELEASE => return true,
            _ => return false,
        };
        if sent.is_err() {
            if checked_out {
                *lost = Some(LostReason::Interrupted);
            }
            return false;
        }
    }
}

fn send_state(
    conn: &mut UnixStream,
    uffd: Option<&Userfaultfd>,
    state: &[u8],
) -> std::io::Result<()> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let mut first = header(STATE, state.len() + 5).to_vec();
    first.extend_from_slice(&me.to_le_bytes());
    first.push(u8::from(uffd.is_some()));
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(u) = uffd {
        fds = [u.as_fd()];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let mut sent = rustix::net::sendmsg(
        &*conn,
        &[IoSlice::new(&first)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    if sent == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    while sent < first.len() {
        sent += conn.write(&first[sent..])?;
    }
    conn.write_all(state)
}

/// Unregisters every VMA the state tracks (errors ignored: VMAs may be gone).
pub(crate) fn unregister_all(uffd: &Userfaultfd, state: &[u8]) {
    if let Ok(s) = TrackState::decode(state) {
        for v in s.vmas.iter().filter(|v| v.tracked) {
            let len = v.key.end.get().saturating_sub(v.key.start.get());
            let _ = uffd.unregister(RemoteAddr(v.key.start.get()), len);
        }
    }
}
