//! The fleet on RabbitMQ: the topology, AMQP plumbing, the worker's consumer loop and its
//! dead-letter inbox, the producer's enqueue, and campaign status.

pub mod amqp;
pub mod dead_inbox;
pub mod enqueue;
pub mod status;
pub mod topology;
pub mod worker;

pub use self::topology::Topology;
pub use self::worker::{WorkerConfig, run_worker};
