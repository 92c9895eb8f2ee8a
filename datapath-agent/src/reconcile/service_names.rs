//! The Service names records: who each programmed Service id is, one file
//! per id under the state directory, so that `inspect services` can name
//! Services while the agent is down.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, SERVICE_SCOPE_CLUSTER, SERVICE_SCOPE_OUTSIDE, ServiceKey};

use crate::reconcile::services::{ServicePort, protocol_name, service_key};

#[derive(Debug, thiserror::Error)]
pub enum ServiceNamesError {
    #[error("Service names file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Service names file {path} is unreadable")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Who a Service id is, for `inspect services` (the maps hold only
/// addresses and ids). The key fields let a reader tell a stale record
/// from the Service the map holds under the id now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceName {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// The entry serves clients outside the cluster (an external or load
    /// balancer address's second entry). Absent in files of earlier builds,
    /// whose entries all served the cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_outside: bool,
}

impl ServiceName {
    /// Whether this record is about the Service `key` held under `id`.
    pub fn names(&self, id: u32, key: &ServiceKey) -> bool {
        self.id == id
            && self.cluster_ip == Ipv4Addr::from(key.vip)
            && self.port == u16::from_be_bytes(key.port)
            && self.protocol == protocol_name(key.protocol)
            && self.from_outside == (key.scope == SERVICE_SCOPE_OUTSIDE)
    }
}

impl ServiceName {
    /// The record for `port`, programmed under `id`.
    pub fn of(id: u32, port: &ServicePort) -> Self {
        ServiceName {
            id,
            namespace: port.namespace.clone(),
            name: port.name.clone(),
            port_name: port.port_name.clone(),
            cluster_ip: port.address,
            port: port.port,
            protocol: protocol_name(port.protocol).to_owned(),
            from_outside: port.scope == SERVICE_SCOPE_OUTSIDE,
        }
    }

    /// The Service key this record is about.
    pub fn key(&self) -> Option<ServiceKey> {
        let protocol = match self.protocol.as_str() {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            _ => return None,
        };
        let scope = if self.from_outside { SERVICE_SCOPE_OUTSIDE } else { SERVICE_SCOPE_CLUSTER };
        Some(ServiceKey { scope, ..service_key(self.cluster_ip, self.port, protocol) })
    }
}

/// `<state_dir>/services/`: one `<id>.json` per programmed Service port, so
/// that one Service's change rewrites its own record, not every Service's.
pub fn names_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("services")
}

/// Write the record of `name.id` atomically (temp file + rename): a reader
/// sees the old record or the new one, never half.
pub fn save_name(state_dir: &Path, name: &ServiceName) -> Result<(), ServiceNamesError> {
    let dir = names_dir(state_dir);
    let path = dir.join(format!("{}.json", name.id));
    let tmp = dir.join(format!("{}.json.tmp", name.id));
    let text = serde_json::to_vec(name)
        .map_err(|source| ServiceNamesError::Decode { path: path.clone(), source })?;
    fs::create_dir_all(&dir)
        .and_then(|()| fs::write(&tmp, text))
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|source| ServiceNamesError::Io { path, source })
}

/// Remove the record of `id`; none there is fine.
pub fn remove_name(state_dir: &Path, id: u32) -> Result<(), ServiceNamesError> {
    let path = names_dir(state_dir).join(format!("{id}.json"));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ServiceNamesError::Io { path, source: e }),
        _ => Ok(()),
    }
}

/// Every saved record, by id; none if the agent never wrote any.
pub fn load_names(state_dir: &Path) -> Result<BTreeMap<u32, ServiceName>, ServiceNamesError> {
    let dir = names_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(ServiceNamesError::Io { path: dir, source }),
    };
    let mut names = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|source| ServiceNamesError::Io { path: dir.clone(), source })?.path();
        // Temp files of a write in progress are not records yet.
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = fs::read(&path).map_err(|source| ServiceNamesError::Io { path: path.clone(), source })?;
        let name: ServiceName =
            serde_json::from_slice(&bytes).map_err(|source| ServiceNamesError::Decode { path, source })?;
        names.insert(name.id, name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::model::SessionAffinity;

    fn service_port(port: u16, backends: &[u8]) -> ServicePort {
        ServicePort {
            namespace: "default".into(),
            name: "web".into(),
            port_name: None,
            address: Ipv4Addr::new(10, 96, 0, 10),
            port,
            protocol: IPPROTO_TCP,
            session_affinity: SessionAffinity::None,
            affinity_timeout_seconds: 10_800,
            backends: backends
                .iter()
                .map(|n| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, *n), 8080))
                .collect(),
            drop_without_backend: false,
            scope: datapath_common::SERVICE_SCOPE_CLUSTER,
        }
    }

    #[test]
    fn names_match_only_their_own_service_and_are_saved_one_file_each() {
        let key = service_port(80, &[1]).key();
        let name = ServiceName::of(4, &service_port(80, &[1]));
        assert!(name.names(4, &key));
        assert_eq!(name.key(), Some(key));
        assert!(!name.names(5, &key));
        assert!(!name.names(4, &service_port(81, &[]).key()));
        let dir = std::env::temp_dir().join(format!("dp-names-{}", std::process::id()));
        assert!(load_names(&dir).unwrap().is_empty());
        let other = ServiceName::of(7, &service_port(81, &[1]));
        save_name(&dir, &name).unwrap();
        save_name(&dir, &other).unwrap();
        assert_eq!(load_names(&dir).unwrap(), [(4, name.clone()), (7, other)].into());
        remove_name(&dir, 7).unwrap();
        remove_name(&dir, 7).unwrap();
        assert_eq!(load_names(&dir).unwrap(), [(4, name)].into());
        let _ = fs::remove_dir_all(&dir);
    }
}
