//! One module per `datapath-agent` verb, and what the verbs that read the
//! node's state share: where the agent keeps it, from its config file.
pub mod cleanup;
pub mod inspect;
pub mod monitor;
pub mod run;
pub mod status;

use std::path::Path;

use anyhow::Context as _;

use crate::source::config::SourceSettings;

/// Where the agent of `config` keeps its socket, pins and records (the
/// defaults without a file). A file with a syntax error (an edit the agent
/// rejected and runs on without) is read line by line for them, with a
/// warning: that is when these verbs are needed most.
pub fn agent_settings(config: Option<&Path>) -> anyhow::Result<SourceSettings> {
    let Some(path) = config else {
        return toml::from_str("").context("the default settings");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the agent's config {}", path.display()))?;
    match toml::from_str(&text) {
        Ok(settings) => Ok(settings),
        Err(e) => {
            eprintln!(
                "warning: {} does not parse ({}); its paths read line by line",
                path.display(),
                e.message()
            );
            Ok(paths_line_by_line(&text))
        }
    }
}

/// The settings from each top-level line of `text` that parses alone
/// (others keep their defaults).
fn paths_line_by_line(text: &str) -> SourceSettings {
    let top_level = text.lines().take_while(|line| !line.trim_start().starts_with('['));
    let lines: Vec<&str> = top_level.filter(|line| toml::from_str::<toml::Table>(line).is_ok()).collect();
    // Repeated keys: the first wins, as the agent's last good read had only one.
    let mut seen = std::collections::BTreeSet::new();
    let unique: Vec<&str> = lines
        .into_iter()
        .filter(|line| {
            toml::from_str::<toml::Table>(line)
                .ok()
                .and_then(|t| t.keys().next().cloned())
                .is_none_or(|key| seen.insert(key))
        })
        .collect();
    toml::from_str(&unique.join("\n")).unwrap_or_else(|_| toml::from_str("").expect("defaults"))
}
