//! `wagg replay`: publishes a recording again, at its original pace, a
//! multiple of it, or a fixed rate.

use std::future::poll_fn;
use std::path::Path;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::TrafficError;
use super::progress::Progress;
use super::publish::{Publisher, Target};
use super::ratelimit::TokenBucket;
use super::recording::{RecordingReader, Tail};

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// The recorded arrival offsets divided by `speed` (1 is the original
    /// pace, 10 ten times faster).
    Original {
        /// Speed-up factor, > 0.
        speed: f64,
    },
    /// A fixed number of messages per second, held by a token bucket.
    Rate(f64),
    /// As fast as the broker confirms.
    Unthrottled,
}

/// What `replay` does.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Where to publish.
    pub target: Target,
    /// How fast.
    pub pace: Pace,
    /// Start again from the beginning at the end, until `count`, `duration`
    /// or the stop signal.
    pub repeat: bool,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// What a replay published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplayReport {
    /// Messages published and confirmed.
    pub messages: u64,
    /// Body bytes published.
    pub body_bytes: u64,
    /// Passes over the file begun.
    pub passes: u64,
    /// A torn tail the reader ignored (the same on every pass).
    pub tail: Option<Tail>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Publishes the recording at `path` as `opts` says, until its end (or, with
/// `repeat`, a limit or `stop`). Reports each second to `progress`.
///
/// # Errors
///
/// [`TrafficError::Recording`] for a file that cannot be read or is not a
/// recording; [`TrafficError::Config`] for a bad pace;
/// [`TrafficError::MissingExchange`]; publish failures.
pub async fn replay(
    path: &Path,
    opts: &ReplayOptions,
    progress: &Progress,
    stop: impl Future<Output = ()>,
) -> Result<ReplayReport, TrafficError> {
    let speed = match opts.pace {
        Pace::Original { speed } if !(speed.is_finite() && speed > 0.0) => {
            return Err(TrafficError::Config(format!(
                "--speed must be a positive number, not {speed}"
            )));
        }
        Pace::Rate(r) if !(r.is_finite() && r > 0.0) => {
            return Err(TrafficError::Config(format!(
                "--rate must be a positive number, not {r}"
            )));
        }
        Pace::Original { speed } => Some(speed),
        Pace::Rate(_) | Pace::Unthrottled => None,
    };
    // Open the file before connecting: a bad file is reported first.
    let mut reader = RecordingReader::open(path)?;
    let mut publisher = Publisher::connect(&opts.target, "wagg replay").await?;
    let counts = publisher.counts().clone();
    let started = Instant::now();
    let mut bucket = match opts.pace {
        Pace::Rate(r) => TokenBucket::new(r, r * 0.05, started),
        _ => TokenBucket::new(f64::INFINITY, 1.0, started),
    };
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let mut report = ReplayReport {
        messages: 0,
        body_bytes: 0,
        passes: 1,
        tail: None,
        elapsed: Duration::ZERO,
    };
    let mut last_report = (started, 0u64);
    // Original pace: a record is due at pass_start + (offset - first) / speed.
    let mut pass_start = started;
    let mut first_offset: Option<u64> = None;
    'passes: loop {
        while let Some(record) = reader.next_record()? {
            if opts.count.is_some_and(|c| report.messages >= c)
                || opts.duration.is_some_and(|d| started.elapsed() >= d)
            {
                break 'passes;
            }
            if !stopped {
                stopped = poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx).is_ready())).await;
            }
            if stopped {
                break 'passes;
            }
            let wait = match speed {
                Some(speed) => {
                    let first = *first_offset.get_or_insert(record.offset_micros);
                    let due = pass_start
                        + Duration::from_secs_f64(
                            record.offset_micros.saturating_sub(first) as f64 / 1e6 / speed,
                        );
                    due.saturating_duration_since(Instant::now())
                }
                None => bucket.take(1.0, Instant::now()),
            };
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = &mut stop => break 'passes,
                }
            }
            report.body_bytes += record.body.len() as u64;
            publisher.publish(record.body).await?;
            report.messages += 1;
            if last_report.0.elapsed() >= Duration::from_secs(1) {
                let rate = (report.messages - last_report.1) as f64
                    / last_report.0.elapsed().as_secs_f64();
                last_report = (Instant::now(), report.messages);
                progress.update(
                    reader.position(),
                    &format!(
                        "pass {}, {} messages, {rate:.0} msg/s, {} confirms outstanding",
                        report.passes,
                        report.messages,
                        counts.outstanding()
                    ),
                );
            }
        }
        report.tail = reader.tail();
        if !opts.repeat || reader.records() == 0 {
            break;
        }
        // The next pass starts where this one's last record was due.
        if let (Some(speed), Some(first)) = (speed, first_offset) {
            pass_start += Duration::from_secs_f64(
                reader.last_offset().saturating_sub(first) as f64 / 1e6 / speed,
            );
        }
        reader = RecordingReader::open(path)?;
        report.passes += 1;
    }
    if let Some(tail) = report.tail {
        tracing::warn!(path = %path.display(), dropped_bytes = tail.dropped_bytes, "{tail}");
    }
    publisher.finish().await?;
    report.elapsed = started.elapsed();
    Ok(report)
}
