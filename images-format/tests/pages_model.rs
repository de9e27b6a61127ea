//! Pagemaps and pages written through a chain of pre-dumps agree with a simple model: each
//! page of each layer is absent, present (with contents naming layer and page), in the
//! parent, or lazy.

use images_format::{
    ImageDir, ImageKind, PageFlags, PageSource, PagesError, PagesReader, PAGE_SIZE,
};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Absent,
    Present,
    Parent,
    Lazy,
    LazyPresent,
}

/// What the model says a page of the top layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    NotListed,
    Data { layer: usize, fill: u8 },
    Lazy,
    Broken,
}

fn fill(layer: usize, page: usize) -> u8 {
    (layer * 40 + page + 1) as u8
}

/// Layer 0 is the oldest; the reader opens the last one, which is its layer 0.
fn expect(layers: &[Vec<Page>], layer: usize, page: usize, top: usize) -> Expect {
    match layers[layer][page] {
        Page::Absent if layer == top => Expect::NotListed,
        Page::Absent => Expect::Broken,
        Page::Present | Page::LazyPresent => Expect::Data {
            layer: top - layer,
            fill: fill(layer, page),
        },
        // Lazy pages have no data in any image: whoever serves lazy pages supplies them, also
        // when a child image inherits them.
        Page::Lazy => Expect::Lazy,
        Page::Parent if layer == 0 => Expect::Broken,
        Page::Parent => expect(layers, layer - 1, page, top),
    }
}

fn page_strategy() -> impl Strategy<Value = Page> {
    prop_oneof![
        Just(Page::Absent),
        Just(Page::Present),
        Just(Page::Parent),
        Just(Page::Lazy),
        Just(Page::LazyPresent)
    ]
}

const PAGES: usize = 24;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn chains_resolve_as_the_model_says(
        layers in proptest::collection::vec(proptest::collection::vec(page_strategy(), PAGES), 1..5),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let base = 0x40_0000u64;
        let mut prev: Option<ImageDir> = None;
        for (l, pages) in layers.iter().enumerate() {
            let dir = ImageDir::create_dir(tmp.path().join(l.to_string())).unwrap();
            if let Some(p) = &prev {
                dir.set_parent(format!("../{}", l - 1)).unwrap();
                prop_assert!(p.path().exists());
            }
            let pages_id = dir.next_pages_id().unwrap();
            let mut w = dir.pagemap_writer(ImageKind::Pagemap, 7, pages_id).unwrap();
            for (i, page) in pages.iter().enumerate() {
                let vaddr = base + i as u64 * PAGE_SIZE;
                let data = vec![fill(l, i); PAGE_SIZE as usize];
                match page {
                    Page::Absent => {}
                    Page::Present => w.add_present(vaddr, &data).unwrap(),
                    Page::LazyPresent => w.add_with_data(vaddr, PageFlags::PRESENT | PageFlags::LAZY, &data).unwrap(),
                    Page::Parent => w.add_hole(vaddr, 1, PageFlags::PARENT).unwrap(),
                    Page::Lazy => w.add_hole(vaddr, 1, PageFlags::LAZY).unwrap(),
                }
            }
            let (_, _, stats) = w.finish().unwrap();
            let listed = pages.iter().filter(|p| **p != Page::Absent).count();
            prop_assert!(stats.entries as usize <= listed);
            prev = Some(dir);
        }
        let top = layers.len() - 1;
        let expected: Vec<Expect> = (0..PAGES).map(|p| expect(&layers, top, p, top)).collect();

        let reader = PagesReader::open(prev.as_ref().unwrap(), ImageKind::Pagemap, 7).unwrap();
        let first_broken = expected.iter().position(|e| *e == Expect::Broken);
        match reader.resolve() {
            Err(PagesError::NotInParent { vaddr, id: 7, .. }) => {
                prop_assert_eq!(Some(vaddr), first_broken.map(|p| base + p as u64 * PAGE_SIZE));
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
            Ok(segments) => {
                prop_assert_eq!(first_broken, None);
                let mut got = vec![Expect::NotListed; PAGES];
                let mut last_end = 0;
                for seg in &segments {
                    prop_assert!(seg.vaddr >= last_end, "segments overlap or are unsorted");
                    last_end = seg.end();
                    for off in (0..seg.len).step_by(PAGE_SIZE as usize) {
                        let page = ((seg.vaddr + off - base) / PAGE_SIZE) as usize;
                        got[page] = match seg.source {
                            PageSource::Lazy => Expect::Lazy,
                            PageSource::File { layer, offset } => {
                                let mut b = [0u8; 1];
                                let file = reader.pages_file(layer).unwrap();
                                std::os::unix::fs::FileExt::read_exact_at(file, &mut b, offset + off).unwrap();
                                Expect::Data { layer, fill: b[0] }
                            }
                        };
                    }
                }
                prop_assert_eq!(&got, &expected);
            }
        }
        for (p, e) in expected.iter().enumerate() {
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            let r = reader.read_pages(base + p as u64 * PAGE_SIZE, &mut buf);
            match e {
                Expect::Data { fill, .. } => {
                    prop_assert!(r.is_ok(), "page {}: {:?}", p, r);
                    prop_assert!(buf.iter().all(|b| b == fill));
                }
                _ => prop_assert!(r.is_err(), "page {} read though {:?}", p, e),
            }
        }
    }
}
