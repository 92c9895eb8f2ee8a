//! The socket programs' links on the root cgroup (socket load balancing for
//! the node's own sockets), pinned under `<bpffs>/sock-links/<program>`.
//! At every start each is attached anew with the program just loaded, its
//! pin then renamed over the old one, which detaches the old link: for a
//! moment both run, which is harmless (the second sees a backend address,
//! no Service, and leaves it), so no connect() ever misses its translation.

use std::{fs, io, path::Path};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use datapath_common::program_names;

use crate::bpf::{Datapath, DatapathError};

impl Datapath {
    pub(super) fn sock_program_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut CgroupSockAddr, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { kind: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Attach the socket programs to `cgroup` (the root of the cgroup v2
    /// hierarchy: every process on the node) with pinned links, replacing
    /// the links of an earlier start; `None`: socket load balancing is off,
    /// and the pinned links are removed.
    pub fn sync_socket_links(&mut self, cgroup: Option<&Path>) -> Result<(), DatapathError> {
        let dir = self.pins.socket_links_dir();
        let Some(cgroup) = cgroup else {
            for name in program_names::SOCKET_ALL {
                remove_pin(&dir.join(name))?;
            }
            return Ok(());
        };
        fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir.clone(), source })?;
        let cgroup_dir = fs::File::open(cgroup)
            .map_err(|source| DatapathError::Cgroup { path: cgroup.to_owned(), source })?;
        let target = cgroup.display().to_string();
        for name in program_names::SOCKET_ALL {
            let (pin, fresh) = (dir.join(name), dir.join(format!("{name}-new")));
            remove_pin(&fresh)?;
            let program = self.sock_program_mut(name)?;
            let attach_err = |source| DatapathError::Attach { ifname: target.clone(), source };
            // A BPF link (kernel 5.7+): several links always share a cgroup
            // (other agents' in tests, other tools'), and the kernel wants
            // no attach flags with one, which `Single` is.
            let id = program.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            let link: FdLink =
                link.try_into().map_err(|source| DatapathError::Link { ifname: target.clone(), source })?;
            link.pin(&fresh).map_err(|source| DatapathError::PinLink {
                ifname: target.clone(),
                path: fresh.clone(),
                source,
            })?;
            // The old link (if any) goes with its pin.
            fs::rename(&fresh, &pin).map_err(|source| DatapathError::Unpin { path: pin.clone(), source })?;
        }
        Ok(())
    }
}

fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    // (bpffs refuses some lookups with EPERM rather than ENOENT.)
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Unpin { path: path.to_owned(), source }),
    }
}

/// The cgroup v2 hierarchy's mount point, from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a
/// hybrid one); `None` without cgroup v2.
pub fn cgroup2_mount() -> io::Result<Option<std::path::PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo.lines().find_map(|line| {
        // "... <mount point> <options> ... - <fs type> <source> <super options>"
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(Into::into))?
    }))
}
