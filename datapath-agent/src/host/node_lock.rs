//! One agent per node. Two agents on the same node would undo each other's
//! work: the same pinned maps or endpoint records, or, whatever their
//! directories, the same network namespace (a second `from_uplink` on the
//! uplink, the other's node routes deleted as not wanted). So `run`, before
//! it touches anything, binds the abstract unix socket [`NETNS_LOCK_NAME`]
//! (abstract names belong to the network namespace, need no shared path and
//! vanish with their holder) and takes an exclusive `flock` on the bpffs
//! directory and on `<state_dir>/agent.lock`; while another process holds
//! any of them it refuses to start, naming the holder's pid. The kernel
//! drops all three when their holder exits, however it exits (SIGKILL
//! included), so a restart never finds a stale lock.

use std::{
    fs::File,
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt as _,
        unix::{
            fs::MetadataExt as _,
            net::{SocketAddr, UnixListener},
        },
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt},
};

/// The abstract unix socket (`@datapath-agent` in `ss -xlp`) the agent of a
/// network namespace holds for as long as it runs.
pub const NETNS_LOCK_NAME: &str = "datapath-agent";

/// The lock file in the state directory; it also holds the holder's pid,
/// for people.
pub const STATE_LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum NodeLockError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path} to lock it")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another datapath-agent ({holder}) runs this node's datapath: it holds the lock on {path}; \
         stop it first (only one agent may own a bpffs_dir and a state_dir)"
    )]
    Held { path: PathBuf, holder: Holder },
    #[error(
        "another datapath-agent ({holder}) runs in this network namespace: it holds the abstract socket \
         @{name}; stop it first (one agent per node network namespace, whatever its bpffs_dir, state_dir \
         and api_socket)"
    )]
    NetnsHeld { name: String, holder: Holder },
    #[error("cannot bind the abstract socket @{name} that marks this network namespace's agent")]
    NetnsBind {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot record this agent's pid in {path}")]
    WritePid {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Who holds a lock, as far as /proc/locks tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Pid(u32),
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Pid(pid) => write!(f, "pid {pid}"),
            Holder::Unknown => write!(f, "pid unknown"),
        }
    }
}

/// Held for as long as the agent runs; dropping it releases both locks.
#[derive(Debug)]
pub struct NodeLock {
    /// Directories and the lock file this agent created to lock them,
    /// oldest first: a start that fails before the datapath is pinned
    /// removes them again (see [`Self::keep_created`]). Removed in `drop`,
    /// before `locks` is released.
    created: Vec<PathBuf>,
    locks: Vec<Flock<File>>,
}

impl NodeLock {
    /// Lock `bpffs_dir` (the directory itself: bpffs holds no plain files)
    /// and then `<state_dir>/agent.lock`, creating the directories if needed.
    /// A refusal leaves nothing it created behind.
    pub fn acquire(bpffs_dir: &Path, state_dir: &Path) -> Result<Self, NodeLockError> {
        let mut held = Self { created: Vec::new(), locks: Vec::new() };
        create_dirs(bpffs_dir, &mut held.created)?;
        held.locks.push(lock(bpffs_dir, File::open(bpffs_dir))?);
        create_dirs(state_dir, &mut held.created)?;
        let state_path = state_dir.join(STATE_LOCK_FILE);
        let file = match File::options().write(true).create_new(true).open(&state_path) {
            Ok(file) => {
                held.created.push(state_path.clone());
                Ok(file)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                File::options().write(true).open(&state_path)
            }
            Err(e) => Err(e),
        };
        let mut state = lock(&state_path, file)?;
        let write_pid = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())
        };
        write_pid(&mut state).map_err(|source| NodeLockError::WritePid { path: state_path, source })?;
        held.locks.push(state);
        Ok(held)
    }

    /// The datapath is about to be pinned under the directories: from now
    /// on they stay, whatever happens.
    pub fn keep_created(&mut self) {
        self.created.clear();
    }
}

impl Drop for NodeLock {
    fn drop(&mut self) {
        // Only what is still empty: nothing but the lock file was put there.
        for path in self.created.iter().rev() {
            let _ = if path.is_dir() { std::fs::remove_dir(path) } else { std::fs::remove_file(path) };
        }
    }
}

/// `create_dir_all`, noting each directory it made.
fn create_dirs(dir: &Path, created: &mut Vec<PathBuf>) -> Result<(), NodeLockError> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    for dir in missing.into_iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => created.push(dir.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(NodeLockError::Create { path: dir.to_owned(), source }),
        }
    }
    Ok(())
}

/// The agent of this network namespace: a listening abstract unix socket.
/// Binding its name again fails while it exists; connecting to it tells
/// the holder's pid (SO_PEERCRED).
#[derive(Debug)]
pub struct NetnsLock {
    listener: UnixListener,
}

impl NetnsLock {
    pub fn acquire() -> Result<Self, NodeLockError> {
        Self::acquire_named(NETNS_LOCK_NAME)
    }

    /// [`Self::acquire`] with another name (tests).
    pub fn acquire_named(name: &str) -> Result<Self, NodeLockError> {
        let bind_err = |source| NodeLockError::NetnsBind { name: name.to_owned(), source };
        let address = SocketAddr::from_abstract_name(name).map_err(bind_err)?;
        match UnixListener::bind_addr(&address) {
            Ok(listener) => {
                listener.set_nonblocking(true).map_err(bind_err)?;
                Ok(Self { listener })
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                Err(NodeLockError::NetnsHeld { name: name.to_owned(), holder: netns_lock_holder(name) })
            }
            Err(e) => Err(bind_err(e)),
        }
    }

    /// Accept and close the connections of agents asking who holds the
    /// lock, so that their queue never fills. Needs a tokio runtime.
    pub fn answer_holder_queries(&self) -> io::Result<()> {
        let listener = tokio::net::UnixListener::from_std(self.listener.try_clone()?)?;
        tokio::spawn(async move {
            loop {
                if listener.accept().await.is_err() {
                    // Out of file descriptors, say: the next query waits.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        });
        Ok(())
    }
}

/// The pid of the process listening on the abstract socket `name`, from a
/// connection to it (never blocks: a full queue gives `Unknown`).
fn netns_lock_holder(name: &str) -> Holder {
    let holder = || -> nix::Result<u32> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
        u32::try_from(socket::getsockopt(&fd, sockopt::PeerCredentials)?.pid()).map_err(|_| Errno::ESRCH)
    };
    // Pid 0: the holder is in a pid namespace we cannot see into.
    holder().ok().filter(|pid| *pid != 0).map_or(Holder::Unknown, Holder::Pid)
}

fn lock(path: &Path, file: io::Result<File>) -> Result<Flock<File>, NodeLockError> {
    let file = file.map_err(|source| NodeLockError::Open { path: path.to_owned(), source })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            Err(NodeLockError::Held { path: path.to_owned(), holder: holder_of(&file) })
        }
        Err((_, source)) => Err(NodeLockError::Lock { path: path.to_owned(), source }),
    }
}

/// The pid /proc/locks gives for the flock on `file`'s inode.
pub(crate) fn holder_of(file: &File) -> Holder {
    let (Ok(meta), Ok(locks)) = (file.metadata(), std::fs::read_to_string("/proc/locks")) else {
        return Holder::Unknown;
    };
    let dev = meta.dev();
    let inode = format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), meta.ino());
    holder_in(&locks, &inode)
}

/// In /proc/locks text, the pid of the FLOCK held (not waited for) on
/// `inode` ("MAJ:MIN:INO", major and minor in hex as the kernel prints them).
fn holder_in(locks: &str, inode: &str) -> Holder {
    locks
        .lines()
        .map(|line| line.split_whitespace().skip(1).collect::<Vec<_>>())
        // Waiters are printed as "N: -> FLOCK ...".
        .filter(|fields| fields.first() == Some(&"FLOCK"))
        .find(|fields| fields.get(4) == Some(&inode))
        .and_then(|fields| fields.get(3)?.parse().ok())
        .map_or(Holder::Unknown, Holder::Pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_holder_in_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 811 00:1a:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1f:1234 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:1f:1234 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 99 fd:01:1234 0 EOF\n";
        assert_eq!(holder_in(locks, "00:1f:1234"), Holder::Pid(4242));
        assert_eq!(holder_in(locks, "fd:01:1234"), Holder::Pid(99));
        assert_eq!(holder_in(locks, "00:1a:77"), Holder::Unknown, "a POSIX lock is not ours");
        assert_eq!(holder_in(locks, "00:1f:9"), Holder::Unknown);
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let root = std::env::temp_dir().join(format!("dpt{}-node-lock", std::process::id()));
        let (bpffs, state) = (root.join("bpffs"), root.join("state"));
        let first = NodeLock::acquire(&bpffs, &state).unwrap();
        let pid = std::fs::read_to_string(state.join(STATE_LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock locks belong to open files: a second open in this process
        // conflicts just as another process would.
        match NodeLock::acquire(&bpffs, &state) {
            Err(NodeLockError::Held { path, holder }) => {
                assert_eq!(path, bpffs);
                assert_eq!(holder, Holder::Pid(std::process::id()));
            }
            other => panic!("second lock: {other:?}"),
        }
        match NodeLock::acquire(&root.join("other-bpffs"), &state) {
            Err(NodeLockError::Held { path, .. }) => assert_eq!(path, state.join(STATE_LOCK_FILE)),
            other => panic!("same state dir: {other:?}"),
        }
        assert!(!root.join("other-bpffs").exists(), "a refused lock removes the directory it made");
        drop(first);
        NodeLock::acquire(&bpffs, &state).expect("free again once dropped");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn what_a_lock_made_goes_unless_kept() {
        let root = std::env::temp_dir().join(format!("dpt{}-node-lock-made", std::process::id()));
        let (bpffs, state) = (root.join("bpffs/x"), root.join("state"));
        drop(NodeLock::acquire(&bpffs, &state).unwrap());
        assert!(!root.exists(), "all it made is gone");
        let mut kept = NodeLock::acquire(&bpffs, &state).unwrap();
        kept.keep_created();
        drop(kept);
        assert!(bpffs.is_dir() && state.join(STATE_LOCK_FILE).is_file());
        // What was there before stays anyway.
        drop(NodeLock::acquire(&bpffs, &state).unwrap());
        assert!(bpffs.is_dir() && state.join(STATE_LOCK_FILE).is_file());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_second_netns_lock_is_refused_naming_the_holder() {
        let name = format!("dpt{}-netns-lock", std::process::id());
        let first = NetnsLock::acquire_named(&name).unwrap();
        match NetnsLock::acquire_named(&name) {
            Err(NodeLockError::NetnsHeld { holder, .. }) => {
                assert_eq!(holder, Holder::Pid(std::process::id()))
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        NetnsLock::acquire_named(&name).expect("free again once dropped");
    }
}
