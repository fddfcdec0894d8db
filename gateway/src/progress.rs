//! Live progress bars on stdout (`--progress`): one per batch, showing the round it is in and
//! how many of that round's circuits are done.
//!
//! Log lines go to stderr through [`LogWriter`], which hides the bars while it writes, so that
//! on a terminal neither tears the other.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use proofmesh_proto::v1::{BatchStatus, RoundProgress};

/// Whether bars are drawn, and where.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// `None`: no bars.
    bars: Option<MultiProgress>,
    /// Keep a finished batch's bar on screen (`--once`, which ends with a table anyway); a
    /// long-running gateway clears it so that the screen holds only batches in flight.
    keep_finished: bool,
}

impl Progress {
    /// Bars when stdout is a terminal, or always with `force` (then drawn with plain ANSI
    /// escapes whatever stdout is).
    pub(crate) fn new(force: bool, keep_finished: bool) -> Progress {
        let target = if force && !io::stdout().is_terminal() {
            Some(ProgressDrawTarget::term_like_with_hz(Box::new(AnsiStdout), 4))
        } else if io::stdout().is_terminal() {
            Some(ProgressDrawTarget::stdout())
        } else {
            None
        };
        Progress { bars: target.map(MultiProgress::with_draw_target), keep_finished }
    }

    /// No bars at all.
    #[cfg(test)]
    pub(crate) fn off() -> Progress {
        Progress { bars: None, keep_finished: false }
    }

    /// The writer log lines should go through.
    pub(crate) fn log_writer(&self) -> LogWriter {
        LogWriter { bars: self.bars.clone() }
    }

    /// A new bar for a batch (nothing if bars are off).
    pub(crate) fn batch(&self, file: &str, batch_number: u32) -> BatchBar {
        let bar = self.bars.as_ref().map(|bars| {
            let style = ProgressStyle::with_template("{prefix} {msg:<16} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("the template is valid")
                .progress_chars("=> ");
            let bar = bars.add(ProgressBar::new(0).with_style(style));
            bar.set_prefix(format!("batch {batch_number} ({file})"));
            bar.set_message("submitted");
            bar.enable_steady_tick(Duration::from_secs(1));
            bar
        });
        BatchBar { bar, keep_finished: self.keep_finished }
    }
}

/// One batch's bar.
#[derive(Debug)]
pub(crate) struct BatchBar {
    bar: Option<ProgressBar>,
    keep_finished: bool,
}

impl BatchBar {
    /// Shows the round the batch is in, and done/total circuits of it.
    pub(crate) fn update(&self, status: &BatchStatus) {
        let Some(bar) = &self.bar else { return };
        match current_round(&status.rounds) {
            Some(round) => {
                bar.set_message(round.name.clone());
                bar.set_length(round.total.into());
                bar.set_position(round.succeeded.into());
            }
            None => bar.set_message("queued"),
        }
    }

    /// The batch ended: `word` replaces the round name.
    pub(crate) fn finish(&self, word: &str) {
        let Some(bar) = &self.bar else { return };
        if self.keep_finished {
            bar.finish_with_message(word.to_string());
        } else {
            bar.finish_and_clear();
        }
    }
}

/// The round a batch is in: the first (in round order) whose circuits are not all done; when all
/// are, the last that has circuits (a round the scheduler lists before planning its circuits has
/// none yet).
fn current_round(rounds: &[RoundProgress]) -> Option<&RoundProgress> {
    let mut ordered: Vec<&RoundProgress> = rounds.iter().collect();
    ordered.sort_by_key(|r| r.aggregation_round);
    ordered
        .iter()
        .find(|r| r.succeeded < r.total)
        .or_else(|| ordered.iter().rev().find(|r| r.total > 0))
        .or(ordered.last())
        .copied()
}

/// Writes log lines to stderr, hiding the progress bars meanwhile. The fmt layer formats each
/// event into one buffer and writes it whole, so one event is one suspension.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    bars: Option<MultiProgress>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine { bars: self.bars.clone() }
    }
}

/// The writer of one log event (see [`LogWriter`]).
#[derive(Debug)]
pub(crate) struct LogLine {
    bars: Option<MultiProgress>,
}

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.bars {
            Some(bars) => bars.suspend(|| io::stderr().write_all(buf)).map(|()| buf.len()),
            None => io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// stdout driven with ANSI escapes whatever it is: what `--progress` draws to when stdout is not
/// a terminal (indicatif's own stdout target hides itself there).
#[derive(Debug)]
struct AnsiStdout;

impl AnsiStdout {
    fn put(&self, s: &str) -> io::Result<()> {
        io::stdout().lock().write_all(s.as_bytes())
    }

    /// Moves the cursor `n` cells with the CSI command `dir` (`A` up, `B` down, `C` right, `D` left).
    fn cursor(&self, n: usize, dir: char) -> io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.put(&format!("\x1b[{n}{dir}"))
        }
    }
}

impl TermLike for AnsiStdout {
    fn width(&self) -> u16 {
        std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100)
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
        self.put(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> io::Result<()> {
        io::stdout().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(r: u32, name: &str, total: u32, succeeded: u32) -> RoundProgress {
        RoundProgress { aggregation_round: r, name: name.into(), total, succeeded, ..Default::default() }
    }

    #[test]
    fn current_round_is_the_first_unfinished_one() {
        let rounds = [round(1, "leaf", 4, 1), round(0, "basic", 16, 16), round(2, "node", 0, 0)];
        assert_eq!(current_round(&rounds).unwrap().name, "leaf");
        let done = [round(0, "basic", 2, 2), round(5, "compression", 1, 1)];
        assert_eq!(current_round(&done).unwrap().name, "compression");
        let unplanned = [round(0, "basic", 2, 2), round(1, "leaf", 0, 0)];
        assert_eq!(current_round(&unplanned).unwrap().name, "basic");
        assert!(current_round(&[]).is_none());
    }
}
