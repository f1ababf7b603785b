//! The herd operator library.
