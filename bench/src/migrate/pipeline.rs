//! Each migration algorithm as a composition of the command-line tools, with the same command
//! lines `scripts/ckpt-migrate` runs over ssh. Source-side tools run in the source's network
//! namespace, destination-side ones in the destination's, and the restore in a fresh PID (and
//! mount, for its /proc) namespace, so the restored pid cannot collide with the frozen source.
//!
//! What can be made ready before the freeze is, so that it is not down time: the destination's
//! PID namespace and `ckpt-restore` itself, started with `--wait-go` (it waits on a FIFO for
//! the word that the images are there), the connection the images take, and for post-copy
//! the lazy-pages daemon (it connects to the dump, which listens before it freezes, and reads
//! the images only when restore hands it the process). `downtime` then cuts the measured down
//! time at the moments the tools log, so each run says where its down time went.
//!
//! The contract every pipeline keeps: it ends with the process running at the destination and
//! the source gone, or, when a step fails before the destination runs, with the source running
//! as before (dumps that freeze it leave it stopped until the destination runs; a failure sends
//! it SIGCONT).

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::downtime::{self, Mark};
use super::testbed::{Side, Testbed, DST_ADDR, SRC_ADDR};
use super::transfer;
use super::workload::Stamps;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Algorithm {
    /// Freeze, dump everything, transfer, restore.
    TotalCopy,
    /// Pre-dump rounds through the page server while it runs, then the final dump.
    PreCopy,
    /// Pre-copy rounds that hold back pages written since the previous round.
    QueuedPreCopy,
    /// Freeze, send the state, resume at once; pages are pulled from the source.
    PostCopy,
    /// One full pre-copy round, then post-copy of only the pages dirtied since.
    AssistedPostCopy,
    /// Post-copy with the pages under the instruction and stack pointers installed before it
    /// resumes.
    FreezeFree,
}

impl Algorithm {
    pub const ALL: [Algorithm; 6] = [
        Algorithm::TotalCopy,
        Algorithm::PreCopy,
        Algorithm::QueuedPreCopy,
        Algorithm::PostCopy,
        Algorithm::AssistedPostCopy,
        Algorithm::FreezeFree,
    ];

    /// For directory names.
    pub fn short_name(self) -> &'static str {
        match self {
            Algorithm::TotalCopy => "tc",
            Algorithm::PreCopy => "pc",
            Algorithm::QueuedPreCopy => "qpc",
            Algorithm::PostCopy => "poc",
            Algorithm::AssistedPostCopy => "apc",
            Algorithm::FreezeFree => "ff",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::TotalCopy => "total-copy",
            Algorithm::PreCopy => "pre-copy",
            Algorithm::QueuedPreCopy => "queued-pre-copy",
            Algorithm::PostCopy => "post-copy",
            Algorithm::AssistedPostCopy => "assisted-post-copy",
            Algorithm::FreezeFree => "freeze-free",
        }
    }
}

/// The project's binaries, next to the running benchmark.
#[derive(Debug, Clone)]
pub struct Tools {
    pub dump: PathBuf,
    pub restore: PathBuf,
    pub page_server: PathBuf,
    pub lazy_pages: PathBuf,
}

impl Tools {
    pub fn locate() -> Result<Tools> {
        let exe = std::env::current_exe().context("path of the running executable")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
        let find = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{} is missing: build the tools in the same profile first \
                     (cargo build --release --workspace)",
                    path.display()
                )
            }
        };
        Ok(Tools {
            dump: find("ckpt-dump")?,
            restore: find("ckpt-restore")?,
            page_server: find("ckpt-page-server")?,
            lazy_pages: find("ckpt-lazy-pages")?,
        })
    }
}

/// Pre-copy's stop rule: the thesis's at most `rounds` rounds and `max_dirty_percent` of the
/// address space, plus ours: stop when a round did not shrink the dirty set by a tenth.
///
/// Queued pre-copy applies it to the pages held back (the thesis's "delayed" pages, which the
/// final dump will send), from the third round on: the first round proves nothing and holds
/// every page (its count is the address space), and the second follows it so closely that few
/// pages were written in between, while the second's own transfer, the long one, is seen by
/// the third. The shrink rule compares two such rounds, so it starts at the fourth. One rule
/// looks at the second round: if even that short interval wrote more than the limit, the
/// write-hot set is larger than the limit and rounds cannot bring it under: stop there.
#[derive(Debug, Clone, Copy)]
pub struct PrecopyOptions {
    pub rounds: u32,
    pub max_dirty_percent: u32,
}

/// What one migration did, in CLOCK_MONOTONIC nanoseconds (the workloads' clock).
#[derive(Debug, Default)]
pub struct Outcome {
    pub t_request: u64,
    /// When the process was frozen for good (the final dump began).
    pub t_freeze: u64,
    /// When it ran again at the destination.
    pub t_resumed: u64,
    /// When the harness saw it run again: what `t_resumed` is if the stamps do not say.
    pub resume_seen: Option<u64>,
    /// When nothing of it was left at the source.
    pub t_done: u64,
    /// Pages each pre-copy round sent, in order.
    pub round_pages: Vec<u64>,
    /// Queued pre-copy: pages each round held back, in order.
    pub round_held: Vec<u64>,
    /// Why pre-copy stopped.
    pub stop_reason: Option<String>,
    /// Pages sent by the final dump through the page server (pre-copy variants).
    pub final_pages: u64,
    /// Every tool command line run, in order.
    pub steps: Vec<String>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC at the request: converts the tools' log stamps.
    pub clock_offset: i128,
    /// The harness's own moments inside the down time (see `downtime`).
    pub marks: Vec<Mark>,
    /// Post-copy ran with a prepared destination.
    pub prepared: bool,
    /// The final images: where they were written and where they were restored from.
    pub final_images: Option<(PathBuf, PathBuf)>,
}

impl Outcome {
    /// Every mark of the down time: the harness's and those the final dump and restore logged.
    /// A prepared switch's marks (taken with the harness's) are the whole story: restore's
    /// `restored` line comes after its tree runs, at low priority, and marks nothing the
    /// program waits for.
    pub fn all_marks(&self) -> Vec<Mark> {
        let mut marks = self.marks.clone();
        if self.prepared {
            return marks;
        }
        if let Some((src, dst)) = &self.final_images {
            marks.extend(downtime::tool_marks(
                &src.join("dump.log"),
                &dst.join("restore.log"),
                self.clock_offset,
            ));
        }
        marks
    }
}

/// A process the harness started; killed and reaped when dropped unless already reaped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Where its standard output and error go.
    pub out: PathBuf,
    /// The tool's own log (`-o`), when it has one apart from `out`.
    pub log: Option<PathBuf>,
    /// A restore made ready before the freeze: the FIFO that lets it go.
    go: Option<PathBuf>,
    reaped: Option<ExitStatus>,
}

impl Proc {
    /// The end of what it wrote, for error messages.
    pub fn tail(&self) -> String {
        let mut text = log_tail(&self.out);
        if let Some(log) = &self.log {
            let more = log_tail(log);
            if !more.is_empty() {
                text = if text.is_empty() {
                    more
                } else {
                    format!("{text} | {more}")
                };
            }
        }
        text
    }

    /// A pidfd on the tool, readable once it exits; `None` if none can be had (it was
    /// reaped, or the kernel has no pidfds).
    fn pidfd(&self) -> Option<std::os::fd::OwnedFd> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    }

    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.reaped.is_none() {
            self.reaped = self
                .child
                .try_wait()
                .with_context(|| format!("wait for {}", self.name))?;
        }
        Ok(self.reaped)
    }

    /// Waits for the exit, woken by it through a pidfd: a tool that ends inside the down
    /// time (the final dump) is followed at once by the next step, as in a shell pipeline.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        let pidfd = self.pidfd();
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            match &pidfd {
                Some(fd) => {
                    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
                    let wait =
                        rustix::time::Timespec::try_from(left.min(Duration::from_millis(100)))
                            .unwrap_or(rustix::time::Timespec {
                                tv_sec: 0,
                                tv_nsec: 100_000_000,
                            });
                    // EINTR or a timeout: look again.
                    let _ = rustix::event::poll(&mut fds, Some(&wait));
                }
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Waits for success; a failure carries the end of the tool's log.
    pub fn wait_ok(&mut self, timeout: Duration) -> Result<()> {
        let status = self.wait_timeout(timeout)?;
        if status.success() {
            Ok(())
        } else {
            bail!("{} failed ({status}): {}", self.name, self.tail())
        }
    }

    pub fn kill(&mut self) {
        if self.reaped.is_none() {
            // unshare's child first (the PID namespace's init): killed this way it is reaped
            // by unshare, while killing unshare first would leave it to the host's init.
            let pid = self.child.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            self.reaped = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// When the last of some processes exited, taken as it happens: a thread waits on their
/// pidfds, so the time is not that at which the harness, busy reading logs meanwhile,
/// gets round to looking (it waits for restore's last log line, which a restore that
/// stepped aside writes a millisecond or more after the tree resumed).
pub struct ExitClock(std::thread::JoinHandle<Option<u64>>);

impl ExitClock {
    /// Watches `procs`, which must not be reaped yet (their pids are theirs until then).
    pub fn start(procs: &[&Proc], timeout: Duration) -> ExitClock {
        let fds: Vec<_> = procs.iter().filter_map(|p| p.pidfd()).collect();
        let whole = fds.len() == procs.len();
        ExitClock(std::thread::spawn(move || {
            let start = Instant::now();
            let mut running = fds;
            while !running.is_empty() {
                let left = timeout.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return None;
                }
                let wait = rustix::time::Timespec::try_from(left).ok()?;
                let mut polled: Vec<_> = running
                    .iter()
                    .map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN))
                    .collect();
                // EINTR or a timeout: look again.
                let _ = rustix::event::poll(&mut polled, Some(&wait));
                let exited: Vec<bool> = polled.iter().map(|p| !p.revents().is_empty()).collect();
                drop(polled);
                // One that exited stays readable: it is not polled again.
                running = running
                    .into_iter()
                    .zip(exited)
                    .filter_map(|(fd, gone)| (!gone).then_some(fd))
                    .collect();
            }
            whole.then(now_ns)
        }))
    }

    /// When the last one exited; `None` if that was not seen.
    pub fn when(self) -> Option<u64> {
        self.0.join().ok().flatten()
    }
}

/// The last lines of a tool's log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(6);
    lines[from..].join(" | ")
}

/// A `ckpt-page-server` at the destination that listens for a dump's pages.
struct PageServer {
    proc: Proc,
    port: u16,
    /// Where it writes the images.
    dst: PathBuf,
}

/// Everything a pipeline works with.
pub struct Migration<'a> {
    pub bed: &'a Testbed,
    pub tools: &'a Tools,
    /// The cell's scratch directory: `src/` and `dst/` image trees live in it.
    pub dir: &'a Path,
    pub pid: i32,
    pub stamps: &'a Path,
    pub precopy: PrecopyOptions,
    /// Upper bound for any one step.
    pub step_timeout: Duration,
    pub next_port: u16,
    /// Move the service address to the destination as soon as it runs (the UDP server).
    pub move_service: bool,
    /// Compress on the wire, as on a slow link: the images (zlib, fastest level, as `ssh -C`)
    /// and the pages between the tools (`--compress-pages`).
    pub compress: bool,
    /// Post-copy and freeze-free rebuild the process at the destination before the freeze.
    pub prepared: bool,
    pub outcome: Outcome,
}

/// The process restored at the destination: `unshare` and, under it, the PID namespace's
/// init, which outlives `ckpt-restore -d`; dropping it ends the namespace.
pub type Restored = Proc;

impl Migration<'_> {
    pub fn run(&mut self, algorithm: Algorithm) -> Result<Restored> {
        self.outcome.clock_offset = downtime::clock_offset_ns();
        self.outcome.t_request = now_ns();
        let result = match algorithm {
            Algorithm::TotalCopy => self.total_copy(),
            Algorithm::PreCopy => self.pre_copy(false),
            Algorithm::QueuedPreCopy => self.pre_copy(true),
            Algorithm::PostCopy if self.prepared => self.prepared_post_copy(false, &[]),
            Algorithm::PostCopy => self.post_copy(false, &[]),
            Algorithm::AssistedPostCopy if self.prepared => self.prepared_post_copy(true, &[]),
            Algorithm::AssistedPostCopy => self.post_copy(true, &[]),
            // The pages under each thread's instruction and stack pointers (and where its
            // registers point) are installed before it resumes.
            Algorithm::FreezeFree if self.prepared => {
                self.prepared_post_copy(false, &["--lazy-prefetch-hot"])
            }
            Algorithm::FreezeFree => self.post_copy(false, &["--lazy-prefetch-hot"]),
        };
        if result.is_err() {
            // Whatever froze it is gone now: let the source run on, as before.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGCONT);
            return result;
        }
        self.settle_times()?;
        result
    }

    /// When the process ran again, from its stamps, read only now that the tools are done:
    /// the stamps file is 400 KB, and reading it (or the tools' logs) just after the resume
    /// took the CPU from the lazy-pages daemon while the first faults waited (traced: 142
    /// µs). A migration with nothing to move afterwards is done when the process runs.
    fn settle_times(&mut self) -> Result<()> {
        let seen = self
            .outcome
            .resume_seen
            .ok_or_else(|| anyhow!("the harness never saw the process run again"))?;
        self.outcome.t_resumed = Stamps::read(self.stamps)?
            .resumed_at(self.outcome.t_freeze)
            .unwrap_or(seen);
        if self.outcome.t_done == 0 {
            self.outcome.t_done = self.outcome.t_resumed;
        }
        Ok(())
    }

    /// Freeze, dump, transfer, restore.
    fn total_copy(&mut self) -> Result<Restored> {
        let (src, dst) = (self.dir.join("src/img"), self.dir.join("dst/img"));
        self.outcome.final_images = Some((src.clone(), dst.clone()));
        let mut restored = self.prepare_restore(&dst, &[])?;
        let link = self.open_transfer(&dst)?;
        self.restore_ready(&mut restored)?;
        self.outcome.t_freeze = now_ns();
        let pid = self.pid.to_string();
        self.tool(
            Side::Source,
            "ckpt-dump",
            &self.tools.dump.clone(),
            &[
                "-t",
                &pid,
                "-D",
                &s(&src),
                "-o",
                "dump.log",
                "--leave-stopped",
            ],
        )?
        .wait_ok(self.step_timeout)?;
        let frozen = Stamps::iterations(self.stamps)?;
        self.transfer(link, &src, &dst)?;
        self.start_restore(&mut restored)?;
        self.wait_resumed(frozen, &mut restored)?;
        Ok(restored)
    }

    /// Pre-dump rounds while it runs, then the final dump of what is still dirty.
    fn pre_copy(&mut self, queued: bool) -> Result<Restored> {
        let (src, dst) = (self.dir.join("src/final"), self.dir.join("dst/final"));
        std::fs::create_dir_all(&dst).with_context(|| format!("create {}", dst.display()))?;
        // The destination gets ready while the rounds run.
        let prepared = self.prepared.then(|| self.port());
        let source = prepared.map(|port| format!("{SRC_ADDR}:{port}"));
        let restore_args: Vec<&str> = source
            .as_deref()
            .map(|source| vec!["--prepared", source])
            .unwrap_or_default();
        let mut restored = self.prepare_restore(&dst, &restore_args)?;
        let mut round = 0u32;
        let mut prev: Option<String> = None;
        loop {
            round += 1;
            let name = format!("pre{round}");
            let mut args = vec!["--pre-dump", "--track-mem"];
            if queued {
                args.push("--hold-hot-pages");
            }
            let sent = self.dump_through_page_server(&name, prev.as_deref(), &args)?;
            self.outcome.round_pages.push(sent);
            // What the final dump would have to send: the dirty set, or the held pages.
            let series = if queued {
                let held = held_pages(&self.dir.join("src").join(&name).join("dump.log"));
                self.outcome.round_held.push(held);
                &self.outcome.round_held
            } else {
                &self.outcome.round_pages
            };
            prev = Some(format!("../{name}"));
            if let Some(reason) = stop_rounds(&self.precopy, queued, series) {
                self.outcome.stop_reason = Some(reason);
                break;
            }
        }
        self.outcome.final_images = Some((src.clone(), dst.clone()));
        let prev_dir = prev.unwrap_or_default();
        if let Some(port) = prepared {
            // The last round's images are the parent of the prepared ones; the pages
            // written since cross with the final state.
            let extra = ["--track-mem", "--prev-images-dir", &prev_dir];
            return self.prepared_switch(restored, port, &extra, false);
        }
        let server = self.start_page_server("final", Some(&prev_dir))?;
        let link = self.open_transfer(&dst)?;
        self.restore_ready(&mut restored)?;
        self.outcome.t_freeze = now_ns();
        self.outcome.final_pages = self.dump_to_page_server(
            server,
            "final",
            Some(&prev_dir),
            &["--track-mem", "--leave-stopped"],
        )?;
        let frozen = Stamps::iterations(self.stamps)?;
        self.transfer(link, &src, &dst)?;
        self.start_restore(&mut restored)?;
        self.wait_resumed(frozen, &mut restored)?;
        Ok(restored)
    }

    /// One `ckpt-dump` whose pages go to a `ckpt-page-server` at the destination, into
    /// `dst/NAME` (other images stay in `src/NAME`); returns the pages that crossed.
    fn dump_through_page_server(
        &mut self,
        name: &str,
        prev: Option<&str>,
        extra: &[&str],
    ) -> Result<u64> {
        let server = self.start_page_server(name, prev)?;
        self.dump_to_page_server(server, name, prev, extra)
    }

    /// Starts a `ckpt-page-server` at the destination writing into `dst/NAME` and returns
    /// once it listens.
    fn start_page_server(&mut self, name: &str, prev: Option<&str>) -> Result<PageServer> {
        let dst = self.dir.join("dst").join(name);
        std::fs::create_dir_all(&dst).with_context(|| format!("create {}", dst.display()))?;
        let port = self.port();
        let port_s = port.to_string();
        let dst_s = s(&dst);
        // It says when it listens on a pipe it inherits: polling the namespace's
        // /proc/net/tcp would take milliseconds per look (the kernel walks its whole
        // connection hash table for it).
        let (ready, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
        nix::fcntl::fcntl(
            &ready_w,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .context("let the page server inherit its status pipe")?;
        let status_fd = ready_w.as_raw_fd().to_string();
        let mut server_args = vec![
            "-D",
            &dst_s,
            "--address",
            DST_ADDR,
            "--port",
            &port_s,
            "--status-fd",
            &status_fd,
        ];
        if let Some(prev) = prev {
            server_args.extend(["--prev-images-dir", prev]);
        }
        let page_server = self.tools.page_server.clone();
        let server = self.tool(
            Side::Destination,
            "ckpt-page-server",
            &page_server,
            &server_args,
        );
        drop(ready_w);
        let mut server = server?;
        wait_status_byte(ready, &mut server, self.step_timeout)?;
        Ok(PageServer {
            proc: server,
            port,
            dst,
        })
    }

    /// Runs `ckpt-dump EXTRA` into `src/NAME` with its pages going to `server`; returns the
    /// pages that crossed.
    fn dump_to_page_server(
        &mut self,
        server: PageServer,
        name: &str,
        prev: Option<&str>,
        extra: &[&str],
    ) -> Result<u64> {
        let PageServer {
            proc: mut server,
            port,
            dst,
        } = server;
        let src = self.dir.join("src").join(name);
        let pid = self.pid.to_string();
        let (src_s, port_s) = (s(&src), port.to_string());
        let mut args = vec!["-t", &pid, "-D", &src_s, "-o", "dump.log"];
        args.extend(extra);
        args.extend(["--page-server", "--address", DST_ADDR, "--port", &port_s]);
        if self.compress {
            args.push("--compress-pages");
        }
        if let Some(prev) = prev {
            args.extend(["--prev-images-dir", prev]);
        }
        let dump = self.tools.dump.clone();
        self.tool(Side::Source, "ckpt-dump", &dump, &args)?
            .wait_ok(self.step_timeout)?;
        server.wait_ok(self.step_timeout)?;
        Ok(pages_in(&dst)? / 4096)
    }

    /// Post-copy and its variants: the source serves pages to the destination's lazy-pages
    /// daemon; `assisted` first moves one full pre-dump round; `restore_extra` goes to
    /// `ckpt-restore --lazy-pages`.
    fn post_copy(&mut self, assisted: bool, restore_extra: &[&str]) -> Result<Restored> {
        let (src, dst) = (self.dir.join("src/final"), self.dir.join("dst/final"));
        // The destination is made ready before the freeze (during the round, if any): its
        // PID namespace and restore's init wait for the images, so none of that is down time.
        std::fs::create_dir_all(&dst).with_context(|| format!("create {}", dst.display()))?;
        let mut restore_args = vec!["--lazy-pages"];
        restore_args.extend(restore_extra);
        let mut restored = self.prepare_restore(&dst, &restore_args)?;
        let mut prev = None;
        if assisted {
            let pages =
                self.dump_through_page_server("pre1", None, &["--pre-dump", "--track-mem"])?;
            self.outcome.round_pages.push(pages);
            prev = Some("../pre1".to_string());
        }
        self.outcome.final_images = Some((src.clone(), dst.clone()));
        let port = self.port();
        let port_s = port.to_string();
        let mut args = self.lazy_dump_args(&src, port);
        if let Some(prev) = prev {
            args.extend(["--track-mem".into(), "--prev-images-dir".into(), prev]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let link = self.open_transfer(&dst)?;
        self.restore_ready(&mut restored)?;
        // The daemon starts first and retries its connection until the dump listens (just
        // before it freezes): its start does not compete with the freeze for the CPUs. The
        // dump accepts once its images are written; the daemon reads the pagemap only when
        // restore hands it the process.
        let daemon = self.start_daemon(&dst, &port_s);
        self.outcome.t_freeze = now_ns();
        let dump = self.tools.dump.clone();
        // Not waited for here: reading its socket table while it freezes would take CPU
        // from it, and the daemon notices the listener by itself.
        let mut server = self.tool(Side::Source, "ckpt-dump --lazy-pages", &dump, &args)?;
        let result = daemon.and_then(|mut daemon| {
            // It serves once its images are written; the inventory, written last (and at
            // once, but into a file created empty), says they are.
            wait_for_images(&src.join("inventory.img"), &mut server, self.step_timeout)?;
            let frozen = Stamps::iterations(self.stamps)?;
            self.transfer(link, &src, &dst)?;
            // Started long ago, it is normally listening by now.
            wait_for_file(
                &dst.join("lazy-pages.socket"),
                &mut daemon,
                self.step_timeout,
            )?;
            let clock = ExitClock::start(&[&daemon, &server], self.step_timeout);
            self.start_restore(&mut restored)?;
            self.wait_resumed(frozen, &mut restored)?;
            Ok((daemon, clock))
        });
        self.end_post_copy(result, restored, server)
    }

    /// Post-copy with a prepared destination: `ckpt-dump --prepare` writes a first image set
    /// and lets the process run on; it crosses, and `ckpt-restore --prepared` rebuilds the
    /// process from it and holds it, connected to the dump. The dump then freezes the source
    /// and sends what changed since on that connection; the destination applies it and
    /// resumes, and from there it is post-copy: the source serves the lazy pages.
    /// `assisted`: one pre-dump round first, whose pages the destination keeps where they
    /// were not written since (the pages written since the prepared images cross with the
    /// final state, those written before are lazy).
    fn prepared_post_copy(&mut self, assisted: bool, restore_extra: &[&str]) -> Result<Restored> {
        let dst = self.dir.join("dst/final");
        std::fs::create_dir_all(&dst).with_context(|| format!("create {}", dst.display()))?;
        let port = self.port();
        let source = format!("{SRC_ADDR}:{port}");
        let mut restore_args = vec!["--lazy-pages", "--prepared", &source];
        restore_args.extend(restore_extra);
        let restored = self.prepare_restore(&dst, &restore_args)?;
        let mut dump_extra: &[&str] = &[];
        if assisted {
            let pages =
                self.dump_through_page_server("pre1", None, &["--pre-dump", "--track-mem"])?;
            self.outcome.round_pages.push(pages);
            dump_extra = &["--track-mem", "--prev-images-dir", "../pre1"];
        }
        self.prepared_switch(restored, port, dump_extra, true)
    }

    /// The prepared end of a migration into `dst/final` by `restored` (a prepared restore
    /// that will connect to `port`): `ckpt-dump --prepare EXTRA` (with `--lazy-pages` if
    /// `lazy`) writes its first images into `src/final`, they cross, the destination builds
    /// and connects, and the switch follows. Preparation ends at the final freeze, which
    /// the dump logs; a lazy migration's post-processing lasts until the daemon has every
    /// page.
    fn prepared_switch(
        &mut self,
        mut restored: Restored,
        port: u16,
        extra: &[&str],
        lazy: bool,
    ) -> Result<Restored> {
        self.outcome.prepared = true;
        let (src, dst) = (self.dir.join("src/final"), self.dir.join("dst/final"));
        self.outcome.final_images = Some((src.clone(), dst.clone()));
        let port_s = port.to_string();
        let mut args = self.lazy_dump_args(&src, port);
        if !lazy {
            args.retain(|a| a != "--lazy-pages");
        }
        args.push("--prepare".into());
        args.extend(extra.iter().map(|a| a.to_string()));
        if self.compress {
            args.push("--compress-pages".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The dump first: its first round runs while the destination gets ready (the
        // restore and the daemon connect to it, and wait for it to listen).
        let dump = self.tools.dump.clone();
        let mut server = self.tool(Side::Source, "ckpt-dump --prepare", &dump, &args)?;
        let link = self.open_transfer(&dst);
        let daemon = link.and_then(|link| {
            self.restore_ready(&mut restored)?;
            let daemon = if lazy {
                Some(self.start_daemon(&dst, &port_s)?)
            } else {
                None
            };
            Ok((link, daemon))
        });
        let result = daemon.and_then(|(link, mut daemon)| {
            // The prepared images: written while the process runs on.
            wait_for_images(&src.join("inventory.img"), &mut server, self.step_timeout)?;
            self.transfer(link, &src, &dst)?;
            if let Some(daemon) = daemon.as_mut() {
                wait_for_file(&dst.join("lazy-pages.socket"), daemon, self.step_timeout)?;
            }
            let daemon = daemon.map(|daemon| {
                let clock = ExitClock::start(&[&daemon, &server], self.step_timeout);
                (daemon, clock)
            });
            self.start_restore(&mut restored)?;
            let log = restored
                .log
                .clone()
                .ok_or_else(|| anyhow!("{} has no log", restored.name))?;
            wait_logged(&log, RESTORED, &mut restored, self.step_timeout)?;
            self.outcome.resume_seen = Some(now_ns());
            self.note("the process runs at the destination".to_string());
            if self.move_service {
                self.bed.move_service_address()?;
            }
            Ok(daemon)
        });
        let restored = match result {
            Ok(Some(daemon)) => self.end_post_copy(Ok(daemon), restored, server)?,
            Ok(None) => {
                // Nothing left to move: the source ends once the destination runs.
                server.wait_ok(self.step_timeout)?;
                restored
            }
            Err(e) => return self.end_post_copy(Err(e), restored, server),
        };
        // The logs are read once the tools are done (see `Migration::settle_times`). The
        // dump logs the delta once it is sent, which may be after the destination took it
        // and resumed: a busy CPU may hold the dump back.
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        let dump_log = read(&src.join("dump.log"));
        let restore_log = restored.log.as_deref().map(read).unwrap_or_default();
        let switch = downtime::switch_marks(&dump_log, &restore_log, self.outcome.clock_offset)
            .ok_or_else(|| anyhow!("the dump did not log {:?}", downtime::DELTA_SENT))?;
        self.outcome.t_freeze = switch.frozen;
        self.outcome.marks.extend(switch.marks);
        Ok(restored)
    }

    /// `ckpt-dump --lazy-pages` of the workload into `src`, serving its pages on `port`.
    fn lazy_dump_args(&self, src: &Path, port: u16) -> Vec<String> {
        [
            "-t",
            &self.pid.to_string(),
            "-D",
            &s(src),
            "-o",
            "dump.log",
            "--lazy-pages",
            "--address",
            SRC_ADDR,
            "--port",
            &port.to_string(),
            "--lazy-connect-timeout",
            "30",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// The end of a post-copy whose destination runs (`result` holds its daemon) or failed
    /// to: post-processing until the daemon holds every page and the source let go; or,
    /// after a failure, the destination's processes go, and the dump, seeing its peer leave
    /// (or never come), resumes the source itself, given the time to before it is killed.
    fn end_post_copy(
        &mut self,
        result: Result<(Proc, ExitClock)>,
        restored: Restored,
        mut server: Proc,
    ) -> Result<Restored> {
        match result {
            Ok((mut daemon, clock)) => {
                daemon.wait_ok(self.step_timeout)?;
                server.wait_ok(self.step_timeout)?;
                self.outcome.t_done = clock.when().unwrap_or_else(now_ns);
                Ok(restored)
            }
            Err(e) => {
                drop(restored);
                let _ = server.wait_timeout(Duration::from_secs(10));
                let said = format!("{} said: {}", server.name, server.tail());
                Err(e.context(said))
            }
        }
    }

    /// Starts the destination's `ckpt-lazy-pages` for the images that will be in `dst`,
    /// pulling pages from the lazy dump at the source, which it waits for.
    fn start_daemon(&mut self, dst: &Path, port: &str) -> Result<Proc> {
        let (dst_s, log) = (s(dst), s(&dst.join("lazy-pages.log")));
        let wait = self.step_timeout.as_millis().to_string();
        let lazy = self.tools.lazy_pages.clone();
        let mut args = vec![
            "-D",
            &dst_s,
            "-o",
            &log,
            "--page-server",
            "--address",
            SRC_ADDR,
            "--port",
            port,
            "--connect-wait",
            &wait,
        ];
        if self.compress {
            args.push("--compress-pages");
        }
        self.tool(Side::Destination, "ckpt-lazy-pages", &lazy, &args)
    }

    /// Records a step with its start, in ms after the request: the run's timeline.
    fn note(&mut self, step: String) {
        let at = now_ns().saturating_sub(self.outcome.t_request) as f64 / 1e6;
        self.outcome.steps.push(format!("+{at:.1} ms {step}"));
    }

    fn port(&mut self) -> u16 {
        self.next_port = self.next_port.wrapping_add(1).max(20000);
        self.next_port
    }

    /// Opens the connection the images will take to `to`, before they exist (as a script
    /// keeps its ssh connection open): connecting is not down time.
    fn open_transfer(&mut self, to: &Path) -> Result<transfer::Link> {
        let port = self.port();
        let addr: SocketAddr = format!("{DST_ADDR}:{port}").parse().context("address")?;
        transfer::Link::open(
            &self.bed.ns_path(Side::Source),
            &self.bed.ns_path(Side::Destination),
            to,
            addr,
            self.compress,
        )
        .context("connect to the destination for the images")
    }

    fn transfer(&mut self, link: transfer::Link, from: &Path, to: &Path) -> Result<()> {
        self.note(format!(
            "transfer {} -> {} (tar | ssh{})",
            from.display(),
            to.display(),
            if self.compress { " -C" } else { "" }
        ));
        link.send(from)
            .with_context(|| format!("transfer {} to the destination", from.display()))?;
        self.outcome.marks.push(Mark {
            part: "wait for the images, transfer them",
            at: now_ns(),
        });
        Ok(())
    }

    /// Makes the destination ready before the freeze: a new PID namespace (in the
    /// destination's network namespace) whose init waits on a FIFO for the images, then runs
    /// `ckpt-restore -d -D dir EXTRA` and stays; [`Migration::start_restore`] lets it go.
    fn prepare_restore(&mut self, dir: &Path, extra: &[&str]) -> Result<Restored> {
        let log = dir.join("restore.log");
        let go = self
            .dir
            .join(format!("restore-{}.go", self.outcome.steps.len()));
        let _ = std::fs::remove_file(&go);
        nix::unistd::mkfifo(&go, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("mkfifo {}", go.display()))?;
        let mut cmd = Command::new("unshare");
        // The namespace's init is a shell that runs `ckpt-restore --wait-go -d` with the FIFO
        // as its input, and then waits: the restored process is not the child of a restorer
        // that waits for it, as it is on a destination host. ckpt-restore starts now and
        // waits for the word: its start is not down time. The FIFO is opened read-write, so
        // the open does not wait for a writer, and the shell waits on it with a builtin
        // (nobody writes again): an exec there, when restore exits just after the resume,
        // would take a CPU from the restored process's first steps for a millisecond.
        // --kill-child: if unshare dies, so does the init and with it the namespace.
        cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
            .args([
                "sh",
                "-c",
                r#""$@" <>"$0" && while read -r _; do :; done <>"$0""#,
            ])
            .arg(&go)
            .arg(&self.tools.restore)
            .arg("--wait-go")
            .arg("-d")
            .arg("-D")
            .arg(dir)
            .arg("-o")
            .arg(&log)
            .args(extra);
        let mut restore = self.spawn(
            Side::Destination,
            "ckpt-restore (waiting for the images)",
            &cmd,
            self.dir
                .join(format!("restore-{}.out", self.outcome.steps.len())),
        )?;
        restore.log = Some(log);
        restore.go = Some(go);
        Ok(restore)
    }

    /// Waits until a restore from [`Migration::prepare_restore`] waits for the images.
    fn restore_ready(&mut self, restore: &mut Restored) -> Result<()> {
        let log = restore
            .log
            .clone()
            .ok_or_else(|| anyhow!("{} has no log", restore.name))?;
        wait_logged(&log, WAITING_FOR_GO, restore, self.step_timeout)
    }

    /// The images are in place: the waiting init runs `ckpt-restore`.
    fn start_restore(&mut self, restore: &mut Restored) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let go = restore
            .go
            .take()
            .ok_or_else(|| anyhow!("{} was started already", restore.name))?;
        self.note("ckpt-restore goes".to_string());
        let start = Instant::now();
        // Non-blocking: opening a FIFO no one reads fails (ENXIO) instead of waiting forever;
        // the init may still be on its way to its `read`.
        let mut fifo = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&go)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                    if let Some(status) = restore.try_status()? {
                        bail!(
                            "{} exited ({status}) before restoring: {}",
                            restore.name,
                            restore.tail()
                        );
                    }
                    if start.elapsed() > self.step_timeout {
                        bail!("{} never waited for the images", restore.name);
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e).with_context(|| format!("open {}", go.display())),
            }
        };
        fifo.write_all(b"go\n")
            .with_context(|| format!("write {}", go.display()))?;
        self.outcome.marks.push(Mark {
            part: "let restore go",
            at: now_ns(),
        });
        Ok(())
    }

    /// Waits until the stamps move again after `frozen` iterations: the destination runs.
    /// Polled under `SCHED_IDLE`: the restore it waits for runs on the harness's CPUs, and
    /// a poll that woke at the normal policy took the CPU from it every 200 µs (traced,
    /// in the middle of a total copy's restore). When the process resumed is read from its
    /// stamps afterwards, not from when the poll saw it.
    fn wait_resumed(&mut self, frozen: u64, restored: &mut Restored) -> Result<()> {
        let _idle = IdleWhile::now();
        let start = Instant::now();
        loop {
            // The header alone while polling: reading the whole file each time would take
            // CPU from the restore on this small machine.
            if Stamps::iterations(self.stamps)? > frozen {
                self.outcome.resume_seen = Some(now_ns());
                self.note("the process runs at the destination".to_string());
                if self.move_service {
                    self.bed.move_service_address()?;
                }
                return Ok(());
            }
            if let Some(status) = restored.try_status()? {
                bail!(
                    "ckpt-restore exited ({status}) before the process ran: {}",
                    restored.tail()
                );
            }
            if start.elapsed() > self.step_timeout {
                bail!(
                    "the restored process did not run within {:?}",
                    self.step_timeout
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn tool(&mut self, side: Side, name: &str, program: &Path, args: &[&str]) -> Result<Proc> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let log = self.dir.join(format!(
            "{}-{}.out",
            name.replace([' ', '-'], "_"),
            self.outcome.steps.len()
        ));
        self.spawn(side, name, &cmd, log)
    }

    /// Spawns `cmd` on `side`, on that side's CPUs (see [`super::workload::Placement`]).
    fn spawn(&mut self, side: Side, name: &str, cmd: &Command, out: PathBuf) -> Result<Proc> {
        let placement = match side {
            Side::Destination => super::workload::Placement::Destination,
            Side::Source => super::workload::Placement::Source,
            Side::Clients => super::workload::Placement::Anywhere,
        };
        let ns = self.bed.ns_path(side);
        let line = format!(
            "[{}] {} {}",
            self.bed.name(side),
            cmd.get_program().to_string_lossy(),
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.note(line);
        let child = super::workload::spawn_in(&ns, cmd, &out, placement)
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            out,
            log: None,
            go: None,
            reaped: None,
        })
    }
}

/// The calling thread under `SCHED_IDLE` until dropped (best effort: where it may not,
/// it keeps its policy).
struct IdleWhile(Option<(tracee::Tid, tracee::taskinfo::Sched)>);

impl IdleWhile {
    fn now() -> IdleWhile {
        IdleWhile(tracee::taskinfo::idle_policy().ok().flatten())
    }
}

impl Drop for IdleWhile {
    fn drop(&mut self) {
        if let Some((tid, before)) = &self.0 {
            let _ = tracee::taskinfo::set_sched(*tid, before);
        }
    }
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

/// CLOCK_MONOTONIC, the clock the workloads stamp with.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Whether pre-copy stops after the rounds so far, and why (see [`PrecopyOptions`]).
/// `series`: per round, what the final dump would have to send if it came now: the dirty
/// pages the round sent, or for queued pre-copy the pages it held back.
pub fn stop_rounds(opts: &PrecopyOptions, queued: bool, series: &[u64]) -> Option<String> {
    let round = u32::try_from(series.len()).unwrap_or(u32::MAX);
    let pages = *series.last()?;
    let first = series.first().copied().unwrap_or(0).max(1);
    let previous = series.iter().rev().nth(1).copied();
    let limit = first * u64::from(opts.max_dirty_percent) / 100;
    // The first round the limit applies to, and the first that may compare with the round
    // before.
    let (judged_from, compared_from) = if queued { (3, 4) } else { (2, 2) };
    let what = if queued { "held back" } else { "dirty" };
    if round >= judged_from && pages <= limit {
        Some(format!("{pages} pages {what}, within the limit of {limit}"))
    } else if queued && round == 2 && pages > limit {
        Some(format!(
            "not converging: {pages} pages written within the short second round, above the \
             limit of {limit}"
        ))
    } else if round >= opts.rounds {
        Some(format!("{round} rounds, the maximum"))
    } else {
        previous
            .filter(|&p| round >= compared_from && pages * 10 > p * 9)
            .map(|p| format!("not converging: {pages} pages {what} after {p} the round before"))
    }
}

/// Pages a queued pre-dump held back, from its log (`ckpt-dump` says how many when there
/// are any; a round that held none says nothing).
fn held_pages(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|line| line.contains("pages held back"))
        .filter_map(|line| {
            let at = line.find(" held=")? + " held=".len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// Bytes of page data in an image directory (`pages-*.img`).
fn pages_in(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("pages-") && name.ends_with(".img") {
            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(total)
}

/// Waits for the byte `proc` writes on its status pipe once it listens (`--status-fd`);
/// `ready` is our end of that pipe, whose other end only `proc` holds.
fn wait_status_byte(ready: std::os::fd::OwnedFd, proc: &mut Proc, timeout: Duration) -> Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let start = Instant::now();
    let mut ready = std::fs::File::from(ready);
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let wait =
            PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => {
                let mut byte = [0u8; 1];
                return match std::io::Read::read(&mut ready, &mut byte) {
                    Ok(1) => Ok(()),
                    _ => {
                        let status = proc.wait_timeout(timeout)?;
                        bail!(
                            "{} exited ({status}) before listening: {}",
                            proc.name,
                            proc.tail()
                        )
                    }
                };
            }
            Err(e) => return Err(e).context("poll the status pipe"),
        }
        if start.elapsed() > timeout {
            bail!("{} did not listen within {timeout:?}", proc.name);
        }
    }
}

/// What `ckpt-restore` logs once the tree runs.
const RESTORED: &str = " restored ";

/// What `ckpt-restore --wait-go` logs once it waits.
const WAITING_FOR_GO: &str = "waiting for the word to go";

/// Waits until the log at `path` of `proc` has a line containing `needle`.
fn wait_logged(path: &Path, needle: &str, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = proc.try_status()? {
            bail!(
                "{} exited ({status}) before logging {needle:?}: {}",
                proc.name,
                proc.tail()
            );
        }
        if start.elapsed() > timeout {
            bail!("{} did not log {needle:?} within {timeout:?}", proc.name);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until `path` exists and is not empty.
/// Polled finely once they may be there (the process is frozen meanwhile, and a stat costs
/// little), coarsely before: freezing and collecting take milliseconds, and polling then
/// would take CPU from the freeze on this small machine. Under `SCHED_IDLE`, as
/// [`Migration::wait_resumed`]: the dump that writes them runs on the harness's CPUs.
fn wait_for_images(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<()> {
    const COARSE_FOR: Duration = Duration::from_millis(2);
    let _idle = IdleWhile::now();
    let start = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        if let Some(status) = proc.try_status()? {
            bail!(
                "{} exited ({status}) before writing {}: {}",
                proc.name,
                path.display(),
                proc.tail()
            );
        }
        if start.elapsed() > timeout {
            bail!("{} not written within {timeout:?}", path.display());
        }
        let pause = if start.elapsed() < COARSE_FOR {
            500
        } else {
            50
        };
        std::thread::sleep(Duration::from_micros(pause));
    }
}

fn wait_for_file(path: &Path, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = proc.try_status()? {
            bail!(
                "{} exited ({status}) before creating {}: {}",
                proc.name,
                path.display(),
                proc.tail()
            );
        }
        if start.elapsed() > timeout {
            bail!("{} not created within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(secs: &str) -> Proc {
        let child = Command::new("sleep")
            .arg(secs)
            .spawn()
            .expect("spawn sleep");
        Proc {
            name: format!("sleep {secs}"),
            child,
            out: PathBuf::new(),
            log: None,
            go: None,
            reaped: None,
        }
    }

    #[test]
    fn the_exit_clock_stops_when_the_last_one_exits() {
        let start = now_ns();
        let (mut short, mut long) = (sleeper("0.05"), sleeper("0.3"));
        let clock = ExitClock::start(&[&short, &long], Duration::from_secs(10));
        let when = clock.when().expect("both exits seen");
        let after_ms = (when - start) as f64 / 1e6;
        assert!((290.0..2000.0).contains(&after_ms), "{after_ms} ms");
        // Seen, not reaped: the Procs still reap them.
        assert!(short.wait_ok(Duration::from_secs(5)).is_ok());
        assert!(long.wait_ok(Duration::from_secs(5)).is_ok());
    }

    const THESIS: PrecopyOptions = PrecopyOptions {
        rounds: 6,
        max_dirty_percent: 30,
    };

    #[test]
    fn pre_copy_stops_within_the_limit_at_the_maximum_or_when_not_converging() {
        assert_eq!(stop_rounds(&THESIS, false, &[]), None);
        assert_eq!(stop_rounds(&THESIS, false, &[1000]), None);
        // Shrinking, still above 30 %.
        assert_eq!(stop_rounds(&THESIS, false, &[1000, 600]), None);
        assert!(stop_rounds(&THESIS, false, &[1000, 600, 300])
            .is_some_and(|r| r.contains("within the limit of 300")));
        // The random-memory-access process: the second round sends it all again.
        assert!(stop_rounds(&THESIS, false, &[1039, 1031])
            .is_some_and(|r| r.starts_with("not converging")));
        // Shrinking by less than a tenth is not converging either.
        assert!(stop_rounds(&THESIS, false, &[1000, 800, 750])
            .is_some_and(|r| r.starts_with("not converging")));
        let six = [1000, 800, 640, 510, 400, 320];
        assert!(stop_rounds(&THESIS, false, &six).is_some_and(|r| r.contains("maximum")));
        assert_eq!(stop_rounds(&THESIS, false, &six[..5]), None);
    }

    #[test]
    fn queued_pre_copy_judges_from_the_third_round() {
        // Round 1 holds everything; round 2 came too soon after it to tell.
        assert_eq!(stop_rounds(&THESIS, true, &[1000]), None);
        assert_eq!(stop_rounds(&THESIS, true, &[1000, 20]), None);
        assert!(stop_rounds(&THESIS, true, &[1000, 20, 250])
            .is_some_and(|r| r.contains("within the limit")));
        // Growing from round 2 to 3 is the long transfer seen, not divergence.
        assert_eq!(stop_rounds(&THESIS, true, &[1000, 20, 600]), None);
        assert!(stop_rounds(&THESIS, true, &[1000, 20, 600, 590])
            .is_some_and(|r| r.starts_with("not converging")));
        // Everything written again within the short round: nothing to gain.
        assert!(stop_rounds(&THESIS, true, &[1039, 1031])
            .is_some_and(|r| r.contains("short second round")));
    }
}
