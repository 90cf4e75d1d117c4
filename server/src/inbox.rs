//! The [`Inbox`]: where a Rust backend applies each received event, inside the
//! same SQLite transaction as the event's dedupe record.
//!
//! Because the dedupe record and the app's effect commit together, a resend
//! (after a lost response, a timeout, a relay restart) finds the record and is
//! answered `duplicate` without running the effect again: exactly once in
//! effect, with no distributed transaction.

use edge_outbox::protocol::WireEvent;

/// A boxed error an [`Inbox`] may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What an [`Inbox`] decided about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was applied; the event is stored and answered `accepted`.
    Accept,
    /// The event is refused for good; its writes (and its dedupe record) are
    /// rolled back and it is answered `rejected` with this reason. The client
    /// dead-letters it. Use it for events that can never succeed (unknown
    /// type, a payload that breaks an invariant), not for transient failures.
    Reject(String),
}

/// Applies received events to a backend's own tables.
///
/// Contract, one obligation a line:
/// - `apply` runs inside the server's transaction, after the event's dedupe
///   record was inserted and only when it was new (duplicates never reach it);
/// - it writes only through `tx`, never through another connection, or the
///   effect and the dedupe record would no longer commit together;
/// - it must not commit, roll back or end `tx` (the server owns it; a
///   savepoint around each event lets the server undo just that event);
/// - `Ok(Applied::Accept)` keeps the event and its writes;
/// - `Ok(Applied::Reject(reason))` undoes the event's writes and its dedupe
///   record, and the rest of the batch is still processed;
/// - `Err(_)` means "cannot decide now" (a transient failure): the WHOLE batch
///   transaction is rolled back and the push is answered `500`, so the
///   client retries later with backoff; nothing of the batch is stored;
/// - it is called from a blocking thread, one batch at a time, in batch order;
///   it may block briefly but should not wait on the network.
pub trait Inbox: Send + Sync + 'static {
    /// Create the backend's tables if needed; called once when the server
    /// opens its database, after the server's own schema exists.
    fn migrate(&self, conn: &rusqlite::Connection) -> Result<(), BoxError> {
        let _ = conn;
        Ok(())
    }

    /// Apply one new event from `client_id` inside `tx`.
    fn apply(
        &self,
        tx: &rusqlite::Transaction<'_>,
        client_id: &str,
        event: &WireEvent,
    ) -> Result<Applied, BoxError>;
}

/// The default [`Inbox`]: accepts every valid event; the server's own events
/// table (readable with `GET /v1/events`) is the only effect.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOnly;

impl Inbox for StoreOnly {
    fn apply(
        &self,
        _tx: &rusqlite::Transaction<'_>,
        _client_id: &str,
        _event: &WireEvent,
    ) -> Result<Applied, BoxError> {
        Ok(Applied::Accept)
    }
}
