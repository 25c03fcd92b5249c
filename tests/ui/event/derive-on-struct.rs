use evently_core::prelude::*;

#[derive(DomainEvent)]
struct Added {
    by: u32,
}

fn main() {}
