//! The load generator's library: the report schema, the open-loop schedule, latency histograms
//! that merge across worker processes, /proc sampling, and the scenarios that drive clients.

pub mod client;
pub mod driver;
pub mod latency;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod schedule;
pub mod tickets;
pub mod workers;
