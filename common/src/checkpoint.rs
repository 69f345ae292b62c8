//! The coordinator's restart checkpoint as a file format: one safetensors
//! file holding the global model (`model/…` tensors, laid out by the run's
//! [`Manifest`]) and the strategy's state (`strategy/…`: server optimizer
//! moments, SCAFFOLD's control variate), with the run id and server steps in
//! its metadata. Reading it is fuzzed (`tests/fuzz`, target `checkpoint`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::params::{Manifest, TensorMeta, decode_f32, save_tensors, visit_safetensors};
use crate::{Error, Result};

/// Name prefix of the global model's tensors in a checkpoint.
pub const MODEL_PREFIX: &str = "model/";

/// Name prefix of the strategy state's vectors in a checkpoint.
const STRATEGY_PREFIX: &str = "strategy/";

/// What a restart continues from.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Rounds completed.
    pub round: u64,
    pub global: Vec<f32>,
    pub strategy: BTreeMap<String, Vec<f32>>,
    pub server_steps: u64,
}

/// Writes a checkpoint to `path` (atomically): `global` laid out by
/// `manifest`, the strategy's vectors, `steps` and `meta` (which should
/// name the run: [`parse`] checks `run_id`).
pub fn write(
    path: &Path,
    manifest: &Manifest,
    global: &[f32],
    strategy: &BTreeMap<String, Vec<f32>>,
    steps: u64,
    mut meta: HashMap<String, String>,
) -> Result<()> {
    let mut tensors = Vec::with_capacity(manifest.tensors.len() + strategy.len());
    let mut offset = 0;
    for t in &manifest.tensors {
        let n = t.numel();
        if offset + n > global.len() {
            return Err(Error::Checkpoint(format!(
                "the model has {} values; its manifest needs more",
                global.len()
            )));
        }
        tensors.push((
            format!("{MODEL_PREFIX}{}", t.name),
            t.shape.clone(),
            &global[offset..offset + n],
        ));
        offset += n;
    }
    for (name, values) in strategy {
        tensors.push((
            format!("{STRATEGY_PREFIX}{name}"),
            vec![values.len() as i64],
            values.as_slice(),
        ));
    }
    meta.insert("server_steps".into(), steps.to_string());
    save_tensors(path, tensors, meta)
}

/// Reads a checkpoint file's bytes: the global model (checked against
/// `manifest`) and the strategy state of round `round` of run `run_id`.
/// Corrupt or foreign bytes are an error, never a panic (fuzzed: `tests/fuzz`).
pub fn parse(bytes: &[u8], manifest: &Manifest, run_id: &str, round: u64) -> Result<Checkpoint> {
    // Tensors are read straight out of `bytes` into the global model: the
    // checkpoint is never held decoded twice.
    let mut global = Vec::with_capacity(manifest.numel());
    let mut strategy = BTreeMap::new();
    let mut model_tensors = Manifest::default();
    let metadata = visit_safetensors(bytes, |name, shape, data| {
        if let Some(name) = name.strip_prefix(MODEL_PREFIX) {
            model_tensors.tensors.push(TensorMeta {
                name: name.to_owned(),
                shape: shape.to_vec(),
            });
            global.extend(decode_f32(data));
        } else if let Some(name) = name.strip_prefix(STRATEGY_PREFIX) {
            strategy.insert(name.to_owned(), decode_f32(data).collect());
        }
        Ok(())
    })
    .map_err(|e| Error::Checkpoint(format!("cannot read the checkpoint of round {round} ({e})")))?;
    if metadata.get("run_id").map(String::as_str) != Some(run_id) {
        return Err(Error::Checkpoint(format!("it belongs to another run than {run_id}")));
    }
    let steps = metadata.get("server_steps").and_then(|s| s.parse().ok()).unwrap_or(0);
    if &model_tensors != manifest {
        return Err(Error::Checkpoint(format!(
            "it holds a model of {} parameters in {} tensors; this run's model has {} in {}",
            model_tensors.numel(),
            model_tensors.tensors.len(),
            manifest.numel(),
            manifest.tensors.len()
        )));
    }
    Ok(Checkpoint {
        round,
        global,
        strategy,
        server_steps: steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![3],
            }],
        }
    }

    #[test]
    fn a_written_checkpoint_reads_back_and_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.safetensors");
        let strategy = BTreeMap::from([("server.m".to_string(), vec![0.5, -0.5])]);
        let meta = HashMap::from([("run_id".to_string(), "run-1".to_string())]);
        write(&path, &manifest(), &[1.0, 2.0, 3.0], &strategy, 7, meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let cp = parse(&bytes, &manifest(), "run-1", 4).unwrap();
        assert_eq!(
            (cp.round, cp.global, cp.strategy, cp.server_steps),
            (4, vec![1.0, 2.0, 3.0], strategy, 7)
        );
        let err = parse(&bytes, &manifest(), "run-2", 4).unwrap_err();
        assert_eq!(err.to_string(), "checkpoint: it belongs to another run than run-2");
        let other = Manifest {
            tensors: vec![TensorMeta {
                name: "w".into(),
                shape: vec![4],
            }],
        };
        let err = parse(&bytes, &other, "run-1", 4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint: it holds a model of 3 parameters in 1 tensors; this run's model has 4 in 1"
        );
        assert!(parse(&bytes[..bytes.len() / 2], &manifest(), "run-1", 4).is_err());
    }

    #[test]
    fn a_model_shorter_than_its_manifest_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(
            &dir.path().join("cp.safetensors"),
            &manifest(),
            &[1.0],
            &BTreeMap::new(),
            0,
            HashMap::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint: the model has 1 values; its manifest needs more"
        );
    }
}
