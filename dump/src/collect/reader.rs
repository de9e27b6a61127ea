//! The thread that reads for [`super::tree`] what needs no ptrace (the address space above
//! all), in tree order, while the tracer checks the files and injects: on two CPUs the two
//! halves overlap.
//!
//! It is made before the freeze ([`TreeReader::start`]), while the tree still runs. Made
//! inside the freeze, its start was frozen time: `clone3` took 0.1-0.3 ms on this kind of
//! machine (a new task placed on the other CPU and woken there), and its first reads then
//! ran on a fresh allocator arena, faulting its pages in one by one.

use std::sync::mpsc;

use images_format::pb::TaskRlimitsEntry;
use tracee::{Pid, Tid};

use super::{kobj, memory, read_i32_file, rlimits, CollectError, MemoryState, VmaSource};

/// What is read of a process without ptrace, by the reader thread, while the tracer
/// injects: nothing the injections do shows in it.
pub(super) struct ProcReads {
    pub(super) memory: MemoryState,
    pub(super) rlimits: TaskRlimitsEntry,
    pub(super) oom_score_adj: Option<i32>,
    /// ckpt-dump's namespaces (the same for every process) and the process's.
    pub(super) own_ns: kobj::NsKeys,
    pub(super) ns: kobj::NsKeys,
}

impl ProcReads {
    pub(super) fn read(
        pid: Pid,
        vmas: VmaSource,
        own_ns: kobj::NsKeys,
    ) -> Result<ProcReads, CollectError> {
        Ok(ProcReads {
            ns: kobj::ns_keys(&pid.to_string()),
            memory: memory::collect(pid, vmas)?,
            rlimits: rlimits(pid)?,
            oom_score_adj: read_i32_file(pid, "oom_score_adj"),
            own_ns,
        })
    }
}

/// Heap the reader touches before it waits: the allocations of a small process's reads
/// (the VMA list, the page scan's buffers) then find their pages present.
const READER_HEAP: usize = 256 << 10;

/// The reader thread, waiting for the processes to read.
pub struct TreeReader {
    order: mpsc::Sender<Vec<(Pid, VmaSource)>>,
    reads: mpsc::Receiver<Result<ProcReads, CollectError>>,
    /// The thread, to move off the tracer's CPU before it is woken.
    tid: Option<Tid>,
    /// The CPUs online when it was made.
    online: Vec<usize>,
}

impl TreeReader {
    /// Makes the thread; it learns ckpt-dump's own namespaces and warms its heap at once,
    /// then waits for [`TreeReader::read`].
    pub fn start() -> Result<TreeReader, CollectError> {
        let (order, orders) = mpsc::channel::<Vec<(Pid, VmaSource)>>();
        let (sender, reads) = mpsc::channel();
        let (told, tid) = mpsc::channel();
        std::thread::Builder::new()
            .name("tree-reader".to_owned())
            .spawn(move || {
                let _ = told.send(tracee::taskinfo::this_thread());
                let own_ns = kobj::ns_keys("self");
                tracee::heap::warm(READER_HEAP);
                let Ok(order) = orders.recv() else {
                    return;
                };
                for (pid, vmas) in order {
                    // A closed channel means the tracer gave up: stop reading.
                    if sender.send(ProcReads::read(pid, vmas, own_ns)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| CollectError::ReaderThread { source })?;
        Ok(TreeReader {
            order,
            reads,
            tid: tid.recv().ok().flatten(),
            online: tracee::cpu::cpu_list(tracee::cpu::CPUS_ONLINE).unwrap_or_default(),
        })
    }

    /// Has the thread read these processes, in this order, one answer each. It may run
    /// on any CPU but the caller's: woken there, it would take turns with the tracer (the
    /// scheduler likes to wake a thread next to its waker), and on two CPUs the other one
    /// is the frozen tree's, idle.
    pub(super) fn read(&self, order: Vec<(Pid, VmaSource)>) {
        let elsewhere = tracee::cpu::cpus_but(&self.online, rustix::thread::sched_getcpu());
        if let (Some(tid), false) = (self.tid, elsewhere.is_empty()) {
            // Asleep, it moves at no cost; where it cannot, it only overlaps less.
            if let Err(error) = tracee::taskinfo::set_affinity(tid, &elsewhere) {
                tracing::debug!(%error, "the reader may run on the tracer's CPU");
            }
        }
        // A thread that is gone already shows at the first `next`.
        let _ = self.order.send(order);
    }

    /// What was read of the next process, `pid`.
    pub(super) fn next(&self, pid: Pid) -> Result<ProcReads, CollectError> {
        self.reads
            .recv()
            .map_err(|_| CollectError::ReaderGone { pid })?
    }
}
