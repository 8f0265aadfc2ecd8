//! `wagg loadgen`: generated messages in wagg's format, published to
//! RabbitMQ at a held rate, with the totals a sink should end up with.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::TrafficError;
use super::progress::Progress;
use super::publish::{Publisher, Target};
use super::putval;
use super::ratelimit::TokenBucket;
use crate::source::generator::{Churn, Generator, GeneratorConfig, Totals};
use crate::source::json::{Decoder, JsonDecoder};

/// A target rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second.
    Messages(f64),
    /// Samples per second: metrics × rollups, what the host's shards see.
    Samples(f64),
}

/// Where event time comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EventTime {
    /// The wall clock: messages carry the time they are sent, as production
    /// traffic does.
    Wall,
    /// `start` plus the elapsed wall time × `scale` (a demo compresses
    /// minutes into seconds so that buckets close while you watch).
    Scaled {
        /// Event time of the first message, seconds since the epoch.
        start: u64,
        /// Seconds of event time per second of wall time.
        scale: f64,
    },
    /// `start` plus the message's index divided by `per_second`: the same
    /// times however fast the broker takes them, so that two runs with the
    /// same seed (say one in each [`Format`]) publish the same traffic and
    /// the same totals.
    Counted {
        /// Event time of the first message, seconds since the epoch.
        start: u64,
        /// Messages per second of event time (> 0).
        per_second: f64,
    },
}

/// How the generated messages are put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// wagg's JSON message, one per generated message.
    #[default]
    Json,
    /// collectd's `PUTVAL` command (`text/collectd`), one broker message per
    /// metric of each generated message, with the identifiers of
    /// [`putval`]: the same metrics, counts and event times as
    /// [`Format::Json`] for the same seed, so the totals are the same.
    Putval,
}

/// What `loadgen` does.
#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    /// Where to publish.
    pub target: Target,
    /// Shape of the traffic (its `start_time` and `time_scale` are set from
    /// `event_time`).
    pub generator: GeneratorConfig,
    /// Series churn, if any.
    pub churn: Option<Churn>,
    /// Bucket width the totals are kept per (the host's `bucket_seconds`).
    pub bucket_seconds: u32,
    /// Rollups the host computes: samples = metrics × rollups.
    pub rollups: usize,
    /// Target rate; as fast as the broker confirms without it.
    pub rate: Option<Rate>,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Event time of the messages.
    pub event_time: EventTime,
}

/// What a run published.
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenReport {
    /// Generated messages (each of `metrics_per_message` metrics) published
    /// and confirmed.
    pub messages: u64,
    /// Broker messages published and confirmed: `messages` in
    /// [`Format::Json`], one per metric in [`Format::Putval`].
    pub published: u64,
    /// Metrics in them.
    pub metrics: u64,
    /// Samples they make for the host: metrics × rollups.
    pub samples: u64,
    /// Sum of every metric's count: every rollup's points add up to it.
    pub count_sum: f64,
    /// Wall time of the run, seconds.
    pub elapsed_secs: f64,
    /// Bucket width of `per_customer`, seconds.
    pub bucket_seconds: u32,
    /// The `customer` rollup's points: (customer, pop, bucket start) → sum
    /// of counts, sorted.
    pub per_customer: Vec<CustomerTotal>,
}

/// One point of the `customer` rollup as loadgen published it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CustomerTotal {
    /// Customer id.
    pub customer: u64,
    /// POP.
    pub pop: String,
    /// Bucket start, seconds since the epoch.
    pub bucket: u64,
    /// Sum of counts.
    pub count: f64,
}

impl LoadgenReport {
    fn from_totals(
        t: &Totals,
        published: u64,
        rollups: usize,
        elapsed: Duration,
        bucket_seconds: u32,
    ) -> Self {
        let mut per_customer: Vec<CustomerTotal> = t
            .per_customer
            .iter()
            .map(|((customer, pop, bucket), count)| CustomerTotal {
                customer: *customer,
                pop: pop.clone(),
                bucket: *bucket,
                count: *count,
            })
            .collect();
        per_customer
            .sort_by(|a, b| (a.customer, &a.pop, a.bucket).cmp(&(b.customer, &b.pop, b.bucket)));
        LoadgenReport {
            messages: t.messages,
            published,
            metrics: t.metrics,
            samples: t.metrics * rollups as u64,
            count_sum: t.count_sum,
            elapsed_secs: elapsed.as_secs_f64(),
            bucket_seconds,
            per_customer,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Publishes generated traffic as wagg's JSON until `count` or `duration`
/// is reached or `stop` resolves, then waits for every confirm: [`loadgen_as`]
/// with [`Format::Json`].
///
/// # Errors
///
/// As [`loadgen_as`].
pub async fn loadgen(
    opts: &LoadgenOptions,
    progress: &Progress,
    stop: impl Future<Output = ()>,
) -> Result<LoadgenReport, TrafficError> {
    loadgen_as(opts, Format::Json, progress, stop).await
}

/// Publishes generated traffic in `format` until `count` or `duration` is
/// reached or `stop` resolves, then waits for every confirm. Reports each
/// second to `progress`. `count` and the rate count generated messages in
/// either format (a PUTVAL run publishes `metrics_per_message` broker
/// messages for each).
///
/// The totals count only messages the broker confirmed: a message is
/// generated (and counted) just before it is published, and a run that
/// fails returns the error instead of totals.
///
/// # Errors
///
/// [`TrafficError::Config`] for a shape the generator refuses;
/// [`TrafficError::MissingExchange`]; any publish or confirm failure
/// ([`TrafficError::Source`], e.g. no queue bound for the routing key);
/// [`TrafficError::Putval`] for a name collectd cannot carry.
pub async fn loadgen_as(
    opts: &LoadgenOptions,
    format: Format,
    progress: &Progress,
    stop: impl Future<Output = ()>,
) -> Result<LoadgenReport, TrafficError> {
    let mut gen_cfg = opts.generator.clone();
    match opts.event_time {
        EventTime::Wall => {
            gen_cfg.start_time = unix_now();
            gen_cfg.time_scale = 1.0;
        }
        EventTime::Scaled { start, scale } => {
            gen_cfg.start_time = start;
            gen_cfg.time_scale = scale;
        }
        EventTime::Counted { start, per_second } => {
            if !(per_second.is_finite() && per_second > 0.0) {
                return Err(TrafficError::Config(format!(
                    "messages per second of event time must be a positive number, not {per_second}"
                )));
            }
            gen_cfg.start_time = start;
            gen_cfg.time_scale = 1.0;
        }
    }
    let mut generator =
        Generator::new(gen_cfg.clone(), opts.bucket_seconds).map_err(TrafficError::Config)?;
    if let Some(churn) = opts.churn {
        generator = generator.with_churn(churn);
    }
    let totals = generator.totals();
    let samples_per_message = (gen_cfg.metrics_per_message * opts.rollups.max(1)) as f64;
    let messages_per_sec = match opts.rate {
        Some(Rate::Messages(r)) => r,
        Some(Rate::Samples(r)) => r / samples_per_message,
        None => f64::INFINITY,
    };
    let mut publisher = Publisher::connect(&opts.target, "wagg loadgen").await?;
    if format == Format::Putval {
        publisher.set_content_type(putval::CONTENT_TYPE);
    }
    // PUTVAL commands are made from the JSON the generator writes, read back
    // by wagg's own decoder: the same metrics by construction.
    let decoder = JsonDecoder::default();
    let counts = publisher.counts().clone();
    tracing::info!(
        exchange = %opts.target.exchange,
        routing_key = %opts.target.routing_key,
        rate = messages_per_sec,
        "Publishing generated traffic."
    );

    let started = Instant::now();
    // 50 ms of traffic may go out at once: a sleep is ~1 ms at best, so a
    // smaller burst would lose the tokens that accrue while sleeping.
    let mut bucket = TokenBucket::new(messages_per_sec, messages_per_sec * 0.05, started);
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let mut last_report = (started, 0u64);
    let mut sent = 0u64;
    loop {
        if opts.count.is_some_and(|c| sent >= c)
            || opts.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        // Poll the stop signal without waiting for it.
        if !stopped {
            stopped = poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx).is_ready())).await;
        }
        if stopped {
            break;
        }
        let wait = bucket.take(1.0, Instant::now());
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut stop, if !stopped => { stopped = true; continue; }
            }
        }
        let time = match opts.event_time {
            EventTime::Wall => unix_now(),
            EventTime::Scaled { start, scale } => {
                start + (started.elapsed().as_secs_f64() * scale) as u64
            }
            EventTime::Counted { start, per_second } => start + (sent as f64 / per_second) as u64,
        };
        let body = generator.message(time);
        match format {
            Format::Json => publisher.publish(body).await?,
            Format::Putval => {
                let commands = {
                    let msg = decoder.decode(&body).map_err(|e| {
                        TrafficError::Config(format!("a generated message does not decode: {e}"))
                    })?;
                    putval::encode(&msg)?
                };
                for command in commands {
                    publisher.publish(command).await?;
                }
            }
        }
        sent += 1;
        if last_report.0.elapsed() >= Duration::from_secs(1) {
            let rate = (sent - last_report.1) as f64 / last_report.0.elapsed().as_secs_f64();
            last_report = (Instant::now(), sent);
            progress.update(
                opts.count.unwrap_or(0).min(sent),
                &format!(
                    "{sent} messages, {rate:.0} msg/s ({:.0} samples/s), {} confirms outstanding",
                    rate * samples_per_message,
                    counts.outstanding()
                ),
            );
        }
    }
    publisher.finish().await?;
    let elapsed = started.elapsed();
    let confirmed = counts.confirmed.load(Ordering::Relaxed);
    tracing::info!(
        messages = confirmed,
        elapsed_ms = elapsed.as_millis() as u64,
        "Published and confirmed."
    );
    let t = totals.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(LoadgenReport::from_totals(
        &t,
        confirmed,
        opts.rollups,
        elapsed,
        opts.bucket_seconds,
    ))
}
