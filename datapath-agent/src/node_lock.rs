//! One agent per node. Two agents on the same pinned maps or endpoint
//! records would undo each other's work (and take over each other's CNI
//! socket), so `run` takes an exclusive `flock` on the bpffs directory and
//! on `<state_dir>/agent.lock` before it touches anything, and refuses to
//! start, naming the holder's pid, while another process holds either.
//! The kernel drops the locks when their holder exits, however it exits
//! (SIGKILL included), so a restart never finds a stale lock.

use std::{
    fs::File,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

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
    _bpffs: Flock<File>,
    _state: Flock<File>,
}

impl NodeLock {
    /// Lock `bpffs_dir` (the directory itself: bpffs holds no plain files)
    /// and `<state_dir>/agent.lock`, creating the directories if needed.
    pub fn acquire(bpffs_dir: &Path, state_dir: &Path) -> Result<Self, NodeLockError> {
        for dir in [bpffs_dir, state_dir] {
            std::fs::create_dir_all(dir)
                .map_err(|source| NodeLockError::Create { path: dir.to_owned(), source })?;
        }
        let bpffs = lock(bpffs_dir, File::open(bpffs_dir))?;
        let state_path = state_dir.join(STATE_LOCK_FILE);
        let file = File::options().create(true).truncate(false).write(true).open(&state_path);
        let mut state = lock(&state_path, file)?;
        let write_pid = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())
        };
        write_pid(&mut state).map_err(|source| NodeLockError::WritePid { path: state_path, source })?;
        Ok(Self { _bpffs: bpffs, _state: state })
    }
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
fn holder_of(file: &File) -> Holder {
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
        drop(first);
        NodeLock::acquire(&bpffs, &state).expect("free again once dropped");
        let _ = std::fs::remove_dir_all(&root);
    }
}
