//! The relay's reading of an answer to a push: `Retry-After` parsing
//! (src/transport.rs), the answer policy (src/policy.rs `classify`) and the
//! matching of a 200's results to the pushed events (src/relay/push.rs
//! `match_results`).
//!
//! Input, as text lines: the status; the `Retry-After` header (an empty
//! line: none); the pushed events, one character each (a digit `d`: the id
//! of the body's result `d`, any other character: an id no result names);
//! then the body, to the end.
//!
//! Invariants: every pushed event gets exactly one outcome, and a result
//! settles only an event with its id (each result at most once); the
//! verdict follows the protocol's table; the `Retry-After` the relay keeps
//! is the header's, and the delay it causes never exceeds the policy's cap;
//! an error the relay writes from a failed answer's body stays short (a
//! per-event reason is the server's own word and is kept whole).
#![no_main]

use std::collections::HashMap;

use edge_outbox::fuzzing::{Answer, read_answer};
use edge_outbox::protocol::{ErrorBody, PushResponse};
use edge_outbox::transport::parse_retry_after;
use edge_outbox::{EventId, Jitter, RetryPolicy, Timestamp};
use libfuzzer_sys::fuzz_target;

/// An id no result of the body is likely to name.
fn unnamed(i: usize) -> EventId {
    EventId::from(uuid::Uuid::from_u128(
        0x0190_0000_0000_7000_8000_ffff_0000_0000 + i as u128,
    ))
}

/// Longest error or reason the relay should record on an event (an answer
/// is untrusted: a proxy or a broken server may send megabytes).
const MAX_RECORDED: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let (Some(status), Some(retry_after), Some(pushed), Some(body)) =
        (lines.next(), lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    let Some(status) = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
    else {
        return;
    };
    // What the transport passes on: a header value that is visible text.
    let retry_after = std::str::from_utf8(retry_after)
        .ok()
        .filter(|s| !s.is_empty());
    let now = Timestamp::from_millis(1_780_000_000_000);
    let parsed = serde_json::from_slice::<PushResponse>(body).ok();
    let results = parsed.as_ref().map_or(&[][..], |p| &p.results[..]);
    let pushed: Vec<EventId> = pushed
        .iter()
        .enumerate()
        .map(|(i, &c)| match c {
            b'0'..=b'9' => results
                .get(usize::from(c - b'0'))
                .map_or(unnamed(i), |r| r.id),
            _ => unnamed(i),
        })
        .collect();

    let expected_retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    let answer = read_answer(status, retry_after, now, body.to_vec(), &pushed);
    match &answer {
        Answer::Results(outcomes) => {
            assert_eq!(status, 200);
            assert!(parsed.is_some());
            assert_eq!(outcomes.len(), pushed.len(), "one outcome per pushed event");
            // Each result settles at most one event, and only one with its id.
            let mut left: HashMap<_, usize> = HashMap::new();
            for r in results {
                *left.entry((r.id, r.status, r.reason.clone())).or_default() += 1;
            }
            for (id, outcome) in pushed.iter().zip(outcomes) {
                if let Some((status, reason)) = outcome {
                    let n = left
                        .get_mut(&(*id, *status, reason.clone()))
                        .expect("an outcome comes from a result naming the event");
                    assert!(*n > 0, "a result settled two events");
                    *n -= 1;
                }
            }
            // An event named once, pushed once, is settled.
            for (id, outcome) in pushed.iter().zip(outcomes) {
                let named = results.iter().filter(|r| r.id == *id).count();
                let pushed_n = pushed.iter().filter(|p| *p == id).count();
                if named == 1 && pushed_n == 1 {
                    assert!(
                        outcome.is_some(),
                        "an event its result names stays unsettled"
                    );
                }
            }
        }
        Answer::Channel {
            retry_after,
            error,
            narrows,
        } => {
            assert!(
                status != 200 || parsed.is_none(),
                "a readable 200 read as a failure"
            );
            assert!(status != 413);
            assert_eq!(*retry_after, expected_retry_after);
            assert_eq!(*narrows, status == 408 || (status >= 500 && status != 503));
            assert!(
                error.len() <= MAX_RECORDED,
                "error of {} bytes",
                error.len()
            );
            let policy = RetryPolicy::default();
            let mut jitter = Jitter::seeded(u64::from(status));
            for attempts in [0, 1, 7, u32::MAX] {
                let delay = policy.delay(attempts, *retry_after, &mut jitter);
                assert!(delay <= policy.cap());
                if let Some(floor) = retry_after {
                    assert!(delay >= (*floor).min(policy.cap()));
                }
                let _ = policy.next_attempt(now, attempts, *retry_after, &mut jitter);
            }
        }
        Answer::Refused { reason, too_large } => {
            assert_eq!(*too_large, status == 413);
            if !too_large {
                assert!(status == 400 || status == 422);
                let e: ErrorBody =
                    serde_json::from_slice(body).expect("a refusal has the error body");
                assert!(
                    ["invalid_request", "malformed_json", "invalid_event"]
                        .contains(&e.error.as_str())
                );
            }
            assert!(
                reason.len() <= MAX_RECORDED,
                "reason of {} bytes",
                reason.len()
            );
        }
    }
});
