//! One error type for the whole core. The bindings map `Infeasible` to
//! `ka_rs.InfeasibleAssignmentError` (a `ValueError` subclass) and everything else to `ValueError`.

use thiserror::Error;

/// Errors raised by the core on bad input. Never a panic.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KaError {
    /// An argument has a wrong shape, value or format; `arg` names it as the user passed it.
    #[error("{arg}: {msg}")]
    InvalidArgument { arg: String, msg: String },
    /// The cost matrix admits no complete assignment (too many forbidden pairs).
    #[error("cost matrix is infeasible: {0}")]
    Infeasible(String),
}

impl KaError {
    /// Shorthand for [`KaError::InvalidArgument`].
    pub fn invalid(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        KaError::InvalidArgument {
            arg: arg.into(),
            msg: msg.into(),
        }
    }
}

/// Result alias used across the core.
pub type KaResult<T> = Result<T, KaError>;
