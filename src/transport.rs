//! The transport contract: how the relay hands a serialized push to the network.
//!
//! The relay core ([`crate::relay`]) builds the request body and interprets the
//! answer; a transport only moves bytes. Natively the crate ships an HTTP
//! transport on reqwest (`HttpTransport`); in the browser a transport over
//! `fetch` implements the same trait. Keeping it this small is deliberate: a
//! new target needs one method.
//!
//! # Obligations of an implementation
//!
//! 1. `send` POSTs `push.body` (JSON, `Content-Type: application/json`) to the
//!    sync endpoint, optionally gzip-compressed (then with `Content-Encoding: gzip`).
//! 2. Credentials are asked for at send time from a [`Credentials`] provider,
//!    with `push.refresh_credentials` passed through, and never stored by the
//!    transport beyond what the provider itself caches.
//! 3. Any HTTP answer, whatever its status, is `Ok(Response)`: the relay alone
//!    decides what a status means. The body is returned unparsed.
//! 4. A failure to get an answer (DNS, connection refused, reset, timeout, a
//!    body that could not be read) is `Err(Error::Network { .. })`.
//! 5. `send` is bounded in time, and the time allowed grows with the body
//!    ([`time_allowed`]: a base timeout plus the body at a slowest uplink
//!    rate), so a slow link delays a large push instead of failing it
//!    forever, while a stuck request still ends.
//! 6. `Retry-After` is returned as a duration ([`parse_retry_after`] reads both
//!    the seconds and the HTTP-date forms).
//! 7. `push.sent` is notified as soon as the request has been handed to the
//!    network (see [`RequestSent`]); a transport that cannot tell may skip
//!    it, at the cost of some overlap between the network and local work.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

/// Default slowest uplink a push is given time for: 2 KiB/s (see [`time_allowed`]).
pub const DEFAULT_MIN_UPLOAD_RATE: u64 = 2 * 1024;

/// The time a push of `bytes` bytes is allowed: `timeout` (for the
/// connection and the answer) plus the body at `min_upload_rate` bytes per
/// second. Both shipped transports use it, so a push's deadline follows one
/// rule on every target.
pub fn time_allowed(
    timeout: std::time::Duration,
    bytes: usize,
    min_upload_rate: u64,
) -> std::time::Duration {
    timeout + std::time::Duration::from_secs_f64(bytes as f64 / min_upload_rate.max(1) as f64)
}

use crate::error::Result;
use crate::store::{MaybeSend, MaybeSync};
use crate::time::Timestamp;

/// HTTP headers as name/value pairs (for example `("authorization", "Bearer …")`).
pub type Headers = Vec<(String, String)>;

/// One push to send: the serialized [`crate::protocol::PushRequest`].
#[derive(Clone, Debug)]
pub struct Push {
    /// The JSON body, uncompressed; the transport may gzip it.
    pub body: Vec<u8>,
    /// How many events the body holds (for logs and metrics).
    pub events: usize,
    /// True when the previous attempt was answered 401 or 403: the transport
    /// must ask its [`Credentials`] provider for fresh ones.
    pub refresh_credentials: bool,
    /// To notify once the request has been handed to the network.
    pub sent: RequestSent,
}

/// A one-way signal from the transport to the relay: "this push's request
/// has been handed to the network".
///
/// While a push is on the wire the relay settles the previous push and
/// claims the next one. That local work waits for this signal, so that on a
/// busy machine (a phone, or two cores shared with a server) it never holds
/// up the request itself: it fills the time the request spends at the
/// server instead. Natively the reqwest transport notifies when hyper has
/// taken the whole body; in the browser the fetch transport notifies once
/// `fetch()` was called. A transport that never notifies loses only that
/// overlap: the relay notifies the signal itself when `send` returns.
/// Clones share one signal; notifying twice is harmless.
#[derive(Clone, Debug, Default)]
pub struct RequestSent(Arc<Mutex<SentState>>);

#[derive(Debug, Default)]
struct SentState {
    sent: bool,
    waiters: Vec<Waker>,
}

impl RequestSent {
    /// A signal not notified yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mark the request as handed to the network and wake whoever waits.
    pub fn notify(&self) {
        let waiters = {
            let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
            state.sent = true;
            std::mem::take(&mut state.waiters)
        };
        for waker in waiters {
            waker.wake();
        }
    }

    /// True once [`RequestSent::notify`] was called.
    pub fn is_sent(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).sent
    }

    /// Resolves once [`RequestSent::notify`] was called.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if state.sent {
                Poll::Ready(())
            } else {
                if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    state.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }
}

/// A server's answer, whatever its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The parsed `Retry-After` header, when present and readable.
    pub retry_after: Option<Duration>,
    /// The raw response body.
    pub body: Vec<u8>,
}

/// Moves one push to the sync endpoint and returns the answer.
/// See the module docs for the obligations.
pub trait Transport: MaybeSend + MaybeSync {
    /// Send `push` and return the server's answer, or `Error::Network` when
    /// there was none.
    fn send(&self, push: Push) -> impl Future<Output = Result<Response>> + MaybeSend;
}

/// The app's credentials, asked for at every send, so tokens are never
/// stored in the outbox and can be refreshed at any time.
pub trait Credentials: MaybeSend + MaybeSync {
    /// Headers to add to the next request. `refresh` is true when the previous
    /// request was refused with 401/403: return fresh credentials (refresh the
    /// token), not cached ones.
    fn headers(&self, refresh: bool) -> impl Future<Output = Result<Headers>> + MaybeSend;
}

/// No credentials: an endpoint that allows anonymous pushes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCredentials;

impl Credentials for NoCredentials {
    async fn headers(&self, _refresh: bool) -> Result<Headers> {
        Ok(Vec::new())
    }
}

/// The same headers on every request (a long-lived API key).
#[derive(Clone, Debug, Default)]
pub struct StaticHeaders(pub Headers);

impl StaticHeaders {
    /// `Authorization: Bearer {token}`.
    pub fn bearer(token: impl AsRef<str>) -> Self {
        StaticHeaders(vec![(
            "authorization".to_owned(),
            format!("Bearer {}", token.as_ref()),
        )])
    }
}

impl Credentials for StaticHeaders {
    async fn headers(&self, _refresh: bool) -> Result<Headers> {
        Ok(self.0.clone())
    }
}

/// Credentials from an async closure `Fn(refresh: bool) -> Future<Output = Result<Headers>>`;
/// build one with [`credentials_fn`].
#[derive(Clone)]
pub struct FnCredentials<F>(F);

/// Wrap an async closure as a [`Credentials`] provider.
///
/// ```
/// use edge_outbox::transport::{credentials_fn, Credentials};
/// let provider = credentials_fn(|refresh: bool| async move {
///     // A real app would call its auth library here, forcing a refresh when asked.
///     let token = if refresh { "fresh" } else { "cached" };
///     Ok(vec![("authorization".to_owned(), format!("Bearer {token}"))])
/// });
/// # let _ = &provider;
/// ```
pub fn credentials_fn<F, Fut>(f: F) -> FnCredentials<F>
where
    F: Fn(bool) -> Fut + MaybeSend + MaybeSync,
    Fut: Future<Output = Result<Headers>> + MaybeSend,
{
    FnCredentials(f)
}

impl<F, Fut> Credentials for FnCredentials<F>
where
    F: Fn(bool) -> Fut + MaybeSend + MaybeSync,
    Fut: Future<Output = Result<Headers>> + MaybeSend,
{
    fn headers(&self, refresh: bool) -> impl Future<Output = Result<Headers>> + MaybeSend {
        (self.0)(refresh)
    }
}

impl<F> std::fmt::Debug for FnCredentials<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCredentials")
    }
}

/// Read a `Retry-After` value: delta-seconds (`"120"`) or an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`, relative to `now`; a past date is 0).
/// Anything else is `None`, and the relay falls back to its backoff.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = Timestamp::parse_http_date(value)?;
    Some(at.since(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_allowed_grows_with_the_body() {
        let base = std::time::Duration::from_secs(10);
        assert_eq!(time_allowed(base, 0, DEFAULT_MIN_UPLOAD_RATE), base);
        assert_eq!(
            time_allowed(base, 200 * 1024, DEFAULT_MIN_UPLOAD_RATE),
            std::time::Duration::from_secs(110)
        );
        assert_eq!(
            time_allowed(base, 10, 0),
            std::time::Duration::from_secs(20)
        );
    }

    #[test]
    fn request_sent_wakes_its_waiter_once_notified() {
        let signal = RequestSent::new();
        let waiter = signal.clone();
        let mut wait = std::pin::pin!(waiter.wait());
        let woken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(Arc::new(Flag(woken.clone())));
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(!signal.is_sent());
        signal.notify();
        assert!(woken.load(std::sync::atomic::Ordering::SeqCst));
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        // Notifying again, or waiting after the fact, is fine.
        signal.notify();
        let mut again = std::pin::pin!(signal.wait());
        assert!(again.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn retry_after_forms() {
        let now = Timestamp::parse_rfc3339("2015-10-21T07:27:00Z").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
