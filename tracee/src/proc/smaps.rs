//! `/proc/PID/smaps`: each VMA's maps line followed by `Key: value kB` lines
//! and a `VmFlags:` line of two-letter codes (`rd wr ex sh mr mw me ms gd pf
//! dw lo io sr rr dc de ac nr ht sf nl ar wf dd sd mm hg nh mg um uw ss`...).

use std::collections::BTreeMap;

use super::maps::{self, MapsEntry};
use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::Pid;

/// One VMA of smaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmapsEntry {
    /// The maps line.
    pub vma: MapsEntry,
    /// `Key: N kB` fields (`Rss`, `Anonymous`, `Swap`, `AnonHugePages`...), in kB.
    pub fields: BTreeMap<String, u64>,
    /// The `VmFlags:` codes, in the kernel's order.
    pub vm_flags: Vec<String>,
}

impl SmapsEntry {
    /// Whether `VmFlags:` holds `code` (e.g. `"dd"` for MADV_DONTDUMP).
    pub fn has_flag(&self, code: &str) -> bool {
        self.vm_flags.iter().any(|f| f == code)
    }

    /// A `kB` field converted to bytes, 0 if absent.
    pub fn bytes(&self, key: &str) -> u64 {
        self.fields
            .get(key)
            .copied()
            .unwrap_or(0)
            .saturating_mul(1024)
    }
}

/// Parses an smaps file.
pub fn parse(text: &str) -> Result<Vec<SmapsEntry>, ParseError> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let first = line.split(' ').next().unwrap_or("");
        if !first.ends_with(':') {
            let vma = maps::parse_line(line)
                .ok_or_else(|| ParseError::new("smaps", i + 1, "bad VMA line", line))?;
            out.push(SmapsEntry {
                vma,
                fields: BTreeMap::new(),
                vm_flags: Vec::new(),
            });
            continue;
        }
        let cur = out
            .last_mut()
            .ok_or_else(|| ParseError::new("smaps", i + 1, "field before any VMA", line))?;
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| ParseError::new("smaps", i + 1, "no ':'", line))?;
        if key == "VmFlags" {
            cur.vm_flags = value.split_ascii_whitespace().map(str::to_string).collect();
            continue;
        }
        let mut words = value.split_ascii_whitespace();
        // Fields without a numeric value (THPeligible is a bare number, ProtectionKey
        // too) are kept as numbers when they parse; others are skipped.
        if let Some(Ok(n)) = words.next().map(str::parse::<u64>) {
            cur.fields.insert(key.to_string(), n);
        }
    }
    Ok(out)
}

/// Reads `/proc/PID/smaps`.
pub fn read(pid: Pid) -> Result<Vec<SmapsEntry>, ProcError> {
    let path = proc_path(pid, None, "smaps");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c1c3e000-55d0c1c5f000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
KernelPageSize:        4 kB
Rss:                   8 kB
Anonymous:             8 kB
Swap:                  0 kB
THPeligible:           0
VmFlags: rd wr mr mw me ac dd 
7f5e77e00000-7f5e77e01000 rw-p 00000000 00:1f 77                         /tmp/a b (deleted)
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr mr mw me dc hg nh mg wf uw
";

    #[test]
    fn parses_flags_and_fields() {
        let v = parse(SAMPLE).expect("valid sample");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].vma.special_name(), Some("[heap]"));
        assert_eq!(v[0].fields.get("Rss"), Some(&8));
        assert_eq!(v[0].bytes("Size"), 132 * 1024);
        assert_eq!(v[0].fields.get("THPeligible"), Some(&0));
        assert!(v[0].has_flag("dd") && !v[0].has_flag("dc"));
        assert_eq!(v[1].vma.path.as_deref(), Some("/tmp/a b"));
        for f in ["dc", "hg", "nh", "mg", "wf", "uw"] {
            assert!(v[1].has_flag(f), "{f}");
        }
    }

    #[test]
    fn rejects_field_before_vma() {
        assert!(parse("Rss: 4 kB\n").is_err());
    }

    #[test]
    fn reads_own_smaps() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let v = read(me).expect("own smaps");
        let stack = v
            .iter()
            .find(|e| e.vma.special_name() == Some("[stack]"))
            .expect("a stack");
        assert!(stack.has_flag("rd") && stack.has_flag("wr") && stack.has_flag("gd"));
        assert!(stack.bytes("Rss") > 0);
        assert!(v.iter().all(|e| !e.vm_flags.is_empty()));
    }
}
