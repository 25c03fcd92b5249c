use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent {
    #[event(nmae = "Added")]
    Added { by: u32 },
}

fn main() {}
