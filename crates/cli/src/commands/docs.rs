//! `mcow completions` and `mcow man`: shell completion scripts and manual pages, generated from
//! the same clap definitions as `--help` (so they cannot drift from it).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::output::stdout;

/// Print a shell completion script.
#[derive(Debug, clap::Args)]
#[command(long_about = "Print the completion script for SHELL on stdout, generated from mcow's own \
    argument definitions. Install it where the shell looks, e.g.:\n  \
    mcow completions bash > /etc/bash_completion.d/mcow\n  \
    mcow completions zsh > /usr/local/share/zsh/site-functions/_mcow\n  \
    mcow completions fish > ~/.config/fish/completions/mcow.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Print or install manual pages.
#[derive(Debug, clap::Args)]
#[command(long_about = "Write mcow's manual pages (roff), generated from the same definitions as \
    --help: without --dir, the page of VERB (or of mcow itself) on stdout, e.g. \
    `mcow man | man -l -`; with --dir DIR, one page per verb (mcow.1, mcow-create.1, \
    mcow-info.1, ...) into DIR, created if missing, e.g.:\n  \
    mcow man --dir /usr/local/share/man/man1 && mandb -q")]
pub struct ManArgs {
    /// Write every page into this directory instead of one page to stdout.
    #[arg(long, value_name = "DIR", conflicts_with = "verb")]
    pub dir: Option<PathBuf>,
    /// The verb whose page to print (default: mcow's own page, which lists the verbs).
    #[arg(value_name = "VERB")]
    pub verb: Option<String>,
}

pub fn run_completions(a: CompletionsArgs, mut cmd: clap::Command) -> Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "mcow", &mut script);
    let mut out = stdout();
    out.write_all(&script).context("writing output")?;
    out.flush().context("writing output")?;
    Ok(ExitCode::SUCCESS)
}

/// The pages: mcow's own, then one per verb (hidden verbs and clap's `help` left out).
fn pages(cmd: clap::Command) -> Vec<clap_mangen::Man> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("mcow {}", env!("CARGO_PKG_VERSION"));
    let mut pages = vec![clap_mangen::Man::new(cmd.clone()).source(source.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push(clap_mangen::Man::new(sub.clone()).source(source.clone()));
    }
    pages
}

pub fn run_man(a: ManArgs, cmd: clap::Command) -> Result<ExitCode> {
    let verbs: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    let pages = pages(cmd);
    match (&a.dir, &a.verb) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for page in &pages {
                let path = page
                    .generate_to(dir)
                    .with_context(|| format!("writing a page into {}", dir.display()))?;
                println!("{}", path.display());
            }
        }
        (None, verb) => {
            let page = match verb {
                None => &pages[0],
                Some(v) => match pages.iter().find(|p| p.get_filename() == format!("mcow-{v}.1")) {
                    Some(p) => p,
                    None => bail!("no verb {v:?}; the verbs are: {}", verbs.join(", ")),
                },
            };
            let mut roff = Vec::new();
            page.render(&mut roff).context("rendering the page")?;
            let mut out = stdout();
            out.write_all(&roff).context("writing output")?;
            out.flush().context("writing output")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
