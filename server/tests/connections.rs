//! The server's connections (issue 12, item 3): the header-read timeout, the
//! idle timeout and the bound on open connections, each with short
//! configured values; a real push is answered during a slow-header flood.
//! And HTTPS terminated by the server (item 5), with a certificate made at
//! test time. Real servers on 127.0.0.1, raw TCP and TLS clients. No timed
//! assertions: "closed" is an end of stream read within a generous
//! deadline, "served" an answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use edge_outbox::protocol::{PROTOCOL_VERSION, PushRequest, WireEvent};
use edge_outbox::{EventId, Timestamp};
use edge_outbox_server::{RunningServer, ServerConfig};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

#[path = "../../tests/support/tls.rs"]
mod tls;
use tls::TestPki;

const CLIENT: &str = "0192f0c1-7c1e-7000-8000-0000000000c1";
/// Far beyond anything the tests wait for: "never" in a test.
const NEVER: Duration = Duration::from_secs(3600);
/// How long a test waits for something that must happen (a close, an
/// answer) before it fails: generous, so a slow machine does not fail it.
const GENEROUS: Duration = Duration::from_secs(60);

async fn start(configure: impl FnOnce(ServerConfig) -> ServerConfig) -> RunningServer {
    let config = ServerConfig::in_memory().allow_anonymous(true);
    edge_outbox_server::spawn(configure(config))
        .await
        .expect("server starts")
}

fn push_body(seqs: std::ops::Range<i64>) -> Vec<u8> {
    let events: Vec<WireEvent> = seqs
        .map(|seq| WireEvent {
            id: EventId::new(),
            seq,
            event_type: "OrderCreated".to_owned(),
            key: None,
            payload: RawValue::from_string(format!(r#"{{"order_id":{seq}}}"#)).unwrap(),
            headers: BTreeMap::new(),
            created_at: Timestamp::now().to_rfc3339(),
        })
        .collect();
    serde_json::to_vec(&PushRequest {
        protocol: PROTOCOL_VERSION,
        client_id: CLIENT.to_owned(),
        events,
    })
    .unwrap()
}

/// A push as raw HTTP/1.1 bytes (keep-alive).
fn push_request(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

const METRICS_REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n";

/// Reads one answer (head and a Content-Length body); returns its status
/// line, or `None` when the connection ended first.
async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("answers here have a Content-Length");
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(head.lines().next().unwrap_or_default().to_owned())
}

/// Waits (up to [`GENEROUS`]) for the server to close `stream`: an end of
/// stream or a reset. Returns the bytes the server sent before closing.
async fn closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let read_all = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(GENEROUS, read_all)
        .await
        .expect("the server closes the connection");
    got
}

/// Sends `head` a byte at a time, one every `every`, forever (it never
/// ends its head): returns when the server has closed the connection, with
/// the bytes it answered.
async fn dribble(addr: SocketAddr, every: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let (mut read, mut write) = stream.split();
    let mut answered = Vec::new();
    let mut chunk = [0u8; 1024];
    let head = b"POST /v1/events HTTP/1.1\r\nHost: test\r\nX-Padding: ";
    let mut sent = 0usize;
    loop {
        tokio::select! {
            r = read.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return answered,
                Ok(n) => answered.extend_from_slice(&chunk[..n]),
            },
            () = tokio::time::sleep(every) => {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                sent += 1;
                if write.write_all(&[byte]).await.is_err() {
                    return answered;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_slow_header_is_closed_after_the_header_timeout() {
    let server = start(|c| {
        c.header_timeout(Duration::from_millis(500))
            .idle_timeout(NEVER)
    })
    .await;
    // A byte every 50 ms: steady progress, but the head never completes.
    let answered =
        tokio::time::timeout(GENEROUS, dribble(server.addr(), Duration::from_millis(50)))
            .await
            .expect("the slow header is cut");
    assert!(
        answered.is_empty(),
        "closed without an answer, got {:?}",
        String::from_utf8_lossy(&answered)
    );

    // Silence from the start is a head that never comes, too.
    let mut silent = TcpStream::connect(server.addr()).await.unwrap();
    assert!(closed(&mut silent).await.is_empty());

    // A prompt request is still answered on a fresh connection.
    let mut prompt = TcpStream::connect(server.addr()).await.unwrap();
    prompt.write_all(METRICS_REQUEST).await.unwrap();
    let status = read_answer(&mut prompt).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(Duration::from_millis(300))
    })
    .await;
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    // Two requests on one keep-alive connection, then silence.
    for seqs in [1..3, 3..5] {
        stream
            .write_all(&push_request(&push_body(seqs)))
            .await
            .unwrap();
        let status = read_answer(&mut stream).await.expect("push answered");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    assert!(closed(&mut stream).await.is_empty());
    assert_eq!(server.count(Some(CLIENT)).unwrap(), 4);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_answer_slower_than_the_idle_timeout_is_not_cut() {
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(Duration::from_millis(200))
    })
    .await;
    // The push is held for 5 idle timeouts after its events are committed:
    // busy, not idle.
    server.faults().delay_next(1, Duration::from_millis(1000));
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(&push_request(&push_body(1..4)))
        .await
        .unwrap();
    let status = tokio::time::timeout(GENEROUS, read_answer(&mut stream))
        .await
        .expect("answered in time")
        .expect("the slow answer arrives on its connection");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_bound_wait_for_a_free_slot() {
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(NEVER)
            .max_connections(2)
    })
    .await;
    // Two connections take both slots (accepted in connect order) and hold
    // them with an unfinished head.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        holders.push(s);
    }
    // The third connects (the kernel's backlog takes it) and asks.
    let mut third = TcpStream::connect(server.addr()).await.unwrap();
    third.write_all(METRICS_REQUEST).await.unwrap();
    let mut probe = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.peek(&mut probe)).await;
    assert!(
        early.is_err(),
        "the third connection is not served while two are open: {early:?}"
    );
    // A slot frees: the waiting request is served, on its connection.
    drop(holders.pop());
    let status = tokio::time::timeout(GENEROUS, read_answer(&mut third))
        .await
        .expect("served once a slot freed")
        .expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn at_the_bound_idle_connections_give_way_to_a_new_one() {
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(NEVER)
            .max_connections(2)
    })
    .await;
    // Two keep-alive connections, each answered once, then idle: both
    // slots are taken, and their idle timeout is never.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        s.write_all(METRICS_REQUEST).await.unwrap();
        read_answer(&mut s).await.expect("answered");
        idle.push(s);
    }
    let mut third = TcpStream::connect(server.addr()).await.unwrap();
    third.write_all(METRICS_REQUEST).await.unwrap();
    let status = tokio::time::timeout(GENEROUS, read_answer(&mut third))
        .await
        .expect("the new connection is served")
        .expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // The idle ones were closed to make room (both: each of them was idle
    // when the bound was hit).
    for mut s in idle {
        assert!(closed(&mut s).await.is_empty());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_served_during_a_slow_header_flood() {
    // Fewer slots than flooding connections: only the header timeout frees them.
    let server = start(|c| c.header_timeout(Duration::from_secs(1)).max_connections(50)).await;
    let addr = server.addr();
    let mut flood = JoinSet::new();
    for _ in 0..200 {
        flood.spawn(dribble(addr, Duration::from_millis(200)));
    }
    // Let the flood connect first, so the pushes queue behind it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    pushes_get_through(&server).await;
    // Every flooding connection was cut, none answered.
    let all_cut = tokio::time::timeout(GENEROUS, async {
        let mut cut = 0;
        while let Some(answered) = flood.join_next().await {
            assert!(answered.unwrap().is_empty(), "a slow head got an answer");
            cut += 1;
        }
        cut
    })
    .await
    .expect("the flood is cut by the header timeout");
    assert_eq!(all_cut, 200);
    server.shutdown().await.unwrap();
}

// ---------- HTTPS (issue 12, item 5) ----------

/// A TLS client that trusts only `ca_pem`.
fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

async fn tls_start(
    pki: &TestPki,
    configure: impl FnOnce(ServerConfig) -> ServerConfig,
) -> RunningServer {
    start(|c| configure(c.tls_pem(pki.cert_pem.clone(), pki.key_pem.clone()))).await
}

#[tokio::test]
async fn https_pushes_are_answered_and_plain_http_is_not() {
    let pki = TestPki::new();
    let server = tls_start(&pki, |c| c).await;
    assert!(server.events_url().starts_with("https://127.0.0.1:"));

    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut stream = tls_connector(&pki.ca_pem)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("the handshake succeeds with the CA trusted");
    // Two pushes on one keep-alive TLS connection.
    for seqs in [1..4, 4..6] {
        stream
            .write_all(&push_request(&push_body(seqs)))
            .await
            .unwrap();
        let status = read_answer(&mut stream).await.expect("push answered");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    assert_eq!(server.count(Some(CLIENT)).unwrap(), 5);

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(server.addr()).await.unwrap();
    plain.write_all(METRICS_REQUEST).await.unwrap();
    let answered = closed(&mut plain).await;
    assert!(
        !answered.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answered)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_the_header_timeout() {
    let pki = TestPki::new();
    let server = tls_start(&pki, |c| {
        c.header_timeout(Duration::from_millis(300))
            .idle_timeout(NEVER)
    })
    .await;
    // Connected, but no ClientHello ever comes.
    let mut silent = TcpStream::connect(server.addr()).await.unwrap();
    assert!(closed(&mut silent).await.is_empty());
    // A client that completes its handshake and asks is served.
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut stream = tls_connector(&pki.ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.write_all(METRICS_REQUEST).await.unwrap();
    let status = read_answer(&mut stream).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_certificate_fails_its_handshake() {
    let pki = TestPki::new();
    let server = tls_start(&pki, |c| c).await;
    let stranger = TestPki::new();
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let err = tls_connector(&stranger.ca_pem)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect_err("an unknown issuer is refused");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unusable_tls_files_fail_the_start() {
    let pki = TestPki::new();
    for (cert, key, expected) in [
        (
            "not a pem".to_owned(),
            pki.key_pem.clone(),
            "no CERTIFICATE",
        ),
        (
            pki.cert_pem.clone(),
            "not a pem".to_owned(),
            "TLS private key",
        ),
        // A key that is not the certificate's.
        (
            pki.cert_pem.clone(),
            TestPki::new().key_pem,
            "certificate and key",
        ),
    ] {
        let err = edge_outbox_server::spawn(ServerConfig::in_memory().tls_pem(cert, key))
            .await
            .expect_err("the server does not start");
        assert!(
            matches!(&err, edge_outbox_server::Error::Config(m) if m.contains(expected)),
            "{err}"
        );
    }
}

// ---------- slow bodies and refusals before the body (breaker probes) ----------

/// Sends a push head declaring `declared` body bytes, then the body a byte
/// at a time, one every `every`, never finishing it: returns what the
/// server answered before it closed the connection.
async fn dribble_body(
    addr: SocketAddr,
    head_extra: &str,
    declared: usize,
    every: Duration,
) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         {head_extra}Content-Length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = stream.split();
    let mut answered = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        tokio::select! {
            r = read.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return answered,
                Ok(n) => answered.extend_from_slice(&chunk[..n]),
            },
            () = tokio::time::sleep(every) => {
                if write.write_all(b" ").await.is_err() {
                    return answered;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_slow_body_is_answered_408_and_its_connection_closed() {
    // One slot, and neither the head nor the idle timeout will free it.
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(NEVER)
            .body_timeout(Duration::from_millis(500))
            .max_connections(1)
    })
    .await;
    // The head at once, then a byte every 100 ms: far below 1 KiB/s.
    let answered = tokio::time::timeout(
        GENEROUS,
        dribble_body(server.addr(), "", 10_000, Duration::from_millis(100)),
    )
    .await
    .expect("the slow body is cut");
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    assert!(answered.contains("request_timeout"), "{answered}");
    // The slot is free again: a prompt push is served.
    let mut prompt = TcpStream::connect(server.addr()).await.unwrap();
    prompt
        .write_all(&push_request(&push_body(1..3)))
        .await
        .unwrap();
    let status = tokio::time::timeout(GENEROUS, read_answer(&mut prompt))
        .await
        .expect("served once the slow body was cut")
        .expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(server.count(Some(CLIENT)).unwrap(), 2);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_served_during_a_slow_body_flood() {
    // Fewer slots than flooding connections, head and idle timeouts at
    // "never": only the body pace frees the slots.
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(NEVER)
            .body_timeout(Duration::from_secs(1))
            .max_connections(20)
    })
    .await;
    let addr = server.addr();
    let mut flood = JoinSet::new();
    for _ in 0..100 {
        flood.spawn(dribble_body(addr, "", 100_000, Duration::from_millis(200)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pushes_get_through(&server).await;
    // Every flooding connection was cut: 408 (or a reset that lost it).
    let cut = tokio::time::timeout(GENEROUS, async {
        let mut cut = 0;
        while let Some(answered) = flood.join_next().await {
            let answered = answered.unwrap();
            assert!(
                answered.is_empty() || answered.starts_with(b"HTTP/1.1 408"),
                "{:?}",
                String::from_utf8_lossy(&answered)
            );
            cut += 1;
        }
        cut
    })
    .await
    .expect("the flood is cut by the body pace");
    assert_eq!(cut, 100);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_body_that_keeps_the_pace_is_read_however_long_it_takes() {
    let server = start(|c| {
        c.header_timeout(NEVER)
            .idle_timeout(NEVER)
            .body_timeout(Duration::from_secs(2))
    })
    .await;
    // About 40 KiB in 5 pieces 600 ms apart: 3 s in all, over the 2 s base,
    // but each 8 KiB piece earns 8 s at the minimum rate (1 KiB/s).
    let mut seqs = 1..200;
    let body = loop {
        let body = push_body(seqs.clone());
        if body.len() >= 40 * 1024 {
            break body;
        }
        seqs = 1..seqs.end * 2;
    };
    let request = push_request(&body);
    let (head_len, pieces) = (request.len() - body.len(), 5);
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(&request[..head_len]).await.unwrap();
    for piece in body.chunks(body.len().div_ceil(pieces)) {
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(piece).await.unwrap();
    }
    let status = tokio::time::timeout(GENEROUS, read_answer(&mut stream))
        .await
        .expect("answered")
        .expect("the paced body is read");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(
        server.count(Some(CLIENT)).unwrap(),
        u64::try_from(seqs.end - 1).unwrap()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_push_without_the_right_is_answered_without_waiting_for_its_body() {
    let server = start(|c| {
        c.allow_anonymous(false)
            .token("token-a", CLIENT)
            .reader_token("reader")
            .header_timeout(NEVER)
            .idle_timeout(NEVER)
            .body_timeout(Duration::from_secs(2))
    })
    .await;
    // A bad token, a reader token (no push right), no token: a head that
    // declares a body which never comes is answered anyway (its body is
    // waited for only as long as the body pace allows) and closed.
    for auth in [
        "Authorization: Bearer nope\r\n",
        "Authorization: Bearer reader\r\n",
        "",
    ] {
        let answered =
            tokio::time::timeout(GENEROUS, dribble_body(server.addr(), auth, 100_000, NEVER))
                .await
                .expect("answered and closed without the body");
        let answered = String::from_utf8_lossy(&answered);
        assert!(
            answered.starts_with("HTTP/1.1 401") || answered.starts_with("HTTP/1.1 403"),
            "{auth:?}: {answered}"
        );
    }
    // A refused push whose body does come is drained: the answer arrives
    // whole and the connection serves the next request.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    let body = push_body(1..3);
    let mut request = push_request(&body);
    let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    request.splice(at..at, b"Authorization: Bearer nope\r\n".iter().copied());
    stream.write_all(&request).await.unwrap();
    let status = read_answer(&mut stream).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    stream.write_all(METRICS_REQUEST).await.unwrap();
    let status = read_answer(&mut stream).await.expect("still open");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // A client that waits for "100 Continue" is refused without being
    // asked for its body at all.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer nope\r\n\
              Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
        )
        .await
        .unwrap();
    let status = read_answer(&mut stream).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    // A body naming its client twice is not a push for either.
    let body = String::from_utf8(push_body(1..2)).unwrap();
    let twice = body.replacen(
        "\"client_id\":",
        "\"client_id\":\"other\",\"client_id\":",
        1,
    );
    let mut request = push_request(twice.as_bytes());
    let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    request.splice(at..at, b"Authorization: Bearer token-a\r\n".iter().copied());
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let status = read_answer(&mut stream).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert_eq!(server.count(None).unwrap(), 0);
    server.shutdown().await.unwrap();
}

/// The server speaks HTTP/1.1 only: an HTTP/2 client (prior knowledge) is
/// closed at once, so HTTP/2's stream floods (rapid reset) do not apply; an
/// `Upgrade: h2c` is ignored and answered in HTTP/1.1. A head over hyper's
/// limits (many headers, a 1 MiB bearer token) is answered `431` without
/// being parsed further. With the head timeout at "never", each close
/// below is the server's refusal, not a timeout.
#[tokio::test]
async fn http2_and_oversized_heads_are_refused_at_once() {
    let server = start(|c| c.header_timeout(NEVER).idle_timeout(NEVER)).await;
    let mut h2 = TcpStream::connect(server.addr()).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(closed(&mut h2).await.is_empty());

    let mut upgrade = TcpStream::connect(server.addr()).await.unwrap();
    upgrade
        .write_all(
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await
        .unwrap();
    let status = read_answer(&mut upgrade).await.expect("answered");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let mut many = b"GET /healthz HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 0..200 {
        many.extend(format!("X-H{i}: v\r\n").as_bytes());
    }
    let mut long = b"GET /v1/events HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 1 << 20));
    for (mut head, whole) in [(many, true), (long, false)] {
        head.extend(b"\r\n\r\n");
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        // The server may close before the whole 1 MiB is written.
        let _ = stream.write_all(&head).await;
        let answered = closed(&mut stream).await;
        // Closing on a client still writing is a reset, which may cost the
        // client the 431 (the 1 MiB head): then nothing at all was answered.
        assert!(
            answered.starts_with(b"HTTP/1.1 431") || (!whole && answered.is_empty()),
            "{:?}",
            String::from_utf8_lossy(&answered)
        );
    }
    server.shutdown().await.unwrap();
}

/// The static directory is the only one served: `..` in every spelling
/// (raw, percent-encoded, encoded slash or backslash) stays inside it.
#[tokio::test]
async fn static_files_stay_inside_their_directory() {
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir(site.path().join("www")).unwrap();
    std::fs::write(site.path().join("www/index.html"), "demo").unwrap();
    std::fs::write(site.path().join("secret.txt"), "SECRET").unwrap();
    let server = start(|c| c.static_dir(site.path().join("www"))).await;
    for path in [
        "/index.html",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/.%2e/secret.txt",
        "//..//secret.txt",
        "/..\\secret.txt",
        "/%5c..%5csecret.txt",
    ] {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let answered = closed(&mut stream).await;
        let answered = String::from_utf8_lossy(&answered);
        if path == "/index.html" {
            assert!(answered.starts_with("HTTP/1.1 200") && answered.ends_with("demo"));
        } else {
            assert!(answered.starts_with("HTTP/1.1 404"), "{path}: {answered}");
            assert!(!answered.contains("SECRET"), "{path}: {answered}");
        }
    }
    server.shutdown().await.unwrap();
}

/// Three pushes of 10 events each, on fresh connections, are answered 200
/// while a flood holds the server's connections, and all 30 are stored.
async fn pushes_get_through(server: &RunningServer) {
    let addr = server.addr();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for round in 0..3i64 {
        let answer = tokio::time::timeout(
            GENEROUS,
            client
                .post(format!("http://{addr}/v1/events"))
                .header("content-type", "application/json")
                .body(push_body(round * 10..round * 10 + 10))
                .send(),
        )
        .await
        .expect("the push is answered during the flood")
        .expect("the push gets an answer");
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(server.count(Some(CLIENT)).unwrap(), 30);
}
