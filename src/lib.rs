#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod event;
mod json;
pub mod policy;
pub mod protocol;
pub mod relay;
pub mod store;
pub mod testing;
mod time;
mod trace;
pub mod transport;

pub use error::{BoxError, Error, Result};
pub use event::{
    DEFAULT_MAX_EVENT_BYTES, Event, EventId, EventStatus, MAX_EVENT_TYPE_LEN, NewEvent,
};
pub use policy::{Jitter, RetryPolicy};
pub use relay::{FlushReport, Relay, RelayConfig, RelayStatus};
pub use store::{Claim, ClaimRequest, Outcome, Settlement, Stats, Store};
pub use time::Timestamp;
pub use transport::{Credentials, RequestSent, Transport};

// The backend is chosen here and nowhere else (see build.rs for the aliases).
#[cfg(native)]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(native)]
mod native;
#[cfg(native)]
pub use native::*;

#[cfg(web)]
pub mod web;
