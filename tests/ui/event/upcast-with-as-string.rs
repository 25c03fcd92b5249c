use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(version = 2, upcast(from = 1, with = "from_v1"))]
    Added { by: u32 },
}

fn main() {}
