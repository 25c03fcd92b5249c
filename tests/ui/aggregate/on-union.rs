use evently_core::prelude::*;

#[derive(Aggregate)]
#[aggregate(name = "counter", command = CounterCommand, event = CounterEvent, error = Refused)]
union Counter {
    total: u64,
}

fn main() {}
