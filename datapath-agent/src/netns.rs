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

/// Run `work` on a thread inside the network namespace at `path`.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let file = open(path)?;
    let shown = path.display().to_string();
    let thread_path = shown.clone();
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetnsError::Enter { path: thread_path, source })?;
        Ok(work())
    })
    .join()
    .map_err(|_| NetnsError::Panicked { path: shown })?
}
