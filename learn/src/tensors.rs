//! Parameter sets and libtorch: a model's [`Manifest`], and its variables
//! copied to and from the flat `f32` buffers that `fedge_common::params`
//! saves and the wire carries.

use fedge_common::params::{Manifest, TensorMeta};
use tch::nn::VarStore;

use crate::{Error, Result};

/// The manifest of the trainable variables of `vs`, ordered by name.
pub fn manifest_of(vs: &VarStore) -> Manifest {
    let mut tensors: Vec<TensorMeta> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| TensorMeta { name, shape: t.size() })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Manifest { tensors }
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
    let own = manifest_of(vs);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    #[test]
    fn flatten_and_load_round_trip_through_a_var_store() {
        let vs = VarStore::new(tch::Device::Cpu);
        let _net = ModelKind::Cnn.build(&vs.root(), [3, 32, 32], 10);
        let manifest = manifest_of(&vs);
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
        let manifest = manifest_of(&vs);
        let err = load_into(&mut vs, &manifest, &[0.0; 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameters: 3 values for a manifest of 160202 parameters"
        );
    }
}
