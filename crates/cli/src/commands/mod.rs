//! One module per verb (`merge` holds seal, commit and flatten; `readwrite` holds read and
//! write; `transfer` holds push and pull). Each has a clap `Args` struct, whose doc comments are
//! the verb's help, and a `run`. `docs` holds completions and man, generated from the clap
//! definitions.

pub mod check;
pub mod create;
pub mod demo;
pub mod docs;
pub mod export;
pub mod gc;
pub mod import;
pub mod info;
pub mod map;
pub mod merge;
pub mod readwrite;
pub mod transfer;

/// What `info` and `map` take: a disk to look at, read-only, and how to print.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The disk directory.
    pub disk: std::path::PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: crate::output::OutputFormat,
    /// Open even if another process is writing to the disk (what is shown may be stale).
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

impl InspectArgs {
    /// Opens the disk read-only; a lazy disk offline (these verbs need no data, so nothing is
    /// fetched and its origin need not be reachable).
    pub fn open(&self) -> anyhow::Result<mcow_engine::Disk> {
        let opts = mcow_engine::OpenOptions { read_only: true, verify: true, force_share: self.force_share };
        Ok(crate::paths::open_lazy(
            &mcow_engine::Engine::default(),
            &self.disk,
            opts,
            crate::paths::Fetch::Offline,
        )?
        .0)
    }
}
