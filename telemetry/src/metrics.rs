//! A small metrics registry: counters and gauges with fixed label sets, rendered in the
//! Prometheus text exposition format.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

struct Series {
    labels: String,
    value: Arc<AtomicU64>,
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    series: Vec<Series>,
}

/// Metric families in registration order.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

/// A monotonically increasing count (an integer).
#[derive(Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Publishes a total counted elsewhere; never moves backwards.
    pub fn set_total(&self, total: u64) {
        self.0.fetch_max(total, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            assert!(valid_name(k), "invalid label name {k:?}");
            format!("{k}=\"{}\"", escape(v))
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn format_value(kind: Kind, bits: u64) -> String {
    match kind {
        Kind::Counter => bits.to_string(),
        Kind::Gauge => {
            let v = f64::from_bits(bits);
            if v.is_nan() {
                "NaN".into()
            } else if v.is_infinite() {
                if v > 0.0 { "+Inf" } else { "-Inf" }.into()
            } else if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{}", v as i64)
            } else {
                format!("{v}")
            }
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
    ) -> Arc<AtomicU64> {
        assert!(valid_name(name), "invalid metric name {name:?}");
        let labels = label_text(labels);
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = match families.iter().position(|f| f.name == name) {
            Some(i) => {
                assert_eq!(families[i].kind, kind, "{name} registered as two kinds");
                &mut families[i]
            }
            None => {
                families.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    series: Vec::new(),
                });
                families.last_mut().expect("just pushed")
            }
        };
        if let Some(s) = family.series.iter().find(|s| s.labels == labels) {
            return Arc::clone(&s.value);
        }
        let value = Arc::new(AtomicU64::new(match kind {
            Kind::Counter => 0,
            Kind::Gauge => 0f64.to_bits(),
        }));
        family.series.push(Series {
            labels,
            value: Arc::clone(&value),
        });
        value
    }

    /// A counter (the name should end in `_total`); the same name and labels give the same
    /// counter.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        Counter(self.register(name, help, Kind::Counter, labels))
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        Gauge(self.register(name, help, Kind::Gauge, labels))
    }

    /// Everything, in the text exposition format, with the process metrics first.
    pub fn render(&self) -> String {
        let mut out = crate::process::render();
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        for f in families.iter() {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let help = f.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {} {help}", f.name);
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for s in &f.series {
                let _ = writeln!(
                    out,
                    "{}{} {}",
                    f.name,
                    s.labels,
                    format_value(f.kind, s.value.load(Ordering::Relaxed))
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_with_escaped_labels() {
        let r = Registry::new();
        let c = r.counter("phi_things_total", "Things seen.", &[("kind", "open")]);
        c.add(3);
        r.counter("phi_things_total", "Things seen.", &[("kind", "open")])
            .inc();
        r.counter(
            "phi_things_total",
            "Things seen.",
            &[("kind", "a\"b\\c\nd")],
        );
        let g = r.gauge("phi_level", "A level.", &[]);
        g.set(2.5);
        let text = r.render();
        assert!(
            text.contains(
                "# HELP phi_things_total Things seen.\n# TYPE phi_things_total counter\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("phi_things_total{kind=\"open\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("phi_things_total{kind=\"a\\\"b\\\\c\\nd\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE phi_level gauge\nphi_level 2.5\n"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        g.set(7.0);
        assert!(r.render().contains("phi_level 7\n"));
    }

    #[test]
    fn a_published_total_never_goes_back() {
        let r = Registry::new();
        let c = r.counter("phi_x_total", "x", &[]);
        c.set_total(10);
        c.set_total(4);
        assert_eq!(c.get(), 10);
    }

    #[test]
    #[should_panic(expected = "invalid metric name")]
    fn bad_names_are_refused() {
        Registry::new().gauge("9lives", "x", &[]);
    }
}
