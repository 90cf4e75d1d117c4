// The one place that decides which storage backend a target gets:
// `web` = IndexedDB + fetch (wasm32-unknown-unknown), `native` = SQLite + reqwest.
fn main() {
    cfg_aliases::cfg_aliases! {
        web: { all(target_arch = "wasm32", target_os = "unknown") },
        native: { not(all(target_arch = "wasm32", target_os = "unknown")) },
    }
}
