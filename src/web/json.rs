//! JSON in the browser through the browser's own `JSON` object: reading the
//! sync endpoint's answers and checking payload text. Natively `serde_json`
//! does this; in the package its parser would add about 24 KB gzip (the
//! measurement is in BENCHMARKS.md, "Package size"). The checks are those
//! `serde_json` and serde's derive make natively (see `src/protocol.rs`).

use js_sys::Array;
use wasm_bindgen::prelude::*;

use super::idb::error_parts;
use crate::event::EventId;
use crate::protocol::{ErrorBody, EventResult, PushResponse, ResultStatus};

#[wasm_bindgen(module = "/src/web/glue.js")]
extern "C" {
    /// `[[id, status, reason], ...]` of a push answer's `results`, status
    /// 0/1/2 for accepted/duplicate/rejected; throws on anything else.
    #[wasm_bindgen(catch, js_name = pushResults)]
    fn push_results(text: &str) -> Result<Array, JsValue>;

    /// `[error, message, supported_protocols]` of a protocol error body, or
    /// null when `text` is not one.
    #[wasm_bindgen(js_name = errorBody)]
    fn error_body_parts(text: &str) -> JsValue;

    /// Throws unless `text` is one JSON value whose strings hold no lone
    /// surrogate escape.
    #[wasm_bindgen(catch, js_name = checkJsonText)]
    fn check_json_text_js(text: &str) -> Result<(), JsValue>;

    /// `String(value)` (`typeof value` when that throws): the text of a
    /// thrown value that is neither an `Error` nor a string. In place of
    /// `{:?}` of a `JsValue`, whose debug-string code would ship in the
    /// package for this one message.
    #[wasm_bindgen(js_name = valueText)]
    pub(crate) fn value_text(value: &JsValue) -> String;
}

/// [`PushResponse::from_json`] in the browser.
pub(crate) fn push_response(body: &[u8]) -> Result<PushResponse, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
    let results = push_results(text).map_err(|e| error_parts(&e).1)?;
    let results = results
        .iter()
        .map(|r| {
            let r: Array = r.unchecked_into();
            let id = r.get(0).as_string().unwrap_or_default();
            let id = uuid::Uuid::parse_str(&id)
                .map_err(|_| format!("a result's id is not a UUID: {id}"))?;
            let status = match r.get(1).as_f64() {
                Some(0.0) => ResultStatus::Accepted,
                Some(1.0) => ResultStatus::Duplicate,
                _ => ResultStatus::Rejected,
            };
            Ok(EventResult {
                id: EventId::from(id),
                status,
                reason: r.get(2).as_string(),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(PushResponse { results })
}

/// [`ErrorBody::from_json`] in the browser.
pub(crate) fn error_body(body: &[u8]) -> Option<ErrorBody> {
    let parts: Array = error_body_parts(std::str::from_utf8(body).ok()?)
        .dyn_into()
        .ok()?;
    let versions = parts.get(2);
    Some(ErrorBody {
        error: parts.get(0).as_string()?,
        message: parts.get(1).as_string()?,
        supported_protocols: (!versions.is_null()).then(|| {
            Array::from(&versions)
                .iter()
                .map(|v| v.as_f64().unwrap_or_default() as u32)
                .collect()
        }),
    })
}

/// `crate::protocol::check_json_text` in the browser: the error message.
pub(crate) fn check_json_text(text: &str) -> Result<(), String> {
    check_json_text_js(text).map_err(|e| error_parts(&e).1)
}
