//! How `chatproof-sim` ends: one exit status per way a run can go wrong, so CI
//! and scripts can tell a broken promise from a hang, a panic or a bad flag.

use std::fmt;

/// The exit status of `chatproof-sim`. When several seeds fail differently,
/// `run` exits with the greatest (`Crash` over `Liveness` over `Correctness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// Every seed passed (and, for `mutants`, every mutant was caught).
    Pass = 0,
    /// The checker found a delivery-contract violation.
    Correctness = 1,
    /// No convergence by the liveness deadline after healing.
    Liveness = 2,
    /// The simulated system panicked.
    Crash = 3,
    /// A bad flag, preset or seed range.
    Usage = 4,
    /// `mutants`: a built-in bug escaped every seed.
    MutantEscaped = 5,
    /// `determinism`: one seed ran two different ways.
    Nondeterminism = 6,
}

impl Exit {
    /// Every status, by code.
    #[cfg(test)]
    pub const ALL: [Exit; 7] = [
        Exit::Pass,
        Exit::Correctness,
        Exit::Liveness,
        Exit::Crash,
        Exit::Usage,
        Exit::MutantEscaped,
        Exit::Nondeterminism,
    ];

    /// The process exit code.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The status a child process of ours exited with (`swarm`); a code we never use
    /// (a signal, an abort) counts as a crash.
    pub fn from_code(code: Option<i32>) -> Exit {
        match code {
            Some(0) => Exit::Pass,
            Some(1) => Exit::Correctness,
            Some(2) => Exit::Liveness,
            Some(4) => Exit::Usage,
            Some(5) => Exit::MutantEscaped,
            Some(6) => Exit::Nondeterminism,
            _ => Exit::Crash,
        }
    }

    /// A few words on what the status means (for help and reports).
    pub const fn meaning(self) -> &'static str {
        match self {
            Exit::Pass => "all seeds passed",
            Exit::Correctness => "a delivery-contract violation",
            Exit::Liveness => "no convergence by the liveness deadline",
            Exit::Crash => "a panic",
            Exit::Usage => "a usage error",
            Exit::MutantEscaped => "a mutant escaped",
            Exit::Nondeterminism => "a seed was not deterministic",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {} ({})", self.code(), self.meaning())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes are distinct and in order, so "the worst" is the greatest.
    #[test]
    fn codes_in_order() {
        for (i, exit) in Exit::ALL.into_iter().enumerate() {
            assert_eq!(exit.code(), i as i32);
        }
        assert!(Exit::Crash > Exit::Liveness && Exit::Liveness > Exit::Correctness);
    }
}
