//! An aggregate that is an enum (a state machine) and commands of every shape.
use evently_core::prelude::*;

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = Door)]
pub enum DoorEvent {
    Opened,
    Closed,
}

#[derive(Debug, Clone, Command)]
#[command(aggregate = Door)]
pub enum DoorCommand {
    #[command(create_or_update)]
    Open,
    Close,
}

#[derive(Debug, thiserror::Error)]
#[error("the door is {0:?} already")]
pub struct Already(Door);

#[derive(Debug, Clone, Copy, Default, Aggregate)]
#[aggregate(name = "door", command = DoorCommand, event = DoorEvent, error = Already)]
pub enum Door {
    #[default]
    Closed,
    Open,
}

impl Door {
    fn open(&self) -> Result<Vec<DoorEvent>, Already> {
        match self {
            Self::Open => Err(Already(*self)),
            Self::Closed => Ok(vec![DoorEvent::Opened]),
        }
    }
    fn close(&self) -> Result<Vec<DoorEvent>, Already> {
        match self {
            Self::Closed => Err(Already(*self)),
            Self::Open => Ok(vec![DoorEvent::Closed]),
        }
    }
    fn apply_opened(&mut self) {
        *self = Self::Open;
    }
    fn apply_closed(&mut self) {
        *self = Self::Closed;
    }
}

fn main() {}
