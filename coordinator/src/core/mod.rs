//! The pure core: what a run decides, with no sockets, threads or clocks
//! of its own (time comes in as arguments), so unit tests drive it
//! directly. The runtime carries out what it returns.

pub(crate) mod model;
pub(crate) mod privacy;
pub(crate) mod round;
pub(crate) mod secure;
pub mod strategy;
pub(crate) mod training;
