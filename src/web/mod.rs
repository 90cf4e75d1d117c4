//! Browser backend (`wasm32-unknown-unknown`): the outbox in IndexedDB, the
//! relay over `fetch`, and the JavaScript API of the npm package.
//!
//! Rust code uses [`IdbStore`] (the [`crate::Store`] contract over IndexedDB)
//! directly; JavaScript code uses the `Outbox` class exported by wasm-bindgen.

mod idb;
mod store;

pub use store::{Durability, IdbStore};
