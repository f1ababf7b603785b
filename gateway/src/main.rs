//! herd-gateway binary.
fn main() {}
