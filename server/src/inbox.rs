//! Where a Rust backend applies each received event, inside the same database
//! transaction as the event's dedupe record: one trait per storage, with the
//! same contract and the same verdicts ([`Applied`], [`Rejection`]):
//!
//! - [`Inbox`] for SQLite (synchronous, a `rusqlite::Transaction`);
//! - [`PgInbox`] for PostgreSQL (asynchronous, a `tokio_postgres::Transaction`).
//!
//! One trait per storage rather than one trait generic over the transaction:
//! SQLite is called from a blocking thread and PostgreSQL's client is async,
//! so the two `apply`s cannot share a signature without making one of them
//! awkward. Everything else (what the verdicts mean, the contract below on
//! [`Inbox`]) is shared.
//!
//! Because the dedupe record and the app's effect commit together, a resend
//! (after a lost response, a timeout, a relay restart) finds the record and is
//! answered `duplicate` without running the effect again: exactly once in
//! effect, with no distributed transaction.
//!
//! An inbox has two ways to say no, and they must not be confused: a
//! [`Rejection`] (or [`Applied::Reject`]) is about the EVENT and is final
//! (only that event is answered `rejected`, the rest of the batch commits);
//! any other error is about the SERVER and is temporary (the whole batch is
//! answered `500` and the client retries it later). An event that can never
//! be applied but is answered "try later" stops its client's queue for good.

use std::future::Future;
use std::pin::Pin;

use edge_outbox::protocol::WireEvent;
use serde::de::DeserializeOwned;

/// The future a [`PgInbox`] method returns (a boxed `async` block).
pub type InboxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// A boxed error an [`Inbox`] may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Longest reason the server derives from an error (a decode failure quotes
/// the payload's value, which may be large); longer ones are cut.
const MAX_DERIVED_REASON: usize = 512;

/// What an [`Inbox`] decided about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The effect was applied; the event is stored and answered `accepted`.
    Accept,
    /// The event is refused for good; its writes (and its dedupe record) are
    /// rolled back and it is answered `rejected` with this reason. The client
    /// dead-letters it. Use it for events that can never succeed (unknown
    /// type, a payload that breaks an invariant), not for transient failures.
    /// Returning `Err(Rejection::new(reason).into())` means the same.
    Reject(String),
}

/// The error that means "this event can never be applied": the event is
/// answered `rejected` with this reason, its writes are undone, and the rest
/// of the batch is still processed (unlike any other error from
/// [`Inbox::apply`], which fails the whole batch with `500`).
///
/// It converts into [`BoxError`], so `?` works in `apply`; the server finds
/// it by downcasting, also when another error wraps it (as a `source`).
/// [`decode_payload`] returns it for a payload that does not decode.
///
/// ```
/// use edge_outbox_server::Rejection;
/// fn check(amount: i64) -> Result<(), Rejection> {
///     if amount <= 0 {
///         return Err(Rejection::new("amount must be positive"));
///     }
///     Ok(())
/// }
/// assert_eq!(check(-1).unwrap_err().reason(), "amount must be positive");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    reason: String,
}

impl Rejection {
    /// A rejection with `reason` (sent to the client, which keeps it with the
    /// dead event: say what is wrong with the event, not with the server).
    pub fn new(reason: impl Into<String>) -> Self {
        Rejection {
            reason: reason.into(),
        }
    }

    /// Why the event is rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Rejection {}

impl From<Rejection> for Applied {
    fn from(r: Rejection) -> Self {
        Applied::Reject(r.reason)
    }
}

/// Decode `event`'s payload as a `T`; a payload that does not decode (wrong
/// type, missing field, not the shape) is a [`Rejection`] whose reason names
/// the event type and the decode failure, so that `?` in [`Inbox::apply`]
/// rejects that one event instead of failing the batch.
///
/// ```
/// use edge_outbox::protocol::WireEvent;
/// use edge_outbox_server::decode_payload;
///
/// #[derive(serde::Deserialize)]
/// struct Order { order_id: i64, amount: i64 }
///
/// let event: WireEvent = serde_json::from_str(r#"{"id": "0192f0c1-7c1e-7000-8000-000000000001",
///     "seq": 1, "type": "OrderCreated", "payload": {"order_id": 1, "amount": "250"},
///     "created_at": "2026-11-27T12:00:00.123Z"}"#).unwrap();
/// let err = decode_payload::<Order>(&event).err().unwrap();
/// assert!(err.reason().starts_with("OrderCreated payload cannot be decoded: invalid type: string \"250\""));
/// ```
pub fn decode_payload<T: DeserializeOwned>(event: &WireEvent) -> Result<T, Rejection> {
    serde_json::from_str(event.payload.get()).map_err(|e| {
        Rejection::new(cut(format!(
            "{} payload cannot be decoded: {e}",
            event.event_type
        )))
    })
}

/// What an `Err` from [`Inbox::apply`] means: `Ok(reason)` for a rejection of
/// that event alone, `Err(error)` for "try the whole batch later".
pub(crate) fn classify(error: BoxError) -> Result<String, BoxError> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
    while let Some(e) = cause {
        if let Some(r) = e.downcast_ref::<Rejection>() {
            return Ok(r.reason.clone());
        }
        cause = e.source();
    }
    // A bare `serde_json::from_str(..)?`: the payload (or another value the
    // event carries) does not decode, and never will. Only an I/O failure
    // under serde_json could pass.
    if let Some(e) = error.downcast_ref::<serde_json::Error>()
        && !e.is_io()
    {
        return Ok(cut(format!("payload cannot be decoded: {e}")));
    }
    Err(error)
}

/// `s` cut to [`MAX_DERIVED_REASON`] bytes, on a char boundary.
fn cut(mut s: String) -> String {
    if s.len() > MAX_DERIVED_REASON {
        let mut end = MAX_DERIVED_REASON - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// Applies received events to a backend's own tables, on SQLite (for
/// PostgreSQL see [`PgInbox`], same contract).
///
/// Contract, one obligation a line (for both storages):
/// - `apply` runs inside the server's transaction, after the event's dedupe
///   record was inserted and only when it was new (duplicates never reach it);
/// - it writes only through `tx`, never through another connection, or the
///   effect and the dedupe record would no longer commit together;
/// - it must not commit, roll back or end `tx` (the server owns it; a
///   savepoint around each event lets the server undo just that event);
/// - `Ok(Applied::Accept)` keeps the event and its writes;
/// - `Ok(Applied::Reject(reason))` undoes the event's writes and its dedupe
///   record, answers it `rejected`, and the rest of the batch is still processed;
/// - `Err(e)` where `e` is a [`Rejection`] (or has one in its `source` chain)
///   means the same as `Ok(Applied::Reject(reason))`;
/// - `Err(e)` where `e` is a `serde_json::Error` (a bare
///   `serde_json::from_str(..)?`) is a rejection too, with the decode error
///   as its reason, unless it is an I/O error;
/// - decode payloads with [`decode_payload`], whose error is a [`Rejection`]:
///   a payload that cannot be decoded is never "try later";
/// - any other `Err(_)` (a `rusqlite::Error`, a string, your own error) means
///   "cannot decide now", a transient failure: the WHOLE batch transaction is
///   rolled back and the push is answered `500 inbox_error`, so the client
///   retries it later with backoff; nothing of the batch is stored;
/// - a failure that will recur every time for this event (a constraint the
///   event breaks, a reference that can never exist) must be a rejection:
///   "try later" for it stops the client's queue at that event;
/// - it is called from a blocking thread, one batch at a time, in batch order;
///   it may block briefly but should not wait on the network.
///
/// ```
/// use edge_outbox::protocol::WireEvent;
/// use edge_outbox_server::{Applied, BoxError, Inbox, Rejection, decode_payload};
///
/// struct Orders;
///
/// impl Inbox for Orders {
///     fn apply(&self, tx: &rusqlite::Transaction<'_>, _client: &str, e: &WireEvent)
///         -> Result<Applied, BoxError>
///     {
///         #[derive(serde::Deserialize)]
///         struct Order { order_id: i64, amount: i64 }
///         let o: Order = decode_payload(e)?; // cannot decode: this event is rejected
///         if o.amount <= 0 {
///             return Err(Rejection::new("amount must be positive").into());
///         }
///         // A database error: the batch is answered 500 and retried later.
///         tx.execute("INSERT INTO orders (id, amount) VALUES (?1, ?2)", (o.order_id, o.amount))?;
///         Ok(Applied::Accept)
///     }
/// }
/// ```
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

/// Applies received events to a backend's own tables, on PostgreSQL: the
/// same contract as [`Inbox`] (its list of obligations applies word for
/// word), asynchronous, with a `tokio_postgres::Transaction`.
///
/// Differences that follow from PostgreSQL:
/// - `apply` may run concurrently for different batches (several pooled
///   connections, several server instances); each call has its own `tx`;
/// - the server wraps each event in a savepoint, so a failed statement of
///   yours followed by a rejection leaves the transaction usable;
/// - `migrate` runs inside the server's migration transaction, under the
///   advisory lock that serializes instances starting at the same moment:
///   `CREATE TABLE IF NOT EXISTS` is then safe.
///
/// ```
/// use edge_outbox::protocol::WireEvent;
/// use edge_outbox_server::{Applied, BoxError, InboxFuture, PgInbox, Rejection, decode_payload};
///
/// struct Orders;
///
/// impl PgInbox for Orders {
///     fn migrate<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>) -> InboxFuture<'a, ()> {
///         Box::pin(async move {
///             tx.batch_execute("CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, amount BIGINT)")
///                 .await?;
///             Ok(())
///         })
///     }
///
///     fn apply<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>, _client: &'a str, e: &'a WireEvent)
///         -> InboxFuture<'a, Applied>
///     {
///         Box::pin(async move {
///             #[derive(serde::Deserialize)]
///             struct Order { order_id: i64, amount: i64 }
///             let o: Order = decode_payload(e)?; // cannot decode: this event is rejected
///             if o.amount <= 0 {
///                 return Err(Rejection::new("amount must be positive").into());
///             }
///             // A database error: the batch is answered 500 and retried later.
///             tx.execute("INSERT INTO orders (id, amount) VALUES ($1, $2)", &[&o.order_id, &o.amount])
///                 .await?;
///             Ok(Applied::Accept)
///         })
///     }
/// }
/// ```
pub trait PgInbox: Send + Sync + 'static {
    /// Create the backend's tables if needed; called once per server start,
    /// after the server's own schema exists, under the migration lock.
    fn migrate<'a>(&'a self, tx: &'a tokio_postgres::Transaction<'a>) -> InboxFuture<'a, ()> {
        let _ = tx;
        Box::pin(async { Ok(()) })
    }

    /// Apply one new event from `client_id` inside `tx`.
    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'a>,
        client_id: &'a str,
        event: &'a WireEvent,
    ) -> InboxFuture<'a, Applied>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Rejection);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "wrapped")
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn classify_tells_rejections_from_transient_failures() {
        let reject: BoxError = Rejection::new("no").into();
        assert_eq!(classify(reject).unwrap(), "no");
        let wrapped: BoxError = Box::new(Wrapper(Rejection::new("inner")));
        assert_eq!(classify(wrapped).unwrap(), "inner");
        let json: BoxError = serde_json::from_str::<i64>("\"250\"").unwrap_err().into();
        assert!(
            classify(json)
                .unwrap()
                .starts_with("payload cannot be decoded: invalid type: string")
        );
        let later: BoxError = "the payment service is down".into();
        assert!(classify(later).is_err());
        let sqlite: BoxError = rusqlite::Error::QueryReturnedNoRows.into();
        assert!(classify(sqlite).is_err());
    }

    #[test]
    fn derived_reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_DERIVED_REASON);
        let r = cut(long);
        assert!(r.len() <= MAX_DERIVED_REASON && r.ends_with("..."));
        assert_eq!(cut("short".into()), "short");
    }
}
