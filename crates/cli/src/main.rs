//! `mcow`: the command-line front end, shaped like `qemu-img`.
//!
//! Owns: argument parsing (clap derive), turning engine errors into messages with context
//! (`anyhow`), exit codes, progress bars and human/JSON output. Does not own: anything about
//! the on-disk format or the read/write path (crates `mcow-format` and `mcow-engine`), nor the
//! NBD protocol (crate `mcow-nbd`; `serve` only adapts a disk to it).
//!
//! Exit codes: 0 success; 1 failure (including bad usage, as `qemu-img` does); `check` also
//! uses 2 (corruption found) and 3 (only leftovers of a crash found).

mod commands;
mod ctl;
mod output;
mod paths;
mod progress;
mod qcow2;
mod qemu;
mod serve;
mod size;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::commands::{
    check, create, demo, docs, export, gc, import, info, map, merge, readwrite::ReadArgs,
    readwrite::WriteArgs, transfer,
};

/// Global flags shared by every verb.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Global {
    /// Show progress on stderr even when it is not a terminal (on a terminal, import, export,
    /// seal, commit, flatten, check, push and pull show a progress bar anyway).
    #[arg(short = 'p', long, global = true)]
    pub progress: bool,
    /// Never show progress.
    #[arg(short = 'q', long, global = true, conflicts_with = "progress")]
    pub quiet: bool,
}

#[derive(Debug, Parser)]
#[command(
    name = "mcow",
    version,
    about = "Layered copy-on-write virtual disks with depth-independent addressing",
    long_about = "Layered copy-on-write virtual disks with depth-independent addressing.\n\n\
        A disk is a directory holding disk.json (its manifest) and its writable top. Sealed, \
        read-only layers live in a layer store directory (blobs/sha256/<hex>) that many disks \
        can share. Reads cost the same whatever the number of layers: at open, the layers are \
        flattened into one map.\n\n\
        Logging goes to stderr and is controlled by RUST_LOG (default: warn).",
    after_help = "Run `mcow demo` to build a small layered disk and see `info` and `map` of it."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    /// Reach the registry HOST[:PORT] of `oci://` references over plain HTTP, not HTTPS (by
    /// default only loopback hosts are): for a registry inside a private network that serves no
    /// TLS, as container runtimes' "insecure registries". Repeatable; without a port, every port
    /// of HOST. MCOW_INSECURE_REGISTRIES adds a comma-separated list of the same.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", global = true)]
    insecure_registry: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Create(create::CreateArgs),
    Info(info::InfoArgs),
    Map(map::MapArgs),
    Check(check::CheckArgs),
    Seal(merge::SealArgs),
    Commit(merge::CommitArgs),
    Flatten(merge::FlattenArgs),
    Import(import::ImportArgs),
    Export(export::ExportArgs),
    Push(transfer::PushArgs),
    Pull(transfer::PullArgs),
    Read(ReadArgs),
    Write(WriteArgs),
    Demo(demo::DemoArgs),
    Serve(serve::ServeArgs),
    Trace(serve::TraceArgs),
    Completions(docs::CompletionsArgs),
    Man(docs::ManArgs),
    Ctl(ctl::CtlArgs),
    Gc(gc::GcArgs),
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The error and its causes, `: `-separated, skipping a cause whose text the message before it
/// already ends with (engine I/O errors print their source and also return it as the cause).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Raises the soft open-file limit to the hard limit: a deep stack keeps a file open per layer
/// (up to the engine's pool size, which `EngineConfig::default` takes from the soft limit read
/// after this), and serving several disks multiplies that. Failure leaves the limit as it was.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// The registries to reach over plain HTTP: `--insecure-registry` and MCOW_INSECURE_REGISTRIES.
fn insecure_registries(flags: &[String]) -> anyhow::Result<mcow_remote::InsecureRegistries> {
    use anyhow::Context;
    let mut insecure = mcow_remote::InsecureRegistries::default();
    if let Ok(list) = std::env::var("MCOW_INSECURE_REGISTRIES") {
        insecure.add_list(&list).context("MCOW_INSECURE_REGISTRIES")?;
    }
    for f in flags {
        insecure.add(f).context("--insecure-registry")?;
    }
    Ok(insecure)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are successes; any usage error is exit 1, like qemu-img (2 and 3
            // mean something to `check`).
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    init_logging();
    raise_open_file_limit();
    match insecure_registries(&cli.insecure_registry) {
        Ok(insecure) => paths::set_insecure_registries(insecure),
        Err(e) => {
            eprintln!("mcow: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    }
    let g = cli.global;
    let result = match cli.command {
        Command::Create(a) => create::run(a, g),
        Command::Info(a) => info::run(a, g),
        Command::Map(a) => map::run(a, g),
        Command::Check(a) => check::run(a, g),
        Command::Seal(a) => merge::run_seal(a, g),
        Command::Commit(a) => merge::run_commit(a, g),
        Command::Flatten(a) => merge::run_flatten(a, g),
        Command::Import(a) => import::run(a, g),
        Command::Export(a) => export::run(a, g),
        Command::Push(a) => transfer::run_push(a, g),
        Command::Pull(a) => transfer::run_pull(a, g),
        Command::Read(a) => commands::readwrite::run_read(a, g),
        Command::Write(a) => commands::readwrite::run_write(a, g),
        Command::Demo(a) => demo::run(a, g),
        Command::Gc(a) => gc::run(a, g),
        Command::Serve(a) => serve::run(&a).map(|()| ExitCode::SUCCESS),
        Command::Trace(a) => serve::run_traced(&a.serve, Some(&a.out)).map(|()| ExitCode::SUCCESS),
        Command::Completions(a) => docs::run_completions(a, Cli::command()),
        Command::Man(a) => docs::run_man(a, Cli::command()),
        Command::Ctl(a) => ctl::run(a),
    };
    match result {
        Ok(code) => code,
        // The reader of stdout wanted no more (`mcow map d | head -1`): not a failure.
        Err(e) if output::closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("mcow: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}
