//! The RabbitMQ source against a real broker (`tests/setup.sh` starts one).
//!
//! Every test declares its own exchanges and queues, named with a unique
//! suffix, and a [`Cleanup`] guard deletes them when the test ends, also when
//! it fails: the broker is shared with other sessions and CI.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use wagg::source::amqp::{
    AmqpConfig, AmqpPublisher, AmqpSource, Delivery, DeliveryTag, ExchangeKind, MAX_REASON_BYTES,
    SourceError,
};
use wagg_tests::{RABBITMQ_ADDR, require_rabbitmq};

/// Routing key of the test messages (the binding key of direct exchanges).
pub(crate) const KEY: &str = "metrics";
/// Longest wait for one delivery.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn uri() -> String {
    format!("amqp://guest:guest@{RABBITMQ_ADDR}/%2f")
}

/// Unique names for one test's exchanges and queues.
pub(crate) struct Names {
    base: String,
}

impl Names {
    pub(crate) fn new(test: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self {
            base: format!("wagg-test.{test}.{}.{nanos:08x}.{n}", std::process::id()),
        }
    }

    pub(crate) fn exchange(&self) -> String {
        format!("{}.x", self.base)
    }
    pub(crate) fn queue(&self) -> String {
        format!("{}.q", self.base)
    }
    pub(crate) fn dlx(&self) -> String {
        format!("{}.dlx", self.base)
    }
    pub(crate) fn dlq(&self) -> String {
        format!("{}.dlq", self.base)
    }

    /// A direct exchange `…x` bound to `…q` with [`KEY`], reconnecting fast.
    pub(crate) fn config(&self) -> AmqpConfig {
        AmqpConfig {
            uri: uri(),
            connection_name: self.base.clone(),
            exchange: self.exchange(),
            routing_key: KEY.to_owned(),
            queue: self.queue(),
            dead_letter_exchange: self.dlx(),
            dead_letter_queue: self.dlq(),
            durable: false,
            reconnect_min_ms: 50,
            reconnect_max_ms: 500,
            give_up_after_ms: 5_000,
            ..AmqpConfig::default()
        }
    }

    /// Deletes this test's exchanges and queues (and `extra_queues`) on drop.
    pub(crate) fn cleanup(&self, extra_queues: &[String]) -> Cleanup {
        let mut queues = vec![self.queue(), self.dlq()];
        queues.extend_from_slice(extra_queues);
        Cleanup {
            queues,
            exchanges: vec![self.exchange(), self.dlx()],
        }
    }
}

/// Deletes exchanges and queues when dropped, even while a test unwinds.
pub(crate) struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Drop cannot await: a thread with a runtime of its own does the work,
        // whatever runtime (if any) the test runs on.
        let work = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            rt.block_on(async move {
                let conn = Connection::connect(&uri(), ConnectionProperties::default())
                    .await
                    .expect("the clean-up connects");
                let channel = conn.create_channel().await.expect("a clean-up channel");
                for queue in &queues {
                    if let Err(e) = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await
                    {
                        eprintln!("clean-up: could not delete queue {queue}: {e}");
                    }
                }
                for exchange in &exchanges {
                    if let Err(e) = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                    {
                        eprintln!("clean-up: could not delete exchange {exchange}: {e}");
                    }
                }
                let _ = conn.close(200, "clean-up done".into()).await;
            });
        });
        if work.join().is_err() {
            eprintln!("clean-up failed: exchanges or queues may be left on the broker");
        }
    }
}

/// Messages ready in `queue` (not counting unacked ones).
pub(crate) async fn ready(queue: &str) -> u32 {
    let conn = Connection::connect(&uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    declared.message_count()
}

/// Polls [`ready`] until it is `expected` or 3 s have passed (acks and closes
/// reach the queue asynchronously); returns the last count.
async fn settle(queue: &str, expected: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let count = ready(queue).await;
        if count == expected || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn receive(source: &mut AmqpSource) -> Delivery {
    tokio::time::timeout(RECEIVE_TIMEOUT, source.next())
        .await
        .expect("a delivery within the timeout")
        .expect("the source is open")
}

async fn receive_n(source: &mut AmqpSource, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(receive(source).await);
    }
    out
}

fn bodies(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect()
}

fn numbered(range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| (KEY.to_owned(), format!("m{i}").into_bytes()))
        .collect()
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Closes, via `rabbitmqctl`, the broker connection whose `connection_name`
/// client property is `name`.
pub(crate) fn close_connection_named(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "list_connections", "pid", "client_properties"])
            .output()
            .expect("rabbitmqctl runs");
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let quoted = format!("\"{name}\"");
        if let Some(line) = listing.lines().find(|line| line.contains(&quoted)) {
            break line.split('\t').next().unwrap().trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no connection named {name}: {listing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "wagg test: forced close"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn roundtrip_of_1000_messages_leaves_the_queue_empty() {
    require_rabbitmq();
    let names = Names::new("roundtrip");
    let _cleanup = names.cleanup(&[]);
    let mut source = AmqpSource::connect(names.config()).await.unwrap();
    let publisher = AmqpPublisher::connect(&uri(), &names.exchange())
        .await
        .unwrap();

    let published = publisher.publish_many(numbered(0..1000)).await.unwrap();
    assert_eq!(published, 1000);
    let deliveries = receive_n(&mut source, 1000).await;
    assert_eq!(bodies(&deliveries), expected(0..1000));
    assert!(deliveries.iter().all(|d| !d.redelivered));
    assert!(deliveries.iter().all(|d| d.tag.generation == 1));

    let last = deliveries.last().unwrap().tag;
    assert!(source.ack_upto(last).await.unwrap());
    // Acking again, or below, is a no-op rather than a channel error.
    assert!(!source.ack_upto(last).await.unwrap());
    assert!(!source.ack_upto(deliveries[10].tag).await.unwrap());
    // A tag never delivered is refused before it reaches the broker.
    let unknown = DeliveryTag {
        generation: 1,
        tag: 5000,
    };
    assert!(matches!(
        source.ack_upto(unknown).await,
        Err(SourceError::UnknownTag { .. })
    ));

    // The channel is still alive: one more message goes through.
    publisher.publish(KEY, b"after").await.unwrap();
    let after = receive(&mut source).await;
    assert_eq!(after.body, b"after");
    assert!(source.ack_upto(after.tag).await.unwrap());

    source.close().await.unwrap();
    assert!(source.next().await.is_none());
    assert_eq!(settle(&names.queue(), 0).await, 0);
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn dead_letter_carries_reason_headers_and_acks_only_the_original() {
    require_rabbitmq();
    let names = Names::new("dead-letter");
    let _cleanup = names.cleanup(&[]);
    let mut source = AmqpSource::connect(names.config()).await.unwrap();
    let publisher = AmqpPublisher::connect(&uri(), &names.exchange())
        .await
        .unwrap();
    publisher.publish_many(numbered(0..3)).await.unwrap();
    let deliveries = receive_n(&mut source, 3).await;

    // Dead-letter the last one, then ack up to it: the multiple ack must step
    // down to tag 2, or the broker would close the channel.
    let long_reason = format!("expected a JSON object: {}", "x".repeat(400));
    assert!(
        source
            .dead_letter(&deliveries[2], "bad_json", &long_reason)
            .await
            .unwrap()
    );
    assert!(matches!(
        source
            .dead_letter(&deliveries[2], "bad_json", "again")
            .await,
        Err(SourceError::AlreadyAcked { .. })
    ));
    assert!(source.ack_upto(deliveries[2].tag).await.unwrap());
    assert!(matches!(
        source
            .dead_letter(&deliveries[0], "bad_json", "too late")
            .await,
        Err(SourceError::AlreadyAcked { .. })
    ));

    // The channel survived all of that.
    publisher.publish(KEY, b"after").await.unwrap();
    let after = receive(&mut source).await;
    assert_eq!(after.body, b"after");
    assert!(source.ack_upto(after.tag).await.unwrap());
    source.close().await.unwrap();
    assert_eq!(settle(&names.queue(), 0).await, 0);

    // Exactly one dead letter, with both headers.
    let conn = Connection::connect(&uri(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(names.dlq().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead letter in the DLQ");
    assert_eq!(got.delivery.data, b"m2");
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers on the dead letter");
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(header("x-wagg-reason-code"), "bad_json");
    let reason = header("x-wagg-reason");
    assert_eq!(reason.len(), MAX_REASON_BYTES);
    assert!(long_reason.starts_with(&reason));
    assert!(
        channel
            .basic_get(names.dlq().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );
    let _ = conn.close(200, "bye".into()).await;
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn unacked_messages_come_back_redelivered_after_close() {
    require_rabbitmq();
    let names = Names::new("redeliver");
    let _cleanup = names.cleanup(&[]);
    let mut first = AmqpSource::connect(names.config()).await.unwrap();
    let publisher = AmqpPublisher::connect(&uri(), &names.exchange())
        .await
        .unwrap();
    publisher.publish_many(numbered(0..10)).await.unwrap();
    let deliveries = receive_n(&mut first, 10).await;
    assert!(first.ack_upto(deliveries[4].tag).await.unwrap());
    first.close().await.unwrap();

    let mut second = AmqpSource::connect(names.config()).await.unwrap();
    let again = receive_n(&mut second, 5).await;
    assert_eq!(bodies(&again), expected(5..10));
    assert!(again.iter().all(|d| d.redelivered));
    assert!(second.ack_upto(again[4].tag).await.unwrap());
    second.close().await.unwrap();
    assert_eq!(settle(&names.queue(), 0).await, 0);
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_is_reconnected_and_redelivers() {
    require_rabbitmq();
    let names = Names::new("reconnect");
    let _cleanup = names.cleanup(&[]);
    let mut source = AmqpSource::connect(names.config()).await.unwrap();
    let publisher = AmqpPublisher::connect(&uri(), &names.exchange())
        .await
        .unwrap();
    publisher.publish_many(numbered(0..10)).await.unwrap();
    let before = receive_n(&mut source, 10).await;
    assert!(source.ack_upto(before[2].tag).await.unwrap());
    assert_eq!(source.reconnects(), 0);

    let name = names.base.clone();
    tokio::task::spawn_blocking(move || close_connection_named(&name))
        .await
        .unwrap();

    // next() reconnects by itself; the unacked seven come back.
    let after = receive_n(&mut source, 7).await;
    assert_eq!(bodies(&after), expected(3..10));
    assert!(after.iter().all(|d| d.redelivered));
    assert!(after.iter().all(|d| d.tag.generation == 2));
    assert_eq!(source.generation(), 2);
    assert!(source.reconnects() >= 1);

    // A stale tag is ignored, without killing the new channel.
    assert!(!source.ack_upto(before[9].tag).await.unwrap());
    assert!(
        !source
            .dead_letter(&before[5], "bad_json", "stale")
            .await
            .unwrap()
    );
    assert!(source.ack_upto(after[6].tag).await.unwrap());
    publisher.publish(KEY, b"after").await.unwrap();
    let last = receive(&mut source).await;
    assert_eq!(
        (last.body.as_slice(), last.tag.generation),
        (&b"after"[..], 2)
    );
    assert!(source.ack_upto(last.tag).await.unwrap());

    source.close().await.unwrap();
    assert_eq!(settle(&names.queue(), 0).await, 0);
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn consistent_hash_exchange_splits_keys_by_weight() {
    require_rabbitmq();
    let names = Names::new("hash");
    let heavy_queue = format!("{}.heavy", names.base);
    let _cleanup = names.cleanup(std::slice::from_ref(&heavy_queue));
    let light = AmqpConfig {
        exchange_kind: ExchangeKind::ConsistentHash,
        hash_weight: 1,
        ..names.config()
    };
    let heavy = AmqpConfig {
        queue: heavy_queue.clone(),
        hash_weight: 3,
        ..light.clone()
    };
    // Connecting declares and binds; closing leaves the queues to fill up.
    for cfg in [light, heavy] {
        AmqpSource::connect(cfg)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
    }

    let publisher = AmqpPublisher::connect(&uri(), &names.exchange())
        .await
        .unwrap()
        .persistent(false);
    let keys = (0..4000).map(|i| (format!("customer-{i}"), b"x".to_vec()));
    assert_eq!(publisher.publish_many(keys).await.unwrap(), 4000);
    let (l, h) = (ready(&names.queue()).await, ready(&heavy_queue).await);
    assert_eq!(l + h, 4000);
    let ratio = f64::from(h) / f64::from(l);
    assert!((2.0..4.5).contains(&ratio), "light {l}, heavy {h}");

    // One key always lands on one queue.
    let same = (0..200).map(|_| ("customer-42".to_owned(), b"x".to_vec()));
    publisher.publish_many(same).await.unwrap();
    let (l2, h2) = (ready(&names.queue()).await, ready(&heavy_queue).await);
    assert!(
        (l2 - l, h2 - h) == (200, 0) || (l2 - l, h2 - h) == (0, 200),
        "{l}→{l2}, {h}→{h2}"
    );
    publisher.close().await.unwrap();
}
