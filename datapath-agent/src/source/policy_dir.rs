//! The static source of NetworkPolicy: Kubernetes objects (NetworkPolicy,
//! Namespace, Pod) as YAML files in a directory, read whole and watched.
//! A directory that cannot be read whole is not applied: the last good set
//! stays (a half-written file must not open or close anything).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::model::PolicyObjects;

/// How often the directory is looked at for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PolicyDirError {
    #[error("cannot read policy_dir {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML")]
    Yaml {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: document {index} is not a valid {kind}")]
    Object {
        path: PathBuf,
        index: usize,
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: document {index} has kind {kind:?}; policy_dir holds NetworkPolicy, Namespace and Pod objects only"
    )]
    Kind { path: PathBuf, index: usize, kind: String },
}

/// Every object in the directory's `*.yaml`, `*.yml` and `*.json` files
/// (in name order; a file may hold several documents).
pub fn read(dir: &Path) -> Result<PolicyObjects, PolicyDirError> {
    let mut objects = PolicyObjects::default();
    for path in files(dir)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|source| PolicyDirError::Read { path: path.clone(), source })?;
        let documents: Vec<serde_json::Value> = parse_yaml(&text)
            .map_err(|source| PolicyDirError::Yaml { path: path.clone(), source: Box::new(source) })?;
        for (index, value) in documents.into_iter().enumerate() {
            if value.is_null() {
                continue;
            }
            let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
            let object =
                |source| PolicyDirError::Object { path: path.clone(), index, kind: kind.clone(), source };
            match kind.as_str() {
                "NetworkPolicy" => objects.policies.push(serde_json::from_value(value).map_err(object)?),
                "Namespace" => objects.namespaces.push(serde_json::from_value(value).map_err(object)?),
                "Pod" => objects.pods.push(serde_json::from_value(value).map_err(object)?),
                _ => return Err(PolicyDirError::Kind { path: path.clone(), index, kind }),
            }
        }
    }
    Ok(objects)
}

/// The documents of a YAML text, with YAML 1.2's booleans (only `true` and
/// `false`): `y`, `n`, `on`, `off` stay strings, as a namespace or label
/// value so spelled must (the API server reads them as the strings its
/// fields are).
pub fn parse_yaml(text: &str) -> Result<Vec<serde_json::Value>, serde_saphyr::Error> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_multiple_with_options(text, options)
}

fn files(dir: &Path) -> Result<Vec<PathBuf>, PolicyDirError> {
    let read_err = |source| PolicyDirError::Read { path: dir.to_owned(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let wanted =
            path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// What tells a change: each file's name, size and modification time.
fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, SystemTime)>> {
    let files = files(dir).ok()?;
    files
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok()?))
        })
        .collect()
}

/// Watch `dir`: each time its files change and read whole, their objects.
/// `last` is what the agent applied at start (not sent again).
pub fn watch(dir: PathBuf) -> tokio::sync::mpsc::UnboundedReceiver<PolicyObjects> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut seen = fingerprint(&dir);
        let mut failing = false;
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let now = fingerprint(&dir);
            if now == seen && !failing {
                continue;
            }
            seen = now;
            match tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || read(&dir)
            })
            .await
            {
                Ok(Ok(objects)) => {
                    failing = false;
                    if tx.send(objects).is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::error!(
                            error = format!("{:#}", anyhow::Error::from(e)),
                            "policy_dir not applied; the last good policies stay"
                        );
                    }
                    failing = true;
                }
                Err(e) => tracing::error!(error = %e, "reading policy_dir panicked"),
            }
        }
    });
    rx
}
