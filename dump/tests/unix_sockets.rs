//! Unix sockets, end to end. The workload (`tests/workloads/unix_sockets.c`) holds stream,
//! datagram and seqpacket socketpairs with data queued, a shut down half, listeners on a
//! path and on an abstract name each with a connection waiting to be accepted, and a bound
//! datagram socket with datagrams queued; after restore it checks every byte, every
//! datagram boundary, accepts the pending connections and talks through them. The images
//! are what CRIU writes (`crit decode` reads them). A peer outside the dumped process is
//! refused, naming who holds it, unless `--ext-unix-sk` allows reconnecting a datagram
//! socket by name.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use images_format::pb::{FileEntry, SkPacketEntry};
use images_format::{ImageDir, ImageKind};

mod common;
use common::{assert_ok, check_images_and_crit, Workload};

const SOCK_DGRAM: u32 = 2;
const SOCK_SEQPACKET: u32 = 5;
const TCP_LISTEN: u32 = 10;
const USK_EXTERN: u32 = 1;

fn start(extra: &[String]) -> Workload {
    Workload::start_with("unix_sockets", extra, None)
}

/// Restores the process the dump killed and returns the verdict it wrote after SIGUSR2.
/// `children` were killed by the dump too and are ours to reap (we are their subreaper),
/// before restore can give their pids back.
fn restore_and_check(w: &mut Workload, children: &[u32]) -> String {
    w.reap_killed();
    for child in children {
        let child = nix::unistd::Pid::from_raw(i32::try_from(*child).expect("pid"));
        let _ = nix::sys::wait::waitpid(child, None);
    }
    let restore = w.restore(&[], Stdio::piped());
    w.go();
    w.verdict(restore)
}

/// Processes of ours besides the workload itself (its children, re-parented to us):
/// killed and reaped if a test stops early. Reaping a pid that is gone does nothing.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let Ok(raw) = i32::try_from(*pid) else {
                continue;
            };
            let pid = nix::unistd::Pid::from_raw(raw);
            if nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
                .is_ok_and(|s| s == nix::sys::wait::WaitStatus::StillAlive)
            {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
    }
}

fn unix_entries(images: &Path) -> Vec<images_format::pb::UnixSkEntry> {
    let dir = ImageDir::new(images).expect("images dir");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    files.into_iter().filter_map(|f| f.usk).collect()
}

/// The images hold the sockets as CRIU's entries, and both decoders accept them.
fn check_images(images: &Path, workdir: &Path) {
    let usk = unix_entries(images);
    assert_eq!(usk.len(), 14, "14 sockets: {usk:#?}");
    let srv = format!("{}/srv.sock", workdir.display());
    let path_listener = usk
        .iter()
        .find(|u| u.state == TCP_LISTEN && u.name.starts_with(srv.as_bytes()))
        .expect("the listener on srv.sock");
    assert_eq!(path_listener.backlog, 4);
    assert_eq!(
        path_listener.file_perms.as_ref().map(|p| p.mode & 0o7777),
        Some(0o640)
    );
    let abstract_listener = usk
        .iter()
        .find(|u| u.state == TCP_LISTEN && u.name.first() == Some(&0))
        .expect("the abstract listener");
    // A connection waiting to be accepted names its listener as peer.
    for listener in [path_listener, abstract_listener] {
        assert_eq!(
            usk.iter().filter(|u| u.peer == listener.ino).count(),
            1,
            "one pending connection on {:?}",
            String::from_utf8_lossy(&listener.name)
        );
    }
    let rel = usk
        .iter()
        .find(|u| u.name.starts_with(b"rel.sock"))
        .expect("the socket bound to a relative name");
    assert_eq!(
        rel.name_dir.as_deref().map(Path::new),
        Some(workdir),
        "a relative name keeps its directory"
    );
    assert!(
        usk.iter()
            .any(|u| u.name.ends_with(b"gone.sock\0") && u.deleted == Some(true)),
        "the removed socket file is marked deleted"
    );
    let shut = usk
        .iter()
        .filter(|u| u.r#type == SOCK_SEQPACKET)
        .filter_map(|u| u.shutdown)
        .collect::<Vec<_>>();
    assert_eq!(shut.len(), 2, "both seqpacket ends show the shutdown");

    let dir = ImageDir::new(images).expect("images dir");
    let mut reader = dir
        .open_named(&ImageKind::SkQueues.file_name(0))
        .expect("sk-queues.img");
    let mut packets: Vec<(u32, Vec<u8>)> = Vec::new();
    while let Some(entry) = reader.read_entry::<SkPacketEntry>().expect("entry") {
        let bytes = reader
            .read_payload(u64::from(entry.length))
            .expect("payload");
        packets.push((entry.id_for, bytes));
    }
    let dgram_ids: Vec<u32> = usk
        .iter()
        .filter(|u| u.r#type == SOCK_DGRAM)
        .map(|u| u.id)
        .collect();
    let grams: Vec<&[u8]> = packets
        .iter()
        .filter(|(id, _)| dgram_ids.contains(id))
        .map(|(_, b)| b.as_slice())
        .collect();
    assert_eq!(
        grams,
        vec![&b"a"[..], b"bb", b"ccc", b"first", b"second!", b"rel"],
        "datagrams one entry each, in order"
    );
    let stream_bytes: usize = packets.iter().map(|(_, b)| b.len()).sum::<usize>() - 21;
    assert_eq!(
        stream_bytes,
        1500 + 700 + 4 + 7,
        "stream and seqpacket bytes"
    );

    for (image, text) in check_images_and_crit(images, &["files.img", "sk-queues.img"]) {
        if image == "files.img" {
            assert_eq!(text.matches("\"UNIXSK\"").count(), 14, "{text}");
        }
    }
}

#[test]
fn unix_sockets_survive_dump_and_restore() {
    let mut w = start(&[]);
    let images = w.images();
    assert_ok(&w.dump(&[]), "ckpt-dump");
    check_images(&images, w.dir.path());
    let verdict = restore_and_check(&mut w, &[]);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn leave_running_dump_consumes_no_queued_data() {
    let mut w = start(&[]);
    assert_ok(&w.dump(&["--leave-running"]), "ckpt-dump");
    let verdict = w.verdict_here();
    assert_eq!(verdict.trim(), "PASS", "after the dump: {verdict}");
}

/// A datagram socket connected to a socket of the harness: refused by default, naming the
/// harness as holder; with `--ext-unix-sk` dumped, and the restored process reaches the
/// harness's socket again by its name.
#[test]
fn outside_peer_is_refused_unless_ext_unix_sk() {
    let outside_dir = tempfile::tempdir().expect("tempdir");
    let outside_path = outside_dir.path().join("log.sock");
    let outside = UnixDatagram::bind(&outside_path).expect("bind the outside socket");
    outside
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = start(&[
        "--ext".to_owned(),
        outside_path.to_string_lossy().into_owned(),
    ]);
    let mut buf = [0u8; 64];
    let n = outside.recv(&mut buf).expect("recv before");
    assert_eq!(&buf[..n], b"before");

    let images = w.images();
    let refused = w.dump(&[]);
    assert!(
        !refused.status.success(),
        "a dump with an outside peer must fail"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    let me = std::process::id();
    assert!(
        err.contains(&format!("pid {}", w.pid()))
            && err.contains("outside the dumped tree")
            && err.contains(&format!("held by pid {me}"))
            && err.contains("--ext-unix-sk"),
        "{err}"
    );
    assert!(
        w.child.try_wait().expect("try_wait").is_none(),
        "a refused dump leaves the process running"
    );

    assert_ok(&w.dump(&["--ext-unix-sk"]), "ckpt-dump --ext-unix-sk");
    let usk = unix_entries(&images);
    let ext = usk
        .iter()
        .find(|u| u.uflags & USK_EXTERN != 0)
        .expect("the outside socket as an external entry");
    // The name as the kernel keeps it: std binds with a trailing NUL.
    let name = ext.name.split(|b| *b == 0).next().unwrap_or_default();
    assert_eq!(name, outside_path.as_os_str().as_encoded_bytes());
    let verdict = restore_and_check(&mut w, &[]);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
    let n = outside.recv(&mut buf).expect("recv after restore");
    assert_eq!(&buf[..n], b"after");
}

/// A connection made by a child process waits on its parent's listener at dump time; after
/// restore of the tree the parent accepts it and the child talks through it. The child also
/// shares every socket of its parent (inherited through fork) and reads bytes queued for it
/// on a socketpair between the two.
#[test]
fn pending_connection_from_a_child_is_accepted_after_restore() {
    // The child is re-parented to us when the dump kills its parent: we reap it.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).expect("subreaper");
    let mut w = start(&["--child".to_owned()]);
    let pid = w.pid();
    let children: Vec<u32> = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("children")
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    assert_eq!(children.len(), 1, "one child: {children:?}");
    let _children = KillOnDrop(children.clone());
    let images = w.images();
    assert_ok(&w.dump(&[]), "ckpt-dump of the tree");
    let usk = unix_entries(&images);
    // One entry per socket, even where both processes hold it.
    assert_eq!(
        usk.len(),
        17,
        "14 sockets, the child's connection and a pair: {usk:#?}"
    );
    let verdict = restore_and_check(&mut w, &children);
    assert_eq!(verdict.trim(), "PASS", "restored tree: {verdict}");
}

/// A file descriptor in flight (sent with SCM_RIGHTS, not received yet) is dumped with its
/// packet: the restored process receives the pipe's read end and reads its bytes
/// (`unix_scm.rs` covers fds in flight in depth).
#[test]
fn fds_in_flight_are_restored() {
    let mut w = start(&["--inflight".to_owned()]);
    assert_ok(&w.dump(&[]), "ckpt-dump");
    let verdict = restore_and_check(&mut w, &[]);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}
