//! Loading the programs with their maps pinned (or private, for tests).

use std::{fs, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, links::PinnedLink},
};
use datapath_common::{DEFAULT_CONNTRACK_ENTRIES, MAX_TRAFFIC_SLOTS, map_names, program_names};

use crate::bpf::{
    DatapathError, PinLayout,
    ebpf::{DATAPATH_DEBUG_OBJECT, DATAPATH_OBJECT},
    map_pins::MapPins,
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
    pub(super) ebpf: Ebpf,
    pub(super) pins: PinLayout,
    /// Traffic counter slots held by endpoints (rebuilt from the map on load).
    pub(super) traffic_slots: std::collections::BTreeSet<u32>,
}

impl Datapath {
    /// Load the programs and pin their maps, with the sizes of `options`. A map pinned with
    /// another size (e.g. `conntrack_max_entries` changed) is migrated into
    /// a map of the new size, its entries kept; a pin of another layout is
    /// migrated or refused ([`crate::bpf::map_pins`]).
    pub fn load_pinned_with(
        pins: PinLayout,
        build: ProgramBuild,
        options: LoadOptions,
    ) -> Result<Self, DatapathError> {
        for dir in [pins.maps_dir(), pins.links_dir(), pins.to_pod_links_dir(), pins.node_links_dir()] {
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
        let mut datapath = Self { ebpf, pins, traffic_slots: Default::default() };
        // The new programs read each pod's isolation from its endpoint
        // entries: copied there before any link switches to them.
        let before_switch = map_pins
            .copy_before_switch(&mut datapath.ebpf)
            .map_err(DatapathError::from)
            .and_then(|()| datapath.load_programs())
            .and_then(|()| datapath.mirror_pinned_isolation().map(drop));
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
    pub(super) fn switch_pinned_links(&mut self) -> Result<(), DatapathError> {
        let mut links: Vec<(&'static str, String, PathBuf)> = Vec::new();
        let [(from_pod, from_pod_dir), (to_pod, to_pod_dir)] = self.pins.pod_link_dirs();
        let dirs =
            [(from_pod_dir, Some(from_pod)), (to_pod_dir, Some(to_pod)), (self.pins.node_links_dir(), None)];
        for (dir, pod_program) in dirs {
            let entries =
                fs::read_dir(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let (program, ifname) = match pod_program {
                    Some(program) => (program, file_name),
                    None => {
                        let Some((program, ifname)) = file_name.split_once('@') else { continue };
                        let known = [
                            program_names::FROM_UPLINK,
                            program_names::FROM_OVERLAY,
                            program_names::FROM_POD,
                        ];
                        let Some(program) = known.into_iter().find(|p| *p == program) else { continue };
                        (program, ifname.to_owned())
                    }
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
        Self::load_unpinned_build(options, ProgramBuild::Normal)
    }

    /// [`Self::load_unpinned_with`] of either build: the debug build's
    /// programs must pass the verifier too (its log calls need stack).
    pub fn load_unpinned_build(options: LoadOptions, build: ProgramBuild) -> Result<Self, DatapathError> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CONNTRACK, options.conntrack_entries)
            .load(build.object())
            .map_err(|source| DatapathError::Load { dir: PathBuf::new(), source: Box::new(source) })?;
        let mut datapath =
            Self { ebpf, pins: PinLayout::new("/nonexistent"), traffic_slots: Default::default() };
        datapath.load_programs()?;
        Ok(datapath)
    }

    pub(super) fn load_programs(&mut self) -> Result<(), DatapathError> {
        for name in program_names::ALL {
            self.program_mut(name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in program_names::SOCKET_ALL {
            self.sock_program_mut(name)?.load().map_err(|source| DatapathError::Program { name, source })?;
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

    pub(super) fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
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

    pub(super) fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::Missing { kind: "map", name })
    }

    pub(super) fn map(&self, name: &'static str) -> Result<&Map, DatapathError> {
        self.ebpf.map(name).ok_or(DatapathError::Missing { kind: "map", name })
    }

    /// The debug build's aya-log ring buffer, if this is the debug build.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn hash_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map_mut(name)?).map_err(DatapathError::map(name))
    }

    pub(super) fn hash_map<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, DatapathError> {
        HashMap::try_from(self.map(name)?).map_err(DatapathError::map(name))
    }
}
