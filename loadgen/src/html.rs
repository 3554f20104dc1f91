//! Self-contained HTML pages for the reports (`report.html`, the capacity report):
//! one file, no script, no network; a verdict banner, tables and inline SVG charts.
//! Every value is escaped here, so callers pass plain text.

use std::fmt::Write as _;

/// A run's verdict, as the banner shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every target met, nothing violated.
    Pass,
    /// A target missed or the contract violated.
    Fail,
    /// The figures say nothing about the server (the generator was the limit, devices failed…).
    Invalid,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Invalid => "INVALID",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Invalid => "invalid",
        }
    }
}

/// One table cell; numbers are right-aligned, integers printed as integers.
#[derive(Debug, Clone)]
pub enum Cell {
    /// Plain text.
    Text(String),
    /// A count, printed with thousands separators.
    Int(u64),
    /// A measurement with this many decimals.
    Num(f64, usize),
    /// A pass/miss mark.
    Mark(bool),
}

impl Cell {
    /// A text cell.
    pub fn text(text: impl Into<String>) -> Self {
        Self::Text(text.into())
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A figure as a person reads it: integral values as integers, others with `decimals`.
pub fn figure(v: f64, decimals: usize) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        if v < 0.0 {
            format!("-{}", thousands(v.abs() as u64))
        } else {
            thousands(v as u64)
        }
    } else {
        format!("{v:.decimals$}")
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1000px;margin:1.5em auto;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}\
.banner{padding:.8em 1em;border-radius:6px;font-size:1.1em;margin:1em 0}\
.banner.pass{background:#e3f6e6;border:1px solid #3a9d4f}\
.banner.fail{background:#fde7e7;border:1px solid #c23b3b}\
.banner.invalid{background:#fff4d6;border:1px solid #c99a1e}\
.banner b{font-size:1.2em;margin-right:.6em}\
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em}\
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}\
td.pass{color:#1d7a32;font-weight:bold}td.miss{color:#b42020;font-weight:bold}\
figure.chart{margin:1em 0}figcaption{color:#555;font-size:.9em}\
.facts{color:#444}code{background:#f3f3f3;padding:0 .2em}";

/// A page being written.
#[derive(Debug)]
pub struct Page {
    title: String,
    body: String,
}

impl Page {
    /// An empty page titled `title` (also its first heading).
    pub fn new(title: &str) -> Self {
        let mut page = Self {
            title: title.to_owned(),
            body: String::new(),
        };
        let _ = writeln!(page.body, "<h1>{}</h1>", escape(title));
        page
    }

    /// The verdict banner: the word, a headline and one line per reason.
    pub fn banner(&mut self, verdict: Verdict, headline: &str, reasons: &[String]) {
        let _ = write!(
            self.body,
            "<div class=\"banner {}\" data-verdict=\"{}\"><b>{}</b>{}",
            verdict.class(),
            verdict.word(),
            verdict.word(),
            escape(headline)
        );
        if !reasons.is_empty() {
            self.body.push_str("<ul>");
            for reason in reasons {
                let _ = write!(self.body, "<li>{}</li>", escape(reason));
            }
            self.body.push_str("</ul>");
        }
        self.body.push_str("</div>\n");
    }

    /// A section heading.
    pub fn heading(&mut self, text: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
    }

    /// A paragraph of plain text.
    pub fn paragraph(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p class=\"facts\">{}</p>", escape(text));
    }

    /// A bulleted list of plain-text items.
    pub fn list(&mut self, items: &[String]) {
        self.body.push_str("<ul>");
        for item in items {
            let _ = write!(self.body, "<li>{}</li>", escape(item));
        }
        self.body.push_str("</ul>\n");
    }

    /// A table named `id` (its `data-table` attribute) with a header row and body rows.
    pub fn table(&mut self, id: &str, headers: &[&str], rows: &[Vec<Cell>]) {
        let _ = write!(
            self.body,
            "<table data-table=\"{}\"><thead><tr>",
            escape(id)
        );
        for h in headers {
            let _ = write!(self.body, "<th>{}</th>", escape(h));
        }
        self.body.push_str("</tr></thead><tbody>\n");
        for row in rows {
            assert_eq!(row.len(), headers.len(), "table {id}: cells per row");
            self.body.push_str("<tr>");
            for cell in row {
                let _ = match cell {
                    Cell::Text(t) => write!(self.body, "<td>{}</td>", escape(t)),
                    Cell::Int(n) => write!(self.body, "<td class=\"n\">{}</td>", thousands(*n)),
                    Cell::Num(v, d) => write!(self.body, "<td class=\"n\">{}</td>", figure(*v, *d)),
                    Cell::Mark(true) => write!(self.body, "<td class=\"pass\">pass</td>"),
                    Cell::Mark(false) => write!(self.body, "<td class=\"miss\">miss</td>"),
                };
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</tbody></table>\n");
    }

    /// An inline SVG chart named `id` (its `data-chart` attribute) with a caption.
    pub fn chart(&mut self, id: &str, svg: &str, caption: &str) {
        let _ = writeln!(
            self.body,
            "<figure class=\"chart\" data-chart=\"{}\">{svg}<figcaption>{}</figcaption></figure>",
            escape(id),
            escape(caption)
        );
    }

    /// The finished document.
    pub fn finish(self) -> String {
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{}</title><style>{STYLE}</style></head><body>\n{}</body></html>\n",
            escape(&self.title),
            self.body
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(figure(3.0, 3), "3");
        assert_eq!(figure(12_000.0, 1), "12,000");
        assert_eq!(figure(2.5, 2), "2.50");
        assert_eq!(figure(f64::NAN, 1), "NaN");
    }

    /// Text is escaped everywhere; tables carry their id, rows their cells.
    #[test]
    fn page_escapes_and_marks() {
        let mut page = Page::new("run <x>");
        page.banner(Verdict::Fail, "1 target missed", &["a & b".into()]);
        page.table(
            "targets",
            &["what", "measured", ""],
            &[vec![
                Cell::text("p99 <ms>"),
                Cell::Num(12.5, 1),
                Cell::Mark(false),
            ]],
        );
        page.chart("c", "<svg></svg>", "caption");
        let html = page.finish();
        assert!(html.contains("<title>run &lt;x&gt;</title>"), "{html}");
        assert!(html.contains("data-verdict=\"FAIL\""));
        assert!(html.contains("<li>a &amp; b</li>"));
        assert!(html.contains(
            "<td>p99 &lt;ms&gt;</td><td class=\"n\">12.5</td><td class=\"miss\">miss</td>"
        ));
        assert!(html.contains("<figure class=\"chart\" data-chart=\"c\"><svg></svg>"));
    }
}
