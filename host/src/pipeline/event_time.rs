//! Event time that one clock cannot poison.
//!
//! Each source (a message's `pop` and `host`) has its own watermark: the
//! latest event time it sent. The pipeline's watermark is the lowest of the
//! sources that sent something in the last `source_idle_secs` of wall time,
//! as Flink combines the watermarks of its inputs and leaves idle ones out.
//! A source whose clock runs ahead therefore moves nothing: the others still
//! hold the watermark where their own time is. One whose clock runs behind
//! holds flushes back by its lag (its samples are on time, not late) until
//! it falls silent.
//!
//! A message dated more than `max_future_secs` past this host's wall clock
//! is refused before it reaches any of this (`from_future`): without that
//! bound one message a day ahead would be the only active source's time for
//! a while, and a restart would bring it back from the checkpoint.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::telemetry::LateSamplesSummary;

/// At most this many sources are tracked at once. A publisher that invents
/// a new `host` per message must not grow the map without bound: when it is
/// full, idle sources are forgotten first, and if none is idle the new
/// source is not tracked (its samples are counted, but it does not hold the
/// watermark back).
pub const MAX_SOURCES: usize = 10_000;

/// A message's time is further ahead of the wall clock than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "time {time} is {ahead} s ahead of this host's clock (more than max_future_secs = {max}); \
     the publisher's clock is wrong, or this host's"
)]
pub struct FromFuture {
    /// The message's time.
    pub time: u64,
    /// Seconds it is ahead of the wall clock.
    pub ahead: u64,
    /// `max_future_secs`.
    pub max: u64,
}

impl FromFuture {
    /// The dead-letter reason code.
    pub const CODE: &'static str = "from_future";
}

/// Seconds since the Unix epoch by the wall clock (0 before it).
pub fn wall_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses `time` if it is more than `max_future_secs` past `now`.
///
/// # Errors
///
/// [`FromFuture`] naming how far ahead it is.
pub fn check_future(time: u64, now: u64, max_future_secs: u64) -> Result<(), FromFuture> {
    let ahead = time.saturating_sub(now);
    if ahead > max_future_secs {
        return Err(FromFuture {
            time,
            ahead,
            max: max_future_secs,
        });
    }
    Ok(())
}

#[derive(Debug)]
struct SourceTime {
    name: Box<str>,
    latest: u64,
    seen: Instant,
}

/// The per-source watermarks.
#[derive(Debug)]
pub struct Sources {
    by_id: HashMap<u64, SourceTime>,
    idle_after: Duration,
    max_sources: usize,
    /// When idle sources were last swept out of a full map: at most once
    /// a second, so a publisher inventing a host per message costs a scan
    /// a second, not one a message.
    swept: Option<Instant>,
}

/// A source's identity: a hash of its `pop` and `host`, so that a message's
/// lookup allocates nothing.
pub fn source_id(pop: &str, host: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(pop.as_bytes());
    // Not a byte a decoded string can hold unescaped next to another: `a`
    // + `bc` and `ab` + `c` stay apart.
    h.update(&[0xff]);
    h.update(host.as_bytes());
    h.digest()
}

impl Sources {
    /// Sources idle after `idle_after` without a message.
    pub fn new(idle_after: Duration, max_sources: usize) -> Self {
        Sources {
            by_id: HashMap::new(),
            idle_after,
            max_sources,
            swept: None,
        }
    }

    /// Records that `pop`/`host` sent a message of event time `time`.
    pub fn observe(&mut self, pop: &str, host: &str, time: u64, now: Instant) {
        let id = source_id(pop, host);
        if let Some(s) = self.by_id.get_mut(&id) {
            s.latest = s.latest.max(time);
            s.seen = now;
            return;
        }
        if self.by_id.len() >= self.max_sources {
            if self
                .swept
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return;
            }
            self.swept = Some(now);
            let idle_after = self.idle_after;
            self.by_id
                .retain(|_, s| now.saturating_duration_since(s.seen) < idle_after);
            if self.by_id.len() >= self.max_sources {
                return;
            }
        }
        self.by_id.insert(
            id,
            SourceTime {
                name: format!("{pop}/{host}").into(),
                latest: time,
                seen: now,
            },
        );
    }

    /// The lowest latest event time of the sources active at `now`, with
    /// that source's name; `None` if every source is idle (or none has
    /// sent).
    pub fn low(&self, now: Instant) -> Option<(u64, &str)> {
        self.by_id
            .values()
            .filter(|s| now.saturating_duration_since(s.seen) < self.idle_after)
            .min_by_key(|s| s.latest)
            .map(|s| (s.latest, &*s.name))
    }

    /// Sources tracked (active or idle).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Late samples, summed between log lines: a WARN at most every
/// `every`, saying how many, how late at worst, and from which source.
#[derive(Debug)]
pub struct LateLog {
    every: Duration,
    logged: Option<Instant>,
    samples: u64,
    messages: u64,
    worst_secs: u64,
    worst_source: String,
}

impl LateLog {
    /// A log line at most every `every`.
    pub fn new(every: Duration) -> Self {
        LateLog {
            every,
            logged: None,
            samples: 0,
            messages: 0,
            worst_secs: 0,
            worst_source: String::new(),
        }
    }

    /// Adds a late message of `samples` samples, `late_secs` behind the
    /// flushed watermark, from `pop`/`host`; logs if the last line is older
    /// than `every`.
    pub fn add(&mut self, samples: u64, late_secs: u64, pop: &str, host: &str, now: Instant) {
        self.samples += samples;
        self.messages += 1;
        if late_secs >= self.worst_secs || self.worst_source.is_empty() {
            self.worst_secs = late_secs;
            self.worst_source.clear();
            self.worst_source.push_str(pop);
            self.worst_source.push('/');
            self.worst_source.push_str(host);
        }
        self.maybe_log(now);
    }

    /// Logs what was summed if the last line is older than `every`.
    pub fn maybe_log(&mut self, now: Instant) {
        if self.messages == 0
            || self
                .logged
                .is_some_and(|t| now.saturating_duration_since(t) < self.every)
        {
            return;
        }
        LateSamplesSummary {
            samples: self.samples,
            messages: self.messages,
            worst_secs: self.worst_secs,
            worst_source: &self.worst_source,
        }
        .emit();
        self.logged = Some(now);
        self.samples = 0;
        self.messages = 0;
        self.worst_secs = 0;
        self.worst_source.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_ahead_does_not_move_the_low_watermark() {
        let t = Instant::now();
        let mut s = Sources::new(Duration::from_secs(60), 100);
        for i in 0..10 {
            s.observe("lga", &format!("h{i}"), 1000 + i, t);
        }
        s.observe("ams", "h1", 5000, t);
        assert_eq!(s.low(t), Some((1000, "lga/h0")));
    }

    #[test]
    fn an_idle_source_stops_holding_the_watermark() {
        let t = Instant::now();
        let mut s = Sources::new(Duration::from_secs(60), 100);
        s.observe("lga", "slow", 100, t);
        s.observe("lga", "fast", 900, t + Duration::from_secs(50));
        assert_eq!(s.low(t + Duration::from_secs(59)).map(|l| l.0), Some(100));
        assert_eq!(s.low(t + Duration::from_secs(61)), Some((900, "lga/fast")));
        assert_eq!(s.low(t + Duration::from_secs(200)), None);
    }

    #[test]
    fn the_map_is_bounded_and_forgets_idle_sources_first() {
        let t = Instant::now();
        let mut s = Sources::new(Duration::from_secs(60), 3);
        s.observe("p", "a", 10, t);
        s.observe("p", "b", 20, t);
        s.observe("p", "c", 30, t);
        // Full and none idle: the new source is not tracked.
        s.observe("p", "d", 1, t);
        assert_eq!((s.len(), s.low(t).map(|l| l.0)), (3, Some(10)));
        // Later, a and b idle: they make room.
        let later = t + Duration::from_secs(61);
        s.observe("p", "c", 31, later - Duration::from_secs(2));
        s.observe("p", "e", 40, later);
        assert_eq!(s.len(), 2);
        assert_eq!(s.low(later), Some((31, "p/c")));
    }

    #[test]
    fn late_samples_are_summed_between_log_lines() {
        let t = Instant::now();
        let mut log = LateLog::new(Duration::from_secs(10));
        log.add(3, 40, "lga", "h1", t);
        // Logged at once, then summed until ten seconds have passed.
        assert_eq!((log.messages, log.samples), (0, 0));
        log.add(3, 90, "ams", "h2", t + Duration::from_secs(1));
        log.add(6, 20, "lga", "h1", t + Duration::from_secs(2));
        log.maybe_log(t + Duration::from_secs(9));
        assert_eq!((log.messages, log.samples), (2, 9));
        assert_eq!((log.worst_secs, log.worst_source.as_str()), (90, "ams/h2"));
        log.maybe_log(t + Duration::from_secs(10));
        assert_eq!((log.messages, log.samples, log.worst_secs), (0, 0, 0));
    }

    #[test]
    fn pop_and_host_do_not_run_together() {
        assert_ne!(source_id("ab", "c"), source_id("a", "bc"));
    }

    #[test]
    fn future_times_beyond_the_bound_are_refused_with_how_far() {
        assert!(check_future(1300, 1000, 300).is_ok());
        assert!(check_future(5, 1000, 0).is_ok());
        let err = check_future(1301, 1000, 300).unwrap_err();
        assert_eq!(err.ahead, 301);
        assert!(err.to_string().contains("301 s ahead"), "{err}");
    }
}
