//! One error type for the whole core. The bindings map `Infeasible` to
//! `ka_rs.InfeasibleAssignmentError` (a `ValueError` subclass), `OutOfMemory` to `MemoryError`
//! and `InvalidArgument` to `ValueError`.

use thiserror::Error;

/// Errors raised by the core on bad input. Never a panic, never an abort.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KaError {
    /// An argument has a wrong shape, value or format; `arg` names it as the user passed it.
    /// Also a buffer size that cannot exist (its byte count overflows).
    #[error("{arg}: {msg}")]
    InvalidArgument { arg: String, msg: String },
    /// The cost matrix admits no complete assignment (too many forbidden pairs).
    #[error("cost matrix is infeasible: {0}")]
    Infeasible(String),
    /// A buffer the input calls for could not be allocated. `what` names the buffer and the
    /// argument(s) its size comes from; `bytes` is the size asked for.
    #[error("{what}: out of memory: cannot allocate {} ({bytes} bytes)", human_bytes(*.bytes))]
    OutOfMemory { what: String, bytes: usize },
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

/// `bytes` with a binary unit, e.g. "3.64 TiB".
fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut x = bytes as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{x:.2} {}", UNITS[unit])
    }
}

/// Result alias used across the core.
pub type KaResult<T> = Result<T, KaError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_message_names_the_buffer_and_size() {
        let e = KaError::OutOfMemory {
            what: "boxes1/boxes2: the (1000000, 1000000) result".into(),
            bytes: 4_000_000_000_000,
        };
        assert_eq!(
            e.to_string(),
            "boxes1/boxes2: the (1000000, 1000000) result: out of memory: cannot allocate \
             3.64 TiB (4000000000000 bytes)"
        );
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert!(human_bytes(usize::MAX).ends_with("EiB"));
    }
}
