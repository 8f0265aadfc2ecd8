//! Series keys: how a (rollup, tag values) pair is written as bytes, hashed
//! and read back.
//!
//! A key is the rollup's index byte followed by each tag value and a `0`
//! byte. Values are written already sanitised for OpenTSDB (letters, digits,
//! `-_./`; anything else becomes `_`), so two values that would be the same
//! tag in the TSDB are one series here too: sanitising at flush time instead
//! would write two series to one point, and OpenTSDB keeps only the last.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use super::{RouterConfig, Tag};
use crate::source::json::Metric;

/// Whether OpenTSDB accepts `b` in a metric name or tag.
#[inline]
pub(crate) fn tsdb_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
}

/// Hash of a shard key or series key. XXH3: fast on short keys, and
/// fixed forever (it picks shards, so it must not change across releases).
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Hash of a numeric shard key.
#[inline]
pub fn hash_u64(v: u64) -> u64 {
    xxh3_64(&v.to_le_bytes())
}

/// Hash of a text shard key as it is written in series keys (sanitised),
/// so that a key read back from a checkpoint picks the same shard.
#[inline]
pub fn hash_sanitized(value: &str) -> u64 {
    if value.bytes().all(tsdb_char) {
        xxh3_64(value.as_bytes())
    } else {
        let mut buf = Vec::with_capacity(value.len());
        push_sanitized(&mut buf, value);
        xxh3_64(&buf)
    }
}

/// One sample whose series key lives in its batch's key arena.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyedSample {
    /// Offset of the key in [`KeyBatch::key`]'s arena.
    pub key_start: u32,
    /// Length of the key.
    pub key_len: u32,
    /// Event time, seconds.
    pub timestamp: u64,
    /// The sample's value.
    pub value: f64,
}

/// Samples bound for one shard, keys packed in one arena: routing a metric
/// allocates nothing once the batch has grown to its working size.
#[derive(Debug, Default, Clone)]
pub struct KeyBatch {
    arena: Vec<u8>,
    samples: Vec<KeyedSample>,
}

impl KeyBatch {
    /// An empty batch with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        KeyBatch {
            arena: Vec::with_capacity(n * 48),
            samples: Vec::with_capacity(n),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.samples.clear();
    }

    /// The samples.
    pub fn samples(&self) -> &[KeyedSample] {
        &self.samples
    }

    /// The key bytes of `s`.
    #[inline]
    pub fn key(&self, s: &KeyedSample) -> &[u8] {
        &self.arena[s.key_start as usize..(s.key_start + s.key_len) as usize]
    }

    /// Appends a sample with a key given as raw bytes (restores, tests).
    pub fn push_raw(&mut self, key: &[u8], timestamp: u64, value: f64) {
        let start = self.arena.len() as u32;
        self.arena.extend_from_slice(key);
        self.samples.push(KeyedSample {
            key_start: start,
            key_len: key.len() as u32,
            timestamp,
            value,
        });
    }

    /// Appends the sample of `metric` for the rollup `rollup` with `tags`.
    #[inline]
    pub(crate) fn push_key(
        &mut self,
        rollup: u8,
        tags: &[Tag],
        pop: &str,
        host: &str,
        metric: &Metric<'_>,
        timestamp: u64,
    ) {
        let start = self.arena.len();
        self.arena.push(rollup);
        for tag in tags {
            match tag {
                Tag::Customer => push_decimal(&mut self.arena, metric.customer),
                Tag::Zone => push_sanitized(&mut self.arena, &metric.zone),
                Tag::Record => push_sanitized(&mut self.arena, &metric.record),
                Tag::Type => push_sanitized(&mut self.arena, &metric.rtype),
                Tag::Pop => push_sanitized(&mut self.arena, pop),
                Tag::Host => push_sanitized(&mut self.arena, host),
            }
            self.arena.push(0);
        }
        self.samples.push(KeyedSample {
            key_start: start as u32,
            key_len: (self.arena.len() - start) as u32,
            timestamp,
            value: metric.count,
        });
    }
}

fn push_sanitized(out: &mut Vec<u8>, value: &str) {
    out.extend(value.bytes().map(|b| if tsdb_char(b) { b } else { b'_' }));
}

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A series key read back: its rollup and tag values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesKey<'a> {
    /// Index of the rollup in the configuration.
    pub rollup: u8,
    /// Tag values in the rollup's tag order.
    pub values: Vec<&'a str>,
}

impl<'a> SeriesKey<'a> {
    /// Parses key bytes written by the router. `None` if the bytes are not a
    /// key (a corrupted checkpoint, for one).
    pub fn parse(key: &'a [u8]) -> Option<Self> {
        let (&rollup, rest) = key.split_first()?;
        let rest = rest.strip_suffix(&[0])?;
        let values = rest
            .split(|&b| b == 0)
            .map(std::str::from_utf8)
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(SeriesKey { rollup, values })
    }

    /// The OpenTSDB tags of this series under `config`: the rollup's tags
    /// plus `rollup=<name>`. `None` if the key does not fit the config.
    pub fn tags(&self, config: &RouterConfig) -> Option<BTreeMap<String, String>> {
        let rollup = config.rollups.get(self.rollup as usize)?;
        if rollup.tags.len() != self.values.len() {
            return None;
        }
        let mut tags: BTreeMap<String, String> = rollup
            .tags
            .iter()
            .zip(&self.values)
            .map(|(t, v)| (t.name().to_string(), (*v).to_string()))
            .collect();
        tags.insert("rollup".into(), rollup.name.clone());
        Some(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn keys_round_trip_and_are_sanitised() {
        let config = RouterConfig::default();
        let metric = Metric {
            customer: 1042,
            zone: Cow::Borrowed("example.com"),
            record: Cow::Borrowed("*.example.com"),
            rtype: Cow::Borrowed("A"),
            count: 3.0,
        };
        let mut batch = KeyBatch::default();
        batch.push_key(2, &config.rollups[2].tags, "lga", "h1", &metric, 60);
        let s = batch.samples()[0];
        let key = SeriesKey::parse(batch.key(&s)).unwrap();
        assert_eq!(
            key.values,
            vec!["1042", "example.com", "_.example.com", "A", "lga"]
        );
        let tags = key.tags(&config).unwrap();
        assert_eq!(tags["rollup"], "record");
        assert_eq!(tags["record"], "_.example.com");
        assert_eq!(tags.len(), 6);
        assert_eq!(SeriesKey::parse(b"\x01abc"), None);
    }
}
