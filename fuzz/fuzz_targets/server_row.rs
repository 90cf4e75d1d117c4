//! The server stores' row decoding (server/src/store.rs `StoredRow::decode`,
//! shared by the SQLite and PostgreSQL stores) on arbitrary column values.
//!
//! Input, as lines: cursor, seq, id, client_id, type, key (`~`: NULL),
//! created_at, received_at, headers, then the payload to the end.
//!
//! Invariants: a bad column is an error naming the cursor, never a panic; a
//! decoded row is served in a pull answer that a client reads back as the
//! same answer.
#![no_main]

use edge_outbox::protocol::PullResponse;
use edge_outbox_server::fuzzing::StoredRow;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut f = text.splitn(10, '\n');
    let mut next = || f.next().unwrap_or("").to_owned();
    let (cursor, seq) = (next().parse().unwrap_or(1), next().parse().unwrap_or(1));
    let (id, client_id, event_type, key) = (next(), next(), next(), next());
    let row = StoredRow {
        cursor,
        client_id,
        id,
        seq,
        event_type,
        key: (key != "~").then_some(key),
        created_at: next(),
        received_at: next(),
        headers: next(),
        payload: next(),
    };
    match row.decode() {
        Ok(event) => {
            assert_eq!(event.cursor, cursor);
            let page = PullResponse {
                events: vec![event],
                next_cursor: Some(cursor),
            };
            let json = serde_json::to_string(&page).expect("a decoded event serializes");
            let back: PullResponse = serde_json::from_str(&json).expect("a pull answer reads back");
            assert_eq!(serde_json::to_string(&back).expect("serializes"), json);
        }
        Err(e) => assert!(
            e.to_string().contains(&format!("at cursor {cursor}:")),
            "{e}"
        ),
    }
});
