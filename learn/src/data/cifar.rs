//! CIFAR-10's binary layout: records of 1 label byte and 3,072 pixel bytes
//! (1,024 R, 1,024 G, 1,024 B, row-major 32×32). The training half is
//! `data_batch_1.bin` … `data_batch_5.bin` (or `data_batch_1.bin` alone, as
//! `partition` writes it), the test half `test_batch.bin`.

use std::path::{Path, PathBuf};

use super::{Dataset, Split, read_file};
use crate::{Error, Result};

const IMAGE_BYTES: usize = 3 * 32 * 32;
/// Bytes of one record.
pub const CIFAR_RECORD: usize = 1 + IMAGE_BYTES;
/// CIFAR-10's class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Resolves a CIFAR-10 folder: the folder itself, or its `cifar-10-batches-bin` child.
pub fn resolve_cifar10_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("test_batch.bin").is_file() || d.join("data_batch_1.bin").is_file())
}

/// Loads CIFAR-10's binary layout from `dir`.
pub fn load_cifar10(dir: &Path, split: Split) -> Result<Dataset> {
    let (root, files) = cifar10_files(dir, split)?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = root.join(&name);
        let bytes = read_file(&path, "file of the CIFAR-10 binary layout")?;
        parse_cifar10_records(&path, &bytes, &mut images, &mut labels)?;
    }
    Ok(Dataset::from_raw(&images, &labels, [3, 32, 32], classes()))
}

/// Loads only the records `pick` chooses from the split's labels, in the
/// order it gives them: a node keeps its partition without ever holding
/// the whole set (one file of 10,000 records at a time).
pub fn load_cifar10_part(dir: &Path, split: Split, pick: impl FnOnce(&[i64]) -> Result<Vec<i64>>) -> Result<Dataset> {
    let (root, files) = cifar10_files(dir, split)?;
    // First pass: every label (checked), and where each file's records start.
    let mut labels = Vec::new();
    let mut starts = Vec::with_capacity(files.len());
    for name in &files {
        let path = root.join(name);
        let bytes = read_file(&path, "file of the CIFAR-10 binary layout")?;
        starts.push(labels.len());
        check_cifar10_records(&path, &bytes)?;
        labels.extend(bytes.chunks_exact(CIFAR_RECORD).map(|r| i64::from(r[0])));
    }
    let picked = pick(&labels)?;
    let mut images = vec![0u8; picked.len() * IMAGE_BYTES];
    let mut picked_labels = Vec::with_capacity(picked.len());
    for &i in &picked {
        let l = usize::try_from(i)
            .ok()
            .and_then(|i| labels.get(i))
            .ok_or_else(|| Error::data(&root, format!("record {i} is out of range ({} records)", labels.len())))?;
        picked_labels.push(*l);
    }
    // Second pass: copy the picked records, one file in memory at a time.
    for (f, name) in files.iter().enumerate() {
        let (from, to) = (starts[f], starts.get(f + 1).copied().unwrap_or(labels.len()));
        if !picked.iter().any(|&i| (from..to).contains(&(i as usize))) {
            continue;
        }
        let path = root.join(name);
        let bytes = read_file(&path, "file of the CIFAR-10 binary layout")?;
        if bytes.len() != (to - from) * CIFAR_RECORD {
            return Err(Error::data(&path, "the file changed while it was read"));
        }
        for (slot, &i) in picked.iter().enumerate() {
            let i = i as usize;
            if (from..to).contains(&i) {
                let rec = &bytes[(i - from) * CIFAR_RECORD..(i - from + 1) * CIFAR_RECORD];
                images[slot * IMAGE_BYTES..(slot + 1) * IMAGE_BYTES].copy_from_slice(&rec[1..]);
            }
        }
    }
    Ok(Dataset::from_raw(&images, &picked_labels, [3, 32, 32], classes()))
}

fn classes() -> Vec<String> {
    CIFAR10_CLASSES.iter().map(|c| c.to_string()).collect()
}

/// The folder holding the layout and the split's file names.
fn cifar10_files(dir: &Path, split: Split) -> Result<(PathBuf, Vec<String>)> {
    let root = resolve_cifar10_dir(dir).ok_or_else(|| {
        Error::data(
            dir,
            "no CIFAR-10 binary files here (expected data_batch_1.bin .. data_batch_5.bin and test_batch.bin)",
        )
    })?;
    let files: Vec<String> = match split {
        // A single data_batch_1.bin (a partition's layout) or all five.
        Split::Train if (2..=5).all(|i| !root.join(format!("data_batch_{i}.bin")).exists()) => {
            vec!["data_batch_1.bin".into()]
        }
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Test => vec!["test_batch.bin".into()],
    };
    Ok((root, files))
}

fn parse_cifar10_records(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<i64>) -> Result<()> {
    check_cifar10_records(path, bytes)?;
    images.reserve(bytes.len() / CIFAR_RECORD * IMAGE_BYTES);
    for rec in bytes.chunks_exact(CIFAR_RECORD) {
        labels.push(i64::from(rec[0]));
        images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// Checks a file of records: whole records, labels in 0..=9.
fn check_cifar10_records(path: &Path, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::data(path, "file is empty"));
    }
    if !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(Error::data(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {CIFAR_RECORD}-byte records ({} whole records, {} bytes left over)",
                bytes.len(),
                bytes.len() / CIFAR_RECORD,
                bytes.len() % CIFAR_RECORD
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let label = rec[0];
        if label >= 10 {
            return Err(Error::data(
                path,
                format!("record {i} has label {label}; CIFAR-10 labels are 0..=9"),
            ));
        }
    }
    Ok(())
}

/// Writes records in CIFAR-10's binary layout.
pub fn write_records(path: &Path, data: &Dataset) -> Result<()> {
    if data.shape() != [3, 32, 32] {
        return Err(Error::data(
            path,
            format!("CIFAR-10 records hold 3x32x32 images, not {:?}", data.shape()),
        ));
    }
    let images = Vec::<u8>::try_from(&data.images.flatten(0, -1))?;
    let labels = data.label_vec();
    let mut out = Vec::with_capacity(labels.len() * CIFAR_RECORD);
    for (i, &l) in labels.iter().enumerate() {
        out.push(l as u8);
        out.extend_from_slice(&images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]);
    }
    Ok(fedge_common::fsutil::write_atomic(path, &out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    fn records(labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &l) in labels.iter().enumerate() {
            out.push(l);
            out.extend(std::iter::repeat_n(i as u8, IMAGE_BYTES));
        }
        out
    }

    #[test]
    fn cifar10_binary_layout_loads() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            write(&dir.path().join(format!("data_batch_{i}.bin")), &records(&[i, 9]));
        }
        write(&dir.path().join("test_batch.bin"), &records(&[3, 4, 5]));
        let train = load_cifar10(dir.path(), Split::Train).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(
            Vec::<i64>::try_from(&train.labels).unwrap(),
            vec![1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
        );
        let test = load_cifar10(dir.path(), Split::Test).unwrap();
        assert_eq!(test.images.size(), vec![3, 3, 32, 32]);
        assert_eq!(test.images.int64_value(&[1, 2, 31, 31]), 1);
    }

    #[test]
    fn a_part_loads_the_same_samples_as_a_subset_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=5 {
            write(
                &dir.path().join(format!("data_batch_{i}.bin")),
                &records(&[i, 9, i % 3]),
            );
        }
        let whole = load_cifar10(dir.path(), Split::Train).unwrap();
        let pick = vec![13, 0, 7, 4];
        let part = load_cifar10_part(dir.path(), Split::Train, |labels| {
            assert_eq!(labels.len(), 15);
            Ok(pick.clone())
        })
        .unwrap();
        let subset = whole.subset(&pick);
        assert_eq!(part.label_vec(), subset.label_vec());
        assert!(part.images.equal(&subset.images));
        let err = load_cifar10_part(dir.path(), Split::Train, |_| Ok(vec![15]))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("record 15 is out of range (15 records)"), "{err}");
    }

    #[test]
    fn a_single_training_batch_is_a_layout_too() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("data_batch_1.bin"), &records(&[4, 2]));
        let train = load_cifar10(dir.path(), Split::Train).unwrap();
        assert_eq!(train.label_vec(), vec![4, 2]);
        let out = dir.path().join("copy.bin");
        write_records(&out, &train).unwrap();
        assert_eq!(std::fs::read(out).unwrap(), records(&[4, 2]));
    }

    #[test]
    fn cifar10_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(err.contains("no CIFAR-10 binary files here"), "{err}");

        write(&dir.path().join("test_batch.bin"), &records(&[1]));
        write(&dir.path().join("data_batch_2.bin"), &records(&[1]));
        let err = load_cifar10(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.ends_with("data_batch_1.bin: missing file of the CIFAR-10 binary layout"),
            "{err}"
        );

        let mut truncated = records(&[1, 2]);
        truncated.truncate(CIFAR_RECORD + 100);
        write(&dir.path().join("test_batch.bin"), &truncated);
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.ends_with("truncated: 3173 bytes is not a whole number of 3073-byte records (1 whole records, 100 bytes left over)"),
            "{err}"
        );

        write(&dir.path().join("test_batch.bin"), &records(&[1, 12]));
        let err = load_cifar10(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(
            err.ends_with("record 1 has label 12; CIFAR-10 labels are 0..=9"),
            "{err}"
        );
    }
}
