//! The router: from decoded messages to per-shard batches of series keys.
//!
//! Every metric feeds each configured rollup. A rollup's series key is the
//! rollup's index followed by the values of its tags; every rollup includes
//! the shard key (the customer by default), so hashing that one field sends
//! all of a customer's series to one shard, which then computes every rollup
//! of that customer alone. Shards are picked by jump consistent hashing of
//! the shard key: stable across restarts, and adding a shard moves about
//! 1/N of the customers.

mod keys;
mod shared_key;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use keys::{
    KeyBatch, KeyValues, KeyedSample, MAX_KEY_VALUES, SeriesKey, encode_key, hash_bytes,
    hash_sanitized, hash_u64, reencode_key,
};
pub use shared_key::SharedKey;

use crate::source::json::{Message, Metric};

/// A field of a metric that a rollup can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    /// The customer id.
    Customer,
    /// The DNS zone.
    Zone,
    /// The record name.
    Record,
    /// The record type, written as the tag `type`.
    #[serde(rename = "type")]
    Type,
    /// The POP the message came from.
    Pop,
    /// The POP host. Use with care: a per-host tag multiplies series.
    Host,
}

impl Tag {
    /// The tag's name in OpenTSDB.
    pub fn name(self) -> &'static str {
        match self {
            Tag::Customer => "customer",
            Tag::Zone => "zone",
            Tag::Record => "record",
            Tag::Type => "type",
            Tag::Pop => "pop",
            Tag::Host => "host",
        }
    }
}

/// One rollup: a grouping of the metrics, written as the metric
/// `RouterConfig::metric` with the tag `rollup=<name>` plus its own tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollup {
    /// Name, written as the `rollup` tag so that a query for one customer
    /// does not add up the finer rollups too.
    pub name: String,
    /// Tags to group by, in key order. Must include the shard key.
    pub tags: Vec<Tag>,
}

/// `[router]` in wagg.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Number of shards; each owns a module instance and a thread.
    pub shards: u32,
    /// Field whose value picks the shard. Every rollup must contain it, or
    /// one series could be computed in parts on several shards.
    pub shard_key: Tag,
    /// OpenTSDB metric name every rollup is written as.
    pub metric: String,
    /// The rollups every metric feeds.
    pub rollups: Vec<Rollup>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        let rollup = |name: &str, tags: &[Tag]| Rollup {
            name: name.into(),
            tags: tags.to_vec(),
        };
        RouterConfig {
            shards: 2,
            shard_key: Tag::Customer,
            metric: "dns.queries".into(),
            rollups: vec![
                rollup("customer", &[Tag::Customer, Tag::Pop]),
                rollup("zone", &[Tag::Customer, Tag::Zone, Tag::Pop]),
                rollup(
                    "record",
                    &[Tag::Customer, Tag::Zone, Tag::Record, Tag::Type, Tag::Pop],
                ),
            ],
        }
    }
}

/// A configuration the router cannot work with, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("router.{field}: {reason}")]
pub struct ConfigError {
    /// The offending field.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl RouterConfig {
    /// Checks the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, reason: String| Err(ConfigError { field, reason });
        if self.shards == 0 || self.shards > 1024 {
            return err(
                "shards".into(),
                format!("{} is outside 1..=1024", self.shards),
            );
        }
        if self.metric.is_empty() || !self.metric.bytes().all(keys::tsdb_char) {
            return err(
                "metric".into(),
                "must be non-empty and use only letters, digits, '-', '_', '.', '/'".into(),
            );
        }
        if self.rollups.is_empty() || self.rollups.len() > 255 {
            return err(
                "rollups".into(),
                "between 1 and 255 rollups are needed".into(),
            );
        }
        for (i, r) in self.rollups.iter().enumerate() {
            if !r.tags.contains(&self.shard_key) {
                return err(
                    format!("rollups[{i}].tags"),
                    format!(
                        "must include the shard key `{}`, or the rollup `{}` would be computed in parts on several shards",
                        self.shard_key.name(),
                        r.name
                    ),
                );
            }
            if let Some((j, t)) = r
                .tags
                .iter()
                .enumerate()
                .find(|(j, t)| r.tags[..*j].contains(t))
            {
                // A point carries each tag once: the second copy would only
                // lengthen every key.
                return err(
                    format!("rollups[{i}].tags[{j}]"),
                    format!("`{}` is listed twice", t.name()),
                );
            }
            if r.name.is_empty() || !r.name.bytes().all(keys::tsdb_char) {
                return err(
                    format!("rollups[{i}].name"),
                    "must be a valid tag value".into(),
                );
            }
            if self.rollups[..i].iter().any(|o| o.name == r.name) {
                return err(
                    format!("rollups[{i}].name"),
                    format!("`{}` is used twice", r.name),
                );
            }
        }
        Ok(())
    }
}

/// Routes decoded messages into per-shard [`KeyBatch`]es.
#[derive(Debug, Clone)]
pub struct Router {
    config: Arc<RouterConfig>,
}

impl Router {
    /// A router for `config`, which must have passed
    /// [`RouterConfig::validate`].
    pub fn new(config: Arc<RouterConfig>) -> Self {
        Router { config }
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<RouterConfig> {
        &self.config
    }

    /// The shard a metric goes to.
    #[inline]
    pub fn shard_of(&self, pop: &str, host: &str, metric: &Metric<'_>) -> u32 {
        let h = match self.config.shard_key {
            Tag::Customer => keys::hash_u64(metric.customer),
            Tag::Zone => keys::hash_sanitized(&metric.zone),
            Tag::Record => keys::hash_sanitized(&metric.record),
            Tag::Type => keys::hash_sanitized(&metric.rtype),
            Tag::Pop => keys::hash_sanitized(pop),
            Tag::Host => keys::hash_sanitized(host),
        };
        jump_hash(h, self.config.shards)
    }

    /// The shard of a series key read back (from a checkpoint): the same
    /// shard [`shard_of`](Self::shard_of) picked for its samples. `None` if
    /// the key does not fit this configuration.
    pub fn shard_of_key(&self, key: &[u8]) -> Option<u32> {
        let (rollup, values) = KeyValues::parse(key)?;
        let rollup = self.config.rollups.get(rollup as usize)?;
        let pos = rollup
            .tags
            .iter()
            .position(|t| *t == self.config.shard_key)?;
        if pos >= values.len() {
            return None;
        }
        // Copied only if written as a reference: every row of a restore or
        // a read-back is routed, and the shard key is usually the first.
        let value = values.get(pos);
        let h = match self.config.shard_key {
            Tag::Customer => keys::hash_u64(value.parse().ok()?),
            _ => keys::hash_sanitized(&value),
        };
        Some(jump_hash(h, self.config.shards))
    }

    /// Appends every rollup key of every metric of `msg` to the batch of its
    /// shard. `batches` has one entry per shard. Returns the samples added.
    pub fn route(&self, msg: &Message<'_>, batches: &mut [KeyBatch]) -> usize {
        let mut n = 0;
        for metric in &msg.metrics {
            let shard = self.shard_of(&msg.pop, &msg.host, metric) as usize;
            let batch = &mut batches[shard];
            for (i, rollup) in self.config.rollups.iter().enumerate() {
                batch.push_key(i as u8, &rollup.tags, &msg.pop, &msg.host, metric, msg.time);
                n += 1;
            }
        }
        n
    }
}

/// Jump consistent hash (Lamping & Veach, 2014): maps `key` to one of
/// `buckets` so that growing from N to N+1 buckets moves 1/(N+1) of the
/// keys, all of them to the new bucket.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_config_is_valid() {
        RouterConfig::default().validate().unwrap();
    }

    #[test]
    fn a_rollup_without_the_shard_key_is_refused_naming_the_field() {
        let mut c = RouterConfig::default();
        c.rollups[1].tags = vec![Tag::Zone, Tag::Pop];
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "rollups[1].tags");
        assert!(err.to_string().contains("shard key `customer`"), "{err}");
    }

    #[test]
    fn a_tag_listed_twice_in_a_rollup_is_refused_naming_it() {
        let mut c = RouterConfig::default();
        c.rollups[0].tags = vec![Tag::Customer, Tag::Pop, Tag::Customer];
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "rollups[0].tags[2]");
        assert!(
            err.to_string().contains("`customer` is listed twice"),
            "{err}"
        );
    }

    #[test]
    fn jump_hash_values_are_pinned() {
        // Shard assignment must never change between releases: a change
        // would move customers between shards on upgrade, splitting their
        // open buckets. These values pin it.
        let got: Vec<u32> = [0u64, 1, 42, u64::MAX]
            .iter()
            .map(|&k| jump_hash(k, 10))
            .collect();
        // Cross-checked with an independent Python port of the paper's code.
        assert_eq!(got, vec![0, 6, 2, 9]);
        assert_eq!(
            jump_hash(keys::hash_u64(1042), 4),
            jump_hash(keys::hash_u64(1042), 4)
        );
    }

    proptest! {
        #[test]
        fn adding_a_shard_moves_about_one_in_n_plus_one(n in 1u32..64, seed in any::<u64>()) {
            let keys: Vec<u64> = (0..4000u64).map(|i| keys::hash_u64(i ^ seed)).collect();
            let moved = keys.iter().filter(|&&k| jump_hash(k, n) != jump_hash(k, n + 1)).count();
            // Every moved key moves to the new shard.
            for &k in &keys {
                let (a, b) = (jump_hash(k, n), jump_hash(k, n + 1));
                prop_assert!(a == b || b == n);
                prop_assert!(a < n);
            }
            let expected = keys.len() as f64 / f64::from(n + 1);
            let tolerance = 5.0 * expected.sqrt() + 10.0;
            prop_assert!((moved as f64 - expected).abs() < tolerance,
                "moved {} expected {} ± {}", moved, expected, tolerance);
        }
    }
}
