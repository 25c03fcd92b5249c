//! Creating the topics the relay and the dead-letter producer write to.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::{KafkaConfig, KafkaError, TopicMap};

/// Creates topics once each (and again after [`forget`](Self::forget)), unless creation is off.
pub(crate) struct Topics {
    admin: AdminClient<DefaultClientContext>,
    known: HashSet<String>,
    partitions: i32,
    replication: i32,
    create: bool,
}

impl Topics {
    pub(crate) fn new(
        config: &KafkaConfig,
        partitions: i32,
        replication: i32,
    ) -> Result<Self, KafkaError> {
        let admin = config
            .client("-admin", &[])
            .create()
            .map_err(|e| KafkaError::config(crate::BROKER, e))?;
        Ok(Self {
            admin,
            known: HashSet::new(),
            partitions,
            replication,
            create: true,
        })
    }

    /// The relay's: creating topics with `map`'s layout, if `map` creates topics.
    pub(crate) fn of(config: &KafkaConfig, map: &TopicMap) -> Result<Self, KafkaError> {
        let (partitions, replication) = map.layout();
        let mut topics = Self::new(config, partitions, replication)?;
        topics.set_creation(map.creates_topics());
        Ok(topics)
    }

    /// Turns creation on or off.
    pub(crate) fn set_creation(&mut self, create: bool) {
        self.create = create;
    }

    /// Makes sure each of `topics` exists (an existing one is fine); nothing when creation is off.
    pub(crate) async fn ensure<'a>(
        &mut self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), KafkaError> {
        if !self.create {
            return Ok(());
        }
        let mut missing: Vec<&str> = topics
            .into_iter()
            .filter(|t| !self.known.contains(*t))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.partitions,
                    TopicReplication::Fixed(self.replication),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .admin
            .create_topics(&new, &options)
            .await
            .map_err(crate::kafka("create topics"))?;
        for result in results {
            match result {
                Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    self.known.insert(topic);
                }
                Err((topic, code)) => {
                    return Err(KafkaError::Topology {
                        broker: crate::BROKER,
                        destination: topic,
                        reason: code.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Forgets which topics exist (after a failure that may mean one was deleted).
    pub(crate) fn forget(&mut self) {
        self.known.clear();
    }
}
