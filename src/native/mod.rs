//! Native backend: SQLite store and the Outbox facade.
