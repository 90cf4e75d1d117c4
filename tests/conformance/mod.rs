//! The store conformance suite: the obligations of `edge_outbox::Store`
//! (see `src/store.rs`), written once and run against every backend —
//! SQLite natively (`tests/native.rs`) and IndexedDB in headless Chromium
//! (`tests/browser.rs`).
//!
//! `run_all` takes a factory that yields a fresh, empty store per check.

use std::future::Future;
use std::time::Duration;

use edge_outbox::{
    Claim, ClaimRequest, Error, EventId, EventStatus, NewEvent, Outcome, Settlement, Store,
    Timestamp,
};

/// Run every check, each on a fresh store from `make`.
pub async fn run_all<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    // One line per check so a failure names the obligation it broke.
    macro_rules! check {
        ($name:ident) => {{
            println!("conformance: {}", stringify!($name));
            $name(&make().await).await;
        }};
    }
    check!(enqueue_assigns_increasing_seq_and_fresh_ids);
    check!(enqueue_is_atomic_and_validates_first);
    check!(claim_takes_oldest_in_order_and_settle_counts_attempts);
    check!(claim_respects_count_and_byte_limits);
    check!(claim_on_empty_store);
    check!(claim_after_a_seq_starts_past_it);
    check!(lease_excludes_other_owners_until_expiry_or_release);
    check!(settle_sent_dead_and_retry);
    check!(retry_time_blocks_later_events);
    check!(settle_touches_only_pending_events);
    check!(settle_touches_only_the_named_events);
    check!(an_event_named_twice_in_one_settle_gets_one_outcome);
    check!(stats_count_each_status);
    check!(retry_and_discard_dead_letters);
    check!(prune_sent_removes_only_old_sent_events);
    check!(lists_are_ordered_and_limited);
    check!(client_id_is_a_stable_uuid);
    check!(retry_now_makes_waiting_events_due_and_touches_nothing_else);
    check!(a_retry_time_beyond_max_wait_is_not_believed);
    check!(retry_records_retried_at);
    check!(a_lease_expiry_beyond_the_lease_is_not_believed);
    check!(a_lease_renewed_after_the_claimant_read_its_clock_holds);
    check!(a_retry_time_written_after_the_claimant_read_its_clock_holds);
    check!(a_dead_event_retried_among_sent_ones_is_pending_alone);
    check!(settle_and_claim_is_a_settle_then_a_claim);
    check!(settle_and_claim_settles_under_another_owners_lease);
    check!(settle_and_claim_of_settled_events_changes_nothing);
    check!(settle_and_claim_without_outcomes_is_a_claim);
}

const LEASE: Duration = Duration::from_secs(30);

fn ev(n: usize) -> NewEvent {
    NewEvent::json("Tested", &serde_json::json!({ "n": n }))
        .unwrap()
        .key(format!("k{n}"))
        .header("h", "v")
}

fn request(owner: &str, max_events: usize, max_bytes: usize, now: Timestamp) -> ClaimRequest<'_> {
    ClaimRequest {
        owner,
        lease: LEASE,
        max_events,
        max_bytes,
        now,
        after: None,
        max_wait: edge_outbox::RetryPolicy::DEFAULT_CAP,
    }
}

async fn claim_batch<S: Store>(s: &S, owner: &str, max_events: usize) -> Vec<edge_outbox::Event> {
    match s
        .claim(request(owner, max_events, usize::MAX, Timestamp::now()))
        .await
        .unwrap()
    {
        Claim::Batch(b) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

async fn enqueue_assigns_increasing_seq_and_fresh_ids<S: Store>(s: &S) {
    let first = s.enqueue(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    let second = s.enqueue(vec![ev(3)]).await.unwrap();
    let all: Vec<_> = first.iter().chain(&second).collect();
    assert_eq!(all.len(), 4);
    for pair in all.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "seq must strictly increase");
        assert_ne!(pair[0].id, pair[1].id, "ids must be fresh");
    }
    let stored = s.get(all[1].id).await.unwrap().expect("stored event");
    assert_eq!(stored.event_type, "Tested");
    assert_eq!(stored.payload, r#"{"n":1}"#);
    assert_eq!(stored.key.as_deref(), Some("k1"));
    assert_eq!(stored.headers.get("h").map(String::as_str), Some("v"));
    assert_eq!(stored.status, EventStatus::Pending);
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.sent_at, None);
}

async fn enqueue_is_atomic_and_validates_first<S: Store>(s: &S) {
    let too_big = NewEvent::json("Big", &"x".repeat(300 * 1024)).unwrap();
    let err = s.enqueue(vec![ev(0), too_big]).await.unwrap_err();
    assert!(matches!(err, Error::EventTooLarge { .. }), "{err:?}");
    let bad_header = ev(1).header("", "x");
    let err = s.enqueue(vec![ev(2), bad_header]).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err:?}");
    assert_eq!(
        s.stats().await.unwrap().pending,
        0,
        "nothing may be written"
    );
    assert!(s.pending(10).await.unwrap().is_empty());
}

async fn claim_takes_oldest_in_order_and_settle_counts_attempts<S: Store>(s: &S) {
    let stored = s.enqueue((0..5).map(ev).collect()).await.unwrap();
    let batch = claim_batch(s, "a", 3).await;
    let seqs: Vec<i64> = batch.iter().map(|e| e.seq).collect();
    let expected: Vec<i64> = stored[..3].iter().map(|e| e.seq).collect();
    assert_eq!(seqs, expected);
    // A claim leaves no trace on the events...
    assert!(batch.iter().all(|e| e.attempts == 0));
    assert_eq!(s.get(stored[0].id).await.unwrap().unwrap().attempts, 0);
    // ...so unsettled events are claimed again as they were (a crashed relay
    // or a closed tab loses nothing and inflates nothing).
    let again = claim_batch(s, "a", 10).await;
    assert_eq!(again.len(), 5);
    assert_eq!(again[0].attempts, 0);
    // Settling counts the attempt, whatever the outcome.
    let now = Timestamp::now();
    let retry = Outcome::Retry {
        at: now,
        error: "HTTP 500".into(),
    };
    s.settle(
        vec![
            Settlement::new(&stored[0], Outcome::Sent),
            Settlement::new(&stored[1], retry.clone()),
            Settlement::new(&stored[2], Outcome::Dead { reason: "r".into() }),
        ],
        now,
    )
    .await
    .unwrap();
    for e in &stored[..3] {
        assert_eq!(s.get(e.id).await.unwrap().unwrap().attempts, 1);
    }
    s.settle(vec![Settlement::new(&stored[1], retry)], now)
        .await
        .unwrap();
    assert_eq!(s.get(stored[1].id).await.unwrap().unwrap().attempts, 2);
    assert_eq!(s.get(stored[4].id).await.unwrap().unwrap().attempts, 0);
}

async fn claim_respects_count_and_byte_limits<S: Store>(s: &S) {
    s.enqueue((0..4).map(ev).collect()).await.unwrap();
    let one = s.pending(1).await.unwrap()[0].size();
    let now = Timestamp::now();
    let Claim::Batch(b) = s.claim(request("a", 10, one * 2, now)).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(b.len(), 2, "byte limit");
    // The first event is always taken, however large.
    let Claim::Batch(b) = s.claim(request("a", 10, 1, now)).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(b.len(), 1);
}

async fn claim_on_empty_store<S: Store>(s: &S) {
    let claim = s
        .claim(request("a", 10, usize::MAX, Timestamp::now()))
        .await
        .unwrap();
    assert_eq!(claim, Claim::Empty);
}

async fn claim_after_a_seq_starts_past_it<S: Store>(s: &S) {
    let e = s.enqueue((0..5).map(ev).collect()).await.unwrap();
    let now = Timestamp::now();
    let after = |seq: i64| ClaimRequest {
        after: Some(seq),
        ..request("a", 10, usize::MAX, now)
    };
    let Claim::Batch(b) = s.claim(after(e[1].seq)).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(
        b.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[2].seq, e[3].seq, e[4].seq]
    );
    assert_eq!(s.claim(after(e[4].seq)).await.unwrap(), Claim::Empty);
    // Head-of-line applies to the first event past `after`...
    let at = now.add(Duration::from_secs(60));
    let retry = Outcome::Retry {
        at,
        error: "HTTP 500".into(),
    };
    s.settle(vec![Settlement::new(&e[3], retry)], now)
        .await
        .unwrap();
    assert_eq!(
        s.claim(after(e[2].seq)).await.unwrap(),
        Claim::NotBefore(at)
    );
    // ...and only to it.
    let Claim::Batch(b) = s.claim(after(e[3].seq)).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(b.iter().map(|x| x.seq).collect::<Vec<_>>(), [e[4].seq]);
    // Without `after`, the claim still starts at the oldest pending event.
    let Claim::Batch(b) = s.claim(request("a", 1, usize::MAX, now)).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(b[0].seq, e[0].seq);
}

async fn lease_excludes_other_owners_until_expiry_or_release<S: Store>(s: &S) {
    s.enqueue(vec![ev(0)]).await.unwrap();
    let now = Timestamp::now();
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::Batch(_)
    ));
    match s.claim(request("b", 10, usize::MAX, now)).await.unwrap() {
        Claim::LeaseHeld { until } => assert_eq!(until, now.add(LEASE)),
        other => panic!("b must not claim while a holds the lease: {other:?}"),
    }
    // The holder renews its own lease.
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::Batch(_)
    ));
    // After expiry another owner takes over.
    let later = now.add(LEASE).add(Duration::from_millis(1));
    assert!(matches!(
        s.claim(request("b", 10, usize::MAX, later)).await.unwrap(),
        Claim::Batch(_)
    ));
    // Releasing hands over at once; releasing a lease one does not hold is a no-op.
    s.release_lease("a").await.unwrap();
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, later)).await.unwrap(),
        Claim::LeaseHeld { .. }
    ));
    s.release_lease("b").await.unwrap();
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, later)).await.unwrap(),
        Claim::Batch(_)
    ));
}

async fn settle_sent_dead_and_retry<S: Store>(s: &S) {
    let e = s.enqueue((0..3).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 3).await;
    let now = Timestamp::now();
    let retry_at = now.add(Duration::from_secs(60));
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Sent),
            Settlement::new(
                &e[1],
                Outcome::Dead {
                    reason: "rejected: bad".into(),
                },
            ),
            Settlement::new(
                &e[2],
                Outcome::Retry {
                    at: retry_at,
                    error: "HTTP 500".into(),
                },
            ),
        ],
        now,
    )
    .await
    .unwrap();
    let sent = s.get(e[0].id).await.unwrap().unwrap();
    assert_eq!(sent.status, EventStatus::Sent);
    assert_eq!(sent.sent_at, Some(now));
    let dead = s.get(e[1].id).await.unwrap().unwrap();
    assert_eq!(dead.status, EventStatus::Dead);
    assert_eq!(dead.last_error.as_deref(), Some("rejected: bad"));
    let retry = s.get(e[2].id).await.unwrap().unwrap();
    assert_eq!(retry.status, EventStatus::Pending);
    assert_eq!(retry.next_attempt_at, retry_at);
    assert_eq!(retry.last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(retry.attempts, 1);
}

async fn retry_time_blocks_later_events<S: Store>(s: &S) {
    let e = s.enqueue((0..3).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 1).await;
    let now = Timestamp::now();
    let at = now.add(Duration::from_secs(60));
    s.settle(
        vec![Settlement::new(
            &e[0],
            Outcome::Retry {
                at,
                error: "timeout".into(),
            },
        )],
        now,
    )
    .await
    .unwrap();
    // e[1] and e[2] are due, but must not overtake e[0].
    assert_eq!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::NotBefore(at)
    );
    let Claim::Batch(b) = s.claim(request("a", 10, usize::MAX, at)).await.unwrap() else {
        panic!("expected a batch once due");
    };
    assert_eq!(
        b.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[0].seq, e[1].seq, e[2].seq]
    );
}

async fn settle_touches_only_pending_events<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0), ev(1)]).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Dead { reason: "r".into() }),
            Settlement::new(&e[1], Outcome::Sent),
        ],
        now,
    )
    .await
    .unwrap();
    // A late answer for the same events changes nothing.
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Sent),
            Settlement::new(
                &e[1],
                Outcome::Retry {
                    at: now,
                    error: "late".into(),
                },
            ),
            Settlement {
                seq: i64::MAX,
                id: EventId::new(),
                outcome: Outcome::Sent,
            },
        ],
        now.add(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    assert_eq!(
        s.get(e[0].id).await.unwrap().unwrap().status,
        EventStatus::Dead
    );
    let sent = s.get(e[1].id).await.unwrap().unwrap();
    assert_eq!(sent.status, EventStatus::Sent);
    assert_eq!(sent.last_error, None);
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (0, 1, 1));
}

async fn settle_touches_only_the_named_events<S: Store>(s: &S) {
    // A gap in the middle of a claimed run (an event left pending, as when a
    // server skips one) must stay exactly as it was.
    let e = s.enqueue((0..5).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 5).await;
    let now = Timestamp::now();
    let named = [0, 1, 3, 4].map(|i| Settlement::new(&e[i], Outcome::Sent));
    s.settle(named.to_vec(), now).await.unwrap();
    let skipped = s.get(e[2].id).await.unwrap().unwrap();
    assert_eq!(skipped.status, EventStatus::Pending);
    assert_eq!(skipped.attempts, 0);
    assert_eq!(skipped.last_error, None);
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (1, 4, 0));
}

async fn an_event_named_twice_in_one_settle_gets_one_outcome<S: Store>(s: &S) {
    // Obligation 7: one of the outcomes, one attempt, counted once.
    let e = s.enqueue((0..2).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    let retry = Outcome::Retry {
        at: now,
        error: "HTTP 503".into(),
    };
    let dead = Outcome::Dead {
        reason: "HTTP 422".into(),
    };
    let twice = vec![
        Settlement::new(&e[0], retry.clone()),
        Settlement::new(&e[0], Outcome::Sent),
        Settlement::new(&e[1], Outcome::Sent),
        Settlement::new(&e[1], dead),
    ];
    s.settle(twice, now).await.unwrap();
    let stats = s.stats().await.unwrap();
    assert_eq!(stats.pending + stats.sent + stats.dead, 2);
    for event in &e {
        let now = s.get(event.id).await.unwrap().unwrap();
        assert_eq!(now.attempts, 1, "{now:?}");
    }
    let first = s.get(e[0].id).await.unwrap().unwrap();
    assert!(
        matches!(first.status, EventStatus::Pending | EventStatus::Sent),
        "{first:?}"
    );
    assert_eq!(
        stats.sent + stats.dead,
        1 + u64::from(first.status == EventStatus::Sent)
    );
}

async fn stats_count_each_status<S: Store>(s: &S) {
    let empty = s.stats().await.unwrap();
    assert_eq!((empty.pending, empty.sent, empty.dead), (0, 0, 0));
    assert_eq!(empty.oldest_pending_at, None);
    let e = s.enqueue((0..4).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Sent),
            Settlement::new(&e[1], Outcome::Dead { reason: "x".into() }),
        ],
        now,
    )
    .await
    .unwrap();
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (2, 1, 1));
    assert_eq!(stats.oldest_pending_at, Some(e[2].created_at));
}

async fn retry_and_discard_dead_letters<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Dead { reason: "a".into() }),
            Settlement::new(&e[1], Outcome::Dead { reason: "b".into() }),
        ],
        now,
    )
    .await
    .unwrap();
    assert!(s.retry(e[0].id, now).await.unwrap());
    let back = s.get(e[0].id).await.unwrap().unwrap();
    assert_eq!(back.status, EventStatus::Pending);
    assert_eq!(back.attempts, 0);
    assert_eq!(back.seq, e[0].seq, "a retried event keeps its seq");
    // It is claimed again, first: it is the oldest pending event.
    let again = claim_batch(s, "a", 10).await;
    assert_eq!(
        again.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[0].seq, e[2].seq]
    );
    assert!(!s.retry(e[0].id, now).await.unwrap(), "no longer dead");
    assert!(!s.retry(EventId::new(), now).await.unwrap());

    assert!(s.discard(e[1].id).await.unwrap());
    assert_eq!(s.get(e[1].id).await.unwrap(), None);
    assert!(
        !s.discard(e[2].id).await.unwrap(),
        "pending events cannot be discarded"
    );
    assert!(s.get(e[2].id).await.unwrap().is_some());
    assert!(s.dead_letters(10).await.unwrap().is_empty());
}

async fn prune_sent_removes_only_old_sent_events<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0), ev(1), ev(2)]).await.unwrap();
    claim_batch(s, "a", 2).await;
    let t0 = Timestamp::now();
    s.settle(vec![Settlement::new(&e[0], Outcome::Sent)], t0)
        .await
        .unwrap();
    let t1 = t0.add(Duration::from_secs(10));
    s.settle(vec![Settlement::new(&e[1], Outcome::Sent)], t1)
        .await
        .unwrap();
    assert_eq!(s.prune_sent(t1).await.unwrap(), 1);
    assert_eq!(s.get(e[0].id).await.unwrap(), None);
    assert!(s.get(e[1].id).await.unwrap().is_some());
    assert!(
        s.get(e[2].id).await.unwrap().is_some(),
        "pending events are never pruned"
    );
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent), (1, 1));
}

async fn lists_are_ordered_and_limited<S: Store>(s: &S) {
    let e = s.enqueue((0..6).map(ev).collect()).await.unwrap();
    let pending = s.pending(4).await.unwrap();
    assert_eq!(
        pending.iter().map(|x| x.seq).collect::<Vec<_>>(),
        e[..4].iter().map(|x| x.seq).collect::<Vec<_>>()
    );
    claim_batch(s, "a", 6).await;
    let now = Timestamp::now();
    s.settle(
        vec![
            Settlement::new(&e[4], Outcome::Dead { reason: "x".into() }),
            Settlement::new(&e[1], Outcome::Dead { reason: "y".into() }),
        ],
        now,
    )
    .await
    .unwrap();
    let dead = s.dead_letters(10).await.unwrap();
    assert_eq!(
        dead.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[1].seq, e[4].seq]
    );
    assert_eq!(s.dead_letters(1).await.unwrap().len(), 1);
}

async fn client_id_is_a_stable_uuid<S: Store>(s: &S) {
    let id = s.client_id().to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "client id {id:?} is not a UUID"
    );
    s.enqueue(vec![ev(0)]).await.unwrap();
    assert_eq!(s.client_id(), id);
}

async fn retry_now_makes_waiting_events_due_and_touches_nothing_else<S: Store>(s: &S) {
    let e = s.enqueue((0..5).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 4).await;
    let now = Timestamp::now();
    let later = now.add(Duration::from_secs(60));
    let retry = |error: &str| Outcome::Retry {
        at: later,
        error: error.into(),
    };
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Sent),
            Settlement::new(&e[1], Outcome::Dead { reason: "r".into() }),
            Settlement::new(&e[2], retry("HTTP 503")),
            Settlement::new(&e[3], retry("HTTP 503")),
        ],
        now,
    )
    .await
    .unwrap();
    let mut untouched = Vec::new();
    for i in [0, 1, 4] {
        untouched.push(s.get(e[i].id).await.unwrap().unwrap());
    }
    assert_eq!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::NotBefore(later)
    );
    // Two events were waiting; both are due now, the rest is as it was.
    assert_eq!(s.retry_now(now).await.unwrap(), 2);
    for i in [2, 3] {
        let waiting = s.get(e[i].id).await.unwrap().unwrap();
        assert_eq!(waiting.status, EventStatus::Pending);
        assert_eq!(waiting.next_attempt_at, now, "due at `now`");
        assert_eq!(waiting.attempts, 1, "attempts are kept");
        assert_eq!(waiting.last_error.as_deref(), Some("HTTP 503"));
        assert_eq!(waiting.seq, e[i].seq);
    }
    for old in untouched {
        assert_eq!(s.get(old.id).await.unwrap().unwrap(), old);
    }
    let Claim::Batch(b) = s.claim(request("a", 10, usize::MAX, now)).await.unwrap() else {
        panic!("expected a batch after retry_now");
    };
    assert_eq!(
        b.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[2].seq, e[3].seq, e[4].seq]
    );
    assert_eq!(s.retry_now(now).await.unwrap(), 0, "nothing waits any more");
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (3, 1, 1));
}

async fn a_retry_time_beyond_max_wait_is_not_believed<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0), ev(1)]).await.unwrap();
    claim_batch(s, "a", 1).await;
    let now = Timestamp::now();
    let max_wait = request("a", 10, usize::MAX, now).max_wait;
    // Within the bound, the retry time holds (head-of-line)...
    let within = now.add(max_wait);
    s.settle(
        vec![Settlement::new(
            &e[0],
            Outcome::Retry {
                at: within,
                error: "HTTP 503".into(),
            },
        )],
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::NotBefore(within)
    );
    // ...beyond it (a clock that ran ahead, a Retry-After from before the
    // ceiling), it is not believed: the event is due now, in order.
    let beyond = now.add(max_wait).add(Duration::from_secs(86_400));
    s.settle(
        vec![Settlement::new(
            &e[0],
            Outcome::Retry {
                at: beyond,
                error: "HTTP 503".into(),
            },
        )],
        now,
    )
    .await
    .unwrap();
    assert_eq!(
        s.get(e[0].id).await.unwrap().unwrap().next_attempt_at,
        beyond
    );
    let Claim::Batch(b) = s.claim(request("a", 10, usize::MAX, now)).await.unwrap() else {
        panic!("an unbelievable retry time must not park the queue");
    };
    assert_eq!(
        b.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[0].seq, e[1].seq]
    );
}

async fn retry_records_retried_at<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0)]).await.unwrap();
    assert_eq!(e[0].retried_at, None);
    assert_eq!(s.get(e[0].id).await.unwrap().unwrap().retried_at, None);
    claim_batch(s, "a", 1).await;
    let now = Timestamp::now();
    s.settle(
        vec![Settlement::new(
            &e[0],
            Outcome::Dead {
                reason: "expired".into(),
            },
        )],
        now,
    )
    .await
    .unwrap();
    assert_eq!(s.get(e[0].id).await.unwrap().unwrap().retried_at, None);
    let retried = now.add(Duration::from_secs(5));
    assert!(s.retry(e[0].id, retried).await.unwrap());
    let back = s.get(e[0].id).await.unwrap().unwrap();
    assert_eq!(back.retried_at, Some(retried));
    assert_eq!(back.created_at, e[0].created_at, "created_at is kept");
    assert_eq!(back.age_base(), retried, "max age counts from the retry");
    // It is listed and claimed with it.
    assert_eq!(s.pending(1).await.unwrap()[0].retried_at, Some(retried));
    let Claim::Batch(b) = s.claim(request("a", 1, usize::MAX, retried)).await.unwrap() else {
        panic!("expected the retried event");
    };
    assert_eq!(b[0].retried_at, Some(retried));
}

async fn a_lease_expiry_beyond_the_lease_is_not_believed<S: Store>(s: &S) {
    s.enqueue(vec![ev(0)]).await.unwrap();
    let now = Timestamp::now();
    // "a" claims under a clock one day ahead: its lease claims to last until
    // a day from now.
    let ahead = now.add(Duration::from_secs(86_400));
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, ahead)).await.unwrap(),
        Claim::Batch(_)
    ));
    // The clock is corrected (or "a" died under it): "b" does not wait a day.
    assert!(matches!(
        s.claim(request("b", 10, usize::MAX, now)).await.unwrap(),
        Claim::Batch(_)
    ));
    // And "b"'s own, believable lease holds against "a".
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::LeaseHeld { .. }
    ));
    s.release_lease("b").await.unwrap();
}

/// A claim's `now` is read before the store takes its lock or transaction,
/// and the holder may renew its lease in between: in the browser, "b"'s
/// claim waits for the IndexedDB transaction of "a", which is sending. Its
/// expiry then lies a little more than a lease past "b"'s `now`, which is
/// not a clock that ran ahead: the lease holds, and only one sends.
async fn a_lease_renewed_after_the_claimant_read_its_clock_holds<S: Store>(s: &S) {
    s.enqueue(vec![ev(0), ev(1)]).await.unwrap();
    // "b" read its clock 200 ms ago, then waited for the store.
    let b_read = Timestamp::now().sub(Duration::from_millis(200));
    assert!(matches!(
        s.claim(request("a", 1, usize::MAX, Timestamp::now()))
            .await
            .unwrap(),
        Claim::Batch(_)
    ));
    assert!(
        matches!(
            s.claim(request("b", 10, usize::MAX, b_read)).await.unwrap(),
            Claim::LeaseHeld { .. }
        ),
        "a second sender took over a lease renewed after its clock read"
    );
    s.release_lease("a").await.unwrap();
}

/// The same for a retry time: another sender settled a failure with the
/// longest wait there is after this claim read its clock. The wait holds.
async fn a_retry_time_written_after_the_claimant_read_its_clock_holds<S: Store>(s: &S) {
    let e = s.enqueue(vec![ev(0)]).await.unwrap();
    let read = Timestamp::now().sub(Duration::from_millis(200));
    let max_wait = request("a", 10, usize::MAX, read).max_wait;
    claim_batch(s, "a", 1).await;
    let written = Timestamp::now();
    let at = written.add(max_wait);
    let retry = Outcome::Retry {
        at,
        error: "HTTP 503".into(),
    };
    s.settle(vec![Settlement::new(&e[0], retry)], written)
        .await
        .unwrap();
    assert_eq!(
        s.claim(request("a", 10, usize::MAX, read)).await.unwrap(),
        Claim::NotBefore(at)
    );
    s.release_lease("a").await.unwrap();
}

async fn a_dead_event_retried_among_sent_ones_is_pending_alone<S: Store>(s: &S) {
    // A dead letter between events sent with it and after it (stores that
    // record sends in bulk, like IndexedDB's sent watermark, must unpick it).
    let e = s.enqueue((0..5).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 4).await;
    let t0 = Timestamp::now();
    let dead = Outcome::Dead { reason: "r".into() };
    let first = [
        (0, Outcome::Sent),
        (1, dead),
        (2, Outcome::Sent),
        (3, Outcome::Sent),
    ];
    let first = first.map(|(i, o)| Settlement::new(&e[i], o));
    s.settle(first.to_vec(), t0).await.unwrap();
    assert_eq!(
        claim_batch(s, "a", 5).await.len(),
        1,
        "only the last one is pending"
    );
    let t1 = t0.add(Duration::from_secs(10));
    s.settle(vec![Settlement::new(&e[4], Outcome::Sent)], t1)
        .await
        .unwrap();
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (0, 4, 1));

    assert!(s.retry(e[1].id, Timestamp::now()).await.unwrap());
    let back = s.get(e[1].id).await.unwrap().unwrap();
    assert_eq!((back.status, back.attempts), (EventStatus::Pending, 0));
    for (i, at) in [(0, t0), (2, t0), (3, t0), (4, t1)] {
        let sent = s.get(e[i].id).await.unwrap().unwrap();
        assert_eq!(sent.status, EventStatus::Sent, "event {i}");
        assert_eq!((sent.attempts, sent.sent_at), (1, Some(at)), "event {i}");
        assert_eq!(sent.last_error, None);
    }
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (1, 4, 0));
    assert_eq!(stats.oldest_pending_at, Some(e[1].created_at));
    let pending = s.pending(10).await.unwrap();
    assert_eq!(
        pending.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[1].seq]
    );
    let again = claim_batch(s, "a", 10).await;
    assert_eq!(again.iter().map(|x| x.seq).collect::<Vec<_>>(), [e[1].seq]);

    // Sent at t0: pruned; sent at t1 and pending: kept.
    assert_eq!(s.prune_sent(t1).await.unwrap(), 3);
    for i in [0, 2, 3] {
        assert_eq!(s.get(e[i].id).await.unwrap(), None, "event {i}");
    }
    assert!(s.get(e[4].id).await.unwrap().is_some());
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (1, 1, 0));
}

fn seqs_of(claim: &Claim) -> Vec<i64> {
    match claim {
        Claim::Batch(b) => b.iter().map(|e| e.seq).collect(),
        other => panic!("expected a batch, got {other:?}"),
    }
}

async fn settle_and_claim_is_a_settle_then_a_claim<S: Store>(s: &S) {
    // Obligation 10, as the relay uses it: while a push is on the wire, the
    // last answer is settled and the batch after the last claimed one taken.
    let e = s.enqueue((0..6).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    let after = |seq: i64| ClaimRequest {
        after: Some(seq),
        ..request("a", 2, usize::MAX, now)
    };
    let dead = Outcome::Dead {
        reason: "rejected: bad".into(),
    };
    let outcomes = vec![
        Settlement::new(&e[0], Outcome::Sent),
        Settlement::new(&e[1], dead),
    ];
    let claim = s.settle_and_claim(outcomes, now, after(e[1].seq)).await;
    assert_eq!(seqs_of(&claim.unwrap().unwrap()), [e[2].seq, e[3].seq]);
    let sent = s.get(e[0].id).await.unwrap().unwrap();
    assert_eq!(
        (sent.status, sent.attempts, sent.sent_at),
        (EventStatus::Sent, 1, Some(now))
    );
    let dead = s.get(e[1].id).await.unwrap().unwrap();
    assert_eq!((dead.status, dead.attempts), (EventStatus::Dead, 1));
    assert_eq!(dead.last_error.as_deref(), Some("rejected: bad"));
    // The claim leaves no trace on the events it takes.
    assert_eq!(s.get(e[2].id).await.unwrap().unwrap().attempts, 0);

    let retry = Outcome::Retry {
        at: now,
        error: "HTTP 500".into(),
    };
    let outcomes = vec![
        Settlement::new(&e[2], Outcome::Sent),
        Settlement::new(&e[3], retry),
    ];
    let claim = s.settle_and_claim(outcomes, now, after(e[3].seq)).await;
    assert_eq!(seqs_of(&claim.unwrap().unwrap()), [e[4].seq, e[5].seq]);
    let retried = s.get(e[3].id).await.unwrap().unwrap();
    assert_eq!(
        (retried.status, retried.attempts),
        (EventStatus::Pending, 1)
    );
    assert_eq!(retried.last_error.as_deref(), Some("HTTP 500"));

    // The claim sees what the settle did: settled events are no longer
    // pending, so a claim from the oldest pending event starts past them...
    let outcomes = vec![Settlement::new(&e[3], Outcome::Sent)];
    let claim = s
        .settle_and_claim(outcomes, now, request("a", 10, usize::MAX, now))
        .await;
    assert_eq!(seqs_of(&claim.unwrap().unwrap()), [e[4].seq, e[5].seq]);
    // ...and a retry time it just wrote holds the line (obligation 6).
    let at = now.add(Duration::from_secs(60));
    let retry = Outcome::Retry {
        at,
        error: "timeout".into(),
    };
    let outcomes = vec![Settlement::new(&e[4], retry)];
    let claim = s
        .settle_and_claim(outcomes, now, request("a", 10, usize::MAX, now))
        .await;
    assert_eq!(claim.unwrap().unwrap(), Claim::NotBefore(at));
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (2, 3, 1));
}

async fn settle_and_claim_settles_under_another_owners_lease<S: Store>(s: &S) {
    // The outcomes are of pushes that happened: they are recorded whoever
    // holds the lease now; the claim part is refused, and the lease stays.
    let e = s.enqueue((0..3).map(ev).collect()).await.unwrap();
    let now = Timestamp::now();
    assert!(matches!(
        s.claim(request("a", 10, usize::MAX, now)).await.unwrap(),
        Claim::Batch(_)
    ));
    let outcomes = vec![Settlement::new(&e[0], Outcome::Sent)];
    let claim = s
        .settle_and_claim(outcomes, now, request("b", 10, usize::MAX, now))
        .await;
    assert_eq!(
        claim.unwrap().unwrap(),
        Claim::LeaseHeld {
            until: now.add(LEASE)
        }
    );
    assert_eq!(
        s.get(e[0].id).await.unwrap().unwrap().status,
        EventStatus::Sent
    );
    assert!(matches!(
        s.claim(request("b", 10, usize::MAX, now)).await.unwrap(),
        Claim::LeaseHeld { .. }
    ));
    let Claim::Batch(b) = s.claim(request("a", 10, usize::MAX, now)).await.unwrap() else {
        panic!("the lease holder claims on");
    };
    assert_eq!(
        b.iter().map(|x| x.seq).collect::<Vec<_>>(),
        [e[1].seq, e[2].seq]
    );
}

async fn settle_and_claim_of_settled_events_changes_nothing<S: Store>(s: &S) {
    // A late answer for events already settled (obligation 7), then the claim.
    let e = s.enqueue((0..3).map(ev).collect()).await.unwrap();
    claim_batch(s, "a", 2).await;
    let now = Timestamp::now();
    s.settle(
        vec![
            Settlement::new(&e[0], Outcome::Sent),
            Settlement::new(&e[1], Outcome::Dead { reason: "r".into() }),
        ],
        now,
    )
    .await
    .unwrap();
    let later = now.add(Duration::from_secs(1));
    let late = vec![
        Settlement::new(
            &e[0],
            Outcome::Retry {
                at: later,
                error: "late".into(),
            },
        ),
        Settlement::new(&e[1], Outcome::Sent),
    ];
    let claim = s
        .settle_and_claim(late, later, request("a", 10, usize::MAX, later))
        .await;
    assert_eq!(seqs_of(&claim.unwrap().unwrap()), [e[2].seq]);
    let sent = s.get(e[0].id).await.unwrap().unwrap();
    assert_eq!(
        (sent.status, sent.attempts, sent.sent_at, sent.last_error),
        (EventStatus::Sent, 1, Some(now), None)
    );
    let dead = s.get(e[1].id).await.unwrap().unwrap();
    assert_eq!((dead.status, dead.attempts), (EventStatus::Dead, 1));
    let stats = s.stats().await.unwrap();
    assert_eq!((stats.pending, stats.sent, stats.dead), (1, 1, 1));
}

async fn settle_and_claim_without_outcomes_is_a_claim<S: Store>(s: &S) {
    let now = Timestamp::now();
    let claim = s
        .settle_and_claim(Vec::new(), now, request("a", 10, usize::MAX, now))
        .await;
    assert_eq!(claim.unwrap().unwrap(), Claim::Empty);
    let e = s.enqueue((0..3).map(ev).collect()).await.unwrap();
    // Events are due from their enqueue on.
    let now = Timestamp::now();
    let claim = s
        .settle_and_claim(Vec::new(), now, request("a", 2, usize::MAX, now))
        .await;
    assert_eq!(seqs_of(&claim.unwrap().unwrap()), [e[0].seq, e[1].seq]);
    assert_eq!(s.get(e[0].id).await.unwrap().unwrap().attempts, 0);
    // It took the lease, as a claim does.
    assert!(matches!(
        s.claim(request("b", 10, usize::MAX, now)).await.unwrap(),
        Claim::LeaseHeld { .. }
    ));
}
