//! Configuration pieces both daemons share, and the layered loader.
//!
//! Every daemon reads its configuration in four layers, later ones winning:
//! built-in defaults, an optional TOML file, environment variables with the
//! daemon's prefix (`FEDGE_` for the coordinator, `FEDGE_NODE_` for edge
//! nodes; nested keys joined with `__`, e.g. `FEDGE_TRAIN__LEARNING_RATE`),
//! and command-line flags (including `--set key=value`). Unknown keys are
//! errors, so a typo never goes unnoticed.

use std::collections::HashMap;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for containers and log collectors).
    Json,
}

/// Variables of fedge's scripts that share the `FEDGE_` prefix but are not
/// configuration keys; the loader skips them.
pub const TOOLING_VARS: [&str; 3] = ["FEDGE_CACHE", "FEDGE_SHARED", "FEDGE_NODES"];

/// A `key=value` override from the command line; the value is parsed as
/// TOML when it can be (numbers, booleans, strings in quotes), else taken as a string.
pub fn parse_override(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not of the form key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// `s` as a TOML string value (quoted and escaped), for `--set key=VALUE`
/// overrides built from paths and names.
pub fn toml_string(s: impl std::fmt::Display) -> String {
    // JSON's string escapes are all valid in a TOML basic string.
    serde_json::to_string(&s.to_string()).expect("a string serializes")
}

/// Loads a `T` from defaults, an optional TOML file, the variables of `env`
/// starting with `env_prefix` + `_` (except those starting with any of
/// `env_exclude`), and `overrides` (dotted keys), in that order. Daemons pass
/// `std::env::vars()`.
pub fn load_layered<T>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    env_prefix: &str,
    env_exclude: &[&str],
    overrides: &[(String, String)],
) -> Result<T>
where
    T: DeserializeOwned + Serialize + Default,
{
    let defaults = Config::try_from(&T::default())?;
    let mut builder = Config::builder().add_source(defaults);
    if let Some(path) = file {
        if !path.is_file() {
            return Err(Error::Config(format!("config file {} does not exist", path.display())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // Parse once with the toml parser for a precise message on syntax errors.
        builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        Config::builder()
            .add_source(File::from_str(&text, FileFormat::Toml))
            .build()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    }
    let prefix = format!("{env_prefix}_");
    let env: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&prefix) && !env_exclude.iter().any(|x| k.starts_with(x)))
        .filter(|(k, _)| !TOOLING_VARS.contains(&k.as_str()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(env)),
    );
    for (key, value) in overrides {
        builder = builder.set_override(key.as_str(), toml_value(value))?;
    }
    let cfg = builder.build()?;
    cfg.try_deserialize::<T>().map_err(|e| {
        let origin = file.map(|f| format!(" (file {})", f.display())).unwrap_or_default();
        Error::Config(format!("{e}{origin}"))
    })
}

/// A `--set` value read as TOML (number, boolean, string, array, inline
/// table); anything that is not valid TOML is taken as a bare string.
fn toml_value(raw: &str) -> config::Value {
    Config::builder()
        .add_source(File::from_str(&format!("v = {raw}"), FileFormat::Toml))
        .build()
        .ok()
        .and_then(|c| c.get::<config::Value>("v").ok())
        .unwrap_or_else(|| raw.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        rounds: u32,
        name: String,
        data: Section,
    }

    #[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        synthetic_seed: u64,
        synthetic_train_samples: usize,
    }

    impl Default for Section {
        fn default() -> Self {
            Self {
                synthetic_seed: 17,
                synthetic_train_samples: 6000,
            }
        }
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "rounds = 3\nname = \"a\"\n[data]\nsynthetic_seed = 9\n").unwrap();
        let c: Sample = load_layered(
            Some(&file),
            [
                ("FEDGE_NAME".to_string(), "b".to_string()),
                ("OTHER_ROUNDS".to_string(), "1".to_string()),
                ("FEDGE_CACHE".to_string(), "/tmp".to_string()),
            ],
            "FEDGE",
            &[],
            &[("rounds".into(), "7".into())],
        )
        .unwrap();
        assert_eq!((c.rounds, c.name.as_str(), c.data.synthetic_seed), (7, "b", 9));
        assert_eq!(c.data.synthetic_train_samples, 6000);

        std::fs::write(&file, "roundz = 3\n").unwrap();
        let err = load_layered::<Sample>(Some(&file), [], "FEDGE", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `roundz`"), "{err}");

        std::fs::write(&file, "rounds = = 3\n").unwrap();
        let err = load_layered::<Sample>(Some(&file), [], "FEDGE", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid configuration: ") && err.contains("c.toml"),
            "{err}"
        );

        let err = load_layered::<Sample>(Some(&dir.path().join("nope.toml")), [], "X", &[], &[]).unwrap_err();
        assert!(err.to_string().contains("nope.toml does not exist"));

        let err = load_layered::<Sample>(None, [], "FEDGE", &[], &[("rounds".into(), "many".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rounds"), "{err}");
    }

    #[test]
    fn toml_strings_survive_the_override_parser() {
        let name = "cam \"7\" \\ é\tx";
        let c: Sample = load_layered(None, [], "FEDGE", &[], &[("name".into(), toml_string(name))]).unwrap();
        assert_eq!(c.name, name);
    }
}
