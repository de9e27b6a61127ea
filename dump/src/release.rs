//! Letting go of the process once its images are safely written: kill it (default), resume it
//! (`--leave-running`) or leave it in a group-stop (`--leave-stopped`), every process of the
//! tree alike ([`finish_tree`]; a lazy dump calls it once the pages are served). This is the
//! only place a dump may kill the process.

use tracee::{Errno, Pid, PtraceError, SeizedTree};

use crate::FinalState;

/// The images are written, but the process could not be put in its final state.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("dump: kill pid {pid} after the dump")]
    Kill {
        pid: Pid,
        #[source]
        errno: Errno,
    },
    #[error("dump: resume pid {pid} after the dump")]
    Resume {
        pid: Pid,
        #[source]
        source: PtraceError,
    },
    #[error("dump: leave pid {pid} stopped after the dump")]
    LeaveStopped {
        pid: Pid,
        #[source]
        source: PtraceError,
    },
}

/// Puts every process of the tree in `state` and lets go of every thread. Killing signals
/// every process before letting any go, so none runs on alone; the real parents collect
/// the deaths (a parent inside the tree dies too, and its children go to the reaper).
#[tracing::instrument(skip_all, fields(pid = %tree.root().pid(), ?state))]
pub fn finish_tree(tree: SeizedTree, state: FinalState) -> Result<(), ReleaseError> {
    let pid = tree.root().pid();
    match state {
        FinalState::Killed => tree
            .kill_all_and_release()
            .map_err(|(pid, errno)| ReleaseError::Kill { pid, errno }),
        FinalState::Running => tree
            .resume()
            .map_err(|source| ReleaseError::Resume { pid, source }),
        FinalState::Stopped => tree
            .leave_stopped()
            .map_err(|source| ReleaseError::LeaveStopped { pid, source }),
    }
}
