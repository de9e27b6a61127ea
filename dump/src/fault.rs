//! Fault injection: `CKPT_FAULT=<point>` makes the named step of a dump fail, so tests can
//! check that a failed dump leaves the process exactly as it was and no partial images.

use std::fmt;
use std::str::FromStr;

/// The environment variable that names the step to fail.
pub const FAULT_ENV: &str = "CKPT_FAULT";

/// A step of the dump that can be made to fail on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Right after every thread is frozen.
    AfterFreeze,
    /// After the first injected syscall, with the scratch page mapped in the target.
    AfterInject,
    /// While page contents are being written, after some pages are in `pages-N.img`.
    MidPages,
    /// After every image but `inventory.img` is written.
    BeforeInventory,
}

impl FaultPoint {
    const ALL: [FaultPoint; 4] = [
        FaultPoint::AfterFreeze,
        FaultPoint::AfterInject,
        FaultPoint::MidPages,
        FaultPoint::BeforeInventory,
    ];

    /// The spelling used in `CKPT_FAULT`.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterFreeze => "after-freeze",
            FaultPoint::AfterInject => "after-inject",
            FaultPoint::MidPages => "mid-pages",
            FaultPoint::BeforeInventory => "before-inventory",
        }
    }

    /// Reads `CKPT_FAULT`; unset or empty means no fault.
    pub fn from_env() -> Result<Option<FaultPoint>, UnknownFaultPoint> {
        match std::env::var(FAULT_ENV) {
            Ok(value) if !value.is_empty() => value.parse().map(Some),
            _ => Ok(None),
        }
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `CKPT_FAULT` named a point that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown fault point {0:?} in CKPT_FAULT (known: after-freeze, after-inject, mid-pages, before-inventory)")]
pub struct UnknownFaultPoint(pub String);

impl FromStr for FaultPoint {
    type Err = UnknownFaultPoint;

    fn from_str(s: &str) -> Result<FaultPoint, UnknownFaultPoint> {
        FaultPoint::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownFaultPoint(s.to_owned()))
    }
}

/// The failure a fault point produces.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {point} ({FAULT_ENV})")]
pub struct InjectedFault {
    pub point: FaultPoint,
}

/// Fails if `armed` is this point.
pub fn check(armed: Option<FaultPoint>, point: FaultPoint) -> Result<(), InjectedFault> {
    if armed == Some(point) {
        Err(InjectedFault { point })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_parses_from_its_name() {
        for point in FaultPoint::ALL {
            assert_eq!(point.name().parse::<FaultPoint>().unwrap(), point);
        }
        assert!("mid-page".parse::<FaultPoint>().is_err());
    }

    #[test]
    fn only_the_armed_point_fails() {
        assert!(check(Some(FaultPoint::MidPages), FaultPoint::MidPages).is_err());
        assert!(check(Some(FaultPoint::MidPages), FaultPoint::AfterFreeze).is_ok());
        assert!(check(None, FaultPoint::AfterFreeze).is_ok());
    }
}
