//! The eBPF crate's library target is empty: it exists so that the agent can
//! build-depend on this crate (aya-build rebuilds it when it changes).
#![no_std]
