//! Telemetry, natively: `tracing` events and spans, silent unless the app
//! installs a subscriber. In the browser (`web`) every macro here expands to
//! nothing, so `tracing` is not even a dependency there and the package
//! does not grow.
//!
//! Call sites write `trace::debug!(field = value, "message")` with
//! `tracing`'s syntax; the target is the calling module
//! (`edge_outbox::relay`, `edge_outbox::native::lease`, ...).
//! Arguments are not evaluated at all on `web`: pass only values the code
//! computes anyway.

#[cfg(native)]
macro_rules! debug {
    ($($arg:tt)+) => { ::tracing::debug!($($arg)+) };
}
#[cfg(native)]
macro_rules! info {
    ($($arg:tt)+) => { ::tracing::info!($($arg)+) };
}
#[cfg(native)]
macro_rules! warning {
    ($($arg:tt)+) => { ::tracing::warn!($($arg)+) };
}
/// `trace::in_span!(future, "name", fields...)`: the future, run inside a
/// new debug-level span (natively); the future itself on `web`.
#[cfg(native)]
macro_rules! in_span {
    ($fut:expr, $($span:tt)+) => {
        ::tracing::Instrument::instrument($fut, ::tracing::debug_span!($($span)+))
    };
}

#[cfg(web)]
macro_rules! debug {
    ($($arg:tt)+) => {};
}
#[cfg(web)]
macro_rules! info {
    ($($arg:tt)+) => {};
}
#[cfg(web)]
macro_rules! warning {
    ($($arg:tt)+) => {};
}
#[cfg(web)]
macro_rules! in_span {
    ($fut:expr, $($span:tt)+) => {
        $fut
    };
}

#[allow(unused_imports)]
pub(crate) use {debug, in_span, info, warning};
