//! Interoperability with CRIU's own decoder, `crit`: images we write decode there to the
//! values we wrote, and images crit encodes from hand-written JSON read back here.
//! Skipped, with a printed reason, where crit is not installed.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use base64::Engine;
use common::{arbitrary_message, pool, Entropy};
use images_format::{pb, ImageDir, ImageKind, ImageWriter, Pagemap, Payload};
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use serde_json::Value as Json;

fn crit() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join("crit"))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("skipped: crit is not installed (apt install criu provides it)");
    }
    found
}

/// Kinds the installed crit (3.17) has no decoder for.
const CRIT_LACKS: &[ImageKind] = &[
    // no magic in crit 3.17
    ImageKind::Pidfd,
    // magic known, no entry handler
    ImageKind::SignalShared,
    ImageKind::SignalPrivate,
    ImageKind::BinfmtMisc,
    ImageKind::BinfmtMiscOld,
    // crit turns unix socket names into bytes that its JSON writer then rejects
    ImageKind::Unixsk,
];

/// Fields of our schema (CRIU's current one) that crit 3.17's older schema does not know:
/// it keeps them as unknown fields and prints nothing for them.
const NEWER_THAN_CRIT: &[&str] = &[
    "criu.pagemap_entry.nr_pages",
    "criu.cg_controller_entry.is_threaded",
    "criu.core_entry.ti_loongarch64",
    "criu.core_entry.ti_riscv64",
    "criu.thread_info_aarch64.pac_keys",
    "criu.creds_entry.cap_amb",
    "criu.creds_entry.no_new_privs",
    "criu.file_entry.pidfd",
    "criu.inet_sk_entry.tcp_opts",
    "criu.inventory_entry.allow_uprobes",
    "criu.inventory_entry.dump_criu_run_id",
    "criu.inventory_entry.plugins_entry",
    "criu.ip_opts_entry.pktinfo",
    "criu.ip_opts_entry.tos",
    "criu.ip_opts_entry.ttl",
    "criu.memfd_inode_entry.mode",
    "criu.netns_entry.ipv4_sysctl",
    "criu.task_core_entry.membarrier_registration_mask",
    "criu.task_core_entry.stop_signo",
    "criu.thread_core_entry.cg_set",
];

/// ckpt's own fields (numbers from `EXTENSION_FIELDS_START` up), which no CRIU knows: crit
/// keeps them as unknown fields and prints nothing for them.
const CKPT_EXTENSIONS: &[&str] = &[
    "criu.task_core_entry.mdwe_flags",
    "criu.thread_core_entry.cpu_affinity",
    "criu.thread_core_entry.timer_slack_ns",
    "criu.thread_core_entry.ioprio",
    "criu.dump_stats_entry.cow_shared_bytes",
];

/// Fields crit 3.17 knows under their old name: the u32 page count was `nr_pages` before
/// the u64 field took that name (crit then lacks the new field, see NEWER_THAN_CRIT).
const RENAMED_IN_CRIT: &[(&str, &str)] = &[("criu.pagemap_entry.compat_nr_pages", "nr_pages")];

/// The key crit prints a field under; `None` for fields it does not know.
fn crit_key(field: &prost_reflect::FieldDescriptor) -> Option<&str> {
    if NEWER_THAN_CRIT.contains(&field.full_name()) || CKPT_EXTENSIONS.contains(&field.full_name())
    {
        return None;
    }
    let key = RENAMED_IN_CRIT
        .iter()
        .find(|(ours, _)| *ours == field.full_name())
        .map_or(field.name(), |(_, theirs)| theirs);
    Some(key)
}

/// splitmix64: fixed, well-spread numbers for the generator.
fn numbers(seed: u64, n: usize) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .collect()
}

fn set(msg: &mut DynamicMessage, field: &str, value: Value) {
    let f = msg
        .descriptor()
        .get_field_by_name(field)
        .unwrap_or_else(|| panic!("no field {field}"));
    msg.set_field(&f, value);
}

/// Makes the payload length fields of an entry small, and returns the payload to write.
fn fix_payload(kind: ImageKind, msg: &mut DynamicMessage, seed: u64) -> Vec<u8> {
    let n = 1 + (seed % 40) as u32;
    let bytes = |len: u64| {
        (0..len)
            .map(|i| (i as u8) ^ (seed as u8))
            .collect::<Vec<u8>>()
    };
    match kind.payload() {
        Payload::None => Vec::new(),
        Payload::PipeData => {
            set(msg, "bytes", Value::U32(n));
            bytes(n.into())
        }
        Payload::SkQueue => {
            set(msg, "length", Value::U32(n));
            bytes(n.into())
        }
        Payload::TcpQueues => {
            set(msg, "inq_len", Value::U32(n));
            set(msg, "outq_len", Value::U32(n + 3));
            bytes(u64::from(2 * n + 3))
        }
        Payload::BpfmapData => {
            set(msg, "keys_bytes", Value::U32(n));
            set(msg, "values_bytes", Value::U32(2 * n));
            bytes(u64::from(3 * n))
        }
        Payload::IpcShm => {
            set(msg, "size", Value::U64(n.into()));
            let mut p = bytes(n.into());
            p.resize(n.next_multiple_of(4) as usize, 0);
            p
        }
        Payload::IpcSem => {
            set(msg, "nsems", Value::U32(n));
            let mut p = bytes(u64::from(2 * n));
            p.resize((2 * n).next_multiple_of(8) as usize, 0);
            p
        }
        Payload::IpcMsg => {
            set(msg, "qnum", Value::U32(0));
            Vec::new()
        }
        Payload::Ghost => {
            set(msg, "chunks", Value::Bool(false));
            bytes(n.into())
        }
    }
}

/// Compares our message with crit's JSON of it (not pretty). Fields crit does not print are
/// collected in `missing`.
fn compare(
    msg: &DynamicMessage,
    json: &Json,
    path: &str,
    missing: &mut BTreeSet<String>,
) -> Result<(), String> {
    let obj = json
        .as_object()
        .ok_or_else(|| format!("{path}: not an object: {json}"))?;
    for key in obj.keys() {
        let ours = msg
            .fields()
            .any(|(f, _)| crit_key(&f) == Some(key.as_str()));
        if key != "extra" && !ours {
            return Err(format!(
                "{path}.{key}: crit printed a field we did not write"
            ));
        }
    }
    for (field, value) in msg.fields() {
        let at = format!("{path}.{}", field.name());
        let Some(j) = crit_key(&field).and_then(|key| obj.get(key)) else {
            missing.insert(field.full_name().to_owned());
            continue;
        };
        compare_value(&field.kind(), value, j, &at, missing)?;
    }
    Ok(())
}

fn compare_value(
    kind: &Kind,
    value: &Value,
    j: &Json,
    at: &str,
    missing: &mut BTreeSet<String>,
) -> Result<(), String> {
    let same = match value {
        Value::List(items) => {
            let arr = j
                .as_array()
                .ok_or_else(|| format!("{at}: not a list: {j}"))?;
            if arr.len() != items.len() {
                return Err(format!(
                    "{at}: {} items, crit has {}",
                    items.len(),
                    arr.len()
                ));
            }
            for (i, (v, jv)) in items.iter().zip(arr).enumerate() {
                compare_value(kind, v, jv, &format!("{at}[{i}]"), missing)?;
            }
            return Ok(());
        }
        Value::Message(m) => return compare(m, j, at, missing),
        Value::EnumNumber(n) => {
            let Kind::Enum(e) = kind else { unreachable!() };
            let name = e.get_value(*n).map(|v| v.name().to_owned());
            j.as_str().map(str::to_owned) == name
        }
        Value::Bytes(b) => {
            let text: String = j
                .as_str()
                .unwrap_or("")
                .chars()
                .filter(|c| *c != '\n')
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()
                .as_deref()
                == Some(&b[..])
        }
        Value::String(s) => j.as_str() == Some(s.as_str()),
        Value::Bool(b) => j.as_bool() == Some(*b),
        Value::U32(v) => j.as_u64() == Some(u64::from(*v)),
        Value::U64(v) => j.as_u64() == Some(*v),
        Value::I32(v) => j.as_i64() == Some(i64::from(*v)),
        Value::I64(v) => j.as_i64() == Some(*v),
        other => return Err(format!("{at}: no such values in the schema: {other:?}")),
    };
    if same {
        Ok(())
    } else {
        Err(format!("{at}: we wrote {value:?}, crit read {j}"))
    }
}

fn crit_decode(crit: &PathBuf, file: &std::path::Path) -> Result<Json, String> {
    let out = Command::new(crit)
        .arg("decode")
        .arg("-i")
        .arg(file)
        .output()
        .map_err(|e| format!("run crit: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "crit decode {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("crit printed no JSON: {e}"))
}

fn decoded_extra(kind: ImageKind, extra: &Json) -> Option<Vec<u8>> {
    let b64 = |j: &Json| {
        let text: String = j.as_str()?.chars().filter(|c| *c != '\n').collect();
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    };
    match kind.payload() {
        Payload::TcpQueues => {
            let mut v = b64(extra.get("inq")?)?;
            v.extend(b64(extra.get("outq")?)?);
            Some(v)
        }
        Payload::IpcSem => {
            let mut v: Vec<u8> = extra
                .as_array()?
                .iter()
                .flat_map(|x| (x.as_u64().unwrap_or(u64::MAX) as u16).to_le_bytes())
                .collect();
            v.resize(v.len().next_multiple_of(8), 0);
            Some(v)
        }
        Payload::IpcShm => {
            let mut v = b64(extra)?;
            v.resize(v.len().next_multiple_of(4), 0);
            Some(v)
        }
        _ => b64(extra),
    }
}

#[test]
fn crit_decodes_what_we_write() {
    let Some(crit) = crit() else { return };
    let pool = pool();
    let tmp = tempfile::tempdir().unwrap();
    let mut missing = BTreeSet::new();
    let mut checked = 0;
    for kind in ImageKind::all().filter(|k| !k.is_raw() && !CRIT_LACKS.contains(k)) {
        for seed in 0..4u64 {
            let data = numbers(seed * 1000 + kind as u64, 600);
            let desc = pool
                .get_message_by_name(kind.message_name().unwrap())
                .unwrap();
            let mut entries = Vec::new();
            if let Some(head) = kind.head_message_name() {
                let head = pool.get_message_by_name(head).unwrap();
                entries.push((
                    arbitrary_message(&head, &mut Entropy::new(&data[300..]), 0),
                    Vec::new(),
                ));
            }
            let count = if kind.payload() == Payload::Ghost {
                1
            } else {
                2
            };
            for i in 0..count {
                let mut msg = arbitrary_message(&desc, &mut Entropy::new(&data[i * 150..]), 0);
                if kind == ImageKind::Files {
                    // crit cannot print unix socket names (see CRIT_LACKS)
                    if let Some(f) = desc.get_field_by_name("usk") {
                        msg.clear_field(&f);
                    }
                }
                if kind == ImageKind::Core {
                    // crit's enum lacks the newer architectures; ours is x86_64 anyway
                    set(
                        &mut msg,
                        "mtype",
                        Value::EnumNumber(pb::core_entry::March::X8664 as i32),
                    );
                }
                let payload = fix_payload(kind, &mut msg, seed + i as u64);
                entries.push((msg, payload));
            }

            let path = tmp.path().join(format!("{}-{seed}", kind.file_name(1)));
            let mut w = ImageWriter::new(std::fs::File::create(&path).unwrap(), kind, "x").unwrap();
            for (msg, payload) in &entries {
                w.write_raw_entry(&msg.encode_to_vec()).unwrap();
                w.write_payload(payload).unwrap();
            }
            w.finish().unwrap();

            let json =
                crit_decode(&crit, &path).unwrap_or_else(|e| panic!("{kind:?} seed {seed}: {e}"));
            assert_eq!(json["magic"], kind.magic_name(), "{kind:?}");
            let got = json["entries"].as_array().expect("entries");
            assert_eq!(got.len(), entries.len(), "{kind:?} seed {seed}: {json}");
            for (i, ((msg, payload), j)) in entries.iter().zip(got).enumerate() {
                compare(msg, j, &format!("{kind:?}[{i}]"), &mut missing)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}\ncrit: {j}"));
                if !payload.is_empty() {
                    let extra = decoded_extra(kind, &j["extra"]);
                    assert_eq!(
                        extra.as_deref(),
                        Some(&payload[..]),
                        "{kind:?}[{i}] extra: {}",
                        j["extra"]
                    );
                }
            }
            checked += 1;
        }
    }
    let unexpected: Vec<_> = missing
        .iter()
        .filter(|m| {
            !NEWER_THAN_CRIT.contains(&m.as_str()) && !CKPT_EXTENSIONS.contains(&m.as_str())
        })
        .collect();
    assert!(unexpected.is_empty(), "crit did not print: {unexpected:?}");
    eprintln!("{checked} images decoded by crit; fields crit lacks: {missing:?}");
}

fn crit_encode(crit: &PathBuf, json: &str, out: &std::path::Path) {
    let input = out.with_extension("json");
    std::fs::write(&input, json).unwrap();
    let status = Command::new(crit)
        .arg("encode")
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "crit encode {json}");
}

#[test]
fn we_read_what_crit_encodes() {
    let Some(crit) = crit() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = ImageDir::new(tmp.path()).unwrap();
    let at = |kind: ImageKind, id: u64| dir.file_path(kind, id);

    crit_encode(
        &crit,
        r#"{"magic": "INVENTORY", "entries": [{"img_version": 2, "fdinfo_per_id": true, "ns_per_id": true,
            "root_ids": {"vm_id": 1, "files_id": 2, "fs_id": 3, "sighand_id": 4}, "lsmtype": "NO_LSM"}]}"#,
        &at(ImageKind::Inventory, 0),
    );
    let inv: pb::InventoryEntry = dir.read_one(ImageKind::Inventory, 0).unwrap();
    assert_eq!(inv.img_version, 2);
    assert_eq!(inv.root_ids.unwrap().sighand_id, 4);
    assert_eq!(inv.lsmtype(), pb::Lsmtype::NoLsm);

    crit_encode(
        &crit,
        r#"{"magic": "PSTREE", "entries": [{"pid": 100, "ppid": 0, "pgid": 100, "sid": 1, "threads": [100, 101]},
            {"pid": 102, "ppid": 100, "pgid": 100, "sid": 1, "threads": [102]}]}"#,
        &at(ImageKind::Pstree, 0),
    );
    let tree: Vec<pb::PstreeEntry> = dir.read_all(ImageKind::Pstree, 0).unwrap();
    assert_eq!(tree.len(), 2);
    assert_eq!(tree[0].threads, [100, 101]);
    assert_eq!(tree[1].ppid, 100);

    crit_encode(
        &crit,
        r#"{"magic": "CORE", "entries": [{"mtype": "X86_64",
            "thread_info": {"clear_tid_addr": 0, "gpregs": {"r15": 1, "r14": 2, "r13": 3, "r12": 4, "bp": 5,
              "bx": 6, "r11": 7, "r10": 8, "r9": 9, "r8": 10, "ax": 11, "cx": 12, "dx": 13, "si": 14, "di": 15,
              "orig_ax": 18446744073709551615, "ip": 4198400, "cs": 51, "flags": 514, "sp": 140737488346112,
              "ss": 43, "fs_base": 0, "gs_base": 0, "ds": 0, "es": 0, "fs": 0, "gs": 0, "mode": "NATIVE"},
              "fpregs": {"cwd": 895, "swd": 0, "twd": 0, "fop": 0, "rip": 0, "rdp": 0, "mxcsr": 8064,
                "mxcsr_mask": 65535, "st_space": [1, 2], "xmm_space": [3, 4],
                "xsave": {"xstate_bv": 7, "ymmh_space": [9, 10]}}},
            "tc": {"task_state": 1, "exit_code": 0, "personality": 0, "flags": 4194560, "blk_sigset": 0,
              "comm": "sleep", "sigactions": [{"sigaction": 0, "flags": 0, "restorer": 0, "mask": 0}]},
            "thread_core": {"futex_rla": 0, "futex_rla_len": 24, "sched_nice": -5, "blk_sigset": 16384}}]}"#,
        &at(ImageKind::Core, 100),
    );
    let core: pb::CoreEntry = dir.read_one(ImageKind::Core, 100).unwrap();
    assert_eq!(core.mtype(), pb::core_entry::March::X8664);
    let ti = core.thread_info.unwrap();
    assert_eq!(ti.gpregs.orig_ax, u64::MAX);
    assert_eq!(ti.gpregs.sp, 0x7fff_ffff_dc00);
    assert_eq!(ti.gpregs.mode(), pb::UserX86RegsMode::Native);
    assert_eq!(ti.fpregs.xsave.unwrap().ymmh_space, [9, 10]);
    assert_eq!(core.tc.unwrap().comm, "sleep");
    assert_eq!(core.thread_core.unwrap().sched_nice, Some(-5));

    crit_encode(
        &crit,
        r#"{"magic": "PAGEMAP", "entries": [{"pages_id": 3},
            {"vaddr": 4096, "nr_pages": 2, "flags": 4},
            {"vaddr": 16384, "nr_pages": 1, "in_parent": true}]}"#,
        &at(ImageKind::Pagemap, 100),
    );
    let mut r = dir.open(ImageKind::Pagemap, 100).unwrap();
    let map = Pagemap::read(&mut r).unwrap();
    assert_eq!(map.pages_id, 3);
    let got: Vec<_> = map
        .ranges
        .iter()
        .map(|r| (r.vaddr, r.nr_pages, r.flags.bits()))
        .collect();
    assert_eq!(got, [(4096, 2, 4), (16384, 1, 1)]);

    crit_encode(
        &crit,
        r#"{"magic": "PIPES_DATA", "entries": [{"pipe_id": 77, "bytes": 5, "size": 65536, "extra": "aGVsbG8=\n"}]}"#,
        &at(ImageKind::PipesData, 0),
    );
    let mut r = dir.open(ImageKind::PipesData, 0).unwrap();
    let e = r.read_entry_with_payload().unwrap().unwrap();
    assert_eq!(e.payload, b"hello");
    assert!(r.read_entry_with_payload().unwrap().is_none());

    crit_encode(
        &crit,
        r#"{"magic": "FILES", "entries": [{"type": "REG", "id": 5, "reg": {"id": 5, "flags": 32768, "pos": 12,
            "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}, "name": "/etc/hostname"}}]}"#,
        &at(ImageKind::Files, 0),
    );
    let f: pb::FileEntry = dir.read_one(ImageKind::Files, 0).unwrap();
    assert_eq!(f.r#type(), pb::FdTypes::Reg);
    assert_eq!(f.reg.unwrap().name, "/etc/hostname");

    crit_encode(
        &crit,
        r#"{"magic": "STATS", "entries": [{"dump": {"freezing_time": 1, "frozen_time": 2, "memdump_time": 3,
            "memwrite_time": 4, "pages_scanned": 5, "pages_skipped_parent": 6, "pages_written": 7, "pages_lazy": 8}}]}"#,
        &at(ImageKind::StatsDump, 0),
    );
    let s: pb::StatsEntry = dir.read_one(ImageKind::StatsDump, 0).unwrap();
    assert_eq!(s.dump.unwrap().pages_written, 7);
}

/// Our extension fields are exactly the listed ones, all numbered where CRIU never goes, and
/// CRIU's fields all stay below that range.
#[test]
fn extension_fields_are_listed_and_numbered_apart() {
    let pool = pool();
    let mut found = Vec::new();
    for message in pool.all_messages() {
        for field in message.fields() {
            let listed = CKPT_EXTENSIONS.contains(&field.full_name());
            let high = field.number() >= images_format::EXTENSION_FIELDS_START;
            assert_eq!(
                listed,
                high,
                "{} is numbered {}: fields from {} up are ckpt extensions and must be listed",
                field.full_name(),
                field.number(),
                images_format::EXTENSION_FIELDS_START
            );
            if listed {
                assert!(
                    field.cardinality() != prost_reflect::Cardinality::Required,
                    "{}: an extension must be optional for CRIU's images to decode",
                    field.full_name()
                );
                found.push(field.full_name().to_owned());
            }
        }
    }
    found.sort();
    let mut expected: Vec<_> = CKPT_EXTENSIONS.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected);
}

/// A core image holding every extension decodes in crit with CRIU's fields intact and the
/// extensions left out.
#[test]
fn crit_decodes_cores_with_extensions() {
    let Some(crit) = crit() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let core = pb::CoreEntry {
        mtype: pb::core_entry::March::X8664 as i32,
        tc: Some(pb::TaskCoreEntry {
            task_state: 1,
            comm: "extras".into(),
            mdwe_flags: Some(1),
            ..Default::default()
        }),
        thread_core: Some(pb::ThreadCoreEntry {
            futex_rla_len: 24,
            sched_nice: Some(-3),
            cpu_affinity: vec![0b10, 1 << 63],
            timer_slack_ns: Some(123_456),
            ioprio: Some((2 << 13) | 3),
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = tmp.path().join("core-1.img");
    let mut w =
        ImageWriter::new(std::fs::File::create(&path).unwrap(), ImageKind::Core, "x").unwrap();
    w.write_entry(&core).unwrap();
    w.finish().unwrap();
    let json = crit_decode(&crit, &path).unwrap();
    let entry = &json["entries"][0];
    assert_eq!(entry["tc"]["comm"], "extras", "{json}");
    assert_eq!(entry["thread_core"]["sched_nice"], -3, "{json}");
    assert_eq!(entry["thread_core"]["futex_rla_len"], 24, "{json}");
    assert!(
        entry["thread_core"].get("timer_slack_ns").is_none(),
        "{json}"
    );
    assert!(entry["tc"].get("mdwe_flags").is_none(), "{json}");
}
