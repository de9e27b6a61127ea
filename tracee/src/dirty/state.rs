//! What a tracker keeps between rounds, and its byte form for the holder.
//!
//! Layout (all little-endian): magic `u32`, version `u32`, backend `u8`, pid
//! `i32`, start time `u64`, fingerprint 5 × `u64`, round `u32`, VMA count
//! `u32`, then per VMA: start, end `u64`, perms `u8`, pgoff `u64`, dev major
//! and minor `u32`, inode `u64`, tracked `u8`, history rounds `u32`, counts
//! length `u64` + bytes, hash count `u64` + `u64`s, held range count `u64` +
//! (start, end) `u64` pairs.

use super::{BackendKind, PageRange, VmaKey, WriteHistory};
use crate::ids::{Pid, RemoteAddr};

const MAGIC: u32 = 0x636b_6474; // "ckdt"
const VERSION: u32 = 2;
/// More VMAs than any process can have (`vm.max_map_count` is 65530 by default).
const MAX_VMAS: u32 = 1 << 20;

/// Values that change when the process runs `execve` (a new mm) even if the
/// same binary is run again: the executable's identity and the layout fields
/// of `/proc/PID/stat`, which ASLR randomises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct MmFingerprint {
    pub exe_dev: u64,
    pub exe_ino: u64,
    pub start_code: u64,
    pub start_stack: u64,
    pub arg_start: u64,
}

impl MmFingerprint {
    pub(crate) fn read(pid: Pid) -> Result<(MmFingerprint, u64), crate::proc::ProcError> {
        use std::os::unix::fs::MetadataExt;
        let stat = crate::proc::stat::read(pid)?;
        let path = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
        let (exe_dev, exe_ino) = std::fs::metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| crate::proc::ProcError::Read { path, source })?;
        Ok((
            MmFingerprint {
                exe_dev,
                exe_ino,
                start_code: stat.start_code,
                start_stack: stat.start_stack,
                arg_start: stat.arg_start,
            },
            stat.start_time,
        ))
    }
}

/// One VMA as the last collect left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackedVma {
    pub key: VmaKey,
    /// The back-end tracks writes here since the last collect.
    pub tracked: bool,
    pub history: WriteHistory,
    /// Page hashes (PageHash only; 0: page absent).
    pub hashes: Vec<u64>,
    /// Pages the last round held back (queued pre-copy): sorted, disjoint, inside `key`.
    pub held: Vec<PageRange>,
}

impl TrackedVma {
    pub(crate) fn new(key: VmaKey) -> TrackedVma {
        TrackedVma {
            key,
            tracked: false,
            history: WriteHistory::new(key.pages()),
            hashes: Vec::new(),
            held: Vec::new(),
        }
    }
}

/// The tracker's state between rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrackState {
    pub backend: BackendKind,
    pub pid: Pid,
    pub start_time: u64,
    pub fingerprint: MmFingerprint,
    pub round: u32,
    pub vmas: Vec<TrackedVma>,
}

/// The bytes are not a state this code wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tracking state: {what} at byte {at}")]
pub struct DecodeError {
    /// What was wrong.
    pub what: &'static str,
    /// Offset in the bytes.
    pub at: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or(DecodeError {
            what: "truncated",
            at: self.at,
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self, elem: usize) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError { what: "length", at })?;
        // Never allocate more than the remaining bytes can fill.
        if n.saturating_mul(elem) > self.b.len().saturating_sub(self.at) {
            return Err(DecodeError {
                what: "length beyond the end",
                at,
            });
        }
        Ok(n)
    }
}

fn backend_code(b: BackendKind) -> u8 {
    match b {
        BackendKind::UffdWp => 1,
        BackendKind::SoftDirty => 2,
        BackendKind::PageHash => 3,
    }
}

impl TrackState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(64 + self.vmas.len() * 80);
        o.extend_from_slice(&MAGIC.to_le_bytes());
        o.extend_from_slice(&VERSION.to_le_bytes());
        o.push(backend_code(self.backend));
        o.extend_from_slice(&self.pid.as_raw().to_le_bytes());
        o.extend_from_slice(&self.start_time.to_le_bytes());
        let f = &self.fingerprint;
        for v in [
            f.exe_dev,
            f.exe_ino,
            f.start_code,
            f.start_stack,
            f.arg_start,
        ] {
            o.extend_from_slice(&v.to_le_bytes());
        }
        o.extend_from_slice(&self.round.to_le_bytes());
        let n = u32::try_from(self.vmas.len()).unwrap_or(u32::MAX);
        o.extend_from_slice(&n.to_le_bytes());
        for v in &self.vmas {
            let k = &v.key;
            o.extend_from_slice(&k.start.get().to_le_bytes());
            o.extend_from_slice(&k.end.get().to_le_bytes());
            o.push(k.perms);
            o.extend_from_slice(&k.pgoff.to_le_bytes());
            o.extend_from_slice(&k.dev.0.to_le_bytes());
            o.extend_from_slice(&k.dev.1.to_le_bytes());
            o.extend_from_slice(&k.inode.to_le_bytes());
            o.push(u8::from(v.tracked));
            o.extend_from_slice(&v.history.rounds.to_le_bytes());
            o.extend_from_slice(&(v.history.counts.len() as u64).to_le_bytes());
            o.extend_from_slice(&v.history.counts);
            o.extend_from_slice(&(v.hashes.len() as u64).to_le_bytes());
            for h in &v.hashes {
                o.extend_from_slice(&h.to_le_bytes());
            }
            o.extend_from_slice(&(v.held.len() as u64).to_le_bytes());
            for r in &v.held {
                o.extend_from_slice(&r.start.get().to_le_bytes());
                o.extend_from_slice(&r.end.get().to_le_bytes());
            }
        }
        o
    }

    pub(crate) fn decode(b: &[u8]) -> Result<TrackState, DecodeError> {
        let mut r = Reader { b, at: 0 };
        let bad = |what, at| DecodeError { what, at };
        if r.u32()? != MAGIC {
            return Err(bad("bad magic", 0));
        }
        if r.u32()? != VERSION {
            return Err(bad("unknown version", 4));
        }
        let backend = match r.u8()? {
            1 => BackendKind::UffdWp,
            2 => BackendKind::SoftDirty,
            3 => BackendKind::PageHash,
            _ => return Err(bad("unknown back-end", 8)),
        };
        let at = r.at;
        let pid = Pid::from_raw(i32::from_le_bytes(r.arr()?)).ok_or(bad("pid", at))?;
        let start_time = r.u64()?;
        let fingerprint = MmFingerprint {
            exe_dev: r.u64()?,
            exe_ino: r.u64()?,
            start_code: r.u64()?,
            start_stack: r.u64()?,
            arg_start: r.u64()?,
        };
        let round = r.u32()?;
        let at = r.at;
        let n = r.u32()?;
        if n > MAX_VMAS {
            return Err(bad("too many VMAs", at));
        }
        let mut vmas = Vec::new();
        for _ in 0..n {
            let at = r.at;
            let key = VmaKey {
                start: RemoteAddr(r.u64()?),
                end: RemoteAddr(r.u64()?),
                perms: r.u8()?,
                pgoff: r.u64()?,
                dev: (r.u32()?, r.u32()?),
                inode: r.u64()?,
            };
            if key.end <= key.start {
                return Err(bad("empty VMA", at));
            }
            let tracked = r.u8()? != 0;
            let rounds = r.u32()?;
            let len = r.len(1)?;
            let counts = r.take(len)?.to_vec();
            let nh = r.len(8)?;
            let mut hashes = Vec::with_capacity(nh);
            for _ in 0..nh {
                hashes.push(r.u64()?);
            }
            let nr = r.len(16)?;
            let mut held: Vec<PageRange> = Vec::with_capacity(nr);
            for _ in 0..nr {
                let at = r.at;
                let range = PageRange {
                    start: RemoteAddr(r.u64()?),
                    end: RemoteAddr(r.u64()?),
                };
                let in_order = held.last().is_none_or(|p| p.end <= range.start);
                if range.end <= range.start
                    || range.start < key.start
                    || range.end > key.end
                    || !in_order
                {
                    return Err(bad("held range", at));
                }
                held.push(range);
            }
            vmas.push(TrackedVma {
                key,
                tracked,
                history: WriteHistory { rounds, counts },
                hashes,
                held,
            });
        }
        if r.at != b.len() {
            return Err(bad("trailing bytes", r.at));
        }
        Ok(TrackState {
            backend,
            pid,
            start_time,
            fingerprint,
            round,
            vmas,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TrackState {
        let key = VmaKey {
            start: RemoteAddr(0x1000),
            end: RemoteAddr(0x4000),
            perms: 3,
            pgoff: 1,
            dev: (8, 1),
            inode: 77,
        };
        let mut v = TrackedVma::new(key);
        v.tracked = true;
        v.history.counts[1] = 4;
        v.history.rounds = 5;
        v.hashes = vec![1, 0, 99];
        v.held = vec![PageRange {
            start: RemoteAddr(0x2000),
            end: RemoteAddr(0x4000),
        }];
        TrackState {
            backend: BackendKind::PageHash,
            pid: Pid::from_raw(42).expect("pid"),
            start_time: 1234,
            fingerprint: MmFingerprint {
                exe_dev: 1,
                exe_ino: 2,
                start_code: 3,
                start_stack: 4,
                arg_start: 5,
            },
            round: 3,
            vmas: vec![v],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(TrackState::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(TrackState::decode(&b[..n]).is_err(), "prefix {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0xff;
            // Must not panic; may decode to another valid state.
            let _ = TrackState::decode(&c);
        }
        let mut huge = b.clone();
        // The counts length field of the first VMA.
        let off = 4 + 4 + 1 + 4 + 8 + 40 + 4 + 4 + 8 + 8 + 1 + 8 + 4 + 4 + 8 + 1 + 4;
        huge[off..off + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(TrackState::decode(&huge).is_err());
    }

    #[test]
    fn held_ranges_outside_the_vma_or_out_of_order_are_refused() {
        let mut s = sample();
        s.vmas[0].held = vec![PageRange {
            start: RemoteAddr(0x3000),
            end: RemoteAddr(0x5000),
        }];
        assert!(TrackState::decode(&s.encode()).is_err());
        s.vmas[0].held = vec![
            PageRange {
                start: RemoteAddr(0x3000),
                end: RemoteAddr(0x4000),
            },
            PageRange {
                start: RemoteAddr(0x1000),
                end: RemoteAddr(0x2000),
            },
        ];
        assert!(TrackState::decode(&s.encode()).is_err());
    }
}
