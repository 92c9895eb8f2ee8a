//! One module per `datapath-agent` verb.
pub mod inspect;
pub mod monitor;
pub mod run;
