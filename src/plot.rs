//! Loss curves as PNG pictures: a run's `loss.png` beside its `metrics.jsonl`, and `bessie-plot`'s
//! comparison of several runs. Drawn with plotters' bitmap backend and a font that ships with Bessie
//! (assets/fonts), so no system library (fontconfig, freetype) is needed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

use crate::train::metrics::METRICS_FILE;

/// The picture's size in pixels.
pub const SIZE: (u32, u32) = (900, 560);

/// Where a run's picture goes: beside its metrics.
pub const LOSS_PNG: &str = "loss.png";

/// One run's losses against the optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Curves {
    pub name: String,
    pub train: Vec<(f64, f64)>,
    pub dev: Vec<(f64, f64)>,
}

/// The fields of a `metrics.jsonl` line that the picture needs; event lines have no `loss`.
#[derive(Deserialize)]
struct Line {
    step: usize,
    loss: Option<f64>,
    dev_loss: Option<f64>,
    event: Option<String>,
}

/// Reads a `metrics.jsonl` (or the one in a run directory); a line that is not a step or event line is an
/// error naming the file and line.
pub fn read_metrics(path: &Path) -> Result<Curves> {
    let in_dir;
    let path = match path.is_dir() {
        true => {
            in_dir = path.join(METRICS_FILE);
            &in_dir
        }
        false => path,
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curves = Curves { name: run_name(path), train: Vec::new(), dev: Vec::new() };
    for (i, raw) in text.lines().enumerate() {
        let here = || format!("{}:{}", path.display(), i + 1);
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).with_context(|| format!("{}: not a metrics line", here()))?;
        let step = line.step as f64;
        match (line.loss, line.event) {
            (Some(loss), _) => curves.train.push((step, loss)),
            (None, Some(_)) => continue,
            (None, None) => bail!("{}: a step line without \"loss\"", here()),
        }
        curves.dev.extend(line.dev_loss.map(|d| (step, d)));
    }
    Ok(curves)
}

/// A run's name in the legend: the directory holding its metrics, else the file's name.
fn run_name(path: &Path) -> String {
    let dir = path.parent().and_then(Path::file_name).filter(|_| path.file_name().is_some_and(|f| f == METRICS_FILE));
    dir.or(path.file_name()).map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// Draws the runs' train (solid) and dev (dashed) losses against the step into the PNG `out`, written
/// under a temporary name and renamed, so a reader never sees half a picture.
pub fn draw(runs: &[Curves], out: &Path) -> Result<()> {
    register_font()?;
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.dev)).filter(|(_, l)| l.is_finite());
    let max_step = points().map(|p| p.0).fold(1.0, f64::max);
    let max_loss = points().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let tmp = temporary(out)?;
    // The backend creates the file through whatever is there; a leftover (or a planted link) goes first.
    let _ = std::fs::remove_file(&tmp);
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", out.display());
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_step, 0.0..max_loss)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| fail(&e))?;
        for (k, run) in runs.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let color = RGBColor(color.0, color.1, color.2);
            let finite = |v: &Vec<(f64, f64)>| v.iter().copied().filter(|(_, l)| l.is_finite()).collect::<Vec<_>>();
            chart
                .draw_series(LineSeries::new(finite(&run.train), color.stroke_width(2)))
                .map_err(|e| fail(&e))?
                .label(format!("{} train", run.name))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
            if !run.dev.is_empty() {
                // Dashed with a dot at each measurement, darker, so it stands out of the noisy train line.
                let dark = RGBColor(color.0 / 2, color.1 / 2, color.2 / 2);
                chart
                    .draw_series(DashedLineSeries::new(finite(&run.dev), 6, 4, dark.stroke_width(2)))
                    .map_err(|e| fail(&e))?
                    .label(format!("{} dev", run.name))
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, dark.filled()));
                chart
                    .draw_series(finite(&run.dev).into_iter().map(|p| Circle::new(p, 4, dark.filled())))
                    .map_err(|e| fail(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// The temporary file `draw` writes: beside `out`, ending in `.png`, since the backend picks the format
/// from the name.
fn temporary(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().with_context(|| format!("{} is not a file name", out.display()))?;
    Ok(out.with_file_name(format!(".{}.tmp.png", name.to_string_lossy())))
}

/// plotters draws text only with fonts registered first: the one Bessie ships.
fn register_font() -> Result<()> {
    let bytes = include_bytes!("../assets/fonts/DejaVuSans.ttf");
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the font assets/fonts/DejaVuSans.ttf built into this program does not parse"))
}

/// The loss picture of the run in `out_dir`, from its metrics, as training writes it at each checkpoint
/// and at the end.
pub fn plot_run(out_dir: &Path) -> Result<()> {
    let metrics = read_metrics(&out_dir.join(METRICS_FILE))?;
    draw(&[metrics], &out_dir.join(LOSS_PNG))
}
