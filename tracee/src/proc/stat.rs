//! `/proc/PID/stat` and `/proc/PID/task/TID/stat`: one line of fields.
//!
//! `pid (comm) state ppid ...`: the command name may contain spaces and
//! parentheses, so it runs to the last `)`. Field numbers below are those of
//! proc(5), counted from 1.

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::{Pid, Tid};

/// The fields of a stat line ckpt uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Stat {
    pub pid: i32,
    /// The command name (up to 15 bytes, may hold spaces and parentheses).
    pub comm: String,
    /// `R`, `S`, `D`, `T`, `t`, `Z`...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub tty_nr: i32,
    pub tpgid: i32,
    /// `PF_*` task flags.
    pub flags: u32,
    pub utime: u64,
    pub stime: u64,
    pub priority: i64,
    pub nice: i64,
    pub num_threads: i64,
    /// Start time after boot, in clock ticks.
    pub start_time: u64,
    pub vsize: u64,
    pub rss: i64,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub exit_signal: i32,
    /// The CPU the task last ran on (field 39).
    pub processor: u32,
    pub rt_priority: u32,
    /// Scheduling policy (`SCHED_*`).
    pub policy: u32,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub exit_code: i32,
}

/// Parses a stat line.
pub fn parse(text: &str) -> Result<Stat, ParseError> {
    let line = text.trim_end_matches('\n');
    let err = |reason| ParseError::new("stat", 1, reason, line);
    let open = line.find('(').ok_or_else(|| err("no '('"))?;
    let close = line.rfind(')').ok_or_else(|| err("no ')'"))?;
    if close < open {
        return Err(err("')' before '('"));
    }
    let pid = line[..open].trim().parse().map_err(|_| err("bad pid"))?;
    let comm = line[open + 1..close].to_string();
    // fields[0] is field 3 (state).
    let fields: Vec<&str> = line[close + 1..].split_ascii_whitespace().collect();
    let get = |n: usize| -> Result<&str, ParseError> {
        fields
            .get(n - 3)
            .copied()
            .ok_or_else(|| err("too few fields"))
    };
    fn num<T: std::str::FromStr>(s: &str, e: impl Fn() -> ParseError) -> Result<T, ParseError> {
        s.parse().map_err(|_| e())
    }
    let e = || err("bad number");
    // Fields from 45 on were added over time (3.3, 3.5); older kernels stop early.
    let opt = |n: usize| -> Result<u64, ParseError> {
        match fields.get(n - 3) {
            Some(s) => s.parse().map_err(|_| err("bad number")),
            None => Ok(0),
        }
    };
    Ok(Stat {
        pid,
        comm,
        state: get(3)?.chars().next().ok_or_else(|| err("empty state"))?,
        ppid: num(get(4)?, e)?,
        pgrp: num(get(5)?, e)?,
        session: num(get(6)?, e)?,
        tty_nr: num(get(7)?, e)?,
        tpgid: num(get(8)?, e)?,
        flags: num(get(9)?, e)?,
        utime: num(get(14)?, e)?,
        stime: num(get(15)?, e)?,
        priority: num(get(18)?, e)?,
        nice: num(get(19)?, e)?,
        num_threads: num(get(20)?, e)?,
        start_time: num(get(22)?, e)?,
        vsize: num(get(23)?, e)?,
        rss: num(get(24)?, e)?,
        start_code: num(get(26)?, e)?,
        end_code: num(get(27)?, e)?,
        start_stack: num(get(28)?, e)?,
        exit_signal: num(get(38)?, e)?,
        processor: num(get(39)?, e)?,
        rt_priority: num(get(40)?, e)?,
        policy: num(get(41)?, e)?,
        start_data: opt(45)?,
        end_data: opt(46)?,
        start_brk: opt(47)?,
        arg_start: opt(48)?,
        arg_end: opt(49)?,
        env_start: opt(50)?,
        env_end: opt(51)?,
        exit_code: i32::try_from(opt(52)?).map_err(|_| err("bad exit code"))?,
    })
}

/// Reads `/proc/PID/stat`.
pub fn read(pid: Pid) -> Result<Stat, ProcError> {
    let path = proc_path(pid, None, "stat");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

/// Reads `/proc/PID/task/TID/stat`.
pub fn read_thread(pid: Pid, tid: Tid) -> Result<Stat, ProcError> {
    let path = proc_path(pid, Some(tid), "stat");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "4242 (my (odd) prog) S 1 4242 4242 34816 4242 4194560 120 0 0 0 3 1 0 0 20 0 2 0 \
123456 8380416 250 18446744073709551615 94000000000000 94000000004000 140720000000000 0 0 0 0 0 0 1 0 0 17 1 0 0 0 0 0 \
94000000010000 94000000011000 94000000100000 140720000001000 140720000001020 140720000001020 140720000001100 0\n";

    #[test]
    fn parses_odd_comm_and_mm_fields() {
        let s = parse(SAMPLE).expect("valid sample");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "my (odd) prog");
        assert_eq!(s.state, 'S');
        assert_eq!((s.ppid, s.pgrp, s.session), (1, 4242, 4242));
        assert_eq!(s.num_threads, 2);
        assert_eq!(s.start_time, 123456);
        assert_eq!(s.start_code, 94000000000000);
        assert_eq!(s.processor, 1);
        assert_eq!(s.start_brk, 94000000100000);
        assert_eq!(s.env_end, 140720000001100);
        assert_eq!(s.exit_code, 0);
    }

    #[test]
    fn rejects_truncated() {
        assert!(parse("1 (x) S 0 1").is_err());
        assert!(parse("garbage").is_err());
    }

    #[test]
    fn reads_own_stat() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let s = read(me).expect("own stat");
        assert_eq!(s.pid, me.as_raw());
        assert!(s.start_code > 0);
    }
}
