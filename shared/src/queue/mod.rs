//! The fleet on RabbitMQ: the topology, AMQP plumbing, the worker's consumer loop, the
//! producer's enqueue, campaign status, and the dead-letter queue as triage reads it.

pub mod amqp;
pub mod enqueue;
pub mod status;
pub mod topology;
pub mod worker;

pub use self::topology::Topology;
pub use self::worker::{WorkerConfig, run_worker};
