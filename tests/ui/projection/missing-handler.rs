use evently_core::prelude::*;

#[derive(Debug, DomainEvent)]
enum NoteEvent {
    Written { text: String },
}

#[derive(Default, Projection)]
#[projection(name = "notes", events(NoteEvent))]
struct Notes {
    texts: Vec<String>,
}

fn main() {}
