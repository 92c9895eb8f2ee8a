//! The agent's config file: read and checked at start, resolved (with the
//! Node object in Kubernetes mode), and watched for live changes.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;

use crate::{
    observe::health::{ConfigRejection, Health},
    source::config::{AgentConfig, ConfigError, Source, SourceSettings},
};

/// A parse error of the config text, with the file's path.
pub(crate) fn in_file(path: &Path, e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
        other => other,
    }
}

/// The config file, read, with what is needed before it can be resolved.
pub(crate) struct ConfigFile {
    path: PathBuf,
    text: String,
    pub(crate) settings: SourceSettings,
}

impl ConfigFile {
    /// Read and check what can be checked without the Node object: a static
    /// file whole, a kubernetes one as far as [`SourceSettings`] goes.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let file = |e| in_file(path, e);
        let settings = AgentConfig::source_settings(&text).map_err(file)?;
        match settings.source {
            Source::Static => AgentConfig::parse(&text).map_err(file)?.check_host()?,
            Source::Kubernetes => settings.check()?,
        }
        Ok(Self { path: path.to_owned(), text, settings })
    }

    /// The config, resolved: from the file alone (static source), or with
    /// this node's facts from its Node object (Kubernetes source, which also
    /// returns the client for the Node watch).
    pub(crate) async fn resolve(&self) -> anyhow::Result<(AgentConfig, Option<kube::Client>)> {
        match self.settings.source {
            Source::Static => Ok((AgentConfig::parse(&self.text).map_err(|e| in_file(&self.path, e))?, None)),
            Source::Kubernetes => {
                let node_name = self
                    .settings
                    .node_name
                    .clone()
                    .or_else(|| std::env::var("NODE_NAME").ok())
                    .filter(|n| !n.is_empty())
                    .context("kubernetes mode needs node_name in the config or $NODE_NAME (downward API: spec.nodeName)")?;
                let client = crate::source::kubernetes::client(&self.settings.kubernetes).await?;
                let identity = crate::source::kubernetes::own_identity(&client, &node_name).await?;
                tracing::info!(node = node_name, pod_cidr = %identity.pod_cidr, node_ip = %identity.node_ip, "node facts from its Node object");
                let config = AgentConfig::parse_with(&self.text, Some(&identity))
                    .map_err(|e| in_file(&self.path, e))?;
                Ok((config, Some(client)))
            }
        }
    }
}

/// Poll the config file; send each new valid version. An invalid edit is
/// logged, counted and shown by /readyz, and otherwise ignored: the running
/// state stays as it is.
pub(crate) fn watch_config(
    path: PathBuf,
    initial: AgentConfig,
    health: Arc<Health>,
) -> tokio::sync::mpsc::Receiver<AgentConfig> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut current = initial;
        let mut last_text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            let Ok(text) = tokio::fs::read_to_string(&path).await else { continue };
            if text == last_text {
                continue;
            }
            last_text = text;
            match AgentConfig::load(&path) {
                Ok(new) if new != current => {
                    tracing::info!(config = %path.display(), "config file changed");
                    current = new.clone();
                    if tx.send(new).await.is_err() {
                        return;
                    }
                }
                // Back to what runs.
                Ok(_) => health.config_accepted(),
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!(error, "ignoring invalid config change");
                    health.config_rejected(ConfigRejection::Invalid, error);
                }
            }
        }
    });
    rx
}
