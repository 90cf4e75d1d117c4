//! The server's push parser and per-event validation (server/src/http.rs
//! `parse_push`, `invalid_event`) on arbitrary bodies.
//!
//! Invariants: a parsed push is protocol 1; an event the server accepts is
//! one a strict reader can read back (it is stored and pulled); a refused
//! body gets 400 with the protocol's error body, which the relay reads as
//! the protocol says (a content error is refused, another version is the
//! channel's fault).
#![no_main]

use edge_outbox::Timestamp;
use edge_outbox::fuzzing::{Answer, read_answer};
use edge_outbox::protocol::{ErrorBody, PROTOCOL_VERSION, WireEvent, check_json_text};
use edge_outbox_server::fuzzing::{invalid_event, parse_push};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_push(data) {
        Ok(request) => {
            assert_eq!(request.protocol, PROTOCOL_VERSION);
            for event in &request.events {
                if invalid_event(event).is_some() {
                    continue;
                }
                check_json_text(event.payload.get()).expect("an accepted payload is protocol JSON");
                assert!(Timestamp::parse_rfc3339(&event.created_at).is_some());
                assert!(!event.event_type.is_empty() && event.seq >= 0);
                let json = serde_json::to_string(event).expect("an accepted event serializes");
                let back: WireEvent =
                    serde_json::from_str(&json).expect("an accepted event reads back");
                assert_eq!(serde_json::to_string(&back).expect("serializes"), json);
            }
        }
        Err(refusal) => {
            assert_eq!(refusal.status, 400);
            let body: ErrorBody =
                serde_json::from_slice(&refusal.body).expect("a refusal has the error body");
            let unsupported = body.error == "unsupported_protocol";
            assert!(
                unsupported || body.error == "malformed_json" || body.error == "invalid_request",
                "unexpected error code {:?}",
                body.error
            );
            assert_eq!(body.supported_protocols.is_some(), unsupported);
            match read_answer(400, None, Timestamp::from_millis(0), refusal.body, &[]) {
                Answer::Refused { too_large, .. } => assert!(!unsupported && !too_large),
                Answer::Channel { narrows, .. } => assert!(unsupported && !narrows),
                Answer::Results(_) => panic!("a 400 read as results"),
            }
        }
    }
});
