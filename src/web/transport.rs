//! The browser's [`Transport`]: `fetch` through web-sys (reqwest would add
//! about 90 KB gzip to the package), bounded by an `AbortController` timeout,
//! with credentials asked for at send time from the app's `headers()` callback.

use std::time::Duration;

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortController, Headers, Request, RequestInit, Response as FetchResponse};

use super::idb::error_parts;
use crate::error::{Error, Result};
use crate::time::Timestamp;
use crate::transport::{Push, Response, Transport, parse_retry_after};

#[wasm_bindgen]
extern "C" {
    /// `globalThis.fetch`: the same in a page and in a worker (never `window`).
    #[wasm_bindgen(js_namespace = globalThis, js_name = fetch)]
    fn global_fetch(request: &Request) -> Promise;

    /// `globalThis.setTimeout`.
    #[wasm_bindgen(js_namespace = globalThis, js_name = setTimeout)]
    pub(crate) fn set_timeout(callback: &Function, ms: f64) -> JsValue;

    /// `globalThis.clearTimeout`.
    #[wasm_bindgen(js_namespace = globalThis, js_name = clearTimeout)]
    pub(crate) fn clear_timeout(id: &JsValue);
}

/// POSTs pushes to the sync endpoint with `fetch`.
#[derive(Clone, Debug)]
pub struct FetchTransport {
    endpoint: String,
    timeout: Duration,
    /// Bytes per second of the slowest uplink a push is given time for.
    min_upload_rate: u64,
    /// The app's `headers({ refresh })` callback: returns (a promise of) a
    /// `Record<string, string>`; called before every request.
    headers: Option<Function>,
}

impl FetchTransport {
    /// A transport to `endpoint` (absolute, or relative to the page). A push
    /// of `n` bytes may take `timeout + n / min_upload_rate` (2 KiB/s by
    /// default, see [`FetchTransport::with_min_upload_rate`]): `fetch` shows
    /// no upload progress, so the time allowed grows with the body, and a
    /// slow uplink delays a large push instead of failing it forever (after
    /// timeouts the relay also sends smaller pushes, down to one event).
    pub fn new(endpoint: impl Into<String>, timeout: Duration) -> Self {
        FetchTransport {
            endpoint: endpoint.into(),
            timeout,
            min_upload_rate: crate::transport::DEFAULT_MIN_UPLOAD_RATE,
            headers: None,
        }
    }

    /// Set the slowest uplink, in bytes per second, that a push is given
    /// time for (at least 1).
    pub fn with_min_upload_rate(mut self, bytes_per_sec: u64) -> Self {
        self.min_upload_rate = bytes_per_sec.max(1);
        self
    }

    /// The time allowed for a push of `bytes` bytes.
    pub fn time_allowed(&self, bytes: usize) -> Duration {
        crate::transport::time_allowed(self.timeout, bytes, self.min_upload_rate)
    }

    /// Ask `callback({ refresh })` for extra request headers (credentials)
    /// at every send.
    pub fn with_headers(mut self, callback: Function) -> Self {
        self.headers = Some(callback);
        self
    }

    async fn app_headers(&self, refresh: bool, into: &Headers) -> Result<()> {
        let Some(callback) = &self.headers else {
            return Ok(());
        };
        let failed = |e: JsValue| Error::Network {
            message: format!("the headers() callback failed: {}", error_parts(&e).1),
            source: None,
        };
        let arg = Object::new();
        let _ = Reflect::set(&arg, &"refresh".into(), &refresh.into());
        let value = callback.call1(&JsValue::UNDEFINED, &arg).map_err(failed)?;
        let value = JsFuture::from(Promise::resolve(&value))
            .await
            .map_err(failed)?;
        if value.is_undefined() || value.is_null() {
            return Ok(());
        }
        for entry in Object::entries(value.unchecked_ref()).iter() {
            let pair: Array = entry.unchecked_into();
            let (Some(name), Some(v)) = (pair.get(0).as_string(), pair.get(1).as_string()) else {
                return Err(Error::InvalidConfig {
                    reason: "headers() must return an object of string values".into(),
                });
            };
            into.set(&name, &v).map_err(failed)?;
        }
        Ok(())
    }
}

fn network(what: &str, e: JsValue) -> Error {
    let (name, message) = error_parts(&e);
    Error::Network {
        message: if name == "AbortError" {
            format!("{what}: no answer within the timeout")
        } else {
            format!("{what}: {name} {message}").trim_end().to_owned()
        },
        source: None,
    }
}

impl Transport for FetchTransport {
    async fn send(&self, push: Push) -> Result<Response> {
        let headers = Headers::new().map_err(|e| network("building headers", e))?;
        headers
            .set("content-type", "application/json")
            .map_err(|e| network("building headers", e))?;
        self.app_headers(push.refresh_credentials, &headers).await?;

        let controller = AbortController::new().map_err(|e| network("AbortController", e))?;
        let init = RequestInit::new();
        init.set_method("POST");
        init.set_headers(&headers);
        init.set_body(&Uint8Array::from(push.body.as_slice()));
        init.set_signal(Some(&controller.signal()));
        let request = Request::new_with_str_and_init(&self.endpoint, &init)
            .map_err(|e| network("building the request", e))?;

        let abort = Closure::once_into_js(move || controller.abort());
        let allowed = self.time_allowed(push.body.len());
        let timer = set_timeout(abort.unchecked_ref(), allowed.as_millis() as f64);
        let result = async {
            let fetching = global_fetch(&request);
            // The browser sends it from here on, off this thread.
            push.sent.notify();
            let response: FetchResponse = JsFuture::from(fetching)
                .await
                .map_err(|e| network("sending the push", e))?
                .unchecked_into();
            let retry_after = response
                .headers()
                .get("retry-after")
                .ok()
                .flatten()
                .and_then(|v| parse_retry_after(&v, Timestamp::now()));
            let body = response
                .array_buffer()
                .map_err(|e| network("reading the answer", e))?;
            let body = JsFuture::from(body)
                .await
                .map_err(|e| network("reading the answer", e))?;
            Ok(Response {
                status: response.status(),
                retry_after,
                body: Uint8Array::new(&body).to_vec(),
            })
        }
        .await;
        clear_timeout(&timer);
        result
    }
}
