//! The pinned maps, checked against this build's layouts before the
//! programs are loaded: each is reused, migrated into a new map, or refused.
//!
//! aya's `EbpfLoader::map_pin_path` reuses whatever map is pinned at a path,
//! so nothing reaches the loader unchecked. For each map of [`LAYOUTS`] the
//! pin `maps/<name>-v<version>` (or `maps/<name>`, from builds before
//! layout versions, which had version 1) is compared with what this
//! build's object defines: map type, key size, value size, capacity, flags.
//!
//! - Same version and shape: reused as it is (an unversioned pin is renamed
//!   to its versioned name: the same map, nothing copied).
//! - Same version and key/value layout, another capacity or flags (e.g.
//!   `conntrack_max_entries` changed): migrated.
//! - An older version with an [`crate::bpf::map_layout::Upgrade`]: migrated.
//! - Anything else (a newer version, an older one without a conversion,
//!   other key or value sizes under the same version): refused with a
//!   message naming the map and what to do, before anything is touched;
//!   or, for maps whose loss is harmless ([`Incompatible::StartEmpty`]:
//!   counters, monitor state, fragments in flight), replaced by an empty
//!   map with a warning.
//!
//! A migration creates the new map pinned at `<pin>-new`, copies the
//! entries, loads the programs, switches every pinned link to them with
//! `bpf_link_update` (atomic: no packet meets a missing program), copies
//! what the old programs added meanwhile, and only then commits: renames
//! `<pin>-new` to `<pin>` and removes the old pin. An agent killed before
//! the commit leaves the old pin authoritative: the next start removes the
//! unfinished `-new` pin and migrates again.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    fmt, fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapError, MapInfo, MapType},
    programs::{
        ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use aya_obj::generated::bpf_map_type;
use datapath_common::map_names;

use crate::{
    bpf::PinLayout,
    bpf::map_layout::{Copied, CopyFn, Entries, Incompatible, LAYOUTS, MapLayout, UNVERSIONED_PIN_VERSION},
};

mod shape;

pub use shape::{LayoutError, PathList, Reason, Shape};

/// Suffix of a migration's new map until it is committed.
const UNFINISHED: &str = "-new";

/// What becomes of one map.
#[derive(Clone, Copy)]
pub enum Action {
    /// Nothing pinned: the loader creates the map at its pin.
    Create,
    /// The map pinned at `from` is used as it is (renamed to its versioned
    /// pin at the commit if it is elsewhere).
    Reuse,
    /// A new map gets the entries of the one pinned at `from`.
    Migrate { entries: Entries, reason: Reason },
    /// A new empty map replaces the one pinned at `from` (a warning).
    Replace { reason: Reason },
}

/// One map's plan.
pub struct MapPlan {
    pub layout: &'static MapLayout,
    /// Where the map is pinned once this start is done: `maps/<name>-v<version>`.
    pub pin: PathBuf,
    /// The pin in use now, if any.
    pub from: Option<PathBuf>,
    pub action: Action,
    /// Other pins of the same map (other versions, unversioned): removed
    /// once the programs use the map at `pin`.
    pub stale: Vec<PathBuf>,
}

impl MapPlan {
    fn unfinished_pin(&self) -> PathBuf {
        let mut name = self.pin.clone().into_os_string();
        name.push(UNFINISHED);
        PathBuf::from(name)
    }

    fn makes_new_map(&self) -> bool {
        matches!(self.action, Action::Migrate { .. } | Action::Replace { .. })
    }

    /// Where the loader finds (or creates) the map.
    pub fn load_path(&self) -> PathBuf {
        match (&self.action, &self.from) {
            (Action::Reuse, Some(from)) => from.clone(),
            (Action::Migrate { .. } | Action::Replace { .. }, _) => self.unfinished_pin(),
            _ => self.pin.clone(),
        }
    }
}

/// The decision for one pin of a map, from its version and shape alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    Reuse,
    Migrate(Reason),
    Upgrade(u32),
    Replace(Reason),
    Newer,
    NoUpgrade,
    OtherShape,
}

pub(crate) fn verdict(layout: &MapLayout, expected: &Shape, version: u32, found: &Shape) -> Verdict {
    let harmless = layout.incompatible == Incompatible::StartEmpty;
    let incompatible = Reason::Incompatible { version, found: *found };
    if version == layout.version {
        if !found.same_layout(expected) {
            return if harmless { Verdict::Replace(incompatible) } else { Verdict::OtherShape };
        }
        if found == expected {
            return Verdict::Reuse;
        }
        return Verdict::Migrate(Reason::Resized { from: *found });
    }
    if version < layout.version && layout.upgrades.iter().any(|u| u.from_version == version) {
        return Verdict::Upgrade(version);
    }
    match (harmless, version > layout.version) {
        (true, _) => Verdict::Replace(incompatible),
        (false, true) => Verdict::Newer,
        (false, false) => Verdict::NoUpgrade,
    }
}

/// A pin of one of our maps found under `maps/`.
#[derive(Debug, Clone)]
struct Found {
    path: PathBuf,
    version: u32,
    shape: Shape,
    id: u32,
}

/// The maps of this build's object, as the loader will create them.
fn expected_shapes(
    object: &[u8],
    max_entries: &[(&'static str, u32)],
) -> Result<StdHashMap<&'static str, Shape>, LayoutError> {
    let parsed =
        aya_obj::Object::parse(object).map_err(|source| LayoutError::Object { source: Box::new(source) })?;
    let mut shapes = StdHashMap::new();
    for layout in LAYOUTS {
        let name = layout.name;
        let map = parsed.maps.get(name).ok_or(LayoutError::NotInObject { name, source: None })?;
        let kind = bpf_map_type::try_from(map.map_type())
            .map_err(MapError::from)
            .and_then(MapType::try_from)
            .map_err(|source| LayoutError::NotInObject { name, source: Some(source) })?;
        let mut shape = Shape {
            map_type: kind,
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        };
        // What aya's loader does to these before creating them.
        if let Some((_, entries)) = max_entries.iter().find(|(n, _)| *n == name) {
            shape.max_entries = *entries;
        }
        if kind == MapType::RingBuf {
            shape.value_size = 0;
        }
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// The pins under `maps/`.
struct Scanned {
    /// Ours, by map name.
    found: BTreeMap<&'static str, Vec<Found>>,
    /// `-new` pins of migrations an earlier start did not finish.
    unfinished: Vec<PathBuf>,
}

fn scan(maps_dir: &Path) -> Result<Scanned, LayoutError> {
    let list_err = |source| LayoutError::ListPins { path: maps_dir.to_owned(), source };
    let mut found: BTreeMap<&'static str, Vec<Found>> = BTreeMap::new();
    let mut unfinished = Vec::new();
    for entry in fs::read_dir(maps_dir).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if file_name.ends_with(UNFINISHED) {
            if LAYOUTS.iter().any(|l| file_name.starts_with(&format!("{}-v", l.unversioned_pin_name()))) {
                unfinished.push(path);
            }
            continue;
        }
        let Some((layout, version)) = LAYOUTS.iter().find_map(|layout| {
            let bare = layout.unversioned_pin_name();
            if file_name == bare {
                return Some((layout, UNVERSIONED_PIN_VERSION));
            }
            let version = file_name.strip_prefix(&bare)?.strip_prefix("-v")?.parse().ok()?;
            Some((layout, version))
        }) else {
            // Not ours (e.g. a map a newer build added): left alone.
            continue;
        };
        let read_err = |source| LayoutError::ReadPin { path: path.clone(), source };
        let info = MapInfo::from_pin(&path).map_err(read_err)?;
        let shape = Shape::of_pin(&info).map_err(read_err)?;
        found.entry(layout.name).or_default().push(Found { path, version, shape, id: info.id() });
    }
    Ok(Scanned { found, unfinished })
}

/// Ids of the maps the programs on the pinned links use now.
fn maps_in_use(pins: &PinLayout) -> Result<HashSet<u32>, LayoutError> {
    let mut programs = HashSet::new();
    for dir in [pins.links_dir(), pins.to_pod_links_dir(), pins.node_links_dir()] {
        let list_err = |source| LayoutError::ListPins { path: dir.clone(), source };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(list_err(e)),
        };
        for entry in entries {
            let path = entry.map_err(list_err)?.path();
            let info_err = |source| LayoutError::LinkInfo { path: path.clone(), source };
            let link: FdLink = PinnedLink::from_pin(&path).map_err(info_err)?.into();
            programs.insert(link.info().map_err(info_err)?.program_id());
        }
    }
    let mut maps = HashSet::new();
    for program in aya::programs::loaded_programs() {
        let program = match program {
            Ok(program) => program,
            // Unloaded between listing and opening: not one of ours (ours are pinned).
            Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(source) => return Err(LayoutError::ProgramInfo { source }),
        };
        if programs.contains(&program.id()) {
            let ids = program.map_ids().map_err(|source| LayoutError::ProgramInfo { source })?;
            maps.extend(ids.unwrap_or_default());
        }
    }
    Ok(maps)
}

/// The plan for every pinned map of this build.
pub struct MapPins {
    plans: Vec<MapPlan>,
    /// `-new` pins of migrations an earlier start did not finish.
    unfinished: Vec<PathBuf>,
}

impl MapPins {
    /// Check every pin under `pins` against the maps of `object` (with the
    /// capacities in `max_entries`). Refuses before anything is changed.
    pub fn check(
        pins: &PinLayout,
        object: &[u8],
        max_entries: &[(&'static str, u32)],
    ) -> Result<Self, LayoutError> {
        let expected = expected_shapes(object, max_entries)?;
        let Scanned { mut found, unfinished } = scan(&pins.maps_dir())?;
        let mut in_use: Option<HashSet<u32>> = None;
        let mut plans = Vec::with_capacity(LAYOUTS.len());
        for layout in LAYOUTS {
            let name = layout.name;
            let pin = pins.map(name);
            let expected = &expected[name];
            let mut candidates = found.remove(name).unwrap_or_default();
            let chosen = match candidates.len() {
                0 => None,
                1 => candidates.pop(),
                _ => {
                    // A rollback to a build before layout versions, or an
                    // agent killed between a migration's rename and its
                    // removal of the old pin: the running programs tell.
                    let in_use = match &in_use {
                        Some(ids) => ids,
                        None => in_use.insert(maps_in_use(pins)?),
                    };
                    let (live, other): (Vec<Found>, Vec<Found>) =
                        candidates.into_iter().partition(|f| in_use.contains(&f.id));
                    if live.len() != 1 {
                        let pins = other.iter().chain(&live).map(|f| f.path.clone()).collect();
                        return Err(LayoutError::Ambiguous {
                            name,
                            pins: PathList(pins),
                            in_use: live.len(),
                        });
                    }
                    candidates = other;
                    live.into_iter().next()
                }
            };
            let stale: Vec<PathBuf> = candidates.into_iter().map(|f| f.path).filter(|p| *p != pin).collect();
            let Some(found) = chosen else {
                plans.push(MapPlan { layout, pin, from: None, action: Action::Create, stale });
                continue;
            };
            let refused = |verdict| match verdict {
                Verdict::Newer => LayoutError::Newer {
                    name,
                    pin: found.path.clone(),
                    version: found.version,
                    known: layout.version,
                    holds: layout.holds,
                },
                Verdict::NoUpgrade => LayoutError::NoUpgrade {
                    name,
                    pin: found.path.clone(),
                    version: found.version,
                    known: layout.version,
                    holds: layout.holds,
                },
                _ => LayoutError::OtherShape {
                    name,
                    pin: found.path.clone(),
                    version: layout.version,
                    found: found.shape,
                    expected: *expected,
                    holds: layout.holds,
                },
            };
            let action = match verdict(layout, expected, found.version, &found.shape) {
                Verdict::Reuse => Action::Reuse,
                Verdict::Migrate(reason) => Action::Migrate { entries: layout.entries, reason },
                Verdict::Upgrade(from_version) => {
                    let upgrade = layout.upgrades.iter().find(|u| u.from_version == from_version);
                    match upgrade {
                        Some(upgrade) => Action::Migrate {
                            entries: upgrade.entries,
                            reason: Reason::Upgraded { from_version },
                        },
                        None => return Err(refused(Verdict::NoUpgrade)),
                    }
                }
                Verdict::Replace(reason) => Action::Replace { reason },
                refusal => return Err(refused(refusal)),
            };
            plans.push(MapPlan { layout, pin, from: Some(found.path), action, stale });
        }
        Ok(Self { plans, unfinished })
    }

    pub fn plans(&self) -> &[MapPlan] {
        &self.plans
    }

    /// Whether the programs on the pinned links must be switched to new maps.
    pub fn migrating(&self) -> bool {
        self.plans.iter().any(MapPlan::makes_new_map)
    }

    /// (map name, path) for `EbpfLoader::map_pin_path`.
    pub fn load_paths(&self) -> Vec<(&'static str, PathBuf)> {
        self.plans.iter().map(|plan| (plan.layout.name, plan.load_path())).collect()
    }

    /// Remove what unfinished migrations left: their old pins are still
    /// the authoritative ones.
    pub fn prepare(&self) -> Result<(), LayoutError> {
        for path in &self.unfinished {
            tracing::warn!(pin = %path.display(), "removing the new map of a migration that did not finish; migrating again");
            remove_pin(path)?;
        }
        Ok(())
    }

    /// Copy the entries that must be in the new maps before any program
    /// uses them. An error leaves every old pin in place.
    pub fn copy_before_switch(&self, ebpf: &mut Ebpf) -> Result<(), LayoutError> {
        for plan in &self.plans {
            if let Action::Migrate { entries: Entries::Keyed(copy) | Entries::Slots(copy), .. } = plan.action
            {
                let copied = copy_from_pin(plan, ebpf, copy)?;
                tracing::debug!(
                    map = plan.layout.name,
                    entries = copied.entries,
                    "entries copied before the switch"
                );
            }
        }
        Ok(())
    }

    /// Copy what the old programs wrote since [`Self::copy_before_switch`]:
    /// keys they added, and the counters. The new maps are in use already,
    /// so a failure is logged, not returned.
    pub fn copy_after_switch(&self, ebpf: &mut Ebpf) {
        for plan in &self.plans {
            let Action::Migrate { entries: Entries::Keyed(copy) | Entries::Counters(copy), .. } = plan.action
            else {
                continue;
            };
            match copy_from_pin(plan, ebpf, copy) {
                Ok(copied) => {
                    tracing::debug!(
                        map = plan.layout.name,
                        entries = copied.entries,
                        "entries copied after the switch"
                    );
                    if copied.left_out > 0 {
                        tracing::warn!(
                            map = plan.layout.name,
                            slots = copied.left_out,
                            "counter slots beyond the new map's size were not carried over"
                        );
                    }
                }
                Err(e) => tracing::warn!(
                    map = plan.layout.name,
                    error = format!("{e:#}"),
                    "entries the old programs wrote during the switch were not all carried over"
                ),
            }
        }
    }

    /// Once the programs use the new maps: pin them under their final
    /// names (replacing the old pins atomically where the name is the
    /// same), remove old and stale pins, and log what changed.
    pub fn commit(&self) -> Result<(), LayoutError> {
        for plan in &self.plans {
            let name = plan.layout.name;
            match (&plan.action, &plan.from) {
                (Action::Reuse, Some(from)) if *from != plan.pin => {
                    rename_pin(from, &plan.pin)?;
                    tracing::info!(map = name, from = %from.display(), to = %plan.pin.display(), "pin renamed to its layout version");
                }
                (Action::Migrate { reason, .. }, Some(from)) => {
                    rename_pin(&plan.unfinished_pin(), &plan.pin)?;
                    if *from != plan.pin {
                        remove_pin(from)?;
                    }
                    tracing::info!(map = name, from = %from.display(), to = %plan.pin.display(), %reason, "map migrated, entries kept");
                }
                (Action::Replace { reason }, Some(from)) => {
                    rename_pin(&plan.unfinished_pin(), &plan.pin)?;
                    if *from != plan.pin {
                        remove_pin(from)?;
                    }
                    tracing::warn!(
                        map = name,
                        pin = %plan.pin.display(),
                        %reason,
                        lost = plan.layout.holds,
                        "map replaced by an empty one"
                    );
                }
                _ => {}
            }
            for stale in &plan.stale {
                tracing::info!(map = name, pin = %stale.display(), "removing a pin the running programs do not use");
                remove_pin(stale)?;
            }
        }
        Ok(())
    }

    /// After a failed load or copy: remove the new maps' pins (the old ones
    /// were not touched).
    pub fn abandon(&self) {
        for plan in self.plans.iter().filter(|plan| plan.makes_new_map()) {
            if let Err(e) = remove_pin(&plan.unfinished_pin()) {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot remove the new map of an abandoned migration"
                );
            }
        }
    }
}

fn copy_from_pin(plan: &MapPlan, ebpf: &mut Ebpf, copy: CopyFn) -> Result<Copied, LayoutError> {
    let name = plan.layout.name;
    let Some(from) = &plan.from else { return Ok(Copied::default()) };
    let copy_err = |source| LayoutError::Copy { name, from: from.clone(), source };
    let old = MapData::from_pin(from).and_then(Map::from_map_data).map_err(copy_err)?;
    let new = ebpf.map_mut(name).ok_or(LayoutError::NotLoaded { name })?;
    let capacity = |new: &Map| match new {
        Map::HashMap(data) | Map::LruHashMap(data) | Map::LpmTrie(data) => {
            data.info().map(|info| info.max_entries()).unwrap_or(0)
        }
        _ => 0,
    };
    copy(&old, new).map_err(|source| match &source {
        // A hash map (E2BIG) or LPM trie (ENOSPC) full.
        MapError::SyscallError(e)
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) =>
        {
            LayoutError::DoesNotFit {
                name,
                from: from.clone(),
                capacity: capacity(new),
                advice: if name == map_names::CONNTRACK {
                    "Raise conntrack_max_entries, or start again once fewer connections are open."
                } else {
                    "Run the build that made it."
                },
            }
        }
        _ => copy_err(source),
    })
}

fn rename_pin(from: &Path, to: &Path) -> Result<(), LayoutError> {
    // bpffs renames atomically, replacing `to`: a reader of `to` sees the
    // old map or the new one, never none.
    fs::rename(from, to).map_err(|source| LayoutError::Pin {
        action: "rename",
        path: from.to_owned(),
        source,
    })
}

fn remove_pin(path: &Path) -> Result<(), LayoutError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LayoutError::Pin { action: "remove", path: path.to_owned(), source }),
    }
}

/// Pins of `name` under another layout than this build's, for a clear
/// error when its own pin is missing (`inspect`, `monitor`).
pub fn other_layouts(pins: &PinLayout, name: &'static str) -> Vec<PathBuf> {
    let Some(layout) = crate::bpf::map_layout::layout(name) else { return Vec::new() };
    let bare = layout.unversioned_pin_name();
    // Only to make an error message more precise: unreadable entries are skipped.
    let Ok(entries) = fs::read_dir(pins.maps_dir()) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            (file == bare || file.strip_prefix(&bare).is_some_and(|rest| rest.starts_with("-v")))
                && *path != pins.map(name)
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests;
