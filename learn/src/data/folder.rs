//! Image folders: one sub-folder per class (class names are the folder
//! names, sorted), holding JPEG or PNG files, optionally under `train/` and
//! `test/`. Images are decoded in parallel, once, into one `u8` tensor; they
//! must all have the same size. Grayscale folders load as one channel,
//! anything else as RGB.

use std::path::{Path, PathBuf};

use image::{ColorType, DynamicImage};
use rayon::prelude::*;

use super::{Dataset, Split};
use crate::{Error, Result};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether `dir` looks like an image folder (class folders at its root or
/// under `train/` or `test/`).
pub fn looks_like_image_folder(dir: &Path) -> bool {
    [dir.join("train"), dir.join("test"), dir.to_path_buf()]
        .iter()
        .any(|root| {
            subdirs(root)
                .iter()
                .any(|c| std::fs::read_dir(c).is_ok_and(|rd| rd.flatten().any(|e| is_image(&e.path()))))
        })
}

/// The folder holding `split`'s class folders.
fn split_root(dir: &Path, split: Split) -> Result<PathBuf> {
    let named = dir.join(split.name());
    if named.is_dir() {
        return Ok(named);
    }
    match split {
        Split::Train if !dir.join("test").is_dir() => Ok(dir.to_path_buf()),
        _ => Err(Error::data(
            dir,
            format!("no {}/ folder of class folders", split.name()),
        )),
    }
}

/// File name of the optional class list at an image folder's root: one class
/// name per line, in label order. With it, class folders may be empty or
/// missing (a skewed partition may hold no sample of some class).
pub const CLASSES_FILE: &str = "classes.txt";

/// Image files of a split with their labels, sorted by class then name.
pub type LabeledFiles = Vec<(PathBuf, i64)>;

/// The class names and image files (with labels) of one split, sorted.
pub fn list_files(dir: &Path, split: Split) -> Result<(Vec<String>, LabeledFiles)> {
    let root = split_root(dir, split)?;
    let listed = [dir.join(CLASSES_FILE), root.join(CLASSES_FILE)]
        .into_iter()
        .find(|p| p.is_file());
    let classes: Vec<String> = match &listed {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| Error::io(p, e))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => subdirs(&root)
            .iter()
            .map(|c| {
                c.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect(),
    };
    if classes.is_empty() {
        return Err(Error::data(&root, "no class folders"));
    }
    let mut files: Vec<(PathBuf, i64)> = Vec::new();
    for (label, name) in classes.iter().enumerate() {
        let class = root.join(name);
        let mut imgs: Vec<PathBuf> = match std::fs::read_dir(&class) {
            Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| is_image(p)).collect(),
            Err(_) if listed.is_some() => Vec::new(),
            Err(e) => return Err(Error::io(&class, e)),
        };
        if imgs.is_empty() && listed.is_none() {
            return Err(Error::data(&class, "class folder has no JPEG or PNG images"));
        }
        imgs.sort();
        files.extend(imgs.into_iter().map(|p| (p, label as i64)));
    }
    if files.is_empty() {
        return Err(Error::data(&root, "no JPEG or PNG images in any class folder"));
    }
    Ok((classes, files))
}

/// Loads one split of an image folder, decoding in parallel.
pub fn load_image_folder(dir: &Path, split: Split) -> Result<Dataset> {
    let (names, files) = list_files(dir, split)?;
    let first = decode(&files[0].0)?;
    let (w, h) = (first.width(), first.height());
    let gray = matches!(
        first.color(),
        ColorType::L8 | ColorType::L16 | ColorType::La8 | ColorType::La16
    );
    let channels = if gray { 1 } else { 3 };
    let per_image = (channels * w * h) as usize;
    let decoded: Vec<Vec<u8>> = files
        .par_iter()
        .map(|(path, _)| {
            let img = decode(path)?;
            if (img.width(), img.height()) != (w, h) {
                return Err(Error::data(
                    path,
                    format!(
                        "image is {}x{}, but the data set's first image ({}) is {w}x{h}",
                        img.width(),
                        img.height(),
                        files[0].0.display()
                    ),
                ));
            }
            Ok(chw(&img, gray))
        })
        .collect::<Result<_>>()?;
    let mut pixels = Vec::with_capacity(files.len() * per_image);
    for d in decoded {
        pixels.extend_from_slice(&d);
    }
    let labels: Vec<i64> = files.iter().map(|(_, l)| *l).collect();
    Ok(Dataset::from_raw(
        &pixels,
        &labels,
        [i64::from(channels), i64::from(h), i64::from(w)],
        names,
    ))
}

/// One image file as channel-major `u8` pixels of `shape` (`[channels,
/// height, width]`), resized (bilinear) when its size differs.
pub fn image_pixels(path: &Path, shape: [i64; 3]) -> Result<Vec<u8>> {
    Ok(fit(decode(path)?, shape))
}

/// An encoded image (PNG, JPEG) as channel-major `u8` pixels of `shape`,
/// resized when its size differs; `what` names it in errors.
pub fn image_bytes_pixels(bytes: &[u8], shape: [i64; 3], what: &str) -> Result<Vec<u8>> {
    let img = image::load_from_memory(bytes).map_err(|e| Error::data(what, format!("cannot decode image: {e}")))?;
    Ok(fit(img, shape))
}

fn fit(img: DynamicImage, shape: [i64; 3]) -> Vec<u8> {
    let (w, h) = (shape[2] as u32, shape[1] as u32);
    let img = if (img.width(), img.height()) == (w, h) {
        img
    } else {
        img.resize_exact(w, h, image::imageops::FilterType::Triangle)
    };
    chw(&img, shape[0] == 1)
}

fn decode(path: &Path) -> Result<DynamicImage> {
    image::open(path).map_err(|e| Error::data(path, format!("cannot decode image: {e}")))
}

/// Channel-major bytes of an image.
fn chw(img: &DynamicImage, gray: bool) -> Vec<u8> {
    if gray {
        return img.to_luma8().into_raw();
    }
    let rgb = img.to_rgb8();
    let n = (rgb.width() * rgb.height()) as usize;
    let raw = rgb.as_raw();
    let mut out = vec![0u8; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            out[c * n + i] = raw[3 * i + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let buf: Vec<u8> = (0..w * h * 3).map(|i| v.wrapping_add(i as u8)).collect();
        image::save_buffer(path, &buf, w, h, image::ExtendedColorType::Rgb8).unwrap();
    }

    #[test]
    fn class_folders_load_sorted_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("train/zebra/a.png"), 8, 6, 1);
        png(&r.join("train/ant/b.png"), 8, 6, 2);
        png(&r.join("train/ant/c.PNG"), 8, 6, 3);
        png(&r.join("test/ant/d.png"), 8, 6, 4);
        png(&r.join("test/zebra/e.png"), 8, 6, 5);
        let jpg = r.join("train/zebra/f.jpg");
        image::save_buffer(&jpg, &[9u8; 8 * 6 * 3], 8, 6, image::ExtendedColorType::Rgb8).unwrap();
        assert!(matches!(
            super::super::detect(r).unwrap(),
            super::super::DataSource::ImageFolder(_)
        ));
        let train = load_image_folder(r, Split::Train).unwrap();
        assert_eq!(train.classes, vec!["ant", "zebra"]);
        assert_eq!(train.label_vec(), vec![0, 0, 1, 1]);
        assert_eq!(train.shape(), [3, 6, 8]);
        // CHW: the red plane of b.png starts with 2, 5, 8 (R of consecutive pixels).
        assert_eq!(train.images.int64_value(&[0, 0, 0, 1]), 5);
        let test = load_image_folder(r, Split::Test).unwrap();
        assert_eq!(test.len(), 2);
    }

    #[test]
    fn bad_folders_are_named_with_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("cat/a.png"), 8, 8, 1);
        png(&r.join("dog/b.png"), 8, 7, 1);
        let err = load_image_folder(r, Split::Train).unwrap_err().to_string();
        assert!(
            err.contains("dog/b.png: image is 8x7, but the data set's first image"),
            "{err}"
        );

        std::fs::remove_file(r.join("dog/b.png")).unwrap();
        let err = load_image_folder(r, Split::Train).unwrap_err().to_string();
        assert!(err.ends_with("dog: class folder has no JPEG or PNG images"), "{err}");

        std::fs::write(r.join("dog/b.png"), b"not a png").unwrap();
        let err = load_image_folder(r, Split::Train).unwrap_err().to_string();
        assert!(err.contains("dog/b.png: cannot decode image"), "{err}");

        let err = load_image_folder(r, Split::Test).unwrap_err().to_string();
        assert!(err.ends_with("no test/ folder of class folders"), "{err}");
    }

    #[test]
    fn a_class_list_allows_empty_classes_and_keeps_labels() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        png(&r.join("train/cat/a.png"), 4, 4, 1);
        std::fs::write(r.join(CLASSES_FILE), "ant\ncat\ndog\n").unwrap();
        let d = load_image_folder(r, Split::Train).unwrap();
        assert_eq!(d.classes, vec!["ant", "cat", "dog"]);
        assert_eq!(d.label_vec(), vec![1]);
    }
}
