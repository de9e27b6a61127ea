//! Symbolic tables for integer fields that CRIU's schema annotates with `flags`, `dict` or `dev`.
//!
//! The names and values are kernel and CRIU constants (mmap protections and flags, the VMA status
//! bits of CRIU's `image.h`, open(2) flags, memfd seals, pagemap entry flags, task states and socket
//! constants). Printing and parsing follow crit: set bits by name joined with `" | "`, unknown bits
//! as one trailing hex number, and `major:minor` device numbers.

/// A named bit of a flags table.
type Bit = (&'static str, u64);

const MMAP_PROT: &[Bit] = &[("PROT_READ", 0x1), ("PROT_WRITE", 0x2), ("PROT_EXEC", 0x4)];

const MMAP_FLAGS: &[Bit] = &[
    ("MAP_SHARED", 0x1),
    ("MAP_PRIVATE", 0x2),
    ("MAP_DROPPABLE", 0x08),
    ("MAP_ANON", 0x20),
    ("MAP_GROWSDOWN", 0x0100),
];

const MMAP_STATUS: &[Bit] = &[
    ("VMA_AREA_NONE", 0),
    ("VMA_AREA_REGULAR", 1 << 0),
    ("VMA_AREA_STACK", 1 << 1),
    ("VMA_AREA_VSYSCALL", 1 << 2),
    ("VMA_AREA_VDSO", 1 << 3),
    ("VMA_AREA_HEAP", 1 << 5),
    ("VMA_FILE_PRIVATE", 1 << 6),
    ("VMA_FILE_SHARED", 1 << 7),
    ("VMA_ANON_SHARED", 1 << 8),
    ("VMA_ANON_PRIVATE", 1 << 9),
    ("VMA_AREA_SYSVIPC", 1 << 10),
    ("VMA_AREA_SOCKET", 1 << 11),
    ("VMA_AREA_VVAR", 1 << 12),
    ("VMA_AREA_AIORING", 1 << 13),
    ("VMA_AREA_MEMFD", 1 << 14),
    ("VMA_AREA_SHSTK", 1 << 15),
    ("VMA_AREA_UPROBES", 1 << 17),
    ("VMA_UNSUPP", 1 << 31),
];

const RFILE_FLAGS: &[Bit] = &[
    ("O_WRONLY", 0o1),
    ("O_RDWR", 0o2),
    ("O_CREAT", 0o100),
    ("O_EXCL", 0o200),
    ("O_NOCTTY", 0o400),
    ("O_TRUNC", 0o1000),
    ("O_APPEND", 0o2000),
    ("O_NONBLOCK", 0o4000),
    ("O_DSYNC", 0o10000),
    ("FASYNC", 0o20000),
    ("O_DIRECT", 0o40000),
    ("O_LARGEFILE", 0o100000),
    ("O_DIRECTORY", 0o200000),
    ("O_NOFOLLOW", 0o400000),
    ("O_NOATIME", 0o1000000),
    ("O_CLOEXEC", 0o2000000),
];

const SEALS_FLAGS: &[Bit] = &[
    ("F_SEAL_SEAL", 0x1),
    ("F_SEAL_SHRINK", 0x2),
    ("F_SEAL_GROW", 0x4),
    ("F_SEAL_WRITE", 0x8),
    ("F_SEAL_FUTURE_WRITE", 0x10),
];

const PMAP_FLAGS: &[Bit] = &[("PE_PARENT", 1), ("PE_LAZY", 2), ("PE_PRESENT", 4)];

/// The flags table named by a field's `flags` annotation, if we know it.
pub fn flags_table(name: &str) -> Option<&'static [Bit]> {
    match name {
        "mmap.prot" => Some(MMAP_PROT),
        "mmap.flags" => Some(MMAP_FLAGS),
        "mmap.status" => Some(MMAP_STATUS),
        "rfile.flags" => Some(RFILE_FLAGS),
        "pmap.flags" => Some(PMAP_FLAGS),
        "seals.flags" => Some(SEALS_FLAGS),
        _ => None,
    }
}

/// Names the set bits of `value`, in table order, then any bits the table lacks as one hex
/// number; zero prints as the empty string, as crit does.
pub fn format_flags(value: i128, table: &[Bit]) -> String {
    let mut parts: Vec<String> = table
        .iter()
        .filter(|(_, bit)| value & i128::from(*bit) != 0)
        .map(|(name, _)| (*name).to_owned())
        .collect();
    let known = table
        .iter()
        .fold(0i128, |acc, (_, bit)| acc | i128::from(*bit));
    let rest = value & !known;
    if rest != 0 {
        parts.push(python_hex(rest));
    }
    parts.join(" | ")
}

/// `"0x%x" % value` in Python: a negative number keeps its sign in front of the prefix.
pub fn python_hex(value: i128) -> String {
    if value < 0 {
        format!("-{:#x}", value.unsigned_abs())
    } else {
        format!("{value:#x}")
    }
}

/// Parses `"A | B | 0x10"`: each part is a name of the table or an integer literal.
pub fn parse_flags(text: &str, table: &[Bit]) -> Option<i128> {
    if text.is_empty() {
        return Some(0);
    }
    text.split('|').map(str::trim).try_fold(0i128, |acc, part| {
        let bit = match table.iter().find(|(name, _)| *name == part) {
            Some((_, bit)) => i128::from(*bit),
            None => parse_int_literal(part)?,
        };
        // crit sums the parts; a repeated name would carry into the next bit, as there
        acc.checked_add(bit)
    })
}

/// A `dict` annotation: a table of names for some values of fields with the given names.
pub fn dict_name(dict: &str, field: &str, value: i128) -> Option<&'static str> {
    dict_table(dict, field)?
        .iter()
        .find(|(v, _)| i128::from(*v) == value)
        .map(|(_, name)| *name)
}

/// The value a `dict` table gives to a name.
pub fn dict_value(dict: &str, field: &str, name: &str) -> Option<i64> {
    dict_table(dict, field)?
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(v, _)| *v)
}

fn dict_table(dict: &str, field: &str) -> Option<&'static [(i64, &'static str)]> {
    let table: &'static [(i64, &'static str)] = match (dict, field) {
        // compel's task states; crit 3.17 swapped the names of 3 and 6, CRIU fixed it since
        ("gen", "task_state") => &[(1, "Alive"), (2, "Dead"), (3, "Stopped"), (6, "Zombie")],
        ("sk", "family") => &[
            (1, "UNIX"),
            (2, "INET"),
            (10, "INET6"),
            (16, "NETLINK"),
            (17, "PACKET"),
        ],
        ("sk", "type") => &[
            (1, "STREAM"),
            (2, "DGRAM"),
            (3, "RAW"),
            (5, "SEQPACKET"),
            (10, "PACKET"),
        ],
        ("sk", "state") => &[
            (1, "ESTABLISHED"),
            (2, "SYN_SENT"),
            (3, "SYN_RECV"),
            (4, "FIN_WAIT1"),
            (5, "FIN_WAIT2"),
            (6, "TIME_WAIT"),
            (7, "CLOSE"),
            (8, "CLOSE_WAIT"),
            (9, "LAST_ACK"),
            (10, "LISTEN"),
        ],
        ("sk", "proto") => &[(0, "IP"), (6, "TCP"), (17, "UDP"), (136, "UDPLITE")],
        _ => return None,
    };
    Some(table)
}

/// The kernel's internal dev_t layout (20 minor bits), used by `dev` fields.
const KERNEL_MINOR_BITS: u32 = 20;

/// Prints a device number as `major:minor`: the kernel's internal layout, or with `old_layout`
/// (`odev` fields, the userspace dev_t of stat(2)) glibc's major/minor split.
pub fn format_dev(value: u64, old_layout: bool) -> String {
    if old_layout {
        let major = ((value >> 8) & 0xfff) | ((value >> 32) & !0xfff);
        let minor = (value & 0xff) | ((value >> 12) & !0xff);
        format!("{major}:{minor}")
    } else {
        let minor = value & ((1 << KERNEL_MINOR_BITS) - 1);
        format!("{}:{minor}", value >> KERNEL_MINOR_BITS)
    }
}

/// Parses `major:minor` back into the layout [`format_dev`] printed.
pub fn parse_dev(text: &str, old_layout: bool) -> Option<u64> {
    let (major, minor) = text.split_once(':')?;
    let major: u64 = major.trim().parse().ok()?;
    let minor: u64 = minor.trim().parse().ok()?;
    if old_layout {
        Some(
            ((major & 0xffff_f000) << 32)
                | ((major & 0xfff) << 8)
                | ((minor & 0xffff_ff00) << 12)
                | (minor & 0xff),
        )
    } else {
        Some((major << KERNEL_MINOR_BITS) | minor)
    }
}

/// Parses an integer the way Python's `int(text, 0)` does: optional sign, then decimal without
/// leading zeros, or a `0x`, `0o` or `0b` prefixed number; `_` may separate digits.
pub fn parse_int_literal(text: &str) -> Option<i128> {
    let text = text.trim();
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.strip_prefix('_').unwrap_or(d))
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.strip_prefix('_').unwrap_or(d))
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.strip_prefix('_').unwrap_or(d))
    } else {
        // Python rejects "012" in base 0 but accepts "000"
        if lower.len() > 1
            && lower.starts_with('0')
            && lower.bytes().any(|b| b != b'0' && b != b'_')
        {
            return None;
        }
        (10, lower.as_str())
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let cleaned: String = digits.chars().filter(|c| *c != '_').collect();
    let magnitude = i128::from_str_radix(&cleaned, radix).ok()?;
    // from_str_radix accepts its own sign; ours was already taken
    if cleaned.starts_with(['+', '-']) {
        return None;
    }
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_names_then_unknown_bits() {
        assert_eq!(format_flags(0x3, MMAP_PROT), "PROT_READ | PROT_WRITE");
        assert_eq!(
            format_flags(0x22 | 0x1000, MMAP_FLAGS),
            "MAP_PRIVATE | MAP_ANON | 0x1000"
        );
        assert_eq!(format_flags(0, MMAP_STATUS), "");
        assert_eq!(format_flags(0x8, MMAP_PROT), "0x8");
        assert_eq!(python_hex(-5), "-0x5");
    }

    #[test]
    fn flags_parse_back() {
        for value in [0i128, 1, 0x22, 0x1023, 0x8000_0201] {
            let table = MMAP_STATUS;
            assert_eq!(parse_flags(&format_flags(value, table), table), Some(value));
        }
        assert_eq!(parse_flags("PROT_READ|0x4", MMAP_PROT), Some(5));
        assert_eq!(parse_flags("NOPE", MMAP_PROT), None);
    }

    #[test]
    fn dev_numbers_round_trip_in_both_layouts() {
        assert_eq!(format_dev((8 << 20) | 1, false), "8:1");
        assert_eq!(parse_dev("8:1", false), Some((8 << 20) | 1));
        // stat(2) of /dev/sda1 is 0x801
        assert_eq!(format_dev(0x801, true), "8:1");
        for dev in [0x801u64, 0x1234_5678_9abc, 0xfff0_0000_0000_0fff] {
            assert_eq!(parse_dev(&format_dev(dev, true), true), Some(dev));
        }
    }

    #[test]
    fn int_literals_follow_python_base_zero() {
        assert_eq!(parse_int_literal("0x1f"), Some(31));
        assert_eq!(parse_int_literal("-0x5"), Some(-5));
        assert_eq!(parse_int_literal("0o17"), Some(15));
        assert_eq!(parse_int_literal("42"), Some(42));
        assert_eq!(parse_int_literal("0"), Some(0));
        assert_eq!(parse_int_literal("012"), None);
        assert_eq!(parse_int_literal("0x"), None);
        assert_eq!(parse_int_literal("0x-1"), None);
        assert_eq!(parse_int_literal("1_000"), Some(1000));
    }

    #[test]
    fn dicts_map_both_ways() {
        assert_eq!(dict_name("sk", "family", 10), Some("INET6"));
        assert_eq!(dict_value("sk", "state", "LISTEN"), Some(10));
        assert_eq!(dict_name("gen", "task_state", 6), Some("Zombie"));
        assert_eq!(dict_name("sk", "nope", 1), None);
    }
}
