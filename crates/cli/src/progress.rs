//! Progress reporting on stderr, like `qemu-img -p`: an indicatif bar when stderr is a
//! terminal, plain percentage lines when `-p` asks for progress on a non-terminal, nothing with
//! `-q` or when neither applies.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::Global;

/// One progress display for one operation. Feed it `(done, total)` byte counts.
pub struct Progress {
    mode: Mode,
}

enum Mode {
    Hidden,
    Bar(ProgressBar),
    /// Percentage lines, printed every 10 %.
    Lines {
        label: String,
        last: Option<u64>,
    },
}

impl Progress {
    /// A progress display labelled `label` (e.g. "importing").
    pub fn new(g: Global, label: &str) -> Progress {
        let mode = if !Self::shown(g) {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} ({percent}%) {bytes_per_sec} eta {eta}",
            )
            .expect("progress template is valid")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            Mode::Bar(bar)
        } else {
            Mode::Lines { label: label.to_string(), last: None }
        };
        Progress { mode }
    }

    /// Whether progress is shown at all (used to pass `-p` on to `qemu-img`).
    pub fn shown(g: Global) -> bool {
        !g.quiet && (g.progress || std::io::stderr().is_terminal())
    }

    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Mode::Lines { label, last } => {
                let pct = if total == 0 { 100 } else { (u128::from(done) * 100 / u128::from(total)) as u64 };
                let step = pct / 10 * 10;
                if *last != Some(step) {
                    *last = Some(step);
                    let _ = writeln!(std::io::stderr(), "{label}: {step}%");
                }
            }
        }
    }

    /// Clears the bar (or prints the final 100 % line).
    pub fn finish(&mut self) {
        match &mut self.mode {
            Mode::Hidden => {}
            Mode::Bar(bar) => bar.finish_and_clear(),
            Mode::Lines { last, .. } => {
                if *last != Some(100) {
                    self.update(1, 1);
                }
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
    }
}
