//! `/proc/PID/limits`: the resource limits, one line per resource.
//!
//! `Limit` column names contain spaces, so lines are matched against the
//! kernel's fixed names (in `RLIMIT_*` order) rather than split on spaces.

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::Pid;

/// `RLIM_INFINITY`.
pub const INFINITY: u64 = u64::MAX;

/// The kernel's names, indexed by `RLIMIT_*` number.
const NAMES: [&str; 16] = [
    "Max cpu time",
    "Max file size",
    "Max data size",
    "Max stack size",
    "Max core file size",
    "Max resident set",
    "Max processes",
    "Max open files",
    "Max locked memory",
    "Max address space",
    "Max file locks",
    "Max pending signals",
    "Max msgqueue size",
    "Max nice priority",
    "Max realtime priority",
    "Max realtime timeout",
];

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    /// Soft limit ([`INFINITY`] for unlimited).
    pub soft: u64,
    /// Hard limit ([`INFINITY`] for unlimited).
    pub hard: u64,
}

fn value(s: &str) -> Option<u64> {
    if s == "unlimited" {
        Some(INFINITY)
    } else {
        s.parse().ok()
    }
}

/// Parses a limits file into limits ordered by resource number.
pub fn parse(text: &str) -> Result<Vec<Limit>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some((resource, name)) = NAMES.iter().enumerate().find(|(_, n)| {
            line.strip_prefix(**n)
                .is_some_and(|rest| rest.starts_with(' '))
        }) else {
            continue;
        };
        let mut words = line[name.len()..].split_ascii_whitespace();
        let bad = || ParseError::new("limits", i + 1, "bad limit values", line);
        let soft = words.next().and_then(value).ok_or_else(bad)?;
        let hard = words.next().and_then(value).ok_or_else(bad)?;
        out.push(Limit {
            resource: u32::try_from(resource).map_err(|_| bad())?,
            soft,
            hard,
        });
    }
    out.sort_by_key(|l| l.resource);
    Ok(out)
}

/// Reads `/proc/PID/limits`.
pub fn read(pid: Pid) -> Result<Vec<Limit>, ProcError> {
    let path = proc_path(pid, None, "limits");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             94000                94000                processes 
Max open files            1024                 524288               files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       94000                94000                signals   
Max msgqueue size         819200               819200               bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      unlimited            unlimited            us        
";

    #[test]
    fn parses_all_sixteen() {
        let v = parse(SAMPLE).expect("valid sample");
        assert_eq!(v.len(), 16);
        assert_eq!(
            v[3],
            Limit {
                resource: 3,
                soft: 8388608,
                hard: INFINITY
            }
        );
        assert_eq!(
            v[7],
            Limit {
                resource: 7,
                soft: 1024,
                hard: 524288
            }
        );
        assert_eq!(v[15].soft, INFINITY);
    }

    #[test]
    fn rejects_bad_value() {
        assert!(parse("Max open files            x  1\n").is_err());
    }

    #[test]
    fn reads_own_limits() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        assert_eq!(read(me).expect("own limits").len(), 16);
    }
}
