//! The results: per-round samples, medians, ratios (entrepot ÷ peer), the targets of the issues
//! and whether each is met, as a Markdown table for the terminal and for BENCHMARKS.md.

use std::fmt::Write as _;

/// One value per round.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn median(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        Some(if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        })
    }
}

/// How a value is printed.
#[derive(Clone, Copy, Debug)]
pub enum Unit {
    Seconds,
    Millis,
    /// Milliseconds to a tenth, for latencies of a few milliseconds.
    MillisTenths,
    /// CPU seconds a process used per GiB it served.
    CpuPerGib,
    MibPerSec,
    PerSec,
    /// A plain ratio such as upstream bytes ÷ blob size.
    Times,
    Mib,
    Count,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Seconds => format!("{v:.3} s"),
            Unit::Millis => format!("{v:.0} ms"),
            Unit::MillisTenths => format!("{v:.1} ms"),
            Unit::CpuPerGib => format!("{v:.2} CPU-s/GiB"),
            Unit::MibPerSec => format!("{v:.0} MiB/s"),
            Unit::PerSec => format!("{}/s", thousands(v)),
            Unit::Times => format!("{v:.3}×"),
            Unit::Mib => format!("{v:.1} MiB"),
            Unit::Count => thousands(v),
        }
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Which number a target is about.
#[derive(Clone, Copy, Debug)]
pub enum Subject {
    /// entrepot's own median.
    Value,
    /// entrepot's median ÷ the reference's (nginx, or the upstream pulled directly).
    RatioToReference,
    /// entrepot's median ÷ distribution's.
    RatioToDistribution,
    /// entrepot's median − the reference's, in the row's unit (a latency added to a direct
    /// one).
    DifferenceToReference,
}

#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

#[derive(Clone, Debug)]
pub struct Target {
    pub text: String,
    pub subject: Subject,
    pub goal: Goal,
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub unit: Unit,
    pub entrepot: Samples,
    pub distribution: Option<Samples>,
    /// The reference peer's name ("nginx", "direct") and samples.
    pub reference: Option<(String, Samples)>,
    pub target: Option<Target>,
    /// Anything that makes a sample doubtful (wrk errors, a warm pull that went upstream).
    pub warnings: Vec<String>,
}

impl Row {
    pub fn new(scenario: &str, measure: &str, unit: Unit) -> Self {
        Self {
            scenario: scenario.to_owned(),
            measure: measure.to_owned(),
            unit,
            entrepot: Samples::default(),
            distribution: None,
            reference: None,
            target: None,
            warnings: Vec::new(),
        }
    }

    pub fn with_distribution(mut self) -> Self {
        self.distribution = Some(Samples::default());
        self
    }

    pub fn with_reference(mut self, name: &str) -> Self {
        self.reference = Some((name.to_owned(), Samples::default()));
        self
    }

    pub fn target(mut self, text: &str, subject: Subject, goal: Goal) -> Self {
        self.target = Some(Target {
            text: text.to_owned(),
            subject,
            goal,
        });
        self
    }

    pub fn distribution_mut(&mut self) -> &mut Samples {
        self.distribution.get_or_insert_with(Samples::default)
    }

    pub fn reference_mut(&mut self) -> &mut Samples {
        &mut self
            .reference
            .get_or_insert_with(|| ("reference".to_owned(), Samples::default()))
            .1
    }

    fn ratio_to_reference(&self) -> Option<f64> {
        ratio(
            self.entrepot.median()?,
            self.reference.as_ref()?.1.median()?,
        )
    }

    fn ratio_to_distribution(&self) -> Option<f64> {
        ratio(
            self.entrepot.median()?,
            self.distribution.as_ref()?.median()?,
        )
    }

    /// The targeted number and whether it meets the goal; None when it was not measured.
    pub fn verdict(&self) -> Option<(f64, bool)> {
        let t = self.target.as_ref()?;
        let v = match t.subject {
            Subject::Value => self.entrepot.median()?,
            Subject::RatioToReference => self.ratio_to_reference()?,
            Subject::RatioToDistribution => self.ratio_to_distribution()?,
            Subject::DifferenceToReference => {
                self.entrepot.median()? - self.reference.as_ref()?.1.median()?
            }
        };
        let met = match t.goal {
            Goal::AtMost(limit) => v <= limit,
            Goal::AtLeast(limit) => v >= limit,
        };
        Some((v, met))
    }

    fn measured(&self) -> bool {
        !self.entrepot.0.is_empty()
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then_some(a / b)
}

fn cell(samples: Option<&Samples>, unit: Unit) -> String {
    samples
        .and_then(Samples::median)
        .map_or_else(|| "—".to_owned(), |m| unit.format(m))
}

/// The results table: medians, ratios, target and verdict, one line per measured row;
/// `distribution` heads distribution's column.
pub fn table(rows: &[Row], distribution: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "| scenario | measure | entrepot | {distribution} | reference | \
         entrepot ÷ reference | entrepot ÷ distribution | target | met |\n\
         |---|---|---:|---:|---:|---:|---:|---|---|\n",
    );
    for row in rows.iter().filter(|r| r.measured()) {
        let reference = row.reference.as_ref().map_or_else(
            || "—".to_owned(),
            |(name, s)| format!("{} ({name})", cell(Some(s), row.unit)),
        );
        let r = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"));
        let (target, met) = match (&row.target, row.verdict()) {
            (Some(t), Some((_, met))) => (t.text.clone(), if met { "yes" } else { "**no**" }),
            (Some(t), None) => (t.text.clone(), "—"),
            (None, _) => ("—".to_owned(), ""),
        };
        let warn = if row.warnings.is_empty() { "" } else { " ⚠" };
        let _ = writeln!(
            out,
            "| {}{warn} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.measure,
            cell(Some(&row.entrepot), row.unit),
            cell(row.distribution.as_ref(), row.unit),
            reference,
            r(row.ratio_to_reference()),
            r(row.ratio_to_distribution()),
            target,
            met,
        );
    }
    out
}

/// One line per target: the number, the goal, met or missed and by how much.
pub fn verdicts(rows: &[Row]) -> String {
    let mut out = String::new();
    for row in rows.iter().filter(|r| r.measured()) {
        let Some(t) = &row.target else { continue };
        let subject = match t.subject {
            Subject::Value => "entrepot".to_owned(),
            Subject::RatioToReference => format!(
                "entrepot ÷ {}",
                row.reference.as_ref().map_or("reference", |(n, _)| n)
            ),
            Subject::RatioToDistribution => "entrepot ÷ distribution".to_owned(),
            Subject::DifferenceToReference => format!(
                "entrepot − {}",
                row.reference.as_ref().map_or("reference", |(n, _)| n)
            ),
        };
        let line = match row.verdict() {
            Some((v, true)) => format!("MET     {subject} = {}", show(row, t, v)),
            Some((v, false)) => format!("MISSED  {subject} = {}", show(row, t, v)),
            None => "n/a     not measured".to_owned(),
        };
        let _ = writeln!(
            out,
            "- {} — {}: target {}: {line}{}",
            row.scenario,
            row.measure,
            t.text,
            distribution_context(row, t)
        );
        for w in &row.warnings {
            let _ = writeln!(out, "  - ⚠ {w}");
        }
    }
    out
}

/// distribution's number on the same scale, for context: "(distribution: 2.000×)".
fn distribution_context(row: &Row, t: &Target) -> String {
    let Some(d) = row.distribution.as_ref().and_then(Samples::median) else {
        return String::new();
    };
    match t.subject {
        Subject::Value => format!(" (distribution: {})", row.unit.format(d)),
        Subject::RatioToReference => row
            .reference
            .as_ref()
            .and_then(|(name, s)| Some((name, ratio(d, s.median()?)?)))
            .map_or_else(String::new, |(name, r)| {
                format!(" (distribution ÷ {name} = {r:.2})")
            }),
        Subject::DifferenceToReference => row
            .reference
            .as_ref()
            .and_then(|(name, s)| Some((name, d - s.median()?)))
            .map_or_else(String::new, |(name, diff)| {
                format!(" (distribution − {name} = {})", signed(row.unit, diff))
            }),
        Subject::RatioToDistribution => String::new(),
    }
}

/// `v` in `unit` with its sign: "+3.2 ms", "-0.4 ms".
fn signed(unit: Unit, v: f64) -> String {
    let text = unit.format(v);
    if v >= 0.0 {
        format!("+{text}")
    } else {
        text
    }
}

fn show(row: &Row, t: &Target, v: f64) -> String {
    match t.subject {
        Subject::Value => row.unit.format(v),
        Subject::DifferenceToReference => signed(row.unit, v),
        _ => format!("{v:.2}"),
    }
}

/// Every round's value, for judging the noise behind a median.
pub fn rounds(rows: &[Row]) -> String {
    let mut out = String::new();
    for row in rows.iter().filter(|r| r.measured()) {
        let list = |s: &Samples| {
            s.0.iter()
                .map(|&v| row.unit.format(v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut line = format!(
            "- {} — {}: entrepot [{}]",
            row.scenario,
            row.measure,
            list(&row.entrepot)
        );
        if let Some(d) = &row.distribution {
            let _ = write!(line, "; distribution [{}]", list(d));
        }
        if let Some((name, s)) = &row.reference {
            let _ = write!(line, "; {name} [{}]", list(s));
        }
        let _ = writeln!(out, "{line}");
    }
    out
}
