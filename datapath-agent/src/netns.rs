//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so
//! the work runs on a fresh thread that enters the namespace and then ends:
//! no other thread, and no later work, is affected.

use std::{fs::File, path::Path};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
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

pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open { path: path.display().to_string(), source })
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
