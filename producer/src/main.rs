//! `ferry-producer`: everything before and around a campaign: generating and importing v1
//! data, the census, enqueueing jobs, status, dead-letter triage and verification. Thin: parse
//! flags and env, set up logging, call the library, report. One module per command family;
//! this file holds the command tree and the dispatch.

mod args;
mod console;
mod definitions;
mod dlq;
mod enqueue;
mod exit;
mod scan;
mod seed;
mod status;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::telemetry::{LogFormat, init_tracing};

#[derive(Parser)]
#[command(
    name = "ferry-producer",
    version,
    propagate_version = true,
    about = "Plan, enqueue and triage ferry campaigns",
    after_help = exit::AFTER_HELP
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a realistic synthetic v1 keyspace of real SQLite databases.
    Seed(seed::SeedArgs),
    /// Load real SQLite files (and their sidecars) from a directory into the v1 layout.
    Import(seed::ImportArgs),
    /// Census of the keyspace before a campaign: sizes and predicted outcomes (no broker).
    Scan(scan::ScanArgs),
    /// Publish one job per actor for a campaign (resumable).
    Enqueue(enqueue::EnqueueArgs),
    /// Queue depths, outcome counts, rate and ETA of a campaign.
    Status(status::StatusArgs),
    /// Dead-letter triage: summary, list, show, requeue with a recovery, export, purge.
    Dlq(dlq::DlqArgs),
    /// Rebuild migrated actors from v2 and compare with v1 and the migration's checksum.
    Verify(verify::VerifyArgs),
    /// Serve the web console: campaigns, dead letters, requeue, purge and verify.
    Console(console::ConsoleArgs),
    /// Print the RabbitMQ definitions (topology, worker user and permissions) for deploy/.
    Definitions(definitions::DefinitionsArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    // As clap's own `parse`, with the codes spelled in exit.rs: help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Seed(args) => seed::seed_cmd(args).await,
        Command::Import(args) => seed::import_cmd(args).await,
        Command::Scan(args) => scan::scan_cmd(args).await,
        Command::Enqueue(args) => enqueue::enqueue_cmd(args).await,
        Command::Status(args) => status::status_cmd(args).await,
        Command::Dlq(args) => dlq::dlq_cmd(args).await,
        Command::Verify(args) => verify::verify_cmd(args).await,
        Command::Console(args) => console::console_cmd(args).await,
        Command::Definitions(args) => definitions::definitions_cmd(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-producer: {e:#}");
            ExitCode::from(exit::of_error(&e))
        }
    }
}

#[cfg(test)]
#[path = "../../tests/src/cli_check.rs"]
mod ferry_cli_check;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{Cli, ferry_cli_check};

    #[test]
    fn the_walk_reaches_every_subcommand() {
        // 9 commands and 6 dlq subcommands, each with flags: far more than the root's one.
        assert!(ferry_cli_check::count(&Cli::command()) > 60, "{}", ferry_cli_check::count(&Cli::command()));
    }

    #[test]
    fn every_flag_reads_an_env_variable_and_has_help() {
        let missing = ferry_cli_check::missing_env_or_help(&Cli::command());
        assert!(missing.is_empty(), "args without an env variable or help: {missing:#?}");
    }

    #[test]
    fn secret_bearing_flags_never_print_their_env_values() {
        let shown = ferry_cli_check::secret_env_values_shown(&Cli::command());
        assert!(shown.is_empty(), "secret flags whose env value --help would print: {shown:?}");
    }

    #[test]
    fn the_command_tree_is_valid() {
        Cli::command().debug_assert();
    }
}
