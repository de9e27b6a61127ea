//! Every message of every image kind survives encode -> frame -> read back, with nothing
//! lost between the schema and the generated types.

mod common;

use std::fmt::Debug;

use common::{arbitrary_message, kind_messages, pool, Entropy};
use images_format::entry::payload_layout;
use images_format::{pb, ImageKind, ImageReader, ImageWriter, PayloadLayout};
use proptest::prelude::*;
use prost::{Message, Name};
use prost_reflect::{DynamicMessage, MessageDescriptor};

fn name_of<M: Name>() -> String {
    M::full_name()
}

#[test]
fn every_kind_names_a_message_of_the_schema_and_its_type() {
    let pool = pool();
    for (kind, name) in kind_messages() {
        assert!(
            pool.get_message_by_name(&name).is_some(),
            "{kind:?}: {name}"
        );
    }
    for kind in ImageKind::all() {
        let typed = with_message_type!(kind, name_of(), String::new());
        assert_eq!(kind.message_name().unwrap_or(""), typed, "{kind:?}");
    }
    assert_eq!(pb::PagemapHead::full_name(), "criu.pagemap_head");
}

fn round_trip<M>(
    kind: ImageKind,
    desc: &MessageDescriptor,
    dynamic: &DynamicMessage,
) -> Result<(), TestCaseError>
where
    M: Message + Default + PartialEq + Debug,
{
    let bytes = dynamic.encode_to_vec();
    let typed =
        M::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(format!("{kind:?}: {e}")))?;

    let payload = match payload_layout(kind, 1, &bytes) {
        Ok(PayloadLayout::Bytes(n)) if n <= 1 << 16 => {
            Some((0..n).map(|i| i as u8).collect::<Vec<u8>>())
        }
        _ => None,
    };
    let mut w = ImageWriter::new(Vec::new(), kind, "image").unwrap();
    // The first entry of a ghost file has its own layout; test the common one twice.
    if kind == ImageKind::GhostFile {
        w.write_entry(&pb::GhostFileEntry {
            chunks: Some(true),
            ..Default::default()
        })
        .unwrap();
    }
    for _ in 0..2 {
        w.write_entry(&typed).unwrap();
        if let Some(p) = &payload {
            w.write_payload(p).unwrap();
        }
    }
    let image = w.finish().unwrap();

    let len = image.len() as u64;
    let mut r = ImageReader::new(image.as_slice(), kind, "image", Some(len)).unwrap();
    if kind == ImageKind::GhostFile {
        r.read_raw_entry().unwrap();
    }
    if let Some(p) = &payload {
        for _ in 0..2 {
            let entry = r.read_entry_with_payload().unwrap().expect("an entry");
            prop_assert_eq!(&M::decode(entry.message.as_slice()).unwrap(), &typed);
            prop_assert_eq!(&entry.payload, p);
        }
    } else {
        for _ in 0..2 {
            let back: M = r.read_entry().unwrap().expect("an entry");
            prop_assert_eq!(&back, &typed);
        }
    }
    prop_assert_eq!(r.read_raw_entry().unwrap(), None);
    prop_assert_eq!(r.remaining(), Some(0));

    // Nothing the schema holds was dropped by the generated type.
    let again = DynamicMessage::decode(desc.clone(), typed.encode_to_vec().as_slice()).unwrap();
    prop_assert_eq!(&again, dynamic, "{:?}", kind);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(data in proptest::collection::vec(any::<u64>(), 0..400)) {
        let pool = pool();
        for kind in ImageKind::all() {
            let Some(name) = kind.message_name() else { continue };
            let desc = pool.get_message_by_name(name).unwrap();
            let dynamic = arbitrary_message(&desc, &mut Entropy::new(&data), 0);
            with_message_type!(kind, round_trip(kind, &desc, &dynamic), Ok(()))?;
        }
        let head = pool.get_message_by_name("criu.pagemap_head").unwrap();
        let dynamic = arbitrary_message(&head, &mut Entropy::new(&data), 0);
        let typed = pb::PagemapHead::decode(dynamic.encode_to_vec().as_slice()).unwrap();
        let again = DynamicMessage::decode(head, typed.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(again, dynamic);
    }
}
