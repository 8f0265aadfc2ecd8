//! Series keys: how a (rollup, tag values) pair is written as bytes, hashed
//! and read back.
//!
//! A key is the rollup's index byte followed by each tag value and a `0`
//! byte. Values are written already sanitised for OpenTSDB (ASCII letters
//! and digits, `-_./`, and the non-ASCII letters it accepts, see
//! [`tsdb_letter`]; any other character becomes one `_`), so two values that would be the same
//! tag in the TSDB are one series here too: sanitising at flush time instead
//! would write two series to one point, and OpenTSDB keeps only the last.
//!
//! A value that is an earlier value of the same key, or ends with `.` and
//! one, is written as what precedes the `.` and a reference byte (`1 + j`
//! for the value at index `j`). A record name is nearly always a name in
//! its zone, so the record rollup's key holds the zone once: a shard keeps
//! one key per live series for as long as it lives, and this cuts the mean
//! key of `series-memory` from 67.5 to ~46 bytes (BENCHMARKS.md, session
//! 12). Reference bytes never occur in a sanitised value, and only a value
//! written in full is referred to, so a key is read in one pass.

use std::borrow::Cow;
use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

use super::{RouterConfig, Tag};
use crate::source::json::Metric;

/// Whether OpenTSDB accepts `b` in a metric name or tag.
#[inline]
pub(crate) fn tsdb_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
}

/// Whether OpenTSDB accepts the non-ASCII `c` in a tag: it accepts what
/// Java's `Character.isLetter` calls a letter (categories L*), tested per
/// UTF-16 unit, so only letters of the Basic Multilingual Plane. XID_Start
/// and Alphabetic together are the letters and the letter numbers (Nl),
/// without the combining marks Alphabetic alone would let in; the BMP's
/// letter numbers are left out by name.
#[inline]
pub(crate) fn tsdb_letter(c: char) -> bool {
    let u = u32::from(c);
    u <= 0xFFFF
        && c.is_alphabetic()
        && unicode_ident::is_xid_start(c)
        && !matches!(
            u,
            0x16EE..=0x16F0
                | 0x2160..=0x2182
                | 0x2185..=0x2188
                | 0x3007
                | 0x3021..=0x3029
                | 0x3038..=0x303A
                | 0xA6E6..=0xA6EF
        )
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

/// Most values a key holds. The router has six tags, each at most once in a
/// rollup; a fixed bound lets a key be read in one pass, without allocating.
pub const MAX_KEY_VALUES: usize = 8;

/// The value at index `j` of a key, referred to by a later value.
#[inline]
fn ref_byte(j: usize) -> u8 {
    1 + j as u8
}

/// The index a reference byte refers to, if `b` is one.
#[inline]
fn ref_index(b: u8) -> Option<usize> {
    (1..=MAX_KEY_VALUES as u8)
        .contains(&b)
        .then(|| usize::from(b - 1))
}

/// Writes one key into an arena, value by value, with back-references.
struct KeyWriter {
    /// Where each value written so far starts in the arena.
    starts: [usize; MAX_KEY_VALUES],
    /// Per value written in full (which a later one may refer to), its last
    /// byte; `0` for an empty value or one written as a reference. Most
    /// earlier values end with another byte than the value being written:
    /// comparing one byte first keeps the router's cost per key close to
    /// what it was without references (BENCHMARKS.md, session 12).
    lasts: [u8; MAX_KEY_VALUES],
    values: usize,
}

impl KeyWriter {
    #[inline]
    fn begin(arena: &mut Vec<u8>, rollup: u8) -> Self {
        arena.push(rollup);
        KeyWriter {
            starts: [arena.len(); MAX_KEY_VALUES],
            lasts: [0; MAX_KEY_VALUES],
            values: 0,
        }
    }

    /// Ends the value whose bytes were pushed since the last one ended:
    /// writes it as a reference if an earlier value lets it, then its `0`.
    /// Past [`MAX_KEY_VALUES`] values (a bug in the caller) every value is
    /// written in full, which still reads back as what it is.
    // Inlined into the router's loop over a rollup's tags: as a call it
    // was a tenth of routing (`perf`, the `router/` bench).
    #[inline(always)]
    fn end_value(&mut self, arena: &mut Vec<u8>) {
        let i = self.values;
        if i >= MAX_KEY_VALUES {
            arena.push(0);
            return;
        }
        let start = self.starts[i];
        match self.reference(arena, start) {
            Some((cut, j)) => {
                arena.truncate(cut);
                arena.push(ref_byte(j));
            }
            None => self.lasts[i] = arena[start..].last().copied().unwrap_or(0),
        }
        arena.push(0);
        self.values += 1;
        if self.values < MAX_KEY_VALUES {
            self.starts[self.values] = arena.len();
        }
    }

    /// Where the value starting at `start` is cut, and the earlier value its
    /// reference names, if it is one of them or ends with `.` and one.
    #[inline]
    fn reference(&self, arena: &[u8], start: usize) -> Option<(usize, usize)> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        let value = &arena[start..];
        let &last = value.last()?;
        // The earlier values ending with `last`, all eight compared at once
        // (a zero byte of `x`), so that a key with no candidate, the common
        // case, takes one predictable branch instead of a loop over its
        // values. The test can also flag a byte above a true match; each
        // candidate is compared in full below. `lasts` is 0 past the values
        // written, and `last` never is.
        let x = u64::from_le_bytes(self.lasts) ^ (u64::from(last) * ONES);
        let mut candidates = x.wrapping_sub(ONES) & !x & (ONES << 7);
        while candidates != 0 {
            let j = candidates.trailing_zeros() as usize / 8;
            candidates &= candidates - 1;
            if j >= self.values {
                break;
            }
            // Without its `0`.
            let earlier = &arena[self.starts[j]..self.starts[j + 1] - 1];
            if value == earlier {
                return Some((start, j));
            }
            // At least one byte before the `.`: an empty head would read
            // back as the earlier value itself.
            if let Some(head) = value.len().checked_sub(earlier.len() + 1)
                && head > 0
                && value.ends_with(earlier)
                && value[head] == b'.'
            {
                return Some((start + head, j));
            }
        }
        None
    }
}

/// The key of `values` for the rollup at index `rollup`, as the router
/// writes it. The values must already be sanitised (they are taken as they
/// are); benches and tests build keys with it.
pub fn encode_key<'v>(rollup: u8, values: impl IntoIterator<Item = &'v str>) -> Vec<u8> {
    let mut key = Vec::new();
    let mut w = KeyWriter::begin(&mut key, rollup);
    for v in values {
        key.extend_from_slice(v.as_bytes());
        w.end_value(&mut key);
    }
    key
}

/// `key` as this version of the router writes it: a key from an older
/// checkpoint has every value in full, and would otherwise be a series apart
/// from the same series' new samples. `None` if `key` is not a series key.
pub fn reencode_key(key: &[u8]) -> Option<Vec<u8>> {
    let parsed = SeriesKey::parse(key)?;
    Some(encode_key(
        parsed.rollup,
        parsed.values.iter().map(|v| v.as_ref()),
    ))
}

/// The values of a series key, each as written: in full or as a reference.
#[derive(Debug, Clone, Copy)]
pub struct KeyValues<'a> {
    raw: [&'a [u8]; MAX_KEY_VALUES],
    len: usize,
}

impl<'a> KeyValues<'a> {
    /// The rollup index and values of `key`. `None` unless `key` is a prefix
    /// byte, then at most [`MAX_KEY_VALUES`] `0`-terminated UTF-8 values,
    /// each holding a reference byte at most as its last byte, to an earlier
    /// value written in full.
    pub fn parse(key: &'a [u8]) -> Option<(u8, Self)> {
        let (&rollup, rest) = key.split_first()?;
        let body = rest.strip_suffix(&[0])?;
        std::str::from_utf8(body).ok()?;
        if body.iter().filter(|&&b| b == 0).count() >= MAX_KEY_VALUES {
            return None;
        }
        let values = Self::split_unchecked(key);
        for (i, value) in values.raw[..values.len].iter().enumerate() {
            let Some((&last, head)) = value.split_last() else {
                continue;
            };
            if head.iter().any(|&b| ref_index(b).is_some()) {
                return None;
            }
            if let Some(j) = ref_index(last) {
                let to = values.raw[..i].get(j)?;
                if to.is_empty() || to.last().is_some_and(|&b| ref_index(b).is_some()) {
                    return None;
                }
            }
        }
        Some((rollup, values))
    }

    /// The values of a key [`parse`](Self::parse) accepted before, without
    /// checking it again (the sink's encoder). A key it would refuse gives
    /// wrong values, never a panic.
    #[inline]
    pub fn split_unchecked(key: &'a [u8]) -> Self {
        let body = key.get(1..key.len().saturating_sub(1)).unwrap_or_default();
        let mut values = KeyValues {
            raw: [&[]; MAX_KEY_VALUES],
            len: 0,
        };
        for (slot, value) in values.raw.iter_mut().zip(body.split(|&b| b == 0)) {
            *slot = value;
            values.len += 1;
        }
        values
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the key has no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Value `i` in three pieces to be written one after the other (the
    /// head, `.` or nothing, the value referred to), without copying.
    #[inline]
    pub fn pieces(&self, i: usize) -> [&'a [u8]; 3] {
        let raw = self.raw.get(i).copied().unwrap_or_default();
        if let Some((&last, head)) = raw.split_last()
            && let Some(j) = ref_index(last)
        {
            let to = self.raw.get(j).copied().unwrap_or_default();
            let dot: &[u8] = if head.is_empty() { b"" } else { b"." };
            return [head, dot, to];
        }
        [raw, b"", b""]
    }

    /// Value `i`, copied only if it is written as a reference.
    pub fn get(&self, i: usize) -> Cow<'a, str> {
        // The pieces are split at ASCII bytes of a UTF-8 key: UTF-8 too.
        let text = |b: &'a [u8]| std::str::from_utf8(b).unwrap_or_default();
        match self.pieces(i) {
            [raw, b"", b""] => Cow::Borrowed(text(raw)),
            [head, dot, to] => Cow::Owned([text(head), text(dot), text(to)].concat()),
        }
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
        let mut w = KeyWriter::begin(&mut self.arena, rollup);
        for tag in tags {
            match tag {
                Tag::Customer => push_decimal(&mut self.arena, metric.customer),
                Tag::Zone => push_sanitized(&mut self.arena, &metric.zone),
                Tag::Record => push_sanitized(&mut self.arena, &metric.record),
                Tag::Type => push_sanitized(&mut self.arena, &metric.rtype),
                Tag::Pop => push_sanitized(&mut self.arena, pop),
                Tag::Host => push_sanitized(&mut self.arena, host),
            }
            w.end_value(&mut self.arena);
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
    if value.is_ascii() {
        out.extend(value.bytes().map(|b| if tsdb_char(b) { b } else { b'_' }));
        return;
    }
    // Per character, not per byte: `ü` is a letter kept whole, and `€` one
    // `_`, not three.
    let mut buf = [0u8; 4];
    for c in value.chars() {
        if c.is_ascii() {
            let b = c as u8;
            out.push(if tsdb_char(b) { b } else { b'_' });
        } else if tsdb_letter(c) {
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        } else {
            out.push(b'_');
        }
    }
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
    /// Tag values in the rollup's tag order, in full.
    pub values: Vec<Cow<'a, str>>,
}

impl<'a> SeriesKey<'a> {
    /// Parses key bytes written by the router. `None` if the bytes are not a
    /// key (a corrupted checkpoint, for one).
    pub fn parse(key: &'a [u8]) -> Option<Self> {
        let (rollup, values) = KeyValues::parse(key)?;
        Some(SeriesKey {
            rollup,
            values: (0..values.len()).map(|i| values.get(i)).collect(),
        })
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
            .map(|(t, v)| (t.name().to_string(), v.to_string()))
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
        // The record is written as its name in the zone.
        assert_eq!(
            batch.key(&s),
            b"\x021042\0example.com\0_\x02\0A\0lga\0",
            "the record refers to the zone"
        );
        assert_eq!(
            batch.key(&s),
            encode_key(2, key.values.iter().map(|v| v.as_ref()))
        );
    }

    #[test]
    fn unicode_tag_values_were_mangled_byte_by_byte() {
        let sanitized = |v: &str| {
            let mut out = Vec::new();
            push_sanitized(&mut out, v);
            String::from_utf8(out).unwrap()
        };
        // Letters OpenTSDB accepts stay whole; two names no longer collide.
        assert_eq!(sanitized("ünï.example"), "ünï.example");
        assert_eq!(sanitized("例え.jp"), "例え.jp");
        assert_ne!(sanitized("ünï.example"), sanitized("änï.example"));
        // Anything else is one `_` per character, not per byte.
        assert_eq!(sanitized("a€b c"), "a_b_c");
        // Outside the BMP (a UTF-16 surrogate pair to Java), a combining
        // mark, a digit of another script: not letters to OpenTSDB.
        assert_eq!(sanitized("x\u{1D49C}y"), "x_y");
        assert_eq!(sanitized("e\u{0301}"), "e_");
        assert_eq!(sanitized("\u{0663}"), "_");
        // Letter numbers are not letters to Java: 〇 (U+3007), Ⅻ.
        assert_eq!(sanitized("〇Ⅻ"), "__");
        assert_eq!(
            hash_sanitized("ünï.example"),
            hash_bytes("ünï.example".as_bytes())
        );
        // The key of such a value reads back as the same text.
        let config = RouterConfig::default();
        let metric = Metric {
            customer: 7,
            zone: Cow::Borrowed("ünï.example"),
            record: Cow::Borrowed("wüw.ünï.example"),
            rtype: Cow::Borrowed("A"),
            count: 1.0,
        };
        let mut batch = KeyBatch::default();
        batch.push_key(2, &config.rollups[2].tags, "lga", "h1", &metric, 60);
        let s = batch.samples()[0];
        let key = SeriesKey::parse(batch.key(&s)).unwrap();
        assert_eq!(
            key.values,
            vec!["7", "ünï.example", "wüw.ünï.example", "A", "lga"]
        );
    }

    #[test]
    fn only_a_dot_and_a_whole_earlier_value_make_a_reference() {
        let cases: [(&[&str], &[u8]); 6] = [
            // A suffix that is not a whole label stays in full.
            (&["ex.com", "wwwex.com"], b"\0ex.com\0wwwex.com\0"),
            // An empty head would read back as the zone itself.
            (&["ex.com", ".ex.com"], b"\0ex.com\0.ex.com\0"),
            // Equal values: the reference alone.
            (&["ex.com", "ex.com"], b"\0ex.com\0\x01\0"),
            // Empty values are never referred to.
            (&["", "a.", "x"], b"\0\0a.\0x\0"),
            // Only values in full are referred to: the third is in full,
            // although it ends with the second's (expanded) value.
            (&["b", "a.b", "c.a.b"], b"\0b\0a\x01\0c.a\x01\0"),
            (&["1", "x.1", "1"], b"\x001\0x\x01\0\x01\0"),
        ];
        for (values, want) in cases {
            let key = encode_key(0, values.iter().copied());
            assert_eq!(key, want, "{values:?}");
            let back = SeriesKey::parse(&key).unwrap();
            assert_eq!(back.values, values.to_vec(), "{values:?}");
        }
    }

    #[test]
    fn a_key_in_full_from_an_older_checkpoint_is_written_again_as_new_keys_are() {
        let old = b"\x021042\0example.com\0www.example.com\0A\0lga\0";
        let new = reencode_key(old).unwrap();
        assert_eq!(new, b"\x021042\0example.com\0www\x02\0A\0lga\0");
        assert_eq!(reencode_key(&new).as_deref(), Some(&new[..]), "stable");
        assert_eq!(reencode_key(b"\x02a\0b"), None);
    }

    /// The key of `values` by the rule as the module documents it, one value
    /// and one earlier value at a time: a check on the writer's shortcuts,
    /// and on keys staying the bytes that checkpoints already hold.
    fn encode_by_the_rule(rollup: u8, values: &[String]) -> Vec<u8> {
        let mut key = vec![rollup];
        // Per value: itself if written in full and not empty.
        let mut full: Vec<Option<&str>> = Vec::new();
        for v in values {
            let reference = full.iter().enumerate().find_map(|(j, earlier)| {
                let earlier = (*earlier)?;
                if v == earlier {
                    return Some(("", j));
                }
                let head = v.strip_suffix(earlier)?.strip_suffix('.')?;
                (!head.is_empty()).then_some((head, j))
            });
            match reference {
                Some((head, j)) => {
                    key.extend_from_slice(head.as_bytes());
                    key.push(1 + j as u8);
                    full.push(None);
                }
                None => {
                    key.extend_from_slice(v.as_bytes());
                    full.push((!v.is_empty()).then_some(v.as_str()));
                }
            }
            key.push(0);
        }
        key
    }

    proptest::proptest! {
        /// Whatever the values, a key reads back as them, through the
        /// router's parser and through the sink's pieces alike.
        #[test]
        fn keys_read_back_as_their_values(
            values in proptest::collection::vec("[a-c.]{0,6}", 1..=MAX_KEY_VALUES),
        ) {
            let key = encode_key(3, values.iter().map(String::as_str));
            let parsed = SeriesKey::parse(&key).unwrap();
            proptest::prop_assert_eq!(parsed.rollup, 3);
            proptest::prop_assert_eq!(&parsed.values, &values);
            let split = KeyValues::split_unchecked(&key);
            for (i, v) in values.iter().enumerate() {
                proptest::prop_assert_eq!(split.pieces(i).concat(), v.as_bytes());
            }
            proptest::prop_assert_eq!(reencode_key(&key), Some(key));
        }

        /// The writer refers to the first earlier value the rule allows,
        /// as one written value at a time would: short values over a small
        /// alphabet share last bytes and suffixes often.
        #[test]
        fn keys_are_written_by_the_rule(
            values in proptest::collection::vec("[ab.]{0,4}", 1..=MAX_KEY_VALUES),
        ) {
            proptest::prop_assert_eq!(
                encode_key(1, values.iter().map(String::as_str)),
                encode_by_the_rule(1, &values)
            );
        }
    }
}
