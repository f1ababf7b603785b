//! herd-gateway library.
