//! The Service maps (SERVICES, SERVICE_BACKENDS, SERVICE_AFFINITY): typed
//! reads and writes, and the programs' Service switch in NODE_CONFIG. What
//! to write, and in which order, is the planner's (`reconcile::services`).

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData};
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, ConntrackEntry, ConntrackKey, NODE_FLAG_SERVICES,
    NodeConfig, Service, ServiceKey, map_names,
};

use crate::bpf::{
    Datapath, DatapathError,
    maps::{get_present, has_entries, remove_present},
};

/// A Service port as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedService {
    pub key: ServiceKey,
    pub service: Service,
    /// The backends in slots 0..backend_count, in slot order.
    pub backends: Vec<Backend>,
}

impl Datapath {
    /// Every Service port with its backends, by key.
    pub fn services(&self) -> Result<Vec<ProgrammedService>, DatapathError> {
        read_services(self.map(map_names::SERVICES)?, self.map(map_names::SERVICE_BACKENDS)?)
    }

    /// Every SERVICES entry, as it is.
    pub fn service_entries(&self) -> Result<BTreeMap<ServiceKey, Service>, DatapathError> {
        let name = map_names::SERVICES;
        self.hash_map::<ServiceKey, Service>(name)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(name))
    }

    /// Every SERVICE_BACKENDS slot, including any no Service reaches.
    pub fn backend_slots(&self) -> Result<BTreeMap<BackendKey, Backend>, DatapathError> {
        let name = map_names::SERVICE_BACKENDS;
        self.hash_map::<BackendKey, Backend>(name)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(name))
    }

    pub fn put_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DatapathError> {
        let name = map_names::SERVICES;
        self.hash_map_mut::<ServiceKey, Service>(name)?
            .insert(key, service, 0)
            .map_err(DatapathError::map(name))
    }

    /// Remove a SERVICES entry; an absent one is fine.
    pub fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        let name = map_names::SERVICES;
        remove_present(&mut self.hash_map_mut::<ServiceKey, Service>(name)?, key)
            .map(drop)
            .map_err(DatapathError::map(name))
    }

    pub fn put_backend(&mut self, key: &BackendKey, backend: &Backend) -> Result<(), DatapathError> {
        let name = map_names::SERVICE_BACKENDS;
        self.hash_map_mut::<BackendKey, Backend>(name)?
            .insert(key, backend, 0)
            .map_err(DatapathError::map(name))
    }

    /// Remove a SERVICE_BACKENDS slot; an absent one is fine.
    pub fn delete_backend(&mut self, key: &BackendKey) -> Result<(), DatapathError> {
        let name = map_names::SERVICE_BACKENDS;
        remove_present(&mut self.hash_map_mut::<BackendKey, Backend>(name)?, key)
            .map(drop)
            .map_err(DatapathError::map(name))
    }

    /// Every ClientIP affinity the programs have recorded.
    pub fn service_affinities(&self) -> Result<Vec<(AffinityKey, AffinityEntry)>, DatapathError> {
        let name = map_names::SERVICE_AFFINITY;
        self.hash_map::<AffinityKey, AffinityEntry>(name)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(name))
    }

    /// Remove a SERVICE_AFFINITY entry; an absent one is fine.
    pub fn delete_affinity(&mut self, key: &AffinityKey) -> Result<(), DatapathError> {
        let name = map_names::SERVICE_AFFINITY;
        remove_present(&mut self.hash_map_mut::<AffinityKey, AffinityEntry>(name)?, key)
            .map(drop)
            .map_err(DatapathError::map(name))
    }

    /// Remove the tracked connections (both entries) whose forward entry
    /// `stale` says to forget: given its key, entry and the other
    /// direction's entry (if any), true to remove. Returns how many
    /// connections went. The keys are read first and removed afterwards
    /// (removing while walking restarts the walk).
    pub fn forget_connections(
        &mut self,
        stale: impl Fn(&ConntrackKey, &ConntrackEntry, Option<&ConntrackEntry>) -> bool,
    ) -> Result<usize, DatapathError> {
        let name = map_names::CONNTRACK;
        let mut map = self.hash_map_mut::<ConntrackKey, ConntrackEntry>(name)?;
        let entries: std::collections::HashMap<ConntrackKey, ConntrackEntry> =
            map.iter().collect::<Result<_, _>>().map_err(DatapathError::map(name))?;
        let doomed: Vec<(ConntrackKey, ConntrackEntry)> = entries
            .iter()
            .filter(|(key, entry)| stale(key, entry, entries.get(&key.pair(entry))))
            .map(|(key, entry)| (*key, *entry))
            .collect();
        for (key, entry) in &doomed {
            remove_present(&mut map, key).map_err(DatapathError::map(name))?;
            remove_present(&mut map, &key.pair(entry)).map_err(DatapathError::map(name))?;
        }
        Ok(doomed.len())
    }

    /// Set `NODE_FLAG_SERVICES` while any Service is programmed or any
    /// connection is tracked (its replies still need translating), clear it
    /// when neither: then TCP and UDP cost the programs no lookup. Only the
    /// flag changes in NODE_CONFIG. Returns whether it is set.
    pub fn update_services_flag(&mut self) -> Result<bool, DatapathError> {
        let services = has_entries(&self.hash_map::<ServiceKey, Service>(map_names::SERVICES)?)
            .map_err(DatapathError::map(map_names::SERVICES))?;
        let on = services
            || has_entries(&self.hash_map::<ConntrackKey, ConntrackEntry>(map_names::CONNTRACK)?)
                .map_err(DatapathError::map(map_names::CONNTRACK))?;
        let config = self.node_config()?;
        let flags = if on { config.flags | NODE_FLAG_SERVICES } else { config.flags & !NODE_FLAG_SERVICES };
        if flags != config.flags {
            self.set_node_config(NodeConfig { flags, ..config })?;
            tracing::info!(on, "Service translation switched");
        }
        Ok(on)
    }
}

pub(super) fn read_services(services: &Map, backends: &Map) -> Result<Vec<ProgrammedService>, DatapathError> {
    let services: HashMap<&MapData, ServiceKey, Service> =
        HashMap::try_from(services).map_err(DatapathError::map(map_names::SERVICES))?;
    let backends: HashMap<&MapData, BackendKey, Backend> =
        HashMap::try_from(backends).map_err(DatapathError::map(map_names::SERVICE_BACKENDS))?;
    let entries: Vec<(ServiceKey, Service)> =
        services.iter().collect::<Result<_, _>>().map_err(DatapathError::map(map_names::SERVICES))?;
    let mut out = Vec::with_capacity(entries.len());
    for (key, service) in entries {
        let mut slots = Vec::with_capacity(service.backend_count as usize);
        for slot in 0..service.backend_count {
            let slot_key = BackendKey { service_id: service.id, slot };
            if let Some(backend) =
                get_present(&backends, &slot_key).map_err(DatapathError::map(map_names::SERVICE_BACKENDS))?
            {
                slots.push(backend);
            }
        }
        out.push(ProgrammedService { key, service, backends: slots });
    }
    out.sort_by_key(|s| s.key);
    Ok(out)
}
