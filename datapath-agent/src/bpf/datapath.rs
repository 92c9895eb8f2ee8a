//! Loading, pinning and programming the eBPF datapath.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/datapath`):
//!   maps/<map name>-v<layout version>   the BTF maps (reused across agent restarts)
//!   links/<host veth>                   one TCX link per pod veth (forwarding survives the agent)
//!   node-links/<program>@<interface>    the uplink's (and VXLAN device's) TCX links
//!   monitor/                            an empty directory a running `monitor` holds a flock on
//!
//! On start the agent checks every pinned map against this build's layouts
//! ([`crate::bpf::map_pins`]: reused, migrated or refused), reopens what is pinned
//! and reconciles; it never flushes. A newer program build replaces the
//! running one on each pinned link with `bpf_link_update`, so no packet ever
//! meets a missing program.

use std::{borrow::BorrowMut, fs, io, net::Ipv4Addr, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuValues,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use datapath_api::mac::MacAddr;
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ConntrackEntry, ConntrackKey, DEFAULT_CONNTRACK_ENTRIES,
    Direction, DropReason, ENDPOINT_FLAG_HOST_DOWN, Endpoint, EndpointKey, EndpointTraffic, ForwardPath,
    MAX_TRAFFIC_SLOTS, ModeMismatch, MonitorConfig, MonitorOutcome, NO_TRAFFIC_SLOT, NODE_FLAG_SERVICES,
    NodeConfig, NodeKey, PodInterface, RemoteNode, Service, ServiceKey, drop_slot, forward_slot, map_names,
    program_names,
};

use crate::{
    bpf::ebpf::{DATAPATH_DEBUG_OBJECT, DATAPATH_OBJECT},
    bpf::map_pins::MapPins,
    reconcile::services::{
        ConntrackLimits, MapWrite, ProgrammedState, ServiceChanges, ServicePlan, ServicePort,
    },
};

/// Which build of the programs to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgramBuild {
    /// No logging code at all.
    #[default]
    Normal,
    /// Every verdict logged with aya-log (to the agent's log at debug level).
    Debug,
}

impl ProgramBuild {
    fn object(self) -> &'static [u8] {
        match self {
            ProgramBuild::Normal => DATAPATH_OBJECT,
            ProgramBuild::Debug => DATAPATH_DEBUG_OBJECT,
        }
    }
}

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
    #[error(transparent)]
    Layout(#[from] crate::bpf::map_pins::LayoutError),
}

/// A local pod endpoint as the agent programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub pod_ipv4: Ipv4Addr,
    pub pod_mac: MacAddr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
}

/// Paths of the pinned objects under one bpffs directory.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// The pin of map `name` in this build's layout: `maps/<name>-v<version>`.
    pub fn map(&self, name: &str) -> PathBuf {
        let layout = crate::bpf::map_layout::layout(name)
            .unwrap_or_else(|| panic!("map {name} has no entry in map_layout::LAYOUTS"));
        self.maps_dir().join(layout.pin_name())
    }
    pub fn link(&self, host_ifname: &str) -> PathBuf {
        self.links_dir().join(host_ifname)
    }
    /// The directory a running `monitor` holds an exclusive flock on
    /// ([`crate::observe::monitor_lock`]).
    pub fn monitor_lock(&self) -> PathBuf {
        self.root.join("monitor")
    }
    /// Links of node-level programs (uplink, VXLAN device), named
    /// `<program>@<interface>`.
    pub fn node_links_dir(&self) -> PathBuf {
        self.root.join("node-links")
    }
    pub fn node_link(&self, program: &str, ifname: &str) -> PathBuf {
        self.node_links_dir().join(format!("{program}@{ifname}"))
    }
}

/// What reconciliation on start did, for the log.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub links_updated: usize,
    pub stale_links_removed: usize,
    pub stale_endpoints_removed: usize,
    pub stale_interfaces_removed: usize,
    /// Live links that could not be switched to the new program: kept, to
    /// be retried with [`Datapath::retry_link`].
    pub links_failed: Vec<LinkFailure>,
}

/// What [`Datapath::restore_endpoint`] put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Its ENDPOINTS and POD_INTERFACES entries.
    pub entries: bool,
    /// Its program link (attached and pinned).
    pub link: bool,
    /// Its address is delivered to this other interface, which exists: its
    /// entries were left alone.
    pub address_taken_by: Option<u32>,
}

impl Restored {
    pub fn anything(&self) -> bool {
        self.entries || self.link
    }
}

/// What [`Datapath::sweep_gone_interfaces`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// POD_INTERFACES entries.
    pub interfaces: usize,
    /// ENDPOINTS entries.
    pub endpoints: usize,
}

/// Sizes chosen at load time (maps are created with them; pinned maps keep
/// the size they were created with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Capacity of the CONNTRACK map (`conntrack_max_entries`).
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { conntrack_entries: DEFAULT_CONNTRACK_ENTRIES }
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Traffic counter slots held by endpoints (rebuilt from the map on load).
    traffic_slots: std::collections::BTreeSet<u32>,
    /// Capacity of the CONNTRACK map in use (a pinned map keeps its own).
    conntrack_capacity: u32,
    /// What the Service maps hold, read from them at the first sync and kept
    /// up to date by each write after it (the agent is their only writer):
    /// one Service change then costs its own writes, not a read of them all.
    /// `None` after a failed write, so the next sync reads the maps again.
    programmed_services: Option<crate::reconcile::services::ProgrammedState>,
}

/// The name of the interface with this index in our namespace, `None` if
/// there is none. Only the kernel's "no such device" is an absence: any
/// other failure (no socket left for the lookup, say) is an error, so that
/// nothing belonging to a live interface is ever taken for stale. (nix's
/// `if_indextoname` cannot tell: it answers an empty name for a missing
/// index.)
pub fn interface_name(ifindex: u32) -> Result<Option<String>, DatapathError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO | libc::ENODEV) => Ok(None),
            _ => Err(DatapathError::InterfaceLookup { ifindex, source: error }),
        };
    }
    // SAFETY: on success the name is a NUL-terminated string in buf.
    Ok(Some(unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()))
}

fn interface_exists(ifindex: u32) -> Result<bool, DatapathError> {
    interface_name(ifindex).map(|name| name.is_some())
}

impl Datapath {
    /// Load the programs with every map pinned under `pins` (reusing maps that
    /// are already pinned there: their contents survive), with default sizes.
    pub fn load_pinned(pins: PinLayout, build: ProgramBuild) -> Result<Self, DatapathError> {
        Self::load_pinned_with(pins, build, LoadOptions::default())
    }

    /// [`Self::load_pinned`] with the sizes of `options`. A map pinned with
    /// another size (e.g. `conntrack_max_entries` changed) is migrated into
    /// a map of the new size, its entries kept; a pin of another layout is
    /// migrated or refused ([`crate::bpf::map_pins`]).
    pub fn load_pinned_with(
        pins: PinLayout,
        build: ProgramBuild,
        options: LoadOptions,
    ) -> Result<Self, DatapathError> {
        for dir in [pins.maps_dir(), pins.links_dir(), pins.node_links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        }
        let object = build.object();
        let map_pins = MapPins::check(&pins, object, &[(map_names::CONNTRACK, options.conntrack_entries)])?;
        map_pins.prepare()?;
        let load_paths = map_pins.load_paths();
        let mut loader = EbpfLoader::new();
        for (name, path) in &load_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(map_names::CONNTRACK, options.conntrack_entries);
        let ebpf = match loader.load(object) {
            Ok(ebpf) => ebpf,
            Err(source) => {
                map_pins.abandon();
                return Err(DatapathError::Load { dir: pins.root.clone(), source: Box::new(source) });
            }
        };
        let mut datapath = Self {
            ebpf,
            pins,
            traffic_slots: Default::default(),
            conntrack_capacity: options.conntrack_entries,
            programmed_services: None,
        };
        let before_switch = map_pins
            .copy_before_switch(&mut datapath.ebpf)
            .map_err(DatapathError::from)
            .and_then(|()| datapath.load_programs());
        if let Err(e) = before_switch {
            map_pins.abandon();
            return Err(e);
        }
        if map_pins.migrating() {
            datapath.switch_pinned_links()?;
            map_pins.copy_after_switch(&mut datapath.ebpf);
        }
        map_pins.commit()?;
        datapath.traffic_slots = datapath
            .endpoints()?
            .iter()
            .map(|(_, ep)| ep.traffic_slot)
            .filter(|slot| *slot < MAX_TRAFFIC_SLOTS)
            .collect();
        Ok(datapath)
    }

    /// Point every pinned link whose interface exists at the programs just
    /// loaded (and so at their maps), before a migration removes the old
    /// maps' pins. A link that cannot be switched keeps its program, which
    /// keeps the old maps alive; the reconcile after the load retries it.
    fn switch_pinned_links(&mut self) -> Result<(), DatapathError> {
        let mut links: Vec<(&'static str, String, PathBuf)> = Vec::new();
        for (dir, node_level) in [(self.pins.links_dir(), false), (self.pins.node_links_dir(), true)] {
            let entries =
                fs::read_dir(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let (program, ifname) = if node_level {
                    let Some((program, ifname)) = file_name.split_once('@') else { continue };
                    let known =
                        [program_names::FROM_UPLINK, program_names::FROM_OVERLAY, program_names::FROM_POD];
                    let Some(program) = known.into_iter().find(|p| *p == program) else { continue };
                    (program, ifname.to_owned())
                } else {
                    (program_names::FROM_POD, file_name)
                };
                links.push((program, ifname, entry.path()));
            }
        }
        let (mut switched, mut kept) = (0, 0);
        for (program, ifname, path) in links {
            if nix::net::if_::if_nametoindex(ifname.as_str()).is_err() {
                continue; // Its interface is gone: the reconcile removes it.
            }
            let result = PinnedLink::from_pin(&path)
                .map_err(|source| DatapathError::Link { ifname: ifname.clone(), source })
                .and_then(|link| self.update_link_to(program, link.into(), &ifname));
            match result {
                Ok(()) => switched += 1,
                Err(e) => {
                    kept += 1;
                    tracing::warn!(
                        link = %path.display(),
                        error = format!("{e:#}"),
                        "link not switched to the migrated maps: it keeps the previous programs and maps"
                    );
                }
            }
        }
        tracing::info!(switched, kept, "pinned links switched to the programs of the migrated maps");
        Ok(())
    }

    /// Load the programs with private, unpinned maps (packet-level tests).
    pub fn load_unpinned() -> Result<Self, DatapathError> {
        Self::load_unpinned_with(LoadOptions::default())
    }

    /// [`Self::load_unpinned`] with the map sizes of `options`.
    pub fn load_unpinned_with(options: LoadOptions) -> Result<Self, DatapathError> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CONNTRACK, options.conntrack_entries)
            .load(DATAPATH_OBJECT)
            .map_err(|source| DatapathError::Load { dir: PathBuf::new(), source: Box::new(source) })?;
        let mut datapath = Self {
            ebpf,
            pins: PinLayout::new("/nonexistent"),
            traffic_slots: Default::default(),
            conntrack_capacity: options.conntrack_entries,
            programmed_services: None,
        };
        datapath.load_programs()?;
        Ok(datapath)
    }

    fn load_programs(&mut self) -> Result<(), DatapathError> {
        for name in [program_names::FROM_POD, program_names::FROM_UPLINK, program_names::FROM_OVERLAY] {
            self.program_mut(name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// A loaded TC program by name.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    pub fn program_from_pod(&self) -> Result<&SchedClassifier, DatapathError> {
        self.program(program_names::FROM_POD)
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing { kind: "map", name })
    }

    fn map(&self, name: &'static str) -> Result<&Map, DatapathError> {
        self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })
    }

    fn endpoints_mut(&mut self) -> Result<HashMap<&mut MapData, EndpointKey, Endpoint>, DatapathError> {
        let name = map_names::ENDPOINTS;
        HashMap::try_from(self.map_mut(name)?).map_err(|source| DatapathError::Map { name, source })
    }

    fn pod_interfaces_mut(&mut self) -> Result<HashMap<&mut MapData, u32, PodInterface>, DatapathError> {
        let name = map_names::POD_INTERFACES;
        HashMap::try_from(self.map_mut(name)?).map_err(|source| DatapathError::Map { name, source })
    }

    /// Register a pod and attach the program to its host veth. Maps first, then
    /// the link, so the program never runs on a veth it does not know.
    /// Re-adding the same veth updates the entries and keeps the existing link.
    pub fn add_endpoint(&mut self, ep: &LocalEndpoint) -> Result<(), DatapathError> {
        self.write_endpoint_entries(ep)?;
        self.attach(&ep.host_ifname, ep.host_ifindex)
    }

    /// The ENDPOINTS and POD_INTERFACES entries of `ep`, as ADD writes them.
    fn write_endpoint_entries(&mut self, ep: &LocalEndpoint) -> Result<(), DatapathError> {
        let map_err = |name| move |source| DatapathError::Map { name, source };
        let key = EndpointKey { ipv4: ep.pod_ipv4.octets() };
        let existing = self.endpoints_mut()?.get(&key, 0).ok();
        let traffic_slot = match existing {
            // Re-adding the same pod keeps its counters.
            Some(old) if old.host_ifindex == ep.host_ifindex && old.traffic_slot != NO_TRAFFIC_SLOT => {
                old.traffic_slot
            }
            other => {
                if let Some(old) = other {
                    self.traffic_slots.remove(&old.traffic_slot);
                }
                self.allocate_traffic_slot()?
            }
        };
        self.pod_interfaces_mut()?
            .insert(
                ep.host_ifindex,
                PodInterface {
                    pod_ipv4: ep.pod_ipv4.octets(),
                    host_mac: ep.host_mac.0,
                    _pad: [0; 2],
                    traffic_slot,
                },
                0,
            )
            .map_err(map_err(map_names::POD_INTERFACES))?;
        self.endpoints_mut()?
            .insert(
                key,
                Endpoint {
                    host_ifindex: ep.host_ifindex,
                    pod_mac: ep.pod_mac.0,
                    host_mac: ep.host_mac.0,
                    flags: 0,
                    traffic_slot,
                },
                0,
            )
            .map_err(map_err(map_names::ENDPOINTS))
    }

    /// Put back what is missing of a live endpoint (its veth exists) that
    /// ADD made: its map entries and its program link, as ADD made them
    /// (the pins were lost, or someone removed its link pin). What is in
    /// place is not touched; an IP whose entry points at another interface
    /// that exists is left to that one.
    pub fn restore_endpoint(&mut self, ep: &LocalEndpoint) -> Result<Restored, DatapathError> {
        let mut restored = Restored::default();
        let endpoint = get_present(&self.endpoints_mut()?, &EndpointKey { ipv4: ep.pod_ipv4.octets() })
            .map_err(|source| DatapathError::Map { name: map_names::ENDPOINTS, source })?;
        let interface = get_present(&self.pod_interfaces_mut()?, &ep.host_ifindex)
            .map_err(|source| DatapathError::Map { name: map_names::POD_INTERFACES, source })?;
        let entries_in_place = endpoint.is_some_and(|e| {
            e.host_ifindex == ep.host_ifindex && e.pod_mac == ep.pod_mac.0 && e.host_mac == ep.host_mac.0
        }) && interface
            .is_some_and(|i| i.pod_ipv4 == ep.pod_ipv4.octets() && i.host_mac == ep.host_mac.0);
        match endpoint {
            _ if entries_in_place => {}
            Some(other) if other.host_ifindex != ep.host_ifindex && interface_exists(other.host_ifindex)? => {
                restored.address_taken_by = Some(other.host_ifindex);
            }
            _ => {
                self.write_endpoint_entries(ep)?;
                restored.entries = true;
            }
        }
        if !self.pins.link(&ep.host_ifname).exists() {
            self.attach(&ep.host_ifname, ep.host_ifindex)?;
            restored.link = true;
        }
        Ok(restored)
    }

    /// The lowest free traffic slot, its counters zeroed (a previous pod may
    /// have used it); [`NO_TRAFFIC_SLOT`] when all are taken (the pod then
    /// forwards normally, uncounted).
    fn allocate_traffic_slot(&mut self) -> Result<u32, DatapathError> {
        let Some(slot) = (0..MAX_TRAFFIC_SLOTS).find(|slot| !self.traffic_slots.contains(slot)) else {
            tracing::warn!(
                max = MAX_TRAFFIC_SLOTS,
                "all traffic counter slots taken; this pod is not counted"
            );
            return Ok(NO_TRAFFIC_SLOT);
        };
        let name = map_names::ENDPOINT_TRAFFIC;
        let map_err = |source| DatapathError::Map { name, source };
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Map {
            name,
            source: aya::maps::MapError::IoError(source),
        })?;
        let mut traffic: PerCpuArray<&mut MapData, EndpointTraffic> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err)?;
        let zeroes = PerCpuValues::try_from(vec![EndpointTraffic::default(); cpus])
            .map_err(|source| map_err(aya::maps::MapError::IoError(source)))?;
        traffic.set(slot, zeroes, 0).map_err(map_err)?;
        self.traffic_slots.insert(slot);
        Ok(slot)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        let pin = self.pins.link(ifname);
        self.attach_pinned(program_names::FROM_POD, ifname, ifindex, pin)
    }

    /// Attach `program` to `ifname` ingress with a link pinned at `pin`; if a
    /// live link is pinned there already, swap its program atomically instead.
    fn attach_pinned(
        &mut self,
        program: &'static str,
        ifname: &str,
        ifindex: u32,
        pin: PathBuf,
    ) -> Result<(), DatapathError> {
        if pin.exists() {
            match self.refresh_pinned_link(program, ifname, &pin)? {
                PinnedLinkState::Updated => return Ok(()),
                PinnedLinkState::Stale => {
                    tracing::info!(ifname, pin = %pin.display(), "replacing the link pin of a gone interface");
                    fs::remove_file(&pin)
                        .map_err(|source| DatapathError::Unpin { path: pin.clone(), source })?;
                }
            }
        }
        if !interface_exists(ifindex)? {
            return Err(DatapathError::NoInterface { ifname: ifname.to_owned() });
        }
        let attach_err = |source| DatapathError::Attach { ifname: ifname.to_owned(), source };
        let program = self.program_mut(program)?;
        let link_id = program
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        let fd_link: FdLink =
            link.try_into().map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })?;
        fd_link.pin(&pin).map_err(|source| DatapathError::PinLink {
            ifname: ifname.to_owned(),
            path: pin.clone(),
            source,
        })?;
        Ok(())
    }

    /// Remove a pod: stop delivering to it, forget its veth, detach the link.
    /// Absent pieces are fine (DEL is idempotent).
    pub fn remove_endpoint(
        &mut self,
        host_ifname: &str,
        host_ifindex: Option<u32>,
        pod_ipv4: Option<Ipv4Addr>,
    ) -> Result<usize, DatapathError> {
        let mut removed = 0;
        let mut ips: Vec<[u8; 4]> = pod_ipv4.iter().map(|ip| ip.octets()).collect();
        if let Some(ifindex) = host_ifindex {
            let name = map_names::POD_INTERFACES;
            let map_err = |source| DatapathError::Map { name, source };
            let mut ifaces = self.pod_interfaces_mut()?;
            if let Some(iface) = get_present(&ifaces, &ifindex).map_err(map_err)? {
                ips.push(iface.pod_ipv4);
                removed += usize::from(remove_present(&mut ifaces, &ifindex).map_err(map_err)?);
            }
            // Any endpoint delivered through this veth, whatever its IP.
            for (ip, endpoint) in self.endpoints()? {
                if endpoint.host_ifindex == ifindex {
                    ips.push(ip.octets());
                }
            }
        }
        let name = map_names::ENDPOINTS;
        let map_err = |source| DatapathError::Map { name, source };
        for ip in ips {
            let key = EndpointKey { ipv4: ip };
            let Some(endpoint) = get_present(&self.endpoints_mut()?, &key).map_err(map_err)? else {
                continue;
            };
            // Only remove an IP entry that points at this veth: the IP may
            // already belong to a newer pod. Without the veth's index, only
            // one whose interface is gone.
            let ours = match host_ifindex {
                Some(ifindex) => endpoint.host_ifindex == ifindex,
                None => !interface_exists(endpoint.host_ifindex)?,
            };
            if ours {
                removed += usize::from(remove_present(&mut self.endpoints_mut()?, &key).map_err(map_err)?);
            }
        }
        self.release_unused_traffic_slots()?;
        let pin = self.pins.link(host_ifname);
        match fs::remove_file(&pin) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DatapathError::Unpin { path: pin, source }),
        }
        Ok(removed)
    }

    /// Bring pinned state in line with this node after a (re)start:
    /// - every pinned link whose veth still exists is switched atomically to the
    ///   program we just loaded (a new build replaces the old one hitlessly);
    /// - links, interfaces and endpoints whose veth is gone are removed.
    ///
    /// Nothing that is still valid is ever removed or re-created.
    pub fn reconcile(&mut self) -> Result<ReconcileReport, DatapathError> {
        let mut report = ReconcileReport::default();
        let links_dir = self.pins.links_dir();
        let entries = fs::read_dir(&links_dir)
            .map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
            let path = entry.path();
            let ifname = entry.file_name().to_string_lossy().into_owned();
            match self.refresh_pinned_link(program_names::FROM_POD, &ifname, &path) {
                Ok(PinnedLinkState::Updated) => report.links_updated += 1,
                Ok(PinnedLinkState::Stale) => {
                    tracing::info!(ifname, "removing the link pin of a gone interface");
                    fs::remove_file(&path)
                        .map_err(|source| DatapathError::Unpin { path: path.clone(), source })?;
                    report.stale_links_removed += 1;
                }
                // The link stays and goes on forwarding (with the program it
                // has); the switch is tried again later.
                Err(error) => report.links_failed.push(LinkFailure {
                    program: program_names::FROM_POD,
                    ifname,
                    pin: path,
                    error,
                }),
            }
        }

        let swept = self.sweep_gone_interfaces()?;
        report.stale_endpoints_removed = swept.endpoints;
        report.stale_interfaces_removed = swept.interfaces;
        Ok(report)
    }

    /// Forget every POD_INTERFACES and ENDPOINTS entry whose host veth no
    /// longer exists (its pod's namespace went before DEL came, or an agent
    /// that did not know better left it): such an entry can never carry a
    /// packet, and it would hold its slot until the index were reused. An
    /// entry of a live interface is never touched.
    pub fn sweep_gone_interfaces(&mut self) -> Result<SweepReport, DatapathError> {
        let mut report = SweepReport::default();
        let name = map_names::POD_INTERFACES;
        let ifindexes: Vec<u32> = self
            .pod_interfaces_mut()?
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })?;
        for ifindex in ifindexes {
            if !interface_exists(ifindex)? {
                let removed = remove_present(&mut self.pod_interfaces_mut()?, &ifindex)
                    .map_err(|source| DatapathError::Map { name, source })?;
                report.interfaces += usize::from(removed);
            }
        }
        let name = map_names::ENDPOINTS;
        for (ip, endpoint) in self.endpoints()? {
            if !interface_exists(endpoint.host_ifindex)? {
                let removed = remove_present(&mut self.endpoints_mut()?, &EndpointKey { ipv4: ip.octets() })
                    .map_err(|source| DatapathError::Map { name, source })?;
                report.endpoints += usize::from(removed);
            }
        }
        if report.endpoints > 0 {
            self.release_unused_traffic_slots()?;
        }
        Ok(report)
    }

    /// Forget slots no endpoint holds any more.
    fn release_unused_traffic_slots(&mut self) -> Result<(), DatapathError> {
        let held: std::collections::BTreeSet<u32> =
            self.endpoints()?.iter().map(|(_, ep)| ep.traffic_slot).collect();
        self.traffic_slots.retain(|slot| held.contains(slot));
        Ok(())
    }

    fn update_link_to(
        &mut self,
        program: &'static str,
        fd_link: FdLink,
        ifname: &str,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach { ifname: ifname.to_owned(), source };
        let link: SchedClassifierLink =
            fd_link.try_into().map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })?;
        let program = self.program_mut(program)?;
        let id = program.attach_to_link(link).map_err(attach_err)?;
        // The pin keeps the link; drop our fd without detaching.
        let link = program.take_link(id).map_err(attach_err)?;
        drop(link);
        Ok(())
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        read_endpoints(self.map(map_names::ENDPOINTS)?)
    }
}

fn read_endpoints(map: &Map) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
    let name = map_names::ENDPOINTS;
    let endpoints: HashMap<&MapData, EndpointKey, Endpoint> =
        HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    let mut out: Vec<(Ipv4Addr, Endpoint)> = endpoints
        .iter()
        .map(|entry| entry.map(|(k, v)| (Ipv4Addr::from(k.ipv4), v)))
        .collect::<Result<_, _>>()
        .map_err(|source| DatapathError::Map { name, source })?;
    out.sort_by_key(|(ip, _)| *ip);
    Ok(out)
}

/// Read-only view of the pinned maps, for `inspect` (works with the agent down).
pub struct PinnedMaps {
    pins: PinLayout,
    node_config: Map,
    remote_nodes: Map,
    endpoints: Map,
    drops: Map,
    forwards: Map,
    traffic: Map,
    monitor_counters: Map,
}

/// A map opened from its pin under `pins`, in this build's layout.
pub fn open_pinned(pins: &PinLayout, name: &'static str) -> Result<Map, DatapathError> {
    let path = pins.map(name);
    let data = match MapData::from_pin(&path) {
        Ok(data) => data,
        Err(source) => {
            let others = crate::bpf::map_pins::other_layouts(pins, name);
            if !path.exists() && !others.is_empty() {
                let version = crate::bpf::map_layout::layout(name).map_or(0, |layout| layout.version);
                return Err(crate::bpf::map_pins::LayoutError::OnlyOtherLayout {
                    name,
                    pins: crate::bpf::map_pins::PathList(others),
                    version,
                    expected: path,
                }
                .into());
            }
            return Err(DatapathError::Map { name, source });
        }
    };
    Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
}

impl PinnedMaps {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let open = |name| open_pinned(pins, name);
        Ok(Self {
            pins: pins.clone(),
            node_config: open(map_names::NODE_CONFIG)?,
            remote_nodes: open(map_names::REMOTE_NODES)?,
            endpoints: open(map_names::ENDPOINTS)?,
            drops: open(map_names::DROP_COUNTERS)?,
            forwards: open(map_names::FORWARD_COUNTERS)?,
            traffic: open(map_names::ENDPOINT_TRAFFIC)?,
            monitor_counters: open(map_names::MONITOR_COUNTERS)?,
        })
    }

    // The Service maps are opened when asked for, so that the other views
    // keep working on maps pinned by an agent that predates them.

    /// Every Service port with its backends, by key.
    pub fn services(&self) -> Result<Vec<ProgrammedService>, DatapathError> {
        read_services(
            &open_pinned(&self.pins, map_names::SERVICES)?,
            &open_pinned(&self.pins, map_names::SERVICE_BACKENDS)?,
        )
    }

    /// Service ports programmed (entries of SERVICES).
    pub fn service_count(&self) -> Result<usize, DatapathError> {
        let name = map_names::SERVICES;
        let map = open_pinned(&self.pins, name)?;
        let services: HashMap<&MapData, ServiceKey, Service> =
            HashMap::try_from(&map).map_err(|source| DatapathError::Map { name, source })?;
        services
            .keys()
            .try_fold(0, |n, key| key.map(|_| n + 1))
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Every connection-tracking entry, by key.
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, DatapathError> {
        read_conntrack(&open_pinned(&self.pins, map_names::CONNTRACK)?)
    }

    /// Peer nodes caught sending in the other routing mode, with their count.
    pub fn peer_mode_mismatches(&self) -> Result<Vec<(Ipv4Addr, ModeMismatch)>, DatapathError> {
        let name = map_names::PEER_MODE_MISMATCHES;
        let map = open_pinned(&self.pins, name)?;
        let peers: HashMap<&MapData, NodeKey, ModeMismatch> =
            HashMap::try_from(&map).map_err(|source| DatapathError::Map { name, source })?;
        peers
            .iter()
            .map(|entry| entry.map(|(key, value)| (Ipv4Addr::from(key.ipv4), value)))
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Capacity of the pinned connection-tracking map, in entries.
    pub fn conntrack_capacity(&self) -> Result<u32, DatapathError> {
        let name = map_names::CONNTRACK;
        MapInfo::from_pin(self.pins.map(name))
            .map(|info| info.max_entries())
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// An endpoint's packets and bytes, summed over CPUs (zero without a slot).
    pub fn endpoint_traffic(&self, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
        read_traffic(&self.traffic, traffic_slot)
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        read_endpoints(&self.endpoints)
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Counters::read(&self.drops, &self.forwards, &self.monitor_counters)
    }

    pub fn remote_routes(&self) -> Result<Vec<RemoteRoute>, DatapathError> {
        read_remote_routes(&self.remote_nodes)
    }

    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        let name = map_names::NODE_CONFIG;
        let array: Array<&MapData, NodeConfig> =
            Array::try_from(&self.node_config).map_err(|source| DatapathError::Map { name, source })?;
        array.get(&0, 0).map_err(|source| DatapathError::Map { name, source })
    }
}

fn read_traffic(map: &Map, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
    let name = map_names::ENDPOINT_TRAFFIC;
    if traffic_slot >= MAX_TRAFFIC_SLOTS {
        return Ok(EndpointTraffic::default());
    }
    let array: PerCpuArray<&MapData, EndpointTraffic> =
        PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    let per_cpu = array.get(&traffic_slot, 0).map_err(|source| DatapathError::Map { name, source })?;
    Ok(per_cpu.iter().fold(EndpointTraffic::default(), |sum, t| EndpointTraffic {
        sent_packets: sum.sent_packets + t.sent_packets,
        sent_bytes: sum.sent_bytes + t.sent_bytes,
        delivered_packets: sum.delivered_packets + t.delivered_packets,
        delivered_bytes: sum.delivered_bytes + t.delivered_bytes,
    }))
}

type CounterMap = std::collections::BTreeMap<&'static str, u64>;

/// Counter totals summed over CPUs: over all directions (`drops`,
/// `forwards`) and per direction (the program that saw the packet).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub drops: CounterMap,
    pub forwards: CounterMap,
    pub drops_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    pub forwards_by_direction: std::collections::BTreeMap<&'static str, CounterMap>,
    /// Monitor events emitted, rate limited and lost to a full ring buffer.
    pub monitor_events: CounterMap,
}

impl Counters {
    fn read(drops: &Map, forwards: &Map, monitor: &Map) -> Result<Self, DatapathError> {
        let read_all = |map: &Map, name: &'static str| -> Result<Vec<u64>, DatapathError> {
            let array: PerCpuArray<&MapData, u64> =
                PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
            (0..array.len())
                .map(|slot| {
                    array
                        .get(&slot, 0)
                        .map(|values| values.iter().sum())
                        .map_err(|source| DatapathError::Map { name, source })
                })
                .collect()
        };
        let drop_slots = read_all(drops, map_names::DROP_COUNTERS)?;
        let forward_slots = read_all(forwards, map_names::FORWARD_COUNTERS)?;
        let monitor_slots = read_all(monitor, map_names::MONITOR_COUNTERS)?;
        let at = |slots: &[u64], slot: u32| slots.get(slot as usize).copied().unwrap_or(0);
        let mut counters = Counters::default();
        for direction in Direction::ALL {
            let drops = counters.drops_by_direction.entry(direction.name()).or_default();
            for reason in DropReason::ALL {
                drops.insert(reason.name(), at(&drop_slots, drop_slot(direction, reason)));
            }
            let forwards = counters.forwards_by_direction.entry(direction.name()).or_default();
            for path in ForwardPath::ALL {
                forwards.insert(path.name(), at(&forward_slots, forward_slot(direction, path)));
            }
        }
        for reason in DropReason::ALL {
            let total = Direction::ALL.iter().map(|d| at(&drop_slots, drop_slot(*d, reason))).sum();
            counters.drops.insert(reason.name(), total);
        }
        for path in ForwardPath::ALL {
            let total = Direction::ALL.iter().map(|d| at(&forward_slots, forward_slot(*d, path))).sum();
            counters.forwards.insert(path.name(), total);
        }
        for outcome in MonitorOutcome::ALL {
            counters.monitor_events.insert(outcome.name(), at(&monitor_slots, outcome as u32));
        }
        Ok(counters)
    }

    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }
    pub fn forward_count(&self, path: ForwardPath) -> u64 {
        self.forwards.get(path.name()).copied().unwrap_or(0)
    }
}

impl Datapath {
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Counters::read(
            self.map(map_names::DROP_COUNTERS)?,
            self.map(map_names::FORWARD_COUNTERS)?,
            self.map(map_names::MONITOR_COUNTERS)?,
        )
    }

    pub fn endpoint_traffic(&self, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
        read_traffic(self.map(map_names::ENDPOINT_TRAFFIC)?, traffic_slot)
    }

    pub fn monitor_config(&self) -> Result<MonitorConfig, DatapathError> {
        let name = map_names::MONITOR_CONFIG;
        let array: Array<&MapData, MonitorConfig> =
            Array::try_from(self.map(name)?).map_err(|source| DatapathError::Map { name, source })?;
        array.get(&0, 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// Set what the programs report to the monitor.
    pub fn set_monitor_config(&mut self, config: MonitorConfig) -> Result<(), DatapathError> {
        let name = map_names::MONITOR_CONFIG;
        let mut array: Array<&mut MapData, MonitorConfig> =
            Array::try_from(self.map_mut(name)?).map_err(|source| DatapathError::Map { name, source })?;
        array.set(0, config, 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// The debug build's aya-log ring buffer, if this is the debug build.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Direct map access for packet-level tests (unpinned datapath).
    pub fn insert_pod_interface(&mut self, ifindex: u32, iface: PodInterface) -> Result<(), DatapathError> {
        let name = map_names::POD_INTERFACES;
        self.pod_interfaces_mut()?
            .insert(ifindex, iface, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Mark the pod behind host veth `ifindex` down (or up again): the
    /// programs deliver nothing to a pod whose host veth is down. Returns the
    /// pod's address if the mark changed (`None`: not a pod's veth, or
    /// already so).
    pub fn set_host_veth_down(
        &mut self,
        ifindex: u32,
        down: bool,
    ) -> Result<Option<Ipv4Addr>, DatapathError> {
        let name = map_names::ENDPOINTS;
        let err = |source| DatapathError::Map { name, source };
        let mut endpoints = self.endpoints_mut()?;
        let mut found = None;
        for entry in endpoints.iter() {
            let (key, endpoint) = entry.map_err(err)?;
            if endpoint.host_ifindex == ifindex {
                found = Some((key, endpoint));
                break;
            }
        }
        let Some((key, endpoint)) = found else {
            return Ok(None);
        };
        let flags = if down {
            endpoint.flags | ENDPOINT_FLAG_HOST_DOWN
        } else {
            endpoint.flags & !ENDPOINT_FLAG_HOST_DOWN
        };
        if flags == endpoint.flags {
            return Ok(None);
        }
        endpoints.insert(key, Endpoint { flags, ..endpoint }, 0).map_err(err)?;
        Ok(Some(Ipv4Addr::from(key.ipv4)))
    }

    pub fn insert_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        let name = map_names::ENDPOINTS;
        self.endpoints_mut()?
            .insert(EndpointKey { ipv4: ip.octets() }, ep, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }
}

/// A peer node as the maps hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRoute {
    pub pod_cidr: ipnet::Ipv4Net,
    pub node_ip: Ipv4Addr,
}

/// What a remote-node sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Datapath {
    pub fn set_node_config(&mut self, config: NodeConfig) -> Result<(), DatapathError> {
        let name = map_names::NODE_CONFIG;
        let mut array: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.map_mut(name)?).map_err(|source| DatapathError::Map { name, source })?;
        array.set(0, config, 0).map_err(|source| DatapathError::Map { name, source })
    }

    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        let name = map_names::NODE_CONFIG;
        let array: Array<&MapData, NodeConfig> =
            Array::try_from(self.map(name)?).map_err(|source| DatapathError::Map { name, source })?;
        array.get(&0, 0).map_err(|source| DatapathError::Map { name, source })
    }

    /// The remote pod CIDRs currently programmed.
    pub fn remote_routes(&self) -> Result<Vec<RemoteRoute>, DatapathError> {
        read_remote_routes(self.map(map_names::REMOTE_NODES)?)
    }

    /// Make REMOTE_NODES and KNOWN_NODES hold exactly `desired`, touching only
    /// entries that differ: no flush, so forwarding to unchanged peers never
    /// sees a gap, and a changed peer is switched with one map update.
    pub fn sync_remote_nodes(&mut self, desired: &[RemoteRoute]) -> Result<SyncReport, DatapathError> {
        use std::collections::{HashMap as StdHashMap, HashSet};
        let mut report = SyncReport::default();
        let trie_name = map_names::REMOTE_NODES;
        let trie_err = |source| DatapathError::Map { name: trie_name, source };
        // Hash lookups on both sides: a 100k-CIDR cluster must not be O(n^2).
        let current: StdHashMap<ipnet::Ipv4Net, Ipv4Addr> =
            self.remote_routes()?.into_iter().map(|r| (r.pod_cidr, r.node_ip)).collect();
        let wanted: HashSet<ipnet::Ipv4Net> = desired.iter().map(|d| d.pod_cidr).collect();
        let key_of = |net: ipnet::Ipv4Net| LpmKey::new(u32::from(net.prefix_len()), net.network().octets());
        {
            let mut trie: LpmTrie<&mut MapData, [u8; 4], RemoteNode> =
                LpmTrie::try_from(self.map_mut(trie_name)?).map_err(trie_err)?;
            for want in desired {
                match current.get(&want.pod_cidr) {
                    Some(ip) if *ip == want.node_ip => continue,
                    Some(_) => report.updated += 1,
                    None => report.added += 1,
                }
                trie.insert(
                    &key_of(want.pod_cidr),
                    RemoteNode { node_ipv4: want.node_ip.octets(), flags: 0 },
                    0,
                )
                .map_err(trie_err)?;
            }
            for have in current.keys().filter(|c| !wanted.contains(c)) {
                trie.remove(&key_of(*have)).map_err(trie_err)?;
                report.removed += 1;
            }
        }
        let nodes_name = map_names::KNOWN_NODES;
        let nodes_err = |source| DatapathError::Map { name: nodes_name, source };
        let mut nodes: HashMap<&mut MapData, NodeKey, RemoteNode> =
            HashMap::try_from(self.map_mut(nodes_name)?).map_err(nodes_err)?;
        let have: HashSet<[u8; 4]> =
            nodes.keys().map(|k| k.map(|k| k.ipv4)).collect::<Result<_, _>>().map_err(nodes_err)?;
        let want_ips: HashSet<[u8; 4]> = desired.iter().map(|d| d.node_ip.octets()).collect();
        for ip in want_ips.difference(&have) {
            nodes
                .insert(NodeKey { ipv4: *ip }, RemoteNode { node_ipv4: *ip, flags: 0 }, 0)
                .map_err(nodes_err)?;
        }
        for ip in have.difference(&want_ips) {
            nodes.remove(&NodeKey { ipv4: *ip }).map_err(nodes_err)?;
        }
        Ok(report)
    }

    /// Attach the node-level programs that `wanted` lists ((program, ifname))
    /// with pinned links, swapping the program of live ones atomically, and
    /// unpin every other node-level link. A live link whose switch fails is
    /// kept and returned (to retry with [`Self::retry_link`]).
    pub fn sync_node_links(
        &mut self,
        wanted: &[(&'static str, String)],
    ) -> Result<Vec<LinkFailure>, DatapathError> {
        let dir = self.pins.node_links_dir();
        let entries =
            fs::read_dir(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.iter().any(|(p, i)| format!("{p}@{i}") == name) {
                let path = entry.path();
                tracing::info!(link = name, "removing node link no longer wanted");
                fs::remove_file(&path).map_err(|source| DatapathError::Unpin { path, source })?;
            }
        }
        let mut failed = Vec::new();
        for (program, ifname) in wanted {
            let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
                .map_err(|_| DatapathError::NoInterface { ifname: ifname.clone() })?;
            let pin = self.pins.node_link(program, ifname);
            match self.attach_pinned(program, ifname, ifindex, pin.clone()) {
                Ok(()) => {}
                // A live link we could not switch: it stays, and is retried.
                Err(error) if pin.exists() => {
                    failed.push(LinkFailure { program, ifname: ifname.clone(), pin, error });
                }
                Err(error) => return Err(error),
            }
        }
        Ok(failed)
    }

    /// Try again to switch a link whose switch failed (a [`LinkFailure`]).
    pub fn retry_link(
        &mut self,
        program: &'static str,
        ifname: &str,
        pin: &std::path::Path,
    ) -> Result<LinkRetry, DatapathError> {
        if !pin.exists() {
            // DEL took it meanwhile.
            return Ok(LinkRetry::Gone);
        }
        match self.refresh_pinned_link(program, ifname, pin)? {
            PinnedLinkState::Updated => Ok(LinkRetry::Updated),
            PinnedLinkState::Stale => {
                fs::remove_file(pin)
                    .map_err(|source| DatapathError::Unpin { path: pin.to_owned(), source })?;
                Ok(LinkRetry::StaleRemoved)
            }
        }
    }

    /// Switch the link pinned at `pin` (of `ifname`) to `program`, atomically.
    /// It is stale only when its interface is really gone: no interface has
    /// the name, or the kernel refuses the update with ENOLINK (the link's
    /// device went away, so the name now belongs to a newer interface). Any
    /// other failure is an error, and the link is left as it is.
    fn refresh_pinned_link(
        &mut self,
        program: &'static str,
        ifname: &str,
        pin: &std::path::Path,
    ) -> Result<PinnedLinkState, DatapathError> {
        match nix::net::if_::if_nametoindex(ifname) {
            Ok(_) => {}
            Err(nix::errno::Errno::ENODEV) => return Ok(PinnedLinkState::Stale),
            Err(errno) => {
                return Err(DatapathError::InterfaceByName {
                    ifname: ifname.to_owned(),
                    source: errno.into(),
                });
            }
        }
        let link = PinnedLink::from_pin(pin)
            .map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })?;
        match self.update_link_to(program, link.into(), ifname) {
            Ok(()) => Ok(PinnedLinkState::Updated),
            Err(DatapathError::Attach {
                source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }),
                ..
            }) if io_error.raw_os_error() == Some(libc::ENOLINK) => Ok(PinnedLinkState::Stale),
            Err(error) => Err(error),
        }
    }
}

/// What a pinned link turned out to be when switched to our program.
enum PinnedLinkState {
    /// Live, and now running the program just loaded.
    Updated,
    /// Its interface is gone: it can carry nothing.
    Stale,
}

/// A pinned link that could not be switched to the program loaded now; it
/// stays, forwarding with the program it has, until [`Datapath::retry_link`]
/// succeeds.
#[derive(Debug)]
pub struct LinkFailure {
    pub program: &'static str,
    pub ifname: String,
    pub pin: PathBuf,
    pub error: DatapathError,
}

/// What [`Datapath::retry_link`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRetry {
    /// Switched to the loaded program.
    Updated,
    /// Its interface had gone: pin removed.
    StaleRemoved,
    /// The pin was removed meanwhile (DEL).
    Gone,
}

fn read_remote_routes(map: &Map) -> Result<Vec<RemoteRoute>, DatapathError> {
    let name = map_names::REMOTE_NODES;
    let trie: LpmTrie<&MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    let entries: Vec<(LpmKey<[u8; 4]>, RemoteNode)> =
        trie.iter().collect::<Result<_, _>>().map_err(|source| DatapathError::Map { name, source })?;
    // Every key was written from an Ipv4Net, so each makes one back.
    let mut out: Vec<RemoteRoute> = entries
        .into_iter()
        .filter_map(|(key, node)| {
            let prefix = u8::try_from(key.prefix_len()).ok()?;
            Some(RemoteRoute {
                pod_cidr: ipnet::Ipv4Net::new(Ipv4Addr::from(key.data()), prefix).ok()?,
                node_ip: Ipv4Addr::from(node.node_ipv4),
            })
        })
        .collect();
    out.sort_by_key(|r| (r.pod_cidr.network(), r.pod_cidr.prefix_len()));
    Ok(out)
}

/// A Service port as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedService {
    pub key: ServiceKey,
    pub service: Service,
    /// The backends in slots 0..backend_count, in slot order.
    pub backends: Vec<Backend>,
}

/// What a sweep of the connection-tracking map did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    /// Entries removed (two per connection).
    pub removed: usize,
    /// Entries left, as of the sweep's snapshot.
    pub remaining: usize,
}

/// `map.get(key)`, with an absent key as `None`.
fn get_present<T: std::borrow::Borrow<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
    key: &K,
) -> Result<Option<V>, MapError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `map.remove(key)`; false if it was not there (the programs or another
/// sweep removed it first).
fn remove_present<T: BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<T, K, V>,
    key: &K,
) -> Result<bool, MapError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the map holds any entry (one syscall, whatever its size).
fn has_entries<T: std::borrow::Borrow<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
) -> Result<bool, MapError> {
    map.keys().next().transpose().map(|key| key.is_some())
}

fn read_services(services: &Map, backends: &Map) -> Result<Vec<ProgrammedService>, DatapathError> {
    let err = |name| move |source| DatapathError::Map { name, source };
    let services: HashMap<&MapData, ServiceKey, Service> =
        HashMap::try_from(services).map_err(err(map_names::SERVICES))?;
    let backends: HashMap<&MapData, BackendKey, Backend> =
        HashMap::try_from(backends).map_err(err(map_names::SERVICE_BACKENDS))?;
    let entries: Vec<(ServiceKey, Service)> =
        services.iter().collect::<Result<_, _>>().map_err(err(map_names::SERVICES))?;
    let mut out = Vec::with_capacity(entries.len());
    for (key, service) in entries {
        let mut slots = Vec::with_capacity(service.backend_count as usize);
        for slot in 0..service.backend_count {
            let slot_key = BackendKey { service_id: service.id, slot };
            if let Some(backend) =
                get_present(&backends, &slot_key).map_err(err(map_names::SERVICE_BACKENDS))?
            {
                slots.push(backend);
            }
        }
        out.push(ProgrammedService { key, service, backends: slots });
    }
    out.sort_by_key(|s| s.key);
    Ok(out)
}

fn read_conntrack(map: &Map) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, DatapathError> {
    let name = map_names::CONNTRACK;
    let conntrack: HashMap<&MapData, ConntrackKey, ConntrackEntry> =
        HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
    let mut out: Vec<(ConntrackKey, ConntrackEntry)> =
        conntrack.iter().collect::<Result<_, _>>().map_err(|source| DatapathError::Map { name, source })?;
    out.sort_by_key(|(key, _)| *key);
    Ok(out)
}

/// Remove every connection quiet for longer than its limit, both entries
/// at once. The keys are read first and removed afterwards (removing while
/// walking a hash map restarts the walk), which also works on a full map.
/// Each expired entry is looked up again just before it goes: a packet
/// may have refreshed it since the snapshot.
fn sweep_conntrack<T: BorrowMut<MapData>>(
    map: &mut HashMap<T, ConntrackKey, ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
) -> Result<GcReport, DatapathError> {
    let name = map_names::CONNTRACK;
    let err = |source| DatapathError::Map { name, source };
    let snapshot: std::collections::HashMap<ConntrackKey, ConntrackEntry> =
        map.iter().collect::<Result<_, _>>().map_err(err)?;
    let mut removed = 0;
    for key in crate::reconcile::services::expired_keys(&snapshot, now_ns, limits) {
        let Some(entry) = get_present(map, &key).map_err(err)? else { continue };
        let pair_key = key.pair(&entry);
        let pair = get_present(map, &pair_key).map_err(err)?;
        if !crate::reconcile::services::expired(&key, &entry, pair.as_ref(), now_ns, limits) {
            continue;
        }
        removed += usize::from(remove_present(map, &key).map_err(err)?);
        if pair.is_some() {
            removed += usize::from(remove_present(map, &pair_key).map_err(err)?);
        }
    }
    Ok(GcReport { removed, remaining: snapshot.len().saturating_sub(removed) })
}

/// The connection-tracking map opened from its pin, for the collector: a
/// sweep of a large map takes a while, and this way it does not hold up
/// the agent (CNI requests, Service syncs) meanwhile.
pub struct PinnedConntrack {
    map: HashMap<MapData, ConntrackKey, ConntrackEntry>,
}

impl PinnedConntrack {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let name = map_names::CONNTRACK;
        let map = HashMap::try_from(open_pinned(pins, name)?)
            .map_err(|source| DatapathError::Map { name, source })?;
        Ok(Self { map })
    }

    /// See [`Datapath::conntrack_gc`].
    pub fn sweep(&mut self, now_ns: u64, limits: &ConntrackLimits) -> Result<GcReport, DatapathError> {
        sweep_conntrack(&mut self.map, now_ns, limits)
    }
}

impl Datapath {
    fn hash_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map_mut(name)?).map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map(name)?).map_err(|source| DatapathError::Map { name, source })
    }

    /// Every Service port with its backends, by key.
    pub fn services(&self) -> Result<Vec<ProgrammedService>, DatapathError> {
        read_services(self.map(map_names::SERVICES)?, self.map(map_names::SERVICE_BACKENDS)?)
    }

    /// Every connection-tracking entry, by key.
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackEntry)>, DatapathError> {
        read_conntrack(self.map(map_names::CONNTRACK)?)
    }

    /// Capacity of the connection-tracking map in use, in entries.
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    fn programmed_state(&self) -> Result<ProgrammedState, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        let services = self
            .hash_map::<ServiceKey, Service>(map_names::SERVICES)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(map_names::SERVICES))?;
        let backends = self
            .hash_map::<BackendKey, Backend>(map_names::SERVICE_BACKENDS)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(map_names::SERVICE_BACKENDS))?;
        Ok(ProgrammedState::new(services, backends))
    }

    /// Make the Service maps serve exactly `desired`, changing only what
    /// differs, in an order no packet can catch half done (see
    /// [`crate::reconcile::services::plan_sync`]); then switch the programs' Service
    /// lookups on or off ([`Self::update_services_flag`]). Connections
    /// already tracked keep their backend: conntrack is not touched.
    pub fn sync_services(&mut self, desired: &[ServicePort]) -> Result<SyncReport, DatapathError> {
        let programmed = self.take_programmed_services()?;
        let plan = crate::reconcile::services::plan_sync(&programmed, desired);
        self.carry_out(programmed, plan)
    }

    /// Like [`Self::sync_services`] for the keys in `changes` only, every
    /// other Service left as it is: one Service's change costs its own
    /// writes whatever the number of Services.
    pub fn sync_service_changes(&mut self, changes: &ServiceChanges) -> Result<SyncReport, DatapathError> {
        let programmed = self.take_programmed_services()?;
        let plan = crate::reconcile::services::plan_changes(&programmed, changes);
        self.carry_out(programmed, plan)
    }

    /// What the Service maps hold, from the agent's record of its own
    /// writes (read from the maps once, or after a failed write).
    pub fn programmed_services(&mut self) -> Result<&ProgrammedState, DatapathError> {
        let state = self.take_programmed_services()?;
        Ok(self.programmed_services.insert(state))
    }

    fn take_programmed_services(&mut self) -> Result<ProgrammedState, DatapathError> {
        match self.programmed_services.take() {
            Some(state) => Ok(state),
            None => self.programmed_state(),
        }
    }

    fn carry_out(
        &mut self,
        mut programmed: ProgrammedState,
        plan: ServicePlan,
    ) -> Result<SyncReport, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        // Read once, at the first affinity to forget: affinities the
        // programs add later are for backends still wanted.
        let mut affinities: Option<Vec<(AffinityKey, AffinityEntry)>> = None;
        for write in &plan.writes {
            // On an error `programmed` is dropped: the next sync reads the maps.
            match write {
                MapWrite::PutBackend(key, backend) => self
                    .hash_map_mut::<BackendKey, Backend>(map_names::SERVICE_BACKENDS)?
                    .insert(key, backend, 0)
                    .map_err(err(map_names::SERVICE_BACKENDS))?,
                MapWrite::PutService(key, service) => self
                    .hash_map_mut::<ServiceKey, Service>(map_names::SERVICES)?
                    .insert(key, service, 0)
                    .map_err(err(map_names::SERVICES))?,
                MapWrite::DeleteService(key) => {
                    let mut services = self.hash_map_mut::<ServiceKey, Service>(map_names::SERVICES)?;
                    remove_present(&mut services, key).map_err(err(map_names::SERVICES))?;
                }
                MapWrite::DeleteBackend(key) => {
                    let mut backends =
                        self.hash_map_mut::<BackendKey, Backend>(map_names::SERVICE_BACKENDS)?;
                    remove_present(&mut backends, key).map_err(err(map_names::SERVICE_BACKENDS))?;
                }
                MapWrite::ForgetAffinity { service_id, backends } => {
                    let name = map_names::SERVICE_AFFINITY;
                    let mut map = self.hash_map_mut::<AffinityKey, AffinityEntry>(name)?;
                    let known = match &mut affinities {
                        Some(known) => known,
                        None => affinities.insert(map.iter().collect::<Result<_, _>>().map_err(err(name))?),
                    };
                    let doomed = |(key, entry): &(AffinityKey, AffinityEntry)| {
                        key.service_id == *service_id
                            && backends.as_ref().is_none_or(|gone| gone.contains(&entry.backend))
                    };
                    for (key, _) in known.iter().filter(|e| doomed(e)) {
                        remove_present(&mut map, key).map_err(err(name))?;
                    }
                    known.retain(|e| !doomed(e));
                }
            }
            programmed.apply(write);
        }
        self.programmed_services = Some(programmed);
        self.update_services_flag()?;
        Ok(plan.report)
    }

    /// Set `NODE_FLAG_SERVICES` while any Service is programmed or any
    /// connection is tracked (its replies still need translating), clear it
    /// when neither: then TCP and UDP cost the programs no lookup. Only the
    /// flag changes in NODE_CONFIG. Returns whether it is set.
    pub fn update_services_flag(&mut self) -> Result<bool, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        let services = has_entries(&self.hash_map::<ServiceKey, Service>(map_names::SERVICES)?)
            .map_err(err(map_names::SERVICES))?;
        let on = services
            || has_entries(&self.hash_map::<ConntrackKey, ConntrackEntry>(map_names::CONNTRACK)?)
                .map_err(err(map_names::CONNTRACK))?;
        let config = self.node_config()?;
        let flags = if on { config.flags | NODE_FLAG_SERVICES } else { config.flags & !NODE_FLAG_SERVICES };
        if flags != config.flags {
            self.set_node_config(NodeConfig { flags, ..config })?;
            tracing::info!(on, "Service translation switched");
        }
        Ok(on)
    }

    /// Remove every connection that has been quiet for longer than its
    /// limit at `now_ns` (CLOCK_MONOTONIC, the programs' clock): closing
    /// (FIN or RST seen in either direction) after `closing_ns`, otherwise
    /// TCP after `tcp_idle_ns`, UDP after `udp_idle_ns`, counted from the
    /// later of its two directions' last packets. Both entries go together.
    pub fn conntrack_gc(&mut self, now_ns: u64, limits: &ConntrackLimits) -> Result<GcReport, DatapathError> {
        let mut map = self.hash_map_mut::<ConntrackKey, ConntrackEntry>(map_names::CONNTRACK)?;
        sweep_conntrack(&mut map, now_ns, limits)
    }
}
