//! Prometheus metrics of one server instance (`GET /metrics`), and the
//! per-request log line, both fed by one middleware ([`observe`]).
//!
//! Each instance keeps its own registry: several instances behind a load
//! balancer are scraped one by one and summed by Prometheus.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::http::AppState;

/// What the push handler tells the middleware about one push (a response
/// extension): who pushed, how much, and what became of each event.
#[derive(Clone, Debug, Default)]
pub(crate) struct PushInfo {
    pub client_id: Option<String>,
    pub events: usize,
    pub body_bytes: usize,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
}

/// The metrics of one instance.
pub(crate) struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    requests: IntCounterVec,
    push_seconds: Histogram,
    body_bytes: IntCounter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new(
                "edge_outbox_events_total",
                "Events answered in pushes, by result (accepted, duplicate, rejected).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new(
                "edge_outbox_http_requests_total",
                "HTTP requests, by route and status code.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let push_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "edge_outbox_push_duration_seconds",
                "Time to answer a push (POST /v1/events), from request head to response head.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let body_bytes = IntCounter::new(
            "edge_outbox_push_body_bytes_total",
            "Bytes of push bodies read (after gzip inflation).",
        )
        .expect("valid metric");
        for c in [
            Box::new(events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(push_seconds.clone()),
            Box::new(body_bytes.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        // Present from the start, at 0, so rates work from the first scrape.
        for result in ["accepted", "duplicate", "rejected"] {
            events.with_label_values(&[result]);
        }
        Metrics {
            registry,
            events,
            requests,
            push_seconds,
            body_bytes,
        }
    }

    /// The text exposition format.
    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A bounded route label: the known routes by name, anything else "other"
/// (so a scanner probing paths cannot grow the metric without bound).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/events" => "/v1/events",
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        p if p.starts_with("/__test/") => "/__test/",
        _ => "other",
    }
}

/// `GET /metrics`: the Prometheus text format. No token: see server/README.md.
pub(crate) async fn get_metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics().render();
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Middleware: count and time each request, and log it (target
/// `edge_outbox_server::request`, level info; a 5xx at warn).
pub(crate) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    let route = route_label(&path);
    let metrics = state.metrics();
    metrics
        .requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    let info = response.extensions().get::<PushInfo>();
    if let Some(info) = info {
        metrics.push_seconds.observe(elapsed.as_secs_f64());
        metrics.body_bytes.inc_by(info.body_bytes as u64);
        for (result, n) in [
            ("accepted", info.accepted),
            ("duplicate", info.duplicate),
            ("rejected", info.rejected),
        ] {
            if n > 0 {
                metrics.events.with_label_values(&[result]).inc_by(n);
            }
        }
    }
    let client_id = info.and_then(|i| i.client_id.as_deref()).unwrap_or("");
    let events = info.map_or(0, |i| i.events);
    // Milliseconds, to the microsecond.
    let duration_ms = elapsed.as_micros() as f64 / 1000.0;
    if status >= 500 {
        tracing::warn!(
            target: "edge_outbox_server::request",
            method = %method, path = %path, status, client_id, events, duration_ms,
            "request"
        );
    } else {
        tracing::info!(
            target: "edge_outbox_server::request",
            method = %method, path = %path, status, client_id, events, duration_ms,
            "request"
        );
    }
    response
}
