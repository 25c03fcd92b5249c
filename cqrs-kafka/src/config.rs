//! Connection settings and the aggregate-type-to-topic mapping.

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

use crate::KafkaError;

/// Which brokers to talk to and how: brokers, client id, and any librdkafka property passed
/// through (`security.protocol`, `sasl.mechanism`, `ssl.ca.location`, ...).
///
/// `Debug` shows every property but masks the values of secrets (any key naming a password,
/// secret, token, private key or JAAS config), so a config can be logged.
#[derive(Clone)]
pub struct KafkaConfig {
    brokers: String,
    client_id: String,
    properties: BTreeMap<String, String>,
}

/// Whether a librdkafka property holds a secret.
fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "jaas",
        ".key.pem",
        "private",
        "credentials",
    ]
    .iter()
    .any(|word| key.contains(word))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Brokers as librdkafka's `bootstrap.servers` (`host:port,host:port`), client id `cqrs`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            client_id: "cqrs".to_owned(),
            properties: BTreeMap::new(),
        }
    }

    /// The brokers from `KAFKA_BROKERS`, `127.0.0.1:9092` when unset.
    #[must_use]
    pub fn from_env() -> Self {
        Self::new(std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned()))
    }

    /// The client id the brokers see (and log).
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Sets any librdkafka property (SSL, SASL, timeouts, ...). The relay's delivery guarantees
    /// are not negotiable: `enable.idempotence` and `acks` are set by the relay after these.
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// The brokers.
    #[must_use]
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// A librdkafka configuration for a client of these brokers with the user's properties (for
    /// tools and tests that talk to the same cluster).
    #[must_use]
    pub fn client_config(&self) -> ClientConfig {
        self.client("", &[])
    }

    /// The librdkafka configuration: brokers, client id (with `suffix`), `defaults`, then the
    /// properties (which override the defaults).
    pub(crate) fn client(&self, suffix: &str, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("{}{suffix}", self.client_id));
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// The longest topic name Kafka accepts.
const MAX_TOPIC: usize = 249;

/// Whether `name` is a legal Kafka topic name.
fn legal_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Which topic an aggregate type's events go to: by default the aggregate type itself with a
/// prefix (`"orders."` + `"order"`), characters Kafka does not allow replaced by `_`; explicit
/// routes override it.
#[derive(Debug, Clone)]
pub struct TopicMap {
    prefix: String,
    routes: BTreeMap<String, String>,
    partitions: i32,
    replication: i32,
    create: bool,
}

impl Default for TopicMap {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            routes: BTreeMap::new(),
            partitions: 6,
            replication: 1,
            create: true,
        }
    }
}

impl TopicMap {
    /// Topics named after the aggregate types, 6 partitions, replication 1.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `prefix` before every default topic name (e.g. `"shop."`).
    ///
    /// # Errors
    /// [`KafkaError::Config`] when the prefix has characters a topic name cannot have.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, KafkaError> {
        let prefix = prefix.into();
        if !prefix.is_empty() && !legal_topic(&prefix) {
            return Err(KafkaError::config(
                crate::BROKER,
                format_args!(
                    "topic prefix `{prefix}` has characters Kafka does not allow (use a-z, A-Z, 0-9, `.`, `_`, `-`)"
                ),
            ));
        }
        self.prefix = prefix;
        Ok(self)
    }

    /// Sends the events of `aggregate_type` to `topic`.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when `topic` is not a legal topic name.
    pub fn route(
        mut self,
        aggregate_type: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<Self, KafkaError> {
        let topic = topic.into();
        if !legal_topic(&topic) {
            return Err(KafkaError::config(
                crate::BROKER,
                format_args!(
                    "`{topic}` is not a legal topic name (1 to 249 of a-z, A-Z, 0-9, `.`, `_`, `-`)"
                ),
            ));
        }
        self.routes.insert(aggregate_type.into(), topic);
        Ok(self)
    }

    /// How many partitions and replicas the relay creates missing topics with.
    ///
    /// # Errors
    /// [`KafkaError::Config`] when either is below 1.
    pub fn with_layout(mut self, partitions: i32, replication: i32) -> Result<Self, KafkaError> {
        if partitions < 1 || replication < 1 {
            return Err(KafkaError::config(
                crate::BROKER,
                format_args!(
                    "topics need at least 1 partition and 1 replica, not {partitions} and {replication}"
                ),
            ));
        }
        self.partitions = partitions;
        self.replication = replication;
        Ok(self)
    }

    /// The partitions and replication of created topics.
    #[must_use]
    pub fn layout(&self) -> (i32, i32) {
        (self.partitions, self.replication)
    }

    /// Whether the relay creates missing topics (the default) or expects them to exist: turn it
    /// off where topics are managed outside the application (ACLs that forbid clients creating
    /// topics, infrastructure as code). A topic that does not exist then fails the deliveries
    /// to it (`KafkaError::Delivery`, naming the topic) and the relay retries from there.
    #[must_use]
    pub fn with_topic_creation(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Whether missing topics are created.
    #[must_use]
    pub fn creates_topics(&self) -> bool {
        self.create
    }

    /// The topic of `aggregate_type`'s events.
    #[must_use]
    pub fn topic(&self, aggregate_type: &str) -> String {
        if let Some(topic) = self.routes.get(aggregate_type) {
            return topic.clone();
        }
        let mut topic = self.prefix.clone();
        topic.extend(aggregate_type.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        }));
        topic.truncate(MAX_TOPIC);
        topic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_debug() {
        let config = KafkaConfig::new("b:9092")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "s3cret")
            .set("sasl.oauthbearer.client.secret", "xyz")
            .set("sasl.jaas.config", "user=\"a\" password=\"b\"")
            .set("security.protocol", "sasl_ssl");
        let shown = format!("{config:?}");
        for secret in ["hunter2", "s3cret", "xyz", "password=\\\"b"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("sasl_ssl"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn topics_default_to_the_aggregate_type_and_stay_legal() {
        let map = TopicMap::new().with_prefix("shop.").unwrap();
        assert_eq!(map.topic("order"), "shop.order");
        assert_eq!(map.topic("bank account/ü"), "shop.bank_account__");
        let map = map.route("order", "orders-v2").unwrap();
        assert_eq!(map.topic("order"), "orders-v2");
        assert!(TopicMap::new().route("order", "bad topic").is_err());
        assert!(TopicMap::new().with_prefix("a b").is_err());
        assert!(TopicMap::new().with_layout(0, 1).is_err());
        assert_eq!(TopicMap::new().topic(&"x".repeat(300)).len(), MAX_TOPIC);
    }
}
