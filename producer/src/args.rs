//! Flags shared by several commands: the store URL and the broker connection (URL, queue
//! prefix, delivery limit), so every command spells them, and their env variables, the same way.

use clap::Args;
use ferry::queue::Topology;
use ferry::queue::topology;

#[derive(Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "FERRY_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    /// Prefix of the exchange and queue names.
    #[arg(long, env = "FERRY_QUEUE_PREFIX", default_value = topology::DEFAULT_PREFIX)]
    pub queue_prefix: String,
    /// Work-queue delivery limit (must match the workers').
    #[arg(long, env = "FERRY_DELIVERY_LIMIT", default_value_t = topology::DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: i64,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology { prefix: self.queue_prefix.clone(), delivery_limit: self.delivery_limit }
    }
}

#[derive(Args)]
pub struct StoreArg {
    /// Store URL: sqlite:PATH or postgres://...
    #[arg(long, env = "FERRY_STORE", default_value = "sqlite:./ferry.db")]
    pub store: String,
}
