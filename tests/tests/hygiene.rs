//! Generated code compiles with every warning denied, pedantic clippy, in a module that shadows the
//! prelude names and the framework's own trait names.
#![deny(warnings, unused_qualifications, clippy::all, clippy::pedantic)]
#![allow(
    dead_code,
    clippy::unnecessary_wraps,
    clippy::trivially_copy_pass_by_ref,
    clippy::unused_self,
    clippy::unused_async
)] // the domain below is minimal on purpose

mod shadowing {
    #![allow(non_camel_case_types, clippy::upper_case_acronyms)]

    // Everything the generated code could pick up by accident, shadowed.
    pub struct Result;
    pub struct Option;
    pub struct Vec;
    pub struct String;
    pub struct Box;
    pub struct Ok;
    pub struct Err;
    pub struct Some;
    pub struct None;
    pub trait Aggregate {}
    pub trait Command {}
    pub trait DomainEvent {}
    pub trait ApplyTo {}
    pub trait Serialize {}
    pub trait Deserialize {}
    pub trait Clone {}
    pub mod serde {}
    pub mod serde_json {}
    pub mod core {}
    pub mod std {}
    pub mod evently_core {}

    #[derive(Debug, ::evently_core::DomainEvent)]
    #[event(aggregate = Thing)]
    pub enum ThingEvent {
        Made {
            name: ::std::string::String,
            size: u32,
        },
        #[event(version = 2, upcast(from = 1, with = up))]
        Grown(u32),
        Gone,
    }

    pub fn up(
        v: ::evently_core::__private::serde_json::Value,
    ) -> ::core::result::Result<
        ::evently_core::__private::serde_json::Value,
        ::evently_core::UpcastError,
    > {
        ::core::result::Result::Ok(v)
    }

    #[derive(Debug, ::core::clone::Clone, ::evently_core::Command)]
    #[command(aggregate = Thing)]
    pub enum ThingCommand {
        #[command(create)]
        Make {
            name: ::std::string::String,
        },
        Grow(u32),
        #[command(handler = remove)]
        Delete,
    }

    #[derive(Debug)]
    pub struct ThingError;

    impl ::core::fmt::Display for ThingError {
        fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
            f.write_str("thing error")
        }
    }

    impl ::std::error::Error for ThingError {}

    #[derive(
        Debug, Default, ::evently_core::Aggregate, ::serde::Serialize, ::serde::Deserialize,
    )]
    #[aggregate(name = "thing", command = ThingCommand, event = ThingEvent, error = ThingError, snapshot(every = 10))]
    pub struct Thing {
        size: u32,
    }

    #[derive(Debug, Default, ::evently_core::Projection)]
    #[projection(name = "things", events(ThingEvent))]
    pub struct Things {
        pub seen: u32,
    }

    #[derive(::serde::Serialize, ::serde::Deserialize)]
    pub struct ThingData {
        pub steps: u32,
    }

    pub struct ThingServices;

    #[derive(::evently_core::Saga)]
    #[saga(name = "thing_saga", data = ThingData, context = ThingServices)]
    pub enum ThingSaga {
        #[step(compensate, retry(attempts = 2, backoff_ms = 1), timeout_ms = 100)]
        Start,
        Finish,
    }

    type StepResult = ::core::result::Result<(), ::evently_core::saga::StepError>;

    impl ThingServices {
        async fn start(
            &self,
            data: &mut ThingData,
            _key: &::evently_core::saga::StepKey,
        ) -> StepResult {
            data.steps += 1;
            ::core::result::Result::Ok(())
        }

        async fn compensate_start(
            &self,
            _data: &mut ThingData,
            _key: &::evently_core::saga::StepKey,
        ) -> StepResult {
            ::core::result::Result::Ok(())
        }

        async fn finish(
            &self,
            data: &mut ThingData,
            _key: &::evently_core::saga::StepKey,
        ) -> StepResult {
            data.steps += 1;
            ::core::result::Result::Ok(())
        }
    }

    type Decision = ::core::result::Result<::std::vec::Vec<ThingEvent>, ThingError>;

    impl Thing {
        fn make(&self, name: ::std::string::String) -> Decision {
            ::core::result::Result::Ok(::std::vec![ThingEvent::Made { name, size: 1 }])
        }

        fn grow(&self, by: u32) -> Decision {
            ::core::result::Result::Ok(::std::vec![ThingEvent::Grown(by)])
        }

        fn remove(&self) -> Decision {
            ::core::result::Result::Ok(::std::vec![ThingEvent::Gone])
        }

        fn apply_made(&mut self, _name: &str, size: &u32) {
            self.size = *size;
        }

        fn apply_grown(&mut self, by: &u32) {
            self.size += by;
        }

        fn apply_gone(&mut self) {
            self.size = 0;
        }
    }
}

// The handler is user code (async_trait's own output is not ours to make hygienic): outside.
#[async_trait::async_trait]
impl evently_core::projection::Handles<shadowing::ThingEvent> for shadowing::Things {
    async fn handle(
        &mut self,
        _event: &evently_core::RecordedEvent<shadowing::ThingEvent>,
        (): &mut (),
    ) -> Result<(), evently_core::projection::HandlerError> {
        self.seen += 1;
        Ok(())
    }
}

#[test]
fn generated_code_is_hygienic_and_works() {
    use evently_core::testing::AggregateFixture;
    use shadowing::{Thing, ThingCommand, ThingEvent};

    let result = AggregateFixture::<Thing>::given([ThingEvent::Made {
        name: "t".into(),
        size: 1,
    }])
    .when(ThingCommand::Grow(2))
    .into_result();
    assert!(matches!(result.as_deref(), Ok([ThingEvent::Grown(2)])));
    assert_eq!(<Thing as evently_core::Aggregate>::NAME, "thing");
    assert_eq!(
        <Thing as evently_core::Aggregate>::SNAPSHOT,
        evently_core::SnapshotPolicy::every(10, 1)
    );
    assert_eq!(
        <ThingEvent as evently_core::DomainEvent>::EVENT_TYPES,
        ["Made", "Grown", "Gone"]
    );
}

#[tokio::test]
async fn a_derived_saga_in_a_shadowing_module_runs() {
    use evently_core::saga::{InMemorySagaStore, Orchestrator, SagaStatus};
    let saga = Orchestrator::<shadowing::ThingSaga, _>::new(
        InMemorySagaStore::new(),
        shadowing::ThingServices,
        "hygiene",
    );
    let (_, status) = saga
        .start(shadowing::ThingData { steps: 0 })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, SagaStatus::Completed);
}
