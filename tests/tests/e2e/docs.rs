//! The operator docs stay in step with the code. (Pure reading: no root.)

use datapath_common::DropReason;

#[test]
fn every_drop_reason_is_documented_with_its_number() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/why-dropped.md")).unwrap();
    for reason in DropReason::ALL {
        let row = format!("| {} | `{}` |", reason as u32, reason.name());
        assert!(page.contains(&row), "docs/why-dropped.md lacks the row for {reason:?}: {row}");
    }
}

/// The "where" of each reason's row names the programs
/// `DropReason::directions` says may drop for it (the pairs `/metrics`
/// exports from 0).
#[test]
fn every_drop_reason_names_the_programs_that_may_drop_for_it() {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/why-dropped.md")).unwrap();
    for reason in DropReason::ALL {
        let start = format!("| {} | `{}` | ", reason as u32, reason.name());
        let row = page.lines().find_map(|l| l.strip_prefix(start.as_str())).unwrap();
        let documented: Vec<&str> = row.split(" | ").next().unwrap().split(", ").collect();
        let declared: Vec<&str> = reason.directions().iter().map(|d| d.name()).collect();
        assert_eq!(documented, declared, "{reason:?}");
    }
}

/// The fields of `struct NAME` in the agent's config source, as the file
/// spells them (serde takes the field names as they are).
fn config_fields(source: &str, name: &str) -> Vec<String> {
    let start = source.find(&format!("pub struct {name} {{")).unwrap_or_else(|| panic!("no struct {name}"));
    let body = &source[start..start + source[start..].find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':').map(|(field, _)| field.to_owned()))
        .collect()
}

/// README's configuration block names every key of the agent's config
/// file (the top level and `[kubernetes]`, `[vxlan]`, `[[peers]]`;
/// Services are described in docs/services.md): a key added to the
/// config struct must be documented there.
#[test]
fn every_config_key_is_in_the_readme() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../datapath-agent/src/source/config.rs"
    ))
    .unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("## Configuration").unwrap();
    let block = &readme[start..];
    let block = &block[block.find("```toml").unwrap()..];
    let block = &block[..block[7..].find("```").unwrap() + 7];
    let keys: std::collections::BTreeSet<&str> = block
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(table) = l.strip_prefix('[') {
                return Some(table.trim_matches(|c| c == '[' || c == ']').split(']').next().unwrap());
            }
            l.split_once(" =").map(|(key, _)| key.trim())
        })
        .collect();
    let top = config_fields(&source, "AgentConfig");
    assert!(top.len() > 25, "{top:?}");
    let model =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-agent/src/model.rs"))
            .unwrap();
    let nested = [
        config_fields(&source, "KubernetesConfig"),
        config_fields(&source, "VxlanConfig"),
        config_fields(&model, "PeerConfig"),
    ];
    let missing: Vec<&String> =
        top.iter().chain(nested.iter().flatten()).filter(|k| !keys.contains(k.as_str())).collect();
    assert!(missing.is_empty(), "README's configuration block lacks {missing:?}");
    // And it is a file the agent reads (no misspelt key, no wrong type).
    let toml_text = block.trim_start_matches("```toml").trim_end_matches("```");
    if let Err(e) = toml::from_str::<datapath_agent::source::config::AgentConfig>(toml_text) {
        panic!("README's configuration block does not parse: {e}");
    }
}
