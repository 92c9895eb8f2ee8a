//! One module per `datapath-agent` verb.
pub mod cleanup;
pub mod inspect;
pub mod monitor;
pub mod run;
pub mod status;
