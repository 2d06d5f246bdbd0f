//! What a phase hands back, and how the run becomes BENCHMARKS.md and
//! `results.json`.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use crate::measure::{Summary, fmt_us, round};

/// One row of the results: a latency comparison, scalar figures, or both.
/// A phase that failed keeps its id and title and carries the error.
#[derive(Debug, Default)]
pub struct Row {
    pub id: &'static str,
    pub title: String,
    pub ours: Option<Summary>,
    pub base: Option<Summary>,
    pub figures: Vec<Figure>,
    /// How many instances (or caches, registries) a row without latencies is about.
    pub count: Option<u64>,
    /// Markdown that only this row has (such as the per-batch table).
    pub extra_md: Option<String>,
    pub error: Option<String>,
}

/// A scalar measurement, with the baseline's where there is one.
#[derive(Clone, Debug)]
pub struct Figure {
    pub key: &'static str,
    pub label: String,
    pub value: f64,
    pub unit: &'static str,
    pub baseline: Option<(String, f64)>,
}

impl Row {
    pub fn new(id: &'static str, title: impl Into<String>) -> Self {
        Self {
            id,
            title: title.into(),
            ..Self::default()
        }
    }

    pub fn count(mut self, n: usize) -> Self {
        self.count = Some(n as u64);
        self
    }

    pub fn latency(mut self, ours: Summary, base: Option<Summary>) -> Self {
        self.ours = Some(ours);
        self.base = base;
        self
    }

    pub fn figure(
        mut self,
        key: &'static str,
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        self.figures.push(Figure {
            key,
            label: label.into(),
            value,
            unit,
            baseline: None,
        });
        self
    }

    pub fn figure_vs(
        mut self,
        key: &'static str,
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
        base_label: impl Into<String>,
        base: f64,
    ) -> Self {
        self.figures.push(Figure {
            key,
            label: label.into(),
            value,
            unit,
            baseline: Some((base_label.into(), base)),
        });
        self
    }

    /// Ours ÷ baseline at p50 (above 1: etcd-registry is slower).
    pub fn ratio(&self) -> Option<f64> {
        match (&self.ours, &self.base) {
            (Some(o), Some(b)) if b.p50_us > 0.0 => Some(o.p50_us / b.p50_us),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).map(|f| f.value)
    }

    pub fn json(&self) -> Value {
        let mut o = Map::new();
        o.insert("phase".into(), json!(self.id));
        o.insert("title".into(), json!(self.title));
        if let Some(s) = &self.ours {
            o.insert("n".into(), json!(s.n));
            o.insert("mean_us".into(), json!(round(s.mean_us)));
            o.insert("p50_us".into(), json!(round(s.p50_us)));
            o.insert("p99_us".into(), json!(round(s.p99_us)));
            o.insert("p999_us".into(), json!(round(s.p999_us)));
            o.insert("per_sec".into(), json!(s.per_sec.map(round)));
        } else if let Some(n) = self.count {
            o.insert("n".into(), json!(n));
        }
        o.insert(
            "baseline".into(),
            self.base.as_ref().map_or(Value::Null, Summary::json),
        );
        // Not rounded: a memory answer against a round trip is ~0.0001.
        o.insert("ratio".into(), json!(self.ratio()));
        let figures: Map<String, Value> = self
            .figures
            .iter()
            .map(|f| {
                let v = json!({
                    "label": f.label,
                    "value": round(f.value),
                    "unit": f.unit,
                    "baseline": f.baseline.as_ref().map(|(l, v)| json!({"label": l, "value": round(*v)})),
                    "ratio": f.baseline.as_ref().filter(|(_, b)| *b != 0.0).map(|(_, b)| round(f.value / b)),
                });
                (f.key.to_owned(), v)
            })
            .collect();
        o.insert("figures".into(), Value::Object(figures));
        o.insert("error".into(), json!(self.error));
        Value::Object(o)
    }
}

fn num(v: f64, unit: &str) -> String {
    match unit {
        "s" => format!("{v:.2} s"),
        "ms" => format!("{v:.0} ms"),
        "MB" => format!("{v:.1} MB"),
        "B" => format!("{v:.0} B"),
        "/s" => format!("{v:.0}/s"),
        "" => format!("{v:.0}"),
        "µs" => format!("{v:.0} µs"),
        u => format!("{v:.2} {u}"),
    }
}

fn side(s: &Summary) -> String {
    format!(
        "{} / {} / {} / {}",
        fmt_us(s.mean_us),
        fmt_us(s.p50_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us)
    )
}

fn rate(s: &Summary) -> String {
    s.per_sec.map_or("–".into(), |r| format!("{r:.0}/s"))
}

/// A ratio; small ones as a fraction, so that a memory answer against a
/// round trip does not read as 0.00×.
pub fn times(x: f64) -> String {
    if x > 0.0 && x < 0.1 {
        format!("1/{:.0}×", 1.0 / x)
    } else {
        format!("{x:.2}×")
    }
}

/// The latency table: one line per row with a latency comparison.
pub fn latency_table(rows: &[Row]) -> String {
    let mut md = String::from(
        "| phase | n | etcd-registry mean / p50 / p99 / p99.9 | rate | baseline: mean / p50 / p99 / p99.9 | rate | ours ÷ baseline (p50) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(md, "| {} | – | **failed**: {} | | | | |", r.title, cell(e));
            continue;
        }
        let Some(o) = &r.ours else { continue };
        let (b, brate) = match &r.base {
            Some(b) => (format!("{}: {}", b.label, side(b)), rate(b)),
            None => ("–".into(), "–".into()),
        };
        let ratio = r.ratio().map_or("–".into(), times);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {b} | {brate} | {ratio} |",
            r.title,
            o.n,
            side(o),
            rate(o)
        );
    }
    md
}

/// The table of scalar figures: one line per figure.
pub fn figure_table(rows: &[Row]) -> String {
    let mut md = String::from(
        "| phase | figure | etcd-registry | baseline | ours ÷ baseline |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        if r.ours.is_some() && r.figures.is_empty() {
            continue;
        }
        if let Some(e) = &r.error {
            if r.ours.is_none() {
                let _ = writeln!(md, "| {} | – | **failed**: {} | | |", r.title, cell(e));
            }
            continue;
        }
        for f in &r.figures {
            let (b, ratio) = match &f.baseline {
                Some((l, v)) => (
                    format!("{l}: {}", num(*v, f.unit)),
                    if *v != 0.0 {
                        times(f.value / v)
                    } else {
                        "–".into()
                    },
                ),
                None => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {b} | {ratio} |",
                r.title,
                f.label,
                num(f.value, f.unit)
            );
        }
    }
    md
}

/// Keeps an error message inside one table cell.
pub fn cell(s: &str) -> String {
    let one_line = s.replace(['\n', '|'], " ");
    if one_line.chars().count() > 300 {
        format!("{}…", one_line.chars().take(300).collect::<String>())
    } else {
        one_line
    }
}
