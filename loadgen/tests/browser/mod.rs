//! Opens generated pages in a real browser: Debian's headless Chromium, `--dump-dom`.
//! `scripts/test.sh` installs Chromium when it is missing and sets
//! `CHATPROOF_REQUIRE_BROWSER=1`; without that variable and without Chromium the page
//! checks are skipped (said on stderr), with it they fail.

use std::path::Path;
use std::process::Command;

/// The Chromium binary: `CHATPROOF_CHROMIUM`, else `/usr/bin/chromium`.
fn chromium() -> Option<String> {
    let path = std::env::var("CHATPROOF_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if Path::new(&path).is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CHATPROOF_REQUIRE_BROWSER").as_deref() != Ok("1"),
        "no Chromium at {path}, and CHATPROOF_REQUIRE_BROWSER=1 requires it (scripts/test.sh installs Debian's chromium)"
    );
    eprintln!("SKIPPED the browser check: no Chromium at {path}");
    None
}

/// What the browser made of a page.
pub struct Rendered {
    /// The DOM after loading, serialized.
    pub dom: String,
    /// Console messages that report a JavaScript error.
    pub script_errors: Vec<String>,
}

/// Loads `page` headless (no network, fresh profile) and returns its DOM and script
/// errors; `None` when the check is skipped (see the module doc).
pub fn render(page: &Path) -> Option<Rendered> {
    let chromium = chromium()?;
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .output()
        .expect("running chromium");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chromium failed on {}: {stderr}",
        page.display()
    );
    let script_errors = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains("Error")))
        .map(str::to_owned)
        .collect();
    Some(Rendered {
        dom: String::from_utf8_lossy(&out.stdout).into_owned(),
        script_errors,
    })
}

/// Renders `page` and checks it as a person would see it: no script error, each named
/// table present, and each named chart drawn as an `<svg>` inside its figure.
pub fn assert_page_shows(page: &Path, tables: &[&str], charts: &[&str]) {
    let Some(r) = render(page) else { return };
    assert!(
        r.script_errors.is_empty(),
        "{}: {:?}",
        page.display(),
        r.script_errors
    );
    for table in tables {
        assert!(
            r.dom.contains(&format!("data-table=\"{table}\"")),
            "{}: table {table} not in the rendered page",
            page.display()
        );
    }
    for chart in charts {
        let at = r
            .dom
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| {
                panic!("{}: chart {chart} not in the rendered page", page.display())
            });
        let figure = &r.dom[at..r.dom[at..]
            .find("</figure>")
            .map_or(r.dom.len(), |e| at + e)];
        assert!(
            figure.contains("<svg"),
            "{}: chart {chart} has no <svg>",
            page.display()
        );
    }
}
