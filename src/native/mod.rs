//! Native backend: the outbox lives in the app's own SQLite file (rusqlite,
//! bundled SQLite), next to the app's tables, so one SQLite transaction
//! commits both.

mod http;
mod lease;
mod outbox;
mod relay;
pub(crate) mod sqlite;

pub use http::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, HttpTransport, HttpTransportBuilder};
pub use lease::{LeaseHolder, RelayLease};
pub use outbox::{Config, Durability, Outbox, OutboxTx};
pub use relay::{DEFAULT_POLL_INTERVAL, RelayBuilder, RelayHandle};
pub use sqlite::{SCHEMA_VERSION, STATUS_SQL, SqliteStore};
