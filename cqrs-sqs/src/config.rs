//! Where the queues are, how they are named, and how the client is built.

use std::fmt;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};
use cqrs_transport::TransportError;

use crate::BROKER;

/// The SQS endpoint, credentials and the queue the relay sends to.
///
/// Queues are FIFO queues (names end in `.fifo`): the relay sends every event to
/// [`queue`](Self::queue) with `MessageGroupId` = its stream (the server hands a group's messages
/// out in order, one consumer at a time) and `MessageDeduplicationId` = its event id (the server
/// drops a resend within its 5-minute window). SQS has no fan-out of its own: a second consumer
/// of the same events reads a queue of its own, fed by a relay of its own (its own name, so its
/// own checkpoint).
#[derive(Clone)]
pub struct SqsConfig {
    endpoint: Option<String>,
    region: String,
    credentials: Option<(String, String)>,
    queue: String,
    declare: bool,
    visibility: Duration,
    max_receive_count: u32,
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("static_credentials", &self.credentials.is_some())
            .field("queue", &self.queue)
            .field("declare", &self.declare)
            .field("visibility", &self.visibility)
            .field("max_receive_count", &self.max_receive_count)
            .finish()
    }
}

impl SqsConfig {
    /// AWS in `region` with the normal credential chain (environment, profile, instance role),
    /// events to queue `cqrs-events.fifo`, queues declared by this crate, a 30 s visibility
    /// timeout, the server's redrive after 10 receives.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            region: region.into(),
            credentials: None,
            queue: "cqrs-events.fifo".to_owned(),
            declare: true,
            visibility: Duration::from_secs(30),
            max_receive_count: 10,
        }
    }

    /// A local SQS-compatible server at `endpoint` (`http://127.0.0.1:4566`), region
    /// `us-east-1`, static credentials `test`/`test` (local servers accept any).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self::new("us-east-1")
            .with_endpoint(endpoint)
            .with_static_credentials("test", "test")
    }

    /// From the environment: `SQS_ENDPOINT` (a local server, with static credentials from
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` or `test`/`test`), else AWS with the normal
    /// chain; `AWS_REGION` (default `us-east-1`); `SQS_QUEUE` (default `cqrs-events.fifo`).
    #[must_use]
    pub fn from_env() -> Self {
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned());
        let mut config = Self::new(region);
        if let Ok(endpoint) = std::env::var("SQS_ENDPOINT") {
            let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".to_owned());
            let secret =
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".to_owned());
            config = config
                .with_endpoint(endpoint)
                .with_static_credentials(id, secret);
        }
        if let Ok(queue) = std::env::var("SQS_QUEUE") {
            config.queue = queue;
        }
        config
    }

    /// Talks to `endpoint` instead of AWS's.
    #[must_use]
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Static credentials instead of the normal chain.
    #[must_use]
    pub fn with_static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// The FIFO queue the relay sends to.
    ///
    /// # Errors
    /// [`TransportError::Config`] when `queue` is not a FIFO queue name (1 to 80 characters of
    /// letters, digits, `-` and `_`, ending in `.fifo`).
    pub fn with_queue(mut self, queue: impl Into<String>) -> Result<Self, TransportError> {
        let queue = queue.into();
        check_queue_name(&queue)?;
        self.queue = queue;
        Ok(self)
    }

    /// Whether this crate creates the queues it uses (the default) or expects operators to.
    #[must_use]
    pub fn with_declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// How long a received message stays invisible to other consumers (the consumer extends it
    /// while its handler runs), at least 1 s, at most 12 hours.
    #[must_use]
    pub fn with_visibility(mut self, visibility: Duration) -> Self {
        self.visibility = visibility.clamp(Duration::from_secs(1), Duration::from_secs(43_200));
        self
    }

    /// After how many receives the server moves a message to the dead-letter queue by itself
    /// (a consumer that crashes on it every time), 1 to 1,000.
    #[must_use]
    pub fn with_max_receive_count(mut self, count: u32) -> Self {
        self.max_receive_count = count.clamp(1, 1_000);
        self
    }

    /// The queue the relay sends to.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Whether queues are declared by this crate.
    #[must_use]
    pub fn declares(&self) -> bool {
        self.declare
    }

    /// The visibility timeout.
    #[must_use]
    pub fn visibility(&self) -> Duration {
        self.visibility
    }

    /// The redrive's receive count.
    #[must_use]
    pub fn max_receive_count(&self) -> u32 {
        self.max_receive_count
    }

    /// The endpoint, when not AWS's.
    #[must_use]
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// A client for this configuration (the SDK's standard retries, 30 s per operation).
    pub async fn client(&self) -> aws_sdk_sqs::Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &self.credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "cqrs-sqs",
            ));
        }
        aws_sdk_sqs::Client::new(&loader.load().await)
    }
}

/// The dead-letter queue of FIFO queue `queue`: `<name>-dlq.fifo`.
#[must_use]
pub fn dead_letter_queue(queue: &str) -> String {
    let base = queue.strip_suffix(".fifo").unwrap_or(queue);
    format!("{base}-dlq.fifo")
}

/// `Ok` for a FIFO queue name whose dead-letter queue name is also valid.
pub(crate) fn check_queue_name(queue: &str) -> Result<(), TransportError> {
    let base = queue.strip_suffix(".fifo");
    let valid = base.is_some_and(|base| {
        !base.is_empty()
            // `<base>-dlq.fifo` must fit in 80 characters too.
            && base.len() + "-dlq.fifo".len() <= 80
            && base
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if valid {
        Ok(())
    } else {
        Err(TransportError::config(
            BROKER,
            format_args!(
                "`{queue}` is not a FIFO queue name this crate can use: letters, digits, `-` and `_`, ending in `.fifo`, at most 71 characters before `.fifo` (its dead-letter queue adds `-dlq`)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_checked() {
        assert!(
            SqsConfig::local("http://x")
                .with_queue("orders.fifo")
                .is_ok()
        );
        for bad in [
            "orders",
            ".fifo",
            "a b.fifo",
            "a.b.fifo",
            &format!("{}.fifo", "x".repeat(72)),
        ] {
            let error = SqsConfig::local("http://x")
                .with_queue(bad)
                .expect_err(bad)
                .to_string();
            assert!(error.contains("not a FIFO queue name"), "{error}");
        }
        assert_eq!(dead_letter_queue("orders.fifo"), "orders-dlq.fifo");
    }

    #[test]
    fn durations_and_counts_are_clamped() {
        let config = SqsConfig::local("http://x")
            .with_visibility(Duration::MAX)
            .with_max_receive_count(0);
        assert_eq!(config.visibility(), Duration::from_secs(43_200));
        assert_eq!(config.max_receive_count(), 1);
    }
}
