//! Publishing at a held rate with publisher confirms, counting the confirms
//! outstanding: what `loadgen` and `replay` share.
//!
//! [`AmqpPublisher::publish_many`](crate::source::amqp::AmqpPublisher::publish_many)
//! takes a finished list and waits for it; a rate-held stream needs to publish
//! one message at a time and report, while it runs, how many confirms are
//! still out. So the publishing task only writes, and a second task awaits
//! the confirms in order; a bounded queue between them caps the messages in
//! flight at [`PUBLISH_WINDOW`].

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{TrafficError, redact};
use crate::source::amqp::{PUBLISH_WINDOW, SourceError};

/// Messages published and confirmed so far; readable while publishing.
#[derive(Debug, Default)]
pub struct PublishCounts {
    /// Messages handed to the broker.
    pub published: AtomicU64,
    /// Messages the broker confirmed.
    pub confirmed: AtomicU64,
}

impl PublishCounts {
    /// Published but not yet confirmed.
    pub fn outstanding(&self) -> u64 {
        self.published
            .load(Ordering::Relaxed)
            .saturating_sub(self.confirmed.load(Ordering::Relaxed))
    }
}

/// Where to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// AMQP URI of the broker.
    pub uri: String,
    /// Exchange to publish to; it must exist.
    pub exchange: String,
    /// Routing key of every message.
    pub routing_key: String,
    /// Persistent messages (`delivery_mode` 2), as production publishers
    /// send them; transient ones are cheaper for the broker.
    pub persistent: bool,
}

type SendFuture =
    Pin<Box<dyn Future<Output = Result<lapin::PublisherConfirm, SourceError>> + Send>>;

enum InFlight {
    Sending(SendFuture),
    Sent(lapin::PublisherConfirm),
}

/// A confirm-mode channel publishing to one exchange with one routing key.
pub(crate) struct Publisher {
    connection: Connection,
    channel: Channel,
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
    /// This publisher's part of every `message_id` (with a sequence
    /// number): identical bodies stay two messages to wagg's dedup.
    id_prefix: String,
    sequence: u64,
    tx: Option<mpsc::Sender<InFlight>>,
    confirmer: Option<JoinHandle<Result<(), SourceError>>>,
    counts: Arc<PublishCounts>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> SourceError {
    move |source| SourceError::Amqp { op, source }
}

fn short(value: &str, what: &'static str) -> Result<ShortString, TrafficError> {
    ShortString::try_new(value).map_err(|_| TrafficError::Source(SourceError::TooLong { what }))
}

impl Publisher {
    /// Connects, checks that the exchange exists, and opens a confirm-mode
    /// channel.
    ///
    /// # Errors
    ///
    /// [`TrafficError::Source`] if the broker cannot be reached,
    /// [`TrafficError::MissingExchange`] if the exchange does not exist.
    pub(crate) async fn connect(target: &Target, name: &str) -> Result<Self, TrafficError> {
        let exchange = short(&target.exchange, "exchange")?;
        let routing_key = short(&target.routing_key, "routing key")?;
        let connection = connect(&target.uri, name).await?;
        if let Err(e) = check_exchange(&connection, &target.exchange).await {
            let _ = connection.close(200, "no such exchange".into()).await;
            return Err(e);
        }
        let channel = crate::source::amqp::confirm_channel(&connection).await?;
        let counts = Arc::new(PublishCounts::default());
        let (tx, rx) = mpsc::channel(PUBLISH_WINDOW);
        let confirmer = tokio::spawn(confirm_in_order(rx, counts.clone()));
        Ok(Publisher {
            connection,
            channel,
            exchange,
            routing_key,
            properties: BasicProperties::default().with_delivery_mode(if target.persistent {
                2
            } else {
                1
            }),
            id_prefix: format!("{:016x}", rand::random::<u64>()),
            sequence: 0,
            tx: Some(tx),
            confirmer: Some(confirmer),
            counts,
        })
    }

    /// Labels every message published from now on with `content_type`
    /// (collectd's `amqp` plugin refuses a message without
    /// `text/collectd`).
    pub(crate) fn set_content_type(&mut self, content_type: &str) {
        self.properties = self
            .properties
            .clone()
            .with_content_type(content_type.into());
    }

    /// The counts, shared.
    pub(crate) fn counts(&self) -> &Arc<PublishCounts> {
        &self.counts
    }

    /// Publishes `body` without waiting for its confirm (waiting only while
    /// [`PUBLISH_WINDOW`] messages are unconfirmed).
    ///
    /// # Errors
    ///
    /// The first publish or confirm failure: a nack, an unroutable message
    /// ([`SourceError::Unroutable`]: no queue is bound), a lost connection.
    pub(crate) async fn publish(&mut self, body: Vec<u8>) -> Result<(), TrafficError> {
        let channel = self.channel.clone();
        let (exchange, routing_key) = (self.exchange.clone(), self.routing_key.clone());
        let properties = self
            .properties
            .clone()
            .with_message_id(format!("{}-{}", self.id_prefix, self.sequence).into());
        self.sequence += 1;
        let mut send: SendFuture = Box::pin(async move {
            channel
                .basic_publish(
                    exchange,
                    routing_key,
                    // Mandatory: a message no queue takes comes back as an
                    // error instead of vanishing.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await
                .map_err(amqp("basic.publish"))
        });
        // lapin queues the frames on the first poll; the write need not be
        // waited for here (the confirmer does), so poll once and move on.
        let item = match poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(sent) => InFlight::Sent(sent?),
            Poll::Pending => InFlight::Sending(send),
        };
        self.counts.published.fetch_add(1, Ordering::Relaxed);
        let sent = match &self.tx {
            Some(tx) => tx.send(item).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The confirmer stopped: it has the error.
            Err(self.confirmer_error().await)
        }
    }

    async fn confirmer_error(&mut self) -> TrafficError {
        self.tx = None;
        match self.confirmer.take() {
            Some(handle) => match handle.await {
                Ok(Err(e)) => TrafficError::Source(e),
                Ok(Ok(())) | Err(_) => TrafficError::PublisherStopped,
            },
            None => TrafficError::PublisherStopped,
        }
    }

    /// Waits for every outstanding confirm, then closes the connection.
    ///
    /// # Errors
    ///
    /// The first confirm failure.
    pub(crate) async fn finish(mut self) -> Result<(), TrafficError> {
        self.tx = None;
        let result = match self.confirmer.take() {
            Some(handle) => match handle.await {
                Ok(r) => r.map_err(TrafficError::Source),
                Err(_) => Err(TrafficError::PublisherStopped),
            },
            None => Ok(()),
        };
        let _ = self
            .connection
            .close(200, "wagg traffic tool done".into())
            .await;
        result
    }
}

async fn confirm_in_order(
    mut rx: mpsc::Receiver<InFlight>,
    counts: Arc<PublishCounts>,
) -> Result<(), SourceError> {
    while let Some(item) = rx.recv().await {
        let pending = match item {
            InFlight::Sending(send) => send.await?,
            InFlight::Sent(pending) => pending,
        };
        match pending.await.map_err(amqp("publisher confirm"))? {
            Confirmation::Nack(_) => return Err(SourceError::Nacked),
            Confirmation::Ack(Some(returned)) => {
                return Err(SourceError::Unroutable {
                    routing_key: returned.delivery.routing_key.to_string(),
                });
            }
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
        }
        counts.confirmed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Connects once, naming the connection `name`.
pub(crate) async fn connect(uri: &str, name: &str) -> Result<Connection, TrafficError> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_client_property("product".into(), "wagg".into());
    Connection::connect(uri, props).await.map_err(|source| {
        TrafficError::Source(SourceError::Connect {
            uri: redact(uri),
            attempts: 1,
            source,
        })
    })
}

/// Checks that `exchange` exists, on a channel of its own: the broker closes
/// the channel that asks about a missing exchange.
pub(crate) async fn check_exchange(
    connection: &Connection,
    exchange: &str,
) -> Result<(), TrafficError> {
    let name = short(exchange, "exchange")?;
    let probe = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    probe
        .exchange_declare(
            name,
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| TrafficError::MissingExchange {
            exchange: exchange.to_owned(),
            source,
        })?;
    let _ = probe.close(200, "checked".into()).await;
    Ok(())
}
