//! One module per verb (`merge` holds seal, commit and flatten; `readwrite` holds read and
//! write; `transfer` holds push and pull). Each has a clap `Args` struct, whose doc comments are
//! the verb's help, and a `run`.

pub mod check;
pub mod create;
pub mod demo;
pub mod export;
pub mod import;
pub mod info;
pub mod map;
pub mod merge;
pub mod readwrite;
pub mod transfer;
