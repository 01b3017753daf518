//! The producer's exit codes, one meaning each, so scripts can tell "failed" from "did
//! nothing" from "found a problem"; listed in `--help` and the README from [`AFTER_HELP`].

use std::process::ExitCode;

/// The command did what it was asked.
pub const OK: u8 = 0;
/// It failed (store, broker, I/O, bad input): the message says why.
pub const FAILED: u8 = 1;
/// The command line is wrong (clap's usage errors).
pub const USAGE: u8 = 2;
/// `verify` found actors that do not match.
pub const MISMATCH: u8 = 3;
/// Nothing matched, so nothing was done: `dlq show` of an actor with no dead letter, `status`
/// of an unknown campaign, a `dlq requeue` that requeued nothing, a `dlq sweep` that removed
/// nothing, `verify` that selected no actor.
pub const NOTHING: u8 = 4;
/// `import` skipped some files (the rest were imported).
pub const PARTIAL: u8 = 5;
/// Interrupted (SIGINT/SIGTERM) before the end: run again to resume.
pub const INTERRUPTED: u8 = 130;

/// The exit codes, for `--help`.
pub const AFTER_HELP: &str = "\
Exit codes:
  0    done
  1    failed (the message says why)
  2    usage error
  3    verify: some actors do not match
  4    nothing matched, nothing done (dlq show of an actor with no dead letter, status of an
       unknown campaign, a dlq requeue that requeued nothing, a dlq sweep that removed
       nothing, verify that selected no actor)
  5    import: some files were skipped
  130  interrupted: run again to resume";

/// A command line that is wrong in a way clap cannot see (a flag required only by some
/// subcommands, a missing confirmation): reported like clap's own usage errors, exit [`USAGE`].
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// The exit code of a failed command: [`USAGE`] for a [`Usage`] error, else [`FAILED`].
pub fn of_error(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<Usage>().is_some() { USAGE } else { FAILED }
}

/// Says on stderr that nothing matched, and returns [`NOTHING`].
pub fn nothing(why: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry-producer: {why}");
    ExitCode::from(NOTHING)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_in_the_help_once() {
        let codes = [OK, FAILED, USAGE, MISMATCH, NOTHING, PARTIAL, INTERRUPTED];
        for code in codes {
            let listed = AFTER_HELP.lines().filter(|l| l.trim_start().starts_with(&format!("{code} "))).count();
            assert_eq!(listed, 1, "exit code {code} in:\n{AFTER_HELP}");
        }
        let mut sorted = codes.to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len(), "codes are distinct");
    }
}
