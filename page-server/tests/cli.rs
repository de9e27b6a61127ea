//! `ckpt-page-server` as scripts run it.

use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_page_server::{PageFlags, PageServerClient, PagemapId};
use images_format::{ImageDir, ImageKind, PagesReader};

const BIN: &str = env!("CARGO_BIN_EXE_ckpt-page-server");

/// A port nobody listened on a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the server if a test fails before it exits.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the server with `--status-fd 1` and waits for its zero byte.
fn start(dir: &Path, port: u16, extra: &[&str]) -> Server {
    let child = Command::new(BIN)
        .args(["-D".as_ref(), dir.as_os_str()])
        .args(["--address", "127.0.0.1", "--port", &port.to_string()])
        .args(["--status-fd", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let mut ready = [0xffu8; 1];
    server
        .0
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    assert_eq!(ready, [0]);
    server
}

fn finish(mut server: Server) -> (i32, String) {
    let mut stderr = String::new();
    server
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = server.0.wait().unwrap();
    (status.code().unwrap_or(-1), stderr)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_full_session_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    let port = free_port();
    let server = start(&dir, port, &["-v0"]);
    let mut client = PageServerClient::connect(addr(port)).unwrap();
    let mut pm = client.open(PagemapId::process(31)).unwrap();
    let data = vec![0x31u8; 3 * 4096];
    pm.add_pages(0x40_0000, PageFlags::PRESENT, &[IoSlice::new(&data)])
        .unwrap();
    pm.finish();
    client.close().unwrap();
    let (code, stderr) = finish(server);
    assert_eq!(code, 0, "{stderr}");
    let images = ImageDir::new(&dir).unwrap();
    let reader = PagesReader::open(&images, ImageKind::Pagemap, 31).unwrap();
    let mut buf = vec![0u8; 3 * 4096];
    reader.read_pages(0x40_0000, &mut buf).unwrap();
    assert_eq!(buf, data);
}

#[test]
fn a_cut_connection_is_reported_and_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    let port = free_port();
    let server = start(&dir, port, &[]);
    {
        let mut client = PageServerClient::connect(addr(port)).unwrap();
        let mut pm = client.open(PagemapId::process(9)).unwrap();
        let page = vec![1u8; 4096];
        pm.add_pages(0x1000, PageFlags::PRESENT, &[IoSlice::new(&page)])
            .unwrap();
        pm.finish();
        // The dumper dies here: no CLOSE.
    }
    let (code, stderr) = finish(server);
    assert_ne!(code, 0);
    assert!(stderr.contains("without CLOSE"), "{stderr}");
    assert!(stderr.contains("pagemap-9.img"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_stray_byte_mid_frame_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    let port = free_port();
    let server = start(&dir, port, &[]);
    TcpStream::connect(addr(port))
        .unwrap()
        .write_all(&[4, 0, 0])
        .unwrap();
    let (code, stderr) = finish(server);
    assert_ne!(code, 0);
    assert!(stderr.contains("3 bytes into a frame"), "{stderr}");
}

#[test]
fn daemon_returns_once_listening_and_writes_its_pid() {
    // The daemon's parent exits: we adopt it so that we can reap it.
    rustix::process::set_child_subreaper(rustix::process::Pid::from_raw(1)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imgs");
    let pidfile = tmp.path().join("ps.pid");
    let port = free_port();
    let status = Command::new(BIN)
        .args(["-D".as_ref(), dir.as_os_str()])
        .args(["--address", "127.0.0.1", "--port", &port.to_string(), "-d"])
        .args(["--pidfile".as_ref(), pidfile.as_os_str()])
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    // Listening already: no retry loop.
    let mut client = PageServerClient::connect(addr(port)).unwrap();
    assert!(!client.parent_has(PagemapId::process(1)).unwrap());
    client.close().unwrap();
    let started = Instant::now();
    let (_, status) = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
        .unwrap()
        .unwrap();
    assert_eq!(status.exit_status(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
}
