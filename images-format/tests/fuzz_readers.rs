//! Arbitrary bytes given to every reader: errors are fine, panics and unbounded allocation
//! are not. Inputs are either wholly random or a valid header followed by random bytes, so
//! that the entry parsers, not only the magic check, see the garbage.

mod common;

use images_format::{
    pb, ImageDir, ImageError, ImageKind, ImageReader, ImageWriter, Pagemap, PagesReader,
};
use proptest::prelude::*;
use prost::Message;

/// Reads an image to its end or its first error; every step must consume input, so the
/// number of steps is bounded by the input length.
fn drain(bytes: &[u8], kind: ImageKind, known_len: bool) {
    let len = known_len.then_some(bytes.len() as u64);
    let Ok(mut r) = ImageReader::new(bytes, kind, "fuzz", len) else {
        return;
    };
    if kind.is_raw() {
        assert!(matches!(
            r.read_raw_entry(),
            Err(ImageError::RawImage { .. })
        ));
        return;
    }
    for _ in 0..=bytes.len() {
        match r.read_entry_with_payload() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
    panic!("{kind:?}: more entries than bytes");
}

fn decode_any<M: Message + Default>(bytes: &[u8]) {
    let _ = M::decode(bytes);
}

fn with_header(kind: ImageKind, tail: &[u8]) -> Vec<u8> {
    let mut image = ImageWriter::new(Vec::new(), kind, "fuzz")
        .unwrap()
        .finish()
        .unwrap();
    image.extend_from_slice(tail);
    image
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for kind in ImageKind::all() {
            drain(&bytes, kind, true);
            drain(&bytes, kind, false);
            drain(&with_header(kind, &bytes), kind, true);
            drain(&with_header(kind, &bytes), kind, false);
            with_message_type!(kind, decode_any(&bytes), ());
        }
        if let Ok(mut r) = ImageReader::detect(bytes.as_slice(), "fuzz", None) {
            while let Ok(Some(_)) = r.read_entry_with_payload() {}
        }
        let image = with_header(ImageKind::Pagemap, &bytes);
        let mut r = ImageReader::new(image.as_slice(), ImageKind::Pagemap, "fuzz", None).unwrap();
        let _ = Pagemap::read(&mut r);
    }

    /// Well-framed entries whose contents are random, so that decoding and payload lengths
    /// (not only the framing) meet garbage.
    #[test]
    fn framed_garbage_never_panics(entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..6),
                                    tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        for kind in ImageKind::all().filter(|k| !k.is_raw()) {
            let mut w = ImageWriter::new(Vec::new(), kind, "fuzz").unwrap();
            for e in &entries {
                w.write_raw_entry(e).unwrap();
            }
            w.write_payload(&tail).unwrap();
            let image = w.finish().unwrap();
            drain(&image, kind, true);
            drain(&image, kind, false);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// A pagemap chain with random entries: opening and resolving it gives answers or errors.
    #[test]
    fn random_pagemaps_never_panic(
        layers in proptest::collection::vec(
            proptest::collection::vec((0u64..64, 0u64..8, 0u32..8), 0..8), 1..4),
        pages_len in 0u64..16,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut prev: Option<ImageDir> = None;
        for (i, ranges) in layers.iter().enumerate() {
            let dir = ImageDir::create_dir(tmp.path().join(i.to_string())).unwrap();
            if let Some(p) = &prev {
                dir.set_parent(p.path()).unwrap();
            }
            let mut w = dir.create(ImageKind::Pagemap, 1).unwrap();
            w.write_entry(&pb::PagemapHead { pages_id: 1 }).unwrap();
            for &(page, n, flags) in ranges {
                w.write_entry(&pb::PagemapEntry {
                    vaddr: page * 4096,
                    compat_nr_pages: n as u32,
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages: Some(n),
                }).unwrap();
            }
            w.finish().unwrap();
            std::fs::write(dir.file_path(ImageKind::Pages, 1), vec![0xabu8; (pages_len * 4096) as usize]).unwrap();
            prev = Some(dir);
        }
        let top = prev.unwrap();
        if let Ok(reader) = PagesReader::open(&top, ImageKind::Pagemap, 1) {
            let _ = reader.resolve();
            let mut buf = vec![0u8; 3 * 4096];
            for page in 0..64u64 {
                let _ = reader.read_pages(page * 4096 + 7, &mut buf);
            }
        }
    }
}
