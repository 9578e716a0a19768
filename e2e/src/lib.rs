//! End-to-end tests live in `tests/`; they drive the built binaries as separate processes.
