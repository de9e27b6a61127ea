//! `/proc/PID/mountinfo`: one line per mount.
//!
//! `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
//! (id, parent, major:minor, root, mount point, options, optional fields up to
//! `-`, fs type, source, super options). Paths are octal-escaped.

use super::{parse_with, proc_path, read_text, unescape_octal, ParseError, ProcError};
use crate::ids::Pid;

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id (`mnt_id` in fdinfo).
    pub mnt_id: u64,
    /// Parent mount id.
    pub parent_id: u64,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Root of the mount within its filesystem.
    pub root: String,
    /// Mount point, relative to the process's root.
    pub mount_point: String,
    /// Per-mount options.
    pub options: String,
    /// Optional fields (`shared:N`, `master:N`...).
    pub optional: Vec<String>,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

/// Parses one mountinfo line.
pub fn parse_line(line: &str) -> Option<MountInfo> {
    let mut w = line.split(' ');
    let mnt_id = w.next()?.parse().ok()?;
    let parent_id = w.next()?.parse().ok()?;
    let (maj, min) = w.next()?.split_once(':')?;
    let root = unescape_octal(w.next()?);
    let mount_point = unescape_octal(w.next()?);
    let options = w.next()?.to_string();
    let mut optional = Vec::new();
    loop {
        let f = w.next()?;
        if f == "-" {
            break;
        }
        optional.push(f.to_string());
    }
    Some(MountInfo {
        mnt_id,
        parent_id,
        major: maj.parse().ok()?,
        minor: min.parse().ok()?,
        root,
        mount_point,
        options,
        optional,
        fstype: w.next()?.to_string(),
        source: unescape_octal(w.next()?),
        super_options: w.next().unwrap_or("").to_string(),
    })
}

/// Parses a mountinfo file.
pub fn parse(text: &str) -> Result<Vec<MountInfo>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| ParseError::new("mountinfo", i + 1, "bad mount line", l))
        })
        .collect()
}

/// Reads `/proc/PID/mountinfo`.
pub fn read(pid: Pid) -> Result<Vec<MountInfo>, ProcError> {
    let path = proc_path(pid, None, "mountinfo");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let text =
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
40 36 0:31 / /tmp/with\\040space rw shared:5 master:2 - tmpfs tmpfs rw\n\
41 36 0:32 / /proc rw,nosuid - proc proc rw\n";
        let v = parse(text).expect("valid");
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[0].mnt_id, v[0].parent_id, v[0].major, v[0].minor),
            (36, 35, 98, 0)
        );
        assert_eq!(v[0].optional, vec!["master:1"]);
        assert_eq!(v[0].fstype, "ext3");
        assert_eq!(v[1].mount_point, "/tmp/with space");
        assert_eq!(v[1].optional.len(), 2);
        assert!(v[2].optional.is_empty());
    }

    #[test]
    fn rejects_missing_separator() {
        assert!(parse("1 2 3:4 / / rw shared:1 tmpfs tmpfs rw\n").is_err());
    }

    #[test]
    fn reads_own_mountinfo() {
        let me = crate::Pid::try_from(std::process::id()).expect("own pid");
        let v = read(me).expect("own mountinfo");
        assert!(v.iter().any(|m| m.mount_point == "/"));
        assert!(v.iter().any(|m| m.fstype == "proc"));
    }
}
