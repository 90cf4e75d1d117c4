//! The server's push body reader (server/src/http.rs `read_body`) behind the
//! same gzip decompression layer as the router, on bodies cut into frames.
//!
//! Input: byte 0 = flags, bytes 1-2 = the limit (big-endian, bytes), byte 3
//! = frame size (0: one frame), byte 4.. = the data. Flags bit 0: the data
//! is the body's inflated content and is gzipped here (else it is sent as
//! is, as a gzip stream when bit 1 is set); bit 2: a `Content-Length` of
//! the data's length is declared.
//!
//! Invariants: the read completes without a runtime (everything is in
//! memory); the bytes read never exceed the limit; for a body gzipped here,
//! `TooLarge` exactly when the inflated size exceeds the limit, and the bytes
//! read are the content otherwise; a plain body is read as sent.
#![no_main]

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, Response, header};
use bytes::Bytes;
use edge_outbox_server::fuzzing::{BodyError, read_body};
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use tower::{Layer, ServiceExt, service_fn};
use tower_http::decompression::RequestDecompressionLayer;

type Read = Result<Bytes, BodyError>;

fn read(wire: &[u8], gzip: bool, declared: Option<usize>, frame: usize, limit: usize) -> Read {
    let chunks: Vec<Result<Bytes, Infallible>> = if frame == 0 {
        vec![Ok(Bytes::copy_from_slice(wire))]
    } else {
        wire.chunks(frame)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    };
    let mut request = Request::post("/v1/events");
    if gzip {
        request = request.header(header::CONTENT_ENCODING, "gzip");
    }
    if let Some(n) = declared {
        request = request.header(header::CONTENT_LENGTH, n);
    }
    let request = request
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("a valid request");
    let out: Arc<Mutex<Option<Read>>> = Arc::default();
    let slot = Arc::clone(&out);
    let service = RequestDecompressionLayer::new().layer(service_fn(move |req: Request<_>| {
        let slot = Arc::clone(&slot);
        async move {
            let (parts, body) = req.into_parts();
            let result = read_body(&parts.headers, Body::new(body), limit).await;
            *slot.lock().unwrap() = Some(result);
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }
    }));
    service
        .oneshot(request)
        .now_or_never()
        .expect("an in-memory body is read without waiting")
        .expect("infallible");
    let result = out.lock().unwrap().take();
    result.expect("the reader ran")
}

fuzz_target!(|data: &[u8]| {
    let [flags, l0, l1, frame, content @ ..] = data else {
        return;
    };
    let limit = usize::from(u16::from_be_bytes([*l0, *l1]));
    let frame = usize::from(*frame);
    let declared = (flags & 4 != 0).then_some(content.len());
    if flags & 1 != 0 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(content).expect("in memory");
        let wire = gz.finish().expect("in memory");
        match read(&wire, true, declared.map(|_| wire.len()), frame, limit) {
            Ok(bytes) => {
                assert!(content.len() <= limit);
                assert_eq!(&bytes[..], content);
            }
            Err(BodyError::TooLarge) => assert!(content.len() > limit),
            Err(BodyError::Unreadable(e)) => panic!("a valid gzip body was unreadable: {e}"),
        }
    } else {
        let gzip = flags & 2 != 0;
        match read(content, gzip, declared, frame, limit) {
            Ok(bytes) => {
                assert!(bytes.len() <= limit);
                if !gzip {
                    assert_eq!(&bytes[..], content);
                }
            }
            Err(BodyError::TooLarge) => assert!(gzip || content.len() > limit),
            Err(BodyError::Unreadable(_)) => assert!(gzip, "a plain in-memory body was unreadable"),
        }
    }
});
