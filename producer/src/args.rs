//! Flags shared by several commands: the store URL, the broker connection (URL, connect
//! timeout) and the topology (queue prefix, delivery limit), so every command spells them, and
//! their env variables, the same way. Neither the store nor the broker has a default: a
//! command pointed at nothing fails instead of opening `./ferry.db` or a guest broker.
//!
//! The store flags carry the layout too (`--layout`, `FERRY_LAYOUT`): every command that opens a
//! store opens it in the layout it was given, through [`StoreArg::options`].
//!
//! `dlq` has subcommands, and clap refuses required global flags, so its store and broker
//! flags are optional globals checked when used ([`GlobalStoreArg`], [`GlobalBrokerArgs`]);
//! leaf commands use the required forms.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::exit::Usage;
use ferry::layout::Layout;
use ferry::queue::Topology;
use ferry::queue::topology;
use ferry::store::{self, DynStore, OpenMode, OpenOptions};

/// Value parser of `--queue-prefix`: the library's own check, at parse time.
pub fn queue_prefix(s: &str) -> Result<String, String> {
    topology::check_prefix(s).map(|()| s.to_string()).map_err(|e| e.to_string())
}

/// Value parser of a rate: a finite number above zero.
pub fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a number above 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Value parser of a share: a number from 0 to 1.
pub fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(_) => Err("must be between 0 and 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Args, Clone)]
pub struct TopologyArgs {
    /// Prefix of the exchange and queue names (1-64 bytes of [A-Za-z0-9_.-]).
    #[arg(long, env = "FERRY_QUEUE_PREFIX", default_value = topology::DEFAULT_PREFIX, value_parser = queue_prefix, global = true)]
    pub queue_prefix: String,
    /// Work-queue delivery limit (must match the workers').
    #[arg(long, env = "FERRY_DELIVERY_LIMIT", default_value_t = topology::DEFAULT_DELIVERY_LIMIT, value_parser = clap::value_parser!(i64).range(1..=1000), global = true)]
    pub delivery_limit: i64,
}

impl TopologyArgs {
    pub fn topology(&self) -> anyhow::Result<Topology> {
        Topology::checked(&self.queue_prefix, self.delivery_limit).context("topology")
    }
}

#[derive(Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, e.g. amqp://user:password@host:5672/%2f (required: no default broker).
    #[arg(long, env = "FERRY_AMQP_URL", hide_env_values = true)]
    pub amqp: String,
    /// Seconds to wait for the broker's TCP connection and AMQP handshake.
    #[arg(long, env = "FERRY_AMQP_CONNECT_TIMEOUT_SECS", default_value_t = ferry::queue::amqp::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600))]
    pub amqp_connect_timeout_secs: u64,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl BrokerArgs {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp_connect_timeout_secs)
    }
}

/// [`BrokerArgs`] for a command with subcommands: accepted before or after them, and only
/// required where the broker is used.
#[derive(Args)]
pub struct GlobalBrokerArgs {
    /// RabbitMQ URL, e.g. amqp://user:password@host:5672/%2f (required unless --embedded).
    #[arg(long, env = "FERRY_AMQP_URL", hide_env_values = true, global = true)]
    pub amqp: Option<String>,
    /// Seconds to wait for the broker's TCP connection and AMQP handshake.
    #[arg(long, env = "FERRY_AMQP_CONNECT_TIMEOUT_SECS", default_value_t = ferry::queue::amqp::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600), global = true)]
    pub amqp_connect_timeout_secs: u64,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl GlobalBrokerArgs {
    pub fn amqp(&self) -> anyhow::Result<&str> {
        self.amqp
            .as_deref()
            .ok_or_else(|| Usage("no broker: give --amqp or FERRY_AMQP_URL (or --embedded)".into()).into())
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.amqp_connect_timeout_secs)
    }
}

/// The help of `--layout`, spelled once for every command that touches a store.
const LAYOUT_HELP: &str = "Which rows the store holds: ferry (its own keyspace in one kv table) or rivet (a rivet \
                           engine's own universaldb rows, on postgres://...?schema=X; ferry's records in X.ferry_kv)";

#[derive(Args)]
pub struct StoreArg {
    /// Store URL: sqlite:PATH or postgres://... (required: no default store).
    #[arg(long, env = "FERRY_STORE", hide_env_values = true)]
    pub store: String,
    #[arg(long, env = "FERRY_LAYOUT", value_enum, default_value_t = Layout::Ferry, help = LAYOUT_HELP)]
    pub layout: Layout,
}

impl StoreArg {
    /// How to open the store: this command's pool size and mode, in the chosen layout.
    pub fn options(&self, pool_size: usize, mode: OpenMode) -> OpenOptions {
        OpenOptions::new(pool_size, mode).layout(self.layout)
    }

    /// Opens the store, which must exist.
    pub async fn open_existing(&self, pool_size: usize) -> anyhow::Result<DynStore> {
        store::open_with(&self.store, &self.options(pool_size, OpenMode::Existing)).await.context("opening the store")
    }
}

/// [`StoreArg`] for a command with subcommands: accepted before or after them.
#[derive(Args)]
pub struct GlobalStoreArg {
    /// Store URL: sqlite:PATH or postgres://... (required: no default store).
    #[arg(long, env = "FERRY_STORE", hide_env_values = true, global = true)]
    pub store: Option<String>,
    #[arg(long, env = "FERRY_LAYOUT", value_enum, default_value_t = Layout::Ferry, global = true, help = LAYOUT_HELP)]
    pub layout: Layout,
}

impl GlobalStoreArg {
    pub fn url(&self) -> anyhow::Result<&str> {
        self.store.as_deref().ok_or_else(|| Usage("no store: give --store or FERRY_STORE".into()).into())
    }

    /// Opens the store, which must exist.
    pub async fn open_existing(&self, pool_size: usize) -> anyhow::Result<DynStore> {
        let opts = OpenOptions::new(pool_size, OpenMode::Existing).layout(self.layout);
        store::open_with(self.url()?, &opts).await.context("opening the store")
    }
}
