//! The ticket aggregate: opened, renamed, closed. Scaffolded by `cqrs new aggregate Ticket`:
//! rename the events and commands after what your domain says, keep the shape.
//!
//! Rules: a ticket needs a non-empty name; a closed ticket takes no more changes.

use evently::prelude::*;

/// The events of a ticket: facts, named in the past tense, never changed once recorded.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = Ticket)]
pub enum TicketEvent {
    /// The ticket was opened.
    TicketOpened {
        /// Its name.
        name: String,
    },
    /// The ticket got a new name.
    TicketRenamed {
        /// The new name.
        name: String,
    },
    /// The ticket was closed.
    TicketClosed,
}

/// The commands of a ticket: requests, which the aggregate may refuse.
#[derive(Debug, Clone, Command)]
#[command(aggregate = Ticket)]
pub enum TicketCommand {
    /// Open a new ticket.
    #[command(create, handler = open)]
    OpenTicket {
        /// Its name.
        name: String,
    },
    /// Give the ticket a new name.
    #[command(handler = rename)]
    RenameTicket {
        /// The new name.
        name: String,
    },
    /// Close the ticket.
    #[command(handler = close)]
    CloseTicket,
}

/// Why a ticket command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// A name must have at least one visible character.
    #[error("a ticket needs a name")]
    EmptyName,
    /// A closed ticket takes no more changes.
    #[error("the ticket is closed")]
    Closed,
}

/// A ticket's state, rebuilt from its events.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "ticket", command = TicketCommand, event = TicketEvent, error = TicketError)]
pub struct Ticket {
    /// Its current name.
    pub name: String,
    /// Closed: no more changes.
    pub closed: bool,
}

impl Ticket {
    fn open(&self, name: String) -> Result<Vec<TicketEvent>, TicketError> {
        if name.trim().is_empty() {
            return Err(TicketError::EmptyName);
        }
        Ok(vec![TicketEvent::TicketOpened { name }])
    }

    fn rename(&self, name: String) -> Result<Vec<TicketEvent>, TicketError> {
        if self.closed {
            return Err(TicketError::Closed);
        }
        if name.trim().is_empty() {
            return Err(TicketError::EmptyName);
        }
        if name == self.name {
            // Nothing changes: no event.
            return Ok(Vec::new());
        }
        Ok(vec![TicketEvent::TicketRenamed { name }])
    }

    fn close(&self) -> Result<Vec<TicketEvent>, TicketError> {
        if self.closed {
            return Err(TicketError::Closed);
        }
        Ok(vec![TicketEvent::TicketClosed])
    }

    fn apply_ticket_opened(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    fn apply_ticket_renamed(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    fn apply_ticket_closed(&mut self) {
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use evently::testing::AggregateFixture;

    use super::*;

    fn opened() -> TicketEvent {
        TicketEvent::TicketOpened {
            name: "first".into(),
        }
    }

    #[test]
    fn a_ticket_opens_with_its_name() {
        AggregateFixture::<Ticket>::given_no_previous_events()
            .when(TicketCommand::OpenTicket {
                name: "first".into(),
            })
            .then_expect_events([opened()])
            .then_state(|s| assert_eq!(s.name, "first"));
    }

    #[test]
    fn a_ticket_needs_a_name() {
        AggregateFixture::<Ticket>::given_no_previous_events()
            .when(TicketCommand::OpenTicket { name: " ".into() })
            .then_expect_error(TicketError::EmptyName);
        AggregateFixture::<Ticket>::given([opened()])
            .when(TicketCommand::RenameTicket {
                name: String::new(),
            })
            .then_expect_error(TicketError::EmptyName);
    }

    #[test]
    fn renaming_to_the_same_name_records_nothing() {
        AggregateFixture::<Ticket>::given([opened()])
            .when(TicketCommand::RenameTicket {
                name: "first".into(),
            })
            .then_expect_no_events();
        AggregateFixture::<Ticket>::given([opened()])
            .when(TicketCommand::RenameTicket {
                name: "second".into(),
            })
            .then_expect_events([TicketEvent::TicketRenamed {
                name: "second".into(),
            }])
            .then_state(|s| assert_eq!(s.name, "second"));
    }

    #[test]
    fn a_closed_ticket_takes_no_more_changes() {
        AggregateFixture::<Ticket>::given([opened()])
            .when(TicketCommand::CloseTicket)
            .then_expect_events([TicketEvent::TicketClosed])
            .then_state(|s| assert!(s.closed));
        AggregateFixture::<Ticket>::given([opened(), TicketEvent::TicketClosed])
            .when(TicketCommand::RenameTicket {
                name: "second".into(),
            })
            .then_expect_error(TicketError::Closed);
        AggregateFixture::<Ticket>::given([opened(), TicketEvent::TicketClosed])
            .when(TicketCommand::CloseTicket)
            .then_expect_error(TicketError::Closed);
    }
}
