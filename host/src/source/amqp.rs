//! The RabbitMQ source: consumes metric messages with manual acks,
//! reconnects by itself, dead-letters malformed messages.
//!
//! # Topology
//!
//! [`AmqpSource::connect`] declares, on every (re)connection:
//!
//! ```text
//! publishers ──▶ exchange ──(binding)──▶ queue ──▶ wagg
//!                                          │ x-dead-letter-exchange
//!                dead-letter exchange ◀────┘ (and wagg's own dead letters)
//!                (fanout) ──▶ dead-letter queue
//! ```
//!
//! # Delivery tags, generations, and the ack contract
//!
//! AMQP delivery tags count deliveries per channel, and a tag means nothing
//! on another channel. Every connection the source opens is a new
//! *generation*; a [`DeliveryTag`] carries the generation it came from, and an
//! ack for an older generation is ignored: the broker requeues everything a
//! dead connection left unacked, and it comes back with `redelivered = true`.
//!
//! The broker closes the channel (`PRECONDITION_FAILED`, "unknown delivery
//! tag") when a tag is acked twice, or a `multiple` ack names a tag that is
//! already acked. The source keeps track of what it acked, so that:
//!
//! - [`AmqpSource::ack_upto`] at or below an earlier `ack_upto` is a no-op
//!   returning `Ok(false)`; one that names a dead-lettered tag acks the
//!   highest tag below it that is still unacked instead.
//! - [`AmqpSource::dead_letter`] refuses ([`SourceError::AlreadyAcked`]) a
//!   delivery an `ack_upto` already covered. The caller's contract: dead-letter
//!   a delivery *before* acking past it.
//!
//! Delivery is at least once: a message can come back after a reconnect even
//! though it was counted, and a dead letter can be published twice if the
//! connection dies between its publish and its ack.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_core::Stream;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

/// Longest `x-wagg-reason` header a dead letter carries, in bytes.
pub const MAX_REASON_BYTES: usize = 256;
/// Longest `x-wagg-reason-code` header a dead letter carries, in bytes.
pub const MAX_REASON_CODE_BYTES: usize = 64;
/// How long [`AmqpSource::dead_letter`] waits for the broker to confirm a dead
/// letter before it gives up (the original then stays unacked).
pub const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishes [`AmqpPublisher::publish_many`] has in flight before it
/// waits for the oldest confirm: bounds its memory, keeps the pipe full.
pub const PUBLISH_WINDOW: usize = 8192;
/// AMQP short strings (names, routing keys, header names) hold at most this
/// many bytes.
const MAX_SHORT_STRING: usize = 255;
/// `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `[source.amqp]` in `wagg.toml`: where to consume from, and the topology
/// wagg declares there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// AMQP URI of the broker: `amqp://user:password@host:port/vhost`, with the
    /// vhost URL-encoded (`/` is `%2f`). Query parameters tune the connection,
    /// e.g. `?heartbeat=10` to notice a silently dead connection within ~20 s.
    /// Default: `amqp://guest:guest@127.0.0.1:5672/%2f`.
    #[serde(default = "default_uri")]
    pub uri: String,
    /// Name of the connection as the broker shows it (`connection_name` client
    /// property: management UI, `rabbitmqctl list_connections`). Give each
    /// host its own. Dead letters go over a second connection, named with
    /// ` (dead letters)` appended. Default: `wagg`.
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// Exchange the publishers send to; declared with `exchange_kind`.
    /// Default: `wagg.metrics`.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Kind of `exchange`: `direct`, `topic`, `fanout`, or `x-consistent-hash`
    /// (needs the broker plugin `rabbitmq_consistent_hash_exchange`). Default:
    /// `direct`.
    #[serde(default)]
    pub exchange_kind: ExchangeKind,
    /// Binding key of `queue` on a `direct` or `topic` exchange (publishers use
    /// it as their routing key). Ignored by `fanout` and `x-consistent-hash`
    /// (which binds with `hash_weight`). Default: `metrics`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// `x-consistent-hash` only: this host's weight, the binding key of
    /// `queue`. A queue bound with weight 3 gets about three times the keys of
    /// one bound with weight 1. Default: 1.
    #[serde(default = "default_hash_weight")]
    pub hash_weight: u32,
    /// `x-consistent-hash` only: hash this message header instead of the
    /// routing key (the exchange's `hash-header` argument). For several wagg
    /// hosts each binding its own queue with a weight: publishers put the
    /// customer id in this header, so all of a customer's messages land on one
    /// host and its aggregates are complete there. The exchange's arguments
    /// cannot change once it exists. Default: none (hash the routing key).
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Queue wagg consumes; declared with `x-dead-letter-exchange` =
    /// `dead_letter_exchange`. Default: `wagg.metrics`.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Exchange (fanout, always durable) dead letters go to: messages wagg
    /// could not decode, with the headers `x-wagg-reason` and
    /// `x-wagg-reason-code`, and whatever the broker itself dead-letters from
    /// `queue`. Default: `wagg.dead-letter`.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_exchange: String,
    /// Queue (always durable) bound to `dead_letter_exchange`, where dead
    /// letters wait for an operator. Default: `wagg.dead-letter`.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_queue: String,
    /// Most unacked messages the broker sends this consumer (`basic.qos`).
    /// wagg acks at each checkpoint (`pipeline.checkpoint_interval_ms`), so
    /// this must cover the messages of one checkpoint interval plus those in
    /// flight: too low and the broker stops sending between checkpoints. An
    /// AMQP limit caps it at 65 535 (a 16-bit count). Must not be 0 (which
    /// would mean "unlimited"). Default: 20 000 (two seconds at 10 000
    /// messages/s).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare `exchange` and `queue` durable (they survive a broker restart).
    /// Turn off only for throwaway setups. Default: true.
    #[serde(default = "default_durable")]
    pub durable: bool,
    /// Shortest wait before a reconnect attempt, in milliseconds. Waits double
    /// from here on each failed attempt, with random jitter. Default: 100.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest wait between reconnect attempts, in milliseconds. Default:
    /// 30 000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How long start-up keeps trying to reach the broker before it fails, in
    /// milliseconds. Once connected, wagg reconnects forever. Default: 60 000.
    #[serde(default = "default_give_up_after_ms")]
    pub give_up_after_ms: u64,
}

fn default_uri() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()
}
fn default_connection_name() -> String {
    "wagg".to_owned()
}
fn default_exchange() -> String {
    "wagg.metrics".to_owned()
}
fn default_routing_key() -> String {
    "metrics".to_owned()
}
fn default_hash_weight() -> u32 {
    1
}
fn default_queue() -> String {
    "wagg.metrics".to_owned()
}
fn default_dead_letter() -> String {
    "wagg.dead-letter".to_owned()
}
fn default_prefetch() -> u16 {
    20_000
}
fn default_durable() -> bool {
    true
}
fn default_reconnect_min_ms() -> u64 {
    100
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_give_up_after_ms() -> u64 {
    60_000
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            uri: default_uri(),
            connection_name: default_connection_name(),
            exchange: default_exchange(),
            exchange_kind: ExchangeKind::default(),
            routing_key: default_routing_key(),
            hash_weight: default_hash_weight(),
            hash_header: None,
            queue: default_queue(),
            dead_letter_exchange: default_dead_letter(),
            dead_letter_queue: default_dead_letter(),
            prefetch: default_prefetch(),
            durable: default_durable(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            give_up_after_ms: default_give_up_after_ms(),
        }
    }
}

impl AmqpConfig {
    /// Checks what the broker would otherwise refuse later, or what would
    /// make the source misbehave.
    ///
    /// # Errors
    ///
    /// [`SourceError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SourceError> {
        let bad = |msg: String| Err(SourceError::Config(msg));
        for (field, value) in [
            ("exchange", &self.exchange),
            ("routing_key", &self.routing_key),
            ("queue", &self.queue),
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
        ] {
            if value.len() > MAX_SHORT_STRING {
                return bad(format!("`{field}` is longer than {MAX_SHORT_STRING} bytes"));
            }
        }
        for (field, value) in [
            ("exchange", &self.exchange),
            ("queue", &self.queue),
            ("dead_letter_exchange", &self.dead_letter_exchange),
            ("dead_letter_queue", &self.dead_letter_queue),
        ] {
            if value.is_empty() {
                return bad(format!("`{field}` is empty"));
            }
        }
        if self.exchange == self.dead_letter_exchange {
            return bad("`exchange` and `dead_letter_exchange` are the same".to_owned());
        }
        if self.queue == self.dead_letter_queue {
            return bad("`queue` and `dead_letter_queue` are the same".to_owned());
        }
        if self.prefetch == 0 {
            return bad("`prefetch` is 0, which AMQP reads as unlimited".to_owned());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return bad(format!(
                "`reconnect_min_ms` ({}) must be at least 1 and at most `reconnect_max_ms` ({})",
                self.reconnect_min_ms, self.reconnect_max_ms
            ));
        }
        if self.exchange_kind == ExchangeKind::ConsistentHash && self.hash_weight == 0 {
            return bad("`hash_weight` is 0: the queue would get no messages".to_owned());
        }
        match &self.hash_header {
            Some(_) if self.exchange_kind != ExchangeKind::ConsistentHash => {
                return bad("`hash_header` needs `exchange_kind = \"x-consistent-hash\"`".into());
            }
            Some(h) if h.is_empty() || h.len() > MAX_SHORT_STRING => {
                return bad(format!(
                    "`hash_header` must be 1 to {MAX_SHORT_STRING} bytes"
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The binding key of `queue` on `exchange`.
    fn binding_key(&self) -> String {
        match self.exchange_kind {
            ExchangeKind::ConsistentHash => self.hash_weight.to_string(),
            ExchangeKind::Fanout => String::new(),
            ExchangeKind::Direct | ExchangeKind::Topic => self.routing_key.clone(),
        }
    }
}

/// Kind of the exchange publishers send to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ExchangeKind {
    /// `x-consistent-hash`: spreads routing keys (or the `hash_header`) over
    /// the bound queues by weight; one key always lands on one queue.
    #[serde(rename = "x-consistent-hash")]
    ConsistentHash,
    /// `direct`: to the queues whose binding key equals the routing key.
    #[default]
    #[serde(rename = "direct")]
    Direct,
    /// `fanout`: to every bound queue.
    #[serde(rename = "fanout")]
    Fanout,
    /// `topic`: to the queues whose binding pattern matches the routing key.
    #[serde(rename = "topic")]
    Topic,
}

impl ExchangeKind {
    /// The name AMQP knows this kind by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsistentHash => "x-consistent-hash",
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
        }
    }

    fn to_lapin(self) -> lapin::ExchangeKind {
        match self {
            Self::ConsistentHash => lapin::ExchangeKind::Custom(self.as_str().to_owned()),
            Self::Direct => lapin::ExchangeKind::Direct,
            Self::Fanout => lapin::ExchangeKind::Fanout,
            Self::Topic => lapin::ExchangeKind::Topic,
        }
    }
}

// ---------------------------------------------------------------------------
// Deliveries and errors
// ---------------------------------------------------------------------------

/// A message from the broker. `tag` is only valid on the connection generation
/// it came from.
#[derive(Debug)]
pub struct Delivery {
    /// The message body.
    pub body: Vec<u8>,
    /// The broker delivered this message before without an ack (to this or
    /// another consumer): it may have been counted already.
    pub redelivered: bool,
    /// What [`AmqpSource::ack_upto`] and [`AmqpSource::dead_letter`] take.
    pub tag: DeliveryTag,
    /// The routing key it was published with (the customer's, with the
    /// consistent-hash exchange): logged and kept on a dead letter.
    pub routing_key: ShortString,
    /// Its properties as published (content type, `message_id`, headers,
    /// ...): a dead letter keeps them, and a `message_id` identifies a
    /// redelivery exactly (see `pipeline::dedup`).
    pub properties: BasicProperties,
}

impl Delivery {
    /// A delivery of `body` with no routing key or properties (the demo's
    /// generator, tests).
    pub fn bare(body: Vec<u8>, redelivered: bool, tag: DeliveryTag) -> Self {
        Delivery {
            body,
            redelivered,
            tag,
            routing_key: ShortString::default(),
            properties: BasicProperties::default(),
        }
    }

    /// The publisher's `message_id`, if it set a non-empty one.
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
            .filter(|id| !id.is_empty())
    }
}

/// The properties of a dead letter: the original's that describe the
/// message, persistent, with `headers`. Not `user_id` (RabbitMQ refuses a
/// publish whose `user_id` is not the publishing user's, which would stall
/// every ack behind the dead letter), `expiration` (the dead letter would
/// vanish from its queue) or routing-related ones (`reply_to`, `priority`).
fn dead_letter_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

/// Identifies a delivery: the connection generation and the AMQP delivery tag
/// on it. Orders by generation, then tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryTag {
    /// Which connection of the source delivered it; the first is 1.
    pub generation: u64,
    /// The AMQP delivery tag, counting from 1 on each connection.
    pub tag: u64,
}

/// What can go wrong in the AMQP source and publisher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The configuration cannot work; nothing was attempted.
    #[error("invalid [source.amqp] configuration: {0}")]
    Config(String),
    /// The broker stayed unreachable (or refused the login) for
    /// `give_up_after_ms`.
    #[error("could not connect to {uri} ({attempts} attempts)")]
    Connect {
        /// The broker URI, without its password.
        uri: String,
        /// Connection attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused to declare part of the topology, typically because it
    /// exists with other settings (`PRECONDITION_FAILED`): an operator must
    /// reconcile the configuration with the broker.
    #[error("could not declare {what}")]
    Topology {
        /// What was being declared, e.g. `queue "wagg.metrics"`.
        what: String,
        /// The broker's refusal.
        #[source]
        source: lapin::Error,
    },
    /// An AMQP operation failed (connection or channel lost, broker error).
    #[error("AMQP {op} failed")]
    Amqp {
        /// The operation, e.g. `basic.publish`.
        op: &'static str,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker nacked a published message: it did not take it.
    #[error("the broker refused (nacked) a published message")]
    Nacked,
    /// A published message matched no queue and was returned.
    #[error("no queue is bound for routing key {routing_key:?}: the message was returned")]
    Unroutable {
        /// The routing key of the returned message.
        routing_key: String,
    },
    /// No publisher confirm arrived in time.
    #[error("the broker did not confirm a publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// A delivery tag that the source never delivered (a bug in the caller).
    #[error("delivery tag {tag} of generation {generation} was never delivered")]
    UnknownTag {
        /// The tag's generation.
        generation: u64,
        /// The AMQP delivery tag.
        tag: u64,
    },
    /// A delivery was already acked (by `ack_upto` or an earlier dead letter):
    /// it cannot be dead-lettered any more. A bug in the caller, which must
    /// dead-letter before it acks past a delivery.
    #[error("delivery tag {tag} of generation {generation} was already acked")]
    AlreadyAcked {
        /// The tag's generation.
        generation: u64,
        /// The AMQP delivery tag.
        tag: u64,
    },
    /// A name or routing key is longer than AMQP allows (255 bytes).
    #[error("{what} is longer than {MAX_SHORT_STRING} bytes")]
    TooLong {
        /// What was too long.
        what: &'static str,
    },
}

fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> SourceError {
    move |source| SourceError::Amqp { op, source }
}

fn topology(what: String) -> impl FnOnce(lapin::Error) -> SourceError {
    move |source| SourceError::Topology { what, source }
}

fn short(value: &str, what: &'static str) -> Result<ShortString, SourceError> {
    ShortString::try_new(value).map_err(|_| SourceError::TooLong { what })
}

/// Displays an error with its chain of causes, `a: b: c`, for logs.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// A new channel on `connection` in publisher-confirm mode.
///
/// # Errors
///
/// [`SourceError::Amqp`] if the broker refuses either step.
pub(crate) async fn confirm_channel(connection: &Connection) -> Result<Channel, SourceError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    Ok(channel)
}

/// The URI without its password, for logs and errors.
pub(crate) fn redact(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://").map(|i| i + 3) else {
        return uri.to_owned();
    };
    let rest = &uri[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &uri[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => uri.to_owned(),
        },
        None => uri.to_owned(),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

/// Exponential backoff with jitter: the n-th wait is drawn uniformly from
/// `[c/2, c]` with `c = min · 2ⁿ⁺¹` capped at `max`, and never below `min`.
/// The jitter spreads the reconnects of many hosts after a broker restart.
#[derive(Debug, Clone)]
struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let mut backoff = Self {
            min,
            max,
            ceiling: min,
        };
        backoff.reset();
        backoff
    }

    fn reset(&mut self) {
        self.ceiling = self.min.saturating_mul(2).min(self.max);
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = ceiling.saturating_mul(2).min(self.max);
        let floor = (ceiling / 2).max(self.min).min(ceiling);
        let span = (ceiling - floor).as_millis() as u64;
        floor + Duration::from_millis(rand::rng().random_range(0..=span))
    }
}

// ---------------------------------------------------------------------------
// Connection set-up
// ---------------------------------------------------------------------------

/// One live connection: what `next()` owns.
struct Link {
    generation: u64,
    connection: Connection,
    consume: Channel,
    consumer: Consumer,
    connected_at: Instant,
}

/// What `establish` opened, before it gets a generation.
struct Opened {
    connection: Connection,
    consume: Channel,
    consumer: Consumer,
}

enum EstablishError {
    /// The broker could not be reached or refused the login: worth retrying.
    Connect(lapin::Error),
    /// Connected, but the topology or the consumer failed.
    Setup(SourceError),
}

async fn establish(cfg: &AmqpConfig) -> Result<Opened, EstablishError> {
    let props = ConnectionProperties::default()
        .with_connection_name(cfg.connection_name.as_str().into())
        .with_client_property("product".into(), "wagg".into());
    let connection = Connection::connect(&cfg.uri, props)
        .await
        .map_err(EstablishError::Connect)?;
    match set_up(&connection, cfg).await {
        Ok((consume, consumer)) => Ok(Opened {
            connection,
            consume,
            consumer,
        }),
        Err(error) => {
            // Best effort: the connection is useless; do not leave it open.
            let _ = connection.close(200, "wagg set-up failed".into()).await;
            Err(EstablishError::Setup(error))
        }
    }
}

/// Declares the topology, then starts consuming. Returns the consuming
/// channel and the consumer.
async fn set_up(
    connection: &Connection,
    cfg: &AmqpConfig,
) -> Result<(Channel, Consumer), SourceError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    declare_topology(&channel, cfg).await?;
    channel
        .basic_qos(cfg.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(amqp("basic.qos"))?;
    let consumer = channel
        .basic_consume(
            short(&cfg.queue, "queue")?,
            ShortString::default(), // the broker picks a unique tag
            BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp("basic.consume"))?;
    Ok((channel, consumer))
}

/// The connection dead letters are published on.
///
/// Not the consuming one: RabbitMQ stops reading from a connection that
/// publishes during a memory or disk alarm, and the acks of the consumer
/// would then wait behind the block, just when the queue needs draining.
#[derive(Debug)]
struct DeadLetterLink {
    connection: Connection,
    /// In confirm mode.
    channel: Channel,
}

async fn open_dead_letter_link(shared: &Shared) -> Result<DeadLetterLink, SourceError> {
    let props = ConnectionProperties::default()
        .with_connection_name(shared.dead_letter_connection_name.as_str().into())
        .with_client_property("product".into(), "wagg".into());
    let connection = Connection::connect(&shared.uri, props)
        .await
        .map_err(|source| SourceError::Connect {
            uri: redact(&shared.uri),
            attempts: 1,
            source,
        })?;
    let channel = confirm_channel(&connection).await?;
    Ok(DeadLetterLink {
        connection,
        channel,
    })
}

async fn declare_topology(channel: &Channel, cfg: &AmqpConfig) -> Result<(), SourceError> {
    let exchange = short(&cfg.exchange, "exchange")?;
    let queue = short(&cfg.queue, "queue")?;
    let dlx = short(&cfg.dead_letter_exchange, "dead_letter_exchange")?;
    let dlq = short(&cfg.dead_letter_queue, "dead_letter_queue")?;

    let mut exchange_args = FieldTable::default();
    if let Some(header) = &cfg.hash_header {
        exchange_args.insert(
            "hash-header".into(),
            AMQPValue::LongString(header.as_str().into()),
        );
    }
    channel
        .exchange_declare(
            exchange.clone(),
            cfg.exchange_kind.to_lapin(),
            ExchangeDeclareOptions {
                durable: cfg.durable,
                ..ExchangeDeclareOptions::default()
            },
            exchange_args,
        )
        .await
        .map_err(topology(format!(
            "{} exchange {:?}",
            cfg.exchange_kind.as_str(),
            cfg.exchange
        )))?;
    channel
        .exchange_declare(
            dlx.clone(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(topology(format!(
            "dead-letter exchange {:?}",
            cfg.dead_letter_exchange
        )))?;
    channel
        .queue_declare(
            dlq.clone(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(topology(format!(
            "dead-letter queue {:?}",
            cfg.dead_letter_queue
        )))?;
    channel
        .queue_bind(
            dlq,
            dlx.clone(),
            ShortString::default(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(topology(format!(
            "binding of {:?} to {:?}",
            cfg.dead_letter_queue, cfg.dead_letter_exchange
        )))?;

    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()),
    );
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: cfg.durable,
                ..QueueDeclareOptions::default()
            },
            queue_args,
        )
        .await
        .map_err(topology(format!("queue {:?}", cfg.queue)))?;
    let binding_key = cfg.binding_key();
    channel
        .queue_bind(
            queue,
            exchange,
            short(&binding_key, "binding key")?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(topology(format!(
            "binding of {:?} to {:?} with key {binding_key:?}",
            cfg.queue, cfg.exchange
        )))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Ack bookkeeping, shared between the source and its ackers
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Shared {
    /// Held across each ack sent, so that acks reach the wire in the order
    /// they were decided.
    acks: tokio::sync::Mutex<AckState>,
    /// Highest tag `next()` returned on the current generation.
    delivered_upto: AtomicU64,
    reconnects: AtomicU64,
    /// Opened on the first dead letter, reopened when it died.
    dead_letters: tokio::sync::Mutex<Option<DeadLetterLink>>,
    uri: String,
    dead_letter_connection_name: String,
    dead_letter_exchange: ShortString,
    /// Routing key of dead letters (the fanout ignores it; it tells an operator
    /// which queue a dead letter came from).
    dead_letter_routing_key: ShortString,
    /// The consumer's prefetch, re-sent to confirm acks (see `ack_upto`).
    prefetch: u16,
}

#[derive(Debug)]
struct AckState {
    generation: u64,
    /// The consuming channel; `None` while reconnecting or after `close()`.
    consume: Option<Channel>,
    /// Every tag up to this one is acked.
    acked_upto: u64,
    /// Tags above `acked_upto` acked one by one (dead letters).
    acked_singly: BTreeSet<u64>,
}

impl AckState {
    fn is_acked(&self, tag: u64) -> bool {
        tag <= self.acked_upto || self.acked_singly.contains(&tag)
    }
}

/// A cloneable handle that acks and dead-letters deliveries of an
/// [`AmqpSource`], for a task other than the one calling
/// [`AmqpSource::next`] (e.g. the one that flushes the aggregates).
#[derive(Debug, Clone)]
pub struct AmqpAcker {
    shared: Arc<Shared>,
}

impl AmqpAcker {
    /// See [`AmqpSource::ack_upto`].
    ///
    /// # Errors
    ///
    /// See [`AmqpSource::ack_upto`].
    pub async fn ack_upto(&self, tag: DeliveryTag) -> Result<bool, SourceError> {
        let mut state = self.shared.acks.lock().await;
        if tag.generation < state.generation {
            debug!(
                generation = tag.generation,
                tag = tag.tag,
                current = state.generation,
                "Ignored an ack from an older connection; its messages come back as redeliveries."
            );
            return Ok(false);
        }
        self.check_delivered(&state, tag)?;
        if tag.tag <= state.acked_upto {
            return Ok(false);
        }
        let Some(channel) = state.consume.clone() else {
            return Ok(false);
        };
        // A multiple ack must name a tag that is still unacked: step down past
        // the dead letters acked one by one.
        let mut wire = tag.tag;
        for &singly in state.acked_singly.range(..=tag.tag).rev() {
            if singly != wire {
                break;
            }
            wire -= 1;
        }
        let before = state.acked_upto;
        state.acked_upto = tag.tag;
        state.acked_singly = state.acked_singly.split_off(&(tag.tag + 1));
        if wire > before
            && let Err(error) = channel
                .basic_ack(wire, BasicAckOptions { multiple: true })
                .await
        {
            warn!(
                generation = tag.generation,
                tag = wire,
                error = %Chain(&error),
                "Could not ack; the messages will be redelivered after the reconnect."
            );
            return Ok(false);
        }
        // `basic.ack` has no reply, so a sent ack may still be lost with the
        // connection. A synchronous method on the same channel settles it:
        // the broker answers `basic.qos` only after every frame sent before
        // it, so `Ok(true)` means the broker has processed these acks.
        if let Err(error) = channel
            .basic_qos(self.shared.prefetch, BasicQosOptions { global: false })
            .await
        {
            warn!(
                generation = tag.generation,
                tag = wire,
                error = %Chain(&error),
                "Could not confirm an ack; the messages may be redelivered after the reconnect."
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// See [`AmqpSource::dead_letter`].
    ///
    /// # Errors
    ///
    /// See [`AmqpSource::dead_letter`].
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        code: &str,
        reason: &str,
    ) -> Result<bool, SourceError> {
        let tag = delivery.tag;
        {
            let state = self.shared.acks.lock().await;
            if tag.generation < state.generation {
                debug!(
                    generation = tag.generation,
                    tag = tag.tag,
                    "Skipped a dead letter from an older connection; it comes back as a redelivery."
                );
                return Ok(false);
            }
            self.check_delivered(&state, tag)?;
            if state.is_acked(tag.tag) {
                return Err(already_acked(tag));
            }
            if state.consume.is_none() {
                // Reconnecting or closed: it comes back as a redelivery.
                return Ok(false);
            }
        }

        let code = truncate_utf8(code, MAX_REASON_CODE_BYTES);
        // The publisher's own headers and properties stay, so the message
        // can be fixed and published again as it was; the dead letter goes
        // to the queue by the queue's name, so the original routing key is
        // a header (as RabbitMQ's `x-death` keeps `routing-keys`).
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-wagg-routing-key".into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
        headers.insert(
            "x-wagg-reason".into(),
            AMQPValue::LongString(truncate_utf8(reason, MAX_REASON_BYTES).into()),
        );
        headers.insert(
            "x-wagg-reason-code".into(),
            AMQPValue::LongString(code.into()),
        );
        let properties = dead_letter_properties(&delivery.properties, headers);
        let channel = self.dead_letter_channel().await?;
        let pending = channel
            .basic_publish(
                self.shared.dead_letter_exchange.clone(),
                self.shared.dead_letter_routing_key.clone(),
                BasicPublishOptions::default(),
                &delivery.body,
                properties,
            )
            .await
            .map_err(amqp("basic.publish (dead letter)"))?;
        let confirmation = tokio::time::timeout(DEAD_LETTER_CONFIRM_TIMEOUT, pending)
            .await
            .map_err(|_| SourceError::ConfirmTimeout(DEAD_LETTER_CONFIRM_TIMEOUT))?
            .map_err(amqp("publisher confirm (dead letter)"))?;
        if confirmation.is_nack() {
            return Err(SourceError::Nacked);
        }

        let mut state = self.shared.acks.lock().await;
        if state.generation != tag.generation {
            // The original comes back and will be dead-lettered again.
            return Ok(false);
        }
        if state.is_acked(tag.tag) {
            // An ack_upto raced past it while the dead letter was in flight.
            return Err(already_acked(tag));
        }
        let Some(channel) = state.consume.clone() else {
            return Ok(false);
        };
        state.acked_singly.insert(tag.tag);
        if let Err(error) = channel
            .basic_ack(tag.tag, BasicAckOptions { multiple: false })
            .await
        {
            warn!(
                generation = tag.generation,
                tag = tag.tag,
                error = %Chain(&error),
                "Could not ack a dead-lettered message; it will be redelivered."
            );
            return Ok(false);
        }
        debug!(
            generation = tag.generation,
            tag = tag.tag,
            code,
            bytes = delivery.body.len(),
            "Dead-lettered a message."
        );
        Ok(true)
    }

    /// The channel dead letters are published on, (re)opening its connection
    /// if needed.
    async fn dead_letter_channel(&self) -> Result<Channel, SourceError> {
        let mut link = self.shared.dead_letters.lock().await;
        if let Some(open) = link.as_ref()
            && open.channel.status().connected()
        {
            return Ok(open.channel.clone());
        }
        let opened = open_dead_letter_link(&self.shared).await?;
        let channel = opened.channel.clone();
        // Replacing the dead one drops (and so closes) it.
        *link = Some(opened);
        Ok(channel)
    }

    fn check_delivered(&self, state: &AckState, tag: DeliveryTag) -> Result<(), SourceError> {
        if tag.generation > state.generation
            || tag.tag == 0
            || tag.tag > self.shared.delivered_upto.load(Ordering::Acquire)
        {
            return Err(SourceError::UnknownTag {
                generation: tag.generation,
                tag: tag.tag,
            });
        }
        Ok(())
    }
}

fn already_acked(tag: DeliveryTag) -> SourceError {
    SourceError::AlreadyAcked {
        generation: tag.generation,
        tag: tag.tag,
    }
}

// ---------------------------------------------------------------------------
// The source
// ---------------------------------------------------------------------------

/// Consumes the configured queue with manual acks; reconnects by itself.
pub struct AmqpSource {
    cfg: AmqpConfig,
    shared: Arc<Shared>,
    acker: AmqpAcker,
    link: Option<Link>,
    backoff: Backoff,
    /// The reconnect under way, in a task of its own: the pipeline polls
    /// [`AmqpSource::next`] in a `select!` and drops it at every tick, and
    /// a reconnect that started over each time would never finish.
    reconnecting: Option<tokio::task::JoinHandle<(Opened, u32, Backoff)>>,
    closed: bool,
    /// Where reconnects are counted ([`AmqpSource::set_metrics`]; a
    /// registry of its own until then).
    metrics: Arc<crate::telemetry::Metrics>,
}

impl fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSource")
            .field("uri", &redact(&self.cfg.uri))
            .field("queue", &self.cfg.queue)
            .field("generation", &self.link.as_ref().map(|l| l.generation))
            .field("reconnects", &self.reconnects())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Connects, retrying with jittered exponential backoff (between
    /// `reconnect_min_ms` and `reconnect_max_ms`) for up to
    /// `give_up_after_ms`; declares the topology (exchange, queue with
    /// `x-dead-letter-exchange`, binding, the fanout dead-letter exchange and
    /// its queue); sets `basic.qos(prefetch)`; starts consuming with manual
    /// acks.
    ///
    /// Must run inside a Tokio runtime (lapin spawns its I/O on the current
    /// one).
    ///
    /// # Errors
    ///
    /// - [`SourceError::Config`] if `cfg` does not validate;
    /// - [`SourceError::Connect`] if the broker stayed unreachable;
    /// - [`SourceError::Topology`] if the broker refused a declaration (not
    ///   retried: an operator must act), or [`SourceError::Amqp`].
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, SourceError> {
        cfg.validate()?;
        let mut backoff = Backoff::new(
            Duration::from_millis(cfg.reconnect_min_ms),
            Duration::from_millis(cfg.reconnect_max_ms),
        );
        let deadline = Instant::now() + Duration::from_millis(cfg.give_up_after_ms);
        let mut attempts = 0u32;
        let opened = loop {
            attempts += 1;
            match establish(&cfg).await {
                Ok(opened) => break opened,
                Err(EstablishError::Setup(error)) => return Err(error),
                Err(EstablishError::Connect(error)) => {
                    let delay = backoff.next_delay();
                    if Instant::now() + delay >= deadline {
                        return Err(SourceError::Connect {
                            uri: redact(&cfg.uri),
                            attempts,
                            source: error,
                        });
                    }
                    warn!(
                        attempt = attempts,
                        delay_ms = delay.as_millis() as u64,
                        uri = %redact(&cfg.uri),
                        error = %Chain(&error),
                        "Could not connect to RabbitMQ; retrying."
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        };
        backoff.reset();
        let shared = Arc::new(Shared {
            acks: tokio::sync::Mutex::new(AckState {
                generation: 0,
                consume: None,
                acked_upto: 0,
                acked_singly: BTreeSet::new(),
            }),
            delivered_upto: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            dead_letters: tokio::sync::Mutex::new(None),
            uri: cfg.uri.clone(),
            dead_letter_connection_name: format!("{} (dead letters)", cfg.connection_name),
            dead_letter_exchange: short(&cfg.dead_letter_exchange, "dead_letter_exchange")?,
            dead_letter_routing_key: short(&cfg.queue, "queue")?,
            prefetch: cfg.prefetch,
        });
        let mut source = Self {
            acker: AmqpAcker {
                shared: shared.clone(),
            },
            shared,
            link: None,
            backoff,
            reconnecting: None,
            closed: false,
            metrics: crate::telemetry::Metrics::new(),
            cfg,
        };
        source.install(opened).await;
        info!(
            uri = %redact(&source.cfg.uri),
            queue = %source.cfg.queue,
            prefetch = source.cfg.prefetch,
            "Consuming from RabbitMQ."
        );
        Ok(source)
    }

    /// The next delivery.
    ///
    /// When the connection or channel dies, reconnects with backoff (forever,
    /// logging each failed attempt), redeclares, consumes again with a new
    /// generation, and goes on: what the old connection left unacked comes
    /// back with `redelivered = true`. Returns `None` only after
    /// [`close`](Self::close).
    ///
    /// Cancel-safe: dropping the future loses no delivery (a reconnect under
    /// way starts over).
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.closed {
                return None;
            }
            let Some(link) = self.link.as_mut() else {
                self.reconnect().await;
                continue;
            };
            let generation = link.generation;
            match poll_fn(|cx| Pin::new(&mut link.consumer).poll_next(cx)).await {
                Some(Ok(delivery)) => {
                    self.shared
                        .delivered_upto
                        .fetch_max(delivery.delivery_tag, Ordering::AcqRel);
                    return Some(Delivery {
                        body: delivery.data,
                        redelivered: delivery.redelivered,
                        tag: DeliveryTag {
                            generation,
                            tag: delivery.delivery_tag,
                        },
                        routing_key: delivery.routing_key,
                        properties: delivery.properties,
                    });
                }
                Some(Err(error)) => {
                    warn!(
                        generation,
                        error = %Chain(&error),
                        "Lost the RabbitMQ connection; reconnecting."
                    );
                    self.drop_link().await;
                }
                None => {
                    warn!(
                        generation,
                        "The broker ended the consumer (connection closed or queue deleted); reconnecting."
                    );
                    self.drop_link().await;
                }
            }
        }
    }

    /// Acks every delivery up to and including `tag` (`basic.ack`,
    /// `multiple = true`).
    ///
    /// Returns `Ok(true)` once the broker has processed the ack (confirmed
    /// by a synchronous round trip on the same channel), or if all it covers
    /// was already acked singly; `Ok(false)` if it may not have taken effect:
    /// the round trip failed, or there was nothing to do: `tag` belongs to
    /// an older generation (those messages come back as redeliveries), is at or
    /// below an earlier `ack_upto`, or the connection is down (they come back
    /// too). Never makes the broker close the channel.
    ///
    /// # Errors
    ///
    /// [`SourceError::UnknownTag`] if `tag` was never delivered.
    pub async fn ack_upto(&self, tag: DeliveryTag) -> Result<bool, SourceError> {
        self.acker.ack_upto(tag).await
    }

    /// Dead-letters one malformed message: publishes its body to the
    /// dead-letter exchange with the headers `x-wagg-reason` (`reason`, cut to
    /// [`MAX_REASON_BYTES`]) and `x-wagg-reason-code` (a short code such as
    /// `bad_json`), waits for the publisher confirm (at most
    /// [`DEAD_LETTER_CONFIRM_TIMEOUT`]), then acks the original alone.
    ///
    /// Dead letters are published over a connection of their own, opened on
    /// the first one (and reopened if it died): a connection that publishes
    /// is blocked by the broker during a memory or disk alarm, and the
    /// consumer's acks must not wait behind that block.
    ///
    /// Contract: dead-letter a delivery *before* any
    /// [`ack_upto`](Self::ack_upto) covers it. Returns `Ok(false)` without
    /// publishing if the delivery is from an older generation (it comes back as
    /// a redelivery, to be dead-lettered then), and `Ok(false)` after
    /// publishing if the connection died before the ack (the DLQ may then get
    /// it twice).
    ///
    /// # Errors
    ///
    /// [`SourceError::AlreadyAcked`] if the delivery was acked already,
    /// [`SourceError::UnknownTag`], [`SourceError::Nacked`],
    /// [`SourceError::ConfirmTimeout`], or [`SourceError::Amqp`] if the publish
    /// failed; the original then stays unacked.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        code: &str,
        reason: &str,
    ) -> Result<bool, SourceError> {
        self.acker.dead_letter(delivery, code, reason).await
    }

    /// A cloneable handle to ack and dead-letter from another task.
    pub fn acker(&self) -> AmqpAcker {
        self.acker.clone()
    }

    /// The current connection generation (1 for the first connection; 0 once
    /// closed).
    pub fn generation(&self) -> u64 {
        self.link.as_ref().map_or(0, |link| link.generation)
    }

    /// The configuration this source consumes with.
    pub fn config(&self) -> &AmqpConfig {
        &self.cfg
    }

    /// Reports reconnects to `metrics` from now on (the pipeline calls it
    /// with its own).
    pub fn set_metrics(&mut self, metrics: Arc<crate::telemetry::Metrics>) {
        self.metrics = metrics;
    }

    /// Number of reconnects so far (for metrics).
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Cancels the consumer and closes the connection; unacked messages return
    /// to the queue. [`next`](Self::next) returns `None` from now on.
    ///
    /// # Errors
    ///
    /// [`SourceError::Amqp`] if the broker did not take the close cleanly (the
    /// connection is gone either way).
    pub async fn close(&mut self) -> Result<(), SourceError> {
        self.closed = true;
        if let Some(reconnecting) = self.reconnecting.take() {
            reconnecting.abort();
        }
        self.shared.acks.lock().await.consume = None;
        if let Some(dead_letters) = self.shared.dead_letters.lock().await.take()
            && dead_letters.connection.status().connected()
        {
            let close = dead_letters
                .connection
                .close(200, "wagg source closed".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        }
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        if !link.connection.status().connected() {
            return Ok(());
        }
        if let Err(error) = link
            .consume
            .basic_cancel(link.consumer.tag(), BasicCancelOptions::default())
            .await
        {
            debug!(error = %Chain(&error), "Could not cancel the consumer before closing.");
        }
        link.connection
            .close(200, "wagg source closed".into())
            .await
            .map_err(amqp("connection.close"))?;
        info!(generation = link.generation, "Closed the RabbitMQ source.");
        Ok(())
    }

    /// Makes `opened` the current generation.
    async fn install(&mut self, opened: Opened) {
        let mut state = self.shared.acks.lock().await;
        state.generation += 1;
        state.consume = Some(opened.consume.clone());
        state.acked_upto = 0;
        state.acked_singly.clear();
        self.shared.delivered_upto.store(0, Ordering::Release);
        self.link = Some(Link {
            generation: state.generation,
            connection: opened.connection,
            consume: opened.consume,
            consumer: opened.consumer,
            connected_at: Instant::now(),
        });
    }

    /// Forgets the current connection, closing it if it is still open (a
    /// channel error leaves the connection up).
    async fn drop_link(&mut self) {
        self.shared.acks.lock().await.consume = None;
        let Some(link) = self.link.take() else {
            return;
        };
        if link.connected_at.elapsed() >= self.backoff.max {
            self.backoff.reset();
        }
        if link.connection.status().connected() {
            let close = link.connection.close(200, "wagg reconnecting".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
        }
    }

    /// Reconnects with backoff until it succeeds.
    ///
    /// Cancel-safe: the attempts run in a task of their own, which a
    /// cancelled call leaves running and the next call waits for.
    async fn reconnect(&mut self) {
        let task = self.reconnecting.get_or_insert_with(|| {
            let cfg = self.cfg.clone();
            let mut backoff = self.backoff.clone();
            tokio::spawn(async move {
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    let delay = backoff.next_delay();
                    tokio::time::sleep(delay).await;
                    match establish(&cfg).await {
                        Ok(opened) => return (opened, attempt, backoff),
                        Err(EstablishError::Connect(error)) => warn!(
                            attempt,
                            delay_ms = delay.as_millis() as u64,
                            uri = %redact(&cfg.uri),
                            error = %Chain(&error),
                            "Could not reconnect to RabbitMQ; retrying."
                        ),
                        Err(EstablishError::Setup(error)) => error!(
                            attempt,
                            error = %Chain(&error),
                            "Reconnected to RabbitMQ but could not set up the queue; retrying."
                        ),
                    }
                }
            })
        });
        let outcome = task.await;
        self.reconnecting = None;
        // Nothing below waits (the ack state's lock is free while `next()`
        // runs), so the new connection cannot be lost to a cancellation.
        match outcome {
            Ok((opened, attempt, backoff)) => {
                self.backoff = backoff;
                self.install(opened).await;
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::SourceReconnected {
                    generation: self.generation(),
                    attempt,
                }
                .emit(&self.metrics);
            }
            // Only a panic gets here (the task is aborted by `close()` and
            // `drop` alone): the next call starts afresh.
            Err(error) => error!(error = %error, "The reconnect task failed; starting again."),
        }
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        if let Some(reconnecting) = self.reconnecting.take() {
            reconnecting.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------

/// Publishes message bodies to one exchange with publisher confirms,
/// persistent (`delivery_mode = 2`) by default. For tests, the demo tooling
/// and `wagg loadgen`.
///
/// Messages are published `mandatory`: one that no queue is bound for is
/// returned and reported as [`SourceError::Unroutable`] instead of vanishing.
///
/// Each message carries a `message_id` unique to it (this publisher's random
/// 64-bit id and a sequence number), so that wagg tells a redelivery from a
/// second, byte-identical message exactly (see `pipeline::dedup`).
pub struct AmqpPublisher {
    connection: Connection,
    channel: Channel,
    exchange: ShortString,
    persistent: bool,
    /// This publisher's part of every `message_id`; `None`: no ids.
    id_prefix: Option<String>,
    sequence: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("exchange", &self.exchange)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

impl AmqpPublisher {
    /// Connects once (no retries) and opens a channel in confirm mode. The
    /// exchange must exist.
    ///
    /// # Errors
    ///
    /// [`SourceError::Connect`] or [`SourceError::Amqp`];
    /// [`SourceError::TooLong`] for an exchange name over 255 bytes.
    pub async fn connect(uri: &str, exchange: &str) -> Result<Self, SourceError> {
        let exchange = short(exchange, "exchange")?;
        let props = ConnectionProperties::default().with_connection_name("wagg publisher".into());
        let connection =
            Connection::connect(uri, props)
                .await
                .map_err(|source| SourceError::Connect {
                    uri: redact(uri),
                    attempts: 1,
                    source,
                })?;
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            connection,
            channel,
            exchange,
            persistent: true,
            id_prefix: Some(format!("{:016x}", rand::random::<u64>())),
            sequence: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Whether messages carry a `message_id` (by default they do). Without
    /// one, wagg can only recognise redeliveries by their bodies.
    #[must_use]
    pub fn message_ids(mut self, on: bool) -> Self {
        if !on {
            self.id_prefix = None;
        }
        self
    }

    /// Whether messages are persistent (`delivery_mode` 2) or transient (1).
    #[must_use]
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Publishes one message and waits for the broker's confirm.
    ///
    /// # Errors
    ///
    /// [`SourceError::Nacked`], [`SourceError::Unroutable`],
    /// [`SourceError::TooLong`] (routing key over 255 bytes), or
    /// [`SourceError::Amqp`].
    pub async fn publish(&self, routing_key: &str, body: &[u8]) -> Result<(), SourceError> {
        let pending = self.send(short(routing_key, "routing key")?, body).await?;
        check_confirm(pending.await.map_err(amqp("publisher confirm"))?)
    }

    /// Publishes all `(routing_key, body)` items pipelined (up to
    /// [`PUBLISH_WINDOW`] unconfirmed at a time), then waits for the remaining
    /// confirms. Returns how many were published and confirmed.
    ///
    /// # Errors
    ///
    /// The first failure, as for [`publish`](Self::publish); some messages may
    /// have been published by then.
    pub async fn publish_many(
        &self,
        items: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<usize, SourceError> {
        let mut in_flight: VecDeque<InFlight<'_>> = VecDeque::with_capacity(PUBLISH_WINDOW);
        let mut confirmed = 0;
        for (routing_key, body) in items {
            if in_flight.len() == PUBLISH_WINDOW {
                let oldest = in_flight.pop_front().expect("the window is full");
                oldest.confirmed().await?;
                confirmed += 1;
            }
            let routing_key = short(&routing_key, "routing key")?;
            let mut send: SendFuture<'_> =
                Box::pin(async move { self.send(routing_key, &body).await });
            // lapin queues the frames on the first poll; the write itself need
            // not be waited for here, so poll once and move on.
            let first = poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
            in_flight.push_back(match first {
                Poll::Ready(sent) => InFlight::Sent(sent?),
                Poll::Pending => InFlight::Sending(send),
            });
        }
        for pending in in_flight {
            pending.confirmed().await?;
            confirmed += 1;
        }
        Ok(confirmed)
    }

    /// Closes the connection.
    ///
    /// # Errors
    ///
    /// [`SourceError::Amqp`] if the close failed.
    pub async fn close(self) -> Result<(), SourceError> {
        self.connection
            .close(200, "wagg publisher closed".into())
            .await
            .map_err(amqp("connection.close"))
    }

    async fn send(
        &self,
        routing_key: ShortString,
        body: &[u8],
    ) -> Result<PublisherConfirm, SourceError> {
        let delivery_mode = if self.persistent { PERSISTENT } else { 1 };
        let mut properties = BasicProperties::default().with_delivery_mode(delivery_mode);
        if let Some(prefix) = &self.id_prefix {
            let n = self.sequence.fetch_add(1, Ordering::Relaxed);
            properties = properties.with_message_id(format!("{prefix}-{n}").into());
        }
        self.channel
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(amqp("basic.publish"))
    }
}

type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<PublisherConfirm, SourceError>> + Send + 'a>>;

/// A message of `publish_many` on its way: being written, or awaiting its
/// confirm.
enum InFlight<'a> {
    Sending(SendFuture<'a>),
    Sent(PublisherConfirm),
}

impl InFlight<'_> {
    async fn confirmed(self) -> Result<(), SourceError> {
        let pending = match self {
            Self::Sending(send) => send.await?,
            Self::Sent(pending) => pending,
        };
        check_confirm(pending.await.map_err(amqp("publisher confirm"))?)
    }
}

fn check_confirm(confirmation: Confirmation) -> Result<(), SourceError> {
    match confirmation {
        Confirmation::Nack(_) => Err(SourceError::Nacked),
        Confirmation::Ack(Some(returned)) => Err(SourceError::Unroutable {
            routing_key: returned.delivery.routing_key.to_string(),
        }),
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: AmqpConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, AmqpConfig::default());
        assert_eq!(cfg.exchange_kind, ExchangeKind::Direct);
        cfg.validate().unwrap();

        let cfg: AmqpConfig = toml::from_str(
            "exchange_kind = \"x-consistent-hash\"\nhash_header = \"customer\"\nhash_weight = 3",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.binding_key(), "3");

        assert!(toml::from_str::<AmqpConfig>("prefetsh = 10").is_err());
        assert!(toml::from_str::<AmqpConfig>("prefetch = 70000").is_err());
    }

    #[test]
    fn config_validation_refuses_what_cannot_work() {
        let refused = |edit: fn(&mut AmqpConfig)| {
            let mut cfg = AmqpConfig::default();
            edit(&mut cfg);
            matches!(cfg.validate(), Err(SourceError::Config(_)))
        };
        assert!(refused(|c| c.prefetch = 0));
        assert!(refused(|c| c.reconnect_min_ms = 0));
        assert!(refused(|c| c.reconnect_min_ms = c.reconnect_max_ms + 1));
        assert!(refused(|c| c.hash_header = Some("customer".into())));
        assert!(refused(|c| c.queue = "q".repeat(256)));
        assert!(refused(|c| c.dead_letter_queue = c.queue.clone()));
        assert!(refused(|c| {
            c.exchange_kind = ExchangeKind::ConsistentHash;
            c.hash_weight = 0;
        }));
    }

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| (min..=max).contains(d)), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(200), "{delays:?}");
        assert!(delays[10..].iter().all(|d| *d >= max / 2), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(200));

        let mut fixed = Backoff::new(min, min);
        assert!((0..5).all(|_| fixed.next_delay() == min));
    }

    #[test]
    fn reason_truncation_keeps_utf8_whole() {
        assert_eq!(truncate_utf8("abc", 2), "ab");
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("é", 8), "é");
    }

    #[test]
    fn uri_password_is_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host/v"), "amqp://user@host/v");
    }

    #[test]
    fn delivery_tags_order_by_generation_first() {
        let old = DeliveryTag {
            generation: 1,
            tag: 900,
        };
        let new = DeliveryTag {
            generation: 2,
            tag: 1,
        };
        assert!(old < new);
    }
}
