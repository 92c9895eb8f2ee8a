//! What a map is (its shape), and why a pin is migrated, replaced or refused.

use super::*;

/// What a map is, as the kernel (or this build's object) describes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Shape {
    pub(super) fn of_pin(info: &MapInfo) -> Result<Self, MapError> {
        Ok(Self {
            map_type: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// Same kind of map with keys and values of the same size: entries copy
    /// across as they are.
    pub(super) fn same_layout(&self, other: &Shape) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {:?} map with {}-byte keys, {}-byte values, {} entries and flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Paths, for a message.
#[derive(Debug)]
pub struct PathList(pub Vec<PathBuf>);

impl fmt::Display for PathList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, path) in self.0.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { ", " }, path.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read the map definitions of the eBPF object")]
    Object {
        #[source]
        source: Box<aya_obj::ParseError>,
    },
    #[error("the eBPF object has no map {name}, or one of a type aya does not know")]
    NotInObject {
        name: &'static str,
        #[source]
        source: Option<MapError>,
    },
    #[error("cannot list the pinned maps in {path}")]
    ListPins {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the pinned map {path} (is it a map?)")]
    ReadPin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "map {name} is pinned at {pin} with layout v{version}, newer than the v{known} this build \
         reads: a rollback across a layout change. Nothing was changed; the programs already \
         attached keep forwarding. Run a build that reads layout v{version} of {name}, or remove \
         {pin} and start again, losing {holds} (docs/upgrade.md)"
    )]
    Newer { name: &'static str, pin: PathBuf, version: u32, known: u32, holds: &'static str },
    #[error(
        "map {name} is pinned at {pin} with layout v{version}, which this build (layout v{known}) \
         cannot convert. Nothing was changed; the programs already attached keep forwarding. \
         Upgrade through a release that converts it, or remove {pin} and start again, losing \
         {holds} (docs/upgrade.md)"
    )]
    NoUpgrade { name: &'static str, pin: PathBuf, version: u32, known: u32, holds: &'static str },
    #[error(
        "map {name} pinned at {pin} is {found}, but layout v{version} of this build is {expected}: \
         it was made by another build under the same layout version (a development build?), so \
         its entries cannot be trusted. Nothing was changed; the programs already attached keep \
         forwarding. Run the build that made it, or remove {pin} and start again, losing {holds} \
         (docs/upgrade.md)"
    )]
    OtherShape {
        name: &'static str,
        pin: PathBuf,
        version: u32,
        found: Shape,
        expected: Shape,
        holds: &'static str,
    },
    #[error(
        "map {name} is pinned more than once ({pins}) and the programs on the pinned links use \
         {in_use} of them, so which one holds the live entries is unclear. Nothing was changed. \
         Remove the pins the running programs do not use (`bpftool link show` gives each link's \
         program, `bpftool prog show id N` its map_ids, `bpftool map show pinned PIN` a pin's id) \
         and start again"
    )]
    Ambiguous { name: &'static str, pins: PathList, in_use: usize },
    #[error("cannot tell which maps the programs on the pinned links use (link {path})")]
    LinkInfo {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("cannot tell which maps the programs on the pinned links use")]
    ProgramInfo {
        #[source]
        source: ProgramError,
    },
    #[error(
        "map {name}: the {capacity} entries of its new map cannot hold the entries of {from}; \
         nothing was switched and {from} is kept. {advice}"
    )]
    DoesNotFit { name: &'static str, from: PathBuf, capacity: u32, advice: &'static str },
    #[error(
        "map {name}: copying the entries of {from} into its new map failed; nothing was switched and {from} is kept"
    )]
    Copy {
        name: &'static str,
        from: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name} is not in the loaded eBPF object")]
    NotLoaded { name: &'static str },
    #[error("cannot {action} the pin {path}")]
    Pin {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "map {name} is pinned only with another layout ({pins}), this build reads layout v{version} \
         ({expected}): use the datapath-agent of the build that pinned it (docs/upgrade.md)"
    )]
    OnlyOtherLayout { name: &'static str, pins: PathList, version: u32, expected: PathBuf },
}

/// Why a map is migrated or replaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Same layout, another capacity or other flags.
    Resized { from: Shape },
    /// An older layout version this build converts.
    Upgraded { from_version: u32 },
    /// A pin this build cannot read, for a map whose loss is harmless.
    Incompatible { version: u32, found: Shape },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Resized { from } => {
                write!(f, "resized from {} entries, flags {:#x}", from.max_entries, from.flags)
            }
            Reason::Upgraded { from_version } => write!(f, "converted from layout v{from_version}"),
            Reason::Incompatible { version, found } => {
                write!(f, "the pin (layout v{version}, {found}) cannot be read by this build")
            }
        }
    }
}
