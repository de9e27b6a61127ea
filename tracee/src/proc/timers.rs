//! `/proc/PID/timers`: the POSIX timers of a process (ids and notification;
//! their values come from an injected `timer_gettime`).
//!
//! ```text
//! ID: 0
//! signal: 14/0000000000000000
//! notify: signal/pid.4242
//! ClockID: 1
//! ```

use super::{parse_with, proc_path, read_text, ParseError, ProcError};
use crate::ids::Pid;

/// How a timer notifies (`sigev_notify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerNotify {
    /// `SIGEV_SIGNAL` to the process.
    Signal,
    /// `SIGEV_NONE`.
    None,
    /// `SIGEV_THREAD` (glibc's helper thread receives a signal).
    Thread,
}

/// One POSIX timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PosixTimer {
    /// The timer id `timer_create` returned.
    pub id: i32,
    /// Signal number.
    pub signo: i32,
    /// `sigev_value` (as a pointer-sized integer).
    pub sigval: u64,
    /// Notification kind.
    pub notify: TimerNotify,
    /// With `SIGEV_THREAD_ID`: the thread that gets the signal; else the pid.
    pub notify_tid: Option<i32>,
    /// The pid or tid printed on the notify line.
    pub notify_target: i32,
    /// `CLOCK_*` id.
    pub clock_id: i32,
}

/// Parses a timers file.
pub fn parse(text: &str) -> Result<Vec<PosixTimer>, ParseError> {
    let mut out = Vec::new();
    let mut cur: Option<PosixTimer> = None;
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let v = value.trim();
        let bad = || ParseError::new("timers", i + 1, "bad value", line);
        if key == "ID" {
            if let Some(t) = cur.take() {
                out.push(t);
            }
            cur = Some(PosixTimer {
                id: v.parse().map_err(|_| bad())?,
                signo: 0,
                sigval: 0,
                notify: TimerNotify::Signal,
                notify_tid: None,
                notify_target: 0,
                clock_id: 0,
            });
            continue;
        }
        let t = cur
            .as_mut()
            .ok_or_else(|| ParseError::new("timers", i + 1, "field before ID", line))?;
        match key {
            "signal" => {
                let (sig, val) = v.split_once('/').ok_or_else(bad)?;
                t.signo = sig.parse().map_err(|_| bad())?;
                t.sigval = u64::from_str_radix(val, 16).map_err(|_| bad())?;
            }
            "notify" => {
                let (kind, target) = v.split_once('/').ok_or_else(bad)?;
                t.notify = match kind {
                    "signal" => TimerNotify::Signal,
                    "none" => TimerNotify::None,
                    "thread" => TimerNotify::Thread,
                    _ => return Err(bad()),
                };
                let (who, id) = target.split_once('.').ok_or_else(bad)?;
                let id: i32 = id.parse().map_err(|_| bad())?;
                t.notify_target = id;
                t.notify_tid = (who == "tid").then_some(id);
            }
            "ClockID" => t.clock_id = v.parse().map_err(|_| bad())?,
            _ => {}
        }
    }
    out.extend(cur);
    Ok(out)
}

/// Reads `/proc/PID/timers`.
pub fn read(pid: Pid) -> Result<Vec<PosixTimer>, ProcError> {
    let path = proc_path(pid, None, "timers");
    let text = read_text(&path)?;
    parse_with(&path, &text, parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_timers() {
        let text = "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.4242\nClockID: 1\n\
ID: 1\nsignal: 34/00007ffd12345678\nnotify: signal/tid.4243\nClockID: 0\n";
        let v = parse(text).expect("valid");
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].id, v[0].signo, v[0].clock_id), (0, 14, 1));
        assert_eq!(v[0].notify_tid, None);
        assert_eq!(v[1].sigval, 0x7ffd12345678);
        assert_eq!(v[1].notify_tid, Some(4243));
    }

    #[test]
    fn rejects_orphan_field() {
        assert!(parse("signal: 14/0\n").is_err());
        assert!(parse("ID: 0\nnotify: bogus/pid.1\n").is_err());
    }

    #[test]
    fn reads_own_timers() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        // The test harness creates no POSIX timers; the file must still parse.
        read(me).expect("own timers");
    }
}
