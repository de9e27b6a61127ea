//! `/proc/PID/maps`: one line per VMA.
//!
//! `start-end perms pgoff major:minor inode   path`, where the path may hold
//! spaces, may end in ` (deleted)`, or be a kernel name in brackets (`[heap]`,
//! `[stack]`, `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`, `[anon:NAME]`).

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::{Pid, RemoteAddr};

const DELETED: &str = " (deleted)";

/// The `rwxp`/`rwxs` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms {
    /// `r`
    pub read: bool,
    /// `w`
    pub write: bool,
    /// `x`
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
}

impl Perms {
    /// `PROT_*` bits for mmap/mprotect.
    pub fn prot(self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }
}

/// One VMA as `/proc/PID/maps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// First byte.
    pub start: RemoteAddr,
    /// One past the last byte.
    pub end: RemoteAddr,
    /// Protection and sharing.
    pub perms: Perms,
    /// Offset in the file (bytes), or the page offset of anonymous memory.
    pub pgoff: u64,
    /// Device major number of the backing file.
    pub dev_major: u32,
    /// Device minor number of the backing file.
    pub dev_minor: u32,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or kernel name, without a ` (deleted)` suffix; `None` for
    /// plain anonymous memory.
    pub path: Option<String>,
    /// The file was unlinked (the path ended in ` (deleted)`).
    pub deleted: bool,
}

impl MapsEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.get().saturating_sub(self.start.get())
    }

    /// Whether the VMA is empty (never, for a real one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kernel's bracketed name (`[heap]`, `[vdso]`...), if any.
    pub fn special_name(&self) -> Option<&str> {
        self.path
            .as_deref()
            .filter(|p| p.starts_with('[') && p.ends_with(']'))
    }

    /// Whether this is a file mapping (a path starting with `/`), which includes
    /// shared anonymous memory (`/dev/zero (deleted)`, `/SYSV...`) and memfds
    /// (`/memfd:NAME (deleted)`).
    pub fn is_file(&self) -> bool {
        self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// One of the kernel-provided mappings a restore must not map itself:
    /// `[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`, `[uprobes]`.
    pub fn is_kernel_special(&self) -> bool {
        matches!(
            self.special_name(),
            Some("[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]")
        )
    }
}

/// The style's name for a VMA as the kernel lists it.
pub type Vma = MapsEntry;

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Splits off the next space-separated field, skipping leading spaces.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(match s.find(' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    })
}

/// Parses one maps line.
pub fn parse_line(line: &str) -> Option<MapsEntry> {
    let (range, rest) = next_field(line)?;
    let (perms, rest) = next_field(rest)?;
    let (pgoff, rest) = next_field(rest)?;
    let (dev, rest) = next_field(rest)?;
    let (inode, rest) = next_field(rest)?;
    let (start, end) = range.split_once('-')?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    let raw_path = rest.trim_start_matches(' ');
    let (path, deleted) = match raw_path.strip_suffix(DELETED) {
        Some(p) => (p, true),
        None => (raw_path, false),
    };
    Some(MapsEntry {
        start: RemoteAddr(parse_hex(start)?),
        end: RemoteAddr(parse_hex(end)?),
        perms: Perms {
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
        },
        pgoff: parse_hex(pgoff)?,
        dev_major: u32::from_str_radix(maj, 16).ok()?,
        dev_minor: u32::from_str_radix(min, 16).ok()?,
        inode: inode.parse().ok()?,
        path: (!path.is_empty()).then(|| path.to_string()),
        deleted,
    })
}

/// Parses a whole maps file.
pub fn parse(text: &str) -> Result<Vec<MapsEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| ParseError::new("maps", i + 1, "bad VMA line", l))
        })
        .collect()
}

/// Reads `/proc/PID/maps`.
pub fn read(pid: Pid) -> Result<Vec<MapsEntry>, ProcError> {
    let path = proc_path(pid, None, "maps");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1835 /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fe:01 1835                       /usr/bin/cat
55d0c1c3e000-55d0c1c5f000 rw-p 00000000 00:00 0                          [heap]
7f5e77c00000-7f5e77e00000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
7f5e77e00000-7f5e77e01000 rw-p 00000000 00:1f 77                         /tmp/dir with spaces/f (deleted)
7f5e77e01000-7f5e77e02000 ---p 00000000 00:00 0 
7f5e77ef3000-7f5e77ef7000 r--p 00000000 00:00 0                          [vvar]
7f5e77ef7000-7f5e77ef9000 r--p 00000000 00:00 0                          [vvar_vclock]
7f5e77ef9000-7f5e77efb000 r-xp 00000000 00:00 0                          [vdso]
7ffd1d6e4000-7ffd1d705000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_sample() {
        let v = parse(SAMPLE).expect("valid sample");
        assert_eq!(v.len(), 11);
        assert_eq!(v[0].start, RemoteAddr(0x55d0c0a00000));
        assert_eq!(v[0].path.as_deref(), Some("/usr/bin/cat"));
        assert_eq!(
            (v[0].dev_major, v[0].dev_minor, v[0].inode),
            (0xfe, 1, 1835)
        );
        assert_eq!(v[1].pgoff, 0x2000);
        assert!(v[1].perms.exec && !v[1].perms.write);
        assert_eq!(v[2].special_name(), Some("[heap]"));
        assert!(!v[2].is_kernel_special());
        assert!(v[3].perms.shared && v[3].deleted);
        assert_eq!(v[3].path.as_deref(), Some("/dev/zero"));
        assert_eq!(v[4].path.as_deref(), Some("/tmp/dir with spaces/f"));
        assert!(v[4].deleted);
        assert_eq!(v[5].path, None);
        assert_eq!(v[5].perms.prot(), 0);
        assert!(v[7].is_kernel_special());
        assert_eq!(v[7].len(), 0x2000);
        assert_eq!(v[9].special_name(), Some("[stack]"));
        assert_eq!(v[10].start, RemoteAddr(0xffffffffff600000));
        assert!(v[10].is_kernel_special());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("zzzz-1 r--p 0 0:0 0\n").is_err());
        assert!(parse("1000-2000 r--p 0\n").is_err());
    }

    #[test]
    fn reads_own_maps() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let v = read(me).expect("own maps");
        assert!(v.iter().any(|e| e.special_name() == Some("[vdso]")));
    }
}
