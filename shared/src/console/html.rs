//! HTML building blocks of the console: escaping, readable times and sizes, the page frame.
//!
//! Invariants: every string that comes from data (actor ids, campaign names, error texts,
//! kept message bodies, URLs) reaches a page only through [`esc`] (or [`attr`] inside an
//! attribute value), which escapes `& < > " '`, so no data can open an element or leave an
//! attribute; the page frame carries no script and loads nothing from elsewhere (inline CSS,
//! system fonts), so a page reads the same on an air-gapped cluster and without JavaScript.

use std::fmt::Write;

/// Text escaped for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The same as [`esc`]: named for attribute values, which are always double-quoted here.
pub fn attr(s: &str) -> String {
    esc(s)
}

/// A query-string component, percent-encoded (then escaped by the caller with [`attr`] when it
/// goes into an `href`).
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A query string from pairs, empty values left out.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let parts: Vec<String> =
        pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={}", url_part(v))).collect();
    if parts.is_empty() { String::new() } else { format!("?{}", parts.join("&")) }
}

/// Days since 1970-01-01 as a civil (proleptic Gregorian) date: Howard Hinnant's
/// `civil_from_days`, exact for every `i64` day the clock can give.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", t / 3600, t % 3600 / 60, t % 60)
}

/// `HH:MM` (UTC) of a time, for chart axes.
pub fn utc_hm(ms: i64) -> String {
    let t = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}", t / 3600, t % 3600 / 60)
}

/// `HH:MM:SS` (UTC) of a time, for chart axes spanning minutes.
pub fn utc_hms(ms: i64) -> String {
    let t = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", t / 3600, t % 3600 / 60, t % 60)
}

/// A duration in seconds as `3 h 12 min`, `4 min 10 s`, `12 s`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A UTC time and how long ago it was, for tables: `2026-12-01 12:51:11 UTC (4 min 10 s ago)`.
pub fn when(ms: i64, now_ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let ago = (now_ms - ms) as f64 / 1000.0;
    if ago >= 0.0 {
        format!("{} ({} ago)", utc(ms), duration(ago))
    } else {
        format!("{} (in {})", utc(ms), duration(-ago))
    }
}

/// Bytes as `1.5 MiB`, `12 KiB`, `800 B`.
pub fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// The inline style sheet: one per page, no external fonts.
const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;color:#1d2330;background:#f5f6f8}\
header{background:#1d2b45;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}\
header a{color:#cfe0ff;text-decoration:none;font-weight:600}header a.on{color:#fff;border-bottom:2px solid #7fb0ff}\
header .brand{font-weight:700;color:#fff;margin-right:12px}header .mode{margin-left:auto;font-size:12px;color:#b8c4dc}\
main{padding:18px 24px;max-width:1200px}h1{font-size:20px;margin:4px 0 14px}h2{font-size:16px;margin:22px 0 8px}\
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:14px 16px;margin:0 0 16px}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e6e9ef;vertical-align:top}\
th{font-weight:600;color:#4a5568;background:#f0f2f6}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
div.bar{height:14px;background:#e4e8f0;border-radius:7px;overflow:hidden;width:100%;max-width:520px}\
div.bar span{display:block;height:100%;background:#2f7d4f}\
.muted{color:#6b7280}.err{color:#a11d2b;background:#fdecee;border:1px solid #f3c2c8;padding:8px 10px;border-radius:4px}\
.ok{color:#1d5e35;background:#e8f6ec;border:1px solid #b9e2c6;padding:8px 10px;border-radius:4px}\
.warn{color:#7a4b00;background:#fff5e0;border:1px solid #f0d49a;padding:8px 10px;border-radius:4px}\
form.inline{display:flex;gap:10px;flex-wrap:wrap;align-items:end}label{display:flex;flex-direction:column;font-size:12px;color:#4a5568;gap:2px}\
input,select,button{font:inherit;padding:4px 6px}button{cursor:pointer;background:#1d4ed8;color:#fff;border:0;border-radius:4px;padding:6px 12px}\
button.danger{background:#b42318}a.button{display:inline-block;background:#e7ecf6;color:#1d2b45;border-radius:4px;padding:4px 10px;text-decoration:none;margin-right:6px}\
pre{background:#f0f2f6;padding:8px;border-radius:4px;white-space:pre-wrap;word-break:break-all;margin:0}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:#4a5568}dd{margin:0;word-break:break-all}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}.grid .card{margin:0}\
h3{font-size:14px;margin:12px 0 6px}svg text{font:11px system-ui,sans-serif;fill:#374151}footer{padding:8px 24px 24px;color:#6b7280;font-size:12px}";

/// Which tab of the header is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Campaigns,
    DeadLetters,
    None,
}

/// What the frame of every page shows besides its body.
pub struct Frame<'a> {
    pub title: &'a str,
    pub tab: Tab,
    /// `read-only` or `actions enabled`, shown in the header.
    pub mode: &'a str,
    /// Redacted store and broker, shown in the footer.
    pub footer: &'a str,
    /// Reload the page every this many seconds (a meta refresh: no script).
    pub refresh_secs: Option<u64>,
}

/// A whole page around `body` (already HTML). `title` and `footer` are escaped here.
pub fn page(frame: &Frame<'_>, body: &str) -> String {
    let tab = |t: Tab, href: &str, name: &str| {
        let class = if frame.tab == t { " class=\"on\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{name}</a>")
    };
    let refresh =
        frame.refresh_secs.map_or(String::new(), |s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"));
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{refresh}\
         <title>{title} · ferry console</title><style>{STYLE}</style></head><body>\
         <header><span class=\"brand\">ferry</span>{campaigns}{dead}<span class=\"mode\">{mode}</span></header>\
         <main>{body}</main><footer>{footer}</footer></body></html>",
        title = esc(frame.title),
        campaigns = tab(Tab::Campaigns, "/campaigns", "Campaigns"),
        dead = tab(Tab::DeadLetters, "/dead", "Dead letters"),
        mode = esc(frame.mode),
        footer = esc(frame.footer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_no_way_out_of_an_attribute() {
        let hostile = r#"<script>alert(1)</script>" onmouseover='x' &amp;"#;
        let e = esc(hostile);
        assert!(!e.contains(['<', '>', '"', '\'']), "{e}");
        assert_eq!(esc("a&b"), "a&amp;b");
        assert_eq!(esc("<b>"), "&lt;b&gt;");
    }

    #[test]
    fn url_parts_are_percent_encoded() {
        assert_eq!(url_part("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            query(&[("reason", "journal_sidecar"), ("campaign", ""), ("after", "x/y")]),
            "?reason=journal_sidecar&after=x%2Fy"
        );
        assert_eq!(query(&[("a", "")]), "");
    }

    #[test]
    fn utc_times_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_763_900_000_000), "2025-11-23 12:13:20 UTC");
        // A leap day and the last second of a year.
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_704_067_199_999), "2023-12-31 23:59:59 UTC");
        assert_eq!(utc(-1000), "1969-12-31 23:59:59 UTC");
        assert_eq!(utc_hm(1_763_900_000_000), "12:13");
    }

    #[test]
    fn durations_and_sizes_read_as_a_person_says_them() {
        assert_eq!(duration(12.4), "12 s");
        assert_eq!(duration(250.0), "4 min 10 s");
        assert_eq!(duration(3.0 * 3600.0 + 720.0), "3 h 12 min");
        assert_eq!(duration(f64::NAN), "-");
        assert_eq!(bytes(800), "800 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1_048_576), "3.0 MiB");
        assert_eq!(when(1_000_000, 1_004_000), "1970-01-01 00:16:40 UTC (4 s ago)");
    }

    #[test]
    fn the_frame_escapes_its_title_and_footer_and_has_no_script() {
        let frame =
            Frame { title: "<t>", tab: Tab::Campaigns, mode: "read-only", footer: "<f>", refresh_secs: Some(5) };
        let html = page(&frame, "<p>body</p>");
        assert!(html.contains("&lt;t&gt;") && html.contains("&lt;f&gt;") && html.contains("<p>body</p>"));
        assert!(!html.contains("<script") && !html.contains("http://") && !html.contains("https://"));
    }
}
