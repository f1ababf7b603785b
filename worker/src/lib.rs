//! herd-worker: see the crate README.
