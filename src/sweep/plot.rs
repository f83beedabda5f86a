//! The sweep plot: R² against L0 (log axis), one line per (hookpoint, arch), frontier
//! points joined, every point drawn. SVG through plotters.

use std::path::Path;

use plotters::prelude::*;

use super::pareto;
use super::results::MetricsRow;
use crate::fsutil;

/// Errors drawing the plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: nothing to plot: no finite (L0 > 0, R²) point")]
    Empty { path: String },
    #[error("{path}: drawing failed: {msg}")]
    Draw { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Draw `rows` to an SVG file at `path` (written atomically).
pub fn plot_pareto(path: &Path, rows: &[MetricsRow], title: &str) -> Result<(), PlotError> {
    let p = path.display().to_string();
    let pts: Vec<&MetricsRow> = rows
        .iter()
        .filter(|r| r.l0 > 0.0 && r.l0.is_finite() && r.r2.is_finite())
        .collect();
    if pts.is_empty() {
        return Err(PlotError::Empty { path: p });
    }
    let (mut x0, mut x1) = (f64::INFINITY, 0.0f64);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for r in &pts {
        x0 = x0.min(r.l0);
        x1 = x1.max(r.l0);
        y0 = y0.min(r.r2);
        y1 = y1.max(r.r2);
    }
    let (x0, x1) = (x0 / 1.3, x1 * 1.3);
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let (y0, y1) = ((y0 - pad).max(-1.0), (y1 + pad).min(1.05));

    let mut groups: Vec<(String, String)> = pts
        .iter()
        .map(|r| (r.hookpoint.clone(), r.series()))
        .collect();
    groups.sort();
    groups.dedup();

    let mut svg = String::new();
    {
        let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
            path: p.clone(),
            msg: e.to_string(),
        };
        let root = SVGBackend::with_string(&mut svg, (960, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("L0 (active latents per token, log scale)")
            .y_desc("R² (pooled, held-out)")
            .draw()
            .map_err(|e| draw_err(&e))?;
        for (gi, (hp, arch)) in groups.iter().enumerate() {
            let color = Palette99::pick(gi).to_rgba();
            let mine: Vec<(f64, f64)> = pts
                .iter()
                .filter(|r| &r.hookpoint == hp && &r.series() == arch)
                .map(|r| (r.l0, r.r2))
                .collect();
            let front: Vec<(f64, f64)> = pareto::frontier((pareto::L0, pareto::R2), &mine)
                .into_iter()
                .map(|i| mine[i])
                .collect();
            chart
                .draw_series(LineSeries::new(front, color.stroke_width(2)))
                .map_err(|e| draw_err(&e))?
                .label(format!("{arch} @ {hp}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    mine.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(|e| draw_err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
    }
    fsutil::atomic_write(path, svg.as_bytes()).map_err(|source| PlotError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::results::example_row;

    #[test]
    fn draws_every_group_with_a_legend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pareto.svg");
        let rows = vec![
            example_row("topk", 8.0, 0.5),
            example_row("topk", 32.0, 0.8),
            example_row("gated", 16.0, 0.6),
        ];
        plot_pareto(&path, &rows, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("topk @ blocks.1.hook_mlp_out"));
        assert!(svg.contains("gated @ blocks.1.hook_mlp_out"));
        assert!(plot_pareto(&path, &[], "x").is_err());
    }
}
