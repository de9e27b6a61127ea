//! Our zstd extension of the protocol (PE_ZSTD, GET_ZSTD): off, the client's bytes are
//! exactly CRIU's; on, pages cross compressed where that is smaller, land as they were
//! sent, and a broken compressed stream ends the session cleanly with nothing kept.

mod common;
use common::start_server;
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};

use ckpt_page_server::compress::MAX_ZSTD_PAGES;
use ckpt_page_server::{
    Frame, PageFlags, PageServerClient, PageSink, PagemapId, ServerError, ServerOptions, GET_ZSTD,
    PE_ZSTD,
};
use images_format::{ImageDir, ImageKind, PagesReader};

const PAGE: usize = 4096;

/// Pages as the reference workload leaves them: eight words written, the rest zero.
fn sparse(n: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; n * PAGE];
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        for w in 0..8 {
            let v = (seed + (i * 8 + w) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            page[w * 512..w * 512 + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

/// Incompressible pages (xorshift).
fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n * PAGE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

const PID: u64 = 31;

/// The ranges one session pushes: (vaddr, contents), with a hole between some.
fn ranges() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0x10_0000, sparse(3, 1)),
        (0x20_0000, random(2, 7)),
        // More than one compressed frame may carry: split.
        (0x40_0000, sparse(MAX_ZSTD_PAGES as usize + 5, 2)),
        (0x90_0000, vec![0u8; PAGE]),
    ]
}

/// Pushes [`ranges`] (each given in two buffers that split a page) and a lazy hole.
fn push(client: &mut PageServerClient) {
    let id = PagemapId::process(PID);
    let mut pagemap = client.open(id).unwrap();
    for (vaddr, data) in ranges() {
        let (a, b) = data.split_at(data.len() / 2 + 100);
        pagemap
            .add_pages(
                vaddr,
                PageFlags::PRESENT,
                &[IoSlice::new(a), IoSlice::new(b)],
            )
            .unwrap();
    }
    pagemap.add_hole(0xa0_0000, 4, PageFlags::LAZY).unwrap();
    PageSink::finish(pagemap).unwrap();
}

/// What a client without the extension sends for [`push`]: CRIU's frames, byte for byte.
fn criu_transcript() -> Vec<u8> {
    let dst = PagemapId::process(PID).encode().unwrap();
    let mut bytes = Frame::open2(dst).encode().to_vec();
    for (vaddr, data) in ranges() {
        let n = (data.len() / PAGE) as u64;
        bytes.extend_from_slice(&Frame::add_f(dst, vaddr, n, 4).encode());
        bytes.extend_from_slice(&data);
    }
    bytes.extend_from_slice(&Frame::add_f(dst, 0xa0_0000, 4, 2).encode());
    bytes.extend_from_slice(&Frame::close().encode());
    bytes
}

/// Records everything a client sends, answering OPEN2 (no parent) and CLOSE (0).
fn recorder() -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut sk, _) = listener.accept().unwrap();
        let mut open = [0u8; 32];
        sk.read_exact(&mut open).unwrap();
        sk.write_all(&[0]).unwrap();
        let mut rest = Vec::new();
        let close = Frame::close().encode();
        // The client waits for the answer to CLOSE, so CLOSE ends what it sent.
        let mut chunk = vec![0u8; 1 << 16];
        while !rest.ends_with(&close) {
            let n = sk.read(&mut chunk).unwrap();
            assert!(n > 0, "the client closed without CLOSE");
            rest.extend_from_slice(&chunk[..n]);
        }
        sk.write_all(&0i32.to_le_bytes()).unwrap();
        let mut eof = Vec::new();
        sk.read_to_end(&mut eof).unwrap();
        assert!(eof.is_empty());
        [open.to_vec(), rest].concat()
    });
    (addr, handle)
}

#[test]
fn without_the_option_the_client_sends_exactly_criu_frames() {
    let (addr, recorded) = recorder();
    let mut client = PageServerClient::connect(addr).unwrap();
    assert!(!client.compresses_pages());
    push(&mut client);
    let traffic = client.pages_pushed();
    let sent = client.bytes_sent();
    client.close().unwrap();
    let bytes = recorded.join().unwrap();
    let expected = criu_transcript();
    assert_eq!(bytes.len(), expected.len());
    assert!(bytes == expected, "the wire differs from CRIU's frames");
    // CLOSE is sent after the count was taken.
    assert_eq!(sent + 32, expected.len() as u64);
    assert_eq!(traffic.raw_bytes, traffic.wire_bytes);
    assert_eq!(traffic.zstd_frames, 0);
    // Switched on and off again: as never switched on.
    let (addr, recorded) = recorder();
    let mut client = PageServerClient::connect(addr).unwrap();
    client.set_compress_pages(true).unwrap();
    client.set_compress_pages(false).unwrap();
    push(&mut client);
    client.close().unwrap();
    assert!(recorded.join().unwrap() == expected);
}

#[test]
fn compressed_push_lands_as_sent_and_costs_fewer_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("d");
    let (addr, server) = start_server(ServerOptions::new(&dir_path));
    let mut client = PageServerClient::connect(addr).unwrap();
    client.set_compress_pages(true).unwrap();
    push(&mut client);
    let pushed = client.pages_pushed();
    let sent = client.bytes_sent();
    client.close().unwrap();
    let stats = server.join().unwrap().unwrap();

    let raw: u64 = ranges().iter().map(|(_, d)| d.len() as u64).sum();
    assert_eq!(pushed.raw_bytes, raw);
    assert_eq!(stats.page_traffic.raw_bytes, raw);
    // The sparse ranges shrink; the random one goes raw.
    assert!(pushed.wire_bytes < raw / 4, "{pushed:?}");
    assert_eq!(stats.page_traffic.wire_bytes, pushed.wire_bytes);
    assert_eq!(stats.bytes, sent + 32, "CLOSE came after the count");
    // 3 sparse pages, 1029 split as 1024 + 5, one zero page: compressed; random: raw.
    assert_eq!((pushed.frames, pushed.zstd_frames), (5, 4));
    assert_eq!(stats.page_traffic, pushed);
    assert_eq!(stats.pages_received, raw / PAGE as u64);

    let dir = ImageDir::new(&dir_path).unwrap();
    let reader = PagesReader::open(&dir, ImageKind::Pagemap, PID).unwrap();
    for (vaddr, data) in ranges() {
        let mut buf = vec![0u8; data.len()];
        reader.read_pages(vaddr, &mut buf).unwrap();
        assert!(buf == data, "pages at {vaddr:#x}");
    }
    let lazy = reader
        .pagemap()
        .ranges
        .iter()
        .filter(|r| r.flags == PageFlags::LAZY)
        .count();
    assert_eq!(lazy, 1);
    // No PE_ZSTD leaks into the image: it says how pages travel, not what they are.
    assert!(reader
        .pagemap()
        .ranges
        .iter()
        .all(|r| PageFlags::from_bits_retain(0x7).contains(r.flags)));
}

/// Sends `bytes` as a session and returns the server's error.
fn broken_session(bytes: Vec<u8>) -> (ServerError, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("bad");
    let (addr, server) = start_server(ServerOptions::new(&dir_path));
    let mut sk = TcpStream::connect(addr).unwrap();
    // The server may stop reading at the bad frame; what it did not read does not matter.
    let _ = sk.write_all(&bytes);
    let _ = sk.shutdown(std::net::Shutdown::Write);
    let err = server.join().unwrap().unwrap_err();
    let names = std::fs::read_dir(&dir_path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    (err, names)
}

#[test]
fn a_broken_compressed_frame_ends_the_session_and_keeps_nothing() {
    let dst = PagemapId::process(PID).encode().unwrap();
    let zstd_add = |n: u64| Frame::add_f(dst, 0x1000, n, 4 | PE_ZSTD).encode().to_vec();
    let good = {
        let mut c = ckpt_page_server::PageCompressor::new().unwrap();
        c.encode(&Frame::add_f(dst, 0x1000, 2, 4), &sparse(2, 3))
            .unwrap()
            .to_vec()
    };
    let payload = good[32..].to_vec();
    let mut garbage = 50u32.to_le_bytes().to_vec();
    garbage.extend((0..50u8).map(|i| i.wrapping_mul(37)));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // L of 0, and far beyond any frame of two pages.
        (
            [zstd_add(2), 0u32.to_le_bytes().to_vec()].concat(),
            "length 0",
        ),
        (
            [zstd_add(2), u32::MAX.to_le_bytes().to_vec()].concat(),
            "out of bounds",
        ),
        // Too many pages for one compressed frame: refused before anything is read.
        (zstd_add(MAX_ZSTD_PAGES + 1), "at most"),
        // A frame of two pages announced as three.
        ([zstd_add(3), payload.clone()].concat(), "decompress to"),
        ([zstd_add(2), garbage].concat(), "do not decompress"),
        // The stream ends inside the compressed data.
        (
            [zstd_add(2), payload[..payload.len() - 3].to_vec()].concat(),
            "connection lost",
        ),
        // PE_ZSTD on a hole: no data to compress.
        (
            Frame::add_f(dst, 0x1000, 1, 2 | PE_ZSTD).encode().to_vec(),
            "PE_ZSTD without data",
        ),
    ];
    for (frame, what) in cases {
        let bytes = [Frame::open2(dst).encode().to_vec(), frame].concat();
        let (err, names) = broken_session(bytes);
        let text = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(text.contains(what), "{what}: {text}");
        assert!(names.is_empty(), "{what}: {names:?} kept");
    }
}

#[test]
fn lazy_gets_flagged_get_zstd_are_answered_compressed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = ImageDir::create_dir(tmp.path().join("lazy")).unwrap();
    let mut w = dir.pagemap_writer(ImageKind::Pagemap, PID, 1).unwrap();
    let sparse_pages = sparse(8, 5);
    let random_pages = random(2, 9);
    w.add_present(0x10_0000, &sparse_pages).unwrap();
    w.add_present(0x20_0000, &random_pages).unwrap();
    w.finish().unwrap();

    let mut opts = ServerOptions::new(dir.path());
    opts.lazy_pages = true;
    let (addr, server) = start_server(opts);
    let mut client = PageServerClient::connect(addr).unwrap();
    client.set_compress_pages(true).unwrap();
    let mut buf = vec![0u8; 8 * PAGE];
    let reply = client.get_pages(PID, 0x10_0000, &mut buf).unwrap();
    assert_eq!(reply.nr_pages, 8);
    assert!(buf == sparse_pages);
    let reply = client.get_pages(PID, 0x20_0000, &mut buf).unwrap();
    assert_eq!(reply.nr_pages, 2);
    assert!(buf[..2 * PAGE] == random_pages[..]);
    let pulled = client.pages_pulled();
    drop(client);
    let stats = server.join().unwrap().unwrap();
    assert_eq!((pulled.frames, pulled.zstd_frames), (2, 1));
    assert_eq!(pulled.raw_bytes, 10 * PAGE as u64);
    assert!(pulled.wire_bytes < 3 * PAGE as u64, "{pulled:?}");
    assert_eq!(stats.page_traffic, pulled);

    // A GET without the flag is answered raw, as CRIU's server answers.
    let mut opts = ServerOptions::new(dir.path());
    opts.lazy_pages = true;
    let (addr, server) = start_server(opts);
    let mut sk = TcpStream::connect(addr).unwrap();
    sk.write_all(&Frame::get(PID, 0x10_0000, 8).encode())
        .unwrap();
    let mut answer = vec![0u8; 32 + 8 * PAGE];
    sk.read_exact(&mut answer).unwrap();
    let expected = [
        Frame::add_f(PID, 0x10_0000, 8, 4).encode().to_vec(),
        sparse_pages.clone(),
    ]
    .concat();
    assert!(answer == expected);
    // The same GET flagged: a PE_ZSTD answer.
    let mut get = Frame::get(PID, 0x10_0000, 8);
    get.flags = GET_ZSTD;
    sk.write_all(&get.encode()).unwrap();
    let mut header = [0u8; 32];
    sk.read_exact(&mut header).unwrap();
    let frame = Frame::decode(&header).unwrap();
    assert!(frame.is_zstd());
    assert_eq!(frame.flags, 4 | PE_ZSTD);
    let mut len = [0u8; 4];
    sk.read_exact(&mut len).unwrap();
    let mut compressed = vec![0u8; u32::from_le_bytes(len) as usize];
    sk.read_exact(&mut compressed).unwrap();
    assert!(compressed.len() < PAGE);
    // Unread data would make our close a reset.
    drop(sk);
    server.join().unwrap().unwrap();
}
