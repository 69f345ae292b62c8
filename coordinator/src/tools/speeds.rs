//! How much slower than the machine each node of a local fleet trains
//! (`train.slowdown` of each node): spread log-normally from 1× to a
//! maximum with a fixed seed, or read from a CSV trace. Real fleets differ
//! 5–10× in speed; this reproduces that spread on one machine.

use std::path::{Path, PathBuf};

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
    /// A CSV file of `node,slowdown` rows (`node-3` or `3`; a header row
    /// and `#` comments are allowed); nodes it does not name run at 1×.
    Trace(PathBuf),
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

    /// The slowdown of each of `nodes` nodes, node 1 first.
    pub fn factors(&self, nodes: usize) -> Result<Vec<f64>> {
        match self {
            Self::LogNormal { max, seed } => Ok(log_normal(nodes, *max, *seed)),
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

fn trace(path: &Path, text: &str, nodes: usize) -> Result<Vec<f64>> {
    let mut factors = vec![1.0; nodes];
    let bad = |line: usize, what: String| Error::Fleet(format!("{}:{line}: {what}", path.display()));
    for (i, row) in text.lines().enumerate() {
        let line = i + 1;
        let row = row.split('#').next().unwrap_or_default().trim();
        let header = line == 1 && row.starts_with("node") && !row.starts_with("node-");
        if row.is_empty() || header {
            continue;
        }
        let mut cells = row.split(',').map(str::trim);
        let (Some(node), Some(factor), None) = (cells.next(), cells.next(), cells.next()) else {
            return Err(bad(line, format!("expected `node,slowdown`, got `{row}`")));
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
        let factor: f64 = factor
            .parse()
            .ok()
            .filter(|f: &f64| f.is_finite() && (1.0..=MAX_SLOWDOWN).contains(f))
            .ok_or_else(|| {
                bad(
                    line,
                    format!("slowdown `{factor}` must be a number from 1 to {MAX_SLOWDOWN}"),
                )
            })?;
        factors[index - 1] = factor;
    }
    Ok(factors)
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
        let f = trace(p, "node,slowdown\nnode-2, 4   # a Raspberry Pi\n\n3,2.5\n", 3).unwrap();
        assert_eq!(f, [1.0, 4.0, 2.5]);
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
        assert!(e.contains("expected `node,slowdown`, got `node-1`"), "{e}");
    }
}
