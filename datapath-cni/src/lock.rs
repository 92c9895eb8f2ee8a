//! Serialisation of CNI calls, with `flock` on files in the plugin's lock
//! directory (`lockDir`, default `/run/datapath/cni-locks`: tmpfs, as no call
//! outlives a reboot).
//!
//! - One lock file per container, named by a hash of the container ID (any
//!   ID is a safe file name, none can reach outside the directory). ADD, DEL
//!   and CHECK hold it for their whole run, GC while it removes that
//!   container: a DEL waits for an ADD of the same container still under
//!   way, instead of releasing the lease under it.
//! - The directory itself: ADD holds it shared while it may make a veth
//!   that no record names yet; GC holds it exclusively while it removes
//!   veths that look like ours and have no owner, so it never takes such a
//!   veth from an ADD half-way through.
//!
//! A lock file is removed by its holder on release, so the directory does
//! not grow with every container the node has seen. A waiter that then gets
//! the lock of the removed file tries again with the path's current file.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use sha2::{Digest as _, Sha256};

pub const DEFAULT_LOCK_DIR: &str = "/run/datapath/cni-locks";

/// How long a call waits for another call on the same container (or GC for
/// ADDs under way): longer than one ADD takes even with a slow agent.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot create the CNI lock directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open CNI lock file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path} is still held by another CNI call after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

/// The lock file name for a container: hex SHA-256 of its ID.
pub fn lock_file_name(container_id: &str) -> String {
    let digest = Sha256::digest(container_id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.lock")
}

/// Exclusive hold on one container's lock file, released (and the file
/// removed) on drop.
#[derive(Debug)]
pub struct ContainerLock {
    path: PathBuf,
    held: Option<Flock<File>>,
}

impl ContainerLock {
    pub fn acquire(dir: &Path, container_id: &str, wait: Duration) -> Result<Self, LockError> {
        create_dir(dir)?;
        let path = dir.join(lock_file_name(container_id));
        let deadline = Instant::now() + wait;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|source| LockError::Open { path: path.clone(), source })?;
            let held = lock(file, FlockArg::LockExclusiveNonblock, &path, deadline, wait)?;
            // The previous holder removes the file on release: a lock on the
            // removed file would exclude nobody who opens the path now.
            if is_current(&held, &path).map_err(|source| LockError::Open { path: path.clone(), source })? {
                return Ok(Self { path, held: Some(held) });
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ContainerLock {
    fn drop(&mut self) {
        // Removed while still held, so that nobody can lock it in between
        // and believe it current. A file that cannot be removed is only
        // clutter: the next call locks it as it would a new one.
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("datapath-cni: cannot remove lock file {}: {e}", self.path.display());
        }
        drop(self.held.take());
    }
}

/// A hold on the lock directory itself: shared by ADDs, exclusive for GC's
/// sweep of veths without an owner.
#[derive(Debug)]
pub struct DirLock {
    _held: Flock<File>,
}

impl DirLock {
    /// Held by an ADD from before it makes its veth until the agent records it.
    pub fn shared(dir: &Path, wait: Duration) -> Result<Self, LockError> {
        Self::acquire(dir, FlockArg::LockSharedNonblock, wait)
    }

    /// Held by GC while it removes veths no record or valid attachment owns.
    pub fn exclusive(dir: &Path, wait: Duration) -> Result<Self, LockError> {
        Self::acquire(dir, FlockArg::LockExclusiveNonblock, wait)
    }

    fn acquire(dir: &Path, how: FlockArg, wait: Duration) -> Result<Self, LockError> {
        create_dir(dir)?;
        let file = File::open(dir).map_err(|source| LockError::Open { path: dir.to_owned(), source })?;
        Ok(Self { _held: lock(file, how, dir, Instant::now() + wait, wait)? })
    }
}

fn create_dir(dir: &Path) -> Result<(), LockError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LockError::Dir { path: dir.to_owned(), source })
}

/// Non-blocking attempts until `deadline`: a stuck holder gives the caller an
/// error to act on instead of a hang.
fn lock(
    mut file: File,
    how: FlockArg,
    path: &Path,
    deadline: Instant,
    wait: Duration,
) -> Result<Flock<File>, LockError> {
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, how) {
            Ok(held) => return Ok(held),
            Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => file = back,
            Err((_, source)) => return Err(LockError::Lock { path: path.to_owned(), source }),
        }
        if Instant::now() >= deadline {
            return Err(LockError::Busy { path: path.to_owned(), waited: wait });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Is `held` still the file at `path`?
fn is_current(held: &File, path: &Path) -> io::Result<bool> {
    let ours = held.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == ours.dev() && now.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dpt{}-lock-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn any_container_id_is_a_file_name_inside_the_directory() {
        for id in ["../../etc/passwd", "a/b", "with space", "", "/abs", "..", "x\0y"] {
            let name = lock_file_name(id);
            assert_eq!(name.len(), 64 + ".lock".len(), "{id:?}");
            assert!(name.trim_end_matches(".lock").chars().all(|c| c.is_ascii_hexdigit()), "{name}");
        }
        assert_ne!(lock_file_name("a"), lock_file_name("b"));
    }

    #[test]
    fn a_second_holder_waits_and_the_file_goes_with_the_last() {
        let dir = scratch("wait");
        let first = ContainerLock::acquire(&dir, "c1", LOCK_WAIT).unwrap();
        let busy = ContainerLock::acquire(&dir, "c1", Duration::from_millis(30)).unwrap_err();
        assert!(matches!(busy, LockError::Busy { .. }), "{busy}");
        // Another container is not held up.
        drop(ContainerLock::acquire(&dir, "c2", Duration::from_millis(30)).unwrap());
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                ContainerLock::acquire(&dir, "c1", LOCK_WAIT).map(|l| l.path().to_owned())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        let path = waiter.join().unwrap().unwrap();
        assert!(!path.exists(), "removed on release");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_sweep_waits_for_adds_under_way() {
        let dir = scratch("sweep");
        let add1 = DirLock::shared(&dir, LOCK_WAIT).unwrap();
        let add2 = DirLock::shared(&dir, Duration::from_millis(30)).unwrap();
        let busy = DirLock::exclusive(&dir, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(busy, LockError::Busy { .. }), "{busy}");
        drop((add1, add2));
        let sweep = DirLock::exclusive(&dir, Duration::from_millis(30)).unwrap();
        assert!(DirLock::shared(&dir, Duration::from_millis(30)).is_err(), "ADD waits for the sweep");
        drop(sweep);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
