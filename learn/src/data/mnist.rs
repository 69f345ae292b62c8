//! MNIST's IDX format: `train-images-idx3-ubyte` / `train-labels-idx1-ubyte`
//! for training and `t10k-…` (or `test-…`) for testing, each plain or gzipped.
//! Images are `u8` `[N, rows, cols]`, one channel; labels are `u8`.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Dataset, Split, read_file};
use crate::{Error, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Whether `dir` holds IDX image files.
pub fn has_idx_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with("idx3-ubyte") || n.ends_with("idx3-ubyte.gz")
        })
    })
}

/// Finds `<prefix>-<kind>-idxN-ubyte[.gz]` (or `<prefix>-<kind>.idxN-ubyte`) in `dir`.
fn find(dir: &Path, prefixes: &[&str], kind: &str, dims: u8) -> Result<PathBuf> {
    for prefix in prefixes {
        for sep in ["-", "."] {
            let base = format!("{prefix}-{kind}{sep}idx{dims}-ubyte");
            for name in [base.clone(), format!("{base}.gz")] {
                let p = dir.join(&name);
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    Err(Error::data(
        dir,
        format!("missing {}-{kind}-idx{dims}-ubyte (plain or .gz)", prefixes[0]),
    ))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = read_file(path, "IDX file")?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::data(path, format!("not a valid gzip file: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX image file: `(count, rows, cols, pixels)`.
pub fn parse_images(path: &Path, b: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    if b.len() < 16 {
        return Err(Error::data(
            path,
            format!("truncated IDX header: {} bytes, expected 16", b.len()),
        ));
    }
    let magic = be_u32(b, 0);
    if magic != IMAGES_MAGIC {
        return Err(Error::data(
            path,
            format!("wrong magic number 0x{magic:08x}; IDX image files start with 0x{IMAGES_MAGIC:08x}"),
        ));
    }
    let (n, rows, cols) = (be_u32(b, 4) as usize, be_u32(b, 8) as usize, be_u32(b, 12) as usize);
    let need = n * rows * cols;
    if b.len() - 16 != need {
        return Err(Error::data(
            path,
            format!(
                "truncated: header announces {n} images of {rows}x{cols} ({need} pixel bytes), file holds {}",
                b.len() - 16
            ),
        ));
    }
    Ok((n, rows, cols, b[16..].to_vec()))
}

/// Parses an IDX label file.
pub fn parse_labels(path: &Path, b: &[u8]) -> Result<Vec<i64>> {
    if b.len() < 8 {
        return Err(Error::data(
            path,
            format!("truncated IDX header: {} bytes, expected 8", b.len()),
        ));
    }
    let magic = be_u32(b, 0);
    if magic != LABELS_MAGIC {
        return Err(Error::data(
            path,
            format!("wrong magic number 0x{magic:08x}; IDX label files start with 0x{LABELS_MAGIC:08x}"),
        ));
    }
    let n = be_u32(b, 4) as usize;
    if b.len() - 8 != n {
        return Err(Error::data(
            path,
            format!("truncated: header announces {n} labels, file holds {}", b.len() - 8),
        ));
    }
    Ok(b[8..].iter().map(|&l| i64::from(l)).collect())
}

/// Loads one split of an MNIST-format folder.
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let prefixes: &[&str] = match split {
        Split::Train => &["train"],
        Split::Test => &["t10k", "test"],
    };
    let img_path = find(dir, prefixes, "images", 3)?;
    let lbl_path = find(dir, prefixes, "labels", 1)?;
    let (n, rows, cols, pixels) = parse_images(&img_path, &read_maybe_gz(&img_path)?)?;
    let labels = parse_labels(&lbl_path, &read_maybe_gz(&lbl_path)?)?;
    if labels.len() != n {
        return Err(Error::data(
            &lbl_path,
            format!("{} labels for {n} images in {}", labels.len(), img_path.display()),
        ));
    }
    if n == 0 {
        return Err(Error::data(&img_path, "holds no images"));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|&(_, &l)| l > 9) {
        return Err(Error::data(
            &lbl_path,
            format!("label {i} is {l}; MNIST labels are 0..=9"),
        ));
    }
    Ok(Dataset::from_raw(
        &pixels,
        &labels,
        [1, rows as i64, cols as i64],
        (0..10).map(|d| d.to_string()).collect(),
    ))
}

/// Encodes images `[N, 1, H, W]` as an IDX image file and labels as an IDX label file.
pub fn encode(data: &Dataset) -> Result<(Vec<u8>, Vec<u8>)> {
    let [c, h, w] = data.shape();
    if c != 1 {
        return Err(Error::Payload(format!(
            "IDX images are single-channel, got {c} channels"
        )));
    }
    let n = data.len() as u32;
    let mut images = Vec::with_capacity(16 + data.len() * (h * w) as usize);
    for v in [IMAGES_MAGIC, n, h as u32, w as u32] {
        images.extend_from_slice(&v.to_be_bytes());
    }
    images.extend(Vec::<u8>::try_from(&data.images.flatten(0, -1))?);
    let mut labels = Vec::with_capacity(8 + data.len());
    for v in [LABELS_MAGIC, n] {
        labels.extend_from_slice(&v.to_be_bytes());
    }
    labels.extend(data.label_vec().iter().map(|&l| l as u8));
    Ok((images, labels))
}

/// Writes `data` as `<prefix>-images-idx3-ubyte` and `<prefix>-labels-idx1-ubyte` in `dir`.
pub fn write(dir: &Path, prefix: &str, data: &Dataset) -> Result<()> {
    let (images, labels) = encode(data)?;
    fedge_common::fsutil::write_atomic(&dir.join(format!("{prefix}-images-idx3-ubyte")), &images)?;
    Ok(fedge_common::fsutil::write_atomic(
        &dir.join(format!("{prefix}-labels-idx1-ubyte")),
        &labels,
    )?)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn idx(n: u32, side: u32) -> (Vec<u8>, Vec<u8>) {
        let mut img = Vec::new();
        for v in [IMAGES_MAGIC, n, side, side] {
            img.extend_from_slice(&v.to_be_bytes());
        }
        img.extend((0..n * side * side).map(|i| (i % 251) as u8));
        let mut lbl = Vec::new();
        for v in [LABELS_MAGIC, n] {
            lbl.extend_from_slice(&v.to_be_bytes());
        }
        lbl.extend((0..n).map(|i| (i % 10) as u8));
        (img, lbl)
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn plain_and_gzipped_idx_load() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lbl) = idx(12, 28);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), &lbl).unwrap();
        let mut small = lbl[..8 + 3].to_vec();
        small[4..8].copy_from_slice(&3u32.to_be_bytes());
        let mut head = img[..16 + 3 * 784].to_vec();
        head[4..8].copy_from_slice(&3u32.to_be_bytes());
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), gz(&head)).unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), gz(&small)).unwrap();
        assert!(matches!(
            super::super::detect(dir.path()).unwrap(),
            super::super::DataSource::Mnist(_)
        ));
        let train = load_mnist(dir.path(), Split::Train).unwrap();
        assert_eq!((train.len(), train.shape()), (12, [1, 28, 28]));
        assert_eq!(train.label_vec()[..3], [0, 1, 2]);
        let test = load_mnist(dir.path(), Split::Test).unwrap();
        assert_eq!(test.len(), 3);
        // Round trip through the writer.
        let out = tempfile::tempdir().unwrap();
        write(out.path(), "train", &train).unwrap();
        assert_eq!(std::fs::read(out.path().join("train-images-idx3-ubyte")).unwrap(), img);
        assert_eq!(std::fs::read(out.path().join("train-labels-idx1-ubyte")).unwrap(), lbl);
    }

    #[test]
    fn bad_idx_files_are_named_with_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (mut img, lbl) = idx(4, 28);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        let err = load_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.ends_with("missing train-labels-idx1-ubyte (plain or .gz)"), "{err}");

        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), &lbl[..10]).unwrap();
        let err = load_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.ends_with("truncated: header announces 4 labels, file holds 2"),
            "{err}"
        );

        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), &lbl).unwrap();
        img[3] = 0x01;
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        let err = load_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.ends_with("wrong magic number 0x00000801; IDX image files start with 0x00000803"),
            "{err}"
        );

        img[3] = 0x03;
        img.truncate(100);
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), &img).unwrap();
        let err = load_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.ends_with("truncated: header announces 4 images of 28x28 (3136 pixel bytes), file holds 84"),
            "{err}"
        );

        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), b"not gzip").unwrap();
        std::fs::remove_file(dir.path().join("train-images-idx3-ubyte")).unwrap();
        let err = load_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("not a valid gzip file"), "{err}");
    }
}
