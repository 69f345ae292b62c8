//! Partitioners: how a simulated fleet splits one data set among its nodes,
//! skewed the way real fleets are. Every partitioner is deterministic in its
//! seed, returns disjoint index sets that together cover the data set, and
//! needs only the labels.
//!
//! - [`Scheme::Iid`]: shuffled, equal shares.
//! - [`Scheme::Dirichlet`]: label skew; each class is spread over the nodes
//!   by proportions drawn from Dir(α) (Hsu et al. 2019; NIID-Bench). Small α
//!   gives nodes few classes; α → ∞ approaches IID.
//! - [`Scheme::Shards`]: the FedAvg paper's pathological split: the data
//!   sorted by label, cut into `count × k` shards, `k` random shards per node.
//! - [`Scheme::Quantity`]: IID labels, log-normal sizes with spread σ.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal};

use std::path::{Path, PathBuf};

use crate::data::{DataSource, Dataset, Split, cifar, folder, mnist};
use crate::{Error, Result};

/// A partitioning scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Scheme {
    #[default]
    Iid,
    Dirichlet {
        alpha: f64,
        /// Redraw until every node holds at least this many samples.
        min_size: usize,
    },
    Shards {
        /// Shards (and so at most this many labels) per node.
        labels_per_node: usize,
    },
    Quantity {
        /// σ of the log-normal size distribution.
        sigma: f64,
    },
}

/// Parameters of every scheme, as configuration files and flags name them.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemeParams<'a> {
    /// `iid`, `dirichlet`, `shards` or `quantity`.
    pub name: &'a str,
    pub alpha: f64,
    pub min_size: usize,
    pub labels_per_node: usize,
    pub sigma: f64,
}

impl Scheme {
    /// The scheme `p.name` with its parameters, validated.
    pub fn from_params(p: &SchemeParams<'_>) -> Result<Self> {
        let s = match p.name {
            "iid" => Scheme::Iid,
            "dirichlet" => Scheme::Dirichlet {
                alpha: p.alpha,
                min_size: p.min_size,
            },
            "shards" => Scheme::Shards {
                labels_per_node: p.labels_per_node,
            },
            "quantity" => Scheme::Quantity { sigma: p.sigma },
            other => {
                return Err(Error::Config(format!(
                    "partition scheme must be iid, dirichlet, shards or quantity, got `{other}`"
                )));
            }
        };
        s.validate()?;
        Ok(s)
    }

    /// A short description, for logs and tables.
    pub fn describe(&self) -> String {
        match self {
            Scheme::Iid => "iid".into(),
            Scheme::Dirichlet { alpha, .. } => format!("dirichlet(alpha={alpha})"),
            Scheme::Shards { labels_per_node } => format!("shards({labels_per_node} per node)"),
            Scheme::Quantity { sigma } => format!("quantity(lognormal sigma={sigma})"),
        }
    }

    /// Checks parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Scheme::Dirichlet { alpha, .. } if !(alpha.is_finite() && *alpha > 0.0) => Err(Error::Config(format!(
                "partition alpha must be a positive number, got {alpha}"
            ))),
            Scheme::Shards { labels_per_node: 0 } => {
                Err(Error::Config("partition labels_per_node must be at least 1".into()))
            }
            Scheme::Quantity { sigma } if !(sigma.is_finite() && *sigma >= 0.0) => Err(Error::Config(format!(
                "partition sigma must be zero or positive, got {sigma}"
            ))),
            _ => Ok(()),
        }
    }

    /// Splits the samples with these `labels` into `count` index sets.
    pub fn split(&self, labels: &[i64], count: usize, seed: u64) -> Result<Vec<Vec<i64>>> {
        self.validate()?;
        if count == 0 {
            return Err(Error::Config("partition count must be at least 1".into()));
        }
        if labels.len() < count {
            return Err(Error::Config(format!(
                "cannot split {} samples among {count} nodes",
                labels.len()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut parts = match self {
            Scheme::Iid => iid(labels.len(), count, &mut rng),
            Scheme::Dirichlet { alpha, min_size } => dirichlet(labels, count, *alpha, *min_size, &mut rng)?,
            Scheme::Shards { labels_per_node } => shards(labels, count, *labels_per_node, &mut rng)?,
            Scheme::Quantity { sigma } => quantity(labels.len(), count, *sigma, &mut rng),
        };
        for p in &mut parts {
            p.sort_unstable();
        }
        Ok(parts)
    }
}

/// Shuffled, near-equal shares (sizes differ by at most one).
fn iid(n: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<i64>> {
    let mut idx: Vec<i64> = (0..n as i64).collect();
    idx.shuffle(rng);
    let sizes: Vec<usize> = (0..count).map(|p| n / count + usize::from(p < n % count)).collect();
    cut(&idx, &sizes)
}

fn cut(idx: &[i64], sizes: &[usize]) -> Vec<Vec<i64>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&len| {
            let part = idx[start..start + len].to_vec();
            start += len;
            part
        })
        .collect()
}

fn by_class(labels: &[i64]) -> Vec<Vec<i64>> {
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut out = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        out[l as usize].push(i as i64);
    }
    out
}

fn dirichlet(labels: &[i64], count: usize, alpha: f64, min_size: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<i64>>> {
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| Error::Config(format!("partition alpha: {e}")))?;
    let classes = by_class(labels);
    let min_size = min_size.min(labels.len() / count);
    for _attempt in 0..1000 {
        let mut parts = vec![Vec::new(); count];
        for members in &classes {
            let mut members = members.clone();
            members.shuffle(rng);
            let mut p: Vec<f64> = (0..count).map(|_| gamma.sample(rng)).collect();
            let total: f64 = p.iter().sum();
            if total <= 0.0 || !total.is_finite() {
                // Every draw underflowed (tiny α): give the class to one node.
                p = vec![0.0; count];
                p[rng.random_range(0..count)] = 1.0;
            } else {
                p.iter_mut().for_each(|x| *x /= total);
            }
            let mut acc = 0.0;
            let mut start = 0usize;
            for (node, share) in p.iter().enumerate() {
                acc += share;
                let end = if node + 1 == count {
                    members.len()
                } else {
                    ((acc * members.len() as f64).round() as usize).clamp(start, members.len())
                };
                parts[node].extend_from_slice(&members[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= min_size.max(1)) {
            return Ok(parts);
        }
    }
    Err(Error::Config(format!(
        "no Dirichlet(alpha={alpha}) split of {} samples gave each of {count} nodes at least {min_size} samples in 1000 draws; raise alpha or lower min_size",
        labels.len()
    )))
}

fn shards(labels: &[i64], count: usize, per_node: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<i64>>> {
    let total_shards = count * per_node;
    if total_shards > labels.len() {
        return Err(Error::Config(format!(
            "{count} nodes x {per_node} shards need at least {total_shards} samples, the data set has {}",
            labels.len()
        )));
    }
    // Sort by label (stable on a shuffle, so equal labels are in random order).
    let mut idx: Vec<i64> = (0..labels.len() as i64).collect();
    idx.shuffle(rng);
    idx.sort_by_key(|&i| labels[i as usize]);
    let sizes: Vec<usize> = (0..total_shards)
        .map(|s| labels.len() / total_shards + usize::from(s < labels.len() % total_shards))
        .collect();
    let shard_list = cut(&idx, &sizes);
    let mut order: Vec<usize> = (0..total_shards).collect();
    order.shuffle(rng);
    Ok(order
        .chunks(per_node)
        .map(|ss| ss.iter().flat_map(|&s| shard_list[s].iter().copied()).collect())
        .collect())
}

fn quantity(n: usize, count: usize, sigma: f64, rng: &mut ChaCha8Rng) -> Vec<Vec<i64>> {
    let weights: Vec<f64> = match LogNormal::new(0.0, sigma) {
        Ok(d) if sigma > 0.0 => (0..count).map(|_| d.sample(rng)).collect(),
        _ => vec![1.0; count],
    };
    let total: f64 = weights.iter().sum();
    // Every node gets at least one sample; the rest is shared by weight.
    let spare = n - count;
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|w| 1 + (w / total * spare as f64).floor() as usize)
        .collect();
    let mut left = n - sizes.iter().sum::<usize>();
    let mut i = 0;
    while left > 0 {
        sizes[i % count] += 1;
        left -= 1;
        i += 1;
    }
    let mut idx: Vec<i64> = (0..n as i64).collect();
    idx.shuffle(rng);
    cut(&idx, &sizes)
}

/// Per-node label counts of a partition, `classes` columns wide.
pub fn histograms(labels: &[i64], parts: &[Vec<i64>], classes: usize) -> Vec<Vec<u64>> {
    parts
        .iter()
        .map(|p| {
            let mut h = vec![0u64; classes];
            for &i in p {
                h[labels[i as usize] as usize] += 1;
            }
            h
        })
        .collect()
}

/// What `write_partitions` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionReport {
    pub source: String,
    pub scheme: String,
    pub seed: u64,
    pub classes: Vec<String>,
    pub nodes: Vec<NodePart>,
    /// Folder with the test split for the coordinator, when the source has one.
    pub coordinator_dir: Option<PathBuf>,
    /// Seconds spent reading (and decoding) the source.
    pub load_seconds: f64,
}

/// One node's share.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodePart {
    pub name: String,
    pub dir: PathBuf,
    pub samples: usize,
    pub histogram: Vec<u64>,
}

impl PartitionReport {
    /// The per-node label histogram as a markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Partition of {} by {} (seed {}) into {} nodes.\n\n| node | samples |",
            self.source,
            self.scheme,
            self.seed,
            self.nodes.len()
        );
        for c in &self.classes {
            s.push_str(&format!(" {c} |"));
        }
        s.push_str("\n| --- | ---: |");
        s.push_str(&" ---: |".repeat(self.classes.len()));
        s.push('\n');
        for n in &self.nodes {
            s.push_str(&format!("| {} | {} |", n.name, n.samples));
            for h in &n.histogram {
                s.push_str(&format!(" {h} |"));
            }
            s.push('\n');
        }
        s
    }
}

/// Splits the training half of `source` into `count` node folders under
/// `out` (`node-1` …), each in the source's own format, plus `coordinator/`
/// with the test half, `partition.md` (label histograms) and
/// `partition.json`. Every node of a fleet then mounts only its own folder.
pub fn write_partitions(
    source: &DataSource,
    scheme: &Scheme,
    count: usize,
    seed: u64,
    out: &Path,
) -> Result<PartitionReport> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut nodes = Vec::with_capacity(count);
    let coordinator_dir = out.join("coordinator");
    let mut has_test = true;
    let (classes, load_seconds) = match source {
        DataSource::ImageFolder(dir) => {
            let (classes, files) = folder::list_files(dir, Split::Train)?;
            let load_seconds = started.elapsed().as_secs_f64();
            let labels: Vec<i64> = files.iter().map(|(_, l)| *l).collect();
            let parts = scheme.split(&labels, count, seed)?;
            let hist = histograms(&labels, &parts, classes.len());
            for (i, part) in parts.iter().enumerate() {
                let dir = out.join(format!("node-{}", i + 1));
                copy_images(&dir.join("train"), &classes, part.iter().map(|&j| &files[j as usize]))?;
                write_classes(&dir, &classes)?;
                nodes.push(NodePart {
                    name: format!("node-{}", i + 1),
                    dir,
                    samples: part.len(),
                    histogram: hist[i].clone(),
                });
            }
            match folder::list_files(dir, Split::Test) {
                Ok((_, test)) => copy_images(&coordinator_dir.join("test"), &classes, test.iter())?,
                Err(_) => has_test = false,
            }
            if has_test {
                write_classes(&coordinator_dir, &classes)?;
            }
            (classes, load_seconds)
        }
        _ => {
            let train = source.load(Split::Train)?;
            let load_seconds = started.elapsed().as_secs_f64();
            let labels = train.label_vec();
            let parts = scheme.split(&labels, count, seed)?;
            let hist = histograms(&labels, &parts, train.classes.len());
            for (i, part) in parts.iter().enumerate() {
                let dir = out.join(format!("node-{}", i + 1));
                write_dataset(source, &dir, &train.subset(part), Split::Train)?;
                nodes.push(NodePart {
                    name: format!("node-{}", i + 1),
                    dir,
                    samples: part.len(),
                    histogram: hist[i].clone(),
                });
            }
            match source.load(Split::Test) {
                Ok(test) => write_dataset(source, &coordinator_dir, &test, Split::Test)?,
                Err(_) => has_test = false,
            }
            (train.classes.clone(), load_seconds)
        }
    };
    let report = PartitionReport {
        source: source.describe(),
        scheme: scheme.describe(),
        seed,
        classes,
        nodes,
        coordinator_dir: has_test.then_some(coordinator_dir),
        load_seconds,
    };
    fedge_common::fsutil::write_atomic(&out.join("partition.md"), report.markdown().as_bytes())?;
    fedge_common::fsutil::write_atomic(&out.join("partition.json"), &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

fn write_classes(dir: &Path, classes: &[String]) -> Result<()> {
    Ok(fedge_common::fsutil::write_atomic(
        &dir.join(folder::CLASSES_FILE),
        (classes.join("\n") + "\n").as_bytes(),
    )?)
}

/// Copies (hard-links where it can) image files into `root/<class>/`.
fn copy_images<'a>(root: &Path, classes: &[String], files: impl Iterator<Item = &'a (PathBuf, i64)>) -> Result<()> {
    for c in classes {
        let d = root.join(c);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    for (src, label) in files {
        let name = src.file_name().ok_or_else(|| Error::data(src, "not a file"))?;
        let dst = root.join(&classes[*label as usize]).join(name);
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    Ok(())
}

fn write_dataset(source: &DataSource, dir: &Path, data: &Dataset, split: Split) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    match (source, split) {
        (DataSource::Mnist(_), Split::Train) => mnist::write(dir, "train", data),
        (DataSource::Mnist(_), Split::Test) => mnist::write(dir, "t10k", data),
        (_, Split::Train) => cifar::write_records(&dir.join("data_batch_1.bin"), data),
        (_, Split::Test) => cifar::write_records(&dir.join("test_batch.bin"), data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(n: usize, classes: i64) -> Vec<i64> {
        (0..n as i64).map(|i| (i * 7 + i / 3) % classes).collect()
    }

    fn check_cover(parts: &[Vec<i64>], n: usize) {
        let mut all: Vec<i64> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n as i64).collect::<Vec<_>>(), "not a disjoint cover");
    }

    fn schemes() -> Vec<Scheme> {
        vec![
            Scheme::Iid,
            Scheme::Dirichlet {
                alpha: 0.5,
                min_size: 5,
            },
            Scheme::Shards { labels_per_node: 2 },
            Scheme::Quantity { sigma: 1.0 },
        ]
    }

    proptest! {
        #[test]
        fn every_scheme_is_a_deterministic_disjoint_cover(n in 200usize..2000, count in 1usize..12, seed in any::<u64>()) {
            let l = labels(n, 10);
            for s in schemes() {
                let parts = s.split(&l, count, seed).unwrap();
                prop_assert_eq!(parts.len(), count);
                check_cover(&parts, n);
                prop_assert!(parts.iter().all(|p| !p.is_empty()), "{:?} left a node empty", s);
                prop_assert_eq!(&parts, &s.split(&l, count, seed).unwrap());
            }
        }
    }

    #[test]
    fn iid_shares_are_equal_and_seeds_differ() {
        let l = labels(1003, 10);
        let p = Scheme::Iid.split(&l, 4, 1).unwrap();
        let sizes: Vec<usize> = p.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![251, 251, 251, 250]);
        assert_ne!(p, Scheme::Iid.split(&l, 4, 2).unwrap());
    }

    /// Mean total-variation distance between each node's label distribution and the global one.
    fn skew(l: &[i64], parts: &[Vec<i64>]) -> f64 {
        let h = histograms(l, parts, 10);
        let global = histograms(l, &[(0..l.len() as i64).collect()], 10)[0].clone();
        let g: Vec<f64> = global.iter().map(|&c| c as f64 / l.len() as f64).collect();
        h.iter()
            .map(|row| {
                let n: u64 = row.iter().sum();
                row.iter()
                    .zip(&g)
                    .map(|(&c, &q)| (c as f64 / n as f64 - q).abs())
                    .sum::<f64>()
                    / 2.0
            })
            .sum::<f64>()
            / parts.len() as f64
    }

    #[test]
    fn dirichlet_skew_falls_as_alpha_grows() {
        let l = labels(20_000, 10);
        let tv = |alpha: f64| skew(&l, &Scheme::Dirichlet { alpha, min_size: 10 }.split(&l, 10, 3).unwrap());
        let (a01, a1, a100, huge) = (tv(0.1), tv(1.0), tv(100.0), tv(1e6));
        assert!(a01 > a1 && a1 > a100 && a100 > huge, "{a01} {a1} {a100} {huge}");
        assert!(a01 > 0.5, "alpha 0.1 should be strongly skewed: {a01}");
        assert!(huge < 0.02, "alpha -> inf should approach iid: {huge}");
        // At least as balanced as a random IID split.
        let iid = skew(&l, &Scheme::Iid.split(&l, 10, 3).unwrap());
        assert!(huge <= iid + 0.01, "{huge} vs iid {iid}");
    }

    #[test]
    fn shards_give_each_node_at_most_k_labels() {
        // Exactly 600 samples per label, so 200-sample shards never straddle two labels.
        let l: Vec<i64> = (0..6000).map(|i| i % 10).collect();
        for k in [1, 2, 3] {
            let parts = Scheme::Shards { labels_per_node: k }.split(&l, 10, 9).unwrap();
            for h in histograms(&l, &parts, 10) {
                let present = h.iter().filter(|&&c| c > 0).count();
                assert!(present <= k, "k={k}: {h:?}");
            }
            check_cover(&parts, 6000);
        }
        let err = Scheme::Shards { labels_per_node: 5 }
            .split(&labels(20, 10), 10, 0)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: 10 nodes x 5 shards need at least 50 samples, the data set has 20"
        );
    }

    #[test]
    fn quantity_skew_spreads_sizes_but_not_labels() {
        let l = labels(10_000, 10);
        let parts = Scheme::Quantity { sigma: 1.5 }.split(&l, 10, 4).unwrap();
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        let (min, max) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
        assert!(max > 4 * min, "sizes should be skewed: {sizes:?}");
        let flat = Scheme::Quantity { sigma: 0.0 }.split(&l, 10, 4).unwrap();
        assert!(flat.iter().all(|p| p.len() == 1000));
    }

    #[test]
    fn partitions_are_written_in_the_source_format_with_histograms() {
        let src = tempfile::tempdir().unwrap();
        let data = crate::data::synthetic(1, 1, 300);
        cifar::write_records(&src.path().join("data_batch_1.bin"), &data).unwrap();
        cifar::write_records(&src.path().join("test_batch.bin"), &crate::data::synthetic(1, 2, 50)).unwrap();
        let source = crate::data::detect(src.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let scheme = Scheme::Dirichlet {
            alpha: 0.3,
            min_size: 5,
        };
        let report = write_partitions(&source, &scheme, 3, 7, out.path()).unwrap();
        let mut total = 0;
        for (i, node) in report.nodes.iter().enumerate() {
            let back = crate::data::detect(&node.dir).unwrap().load(Split::Train).unwrap();
            assert_eq!(back.len(), node.samples);
            assert_eq!(back.label_histogram(), node.histogram, "node {i}");
            total += node.samples;
        }
        assert_eq!(total, 300);
        let test = crate::data::detect(&out.path().join("coordinator"))
            .unwrap()
            .load(Split::Test)
            .unwrap();
        assert_eq!(test.len(), 50);
        let md = std::fs::read_to_string(out.path().join("partition.md")).unwrap();
        assert!(md.contains("| node-3 |") && md.contains("dirichlet(alpha=0.3)"), "{md}");
    }

    #[test]
    fn image_folder_partitions_copy_files_and_list_every_class() {
        let src = tempfile::tempdir().unwrap();
        for (split, n) in [("train", 6), ("test", 2)] {
            for class in ["ant", "bee", "cow"] {
                for k in 0..n {
                    let p = src.path().join(split).join(class).join(format!("{k}.png"));
                    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                    image::save_buffer(&p, &[k as u8; 4 * 4 * 3], 4, 4, image::ExtendedColorType::Rgb8).unwrap();
                }
            }
        }
        let source = crate::data::detect(src.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let report = write_partitions(&source, &Scheme::Shards { labels_per_node: 1 }, 3, 1, out.path()).unwrap();
        // The coordinator's folder holds the test half and is detected as an image folder.
        let coord = report.coordinator_dir.clone().unwrap();
        let test = crate::data::detect(&coord).unwrap().load(Split::Test).unwrap();
        assert_eq!((test.len(), test.classes.len()), (6, 3));
        for node in &report.nodes {
            let d = crate::data::detect(&node.dir).unwrap().load(Split::Train).unwrap();
            assert_eq!(d.classes, vec!["ant", "bee", "cow"]);
            assert_eq!(d.len(), 6);
            assert_eq!(d.label_histogram().iter().filter(|&&c| c > 0).count(), 1);
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let l = labels(100, 10);
        let e = Scheme::Dirichlet {
            alpha: 0.0,
            min_size: 1,
        }
        .split(&l, 2, 0)
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: partition alpha must be a positive number, got 0"
        );
        let e = Scheme::Iid.split(&l, 101, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: cannot split 100 samples among 101 nodes"
        );
    }
}
