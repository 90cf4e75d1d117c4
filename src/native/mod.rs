//! Native backend: the outbox lives in the app's own SQLite file (rusqlite,
//! bundled SQLite), next to the app's tables, so one SQLite transaction
//! commits both.

mod outbox;
mod sqlite;

pub use outbox::{Config, Durability, Outbox, OutboxTx};
pub use sqlite::{SCHEMA_VERSION, SqliteStore};
