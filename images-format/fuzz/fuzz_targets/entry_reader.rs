//! Any bytes, read as an image of the kind its first byte picks (or of the kind its magic
//! names), entry by entry with payloads: must end in entries or an error, never a panic.
#![no_main]

use images_format::{ImageKind, ImageReader, IMAGE_KINDS};
use libfuzzer_sys::fuzz_target;

fn drain(mut reader: ImageReader<&[u8]>, budget: usize) {
    for _ in 0..=budget {
        match reader.read_entry_with_payload() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
    panic!("more entries than input bytes");
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let kind: ImageKind = IMAGE_KINDS[usize::from(pick) % IMAGE_KINDS.len()].kind;
    let len = Some(rest.len() as u64);
    if let Ok(reader) = ImageReader::new(rest, kind, "fuzz", len) {
        if !kind.is_raw() {
            drain(reader, rest.len());
        }
    }
    if let Ok(reader) = ImageReader::detect(rest, "fuzz", None) {
        drain(reader, rest.len());
    }
});
