//! `definitions`: print the RabbitMQ definitions (topology, worker user and permissions) that
//! deploy/ ships, generated from the same `Topology` the binaries declare, so they cannot drift.

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
    /// rabbit_password_hashing_sha256 hash of the worker user's password.
    #[arg(long, env = "FERRY_WORKER_PASSWORD_HASH", hide_env_values = true, default_value = topology::PLACEHOLDER_PASSWORD_HASH)]
    pub worker_password_hash: String,
}

pub fn definitions_cmd(args: DefinitionsArgs) -> anyhow::Result<std::process::ExitCode> {
    let defs = args.topology.topology()?.deploy_definitions(&args.vhost, &args.worker_password_hash);
    println!("{}", serde_json::to_string_pretty(&defs)?);
    Ok(std::process::ExitCode::SUCCESS)
}
