//! wagg's end-to-end tests: one binary, a module per feature. Run
//! `bash tests/setup.sh` first on a fresh machine.

mod admin;
mod amqp;
mod harness;
mod pipeline;
mod rollout;
mod sink;
mod traffic;
