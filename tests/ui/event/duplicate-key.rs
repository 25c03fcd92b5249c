use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(name = "Added", name = "Incremented")]
    Added { by: u32 },
}

fn main() {}
