//! A fault-injecting TCP proxy on 127.0.0.1, put between the relay's HTTP
//! transport and the reference server in native tests: a slow uplink, a
//! refused connection, an early `413` that arrives as a connection reset.
//!
//! Include it from a test file with
//! `#[path = "support/fault_proxy.rs"] mod fault_proxy;`
//! (it is not a test binary on its own); its self-tests then run in that
//! binary too. It needs tokio's `net`, `time`, `io-util` and `macros`
//! features, which the dev-dependencies have (the server crate brings them).
//!
//! ```ignore
//! let server = edge_outbox_server::spawn(config).await?;
//! let proxy = FaultProxy::start(server.addr()).await;
//! proxy.set_mode(Mode::ThrottleUpload { bytes_per_sec: 8 * 1024 });
//! let outbox = Outbox::open(path, Config::new(proxy.events_url()))?;
//! ```
//!
//! The proxy speaks just enough HTTP/1.1 to see where each request starts:
//! on every connection (keep-alive included) it reads each request head,
//! applies the mode current at that moment, and forwards the head and its
//! `Content-Length` body; answers come back unchanged and unthrottled. So
//! [`FaultProxy::set_mode`] takes effect at the next request even on a
//! connection the client keeps in its pool, and throttling (read again for
//! every chunk) also slows an upload under way. A chunked request is
//! forwarded with `Connection: close` and the rest of its connection passes
//! as it comes. Something that is not HTTP/1.x, or a head over 64 KiB, gets
//! its connection reset. Dropping the proxy closes its listener and every
//! connection through it.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head [`Mode::EarlyRejectAbove`] reads; a longer one gets
/// its connection reset.
const MAX_HEAD: usize = 64 * 1024;

/// Bytes moved per read in unthrottled directions.
const BUF: usize = 16 * 1024;

/// What the proxy does, decided at each request head (and, for
/// throttling, at each chunk of an upload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward requests and answers unchanged (the default).
    Pass,
    /// A new connection is accepted, then closed at once with a reset
    /// (`SO_LINGER` 0) before anything is read; a request arriving on a
    /// connection already open is answered the same way. The client sees
    /// "connection reset" (or a closed connection); upstream sees nothing.
    Refuse,
    /// A slow uplink: client->server bytes go at most `bytes_per_sec`, in
    /// chunks of about 50 ms of data, each followed by a sleep as long as it
    /// takes at that rate (`0` counts as 1); server->client bytes go
    /// unthrottled. At most one read (16 KiB) is held in the proxy; the rest
    /// waits in the client's socket, as over a real slow link.
    ThrottleUpload {
        /// Upload rate in bytes per second.
        bytes_per_sec: u64,
    },
    /// A proxy or CDN with a body limit: a request whose `Content-Length` is
    /// over `body_bytes` is answered `413 Payload Too Large` with
    /// `Connection: close` as soon as its head is read, and the socket is
    /// closed WITHOUT reading the body (the unread bytes make the kernel
    /// send a reset, so a client still uploading usually sees "connection
    /// reset" rather than the 413). Nothing of it reaches upstream, and
    /// [`FaultProxy::requests_cut`] counts it. Requests at or below the
    /// limit are forwarded, on the same keep-alive connection. A chunked
    /// body is cut the same way once more than `body_bytes` of it (framing
    /// included) has come, though its head has reached upstream by then.
    EarlyRejectAbove {
        /// Largest body forwarded, in bytes.
        body_bytes: usize,
    },
}

/// A TCP proxy on `127.0.0.1:0` in front of one upstream address, running
/// on the current tokio runtime; see the [module docs](self).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    connections: AtomicUsize,
    requests_cut: AtomicUsize,
    uploaded: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and forward to `upstream`, in [`Mode::Pass`].
    /// Must be called within a tokio runtime; panics if it cannot bind.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("the fault proxy binds 127.0.0.1:0");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Pass),
            connections: AtomicUsize::new(0),
            requests_cut: AtomicUsize::new(0),
            uploaded: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    /// The proxy's address (connect here instead of upstream).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1/events`: the reference server's push
    /// endpoint, through the proxy.
    pub fn events_url(&self) -> String {
        format!("http://{}/v1/events", self.addr)
    }

    /// Switch modes: from the next request on, on new connections and on
    /// those already open (throttling: from the next chunk of an upload).
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Connections accepted so far, in any mode.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests that [`Mode::EarlyRejectAbove`] answered `413` and cut.
    pub fn requests_cut(&self) -> usize {
        self.shared.requests_cut.load(Ordering::SeqCst)
    }

    /// Client->server bytes forwarded to upstream so far (request heads
    /// included).
    pub fn bytes_uploaded(&self) -> u64 {
        self.shared.uploaded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    /// Stops accepting and aborts every connection's task, which closes its
    /// sockets: nothing keeps trickling after the proxy is gone.
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Accept connections until aborted; the connection tasks live in a
/// [`JoinSet`] owned by this task, so aborting it aborts them all.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors, say: wait, do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        while conns.try_join_next().is_some() {}
        if shared.mode() == Mode::Refuse {
            reset(stream);
        } else {
            conns.spawn(connection(stream, Arc::clone(&shared)));
        }
    }
}

/// Close `stream` with a reset rather than a clean close.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Why the client->upstream direction stopped.
enum Stop {
    /// The client finished sending (EOF), and upstream was told.
    Done,
    /// A socket failed, or the client sent something that is not HTTP/1.1.
    Failed,
    /// The mode is [`Mode::Refuse`] at a request's head.
    Refused,
    /// A request over [`Mode::EarlyRejectAbove`]'s limit.
    TooLarge,
}

/// One client connection: forward its requests (checked and throttled as
/// the mode says) to an upstream connection, opened once the first request
/// has passed its check, and upstream's bytes back unchanged, until either
/// side is done.
async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let (mut cr, mut cw) = client.into_split();
    let mut buf = Vec::with_capacity(BUF);
    let first = match read_head(&mut cr, &mut buf).await {
        Ok(Some(end)) => check(&buf[..end], &shared).map(|_| ()),
        Ok(None) => return,
        Err(stop) => Err(stop),
    };
    if let Err(stop) = first {
        return finish(stop, cr, cw, &shared).await;
    }
    let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
        return finish(Stop::Failed, cr, cw, &shared).await;
    };
    let _ = cw.as_ref().set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut ur, mut uw) = upstream.into_split();
    let stop = {
        let mut down = Box::pin(async {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
            let _ = cw.shutdown().await;
        });
        tokio::select! {
            stop = requests(&mut cr, &mut uw, &shared, buf) => match stop {
                // All sent: wait for the whole answer.
                Stop::Done => {
                    down.await;
                    return;
                }
                other => other,
            },
            () = &mut down => return,
        }
    };
    finish(stop, cr, cw, &shared).await;
}

/// End a client connection as `stop` says.
async fn finish(stop: Stop, cr: OwnedReadHalf, mut cw: OwnedWriteHalf, shared: &Shared) {
    match stop {
        Stop::Done => {}
        Stop::Failed | Stop::Refused => {
            if let Ok(client) = cr.reunite(cw) {
                reset(client);
            }
        }
        Stop::TooLarge => {
            shared.requests_cut.fetch_add(1, Ordering::SeqCst);
            let _ = cw.write_all(TOO_LARGE).await;
            // Dropping the halves with the body unread: the kernel answers
            // what the client still sends with a reset. No lingering close.
        }
    }
}

/// Read until `buf` holds a whole request head; its length, or `None` at a
/// clean EOF before any byte of one.
async fn read_head(from: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> Result<Option<usize>, Stop> {
    loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > MAX_HEAD {
            return Err(Stop::Failed);
        }
        match read_more(from, buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(Stop::Failed),
            Ok(_) => {}
        }
    }
}

/// Apply the current mode to a request head: its parsed form and the body
/// limit in force, or why the request stops here.
fn check(head: &[u8], shared: &Shared) -> Result<(Head, Option<u64>), Stop> {
    let parsed = parse_head(head).ok_or(Stop::Failed)?;
    let limit = match shared.mode() {
        Mode::Refuse => return Err(Stop::Refused),
        Mode::EarlyRejectAbove { body_bytes } => Some(body_bytes as u64),
        Mode::Pass | Mode::ThrottleUpload { .. } => None,
    };
    if limit.is_some_and(|l| parsed.content_length > l) {
        return Err(Stop::TooLarge);
    }
    Ok((parsed, limit))
}

/// What the proxy needs from a request head.
struct Head {
    content_length: u64,
    chunked: bool,
}

fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next()?;
    if !request_line.ends_with("HTTP/1.1") && !request_line.ends_with("HTTP/1.0") {
        return None;
    }
    let mut parsed = Head {
        content_length: 0,
        chunked: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            parsed.content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            parsed.chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Some(parsed)
}

/// `head` with its `Connection` header replaced by `Connection: close`.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + 20);
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        let name = line.split_once(':').map(|(k, _)| k.trim());
        if name.is_some_and(|k| {
            k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive")
        }) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Read more from the client into `buf`; `Ok(0)` at EOF.
async fn read_more(from: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let start = buf.len();
    buf.resize(start + BUF, 0);
    let n = from.read(&mut buf[start..]).await;
    buf.truncate(start + *n.as_ref().unwrap_or(&0));
    n
}

/// Forward the client's requests one by one. At each head the current mode
/// decides (refuse, cut, forward); a `Content-Length` body is forwarded
/// exactly, then the next head is read (keep-alive); after a chunked head
/// (forwarded with `Connection: close`) the rest of the connection is
/// forwarded as it comes.
async fn requests(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    shared: &Shared,
    mut buf: Vec<u8>,
) -> Stop {
    // `buf`: bytes read from the client and not forwarded yet.
    loop {
        let head_end = match read_head(from, &mut buf).await {
            Ok(Some(end)) => end,
            Ok(None) => {
                let _ = to.shutdown().await;
                return Stop::Done;
            }
            Err(stop) => return stop,
        };
        let (head, limit) = match check(&buf[..head_end], shared) {
            Ok(checked) => checked,
            Err(stop) => return stop,
        };
        if head.chunked {
            let mut rest = buf.split_off(head_end);
            if send(to, &closing(&buf), shared).await.is_err() {
                return Stop::Failed;
            }
            let mut counted = 0u64;
            loop {
                counted += rest.len() as u64;
                if limit.is_some_and(|l| counted > l) {
                    return Stop::TooLarge;
                }
                if send(to, &rest, shared).await.is_err() {
                    return Stop::Failed;
                }
                rest.clear();
                match read_more(from, &mut rest).await {
                    Ok(0) => {
                        let _ = to.shutdown().await;
                        return Stop::Done;
                    }
                    Ok(_) => {}
                    Err(_) => return Stop::Failed,
                }
            }
        }
        let mut remaining = head.content_length;
        let take = (head_end as u64 + remaining).min(buf.len() as u64) as usize;
        if send(to, &buf[..take], shared).await.is_err() {
            return Stop::Failed;
        }
        remaining -= (take - head_end) as u64;
        buf.drain(..take);
        while remaining > 0 {
            // `buf` is empty here: the body's rest comes from the socket.
            match read_more(from, &mut buf).await {
                Ok(0) | Err(_) => return Stop::Failed,
                Ok(_) => {}
            }
            let take = remaining.min(buf.len() as u64) as usize;
            if send(to, &buf[..take], shared).await.is_err() {
                return Stop::Failed;
            }
            remaining -= take as u64;
            buf.drain(..take);
        }
    }
}

/// Write `bytes` upstream; throttled, in chunks of about 50 ms each followed
/// by a sleep as long as the chunk takes at the rate. The mode is read again
/// for every chunk, so a switch applies to a transfer under way.
async fn send(to: &mut OwnedWriteHalf, bytes: &[u8], shared: &Shared) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let rate = match shared.mode() {
            Mode::ThrottleUpload { bytes_per_sec } => Some(bytes_per_sec.max(1)),
            _ => None,
        };
        let n = rate.map_or(rest.len(), |r| {
            ((r / 20).clamp(1, BUF as u64) as usize).min(rest.len())
        });
        to.write_all(&rest[..n]).await?;
        shared.uploaded.fetch_add(n as u64, Ordering::SeqCst);
        if let Some(rate) = rate {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// The answer to a request over the limit.
const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\n\
Content-Type: text/plain\r\n\
Content-Length: 33\r\n\
Connection: close\r\n\
\r\n\
request body over the proxy limit";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod fault_proxy_tests {
    use super::*;
    use std::time::Instant;

    /// A plain HTTP/1.1 upstream: reads one request (head + Content-Length
    /// body), answers `200` with the body's length as text, and closes.
    struct Upstream {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for Upstream {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn upstream() -> Upstream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = Arc::clone(&r);
                conns.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = vec![0u8; BUF];
                    let head_end = loop {
                        if let Some(i) = find(&buf, b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .split("\r\n")
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if head.contains("transfer-encoding: chunked") {
                        // Until the last chunk; no answer before it.
                        while find(&buf[head_end..], b"0\r\n\r\n").is_none() {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                    let mut got = buf.len() - head_end;
                    while got < length {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got += n,
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let text = got.to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Upstream {
            addr,
            connections,
            requests,
            task,
        }
    }

    /// Send a POST with a `len`-byte body on `s` and read the whole answer.
    async fn post_on(mut s: TcpStream, len: usize) -> std::io::Result<String> {
        let head =
            format!("POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        let body = vec![b'x'; len];
        // A write may fail once the proxy has cut the request: the answer
        // (or the reset) is what counts, so read either way.
        let _ = s.write_all(&body).await;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    async fn post(addr: SocketAddr, len: usize) -> std::io::Result<String> {
        post_on(TcpStream::connect(addr).await?, len).await
    }

    #[tokio::test]
    async fn fault_proxy_passes_requests_through() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        let answer = post(proxy.addr(), 10_000).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n10000"), "{answer}");
        assert_eq!(proxy.connections(), 1);
        assert_eq!(up.requests.load(Ordering::SeqCst), 1);
        assert!(proxy.bytes_uploaded() > 10_000);
    }

    #[tokio::test]
    async fn fault_proxy_throttles_uploads_also_on_open_connections() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        // Connected while passing; throttled from the next chunk on.
        let s = TcpStream::connect(proxy.addr()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy.set_mode(Mode::ThrottleUpload {
            bytes_per_sec: 32 * 1024,
        });
        let started = Instant::now();
        let answer = post_on(s, 64 * 1024).await.unwrap();
        let took = started.elapsed();
        assert!(answer.ends_with("\r\n\r\n65536"), "{answer}");
        // 64 KiB at 32 KiB/s is 2 s; allow for the first chunk's head start.
        assert!(took >= Duration::from_millis(1500), "took {took:?}");

        // Back to passing: fast again (no upper bound asserted, just done).
        proxy.set_mode(Mode::Pass);
        let answer = post(proxy.addr(), 64 * 1024).await.unwrap();
        assert!(answer.ends_with("\r\n\r\n65536"), "{answer}");
    }

    #[tokio::test]
    async fn fault_proxy_refuses_connections() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        proxy.set_mode(Mode::Refuse);
        match post(proxy.addr(), 100).await {
            Ok(answer) => assert!(answer.is_empty(), "{answer}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionAborted
                ),
                "{e:?}"
            ),
        }
        assert_eq!(proxy.connections(), 1);
        assert_eq!(up.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn fault_proxy_cuts_a_large_request_early_and_passes_small_ones() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        proxy.set_mode(Mode::EarlyRejectAbove {
            body_bytes: 64 * 1024,
        });
        match post(proxy.addr(), 1024 * 1024).await {
            Ok(answer) => assert!(
                answer.starts_with("HTTP/1.1 413 Payload Too Large"),
                "{answer}"
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionAborted
                ),
                "{e:?}"
            ),
        }
        assert_eq!(proxy.requests_cut(), 1);
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            0,
            "never reached upstream"
        );

        // At the limit: forwarded, one request per connection.
        for _ in 0..2 {
            let answer = post(proxy.addr(), 64 * 1024).await.unwrap();
            assert!(answer.ends_with("\r\n\r\n65536"), "{answer}");
        }
        assert_eq!(up.requests.load(Ordering::SeqCst), 2);
        assert_eq!(proxy.requests_cut(), 1);
    }

    #[tokio::test]
    async fn fault_proxy_cuts_a_chunked_body_over_the_limit() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        proxy.set_mode(Mode::EarlyRejectAbove { body_bytes: 1024 });
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let chunk = format!("1000\r\n{}\r\n", "y".repeat(0x1000));
        let _ = s.write_all(chunk.as_bytes()).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("the proxy closes the connection");
        if read.is_ok() {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        }
        assert_eq!(proxy.requests_cut(), 1);
        assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn fault_proxy_stops_trickling_when_dropped() {
        let up = upstream().await;
        let proxy = FaultProxy::start(up.addr).await;
        proxy.set_mode(Mode::ThrottleUpload {
            bytes_per_sec: 1024,
        });
        let addr = proxy.addr();
        let client = tokio::spawn(post(addr, 64 * 1024));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(proxy.bytes_uploaded() > 0, "bytes trickle");
        drop(proxy);
        let answer = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("the client's connection ends when the proxy is dropped")
            .unwrap();
        // A closed or reset connection, never an answer from upstream.
        assert!(answer.map_or(true, |a| a.is_empty()));
        assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    }

    /// Against the reference server with reqwest (keep-alive, as the relay's
    /// transport): a new mode applies to the next request on a pooled
    /// connection.
    #[tokio::test]
    async fn fault_proxy_applies_a_new_mode_to_a_kept_alive_connection() {
        let server = edge_outbox_server::spawn(
            edge_outbox_server::ServerConfig::in_memory().allow_anonymous(true),
        )
        .await
        .unwrap();
        let proxy = FaultProxy::start(server.addr()).await;
        let client = reqwest::Client::new();
        let push = |body: String| client.post(proxy.events_url()).body(body).send();
        let small = || r#"{"protocol":1,"client_id":"c","events":[]}"#.to_owned();
        for _ in 0..2 {
            assert_eq!(push(small()).await.unwrap().status(), 200);
        }
        proxy.set_mode(Mode::EarlyRejectAbove {
            body_bytes: 64 * 1024,
        });
        assert_eq!(push(small()).await.unwrap().status(), 200);
        assert_eq!(proxy.connections(), 1, "one kept-alive connection");

        let logged = server.requests().len();
        let big = format!(
            r#"{{"protocol":1,"client_id":"c","events":[],"x":"{}"}}"#,
            "z".repeat(1 << 20)
        );
        if let Ok(answer) = push(big).await {
            assert_eq!(answer.status(), 413);
        }
        assert_eq!(proxy.requests_cut(), 1);
        assert_eq!(server.requests().len(), logged, "never reached the server");
        assert_eq!(push(small()).await.unwrap().status(), 200);

        proxy.set_mode(Mode::Refuse);
        assert!(push(small()).await.is_err());
        proxy.set_mode(Mode::Pass);
        assert_eq!(push(small()).await.unwrap().status(), 200);
        assert_eq!(server.requests().len(), logged + 2);
    }
}
