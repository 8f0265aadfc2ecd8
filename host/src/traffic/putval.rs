//! wagg's messages as collectd `PUTVAL` commands, so that collectd can be
//! fed the same logical workload as wagg (`wagg loadgen --format putval`).
//!
//! collectd's `amqp` plugin reads only its own command format
//! (`text/collectd`), one value list per message, so one wagg message of N
//! metrics becomes N messages. A metric becomes one collectd value list:
//!
//! | collectd field  | from                                  | example                      |
//! |-----------------|---------------------------------------|------------------------------|
//! | host            | `pop`                                 | `lga`                        |
//! | plugin          | [`PLUGIN`]                            | `dns`                        |
//! | plugin instance | `c` + `customer`                      | `c1042`                      |
//! | type            | [`TYPE`] (`count`, a GAUGE ≥ 0 in `types.db`) | `count`              |
//! | type instance   | `zone` `_` `record` `_` `type`        | `z1.c1042.example_r3.z1.c1042.example_A` |
//! | time, value     | the message's `time`, the metric's `count` | `1764133200:37`         |
//!
//! ```text
//! PUTVAL lga/dns-c1042/count-z1.c1042.example_r3.z1.c1042.example_A 1764133200:37
//! ```
//!
//! Why this mapping: `write_tsdb` writes `put <plugin>.<plugin
//! instance>.<type>.<type instance> <time> <value> fqdn=<host>`, its only
//! tag being the host. So the POP goes in the host (the tag) and the
//! customer alone in the plugin instance, where a reader finds it between
//! the first two dots of the metric name (`dns.c1042.count.…`), and where
//! the `aggregation` plugin's `GroupBy Host` and `GroupBy PluginInstance`
//! make exactly wagg's `customer` rollup (customer, pop). The POP host that
//! sent the message (`host`) is in no rollup of wagg's and is dropped. The
//! type instance keeps the series distinct as wagg's finest rollup does;
//! its `_` separators are for reading, not for parsing back (names may
//! contain `_`).

use std::io::Write;

use crate::source::json::{Message, Metric};

/// The AMQP content type collectd's `amqp` plugin requires of a command.
pub const CONTENT_TYPE: &str = "text/collectd";
/// The collectd plugin name every value list carries.
pub const PLUGIN: &str = "dns";
/// The collectd type: `count` is `value:GAUGE:0:U` in collectd's `types.db`.
pub const TYPE: &str = "count";
/// Longest identifier field collectd keeps (`DATA_MAX_NAME_LEN` is 128,
/// with the terminating NUL); a longer one is cut, which would merge series.
pub const MAX_FIELD_BYTES: usize = 127;

/// A metric that cannot be written as a collectd identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PutvalError {
    /// A field collectd would cut, split or misparse.
    #[error("collectd cannot carry {field} {value:?}: {reason}")]
    BadField {
        /// Which identifier field (`host`, `plugin instance`, `type instance`).
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Checks one identifier field: `/` separates the fields, whitespace and
/// quotes would need quoting that `write_tsdb` then passes on into the
/// metric name, and collectd cuts anything past [`MAX_FIELD_BYTES`].
fn check(field: &'static str, value: &[u8]) -> Result<(), PutvalError> {
    let bad = |reason| {
        Err(PutvalError::BadField {
            field,
            value: String::from_utf8_lossy(value).into_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return bad("it is empty");
    }
    if value.len() > MAX_FIELD_BYTES {
        return bad("it is longer than 127 bytes");
    }
    if value
        .iter()
        .any(|b| matches!(b, b'/' | b'"' | b'\\') || b.is_ascii_whitespace())
    {
        return bad("it holds `/`, a quote, a backslash or whitespace");
    }
    Ok(())
}

/// Appends the `PUTVAL` command of one metric of `msg` to `out` (no
/// newline: the `amqp` plugin takes one command per message).
///
/// # Errors
///
/// [`PutvalError::BadField`] if the POP or the type instance cannot be a
/// collectd identifier field (see [`MAX_FIELD_BYTES`]); `out` may then
/// hold part of the command.
pub fn encode_metric(
    msg: &Message<'_>,
    metric: &Metric<'_>,
    out: &mut Vec<u8>,
) -> Result<(), PutvalError> {
    check("host", msg.pop.as_bytes())?;
    let start = out.len();
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "PUTVAL {}/{PLUGIN}-c{}/{TYPE}-",
        msg.pop, metric.customer
    );
    let instance = out.len();
    let _ = write!(out, "{}_{}_{}", metric.zone, metric.record, metric.rtype);
    if let Err(e) = check("type instance", &out[instance..]) {
        out.truncate(start);
        return Err(e);
    }
    let _ = write!(out, " {}:{}", msg.time, metric.count);
    Ok(())
}

/// The `PUTVAL` commands of every metric of `msg`, one message body each,
/// in the message's order.
///
/// # Errors
///
/// The first metric [`encode_metric`] refuses.
pub fn encode(msg: &Message<'_>) -> Result<Vec<Vec<u8>>, PutvalError> {
    msg.metrics
        .iter()
        .map(|m| {
            let mut out = Vec::with_capacity(128);
            encode_metric(msg, m, &mut out).map(|()| out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::source::generator::{Generator, GeneratorConfig};
    use crate::source::json::{Decoder, JsonDecoder};

    fn metric(
        customer: u64,
        zone: &'static str,
        record: &'static str,
        count: f64,
    ) -> Metric<'static> {
        Metric {
            customer,
            zone: Cow::Borrowed(zone),
            record: Cow::Borrowed(record),
            rtype: Cow::Borrowed("AAAA"),
            count,
        }
    }

    fn message(metrics: Vec<Metric<'static>>) -> Message<'static> {
        Message {
            pop: Cow::Borrowed("lga"),
            host: Cow::Borrowed("lga-dns-03"),
            time: 1_764_133_200,
            metrics,
        }
    }

    #[test]
    fn each_metric_is_one_command_with_pop_as_host_and_customer_as_plugin_instance() {
        let msg = message(vec![
            metric(1042, "example.com", "www.example.com", 37.0),
            metric(7, "z1.c7.example", "r2-g3.z1.c7.example", 0.5),
        ]);
        let bodies = encode(&msg).expect("valid fields");
        let bodies: Vec<&str> = bodies
            .iter()
            .map(|b| std::str::from_utf8(b).expect("utf-8"))
            .collect();
        assert_eq!(
            bodies,
            [
                "PUTVAL lga/dns-c1042/count-example.com_www.example.com_AAAA 1764133200:37",
                "PUTVAL lga/dns-c7/count-z1.c7.example_r2-g3.z1.c7.example_AAAA 1764133200:0.5",
            ]
        );
    }

    #[test]
    fn fields_collectd_would_split_or_cut_are_refused() {
        let mut msg = message(vec![metric(1, "a/b", "r", 1.0)]);
        assert!(matches!(
            encode(&msg),
            Err(PutvalError::BadField {
                field: "type instance",
                ..
            })
        ));
        msg.metrics = vec![metric(1, "z", "r r", 1.0)];
        assert!(encode(&msg).is_err());
        let long: &'static str = Box::leak("x".repeat(MAX_FIELD_BYTES).into_boxed_str());
        msg.metrics = vec![metric(1, long, "r", 1.0)];
        assert!(encode(&msg).is_err(), "zone + record + type over 127 bytes");
        msg.metrics = vec![metric(1, "z", "r", 1.0)];
        msg.pop = Cow::Borrowed("");
        assert!(matches!(
            encode(&msg),
            Err(PutvalError::BadField { field: "host", .. })
        ));
        // A refused metric leaves nothing behind in a reused buffer.
        let mut out = b"kept".to_vec();
        let msg = message(vec![metric(1, "a/b", "r", 1.0)]);
        assert!(encode_metric(&msg, &msg.metrics[0], &mut out).is_err());
        assert_eq!(out, b"kept");
    }

    /// What the correctness check of `benches/collectd.sh` relies on: from
    /// each command's identifier alone, the customer and POP come back, and
    /// the counts add up to the message's.
    #[test]
    fn generated_messages_keep_customer_pop_and_counts() {
        let mut generator = Generator::new(GeneratorConfig::default(), 60).expect("valid config");
        let decoder = JsonDecoder::default();
        for i in 0..20 {
            let body = generator.message(1_764_133_200 + i);
            let msg = decoder.decode(&body).expect("generated messages decode");
            let bodies = encode(&msg).expect("generated names fit collectd");
            assert_eq!(bodies.len(), msg.metrics.len());
            let mut sum = 0.0;
            for (body, m) in bodies.iter().zip(&msg.metrics) {
                let text = std::str::from_utf8(body).expect("utf-8");
                let rest = text.strip_prefix("PUTVAL ").expect("a PUTVAL command");
                let (ident, value) = rest.split_once(' ').expect("identifier and value");
                let mut parts = ident.split('/');
                assert_eq!(parts.next(), Some(&*msg.pop));
                let plugin = parts.next().expect("plugin");
                assert_eq!(plugin, format!("{PLUGIN}-c{}", m.customer));
                assert!(parts.next().expect("type").starts_with("count-"));
                assert_eq!(parts.next(), None);
                let (time, count) = value.split_once(':').expect("time:value");
                assert_eq!(time.parse::<u64>(), Ok(msg.time));
                sum += count.parse::<f64>().expect("a number");
            }
            let want: f64 = msg.metrics.iter().map(|m| m.count).sum();
            assert_eq!(sum, want);
        }
    }
}
