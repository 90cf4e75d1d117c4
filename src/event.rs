//! Events: what the app enqueues ([`NewEvent`]) and what the outbox stores and
//! delivers ([`Event`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result, quoted};
use crate::json::to_json_strict;
use crate::time::Timestamp;

/// Longest accepted event type name, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 256;

/// Default limit on one event's size (type + key + payload + headers), in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;

/// An event's identity: a UUIDv7, made when the event is enqueued, and the
/// idempotency key the server dedupes on (together with the client id).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A new time-ordered id (UUIDv7, RFC 9562): the current Unix time in
    /// milliseconds, then 74 random bits. Ids of one millisecond are in no
    /// particular order (`seq` orders events, not ids). Built from a v4's
    /// random bits rather than with `Uuid::now_v7`, whose sub-millisecond
    /// counter costs the browser package about a kilobyte (u128 division).
    pub fn new() -> Self {
        // A v4's last ten bytes: the version nibble and variant bits they
        // hold are the ones the builder overwrites with v7's.
        let random = Uuid::new_v4().into_bytes();
        let mut bits = [0u8; 10];
        bits.copy_from_slice(&random[6..]);
        let millis = u64::try_from(crate::time::Timestamp::now().as_millis()).unwrap_or(0);
        EventId(uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid())
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for EventId {
    fn from(u: Uuid) -> Self {
        EventId(u)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl FromStr for EventId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| Error::InvalidConfig {
                reason: format!("{} is not an event id (a UUID): {e}", quoted(s)),
            })
    }
}

/// An event the app wants to publish, built before it is enqueued.
///
/// ```
/// # use edge_outbox::NewEvent;
/// #[derive(serde::Serialize)]
/// struct OrderCreated { order_id: u64, amount: u32 }
///
/// let event = NewEvent::json("OrderCreated", &OrderCreated { order_id: 123, amount: 250 })?
///     .key("order-123")
///     .header("schema", "1");
/// assert_eq!(event.payload_json(), r#"{"order_id":123,"amount":250}"#);
/// # Ok::<(), edge_outbox::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub(crate) event_type: String,
    pub(crate) payload: String,
    pub(crate) key: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
}

impl NewEvent {
    /// An event of type `event_type` whose payload is `payload` serialized as JSON.
    ///
    /// Fails with [`Error::InvalidEventType`] for an empty or over-long type
    /// name, and with [`Error::InvalidPayload`] when the payload has no faithful
    /// JSON form: NaN or infinite numbers, map keys that are not strings, or a
    /// `Serialize` impl that returns an error.
    pub fn json<T: Serialize + ?Sized>(event_type: impl Into<String>, payload: &T) -> Result<Self> {
        let event_type = validate_type(event_type.into())?;
        let payload = to_json_strict(payload).map_err(|reason| Error::InvalidPayload { reason })?;
        Ok(NewEvent {
            event_type,
            payload,
            key: None,
            headers: BTreeMap::new(),
        })
    }

    /// An event whose payload is already JSON text; the text is checked to be
    /// one valid JSON value and stored as given.
    pub fn from_json_text(
        event_type: impl Into<String>,
        payload: impl Into<String>,
    ) -> Result<Self> {
        let event_type = validate_type(event_type.into())?;
        let payload = payload.into();
        check_json_text(&payload).map_err(|e| Error::InvalidPayload {
            reason: format!("not valid JSON text: {e}"),
        })?;
        Ok(NewEvent {
            event_type,
            payload,
            key: None,
            headers: BTreeMap::new(),
        })
    }

    /// Set the ordering/aggregate key (for example `"order-123"`).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Add a string header (trace context, schema version, ...). Header names
    /// must be non-empty; that is checked when the event is enqueued.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The event type name.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    /// The ordering key, if any.
    pub fn get_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// Bytes this event counts against the size limit: type, key, payload and
    /// headers (names and values).
    pub fn size(&self) -> usize {
        event_size(
            &self.event_type,
            self.key.as_deref(),
            &self.payload,
            &self.headers,
        )
    }

    /// The stored form of this event once a store gave it `seq` and `id` at
    /// `now`: pending, no attempt yet, due at once. The one place every store
    /// builds a fresh [`Event`].
    pub fn into_pending(self, seq: i64, id: EventId, now: Timestamp) -> Event {
        Event {
            seq,
            id,
            event_type: self.event_type,
            key: self.key,
            payload: self.payload,
            headers: self.headers,
            created_at: now,
            status: EventStatus::Pending,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
            sent_at: None,
            retried_at: None,
        }
    }

    /// Check everything a store checks before writing: header names and the
    /// size limit. Called by every store on enqueue, so the rule lives here once.
    pub fn validate(&self, max_event_bytes: usize) -> Result<()> {
        if self.headers.keys().any(String::is_empty) {
            return Err(Error::InvalidHeader {
                reason: "a header name is empty".into(),
            });
        }
        let size = self.size();
        if size > max_event_bytes {
            return Err(Error::EventTooLarge {
                size,
                limit: max_event_bytes,
            });
        }
        Ok(())
    }
}

/// The one definition of an event's size, shared by [`NewEvent`] and [`Event`].
pub(crate) fn event_size(
    event_type: &str,
    key: Option<&str>,
    payload: &str,
    headers: &BTreeMap<String, String>,
) -> usize {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    event_type.len() + key.map_or(0, str::len) + payload.len() + headers
}

/// One JSON value whose strings are well-formed Unicode (the protocol's rule
/// for a payload): natively `serde_json`, in the browser the browser's
/// `JSON` (whose parser is already there, unlike `serde_json`'s).
fn check_json_text(text: &str) -> std::result::Result<(), String> {
    #[cfg(native)]
    return crate::protocol::check_json_text(text).map_err(|e| e.to_string());
    #[cfg(web)]
    return crate::web::json::check_json_text(text);
}

fn validate_type(name: String) -> Result<String> {
    if name.is_empty() {
        return Err(Error::InvalidEventType {
            reason: "the name is empty".into(),
        });
    }
    if name.len() > MAX_EVENT_TYPE_LEN {
        return Err(Error::InvalidEventType {
            reason: format!("the name is {} bytes long", name.len()),
        });
    }
    Ok(name)
}

/// Delivery state of a stored event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Not yet acknowledged by the server.
    Pending,
    /// Acknowledged (accepted or duplicate) by the server.
    Sent,
    /// Given up on (rejected by the server, expired, or too large); see `last_error`.
    Dead,
}

impl EventStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Sent => "sent",
            EventStatus::Dead => "dead",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(EventStatus::Pending),
            "sent" => Some(EventStatus::Sent),
            "dead" => Some(EventStatus::Dead),
            _ => None,
        }
    }
}

/// An event as stored in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Local commit order: strictly increasing, gaps allowed.
    pub seq: i64,
    /// The idempotency key.
    pub id: EventId,
    /// The event type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Optional ordering/aggregate key.
    pub key: Option<String>,
    /// The payload, as JSON text.
    pub payload: String,
    /// String headers.
    pub headers: BTreeMap<String, String>,
    /// When the event was enqueued.
    pub created_at: Timestamp,
    /// Delivery state.
    pub status: EventStatus,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Earliest time of the next attempt.
    pub next_attempt_at: Timestamp,
    /// Why the last attempt failed, or why the event is dead.
    pub last_error: Option<String>,
    /// When the server acknowledged it.
    pub sent_at: Option<Timestamp>,
    /// When the app last made this dead letter pending again
    /// ([`Store::retry`](crate::store::Store::retry)); the retry policy's max
    /// age counts from here instead of `created_at`, so a retried expired
    /// event is sent, not expired again. Never sent to the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_at: Option<Timestamp>,
}

impl Event {
    /// The time the retry policy's max age counts from: the app's last
    /// retry of this event, or else its commit.
    pub fn age_base(&self) -> Timestamp {
        self.retried_at.unwrap_or(self.created_at)
    }

    /// Deserialize the payload into `T`.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.payload).map_err(|e| Error::InvalidPayload {
            reason: e.to_string(),
        })
    }

    /// Bytes this event counts against batch and size limits (see [`NewEvent::size`]).
    pub fn size(&self) -> usize {
        event_size(
            &self.event_type,
            self.key.as_deref(),
            &self.payload,
            &self.headers,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_with_a_lone_surrogate_escape_is_refused() {
        // Strict consumers (serde's `String`, the reference server) cannot
        // read such text: refuse it here rather than dead-letter it there.
        for text in [r#""\ud83d""#, r#"{"a":"x\udc00y"}"#, r#"["\ud83d\u0041"]"#] {
            let e = NewEvent::from_json_text("T", text).unwrap_err();
            assert!(matches!(e, Error::InvalidPayload { .. }), "{text}: {e}");
        }
        // A surrogate pair (an emoji) is fine, in a value or a name, and so
        // is a number beyond f64 beside it (the protocol allows it; a check
        // that parsed the text into numbers refused this).
        for text in [
            r#""\ud83d\ude00""#,
            r#"{"\uD83D\uDE00":1}"#,
            r#"[1e400,"\ud83d\ude00"]"#,
            r#"["\\ud83d"]"#,
        ] {
            NewEvent::from_json_text("T", text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        // A lone surrogate in a member name, or a high one at the very end.
        for text in [r#"{"\udc00":1}"#, r#"["\ud83d"]"#, r#"["\ud83d\n"]"#] {
            assert!(NewEvent::from_json_text("T", text).is_err(), "{text}");
        }
    }

    #[test]
    fn type_name_is_checked() {
        assert!(matches!(
            NewEvent::json("", &1),
            Err(Error::InvalidEventType { .. })
        ));
        assert!(NewEvent::json("x".repeat(256), &1).is_ok());
        assert!(matches!(
            NewEvent::json("x".repeat(257), &1),
            Err(Error::InvalidEventType { .. })
        ));
    }

    #[test]
    fn size_limit_and_headers() {
        let e = NewEvent::json("T", &"a".repeat(100)).unwrap();
        assert!(e.validate(1000).is_ok());
        assert!(matches!(
            e.validate(50),
            Err(Error::EventTooLarge { limit: 50, .. })
        ));
        let e = NewEvent::json("T", &1).unwrap().header("", "v");
        assert!(matches!(e.validate(1000), Err(Error::InvalidHeader { .. })));
    }

    #[test]
    fn ids_are_time_ordered_uuid_v7s() {
        let before = Timestamp::now().as_millis() as u64;
        let a = EventId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = EventId::new();
        assert!(a < b, "a later millisecond sorts later");
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
        let uuid = a.as_uuid();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        let (secs, nanos) = uuid.get_timestamp().unwrap().to_unix();
        let millis = secs * 1000 + u64::from(nanos / 1_000_000);
        assert!(
            millis >= before && millis <= before + 1000,
            "{millis} vs {before}"
        );
        // 74 random bits: a thousand ids of one millisecond are distinct.
        let many: std::collections::HashSet<EventId> = (0..1000).map(|_| EventId::new()).collect();
        assert_eq!(many.len(), 1000);
    }
}
