//! `/proc/PID/auxv`: the ELF auxiliary vector, native-endian u64 pairs
//! ending with `AT_NULL`.

use super::{proc_path, ParseError, ProcError};
use crate::ids::Pid;

/// Parses auxv bytes into `(type, value)` pairs, stopping at `AT_NULL` (not
/// included).
pub fn parse(bytes: &[u8]) -> Result<Vec<(u64, u64)>, ParseError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(ParseError::new(
            "auxv",
            0,
            "length is not a multiple of 16",
            "",
        ));
    }
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let (k, v) = pair.split_at(8);
        let k = u64::from_ne_bytes(
            k.try_into()
                .map_err(|_| ParseError::new("auxv", 0, "short key", ""))?,
        );
        let v = u64::from_ne_bytes(
            v.try_into()
                .map_err(|_| ParseError::new("auxv", 0, "short value", ""))?,
        );
        if k == 0 {
            break;
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Reads the raw bytes of `/proc/PID/auxv` (what `PR_SET_MM_MAP` takes back).
pub fn read_raw(pid: Pid) -> Result<Vec<u8>, ProcError> {
    let path = proc_path(pid, None, "auxv");
    std::fs::read(&path).map_err(|source| ProcError::Read { path, source })
}

/// Reads and parses `/proc/PID/auxv`.
pub fn read(pid: Pid) -> Result<Vec<(u64, u64)>, ProcError> {
    let path = proc_path(pid, None, "auxv");
    let bytes = read_raw(pid)?;
    parse(&bytes).map_err(|source| ProcError::Parse { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_until_null() {
        let mut b = Vec::new();
        for (k, v) in [(6u64, 4096u64), (33, 0x7fff_0000), (0, 0), (9, 9)] {
            b.extend_from_slice(&k.to_ne_bytes());
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(
            parse(&b).expect("valid"),
            vec![(6, 4096), (33, 0x7fff_0000)]
        );
        assert!(parse(&b[..20]).is_err());
    }

    #[test]
    fn reads_own_auxv() {
        let me = Pid::try_from(std::process::id()).expect("own pid");
        let v = read(me).expect("own auxv");
        assert!(v.iter().any(|&(k, v)| k == 6 && v == 4096));
    }
}
