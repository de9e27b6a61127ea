//! `show`: a human summary of an image directory. Four tables: the process tree (pids,
//! threads, command), memory per process (VMAs, mapped size, saved pages by where their
//! contents are), open files per process, and the parent chain. On a terminal the columns are
//! aligned; otherwise they are separated by tabs, for other tools.

use std::fmt::Write as _;
use std::path::Path;

use images_format::pb::{FdTypes, FileEntry};
use images_format::PageFlags;

use crate::model::{self, ImageSet, LoadError, Process};

/// What `show` prints, read from a directory.
pub struct Summary {
    pub path: String,
    pub set: ImageSet,
}

/// Reads the directory; damaged images are reported at the end of the summary.
pub fn summarize(path: &Path) -> Result<Summary, LoadError> {
    let (_, set) = model::load(path)?;
    Ok(Summary {
        path: path.display().to_string(),
        set,
    })
}

/// The summary as text; `aligned` pads columns with spaces instead of separating them by tabs.
pub fn render(summary: &Summary, aligned: bool) -> String {
    let set = &summary.set;
    let mut out = String::new();
    let _ = writeln!(out, "Image directory {}", summary.path);

    let _ = writeln!(out, "\nProcesses");
    let mut table = Table::new(&["PID", "PPID", "PGID", "SID", "STATE", "THREADS", "COMMAND"]);
    for (process, depth) in tree_order(set) {
        let threads: Vec<String> = process.entry.threads.iter().map(u32::to_string).collect();
        table.row(vec![
            process.pid().to_string(),
            process.entry.ppid.to_string(),
            process.entry.pgid.to_string(),
            process.entry.sid.to_string(),
            state_name(process.task_state()).to_owned(),
            threads.join(","),
            format!("{}{}", "  ".repeat(depth), process.comm()),
        ]);
    }
    out.push_str(&table.render(aligned));

    let _ = writeln!(out, "\nMemory");
    let mut table = Table::new(&[
        "PID",
        "VMAS",
        "MAPPED",
        "PAGES",
        "PRESENT",
        "LAZY",
        "IN-PARENT",
        "PAGES-IMAGE",
    ]);
    for process in &set.processes {
        let Some(mm) = &process.mm else {
            table.row(vec![process.pid().to_string(), "-".into()]);
            continue;
        };
        let mapped: u64 = mm.vmas.iter().map(|v| v.end.saturating_sub(v.start)).sum();
        let mut row = vec![
            process.pid().to_string(),
            mm.vmas.len().to_string(),
            human_size(mapped),
        ];
        match &process.pagemap {
            Some(pm) => {
                let total: u64 = pm.ranges.iter().map(|r| r.nr_pages).sum();
                row.extend([
                    total.to_string(),
                    pm.pages_with(PageFlags::PRESENT).to_string(),
                    pm.pages_with(PageFlags::LAZY).to_string(),
                    pm.pages_with(PageFlags::PARENT).to_string(),
                    images_format::ImageKind::Pages.file_name(u64::from(pm.pages_id)),
                ]);
            }
            None => row.push("-".into()),
        }
        table.row(row);
    }
    out.push_str(&table.render(aligned));

    let _ = writeln!(out, "\nFiles");
    let mut table = Table::new(&["PID", "FD", "TYPE", "ID", "OBJECT"]);
    for process in &set.processes {
        for fd in &process.fds {
            let file = set.files.get(&fd.id);
            table.row(vec![
                process.pid().to_string(),
                fd.fd.to_string(),
                type_name(fd.r#type),
                fd.id.to_string(),
                file.map_or_else(|| "(not in files.img)".to_owned(), |f| describe(f, set)),
            ]);
        }
    }
    out.push_str(&table.render(aligned));

    let _ = writeln!(out, "\nParent chain");
    let mut table = Table::new(&["DEPTH", "DIRECTORY"]);
    for (depth, dir) in set.chain.iter().enumerate().skip(1) {
        table.row(vec![depth.to_string(), dir.path().display().to_string()]);
    }
    out.push_str(&table.render(aligned));

    if !set.problems.is_empty() {
        let _ = writeln!(out, "\nProblems (run `ckpt-img check` for all of them)");
        for problem in &set.problems {
            let _ = writeln!(out, "{problem}");
        }
    }
    out
}

/// Processes in tree order (each after its parent), with their depth.
fn tree_order(set: &ImageSet) -> Vec<(&Process, usize)> {
    let mut out = Vec::new();
    let mut placed = vec![false; set.processes.len()];
    let roots: Vec<usize> = (0..set.processes.len())
        .filter(|&i| set.process(set.processes[i].entry.ppid).is_none())
        .collect();
    let mut stack: Vec<(usize, usize)> = roots.into_iter().rev().map(|i| (i, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut placed[i], true) {
            continue;
        }
        out.push((&set.processes[i], depth));
        let pid = set.processes[i].pid();
        let children: Vec<usize> = (0..set.processes.len())
            .filter(|&c| set.processes[c].entry.ppid == pid && c != i)
            .collect();
        stack.extend(children.into_iter().rev().map(|c| (c, depth + 1)));
    }
    // a cycle of ppids has no root: list what is left as it comes
    for (i, p) in set.processes.iter().enumerate() {
        if !placed[i] {
            out.push((p, 0));
        }
    }
    out
}

fn state_name(state: Option<u32>) -> &'static str {
    match state {
        Some(1) => "alive",
        Some(2) => "dead",
        Some(3) => "stopped",
        Some(6) => "zombie",
        Some(_) => "other",
        None => "?",
    }
}

fn type_name(value: i32) -> String {
    FdTypes::try_from(value).map_or_else(|_| value.to_string(), |t| t.as_str_name().to_owned())
}

/// What an open file is, in a few words.
fn describe(file: &FileEntry, set: &ImageSet) -> String {
    if let Some(reg) = &file.reg {
        return reg.name.clone();
    }
    if let Some(pipe) = &file.pipe {
        return format!("pipe:[{}]", pipe.pipe_id);
    }
    if let Some(fifo) = &file.fifo {
        let name = fifo
            .regf_id
            .and_then(|id| set.files.get(&id))
            .and_then(|f| f.reg.as_ref())
            .map_or("", |r| r.name.as_str());
        return format!("fifo:[{}] {name}", fifo.pipe_id)
            .trim_end()
            .to_owned();
    }
    if let Some(sk) = &file.usk {
        let name = String::from_utf8_lossy(&sk.name).replace('\0', "@");
        return format!("unix:[{}] {name}", sk.ino).trim_end().to_owned();
    }
    if let Some(sk) = &file.isk {
        let proto = match sk.proto {
            6 => "tcp",
            17 => "udp",
            _ => "ip",
        };
        return format!(
            "{proto} {}:{} -> {}:{}",
            address(&sk.src_addr),
            sk.src_port,
            address(&sk.dst_addr),
            sk.dst_port
        );
    }
    if let Some(tty) = &file.tty {
        return format!("tty info {}", tty.tty_info_id);
    }
    if let Some(memfd) = &file.memfd {
        return format!("memfd inode {}", memfd.inode_id);
    }
    if let Some(efd) = &file.efd {
        return format!("eventfd counter {}", efd.counter);
    }
    if let Some(tfd) = &file.tfd {
        return format!("timerfd clock {}", tfd.clockid);
    }
    if file.epfd.is_some() {
        return "eventpoll".into();
    }
    if file.sgfd.is_some() {
        return "signalfd".into();
    }
    if let Some(ns) = &file.nsf {
        return format!("namespace type {:#x}", ns.ns_cflag);
    }
    type_name(file.r#type).to_lowercase()
}

fn address(words: &[u32]) -> String {
    crate::json::text::format_ip(words).unwrap_or_else(|| "?".into())
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes / 1024;
    let mut remainder = bytes % 1024;
    let mut unit = 0;
    while value >= 1024 && unit + 1 < UNITS.len() {
        remainder = value % 1024;
        value /= 1024;
        unit += 1;
    }
    format!("{value}.{} {}", remainder * 10 / 1024, UNITS[unit])
}

/// Rows of cells printed under a header.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&str]) -> Self {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, aligned: bool) -> String {
        let mut out = String::new();
        if self.rows.len() == 1 {
            out.push_str("(none)\n");
            return out;
        }
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push(if aligned { ' ' } else { '\t' });
                    if aligned {
                        line.push(' ');
                    }
                }
                line.push_str(cell);
                if aligned && c + 1 < row.len() {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_terminals_and_use_tabs_otherwise() {
        let mut t = Table::new(&["PID", "COMMAND"]);
        t.row(vec!["1".into(), "init".into()]);
        t.row(vec!["12345".into(), "x".into()]);
        assert_eq!(t.render(true), "PID    COMMAND\n1      init\n12345  x\n");
        assert_eq!(t.render(false), "PID\tCOMMAND\n1\tinit\n12345\tx\n");
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(4096), "4.0 KiB");
        assert_eq!(human_size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
