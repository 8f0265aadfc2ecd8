//! An in-process traffic generator: the demo's source, and the seed of
//! `wagg loadgen`.
//!
//! It writes real JSON message bodies (so the demo exercises the decoder),
//! with Zipf-skewed popularity of customers, zones and records over a set of
//! POPs, and keeps the totals it generated so a run can be checked against
//! what the sink received.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

use super::amqp::{Delivery, DeliveryTag, SourceError};

/// Shape of the generated traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Distinct customers.
    pub customers: u32,
    /// Zones per customer.
    pub zones_per_customer: u32,
    /// Records per zone.
    pub records_per_zone: u32,
    /// Points of presence.
    pub pops: u32,
    /// Metrics per message.
    pub metrics_per_message: usize,
    /// Zipf exponent of customer, zone and record popularity (0 is uniform).
    pub zipf_exponent: f64,
    /// Seed: the same seed gives the same messages.
    pub seed: u64,
    /// Event time of the first message, seconds since the epoch.
    pub start_time: u64,
    /// Seconds of event time per second of wall time (a demo compresses
    /// minutes into seconds so that buckets close while you watch).
    pub time_scale: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            customers: 1000,
            zones_per_customer: 4,
            records_per_zone: 8,
            pops: 25,
            metrics_per_message: 100,
            zipf_exponent: 1.1,
            seed: 1,
            start_time: 1_764_133_200,
            time_scale: 30.0,
        }
    }
}

/// Record types and their share of queries (roughly what a DNS provider
/// sees).
const TYPES: [&str; 6] = ["A", "AAAA", "CNAME", "MX", "TXT", "NS"];
const TYPE_WEIGHTS: [u32; 6] = [55, 25, 8, 5, 5, 2];

/// Series churn: the record name space rotates over event time, so that
/// series appear and disappear (and the host's forgetting is exercised).
///
/// Event time is cut into periods of `period_secs` from the generator's
/// `start_time`. Each record slot (customer, zone, record index) has a fixed
/// phase `u` in `[0, 1)` drawn from the seed, and in period `e` its name
/// carries the generation `floor(e · fraction + u)`. Between two periods the
/// generation moves on for exactly the slots whose phase crosses an integer:
/// a share `fraction` of them. Their old series stop, new ones start; the
/// customer and zone totals are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    /// Share of records renamed per period, in `[0, 1]`.
    pub fraction: f64,
    /// Length of a period, seconds of event time.
    pub period_secs: u64,
}

impl Churn {
    /// The generation of a record slot with phase `u` at event time `time`.
    fn generation(&self, start: u64, time: u64, u: f64) -> u64 {
        let period = time.saturating_sub(start) / self.period_secs.max(1);
        (period as f64 * self.fraction.clamp(0.0, 1.0) + u) as u64
    }
}

/// What a generator produced, for checking a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Messages generated.
    pub messages: u64,
    /// Metrics generated.
    pub metrics: u64,
    /// Sum of every metric's count.
    pub count_sum: f64,
    /// Sum of counts per (customer, pop, bucket start): the `customer`
    /// rollup's points.
    pub per_customer: HashMap<(u64, String, u64), f64>,
}

/// The generator.
#[derive(Debug)]
pub struct Generator {
    config: GeneratorConfig,
    rng: StdRng,
    customers: Zipf<f64>,
    zones: Zipf<f64>,
    records: Zipf<f64>,
    pops: Vec<String>,
    bucket_seconds: u64,
    totals: Arc<Mutex<Totals>>,
    buf: Vec<u8>,
    churn: Option<Churn>,
}

impl Generator {
    /// A generator of `config` traffic whose totals are kept per bucket of
    /// `bucket_seconds`.
    ///
    /// # Errors
    ///
    /// If a count in `config` is zero or the exponent is negative.
    pub fn new(config: GeneratorConfig, bucket_seconds: u32) -> Result<Self, String> {
        let zipf = |n: u32, field: &str| {
            Zipf::new(f64::from(n.max(1)), config.zipf_exponent)
                .map_err(|e| format!("generator.{field}: {e}"))
        };
        if config.customers == 0 || config.pops == 0 || config.metrics_per_message == 0 {
            return Err("generator: customers, pops and metrics_per_message must be > 0".into());
        }
        Ok(Generator {
            rng: StdRng::seed_from_u64(config.seed),
            customers: zipf(config.customers, "customers")?,
            zones: zipf(config.zones_per_customer, "zones_per_customer")?,
            records: zipf(config.records_per_zone, "records_per_zone")?,
            pops: (0..config.pops).map(pop_name).collect(),
            bucket_seconds: u64::from(bucket_seconds.max(1)),
            totals: Arc::default(),
            buf: Vec::with_capacity(16 << 10),
            churn: None,
            config,
        })
    }

    /// The same generator with series churn (see [`Churn`]). A `fraction`
    /// of 0 changes nothing: the messages are those without churn.
    #[must_use]
    pub fn with_churn(mut self, churn: Churn) -> Self {
        self.churn = (churn.fraction > 0.0).then_some(churn);
        self
    }

    /// The shape of the traffic.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The totals so far, shared: they keep updating while the generator
    /// runs.
    pub fn totals(&self) -> Arc<Mutex<Totals>> {
        self.totals.clone()
    }

    /// The next message body, for event time `time`.
    pub fn message(&mut self, time: u64) -> Vec<u8> {
        let pop_i = self.rng.random_range(0..self.pops.len());
        let host = self.rng.random_range(1..=4u32);
        let bucket = time - time % self.bucket_seconds;
        self.buf.clear();
        let pop = &self.pops[pop_i];
        let _ = write!(
            self.buf,
            r#"{{"pop":"{pop}","host":"{pop}-dns-{host:02}","time":{time},"metrics":["#
        );
        let mut per_customer: Vec<(u64, f64)> = Vec::with_capacity(self.config.metrics_per_message);
        let mut sum = 0.0;
        for i in 0..self.config.metrics_per_message {
            let customer = self.customers.sample(&mut self.rng) as u64;
            let zone = self.zones.sample(&mut self.rng) as u64;
            let record = self.records.sample(&mut self.rng) as u64;
            let rtype = pick_type(self.rng.random_range(0..100));
            // Query counts per interval are heavy-tailed too.
            let count = (1.0 / (1.0 - self.rng.random::<f64>()).max(1e-6))
                .floor()
                .min(10_000.0);
            if i > 0 {
                self.buf.push(b',');
            }
            let generation = self.churn.map_or(0, |churn| {
                let phase = slot_phase(self.config.seed, customer, zone, record);
                churn.generation(self.config.start_time, time, phase)
            });
            if generation == 0 {
                let _ = write!(
                    self.buf,
                    r#"{{"customer":{customer},"zone":"z{zone}.c{customer}.example","record":"r{record}.z{zone}.c{customer}.example","type":"{rtype}","count":{count}}}"#
                );
            } else {
                let _ = write!(
                    self.buf,
                    r#"{{"customer":{customer},"zone":"z{zone}.c{customer}.example","record":"r{record}-g{generation}.z{zone}.c{customer}.example","type":"{rtype}","count":{count}}}"#
                );
            }
            per_customer.push((customer, count));
            sum += count;
        }
        self.buf.extend_from_slice(b"]}");
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        totals.messages += 1;
        totals.metrics += self.config.metrics_per_message as u64;
        totals.count_sum += sum;
        for (customer, count) in per_customer {
            *totals
                .per_customer
                .entry((customer, pop.clone(), bucket))
                .or_default() += count;
        }
        self.buf.clone()
    }
}

/// A record slot's churn phase in `[0, 1)`: fixed per seed and slot, spread
/// evenly, independent of the message stream's random numbers (so churn
/// leaves every other choice of the generator as it was).
fn slot_phase(seed: u64, customer: u64, zone: u64, record: u64) -> f64 {
    let mut bytes = [0u8; 32];
    for (i, v) in [seed, customer, zone, record].into_iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    (xxhash_rust::xxh3::xxh3_64(&bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn pick_type(mut roll: u32) -> &'static str {
    for (t, w) in TYPES.iter().zip(TYPE_WEIGHTS) {
        if roll < w {
            return t;
        }
        roll -= w;
    }
    TYPES[0]
}

/// Names like the talk's POPs: three letters plus a digit when there are
/// more than the list.
fn pop_name(i: u32) -> String {
    const NAMES: [&str; 25] = [
        "lga", "ewr", "iad", "atl", "mia", "ord", "dfw", "den", "lax", "sjc", "sea", "yyz", "gru",
        "lhr", "ams", "fra", "cdg", "mad", "arn", "waw", "sin", "hkg", "nrt", "syd", "bom",
    ];
    let name = NAMES[(i as usize) % NAMES.len()];
    if (i as usize) < NAMES.len() {
        name.to_string()
    } else {
        format!("{name}{}", i as usize / NAMES.len())
    }
}

/// The generator as a pipeline source: deliveries as fast as the pipeline
/// takes them, event time advancing with wall time × `time_scale`.
#[derive(Debug)]
pub struct GeneratorSource {
    generator: Generator,
    started: Instant,
    next_tag: u64,
    limit: Option<u64>,
}

impl GeneratorSource {
    /// A source of `generator`'s messages, ending after `limit` messages if
    /// given.
    pub fn new(generator: Generator, limit: Option<u64>) -> Self {
        GeneratorSource {
            generator,
            started: Instant::now(),
            next_tag: 1,
            limit,
        }
    }

    /// The generator's totals.
    pub fn totals(&self) -> Arc<Mutex<Totals>> {
        self.generator.totals()
    }
}

impl crate::pipeline::Source for GeneratorSource {
    async fn next(&mut self) -> Option<Delivery> {
        if self.limit.is_some_and(|l| self.next_tag > l) {
            return None;
        }
        if self.next_tag.is_multiple_of(32) {
            // Let the pipeline's ticks run. This is the only await, and it
            // comes before the message exists: a `select!` that drops this
            // future loses no counted message.
            tokio::task::yield_now().await;
        }
        let cfg = &self.generator.config;
        let time = cfg.start_time + (self.started.elapsed().as_secs_f64() * cfg.time_scale) as u64;
        let body = self.generator.message(time);
        let tag = DeliveryTag {
            generation: 1,
            tag: self.next_tag,
        };
        self.next_tag += 1;
        Some(Delivery::bare(body, false, tag))
    }

    async fn ack_upto(&self, _tag: DeliveryTag) -> Result<bool, SourceError> {
        Ok(true)
    }

    async fn dead_letter(
        &self,
        _d: &Delivery,
        _code: &str,
        _reason: &str,
    ) -> Result<(), SourceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::json::{Decoder, JsonDecoder};

    #[test]
    fn messages_decode_and_totals_add_up() {
        let mut g = Generator::new(GeneratorConfig::default(), 60).unwrap();
        let mut sum = 0.0;
        for i in 0..50 {
            let body = g.message(1_764_133_200 + i);
            let msg = JsonDecoder::default().decode(&body).unwrap();
            sum += msg.metrics.iter().map(|m| m.count).sum::<f64>();
        }
        let totals = g.totals();
        let t = totals.lock().unwrap();
        assert_eq!(t.messages, 50);
        assert_eq!(t.count_sum, sum);
        assert_eq!(t.per_customer.values().sum::<f64>(), sum);
    }

    #[test]
    fn same_seed_same_messages() {
        let mut a = Generator::new(GeneratorConfig::default(), 60).unwrap();
        let mut b = Generator::new(GeneratorConfig::default(), 60).unwrap();
        let mut c = Generator::new(
            GeneratorConfig {
                seed: 2,
                ..GeneratorConfig::default()
            },
            60,
        )
        .unwrap();
        assert_eq!(a.message(1_764_133_200), b.message(1_764_133_200));
        assert_ne!(a.message(1_764_133_200), c.message(1_764_133_200));
    }

    #[test]
    fn churn_renames_about_its_fraction_of_records_per_period() {
        let churn = Churn {
            fraction: 0.25,
            period_secs: 60,
        };
        let slots = 20_000u64;
        let renamed = |from: u64, to: u64| {
            (0..slots)
                .filter(|&r| {
                    let u = slot_phase(1, r % 100, r / 100, r);
                    churn.generation(0, from, u) != churn.generation(0, to, u)
                })
                .count() as f64
                / slots as f64
        };
        assert_eq!(renamed(0, 59), 0.0);
        for period in 0..5 {
            let share = renamed(period * 60, period * 60 + 60);
            assert!((share - 0.25).abs() < 0.02, "period {period}: {share}");
        }
        // Without churn (or with a fraction of 0) the messages are unchanged.
        let plain = |g: Generator| {
            let mut g = g;
            g.message(1_764_133_200 + 3600)
        };
        let cfg = GeneratorConfig::default();
        assert_eq!(
            plain(Generator::new(cfg.clone(), 60).unwrap()),
            plain(Generator::new(cfg.clone(), 60).unwrap().with_churn(Churn {
                fraction: 0.0,
                period_secs: 60
            }))
        );
        let churned = plain(Generator::new(cfg, 60).unwrap().with_churn(churn));
        assert!(String::from_utf8(churned).unwrap().contains("-g"));
    }
}
