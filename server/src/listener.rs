//! The accept loop: HTTP/1.1 connections served with hyper, each under a
//! header-read timeout and an idle timeout, with a bound on how many are open
//! at once, and TLS when configured.
//!
//! hyper's own `header_read_timeout` runs from the moment hyper is ready to
//! read a request head, which includes the idle time between two requests of
//! a keep-alive connection, so it cannot tell "slow head" from "idle": the
//! timeouts are kept here instead, around the connection's IO (bytes read)
//! and its service (a request is being answered):
//!
//! - **Head**: from accept (and the TLS handshake) or from the first byte of a
//!   later request until hyper hands the parsed head to the router. Limited
//!   by the header timeout: a client dribbling its head a byte at a time is
//!   closed, however steadily it dribbles.
//! - **Busy**: a request is being answered (body read, handler, response).
//!   No limit here: the body limit and the handlers bound it.
//! - **Idle**: after an answer, until the next request's first byte (or the
//!   last byte of the answer's body written). Limited by the idle timeout.
//!
//! A connection over its limit is dropped (the socket closed, no answer).
//!
//! The connection bound: when a connection is accepted while
//! `max_connections` are open, the idle keep-alive connections are closed to
//! make room (as nginx does), and the loop accepts nothing more until a slot
//! frees, so further connections wait in the kernel's listen backlog (their
//! request is served once a slot frees) instead of being refused; they hold
//! no file descriptor of the process meanwhile. The timeouts above guarantee
//! slots do free up. When the backlog is full too, the kernel drops new
//! connection attempts and the clients retry them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower_service::Service;

use crate::Error;

/// Default time a client has to send a request's head (from accept, or from
/// the first byte of a later request on the same connection): 10 s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a keep-alive connection may stay silent between two
/// requests before it is closed: 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bound on connections open at once: 1024, well below the usual
/// file descriptor limit (`ulimit -n`, 1024 soft here, often 65536 in
/// containers) plus what SQLite and the logs hold; raise both together.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The connection limits of a server (see the module doc).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serve `router` on `listener` until `shutdown` completes; then stop
/// accepting, close idle connections, let requests in flight finish (still
/// under the timeouts) and return. Dropping the returned future aborts every
/// connection.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    // Every connection task holds receivers of both: `closing` tells them to
    // finish, a new `pressure` value tells idle ones to give way.
    let (closing_tx, closing_rx) = watch::channel(false);
    let (pressure_tx, pressure_rx) = watch::channel(0u64);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    warn_if_over_fd_limit(max);
    loop {
        // Finished connections (at most `max` of them are kept).
        while connections.try_join_next().is_some() {}
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A slot for it. At the bound, idle keep-alive connections are closed
        // to make room (as nginx does), and the loop accepts nothing more
        // until a slot frees: further connections wait in the backlog.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                pressure_tx.send_modify(|n| *n = n.wrapping_add(1));
                tokio::select! {
                    permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let router = router.clone();
        let tls = tls.clone();
        let mut signals = Signals {
            closing: closing_rx.clone(),
            pressure: pressure_rx.clone(),
        };
        signals.pressure.mark_unchanged();
        connections.spawn(async move {
            let _permit = permit;
            // Answers go out at once: pushes are small and latency matters.
            let _ = stream.set_nodelay(true);
            let watch = Arc::new(Watch::new());
            match tls {
                None => connection(stream, router, limits, watch, signals).await,
                Some(acceptor) => {
                    // The handshake counts against the first head's timeout.
                    let deadline = Instant::now() + limits.header_timeout;
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, router, limits, watch, signals).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The TLS settings of a server that terminates HTTPS itself: a certificate
/// chain and its private key, both PEM.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) cert_chain_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
}

impl Tls {
    /// A rustls acceptor for HTTP/1.1 when `tls` is set: rustls' safe
    /// defaults (TLS 1.2 and 1.3) on the aws-lc-rs provider, named explicitly
    /// so that another provider compiled into the binary cannot make the
    /// choice ambiguous. Fails with [`Error::Config`] on a chain without certificates, a file
    /// without a private key, or a key that does not match the certificate.
    pub(crate) fn acceptor(tls: Option<&Tls>) -> Result<Option<TlsAcceptor>, Error> {
        tls.map(Tls::build).transpose()
    }

    fn build(&self) -> Result<TlsAcceptor, Error> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("TLS certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Config(
                "TLS certificate chain: no CERTIFICATE in the PEM".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| Error::Config(format!("TLS private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| Error::Config(format!("TLS certificate and key: {e}")))?;
        // The server speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Errors of `accept`: a connection reset before it was accepted is the
/// client's business; anything else (e.g. `EMFILE`, out of file descriptors)
/// is logged and waited out for a second, as hyper 0.14 and axum do, rather
/// than spinning on it.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What the accept loop tells every connection.
struct Signals {
    /// `true`: the server is shutting down; finish the request in flight.
    closing: watch::Receiver<bool>,
    /// A new value: the connection bound is reached and a connection waits;
    /// an idle connection closes to make room.
    pressure: watch::Receiver<u64>,
}

/// Logs a warning when `max` connections (plus some room for the database,
/// the listener and logs) would not fit under the process's soft limit on
/// open files: the bound would then not keep `accept` from failing with
/// `EMFILE`. Linux only (read from /proc); silent elsewhere.
fn warn_if_over_fd_limit(max: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(soft) = soft
        && max.saturating_add(64) > soft
    {
        tracing::warn!(
            "max connections {max} is not below the open file limit {soft} (ulimit -n) \
             with room to spare: raise the limit (e.g. LimitNOFILE in systemd) or lower \
             --max-connections"
        );
    }
}

/// Serve one connection until it ends, a timeout closes it, or the server
/// closes and it has finished its request.
async fn connection<I>(io: I, router: Router, limits: Limits, watch: Arc<Watch>, signals: Signals)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Watched {
        inner: io,
        watch: watch.clone(),
    });
    let service_watch = watch.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = service_watch.busy();
        let mut router = router.clone();
        async move {
            let response = router.call(request.map(axum::body::Body::new)).await;
            drop(busy);
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // The timeouts are kept by `Watch`; hyper's would also cut idle
        // keep-alive connections at the header timeout.
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let Signals {
        mut closing,
        mut pressure,
    } = signals;
    let mut closing_seen = *closing.borrow();
    let mut pressure_gone = false;
    if closing_seen {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let deadline = watch.deadline(&limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = sleep_until(deadline) => {
                if watch.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!("connection closed: {}", watch.phase_name());
                    return;
                }
            }
            () = watch.changed.notified() => {}
            changed = pressure.changed(), if !pressure_gone => {
                if changed.is_err() {
                    pressure_gone = true;
                } else if watch.is_idle() {
                    tracing::debug!("idle connection closed: the connection bound is reached");
                    return;
                }
            }
            changed = closing.changed(), if !closing_seen => {
                if changed.is_err() || *closing.borrow() {
                    closing_seen = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What a connection is doing, and since when (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

#[derive(Debug)]
struct WatchState {
    phase: Phase,
    since: Instant,
}

/// The phase of one connection, shared by its IO (bytes read and written),
/// its service (requests in flight) and its task (the deadline).
#[derive(Debug)]
struct Watch {
    state: Mutex<WatchState>,
    /// Woken when the deadline may have moved earlier (Idle to Head) or
    /// appeared (Busy to Idle).
    changed: Notify,
}

impl Watch {
    fn new() -> Self {
        Watch {
            state: Mutex::new(WatchState {
                phase: Phase::Head,
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // The state is two plain fields: a panic elsewhere leaves it valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let state = self.lock();
        match state.phase {
            Phase::Head => Some(state.since + limits.header_timeout),
            Phase::Idle => Some(state.since + limits.idle_timeout),
            Phase::Busy => None,
        }
    }

    fn is_idle(&self) -> bool {
        self.lock().phase == Phase::Idle
    }

    fn phase_name(&self) -> &'static str {
        match self.lock().phase {
            Phase::Head => "header timeout",
            Phase::Idle => "idle timeout",
            Phase::Busy => "busy",
        }
    }

    /// Bytes arrived: an idle connection starts a request head.
    fn read(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Idle {
            state.phase = Phase::Head;
            state.since = Instant::now();
            drop(state);
            self.changed.notify_one();
        }
    }

    /// Bytes of an answer went out: an idle connection that is still
    /// sending a body is not idle.
    fn wrote(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Idle {
            state.since = Instant::now();
        }
    }

    /// A request head was parsed: the connection is busy until the guard drops.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        let mut state = self.lock();
        state.phase = Phase::Busy;
        state.since = Instant::now();
        BusyGuard(self.clone())
    }
}

/// Ends the busy phase of a connection when its answer is ready (or the
/// request was abandoned).
struct BusyGuard(Arc<Watch>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.phase = Phase::Idle;
        state.since = Instant::now();
        drop(state);
        self.0.changed.notify_one();
    }
}

/// A connection's IO that reports progress to its [`Watch`].
struct Watched<I> {
    inner: I,
    watch: Arc<Watch>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.read();
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.wrote();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.wrote();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
