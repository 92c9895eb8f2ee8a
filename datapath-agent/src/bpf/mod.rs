//! Loading, pinning and programming the eBPF datapath.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/datapath`):
//!   maps/<map name>-v<layout version>   the BTF maps (reused across agent restarts)
//!   links/<host veth>                   one TCX link per pod veth (forwarding survives the agent)
//!   node-links/<program>@<interface>    the uplink's (and VXLAN device's) TCX links
//!   sock-links/<program>                the socket programs' links on the root cgroup
//!   monitor/                            an empty directory a running `monitor` holds a flock on
//!
//! On start the agent checks every pinned map against this build's layouts
//! ([`map_pins`]: reused, migrated or refused), reopens what is pinned
//! and reconciles; it never flushes. A newer program build replaces the
//! running one on each pinned link with `bpf_link_update`, so no packet ever
//! meets a missing program.
//!
//! [`Datapath`] is the loaded programs with their maps; each map family has
//! its own module of typed reads and writes. [`PinnedMaps`] is the one
//! read-only view of the pinned maps (`inspect`, `monitor`, metrics).
pub mod conntrack;
pub mod counters;
pub mod ebpf;
pub mod endpoints;
pub mod error;
pub mod links;
pub mod loader;
pub mod map_layout;
pub mod map_pins;
mod maps;
pub mod monitor;
pub mod node_config;
pub mod peers;
pub mod pinned;
pub mod pins;
pub mod policy;
pub mod services;
pub mod sock_links;

pub use conntrack::{GcReport, PinnedConntrack};
pub use counters::Counters;
pub use endpoints::{LocalEndpoint, Restored, SweepReport};
pub use error::DatapathError;
pub use links::{LinkFailure, LinkRetry, ReconcileReport, interface_name};
pub use loader::{Datapath, LoadOptions, ProgramBuild};
pub use monitor::{EventError, PinnedMonitor, decode};
pub use peers::{PinnedModeMismatches, SyncReport};
pub use pinned::PinnedMaps;
pub use pins::{PinLayout, open_pinned};
pub use services::ProgrammedService;
