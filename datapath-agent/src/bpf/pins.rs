//! Where the pinned objects live under the bpffs directory, and opening a pinned map.

use std::path::PathBuf;

use aya::maps::{Map, MapData};

use crate::bpf::DatapathError;

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
    /// Links of `to_pod` on the pod veths' TC egress, named after the veth.
    pub fn to_pod_links_dir(&self) -> PathBuf {
        self.root.join("to-pod-links")
    }
    pub fn to_pod_link(&self, host_ifname: &str) -> PathBuf {
        self.to_pod_links_dir().join(host_ifname)
    }
    /// The directories of per-pod links, with the program each one runs.
    pub fn pod_link_dirs(&self) -> [(&'static str, PathBuf); 2] {
        [
            (datapath_common::program_names::FROM_POD, self.links_dir()),
            (datapath_common::program_names::TO_POD, self.to_pod_links_dir()),
        ]
    }
    /// The directory a running `monitor` holds an exclusive flock on (see
    /// the observe room's monitor lock).
    pub fn monitor_lock(&self) -> PathBuf {
        self.root.join("monitor")
    }
    /// Links of the socket programs on the root cgroup, named after the program.
    pub fn socket_links_dir(&self) -> std::path::PathBuf {
        self.root.join("sock-links")
    }
    /// Links of node-level programs (uplink, VXLAN device), named
    /// `<program>@<interface>`.
    pub fn node_links_dir(&self) -> PathBuf {
        self.root.join("node-links")
    }
    pub fn node_link(&self, program: &str, ifname: &str) -> PathBuf {
        self.node_links_dir().join(format!("{program}@{ifname}"))
    }
    /// Everything the agent makes directly under the root (all of it
    /// directories): what `cleanup` removes, leaving anything else there.
    pub fn owned(&self) -> [PathBuf; 6] {
        [
            self.maps_dir(),
            self.links_dir(),
            self.to_pod_links_dir(),
            self.monitor_lock(),
            self.socket_links_dir(),
            self.node_links_dir(),
        ]
    }
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
            return Err(DatapathError::map(name)(source));
        }
    };
    Map::from_map_data(data).map_err(DatapathError::map(name))
}
