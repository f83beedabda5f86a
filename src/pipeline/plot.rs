//! The sweep plot: R² against L0 (log axis), one panel per hookpoint, one colour per series
//! (arch, plus the optimiser when it is not Adam) shared by every panel, frontier points
//! joined, every point drawn. The legend sits in its own column to the right, so it never
//! hides a line. SVG through plotters.

use std::path::Path;

use plotters::prelude::*;

use super::results::MetricsRow;
use crate::eval::pareto;
use crate::util::fs as fsutil;

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

/// Panel size (pixels) and the width of the legend column.
const PANEL: (u32, u32) = (420, 400);
const LEGEND_W: u32 = 220;
/// Panels per row.
const MAX_COLS: usize = 3;

/// Draw `rows` to an SVG file at `path` (written atomically).
pub fn plot_pareto(path: &Path, rows: &[MetricsRow], title: &str) -> Result<(), PlotError> {
    let p = path.display().to_string();
    let pts: Vec<&MetricsRow> = rows
        .iter()
        .filter(|r| r.l0 > 0.0 && r.l0.is_finite() && r.r2.is_some_and(f64::is_finite))
        .collect();
    if pts.is_empty() {
        return Err(PlotError::Empty { path: p });
    }
    // Shared axes, so panels compare at a glance.
    let (mut x0, mut x1) = (f64::INFINITY, 0.0f64);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for r in &pts {
        x0 = x0.min(r.l0);
        x1 = x1.max(r.l0);
        let r2 = r.r2.unwrap_or(f64::NAN);
        y0 = y0.min(r2);
        y1 = y1.max(r2);
    }
    let (x0, x1) = (x0 / 1.3, x1 * 1.3);
    let pad = ((y1 - y0) * 0.08).max(0.01);
    let (y0, y1) = ((y0 - pad).max(-1.0), (y1 + pad).min(1.05));

    let sorted_unique = |mut v: Vec<String>| {
        v.sort();
        v.dedup();
        v
    };
    let hookpoints = sorted_unique(pts.iter().map(|r| r.hookpoint.clone()).collect());
    let series = sorted_unique(pts.iter().map(|r| r.series()).collect());
    let color = |s: &str| {
        let i = series.iter().position(|x| x == s).unwrap_or(0);
        Palette99::pick(i).to_rgba()
    };
    let cols = hookpoints.len().clamp(1, MAX_COLS);
    let n_rows = hookpoints.len().div_ceil(cols);
    let size = (
        PANEL.0 * cols as u32 + LEGEND_W,
        PANEL.1 * n_rows as u32 + 40,
    );

    let mut svg = String::new();
    {
        let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
            path: p.clone(),
            msg: e.to_string(),
        };
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let root = root
            .titled(title, ("sans-serif", 22))
            .map_err(|e| draw_err(&e))?;
        let (plots, legend) = root.split_horizontally(PANEL.0 * cols as u32);
        for (area, hp) in plots.split_evenly((n_rows, cols)).iter().zip(&hookpoints) {
            let mut chart = ChartBuilder::on(area)
                .caption(hp, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(52)
                .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                .map_err(|e| draw_err(&e))?;
            chart
                .configure_mesh()
                .x_labels(6)
                .x_label_formatter(&|v: &f64| {
                    if *v < 1.0 {
                        format!("{v:.2}")
                    } else {
                        format!("{v:.0}")
                    }
                })
                .light_line_style(RGBColor(238, 238, 238))
                .x_desc("L0 (active latents per token, log)")
                .y_desc("R² (pooled, held-out)")
                .draw()
                .map_err(|e| draw_err(&e))?;
            for s in &series {
                let c = color(s);
                let mine: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|r| &r.hookpoint == hp && &r.series() == s)
                    .map(|r| (r.l0, r.r2.unwrap_or(f64::NAN)))
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let front: Vec<(f64, f64)> = pareto::frontier((pareto::L0, pareto::R2), &mine)
                    .into_iter()
                    .map(|i| mine[i])
                    .collect();
                chart
                    .draw_series(LineSeries::new(front, c.stroke_width(2)))
                    .map_err(|e| draw_err(&e))?;
                chart
                    .draw_series(
                        mine.iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, c.filled())),
                    )
                    .map_err(|e| draw_err(&e))?;
            }
        }
        // The legend column: one entry per series, in the panels' colours.
        let style = ("sans-serif", 15).into_font();
        legend
            .draw(&Text::new(
                "series (frontier joined)",
                (8, 40),
                style.clone(),
            ))
            .map_err(|e| draw_err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let y = 66 + 22 * i as i32;
            let c = color(s);
            legend
                .draw(&PathElement::new(vec![(8, y), (34, y)], c.stroke_width(3)))
                .map_err(|e| draw_err(&e))?;
            legend
                .draw(&Circle::new((21, y), 3, c.filled()))
                .map_err(|e| draw_err(&e))?;
            legend
                .draw(&Text::new(s.as_str(), (42, y - 8), style.clone()))
                .map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    fsutil::atomic_write(path, svg.as_bytes()).map_err(|source| PlotError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::results::example_row;

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
        // One panel titled by the hookpoint, one legend entry per series.
        assert_eq!(svg.matches("blocks.1.hook_mlp_out").count(), 1, "{svg}");
        let text = |t: &str| format!(">\n{t}\n</text>");
        assert!(
            svg.contains(&text("topk")) && svg.contains(&text("gated")),
            "{svg}"
        );
        assert!(plot_pareto(&path, &[], "x").is_err());
        // A second hookpoint gets its own panel; the legend still lists each series once.
        let mut other = example_row("topk", 16.0, 0.7);
        other.hookpoint = "blocks.2.hook_attn_out".into();
        let mut rows = rows;
        rows.push(other);
        plot_pareto(&path, &rows, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("blocks.2.hook_attn_out").count(), 1);
        assert_eq!(svg.matches(&text("topk")).count(), 1);
    }
}
