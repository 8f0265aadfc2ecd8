//! The broker's own ceiling on this machine: a consumer that does nothing
//! but take messages from wagg's queue and acknowledge them (`multiple`,
//! every 100), with wagg's prefetch. Whatever wagg reaches end to end is
//! stated as a share of what this reaches on the same workload from the
//! same broker (`benches/e2e.sh`).
//!
//! ```text
//! broker-ceiling CONFIG declare      # wagg's topology, as `wagg run` declares it
//! broker-ceiling CONFIG drain N      # take and ack N messages; print the rate
//! ```

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Instant;

use anyhow::{Context, bail};
use futures_core::Stream;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use wagg::config::Config;
use wagg::source::amqp::AmqpSource;

/// Acknowledge every this many messages, `multiple`.
const ACK_EVERY: u64 = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (path, what) = match args.as_slice() {
        [_, path, what, ..] => (path, what.as_str()),
        _ => bail!("usage: broker-ceiling CONFIG declare | broker-ceiling CONFIG drain N"),
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let amqp = Config::from_toml(&text)?.source.amqp;
    match what {
        "declare" => {
            AmqpSource::connect(amqp).await?.close().await?;
            Ok(())
        }
        "drain" => {
            let n: u64 = args
                .get(3)
                .context("drain needs a count")?
                .parse()
                .context("drain N: N is a count")?;
            drain(&amqp.uri, &amqp.queue, amqp.prefetch, n).await
        }
        other => bail!("unknown action {other:?}"),
    }
}

async fn drain(uri: &str, queue: &str, prefetch: u16, n: u64) -> anyhow::Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "broker-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut taken = 0u64;
    let mut bytes = 0u64;
    let mut started = None;
    while taken < n {
        let Some(delivery) = poll_fn(|cx| Pin::new(&mut consumer).poll_next(cx)).await else {
            bail!("the consumer stopped after {taken} messages");
        };
        let delivery = delivery?;
        // The clock starts at the first message, as wagg's does.
        started.get_or_insert_with(Instant::now);
        taken += 1;
        bytes += delivery.data.len() as u64;
        if taken.is_multiple_of(ACK_EVERY) || taken == n {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!(
        "broker ceiling: {taken} messages ({:.1} MB) in {secs:.2} s: {:.0} messages/s",
        bytes as f64 / 1e6,
        taken as f64 / secs
    );
    channel.close(200, "done".into()).await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}
