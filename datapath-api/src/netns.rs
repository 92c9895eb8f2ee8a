//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so
//! the work runs on a fresh thread that enters the namespace and then ends:
//! no other thread, and no later work, is affected.

use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::Path,
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::{
        stat::{SFlag, fstat},
        statfs::{NSFS_MAGIC, fstatfs},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace: it is {found}")]
    NotNetwork { path: String, found: Found },
    #[error("cannot tell what kind of file {path} is")]
    Inspect {
        path: String,
        #[source]
        source: Errno,
    },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("thread working in {path} panicked")]
    Panicked { path: String },
}

/// What a path that should be a network namespace turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    RegularFile,
    Directory,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    /// Another kind of namespace: its `CLONE_NEW*` name.
    Namespace(&'static str),
    /// On nsfs, yet no namespace (the kernel refused NS_GET_NSTYPE).
    OtherNsfsFile,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RegularFile => f.write_str("a regular file"),
            Self::Directory => f.write_str("a directory"),
            Self::CharDevice => f.write_str("a character device"),
            Self::BlockDevice => f.write_str("a block device"),
            Self::Fifo => f.write_str("a FIFO"),
            Self::Socket => f.write_str("a socket"),
            Self::Namespace(kind) => write!(f, "a {kind} namespace"),
            Self::OtherNsfsFile => f.write_str("an nsfs file that is no namespace"),
        }
    }
}

/// Open the network namespace at `path` (a `/proc/<pid>/ns/net` or a bind
/// mount of one), refusing anything else: a file, a directory, a device or
/// another kind of namespace.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    let shown = || path.display().to_string();
    // O_NONBLOCK: a FIFO given as the path must not hang the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| NetnsError::Open { path: shown(), source })?;
    match kind_of(&file) {
        Ok(None) => Ok(file),
        Ok(Some(found)) => Err(NetnsError::NotNetwork { path: shown(), found }),
        Err(source) => Err(NetnsError::Inspect { path: shown(), source }),
    }
}

/// None for a network namespace, else what the file is.
fn kind_of(file: &File) -> Result<Option<Found>, Errno> {
    if fstatfs(file)?.filesystem_type() != NSFS_MAGIC {
        let kind = SFlag::from_bits_truncate(fstat(file)?.st_mode) & SFlag::S_IFMT;
        let found = [
            (SFlag::S_IFDIR, Found::Directory),
            (SFlag::S_IFCHR, Found::CharDevice),
            (SFlag::S_IFBLK, Found::BlockDevice),
            (SFlag::S_IFIFO, Found::Fifo),
            (SFlag::S_IFSOCK, Found::Socket),
        ]
        .into_iter()
        .find_map(|(flag, found)| (kind == flag).then_some(found))
        .unwrap_or(Found::RegularFile);
        return Ok(Some(found));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open fd.
    let nstype = match Errno::result(unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) }) {
        Ok(nstype) => nstype,
        Err(Errno::ENOTTY | Errno::EINVAL) => return Ok(Some(Found::OtherNsfsFile)),
        Err(e) => return Err(e),
    };
    Ok(match nstype {
        libc::CLONE_NEWNET => None,
        libc::CLONE_NEWNS => Some(Found::Namespace("mount")),
        libc::CLONE_NEWUTS => Some(Found::Namespace("UTS")),
        libc::CLONE_NEWIPC => Some(Found::Namespace("IPC")),
        libc::CLONE_NEWPID => Some(Found::Namespace("PID")),
        libc::CLONE_NEWUSER => Some(Found::Namespace("user")),
        libc::CLONE_NEWCGROUP => Some(Found::Namespace("cgroup")),
        libc::CLONE_NEWTIME => Some(Found::Namespace("time")),
        _ => Some(Found::Namespace("unknown")),
    })
}

/// Is `namespace` (an open network namespace) the one the calling thread is
/// in? Namespaces are the same when their nsfs inodes are (device and inode).
pub fn is_current(namespace: &File) -> Result<bool, NetnsError> {
    const OWN: &str = "/proc/thread-self/ns/net";
    let own = File::open(OWN).map_err(|source| NetnsError::Open { path: OWN.to_owned(), source })?;
    let inspect = |path: &str, file: &File| {
        fstat(file).map_err(|source| NetnsError::Inspect { path: path.to_owned(), source })
    };
    let (theirs, ours) = (inspect("the namespace given", namespace)?, inspect(OWN, &own)?);
    Ok(theirs.st_dev == ours.st_dev && theirs.st_ino == ours.st_ino)
}

/// Move the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = open(path)?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|source| NetnsError::Enter { path: path.display().to_string(), source })
}

/// Run `work` on a thread inside the network namespace at `path`, and wait.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = path.to_owned();
    let shown = path.display().to_string();
    std::thread::spawn(move || -> Result<T, NetnsError> {
        enter(&path)?;
        Ok(work())
    })
    .join()
    .map_err(|_| NetnsError::Panicked { path: shown })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_is_current() {
        // (Another namespace is not: tests/tests/e2e/cni_errors.rs, as root.)
        assert!(is_current(&open(Path::new("/proc/self/ns/net")).unwrap()).unwrap());
        assert!(is_current(&open(Path::new("/proc/thread-self/ns/net")).unwrap()).unwrap());
    }

    #[test]
    fn only_a_network_namespace_opens() {
        assert!(open(Path::new("/proc/self/ns/net")).is_ok());
        for (path, found) in [
            ("/proc/self/ns/mnt", Found::Namespace("mount")),
            ("/proc/self/ns/uts", Found::Namespace("UTS")),
            ("/dev/null", Found::CharDevice),
            ("/proc", Found::Directory),
            ("/proc/self/status", Found::RegularFile),
        ] {
            match open(Path::new(path)) {
                Err(NetnsError::NotNetwork { found: f, .. }) => assert_eq!(f, found, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }
}
