//! One `monitor` at a time (the ring buffer has one reader), and forward
//! tracing (`trace_forwards`) on only while a monitor runs: a monitor
//! holds an exclusive `flock` on `<bpffs_dir>/monitor/` (bpffs holds no
//! plain files) for as long as it runs. Whoever takes the lock knows no
//! monitor runs, so `trace_forwards` left on then was left by one that was
//! killed before it could switch it off: the next monitor, and the agent
//! (at start and every few seconds), switch it off.

use std::{fs::File, io, path::PathBuf, time::Duration};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::{
    bpf::PinLayout,
    host::node_lock::{Holder, holder_of},
};

/// How long a monitor waits for the lock before it gives up: the agent
/// holds it for a moment every few seconds to look.
const WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum MonitorLockError {
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
        "another monitor ({holder}) is running on {path}: one monitor at a time (the ring buffer has \
         one reader); stop it first"
    )]
    Held { path: PathBuf, holder: Holder },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// Held while no other monitor may run (dropped: free again).
#[derive(Debug)]
pub struct MonitorLock {
    _lock: Flock<File>,
}

impl MonitorLock {
    /// Take the lock for a monitor: refused, naming the holder, while
    /// another monitor holds it.
    pub fn acquire(pins: &PinLayout) -> Result<Self, MonitorLockError> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match Self::try_acquire(pins) {
                Err(MonitorLockError::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Take the lock if no monitor holds it now.
    pub fn try_acquire(pins: &PinLayout) -> Result<Self, MonitorLockError> {
        let path = pins.monitor_lock();
        std::fs::create_dir_all(&path)
            .map_err(|source| MonitorLockError::Create { path: path.clone(), source })?;
        let file =
            File::open(&path).map_err(|source| MonitorLockError::Open { path: path.clone(), source })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((file, Errno::EWOULDBLOCK)) => Err(MonitorLockError::Held { holder: holder_of(&file), path }),
            Err((_, source)) => Err(MonitorLockError::Lock { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let root = std::env::temp_dir().join(format!("dpt{}-monitor-lock", std::process::id()));
        let pins = PinLayout::new(&root);
        let first = MonitorLock::acquire(&pins).unwrap();
        match MonitorLock::acquire(&pins) {
            Err(MonitorLockError::Held { holder, .. }) => assert_eq!(holder, Holder::Pid(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        MonitorLock::try_acquire(&pins).expect("free again once dropped");
        let _ = std::fs::remove_dir_all(&root);
    }
}
