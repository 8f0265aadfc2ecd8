//! The message format POPs publish, and its decoder.
//!
//! One message carries one POP host's counts for one moment:
//!
//! ```json
//! {"pop":"lga","host":"lga-dns-03","time":1764133200,
//!  "metrics":[{"customer":1042,"zone":"example.com","record":"www.example.com","type":"A","count":37}]}
//! ```
//!
//! Decoding borrows strings from the message body where it can (no
//! allocation per metric), and refuses a whole message on the first bad
//! field: a message is dead-lettered whole, never half-counted.

use std::borrow::Cow;

use serde::Deserialize;

/// Limits on what one message may hold. Every limit exists so that one bad
/// message cannot cost more than a bounded amount of memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeLimits {
    /// Largest message body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most metrics one message may carry.
    pub max_metrics: usize,
    /// Longest `pop`, `host`, `zone`, `record` or `type`, in bytes.
    pub max_field_bytes: usize,
    /// Earliest `time` accepted (seconds since the Unix epoch).
    pub min_time: u64,
    /// Latest `time` accepted (seconds since the Unix epoch).
    pub max_time: u64,
    /// Largest `count` accepted. An integer, so that no sum of accepted
    /// counts can leave `f64`'s range: 2^64 samples of `u64::MAX` each sum
    /// to about 3.4e38, and their squares (a variance) to 6e57, far below
    /// `f64::MAX` (1.8e308). The default, 2^53, is the largest count `f64`
    /// still holds exactly.
    pub max_count: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_message_bytes: 4 << 20,
            max_metrics: 100_000,
            max_field_bytes: 255,
            // 2001-09-09 .. 2286-11-20: ten-digit epoch seconds, which
            // catches milliseconds sent by mistake.
            min_time: 1_000_000_000,
            max_time: 9_999_999_999,
            max_count: 1 << 53,
        }
    }
}

/// Why a message was refused. `code()` is the dead-letter reason code and
/// the `reason` metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than `max_message_bytes`.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Body size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or JSON of the wrong shape or types.
    #[error("invalid message: {0}")]
    BadJson(String),
    /// A field is out of its allowed range.
    #[error("invalid field `{field}`: {reason}")]
    BadField {
        /// The field's name (`metrics[3].count`, ...).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl DecodeError {
    /// Short, fixed reason code: the dead-letter header and metric label.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::BadJson(_) => "bad_json",
            DecodeError::BadField { .. } => "bad_field",
        }
    }
}

/// One metric of a message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Metric<'a> {
    /// Customer id: the key every rollup starts with.
    pub customer: u64,
    /// DNS zone.
    #[serde(borrow)]
    pub zone: Cow<'a, str>,
    /// Record name.
    #[serde(borrow)]
    pub record: Cow<'a, str>,
    /// Record type (`A`, `AAAA`, ...).
    #[serde(borrow, rename = "type")]
    pub rtype: Cow<'a, str>,
    /// Queries counted.
    pub count: f64,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Message<'a> {
    /// Point of presence the counts come from.
    #[serde(borrow)]
    pub pop: Cow<'a, str>,
    /// Host within the POP. Not a rollup tag by default: a per-host tag
    /// multiplies series (the talk's series explosion).
    #[serde(borrow)]
    pub host: Cow<'a, str>,
    /// When the counts were taken, in seconds since the Unix epoch.
    pub time: u64,
    /// The counts.
    #[serde(borrow)]
    pub metrics: Vec<Metric<'a>>,
}

// serde's derive also reads a struct from a JSON array of its fields in
// order (`[1042,"example.com",...]`), a form the README does not describe
// and a publisher's bug could produce by accident. `remote = "Self"` makes
// the derive an inherent function, so these impls can hand it a
// deserializer that reads structs only from JSON objects.
impl<'de: 'a, 'a> Deserialize<'de> for Metric<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Metric::deserialize(ObjectsOnly(d))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Message<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Message::deserialize(ObjectsOnly(d))
    }
}

/// A deserializer that reads a struct only from a map: its
/// `deserialize_struct` asks the inner one for a map, which serde_json
/// refuses for an array ("invalid type: sequence, expected struct ...").
struct ObjectsOnly<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(v)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Turns a message body into a [`Message`]. A trait so that a binary
/// encoding can be added beside JSON.
pub trait Decoder: Send + Sync + std::fmt::Debug {
    /// Decodes and validates `body`.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first problem.
    fn decode<'a>(&self, body: &'a [u8]) -> Result<Message<'a>, DecodeError>;
}

/// The JSON decoder.
#[derive(Debug, Clone, Default)]
pub struct JsonDecoder {
    limits: DecodeLimits,
}

impl JsonDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: DecodeLimits) -> Self {
        JsonDecoder { limits }
    }
}

impl Decoder for JsonDecoder {
    fn decode<'a>(&self, body: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let limits = &self.limits;
        if body.len() > limits.max_message_bytes {
            return Err(DecodeError::TooLarge {
                size: body.len(),
                limit: limits.max_message_bytes,
            });
        }
        // One UTF-8 check of the whole body, then serde_json reads a `str`
        // and checks no string again; from bytes it validated every key and
        // value on its own, seven short strings a metric (2 % of the
        // decode bench's time: BENCHMARKS.md, session 6).
        let text = std::str::from_utf8(body)
            .map_err(|e| DecodeError::BadJson(format!("the body is not UTF-8: {e}")))?;
        // serde_json's own recursion limit (128) bounds deep nesting.
        let msg: Message<'a> =
            serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))?;
        let bad = |field: String, reason: String| Err(DecodeError::BadField { field, reason });
        if !(limits.min_time..=limits.max_time).contains(&msg.time) {
            return bad(
                "time".into(),
                format!(
                    "{} is outside {}..={} (seconds since the epoch)",
                    msg.time, limits.min_time, limits.max_time
                ),
            );
        }
        if msg.metrics.len() > limits.max_metrics {
            return bad(
                "metrics".into(),
                format!(
                    "{} metrics, more than {}",
                    msg.metrics.len(),
                    limits.max_metrics
                ),
            );
        }
        check_text("pop", &msg.pop, limits.max_field_bytes)?;
        check_text("host", &msg.host, limits.max_field_bytes)?;
        for (i, m) in msg.metrics.iter().enumerate() {
            if !m.count.is_finite() || m.count < 0.0 {
                return bad(
                    format!("metrics[{i}].count"),
                    format!("{} is not a finite count >= 0", m.count),
                );
            }
            // `as f64` rounds u64::MAX up to 2^64; a count equal to that
            // is still finite in every sum (see `max_count`).
            if m.count > limits.max_count as f64 {
                return bad(
                    format!("metrics[{i}].count"),
                    format!("{} is more than max_count {}", m.count, limits.max_count),
                );
            }
            check_text_at(i, "zone", &m.zone, limits.max_field_bytes)?;
            check_text_at(i, "record", &m.record, limits.max_field_bytes)?;
            check_text_at(i, "type", &m.rtype, limits.max_field_bytes)?;
        }
        Ok(msg)
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), DecodeError> {
    if value.is_empty() || value.len() > max {
        return Err(DecodeError::BadField {
            field: field.into(),
            reason: format!("length {} is outside 1..={max} bytes", value.len()),
        });
    }
    Ok(())
}

fn check_text_at(i: usize, field: &str, value: &str, max: usize) -> Result<(), DecodeError> {
    check_text(field, value, max).map_err(|e| match e {
        DecodeError::BadField { reason, .. } => DecodeError::BadField {
            field: format!("metrics[{i}].{field}"),
            reason,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"pop":"lga","host":"lga-dns-03","time":1764133200,"metrics":[{"customer":1042,"zone":"example.com","record":"www.example.com","type":"A","count":37}]}"#;

    #[test]
    fn decodes_the_documented_example() {
        let msg = JsonDecoder::default().decode(GOOD.as_bytes()).unwrap();
        assert_eq!(msg.pop, "lga");
        assert_eq!(msg.time, 1_764_133_200);
        assert_eq!(msg.metrics.len(), 1);
        assert_eq!(msg.metrics[0].customer, 1042);
        assert_eq!(msg.metrics[0].rtype, "A");
        assert_eq!(msg.metrics[0].count, 37.0);
    }

    #[test]
    fn refuses_each_kind_of_bad_message_with_its_code() {
        let d = JsonDecoder::new(DecodeLimits {
            max_message_bytes: 400,
            ..DecodeLimits::default()
        });
        let cases = [
            ("not json", "bad_json"),
            (r#"{"pop":"lga"}"#, "bad_json"),
            (&GOOD.replace("1042", "\"1042\""), "bad_json"),
            (&GOOD.replace("1042", "-1"), "bad_json"),
            (&GOOD.replace("\"count\":37", "\"count\":-3"), "bad_field"),
            (&GOOD.replace("1764133200", "1764133200000"), "bad_field"),
            (&GOOD.replace("\"lga\"", "\"\""), "bad_field"),
            (
                &GOOD.replace("\"type\":\"A\"", "\"type\":\"A\",\"x\":1"),
                "bad_json",
            ),
            (&format!("{}{}", GOOD, " ".repeat(400)), "too_large"),
            (&"[".repeat(300), "bad_json"),
            (
                &GOOD.replace("\"count\":37", "\"count\":1e308"),
                "bad_field",
            ),
            (
                &GOOD.replace("\"count\":37", "\"count\":9007199254740994"),
                "bad_field",
            ),
            (&GOOD.replace("1042", "1e308"), "bad_json"),
            (&GOOD.replace("1764133200", "1e308"), "bad_json"),
        ];
        for (body, code) in cases {
            let err = d.decode(body.as_bytes()).expect_err(body);
            assert_eq!(err.code(), code, "{body}: {err}");
        }
    }

    #[test]
    fn a_body_that_is_not_utf8_is_bad_json_and_utf8_text_is_kept() {
        let mut body = GOOD
            .replace("www.example.com", "wüw.example.com")
            .into_bytes();
        let msg = JsonDecoder::default().decode(&body).unwrap();
        assert_eq!(msg.metrics[0].record, "wüw.example.com");
        // The second byte of `ü`, inside a string value.
        let at = body.windows(2).position(|w| w == "ü".as_bytes()).unwrap() + 1;
        body[at] = 0xff;
        let err = JsonDecoder::default().decode(&body).unwrap_err();
        assert_eq!(err.code(), "bad_json");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn the_largest_accepted_count_is_max_count() {
        let at = GOOD.replace("\"count\":37", "\"count\":9007199254740992");
        let msg = JsonDecoder::default().decode(at.as_bytes()).unwrap();
        assert_eq!(msg.metrics[0].count, 9_007_199_254_740_992.0);
        let d = JsonDecoder::new(DecodeLimits {
            max_count: 36,
            ..DecodeLimits::default()
        });
        let err = d.decode(GOOD.as_bytes()).unwrap_err();
        assert_eq!(err.code(), "bad_field");
        assert!(err.to_string().contains("max_count 36"), "{err}");
    }

    #[test]
    fn positional_arrays_are_refused() {
        let metric = r#"[1042,"example.com","www.example.com","A",37]"#;
        let nested =
            format!(r#"{{"pop":"lga","host":"h","time":1764133200,"metrics":[{metric}]}}"#);
        let top = format!(r#"["lga","h",1764133200,[{metric}]]"#);
        for body in [nested, top] {
            let err = JsonDecoder::default().decode(body.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "bad_json", "{body}");
            assert!(err.to_string().contains("expected struct"), "{err}");
        }
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = GOOD.replace("www.example.com", "w\\u0077w.example.com");
        let msg = JsonDecoder::default().decode(body.as_bytes()).unwrap();
        assert_eq!(msg.metrics[0].record, "www.example.com");
    }
}
