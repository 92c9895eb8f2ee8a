//! The agent's side of Service programming: which Services it serves (by
//! namespace and name), the Service maps brought to them, and the names
//! records `inspect services` reads. A change to one Service costs the
//! writes of that Service alone (maps and records), whatever the number of
//! Services; only a whole new list (start, config reload, a Kubernetes
//! relist) walks them all.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use datapath_common::{CT_FORWARD, IPPROTO_TCP, ServiceKey, TcpState};

use crate::{
    bpf::{Datapath, DatapathError, SyncReport},
    model::{ServiceConfig, ServiceRef},
    reconcile::{
        service_names::{self, ServiceName, ServiceNamesError},
        services::{
            self, MapWrite, ProgrammedState, ServiceChanges, ServicePlan, ServicePort, ThisNode, service_key,
        },
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServiceSyncError {
    #[error("programming the Service maps")]
    Datapath(#[source] DatapathError),
    #[error("recording the Service names for inspect")]
    Names(#[source] ServiceNamesError),
}

pub struct ServiceSync {
    state_dir: PathBuf,
    /// This node: the backends in its pod CIDR are local (traffic
    /// policies Local), its node ports are on its address.
    node: ThisNode,
    /// The other nodes' addresses: pods and the node's own sockets reach
    /// node ports on them too (translated here, like a cluster IP).
    peers: Vec<Ipv4Addr>,
    /// Every Service to serve: what the source said last.
    services: BTreeMap<ServiceRef, ServiceConfig>,
    /// The names records on disk, by key; `None` until first read.
    names: Option<HashMap<ServiceKey, ServiceName>>,
    /// Whether a whole list has been given yet. Until then the maps stay
    /// as an earlier agent left them (its connections go on).
    have_list: bool,
    /// Whether the maps and records match `services` (after a whole sync,
    /// until an error): then a change is applied as the writes it needs.
    /// Otherwise the next change, or [`Self::retry`], is a whole sync.
    in_sync: bool,
    /// What the Service maps hold, read from them at the first sync and kept
    /// up to date by each write after it (the agent is their only writer):
    /// one Service change then costs its own writes, not a read of them all.
    /// `None` after a failed write, so the next sync reads the maps again.
    programmed: Option<ProgrammedState>,
}

impl ServiceSync {
    pub fn new(state_dir: PathBuf, node: ThisNode) -> Self {
        ServiceSync {
            state_dir,
            node,
            peers: Vec::new(),
            services: BTreeMap::new(),
            names: None,
            have_list: false,
            in_sync: false,
            programmed: None,
        }
    }

    /// The Services to serve.
    pub fn services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.values()
    }

    /// Whether the maps are known to serve exactly [`Self::services`].
    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// The other nodes' addresses changed: their node port entries follow,
    /// as a whole sync (peers change rarely). Before the first Service list
    /// nothing is written: that list's sync includes them.
    pub fn set_peers(
        &mut self,
        datapath: &mut Datapath,
        mut peers: Vec<Ipv4Addr>,
    ) -> Result<SyncReport, ServiceSyncError> {
        peers.sort();
        peers.dedup();
        if peers == self.peers {
            return Ok(SyncReport::default());
        }
        self.peers = peers;
        let has_node_ports = self.services.values().any(|s| s.ports.iter().any(|p| p.node_port.is_some()));
        if !self.have_list || (self.in_sync && !has_node_ports) {
            return Ok(SyncReport::default());
        }
        self.whole_sync(datapath)
    }

    /// Serve exactly `list`. The first time (and after an error) that is a
    /// whole sync: every Service map entry and slot not in it goes, and so
    /// does every record no programmed Service port has (what an earlier
    /// agent left). After that only the Services that differ are written.
    pub fn replace_all(
        &mut self,
        datapath: &mut Datapath,
        list: Vec<ServiceConfig>,
    ) -> Result<SyncReport, ServiceSyncError> {
        let list: BTreeMap<ServiceRef, ServiceConfig> =
            list.into_iter().map(|s| (ServiceRef::of(&s), s)).collect();
        self.have_list = true;
        if !self.in_sync {
            self.services = list;
            return self.whole_sync(datapath);
        }
        let mut changed: BTreeMap<ServiceRef, Option<ServiceConfig>> = self
            .services
            .keys()
            .filter(|service| !list.contains_key(*service))
            .map(|service| (service.clone(), None))
            .collect();
        for (service, config) in list {
            if self.services.get(&service) != Some(&config) {
                changed.insert(service, Some(config));
            }
        }
        self.change(datapath, changed)
    }

    /// Apply the new state of some Services (`None`: gone), leaving all
    /// others untouched (a whole sync instead while not in sync).
    pub fn change(
        &mut self,
        datapath: &mut Datapath,
        changed: BTreeMap<ServiceRef, Option<ServiceConfig>>,
    ) -> Result<SyncReport, ServiceSyncError> {
        let mut old_ports = Vec::new();
        let mut new_ports = Vec::new();
        let stale = services::stale_backends(
            changed.iter().map(|(service, config)| (self.services.get(service), config.as_ref())),
            self.node,
            &self.peers,
        );
        for (service, config) in &changed {
            if let Some(old) = self.services.get(service) {
                old_ports.extend(services::desired_services([old], self.node, &self.peers));
            }
            if let Some(new) = config {
                new_ports.extend(services::desired_services([new], self.node, &self.peers));
            }
        }
        for (service, config) in changed {
            match config {
                Some(config) => self.services.insert(service, config),
                None => self.services.remove(&service),
            };
        }
        if !self.in_sync {
            return if self.have_list { self.whole_sync(datapath) } else { Ok(SyncReport::default()) };
        }
        // Until this succeeds, the next change is a whole sync.
        self.in_sync = false;
        // Gone first, so a key that moved to another Service is kept.
        let mut changes: ServiceChanges = old_ports.iter().map(|p| (p.key(), None)).collect();
        changes.extend(new_ports.iter().map(|p| (p.key(), Some(p))));
        let report = self
            .sync_maps(datapath, |programmed| services::plan_changes(programmed, &changes))
            .map_err(ServiceSyncError::Datapath)?;
        let by_key: HashMap<ServiceKey, &ServicePort> = new_ports.iter().map(|p| (p.key(), p)).collect();
        self.record_names(datapath, changes.into_keys().collect(), &by_key)?;
        // After the maps: no new connection can pick a stale backend now.
        if !stale.is_empty() {
            let forgotten = datapath
                .forget_connections(|key, entry, pair| {
                    entry.kind == CT_FORWARD
                        && (key.protocol != IPPROTO_TCP
                            || TcpState::of(entry.kind, entry.flags, pair.map_or(0, |p| p.flags))
                                == TcpState::Closing)
                        && stale
                            .get(&service_key(key.daddr.into(), u16::from_be_bytes(key.dport), key.protocol))
                            .is_some_and(|gone| {
                                gone.iter().any(|b| b.ipv4 == entry.nat_addr && b.port == entry.nat_port)
                            })
                })
                .map_err(ServiceSyncError::Datapath)?;
            if forgotten > 0 {
                tracing::info!(
                    forgotten,
                    "UDP connections and closed TCP connections to backends that left their Service removed"
                );
            }
        }
        self.in_sync = true;
        Ok(report)
    }

    /// What each Service address and port serves from now (the
    /// collector's test for connections to a backend that left: see
    /// [`crate::reconcile::conntrack::departed`]); `None` while the maps are
    /// not known to match a whole list.
    pub fn serving(&self) -> Option<services::ServingIndex> {
        (self.have_list && self.in_sync)
            .then(|| services::ServingIndex::of(self.services.values(), self.node, &self.peers))
    }

    /// After a failed sync: try again, as a whole sync. Nothing to do when
    /// in sync, or before the first list.
    pub fn retry(&mut self, datapath: &mut Datapath) -> Result<Option<SyncReport>, ServiceSyncError> {
        if self.in_sync || !self.have_list {
            return Ok(None);
        }
        self.whole_sync(datapath).map(Some)
    }

    fn whole_sync(&mut self, datapath: &mut Datapath) -> Result<SyncReport, ServiceSyncError> {
        let desired = services::desired_services(self.services.values(), self.node, &self.peers);
        let report = self
            .sync_maps(datapath, |programmed| services::plan_sync(programmed, &desired))
            .map_err(ServiceSyncError::Datapath)?;
        // Read the records again: a failed sync may have left any.
        self.names = None;
        let names = self.names()?;
        let mut keys: Vec<ServiceKey> = names.keys().copied().collect();
        keys.extend(desired.iter().map(ServicePort::key));
        let by_key: HashMap<ServiceKey, &ServicePort> = desired.iter().map(|p| (p.key(), p)).collect();
        self.record_names(datapath, keys, &by_key)?;
        self.in_sync = true;
        Ok(report)
    }

    fn names(&mut self) -> Result<&mut HashMap<ServiceKey, ServiceName>, ServiceSyncError> {
        if self.names.is_none() {
            let on_disk = service_names::load_names(&self.state_dir).map_err(ServiceSyncError::Names)?;
            let mut names = HashMap::new();
            for (id, name) in on_disk {
                match name.key() {
                    Some(key) => {
                        names.insert(key, name);
                    }
                    None => {
                        service_names::remove_name(&self.state_dir, id).map_err(ServiceSyncError::Names)?
                    }
                }
            }
            self.names = Some(names);
        }
        Ok(self.names.get_or_insert_default())
    }

    /// Bring the records of `keys` in line with the maps: a programmed key
    /// gets the record of its port in `desired` under its id, any other
    /// loses its record.
    fn record_names(
        &mut self,
        datapath: &mut Datapath,
        keys: Vec<ServiceKey>,
        desired: &HashMap<ServiceKey, &ServicePort>,
    ) -> Result<(), ServiceSyncError> {
        let state_dir = self.state_dir.clone();
        let programmed = self.programmed(datapath).map_err(ServiceSyncError::Datapath)?;
        let ids: Vec<(ServiceKey, Option<u32>)> =
            keys.into_iter().map(|k| (k, programmed.services.get(&k).map(|s| s.id))).collect();
        let names = self.names()?;
        let io = ServiceSyncError::Names;
        let mut writes = Vec::new();
        // Every stale record goes before any new one is written: a stale
        // record may hold the id a new one takes.
        for (key, id) in ids {
            let want = id.zip(desired.get(&key)).map(|(id, port)| ServiceName::of(id, port));
            if names.get(&key) == want.as_ref() {
                continue;
            }
            if let Some(old) = names.get(&key) {
                service_names::remove_name(&state_dir, old.id).map_err(io)?;
                names.remove(&key);
            }
            writes.extend(want.map(|name| (key, name)));
        }
        for (key, name) in writes {
            service_names::save_name(&state_dir, &name).map_err(io)?;
            names.insert(key, name);
        }
        Ok(())
    }

    /// Make the Service maps serve what `plan_of` plans from what they hold,
    /// changing only what differs, in an order no packet can catch half done
    /// (see [`services::plan_sync`]); then switch the programs' Service
    /// lookups on or off ([`Datapath::update_services_flag`]). Connections
    /// already tracked keep their backend: conntrack is not touched.
    fn sync_maps(
        &mut self,
        datapath: &mut Datapath,
        plan_of: impl FnOnce(&ProgrammedState) -> ServicePlan,
    ) -> Result<SyncReport, DatapathError> {
        let mut programmed = self.take_programmed(datapath)?;
        let plan = plan_of(&programmed);
        // On an error `programmed` is dropped: the next sync reads the maps.
        carry_out(datapath, &mut programmed, &plan)?;
        self.programmed = Some(programmed);
        datapath.update_services_flag()?;
        Ok(plan.report)
    }

    /// What the Service maps hold, from the record of our own writes (read
    /// from the maps once, or after a failed write).
    fn programmed(&mut self, datapath: &Datapath) -> Result<&ProgrammedState, DatapathError> {
        let state = self.take_programmed(datapath)?;
        Ok(self.programmed.insert(state))
    }

    fn take_programmed(&mut self, datapath: &Datapath) -> Result<ProgrammedState, DatapathError> {
        match self.programmed.take() {
            Some(state) => Ok(state),
            None => Ok(ProgrammedState::new(datapath.service_entries()?, datapath.backend_slots()?)),
        }
    }
}

/// Carry out the writes of `plan` in order, keeping `programmed` in step.
fn carry_out(
    datapath: &mut Datapath,
    programmed: &mut ProgrammedState,
    plan: &ServicePlan,
) -> Result<(), DatapathError> {
    // Read once, at the first affinity to forget: affinities the programs
    // add later are for backends still wanted.
    let mut affinities: Option<Vec<_>> = None;
    for write in &plan.writes {
        match write {
            MapWrite::PutBackend(key, backend) => datapath.put_backend(key, backend)?,
            MapWrite::PutService(key, service) => datapath.put_service(key, service)?,
            MapWrite::DeleteService(key) => datapath.delete_service(key)?,
            MapWrite::DeleteBackend(key) => datapath.delete_backend(key)?,
            MapWrite::ForgetAffinity { service_id, backends } => {
                let known = match &mut affinities {
                    Some(known) => known,
                    None => affinities.insert(datapath.service_affinities()?),
                };
                let doomed =
                    |(key, entry): &(datapath_common::AffinityKey, datapath_common::AffinityEntry)| {
                        key.service_id == *service_id
                            && backends.as_ref().is_none_or(|gone| gone.contains(&entry.backend))
                    };
                for (key, _) in known.iter().filter(|e| doomed(e)) {
                    datapath.delete_affinity(key)?;
                }
                known.retain(|e| !doomed(e));
            }
        }
        programmed.apply(write);
    }
    Ok(())
}
