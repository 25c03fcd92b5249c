//! Cross-crate integration tests and the trybuild suite; see `tests/`.
