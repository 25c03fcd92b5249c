//! The __label__ aggregate: opened, renamed, closed. Scaffolded by `cqrs new aggregate __Name__`:
//! rename the events and commands after what your domain says, keep the shape.
//!
//! Rules: a __label__ needs a non-empty name; a closed __label__ takes no more changes.

use evently::prelude::*;

/// The events of a __label__: facts, named in the past tense, never changed once recorded.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(aggregate = __Name__)]
pub enum __Name__Event {
    /// The __label__ was opened.
    __Name__Opened {
        /// Its name.
        name: String,
    },
    /// The __label__ got a new name.
    __Name__Renamed {
        /// The new name.
        name: String,
    },
    /// The __label__ was closed.
    __Name__Closed,
}

/// The commands of a __label__: requests, which the aggregate may refuse.
#[derive(Debug, Clone, Command)]
#[command(aggregate = __Name__)]
pub enum __Name__Command {
    /// Open a new __label__.
    #[command(create, handler = open)]
    Open__Name__ {
        /// Its name.
        name: String,
    },
    /// Give the __label__ a new name.
    #[command(handler = rename)]
    Rename__Name__ {
        /// The new name.
        name: String,
    },
    /// Close the __label__.
    #[command(handler = close)]
    Close__Name__,
}

/// Why a __label__ command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum __Name__Error {
    /// A name must have at least one visible character.
    #[error("a __label__ needs a name")]
    EmptyName,
    /// A closed __label__ takes no more changes.
    #[error("the __label__ is closed")]
    Closed,
}

/// A __label__'s state, rebuilt from its events.
#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "__name__", command = __Name__Command, event = __Name__Event, error = __Name__Error)]
pub struct __Name__ {
    /// Its current name.
    pub name: String,
    /// Closed: no more changes.
    pub closed: bool,
}

impl __Name__ {
    fn open(&self, name: String) -> Result<Vec<__Name__Event>, __Name__Error> {
        if name.trim().is_empty() {
            return Err(__Name__Error::EmptyName);
        }
        Ok(vec![__Name__Event::__Name__Opened { name }])
    }

    fn rename(&self, name: String) -> Result<Vec<__Name__Event>, __Name__Error> {
        if self.closed {
            return Err(__Name__Error::Closed);
        }
        if name.trim().is_empty() {
            return Err(__Name__Error::EmptyName);
        }
        if name == self.name {
            // Nothing changes: no event.
            return Ok(Vec::new());
        }
        Ok(vec![__Name__Event::__Name__Renamed { name }])
    }

    fn close(&self) -> Result<Vec<__Name__Event>, __Name__Error> {
        if self.closed {
            return Err(__Name__Error::Closed);
        }
        Ok(vec![__Name__Event::__Name__Closed])
    }

    fn apply___name___opened(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    fn apply___name___renamed(&mut self, name: &str) {
        name.clone_into(&mut self.name);
    }

    fn apply___name___closed(&mut self) {
        self.closed = true;
    }
}

#[cfg(test)]
mod tests {
    use evently::testing::AggregateFixture;

    use super::*;

    fn opened() -> __Name__Event {
        __Name__Event::__Name__Opened {
            name: "first".into(),
        }
    }

    #[test]
    fn a___name___opens_with_its_name() {
        AggregateFixture::<__Name__>::given_no_previous_events()
            .when(__Name__Command::Open__Name__ {
                name: "first".into(),
            })
            .then_expect_events([opened()])
            .then_state(|s| assert_eq!(s.name, "first"));
    }

    #[test]
    fn a___name___needs_a_name() {
        AggregateFixture::<__Name__>::given_no_previous_events()
            .when(__Name__Command::Open__Name__ { name: " ".into() })
            .then_expect_error(__Name__Error::EmptyName);
        AggregateFixture::<__Name__>::given([opened()])
            .when(__Name__Command::Rename__Name__ {
                name: String::new(),
            })
            .then_expect_error(__Name__Error::EmptyName);
    }

    #[test]
    fn renaming_to_the_same_name_records_nothing() {
        AggregateFixture::<__Name__>::given([opened()])
            .when(__Name__Command::Rename__Name__ {
                name: "first".into(),
            })
            .then_expect_no_events();
        AggregateFixture::<__Name__>::given([opened()])
            .when(__Name__Command::Rename__Name__ {
                name: "second".into(),
            })
            .then_expect_events([__Name__Event::__Name__Renamed {
                name: "second".into(),
            }])
            .then_state(|s| assert_eq!(s.name, "second"));
    }

    #[test]
    fn a_closed___name___takes_no_more_changes() {
        AggregateFixture::<__Name__>::given([opened()])
            .when(__Name__Command::Close__Name__)
            .then_expect_events([__Name__Event::__Name__Closed])
            .then_state(|s| assert!(s.closed));
        AggregateFixture::<__Name__>::given([opened(), __Name__Event::__Name__Closed])
            .when(__Name__Command::Rename__Name__ {
                name: "second".into(),
            })
            .then_expect_error(__Name__Error::Closed);
        AggregateFixture::<__Name__>::given([opened(), __Name__Event::__Name__Closed])
            .when(__Name__Command::Close__Name__)
            .then_expect_error(__Name__Error::Closed);
    }
}
