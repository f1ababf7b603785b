//! The herd CLI.
fn main() {}
