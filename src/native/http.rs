//! The native HTTP transport, on reqwest.
//!
//! reqwest is built without default features: plain HTTP/1.1 out of the box
//! (enough for loopback, a sidecar or a TLS-terminating proxy), and HTTPS with
//! the crate feature `rustls`. JSON is serialized by the relay core, so
//! reqwest's `json` feature is not needed; gzip request bodies use flate2.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};

use crate::error::{Error, Result};
use crate::time::Timestamp;
use crate::transport::{
    Credentials, DEFAULT_MIN_UPLOAD_RATE, NoCredentials, Push, RequestSent, Response, Transport,
    parse_retry_after, time_allowed,
};

/// Default time allowed to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default base time allowed for a push (see [`HttpTransportBuilder::timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The request body is handed to the connection in pieces of this size, so
/// that a stalled upload is seen (no piece taken for a whole `timeout`).
const UPLOAD_PIECE: usize = 16 * 1024;

/// POSTs pushes to the sync endpoint with reqwest.
///
/// ```no_run
/// use std::time::Duration;
/// use edge_outbox::{HttpTransport, transport::StaticHeaders};
/// let transport = HttpTransport::builder("http://127.0.0.1:8080/v1/events")
///     .timeout(Duration::from_secs(15))
///     .gzip(true)
///     .credentials(StaticHeaders::bearer("secret-token"))
///     .build()?;
/// # Ok::<(), edge_outbox::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HttpTransport<C = NoCredentials> {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    gzip: bool,
    timeout: Duration,
    min_upload_rate: u64,
    credentials: C,
}

/// Builds an [`HttpTransport`].
#[derive(Debug)]
pub struct HttpTransportBuilder<C = NoCredentials> {
    endpoint: String,
    connect_timeout: Duration,
    timeout: Duration,
    min_upload_rate: u64,
    gzip: bool,
    client: Option<reqwest::Client>,
    /// Extra trusted roots, PEM (see `add_root_certificate`).
    #[cfg(feature = "rustls")]
    root_certificates: Vec<Vec<u8>>,
    credentials: C,
}

impl HttpTransport {
    /// A transport to `endpoint` with default timeouts, no gzip, no credentials.
    pub fn new(endpoint: impl Into<String>) -> Result<Self> {
        Self::builder(endpoint).build()
    }

    /// Start configuring a transport to `endpoint`.
    pub fn builder(endpoint: impl Into<String>) -> HttpTransportBuilder {
        HttpTransportBuilder {
            endpoint: endpoint.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            min_upload_rate: DEFAULT_MIN_UPLOAD_RATE,
            gzip: false,
            client: None,
            #[cfg(feature = "rustls")]
            root_certificates: Vec::new(),
            credentials: NoCredentials,
        }
    }
}

impl<C> HttpTransport<C> {
    /// The endpoint pushes go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// The underlying reqwest client (to reuse its connection pool elsewhere).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl<C: Credentials> HttpTransportBuilder<C> {
    /// Time allowed to open a connection (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Base time allowed for a push (default 10 s): the whole push may take
    /// `timeout` plus its body's size at [`min_upload_rate`](Self::min_upload_rate),
    /// so a slow uplink delays a large push instead of failing it forever;
    /// and an upload that makes no progress for `timeout` fails at once (a
    /// dead connection is not waited on for the size allowance).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The slowest uplink, in bytes per second, that a push is given time
    /// for (default [`DEFAULT_MIN_UPLOAD_RATE`], 2 KiB/s; at least 1): a push
    /// of `n` bytes may take `timeout + n / rate`. After timeouts the relay
    /// also sends smaller pushes, down to one event.
    pub fn min_upload_rate(mut self, bytes_per_sec: u64) -> Self {
        self.min_upload_rate = bytes_per_sec.max(1);
        self
    }

    /// Gzip request bodies (`Content-Encoding: gzip`); the server must accept it.
    pub fn gzip(mut self, yes: bool) -> Self {
        self.gzip = yes;
        self
    }

    /// Use this reqwest client (its own timeouts, proxy, TLS settings) instead
    /// of building one; `connect_timeout` is then ignored, `timeout` still applies per push.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Trust the certificate authorities in `pem` (one or more `CERTIFICATE`
    /// blocks) for HTTPS, besides the platform's roots, which stay trusted:
    /// for an endpoint whose certificate comes from a private CA (a company
    /// CA, a test CA). Repeatable. [`build`](Self::build) fails with
    /// [`Error::InvalidConfig`] on a PEM without a certificate, or when a
    /// [`client`](Self::client) of your own is given too (configure its
    /// roots there). Needs the crate feature `rustls`.
    #[cfg(feature = "rustls")]
    pub fn add_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Ask `credentials` for headers at every send.
    pub fn credentials<C2: Credentials>(self, credentials: C2) -> HttpTransportBuilder<C2> {
        HttpTransportBuilder {
            endpoint: self.endpoint,
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
            min_upload_rate: self.min_upload_rate,
            gzip: self.gzip,
            client: self.client,
            #[cfg(feature = "rustls")]
            root_certificates: self.root_certificates,
            credentials,
        }
    }

    /// Build the transport. Fails on an endpoint that is not an http(s) URL.
    pub fn build(self) -> Result<HttpTransport<C>> {
        let endpoint = reqwest::Url::parse(&self.endpoint).map_err(|e| Error::InvalidConfig {
            reason: format!("endpoint {:?} is not a URL: {e}", self.endpoint),
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(Error::InvalidConfig {
                reason: format!("endpoint {:?} is not an http(s) URL", self.endpoint),
            });
        }
        if endpoint.scheme() == "https" && !cfg!(feature = "rustls") {
            return Err(Error::InvalidConfig {
                reason: "https endpoints need the crate feature `rustls`".into(),
            });
        }
        let client = match self.client {
            #[cfg(feature = "rustls")]
            Some(_) if !self.root_certificates.is_empty() => {
                return Err(Error::InvalidConfig {
                    reason: "add_root_certificate has no effect on a client of your own: \
                             add the roots to that client"
                        .into(),
                });
            }
            Some(client) => client,
            None => {
                // The time allowed is set per push (it grows with the body).
                let builder = reqwest::Client::builder().connect_timeout(self.connect_timeout);
                #[cfg(feature = "rustls")]
                let builder = builder.tls_certs_merge(root_certificates(&self.root_certificates)?);
                builder
                    .build()
                    .map_err(|e| network("cannot build the HTTP client", e))?
            }
        };
        Ok(HttpTransport {
            client,
            endpoint,
            gzip: self.gzip,
            timeout: self.timeout,
            min_upload_rate: self.min_upload_rate,
            credentials: self.credentials,
        })
    }
}

/// The certificates of each PEM given to `add_root_certificate`.
#[cfg(feature = "rustls")]
fn root_certificates(pems: &[Vec<u8>]) -> Result<Vec<reqwest::Certificate>> {
    let mut certificates = Vec::new();
    for pem in pems {
        let found =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| Error::InvalidConfig {
                reason: format!("root certificate: not a PEM certificate: {e}"),
            })?;
        if found.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "root certificate: the PEM holds no CERTIFICATE".into(),
            });
        }
        certificates.extend(found);
    }
    Ok(certificates)
}

fn network(message: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Network {
        message: format!("{message}: {e}"),
        source: Some(Box::new(e)),
    }
}

fn gzip(body: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(body)
        .and_then(|_| encoder.finish())
        .map_err(|e| network("gzip failed", e))
}

impl<C: Credentials> Transport for HttpTransport<C> {
    async fn send(&self, push: Push) -> Result<Response> {
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self.credentials.headers(push.refresh_credentials).await? {
            let name = HeaderName::try_from(name.as_str()).map_err(|e| Error::InvalidConfig {
                reason: format!("credentials header name {name:?}: {e}"),
            })?;
            let value = HeaderValue::try_from(value).map_err(|e| Error::InvalidConfig {
                reason: format!("credentials header {name} has an invalid value: {e}"),
            })?;
            request = request.header(name, value);
        }
        let body = if self.gzip {
            request = request.header(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gzip(&push.body)?
        } else {
            push.body
        };
        let allowed = time_allowed(self.timeout, body.len(), self.min_upload_rate);
        let progress = Arc::new(Progress::new());
        let sending = request
            .timeout(allowed)
            .body(reqwest::Body::wrap(SignallingBody {
                data: bytes::Bytes::from(body),
                progress: Arc::clone(&progress),
                sent: push.sent,
            }))
            .send();
        let response = tokio::select! {
            response = sending => response.map_err(|e| Error::Network {
                message: describe(&e),
                source: Some(Box::new(e)),
            })?,
            () = progress.stalled(self.timeout) => {
                return Err(Error::Network {
                    message: format!(
                        "timed out: the upload made no progress for {:?}",
                        self.timeout
                    ),
                    source: None,
                });
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Timestamp::now()));
        let body = response
            .bytes()
            .await
            .map_err(|e| network("reading the answer failed", e))?;
        Ok(Response {
            status,
            retry_after,
            body: body.to_vec(),
        })
    }
}

/// When the request body last moved, for telling a slow upload (it moves)
/// from a stalled one (it does not).
struct Progress {
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last piece taken.
    last_ms: AtomicU64,
    /// The whole body was taken: from then on the answer is waited for.
    done: AtomicBool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn moved(&self) {
        let ms = self.started.elapsed().as_millis().min(u64::MAX as u128) as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once the upload has made no progress for `limit` (never,
    /// once the body is all taken).
    async fn stalled(&self, limit: Duration) {
        loop {
            if self.done.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last.elapsed() >= limit {
                return;
            }
            tokio::time::sleep_until(last + limit).await;
        }
    }
}

/// A request body of known length (so it goes with a `Content-Length`, as a
/// plain body would), handed over in [`UPLOAD_PIECE`]s so that [`Progress`]
/// sees it move, that notifies [`RequestSent`] once hyper has taken all of
/// it, or dropped it.
struct SignallingBody {
    data: bytes::Bytes,
    progress: Arc<Progress>,
    sent: RequestSent,
}

impl http_body::Body for SignallingBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Self::Data>, Self::Error>>>
    {
        self.progress.moved();
        if self.data.is_empty() {
            self.finished();
            return std::task::Poll::Ready(None);
        }
        let n = self.data.len().min(UPLOAD_PIECE);
        let piece = self.data.split_to(n);
        if self.data.is_empty() {
            // hyper may not poll again after the last piece (is_end_stream).
            self.finished();
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

impl SignallingBody {
    /// All of it was taken (or dropped): the request has left.
    fn finished(&self) {
        self.progress.done.store(true, Ordering::Relaxed);
        self.sent.notify();
    }
}

impl Drop for SignallingBody {
    fn drop(&mut self) {
        self.finished();
    }
}

/// A short description: what failed, and the innermost cause (for example
/// "cannot connect: Connection refused (os error 111)"), instead of reqwest's
/// generic "error sending request for url (...)".
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the push failed"
    };
    let mut root: &dyn std::error::Error = e;
    while let Some(cause) = root.source() {
        root = cause;
    }
    if std::ptr::addr_eq(root, e as &dyn std::error::Error) {
        what.to_owned()
    } else {
        format!("{what}: {root}")
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};

    use super::*;

    /// The request goes with a Content-Length (like a plain body, never
    /// chunked), and `sent` is notified before the answer is back: the server
    /// here only answers after checking that it was.
    #[tokio::test]
    async fn the_body_has_a_length_and_sent_fires_before_the_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/events", listener.local_addr().unwrap());
        let sent = RequestSent::new();
        let seen_by_server = sent.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_ascii_lowercase());
            }
            let length: usize = head
                .iter()
                .find_map(|h| h.strip_prefix("content-length: "))
                .expect("a content-length header")
                .parse()
                .unwrap();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            // Whole body received: the client must have said so by now.
            let start = std::time::Instant::now();
            while !seen_by_server.is_sent() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let answer = br#"{"results":[]}"#;
            write!(
                &stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            )
            .unwrap();
            (&stream).write_all(answer).unwrap();
            (head, body, seen_by_server.is_sent())
        });
        let transport = HttpTransport::new(url).unwrap();
        let payload = br#"{"protocol":1,"client_id":"c","events":[]}"#.to_vec();
        let response = transport
            .send(Push {
                body: payload.clone(),
                events: 0,
                refresh_credentials: false,
                sent,
            })
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        let (head, body, was_sent) = server.join().unwrap();
        assert_eq!(body, payload);
        assert!(
            !head.iter().any(|h| h.starts_with("transfer-encoding")),
            "{head:?}"
        );
        assert!(was_sent, "sent was not notified before the answer");
    }
}
