//! Logging for every rank: `tracing` with a `[rank r]` prefix, level from `RUST_LOG` (default info).
//!
//! Only rank 0 prints progress (`is_progress_rank`), and progress bars are drawn only when stderr
//! reaches a terminal, directly or through the launcher (`progress_bars_enabled`), so batch-job
//! logs stay one line per event.
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, TermLike};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The global rank from torchrun's environment (`RANK`), or 0 when run alone.
pub fn env_rank() -> usize {
    std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Whether this process prints progress (rank 0 only).
pub fn is_progress_rank() -> bool {
    env_rank() == 0
}

/// Progress bars only on rank 0 and only when its stderr reaches a terminal: its own, or the
/// launcher's, which relays it unchanged and says so (`STDERR_TERMINAL_VAR`, torchrun's ranks
/// simply inherit the terminal).
pub fn progress_bars_enabled() -> bool {
    is_progress_rank() && (std::io::stderr().is_terminal() || relayed_terminal_columns().is_some())
}

/// The launcher's terminal width when it relays this process's stderr to that terminal.
fn relayed_terminal_columns() -> Option<u16> {
    std::env::var(launcher::env::STDERR_TERMINAL_VAR)
        .ok()?
        .parse()
        .ok()
        .filter(|&c| c > 0)
}

/// Where progress bars draw: stderr when it is a terminal; through the launcher's relay when
/// that ends at one (indicatif hides bars on a pipe); hidden otherwise.
pub fn progress_draw_target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        return ProgressDrawTarget::stderr();
    }
    match relayed_terminal_columns() {
        Some(columns) => ProgressDrawTarget::term_like_with_hz(
            Box::new(RelayedTerm {
                columns,
                out: Mutex::new(Box::new(std::io::stderr())),
            }),
            4,
        ),
        None => ProgressDrawTarget::hidden(),
    }
}

/// A terminal at the far end of a pipe (the launcher copies the bytes to its own terminal): the
/// cursor moves are ANSI sequences, and every draw ends with '\r' (the launcher relays output
/// in pieces ending at '\r' or '\n', so the bar shows when drawn and stays out of the failure
/// report's tail of stderr lines).
struct RelayedTerm {
    columns: u16,
    out: Mutex<Box<dyn Write + Send>>,
}

impl fmt::Debug for RelayedTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayedTerm({} columns)", self.columns)
    }
}

impl RelayedTerm {
    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(bytes)
    }

    fn cursor(&self, n: usize, code: char) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(format!("\x1b[{n}{code}").as_bytes())
    }
}

impl TermLike for RelayedTerm {
    fn width(&self) -> u16 {
        self.columns
    }
    fn move_cursor_up(&self, n: usize) -> io::Result<()> {
        self.cursor(n, 'A')
    }
    fn move_cursor_down(&self, n: usize) -> io::Result<()> {
        self.cursor(n, 'B')
    }
    fn move_cursor_right(&self, n: usize) -> io::Result<()> {
        self.cursor(n, 'C')
    }
    fn move_cursor_left(&self, n: usize) -> io::Result<()> {
        self.cursor(n, 'D')
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write(format!("{s}\n").as_bytes())
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.write(s.as_bytes())
    }
    fn clear_line(&self) -> io::Result<()> {
        self.write(b"\r\x1b[2K")
    }
    fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(b"\r")?;
        out.flush()
    }
}

/// Prefixes every event with `[rank r]` when the process runs under a launcher (WORLD_SIZE set)
/// that does not prefix the lines itself.
struct RankPrefix {
    prefix: Option<String>,
    inner: Format<Full>,
}

impl<S, N> FormatEvent<S, N> for RankPrefix
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some(prefix) = &self.prefix {
            write!(writer, "{prefix} ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// The progress bar being drawn, if any: log lines clear it, print, and redraw it.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Registers the bar every later log line must keep clear of (None when it is done).
pub fn set_active_bar(bar: Option<ProgressBar>) {
    *ACTIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// stderr for log events: with a progress bar active, each event (one `write` per formatted
/// event) is printed with the bar suspended, from whichever thread logs (a log line written
/// under a bar is otherwise erased by the bar's next redraw).
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = ACTIVE_BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) if !bar.is_finished() => bar.suspend(|| io::stderr().write_all(buf))?,
            _ => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `[rank r]` under a launcher (WORLD_SIZE set), unless it prefixes this rank's lines itself
/// (--tee): what log lines, and the final error's, start with.
pub fn rank_prefix() -> Option<String> {
    let prefixed = std::env::var_os(launcher::env::PREFIXED_STDERR_VAR).is_some();
    std::env::var_os("WORLD_SIZE")
        .filter(|_| !prefixed)
        .map(|_| format!("[rank {}]", env_rank()))
}

/// A panic's message (its payload as text), for errors and the error file.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// Installs the global subscriber (stderr). Safe to call twice: the second call does nothing.
pub fn init() {
    let prefix = rank_prefix();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = RankPrefix {
        prefix,
        inner: Format::default().with_target(false),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(DefaultFields::new())
        // (its report of a failed write is an eprintln!, which panics on a broken stderr; set
        // before event_format, which keeps it)
        .log_internal_errors(false)
        .event_format(format)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn relayed_bar_draws_end_with_carriage_return() {
        let buf = Shared::default();
        let term = RelayedTerm {
            columns: 100,
            out: Mutex::new(Box::new(buf.clone())),
        };
        term.clear_line().unwrap();
        term.write_str("[00:00:01] ### 3/10").unwrap();
        term.flush().unwrap();
        term.move_cursor_up(0).unwrap(); // no-op
        term.move_cursor_up(2).unwrap();
        term.write_line("done").unwrap();
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "\r\x1b[2K[00:00:01] ### 3/10\r\x1b[2Adone\n");
        assert_eq!(term.width(), 100);
        // a real bar drawn to it: every draw ends with '\r', the last one with the final state
        let buf = Shared::default();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(10),
            ProgressDrawTarget::term_like(Box::new(RelayedTerm {
                columns: 80,
                out: Mutex::new(Box::new(buf.clone())),
            })),
        );
        bar.inc(3);
        bar.finish();
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.ends_with('\r') && out.contains("10/10"), "{out:?}");
    }
}
