//! The programs' TCX links: attached and pinned per pod veth and per node
//! interface, switched atomically to a newly loaded program, and removed
//! when their interface is gone.

use std::{fs, io, path::PathBuf};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};
use datapath_common::program_names;

use crate::bpf::{Datapath, DatapathError};

/// What reconciliation on start did, for the log.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    pub links_updated: usize,
    pub stale_links_removed: usize,
    pub stale_endpoints_removed: usize,
    pub stale_interfaces_removed: usize,
    /// Live links that could not be switched to the new program: kept, to
    /// be retried with [`Datapath::retry_link`].
    pub links_failed: Vec<LinkFailure>,
}

/// The name of the interface with this index in our namespace, `None` if
/// there is none. Only the kernel's "no such device" is an absence: any
/// other failure (no socket left for the lookup, say) is an error, so that
/// nothing belonging to a live interface is ever taken for stale. (nix's
/// `if_indextoname` cannot tell: it answers an empty name for a missing
/// index.)
pub fn interface_name(ifindex: u32) -> Result<Option<String>, DatapathError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO | libc::ENODEV) => Ok(None),
            _ => Err(DatapathError::InterfaceLookup { ifindex, source: error }),
        };
    }
    // SAFETY: on success the name is a NUL-terminated string in buf.
    Ok(Some(unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()))
}

pub(super) fn interface_exists(ifindex: u32) -> Result<bool, DatapathError> {
    interface_name(ifindex).map(|name| name.is_some())
}

/// The TCX hook a program's links go on: egress for `to_pod`, ingress for
/// the others.
fn attach_type_of(program: &str) -> TcAttachType {
    if program == program_names::TO_POD { TcAttachType::Egress } else { TcAttachType::Ingress }
}

/// Is the link pinned at `pin` attached, running on `ifname`'s hook for
/// `program`? A pin can outlive its attachment: its device deleted (an
/// uplink re-created under the same name) or the link detached by hand
/// (`bpftool link detach`); such a link carries nothing. No pin: `false`.
pub(super) fn link_attached(
    pin: &std::path::Path,
    program: &str,
    ifname: &str,
) -> Result<bool, DatapathError> {
    if !pin.exists() {
        return Ok(false);
    }
    let link_err = |source| DatapathError::Link { ifname: ifname.to_owned(), source };
    let link: FdLink = PinnedLink::from_pin(pin).map_err(link_err)?.into();
    let program_id = link.info().map_err(link_err)?.program_id();
    match SchedClassifier::query_tcx(ifname, attach_type_of(program)) {
        Ok((_, running)) => Ok(running.iter().any(|p| p.id() == program_id)),
        // The interface is gone: nothing of it runs.
        Err(ProgramError::TcError(aya::programs::tc::TcError::IoError(e)))
            if e.raw_os_error() == Some(libc::ENODEV) || e.kind() == io::ErrorKind::NotFound =>
        {
            Ok(false)
        }
        Err(source) => Err(DatapathError::Attach { ifname: ifname.to_owned(), source }),
    }
}

impl Datapath {
    /// Attach `from_pod` to the pod veth's ingress.
    pub(super) fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        let pin = self.pins.link(ifname);
        self.attach_pinned(program_names::FROM_POD, ifname, ifindex, pin)
    }

    /// Attach `to_pod` to the pod veth's egress.
    pub(super) fn attach_to_pod(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        let pin = self.pins.to_pod_link(ifname);
        self.attach_pinned(program_names::TO_POD, ifname, ifindex, pin)
    }

    /// Attach `program` to `ifname` (egress for `to_pod`, ingress for the
    /// others) with a link pinned at `pin`; if a live link is pinned there
    /// already, swap its program atomically instead.
    pub(super) fn attach_pinned(
        &mut self,
        program: &'static str,
        ifname: &str,
        ifindex: u32,
        pin: PathBuf,
    ) -> Result<(), DatapathError> {
        if pin.exists() {
            match self.refresh_pinned_link(program, ifname, &pin)? {
                PinnedLinkState::Updated => return Ok(()),
                PinnedLinkState::Stale => {
                    tracing::info!(ifname, pin = %pin.display(), "replacing the link pin of a gone interface");
                    fs::remove_file(&pin)
                        .map_err(|source| DatapathError::Unpin { path: pin.clone(), source })?;
                }
            }
        }
        let fd_link = self.attach_new(program, ifname, ifindex)?;
        fd_link.pin(&pin).map_err(|source| DatapathError::PinLink {
            ifname: ifname.to_owned(),
            path: pin.clone(),
            source,
        })?;
        Ok(())
    }

    /// A new TCX link of `program` on `ifname`, not pinned yet.
    fn attach_new(
        &mut self,
        program: &'static str,
        ifname: &str,
        ifindex: u32,
    ) -> Result<FdLink, DatapathError> {
        if !interface_exists(ifindex)? {
            return Err(DatapathError::NoInterface { ifname: ifname.to_owned() });
        }
        let attach_err = |source| DatapathError::Attach { ifname: ifname.to_owned(), source };
        let attach_type = attach_type_of(program);
        let program = self.program_mut(program)?;
        let link_id = program
            .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        link.try_into().map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })
    }

    /// Bring pinned state in line with this node after a (re)start:
    /// - every pinned link whose veth still exists is switched atomically to the
    ///   program we just loaded (a new build replaces the old one hitlessly);
    /// - links, interfaces and endpoints whose veth is gone are removed.
    ///
    /// Nothing that is still valid is ever removed or re-created.
    pub fn reconcile(&mut self) -> Result<ReconcileReport, DatapathError> {
        let mut report = ReconcileReport::default();
        for (program, links_dir) in self.pins.pod_link_dirs() {
            let entries = fs::read_dir(&links_dir)
                .map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
            for entry in entries {
                let entry =
                    entry.map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
                let path = entry.path();
                let ifname = entry.file_name().to_string_lossy().into_owned();
                match self.refresh_pinned_link(program, &ifname, &path) {
                    Ok(PinnedLinkState::Updated) => report.links_updated += 1,
                    Ok(PinnedLinkState::Stale) => {
                        tracing::info!(ifname, program, "removing the link pin of a gone interface");
                        fs::remove_file(&path)
                            .map_err(|source| DatapathError::Unpin { path: path.clone(), source })?;
                        report.stale_links_removed += 1;
                    }
                    // The link stays and goes on forwarding (with the program it
                    // has); the switch is tried again later.
                    Err(error) => report.links_failed.push(LinkFailure { program, ifname, pin: path, error }),
                }
            }
        }

        let swept = self.sweep_gone_interfaces()?;
        report.stale_endpoints_removed = swept.endpoints;
        report.stale_interfaces_removed = swept.interfaces;
        Ok(report)
    }

    pub(super) fn update_link_to(
        &mut self,
        program: &'static str,
        fd_link: FdLink,
        ifname: &str,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach { ifname: ifname.to_owned(), source };
        let link: SchedClassifierLink =
            fd_link.try_into().map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })?;
        let program = self.program_mut(program)?;
        let id = program.attach_to_link(link).map_err(attach_err)?;
        // The pin keeps the link; drop our fd without detaching.
        let link = program.take_link(id).map_err(attach_err)?;
        drop(link);
        Ok(())
    }

    /// Attach the node-level programs that `wanted` lists ((program, ifname))
    /// with pinned links, swapping the program of live ones atomically, and
    /// unpin every other node-level link. A live link whose switch fails is
    /// kept and returned (to retry with [`Self::retry_link`]).
    pub fn sync_node_links(
        &mut self,
        wanted: &[(&'static str, String)],
    ) -> Result<Vec<LinkFailure>, DatapathError> {
        let dir = self.pins.node_links_dir();
        let entries =
            fs::read_dir(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.iter().any(|(p, i)| format!("{p}@{i}") == name) {
                let path = entry.path();
                tracing::info!(link = name, "removing node link no longer wanted");
                fs::remove_file(&path).map_err(|source| DatapathError::Unpin { path, source })?;
            }
        }
        let mut failed = Vec::new();
        for (program, ifname) in wanted {
            let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
                .map_err(|_| DatapathError::NoInterface { ifname: ifname.clone() })?;
            let pin = self.pins.node_link(program, ifname);
            match self.attach_pinned(program, ifname, ifindex, pin.clone()) {
                Ok(()) => {}
                // A live link we could not switch: it stays, and is retried.
                Err(error) if pin.exists() => {
                    failed.push(LinkFailure { program, ifname: ifname.clone(), pin, error });
                }
                Err(error) => return Err(error),
            }
        }
        Ok(failed)
    }

    /// Attach again each node-level program of `wanted` whose link no
    /// longer runs (its device deleted and made again under the same name,
    /// or the link detached by hand): what [`Self::sync_node_links`] did at
    /// start, for those only. Returns the (program, interface) attached.
    pub fn repair_node_links(
        &mut self,
        wanted: &[(&'static str, String)],
    ) -> Result<Vec<(&'static str, String)>, DatapathError> {
        let mut repaired = Vec::new();
        for (program, ifname) in wanted {
            let pin = self.pins.node_link(program, ifname);
            if link_attached(&pin, program, ifname)? {
                continue;
            }
            let Ok(ifindex) = nix::net::if_::if_nametoindex(ifname.as_str()) else {
                // Gone for now: attached when it is back.
                continue;
            };
            self.reattach(program, ifname, ifindex, pin)?;
            repaired.push((*program, ifname.clone()));
        }
        Ok(repaired)
    }

    /// A fresh link for `program` on `ifname`, in place of the one pinned at
    /// `pin` that no longer runs (not switched: updating a hand-detached
    /// link "succeeds" and changes nothing). Attached first, then pinned
    /// over the old pin (a rename), so that the hook is never without the
    /// program even if the old link ran after all.
    pub(super) fn reattach(
        &mut self,
        program: &'static str,
        ifname: &str,
        ifindex: u32,
        pin: PathBuf,
    ) -> Result<(), DatapathError> {
        let fd_link = self.attach_new(program, ifname, ifindex)?;
        // (bpffs refuses names with a dot; a leftover of a crash here is
        // swept at start like any pin of an interface that does not exist.)
        let mut fresh = pin.clone().into_os_string();
        fresh.push("@new");
        let fresh = PathBuf::from(fresh);
        let _ = fs::remove_file(&fresh);
        let pin_err = |path: &PathBuf, source| DatapathError::PinLink {
            ifname: ifname.to_owned(),
            path: path.clone(),
            source,
        };
        fd_link.pin(&fresh).map_err(|source| pin_err(&fresh, source))?;
        fs::rename(&fresh, &pin).map_err(|source| DatapathError::Unpin { path: fresh, source })
    }

    /// Try again to switch a link whose switch failed (a [`LinkFailure`]).
    pub fn retry_link(
        &mut self,
        program: &'static str,
        ifname: &str,
        pin: &std::path::Path,
    ) -> Result<LinkRetry, DatapathError> {
        if !pin.exists() {
            // DEL took it meanwhile.
            return Ok(LinkRetry::Gone);
        }
        match self.refresh_pinned_link(program, ifname, pin)? {
            PinnedLinkState::Updated => Ok(LinkRetry::Updated),
            PinnedLinkState::Stale => {
                fs::remove_file(pin)
                    .map_err(|source| DatapathError::Unpin { path: pin.to_owned(), source })?;
                Ok(LinkRetry::StaleRemoved)
            }
        }
    }

    /// Switch the link pinned at `pin` (of `ifname`) to `program`, atomically.
    /// It is stale only when its interface is really gone: no interface has
    /// the name, or the kernel refuses the update with ENOLINK (the link's
    /// device went away, so the name now belongs to a newer interface). Any
    /// other failure is an error, and the link is left as it is.
    fn refresh_pinned_link(
        &mut self,
        program: &'static str,
        ifname: &str,
        pin: &std::path::Path,
    ) -> Result<PinnedLinkState, DatapathError> {
        match nix::net::if_::if_nametoindex(ifname) {
            Ok(_) => {}
            Err(nix::errno::Errno::ENODEV) => return Ok(PinnedLinkState::Stale),
            Err(errno) => {
                return Err(DatapathError::InterfaceByName {
                    ifname: ifname.to_owned(),
                    source: errno.into(),
                });
            }
        }
        let link = PinnedLink::from_pin(pin)
            .map_err(|source| DatapathError::Link { ifname: ifname.to_owned(), source })?;
        match self.update_link_to(program, link.into(), ifname) {
            Ok(()) => Ok(PinnedLinkState::Updated),
            Err(DatapathError::Attach {
                source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }),
                ..
            }) if io_error.raw_os_error() == Some(libc::ENOLINK) => Ok(PinnedLinkState::Stale),
            Err(error) => Err(error),
        }
    }
}

/// What a pinned link turned out to be when switched to our program.
enum PinnedLinkState {
    /// Live, and now running the program just loaded.
    Updated,
    /// Its interface is gone: it can carry nothing.
    Stale,
}

/// A pinned link that could not be switched to the program loaded now; it
/// stays, forwarding with the program it has, until [`Datapath::retry_link`]
/// succeeds.
#[derive(Debug)]
pub struct LinkFailure {
    pub program: &'static str,
    pub ifname: String,
    pub pin: PathBuf,
    pub error: DatapathError,
}

/// What [`Datapath::retry_link`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRetry {
    /// Switched to the loaded program.
    Updated,
    /// Its interface had gone: pin removed.
    StaleRemoved,
    /// The pin was removed meanwhile (DEL).
    Gone,
}
