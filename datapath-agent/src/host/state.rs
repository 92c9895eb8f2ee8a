//! The agent's record of each local endpoint, persisted as one JSON file per
//! host veth under `<state_dir>/endpoints/`: who the pod is (container ID,
//! interface, Kubernetes namespace/name) and what ADD gave it. The maps say
//! how to forward; these files say whose endpoint it is, for CHECK, GC,
//! idempotent ADD and `inspect`. Written atomically (temp file + rename).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use datapath_api::EndpointSpec;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("endpoint state in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint state file {path} is unreadable")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone)]
pub struct EndpointStore {
    dir: PathBuf,
}

impl EndpointStore {
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let dir = endpoints_dir(state_dir);
        fs::create_dir_all(&dir).map_err(|source| StateError::Io { path: dir.clone(), source })?;
        Ok(Self { dir })
    }

    fn path(&self, host_ifname: &str) -> PathBuf {
        self.dir.join(format!("{host_ifname}.json"))
    }

    pub fn save(&self, spec: &EndpointSpec) -> Result<(), StateError> {
        let path = self.path(&spec.host_ifname);
        let tmp = path.with_extension("json.tmp");
        let io_err = |source| StateError::Io { path: path.clone(), source };
        let text = serde_json::to_vec_pretty(spec)
            .map_err(|source| StateError::Decode { path: path.clone(), source })?;
        fs::write(&tmp, text).map_err(io_err)?;
        fs::rename(&tmp, &path).map_err(io_err)
    }

    pub fn remove(&self, host_ifname: &str) -> Result<bool, StateError> {
        let path = self.path(host_ifname);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn get(&self, host_ifname: &str) -> Result<Option<EndpointSpec>, StateError> {
        let path = self.path(host_ifname);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| StateError::Decode { path, source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Every record, sorted by pod address.
    pub fn list(&self) -> Result<Vec<EndpointSpec>, StateError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|source| StateError::Io { path: self.dir.clone(), source })?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|source| StateError::Io { path: self.dir.clone(), source })?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes =
                    fs::read(&path).map_err(|source| StateError::Io { path: path.clone(), source })?;
                out.push(
                    serde_json::from_slice(&bytes).map_err(|source| StateError::Decode { path, source })?,
                );
            }
        }
        out.sort_by_key(|e: &EndpointSpec| e.pod_ipv4);
        Ok(out)
    }
}

/// `<state_dir>/endpoints/`: one record per endpoint.
pub fn endpoints_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("endpoints")
}
