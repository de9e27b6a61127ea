//! Post-copy restore: lazy pages stay missing and a userfaultfd created in the
//! restored process is handed to `ckpt-lazy-pages`, which fills them on demand.
//!
//! The userfaultfd is created inside the target (injected, before its credentials
//! are set: without `UFFD_USER_MODE_ONLY` it needs CAP_SYS_PTRACE, because the
//! process's own syscalls and the kernel's rseq updates fault in kernel mode), taken
//! out with `pidfd_getfd`, set up from here (the ioctls act on the target's mm) and
//! sent to the daemon before anything can touch lazy memory. We keep a duplicate
//! until the process runs.

use std::os::fd::AsFd;
use std::path::Path;

use ckpt_lazy_pages::handoff::{HandoffError, LazyHandoff};
use tracee::pidfd::{PidFd, PidfdError};
use tracee::uffd::{Features, RegisterMode, UffdError, Userfaultfd};
use tracee::{Pid, RemoteAddr, Tracee};

use crate::memory::libc_nr as nr;
use crate::plan::{MemoryPlan, Range, MAP_ANONYMOUS, MAP_PRIVATE};
use crate::remote::{self, RemoteError};

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("pid {pid}: creating its userfaultfd")]
    Create {
        pid: Pid,
        #[source]
        source: UffdError,
    },
    #[error("pid {pid}: taking its userfaultfd")]
    Take {
        pid: Pid,
        #[source]
        source: PidfdError,
    },
    #[error("pid {pid}: setting up its userfaultfd")]
    Setup {
        pid: Pid,
        #[source]
        source: UffdError,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("pid {pid}: handing its userfaultfd to ckpt-lazy-pages (is `ckpt-lazy-pages -D DIR` running?)")]
    Handoff {
        pid: Pid,
        #[source]
        source: HandoffError,
    },
    #[error("pid {pid}: lazy pages at {addr:#x} are not in a private anonymous vma")]
    NotAnonymous { pid: Pid, addr: u64 },
}

/// The process's userfaultfd as handed over; the duplicate we keep, and the open
/// connection that still owes the daemon its end marker.
#[derive(Debug)]
pub struct LazyRestore {
    pub uffd: Userfaultfd,
    handoff: LazyHandoff,
}

impl LazyRestore {
    /// Tells the daemon that every task is restored, just before they resume.
    pub fn finish(self, pid: Pid) -> Result<Userfaultfd, LazyError> {
        self.handoff
            .finish()
            .map_err(|source| LazyError::Handoff { pid, source })?;
        Ok(self.uffd)
    }
}

/// The VMAs to register: every private anonymous VMA holding a lazy page.
pub fn lazy_vmas(pid: Pid, memory: &MemoryPlan, lazy: &[Range]) -> Result<Vec<Range>, LazyError> {
    let mut out: Vec<Range> = Vec::new();
    for l in lazy {
        let mut found = false;
        for v in memory.vmas.iter().filter(|v| v.range.overlaps(l)) {
            if v.file.is_some()
                || v.map_flags & MAP_PRIVATE == 0
                || v.map_flags & MAP_ANONYMOUS == 0
            {
                return Err(LazyError::NotAnonymous { pid, addr: l.start });
            }
            found = true;
            if !out.contains(&v.range) {
                out.push(v.range);
            }
        }
        if !found {
            return Err(LazyError::NotAnonymous { pid, addr: l.start });
        }
    }
    out.sort();
    Ok(out)
}

/// Creates the target's userfaultfd, registers `vmas` for missing faults and hands
/// it to the daemon listening in `work_dir`, as task `image_pid` of the images.
pub fn hand_over(
    t: &mut Tracee,
    image_pid: i32,
    vmas: &[Range],
    work_dir: &Path,
) -> Result<LazyRestore, LazyError> {
    let pid = t.pid();
    let target_fd = t
        .inject_userfaultfd(0)
        .map_err(|source| LazyError::Create { pid, source })?;
    let taken = PidFd::open(pid)
        .and_then(|p| p.getfd(target_fd))
        .map_err(|source| LazyError::Take { pid, source });
    // The process never had this fd: close its copy whatever happened.
    remote::call(
        t,
        "close the userfaultfd in the target",
        nr::CLOSE,
        [remote::word(i64::from(target_fd.as_raw())), 0, 0, 0, 0, 0],
    )?;
    let uffd = Userfaultfd::from_fd(taken?);
    let features = Features::EVENT_FORK
        | Features::EVENT_REMAP
        | Features::EVENT_REMOVE
        | Features::EVENT_UNMAP;
    uffd.api(features)
        .map_err(|source| LazyError::Setup { pid, source })?;
    for v in vmas {
        uffd.register(RemoteAddr(v.start), v.len(), RegisterMode::MISSING)
            .map_err(|source| LazyError::Setup { pid, source })?;
    }
    let mut handoff =
        LazyHandoff::connect(work_dir).map_err(|source| LazyError::Handoff { pid, source })?;
    handoff
        .send_uffd(image_pid, uffd.as_fd())
        .map_err(|source| LazyError::Handoff { pid, source })?;
    Ok(LazyRestore { uffd, handoff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{MappedFile, VmaPlan};

    fn vma(start: u64, end: u64, file: bool) -> VmaPlan {
        VmaPlan {
            range: Range { start, end },
            prot: 3,
            map_flags: if file {
                MAP_PRIVATE
            } else {
                MAP_PRIVATE | MAP_ANONYMOUS
            },
            file: file.then(|| MappedFile {
                file_id: 1,
                path: "/f".into(),
                ghost: None,
                open_flags: 0,
                pgoff: 0,
                size: None,
                build_id: Vec::new(),
            }),
            madv: 0,
            status: 0,
            write_then_protect: false,
        }
    }

    #[test]
    fn every_anonymous_vma_touched_by_a_lazy_range_is_registered_once() {
        let pid = Pid::from_raw(7).expect("pid");
        let memory = MemoryPlan {
            vmas: vec![
                vma(0x1000, 0x3000, false),
                vma(0x3000, 0x5000, false),
                vma(0x8000, 0x9000, false),
            ],
            ..Default::default()
        };
        // One lazy range spanning two adjacent vmas, one more inside the first.
        let got = lazy_vmas(
            pid,
            &memory,
            &[
                Range {
                    start: 0x2000,
                    end: 0x4000,
                },
                Range {
                    start: 0x1000,
                    end: 0x2000,
                },
            ],
        )
        .expect("lazy vmas");
        assert_eq!(
            got,
            vec![
                Range {
                    start: 0x1000,
                    end: 0x3000
                },
                Range {
                    start: 0x3000,
                    end: 0x5000
                }
            ]
        );
    }

    #[test]
    fn lazy_pages_outside_private_anonymous_memory_are_refused() {
        let pid = Pid::from_raw(7).expect("pid");
        let memory = MemoryPlan {
            vmas: vec![vma(0x1000, 0x3000, true)],
            ..Default::default()
        };
        assert!(matches!(
            lazy_vmas(
                pid,
                &memory,
                &[Range {
                    start: 0x1000,
                    end: 0x2000
                }]
            ),
            Err(LazyError::NotAnonymous { .. })
        ));
        assert!(matches!(
            lazy_vmas(
                pid,
                &memory,
                &[Range {
                    start: 0x6000,
                    end: 0x7000
                }]
            ),
            Err(LazyError::NotAnonymous { .. })
        ));
    }
}
