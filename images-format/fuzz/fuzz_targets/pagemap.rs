//! Any bytes after a pagemap header, parsed as a pagemap, then every lookup on it.
#![no_main]

use images_format::{ImageKind, ImageReader, ImageWriter, Pagemap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut image = ImageWriter::new(Vec::new(), ImageKind::Pagemap, "fuzz")
        .and_then(ImageWriter::finish)
        .expect("writing to a Vec cannot fail");
    image.extend_from_slice(data);
    let mut reader = ImageReader::new(image.as_slice(), ImageKind::Pagemap, "fuzz", None)
        .expect("the header was just written");
    if let Ok(map) = Pagemap::read(&mut reader) {
        for range in &map.ranges {
            assert_eq!(map.find(range.vaddr), map.find(range.end() - 1));
            assert!(range.end() > range.vaddr);
        }
        let _ = map.present_pages();
    }
});
