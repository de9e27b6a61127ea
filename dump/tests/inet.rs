//! IPv4 and IPv6 sockets end to end: UDP sockets (bound, connected, IPv6-only) and a TCP
//! listener survive a dump and restore on their ports with their options; the restored UDP
//! socket answers a datagram from its port and the listener accepts a new connection. A
//! listener (and a locked file) inherited by a child stays one socket for both processes. An
//! established TCP connection and a listener with connections waiting are refused, naming
//! the process, the fd and the addresses.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use images_format::pb::FileEntry;
use images_format::{ImageDir, ImageKind};

mod common;
use common::{decodes, Workload};

/// The UDP and TCP ports of the workload, and whether it has its IPv6 socket.
fn ports(w: &Workload) -> (u16, u16, bool) {
    let text = std::fs::read_to_string(w.path("ready")).expect("ready file");
    let mut words = text.split_whitespace();
    let mut port = || -> u16 { words.next().and_then(|p| p.parse().ok()).expect("port") };
    let (udp, tcp) = (port(), port());
    let v6 = text.split_whitespace().nth(2) == Some("v6");
    if !v6 {
        eprintln!("no IPv6 here: the IPv6 socket is left out");
    }
    (udp, tcp, v6)
}

#[test]
fn udp_sockets_and_a_tcp_listener_keep_their_ports_and_serve_after_restore() {
    let mut w = Workload::start("inet_sockets", None);
    let (udp_port, tcp_port, v6) = ports(&w);
    w.dump_and_reap(&[]);

    let images = w.images();
    let dir = ImageDir::new(&images).expect("images");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    let mut sockets: Vec<_> = files
        .iter()
        .filter_map(|f| f.isk.as_ref())
        .map(|s| (s.family, s.r#type, s.state, s.src_port, s.backlog))
        .collect();
    sockets.sort_unstable();
    let udp_client = sockets.iter().find(|s| s.2 == 1).map_or(0, |s| s.3);
    let v6_port = sockets.iter().find(|s| s.0 == 10).map_or(0, |s| s.3);
    assert_eq!(
        sockets,
        {
            let mut expected = vec![
                (2, 2, 7, u32::from(udp_port), 0),
                (2, 2, 1, udp_client, 0),
                (2, 1, 10, u32::from(tcp_port), 5),
                (2, 1, 7, 0, 0),
            ];
            if v6 {
                expected.push((10, 2, 7, v6_port, 0));
            }
            expected.sort_unstable();
            expected
        },
        "(family, type, state, port, backlog) of each socket"
    );
    decodes(&images, "files.img");

    let restore = w.restore(&[], Stdio::null());
    w.go();
    // The restored UDP socket answers from its own port.
    let client = UdpSocket::bind("127.0.0.1:0").expect("udp client");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client
        .send_to(b"ping", ("127.0.0.1", udp_port))
        .expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("answer from the restored socket");
    assert_eq!(&buf[..n], b"pong:ping");
    assert_eq!(from.port(), udp_port, "answered from another port");
    // The restored listener accepts a new connection on its port.
    let mut stream = TcpStream::connect(("127.0.0.1", tcp_port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(b"hello").expect("write");
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).expect("read");
    assert_eq!(&reply, b"world");
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

#[test]
fn a_listener_and_a_lock_shared_by_parent_and_child_stay_shared() {
    let mut w = Workload::start("inet_shared", None);
    let ready = std::fs::read_to_string(w.path("ready")).expect("ready file");
    let mut words = ready.split_whitespace();
    let port: u16 = words.next().and_then(|p| p.parse().ok()).expect("port");
    let child: u32 = words.next().and_then(|p| p.parse().ok()).expect("child");
    w.dump_and_reap(&[]);
    let images = w.images();
    let dir = ImageDir::new(&images).expect("images");
    let files: Vec<FileEntry> = dir.read_all(ImageKind::Files, 0).expect("files.img");
    let listeners = files.iter().filter(|f| f.isk.is_some()).count();
    assert_eq!(listeners, 1, "one socket for both processes: {files:?}");
    // The child was ours to kill but init's to reap: its pid must be free again.
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{child}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "pid {child} stays taken"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let restore = w.restore(&[], Stdio::null());
    w.go();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).expect("read");
    assert_eq!(&reply, b"child", "the child accepts on the shared listener");
    let verdict = w.verdict(restore);
    assert_eq!(verdict.trim(), "PASS", "restored process: {verdict}");
}

/// Starts python3 running `script`, which writes a line into the file `up` of `dir` once
/// set up; returns it and that line. (Its stdout is not a pipe to us: the dump would refuse
/// that pipe first.)
fn python(dir: &std::path::Path, script: &str) -> (Held, String) {
    let up = dir.join("up");
    let held = Held(
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&up)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3"),
    );
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&up).unwrap_or_default();
        if text.ends_with('\n') {
            return (held, text.trim().to_owned());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "python3 never got ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process of ours, killed and reaped when dropped.
struct Held(std::process::Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn refused(pid: u32, dir: &std::path::Path) -> String {
    let out = common::dump_command(pid, &dir.join("images"))
        .output()
        .expect("run ckpt-dump");
    assert!(!out.status.success(), "the dump must refuse");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Closes whatever fds the test harness leaked (cargo's jobserver pipe), and defines `say`,
/// which writes `text` and a newline into the file named by the script's first argument.
const SAY: &str = "import os,sys\nos.closerange(3, 65536)\ndef say(text):\n    open(sys.argv[1] + '.tmp', 'w').write(str(text) + '\\n')\n    import os; os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n";

#[test]
fn established_connections_and_waiting_ones_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (mut held, _) = python(
        dir.path(),
        &format!(
            "{SAY}import socket,time\ns=socket.create_connection(('127.0.0.1',{port}))\n\
             say('up')\ntime.sleep(60)"
        ),
    );
    let (_conn, peer) = listener.accept().expect("accept");
    let err = refused(held.0.id(), dir.path());
    let alive = held.0.try_wait().expect("try_wait").is_none();
    let pid = held.0.id();
    drop(held);
    assert!(
        err.contains(&format!("pid {pid}"))
            && err.contains(&format!("{peer} -> 127.0.0.1:{port}"))
            && err.contains("established TCP connections are not supported yet"),
        "{err}"
    );
    assert!(alive, "a refused dump must leave the process running");

    // A listener with a connection nobody accepted yet.
    let dir = tempfile::tempdir().expect("tempdir");
    let (held, port) = python(
        dir.path(),
        &format!(
            "{SAY}import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(4)\n\
             c=socket.create_connection(s.getsockname())\nsay(s.getsockname()[1])\n\
             time.sleep(60)"
        ),
    );
    let err = refused(held.0.id(), dir.path());
    drop(held);
    assert!(
        err.contains(&format!("TCP listener on 127.0.0.1:{port}"))
            && err.contains("1 connection(s) waiting to be accepted"),
        "{err}"
    );
}
