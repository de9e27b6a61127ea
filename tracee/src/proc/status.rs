//! `/proc/PID/status`: `Key:\tvalue` lines.

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::{Pid, Tid};

/// The fields of a status file ckpt uses. Masks are the kernel's hex values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Status {
    /// `Name:` (the command name; escapes as the kernel printed them).
    pub name: String,
    /// First letter of `State:` (`R`, `S`, `T`, `t`, `Z`...).
    pub state: char,
    pub umask: Option<u32>,
    pub tgid: i32,
    pub pid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    /// Real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// Real, effective, saved, filesystem.
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    /// Ids from the outermost pid namespace inwards.
    pub ns_tgid: Vec<i32>,
    pub ns_pid: Vec<i32>,
    pub ns_pgid: Vec<i32>,
    pub ns_sid: Vec<i32>,
    pub threads: u32,
    /// `SigQ:` queued/limit.
    pub sig_q: (u64, u64),
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: bool,
    /// 0 disabled, 1 strict, 2 filter.
    pub seccomp: u32,
    pub seccomp_filters: u32,
}

fn ids<T: std::str::FromStr>(v: &str) -> Option<Vec<T>> {
    v.split_ascii_whitespace().map(|w| w.parse().ok()).collect()
}

fn four(v: &str) -> Option<[u32; 4]> {
    let x: Vec<u32> = ids(v)?;
    x.try_into().ok()
}

fn hex(v: &str) -> Option<u64> {
    u64::from_str_radix(v.trim(), 16).ok()
}

/// Parses a status file. Unknown keys are ignored; known keys with bad values
/// are errors.
pub fn parse(text: &str) -> Result<Status, ParseError> {
    let mut s = Status::default();
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let v = value.trim();
        let bad = || ParseError::new("status", i + 1, "bad value", line);
        match key {
            "Name" => s.name = value.trim_start_matches('\t').to_string(),
            "State" => s.state = v.chars().next().ok_or_else(bad)?,
            "Umask" => s.umask = Some(u32::from_str_radix(v, 8).map_err(|_| bad())?),
            "Tgid" => s.tgid = v.parse().map_err(|_| bad())?,
            "Pid" => s.pid = v.parse().map_err(|_| bad())?,
            "PPid" => s.ppid = v.parse().map_err(|_| bad())?,
            "TracerPid" => s.tracer_pid = v.parse().map_err(|_| bad())?,
            "Uid" => s.uid = four(v).ok_or_else(bad)?,
            "Gid" => s.gid = four(v).ok_or_else(bad)?,
            "Groups" => s.groups = ids(v).ok_or_else(bad)?,
            "NStgid" => s.ns_tgid = ids(v).ok_or_else(bad)?,
            "NSpid" => s.ns_pid = ids(v).ok_or_else(bad)?,
            "NSpgid" => s.ns_pgid = ids(v).ok_or_else(bad)?,
            "NSsid" => s.ns_sid = ids(v).ok_or_else(bad)?,
            "Threads" => s.threads = v.parse().map_err(|_| bad())?,
            "SigQ" => {
                let (a, b) = v.split_once('/').ok_or_else(bad)?;
                s.sig_q = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            }
            "SigPnd" => s.sig_pnd = hex(v).ok_or_else(bad)?,
            "ShdPnd" => s.shd_pnd = hex(v).ok_or_else(bad)?,
            "SigBlk" => s.sig_blk = hex(v).ok_or_else(bad)?,
            "SigIgn" => s.sig_ign = hex(v).ok_or_else(bad)?,
            "SigCgt" => s.sig_cgt = hex(v).ok_or_else(bad)?,
            "CapInh" => s.cap_inh = hex(v).ok_or_else(bad)?,
            "CapPrm" => s.cap_prm = hex(v).ok_or_else(bad)?,
            "CapEff" => s.cap_eff = hex(v).ok_or_else(bad)?,
            "CapBnd" => s.cap_bnd = hex(v).ok_or_else(bad)?,
            "CapAmb" => s.cap_amb = hex(v).ok_or_else(bad)?,
            "NoNewPrivs" => s.no_new_privs = v != "0",
            "Seccomp" => s.seccomp = v.parse().map_err(|_| bad())?,
            "Seccomp_filters" => s.seccomp_filters = v.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    if s.tgid == 0 || s.pid == 0 {
        return Err(ParseError::new("status", 0, "no Tgid/Pid line", ""));
    }
    Ok(s)
}

/// Reads `/proc/PID/status`.
pub fn read(pid: Pid) -> Result<Status, ProcError> {
    let path = proc_path(pid, None, "status");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

/// Reads `/proc/PID/task/TID/status` (per-thread masks and credentials).
pub fn read_thread(pid: Pid, tid: Tid) -> Result<Status, ProcError> {
    let path = proc_path(pid, Some(tid), "status");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tmy prog\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4243\nPPid:\t1\n\
TracerPid:\t0\nUid:\t0\t1\t2\t3\nGid:\t4\t5\t6\t7\nFDSize:\t64\nGroups:\t10 20 \nNStgid:\t4242\t1\nNSpid:\t4243\t2\n\
NSpgid:\t4242\t1\nNSsid:\t4242\t1\nThreads:\t2\nSigQ:\t1/94000\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000200\n\
SigBlk:\t0000000000010000\nSigIgn:\t0000000000001000\nSigCgt:\t0000000180000002\nCapInh:\t0000000000000000\n\
CapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\nCapAmb:\t0000000000000000\n\
NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn parses_sample() {
        let s = parse(SAMPLE).expect("valid sample");
        assert_eq!(s.name, "my prog");
        assert_eq!(s.state, 'S');
        assert_eq!(s.umask, Some(0o22));
        assert_eq!((s.tgid, s.pid, s.ppid), (4242, 4243, 1));
        assert_eq!(s.uid, [0, 1, 2, 3]);
        assert_eq!(s.gid, [4, 5, 6, 7]);
        assert_eq!(s.groups, vec![10, 20]);
        assert_eq!(s.ns_pid, vec![4243, 2]);
        assert_eq!(s.sig_q, (1, 94000));
        assert_eq!(s.shd_pnd, 0x200);
        assert_eq!(s.sig_cgt, 0x1_8000_0002);
        assert_eq!(s.cap_eff, 0x1ff_feff_ffff);
        assert!(s.no_new_privs);
        assert_eq!((s.seccomp, s.seccomp_filters), (2, 1));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse("Tgid:\tx\nPid:\t1\n").is_err());
        assert!(parse("Name:\tfoo\n").is_err());
    }

    #[test]
    fn reads_own_status() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let s = read(me).expect("own status");
        assert_eq!(s.tgid, me.as_raw());
        assert!(s.threads >= 1);
        assert!(s.umask.is_some());
        assert_eq!(s.ns_pid.first(), Some(&me.as_raw()));
    }
}
