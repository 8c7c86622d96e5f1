//! The result table (terminal and Markdown), percentiles, and the machine line.

pub(crate) struct Row {
    pub(crate) metric: String,
    pub(crate) value: String,
    pub(crate) unit: String,
    pub(crate) target: String,
    pub(crate) note: String,
}

#[derive(Default)]
pub(crate) struct Table {
    pub(crate) rows: Vec<Row>,
}

impl Table {
    pub(crate) fn add(&mut self, metric: &str, value: String, unit: &str, target: &str, note: String) {
        eprintln!("  -> {metric}: {value} {unit} ({note})");
        self.rows.push(Row {
            metric: metric.into(),
            value,
            unit: unit.into(),
            target: target.into(),
            note,
        });
    }

    pub(crate) fn failed(&mut self, section: &str, e: &anyhow::Error) {
        self.add(&format!("{section}: FAILED"), "-".into(), "", "", format!("{e:#}"));
    }

    pub(crate) fn print(&self) {
        let heads = ["metric", "value", "unit", "target", "note"];
        let cols = |r: &Row| -> [String; 5] {
            [
                r.metric.clone(),
                r.value.clone(),
                r.unit.clone(),
                r.target.clone(),
                r.note.clone(),
            ]
        };
        let mut w = heads.map(|h| h.len());
        for r in &self.rows {
            for (i, c) in cols(r).iter().enumerate().take(4) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |c: [String; 5]| {
            format!(
                "{:<w0$} | {:>w1$} | {:<w2$} | {:<w3$} | {}",
                c[0],
                c[1],
                c[2],
                c[3],
                c[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            )
        };
        println!();
        println!("{}", line(heads.map(String::from)));
        println!("{}", "-".repeat(w.iter().take(4).sum::<usize>() + 12 + 20));
        for r in &self.rows {
            println!("{}", line(cols(r)));
        }
        println!();
    }

    pub(crate) fn markdown(&self) -> String {
        let mut s = String::from("| metric | value | unit | target | note |\n|---|---:|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.metric,
                r.value,
                r.unit,
                r.target,
                r.note.replace('|', "/")
            ));
        }
        s
    }
}

pub(crate) fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p90/p95/p98 of a sorted latency list, for the notes.
pub(crate) fn tail(sorted: &[u64]) -> String {
    format!(
        "p90 {} p95 {} p98 {} ms",
        ms(pct(sorted, 0.90)),
        ms(pct(sorted, 0.95)),
        ms(pct(sorted, 0.98))
    )
}

pub(crate) fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({cpu}), {} GiB RAM, load average {}",
        mem / (1 << 20),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}
