//! `/proc/PID/task` (the threads) and `/proc/PID/task/TID/children`.

use super::{proc_path, read_text, ParseError, ProcError};
use crate::ids::{Pid, Tid};

/// Lists the thread ids in `/proc/PID/task`, ascending.
pub fn list_tids(pid: Pid) -> Result<Vec<Tid>, ProcError> {
    let path = proc_path(pid, None, "task");
    let dir = std::fs::read_dir(&path).map_err(|source| ProcError::Read {
        path: path.clone(),
        source,
    })?;
    let mut tids = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|source| ProcError::Read {
            path: path.clone(),
            source,
        })?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<Tid>().ok())
        {
            tids.push(tid);
        }
    }
    tids.sort();
    Ok(tids)
}

/// Parses a `children` file: space-separated pids.
pub fn parse_children(text: &str) -> Result<Vec<Pid>, ParseError> {
    text.split_ascii_whitespace()
        .map(|w| {
            w.parse::<Pid>()
                .map_err(|_| ParseError::new("children", 1, "bad pid", w))
        })
        .collect()
}

/// The children of thread `tid` of `pid` (`/proc/PID/task/TID/children`). A
/// child belongs to the thread that forked it, unless that thread has exited.
pub fn children_of_thread(pid: Pid, tid: Tid) -> Result<Vec<Pid>, ProcError> {
    let path = proc_path(pid, Some(tid), "children");
    let text = read_text(&path)?;
    super::parse_with(&path, &text, parse_children)
}

/// The children of every thread of `pid`, ascending and without duplicates.
/// Stable only while `pid` is frozen.
pub fn children(pid: Pid) -> Result<Vec<Pid>, ProcError> {
    let mut all = Vec::new();
    for tid in list_tids(pid)? {
        match children_of_thread(pid, tid) {
            Ok(c) => all.extend(c),
            // The thread exited between the listing and now: it has no children left.
            Err(e) if e.is_gone() => {}
            Err(e) => return Err(e),
        }
    }
    all.sort();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_children() {
        let v = parse_children("12 345 \n").expect("valid");
        assert_eq!(
            v.iter().map(|p| p.as_raw()).collect::<Vec<_>>(),
            vec![12, 345]
        );
        assert!(parse_children("").expect("empty is valid").is_empty());
        assert!(parse_children("12 x").is_err());
    }

    #[test]
    fn own_tasks_include_self() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let tids = list_tids(me).expect("own task list");
        assert!(tids.contains(&me.leader()));
    }
}
