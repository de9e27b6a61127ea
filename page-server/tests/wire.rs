//! Conformance with CRIU's page-server protocol, from byte transcripts written by hand
//! after criu/page-xfer.c, in both directions; round trips; broken connections.

mod common;
use common::start_server;
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command as Process;
use std::thread::{self, JoinHandle};

use ckpt_page_server::{
    ClientError, PageFlags, PageServerClient, PageSink, PageStore, PagemapId, ReceiveMode,
    ServerError, ServerOptions,
};
use images_format::{ImageDir, ImageKind, PageSource, Pagemap, PagesReader};

const PAGE: usize = 4096;

/// A `page_server_iov` as CRIU's C code lays it out on x86_64.
fn iov(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&cmd.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&nr_pages.to_le_bytes());
    b.extend_from_slice(&vaddr.to_le_bytes());
    b.extend_from_slice(&dst_id.to_le_bytes());
    b
}

/// `n` pages, each filled with its own byte starting at `fill`.
fn pages(n: usize, fill: u8) -> Vec<u8> {
    (0..n)
        .flat_map(|i| vec![fill.wrapping_add(i as u8); PAGE])
        .collect()
}

const PID: u64 = 1;
const SHMEM: u64 = 2;
const ADD: u32 = 1;
const OPEN2: u32 = 4;
const PARENT: u32 = 5;
const ADD_F: u32 = 6;
const CLOSE: u32 = 0x1023;
const PE_PARENT: u32 = 1;
const PE_LAZY: u32 = 2;
const PE_PRESENT: u32 = 4;

/// One step of a session as the client sees it: bytes sent, then the exact answer.
struct Step {
    send: Vec<u8>,
    answer: Vec<u8>,
}

fn step(send: Vec<u8>, answer: &[u8]) -> Step {
    Step {
        send,
        answer: answer.to_vec(),
    }
}

fn with_data(mut frame: Vec<u8>, data: &[u8]) -> Vec<u8> {
    frame.extend_from_slice(data);
    frame
}

fn replay(addr: SocketAddr, steps: &[Step]) {
    let mut sk = TcpStream::connect(addr).unwrap();
    for (i, s) in steps.iter().enumerate() {
        sk.write_all(&s.send).unwrap();
        let mut answer = vec![0u8; s.answer.len()];
        sk.read_exact(&mut answer).unwrap();
        assert_eq!(answer, s.answer, "answer to step {i}");
    }
}

fn pagemap_of(dir: &ImageDir, kind: ImageKind, id: u64) -> Pagemap {
    let mut reader = dir.open(kind, id).unwrap();
    Pagemap::read(&mut reader).unwrap()
}

fn ranges(map: &Pagemap) -> Vec<(u64, u64, u32)> {
    map.ranges
        .iter()
        .map(|r| (r.vaddr, r.nr_pages, r.flags.bits()))
        .collect()
}

fn image_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// What `crit decode` (CRIU's own decoder) makes of an image, or None without crit.
fn crit_decode(path: &Path) -> Option<String> {
    let out = match Process::new("crit")
        .arg("decode")
        .arg("-i")
        .arg(path)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping the crit check: {e}");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "crit decode {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn criu_client_transcript_becomes_images_crit_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("imgs");
    let (addr, server) = start_server(ServerOptions::new(&dir_path));
    let pid42 = 42 << 8 | PID;
    let shm7 = 7 << 8 | SHMEM;
    let pid43 = 43 << 8 | PID;
    // As `criu dump --page-server` sends it: page_xfer for each task, then shmem, then
    // disconnect_from_page_server. Task 43 comes from a client without OPEN2 (legacy ADD).
    replay(
        addr,
        &[
            step(iov(PARENT, 0, 0, pid42), &[0, 0, 0, 0]),
            step(iov(OPEN2, 0, 0, pid42), &[0]),
            step(
                [
                    with_data(
                        iov(PE_PRESENT << 16 | ADD_F, 2, 0x40_0000, pid42),
                        &pages(2, 0x10),
                    ),
                    iov(PE_LAZY << 16 | ADD_F, 3, 0x60_0000, pid42),
                    with_data(
                        iov((PE_PRESENT | PE_LAZY) << 16 | ADD_F, 1, 0x7ffd_0000, pid42),
                        &pages(1, 0x20),
                    ),
                    iov(OPEN2, 0, 0, shm7),
                ]
                .concat(),
                &[0],
            ),
            step(
                [
                    with_data(iov(PE_PRESENT << 16 | ADD_F, 1, 0, shm7), &pages(1, 0x30)),
                    with_data(iov(ADD, 1, 0x1000, pid43), &pages(1, 0x40)),
                    iov(CLOSE, 0, 0, 0),
                ]
                .concat(),
                &[0, 0, 0, 0],
            ),
        ],
    );
    let stats = server.join().unwrap().unwrap();
    assert_eq!((stats.pagemaps, stats.pages_received), (3, 5));

    let dir = ImageDir::new(&dir_path).unwrap();
    assert_eq!(
        image_names(&dir_path),
        [
            "pagemap-42.img",
            "pagemap-43.img",
            "pagemap-shmem-7.img",
            "pages-65537.img",
            "pages-65538.img",
            "pages-65539.img"
        ]
    );
    let map = pagemap_of(&dir, ImageKind::Pagemap, 42);
    assert_eq!(map.pages_id, 0x10001);
    assert_eq!(
        ranges(&map),
        [(0x40_0000, 2, 4), (0x60_0000, 3, 2), (0x7ffd_0000, 1, 6)]
    );
    assert_eq!(
        pagemap_of(&dir, ImageKind::ShmemPagemap, 7).pages_id,
        0x10002
    );
    assert_eq!(
        ranges(&pagemap_of(&dir, ImageKind::Pagemap, 43)),
        [(0x1000, 1, 4)]
    );

    let reader = PagesReader::open(&dir, ImageKind::Pagemap, 42).unwrap();
    let mut buf = vec![0u8; 2 * PAGE];
    reader.read_pages(0x40_0000, &mut buf).unwrap();
    assert_eq!(buf, pages(2, 0x10));
    let mut one = vec![0u8; PAGE];
    reader.read_pages(0x7ffd_0000, &mut one).unwrap();
    assert_eq!(one, pages(1, 0x20));
    assert_eq!(
        std::fs::read(dir_path.join("pages-65539.img")).unwrap(),
        pages(1, 0x40)
    );

    if let Some(json) = crit_decode(&dir_path.join("pagemap-42.img")) {
        let compact: String = json.split_whitespace().collect();
        assert!(compact.contains("\"pages_id\":65537"), "{json}");
        assert!(compact.contains("\"nr_pages\":3"), "{json}");
        assert!(
            compact.contains("{\"vaddr\":2147287040,\"nr_pages\":1,\"flags\":6}"),
            "{json}"
        );
        assert_eq!(compact.matches("\"vaddr\"").count(), 3, "{json}");
    }
    if let Some(json) = crit_decode(&dir_path.join("pagemap-shmem-7.img")) {
        assert!(json.contains("65538"), "{json}");
    }
}

/// A fake CRIU page server: answers as page_server_serve does and records every byte.
fn recording_server() -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut sk, _) = listener.accept().unwrap();
        let mut record = Vec::new();
        loop {
            let mut frame = [0u8; 32];
            if sk.read_exact(&mut frame).is_err() {
                return record;
            }
            record.extend_from_slice(&frame);
            let cmd = u32::from_le_bytes(frame[0..4].try_into().unwrap());
            let nr = u64::from_le_bytes(frame[8..16].try_into().unwrap());
            match cmd & 0xffff {
                PARENT => sk.write_all(&1i32.to_le_bytes()).unwrap(),
                OPEN2 => sk.write_all(&[1]).unwrap(),
                CLOSE => sk.write_all(&0i32.to_le_bytes()).unwrap(),
                ADD_F if (cmd >> 16) & PE_PRESENT != 0 => {
                    let mut data = vec![0u8; nr as usize * PAGE];
                    sk.read_exact(&mut data).unwrap();
                    record.extend_from_slice(&data);
                }
                _ => {}
            }
        }
    });
    (addr, handle)
}

#[test]
fn client_sends_what_criu_sends() {
    let (addr, server) = recording_server();
    let mut client = PageServerClient::connect(addr).unwrap();
    let id = PagemapId::process(42);
    assert!(client.parent_has(id).unwrap());
    let mut pm = client.open(id).unwrap();
    assert!(pm.has_parent());
    let a = pages(1, 0xa0);
    let b = pages(2, 0xb0);
    pm.add_pages(
        0x40_0000,
        PageFlags::PRESENT,
        &[IoSlice::new(&a), IoSlice::new(&b)],
    )
    .unwrap();
    pm.add_hole(0x40_3000, 4, PageFlags::PARENT).unwrap();
    pm.add_pages(
        0x50_0000,
        PageFlags::PRESENT | PageFlags::LAZY,
        &[IoSlice::new(&a)],
    )
    .unwrap();
    pm.add_hole(0x60_0000, 1, PageFlags::LAZY).unwrap();
    let stats = pm.finish();
    assert_eq!(
        (stats.pages_present, stats.pages_parent, stats.entries),
        (4, 4, 4)
    );
    client.close().unwrap();
    let recorded = server.join().unwrap();

    let dst = 42 << 8 | PID;
    let expected = [
        iov(PARENT, 0, 0, dst),
        iov(OPEN2, 0, 0, dst),
        iov(PE_PRESENT << 16 | ADD_F, 3, 0x40_0000, dst),
        a.clone(),
        b,
        iov(PE_PARENT << 16 | ADD_F, 4, 0x40_3000, dst),
        iov((PE_PRESENT | PE_LAZY) << 16 | ADD_F, 1, 0x50_0000, dst),
        a,
        iov(PE_LAZY << 16 | ADD_F, 1, 0x60_0000, dst),
        iov(CLOSE, 0, 0, 0),
    ]
    .concat();
    assert_eq!(recorded.len(), expected.len());
    assert!(recorded == expected, "transcripts differ");
}

#[test]
fn client_rejects_what_the_server_would() {
    let (addr, server) = recording_server();
    let mut client = PageServerClient::connect(addr).unwrap();
    let mut pm = client.open(PagemapId::process(1)).unwrap();
    let half = vec![0u8; PAGE / 2];
    assert!(matches!(
        pm.add_pages(0x1000, PageFlags::PRESENT, &[IoSlice::new(&half)]),
        Err(ClientError::BadRange { .. })
    ));
    pm.add_hole(0x10_0000, 1, PageFlags::LAZY).unwrap();
    let err = pm.add_hole(0x1000, 1, PageFlags::LAZY).unwrap_err();
    assert!(err.to_string().contains("0x1000"), "{err}");
    pm.finish();
    client.close().unwrap();
    server.join().unwrap();
}

/// Pushes a process's pages with `store`, present or (with a parent) as holes.
fn push<S: PageStore>(store: &mut S, pid: u64, fill: u8, hole_second: bool) {
    let id = PagemapId::process(pid);
    let parent = store.parent_has(id).unwrap();
    let mut sink = store.open(id).unwrap();
    let first = pages(4, fill);
    sink.add_pages(0x1_0000, PageFlags::PRESENT, &[IoSlice::new(&first)])
        .unwrap();
    if hole_second && parent {
        sink.add_hole(0x2_0000, 8, PageFlags::PARENT).unwrap();
    } else {
        let second = pages(8, fill.wrapping_add(0x40));
        sink.add_pages(0x2_0000, PageFlags::PRESENT, &[IoSlice::new(&second)])
            .unwrap();
    }
    sink.finish().unwrap();
}

#[test]
fn predump_chain_round_trip_with_parent() {
    for mode in [ReceiveMode::Splice, ReceiveMode::Copy] {
        let tmp = tempfile::tempdir().unwrap();
        let one = tmp.path().join("1");
        let mut opts = ServerOptions::new(&one);
        opts.receive = mode;
        let (addr, server) = start_server(opts);
        let mut client = PageServerClient::connect(addr).unwrap();
        assert!(!client.parent_has(PagemapId::process(7)).unwrap());
        push(&mut client, 7, 0x10, true);
        client.close().unwrap();
        server.join().unwrap().unwrap();

        let two = tmp.path().join("2");
        let mut opts = ServerOptions::new(&two);
        opts.prev_images_dir = Some("../1".into());
        opts.receive = mode;
        opts.sync = true;
        let (addr, server) = start_server(opts);
        let mut client = PageServerClient::connect(addr).unwrap();
        assert!(client.parent_has(PagemapId::process(7)).unwrap());
        push(&mut client, 7, 0x80, true);
        client.close().unwrap();
        let stats = server.join().unwrap().unwrap();
        assert_eq!(stats.pages_received, 4);

        let dir = ImageDir::new(&two).unwrap();
        let reader = PagesReader::open(&dir, ImageKind::Pagemap, 7).unwrap();
        assert_eq!(reader.layers(), 2);
        let mut all = vec![0u8; 0x1_0000 + 8 * PAGE];
        reader.read_pages(0x1_0000, &mut all[..4 * PAGE]).unwrap();
        assert_eq!(&all[..4 * PAGE], &pages(4, 0x80)[..]);
        let mut second = vec![0u8; 8 * PAGE];
        reader.read_pages(0x2_0000, &mut second).unwrap();
        assert_eq!(second, pages(8, 0x50), "parent pages of the first round");
        assert!(matches!(
            reader.resolve().unwrap()[1].source,
            PageSource::File { layer: 1, .. }
        ));
    }
}

#[test]
fn local_images_take_the_same_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ImageDir::create_dir(tmp.path().join("local")).unwrap();
    let mut store =
        ckpt_page_server::PageDestination::Local(ckpt_page_server::LocalImages::new(dir.clone()));
    push(&mut store, 9, 0x01, true);
    push(&mut store, 10, 0x02, true);
    store.close().unwrap();
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, 10).unwrap();
    let mut buf = vec![0u8; PAGE];
    reader.read_pages(0x2_0000, &mut buf).unwrap();
    assert_eq!(buf, pages(1, 0x42));
    assert_eq!(pagemap_of(&dir, ImageKind::Pagemap, 9).pages_id, 1);
    assert_eq!(pagemap_of(&dir, ImageKind::Pagemap, 10).pages_id, 2);
}

#[test]
fn connection_cut_mid_pages_leaves_no_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("cut");
    let (addr, server) = start_server(ServerOptions::new(&dir_path));
    let dst = 5 << 8 | PID;
    {
        let mut sk = TcpStream::connect(addr).unwrap();
        sk.write_all(&iov(OPEN2, 0, 0, 3 << 8 | PID)).unwrap();
        let mut answer = [0u8; 1];
        sk.read_exact(&mut answer).unwrap();
        sk.write_all(&with_data(
            iov(PE_PRESENT << 16 | ADD_F, 1, 0x1000, 3 << 8 | PID),
            &pages(1, 1),
        ))
        .unwrap();
        sk.write_all(&iov(OPEN2, 0, 0, dst)).unwrap();
        sk.read_exact(&mut answer).unwrap();
        sk.write_all(&iov(PE_PRESENT << 16 | ADD_F, 16, 0x7000_0000, dst))
            .unwrap();
        sk.write_all(&pages(3, 7)).unwrap();
        // dropped here: 3 of 16 pages sent
    }
    let err = server.join().unwrap().unwrap_err();
    match &err {
        ServerError::PagesCut {
            image,
            vaddr,
            received,
            expected,
            offset,
            ..
        } => {
            assert_eq!(image, "pagemap-5.img");
            assert_eq!(*vaddr, 0x7000_0000);
            assert_eq!((*received, *expected), (3 * PAGE as u64, 16 * PAGE as u64));
            assert_eq!(*offset, 4 * 32 + 4 * PAGE as u64);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains("pagemap-5.img"), "{err}");
    assert!(
        image_names(&dir_path).is_empty(),
        "{:?}",
        image_names(&dir_path)
    );
}

#[test]
fn unknown_command_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("unknown");
    let (addr, server) = start_server(ServerOptions::new(&dir_path));
    {
        let mut sk = TcpStream::connect(addr).unwrap();
        sk.write_all(&iov(OPEN2, 0, 0, 1 << 8 | PID)).unwrap();
        let mut answer = [0u8; 1];
        sk.read_exact(&mut answer).unwrap();
        sk.write_all(&iov(0x55, 0, 0, 0)).unwrap();
        // The server drops the connection rather than guess.
        let mut rest = Vec::new();
        sk.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    let err = server.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ServerError::Frame { offset: 32, .. }),
        "{err}"
    );
    assert!(format!("{:?}", err).contains("UnknownCommand { cmd: 85 }"));
    assert!(image_names(&dir_path).is_empty());
}

#[test]
fn bad_ranges_and_holes_without_parent_are_refused() {
    let cases: [(Vec<u8>, &str); 4] = [
        (
            iov(PE_PARENT << 16 | ADD_F, 1, 0x1000, 1 << 8 | PID),
            "parent",
        ),
        (
            iov(
                (PE_PARENT | PE_PRESENT) << 16 | ADD_F,
                1,
                0x1000,
                1 << 8 | PID,
            ),
            "both",
        ),
        (
            iov(PE_LAZY << 16 | ADD_F, 1, 0x1001, 1 << 8 | PID),
            "aligned",
        ),
        (
            iov(0x100 << 16 | ADD_F, 1, 0x1000, 1 << 8 | PID),
            "unknown flags",
        ),
    ];
    for (frame, what) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir_path = tmp.path().join("bad");
        let (addr, server) = start_server(ServerOptions::new(&dir_path));
        let mut sk = TcpStream::connect(addr).unwrap();
        sk.write_all(&frame).unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
        assert!(image_names(&dir_path).is_empty(), "{what}");
    }
}

#[test]
fn lazy_pages_are_served_from_images() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ImageDir::create_dir(tmp.path().join("lazy")).unwrap();
    let mut store = ckpt_page_server::LocalImages::new(dir.clone());
    push(&mut store, 77, 0x60, false);
    store.close().unwrap();

    let mut opts = ServerOptions::new(dir.path());
    opts.lazy_pages = true;
    let (addr, server) = start_server(opts);
    let mut client = PageServerClient::connect(addr).unwrap();
    let mut buf = vec![0u8; 2 * PAGE];
    let reply = client.get_pages(77, 0x1_2000, &mut buf).unwrap();
    assert_eq!((reply.vaddr, reply.nr_pages), (0x1_2000, 2));
    assert_eq!(buf, pages(4, 0x60)[2 * PAGE..]);
    // Ranges stop at the first page not saved: 0x14000..0x20000 is a gap.
    let mut big = vec![0u8; 16 * PAGE];
    let reply = client.get_pages(77, 0x1_3000, &mut big).unwrap();
    assert_eq!(reply.nr_pages, 1);
    assert_eq!(big[..PAGE], pages(4, 0x60)[3 * PAGE..]);
    // The daemon asks for several before reading the answers.
    client.request_pages(77, 0x2_0000, 1).unwrap();
    client.request_pages(77, 0x2_7000, 1).unwrap();
    let mut one = vec![0u8; PAGE];
    client.receive_pages(77, 0x2_0000, &mut one).unwrap();
    assert_eq!(one, pages(1, 0xa0));
    client.receive_pages(77, 0x2_7000, &mut one).unwrap();
    assert_eq!(one, pages(1, 0xa7));
    drop(client);
    let stats = server.join().unwrap().unwrap();
    assert_eq!(stats.pages_served, 5);
}

const GET: u32 = 7;

#[test]
fn client_pull_is_what_criu_lazy_pages_sends() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A CRIU source: answers each GET with fewer pages than asked, as it may.
    let server = thread::spawn(move || {
        let (mut sk, _) = listener.accept().unwrap();
        let mut got = [0u8; 32];
        sk.read_exact(&mut got).unwrap();
        assert_eq!(got.to_vec(), iov(GET, 4, 0x7f00_0000_0000, 4242));
        sk.write_all(&with_data(
            iov(PE_PRESENT << 16 | ADD_F, 2, 0x7f00_0000_0000, 4242),
            &pages(2, 0xc0),
        ))
        .unwrap();
        sk.read_exact(&mut got).unwrap();
        assert_eq!(got.to_vec(), iov(GET, 1, 0x1000, 4242));
        // An answer about another address is refused by the client.
        sk.write_all(&iov(PE_PRESENT << 16 | ADD_F, 1, 0x2000, 4242))
            .unwrap();
    });
    let mut client = PageServerClient::connect(addr).unwrap();
    let mut buf = vec![0u8; 4 * PAGE];
    let reply = client.get_pages(4242, 0x7f00_0000_0000, &mut buf).unwrap();
    assert_eq!(reply.nr_pages, 2);
    assert_eq!(buf[..2 * PAGE], pages(2, 0xc0)[..]);
    let err = client
        .get_pages(4242, 0x1000, &mut buf[..PAGE])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::WrongReply {
                reply_vaddr: 0x2000,
                ..
            }
        ),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn server_answers_get_as_criu_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ImageDir::create_dir(tmp.path().join("lazy")).unwrap();
    let mut store = ckpt_page_server::LocalImages::new(dir.clone());
    push(&mut store, 55, 0x70, false);
    store.close().unwrap();
    let mut opts = ServerOptions::new(dir.path());
    opts.lazy_pages = true;
    let (addr, server) = start_server(opts);
    let mut sk = TcpStream::connect(addr).unwrap();
    sk.write_all(&iov(GET, 2, 0x1_1000, 55)).unwrap();
    let mut reply = vec![0u8; 32 + 2 * PAGE];
    sk.read_exact(&mut reply).unwrap();
    let expected = with_data(
        iov(PE_PRESENT << 16 | ADD_F, 2, 0x1_1000, 55),
        &pages(4, 0x70)[PAGE..3 * PAGE],
    );
    assert!(reply == expected, "reply differs");
    // A page that was never saved ends the session, as in CRIU.
    sk.write_all(&iov(GET, 1, 0x9_0000, 55)).unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::NotSaved {
                pid: 55,
                vaddr: 0x9_0000
            }
        ),
        "{err}"
    );
}

#[test]
fn criu_predump_transcript_against_a_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("1");
    let (addr, server) = start_server(ServerOptions::new(&first));
    let pid = 42 << 8 | PID;
    replay(
        addr,
        &[
            step(iov(PARENT, 0, 0, pid), &[0, 0, 0, 0]),
            step(iov(OPEN2, 0, 0, pid), &[0]),
            step(
                [
                    with_data(
                        iov(PE_PRESENT << 16 | ADD_F, 4, 0x40_0000, pid),
                        &pages(4, 1),
                    ),
                    iov(CLOSE, 0, 0, 0),
                ]
                .concat(),
                &[0, 0, 0, 0],
            ),
        ],
    );
    server.join().unwrap().unwrap();

    // criu page-server -D 2 --prev-images-dir ../1; criu pre-dump --prev-images-dir ../1
    let second = tmp.path().join("2");
    let mut opts = ServerOptions::new(&second);
    opts.prev_images_dir = Some("../1".into());
    let (addr, server) = start_server(opts);
    replay(
        addr,
        &[
            step(iov(PARENT, 0, 0, pid), &[1, 0, 0, 0]),
            step(iov(PARENT, 0, 0, 43 << 8 | PID), &[0, 0, 0, 0]),
            step(iov(OPEN2, 0, 0, pid), &[1]),
            step(
                [
                    iov(PE_PARENT << 16 | ADD_F, 1, 0x40_0000, pid),
                    with_data(
                        iov(PE_PRESENT << 16 | ADD_F, 1, 0x40_1000, pid),
                        &pages(1, 9),
                    ),
                    iov(PE_PARENT << 16 | ADD_F, 2, 0x40_2000, pid),
                    iov(CLOSE, 0, 0, 0),
                ]
                .concat(),
                &[0, 0, 0, 0],
            ),
        ],
    );
    server.join().unwrap().unwrap();
    let dir = ImageDir::new(&second).unwrap();
    assert_eq!(
        ranges(&pagemap_of(&dir, ImageKind::Pagemap, 42)),
        [(0x40_0000, 1, 1), (0x40_1000, 1, 4), (0x40_2000, 2, 1)]
    );
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, 42).unwrap();
    let mut buf = vec![0u8; 4 * PAGE];
    reader.read_pages(0x40_0000, &mut buf).unwrap();
    let mut expected = pages(4, 1);
    expected[PAGE..2 * PAGE].copy_from_slice(&pages(1, 9));
    assert!(buf == expected);

    // A hole the parent does not cover is refused and nothing is kept.
    let third = tmp.path().join("3");
    let mut opts = ServerOptions::new(&third);
    opts.prev_images_dir = Some("../1".into());
    let (addr, server) = start_server(opts);
    let mut sk = TcpStream::connect(addr).unwrap();
    sk.write_all(&iov(OPEN2, 0, 0, pid)).unwrap();
    sk.read_exact(&mut [0u8; 1]).unwrap();
    sk.write_all(&iov(PE_PARENT << 16 | ADD_F, 8, 0x40_0000, pid))
        .unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ServerError::HoleNotInParent {
                missing: 0x40_4000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(image_names(&third), ["parent"]);
}

#[test]
fn only_the_named_peer_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = ServerOptions::new(tmp.path().join("peer"));
    opts.peer = Some("127.0.0.3".parse().unwrap());
    // The server thread waits on for its peer; the test ends without it.
    let (addr, _server) = start_server(opts);
    let mut sk = TcpStream::connect(addr).unwrap();
    sk.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = sk.write_all(&iov(PARENT, 0, 0, 1 << 8 | PID));
    let mut answer = Vec::new();
    let _ = sk.read_to_end(&mut answer);
    assert!(answer.is_empty(), "a stranger got an answer");
}
