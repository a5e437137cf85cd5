//! A snapshot's life as a pure transition function: which requests make
//! sense in which phase, and the error that names a refused one.
//!
//! The kernel holds the phase; this module only decides. It must never
//! hold state of its own.

use core::fmt;

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No snapshot.
    Idle,
    /// Started: protection on, copier running.
    Active,
    /// Every page copied; the copy can be read and restored from.
    Complete,
    /// The storage failed (a disk I/O error, staging exhausted where no
    /// one could wait): the copy is unusable. Protection stays until the
    /// snapshot is aborted, and writes still get through meanwhile.
    Failed,
}

/// A lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Take a snapshot now.
    Start,
    /// Every page is copied.
    Finish,
    /// Stop and forget the snapshot, restoring permissions.
    Abort,
    /// Forget a completed snapshot.
    Release,
    /// The storage failed.
    Fail,
}

/// A refused lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleError {
    /// The phase it was asked in.
    pub phase: Phase,
    /// What was asked.
    pub request: Request,
}

impl fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.phase, self.request) {
            (Phase::Active | Phase::Complete | Phase::Failed, Request::Start) => {
                write!(
                    f,
                    "a snapshot is already {:?}; abort or release it first",
                    self.phase
                )
            }
            (phase, request) => write!(f, "cannot {request:?} a snapshot that is {phase:?}"),
        }
    }
}

/// The lifecycle's transition function.
pub fn transition(phase: Phase, request: Request) -> Result<Phase, LifecycleError> {
    match (phase, request) {
        (Phase::Idle, Request::Start) => Ok(Phase::Active),
        (Phase::Active, Request::Finish) => Ok(Phase::Complete),
        (Phase::Active, Request::Fail) => Ok(Phase::Failed),
        (Phase::Active | Phase::Complete | Phase::Failed, Request::Abort) => Ok(Phase::Idle),
        (Phase::Complete, Request::Release) => Ok(Phase::Idle),
        (phase, request) => Err(LifecycleError { phase, request }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_refuses_what_makes_no_sense() {
        use Phase::*;
        use Request::*;
        assert_eq!(transition(Idle, Start), Ok(Active));
        assert_eq!(transition(Active, Start).unwrap_err().phase, Active);
        assert_eq!(transition(Complete, Start).unwrap_err().request, Start);
        assert_eq!(transition(Active, Finish), Ok(Complete));
        assert_eq!(transition(Active, Abort), Ok(Idle));
        assert_eq!(transition(Complete, Abort), Ok(Idle));
        assert_eq!(transition(Complete, Release), Ok(Idle));
        assert!(transition(Idle, Abort).is_err());
        assert!(transition(Active, Release).is_err());
        assert!(transition(Idle, Finish).is_err());
        assert_eq!(transition(Active, Fail), Ok(Failed));
        assert_eq!(transition(Failed, Start).unwrap_err().phase, Failed);
        assert!(
            transition(Failed, Release).is_err(),
            "a failed copy is not a snapshot"
        );
        assert!(transition(Failed, Finish).is_err());
        assert_eq!(transition(Failed, Abort), Ok(Idle));
        assert!(transition(Complete, Fail).is_err());
    }
}
