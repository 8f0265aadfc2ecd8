//! Progress on stderr: an indicatif bar on a terminal, a plain line per
//! update otherwise (a log file or CI gets lines it can read), nothing when
//! hidden (tests).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar if stderr is a terminal, plain lines if not.
    Auto,
    /// Plain lines on stderr.
    Lines,
    /// Nothing.
    Hidden,
}

/// A progress display for one long run.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    label: String,
}

impl Progress {
    /// A display labelled `label`, with a bar towards `total` when known.
    pub fn new(mode: ProgressMode, label: &str, total: Option<u64>) -> Self {
        let tty = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            ProgressMode::Auto if tty => (Some(bar(label, total)), false),
            ProgressMode::Auto | ProgressMode::Lines => (None, true),
            ProgressMode::Hidden => (None, false),
        };
        Progress {
            bar,
            lines,
            label: label.to_owned(),
        }
    }

    /// A display that shows nothing.
    pub fn hidden() -> Self {
        Self::new(ProgressMode::Hidden, "", None)
    }

    /// Shows `position` (towards the total) and a status `message`.
    pub fn update(&self, position: u64, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(message.to_owned());
        } else if self.lines {
            eprintln!("{}: {message}", self.label);
        }
    }

    /// Prints a line above the bar (or as a line).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }

    /// Removes the bar, leaving the terminal clean for the summary.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn bar(label: &str, total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{prefix} [{elapsed_precise}] {wide_bar} {percent:>3}% {msg}"
    } else {
        "{prefix} [{elapsed_precise}] {spinner} {msg}"
    };
    // The templates are constants; a bad one would be a bug caught by the
    // first run, so fall back to the default style rather than fail.
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
