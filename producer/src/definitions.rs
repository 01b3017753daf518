//! `definitions`: print the RabbitMQ definitions (topology, users and permissions) that
//! deploy/ ships, generated from the same `Topology` the binaries declare, so they cannot drift.
//! No user gets a usable password unless its hash is given: a shipped file logs nobody in.

use clap::Args;
use ferry::queue::topology;

use crate::args::TopologyArgs;

#[derive(Args)]
pub struct DefinitionsArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Virtual host.
    #[arg(long, env = "FERRY_VHOST", default_value = "/")]
    pub vhost: String,
    /// Password hash (`rabbitmqctl hash_password`) of the ferry-worker user; empty: no
    /// password, the user cannot log in until `rabbitmqctl change_password`.
    #[arg(long, env = "FERRY_WORKER_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    pub worker_password_hash: String,
    /// Password hash of the ferry-operator user (producer, triage that moves); empty: none.
    #[arg(long, env = "FERRY_OPERATOR_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    pub operator_password_hash: String,
    /// Password hash of the read-only ferry-triage user; empty: none.
    #[arg(long, env = "FERRY_TRIAGE_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    pub triage_password_hash: String,
    /// Password hash of the ferry-monitor user (KEDA, management API); empty: none.
    #[arg(long, env = "FERRY_MONITOR_PASSWORD_HASH", default_value = "", hide_env_values = true)]
    pub monitor_password_hash: String,
}

pub fn definitions_cmd(args: DefinitionsArgs) -> anyhow::Result<std::process::ExitCode> {
    let hashes = topology::PasswordHashes {
        worker: args.worker_password_hash,
        operator: args.operator_password_hash,
        triage: args.triage_password_hash,
        monitor: args.monitor_password_hash,
    };
    let defs = args.topology.topology()?.deploy_definitions(&args.vhost, &hashes);
    println!("{}", serde_json::to_string_pretty(&defs)?);
    Ok(std::process::ExitCode::SUCCESS)
}
