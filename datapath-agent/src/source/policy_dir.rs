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
}

/// Every object in the directory's `*.yaml`, `*.yml` and `*.json` files
/// (in name order; a file may hold several documents).
pub fn read(dir: &Path) -> Result<PolicyObjects, PolicyDirError> {
    let mut objects = PolicyObjects::default();
    for path in files(dir)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|source| PolicyDirError::Read { path: path.clone(), source })?;
        add_objects(&mut objects, &text, &path)?;
    }
    Ok(objects)
}

/// The objects of one YAML text (`path` names it in errors), added to `objects`.
pub fn add_objects(objects: &mut PolicyObjects, text: &str, path: &Path) -> Result<(), PolicyDirError> {
    let documents = parse_yaml(text)
        .map_err(|source| PolicyDirError::Yaml { path: path.to_owned(), source: Box::new(source) })?;
    for (index, value) in documents.into_iter().enumerate() {
        if !value.is_null() {
            add_object(objects, value, path, index)?;
        }
    }
    Ok(())
}

/// One document: an object of a kind policy reads, or a list of them (as
/// `kubectl get -o yaml` prints several: `kind: List` or `NetworkPolicyList`).
/// Objects of other kinds are skipped (said in the log).
fn add_object(
    objects: &mut PolicyObjects,
    value: serde_json::Value,
    path: &Path,
    index: usize,
) -> Result<(), PolicyDirError> {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    let object = |source| PolicyDirError::Object { path: path.to_owned(), index, kind: kind.clone(), source };
    match kind.as_str() {
        "NetworkPolicy" => objects.policies.push(serde_json::from_value(value).map_err(object)?),
        "Namespace" => objects.namespaces.push(serde_json::from_value(value).map_err(object)?),
        "Pod" => objects.pods.push(serde_json::from_value(value).map_err(object)?),
        list if list.ends_with("List") => {
            let items = value.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
            for item in items {
                // Items of a typed list may leave out their kind.
                let mut item = item;
                if item.get("kind").is_none() && list != "List" {
                    item["kind"] = serde_json::Value::String(list.trim_end_matches("List").to_owned());
                }
                add_object(objects, item, path, index)?;
            }
        }
        _ => tracing::warn!(
            file = %path.display(),
            document = index,
            kind,
            "policy_dir: not a NetworkPolicy, Namespace or Pod; skipped"
        ),
    }
    Ok(())
}

/// The documents of a YAML text, with YAML 1.2's booleans (only `true` and
/// `false`): `y`, `n`, `on`, `off` stay strings, as a namespace or label
/// value so spelled must (the API server reads them as the strings its
/// fields are). The parser's limits against YAML bombs are raised to fit a
/// large cluster's objects in one file (its default stops at 1,024
/// documents and 250,000 nodes: a few thousand pods).
pub fn parse_yaml(text: &str) -> Result<Vec<serde_json::Value>, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 50_000_000,
            max_events: 200_000_000,
        },
    };
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
pub fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, SystemTime)>> {
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
/// `seen`: the [`fingerprint`] taken before the agent's own first read (a
/// change made while it read is sent), `None` if that read failed.
pub fn watch(
    dir: PathBuf,
    seen: Option<Vec<(PathBuf, u64, SystemTime)>>,
) -> tokio::sync::mpsc::UnboundedReceiver<PolicyObjects> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut seen = seen;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubectl get -o yaml` prints for several objects (a `List`),
    /// typed lists, and objects of other kinds (skipped) are all read.
    #[test]
    fn lists_are_read_and_other_kinds_skipped() {
        let dir = std::env::temp_dir().join(format!("dpt-policy-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: y}, spec: {podSelector: {}}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: y}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems:\n- {metadata: {name: q, namespace: n}, spec: {podSelector: {}}}\n",
        )
        .unwrap();
        let objects = read(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<_> = objects.policies.iter().map(|p| p.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["p", "q"]);
        // "y" stays the string it is (YAML 1.2 booleans).
        assert_eq!(objects.policies[0].metadata.namespace.as_deref(), Some("y"));
        assert_eq!(objects.namespaces.len(), 1);
    }

    /// A large cluster's objects in one file: more documents and nodes than
    /// the YAML parser allows by default.
    #[test]
    fn a_large_file_is_read() {
        let pods: String = (0..5_000)
            .map(|i| format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: n, name: p{i}, labels: {{app: a{i}, tier: t}}}}\nstatus: {{podIP: 10.1.{}.{}}}\n", i / 250, i % 250))
            .collect();
        assert_eq!(parse_yaml(&pods).unwrap().len(), 5_000);
    }
}
