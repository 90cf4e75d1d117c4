//! Entry points for the cargo-fuzz targets under `fuzz/` (not a public API:
//! hidden, and free to change with the server's internals). Each one is the
//! server's own function, reached without an HTTP connection or a database.

use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use edge_outbox::protocol::{PushRequest, WireEvent};

pub use crate::store::StoredRow;

/// Why [`read_body`] gave up (the server's own body error).
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over the limit after inflation: the server answers 413.
    TooLarge,
    /// The body could not be read (bad gzip, a broken stream): 400.
    Unreadable(String),
}

/// The server's push body reader with no upload throttle: at most `limit`
/// bytes after inflation (a gzip body arrives already wrapped in the
/// decompression layer's body).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    crate::http::read_body(headers, body, limit, None)
        .await
        .map_err(|e| match e {
            crate::http::BodyError::TooLarge => BodyError::TooLarge,
            crate::http::BodyError::Unreadable(msg) => BodyError::Unreadable(msg),
        })
}

/// A push refused as a whole: the status and body the server answers.
#[derive(Debug)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The answer's body (the protocol's error body).
    pub body: Vec<u8>,
}

/// The server's push parser: the request, or the answer to a body it cannot
/// take.
pub fn parse_push(body: &[u8]) -> Result<PushRequest, Refusal> {
    crate::http::parse_push(body).map_err(|response| {
        let status = response.status().as_u16();
        // The error bodies are buffered JSON: ready at the first poll.
        let body = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            usize::MAX,
        ))
        .expect("an error body is buffered")
        .expect("an error body is readable")
        .to_vec();
        Refusal { status, body }
    })
}

/// The server's check of one event: why it is rejected, if it is.
pub fn invalid_event(event: &WireEvent) -> Option<String> {
    crate::http::invalid_event(event)
}
