//! wagg's end-to-end tests: one binary, a module per feature. Run
//! `bash tests/setup.sh` first on a fresh machine.

mod ack_ledger;
mod admin;
mod amqp;
mod bad_input;
mod event_time;
mod fault_proxy;
mod faults;
mod harness;
mod hostile;
mod pipeline;
mod rollout;
mod security;
mod shadow;
mod shard;
mod sink;
mod traffic;
