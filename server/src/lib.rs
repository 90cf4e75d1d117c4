//! Reference sync server for edge-outbox.
