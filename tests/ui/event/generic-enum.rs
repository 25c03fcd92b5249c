use evently_core::prelude::*;

#[derive(DomainEvent)]
enum CounterEvent<T> {
    Added { by: T },
}

fn main() {}
