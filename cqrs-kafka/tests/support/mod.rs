//! Shared by the Kafka tests and the Kafka benchmark: the broker and names no earlier run used.

/// The brokers of `KAFKA_BROKERS` (default `127.0.0.1:9092`).
pub fn brokers() -> String {
    evently_kafka::KafkaConfig::from_env().brokers().to_owned()
}

/// `name` made unique on the shared broker (topics and groups outlive a run).
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{nanos}", std::process::id())
}
