//! Which pages a dump saves, and how they travel.
//!
//! [`plan`] turns the pages found in each VMA into runs of one kind: saved here
//! ([`RunKind::Dump`]), left to the parent images ([`RunKind::Parent`], `PE_PARENT`: unchanged
//! since the previous round, proven by dirty tracking) or left to the page server of a lazy
//! restore ([`RunKind::Lazy`], `PE_LAZY`, no data), or, in a queued pre-copy round
//! (`--hold-hot-pages`), held back for a later round ([`RunKind::Held`]: no pagemap entry at
//! all, and the tracker remembers them so that no later round calls them `PE_PARENT`).
//! [`stream`] sends the plan, in address order,
//! to any [`PageSink`]: local images or a page server. A reader thread fills 4 MiB buffers
//! with `process_vm_readv` while this thread hands the previous one to the sink, so the
//! target's memory goes from one buffer straight to the file or socket.
//!
//! When the target runs while its pages are read (pre-dump), a page it unmapped in the
//! meantime cannot be read: it is left out of the images, page by page (a failed range is
//! halved until only the pages that are gone remain). That is safe because a page that was
//! unmapped belongs to no VMA tracked through the interval: whatever is mapped there at the
//! next round was mapped since, so dirty tracking reports it written or whole, and nothing
//! ever refers to it as `PE_PARENT`.

use std::io::IoSlice;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ckpt_page_server::PageSink;
use images_format::PageFlags;
use tracee::memory::{self, MemoryError, RemoteRange};
use tracee::{Pid, RemoteAddr, PAGE_SIZE};

use crate::collect::PageRun;
use crate::fault::{self, FaultPoint, InjectedFault};

/// Bytes read from the target per batch: process_vm_readv measured fastest with 4 MiB.
const BATCH_BYTES: u64 = 4 << 20;
/// The kernel's limit on iovecs per call.
const BATCH_RUNS: usize = 1024;

/// Where the contents of a run of pages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Read now and saved (`PE_PRESENT`).
    Dump,
    /// Unchanged since the parent images, which hold them (`PE_PARENT`).
    Parent,
    /// Served later by the source to a lazy restore (`PE_LAZY`).
    Lazy,
    /// Written since the previous round (or never proven clean): held back for a later round
    /// of a queued pre-copy, absent from these images.
    Held,
}

/// A run of pages with one [`RunKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRun {
    pub start: u64,
    pub pages: u64,
    pub kind: RunKind,
}

impl PlannedRun {
    pub fn end(&self) -> u64 {
        self.start + self.pages * PAGE_SIZE
    }
}

/// What is known about one VMA's pages since the previous round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmaHistory {
    /// Nothing is proven about the pages: save every one.
    Unknown,
    /// Tracked the whole interval: only these `[start, end)` ranges differ from the parent
    /// images (written since, or held back by an earlier round).
    Written(Vec<(u64, u64)>),
    /// A queued pre-copy round (`--hold-hot-pages`): `hot` ranges were written since the
    /// previous round (or nothing is proven about them) and are held back; `pending` ones
    /// were held back by an earlier round and are saved now unless hot again; every other
    /// page is in the parent images.
    Queued {
        hot: Vec<(u64, u64)>,
        pending: Vec<(u64, u64)>,
    },
}

/// How one VMA's pages are to be saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmaPolicy {
    pub start: u64,
    pub end: u64,
    pub history: VmaHistory,
    /// Pages not written since the parent and not kept present go to the lazy restore.
    pub lazy: bool,
    /// `[start, end)` ranges of a lazy VMA that are saved anyway (stack pages in use).
    pub keep: Vec<(u64, u64)>,
}

/// Adds a run, merged with the previous one when they touch and `from` (the start of the VMA
/// the run is in) is not past the previous run: runs never span VMAs, so that a VMA the
/// running target unmaps during a pre-dump costs only its own pages.
fn push(plan: &mut Vec<PlannedRun>, from: u64, start: u64, end: u64, kind: RunKind) {
    if end <= start {
        return;
    }
    let pages = (end - start) / PAGE_SIZE;
    match plan.last_mut() {
        Some(last) if last.end() == start && last.kind == kind && from < start => {
            last.pages += pages
        }
        _ => plan.push(PlannedRun { start, pages, kind }),
    }
}

/// Splits `[start, end)` by sorted, disjoint `marks` into pieces inside and outside them.
fn split_by(start: u64, end: u64, marks: &[(u64, u64)], mut out: impl FnMut(u64, u64, bool)) {
    let mut at = start;
    for &(ms, me) in marks {
        if me <= at {
            continue;
        }
        if ms >= end {
            break;
        }
        let (ms, me) = (ms.max(at), me.min(end));
        out(at, ms, false);
        out(ms, me, true);
        at = me;
    }
    out(at, end, false);
}

/// Turns the present pages (`runs`, sorted) into a plan, VMA by VMA (`vmas`, sorted; pages
/// outside every listed VMA are saved). Written pages that are no longer present never
/// appear: they restore as zero.
pub fn plan(runs: &[PageRun], vmas: &[VmaPolicy]) -> Vec<PlannedRun> {
    let mut out = Vec::new();
    let mut vi = 0;
    for run in runs {
        let mut at = run.start;
        let end = run.end();
        while at < end {
            while vi < vmas.len() && vmas[vi].end <= at {
                vi += 1;
            }
            let Some(vma) = vmas.get(vi).filter(|v| v.start <= at) else {
                // Before the next VMA (or past the last one): nothing known, save it.
                let stop = vmas.get(vi).map_or(end, |v| v.start.min(end));
                push(&mut out, at, at, stop, RunKind::Dump);
                at = stop;
                continue;
            };
            let stop = vma.end.min(end);
            let from = vma.start;
            let clean = if vma.lazy {
                RunKind::Lazy
            } else {
                RunKind::Parent
            };
            match &vma.history {
                VmaHistory::Unknown if !vma.lazy => push(&mut out, from, at, stop, RunKind::Dump),
                VmaHistory::Unknown => split_by(at, stop, &vma.keep, |s, e, kept| {
                    push(
                        &mut out,
                        from,
                        s,
                        e,
                        if kept { RunKind::Dump } else { clean },
                    )
                }),
                VmaHistory::Queued { hot, pending } => split_by(at, stop, hot, |s, e, hot| {
                    if hot {
                        push(&mut out, from, s, e, RunKind::Held);
                    } else {
                        split_by(s, e, pending, |s, e, pending| {
                            let kind = if pending {
                                RunKind::Dump
                            } else {
                                RunKind::Parent
                            };
                            push(&mut out, from, s, e, kind);
                        });
                    }
                }),
                VmaHistory::Written(written) => split_by(at, stop, written, |s, e, dirty| {
                    if !dirty {
                        push(&mut out, from, s, e, RunKind::Parent);
                    } else if !vma.lazy {
                        push(&mut out, from, s, e, RunKind::Dump);
                    } else {
                        split_by(s, e, &vma.keep, |s, e, kept| {
                            push(
                                &mut out,
                                from,
                                s,
                                e,
                                if kept { RunKind::Dump } else { clean },
                            )
                        });
                    }
                }),
            }
            at = stop;
        }
    }
    out
}

/// Page counts and times of one [`stream`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    pub written: u64,
    pub parent: u64,
    pub lazy: u64,
    /// Pages that could not be read because the running target unmapped them.
    pub vanished: u64,
    /// Pages held back for a later round (queued pre-copy).
    pub held: u64,
    pub read_time: Duration,
    pub write_time: Duration,
}

/// Sending the pages failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("dump: pid {pid}: read pages")]
    Read {
        pid: Pid,
        #[source]
        source: MemoryError,
    },
    #[error("dump: pid {pid}: send pages at {vaddr:#x}")]
    Sink {
        pid: Pid,
        vaddr: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("dump: the page reader thread panicked")]
    ReaderPanicked,
    #[error(transparent)]
    Fault(#[from] InjectedFault),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Data {
        addr: u64,
        len: usize,
    },
    Hole {
        addr: u64,
        pages: u64,
        kind: RunKind,
    },
}

/// Splits the plan into batches of at most [`BATCH_BYTES`] of data in [`BATCH_RUNS`] runs.
fn batches(plan: &[PlannedRun]) -> Vec<Vec<Item>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0u64;
    let mut data_items = 0usize;
    for run in plan {
        if run.kind == RunKind::Held {
            // Not in these images at all.
            continue;
        }
        if run.kind != RunKind::Dump {
            current.push(Item::Hole {
                addr: run.start,
                pages: run.pages,
                kind: run.kind,
            });
            continue;
        }
        let (mut start, end) = (run.start, run.end());
        while start < end {
            let take = (end - start).min(BATCH_BYTES - bytes);
            current.push(Item::Data {
                addr: start,
                len: usize::try_from(take).unwrap_or(usize::MAX),
            });
            bytes += take;
            data_items += 1;
            start += take;
            if bytes == BATCH_BYTES || data_items == BATCH_RUNS {
                out.push(std::mem::take(&mut current));
                bytes = 0;
                data_items = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A batch whose data items were read; `readable[i]` lists the `(offset, len)` spans of data
/// item `i` that could be read (all of it unless the target unmapped pages meanwhile).
struct ReadBatch {
    items: Vec<Item>,
    readable: Vec<Vec<(usize, usize)>>,
    data: Vec<u8>,
    offset: usize,
}

fn ranges_of(items: &[Item]) -> Vec<RemoteRange> {
    items
        .iter()
        .filter_map(|item| match *item {
            Item::Data { addr, len } => Some(RemoteRange {
                addr: RemoteAddr(addr),
                len,
            }),
            Item::Hole { .. } => None,
        })
        .collect()
}

/// Reads a batch; with `running`, the pages of a range that are gone are left out.
fn read_batch(
    pid: Pid,
    items: &[Item],
    buf: &mut [u8],
    running: bool,
) -> Result<Vec<Vec<(usize, usize)>>, MemoryError> {
    let ranges = ranges_of(items);
    let total: usize = ranges.iter().map(|r| r.len).sum();
    let Some(dst) = buf.get_mut(..total) else {
        return Err(MemoryError::BufferSize {
            pid,
            buf: buf.len(),
            total,
        });
    };
    match memory::read_remote_vectored(pid, &ranges, dst) {
        Ok(()) => Ok(ranges.iter().map(|r| vec![(0, r.len)]).collect()),
        Err(err) if !running => Err(err),
        Err(err) => {
            tracing::debug!(%pid, error = %err, "a batch failed: reading its ranges one by one");
            let mut readable = Vec::with_capacity(ranges.len());
            let mut off = 0;
            for range in &ranges {
                let slot = &mut dst[off..off + range.len];
                let mut spans = Vec::new();
                read_what_remains(pid, range.addr.get(), slot, 0, &mut spans);
                let read: usize = spans.iter().map(|&(_, n)| n).sum();
                if read < range.len {
                    tracing::info!(%pid, addr = %range.addr, len = range.len, read,
                        "pages vanished while the process ran: left out");
                }
                readable.push(spans);
                off += range.len;
            }
            Ok(readable)
        }
    }
}

/// Reads `buf.len()` bytes at `addr`, halving a range that fails down to single pages, and
/// appends the spans read (offsets from `at`). A page is left out only if it is gone itself:
/// dirty tracking carries a VMA whose bounds moved to the next round, so a page of it left
/// out here would later be referred to as `PE_PARENT` without the parent holding it.
fn read_what_remains(
    pid: Pid,
    addr: u64,
    buf: &mut [u8],
    at: usize,
    spans: &mut Vec<(usize, usize)>,
) {
    let range = RemoteRange {
        addr: RemoteAddr(addr),
        len: buf.len(),
    };
    if memory::read_remote_vectored(pid, std::slice::from_ref(&range), buf).is_ok() {
        match spans.last_mut() {
            Some((start, len)) if *start + *len == at => *len += buf.len(),
            _ => spans.push((at, buf.len())),
        }
        return;
    }
    let page = usize::try_from(PAGE_SIZE).unwrap_or(4096);
    let pages = buf.len() / page;
    if pages <= 1 {
        return;
    }
    let half = pages / 2 * page;
    let (low, high) = buf.split_at_mut(half);
    read_what_remains(pid, addr, low, at, spans);
    read_what_remains(pid, addr + half as u64, high, at + half, spans);
}

fn sink_err<E: std::error::Error + Send + Sync + 'static>(
    pid: Pid,
    vaddr: u64,
) -> impl FnOnce(E) -> StreamError {
    move |source| StreamError::Sink {
        pid,
        vaddr,
        source: Box::new(source),
    }
}

/// The bytes of page contents a batch reads.
fn data_bytes(items: &[Item]) -> u64 {
    items
        .iter()
        .map(|item| match *item {
            Item::Data { len, .. } => len as u64,
            Item::Hole { .. } => 0,
        })
        .sum()
}

/// Hands one read batch to `sink`: the pages that could be read, then the holes.
fn send_batch<S: PageSink>(
    pid: Pid,
    batch: &ReadBatch,
    sink: &mut S,
    out: &mut Streamed,
) -> Result<(), StreamError> {
    let started = Instant::now();
    let mut off = batch.offset;
    let mut data_index = 0;
    for item in &batch.items {
        match *item {
            Item::Data { addr, len } => {
                let spans = batch.readable.get(data_index).map(Vec::as_slice);
                data_index += 1;
                let mut read = 0;
                for &(at, n) in spans.unwrap_or_default() {
                    let vaddr = addr + at as u64;
                    let slice = IoSlice::new(&batch.data[off + at..off + at + n]);
                    sink.add_pages(vaddr, PageFlags::PRESENT, &[slice])
                        .map_err(sink_err(pid, vaddr))?;
                    read += n;
                }
                out.written += read as u64 / PAGE_SIZE;
                out.vanished += len.saturating_sub(read) as u64 / PAGE_SIZE;
                off += len;
            }
            Item::Hole { addr, pages, kind } => {
                let flags = match kind {
                    RunKind::Parent => PageFlags::PARENT,
                    RunKind::Lazy | RunKind::Dump | RunKind::Held => PageFlags::LAZY,
                };
                sink.add_hole(addr, pages, flags)
                    .map_err(sink_err(pid, addr))?;
                if kind == RunKind::Parent {
                    out.parent += pages;
                } else {
                    out.lazy += pages;
                }
            }
        }
    }
    out.write_time += started.elapsed();
    Ok(())
}

/// Sends the plan of `pid` to `sink` in address order. `running` says the target is not
/// frozen (pre-dump): ranges it unmaps meanwhile are left out instead of failing the dump.
pub fn stream<S: PageSink>(
    pid: Pid,
    plan: &[PlannedRun],
    sink: &mut S,
    running: bool,
    fault_at: Option<FaultPoint>,
) -> Result<Streamed, StreamError> {
    let batches = batches(plan);
    let mut out = Streamed {
        held: plan
            .iter()
            .filter(|r| r.kind == RunKind::Held)
            .map(|r| r.pages)
            .sum(),
        ..Streamed::default()
    };
    if out.held > 0 {
        // The figure a queued pre-copy decides its next step by.
        tracing::info!(%pid, held = out.held, "pages held back for a later round");
    }
    // A buffer holds the largest batch (and a page more, to align its start).
    let largest = batches.iter().map(|b| data_bytes(b)).max().unwrap_or(0);
    let buf_len = usize::try_from(largest + PAGE_SIZE).unwrap_or(0);
    let read = |items: Vec<Item>, mut data: Vec<u8>| {
        // Page-aligned contents can go to an O_DIRECT file as they are.
        let offset = data.as_ptr().align_offset(PAGE_SIZE as usize);
        let started = Instant::now();
        read_batch(pid, &items, &mut data[offset..], running)
            .map_err(|source| StreamError::Read { pid, source })
            .map(|readable| {
                let batch = ReadBatch {
                    items,
                    readable,
                    data,
                    offset,
                };
                (batch, started.elapsed())
            })
    };
    if batches.len() <= 1 {
        // A small process (the common case of a freeze that must be short): a reader
        // thread and its two buffers would cost more than the reading.
        for items in batches {
            let (batch, took) = read(items, vec![0u8; buf_len])?;
            out.read_time += took;
            send_batch(pid, &batch, sink, &mut out)?;
            fault::check(fault_at, FaultPoint::MidPages)?;
        }
        return Ok(out);
    }
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(ReadBatch, Duration), StreamError>>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    // Two buffers in flight: one being read from the target, one being sent.
    for _ in 0..2 {
        let _ = empty_tx.send(vec![0u8; buf_len]);
    }
    std::thread::scope(|scope| -> Result<(), StreamError> {
        let reader = scope.spawn(move || {
            for items in batches {
                let Ok(data) = empty_rx.recv() else {
                    return;
                };
                let result = read(items, data);
                let failed = result.is_err();
                if full_tx.send(result).is_err() || failed {
                    return;
                }
            }
        });
        let mut sent_batches = 0u64;
        for message in full_rx.iter() {
            let (batch, took) = message?;
            out.read_time += took;
            send_batch(pid, &batch, sink, &mut out)?;
            sent_batches += 1;
            if sent_batches == 1 {
                fault::check(fault_at, FaultPoint::MidPages)?;
            }
            let _ = empty_tx.send(batch.data);
        }
        // Dropping `empty_tx` here (or on an early `?`) ends the reader's wait for a free
        // buffer, so the scope can always join it.
        drop(empty_tx);
        reader.join().map_err(|_| StreamError::ReaderPanicked)
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn run(start: u64, pages: u64) -> PageRun {
        PageRun { start, pages }
    }

    fn planned(start: u64, pages: u64, kind: RunKind) -> PlannedRun {
        PlannedRun { start, pages, kind }
    }

    fn vma(start: u64, end: u64, history: VmaHistory) -> VmaPolicy {
        VmaPolicy {
            start,
            end,
            history,
            lazy: false,
            keep: Vec::new(),
        }
    }

    #[test]
    fn without_history_everything_is_saved() {
        let runs = [run(0x1000, 4), run(0x10000, 2)];
        let vmas = [vma(0x1000, 0x20000, VmaHistory::Unknown)];
        assert_eq!(
            plan(&runs, &vmas),
            vec![
                planned(0x1000, 4, RunKind::Dump),
                planned(0x10000, 2, RunKind::Dump)
            ]
        );
    }

    #[test]
    fn written_pages_are_saved_and_the_rest_left_to_the_parent() {
        // Pages 0x1000..0x9000 present; 0x3000 and 0x7000..0x8000 written; a written page
        // at 0x20000 is no longer present and must not appear at all.
        let runs = [run(0x1000, 8)];
        let written = vec![(0x3000, 0x4000), (0x7000, 0x8000), (0x20000, 0x21000)];
        let vmas = [vma(0x1000, 0x30000, VmaHistory::Written(written))];
        assert_eq!(
            plan(&runs, &vmas),
            vec![
                planned(0x1000, 2, RunKind::Parent),
                planned(0x3000, 1, RunKind::Dump),
                planned(0x4000, 3, RunKind::Parent),
                planned(0x7000, 1, RunKind::Dump),
                planned(0x8000, 1, RunKind::Parent),
            ]
        );
    }

    #[test]
    fn runs_never_span_vmas() {
        let runs = [run(0x1000, 4)];
        let vmas = [
            vma(0x1000, 0x3000, VmaHistory::Unknown),
            vma(0x3000, 0x5000, VmaHistory::Unknown),
        ];
        assert_eq!(
            plan(&runs, &vmas),
            vec![
                planned(0x1000, 2, RunKind::Dump),
                planned(0x3000, 2, RunKind::Dump)
            ]
        );
    }

    #[test]
    fn runs_spanning_vmas_follow_each_vma() {
        // One run across two VMAs: the first untracked (whole), the second tracked clean.
        let runs = [run(0x1000, 4)];
        let vmas = [
            vma(0x1000, 0x3000, VmaHistory::Unknown),
            vma(0x3000, 0x5000, VmaHistory::Written(Vec::new())),
        ];
        assert_eq!(
            plan(&runs, &vmas),
            vec![
                planned(0x1000, 2, RunKind::Dump),
                planned(0x3000, 2, RunKind::Parent)
            ]
        );
        // Pages outside every listed VMA are saved.
        let runs = [run(0x100000, 1)];
        assert_eq!(
            plan(&runs, &vmas),
            vec![planned(0x100000, 1, RunKind::Dump)]
        );
    }

    #[test]
    fn lazy_vmas_keep_stack_pages_and_leave_clean_pages_to_the_parent() {
        let runs = [run(0x10000, 8)];
        let mut lazy = vma(0x10000, 0x18000, VmaHistory::Unknown);
        lazy.lazy = true;
        lazy.keep = vec![(0x12000, 0x13000)];
        assert_eq!(
            plan(&runs, std::slice::from_ref(&lazy)),
            vec![
                planned(0x10000, 2, RunKind::Lazy),
                planned(0x12000, 1, RunKind::Dump),
                planned(0x13000, 5, RunKind::Lazy),
            ]
        );
        // Assisted post-copy: clean pages from the parent, only written ones lazy.
        lazy.history = VmaHistory::Written(vec![(0x11000, 0x13000)]);
        assert_eq!(
            plan(&runs, &[lazy]),
            vec![
                planned(0x10000, 1, RunKind::Parent),
                planned(0x11000, 1, RunKind::Lazy),
                planned(0x12000, 1, RunKind::Dump),
                planned(0x13000, 5, RunKind::Parent),
            ]
        );
    }

    #[test]
    fn only_the_pages_that_are_gone_are_left_out() {
        let pid = Pid::from_raw(i32::try_from(std::process::id()).expect("pid")).expect("pid");
        let maps = tracee::proc::maps::read(pid).expect("own maps");
        // A readable VMA with at least 3 pages and 2 unmapped pages on each side.
        let found = maps.iter().enumerate().find(|(i, v)| {
            let before = i.checked_sub(1).and_then(|j| maps.get(j));
            let after = maps.get(i + 1);
            v.perms.read
                && v.path.as_deref() != Some("[vvar]")
                && v.end.get() - v.start.get() >= 3 * P
                && before.is_none_or(|b| b.end.get() + 2 * P <= v.start.get())
                && after.is_some_and(|a| v.end.get() + 2 * P <= a.start.get())
        });
        let Some((_, vma)) = found else {
            panic!("no VMA with unmapped pages around it in {maps:?}");
        };
        let page = P as usize;
        let mut buf = vec![0u8; 7 * page];
        let mut spans = Vec::new();
        read_what_remains(pid, vma.end.get() - 3 * P, &mut buf, 0, &mut spans);
        assert_eq!(spans, vec![(0, 3 * page)]);
        let mut spans = Vec::new();
        read_what_remains(
            pid,
            vma.start.get() - 2 * P,
            &mut buf[..5 * page],
            0,
            &mut spans,
        );
        assert_eq!(spans, vec![(2 * page, 3 * page)]);
    }

    #[test]
    fn batches_respect_size_iovecs_and_keep_holes_in_order() {
        let plan = [
            planned(0x1000, 1, RunKind::Dump),
            planned(0x2000, 3, RunKind::Parent),
            planned(0x10_0000, 2048, RunKind::Dump), // 8 MiB
        ];
        let b = batches(&plan);
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0],
            vec![
                Item::Data {
                    addr: 0x1000,
                    len: P as usize
                },
                Item::Hole {
                    addr: 0x2000,
                    pages: 3,
                    kind: RunKind::Parent
                },
                Item::Data {
                    addr: 0x10_0000,
                    len: (4 << 20) - P as usize
                },
            ]
        );
        let many: Vec<PlannedRun> = (0..2500u64)
            .map(|i| planned(i * 2 * P, 1, RunKind::Dump))
            .collect();
        let sizes: Vec<usize> = batches(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1024, 1024, 452]);
    }
}
