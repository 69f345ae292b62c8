//! How much slower than the machine each node of a local fleet trains
//! (`train.slowdown` of each node), and when it is reachable
//! (`availability.*`): slowdowns spread log-normally from 1× to a maximum
//! with a fixed seed, or both read from a CSV trace. Real fleets differ
//! 5–10× in speed and come and go; this reproduces that on one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use humantime_serde::re::humantime;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// The largest slowdown a node accepts (`train.slowdown`).
const MAX_SLOWDOWN: f64 = 1000.0;

/// Each node's slowdown.
#[derive(Debug, Clone, PartialEq)]
pub enum Slowdowns {
    /// Log-normally spread: the fastest node at 1×, the slowest at `max`×,
    /// drawn from `seed` (the same fleet every time).
    LogNormal { max: f64, seed: u64 },
    /// A CSV file of `node,slowdown[,online,offline[,offset]]` rows
    /// (`node-3` or `3`; durations as `30s` or `2m`; a header row and `#`
    /// comments are allowed); nodes it does not name run at 1×, always online.
    Trace(PathBuf),
}

/// One node's emulated device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeProfile {
    /// `train.slowdown`.
    pub slowdown: f64,
    /// `availability.{online,offline,offset}`, when the node comes and goes.
    pub availability: Option<[Duration; 3]>,
}

impl Default for NodeProfile {
    fn default() -> Self {
        Self {
            slowdown: 1.0,
            availability: None,
        }
    }
}

impl NodeProfile {
    /// The node's settings, as `--set key=value` pairs (none at 1×, always online).
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.slowdown > 1.0 {
            out.push(("train.slowdown".into(), format!("{:?}", self.slowdown)));
        }
        if let Some(windows) = self.availability {
            for (key, d) in ["online", "offline", "offset"].into_iter().zip(windows) {
                out.push((
                    format!("availability.{key}"),
                    format!("\"{}\"", humantime::format_duration(d)),
                ));
            }
        }
        out
    }

    /// The trace row of node `index` (from 1).
    pub fn row(&self, index: usize) -> String {
        let mut row = format!("node-{index},{:.3}", self.slowdown);
        if let Some(windows) = self.availability {
            for d in windows {
                row.push_str(&format!(",{}", humantime::format_duration(d)));
            }
        }
        row
    }
}

impl Slowdowns {
    /// Reads `lognormal:MAX` or the path of a CSV trace.
    pub fn parse(spec: &str, seed: u64) -> Result<Self> {
        match spec.strip_prefix("lognormal:") {
            Some(max) => {
                let max: f64 = max
                    .parse()
                    .map_err(|_| Error::Fleet(format!("--node-slowdowns lognormal:MAX needs a number, got `{max}`")))?;
                if !(max.is_finite() && (1.0..=MAX_SLOWDOWN).contains(&max)) {
                    return Err(Error::Fleet(format!(
                        "--node-slowdowns lognormal:MAX must be between 1 and {MAX_SLOWDOWN}, got {max}"
                    )));
                }
                Ok(Self::LogNormal { max, seed })
            }
            None => Ok(Self::Trace(PathBuf::from(spec))),
        }
    }

    /// The device of each of `nodes` nodes, node 1 first.
    pub fn profiles(&self, nodes: usize) -> Result<Vec<NodeProfile>> {
        match self {
            Self::LogNormal { max, seed } => Ok(log_normal(nodes, *max, *seed)
                .into_iter()
                .map(|slowdown| NodeProfile {
                    slowdown,
                    availability: None,
                })
                .collect()),
            Self::Trace(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
                    context: format!("reading the slowdown trace {}", path.display()),
                    source: e,
                })?;
                trace(path, &text, nodes)
            }
        }
    }
}

/// `nodes` slowdowns whose logarithms are standard normal draws, moved and
/// scaled so that the fastest is 1 and the slowest `max`.
fn log_normal(nodes: usize, max: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let z: Vec<f64> = (0..nodes).map(|_| StandardNormal.sample(&mut rng)).collect();
    let lo = z.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    z.iter()
        .map(|&x| {
            let t = if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
            max.powf(t)
        })
        .collect()
}

fn trace(path: &Path, text: &str, nodes: usize) -> Result<Vec<NodeProfile>> {
    let mut profiles = vec![NodeProfile::default(); nodes];
    let bad = |line: usize, what: String| Error::Fleet(format!("{}:{line}: {what}", path.display()));
    for (i, row) in text.lines().enumerate() {
        let line = i + 1;
        let row = row.split('#').next().unwrap_or_default().trim();
        let header = line == 1 && row.starts_with("node") && !row.starts_with("node-");
        if row.is_empty() || header {
            continue;
        }
        let cells: Vec<&str> = row.split(',').map(str::trim).collect();
        let (node, factor, windows) = match cells.as_slice() {
            [node, factor] => (*node, *factor, None),
            [node, factor, online, offline] => (*node, *factor, Some([*online, *offline, "0s"])),
            [node, factor, online, offline, offset] => (*node, *factor, Some([*online, *offline, *offset])),
            _ => {
                return Err(bad(
                    line,
                    format!("expected `node,slowdown[,online,offline[,offset]]`, got `{row}`"),
                ));
            }
        };
        let index: usize = node
            .strip_prefix("node-")
            .unwrap_or(node)
            .parse()
            .ok()
            .filter(|&n| (1..=nodes).contains(&n))
            .ok_or_else(|| {
                bad(
                    line,
                    format!("`{node}` is not a node of this fleet (node-1 to node-{nodes})"),
                )
            })?;
        let slowdown: f64 = factor
            .parse()
            .ok()
            .filter(|f: &f64| f.is_finite() && (1.0..=MAX_SLOWDOWN).contains(f))
            .ok_or_else(|| {
                bad(
                    line,
                    format!("slowdown `{factor}` must be a number from 1 to {MAX_SLOWDOWN}"),
                )
            })?;
        let availability = match windows {
            Some(w) => {
                let mut d = [Duration::ZERO; 3];
                for (out, text) in d.iter_mut().zip(w) {
                    *out = humantime::parse_duration(text)
                        .map_err(|e| bad(line, format!("`{text}` is not a duration like 30s or 2m ({e})")))?;
                }
                if d[0].is_zero() || d[1].is_zero() {
                    return Err(bad(
                        line,
                        "online and offline windows must both be longer than zero".into(),
                    ));
                }
                Some(d)
            }
            None => None,
        };
        profiles[index - 1] = NodeProfile { slowdown, availability };
    }
    Ok(profiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_normal_spread_runs_from_one_to_its_maximum_the_same_every_time() {
        let f = log_normal(16, 8.0, 7);
        assert_eq!(f, log_normal(16, 8.0, 7));
        let lo = f.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = f.iter().copied().fold(0.0, f64::max);
        assert!((lo - 1.0).abs() < 1e-12 && (hi - 8.0).abs() < 1e-9, "{f:?}");
        assert_ne!(f, log_normal(16, 8.0, 8), "another seed, another fleet");
        assert_eq!(log_normal(1, 8.0, 7), [1.0]);
    }

    #[test]
    fn specs_and_traces_are_read_and_their_mistakes_named() {
        assert_eq!(
            Slowdowns::parse("lognormal:8", 3).unwrap(),
            Slowdowns::LogNormal { max: 8.0, seed: 3 }
        );
        let e = Slowdowns::parse("lognormal:0.5", 3).unwrap_err().to_string();
        assert!(e.contains("must be between 1 and 1000, got 0.5"), "{e}");
        let e = Slowdowns::parse("lognormal:fast", 3).unwrap_err().to_string();
        assert!(e.contains("needs a number, got `fast`"), "{e}");

        let p = Path::new("speeds.csv");
        let f = trace(p, "node,slowdown\nnode-2, 4   # a Raspberry Pi\n\n3,2.5,30s,1m\n", 3).unwrap();
        let slowdowns: Vec<f64> = f.iter().map(|p| p.slowdown).collect();
        assert_eq!(slowdowns, [1.0, 4.0, 2.5]);
        assert_eq!((f[0].availability, f[1].availability), (None, None));
        let s = Duration::from_secs;
        assert_eq!(f[2].availability, Some([s(30), s(60), s(0)]));
        assert_eq!(
            f[2].settings(),
            [
                ("train.slowdown".to_string(), "2.5".to_string()),
                ("availability.online".to_string(), "\"30s\"".to_string()),
                ("availability.offline".to_string(), "\"1m\"".to_string()),
                ("availability.offset".to_string(), "\"0s\"".to_string()),
            ]
        );
        assert_eq!(f[2].row(3), "node-3,2.500,30s,1m,0s");
        assert!(f[0].settings().is_empty());
        let e = trace(p, "node-1,2,30s\n", 3).unwrap_err().to_string();
        assert!(e.contains("expected `node,slowdown[,online,offline[,offset]]`"), "{e}");
        let e = trace(p, "node-1,2,soon,1m\n", 3).unwrap_err().to_string();
        assert!(
            e.contains("speeds.csv:1: `soon` is not a duration like 30s or 2m"),
            "{e}"
        );
        let e = trace(p, "node-1,2,0s,1m\n", 3).unwrap_err().to_string();
        assert!(
            e.contains("online and offline windows must both be longer than zero"),
            "{e}"
        );
        let e = trace(p, "node-4,2\n", 3).unwrap_err().to_string();
        assert!(
            e.contains("speeds.csv:1: `node-4` is not a node of this fleet (node-1 to node-3)"),
            "{e}"
        );
        let e = trace(p, "node-1,0.5\n", 3).unwrap_err().to_string();
        assert!(
            e.contains("speeds.csv:1: slowdown `0.5` must be a number from 1 to 1000"),
            "{e}"
        );
        let e = trace(p, "node-1\n", 3).unwrap_err().to_string();
        assert!(e.contains("got `node-1`"), "{e}");
    }
}
