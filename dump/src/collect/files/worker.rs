//! The fds of a tree are described on a thread of their own, one process ahead of the
//! tracer: what it costs (`kcmp` among thousands of fds, socket options, pipe contents,
//! queues) needs no ptrace, so it runs on the other CPU while the tracer injects into the
//! next process.
//!
//! The table is handed back and forth, never shared: the worker describes the fds of the
//! next process only once [`collect`](super::collect) is done with the one before (and then
//! reads ahead what its exe, cwd, root and mappings need), and `collect` waits for the
//! worker before it adds their file objects. Every id is thus given in the same order as
//! by a single thread, and the images do not depend on timing.
//!
//! The worker guesses the next process (the tree order the precheck saw) and that it has fds
//! of its own. A process that turns out to share its fd table with an earlier one
//! (`CLONE_FILES`) was described for nothing, but harmlessly: each of its fds is an open
//! file description met before, so nothing new entered the table, and `collect` drops what
//! the worker returned.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;

use tracee::Pid;

use super::ahead::PathsAhead;
use super::{describe_fds, FilesState, Table};
use crate::collect::CollectError;

/// The fds of `pid` to describe with `table`.
struct Job {
    table: Box<Table>,
    pid: Pid,
}

/// The table back, with what the fds of `pid` added to it.
struct Done {
    table: Box<Table>,
    pid: Pid,
    described: Result<FilesState, CollectError>,
}

/// The thread describing fds, and what it has been given.
struct Worker {
    /// Closed to make the thread end.
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Whether the worker holds the table now.
    busy: bool,
}

impl Worker {
    fn start(shell_job: bool) -> Worker {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            for Job { mut table, pid } in inbox {
                let span = tracing::info_span!("files", pid = %pid).entered();
                let described = describe_fds(&mut table, pid, shell_job);
                table.paths_ahead.insert(pid, PathsAhead::read(pid));
                drop(span);
                if outbox
                    .send(Done {
                        table,
                        pid,
                        described,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Worker {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            busy: false,
        }
    }

    /// Waits for the job under way, if any.
    fn wait(&mut self) -> Option<Done> {
        if !self.busy {
            return None;
        }
        self.busy = false;
        match self.done.recv() {
            Ok(done) => Some(done),
            // The thread only ends holding the table by panicking: a bug of ours, which
            // goes on in the caller as it would have without the thread.
            Err(_) => match self.thread.take().map(|t| t.join()) {
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                _ => panic!("the fd describing thread ended holding the file table"),
            },
        }
    }
}

impl Drop for Worker {
    /// Lets the job under way finish before the tree may run again: the worker may be
    /// peeking at a socket queue through the program's own open file description.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the fd describing thread panicked");
            }
        }
    }
}

/// The files of a dump (see [`Table`]), with the worker that describes fds ahead of
/// [`collect`](super::collect).
#[derive(Default)]
pub struct FileTable {
    /// `None` while the worker holds it.
    table: Option<Box<Table>>,
    worker: Option<Worker>,
    /// What the worker described, by process, until `collect` takes it.
    described: HashMap<Pid, Result<FilesState, CollectError>>,
    /// The processes `collect` asked for: never given to the worker afterwards.
    asked: HashSet<Pid>,
    /// The processes whose fds the worker describes, in turn.
    order: Vec<Pid>,
    next: usize,
}

impl FileTable {
    /// The table, once the worker gave it back.
    pub(super) fn get(&mut self) -> &mut Table {
        if let Some(Done {
            table,
            pid,
            described,
        }) = self.worker.as_mut().and_then(Worker::wait)
        {
            self.described.insert(pid, described);
            self.table = Some(table);
        }
        self.table.get_or_insert_with(Box::default)
    }

    /// From now on, the fds of `order`'s processes are described ahead by a worker thread,
    /// starting with the first.
    pub(super) fn start_worker(&mut self, order: Vec<Pid>, shell_job: bool) {
        self.get();
        self.worker = Some(Worker::start(shell_job));
        self.order = order;
        self.next = 0;
        self.hand_over();
    }

    /// What the worker found of the fds of `pid`, if it described them. Waits for it.
    pub(super) fn take_described(&mut self, pid: Pid) -> Option<Result<FilesState, CollectError>> {
        self.get();
        self.asked.insert(pid);
        self.described.remove(&pid)
    }

    /// Gives the table to the worker for the next process not described yet, if any.
    pub(super) fn hand_over(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let Some(table) = self.table.take() else {
            return;
        };
        while let Some(&pid) = self.order.get(self.next) {
            self.next += 1;
            if self.described.contains_key(&pid) || self.asked.contains(&pid) {
                continue;
            }
            let Some(jobs) = worker.jobs.as_ref() else {
                break;
            };
            match jobs.send(Job { table, pid }) {
                Ok(()) => worker.busy = true,
                // The thread is gone: go on without it.
                Err(mpsc::SendError(job)) => {
                    self.table = Some(job.table);
                    self.worker = None;
                }
            }
            return;
        }
        self.table = Some(table);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::process::{Child, Command, Stdio};

    use super::super::{collect, precheck_all};
    use super::*;
    use crate::collect::memory::MemoryState;

    /// A child with /dev/null on fds 0-2 (three opens of it) and whatever the test runner
    /// lets it inherit, killed and reaped on drop.
    struct Sleeper(Child);

    impl Sleeper {
        fn start() -> Sleeper {
            let child = Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sleep");
            // Spawning returns once the exec has taken over the memory, before it closes
            // the close-on-exec fds inherited from this test process (other tests' files):
            // wait until `sleep` sleeps, with only its own fds.
            let stat = format!("/proc/{}/stat", child.id());
            let start = std::time::Instant::now();
            while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains("(sleep) S")) {
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(10),
                    "sleep never slept"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Sleeper(child)
        }

        fn pid(&self) -> Pid {
            Pid::try_from(self.0.id()).expect("child pid")
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn described(files: &mut FileTable, pid: Pid, with_fds: bool) -> FilesState {
        let mut memory = MemoryState::default();
        collect(files, pid, 0o22, &mut memory, false, with_fds).expect("files collected")
    }

    #[test]
    fn processes_asked_out_of_order_or_sharing_get_consistent_ids() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: pidfd_getfd of another process needs root");
            return;
        }
        let (a, b, c) = (Sleeper::start(), Sleeper::start(), Sleeper::start());
        let mut files = FileTable::default();
        precheck_all(&mut files, &[a.pid(), b.pid(), c.pid()], false).expect("precheck");
        // The worker took `a` first: `b` out of turn is described on the spot, `c` as if it
        // shared an earlier fd table.
        let b_state = described(&mut files, b.pid(), true);
        let a_state = described(&mut files, a.pid(), true);
        let c_state = described(&mut files, c.pid(), false);
        // Beside /dev/null, the children hold whatever fds the test runner let them inherit:
        // other tests of this binary open and close fds meanwhile, so the two sets may differ.
        assert!(a_state.fdinfo.len() >= 3);
        assert!(b_state.fdinfo.len() >= 3);
        assert!(c_state.fdinfo.is_empty(), "{:?}", c_state.fdinfo);
        let ids: Vec<u32> = [&a_state, &b_state, &c_state]
            .iter()
            .flat_map(|s| s.files.iter().map(|f| f.id))
            .collect();
        let unique: HashSet<u32> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "file ids given twice: {ids:?}");
        for fd in a_state.fdinfo.iter().chain(&b_state.fdinfo) {
            assert!(unique.contains(&fd.id), "fd {} names no file object", fd.fd);
        }
        // Each child opened /dev/null on its own; what both inherited from us is shared.
        for in_a in &a_state.fdinfo {
            let Some(in_b) = b_state.fdinfo.iter().find(|f| f.fd == in_a.fd) else {
                assert!(in_a.fd > 2, "b lacks fd {}", in_a.fd);
                continue;
            };
            assert_eq!(in_a.fd > 2, in_a.id == in_b.id, "fd {}", in_a.fd);
        }
    }
}
