//! The binary's commands that are more than a call into the library. Only
//! `main.rs` declares this module: it is part of the `wagg` binary, not of
//! the library, which is why it may use `anyhow`.

pub(crate) mod demo;
pub(crate) mod module;
pub(crate) mod run;
