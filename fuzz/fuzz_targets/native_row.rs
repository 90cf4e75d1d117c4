//! The native store's row decoding (src/native/sqlite.rs `row_to_event`) on
//! rows whose columns hold any SQLite values, as a file edited behind the
//! outbox's back may, then the relay's serialization of the decoded event
//! (src/protocol.rs `write_wire_event`).
//!
//! Input: 13 lines, one per column (seq, id, type, key, payload, headers,
//! created_at, status, attempts, next_attempt_at, last_error, sent_at,
//! retried_at), the last to the end. A line's first byte gives its type:
//! `i` integer (the rest in decimal), `r` real, `t` text, `x` blob in hex,
//! `b` blob as is, anything else NULL.
//!
//! Invariants: a bad column is an error, never a panic; a decoded event
//! holds the column values; an event whose payload is protocol JSON is
//! written to the wire as JSON that reads back as the same event, its
//! `created_at` included (for years 1 to 9999).
#![no_main]

use edge_outbox::fuzzing::{NATIVE_ROW_COLUMNS, decode_native_row};
use edge_outbox::protocol::{WireEvent, check_json_text, write_wire_event};
use edge_outbox::{EventId, Timestamp};
use libfuzzer_sys::fuzz_target;
use rusqlite::types::Value;

fn value(field: &[u8]) -> Value {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match field.split_first() {
        Some((b'i', rest)) => Value::Integer(text(rest).trim().parse().unwrap_or(0)),
        Some((b'r', rest)) => Value::Real(text(rest).trim().parse().unwrap_or(0.0)),
        Some((b't', rest)) => Value::Text(text(rest)),
        Some((b'x', rest)) => Value::Blob(
            rest.chunks_exact(2)
                .filter_map(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
                .collect(),
        ),
        Some((b'b', rest)) => Value::Blob(rest.to_vec()),
        _ => Value::Null,
    }
}

/// Years 1 to 9999: what RFC 3339 can write.
const RFC3339_MS: std::ops::RangeInclusive<i64> = -62_135_596_800_000..=253_402_300_799_999;

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(NATIVE_ROW_COLUMNS, |&b| b == b'\n');
    let values: [Value; NATIVE_ROW_COLUMNS] =
        std::array::from_fn(|_| fields.next().map_or(Value::Null, value));
    let Ok(event) = decode_native_row(&values) else {
        return;
    };
    let int = |i: usize| match values[i] {
        Value::Integer(n) => n,
        ref other => panic!("column {i} decoded from {other:?}"),
    };
    assert_eq!(event.seq, int(0));
    let Value::Blob(id) = &values[1] else {
        panic!("id decoded from {:?}", values[1])
    };
    assert_eq!(
        event.id,
        EventId::from(uuid::Uuid::from_slice(id).expect("16 bytes"))
    );
    assert_eq!(event.created_at, Timestamp::from_millis(int(6)));
    assert_eq!(i64::from(event.attempts), int(8));
    let _ = (event.size(), event.age_base());

    if check_json_text(&event.payload).is_err() {
        return;
    }
    let mut wire = Vec::new();
    write_wire_event(&mut wire, &event);
    let back: WireEvent = serde_json::from_slice(&wire).unwrap_or_else(|e| {
        panic!(
            "the wire form does not read back ({e}): {}",
            String::from_utf8_lossy(&wire)
        )
    });
    assert_eq!(back.id, event.id);
    assert_eq!(back.seq, event.seq);
    assert_eq!(back.event_type, event.event_type);
    assert_eq!(back.key, event.key);
    assert_eq!(back.headers, event.headers);
    assert_eq!(
        back.payload.get(),
        event.payload.trim_matches([' ', '\t', '\n', '\r'])
    );
    if RFC3339_MS.contains(&int(6)) {
        assert_eq!(
            Timestamp::parse_rfc3339(&back.created_at),
            Some(event.created_at),
            "created_at {:?}",
            back.created_at
        );
    }
});
