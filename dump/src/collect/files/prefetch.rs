//! fdinfo read ahead: reading the fdinfo of every fd is half of what describing the fds of a
//! tree costs, and needs nothing but the fd numbers, so a thread of its own reads it for the
//! processes in tree order while the worker describes the ones before.
//!
//! Whoever comes to a process first does it: the worker takes what was read ahead, waits if
//! the reader is on that very process, and otherwise reads the fdinfo itself (the reader
//! then skips the process). Nothing read ahead is needed for the images to be right; a
//! failed read is left for the worker to make again and report.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tracee::proc::fd::{FdDir, FdInfo};
use tracee::{Pid, TargetFd};

/// The fdinfo of some fds of one process, by fd.
pub(super) type Infos = HashMap<TargetFd, FdInfo>;

#[derive(Default)]
struct State {
    /// The processes to read, in order, with the fds whose fdinfo is wanted.
    order: Vec<(Pid, Vec<TargetFd>)>,
    /// The next entry of `order` the reader takes.
    next: usize,
    /// The process the reader is on.
    reading: Option<Pid>,
    /// Processes the worker did itself: the reader skips them.
    skip: HashSet<Pid>,
    done: HashMap<Pid, Infos>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when the reader finishes a process.
    finished: Condvar,
}

impl Shared {
    /// The state; a panic of the other side while it held the lock (a bug of ours) leaves
    /// nothing half done that matters here: everything in it is a hint.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The reading thread, stopped and joined on drop.
pub(super) struct Prefetch {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Starts reading the fdinfo of `order`'s fds.
    pub(super) fn start(order: Vec<(Pid, Vec<TargetFd>)>) -> Prefetch {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                order,
                ..State::default()
            }),
            finished: Condvar::new(),
        });
        let reader = Arc::clone(&shared);
        let thread = std::thread::spawn(move || read_ahead(&reader));
        Prefetch {
            shared,
            thread: Some(thread),
        }
    }

    /// What was read ahead for `pid` (waiting if the reader is on it now), or `None`: then
    /// the caller reads it, and the reader will not.
    pub(super) fn take(&self, pid: Pid) -> Option<Infos> {
        let mut state = self.shared.lock();
        loop {
            if let Some(infos) = state.done.remove(&pid) {
                return Some(infos);
            }
            if state.reading != Some(pid) {
                state.skip.insert(pid);
                return None;
            }
            state = self
                .shared
                .finished
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the fdinfo reading thread panicked");
            }
        }
    }
}

fn read_ahead(shared: &Shared) {
    loop {
        let (pid, fds) = {
            let mut state = shared.lock();
            let Some(next) = next_process(&mut state) else {
                return;
            };
            state.reading = Some(next.0);
            next
        };
        let _reading = Reading(shared);
        let infos = read_infos(pid, &fds);
        shared.lock().done.insert(pid, infos);
    }
}

/// Marks the end of the reader's turn on a process, however it ends (a panic too): a worker
/// waiting for that process must not wait forever.
struct Reading<'a>(&'a Shared);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.lock().reading = None;
        self.0.finished.notify_all();
    }
}

/// The next process to read, if any is left and the reader is not stopped.
fn next_process(state: &mut State) -> Option<(Pid, Vec<TargetFd>)> {
    while !state.stop {
        let entry = state.order.get_mut(state.next)?;
        state.next += 1;
        if !state.skip.contains(&entry.0) {
            return Some((entry.0, std::mem::take(&mut entry.1)));
        }
    }
    None
}

/// The fdinfo of `fds` of `pid` that could be read.
fn read_infos(pid: Pid, fds: &[TargetFd]) -> Infos {
    let Ok(dir) = FdDir::open(pid) else {
        return Infos::new();
    };
    fds.iter()
        .filter_map(|&fd| dir.read_fdinfo(fd).ok().map(|info| (fd, info)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(raw: u32) -> Pid {
        Pid::try_from(raw).expect("pid")
    }

    #[test]
    fn the_reader_skips_what_the_worker_did_itself() {
        let mut state = State {
            order: vec![(pid(7), vec![TargetFd(3)]), (pid(8), vec![TargetFd(4)])],
            ..State::default()
        };
        state.skip.insert(pid(7));
        assert_eq!(next_process(&mut state), Some((pid(8), vec![TargetFd(4)])));
        assert_eq!(next_process(&mut state), None);
        state.stop = true;
        state.next = 0;
        assert_eq!(
            next_process(&mut state),
            None,
            "a stopped reader takes nothing"
        );
    }

    #[test]
    fn what_was_not_read_ahead_is_left_to_the_caller() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let prefetch = Prefetch::start(Vec::new());
        assert!(prefetch.take(me).is_none());
        let file = tempfile::tempfile().expect("tempfile");
        let fd = TargetFd(std::os::fd::AsRawFd::as_raw_fd(&file));
        let infos = read_infos(me, &[fd, TargetFd(1 << 30)]);
        assert_eq!(infos.len(), 1, "an fd that cannot be read is left out");
        assert_eq!(infos.get(&fd).map(|i| i.pos), Some(0));
    }
}
