//! Production traffic, reproduced: generate it, record it, replay it, and
//! benchmark modules on it offline.
//!
//! - [`loadgen`]: generated messages (the [`Generator`](crate::source::generator::Generator):
//!   Zipf-skewed customers, zones, records; series churn) published to
//!   RabbitMQ at a rate held by a [`ratelimit::TokenBucket`], with the totals
//!   a sink should end up with;
//! - [`record`]: a queue of its own bound to the production exchange, its
//!   messages written with their arrival offsets to a [`recording`] file;
//! - [`replay`]: a recording published again at its pace, a multiple, or a
//!   fixed rate;
//! - [`bench`]: modules run on a recording or generated workload through
//!   the real decoder, router, dictionary and runtime; the talk's table;
//! - [`putval`]: the same messages as collectd `PUTVAL` commands, one
//!   metric each (`loadgen --format putval`), to feed collectd the same
//!   workload;
//! - [`cli`]: the `wagg loadgen|record|replay|bench` commands.

pub mod bench;
pub mod cli;
pub mod loadgen;
pub mod progress;
mod publish;
pub mod putval;
pub mod ratelimit;
pub mod record;
pub mod recording;
pub mod replay;

use std::path::PathBuf;

pub use cli::{BenchArgs, LoadgenArgs, RecordArgs, ReplayArgs};
pub use publish::{PublishCounts, Target};

use crate::source::amqp::SourceError;

/// What can go wrong in the traffic tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrafficError {
    /// Flags or configuration that cannot work.
    #[error("{0}")]
    Config(String),
    /// The exchange to publish to or record from does not exist (or the
    /// broker refused to say).
    #[error(
        "exchange {exchange:?} does not exist on the broker (start `wagg run`, which declares it, or check --exchange / [source.amqp] exchange)"
    )]
    MissingExchange {
        /// The exchange.
        exchange: String,
        /// The broker's answer.
        #[source]
        source: lapin::Error,
    },
    /// RabbitMQ: connecting, publishing, a nack, an unroutable message (no
    /// queue bound for the routing key).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A generated metric that collectd's command format cannot carry.
    #[error(transparent)]
    Putval(#[from] putval::PutvalError),
    /// The publisher's confirm task ended without saying why.
    #[error("the publisher stopped unexpectedly")]
    PublisherStopped,
    /// A recording could not be read or written.
    #[error(transparent)]
    Recording(#[from] recording::RecordingError),
    /// A module name that is neither a built-in nor a readable file.
    #[error("`{name}` is neither a built-in module ({builtins}) nor a readable file: {reason}")]
    UnknownModule {
        /// The name given.
        name: String,
        /// The built-ins there are.
        builtins: String,
        /// Why the file could not be read.
        reason: String,
    },
    /// The runtime refused a module.
    #[error("module `{name}` is refused: {reason}")]
    ModuleRefused {
        /// The name given.
        name: String,
        /// The runtime's reason.
        reason: String,
    },
    /// A saved bench result that cannot be used as a baseline.
    #[error("{} is not a usable bench result: {reason}", path.display())]
    BadBaseline {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Figures regressed against the baseline.
    #[error("{0} figure(s) regressed against the baseline")]
    Regressed(usize),
    /// Any other I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) use crate::source::amqp::redact;

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_the_password() {
        assert_eq!(
            super::redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(super::redact("amqp://h:5672"), "amqp://h:5672");
    }
}
