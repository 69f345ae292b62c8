//! The configuration reference, `docs/configuration.md`, against the example
//! files that list every key with its default (each daemon's unit tests hold
//! those against the code): the page names every key of each example, in
//! its section, and no key the examples lack.

use std::collections::BTreeMap;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every key of an example file, set or (when optional) commented out, by
/// section ("" for the top level).
fn example_keys(toml: &str) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in toml.lines() {
        let line = line.trim_start_matches("# ");
        if let Some(rest) = line.strip_prefix('[') {
            section = rest.split(']').next().unwrap().to_string();
            keys.entry(section.clone()).or_default();
        } else if let Some((key, _)) = line.split_once(" = ")
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.entry(section.clone()).or_default().push(key.to_string());
        }
    }
    keys
}

/// The backticked names that lead a definition in `text`: those before the
/// first colon of each bullet and of a section's opening line, when the line
/// opens with a name. `a.{b,c}` names `a.b` and `a.c`; `a.*` names the
/// section `a`.
fn defined_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines() {
        let lead = if let Some(rest) = line.strip_prefix("- ") {
            rest
        } else if let Some(rest) = line.strip_prefix("**`[") {
            rest.split_once("]`**:").map_or("", |(_, r)| r)
        } else {
            continue;
        };
        let lead = lead.trim_start();
        if !lead.starts_with('`') {
            continue;
        }
        let lead = lead.split(": ").next().unwrap_or("");
        for part in lead.split('`').skip(1).step_by(2) {
            let part = part.trim_end_matches(".*");
            if part.contains(' ') {
                continue;
            }
            match part.split_once(".{") {
                Some((prefix, list)) => {
                    names.extend(list.trim_end_matches('}').split(',').map(|k| format!("{prefix}.{k}")))
                }
                None => names.push(part.to_string()),
            }
        }
    }
    names
}

/// The part of the page between two headings.
fn part<'a>(page: &'a str, from: &str, to: &str) -> &'a str {
    let start = page.find(from).unwrap_or_else(|| panic!("no `{from}` on the page"));
    let end = page[start..].find(to).map_or(page.len(), |e| start + e);
    &page[start..end]
}

#[test]
fn the_page_names_every_coordinator_key_in_its_section_and_no_other() {
    let page = read("docs/configuration.md");
    let coordinator = part(&page, "## Coordinator", "## Rules across sections");
    let example = example_keys(&read("coordinator/coordinator.example.toml"));
    let blocks: Vec<(&str, &str)> = coordinator
        .split("\n**`[")
        .skip(1)
        .map(|b| b.split_once("]`**").expect("a section heading"))
        .collect();
    for (section, keys) in &example {
        if section.is_empty() {
            for key in keys {
                assert!(
                    coordinator.contains(&format!("`{key}`")),
                    "top-level key `{key}` is not on docs/configuration.md"
                );
            }
            continue;
        }
        let (_, body) = blocks
            .iter()
            .find(|(name, _)| name == section)
            .unwrap_or_else(|| panic!("section [{section}] is not on docs/configuration.md"));
        let named = defined_names(&format!("**`[{section}]`**{body}"));
        for key in keys {
            assert!(
                named.contains(key) || body.contains(&format!("`{key}`")),
                "[{section}] {key} is not on docs/configuration.md"
            );
        }
        for name in named {
            assert!(
                keys.contains(&name),
                "docs/configuration.md names [{section}] {name}, which coordinator.example.toml does not have"
            );
        }
    }
    for (name, _) in &blocks {
        assert!(
            example.contains_key(*name),
            "docs/configuration.md has a section [{name}] that coordinator.example.toml lacks"
        );
    }
}

#[test]
fn the_page_names_every_edge_node_key_and_no_other() {
    let page = read("docs/configuration.md");
    let node = part(&page, "## Edge node", "\n## ");
    let example = example_keys(&read("edge-node/edge-node.example.toml"));
    let dotted: Vec<String> = example
        .iter()
        .flat_map(|(section, keys)| {
            keys.iter().map(move |k| match section.as_str() {
                "" => k.clone(),
                s => format!("{s}.{k}"),
            })
        })
        .collect();
    let named = defined_names(node);
    for key in &dotted {
        let section = key.split_once('.').map(|(s, _)| s);
        assert!(
            named.contains(key)
                || section.is_some_and(|s| named.iter().any(|n| n == s))
                || node.contains(&format!("`{key}`")),
            "edge-node key {key} is not on docs/configuration.md"
        );
    }
    for name in named {
        assert!(
            dotted.contains(&name) || example.contains_key(&name),
            "docs/configuration.md names the edge-node key {name}, which edge-node.example.toml does not have"
        );
    }
}
