//! Wire types of sync protocol v1, shared by the relay and the reference
//! server. `docs/protocol.md` is the contract; the JSON Schemas under
//! `docs/schema/` describe these same types and a test keeps them in step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::event::{Event, EventId};

/// The protocol version this crate speaks (the `protocol` field of a push).
pub const PROTOCOL_VERSION: u32 = 1;

/// Body of `POST {endpoint}`: a batch of events from one client, in `seq` order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PushRequest {
    /// Always [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The outbox's client id (a UUID made at first open).
    pub client_id: String,
    /// Events in increasing `seq` order.
    pub events: Vec<WireEvent>,
}

/// One event on the wire.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireEvent {
    /// UUIDv7; the server dedupes on (client_id, id).
    pub id: EventId,
    /// The client's local commit order.
    pub seq: i64,
    /// Event type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Optional ordering/aggregate key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The payload, exactly as the app serialized it.
    pub payload: Box<RawValue>,
    /// String headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// RFC 3339 UTC time of the local commit, millisecond precision.
    pub created_at: String,
}

impl WireEvent {
    /// Bytes this event counts against an event size limit, measured as the
    /// client measures it at enqueue ([`crate::NewEvent::size`]): type, key,
    /// payload (its JSON text) and header names and values.
    pub fn size(&self) -> usize {
        crate::event::event_size(
            &self.event_type,
            self.key.as_deref(),
            self.payload.get(),
            &self.headers,
        )
    }
}

impl TryFrom<&Event> for WireEvent {
    type Error = Error;

    fn try_from(e: &Event) -> Result<Self> {
        Ok(WireEvent {
            id: e.id,
            seq: e.seq,
            event_type: e.event_type.clone(),
            key: e.key.clone(),
            payload: RawValue::from_string(e.payload.clone()).map_err(|err| {
                Error::InvalidPayload {
                    reason: format!("stored payload of event {} is not JSON: {err}", e.id),
                }
            })?,
            headers: e.headers.clone(),
            created_at: e.created_at.to_rfc3339(),
        })
    }
}

/// Check that `text` is one JSON value whose strings are well-formed
/// Unicode, as the protocol requires of a payload.
///
/// Skipping a string while validating does not decode its escapes, so a
/// lone UTF-16 surrogate (`"\ud83d"`, text cut in the middle of an emoji)
/// passes a plain syntax check; strict readers (serde's `String`) then cannot
/// read the event. Escapes are decoded only in text that has a `\uD…` escape
/// at all, so ordinary payloads pay for the syntax check alone.
#[cfg(native)]
pub fn check_json_text(text: &str) -> std::result::Result<(), serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)?;
    check_well_formed_strings(text)
}

/// The second half of [`check_json_text`], for text already known to be
/// valid JSON (a server's parsed `payload`): its strings (member names
/// included) are well-formed Unicode. Costs a scan for `\uD…` escapes unless
/// it finds one.
///
/// The escapes are checked by a scan of the text rather than by parsing it
/// into a `serde_json::Value`: that parse refuses numbers beyond `f64`
/// (`1e400`) which the protocol allows and the syntax check accepts, so a
/// payload holding such a number and an emoji escape would be refused.
#[cfg(native)]
pub fn check_well_formed_strings(json: &str) -> std::result::Result<(), serde_json::Error> {
    if !(json.contains("\\ud") || json.contains("\\uD")) {
        return Ok(());
    }
    match lone_surrogate_at(json.as_bytes()) {
        None => Ok(()),
        Some(at) => Err(<serde_json::Error as serde::de::Error>::custom(format!(
            "lone surrogate escape {} at byte {at}: a string must be well-formed Unicode",
            &json[at..at + 6]
        ))),
    }
}

/// The byte offset of the first `\uXXXX` escape in valid JSON text that is a
/// UTF-16 surrogate without its other half, if any.
#[cfg(native)]
fn lone_surrogate_at(json: &[u8]) -> Option<usize> {
    // Outside strings no backslash can occur in valid JSON, so escapes need no
    // string tracking: every `\` starts an escape of two or six bytes.
    let unit = |at: usize| -> Option<u16> {
        let hex = std::str::from_utf8(json.get(at + 2..at + 6)?).ok()?;
        (json.get(at + 1) == Some(&b'u'))
            .then(|| u16::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(i) {
            Some(0xD800..=0xDBFF) => match unit(i + 6) {
                Some(0xDC00..=0xDFFF) => i += 12,
                _ => return Some(i),
            },
            Some(0xDC00..=0xDFFF) => return Some(i),
            Some(_) => i += 6,
            None => i += 2,
        }
    }
    None
}

/// Append `event` to `out` as one element of a push's `events` array: the
/// same JSON as serializing `WireEvent::try_from(event)`, written straight
/// from the stored event. Nothing is cloned and the payload goes in as
/// stored, without being parsed again: every store validated it as JSON at
/// enqueue. (Should a stored payload be corrupted behind the outbox's back,
/// the server answers 400 and the relay's bisection dead-letters that event
/// alone.) This is the relay's hot path.
pub fn write_wire_event(out: &mut Vec<u8>, event: &Event) {
    let mut id = uuid::Uuid::encode_buffer();
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(
        event
            .id
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut id)
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(event.seq.to_string().as_bytes());
    out.extend_from_slice(b",\"type\":");
    write_json_string(out, &event.event_type);
    if let Some(key) = &event.key {
        out.extend_from_slice(b",\"key\":");
        write_json_string(out, key);
    }
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(event.payload.as_bytes());
    if !event.headers.is_empty() {
        out.extend_from_slice(b",\"headers\":");
        let mut sep = b'{';
        for (name, value) in &event.headers {
            out.push(sep);
            sep = b',';
            write_json_string(out, name);
            out.push(b':');
            write_json_string(out, value);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b",\"created_at\":\"");
    out.extend_from_slice(event.created_at.to_rfc3339().as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Append `s` to `out` as a JSON string, escaped exactly as `serde_json`
/// writes it: `"` and `\\`, the short escapes `\\b \\f \\n \\r \\t`, other
/// control characters as `\\u00XX` (lowercase hex), everything else as is.
/// By hand because it is all the relay needs of a JSON writer, and in the
/// browser every byte of one ships.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0C => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1F => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(&[b'\\', short]);
        if short == b'u' {
            out.extend_from_slice(&[
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xF)],
            ]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Body of a `200` answer to a push: one result per event the server handled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// Results, normally one per event of the request.
    pub results: Vec<EventResult>,
}

impl PushResponse {
    /// Read the body of a `200` answer. The error says why it is not a
    /// push response. In the browser the text is parsed by the browser's
    /// `JSON` (see `web::json`), with the checks `serde_json` makes here.
    pub fn from_json(body: &[u8]) -> std::result::Result<Self, String> {
        #[cfg(native)]
        return serde_json::from_slice(body).map_err(|e| e.to_string());
        #[cfg(web)]
        return crate::web::json::push_response(body);
    }
}

/// What the server did with one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResult {
    /// The event's id.
    pub id: EventId,
    /// Accepted, duplicate or rejected.
    pub status: ResultStatus,
    /// Why it was rejected (present for `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Per-event status in a [`PushResponse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    /// Stored (and applied) now.
    Accepted,
    /// Stored earlier; nothing changed now.
    Duplicate,
    /// Refused for good; the client dead-letters it.
    Rejected,
}

/// Body of every non-2xx answer of the reference server.
///
/// Clients must not depend on it: a proxy may answer with anything. It is
/// there for people reading logs, and for `unsupported_protocol` answers,
/// which name the versions the server speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine readable code, e.g. `"unauthorized"`, `"payload_too_large"`.
    pub error: String,
    /// Human readable explanation.
    pub message: String,
    /// Protocol versions the server accepts; present on `unsupported_protocol` answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_protocols: Option<Vec<u32>>,
}

impl ErrorBody {
    /// Read a body as the protocol's error body; `None` when it is not one
    /// (a proxy's HTML page, an empty body).
    pub fn from_json(body: &[u8]) -> Option<Self> {
        #[cfg(native)]
        return serde_json::from_slice(body).ok();
        #[cfg(web)]
        return crate::web::json::error_body(body);
    }

    /// An error body with a code and a message.
    pub fn new(error: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: error.into(),
            message: message.into(),
            supported_protocols: None,
        }
    }
}

/// Answer of `GET {endpoint}?after=CURSOR&limit=N`: received events in arrival order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullResponse {
    /// Events received after the cursor, oldest first.
    pub events: Vec<ReceivedEvent>,
    /// Cursor to pass as `after` for the next page; absent when no event was returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<i64>,
}

/// An event as the server stored it.
///
/// On the wire it is one flat object: the [`WireEvent`] fields plus `cursor`,
/// `client_id` and `received_at`. (It is not `#[serde(flatten)]`ed because
/// serde's flatten buffers values and cannot hand them to a [`RawValue`].)
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "FlatReceivedEvent", into = "FlatReceivedEvent")]
pub struct ReceivedEvent {
    /// Arrival position at the server (strictly increasing).
    pub cursor: i64,
    /// The client that sent it.
    pub client_id: String,
    /// The event itself, as sent.
    pub event: WireEvent,
    /// When the server stored it (RFC 3339).
    pub received_at: String,
}

/// The wire shape of [`ReceivedEvent`].
#[derive(Clone, Serialize, Deserialize)]
struct FlatReceivedEvent {
    cursor: i64,
    client_id: String,
    id: EventId,
    seq: i64,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    payload: Box<RawValue>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    created_at: String,
    received_at: String,
}

impl From<FlatReceivedEvent> for ReceivedEvent {
    fn from(f: FlatReceivedEvent) -> Self {
        ReceivedEvent {
            cursor: f.cursor,
            client_id: f.client_id,
            event: WireEvent {
                id: f.id,
                seq: f.seq,
                event_type: f.event_type,
                key: f.key,
                payload: f.payload,
                headers: f.headers,
                created_at: f.created_at,
            },
            received_at: f.received_at,
        }
    }
}

impl From<ReceivedEvent> for FlatReceivedEvent {
    fn from(r: ReceivedEvent) -> Self {
        FlatReceivedEvent {
            cursor: r.cursor,
            client_id: r.client_id,
            id: r.event.id,
            seq: r.event.seq,
            event_type: r.event.event_type,
            key: r.event.key,
            payload: r.event.payload,
            headers: r.event.headers,
            created_at: r.event.created_at,
            received_at: r.received_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::event::EventStatus;
    use crate::time::Timestamp;

    fn event(key: Option<&str>, headers: &[(&str, &str)]) -> Event {
        Event {
            seq: 42,
            id: EventId::new(),
            event_type: "Order \"Created\"\n".into(),
            key: key.map(str::to_owned),
            payload: r#"{"a":[1,2.5,null],"b":"\u00e9"}"#.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created_at: Timestamp::from_millis(1_795_780_800_123),
            status: EventStatus::Pending,
            attempts: 0,
            next_attempt_at: Timestamp::from_millis(0),
            last_error: None,
            sent_at: None,
            retried_at: None,
        }
    }

    #[test]
    fn write_wire_event_matches_the_serde_form() {
        for e in [
            event(None, &[]),
            event(
                Some("order-\"1\""),
                &[("traceparent", "00-ab"), ("x", "\t")],
            ),
        ] {
            let mut direct = Vec::new();
            write_wire_event(&mut direct, &e);
            let via_serde = serde_json::to_vec(&WireEvent::try_from(&e).unwrap()).unwrap();
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                String::from_utf8(via_serde).unwrap()
            );
        }
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("\u{80}\u{7ff}\u{2028}\u{2029}\u{feff}\u{ffff}😀é\"\\");
        for s in [all.as_str(), "", "plain", "\"", "a\u{1f}b\u{7f}c"] {
            let mut ours = Vec::new();
            write_json_string(&mut ours, s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }
}
