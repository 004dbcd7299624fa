//! The command line's own code that tests and the binary share: the built-in
//! client and its verbs, operator tables, the demo, the benchmarks, the
//! health probe and how a summary reads at a terminal. `main.rs` parses the
//! arguments and calls these.

pub mod admin;
pub mod bench;
pub mod client;
pub mod continuity;
pub mod demo;
pub mod handover;
pub mod health;
pub mod mllp;
pub mod readable;
pub mod store_move;

/// A write to standard output that failed.
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct StdoutError(#[source] pub std::io::Error);

impl StdoutError {
    /// Whether the reader went away (`| head` took what it wanted).
    #[must_use]
    pub fn reader_gone(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Standard output for code that writes to any [`std::io::Write`] (the
/// demo): a failed write comes back as an `io::Error` carrying a
/// [`StdoutError`], so `main` can tell a reader that went away from the
/// demo's other failures.
pub struct Stdout;

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout()
            .write(buf)
            .map_err(|e| std::io::Error::new(e.kind(), StdoutError(e)))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout()
            .flush()
            .map_err(|e| std::io::Error::new(e.kind(), StdoutError(e)))
    }
}

/// `println!` that hands back the write's error instead of panicking: a
/// reader that stopped early (`| head`) then ends the command quietly (see
/// `main`), not with a panic and exit 101.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::StdoutError)
    }};
}

/// `print!` that hands back the write's error, as [`outln!`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::StdoutError)
    }};
}
