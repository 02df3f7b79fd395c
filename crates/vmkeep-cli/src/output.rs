//! Output helpers: logging, progress bars on a terminal, one-line errors, exit codes,
//! and a quiet exit when stdout is a closed pipe.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmkeep::progress::{Progress, Task};
use vmkeep::{Error, ErrorKind};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_DAMAGE: i32 = 3;

pub fn init_logging(quiet: bool, verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("vmkeep={default},vmkeep_cli={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

/// The exit status for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    match e.downcast_ref::<Error>().map(Error::kind) {
        Some(ErrorKind::Usage) => EXIT_USAGE,
        Some(ErrorKind::Damage) => EXIT_DAMAGE,
        _ => EXIT_FAILURE,
    }
}

/// One line on stderr for an error: its contexts and causes joined by ": ", each cause
/// only when the text so far does not already say it.
pub fn error_line(e: &anyhow::Error) {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    let msg = msg.replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "vmkeep: error: {msg}");
}

/// Print a line on stdout; a closed pipe ends the program quietly.
pub fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{}", line.as_ref()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_OK);
        }
    }
}

/// Print a value as pretty JSON on stdout.
pub fn json<T: serde::Serialize>(value: &T) {
    say(serde_json::to_string_pretty(value).expect("serializable"));
}

/// Sizes for people: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Progress: bars on a terminal, warnings on stderr unless quiet.
pub struct CliProgress {
    bars: Option<MultiProgress>,
    quiet: bool,
}

impl CliProgress {
    pub fn new(quiet: bool, json: bool) -> CliProgress {
        let show = !quiet && !json && std::io::stderr().is_terminal();
        CliProgress {
            bars: show.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            quiet,
        }
    }
}

struct BarTask(ProgressBar);

impl Task for BarTask {
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for CliProgress {
    fn task(&self, label: &str, total: u64) -> Box<dyn Task> {
        match &self.bars {
            Some(m) => {
                let bar = m.add(ProgressBar::new(total));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(label.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                Box::new(BarTask(bar))
            }
            None => Box::new(vmkeep::progress::NoTask),
        }
    }

    fn warn(&self, msg: &str) {
        if self.quiet {
            return;
        }
        let line = format!("vmkeep: warning: {msg}");
        match &self.bars {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}
