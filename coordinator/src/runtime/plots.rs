//! The run's curves, drawn next to the model after every round:
//! `curves.svg` (plotters) and `curves.png` (the same SVG rendered by
//! resvg, with the system's fonts): central and federated accuracy, central
//! and federated loss, and bytes up and down per round.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::runtime::status::RoundPoint;
use crate::{Error, Result};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 420;
const CENTRAL: RGBColor = RGBColor(47, 111, 222);
const FEDERATED: RGBColor = RGBColor(31, 157, 106);
const LOSS: RGBColor = RGBColor(217, 98, 43);

/// Draws `rounds` into `dir/curves.svg` and `dir/curves.png`; returns their paths.
pub fn write(dir: &Path, rounds: &[RoundPoint]) -> Result<Vec<PathBuf>> {
    let svg = render_svg(rounds)?;
    let svg_path = dir.join("curves.svg");
    fedge_common::fsutil::write_atomic(&svg_path, svg.as_bytes())?;
    let png_path = dir.join("curves.png");
    fedge_common::fsutil::write_atomic(&png_path, &svg_to_png(&svg)?)?;
    Ok(vec![svg_path, png_path])
}

type Series = Vec<(f64, f64)>;

fn series(rounds: &[RoundPoint], f: impl Fn(&RoundPoint) -> Option<f64>) -> Series {
    rounds.iter().filter_map(|r| Some((r.round as f64, f(r)?))).collect()
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("drawing the curves: {e}"))
}

/// One panel: `lines` as (label, colour, points) over rounds 1..=`last`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    last: f64,
    y_max: f64,
    lines: &[(&str, RGBColor, &Series)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(1f64..last.max(2.0), 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_label)
        .x_labels((last as usize).clamp(2, 11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(RGBColor(230, 232, 237))
        .draw()
        .map_err(plot_err)?;
    for (label, colour, points) in lines {
        if points.is_empty() {
            continue;
        }
        let colour = *colour;
        chart
            // A polyline needs two distinct points: a single round gets a
            // stub a hundredth of a round long (its dot covers it).
            .draw_series(LineSeries::new(
                points
                    .iter()
                    .copied()
                    .chain((points.len() == 1).then(|| (points[0].0 + 0.01, points[0].1))),
                colour.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .border_style(RGBColor(200, 200, 200))
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// The three panels as an SVG document.
pub fn render_svg(rounds: &[RoundPoint]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let panels = root.split_evenly((1, 3));
        let last = rounds.last().map_or(1.0, |r| r.round as f64);
        let acc = series(rounds, |r| r.test_accuracy.map(|a| a * 100.0));
        let fed_acc = series(rounds, |r| r.federated_accuracy.map(|a| a * 100.0));
        panel(
            &panels[0],
            "accuracy",
            "%",
            last,
            100.0,
            &[("central", CENTRAL, &acc), ("federated", FEDERATED, &fed_acc)],
        )?;
        let loss = series(rounds, |r| r.test_loss);
        let fed_loss = series(rounds, |r| r.federated_loss);
        let max_loss = loss.iter().chain(&fed_loss).map(|p| p.1).fold(0.0, f64::max);
        panel(
            &panels[1],
            "loss",
            "cross-entropy",
            last,
            (max_loss * 1.1).max(1e-3),
            &[("central", LOSS, &loss), ("federated", FEDERATED, &fed_loss)],
        )?;
        let up = series(rounds, |r| Some(r.bytes_up as f64 / 1e6));
        let down = series(rounds, |r| Some(r.bytes_down as f64 / 1e6));
        let max_bytes = up.iter().chain(&down).map(|p| p.1).fold(0.0, f64::max);
        panel(
            &panels[2],
            "bytes per round",
            "MB",
            last,
            (max_bytes * 1.15).max(1e-3),
            &[("up", CENTRAL, &up), ("down", LOSS, &down)],
        )?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Renders an SVG document to PNG with the system's fonts.
fn svg_to_png(svg: &str) -> Result<Vec<u8>> {
    let mut options = resvg::usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // The SVG asks for "sans-serif": map it to a sans face this system has.
    let family = fonts
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|name| ["DejaVu Sans", "Liberation Sans", "Noto Sans", "FreeSans", "Arial"].contains(&name.as_str()))
        .or_else(|| {
            fonts
                .faces()
                .next()
                .and_then(|f| f.families.first())
                .map(|(name, _)| name.clone())
        });
    if let Some(family) = family {
        fonts.set_sans_serif_family(family);
    }
    let tree = resvg::usvg::Tree::from_str(svg, &options).map_err(plot_err)?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| plot_err("empty picture"))?;
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(plot_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64, acc: f64) -> RoundPoint {
        RoundPoint {
            round,
            test_accuracy: Some(acc),
            test_loss: Some(2.0 - acc),
            federated_accuracy: Some(acc - 0.05),
            federated_loss: Some(2.1 - acc),
            bytes_up: 2_560_000,
            bytes_down: 2_570_000,
            ..RoundPoint::default()
        }
    }

    #[test]
    fn draws_svg_and_png_of_every_round() {
        let dir = tempfile::tempdir().unwrap();
        let rounds: Vec<RoundPoint> = (1..=5).map(|r| record(r, 0.2 * r as f64 - 0.1)).collect();
        let files = write(dir.path(), &rounds).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for label in ["accuracy", "loss", "bytes per round", "central", "federated", "round"] {
            assert!(
                svg.contains(&format!(">{label}<")) || svg.contains(label),
                "{label} missing"
            );
        }
        // A point per round and series: 5 rounds × 6 series.
        assert_eq!(svg.matches("<circle").count(), 30);
        let png = std::fs::read(&files[1]).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let decoded = image_size(&png);
        assert_eq!(decoded, (WIDTH, HEIGHT));
    }

    #[test]
    fn an_empty_run_draws_empty_panels() {
        let svg = render_svg(&[]).unwrap();
        assert!(svg.contains("accuracy") && !svg.contains("<circle"));
    }

    /// Width and height from a PNG's IHDR chunk.
    fn image_size(png: &[u8]) -> (u32, u32) {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&png[16..20]), be(&png[20..24]))
    }
}
