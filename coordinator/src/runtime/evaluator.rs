//! Central evaluation on a dedicated thread, so tensor work never runs on
//! the async runtime. The thread builds the model once; during an
//! evaluation its variables view the global model's own buffer (no copy),
//! and between evaluations they are empty, so the coordinator holds the
//! global model once whether or not it is evaluating. The test split's
//! images wait in a file under the run's `spool/` folder and are read one
//! batch at a time.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use fedge_common::params::Manifest;
use fedge_common::task::EvalMetrics;
use fedge_common::worker::Worker;
use fedge_learn::data::{DataSource, Dataset, Split, normalize};
use fedge_learn::model::ModelKind;
use fedge_learn::model::Net;
use fedge_learn::train::evaluate_batches;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use crate::{Error, Result};

struct Job {
    params: Arc<Vec<f32>>,
    reply: oneshot::Sender<Result<EvalMetrics>>,
}

/// Handle to the evaluation thread.
/// Dropping it stops the thread after an evaluation in progress
/// ([`Worker`]), so the process never exits while libtorch computes.
#[derive(Debug)]
pub struct Evaluator {
    worker: Worker<Job>,
}

/// What the evaluation thread reports once it is ready.
#[derive(Debug)]
pub struct InitialModel {
    pub manifest: Manifest,
    pub params: Vec<f32>,
    pub test_samples: usize,
    /// `[channels, height, width]` of the data, which nodes' data must match.
    pub input_shape: [i64; 3],
    pub classes: Vec<String>,
}

impl Evaluator {
    /// Starts the thread: loads the test split of `source` (its images go
    /// to a file in `scratch`), initializes the model with `seed`, and
    /// returns the initial parameters. A model larger than `resident_bytes`
    /// passes through a file in `scratch` on its way out of libtorch, so
    /// start-up never holds it twice.
    pub async fn spawn(
        kind: ModelKind,
        source: DataSource,
        seed: u64,
        batch_size: usize,
        threads: usize,
        scratch: PathBuf,
        resident_bytes: u64,
    ) -> Result<(Self, InitialModel)> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker = Worker::spawn("evaluator", move |rx: mpsc::Receiver<Job>| {
            if threads > 0 {
                tch::set_num_threads(threads as i32);
            }
            let setup = || -> Result<_> {
                let test = TestSplit::spill(source.load(Split::Test)?, &scratch)?;
                tch::manual_seed(seed as i64);
                let mut model = EvalModel::new(kind, test.shape, test.classes.len() as i64);
                let large = !crate::runtime::global::stays_resident(model.manifest.numel(), resident_bytes);
                let initial = model.take_initial(large.then_some(scratch.as_path()))?;
                Ok((test, model, initial))
            };
            let (test, mut model, initial) = match setup() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(InitialModel {
                manifest: model.manifest.clone(),
                params: initial,
                test_samples: test.labels.len(),
                input_shape: test.shape,
                classes: test.classes.clone(),
            }));
            while let Ok(job) = rx.recv() {
                let result = model.evaluate(&job.params, &test, batch_size);
                // Activations of the evaluation were freed into this
                // thread's allocator arena; hand them back to the system
                // so they do not sit beside the next round's buffers.
                crate::runtime::memory::release_free_memory();
                let _ = job.reply.send(result);
            }
        })
        .map_err(|e| Error::Io {
            context: "starting the evaluation thread".into(),
            source: e,
        })?;
        let initial = ready_rx
            .await
            .map_err(|_| Error::Internal("evaluation thread stopped during start-up".into()))??;
        Ok((Self { worker }, initial))
    }

    /// Evaluates `params` on the test split.
    pub async fn evaluate(&self, params: Arc<Vec<f32>>) -> Result<EvalMetrics> {
        let (reply, rx) = oneshot::channel();
        self.worker
            .send(Job { params, reply })
            .map_err(|_| Error::Internal("evaluation thread is gone".into()))?;
        rx.await
            .map_err(|_| Error::Internal("evaluation thread dropped a job".into()))?
    }
}

/// The evaluation model. Its variables hold no storage of their own after
/// start-up: an evaluation points them at the parameters it is given.
struct EvalModel {
    net: Net,
    /// Keeps the variables alive; `vars` are handles to the same tensors.
    _vs: VarStore,
    manifest: Manifest,
    /// The variables, in manifest order.
    vars: Vec<Tensor>,
}

impl EvalModel {
    /// Builds `kind` for inputs of `shape` with `classes` outputs,
    /// initialized from libtorch's (seeded) generator.
    fn new(kind: ModelKind, shape: [i64; 3], classes: i64) -> Self {
        let mut vs = VarStore::new(Device::Cpu);
        let net = kind.build(&vs.root(), shape, classes);
        vs.freeze();
        let manifest = fedge_learn::tensors::manifest_of(&vs);
        let mut by_name = vs.variables();
        let vars = manifest
            .tensors
            .iter()
            .map(|m| {
                by_name
                    .remove(&m.name)
                    .expect("the manifest lists the store's variables")
            })
            .collect();
        Self {
            net,
            _vs: vs,
            manifest,
            vars,
        }
    }

    /// Moves the initial parameters out of the variables into one flat
    /// buffer, releasing each variable's storage as soon as it is copied.
    /// Copied directly, the buffer and the variables not yet released hold
    /// the model plus its largest tensor at the worst moment; with `spill`,
    /// the values go to an unnamed file in that folder first, variable by
    /// variable, and are read back once libtorch holds none of them, so the
    /// model is in memory once.
    fn take_initial(&mut self, spill: Option<&Path>) -> Result<Vec<f32>> {
        let mut flat = vec![0f32; self.manifest.numel()];
        let Some(dir) = spill else {
            let mut offset = 0;
            for (meta, var) in self.manifest.tensors.iter().zip(&mut self.vars) {
                let n = meta.numel();
                var.f_copy_data(&mut flat[offset..offset + n], n)
                    .map_err(fedge_learn::Error::from)?;
                var.f_set_data(&empty()).map_err(fedge_learn::Error::from)?;
                offset += n;
            }
            return Ok(flat);
        };
        let io = |e: std::io::Error| Error::Io {
            context: format!("spilling the initial model under {}", dir.display()),
            source: e,
        };
        let mut file = tempfile::tempfile_in(dir).map_err(io)?;
        for var in &mut self.vars {
            write_values::<f32>(var, &mut file, io)?;
            var.f_set_data(&empty()).map_err(fedge_learn::Error::from)?;
        }
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        file.read_exact(bytemuck::cast_slice_mut(&mut flat)).map_err(io)?;
        Ok(flat)
    }

    /// Evaluates the model with parameters `params` on `test`.
    fn evaluate(&mut self, params: &[f32], test: &TestSplit, batch_size: usize) -> Result<EvalMetrics> {
        if params.len() != self.manifest.numel() {
            return Err(Error::Internal(format!(
                "{} values to evaluate for a model of {} parameters",
                params.len(),
                self.manifest.numel()
            )));
        }
        let viewing = Viewing::new(&mut self.vars, &self.manifest, params)?;
        let n = test.labels.len();
        let step = batch_size.max(1);
        let metrics = evaluate_batches(
            &self.net,
            (0..n)
                .step_by(step)
                .map(|start| test.batch(start, (start + step).min(n))),
        );
        drop(viewing);
        metrics
    }
}

/// Bytes copied out of a tensor at a time when it is written to a file (4 MiB).
const SPILL_PIECE: usize = 4 << 20;

/// Writes the values of the contiguous `tensor`, in order, to `out`, copied
/// out [`SPILL_PIECE`] bytes at a time, so no copy of the whole tensor is made.
fn write_values<T: tch::kind::Element + bytemuck::Pod>(
    tensor: &Tensor,
    out: &mut impl Write,
    io: impl Fn(std::io::Error) -> Error,
) -> Result<()> {
    let flat = tensor.view([-1]);
    let total = flat.size()[0];
    let step = (SPILL_PIECE / std::mem::size_of::<T>()) as i64;
    let mut piece: Vec<T> = Vec::new();
    for start in (0..total).step_by(step as usize) {
        let len = step.min(total - start);
        piece.resize(len as usize, T::zeroed());
        flat.narrow(0, start, len)
            .f_copy_data(&mut piece, len as usize)
            .map_err(fedge_learn::Error::from)?;
        out.write_all(bytemuck::cast_slice(&piece)).map_err(&io)?;
    }
    Ok(())
}

/// The test split with its images in a file (raw `u8`, `[N, C, H, W]`),
/// deleted when the split is dropped; labels stay in memory.
struct TestSplit {
    images: tempfile::NamedTempFile,
    labels: Vec<i64>,
    shape: [i64; 3],
    classes: Vec<String>,
}

impl TestSplit {
    /// Moves the images of `test` into a file in `dir`.
    fn spill(test: Dataset, dir: &Path) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io {
            context: format!("writing the test split's images under {}", dir.display()),
            source: e,
        };
        let mut images = tempfile::Builder::new()
            .prefix("test-images-")
            .tempfile_in(dir)
            .map_err(io)?;
        write_values::<u8>(&test.images.contiguous(), &mut images, io)?;
        images.flush().map_err(io)?;
        Ok(Self {
            images,
            labels: test.label_vec(),
            shape: test.shape(),
            classes: test.classes,
        })
    }

    /// Samples `start..end`, read from the file: normalized images and labels.
    fn batch(&self, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let row = self.shape.iter().product::<i64>() as usize;
        let mut bytes = vec![0u8; (end - start) * row];
        self.images
            .as_file()
            .read_exact_at(&mut bytes, (start * row) as u64)
            .map_err(|e| Error::Io {
                context: format!("reading the test split's images from {}", self.images.path().display()),
                source: e,
            })?;
        let [c, h, w] = self.shape;
        let images = Tensor::from_slice(&bytes).view([(end - start) as i64, c, h, w]);
        Ok((normalize(&images), Tensor::from_slice(&self.labels[start..end])))
    }
}

/// An empty f32 tensor: what a variable holds between evaluations.
fn empty() -> Tensor {
    Tensor::empty([0], (Kind::Float, Device::Cpu))
}

/// The variables pointed at a parameter buffer; dropping it (also when the
/// evaluation panics) empties them again, so no tensor outlives the
/// buffer it views.
struct Viewing<'a> {
    vars: &'a mut [Tensor],
}

impl<'a> Viewing<'a> {
    fn new(vars: &'a mut [Tensor], manifest: &Manifest, params: &'a [f32]) -> Result<Self> {
        let viewing = Self { vars };
        let mut offset = 0;
        for (meta, var) in manifest.tensors.iter().zip(viewing.vars.iter_mut()) {
            let n = meta.numel();
            let values = &params[offset..offset + n];
            // SAFETY: `values` is `n` initialized, aligned f32s that the
            // borrow `'a` keeps alive and unchanged for the life of
            // `Viewing`; the tensor viewing them is reachable only through
            // `var` (the evaluation makes temporaries that it drops before
            // returning), and `Viewing::drop` points `var` away from them.
            // The model is only read (a no-grad forward pass).
            #[allow(unsafe_code)]
            let view =
                unsafe { Tensor::f_from_blob(values.as_ptr().cast(), &meta.shape, &[], Kind::Float, Device::Cpu) }
                    .map_err(fedge_learn::Error::from)?;
            var.f_set_data(&view).map_err(fedge_learn::Error::from)?;
            offset += n;
        }
        Ok(viewing)
    }
}

impl Drop for Viewing<'_> {
    fn drop(&mut self) {
        for var in self.vars.iter_mut() {
            // Cannot fail: same dtype and device.
            let _ = var.f_set_data(&empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use fedge_learn::data::synthetic;
    use fedge_learn::train::evaluate;

    use super::*;

    #[test]
    fn a_spilled_initial_model_equals_a_copied_one_and_leaves_no_file() {
        let shape = synthetic(1, 2, 10).shape();
        let scratch = tempfile::tempdir().unwrap();
        let take = |spill: Option<&Path>| {
            let mut model = EvalModel::new(ModelKind::Cnn, shape, 10);
            // Values of their own, not libtorch's global generator's (other
            // tests draw from it in parallel).
            tch::no_grad(|| {
                for (i, v) in model.vars.iter_mut().enumerate() {
                    let own =
                        Tensor::arange(v.numel() as i64, (Kind::Float, v.device())).reshape(v.size()) * 1e-4 + i as f64;
                    v.copy_(&own);
                }
            });
            let values = model.take_initial(spill).unwrap();
            assert!(model.vars.iter().all(|v| v.numel() == 0));
            values
        };
        let copied = take(None);
        let spilled = take(Some(scratch.path()));
        assert_eq!(copied.len(), spilled.len());
        assert!(copied == spilled, "the spilled values differ from the copied ones");
        assert_eq!(
            std::fs::read_dir(scratch.path()).unwrap().count(),
            0,
            "no spill file is left"
        );
    }

    #[test]
    fn evaluating_through_views_matches_a_model_holding_the_parameters() {
        let test = synthetic(7, 2, 300);
        let scratch = tempfile::tempdir().unwrap();
        let split = TestSplit::spill(synthetic(7, 2, 300), scratch.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(scratch.path()).unwrap().count(),
            1,
            "the images wait in one file"
        );
        tch::manual_seed(3);
        let mut model = EvalModel::new(ModelKind::Cnn, test.shape(), test.num_classes());
        let initial = model.take_initial(None).unwrap();
        assert!(
            model.vars.iter().all(|v| v.numel() == 0),
            "start-up leaves no parameter storage in the variables"
        );
        // Another parameter set than the initial one, so stale values would show.
        let moved: Vec<f32> = initial
            .iter()
            .enumerate()
            .map(|(i, v)| v + (i % 7) as f32 * 1e-3)
            .collect();

        let mut vs = VarStore::new(Device::Cpu);
        let net = ModelKind::Cnn.build(&vs.root(), test.shape(), test.num_classes());
        fedge_learn::tensors::load_into(&mut vs, &model.manifest, &moved).unwrap();
        let expected = evaluate(&net, &test, 64, Device::Cpu);

        let got = model.evaluate(&moved, &split, 64).unwrap();
        assert_eq!(got.examples, expected.examples);
        assert!((got.loss - expected.loss).abs() < 1e-6, "{got:?} vs {expected:?}");
        assert_eq!(got.accuracy, expected.accuracy);
        assert!(
            model.vars.iter().all(|v| v.numel() == 0),
            "views are dropped after evaluating"
        );

        let err = model.evaluate(&moved[1..], &split, 64).unwrap_err();
        assert!(err.to_string().contains("values to evaluate for a model of"), "{err}");
        drop(split);
        assert_eq!(
            std::fs::read_dir(scratch.path()).unwrap().count(),
            0,
            "the file goes with the split"
        );
    }
}
