//! `ckpt-img decode` and `encode` from the command line: agreement with crit on images crit
//! encoded from hand-written JSON, byte-exact round trips, and crit's behaviour on raw images.

mod fixture;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use fixture::{write_images, BINARY};
use serde_json::Value;

const CRIT: &str = "/usr/bin/crit";

fn crit_available() -> bool {
    if Path::new(CRIT).exists() {
        return true;
    }
    eprintln!("skipped: {CRIT} is not installed (Debian package criu provides it)");
    false
}

fn ok(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ours(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run ckpt-img")
}

fn crit(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(CRIT).args(args).output().expect("run crit")
}

fn decode_args(path: &Path, pretty: bool) -> Vec<&std::ffi::OsStr> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["decode".as_ref(), "-i".as_ref(), path.as_os_str()];
    if pretty {
        args.push("--pretty".as_ref());
    }
    args
}

fn data_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("test data")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

/// crit 3.17 prints the old u32 page count of pagemap entries as `nr_pages`; we print it as
/// `compat_nr_pages` (CRIU's current name) and `nr_pages` is the u64 field 5, absent here.
fn rename_old_page_count(image: &mut Value) {
    if image["magic"] != "PAGEMAP" {
        return;
    }
    if let Some(entries) = image["entries"].as_array_mut() {
        for entry in entries.iter_mut().skip(1) {
            if let Some(object) = entry.as_object_mut() {
                if let Some(count) = object.remove("nr_pages") {
                    object.insert("compat_nr_pages".into(), count);
                }
            }
        }
    }
}

#[test]
fn crit_encoded_images_decode_as_crit_decodes_them() {
    if !crit_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    for json in data_files() {
        let name = json
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        let image = tmp.path().join(format!("{name}.img"));
        ok(
            crit(&[
                "encode".as_ref(),
                "-i".as_ref(),
                json.as_os_str(),
                "-o".as_ref(),
                image.as_os_str(),
            ]),
            &format!("crit encode {name}"),
        );
        for pretty in [false, true] {
            let theirs = ok(crit(&decode_args(&image, pretty)), "crit decode");
            let mine = ok(ours(&decode_args(&image, pretty)), "ckpt-img decode");
            let mut theirs: Value = serde_json::from_slice(&theirs).expect("crit JSON");
            let mine: Value = serde_json::from_slice(&mine).expect("our JSON");
            rename_old_page_count(&mut theirs);
            assert_eq!(mine, theirs, "{name} (pretty: {pretty})");
        }
        // our encoder reads the same hand-written JSON; pagemaps gain the u64 page count
        let ours_image = tmp.path().join(format!("{name}.ours.img"));
        ok(
            ours(&[
                "encode".as_ref(),
                "-i".as_ref(),
                json.as_os_str(),
                "-o".as_ref(),
                ours_image.as_os_str(),
            ]),
            &format!("ckpt-img encode {name}"),
        );
        let (a, b) = (
            std::fs::read(&image).expect("read"),
            std::fs::read(&ours_image).expect("read"),
        );
        if name == "pagemap" {
            assert!(b.len() > a.len(), "pagemap entries carry both page counts");
        } else {
            assert_eq!(a, b, "{name}: our encoding differs from crit's");
        }
    }
}

#[test]
fn pretty_output_is_byte_identical_to_crit() {
    if !crit_available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let json = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/core.json");
    let image = tmp.path().join("core.img");
    ok(
        crit(&[
            "encode".as_ref(),
            "-i".as_ref(),
            json.as_os_str(),
            "-o".as_ref(),
            image.as_os_str(),
        ]),
        "crit encode",
    );
    for pretty in [false, true] {
        let theirs = ok(crit(&decode_args(&image, pretty)), "crit decode");
        let mine = ok(ours(&decode_args(&image, pretty)), "ckpt-img decode");
        assert_eq!(
            String::from_utf8_lossy(&mine),
            String::from_utf8_lossy(&theirs)
        );
    }
}

/// decode then encode, through files and through pipes, plain and pretty.
fn round_trip(image: &Path, scratch: &Path) {
    let original = std::fs::read(image).expect("read image");
    for pretty in [false, true] {
        let json = scratch.join("image.json");
        let mut args = decode_args(image, pretty);
        args.extend(["-o".as_ref(), json.as_os_str()]);
        ok(ours(&args), &format!("decode {}", image.display()));
        let back = scratch.join("back.img");
        ok(
            ours(&[
                "encode".as_ref(),
                "-i".as_ref(),
                json.as_os_str(),
                "-o".as_ref(),
                back.as_os_str(),
            ]),
            &format!("encode {}", image.display()),
        );
        assert_eq!(
            std::fs::read(&back).expect("read back"),
            original,
            "{} (pretty: {pretty}) via files",
            image.display()
        );

        let decoded = ok(ours(&decode_args(image, pretty)), "decode to stdout");
        let mut child = Command::new(BINARY)
            .arg("encode")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn encode");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&decoded)
            .expect("feed JSON");
        let encoded = ok(
            child.wait_with_output().expect("encode"),
            "encode from stdin",
        );
        assert_eq!(
            encoded,
            original,
            "{} (pretty: {pretty}) via pipes",
            image.display()
        );
    }
}

#[test]
fn decode_encode_round_trips_every_image_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tmp.path().join("images");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).expect("scratch dir");
    write_images(&images);
    let mut count = 0;
    for entry in std::fs::read_dir(&images).expect("list") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.starts_with("pages-") {
            continue;
        }
        round_trip(&path, &scratch);
        count += 1;
    }
    assert!(count >= 10, "only {count} images");
    if crit_available() {
        for json in data_files() {
            let image = scratch.join("crit.img");
            ok(
                crit(&[
                    "encode".as_ref(),
                    "-i".as_ref(),
                    json.as_os_str(),
                    "-o".as_ref(),
                    image.as_os_str(),
                ]),
                "crit encode",
            );
            // crit's pagemap has only the old page count; ours always writes both
            if !json.ends_with("pagemap.json") {
                round_trip(&image, &scratch);
            }
        }
    }
}

#[test]
fn raw_pages_images_are_refused_as_crit_refuses_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pages = tmp.path().join("pages-1.img");
    let mut bytes = vec![0u8; 8192];
    bytes[..4].copy_from_slice(&0x37ce_701a_u32.to_le_bytes());
    std::fs::write(&pages, &bytes).expect("write pages");
    let out = ours(&decode_args(&pages, false));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown magic 0x37ce701a"), "{err}");
    if crit_available() {
        let out = crit(&decode_args(&pages, false));
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown magic 0x37ce701a"));
    }
}

#[test]
fn damaged_images_are_errors_not_panics() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_images(tmp.path());
    let original = std::fs::read(tmp.path().join("core-100.img")).expect("read");
    let damaged = tmp.path().join("damaged.img");
    // every truncation, and every byte flipped in turn
    let mut variants: Vec<Vec<u8>> = (0..original.len())
        .map(|n| original[..n].to_vec())
        .collect();
    for i in 0..original.len() {
        let mut v = original.clone();
        v[i] ^= 0xff;
        variants.push(v);
    }
    for bytes in variants {
        std::fs::write(&damaged, &bytes).expect("write");
        let out = ours(&decode_args(&damaged, true));
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(1),
            "exit {code:?} for {bytes:?}"
        );
        if code == Some(1) {
            assert!(String::from_utf8_lossy(&out.stderr).starts_with("ckpt-img: "));
        }
    }
}
