//! The crate's one error type.
//!
//! Every fallible call returns [`Result<T>`]. Callers branch on the predicates
//! ([`Error::is_retryable`], [`Error::is_invalid_input`], ...) or match the
//! variants; the enum is `#[non_exhaustive]` so new failure kinds can be added
//! without breaking them. No variant holds a `JsValue`: the browser layer turns
//! an `Error` into a JavaScript `Error` whose `name` is [`Error::js_name`].

use std::fmt;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed lower-level cause (SQLite, IndexedDB, HTTP client), kept for `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in edge-outbox.
///
/// Input errors (`InvalidEventType`, `InvalidPayload`, `InvalidHeader`,
/// `EventTooLarge`) are detected before anything is written: the surrounding
/// transaction rolls back and neither the app's rows nor any event are stored.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event type name is empty or longer than [`crate::MAX_EVENT_TYPE_LEN`] bytes.
    #[error(
        "invalid event type: {reason}; use a non-empty name of at most 256 bytes, such as \"OrderCreated\""
    )]
    InvalidEventType {
        /// What is wrong with the name.
        reason: String,
    },

    /// The payload cannot be represented as JSON (NaN or infinite numbers, a map
    /// whose keys are not strings, a `Serialize` impl that failed, invalid JSON text).
    #[error(
        "event payload is not representable as JSON: {reason}; store NaN/infinity as null or a string and use string map keys"
    )]
    InvalidPayload {
        /// Why serialization was refused.
        reason: String,
    },

    /// A header name or value is not acceptable (empty name).
    #[error("invalid event header: {reason}")]
    InvalidHeader {
        /// What is wrong with the header.
        reason: String,
    },

    /// The serialized event is larger than the configured limit.
    #[error(
        "event is {size} bytes, over the limit of {limit} bytes; store large blobs elsewhere and reference them, or raise Config::max_event_bytes"
    )]
    EventTooLarge {
        /// Serialized size of the event in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },

    /// The file exists but is not an SQLite database.
    #[error(
        "{path} is not an SQLite database; point Outbox::open at the app's SQLite file or at a new path"
    )]
    NotADatabase {
        /// The path that was opened.
        path: String,
    },

    /// The outbox schema in the database was written by a newer edge-outbox.
    /// The database was left untouched.
    #[error(
        "the outbox schema in this database is version {found}, newer than version {supported} understood by this edge-outbox; upgrade the library (the database was not modified)"
    )]
    SchemaTooNew {
        /// Schema version found in the database.
        found: u32,
        /// Newest schema version this build understands.
        supported: u32,
    },

    /// The database (or its directory) cannot be written.
    #[error(
        "the database at {path} is read-only; open a writable file (check permissions, mount options and the directory, which SQLite needs for its WAL files)"
    )]
    ReadOnly {
        /// The path, or `<connection>` for a caller-supplied connection.
        path: String,
    },

    /// The database was locked by another writer: it stayed locked for longer
    /// than the busy timeout, or a transaction that began by reading (SQLite's
    /// DEFERRED, the default of rusqlite's `Connection::transaction`) tried
    /// to write while another connection held the write lock, which SQLite
    /// refuses at once without waiting.
    #[error(
        "the database is locked by another writer: it stayed locked for longer than the busy timeout, or a transaction that began by reading (DEFERRED, the default of conn.transaction()) tried to write while another connection was writing, which SQLite refuses at once; open transactions that write with TransactionBehavior::Immediate (conn.transaction_with_behavior), then retry, or raise Config::busy_timeout"
    )]
    Busy,

    /// A transaction that began by reading (SQLite's DEFERRED, the default of
    /// rusqlite's `Connection::transaction`) tried to write after another
    /// connection had committed a write (`SQLITE_BUSY_SNAPSHOT`): its
    /// snapshot is stale, so SQLite refuses at once and waiting cannot help.
    /// Open the transaction with `TransactionBehavior::Immediate`, which takes
    /// the write lock at `BEGIN` (waiting up to the busy timeout), or roll it
    /// back and run the whole transaction again.
    #[error(
        "another connection wrote to the database after this transaction's first read, so this transaction cannot write (SQLITE_BUSY_SNAPSHOT; waiting cannot help); open it with TransactionBehavior::Immediate (conn.transaction_with_behavior), or roll back and retry the whole transaction"
    )]
    SnapshotConflict,

    /// The disk or the browser's storage quota is full.
    #[error(
        "storage is full (disk or browser quota); free space, prune sent events with prune_sent, or ask the user for persistent storage"
    )]
    QuotaExceeded,

    /// The outbox (or its database connection) has been closed.
    #[error("the outbox is closed")]
    Closed,

    /// The configuration is invalid.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong with it.
        reason: String,
    },

    /// The app aborted its own transaction (returned from the transaction closure
    /// via [`Error::aborted`]).
    #[error("transaction aborted by the application: {reason}")]
    Aborted {
        /// The app's reason.
        reason: String,
    },

    /// Another storage failure (an SQLite or IndexedDB error not listed above).
    #[error("storage error: {message}")]
    Storage {
        /// Human readable description.
        message: String,
        /// Underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The sync endpoint could not be reached or did not answer in time.
    #[error("network error talking to the sync endpoint: {message}")]
    Network {
        /// Human readable description.
        message: String,
        /// Underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The sync endpoint answered something the protocol does not allow.
    #[error("sync protocol error: {message}")]
    Protocol {
        /// Human readable description.
        message: String,
    },
}

impl Error {
    /// A storage error with a message and an optional cause.
    pub fn storage(message: impl Into<String>, source: Option<BoxError>) -> Self {
        Error::Storage {
            message: message.into(),
            source,
        }
    }

    /// Abort the surrounding transaction with an application reason.
    ///
    /// Return `Err(Error::aborted("..."))` from a transaction closure to roll
    /// back the app's writes and the events together.
    pub fn aborted(reason: impl Into<String>) -> Self {
        Error::Aborted {
            reason: reason.into(),
        }
    }

    /// True when trying the same operation again later may succeed (lock
    /// contention, network trouble, a transient storage failure).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Busy | Error::SnapshotConflict | Error::Network { .. } | Error::Protocol { .. }
        )
    }

    /// True when the caller passed something invalid; retrying the same input
    /// fails the same way.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidEventType { .. }
                | Error::InvalidPayload { .. }
                | Error::InvalidHeader { .. }
                | Error::EventTooLarge { .. }
                | Error::InvalidConfig { .. }
        )
    }

    /// True when the disk or the browser storage quota is full.
    pub fn is_quota(&self) -> bool {
        matches!(self, Error::QuotaExceeded)
    }

    /// True when the outbox was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }

    /// True when the database schema or version does not match this library.
    pub fn is_version_conflict(&self) -> bool {
        matches!(self, Error::SchemaTooNew { .. })
    }

    /// The `name` the JavaScript `Error` gets in the npm package.
    ///
    /// `"AbortedError"` only reaches JavaScript from Rust code built into
    /// the page (a transaction closure returning [`Error::aborted`]): the
    /// npm package's own API cannot produce it (a throwing JS callback
    /// rethrows the app's own error), so `OutboxErrorName` in
    /// js/index.d.ts does not list it.
    pub fn js_name(&self) -> &'static str {
        match self {
            Error::InvalidEventType { .. }
            | Error::InvalidPayload { .. }
            | Error::InvalidHeader { .. }
            | Error::EventTooLarge { .. } => "InvalidEventError",
            Error::QuotaExceeded => "QuotaExceededError",
            Error::Closed => "ClosedError",
            Error::SchemaTooNew { .. } => "VersionConflictError",
            Error::InvalidConfig { .. } => "InvalidConfigError",
            Error::Aborted { .. } => "AbortedError",
            Error::Network { .. } => "NetworkError",
            Error::Protocol { .. } => "ProtocolError",
            Error::NotADatabase { .. }
            | Error::ReadOnly { .. }
            | Error::Busy
            | Error::SnapshotConflict => "StorageError",
            Error::Storage { .. } => "StorageError",
        }
    }
}

// Debug shows the Display text plus the cause chain: that is what users see
// when they `unwrap()` or return the error from `main`.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// `s` in double quotes, escaped as `{:?}` escapes it for the characters a
/// name or option is likely to hold (`"`, `\`, line breaks, tabs, NUL and
/// other control characters as `\u{..}`); other characters as they are.
/// Error messages quote user strings with this instead of `{:?}`: in the
/// wasm build `{:?}` of a string links `str`'s `Debug` with its Unicode
/// tables (BENCHMARKS.md, "Package size").
pub(crate) fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if c.is_control() => {
                out.push_str("\\u{");
                let code = c as u32;
                let digits = (32 - code.leading_zeros()).div_ceil(4).max(1);
                for i in (0..digits).rev() {
                    let d = (code >> (4 * i)) & 0xf;
                    out.push(char::from_digit(d, 16).unwrap_or('0'));
                }
                out.push('}');
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod quoted_tests {
    use super::quoted;

    #[test]
    fn quotes_as_debug_does_for_names_and_control_characters() {
        for s in [
            "",
            "orders",
            "a \"quoted\" name",
            "back\\slash",
            "line\nbreak\r\ttab",
            "nul\0",
            "escape \u{1b} and delete \u{7f} and \u{9f}",
            "unicode: é, 漢字, emoji 🎉",
        ] {
            assert_eq!(quoted(s), format!("{s:?}"), "{s}");
        }
    }
}
