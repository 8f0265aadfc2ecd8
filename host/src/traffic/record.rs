//! `wagg record`: copies live traffic into a recording without touching
//! production's queue.
//!
//! The recorder declares a queue of its own, server-named, exclusive and
//! auto-delete (it disappears with the recorder's connection, so a crashed
//! recorder leaves nothing behind to fill up), binds it to the production
//! exchange with the production binding, and consumes it without acks. The
//! exchange copies every message to it as to production's queue; production
//! loses nothing and sees nothing.
//!
//! An `x-consistent-hash` exchange is refused: it sends each message to
//! *one* of its bound queues, so a recorder bound there would take its
//! share of production's messages instead of copying them.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_core::Stream;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Connection, Consumer};

use super::TrafficError;
use super::progress::Progress;
use super::publish::{check_exchange, connect};
use super::recording::RecordingWriter;
use crate::source::amqp::{ExchangeKind, SourceError};

/// What to record from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSource {
    /// AMQP URI of the broker.
    pub uri: String,
    /// The exchange production publishes to.
    pub exchange: String,
    /// Its kind (from `[source.amqp]`).
    pub exchange_kind: ExchangeKind,
    /// The binding key production's queue uses (ignored by `fanout`).
    pub binding_key: String,
}

/// When to stop recording (whichever comes first; or at the stop signal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordLimits {
    /// Messages recorded in this session.
    pub count: Option<u64>,
    /// Wall time of this session.
    pub duration: Option<Duration>,
    /// Size of the recording file, bytes (including what it held before).
    pub max_bytes: Option<u64>,
}

/// What a recording session did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordReport {
    /// Messages recorded in this session.
    pub messages: u64,
    /// Body bytes recorded in this session.
    pub body_bytes: u64,
    /// Size of the file at the end.
    pub file_bytes: u64,
    /// Records in the file at the end.
    pub records: u64,
    /// Wall time of the session.
    pub elapsed: Duration,
}

/// A recorder whose queue is bound and consuming: from here on, every
/// message the exchange routes is copied to it.
pub struct Recorder {
    connection: Connection,
    consumer: Consumer,
    queue: String,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> TrafficError {
    move |source| TrafficError::Source(SourceError::Amqp { op, source })
}

impl Recorder {
    /// Connects, declares the recorder's queue and binds it, and starts
    /// consuming.
    ///
    /// # Errors
    ///
    /// [`TrafficError::Config`] for an `x-consistent-hash` exchange,
    /// [`TrafficError::MissingExchange`], [`TrafficError::Source`].
    pub async fn start(source: &RecordSource) -> Result<Self, TrafficError> {
        if source.exchange_kind == ExchangeKind::ConsistentHash {
            return Err(TrafficError::Config(format!(
                "exchange {:?} is x-consistent-hash: a recorder bound to it would take a share of \
                 production's messages instead of copying them; record from a tap (a fanout or \
                 direct exchange the publishers also send to)",
                source.exchange
            )));
        }
        let binding_key = match source.exchange_kind {
            ExchangeKind::Fanout => String::new(),
            _ => source.binding_key.clone(),
        };
        let exchange = ShortString::try_new(source.exchange.as_str())
            .map_err(|_| TrafficError::Config("the exchange name is over 255 bytes".into()))?;
        let key = ShortString::try_new(binding_key.as_str())
            .map_err(|_| TrafficError::Config("the binding key is over 255 bytes".into()))?;
        let connection = connect(&source.uri, "wagg record").await?;
        if let Err(e) = check_exchange(&connection, &source.exchange).await {
            let _ = connection.close(200, "no such exchange".into()).await;
            return Err(e);
        }
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp("channel.open"))?;
        let declared = channel
            .queue_declare(
                ShortString::default(), // the broker names it
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.declare"))?;
        let queue = declared.name().clone();
        channel
            .queue_bind(
                queue.clone(),
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.bind"))?;
        let consumer = channel
            .basic_consume(
                queue.clone(),
                ShortString::default(),
                // No acks: the queue is the recorder's alone, and a message
                // lost with a crashed recorder is only a shorter recording.
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("basic.consume"))?;
        tracing::info!(queue = %queue, exchange = %source.exchange, binding_key, "Recording.");
        Ok(Recorder {
            connection,
            consumer,
            queue: queue.to_string(),
        })
    }

    /// The recorder's queue (named by the broker).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Writes every message that arrives to `writer` with its arrival
    /// offset, until a limit is reached or `stop` resolves; flushes the file
    /// each second and reports to `progress`.
    ///
    /// # Errors
    ///
    /// [`TrafficError::Recording`] if the file cannot be written,
    /// [`TrafficError::Source`] if the connection is lost.
    pub async fn run(
        mut self,
        writer: &mut RecordingWriter,
        limits: RecordLimits,
        progress: &Progress,
        stop: impl Future<Output = ()>,
    ) -> Result<RecordReport, TrafficError> {
        let started = Instant::now();
        let mut stop = std::pin::pin!(stop);
        let (mut messages, mut body_bytes) = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = (Instant::now(), 0u64);
        let deadline = limits
            .duration
            .map(|d| tokio::time::Instant::from_std(started + d));
        let result = loop {
            if limits.count.is_some_and(|c| messages >= c)
                || limits.max_bytes.is_some_and(|m| writer.bytes() >= m)
            {
                break Ok(());
            }
            let next = poll_fn(|cx| Pin::new(&mut self.consumer).poll_next(cx));
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                delivery = next => match delivery {
                    Some(Ok(d)) => {
                        let micros = started.elapsed().as_micros() as u64;
                        writer.write(micros, &d.data)?;
                        messages += 1;
                        body_bytes += d.data.len() as u64;
                    }
                    Some(Err(e)) => break Err(amqp("basic.consume")(e)),
                    None => break Err(TrafficError::Config(format!(
                        "the broker cancelled the recorder's consumer (queue {:?} deleted?)",
                        self.queue
                    ))),
                },
                () = until_deadline => break Ok(()),
                () = &mut stop => break Ok(()),
                _ = tick.tick() => {
                    writer.flush()?;
                    let rate = (messages - last.1) as f64 / last.0.elapsed().as_secs_f64();
                    last = (Instant::now(), messages);
                    progress.update(
                        limits.count.map_or(messages, |c| messages.min(c)),
                        &format!(
                            "{messages} messages, {rate:.0} msg/s, file {:.1} MiB",
                            writer.bytes() as f64 / f64::from(1 << 20)
                        ),
                    );
                }
            }
        };
        writer.flush()?;
        let _ = self.connection.close(200, "wagg record done".into()).await;
        result?;
        Ok(RecordReport {
            messages,
            body_bytes,
            file_bytes: writer.bytes(),
            records: writer.records(),
            elapsed: started.elapsed(),
        })
    }
}
