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
            Ok(line_by_line(&text))
        }
    }
}

/// What each line of `text` that parses alone says (others keep their
/// defaults), for a file with a syntax error: see [`lenient_table`].
pub(crate) fn line_by_line<T: serde::de::DeserializeOwned>(text: &str) -> T {
    // Each top-level key (or table) that `T` takes as it is: one it refuses
    // (a value of the wrong type, an unknown key in a strict table) is left
    // at its default, not the whole file.
    let mut kept = toml::Table::new();
    for (key, value) in lenient_table(text) {
        let mut trial = kept.clone();
        trial.insert(key, value);
        if toml::Value::Table(trial.clone()).try_into::<T>().is_ok() {
            kept = trial;
        }
    }
    toml::Value::Table(kept).try_into().unwrap_or_else(|_| toml::from_str("").expect("defaults"))
}

/// `text` read line by line: each `key = value` line that parses alone,
/// under the table its last `[table]` header names (array tables, such as
/// `[[peers]]`, are skipped: paths are never in them), the first of
/// repeated keys kept (the agent's last good read had only one).
pub(crate) fn lenient_table(text: &str) -> toml::Table {
    let mut root = toml::Table::new();
    // The current table's path; `None` inside an array table.
    let mut current: Option<Vec<String>> = Some(Vec::new());
    for line in text.lines().map(str::trim) {
        if line.starts_with("[[") {
            current = None;
            continue;
        }
        if line.starts_with('[') {
            current = toml::from_str::<toml::Table>(line).ok().map(|header| {
                let mut path = Vec::new();
                let mut table = &header;
                while let Some((key, toml::Value::Table(inner))) = table.iter().next() {
                    path.push(key.clone());
                    table = inner;
                }
                path
            });
            continue;
        }
        let (Some(path), Ok(entry)) = (&current, toml::from_str::<toml::Table>(line)) else { continue };
        // (A path through a key that is not a table: the line is left out.)
        if let Some(table) = table_at(&mut root, path) {
            for (key, value) in entry {
                table.entry(key).or_insert(value);
            }
        }
    }
    root
}

/// The table at `path` under `table`, made where missing.
fn table_at<'a>(table: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let Some((first, rest)) = path.split_first() else { return Some(table) };
    match table.entry(first.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
        toml::Value::Table(inner) => table_at(inner, rest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_a_syntax_error_is_read_line_by_line() {
        let text = r#"
bpffs_dir = "/sys/fs/bpf/ours"
mode = 7
mode = "vxlan"
state_dir = "/var/lib/ours" garbage
[vxlan]
device = "tun0"
port = [
[[peers]]
name = "b"
bpffs_dir = "/not/this"
[kubernetes.extra]
deep = 1
"#;
        assert!(toml::from_str::<toml::Table>(text).is_err(), "a file with syntax errors");
        let table = lenient_table(text);
        assert_eq!(
            table["bpffs_dir"].as_str(),
            Some("/sys/fs/bpf/ours"),
            "a top-level key; not the array table's"
        );
        assert_eq!(table["mode"].as_integer(), Some(7), "the first of a repeated key");
        assert!(!table.contains_key("state_dir"), "a line that does not parse is left out");
        assert_eq!(table["vxlan"]["device"].as_str(), Some("tun0"), "a table's key");
        assert!(!table.contains_key("peers") && !table.contains_key("name"), "array tables are skipped");
        assert_eq!(table["kubernetes"]["extra"]["deep"].as_integer(), Some(1), "a dotted header");
        let settings: SourceSettings = line_by_line(text);
        assert_eq!(settings.bpffs_dir, Path::new("/sys/fs/bpf/ours"));
    }
}
