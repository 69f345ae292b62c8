//! Named, ordered parameter sets: a [`Manifest`] of tensor names and shapes
//! plus one flat `f32` buffer, saved as and read from safetensors files
//! (`fedge_learn::tensors` moves them to and from a libtorch `VarStore`).
//!
//! The order is the lexicographic order of parameter names, so two processes
//! that build the same model agree on it without coordination.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::fsutil::write_atomic_with;
use crate::{Error, Result};

/// One tensor of a parameter set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<i64>,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }
}

/// The tensors of a parameter set, in payload order. All are f32.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub tensors: Vec<TensorMeta>,
}

impl Manifest {
    /// Total number of parameters.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorMeta::numel).sum()
    }

    /// Size in bytes of the flat f32 payload.
    pub fn payload_bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }
}

/// The values of little-endian f32 bytes (a whole number of 4-byte values;
/// a trailing partial value is ignored).
pub fn decode_f32(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Writes a parameter set as a safetensors file (atomically: temp file,
/// fsync, rename), streaming it rather than building it in memory.
pub fn save_safetensors(
    path: &Path,
    manifest: &Manifest,
    flat: &[f32],
    metadata: HashMap<String, String>,
) -> Result<()> {
    if flat.len() != manifest.numel() {
        return Err(Error::Params(format!(
            "{} values for a manifest of {} parameters",
            flat.len(),
            manifest.numel()
        )));
    }
    let mut tensors = Vec::with_capacity(manifest.tensors.len());
    let mut offset = 0;
    for meta in &manifest.tensors {
        let n = meta.numel();
        tensors.push((meta.name.clone(), meta.shape.clone(), &flat[offset..offset + n]));
        offset += n;
    }
    save_tensors(path, tensors, metadata)
}

/// Writes named f32 tensors, each from its own slice, as a safetensors file
/// (atomically, streamed tensor by tensor).
pub fn save_tensors(
    path: &Path,
    tensors: Vec<(String, Vec<i64>, &[f32])>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, values) in tensors {
        let numel: i64 = shape.iter().product();
        if numel as usize != values.len() {
            return Err(Error::Params(format!(
                "tensor `{name}` of shape {shape:?} given {} values",
                values.len()
            )));
        }
        let shape = shape.iter().map(|&d| d as usize).collect();
        views.push((name, TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(values))?));
    }
    write_atomic_with(path, |tmp| {
        Ok(safetensors::tensor::serialize_to_file(views, Some(metadata), tmp)?)
    })
}

/// A parameter set read back from a safetensors file.
#[derive(Debug, Clone)]
pub struct LoadedParams {
    pub manifest: Manifest,
    pub values: Vec<f32>,
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file of f32 tensors, ordered by name.
pub fn load_safetensors(path: &Path) -> Result<LoadedParams> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&data)
}

/// Parses safetensors bytes holding f32 tensors, ordered by name; any other
/// content is an error, never a panic (fuzzed: `tests/fuzz`).
pub fn parse_safetensors(data: &[u8]) -> Result<LoadedParams> {
    let mut manifest = Manifest::default();
    let mut values = Vec::new();
    let metadata = visit_safetensors(data, |name, shape, bytes| {
        values.extend(decode_f32(bytes));
        manifest.tensors.push(TensorMeta {
            name: name.to_owned(),
            shape: shape.to_vec(),
        });
        Ok(())
    })?;
    Ok(LoadedParams {
        manifest,
        values,
        metadata,
    })
}

/// Hands each f32 tensor of safetensors bytes to `visit`, in name order, as
/// its name, shape and little-endian bytes (a view into `data`, no copy);
/// returns the file's metadata. Any tensor of another type is an error.
pub fn visit_safetensors(
    data: &[u8],
    mut visit: impl FnMut(&str, &[i64], &[u8]) -> Result<()>,
) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(data)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(data)?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name)?;
        if view.dtype() != Dtype::F32 {
            return Err(Error::Params(format!(
                "tensor `{name}` is {:?}, expected F32",
                view.dtype()
            )));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        visit(&name, &shape, view.data())?;
    }
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let manifest = Manifest {
            tensors: vec![
                TensorMeta {
                    name: "a.weight".into(),
                    shape: vec![2, 3],
                },
                TensorMeta {
                    name: "b.bias".into(),
                    shape: vec![4],
                },
            ],
        };
        let values: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 1.0).collect();
        let meta = HashMap::from([("round".to_string(), "3".to_string())]);
        save_safetensors(&path, &manifest, &values, meta.clone()).unwrap();
        let back = load_safetensors(&path).unwrap();
        assert_eq!(back.manifest, manifest);
        assert_eq!(back.values, values);
        assert_eq!(back.metadata, meta);
    }
}
