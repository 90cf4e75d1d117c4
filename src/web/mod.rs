//! Browser backend (`wasm32-unknown-unknown`): the outbox in IndexedDB, the
//! relay over `fetch`, and the JavaScript API of the npm package.
//!
//! Rust code uses [`IdbStore`] (the [`crate::Store`] contract over IndexedDB),
//! [`FetchTransport`] and [`Driver`] directly; JavaScript code uses the
//! `Outbox` class exported by wasm-bindgen (see `js/index.d.ts`).

mod api;
mod idb;
mod relay;
mod store;
mod transport;

pub use api::{Outbox, OutboxTransaction, to_js_error};
pub use relay::{ConnectionState, Driver, DriverConfig, FlushOutcome, FlushSkipped, Status};
pub use store::{Connection, ConnectionListener, Durability, IdbStore};
pub use transport::FetchTransport;
