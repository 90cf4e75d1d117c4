//! Entry points for the cargo-fuzz targets under `fuzz/` (not a public API:
//! hidden, native only, and free to change with the crate's internals). Each
//! one runs the crate's own code on input that would come from the network
//! or from a stored row.

use std::cell::RefCell;
use std::time::Duration;

use crate::event::{Event, EventId};
use crate::policy::{Verdict, classify};
use crate::protocol::ResultStatus;
use crate::relay::push::{Wire, match_results};
use crate::time::Timestamp;
use crate::transport::{Response, parse_retry_after};

/// What the relay makes of one answer to a push (a mirror of the crate's
/// internal verdict).
#[derive(Debug)]
pub enum Answer {
    /// A readable 200: for each pushed event, in push order, the result that
    /// named it (`None`: the answer did not name it, the event stays pending).
    Results(Vec<Option<(ResultStatus, Option<String>)>>),
    /// Evidence against the channel: every event stays pending.
    Channel {
        /// The `Retry-After` as the transport read it.
        retry_after: Option<Duration>,
        /// The error recorded on the events.
        error: String,
        /// A smaller push may avoid it.
        narrows: bool,
    },
    /// The server refused the push's content (the relay bisects).
    Refused {
        /// The reason recorded on an event found guilty.
        reason: String,
        /// It was a 413.
        too_large: bool,
    },
}

/// Read an answer as the native transport and the relay do: the
/// `Retry-After` header's text (relative to `now`), the status and body
/// classified, and a 200's results matched to the events `pushed`.
pub fn read_answer(
    status: u16,
    retry_after: Option<&str>,
    now: Timestamp,
    body: Vec<u8>,
    pushed: &[EventId],
) -> Answer {
    let response = Response {
        status,
        retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        body,
    };
    match classify(response) {
        Verdict::Results(parsed) => {
            let part: Vec<Wire> = pushed
                .iter()
                .enumerate()
                .map(|(i, &id)| Wire {
                    seq: i as i64 + 1,
                    id,
                    size: 0,
                    attempts: 0,
                    json: Vec::new(),
                })
                .collect();
            Answer::Results(match_results(&part, parsed.results))
        }
        Verdict::Channel {
            retry_after,
            error,
            narrows,
        } => Answer::Channel {
            retry_after,
            error,
            narrows,
        },
        Verdict::Refused { reason, too_large } => Answer::Refused { reason, too_large },
    }
}

/// Number of columns the native store's event rows have (the order of
/// `row_to_event`'s `SELECT`s).
pub const NATIVE_ROW_COLUMNS: usize = 13;

/// Decode one native store row whose columns hold `values` (any SQLite
/// types, as a file edited behind the outbox's back may hold), with the
/// store's own row decoder. The row comes from a `SELECT` of bound values on
/// an in-memory connection: no table, no file.
pub fn decode_native_row(
    values: &[rusqlite::types::Value; NATIVE_ROW_COLUMNS],
) -> rusqlite::Result<Event> {
    thread_local! {
        static CONN: RefCell<Option<rusqlite::Connection>> = const { RefCell::new(None) };
    }
    CONN.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(rusqlite::Connection::open_in_memory()?);
        }
        let conn = cell.as_ref().expect("opened above");
        let mut stmt =
            conn.prepare_cached("SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13")?;
        stmt.query_row(
            rusqlite::params_from_iter(values.iter()),
            crate::native::sqlite::row_to_event,
        )
    })
}
