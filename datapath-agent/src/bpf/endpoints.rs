//! Local pod endpoints: the ENDPOINTS and POD_INTERFACES entries, their
//! traffic counter slots (ENDPOINT_TRAFFIC) and the allocator of those slots.

use std::{fs, io, net::Ipv4Addr};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use datapath_api::mac::MacAddr;
use datapath_common::{
    ENDPOINT_FLAG_HOST_DOWN, Endpoint, EndpointKey, EndpointTraffic, MAX_TRAFFIC_SLOTS, NO_TRAFFIC_SLOT,
    PodInterface, map_names,
};

use crate::bpf::{
    Datapath, DatapathError,
    links::interface_exists,
    maps::{get_present, remove_present},
};

/// A local pod endpoint as the agent programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub pod_ipv4: Ipv4Addr,
    pub pod_mac: MacAddr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
}

/// What [`Datapath::restore_endpoint`] put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Its ENDPOINTS and POD_INTERFACES entries.
    pub entries: bool,
    /// Its `from_pod` link (attached and pinned).
    pub link: bool,
    /// Its `to_pod` link: missing for pods made by a build without it.
    pub to_pod_link: bool,
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

impl Datapath {
    pub(super) fn endpoints_mut(
        &mut self,
    ) -> Result<HashMap<&mut MapData, EndpointKey, Endpoint>, DatapathError> {
        let name = map_names::ENDPOINTS;
        HashMap::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))
    }

    pub(super) fn pod_interfaces_mut(
        &mut self,
    ) -> Result<HashMap<&mut MapData, u32, PodInterface>, DatapathError> {
        let name = map_names::POD_INTERFACES;
        HashMap::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))
    }

    /// Register a pod and attach the programs to its host veth. Maps first,
    /// then the links, so the program never runs on a veth it does not know.
    /// Re-adding the same veth updates the entries and keeps the existing links.
    pub fn add_endpoint(&mut self, ep: &LocalEndpoint) -> Result<(), DatapathError> {
        self.write_endpoint_entries(ep)?;
        self.attach(&ep.host_ifname, ep.host_ifindex)?;
        self.attach_to_pod(&ep.host_ifname, ep.host_ifindex)
    }

    /// The ENDPOINTS and POD_INTERFACES entries of `ep`, as ADD writes them.
    pub(super) fn write_endpoint_entries(&mut self, ep: &LocalEndpoint) -> Result<(), DatapathError> {
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
        // The pod's isolation as NetworkPolicy has it (written before these
        // entries: a new pod is isolated before it is reachable).
        let isolation = self.policy_isolation(ep.pod_ipv4)?;
        self.pod_interfaces_mut()?
            .insert(
                ep.host_ifindex,
                PodInterface {
                    pod_ipv4: ep.pod_ipv4.octets(),
                    host_mac: ep.host_mac.0,
                    isolation: isolation as u8,
                    _pad: 0,
                    traffic_slot,
                },
                0,
            )
            .map_err(DatapathError::map(map_names::POD_INTERFACES))?;
        self.endpoints_mut()?
            .insert(
                key,
                Endpoint {
                    host_ifindex: ep.host_ifindex,
                    pod_mac: ep.pod_mac.0,
                    host_mac: ep.host_mac.0,
                    flags: 0,
                    traffic_slot,
                }
                .with_isolation(isolation),
                0,
            )
            .map_err(DatapathError::map(map_names::ENDPOINTS))
    }

    /// Put back what is missing of a live endpoint (its veth exists) that
    /// ADD made: its map entries and its program link, as ADD made them
    /// (the pins were lost, or someone removed its link pin). What is in
    /// place is not touched; an IP whose entry points at another interface
    /// that exists is left to that one.
    pub fn restore_endpoint(&mut self, ep: &LocalEndpoint) -> Result<Restored, DatapathError> {
        let mut restored = Restored::default();
        let endpoint = get_present(&self.endpoints_mut()?, &EndpointKey { ipv4: ep.pod_ipv4.octets() })
            .map_err(DatapathError::map(map_names::ENDPOINTS))?;
        let interface = get_present(&self.pod_interfaces_mut()?, &ep.host_ifindex)
            .map_err(DatapathError::map(map_names::POD_INTERFACES))?;
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
        // Pinned is not enough: a link detached by hand keeps its pin.
        let pin = self.pins.link(&ep.host_ifname);
        if !super::links::link_attached(&pin, datapath_common::program_names::FROM_POD, &ep.host_ifname)? {
            self.reattach(datapath_common::program_names::FROM_POD, &ep.host_ifname, ep.host_ifindex, pin)?;
            restored.link = true;
        }
        let pin = self.pins.to_pod_link(&ep.host_ifname);
        if !super::links::link_attached(&pin, datapath_common::program_names::TO_POD, &ep.host_ifname)? {
            self.reattach(datapath_common::program_names::TO_POD, &ep.host_ifname, ep.host_ifindex, pin)?;
            restored.to_pod_link = true;
        }
        Ok(restored)
    }

    /// The lowest free traffic slot, its counters zeroed (a previous pod may
    /// have used it); [`NO_TRAFFIC_SLOT`] when all are taken (the pod then
    /// forwards normally, uncounted).
    pub(super) fn allocate_traffic_slot(&mut self) -> Result<u32, DatapathError> {
        let Some(slot) = (0..MAX_TRAFFIC_SLOTS).find(|slot| !self.traffic_slots.contains(slot)) else {
            tracing::warn!(
                max = MAX_TRAFFIC_SLOTS,
                "all traffic counter slots taken; this pod is not counted"
            );
            return Ok(NO_TRAFFIC_SLOT);
        };
        let name = map_names::ENDPOINT_TRAFFIC;
        let map_err = DatapathError::map(name);
        let cpus =
            aya::util::nr_cpus().map_err(|(_, source)| map_err(aya::maps::MapError::IoError(source)))?;
        let mut traffic: PerCpuArray<&mut MapData, EndpointTraffic> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err)?;
        let zeroes = PerCpuValues::try_from(vec![EndpointTraffic::default(); cpus])
            .map_err(|source| map_err(aya::maps::MapError::IoError(source)))?;
        traffic.set(slot, zeroes, 0).map_err(map_err)?;
        self.traffic_slots.insert(slot);
        Ok(slot)
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
            let map_err = DatapathError::map(name);
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
        let map_err = DatapathError::map(name);
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
        for pin in [self.pins.link(host_ifname), self.pins.to_pod_link(host_ifname)] {
            match fs::remove_file(&pin) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Unpin { path: pin, source }),
            }
        }
        Ok(removed)
    }

    /// Forget every POD_INTERFACES and ENDPOINTS entry whose host veth no
    /// longer exists (its pod's namespace went before DEL came, or an agent
    /// that did not know better left it): such an entry can never carry a
    /// packet, and it would hold its slot until the index were reused. An
    /// entry of a live interface is never touched.
    pub fn sweep_gone_interfaces(&mut self) -> Result<SweepReport, DatapathError> {
        let mut report = SweepReport::default();
        let name = map_names::POD_INTERFACES;
        let ifindexes: Vec<u32> =
            self.pod_interfaces_mut()?.keys().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
        for ifindex in ifindexes {
            if !interface_exists(ifindex)? {
                let removed = remove_present(&mut self.pod_interfaces_mut()?, &ifindex)
                    .map_err(DatapathError::map(name))?;
                report.interfaces += usize::from(removed);
            }
        }
        let name = map_names::ENDPOINTS;
        for (ip, endpoint) in self.endpoints()? {
            if !interface_exists(endpoint.host_ifindex)? {
                let removed = remove_present(&mut self.endpoints_mut()?, &EndpointKey { ipv4: ip.octets() })
                    .map_err(DatapathError::map(name))?;
                report.endpoints += usize::from(removed);
            }
        }
        if report.endpoints > 0 {
            self.release_unused_traffic_slots()?;
        }
        Ok(report)
    }

    /// Forget slots no endpoint holds any more.
    pub(super) fn release_unused_traffic_slots(&mut self) -> Result<(), DatapathError> {
        let held: std::collections::BTreeSet<u32> =
            self.endpoints()?.iter().map(|(_, ep)| ep.traffic_slot).collect();
        self.traffic_slots.retain(|slot| held.contains(slot));
        Ok(())
    }

    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
        read_endpoints(self.map(map_names::ENDPOINTS)?)
    }

    pub fn endpoint_traffic(&self, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
        read_traffic(self.map(map_names::ENDPOINT_TRAFFIC)?, traffic_slot)
    }

    /// Direct map access for packet-level tests and the per-packet bench
    /// (unpinned datapath); the agent itself writes through its reconcilers.
    #[cfg(feature = "test-support")]
    pub fn insert_pod_interface(&mut self, ifindex: u32, iface: PodInterface) -> Result<(), DatapathError> {
        let name = map_names::POD_INTERFACES;
        self.pod_interfaces_mut()?.insert(ifindex, iface, 0).map_err(DatapathError::map(name))
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
        let err = DatapathError::map(name);
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

    /// Direct map access for packet-level tests and the per-packet bench.
    #[cfg(feature = "test-support")]
    pub fn insert_endpoint(&mut self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        let name = map_names::ENDPOINTS;
        self.endpoints_mut()?
            .insert(EndpointKey { ipv4: ip.octets() }, ep, 0)
            .map_err(DatapathError::map(name))
    }
}

pub(super) fn read_endpoints(map: &Map) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
    let name = map_names::ENDPOINTS;
    let endpoints: HashMap<&MapData, EndpointKey, Endpoint> =
        HashMap::try_from(map).map_err(DatapathError::map(name))?;
    let mut out: Vec<(Ipv4Addr, Endpoint)> = endpoints
        .iter()
        .map(|entry| entry.map(|(k, v)| (Ipv4Addr::from(k.ipv4), v)))
        .collect::<Result<_, _>>()
        .map_err(DatapathError::map(name))?;
    out.sort_by_key(|(ip, _)| *ip);
    Ok(out)
}

pub(super) fn read_traffic(map: &Map, traffic_slot: u32) -> Result<EndpointTraffic, DatapathError> {
    let name = map_names::ENDPOINT_TRAFFIC;
    if traffic_slot >= MAX_TRAFFIC_SLOTS {
        return Ok(EndpointTraffic::default());
    }
    let array: PerCpuArray<&MapData, EndpointTraffic> =
        PerCpuArray::try_from(map).map_err(DatapathError::map(name))?;
    let per_cpu = array.get(&traffic_slot, 0).map_err(DatapathError::map(name))?;
    Ok(per_cpu.iter().fold(EndpointTraffic::default(), |sum, t| EndpointTraffic {
        sent_packets: sum.sent_packets + t.sent_packets,
        sent_bytes: sum.sent_bytes + t.sent_bytes,
        delivered_packets: sum.delivered_packets + t.delivered_packets,
        delivered_bytes: sum.delivered_bytes + t.delivered_bytes,
    }))
}
