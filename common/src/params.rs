//! Named, ordered parameter sets: a [`Manifest`] of tensor names and shapes
//! plus one flat `f32` buffer, moved to and from a `VarStore` and saved as
//! safetensors.
//!
//! The order is the lexicographic order of parameter names, so two processes
//! that build the same model agree on it without coordination.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::nn::VarStore;

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
    /// The trainable variables of `vs`, ordered by name.
    pub fn of_var_store(vs: &VarStore) -> Self {
        let mut tensors: Vec<TensorMeta> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| TensorMeta { name, shape: t.size() })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Self { tensors }
    }

    /// Total number of parameters.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorMeta::numel).sum()
    }

    /// Size in bytes of the flat f32 payload.
    pub fn payload_bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }
}

/// Copies the variables of `vs` into one flat buffer in manifest order.
pub fn flatten(vs: &VarStore, manifest: &Manifest) -> Result<Vec<f32>> {
    let vars = vs.variables();
    let mut out = vec![0f32; manifest.numel()];
    let mut offset = 0;
    for meta in &manifest.tensors {
        let t = vars
            .get(&meta.name)
            .ok_or_else(|| Error::Params(format!("model has no tensor `{}`", meta.name)))?;
        let n = meta.numel();
        let t = t
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .contiguous();
        t.f_copy_data(&mut out[offset..offset + n], n)?;
        offset += n;
    }
    Ok(out)
}

/// Values copied into a variable at a time by [`load_into`] (4 MiB of f32).
const LOAD_PIECE: usize = 1 << 20;

/// Overwrites the variables of `vs` with `flat`, laid out as `manifest`.
pub fn load_into(vs: &mut VarStore, manifest: &Manifest, flat: &[f32]) -> Result<()> {
    if flat.len() != manifest.numel() {
        return Err(Error::Params(format!(
            "{} values for a manifest of {} parameters",
            flat.len(),
            manifest.numel()
        )));
    }
    let own = Manifest::of_var_store(vs);
    if own != *manifest {
        return Err(Error::Params("manifest does not match the model's tensors".into()));
    }
    let vars = vs.variables();
    let device = vs.device();
    let mut offset = 0;
    tch::no_grad(|| -> Result<()> {
        for meta in &manifest.tensors {
            let n = meta.numel();
            // Copied in pieces, so a large tensor never needs a second
            // full-size temporary beside the variable.
            let dst = vars[&meta.name].f_view([n as i64])?;
            for start in (0..n).step_by(LOAD_PIECE) {
                let len = LOAD_PIECE.min(n - start);
                let src = tch::Tensor::from_slice(&flat[offset + start..offset + start + len]).to_device(device);
                dst.f_narrow(0, start as i64, len as i64)?.f_copy_(&src)?;
            }
            offset += n;
        }
        Ok(())
    })
}

/// Splits `flat` into one tensor per manifest entry, on `device`.
pub fn to_tensors(manifest: &Manifest, flat: &[f32], device: tch::Device) -> Result<Vec<(String, tch::Tensor)>> {
    if flat.len() != manifest.numel() {
        return Err(Error::Params(format!(
            "{} values for a manifest of {} parameters",
            flat.len(),
            manifest.numel()
        )));
    }
    let mut out = Vec::with_capacity(manifest.tensors.len());
    let mut offset = 0;
    for meta in &manifest.tensors {
        let n = meta.numel();
        let t = tch::Tensor::from_slice(&flat[offset..offset + n])
            .reshape(&meta.shape)
            .to_device(device);
        out.push((meta.name.clone(), t));
        offset += n;
    }
    Ok(out)
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
        values.extend(crate::wire::decode_f32(bytes));
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
    use crate::model::ModelKind;

    #[test]
    fn flatten_and_load_round_trip_through_a_var_store() {
        let vs = VarStore::new(tch::Device::Cpu);
        let _net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let manifest = Manifest::of_var_store(&vs);
        assert_eq!(manifest.numel(), 160_202);
        assert!(manifest.tensors.windows(2).all(|w| w[0].name < w[1].name));
        let flat = flatten(&vs, &manifest).unwrap();

        let mut other = VarStore::new(tch::Device::Cpu);
        let _net2 = ModelKind::Cnn.build(&other.root(), [3, 32, 32], 10);
        assert_ne!(flatten(&other, &manifest).unwrap(), flat);
        load_into(&mut other, &manifest, &flat).unwrap();
        assert_eq!(flatten(&other, &manifest).unwrap(), flat);
    }

    #[test]
    fn load_refuses_a_wrong_length() {
        let mut vs = VarStore::new(tch::Device::Cpu);
        let _net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let manifest = Manifest::of_var_store(&vs);
        let err = load_into(&mut vs, &manifest, &[0.0; 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameters: 3 values for a manifest of 160202 parameters"
        );
    }

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
