//! Browser backend (`wasm32-unknown-unknown`): the outbox in IndexedDB, the
//! relay over `fetch`, and the JavaScript API of the npm package.
//!
//! - `idb/`: the IndexedDB backend ([`IdbStore`], the [`crate::Store`]
//!   contract, and the connection's lifecycle: reopen after another tab's
//!   upgrade, give up when it cannot);
//! - `transport.rs`: [`FetchTransport`], the HTTP transport over `fetch`;
//! - `driver.rs`: [`Driver`], the relay core on the browser's event loop (Web
//!   Lock or lease election, tabs, freezing, the network's state);
//! - `bindings.rs`: the JavaScript API (`Outbox`, exported by wasm-bindgen,
//!   typed by hand in `js/index.d.ts`), a thin layer over the three above;
//! - `json.rs`: JSON through the browser's `JSON` (answers, payload checks);
//! - `glue.js`: the JavaScript helpers the Rust code imports.
//!
//! Rust code uses [`IdbStore`], [`FetchTransport`] and [`Driver`] directly;
//! JavaScript code uses the `Outbox` class.

mod bindings;
mod driver;
mod idb;
pub(crate) mod json;
mod transport;

pub use bindings::{Outbox, OutboxTransaction, to_js_error};
pub use driver::{
    ConnectionState, Driver, DriverConfig, DriverStore, FlushOutcome, FlushSkipped, Status,
};
pub use idb::store::{Connection, ConnectionListener, Durability, IdbStore};
pub use transport::FetchTransport;

/// The wasm build's allocator: talc instead of std's dlmalloc, 2.2 KB gzip
/// smaller in the package (BENCHMARKS.md, "Package size"). It grows the
/// wasm memory as dlmalloc does and never shrinks it.
// SAFETY: `new_global` must only back the one global allocator of a
// single-threaded wasm module, which this is.
#[global_allocator]
static ALLOCATOR: talc::TalckWasm = unsafe { talc::TalckWasm::new_global() };
