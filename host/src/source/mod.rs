//! Sources: where metric messages come from, the first stage of
//! `source → router → shard → runtime → sink`.
//!
//! - [`amqp`]: consumes from RabbitMQ with manual acks, reconnects by itself,
//!   dead-letters malformed messages; also a publisher for tests and tooling.
//! - [`json`]: the message format.

pub mod amqp;
pub mod generator;
pub mod json;
