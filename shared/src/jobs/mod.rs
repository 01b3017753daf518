//! Jobs: the message format, the dead-letter record, and the runner that takes one job to its
//! disposition.

pub mod dead;
pub mod gate;
pub mod message;
pub mod run;

pub use self::dead::DeadLetter;
pub use self::gate::CampaignGate;
pub use self::message::{BadMessage, Job};
pub use self::run::{Disposition, JobRunner, RetryPolicy, Superseded};
