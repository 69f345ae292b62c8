//! Aggregators: how a round's updates become one update.
//!
//! The mean streams: each update is folded into one running sum
//! ([`MeanSum`], f64 or f32) as it arrives and dropped, so a round costs
//! O(model) memory whatever the number of nodes. The robust aggregators
//! (median, trimmed mean, Krum, Multi-Krum, Bulyan) need every update of the
//! round at once: they keep each update's source (spooled on disk when it is
//! large) while the round runs, and hold `n × model` f32 values in memory
//! while they aggregate. They weigh every update equally, so a node
//! cannot buy influence by claiming more samples.

use std::cmp::Ordering;
use std::fmt;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Coordinates per parallel work item of the coordinate-wise aggregators.
const COLUMN_BLOCK: usize = 4096;

/// How the updates of a round are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregator {
    /// Mean weighted by sample count (FedAvg, McMahan et al. 2017).
    Mean,
    /// Coordinate-wise median (Yin et al. 2018).
    Median,
    /// Coordinate-wise mean after dropping the `⌊β·n⌋` largest and smallest values (Yin et al. 2018).
    TrimmedMean { beta: f64 },
    /// The update closest to its `n − f − 2` nearest neighbours (Blanchard et al. 2017).
    Krum { f: usize },
    /// Mean of the `m` updates with the best Krum scores (`m = 0`: `n − f`).
    MultiKrum { f: usize, m: usize },
    /// `n − 2f` updates picked by repeated Krum, then a coordinate-wise mean of
    /// the `n − 4f` values closest to the median (El Mhamdi et al. 2018).
    Bulyan { f: usize },
}

impl fmt::Display for Aggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregator::Mean => write!(f, "mean"),
            Aggregator::Median => write!(f, "median"),
            Aggregator::TrimmedMean { beta } => write!(f, "trimmed-mean(beta={beta})"),
            Aggregator::Krum { f: b } => write!(f, "krum(f={b})"),
            Aggregator::MultiKrum { f: b, m } => write!(f, "multi-krum(f={b}, m={m})"),
            Aggregator::Bulyan { f: b } => write!(f, "bulyan(f={b})"),
        }
    }
}

impl Aggregator {
    /// Fewest updates the aggregator is defined for.
    pub fn min_updates(&self) -> usize {
        match *self {
            Aggregator::Mean | Aggregator::Median | Aggregator::TrimmedMean { .. } => 1,
            Aggregator::Krum { f } => 2 * f + 3,
            Aggregator::MultiKrum { f, m } => (2 * f + 3).max(m),
            Aggregator::Bulyan { f } => 4 * f + 3,
        }
    }

    /// Whether updates are folded as they arrive (no per-node copy kept).
    pub fn streams(&self) -> bool {
        matches!(self, Aggregator::Mean)
    }
}

/// Where an update's values come from: a vector in memory, or a payload the
/// service spooled as it arrived, decoded again on demand.
pub trait UpdateSource: Send + Sync + fmt::Debug {
    /// Values in all of the update's sections.
    fn len(&self) -> usize;

    /// Whether the update holds no values.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands every value to `sink` as `(offset, run)`; offsets never visited are zero.
    fn visit(&self, sink: &mut dyn FnMut(usize, &[f32])) -> Result<(), String>;
}

impl UpdateSource for Vec<f32> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn visit(&self, sink: &mut dyn FnMut(usize, &[f32])) -> Result<(), String> {
        sink(0, self);
        Ok(())
    }
}

/// Precision of the mean's running sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f64: the result does not depend on arrival order (8 bytes per parameter).
    F64,
    /// f32: half the memory; the last bits may depend on arrival order.
    F32,
}

#[derive(Debug)]
enum Sum {
    F64(Vec<f64>),
    F32(Vec<f32>),
}

/// The running weighted sum of a round's updates (and SCAFFOLD's control
/// deltas): what the mean folds each update into as it arrives.
#[derive(Debug)]
pub struct MeanSum {
    numel: usize,
    sum: Sum,
    weight: f64,
    control: Option<Vec<f64>>,
}

/// The part of a run of values at `offset` that lies in the main
/// (model-sized) section of an update of `numel` parameters.
fn main_part(offset: usize, values: &[f32], numel: usize) -> &[f32] {
    &values[..values.len().min(numel.saturating_sub(offset))]
}

impl MeanSum {
    /// Adds `weight · scale · main section` of `source` to the sum, and its
    /// control section (if any) to the control sum.
    pub fn fold(&mut self, source: &dyn UpdateSource, weight: f64, scale: f64) -> Result<(), String> {
        let numel = self.numel;
        let factor = weight * scale;
        let (sum, control) = (&mut self.sum, &mut self.control);
        source.visit(&mut |offset, values| {
            let main = main_part(offset, values, numel).len();
            match sum {
                _ if main == 0 => {}
                Sum::F64(s) => {
                    for (s, &v) in s[offset..offset + main].iter_mut().zip(&values[..main]) {
                        *s += factor * f64::from(v);
                    }
                }
                Sum::F32(s) => {
                    for (s, &v) in s[offset..offset + main].iter_mut().zip(&values[..main]) {
                        *s = (f64::from(*s) + factor * f64::from(v)) as f32;
                    }
                }
            }
            if let Some(c) = control.as_mut()
                && main < values.len()
            {
                let start = offset + main - numel;
                for (c, &v) in c[start..start + values.len() - main].iter_mut().zip(&values[main..]) {
                    *c += f64::from(v);
                }
            }
        })?;
        self.weight += weight;
        Ok(())
    }
}

/// The updates of one round: folded into a [`MeanSum`] as they arrive for
/// the mean, or kept (as sources, spooled on disk when large) for the robust
/// aggregators, which read them all when the round closes.
#[derive(Debug)]
pub struct RoundAggregate {
    aggregator: Aggregator,
    numel: usize,
    mean: Option<Arc<Mutex<MeanSum>>>,
    kept: Vec<(Arc<dyn UpdateSource>, f64)>,
    count: usize,
}

impl RoundAggregate {
    /// An empty aggregate for a model of `numel` parameters; `control`: the
    /// updates carry SCAFFOLD control deltas to sum.
    pub fn new(aggregator: Aggregator, numel: usize, precision: Precision, control: bool) -> Self {
        let mean = aggregator.streams().then(|| {
            Arc::new(Mutex::new(MeanSum {
                numel,
                sum: match precision {
                    Precision::F64 => Sum::F64(vec![0.0; numel]),
                    Precision::F32 => Sum::F32(vec![0.0; numel]),
                },
                weight: 0.0,
                control: control.then(|| vec![0.0; numel]),
            }))
        });
        Self {
            aggregator,
            numel,
            mean,
            kept: Vec::new(),
            count: 0,
        }
    }

    /// Registers one accepted update. For the mean, returns the sum to fold it
    /// into (off the caller's thread); robust aggregators keep the source.
    pub fn accept(&mut self, source: Arc<dyn UpdateSource>, scale: f64) -> Option<Arc<Mutex<MeanSum>>> {
        self.count += 1;
        match &self.mean {
            Some(m) => Some(m.clone()),
            None => {
                self.kept.push((source, scale));
                None
            }
        }
    }

    /// Adds an in-memory update right away (tests and tools).
    pub fn add(&mut self, delta: Vec<f32>, weight: f64) {
        let source: Arc<dyn UpdateSource> = Arc::new(delta);
        if let Some(sum) = self.accept(source.clone(), 1.0) {
            lock(&sum).fold(source.as_ref(), weight, 1.0).expect("in-memory update");
        }
    }

    /// Updates accepted so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The aggregator.
    pub fn aggregator(&self) -> Aggregator {
        self.aggregator
    }

    /// The combined update and, for SCAFFOLD, the sum of the control deltas.
    /// Zero when nothing was added; an error when the aggregator is not
    /// defined for this many updates or a kept update cannot be read back.
    pub fn finish(self) -> Result<(Vec<f32>, Option<Vec<f64>>), String> {
        let control = self.mean.as_ref().and_then(|m| lock(m).control.take());
        if self.count == 0 {
            return Ok((vec![0.0; self.numel], control));
        }
        if self.count < self.aggregator.min_updates() {
            return Err(format!(
                "{} needs at least {} updates, the round has {}",
                self.aggregator,
                self.aggregator.min_updates(),
                self.count
            ));
        }
        if let Some(mean) = self.mean {
            // Taken out of the shared sum (every fold is done), not copied.
            let (sum, w) = {
                let mut m = lock(&mean);
                (std::mem::replace(&mut m.sum, Sum::F32(Vec::new())), m.weight)
            };
            let out = match sum {
                Sum::F64(s) if w > 0.0 => s.iter().map(|&s| (s / w) as f32).collect(),
                Sum::F32(mut s) if w > 0.0 => {
                    // In place: the sum's buffer becomes the mean.
                    for v in &mut s {
                        *v = (f64::from(*v) / w) as f32;
                    }
                    s
                }
                _ => vec![0.0; self.numel],
            };
            return Ok((out, control));
        }
        let mut kept = Vec::with_capacity(self.kept.len());
        for (source, scale) in &self.kept {
            let mut dense = vec![0f32; self.numel];
            let numel = self.numel;
            source.visit(&mut |offset, values| {
                let main = main_part(offset, values, numel);
                if !main.is_empty() {
                    for (d, &v) in dense[offset..offset + main.len()].iter_mut().zip(main) {
                        *d = (f64::from(v) * scale) as f32;
                    }
                }
            })?;
            kept.push(dense);
        }
        let kept = &kept;
        Ok((
            match self.aggregator {
                Aggregator::Mean => unreachable!("the mean streams"),
                Aggregator::Median => coordinate_wise(kept, self.numel, median),
                Aggregator::TrimmedMean { beta } => {
                    let k = (beta * kept.len() as f64).floor() as usize;
                    coordinate_wise(kept, self.numel, |col| trimmed_mean(col, k))
                }
                Aggregator::Krum { f } => {
                    let scores = krum_scores(kept, &(0..kept.len()).collect::<Vec<_>>(), f);
                    kept[best(kept, &scores, 1)[0]].clone()
                }
                Aggregator::MultiKrum { f, m } => {
                    let m = if m == 0 { kept.len() - f } else { m };
                    let scores = krum_scores(kept, &(0..kept.len()).collect::<Vec<_>>(), f);
                    let chosen: Vec<Vec<f32>> = best(kept, &scores, m).into_iter().map(|i| kept[i].clone()).collect();
                    coordinate_wise(&chosen, self.numel, |col| trimmed_mean(col, 0))
                }
                Aggregator::Bulyan { f } => bulyan(kept, self.numel, f),
            },
            control,
        ))
    }
}

/// Locks a sum, whether or not a folding thread panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies `reduce` to every coordinate's column of values, in parallel blocks.
fn coordinate_wise(updates: &[Vec<f32>], numel: usize, reduce: impl Fn(&mut [f32]) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; numel];
    out.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(|(b, block)| {
        let mut col = vec![0f32; updates.len()];
        for (j, o) in block.iter_mut().enumerate() {
            let i = b * COLUMN_BLOCK + j;
            for (c, u) in col.iter_mut().zip(updates) {
                *c = u[i];
            }
            *o = reduce(&mut col);
        }
    });
    out
}

fn median(col: &mut [f32]) -> f32 {
    let n = col.len();
    col.sort_unstable_by(f32::total_cmp);
    if n % 2 == 1 {
        col[n / 2]
    } else {
        ((f64::from(col[n / 2 - 1]) + f64::from(col[n / 2])) / 2.0) as f32
    }
}

/// Mean of `col` without its `k` smallest and `k` largest values.
fn trimmed_mean(col: &mut [f32], k: usize) -> f32 {
    col.sort_unstable_by(f32::total_cmp);
    let rest = &col[k..col.len() - k];
    (rest.iter().map(|&v| f64::from(v)).sum::<f64>() / rest.len() as f64) as f32
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum()
}

/// Krum scores of the updates `among` (indices into `updates`): for each, the
/// sum of squared distances to its `max(n − f − 2, 1)` nearest others.
fn krum_scores(updates: &[Vec<f32>], among: &[usize], f: usize) -> Vec<(usize, f64)> {
    let n = among.len();
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|a| ((a + 1)..n).map(move |b| (a, b))).collect();
    let dists: Vec<f64> = pairs
        .par_iter()
        .map(|&(a, b)| squared_distance(&updates[among[a]], &updates[among[b]]))
        .collect();
    let mut matrix = vec![vec![0f64; n]; n];
    for (&(a, b), &d) in pairs.iter().zip(&dists) {
        matrix[a][b] = d;
        matrix[b][a] = d;
    }
    let neighbours = n.saturating_sub(f + 2).max(1).min(n.saturating_sub(1));
    (0..n)
        .map(|a| {
            let mut row: Vec<f64> = (0..n).filter(|&b| b != a).map(|b| matrix[a][b]).collect();
            row.sort_unstable_by(f64::total_cmp);
            (among[a], row.iter().take(neighbours).sum())
        })
        .collect()
}

/// The `m` indices with the lowest scores. Ties are broken by the updates'
/// values, so the choice does not depend on arrival order.
fn best(updates: &[Vec<f32>], scores: &[(usize, f64)], m: usize) -> Vec<usize> {
    let mut order = scores.to_vec();
    order.sort_by(|a, b| {
        a.1.total_cmp(&b.1)
            .then_with(|| lexicographic(&updates[a.0], &updates[b.0]))
    });
    order.into_iter().take(m).map(|(i, _)| i).collect()
}

fn lexicographic(a: &[f32], b: &[f32]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.total_cmp(y))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

fn bulyan(updates: &[Vec<f32>], numel: usize, f: usize) -> Vec<f32> {
    let theta = updates.len() - 2 * f;
    let mut remaining: Vec<usize> = (0..updates.len()).collect();
    let mut chosen = Vec::with_capacity(theta);
    while chosen.len() < theta {
        let scores = krum_scores(updates, &remaining, f);
        let pick = best(updates, &scores, 1)[0];
        remaining.retain(|&i| i != pick);
        chosen.push(updates[pick].clone());
    }
    let beta = theta - 2 * f;
    coordinate_wise(&chosen, numel, |col| {
        let med = f64::from(median(col));
        // `median` sorted the column; keep the `beta` values closest to it.
        col.sort_by(|a, b| {
            (f64::from(*a) - med)
                .abs()
                .total_cmp(&(f64::from(*b) - med).abs())
                .then(a.total_cmp(b))
        });
        (col[..beta].iter().map(|&v| f64::from(v)).sum::<f64>() / beta as f64) as f32
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(agg: Aggregator, updates: &[(Vec<f32>, f64)]) -> Vec<f32> {
        let mut a = RoundAggregate::new(agg, updates[0].0.len(), Precision::F64, false);
        for (u, w) in updates {
            a.add(u.clone(), *w);
        }
        a.finish().unwrap().0
    }

    fn all() -> Vec<Aggregator> {
        vec![
            Aggregator::Mean,
            Aggregator::Median,
            Aggregator::TrimmedMean { beta: 0.2 },
            Aggregator::Krum { f: 1 },
            Aggregator::MultiKrum { f: 1, m: 0 },
            Aggregator::Bulyan { f: 1 },
        ]
    }

    #[test]
    fn known_values() {
        let u = |v: &[f32]| (v.to_vec(), 1.0);
        let ups = [u(&[1.0, 10.0]), u(&[2.0, 20.0]), u(&[3.0, 30.0]), u(&[100.0, -50.0])];
        assert_eq!(run(Aggregator::Median, &ups), vec![2.5, 15.0]);
        assert_eq!(run(Aggregator::TrimmedMean { beta: 0.25 }, &ups), vec![2.5, 15.0]);
        assert_eq!(run(Aggregator::Mean, &ups), vec![26.5, 2.5]);
        let weighted = [(vec![1.0f32], 1.0), (vec![5.0f32], 3.0)];
        assert_eq!(run(Aggregator::Mean, &weighted), vec![4.0]);
    }

    #[test]
    fn the_f32_sum_folds_sparse_sources_and_control_sections_in_place() {
        #[derive(Debug)]
        struct Sparse(Vec<(usize, f32)>, usize);
        impl UpdateSource for Sparse {
            fn len(&self) -> usize {
                self.1
            }
            fn visit(&self, sink: &mut dyn FnMut(usize, &[f32])) -> Result<(), String> {
                for &(i, v) in &self.0 {
                    sink(i, &[v]);
                }
                Ok(())
            }
        }
        for precision in [Precision::F32, Precision::F64] {
            let mut a = RoundAggregate::new(Aggregator::Mean, 3, precision, true);
            // Model section [0, 3), control section [3, 6).
            let s1: Arc<dyn UpdateSource> = Arc::new(Sparse(vec![(0, 2.0), (4, 1.0)], 6));
            let s2: Arc<dyn UpdateSource> = Arc::new(vec![0.0f32, 4.0, 0.0, 1.0, 1.0, 1.0]);
            for (s, w) in [(s1, 1.0), (s2, 3.0)] {
                let sum = a.accept(s.clone(), 0.5).unwrap();
                lock(&sum).fold(s.as_ref(), w, 0.5).unwrap();
            }
            let (mean, control) = a.finish().unwrap();
            // (1·0.5·[2,0,0] + 3·0.5·[0,4,0]) / 4
            assert_eq!(mean, vec![0.25, 1.5, 0.0], "{precision:?}");
            assert_eq!(control, Some(vec![1.0, 2.0, 1.0]));
        }
    }

    #[test]
    fn krum_picks_the_update_in_the_crowd() {
        let ups: Vec<(Vec<f32>, f64)> = [0.0f32, 0.1, 0.2, 0.3, 50.0]
            .iter()
            .map(|&v| (vec![v, v], 1.0))
            .collect();
        // Scores with n - f - 2 = 2 neighbours: 0.1 and 0.2 tie at 0.04; the
        // tie goes to the smaller vector.
        assert_eq!(run(Aggregator::Krum { f: 1 }, &ups), vec![0.1, 0.1]);
        // Multi-Krum averages the n - f = 4 best: all but the outlier.
        let mk = run(Aggregator::MultiKrum { f: 1, m: 0 }, &ups);
        assert!((mk[0] - 0.15).abs() < 1e-6, "{mk:?}");
    }

    #[test]
    fn too_few_updates_is_an_error_that_says_how_many() {
        let mut a = RoundAggregate::new(Aggregator::Krum { f: 2 }, 1, Precision::F64, false);
        for _ in 0..6 {
            a.add(vec![1.0], 1.0);
        }
        assert_eq!(
            a.finish().unwrap_err(),
            "krum(f=2) needs at least 7 updates, the round has 6"
        );
        assert_eq!(Aggregator::Bulyan { f: 2 }.min_updates(), 11);
        assert_eq!(
            RoundAggregate::new(Aggregator::Median, 3, Precision::F64, false)
                .finish()
                .unwrap()
                .0,
            vec![0.0; 3]
        );
    }

    fn honest_and_outliers() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        // 7 honest updates of 6 values in [-1, 1], and 1 or 2 outliers of any size.
        (
            proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 6), 9),
            proptest::collection::vec(
                proptest::collection::vec(prop_oneof![-1e30f32..-1e3, 1e3f32..1e30], 6),
                1..=2,
            ),
        )
    }

    proptest! {
        #[test]
        fn every_aggregator_ignores_arrival_order(
            ups in proptest::collection::vec((proptest::collection::vec(-10.0f32..10.0, 5), 1u32..1000), 7..10),
            seed in any::<u64>(),
        ) {
            let ups: Vec<(Vec<f32>, f64)> = ups.into_iter().map(|(u, w)| (u, f64::from(w))).collect();
            let mut shuffled = ups.clone();
            use rand::{SeedableRng, seq::SliceRandom};
            shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            for agg in all() {
                let (a, b) = (run(agg, &ups), run(agg, &shuffled));
                for (x, y) in a.iter().zip(&b) {
                    prop_assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{agg}: {a:?} vs {b:?}");
                }
            }
        }

        #[test]
        fn the_mean_equals_a_direct_weighted_computation(
            ups in proptest::collection::vec((proptest::collection::vec(-10.0f32..10.0, 5), 1u32..1000), 1..8)
        ) {
            let ups: Vec<(Vec<f32>, f64)> = ups.into_iter().map(|(u, w)| (u, f64::from(w))).collect();
            let mean = run(Aggregator::Mean, &ups);
            let total: f64 = ups.iter().map(|(_, w)| w).sum();
            for (i, &m) in mean.iter().enumerate() {
                let direct = ups.iter().map(|(u, w)| w * f64::from(u[i])).sum::<f64>() / total;
                prop_assert!((f64::from(m) - direct).abs() <= 1e-5 * direct.abs().max(1.0));
            }
        }

        #[test]
        fn robust_aggregators_stay_among_the_honest_whatever_the_outliers((honest, outliers) in honest_and_outliers()) {
            // f = 2 outliers at most, n = 9 + outliers.len() updates.
            let mut ups: Vec<(Vec<f32>, f64)> = honest.iter().map(|u| (u.clone(), 1.0)).collect();
            ups.extend(outliers.iter().map(|u| (u.clone(), 1e9)));
            let f = 2;
            let beta = f as f64 / ups.len() as f64 + 1e-9;
            for agg in [
                Aggregator::Median,
                Aggregator::TrimmedMean { beta },
                Aggregator::Krum { f },
                Aggregator::MultiKrum { f, m: 0 },
                Aggregator::Bulyan { f },
            ] {
                if ups.len() < agg.min_updates() {
                    continue;
                }
                let out = run(agg, &ups);
                for (i, &v) in out.iter().enumerate() {
                    // Each coordinate stays within the honest values' range.
                    let lo = honest.iter().map(|u| u[i]).fold(f32::INFINITY, f32::min);
                    let hi = honest.iter().map(|u| u[i]).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(v >= lo - 1e-6 && v <= hi + 1e-6, "{agg}: coordinate {i} = {v} outside [{lo}, {hi}]");
                }
            }
            // The plain mean is dragged away by the same outliers.
            let mean = run(Aggregator::Mean, &ups);
            prop_assert!(mean.iter().any(|v| v.abs() > 10.0));
        }
    }
}
