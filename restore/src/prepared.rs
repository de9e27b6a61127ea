//! The destination of a prepared post-copy (`ckpt-restore --lazy-pages --prepared A:P`), or
//! of the prepared end of a pre-copy (`--prepared` alone: the held tree has all of its memory,
//! and the delta's pages, written since the prepared images, are written over it, on the
//! fast path and after a fallback's rebuild alike):
//! which changes between the prepared images and the final ones the held tree can take
//! as they are, and which force it to be rebuilt.
//!
//! The tree is rebuilt from the prepared images while the source runs on; the source then
//! freezes and sends the images whose bytes changed (see `images_format::switch`). Most of
//! a process's state does not change in the few milliseconds between the two dumps, and
//! what does (registers, the signal mask, the lazy page lists, file positions) can be put
//! into the held tree with a few ptrace calls: that is the fast path. Anything else — a new
//! mapping, a new fd, a new thread, a changed signal handler — was built into the held
//! tree from the old images, and only a full restore from the new ones gets it right.
//!
//! [`judge`] decides from the images alone (decoded, field by field) and says which image
//! and field forced the fallback; it touches no process.
//!
//! [`restore_prepared`] is the sequence: connect to the source and open the switch; build
//! the tree from the prepared images and hold it (userfaultfds created but not handed to
//! the daemon: until the daemon has the memory, nothing may fault on a lazy page; so an
//! rseq area on lazy memory stays unregistered, the others are registered as in any
//! restore); give back the CPU affinities and set the threads' extras; READY; wait for the
//! DELTA; write its page lists into the directory (the daemon reads them from there) and
//! judge. Fast path: install the hot pages, write the changed pages that are in, load the
//! new registers and masks, move file positions (none of it touches lazy memory), hand
//! the userfaultfds to the daemon, detach, RESUMED; the rest of the delta's images are
//! written once the tree runs. (An rseq area left unregistered is registered right after
//! an early hand-off, before the registers are loaded.) Fallback: kill and reap the held
//! tree, restore from the updated directory as a plain lazy restore, RESUMED.
//! Whatever fails before the tree runs is reported with FAILED, so that the source runs
//! on; an ABORT or the link closing before the delta drops the held tree.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use images_format::pb;
use images_format::switch::{self, HotPages, NamedImage, SwitchError, SwitchMessage};
use images_format::{ImageKind, ImageReader, PageFlags, PageRange, Pagemap};
use prost::Message;
use tracee::{Pid, Tracee};

use crate::plan::Range;
use crate::{micros, plan, resume, threads, Held, RestoreError, RestoreOptions, RestoreOutcome};

/// How long the destination keeps trying to reach the source (it may still be starting).
/// How long the delta may take once READY is sent: a freeze and one collection at the source.
const DELTA_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum PreparedError {
    #[error("connect to the source's switch at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error("the source called the switch off: {why}")]
    Aborted { why: String },
    #[error("the source sent {what} instead of the delta")]
    Unexpected { what: &'static str },
    #[error("writing the delta's image {path}")]
    WriteImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the prepared image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} fd {fd}: moving file id {file_id} to position {pos}")]
    Position {
        pid: Pid,
        fd: i32,
        file_id: u32,
        pos: u64,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid}: writing the changed pages at {vaddr:#x}")]
    WritePages {
        pid: Pid,
        vaddr: u64,
        #[source]
        source: io::Error,
    },
    #[error("file id {file_id}: no process of the tree holds it")]
    NoHolder { file_id: u32 },
    #[error("image tid {tid}: not a thread of the held tree")]
    NoThread { tid: i32 },
    #[error("sending RESUMED to the source")]
    Resumed(#[source] SwitchError),
}

/// Heap touched ahead of the switch: several times what it allocates for a small tree.
const SWITCH_HEAP: usize = 512 << 10;

/// Restores as `ckpt-restore --lazy-pages --prepared SOURCE` (see the module's docs).
/// The calling thread runs the switch, from READY to the tree's resume, at the lowest
/// real-time priority where it may (a build or the lazy-pages daemon would take the CPU
/// in the middle of the down time otherwise), and lowers its priority once the
/// tree runs (as [`crate::restore`] does).
pub fn restore_prepared(
    opts: &RestoreOptions,
    source: &str,
) -> Result<RestoreOutcome, RestoreError> {
    let started = Instant::now();
    let mut link = connect(source)?;
    let mut held = match crate::build(opts, true, None) {
        Ok(held) => held,
        Err(error) => {
            tell_failed(&mut link, &error);
            return Err(error);
        }
    };
    let work_dir = held.work_dir.clone();
    if let Some(p) = held.prepared.as_mut() {
        p.connect_early(&work_dir);
    }
    // Nothing of it can change without the judge calling the fast path off.
    if let Err(error) = crate::settle(&mut held) {
        tell_failed(&mut link, &error);
        return Err(error);
    }
    // The switch runs on this CPU, and the tree wakes where it last ran: elsewhere.
    let ours = rustix::thread::sched_getcpu();
    let mut pin = u32::try_from(ours)
        .ok()
        .and_then(|cpu| tracee::cpu::CpuPin::to_cpu(cpu).ok());
    let threads = held
        .tracees
        .iter_mut()
        .flatten()
        .chain(held.threads.iter_mut().flatten());
    if let Err(error) = crate::resume::move_off_cpu(threads, ours) {
        let error = error.into();
        tell_failed(&mut link, &error);
        return Err(error);
    }
    // The prepared bytes of every image, for the comparison at the switch.
    let old = snapshot(held.dir.path());
    let cores = decode_cores(&old);
    let mems = open_memories(&held);
    let mut spare = spare_buffers(&old);
    // The switch's allocations then take no fault on a fresh page (see `tracee::heap`).
    tracee::heap::warm(SWITCH_HEAP);
    tracing::info!(
        us = micros(started.elapsed()),
        "prepared tree held: ready for the switch"
    );
    let ready = SwitchMessage::Ready {
        hot_pages: opts.lazy_prefetch_hot,
    };
    // Real-time priority (the lowest) from READY until the tree runs: the switch is down
    // time, and on a machine with few CPUs a build or the lazy-pages daemon (which starts
    // on the userfaultfds the moment it gets them) would otherwise take the CPU in the
    // middle of it. Children forked meanwhile (a fallback's tree) start with the normal
    // policy.
    let hurried = tracee::taskinfo::RealTime::raise();
    if let Err(error) = switch::write_message(&mut link, &ready, false) {
        drop(held);
        return Err(PreparedError::from(error).into());
    }
    // The source freezes and answers at once; a link that stays silent is a lost one.
    let _ = link.set_read_timeout(Some(DELTA_TIMEOUT));
    let mut arriving = FirstByte {
        inner: &mut link,
        at: None,
        last: None,
    };
    let message = switch::read_message_reusing(
        &mut arriving,
        |name| old.get(name).map(Vec::as_slice),
        &mut spare,
    );
    let received = Instant::now();
    // The down time runs from the delta's first byte: reading and decoding it are in.
    let arrived = arriving.at.unwrap_or(received);
    let all_in = arriving.last.unwrap_or(received);
    let _ = link.set_read_timeout(None);
    let (images, hot) = match message {
        Ok(SwitchMessage::Delta { images, hot }) => (images, hot),
        Ok(SwitchMessage::Abort { why }) => {
            drop(held);
            return Err(PreparedError::Aborted { why }.into());
        }
        Ok(other) => {
            drop(held);
            let what = match other {
                SwitchMessage::Ready { .. } => "READY",
                SwitchMessage::Resumed => "RESUMED",
                SwitchMessage::Failed { .. } => "FAILED",
                _ => "another message",
            };
            let error = PreparedError::Unexpected { what }.into();
            tell_failed(&mut link, &error);
            return Err(error);
        }
        Err(error @ (SwitchError::Io { .. } | SwitchError::Closed)) => {
            // The source is gone or the link broke: it runs on, or is dead.
            drop(held);
            return Err(PreparedError::from(error).into());
        }
        Err(error) => {
            // A delta that cannot be read here (damaged, or made against another copy of
            // the prepared images): the source hears why, and runs on.
            drop(held);
            let error = PreparedError::from(error).into();
            tell_failed(&mut link, &error);
            return Err(error);
        }
    };
    let mut resumed = false;
    let result = switch_over(
        held,
        opts,
        &mut link,
        &hurried,
        &mut pin,
        Delta {
            images: &images,
            hot: &hot,
            old,
            cores,
            mems,
            received: arrived,
            arrival_us: micros(all_in.duration_since(arrived)),
            decode_us: micros(received.duration_since(all_in)),
        },
        &mut resumed,
    );
    if let Err(error) = &result {
        if !resumed {
            tell_failed(&mut link, error);
        }
    }
    // Freed only now (large ones are unmapped: not inside the down time).
    drop(spare);
    result
}

fn connect(source: &str) -> Result<TcpStream, PreparedError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut link = loop {
        match TcpStream::connect(source) {
            Ok(link) => break link,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source_error) => {
                return Err(PreparedError::Connect {
                    addr: source.to_string(),
                    source: source_error,
                })
            }
        }
    };
    // One small frame each way at the switch: no waiting for more to send.
    let _ = link.set_nodelay(true);
    switch::write_magic(&mut link)?;
    Ok(link)
}

/// Tells the source that the destination will not run: it resumes its process.
fn tell_failed(link: &mut TcpStream, error: &RestoreError) {
    let mut why = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        why.push_str(": ");
        why.push_str(&s.to_string());
        source = s.source();
    }
    let _ = switch::write_message(link, &SwitchMessage::Failed { why }, false);
}

/// The memory of every process of the held tree, opened while it is held (an open of
/// /proc takes a path walk; the switch then only writes). One that cannot be opened is
/// opened again when needed, where its error is reported.
fn open_memories(held: &Held) -> HashMap<Pid, tracee::RemoteMem> {
    held.tree
        .procs
        .iter()
        .zip(&held.hosts)
        .filter(|(p, _)| matches!(p.kind, plan::ProcKind::Live(_)))
        .filter_map(|(_, &host)| Some((host, tracee::RemoteMem::open(host).ok()?)))
        .collect()
}

/// Buffers for the delta's images, one as large as each prepared image (an image that
/// changed is mostly as long as it was), written once now so that their pages are in:
/// faulting them in while the delta is decoded costs microseconds a page, inside the down
/// time.
fn spare_buffers(old: &HashMap<String, Vec<u8>>) -> Vec<Vec<u8>> {
    old.values()
        .map(|prepared| {
            let mut b = Vec::with_capacity(prepared.len() + SPARE_SLACK);
            b.resize(b.capacity(), 0xA5);
            b
        })
        .collect()
}

/// Room a spare buffer has beyond its prepared image: a core image whose registers'
/// encodings grew.
const SPARE_SLACK: usize = 256;

/// Image files up to this size are read into memory while the tree is held.
const SNAPSHOT_MAX: u64 = switch::MAX_BASE as u64;

/// The bytes of the images in `dir` (those small enough; others are read when needed).
fn snapshot(dir: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let small = e
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() <= SNAPSHOT_MAX);
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if small {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.insert(name, bytes);
            }
        }
    }
    out
}

/// Back to the normal policy after the real-time switch, at nice value `nice` if given.
fn end_hurry(hurried: &tracee::taskinfo::RealTime, nice: Option<i32>) {
    let ended = match nice {
        Some(nice) => hurried.end_at_nice(nice),
        None => hurried.end(),
    };
    if let Err(error) = ended {
        tracing::warn!(%error, "back to the normal scheduling policy");
    }
}

/// A reader that notes when its first bytes came, and its last.
struct FirstByte<'a> {
    inner: &'a mut TcpStream,
    at: Option<Instant>,
    last: Option<Instant>,
}

impl io::Read for FirstByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let now = Instant::now();
            self.at.get_or_insert(now);
            self.last = Some(now);
        }
        Ok(n)
    }
}

/// What the source sent, with the prepared bytes of the images.
struct Delta<'a> {
    images: &'a [NamedImage],
    hot: &'a [HotPages],
    old: HashMap<String, Vec<u8>>,
    /// The prepared core images, decoded.
    cores: HashMap<String, pb::CoreEntry>,
    /// Per host pid, the memory of each held process, opened for writing.
    mems: HashMap<Pid, tracee::RemoteMem>,
    /// When its first bytes came.
    received: Instant,
    /// From its first byte to its last.
    arrival_us: u64,
    /// From its last byte to the decoded message.
    decode_us: u64,
}

/// Whether the daemon reads the image: the page lists are written before the hand-off;
/// the others may wait until the tree runs (the source of a prepared restore is remote:
/// the daemon takes no page from the pages images).
fn read_by_daemon(name: &str) -> bool {
    name.starts_with("pagemap-")
}

/// From the delta on: write it, judge, take the fast path or fall back.
fn switch_over(
    mut held: Held,
    opts: &RestoreOptions,
    link: &mut TcpStream,
    hurried: &tracee::taskinfo::RealTime,
    pin: &mut Option<tracee::cpu::CpuPin>,
    delta: Delta<'_>,
    resumed: &mut bool,
) -> Result<RestoreOutcome, RestoreError> {
    let Delta {
        images,
        hot,
        mut old,
        cores,
        mems,
        received,
        arrival_us,
        decode_us,
    } = delta;
    let dir = held.dir.path().to_path_buf();
    for image in images {
        if old.contains_key(&image.name) {
            continue;
        }
        let path = dir.join(&image.name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                old.insert(image.name.clone(), bytes);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(PreparedError::ReadImage { path, source }.into()),
        }
    }
    write_images(&dir, images.iter().filter(|i| read_by_daemon(&i.name)))?;
    let written_us = micros(received.elapsed());
    let registered = held
        .prepared
        .as_ref()
        .map(crate::lazy::PreparedHandoff::registered)
        .unwrap_or_default();
    let mut pagemaps = HashMap::new();
    if images.iter().any(|i| i.name.starts_with("pages-")) {
        for p in held.tree.live() {
            let name = ImageKind::Pagemap.file_name(u64::from(p.pid.unsigned_abs()));
            let bytes = match images.iter().find(|i| i.name == name) {
                Some(new) => new.bytes.clone(),
                None => match old.get(&name) {
                    Some(bytes) => bytes.clone(),
                    None => {
                        let path = dir.join(&name);
                        std::fs::read(&path)
                            .map_err(|source| PreparedError::ReadImage { path, source })?
                    }
                },
            };
            pagemaps.insert(p.pid.unsigned_abs(), bytes);
        }
    }
    let judging = Instant::now();
    let verdict = judge(images, &old, &cores, &registered, &pagemaps);
    let judge_us = micros(judging.elapsed());
    let delta_bytes: usize = images.iter().map(|i| i.bytes.len()).sum();
    let later: Vec<&NamedImage> = images.iter().filter(|i| !read_by_daemon(&i.name)).collect();
    let pin = std::cell::Cell::new(pin.take());
    let mut on_running = |pid: Pid, path: &'static str| -> Result<(), RestoreError> {
        switch::write_message(link, &SwitchMessage::Resumed, false)
            .map_err(PreparedError::Resumed)?;
        *resumed = true;
        let us = micros(received.elapsed());
        // The tree runs: the rest of our work is off its way, from real time straight to
        // the lowest priority (see `crate::step_aside`), and free to leave the CPU the
        // tree may now run on: pinned there at the lowest priority, we would wait for the
        // program to give the CPU up.
        end_hurry(hurried, Some(crate::ASIDE_NICE));
        drop(pin.take());
        tracing::info!(%pid, path, us, "prepared switch: delta received to tree resumed");
        // The directory is the final image set again (the fallback wrote them all).
        if path == "fast" {
            if let Err(error) = write_images(&dir, later.iter().copied()) {
                tracing::warn!(%error, "writing the rest of the delta after the resume");
            }
        }
        Ok(())
    };
    match verdict {
        Verdict::Fast(fast) => {
            let judged_us = micros(received.elapsed());
            let applied = apply(&mut held, &fast, hot, &mems)?;
            let applied_us = micros(received.elapsed());
            // Told once the tree runs: formatting and writing a log line takes time.
            crate::finish(held, opts, &mut |pid| {
                on_running(pid, "fast")?;
                tracing::info!(
                    images = images.len(),
                    bytes = delta_bytes,
                    hot_runs = hot.len(),
                    threads = fast.threads.len(),
                    positions = fast.positions.len(),
                    pagemaps = fast.pagemaps.len(),
                    pages = fast.pages.len(),
                    arrival_us,
                    decode_us,
                    written_us,
                    judge_us,
                    us = judged_us,
                    "prepared switch: fast path"
                );
                tracing::info!(
                    hot_pages = applied.hot_pages,
                    hot_us = applied.hot_us,
                    regs_us = applied.regs_us,
                    fpu_loads = applied.fpu_loads,
                    deferred_rseq = applied.deferred_rseq,
                    us = applied_us,
                    "prepared switch: delta applied"
                );
                Ok(())
            })
        }
        Verdict::Fallback(why) => {
            tracing::warn!(image = %why.image, field = %why.field,
                "prepared switch: the held tree cannot take the delta: restoring from the new images");
            write_images(&dir, images.iter().filter(|i| !read_by_daemon(&i.name)))?;
            // A whole restore, milliseconds of work: not above everything else, and
            // not on one CPU (its children would inherit the pin).
            end_hurry(hurried, None);
            drop(pin.take());
            let step = Instant::now();
            let session = held.prepared.as_mut().and_then(|p| p.take_session());
            drop(mems);
            drop(held);
            if opts.new_pid_ns {
                // The held tree's namespace is dead: the next tree gets a new one.
                crate::fork::children_in_our_pid_namespace()?;
            }
            tracing::info!(us = micros(step.elapsed()), "prepared tree dropped");
            let held = crate::build(opts, false, session)?;
            // The new images have the prepared ones' memory where the source found it
            // unchanged; what was written since came as these pages (with the hot ones).
            put_pages(&held, hot, &HashMap::new())?;
            crate::finish(held, opts, &mut |pid| on_running(pid, "fallback"))
        }
    }
}

/// Replaces `images` in `dir`, each written aside and renamed over the old one.
fn write_images<'a>(
    dir: &Path,
    images: impl Iterator<Item = &'a NamedImage>,
) -> Result<(), PreparedError> {
    for image in images {
        let path = dir.join(&image.name);
        let aside = dir.join(format!(".{}.switch", image.name));
        std::fs::write(&aside, &image.bytes)
            .and_then(|()| std::fs::rename(&aside, &path))
            .map_err(|source| PreparedError::WriteImage { path, source })?;
    }
    Ok(())
}

/// What [`apply`] did, for the log.
struct Applied {
    hot_pages: u64,
    hot_us: u64,
    regs_us: u64,
    /// Threads whose FPU state was loaded (it changed).
    fpu_loads: usize,
    /// rseq areas registered only now (they lie on lazy memory).
    deferred_rseq: usize,
}

/// The fast path on the held tree: hot pages, changed pages, registers, positions. None
/// of it touches lazy memory, so the userfaultfds go to the daemon only in `finish`, just
/// before the detach; unless an rseq area lies on lazy memory: its registration waits
/// for the hand-off (the kernel writes the area at once), and the registers are loaded
/// after it (an injection puts back the registers it found).
fn apply(
    held: &mut Held,
    fast: &FastPath,
    hot: &[HotPages],
    mems: &HashMap<Pid, tracee::RemoteMem>,
) -> Result<Applied, RestoreError> {
    let step = Instant::now();
    let hot_pages = put_pages(held, hot, mems)?;
    for w in &fast.pages {
        let Some(host) = host_of(held, w.pid.try_into().unwrap_or(i32::MAX)) else {
            return Err(PreparedError::NoThread {
                tid: w.pid.try_into().unwrap_or(i32::MAX),
            }
            .into());
        };
        // Pages in already (restore wrote them): no fault, whatever is registered.
        write_over(mems, host, w.vaddr, &w.data)?;
    }
    let hot_us = micros(step.elapsed());
    let deferred_rseq = held
        .deferred_rseq
        .iter()
        .flatten()
        .filter(|r| r.is_some())
        .count();
    if deferred_rseq > 0 {
        // From here the daemon serves every fault: the kernel may touch lazy memory.
        if let Some(prepared) = held.prepared.take() {
            held.lazy = Some(prepared.hand_over(&held.work_dir)?);
        }
    }
    let regs = Instant::now();
    let mut fpu_loads = 0;
    for (i, p) in held.tree.procs.iter().enumerate() {
        let plan::ProcKind::Live(plan) = &p.kind else {
            continue;
        };
        let (Some(Some(leader)), Some(others)) = (held.tracees.get_mut(i), held.threads.get_mut(i))
        else {
            continue;
        };
        let rseq = held.deferred_rseq.get(i);
        let injected = rseq.is_some_and(|r| r.iter().any(Option::is_some));
        for (j, t) in plan.threads.iter().enumerate() {
            let tracee =
                thread_at(leader, others, j).ok_or(PreparedError::NoThread { tid: t.tid })?;
            if let Some(r) = rseq.and_then(|v| v.get(j)).and_then(Option::as_ref) {
                threads::register_rseq(tracee, r)
                    .map_err(crate::threads::ThreadStateError::from)?;
            }
        }
        // Kept only for the registrations above.
        if let Some(helper) = held.helpers.get_mut(i).and_then(Option::take) {
            crate::memory::drop_helper(leader, &helper)?;
        }
        for (j, t) in plan.threads.iter().enumerate() {
            let Some(update) = fast
                .threads
                .iter()
                .find(|u| i64::from(u.tid) == i64::from(t.tid))
            else {
                continue;
            };
            let tracee =
                thread_at(leader, others, j).ok_or(PreparedError::NoThread { tid: t.tid })?;
            let mut now = t.clone();
            let (regs, restart, as_dumped) = plan::thread_regs(&update.gpregs);
            now.regs = regs;
            now.restart = restart;
            now.as_dumped = as_dumped;
            now.fpregs = update.fpregs.clone();
            now.sigmask = update.sigmask(j == 0);
            if injected {
                resume::load_registers(tracee, &now)?;
                fpu_loads += 1;
            } else {
                // The held thread has the prepared registers (`t`) loaded.
                let loaded = held
                    .xsaves
                    .get(i)
                    .and_then(|x| x.get(j))
                    .and_then(Option::as_ref);
                fpu_loads += usize::from(resume::load_changed_registers(tracee, t, &now, loaded)?);
            }
        }
    }
    for &(file_id, pos) in &fast.positions {
        set_position(held, file_id, pos)?;
    }
    Ok(Applied {
        hot_pages,
        hot_us,
        regs_us: micros(regs.elapsed()),
        fpu_loads,
        deferred_rseq,
    })
}

/// Puts `runs` (pages of image pids) into the held tree's memory; returns the pages. Each
/// page that lies in a registered VMA of a prepared lazy restore and is missing goes in
/// with `UFFDIO_COPY` (a write there would fault to a userfaultfd nobody serves yet: the
/// switch's hot pages, a page first written since the prepared images); every other page
/// (one restore wrote, written since; or after a fallback's hand-off, where the daemon
/// serves any fault) is written over.
fn put_pages(
    held: &Held,
    runs: &[HotPages],
    mems: &HashMap<Pid, tracee::RemoteMem>,
) -> Result<u64, RestoreError> {
    const PAGE: usize = images_format::PAGE_SIZE as usize;
    let mut pages = 0;
    for run in runs {
        let host = host_of(held, run.pid).ok_or(PreparedError::NoThread { tid: run.pid })?;
        let uffd = held.prepared.as_ref().and_then(|p| p.uffd(run.pid));
        let write = |vaddr: u64, data: &[u8]| write_over(mems, host, vaddr, data);
        // Pages to write over, gathered while they follow each other.
        let mut over: Option<(u64, usize)> = None;
        for (i, page) in run.data.chunks_exact(PAGE).enumerate() {
            let at = run.vaddr + (i * PAGE) as u64;
            let installed = match uffd {
                Some((uffd, vmas)) => crate::lazy::install_pages(uffd, host, vmas, at, page)? > 0,
                None => false,
            };
            if installed {
                if let Some((from, len)) = over.take() {
                    let off = usize::try_from(from - run.vaddr).unwrap_or(0);
                    write(from, &run.data[off..off + len])?;
                }
            } else {
                over = match over {
                    Some((from, len)) => Some((from, len + PAGE)),
                    None => Some((at, PAGE)),
                };
            }
            pages += 1;
        }
        if let Some((from, len)) = over {
            let off = usize::try_from(from - run.vaddr).unwrap_or(0);
            write(from, &run.data[off..off + len])?;
        }
    }
    Ok(pages)
}

/// Writes `data` at `vaddr` of `host` through its memory file (the one in `mems`, if open):
/// over pages that are in, or after the hand-off, where the daemon serves any fault.
fn write_over(
    mems: &HashMap<Pid, tracee::RemoteMem>,
    host: Pid,
    vaddr: u64,
    data: &[u8],
) -> Result<(), RestoreError> {
    let at = tracee::RemoteAddr(vaddr);
    let written = match mems.get(&host) {
        Some(m) => m.write_at(at, data),
        None => tracee::RemoteMem::open(host).and_then(|m| m.write_at(at, data)),
    };
    written.map_err(|e| {
        PreparedError::WritePages {
            pid: host,
            vaddr,
            source: io::Error::other(e.to_string()),
        }
        .into()
    })
}

/// Thread `j` of a process (0: the leader).
fn thread_at<'a>(
    leader: &'a mut Tracee,
    others: &'a mut [Tracee],
    j: usize,
) -> Option<&'a mut Tracee> {
    match j {
        0 => Some(leader),
        _ => others.get_mut(j - 1),
    }
}

fn host_of(held: &Held, image_pid: i32) -> Option<Pid> {
    let i = held.tree.procs.iter().position(|p| p.pid == image_pid)?;
    held.hosts.get(i).copied()
}

/// Moves the description of `file_id` (shared by every fd that has it) to `pos`, through
/// a duplicate taken from a process that holds it.
fn set_position(held: &Held, file_id: u32, pos: u64) -> Result<(), RestoreError> {
    for (i, p) in held.tree.procs.iter().enumerate() {
        let plan::ProcKind::Live(plan) = &p.kind else {
            continue;
        };
        let Some(fd) = plan.child.fds.iter().find(|f| f.file_id == file_id) else {
            continue;
        };
        let Some(&host) = held.hosts.get(i) else {
            continue;
        };
        let failed = |source: io::Error| PreparedError::Position {
            pid: host,
            fd: fd.fd,
            file_id,
            pos,
            source,
        };
        let pidfd = tracee::pidfd::PidFd::open(host)
            .map_err(|e| failed(io::Error::other(e.to_string())))?;
        let ours = pidfd
            .getfd(tracee::TargetFd(fd.fd))
            .map_err(|e| failed(io::Error::other(e.to_string())))?;
        rustix::fs::seek(&ours, rustix::fs::SeekFrom::Start(pos)).map_err(|e| failed(e.into()))?;
        return Ok(());
    }
    Err(PreparedError::NoHolder { file_id }.into())
}

/// The final registers of one thread, from its new core image.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadUpdate {
    /// The thread's id in the images.
    pub tid: u32,
    pub gpregs: pb::UserX86RegsEntry,
    pub fpregs: pb::UserX86FpregsEntry,
    /// `thread_core.blk_sigset`.
    pub thread_mask: Option<u64>,
    /// `tc.blk_sigset` (the leader's mask where the thread core has none).
    pub task_mask: Option<u64>,
}

impl ThreadUpdate {
    /// The signal mask to load, resolved as the plan resolves it.
    pub fn sigmask(&self, leader: bool) -> u64 {
        self.thread_mask
            .or(if leader { self.task_mask } else { None })
            .unwrap_or(0)
    }
}

/// What the held tree needs to become the final state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FastPath {
    pub threads: Vec<ThreadUpdate>,
    /// A regular file's description (file id) moved to a new position.
    pub positions: Vec<(u32, u64)>,
    /// Image pids whose lazy page lists changed (the daemon reads them after the hand-off).
    pub pagemaps: Vec<u32>,
    /// Pages restore wrote into the held tree whose contents changed, to write again.
    pub pages: Vec<PageWrite>,
}

/// New contents of whole pages of process `pid` (image pid) from `vaddr` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageWrite {
    pub pid: u32,
    pub vaddr: u64,
    pub data: Vec<u8>,
}

/// Why the held tree cannot be used: the image and the field that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub image: String,
    pub field: String,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.image, self.field)
    }
}

/// The decision of [`judge`].
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Fast(FastPath),
    Fallback(Fallback),
}

fn fallback(image: &str, field: impl Into<String>) -> Verdict {
    Verdict::Fallback(Fallback {
        image: image.to_string(),
        field: field.into(),
    })
}

/// Compares the changed images `new` with the prepared ones (`old`: the prepared bytes of
/// each image by name; an image without them is new). `cores`: prepared core images
/// decoded already (before the switch), by name; others are decoded here. `registered`:
/// per image pid, the VMAs registered with the process's userfaultfd in the held tree (a
/// lazy page outside them would never be fetched). `pagemaps`: per image pid, its final
/// pagemap image (where a pages image's data go).
pub fn judge(
    new: &[NamedImage],
    old: &HashMap<String, Vec<u8>>,
    cores: &HashMap<String, pb::CoreEntry>,
    registered: &HashMap<u32, Vec<Range>>,
    pagemaps: &HashMap<u32, Vec<u8>>,
) -> Verdict {
    let mut fast = FastPath::default();
    for image in new {
        let name = image.name.as_str();
        // Written by the dump for people, never read by restore.
        if name == "stats-dump" || name == "stats-restore" {
            continue;
        }
        let Some(before) = old.get(name) else {
            return fallback(name, "a new image");
        };
        if *before == image.bytes {
            continue;
        }
        let Some(kind) = ImageKind::from_file_name(name) else {
            return fallback(name, "not an image restore knows");
        };
        let id = kind.id.and_then(|i| u32::try_from(i).ok());
        let step = match (kind.kind, id) {
            (ImageKind::Core, Some(tid)) => {
                core(name, tid, cores.get(name), before, &image.bytes, &mut fast)
            }
            (ImageKind::Pagemap, Some(pid)) => {
                let regs = registered.get(&pid).map_or(&[][..], Vec::as_slice);
                pagemap(name, before, &image.bytes, regs).map(|()| fast.pagemaps.push(pid))
            }
            (ImageKind::Pages, Some(id)) => {
                pages(name, id, before, &image.bytes, pagemaps, &mut fast)
            }
            (ImageKind::Files, _) => files(name, before, &image.bytes, &mut fast),
            (ImageKind::Inventory, _) => {
                same_meaning::<pb::InventoryEntry>(name, before, &image.bytes)
            }
            // The clocks at dump time: restore makes no time namespace and reads none.
            (ImageKind::Timens, _) => Ok(()),
            _ => Err(Fallback {
                image: name.to_string(),
                field: "contents".into(),
            }),
        };
        if let Err(why) = step {
            return Verdict::Fallback(why);
        }
    }
    Verdict::Fast(fast)
}

fn decode_all<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<Vec<M>, Fallback> {
    let damaged = |e: images_format::ImageError| Fallback {
        image: name.to_string(),
        field: format!("cannot decode: {e}"),
    };
    let mut reader = ImageReader::detect(bytes, name, Some(bytes.len() as u64)).map_err(damaged)?;
    let mut out = Vec::new();
    while let Some(m) = reader.read_entry::<M>().map_err(damaged)? {
        out.push(m);
    }
    Ok(out)
}

fn same_meaning<M: Message + Default + PartialEq>(
    name: &str,
    old: &[u8],
    new: &[u8],
) -> Result<(), Fallback> {
    if decode_all::<M>(name, old)? == decode_all::<M>(name, new)? {
        Ok(())
    } else {
        Err(Fallback {
            image: name.to_string(),
            field: "entries".into(),
        })
    }
}

/// The first field, of those listed, that differs between `$a` and `$b`.
macro_rules! first_difference {
    ($a:expr, $b:expr, $prefix:literal, [$($field:ident),* $(,)?]) => {{
        let mut out: Option<&'static str> = None;
        $(
            if out.is_none() && $a.$field != $b.$field {
                out = Some(concat!($prefix, ".", stringify!($field)));
            }
        )*
        out
    }};
}

fn one<M: Message + Default>(name: &str, bytes: &[u8]) -> Result<M, Fallback> {
    let mut all = decode_all::<M>(name, bytes)?;
    if all.len() != 1 {
        return Err(Fallback {
            image: name.to_string(),
            field: format!("{} entries, not one", all.len()),
        });
    }
    all.pop().ok_or_else(|| Fallback {
        image: name.to_string(),
        field: "no entry".into(),
    })
}

/// The prepared core images among `images` (name to bytes), decoded: done while the tree
/// is held, so that the judge decodes only the new ones.
fn decode_cores(images: &HashMap<String, Vec<u8>>) -> HashMap<String, pb::CoreEntry> {
    images
        .iter()
        .filter(|(name, _)| {
            ImageKind::from_file_name(name).is_some_and(|k| k.kind == ImageKind::Core)
        })
        .filter_map(|(name, bytes)| Some((name.clone(), one(name, bytes).ok()?)))
        .collect()
}

/// A thread's core: registers and signal mask may change; nothing else. `decoded`: the
/// prepared core, `old` decoded, if it was already.
fn core(
    name: &str,
    tid: u32,
    decoded: Option<&pb::CoreEntry>,
    old: &[u8],
    new: &[u8],
    fast: &mut FastPath,
) -> Result<(), Fallback> {
    if let Some(a) = decoded {
        if let Some(quick) = core_registers_only(name, tid, a, old, new, fast) {
            return quick;
        }
    }
    let decoded_here;
    let a: &pb::CoreEntry = match decoded {
        Some(a) => a,
        None => {
            decoded_here = one::<pb::CoreEntry>(name, old)?;
            &decoded_here
        }
    };
    let b: pb::CoreEntry = one(name, new)?;
    let differs = |field: &str| Fallback {
        image: name.to_string(),
        field: field.to_string(),
    };
    if let Some(f) = first_difference!(
        a,
        b,
        "core",
        [
            mtype,
            ti_arm,
            ti_aarch64,
            ti_ppc64,
            ti_s390,
            ti_mips,
            ti_loongarch64,
            ti_riscv64,
            ids
        ]
    ) {
        return Err(differs(f));
    }
    let (Some(ta), Some(tb)) = (&a.thread_info, &b.thread_info) else {
        return Err(differs("core.thread_info"));
    };
    if let Some(f) = first_difference!(ta, tb, "thread_info", [clear_tid_addr, tls]) {
        return Err(differs(f));
    }
    if ta.gpregs.mode != tb.gpregs.mode {
        return Err(differs("thread_info.gpregs.mode"));
    }
    match (&a.tc, &b.tc) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            if let Some(f) = first_difference!(
                x,
                y,
                "tc",
                [
                    task_state,
                    exit_code,
                    personality,
                    flags,
                    comm,
                    timers,
                    rlimits,
                    cg_set,
                    signals_s,
                    old_seccomp_mode,
                    old_seccomp_filter,
                    loginuid,
                    oom_score_adj,
                    sigactions,
                    child_subreaper,
                    blk_sigset_extended,
                    stop_signo,
                    membarrier_registration_mask,
                    mdwe_flags,
                ]
            ) {
                return Err(differs(f));
            }
        }
        _ => return Err(differs("core.tc")),
    }
    match (&a.thread_core, &b.thread_core) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            if let Some(f) = first_difference!(
                x,
                y,
                "thread_core",
                [
                    futex_rla,
                    futex_rla_len,
                    sched_nice,
                    sched_policy,
                    sched_prio,
                    sas,
                    pdeath_sig,
                    signals_p,
                    creds,
                    seccomp_mode,
                    seccomp_filter,
                    comm,
                    blk_sigset_extended,
                    rseq_entry,
                    cg_set,
                    cpu_affinity,
                    timer_slack_ns,
                    ioprio,
                ]
            ) {
                return Err(differs(f));
            }
        }
        _ => return Err(differs("core.thread_core")),
    }
    fast.threads.push(ThreadUpdate {
        tid,
        gpregs: tb.gpregs,
        fpregs: tb.fpregs.clone(),
        thread_mask: b.thread_core.as_ref().and_then(|t| t.blk_sigset),
        task_mask: b.tc.as_ref().map(|t| t.blk_sigset),
    });
    Ok(())
}

/// The usual change of a core image, judged without decoding all of it: every field but
/// the thread info (registers) has the very bytes it had. Then only the new thread info
/// is decoded (the task and thread cores, with their 64 signal handlers, are most of a
/// core's decoding time, inside the down time). `None` when the bytes say otherwise, or
/// cannot be split: [`core`] then compares field by field. `a`: the prepared core
/// `old`, decoded.
fn core_registers_only(
    name: &str,
    tid: u32,
    a: &pb::CoreEntry,
    old: &[u8],
    new: &[u8],
    fast: &mut FastPath,
) -> Option<Result<(), Fallback>> {
    const THREAD_INFO: u64 = 2;
    let raw = |bytes: &[u8]| -> Option<Vec<u8>> {
        let mut r =
            ImageReader::new(bytes, ImageKind::Core, name, Some(bytes.len() as u64)).ok()?;
        let entry = r.read_raw_entry().ok()??;
        r.read_raw_entry().ok()?.is_none().then_some(entry)
    };
    let (raw_a, raw_b) = (raw(old)?, raw(new)?);
    let (fields_a, fields_b) = (wire_fields(&raw_a)?, wire_fields(&raw_b)?);
    let (info_a, rest_a): (Vec<_>, Vec<_>) =
        fields_a.into_iter().partition(|f| f.number == THREAD_INFO);
    let (info_b, rest_b): (Vec<_>, Vec<_>) =
        fields_b.into_iter().partition(|f| f.number == THREAD_INFO);
    if info_a.len() != 1 || info_b.len() != 1 || rest_a != rest_b {
        return None;
    }
    let tb = pb::ThreadInfoX86::decode(info_b.first()?.payload?).ok()?;
    let ta = a.thread_info.as_ref()?;
    let differs = |field: &str| Fallback {
        image: name.to_string(),
        field: field.to_string(),
    };
    if let Some(f) = first_difference!(ta, tb, "thread_info", [clear_tid_addr, tls]) {
        return Some(Err(differs(f)));
    }
    if ta.gpregs.mode != tb.gpregs.mode {
        return Some(Err(differs("thread_info.gpregs.mode")));
    }
    // The rest is the prepared core's, masks included.
    fast.threads.push(ThreadUpdate {
        tid,
        gpregs: tb.gpregs,
        fpregs: tb.fpregs,
        thread_mask: a.thread_core.as_ref().and_then(|t| t.blk_sigset),
        task_mask: a.tc.as_ref().map(|t| t.blk_sigset),
    });
    Some(Ok(()))
}

/// One field of a protobuf message as it is on the wire.
#[derive(Debug, PartialEq, Eq)]
struct WireField<'a> {
    number: u64,
    /// The whole field, key included.
    bytes: &'a [u8],
    /// A length-delimited field's contents.
    payload: Option<&'a [u8]>,
}

/// The top-level fields of the protobuf message `m`, in order; `None` if it does not parse.
fn wire_fields(m: &[u8]) -> Option<Vec<WireField<'_>>> {
    fn varint(m: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *m.get(*at)?;
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < m.len() {
        let start = at;
        let key = varint(m, &mut at)?;
        let mut payload = None;
        match key & 7 {
            0 => {
                varint(m, &mut at)?;
            }
            1 => at = at.checked_add(8)?,
            2 => {
                let len = usize::try_from(varint(m, &mut at)?).ok()?;
                let end = at.checked_add(len)?;
                payload = Some(m.get(at..end)?);
                at = end;
            }
            5 => at = at.checked_add(4)?,
            _ => return None,
        }
        out.push(WireField {
            number: key >> 3,
            bytes: m.get(start..at)?,
            payload,
        });
    }
    Some(out)
}

fn read_pagemap(name: &str, bytes: &[u8]) -> Result<Pagemap, Fallback> {
    let mut reader = ImageReader::new(bytes, ImageKind::Pagemap, name, Some(bytes.len() as u64))
        .map_err(|e| Fallback {
            image: name.to_string(),
            field: format!("cannot decode: {e}"),
        })?;
    Pagemap::read(&mut reader).map_err(|e| Fallback {
        image: name.to_string(),
        field: format!("cannot decode: {e}"),
    })
}

/// The lazy page lists may change (the daemon reads the new ones), as long as every lazy
/// page is in a registered VMA; pages restore wrote into the held tree may not.
fn pagemap(name: &str, old: &[u8], new: &[u8], registered: &[Range]) -> Result<(), Fallback> {
    let a = read_pagemap(name, old)?;
    let b = read_pagemap(name, new)?;
    let differs = |field: String| Fallback {
        image: name.to_string(),
        field,
    };
    if a.pages_id != b.pages_id {
        return Err(differs("head.pages_id".into()));
    }
    let written = |p: &Pagemap| -> Vec<PageRange> {
        p.ranges
            .iter()
            .filter(|r| !r.flags.contains(PageFlags::LAZY))
            .cloned()
            .collect()
    };
    if written(&a) != written(&b) {
        return Err(differs("pages that are not lazy".into()));
    }
    for r in b
        .ranges
        .iter()
        .filter(|r| r.flags.contains(PageFlags::LAZY))
    {
        let inside = registered
            .iter()
            .any(|v| v.start <= r.vaddr && r.end() <= v.end);
        if !inside {
            return Err(differs(format!(
                "lazy pages {:#x}..{:#x} outside the registered memory",
                r.vaddr,
                r.end()
            )));
        }
    }
    Ok(())
}

/// A pages image: what the pagemap (unchanged where not lazy, see [`pagemap`]) says was
/// written into the held tree is written again where its bytes changed; lazy pages are
/// the daemon's, read from the new image after the hand-off.
fn pages(
    name: &str,
    id: u32,
    old: &[u8],
    new: &[u8],
    pagemaps: &HashMap<u32, Vec<u8>>,
    fast: &mut FastPath,
) -> Result<(), Fallback> {
    let differs = |field: String| Fallback {
        image: name.to_string(),
        field,
    };
    let mut owner = None;
    for (&pid, bytes) in pagemaps {
        let map = read_pagemap(&format!("pagemap-{pid}.img"), bytes)?;
        if map.pages_id == id {
            owner = Some((pid, map));
            break;
        }
    }
    let Some((pid, map)) = owner else {
        return Err(differs("no pagemap of the tree uses it".into()));
    };
    if old.len() != new.len() {
        return Err(differs(format!("{} bytes, were {}", new.len(), old.len())));
    }
    const PAGE: usize = images_format::PAGE_SIZE as usize;
    let mut offset = 0usize;
    for r in &map.ranges {
        if !r.flags.contains(PageFlags::PRESENT) {
            continue;
        }
        let lazy = r.flags.contains(PageFlags::LAZY);
        for k in 0..r.nr_pages {
            let end = offset + PAGE;
            let (Some(a), Some(b)) = (old.get(offset..end), new.get(offset..end)) else {
                return Err(differs("shorter than its pagemap says".into()));
            };
            if !lazy && a != b {
                let vaddr = r.vaddr + k * images_format::PAGE_SIZE;
                match fast.pages.last_mut() {
                    Some(w) if w.pid == pid && w.vaddr + w.data.len() as u64 == vaddr => {
                        w.data.extend_from_slice(b);
                    }
                    _ => fast.pages.push(PageWrite {
                        pid,
                        vaddr,
                        data: b.to_vec(),
                    }),
                }
            }
            offset = end;
        }
    }
    Ok(())
}

/// Only regular files' positions (and sizes, which restore checks only for mapped files,
/// whose mappings would have changed too) may change: positions are set again on the
/// descriptions.
fn files(name: &str, old: &[u8], new: &[u8], fast: &mut FastPath) -> Result<(), Fallback> {
    let a = decode_all::<pb::FileEntry>(name, old)?;
    let b = decode_all::<pb::FileEntry>(name, new)?;
    let differs = |field: String| Fallback {
        image: name.to_string(),
        field,
    };
    if a.len() != b.len() {
        return Err(differs(format!("{} files, were {}", b.len(), a.len())));
    }
    for (x, y) in a.iter().zip(&b) {
        if x == y {
            continue;
        }
        let (Some(rx), Some(ry)) = (&x.reg, &y.reg) else {
            return Err(differs(format!("file id {}", y.id)));
        };
        let mut moved = rx.clone();
        moved.pos = ry.pos;
        moved.size = ry.size;
        let same_but_pos = x.r#type == y.r#type && x.id == y.id && &moved == ry && {
            let (mut x2, mut y2) = (x.clone(), y.clone());
            x2.reg = None;
            y2.reg = None;
            x2 == y2
        };
        if !same_but_pos {
            return Err(differs(format!("file id {}: not only its position", y.id)));
        }
        fast.positions.push((y.id, ry.pos));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use images_format::ImageWriter;

    fn encode<M: Message>(kind: ImageKind, entries: &[M]) -> Vec<u8> {
        let mut w = ImageWriter::new(Vec::new(), kind, "test").unwrap();
        for e in entries {
            w.write_entry(e).unwrap();
        }
        w.finish().unwrap()
    }

    fn core_entry(ip: u64, mask: u64) -> pb::CoreEntry {
        pb::CoreEntry {
            mtype: pb::core_entry::March::X8664 as i32,
            thread_info: Some(pb::ThreadInfoX86 {
                clear_tid_addr: 0x1000,
                gpregs: pb::UserX86RegsEntry {
                    ip,
                    sp: 0x7ff0,
                    ..Default::default()
                },
                ..Default::default()
            }),
            tc: Some(pb::TaskCoreEntry {
                comm: "prog".into(),
                blk_sigset: mask,
                ..Default::default()
            }),
            thread_core: Some(pb::ThreadCoreEntry {
                blk_sigset: Some(mask),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn image(name: &str, bytes: Vec<u8>) -> NamedImage {
        NamedImage {
            name: name.into(),
            bytes,
        }
    }

    fn judge_against(old: &[NamedImage], new: &[NamedImage], regs: &[(u32, Range)]) -> Verdict {
        let lookup: HashMap<String, Vec<u8>> = old
            .iter()
            .map(|i| (i.name.clone(), i.bytes.clone()))
            .collect();
        let mut registered: HashMap<u32, Vec<Range>> = HashMap::new();
        for (pid, r) in regs {
            registered.entry(*pid).or_default().push(*r);
        }
        let cold = judge(new, &lookup, &HashMap::new(), &registered, &HashMap::new());
        // With the prepared cores decoded before the switch (as the restore does), a core
        // whose other fields kept their bytes is judged from its thread info alone: the
        // verdict is the same.
        let warm = judge(
            new,
            &lookup,
            &decode_cores(&lookup),
            &registered,
            &HashMap::new(),
        );
        assert_eq!(cold, warm);
        cold
    }

    #[test]
    fn a_core_where_only_registers_changed_is_judged_from_its_thread_info() {
        let old = [image(
            "core-7.img",
            encode(ImageKind::Core, &[core_entry(0x400000, 4)]),
        )];
        let mut c = core_entry(0x400010, 4);
        c.thread_info.as_mut().unwrap().fpregs.mxcsr = 0x1f80;
        let new_bytes = encode(ImageKind::Core, &[c]);
        let lookup: HashMap<String, Vec<u8>> = old
            .iter()
            .map(|i| (i.name.clone(), i.bytes.clone()))
            .collect();
        let mut fast = FastPath::default();
        let quick = core_registers_only(
            "core-7.img",
            7,
            &decode_cores(&lookup)["core-7.img"],
            &old[0].bytes,
            &new_bytes,
            &mut fast,
        );
        assert_eq!(quick, Some(Ok(())));
        assert_eq!(fast.threads.len(), 1);
        assert_eq!(fast.threads[0].gpregs.ip, 0x400010);
        assert_eq!(fast.threads[0].fpregs.mxcsr, 0x1f80);
        assert_eq!(fast.threads[0].sigmask(true), 4);
        // A changed mask is outside the thread info: left to the field-by-field judge.
        let masked = encode(ImageKind::Core, &[core_entry(0x400010, 8)]);
        let quick = core_registers_only(
            "core-7.img",
            7,
            &decode_cores(&lookup)["core-7.img"],
            &old[0].bytes,
            &masked,
            &mut FastPath::default(),
        );
        assert_eq!(quick, None);
        // Damaged bytes are not split: the judge decodes, and reports them.
        assert_eq!(
            core_registers_only(
                "core-7.img",
                7,
                &decode_cores(&lookup)["core-7.img"],
                &old[0].bytes,
                &[1, 2, 3],
                &mut FastPath::default(),
            ),
            None
        );
    }

    #[test]
    fn wire_fields_split_a_message_and_refuse_a_cut_one() {
        let bytes = core_entry(1, 2).encode_to_vec();
        let fields = wire_fields(&bytes).unwrap();
        let numbers: Vec<u64> = fields.iter().map(|f| f.number).collect();
        assert_eq!(numbers, vec![1, 2, 3, 5]);
        assert_eq!(
            fields.iter().map(|f| f.bytes.len()).sum::<usize>(),
            bytes.len()
        );
        for cut in 1..bytes.len() {
            // A cut inside a field is refused; one between fields is a shorter message.
            if let Some(f) = wire_fields(&bytes[..cut]) {
                assert_eq!(f.iter().map(|f| f.bytes.len()).sum::<usize>(), cut);
            }
        }
    }

    #[test]
    fn new_registers_and_mask_take_the_fast_path() {
        let old = [image(
            "core-7.img",
            encode(ImageKind::Core, &[core_entry(0x400000, 0)]),
        )];
        let new = [image(
            "core-7.img",
            encode(ImageKind::Core, &[core_entry(0x400010, 4)]),
        )];
        let Verdict::Fast(fast) = judge_against(&old, &new, &[]) else {
            panic!("fast path expected");
        };
        assert_eq!(fast.threads.len(), 1);
        assert_eq!(fast.threads[0].tid, 7);
        assert_eq!(fast.threads[0].gpregs.ip, 0x400010);
        assert_eq!(fast.threads[0].sigmask(true), 4);
    }

    #[test]
    fn a_changed_signal_handler_or_name_forces_the_fallback() {
        let old = [image(
            "core-7.img",
            encode(ImageKind::Core, &[core_entry(1, 0)]),
        )];
        let mut c = core_entry(1, 0);
        c.tc.as_mut().unwrap().comm = "other".into();
        let new = [image("core-7.img", encode(ImageKind::Core, &[c]))];
        assert_eq!(
            judge_against(&old, &new, &[]),
            Verdict::Fallback(Fallback {
                image: "core-7.img".into(),
                field: "tc.comm".into()
            })
        );
        let mut c = core_entry(1, 0);
        c.thread_core.as_mut().unwrap().sas = Some(pb::ThreadSasEntry {
            ss_sp: 1,
            ss_size: 2,
            ss_flags: 0,
        });
        let new = [image("core-7.img", encode(ImageKind::Core, &[c]))];
        let Verdict::Fallback(why) = judge_against(&old, &new, &[]) else {
            panic!("fallback expected");
        };
        assert_eq!(why.field, "thread_core.sas");
        let mut c = core_entry(1, 0);
        c.thread_info.as_mut().unwrap().clear_tid_addr = 8;
        let new = [image("core-7.img", encode(ImageKind::Core, &[c]))];
        let Verdict::Fallback(why) = judge_against(&old, &new, &[]) else {
            panic!("fallback expected");
        };
        assert_eq!(why.field, "thread_info.clear_tid_addr");
        // The held tree registered the prepared rseq area before the switch: a thread
        // whose area moved, or went, needs another registration.
        for rseq in [
            Some(pb::RseqEntry {
                rseq_abi_pointer: 0x7000_0000,
                rseq_abi_size: 32,
                signature: 0x5305_3053,
                ..Default::default()
            }),
            None,
        ] {
            let mut prepared = core_entry(1, 0);
            prepared.thread_core.as_mut().unwrap().rseq_entry = Some(pb::RseqEntry {
                rseq_abi_pointer: 0x7000_1000,
                rseq_abi_size: 32,
                signature: 0x5305_3053,
                ..Default::default()
            });
            let old = [image("core-7.img", encode(ImageKind::Core, &[prepared]))];
            let mut c = core_entry(2, 0);
            c.thread_core.as_mut().unwrap().rseq_entry = rseq;
            let new = [image("core-7.img", encode(ImageKind::Core, &[c]))];
            let Verdict::Fallback(why) = judge_against(&old, &new, &[]) else {
                panic!("fallback expected");
            };
            assert_eq!(why.field, "thread_core.rseq_entry");
        }
    }

    #[test]
    fn other_images_and_new_images_force_the_fallback() {
        let mm_old = encode(ImageKind::Mm, &[pb::MmEntry::default()]);
        let mm_new = encode(
            ImageKind::Mm,
            &[pb::MmEntry {
                mm_brk: 0x1000,
                ..Default::default()
            }],
        );
        let old = [image("mm-7.img", mm_old)];
        let Verdict::Fallback(why) = judge_against(&old, &[image("mm-7.img", mm_new)], &[]) else {
            panic!("fallback expected");
        };
        assert_eq!(why.image, "mm-7.img");
        let core = encode(ImageKind::Core, &[core_entry(1, 0)]);
        let Verdict::Fallback(why) = judge_against(&old, &[image("core-8.img", core)], &[]) else {
            panic!("fallback expected");
        };
        assert_eq!(
            (why.image.as_str(), why.field.as_str()),
            ("core-8.img", "a new image")
        );
    }

    #[test]
    fn statistics_clocks_and_unchanged_bytes_are_ignored() {
        let core = encode(ImageKind::Core, &[core_entry(1, 0)]);
        let old = [
            image("core-7.img", core.clone()),
            image("timens-0.img", vec![1, 2, 3]),
        ];
        let new = [
            image("core-7.img", core),
            image("stats-dump", vec![9]),
            image("timens-0.img", vec![4, 5, 6]),
        ];
        assert_eq!(
            judge_against(&old, &new, &[]),
            Verdict::Fast(FastPath::default())
        );
    }

    fn pagemap_bytes(ranges: &[(u64, u64, PageFlags)]) -> Vec<u8> {
        let p = Pagemap {
            pages_id: 1,
            ranges: ranges
                .iter()
                .map(|&(vaddr, nr_pages, flags)| PageRange {
                    vaddr,
                    nr_pages,
                    flags,
                })
                .collect(),
        };
        let mut w = ImageWriter::new(Vec::new(), ImageKind::Pagemap, "pagemap").unwrap();
        p.write(&mut w).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn lazy_lists_may_change_inside_registered_memory_only() {
        let lazy = PageFlags::PRESENT | PageFlags::LAZY;
        let old = [image(
            "pagemap-7.img",
            pagemap_bytes(&[(0x1000, 1, PageFlags::PRESENT), (0x10000, 2, lazy)]),
        )];
        let vma = Range {
            start: 0x10000,
            end: 0x20000,
        };
        let grown = pagemap_bytes(&[(0x1000, 1, PageFlags::PRESENT), (0x10000, 5, lazy)]);
        let Verdict::Fast(fast) =
            judge_against(&old, &[image("pagemap-7.img", grown.clone())], &[(7, vma)])
        else {
            panic!("fast path expected");
        };
        assert_eq!(fast.pagemaps, vec![7]);
        // The same change with nothing registered there: the pages would never come.
        let Verdict::Fallback(why) = judge_against(&old, &[image("pagemap-7.img", grown)], &[])
        else {
            panic!("fallback expected");
        };
        assert!(why.field.contains("outside the registered memory"), "{why}");
        // Pages that were written into the held tree changed.
        let written = pagemap_bytes(&[(0x2000, 1, PageFlags::PRESENT), (0x10000, 2, lazy)]);
        let Verdict::Fallback(why) =
            judge_against(&old, &[image("pagemap-7.img", written)], &[(7, vma)])
        else {
            panic!("fallback expected");
        };
        assert_eq!(why.field, "pages that are not lazy");
    }

    #[test]
    fn changed_written_pages_are_written_again_lazy_ones_are_left_to_the_daemon() {
        let lazy = PageFlags::PRESENT | PageFlags::LAZY;
        let map = pagemap_bytes(&[
            (0x1000, 2, PageFlags::PRESENT),
            (0x8000, 1, lazy),
            (0x9000, 1, PageFlags::PRESENT),
        ]);
        let pagemaps: HashMap<u32, Vec<u8>> = [(7, map)].into_iter().collect();
        let page = |b: u8| vec![b; 4096];
        let old_pages = [page(1), page(2), page(3), page(4)].concat();
        // The second written page and the lazy one changed.
        let new_pages = [page(1), page(9), page(8), page(4)].concat();
        let old: HashMap<String, Vec<u8>> = [("pages-1.img".to_string(), old_pages)]
            .into_iter()
            .collect();
        let new = [image("pages-1.img", new_pages.clone())];
        let Verdict::Fast(fast) = judge(&new, &old, &HashMap::new(), &HashMap::new(), &pagemaps)
        else {
            panic!("fast path expected");
        };
        assert_eq!(
            fast.pages,
            vec![PageWrite {
                pid: 7,
                vaddr: 0x2000,
                data: page(9)
            }]
        );
        // A pages image no pagemap of the tree points to.
        let other = [image("pages-2.img", new_pages)];
        let old2: HashMap<String, Vec<u8>> = [("pages-2.img".to_string(), vec![0; 4 * 4096])]
            .into_iter()
            .collect();
        assert!(matches!(
            judge(&other, &old2, &HashMap::new(), &HashMap::new(), &pagemaps),
            Verdict::Fallback(_)
        ));
    }

    fn reg_file(id: u32, pos: u64, name: &str) -> pb::FileEntry {
        pb::FileEntry {
            r#type: pb::FdTypes::Reg as i32,
            id,
            reg: Some(pb::RegFileEntry {
                id,
                pos,
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn moved_file_positions_are_applied_other_file_changes_are_not() {
        let old = [image(
            "files.img",
            encode(
                ImageKind::Files,
                &[reg_file(1, 0, "/a"), reg_file(2, 5, "/b")],
            ),
        )];
        let moved = encode(
            ImageKind::Files,
            &[reg_file(1, 0, "/a"), reg_file(2, 99, "/b")],
        );
        let Verdict::Fast(fast) = judge_against(&old, &[image("files.img", moved)], &[]) else {
            panic!("fast path expected");
        };
        assert_eq!(fast.positions, vec![(2, 99)]);
        let renamed = encode(
            ImageKind::Files,
            &[reg_file(1, 0, "/a"), reg_file(2, 5, "/c")],
        );
        let Verdict::Fallback(why) = judge_against(&old, &[image("files.img", renamed)], &[])
        else {
            panic!("fallback expected");
        };
        assert_eq!(why.field, "file id 2: not only its position");
        let more = encode(
            ImageKind::Files,
            &[
                reg_file(1, 0, "/a"),
                reg_file(2, 5, "/b"),
                reg_file(3, 0, "/d"),
            ],
        );
        assert!(matches!(
            judge_against(&old, &[image("files.img", more)], &[]),
            Verdict::Fallback(_)
        ));
    }

    #[test]
    fn damaged_images_fall_back_without_panicking() {
        let old = [image(
            "core-7.img",
            encode(ImageKind::Core, &[core_entry(1, 0)]),
        )];
        let Verdict::Fallback(why) = judge_against(
            &old,
            &[image("core-7.img", vec![1, 2, 3, 4, 5, 6, 7, 8, 9])],
            &[],
        ) else {
            panic!("fallback expected");
        };
        assert!(why.field.starts_with("cannot decode"), "{why}");
    }
}
