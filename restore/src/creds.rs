//! Credentials, set last in every thread: groups, uids and gids, the capability
//! bounding set, securebits, capabilities and ambient capabilities.
//!
//! The kernel keeps credentials per thread (libc synchronises them with signals), so
//! each thread gets its own injected calls. While they run the thread still has our
//! full capabilities; the order keeps them until they are no longer needed:
//! `SECBIT_NO_SETUID_FIXUP` first, so that leaving uid 0 does not clear them, then
//! the ids, the bounding set and the final securebits (CAP_SETPCAP), and `capset`
//! last, which may only shrink them.

use images_format::pb;
use tracee::Tracee;

use crate::memory::{libc_nr as nr, Helper};
use crate::remote::{self, RemoteError};

const PR_CAPBSET_READ: u64 = 23;
const PR_CAPBSET_DROP: u64 = 24;
const PR_SET_SECUREBITS: u64 = 28;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
const SECBIT_NO_SETUID_FIXUP: u64 = 1 << 2;
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number we look at (CAP_CHECKPOINT_RESTORE is 40).
const CAP_LAST_MAX: u32 = 63;

#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

fn cap_word(set: &[u32], i: usize) -> u32 {
    set.get(i).copied().unwrap_or(0)
}

fn has_cap(set: &[u32], cap: u32) -> bool {
    let word = usize::try_from(cap / 32).unwrap_or(usize::MAX);
    cap_word(set, word) & (1 << (cap % 32)) != 0
}

/// A capability set of the image as the kernel's 64-bit mask.
fn cap_mask(set: &[u32]) -> u64 {
    u64::from(cap_word(set, 0)) | u64::from(cap_word(set, 1)) << 32
}

/// Whether thread `tid` of `pid` has the dumped credentials already, as when a process
/// is restored by the user it ran as: every call of [`set_creds`] would change nothing.
/// The securebits are not in `/proc`: the thread inherited ours.
fn already_set(
    pid: tracee::Pid,
    tid: tracee::Tid,
    c: &pb::CredsEntry,
    fresh: Option<&mut FreshThreads>,
) -> bool {
    let read = || tracee::proc::status::read_thread(pid, tid).ok();
    let status = match fresh {
        Some(FreshThreads(cached)) => {
            if cached.is_none() {
                *cached = read();
            }
            cached.clone()
        }
        None => read(),
    };
    let Some(now) = status else {
        return false;
    };
    let Ok(secbits) = rustix::thread::capabilities_secure_bits() else {
        return false;
    };
    let mut groups = c.groups.clone();
    groups.sort_unstable();
    groups.dedup();
    let mut now_groups = now.groups.clone();
    now_groups.sort_unstable();
    now.uid == [c.uid, c.euid, c.suid, c.fsuid]
        && now.gid == [c.gid, c.egid, c.sgid, c.fsgid]
        && now_groups == groups
        && now.cap_inh == cap_mask(&c.cap_inh)
        && now.cap_prm == cap_mask(&c.cap_prm)
        && now.cap_eff == cap_mask(&c.cap_eff)
        && now.cap_amb == cap_mask(&c.cap_amb)
        && (c.cap_bnd.is_empty() || now.cap_bnd == cap_mask(&c.cap_bnd))
        && secbits.bits() == c.secbits
}

/// The credentials of the threads a restore creates in one process: each is cloned from the
/// leader before any of them changes its own (credentials are per thread), so the first one's
/// `/proc` status tells them all.
#[derive(Debug, Default)]
pub struct FreshThreads(Option<tracee::proc::status::Status>);

/// Gives thread `t` the dumped credentials. `fresh`: `t` is one of the threads created in
/// its process, which all started with the same credentials.
pub fn set_creds(
    t: &mut Tracee,
    helper: &Helper,
    c: &pb::CredsEntry,
    fresh: Option<&mut FreshThreads>,
) -> Result<(), CredsError> {
    let pid = t.pid();
    if already_set(pid, t.tid(), c, fresh) {
        tracing::debug!(%pid, tid = %t.tid(), "credentials as dumped already");
        return Ok(());
    }
    let data = helper.data();
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    helper.put(pid, &groups, "pass the supplementary groups")?;
    remote::call(
        t,
        "setgroups",
        nr::SETGROUPS,
        [c.groups.len() as u64, data, 0, 0, 0, 0],
    )?;
    remote::call(
        t,
        "prctl(PR_SET_SECUREBITS, NO_SETUID_FIXUP)",
        nr::PRCTL,
        [PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP, 0, 0, 0, 0],
    )?;
    remote::call(
        t,
        "setresgid",
        nr::SETRESGID,
        [c.gid.into(), c.egid.into(), c.sgid.into(), 0, 0, 0],
    )?;
    remote::call(
        t,
        "setresuid",
        nr::SETRESUID,
        [c.uid.into(), c.euid.into(), c.suid.into(), 0, 0, 0],
    )?;
    // setfs[ug]id return the previous value, never an error.
    remote::call_raw(t, "setfsgid", nr::SETFSGID, [c.fsgid.into(), 0, 0, 0, 0, 0])?;
    remote::call_raw(t, "setfsuid", nr::SETFSUID, [c.fsuid.into(), 0, 0, 0, 0, 0])?;
    if !c.cap_bnd.is_empty() {
        for cap in 0..=CAP_LAST_MAX {
            if has_cap(&c.cap_bnd, cap) {
                continue;
            }
            // Past the last capability the kernel knows, PR_CAPBSET_READ fails: stop there.
            match remote::call_raw(
                t,
                "prctl(PR_CAPBSET_READ)",
                nr::PRCTL,
                [PR_CAPBSET_READ, cap.into(), 0, 0, 0, 0],
            )? {
                r if r < 0 => break,
                0 => continue,
                _ => {}
            }
            remote::call(
                t,
                format!("prctl(PR_CAPBSET_DROP, {cap})"),
                nr::PRCTL,
                [PR_CAPBSET_DROP, cap.into(), 0, 0, 0, 0],
            )?;
        }
    }
    remote::call(
        t,
        "prctl(PR_SET_SECUREBITS)",
        nr::PRCTL,
        [PR_SET_SECUREBITS, c.secbits.into(), 0, 0, 0, 0],
    )?;
    // struct __user_cap_header_struct then two __user_cap_data_struct {eff, prm, inh}.
    let mut caps = Vec::with_capacity(32);
    caps.extend_from_slice(&CAPABILITY_VERSION_3.to_ne_bytes());
    caps.extend_from_slice(&0u32.to_ne_bytes());
    for i in 0..2 {
        for set in [&c.cap_eff, &c.cap_prm, &c.cap_inh] {
            caps.extend_from_slice(&cap_word(set, i).to_ne_bytes());
        }
    }
    helper.put(pid, &caps, "pass the capability sets")?;
    remote::call(t, "capset", nr::CAPSET, [data, data + 8, 0, 0, 0, 0])?;
    remote::call(
        t,
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
        nr::PRCTL,
        [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0, 0],
    )?;
    for cap in 0..=CAP_LAST_MAX {
        if has_cap(&c.cap_amb, cap) {
            remote::call(
                t,
                format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"),
                nr::PRCTL,
                [PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap.into(), 0, 0, 0],
            )?;
        }
    }
    Ok(())
}
