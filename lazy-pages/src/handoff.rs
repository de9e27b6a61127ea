//! The hand-off of userfaultfds from restore to the lazy-pages daemon, as CRIU does it.
//!
//! The daemon listens on the unix stream socket `lazy-pages.socket` in the work directory;
//! restore connects once and sends, in the order of `pstree.img`:
//!
//! ```text
//! restore                                              lazy-pages daemon
//!   connect(WORK_DIR/lazy-pages.socket)        ---->   accept
//!   per restored task:
//!     i32 pid (the image's pid, host order)    ---->   open pagemap-<pid>.img
//!     1 dummy byte + SCM_RIGHTS { uffd }       ---->   serve its faults from now on
//!   per zombie:
//!     i32 -pid, no fd                          ---->   nothing to serve
//!   once every task is restored, just before they resume:
//!     u32 0x52535446 ("RSTF")                  ---->   start the background transfer
//! ```
//!
//! The pid is the one in the images, not a host pid: under a new pid namespace the two
//! differ, and the daemon never looks pids up in `/proc`. The end marker cannot be taken
//! for a pid: it is larger than any `pid_max`.
//!
//! Our extension, for a restore that keeps watch over the tree: before the end marker it
//! may send the watch marker, and keeps the connection open after the end marker. The
//! daemon then talks back on it with the same framing:
//!
//! ```text
//!   u32 0x48435457 ("WTCH")                    ---->   hand userfaultfds back
//!   u32 0x52535446 ("RSTF")                    ---->
//!                                              <----   per fork of a served process:
//!                                                        i32 image pid + 1 byte + SCM_RIGHTS { uffd }
//!                                              <----   u32 0x52535446: every lazy page is in
//! ```
//!
//! The watcher thus holds a reference to every userfaultfd, also those the kernel creates
//! at fork, which otherwise only the daemon would hold. The connection closing without
//! the final marker means the daemon died: the watcher kills the tree before it closes
//! its references, because a userfaultfd whose last reference closes lets missing pages
//! read as zeroes. A restore that never sends the watch marker (CRIU's) gets nothing back.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The socket's name in the work directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";

/// Sent once after the last task: restore is done and the tasks are about to run.
pub const END_MARKER: u32 = 0x5253_5446;

/// Sent before the end marker by a restore that keeps watch: the daemon hands the
/// userfaultfds of forks back and says when every page is in.
pub const WATCH_MARKER: u32 = 0x4843_5457;

/// How long the rest of a message that has begun may take to arrive.
pub const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The path of the hand-off socket for a work directory.
pub fn socket_path(work_dir: &Path) -> PathBuf {
    work_dir.join(SOCKET_NAME)
}

/// A hand-off step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    #[error("connect to the lazy-pages daemon at {path} (is ckpt-lazy-pages running there?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("accept a connection from restore on {path}")]
    Accept {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: not a valid pid for the hand-off")]
    BadPid { pid: i32 },
    #[error("pid {pid}: send the userfaultfd")]
    SendUffd {
        pid: i32,
        #[source]
        errno: Errno,
    },
    #[error("send {what}")]
    Send {
        what: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("receive {what}")]
    Receive {
        what: &'static str,
        #[source]
        errno: Errno,
    },
    #[error("pid {pid}: the message carries no userfaultfd")]
    NoFd { pid: i32 },
    #[error("restore closed the hand-off socket in the middle of a message ({what})")]
    Truncated { what: &'static str },
}

/// The restore side: one connection to the daemon.
#[derive(Debug)]
pub struct LazyHandoff {
    stream: UnixStream,
}

impl LazyHandoff {
    /// Connects to the daemon listening in `work_dir`.
    pub fn connect(work_dir: &Path) -> Result<LazyHandoff, HandoffError> {
        let path = socket_path(work_dir);
        let stream =
            UnixStream::connect(&path).map_err(|source| HandoffError::Connect { path, source })?;
        Ok(LazyHandoff { stream })
    }

    /// Uses an already connected socket (tests, or a socket inherited from a parent).
    pub fn from_stream(stream: UnixStream) -> LazyHandoff {
        LazyHandoff { stream }
    }

    /// Sends a restored task's userfaultfd: its image pid, then the fd. The caller keeps
    /// its own `uffd`: the daemon gets a new reference to the same file.
    pub fn send_uffd(&mut self, pid: i32, uffd: BorrowedFd<'_>) -> Result<(), HandoffError> {
        send_uffd_on(&self.stream, pid, uffd)
    }

    /// Tells the daemon that the task `pid` of the image is a zombie: it has no memory.
    pub fn send_zombie(&mut self, pid: i32) -> Result<(), HandoffError> {
        if pid <= 0 {
            return Err(HandoffError::BadPid { pid });
        }
        send_all(&self.stream, &(-pid).to_ne_bytes()).map_err(|errno| HandoffError::Send {
            what: "a zombie pid",
            errno,
        })
    }

    /// Asks the daemon to hand back the userfaultfds of forks and to say when every page
    /// is in, after [`LazyHandoff::finish_and_watch`].
    pub fn watch(&mut self) -> Result<(), HandoffError> {
        send_all(&self.stream, &WATCH_MARKER.to_ne_bytes()).map_err(|errno| HandoffError::Send {
            what: "the watch marker",
            errno,
        })
    }

    /// Sends the end marker: every task is restored and about to resume.
    pub fn finish(self) -> Result<(), HandoffError> {
        send_all(&self.stream, &END_MARKER.to_ne_bytes()).map_err(|errno| HandoffError::Send {
            what: "the end marker",
            errno,
        })
    }

    /// Sends the end marker and keeps the connection to hear the daemon (after
    /// [`LazyHandoff::watch`]): [`HandoffMessage::Task`] for each fork's userfaultfd,
    /// [`HandoffMessage::Finished`] once every page is in, `None` if the daemon is gone.
    pub fn finish_and_watch(self) -> Result<HandoffReceiver, HandoffError> {
        send_all(&self.stream, &END_MARKER.to_ne_bytes()).map_err(|errno| HandoffError::Send {
            what: "the end marker",
            errno,
        })?;
        // The daemon may stay quiet for as long as pages move.
        self.stream
            .set_read_timeout(None)
            .map_err(|source| HandoffError::Receive {
                what: "the daemon's answers",
                errno: Errno::from_io_error(&source).unwrap_or(Errno::INVAL),
            })?;
        Ok(HandoffReceiver {
            stream: self.stream,
        })
    }
}

fn send_uffd_on(stream: &UnixStream, pid: i32, uffd: BorrowedFd<'_>) -> Result<(), HandoffError> {
    if pid <= 0 {
        return Err(HandoffError::BadPid { pid });
    }
    send_all(stream, &pid.to_ne_bytes()).map_err(|errno| HandoffError::SendUffd { pid, errno })?;
    let fds = [uffd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(HandoffError::SendUffd {
            pid,
            errno: Errno::NOBUFS,
        });
    }
    let dummy = [0u8; 1];
    let sent = retry_intr(|| {
        sendmsg(
            stream,
            &[IoSlice::new(&dummy)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
    })
    .map_err(|errno| HandoffError::SendUffd { pid, errno })?;
    if sent != 1 {
        return Err(HandoffError::SendUffd {
            pid,
            errno: Errno::PIPE,
        });
    }
    Ok(())
}

fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        let n = retry_intr(|| rustix::net::send(stream, bytes, SendFlags::NOSIGNAL))?;
        if n == 0 {
            return Err(Errno::PIPE);
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

fn retry_intr<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// What restore said.
#[derive(Debug)]
pub enum HandoffMessage {
    /// The userfaultfd of the task with this image pid.
    Task { pid: i32, uffd: OwnedFd },
    /// The task with this image pid is a zombie.
    Zombie { pid: i32 },
    /// Every task is restored (from restore), or every page is in (from the daemon).
    Finished,
    /// Restore keeps watch: hand back fork userfaultfds and say when every page is in.
    Watch,
}

/// The daemon side: the listening socket.
#[derive(Debug)]
pub struct HandoffListener {
    listener: UnixListener,
    path: PathBuf,
}

impl HandoffListener {
    /// Listens on `lazy-pages.socket` in `work_dir`, replacing a stale socket file left by
    /// an earlier run.
    pub fn bind(work_dir: &Path) -> Result<HandoffListener, HandoffError> {
        let path = socket_path(work_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(HandoffError::Bind { path, source }),
        }
        // The socket file appears between bind() and listen(): a client that sees it then
        // is refused. Bind under another name and rename it once it listens.
        let staging = work_dir.join(format!(".{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging).map_err(|source| HandoffError::Bind {
            path: staging.clone(),
            source,
        })?;
        if let Err(source) = std::fs::rename(&staging, &path) {
            let _ = std::fs::remove_file(&staging);
            return Err(HandoffError::Bind { path, source });
        }
        Ok(HandoffListener { listener, path })
    }

    /// Waits for restore to connect.
    pub fn accept(&self) -> Result<HandoffReceiver, HandoffError> {
        let accept_error = |source| HandoffError::Accept {
            path: self.path.clone(),
            source,
        };
        let (stream, _) = self.listener.accept().map_err(accept_error)?;
        // Restore writes each message at once: a message that stops half way means a
        // stuck peer, which must not stall the faults of the tasks already handed over
        // for longer than this.
        stream
            .set_read_timeout(Some(MESSAGE_TIMEOUT))
            .map_err(accept_error)?;
        Ok(HandoffReceiver { stream })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for HandoffListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for HandoffListener {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove the hand-off socket");
        }
    }
}

/// The daemon side of one connection from restore.
#[derive(Debug)]
pub struct HandoffReceiver {
    stream: UnixStream,
}

impl HandoffReceiver {
    /// Uses an already connected socket.
    pub fn from_stream(stream: UnixStream) -> HandoffReceiver {
        HandoffReceiver { stream }
    }

    /// Hands the userfaultfd the kernel made for a fork of the task `pid` back to a
    /// watching restore.
    pub fn send_uffd(&self, pid: i32, uffd: BorrowedFd<'_>) -> Result<(), HandoffError> {
        send_uffd_on(&self.stream, pid, uffd)
    }

    /// Tells a watching restore that every lazy page is in.
    pub fn send_done(&self) -> Result<(), HandoffError> {
        send_all(&self.stream, &END_MARKER.to_ne_bytes()).map_err(|errno| HandoffError::Send {
            what: "the final marker",
            errno,
        })
    }

    /// Reads the next message; `None` when restore closed the connection between messages.
    /// A message that has begun is read to its end (restore writes each one at once).
    pub fn receive(&mut self) -> Result<Option<HandoffMessage>, HandoffError> {
        let mut word = [0u8; 4];
        // Plain reads would drop the fd if they reached its byte: recvmsg only, and never
        // more than the 4 bytes of the word, which the kernel does not merge with the
        // next message's byte when that one carries rights.
        let mut got = 0;
        while got < word.len() {
            let n = self.recv_bytes(&mut word[got..], None, "a pid")?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(HandoffError::Truncated { what: "a pid" });
            }
            got += n;
        }
        match u32::from_ne_bytes(word) {
            END_MARKER => return Ok(Some(HandoffMessage::Finished)),
            WATCH_MARKER => return Ok(Some(HandoffMessage::Watch)),
            _ => {}
        }
        let pid = i32::from_ne_bytes(word);
        if pid < 0 {
            let pid = pid.checked_neg().ok_or(HandoffError::BadPid { pid })?;
            return Ok(Some(HandoffMessage::Zombie { pid }));
        }
        if pid == 0 {
            return Err(HandoffError::BadPid { pid });
        }
        let mut byte = [0u8; 1];
        let mut fd = None;
        let n = self.recv_bytes(&mut byte, Some(&mut fd), "a userfaultfd")?;
        if n == 0 {
            return Err(HandoffError::Truncated {
                what: "a userfaultfd",
            });
        }
        let uffd = fd.ok_or(HandoffError::NoFd { pid })?;
        Ok(Some(HandoffMessage::Task { pid, uffd }))
    }

    fn recv_bytes(
        &self,
        buf: &mut [u8],
        fd: Option<&mut Option<OwnedFd>>,
        what: &'static str,
    ) -> Result<usize, HandoffError> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = retry_intr(|| {
            recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
        })
        .map_err(|errno| HandoffError::Receive { what, errno })?;
        let mut received = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for owned in fds {
                    // More than one fd is not the protocol: keep the first, close the rest.
                    if received.is_none() {
                        received = Some(owned);
                    }
                }
            }
        }
        if let (Some(slot), Some(owned)) = (fd, received) {
            *slot = Some(owned);
        }
        Ok(msg.bytes)
    }
}

impl AsFd for HandoffReceiver {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn pair() -> (LazyHandoff, HandoffReceiver) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (LazyHandoff::from_stream(a), HandoffReceiver::from_stream(b))
    }

    #[test]
    fn tasks_zombies_and_the_end_marker_arrive_in_order() {
        let (mut tx, mut rx) = pair();
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(b"same file").expect("write");
        tx.send_uffd(42, file.as_fd()).expect("send");
        tx.send_zombie(43).expect("zombie");
        tx.send_uffd(44, file.as_fd()).expect("send");
        tx.finish().expect("finish");

        let Some(HandoffMessage::Task { pid: 42, uffd }) = rx.receive().expect("recv") else {
            panic!("expected task 42");
        };
        // It is the very file we sent: same offset, same contents.
        let mut received = std::fs::File::from(uffd);
        received.seek(SeekFrom::Start(0)).expect("seek");
        let mut text = String::new();
        received.read_to_string(&mut text).expect("read");
        assert_eq!(text, "same file");
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Zombie { pid: 43 })
        ));
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Task { pid: 44, .. })
        ));
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Finished)
        ));
        assert!(rx.receive().expect("eof").is_none());
    }

    #[test]
    fn a_watching_restore_hears_forks_and_the_end_back() {
        let (mut tx, mut rx) = pair();
        tx.watch().expect("watch");
        let mut back = tx.finish_and_watch().expect("finish");
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Watch)
        ));
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Finished)
        ));
        let file = tempfile::tempfile().expect("tempfile");
        rx.send_uffd(42, file.as_fd()).expect("hand back");
        rx.send_done().expect("done");
        assert!(matches!(
            back.receive().expect("recv"),
            Some(HandoffMessage::Task { pid: 42, .. })
        ));
        assert!(matches!(
            back.receive().expect("recv"),
            Some(HandoffMessage::Finished)
        ));
        drop(rx);
        assert!(back.receive().expect("eof").is_none());
    }

    #[test]
    fn the_wire_bytes_are_criu_s() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let mut tx = LazyHandoff::from_stream(a);
        tx.send_zombie(7).expect("zombie");
        tx.finish().expect("finish");
        let mut bytes = Vec::new();
        b.read_to_end(&mut bytes).expect("read");
        let mut expected = (-7i32).to_ne_bytes().to_vec();
        expected.extend_from_slice(&0x5253_5446u32.to_ne_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_pid_without_its_fd_is_an_error() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut rx = HandoffReceiver::from_stream(b);
        a.write_all(&5i32.to_ne_bytes()).expect("write");
        a.write_all(&[0]).expect("write");
        assert!(matches!(rx.receive(), Err(HandoffError::NoFd { pid: 5 })));
        drop(a);
        assert!(rx.receive().expect("eof").is_none());
    }

    #[test]
    fn a_cut_message_is_an_error() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut rx = HandoffReceiver::from_stream(b);
        a.write_all(&[1, 0]).expect("write");
        drop(a);
        assert!(matches!(rx.receive(), Err(HandoffError::Truncated { .. })));
    }

    #[test]
    fn bad_pids_are_refused_before_sending() {
        let (mut tx, _rx) = pair();
        let file = tempfile::tempfile().expect("tempfile");
        assert!(matches!(
            tx.send_uffd(0, file.as_fd()),
            Err(HandoffError::BadPid { pid: 0 })
        ));
        assert!(matches!(
            tx.send_zombie(-3),
            Err(HandoffError::BadPid { pid: -3 })
        ));
    }

    #[test]
    fn listener_binds_in_the_work_dir_and_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = HandoffListener::bind(dir.path()).expect("bind");
        assert!(dir.path().join(SOCKET_NAME).exists());
        let work = dir.path().to_owned();
        let client = std::thread::spawn(move || {
            let mut tx = LazyHandoff::connect(&work).expect("connect");
            tx.send_zombie(9).expect("zombie");
            tx.finish().expect("finish");
        });
        let mut rx = listener.accept().expect("accept");
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Zombie { pid: 9 })
        ));
        assert!(matches!(
            rx.receive().expect("recv"),
            Some(HandoffMessage::Finished)
        ));
        client.join().expect("client");
        drop(listener);
        assert!(!dir.path().join(SOCKET_NAME).exists());
    }
}
