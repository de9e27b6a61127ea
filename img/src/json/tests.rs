//! Every message of the schema, every image kind: our JSON against crit's.
//!
//! Each image is built from messages whose every field is set (annotated fields with values that
//! exercise their printing), written with our encoder, then decoded by crit and by us in both
//! modes. Fields are matched by number, so that the only differences allowed are the documented
//! ones: fields crit 3.17 does not know (we print them, it cannot) and fields it names
//! differently (the pagemap page count, whose old field 3.17 calls `nr_pages`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use prost::Message as _;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage as _, Value,
};
use serde_json::Value as Json;

use super::{decode_image, encode_image};
use crate::format::{self, Layout};
use crate::schema::Schema;

const CRIT: &str = "/usr/bin/crit";
const CRIT_PYTHON: &str = "/usr/bin/python3";

fn crit_available() -> bool {
    if Path::new(CRIT).exists() {
        return true;
    }
    eprintln!("skipped: {CRIT} is not installed (Debian package criu provides it)");
    false
}

/// crit's schema: message name (without package) -> field number -> field name.
fn crit_fields() -> HashMap<String, HashMap<u32, String>> {
    let script = r#"
import json, pycriu.images.pb as pb
out = {}
def walk(d):
    out[d.full_name] = {f.number: f.name for f in d.fields}
    for n in d.nested_types:
        walk(n)
for name in dir(pb):
    o = getattr(pb, name)
    if hasattr(o, 'DESCRIPTOR') and hasattr(o.DESCRIPTOR, 'fields'):
        walk(o.DESCRIPTOR)
print(json.dumps(out))
"#;
    let out = Command::new(CRIT_PYTHON)
        .args(["-c", script])
        .output()
        .expect("run crit's python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: HashMap<String, HashMap<String, String>> =
        serde_json::from_slice(&out.stdout).expect("crit schema JSON");
    raw.into_iter()
        .map(|(m, fields)| {
            let fields = fields
                .into_iter()
                .map(|(n, name)| (n.parse().expect("field number"), name))
                .collect();
            (m, fields)
        })
        .collect()
}

fn crit_decode(path: &Path, pretty: bool) -> Result<Json, String> {
    let mut cmd = Command::new(CRIT);
    cmd.arg("decode").arg("-i").arg(path);
    if pretty {
        cmd.arg("--pretty");
    }
    let out = cmd.output().expect("run crit");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "crit decode {}: {}",
            path.display(),
            err.lines().last().unwrap_or("")
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Kinds crit 3.17 has a magic for but no handler (PIDFD it does not know at all).
const CRIT_CANNOT_DECODE: &[&str] = &["SIGNAL", "BINFMT_MISC", "PIDFD"];

/// Fills every field of a message with a value that is easy to trace and that exercises the
/// field's annotation.
struct Filler<'a> {
    schema: &'a Schema,
}

impl Filler<'_> {
    fn message(&self, descriptor: &MessageDescriptor, depth: u32) -> DynamicMessage {
        let mut message = DynamicMessage::new(descriptor.clone());
        for field in descriptor.fields() {
            if depth > 3 && !field.is_required() {
                continue;
            }
            let value = if field.is_list() {
                let items = if self.is_ip(&field) {
                    // fe80::1 in CRIU's word order
                    vec![0x0000_80fe, 0, 0, 0x0100_0000]
                        .into_iter()
                        .map(Value::U32)
                        .collect()
                } else if matches!(field.kind(), Kind::Message(_)) {
                    vec![self.single(&field, depth)]
                } else {
                    vec![self.single(&field, depth), self.single(&field, depth + 7)]
                };
                Value::List(items)
            } else {
                self.single(&field, depth)
            };
            message.set_field(&field, value);
        }
        message
    }

    fn is_ip(&self, field: &FieldDescriptor) -> bool {
        self.schema.annotation(field).is_some_and(|a| a.ipadd)
    }

    fn int(&self, field: &FieldDescriptor, depth: u32) -> u64 {
        let a = self.schema.annotation(field);
        if a.is_some_and(|a| a.dev) {
            return if a.is_some_and(|a| a.odev) {
                0x801
            } else {
                (8 << 20) | 1
            };
        }
        if a.is_some_and(|a| a.flags.is_some()) {
            // known bits plus one no table names, all of which crit 3.17 also knows
            return 0x1003;
        }
        if a.is_some_and(|a| a.dict.is_some()) {
            return 1;
        }
        u64::from(field.number()) + u64::from(depth) * 100 + 3
    }

    fn single(&self, field: &FieldDescriptor, depth: u32) -> Value {
        let n = self.int(field, depth);
        let small = u32::try_from(n).expect("small test value");
        match field.kind() {
            Kind::Message(m) => Value::Message(self.message(&m, depth + 1)),
            Kind::Enum(e) => Value::EnumNumber(e.values().next().map_or(0, |v| v.number())),
            Kind::Bool => Value::Bool(true),
            Kind::String => Value::String(format!("{}-é-\"{}\"", field.name(), n)),
            Kind::Bytes => {
                let mut bytes: Vec<u8> = (0..100u8).map(|b| b.wrapping_mul(37)).collect();
                bytes[0] = 0;
                bytes[1] = b'=';
                Value::Bytes(bytes.into())
            }
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                Value::I32(-i32::try_from(small).expect("small"))
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(-i64::from(small)),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(small),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(n | 0x7f00_0000_0000),
            Kind::Float => Value::F32(1.5),
            Kind::Double => Value::F64(2.5),
        }
    }
}

fn u64_of(message: &DynamicMessage, name: &str) -> usize {
    super::u64_field(message, name)
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(0)
}

/// Sets length fields that say how much payload follows to small values.
fn set_len(message: &mut DynamicMessage, name: &str, len: u64) {
    if let Some(field) = message.descriptor().get_field_by_name(name) {
        let value = match field.kind() {
            Kind::Uint32 | Kind::Fixed32 => Value::U32(u32::try_from(len).expect("small")),
            Kind::Int32 | Kind::Sint32 => Value::I32(i32::try_from(len).expect("small")),
            Kind::Int64 | Kind::Sint64 => Value::I64(i64::try_from(len).expect("small")),
            _ => Value::U64(len),
        };
        message.set_field(&field, value);
    }
}

fn frame(out: &mut Vec<u8>, message: &DynamicMessage) {
    let body = message.encode_to_vec();
    out.extend_from_slice(&u32::try_from(body.len()).expect("small").to_le_bytes());
    out.extend_from_slice(&body);
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An image of this kind with two entries (one for ghost files), every field set.
fn build_image(schema: &Schema, fmt: &format::Format, chunked_ghost: bool) -> Option<Vec<u8>> {
    let filler = Filler { schema };
    let first = schema.message(fmt.message).ok()?;
    let mut out = Vec::new();
    if let Some(h) = fmt.header {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out.extend_from_slice(&fmt.magic.to_le_bytes());
    match fmt.layout {
        Layout::Pagemap => {
            frame(&mut out, &filler.message(&first, 0));
            let entry = schema.message(fmt.rest).ok()?;
            let mut m = filler.message(&entry, 0);
            // the two page counts must agree for the images we write
            set_len(&mut m, "nr_pages", 5);
            set_len(&mut m, "compat_nr_pages", 5);
            frame(&mut out, &m);
        }
        Layout::GhostFile => {
            let mut m = filler.message(&first, 0);
            let chunks = m.descriptor().get_field_by_name("chunks")?;
            m.set_field(&chunks, Value::Bool(chunked_ghost));
            frame(&mut out, &m);
            if chunked_ghost {
                let chunk = schema.message(fmt.rest).ok()?;
                let mut c = filler.message(&chunk, 0);
                set_len(&mut c, "len", 9);
                frame(&mut out, &c);
                out.extend(payload(9, 1));
            } else {
                out.extend(payload(130, 2));
            }
        }
        Layout::IpcMsg => {
            let mut m = filler.message(&first, 0);
            set_len(&mut m, "qnum", 2);
            frame(&mut out, &m);
            let queued = schema.message("criu.ipc_msg").ok()?;
            for (seed, size) in [(1u8, 5u64), (2, 8)] {
                let mut q = filler.message(&queued, 0);
                set_len(&mut q, "msize", size);
                frame(&mut out, &q);
                let size = usize::try_from(size).expect("small");
                out.extend(payload(size, seed));
                out.extend(vec![0u8; size.next_multiple_of(8) - size]);
            }
        }
        layout => {
            for seed in 0..2u8 {
                let mut m = filler.message(&first, u32::from(seed));
                match layout {
                    Layout::Payload(fields) => {
                        for (i, f) in fields.iter().enumerate() {
                            set_len(&mut m, f, 3 + i as u64 * 2 + u64::from(seed));
                        }
                        let len: usize = fields.iter().map(|f| u64_of(&m, f)).sum();
                        frame(&mut out, &m);
                        out.extend(payload(len, seed));
                    }
                    Layout::TcpStream => {
                        set_len(&mut m, "inq_len", 4);
                        set_len(&mut m, "outq_len", 6);
                        frame(&mut out, &m);
                        out.extend(payload(10, seed));
                    }
                    Layout::IpcShm => {
                        set_len(&mut m, "size", 5);
                        frame(&mut out, &m);
                        out.extend(payload(5, seed));
                        out.extend([0u8; 3]);
                    }
                    Layout::IpcSem => {
                        set_len(&mut m, "nsems", 3);
                        frame(&mut out, &m);
                        out.extend(payload(6, seed));
                        out.extend([0u8; 2]);
                    }
                    _ => frame(&mut out, &m),
                }
            }
        }
    }
    Some(out)
}

thread_local! {
    /// Fields we print that crit 3.17 lacks or names differently, reported by the test.
    static EXTRA_KEYS: std::cell::RefCell<std::collections::BTreeSet<String>> =
        std::cell::RefCell::default();
}

/// Compares our object for `descriptor` with crit's, field by field number.
fn compare(
    crit_schema: &HashMap<String, HashMap<u32, String>>,
    descriptor: &MessageDescriptor,
    ours: &Json,
    theirs: &Json,
    path: &str,
    diffs: &mut Vec<String>,
) {
    let (Some(ours), Some(theirs)) = (ours.as_object(), theirs.as_object()) else {
        diffs.push(format!("{path}: not both objects"));
        return;
    };
    let Some(known) = crit_schema.get(descriptor.name()) else {
        diffs.push(format!("{path}: crit has no message {}", descriptor.name()));
        return;
    };
    let mut matched = Vec::new();
    for (key, value) in ours {
        if key == "extra" {
            matched.push(key.clone());
            if theirs.get("extra") != Some(value) {
                diffs.push(format!(
                    "{path}.extra: ours {value} crit {:?}",
                    theirs.get("extra")
                ));
            }
            continue;
        }
        let Some(field) = descriptor.get_field_by_name(key) else {
            diffs.push(format!("{path}.{key}: not in our schema"));
            continue;
        };
        // a field crit 3.17 does not know: the documented extra key
        let Some(crit_name) = known.get(&field.number()) else {
            EXTRA_KEYS.with(|k| k.borrow_mut().insert(field.full_name().to_owned()));
            continue;
        };
        if crit_name != key {
            EXTRA_KEYS.with(|k| {
                k.borrow_mut()
                    .insert(format!("{} (crit: {crit_name})", field.full_name()))
            });
        }
        matched.push(crit_name.clone());
        let Some(their_value) = theirs.get(crit_name) else {
            diffs.push(format!("{path}.{key}: crit does not print it"));
            continue;
        };
        let here = format!("{path}.{key}");
        match (field.kind(), value, their_value) {
            (Kind::Message(m), Json::Array(a), Json::Array(b)) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    compare(crit_schema, &m, x, y, &format!("{here}[{i}]"), diffs);
                }
            }
            (Kind::Message(m), Json::Object(_), Json::Object(_)) => {
                compare(crit_schema, &m, value, their_value, &here, diffs);
            }
            _ if value == their_value => {}
            _ => diffs.push(format!("{here}: ours {value} crit {their_value}")),
        }
    }
    for key in theirs.keys() {
        if !matched.contains(key) {
            diffs.push(format!("{path}.{key}: only crit prints it"));
        }
    }
}

fn compare_images(
    schema: &Schema,
    crit_schema: &HashMap<String, HashMap<u32, String>>,
    fmt: &format::Format,
    ours: &Json,
    theirs: &Json,
    diffs: &mut Vec<String>,
) {
    if ours.get("magic") != theirs.get("magic") {
        diffs.push(format!(
            "{}: magic {:?} vs {:?}",
            fmt.name,
            ours.get("magic"),
            theirs.get("magic")
        ));
    }
    let empty = Vec::new();
    let a = ours
        .get("entries")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    let b = theirs
        .get("entries")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    if a.len() != b.len() {
        diffs.push(format!(
            "{}: {} entries vs crit's {}",
            fmt.name,
            a.len(),
            b.len()
        ));
        return;
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let message = if i == 0 { fmt.message } else { fmt.rest };
        let descriptor = schema.message(message).expect("message exists");
        compare(
            crit_schema,
            &descriptor,
            x,
            y,
            &format!("{}[{i}]", fmt.name),
            diffs,
        );
    }
}

#[test]
fn every_image_kind_round_trips_through_json() {
    let schema = Schema::images().expect("schema");
    let mut tested = Vec::new();
    for fmt in &format::all() {
        for chunked in [true, false] {
            if !chunked && fmt.layout != Layout::GhostFile {
                continue;
            }
            let Some(bytes) = build_image(&schema, fmt, chunked) else {
                panic!("{}: no image built", fmt.name);
            };
            for pretty in [false, true] {
                let json = decode_image(&schema, &bytes, pretty)
                    .unwrap_or_else(|e| panic!("{}: {e:#?}", fmt.name));
                let again = encode_image(&schema, &json)
                    .unwrap_or_else(|e| panic!("{} (pretty {pretty}): {e:#?}", fmt.name));
                assert!(
                    again == bytes,
                    "{} (pretty {pretty}): bytes changed",
                    fmt.name
                );
            }
            tested.push(fmt.name);
        }
    }
    assert!(tested.len() > 60, "too few kinds: {tested:?}");
}

#[test]
fn every_image_kind_decodes_as_crit_does() {
    if !crit_available() {
        return;
    }
    let schema = Schema::images().expect("schema");
    let crit_schema = crit_fields();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut diffs = Vec::new();
    let mut tested = Vec::new();
    for fmt in &format::all() {
        let short = fmt.message.trim_start_matches("criu.");
        if !crit_schema.contains_key(short) || CRIT_CANNOT_DECODE.contains(&fmt.name) {
            eprintln!("not compared (crit 3.17 cannot decode it): {}", fmt.name);
            continue;
        }
        for chunked in [true, false] {
            if !chunked && fmt.layout != Layout::GhostFile {
                continue;
            }
            let Some(bytes) = build_image(&schema, fmt, chunked) else {
                panic!("{}: no image built", fmt.name);
            };
            let path = dir.path().join(format!("{}-{chunked}.img", fmt.name));
            std::fs::write(&path, &bytes).expect("write image");
            for pretty in [false, true] {
                let ours = decode_image(&schema, &bytes, pretty)
                    .unwrap_or_else(|e| panic!("{}: {e:#?}", fmt.name));
                match crit_decode(&path, pretty) {
                    Ok(theirs) => {
                        compare_images(&schema, &crit_schema, fmt, &ours, &theirs, &mut diffs)
                    }
                    Err(e) => diffs.push(e),
                }
            }
            tested.push(fmt.name);
        }
    }
    eprintln!("compared with crit: {tested:?}");
    EXTRA_KEYS.with(|k| {
        eprintln!(
            "fields crit 3.17 lacks or names otherwise: {:?}",
            k.borrow()
        )
    });
    assert!(tested.len() > 60, "too few kinds compared: {tested:?}");
    assert!(
        diffs.is_empty(),
        "differences from crit:\n{}",
        diffs.join("\n")
    );
}

/// A small deterministic generator, so that failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).expect("small")).expect("small")
    }
}

#[test]
fn damaged_images_of_every_kind_are_errors_not_panics() {
    let schema = Schema::images().expect("schema");
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut decoded = 0usize;
    let mut refused = 0usize;
    for fmt in &format::all() {
        let Some(bytes) = build_image(&schema, fmt, true) else {
            continue;
        };
        let mut variants: Vec<Vec<u8>> = (0..bytes.len().min(200))
            .map(|n| bytes[..n].to_vec())
            .collect();
        for _ in 0..200 {
            let mut v = bytes.clone();
            for _ in 0..=rng.below(3) {
                let i = rng.below(v.len());
                v[i] = u8::try_from(rng.next() & 0xff).expect("byte");
            }
            variants.push(v);
        }
        for v in variants {
            for pretty in [false, true] {
                match decode_image(&schema, &v, pretty) {
                    Ok(json) => {
                        decoded += 1;
                        // whatever decodes must encode again without panicking
                        let _ = encode_image(&schema, &json);
                    }
                    Err(_) => refused += 1,
                }
            }
        }
    }
    assert!(
        decoded > 0 && refused > 0,
        "decoded {decoded}, refused {refused}"
    );
}

#[test]
fn malformed_json_is_an_error() {
    let schema = Schema::images().expect("schema");
    let cases = [
        serde_json::json!([]),
        serde_json::json!({"magic": "NOPE", "entries": []}),
        serde_json::json!({"magic": "PSTREE"}),
        serde_json::json!({"magic": "PSTREE", "entries": [{"pid": 1}]}),
        serde_json::json!({"magic": "PSTREE", "entries": [{"pid": "x", "ppid": 0, "pgid": 1, "sid": 1}]}),
        serde_json::json!({"magic": "PSTREE", "entries": [{"pid": -1, "ppid": 0, "pgid": 1, "sid": 1}]}),
        serde_json::json!({"magic": "PSTREE", "entries": [{"pid": 4294967296_u64, "ppid": 0, "pgid": 1, "sid": 1}]}),
        serde_json::json!({"magic": "PSTREE", "entries": [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": 5}]}),
        serde_json::json!({"magic": "VMAS", "entries": [{"start": 0, "end": 0, "pgoff": 0, "shmid": 0,
            "prot": "PROT_BOGUS", "flags": 0, "status": 0, "fd": -1}]}),
        serde_json::json!({"magic": "PIPES_DATA", "entries": [{"pipe_id": 1, "bytes": 1, "extra": 5}]}),
        serde_json::json!({"magic": "CORE", "entries": [{"mtype": "NOT_AN_ARCH"}]}),
        serde_json::json!({"magic": "PIPES_DATA", "entries": [{"pipe_id": 1, "bytes": 4, "extra": "YWJj\n"}]}),
        serde_json::json!({"magic": "PIPES_DATA", "entries": [{"pipe_id": 1, "bytes": 4}]}),
    ];
    for case in cases {
        assert!(encode_image(&schema, &case).is_err(), "accepted {case}");
    }
    // crit's conventions that are accepted
    let ok = serde_json::json!({"magic": "PSTREE", "entries": [
        {"pid": "0x10", "ppid": "0o7", "pgid": "1_000", "sid": 1, "unknown_key": [1, 2]}]});
    let bytes = encode_image(&schema, &ok).expect("accepted");
    let back = decode_image(&schema, &bytes, false).expect("decodes");
    assert_eq!(
        back["entries"][0],
        serde_json::json!({"pid": 16, "ppid": 7, "pgid": 1000, "sid": 1})
    );
}
