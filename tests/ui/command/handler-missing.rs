use evently_core::prelude::*;

#[derive(Debug, DomainEvent)]
#[event(aggregate = Counter)]
enum CounterEvent {
    Added { by: u32 },
}

#[derive(Debug, Clone, Command)]
#[command(aggregate = Counter)]
enum CounterCommand {
    Increment { by: u32 },
    Archive,
}

#[derive(Debug, thiserror::Error)]
#[error("refused")]
struct Refused;

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "counter", command = CounterCommand, event = CounterEvent, error = Refused)]
struct Counter {
    total: u64,
}

impl Counter {
    fn increment(&self, by: u32) -> Result<Vec<CounterEvent>, Refused> {
        Ok(vec![CounterEvent::Added { by }])
    }
    fn apply_added(&mut self, by: &u32) {
        self.total += u64::from(*by);
    }
}

fn main() {}
