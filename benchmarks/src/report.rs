//! Figures, the markdown table, the JSON file and the plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

/// The frameworks, in column order.
pub const FRAMEWORKS: [&str; 4] = [
    "this framework",
    "cqrs-es + postgres-es",
    "esrs",
    "raw sqlx",
];

/// Median and range of some runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Figure {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Figure {
    /// From samples (at least one).
    #[must_use]
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self {
            median: samples[samples.len() / 2],
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }
}

/// The `p`-th percentile (0-1) of `values`, 0 when empty.
#[must_use]
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One framework's result for one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The workload's key (`W1`, ...).
    pub workload: String,
    /// The framework's column title.
    pub framework: String,
    /// What the figure counts: `cmd/s`, `events/s`, `rows/s` or `ms`.
    pub unit: String,
    /// Median and range over the runs.
    pub figure: Figure,
    /// Command latency p50, ms (throughput workloads of commands).
    pub p50_ms: Option<f64>,
    /// Command latency p99, ms.
    pub p99_ms: Option<f64>,
    /// What to know about this figure.
    pub note: Option<String>,
}

impl Cell {
    /// Higher is better: the rate, or loads per second for a time in ms.
    fn rate(&self) -> f64 {
        if self.unit == "ms" {
            1e3 / self.figure.median
        } else {
            self.figure.median
        }
    }

    fn text(&self) -> String {
        let f = &self.figure;
        if self.unit == "ms" {
            format!("{:.1} ms ({:.1}-{:.1})", f.median, f.min, f.max)
        } else {
            format!("{:.0} {} ({:.0}-{:.0})", f.median, self.unit, f.min, f.max)
        }
    }
}

/// Everything a run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// When, what machine, which sizes.
    pub context: BTreeMap<String, String>,
    /// Workload key -> its description, in order.
    pub workloads: Vec<(String, String)>,
    /// The results.
    pub cells: Vec<Cell>,
    /// W1 command latency p50 (ms) per stream length bucket, per framework.
    pub w1_latency: BTreeMap<String, Vec<(u64, f64)>>,
    /// The macros' compile-time cost, if measured.
    pub compile: Option<CompileCost>,
}

/// Build times of the generated crates, seconds.
#[derive(Debug, Clone, Serialize)]
pub struct CompileCost {
    /// Aggregates in each crate (5 commands and 5 events each).
    pub aggregates: usize,
    /// Clean build with the derives.
    pub clean_derive: Figure,
    /// Clean build by hand.
    pub clean_hand: Figure,
    /// Incremental rebuild with the derives.
    pub incremental_derive: Figure,
    /// Incremental rebuild by hand.
    pub incremental_hand: Figure,
}

impl Report {
    /// Declares workload `key` with its description (the table's row order).
    pub fn workload(&mut self, key: &str, description: impl Into<String>) {
        if !self.workloads.iter().any(|(k, _)| k == key) {
            self.workloads.push((key.to_owned(), description.into()));
        }
    }

    fn cell(&self, workload: &str, framework: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.workload == workload && c.framework == framework)
    }

    /// The markdown: results, latencies, ratios.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let context: Vec<String> = self
            .context
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(md, "{}\n", context.join("; "));
        let _ = writeln!(md, "| workload | {} |", FRAMEWORKS.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(FRAMEWORKS.len()));
        for (key, description) in &self.workloads {
            let cells: Vec<String> = FRAMEWORKS
                .iter()
                .map(|f| self.cell(key, f).map_or("n/a".to_owned(), Cell::text))
                .collect();
            let _ = writeln!(md, "| {key} {description} | {} |", cells.join(" | "));
        }
        let _ = writeln!(md, "\nCommand latency, p50 / p99 (ms):\n");
        let _ = writeln!(md, "| workload | {} |", FRAMEWORKS.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(FRAMEWORKS.len()));
        for (key, _) in &self.workloads {
            if !self
                .cells
                .iter()
                .any(|c| &c.workload == key && c.p50_ms.is_some())
            {
                continue;
            }
            let cells: Vec<String> = FRAMEWORKS
                .iter()
                .map(|f| match self.cell(key, f) {
                    Some(Cell {
                        p50_ms: Some(p50),
                        p99_ms: Some(p99),
                        ..
                    }) => format!("{p50:.2} / {p99:.2}"),
                    _ => "n/a".to_owned(),
                })
                .collect();
            let _ = writeln!(md, "| {key} | {} |", cells.join(" | "));
        }
        let _ = writeln!(
            md,
            "\nThis framework relative to raw sqlx and to the best peer (throughput, or loads per second for W4; above 1: faster):\n"
        );
        let _ = writeln!(md, "| workload | / raw sqlx | / best peer | best peer |");
        let _ = writeln!(md, "|---|---:|---:|---|");
        for (key, _) in &self.workloads {
            let Some(ours) = self.cell(key, FRAMEWORKS[0]) else {
                continue;
            };
            let raw = self.cell(key, FRAMEWORKS[3]).map_or("n/a".to_owned(), |r| {
                format!("{:.2}", ours.rate() / r.rate())
            });
            let best = FRAMEWORKS[1..3]
                .iter()
                .filter_map(|f| self.cell(key, f))
                .max_by(|a, b| a.rate().total_cmp(&b.rate()));
            let (ratio, name) = best.map_or(("n/a".to_owned(), "-".to_owned()), |b| {
                (
                    format!("{:.2}", ours.rate() / b.rate()),
                    b.framework.clone(),
                )
            });
            let _ = writeln!(md, "| {key} | {raw} | {ratio} | {name} |");
        }
        if let (Some(w5), Some(l3), Some(l3f)) = (
            self.cell("W5", FRAMEWORKS[0]),
            self.cell("L3", FRAMEWORKS[3]),
            self.cell("L3f", FRAMEWORKS[3]),
        ) {
            let _ = writeln!(
                md,
                "\nW5 against raw COPY of the same rows into this framework's own table (L3f): {:.2}. That table \
                 against the minimal one (L3 / raw W5's): {:.2}: the rest of W5's gap to raw COPY is the table's.",
                w5.rate() / l3f.rate(),
                l3f.rate() / l3.rate()
            );
        }
        if let (Some(grouped), Some(l4)) = (
            self.cell("W2g", FRAMEWORKS[0]),
            self.cell("L4", FRAMEWORKS[3]),
        ) {
            let _ = writeln!(
                md,
                "\nW2g (group commit) against raw single-row inserts on 8 connections (L4): {:.2}{}.",
                grouped.rate() / l4.rate(),
                self.cell("W2", FRAMEWORKS[0])
                    .map_or(String::new(), |w2| format!(
                        "; against W2 without group commit: {:.2}",
                        grouped.rate() / w2.rate()
                    ))
            );
        }
        if let Some(c) = &self.compile {
            let _ = writeln!(
                md,
                "\nMacro compile cost: a crate of {} aggregates (5 commands and 5 events each), derives against the same code by hand (debug builds, dependencies built before):\n",
                c.aggregates
            );
            let _ = writeln!(md, "| build | derives | by hand | ratio (target <= 1.3) |");
            let _ = writeln!(md, "|---|---:|---:|---:|");
            for (name, d, h) in [
                ("clean build of the crate", &c.clean_derive, &c.clean_hand),
                (
                    "incremental rebuild (one aggregate changed)",
                    &c.incremental_derive,
                    &c.incremental_hand,
                ),
            ] {
                let _ = writeln!(
                    md,
                    "| {name} | {:.2} s ({:.2}-{:.2}) | {:.2} s ({:.2}-{:.2}) | {:.2} |",
                    d.median,
                    d.min,
                    d.max,
                    h.median,
                    h.min,
                    h.max,
                    d.median / h.median
                );
            }
        }
        let notes: Vec<String> = self
            .cells
            .iter()
            .filter_map(|c| {
                c.note
                    .as_ref()
                    .map(|n| format!("- {} {}: {n}", c.workload, c.framework))
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(md, "\n{}", notes.join("\n"));
        }
        md
    }

    /// Writes `benchmark.md`, `benchmark.json`, `throughput.svg` and `w1-latency.svg` into `dir`.
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("benchmark.md"), self.markdown())?;
        std::fs::write(
            dir.join("benchmark.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        self.throughput_plot(&dir.join("throughput.svg"))?;
        self.latency_plot(&dir.join("w1-latency.svg"))?;
        Ok(())
    }

    /// Bars per workload and framework, relative to raw sqlx (1.0).
    fn throughput_plot(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let rows: Vec<(&str, Vec<Option<f64>>)> = self
            .workloads
            .iter()
            .filter_map(|(key, _)| {
                // Rows with this framework and raw sqlx (the limits alone would be bars of 1).
                self.cell(key, FRAMEWORKS[0])?;
                let raw = self.cell(key, FRAMEWORKS[3])?.rate();
                let values = FRAMEWORKS
                    .iter()
                    .map(|f| self.cell(key, f).map(|c| c.rate() / raw))
                    .collect();
                Some((key.as_str(), values))
            })
            .collect();
        let top = rows
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .fold(1.0_f64, f64::max)
            * 1.1;
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let groups = rows.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Throughput relative to raw sqlx (1.0 = raw)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0..(groups * 5) as u32, 0.0..top)?;
        let labels: Vec<&str> = rows.iter().map(|(k, _)| *k).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups * 5 + 1)
            .x_label_formatter(&|x| {
                let slot = *x as usize;
                if slot % 5 == 2 {
                    labels
                        .get(slot / 5)
                        .map_or(String::new(), |l| (*l).to_owned())
                } else {
                    String::new()
                }
            })
            .y_desc("x raw sqlx")
            .draw()?;
        for (j, name) in FRAMEWORKS.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            let bars: Vec<Rectangle<(u32, f64)>> = rows
                .iter()
                .enumerate()
                .filter_map(|(i, (_, values))| {
                    let v = values[j]?;
                    let x = (i * 5 + j) as u32;
                    Some(Rectangle::new([(x, 0.0), (x + 1, v)], color.filled()))
                })
                .collect();
            chart.draw_series(bars)?.label(*name).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
            });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }

    /// W1 latency (p50 per bucket of commands) against the stream's length.
    fn latency_plot(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let longest = self
            .w1_latency
            .values()
            .flat_map(|v| v.iter().map(|(x, _)| *x))
            .max()
            .unwrap_or(1);
        let top = self
            .w1_latency
            .values()
            .flat_map(|v| v.iter().map(|(_, y)| *y))
            .fold(0.1_f64, f64::max)
            * 1.1;
        let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "W1: command latency (p50) against stream length",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0..longest, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("events in the stream")
            .y_desc("ms")
            .draw()?;
        for (j, name) in FRAMEWORKS.iter().enumerate() {
            let Some(points) = self.w1_latency.get(*name) else {
                continue;
            };
            let color = Palette99::pick(j).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// The p50 of each bucket of `bucket` consecutive latencies, at the stream length it ends at.
#[must_use]
pub fn buckets(latencies: &[f64], bucket: usize) -> Vec<(u64, f64)> {
    latencies
        .chunks(bucket.max(1))
        .enumerate()
        .map(|(i, chunk)| {
            (
                (i * bucket.max(1) + chunk.len()) as u64,
                percentile(chunk, 0.5),
            )
        })
        .collect()
}
