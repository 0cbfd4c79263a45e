//! Logging for every rank: `tracing` with a `[rank r]` prefix, level from `RUST_LOG` (default info).
//!
//! Only rank 0 prints progress (`is_progress_rank`), and progress bars are drawn only when stderr is a
//! terminal (`progress_bars_enabled`), so batch-job logs stay one line per event.
use std::fmt;
use std::io::IsTerminal;

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

/// Progress bars only on rank 0 and only when stderr is a terminal.
pub fn progress_bars_enabled() -> bool {
    is_progress_rank() && std::io::stderr().is_terminal()
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

/// Installs the global subscriber (stderr). Safe to call twice: the second call does nothing.
pub fn init() {
    // under the launcher, unless it already prefixes this rank's lines (--tee)
    let prefixed = std::env::var_os(launcher::env::PREFIXED_STDERR_VAR).is_some();
    let prefix = std::env::var_os("WORLD_SIZE")
        .filter(|_| !prefixed)
        .map(|_| format!("[rank {}]", env_rank()));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = RankPrefix {
        prefix,
        inner: Format::default().with_target(false),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(DefaultFields::new())
        .event_format(format)
        .try_init();
}
