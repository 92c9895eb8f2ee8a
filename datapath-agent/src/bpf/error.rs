//! The error of every datapath operation, and the one constructor of its map errors.

use std::{io, path::PathBuf};

use aya::maps::MapError;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the eBPF object (pins under {dir})")]
    Load {
        dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {ifname}")]
    Attach {
        ifname: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning link for {ifname} at {path}")]
    PinLink {
        ifname: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link of {ifname}")]
    Link {
        ifname: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("interface {ifname} does not exist")]
    NoInterface { ifname: String },
    #[error("looking up interface {ifname}")]
    InterfaceByName {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("looking up interface index {ifindex}")]
    InterfaceLookup {
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    #[error("removing pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the cgroup {path} (cgroup_root) to attach the socket programs")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Layout(#[from] crate::bpf::map_pins::LayoutError),
}

impl DatapathError {
    /// `.map_err(DatapathError::map(name))`: an operation on map `name` failed.
    pub fn map(name: &'static str) -> impl Fn(MapError) -> Self + Copy {
        move |source| DatapathError::Map { name, source }
    }
}
