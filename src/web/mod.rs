//! Browser backend: IndexedDB store and the JavaScript API.
