//! The single-entry configuration maps: NODE_CONFIG and MONITOR_CONFIG.

use aya::maps::{Array, Map, MapData};
use datapath_common::{MonitorConfig, NodeConfig, map_names};

use crate::bpf::{Datapath, DatapathError};

impl Datapath {
    pub fn monitor_config(&self) -> Result<MonitorConfig, DatapathError> {
        read_entry(self.map(map_names::MONITOR_CONFIG)?, map_names::MONITOR_CONFIG)
    }

    /// Set what the programs report to the monitor.
    pub fn set_monitor_config(&mut self, config: MonitorConfig) -> Result<(), DatapathError> {
        let name = map_names::MONITOR_CONFIG;
        let mut array: Array<&mut MapData, MonitorConfig> =
            Array::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))?;
        array.set(0, config, 0).map_err(DatapathError::map(name))
    }

    pub fn set_node_config(&mut self, config: NodeConfig) -> Result<(), DatapathError> {
        let name = map_names::NODE_CONFIG;
        let mut array: Array<&mut MapData, NodeConfig> =
            Array::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))?;
        array.set(0, config, 0).map_err(DatapathError::map(name))
    }

    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        read_entry(self.map(map_names::NODE_CONFIG)?, map_names::NODE_CONFIG)
    }
}

/// The one entry of a single-entry array map `name`.
pub(super) fn read_entry<V: aya::Pod>(map: &Map, name: &'static str) -> Result<V, DatapathError> {
    let array: Array<&MapData, V> = Array::try_from(map).map_err(DatapathError::map(name))?;
    array.get(&0, 0).map_err(DatapathError::map(name))
}
