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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
    fn escaped_strings_are_decoded() {
        let body = GOOD.replace("www.example.com", "w\\u0077w.example.com");
        let msg = JsonDecoder::default().decode(body.as_bytes()).unwrap();
        assert_eq!(msg.metrics[0].record, "www.example.com");
    }
}
