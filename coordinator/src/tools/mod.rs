//! The subcommands besides `serve`: a local fleet, in-process simulation,
//! the centralized baseline and the development PKI.

pub mod baseline;
pub mod fleet;
pub mod pki;
pub mod simulation;
pub mod speeds;
