//! Charts drawn on the server as inline SVG: no script, no library, no request to anywhere.
//!
//! Invariants: every label from data goes through [`esc`]; the numbers a chart shows are
//! written into it as text and as `data-*` attributes of each bar, so what a person reads, what
//! a test checks and what the summary said are the same numbers; an empty input draws a chart
//! that says so rather than nothing.

use std::fmt::Write;

use super::html::{esc, utc_hm, utc_hms};

/// One bar of [`bar_chart`].
pub struct Bar<'a> {
    pub reason: &'a str,
    pub campaign: &'a str,
    pub count: u64,
}

/// Horizontal bars, one per (reason, campaign), longest = the largest count.
pub fn bar_chart(bars: &[Bar<'_>]) -> String {
    const ROW: u32 = 24;
    const LABEL: u32 = 300;
    const PLOT: u32 = 520;
    if bars.is_empty() {
        return "<svg class=\"chart dead\" role=\"img\" width=\"840\" height=\"40\" viewBox=\"0 0 840 40\" \
                xmlns=\"http://www.w3.org/2000/svg\"><title>no dead letters</title>\
                <text x=\"8\" y=\"24\">No dead letters.</text></svg>"
            .into();
    }
    let max = bars.iter().map(|b| b.count).max().unwrap_or(1).max(1);
    let height = ROW * bars.len() as u32 + 8;
    let mut out = format!(
        "<svg class=\"chart dead\" role=\"img\" width=\"{w}\" height=\"{height}\" viewBox=\"0 0 {w} {height}\" \
         xmlns=\"http://www.w3.org/2000/svg\"><title>dead letters by reason and campaign</title>",
        w = LABEL + PLOT + 80
    );
    for (i, b) in bars.iter().enumerate() {
        let y = 4 + ROW * i as u32;
        let len = ((b.count as f64 / max as f64) * f64::from(PLOT)).round().max(2.0);
        let campaign = if b.campaign.is_empty() { "(no campaign)" } else { b.campaign };
        let _ = write!(
            out,
            "<g class=\"row\"><text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{reason} · {camp}</text>\
             <rect class=\"bar\" x=\"{LABEL}\" y=\"{by}\" width=\"{len}\" height=\"{bh}\" fill=\"{fill}\" \
             data-reason=\"{reason}\" data-campaign=\"{camp_attr}\" data-count=\"{count}\">\
             <title>{reason} · {camp}: {count}</title></rect>\
             <text class=\"count\" x=\"{cx}\" y=\"{ty}\">{count}</text></g>",
            lx = LABEL - 8,
            ty = y + 15,
            by = y + 3,
            bh = ROW - 8,
            reason = esc(b.reason),
            camp = esc(campaign),
            camp_attr = esc(b.campaign),
            count = b.count,
            fill = colour(b.reason),
            cx = f64::from(LABEL) + len + 6.0,
        );
    }
    out.push_str("</svg>");
    out
}

/// A stable colour per reason, so one reason is the same colour on every page.
fn colour(reason: &str) -> &'static str {
    const PALETTE: [&str; 8] = ["#b42318", "#c4590a", "#8a6d00", "#2f7d4f", "#1d4ed8", "#6d28d9", "#0e7490", "#9d174d"];
    let h = reason.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    PALETTE[h as usize % PALETTE.len()]
}

/// Jobs finished per interval: `buckets[i]` counts the jobs finished in
/// `[start_ms + i·bucket_ms, start_ms + (i+1)·bucket_ms)`.
pub fn throughput(buckets: &[u64], start_ms: i64, bucket_ms: i64) -> String {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    const LEFT: f64 = 44.0;
    const BOTTOM: f64 = 18.0;
    let total: u64 = buckets.iter().sum();
    let mut out = format!(
        "<svg class=\"chart throughput\" role=\"img\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         xmlns=\"http://www.w3.org/2000/svg\" data-total=\"{total}\"><title>jobs finished per {per}</title>",
        w = LEFT + W + 8.0,
        h = H + BOTTOM + 8.0,
        per = super::html::duration(bucket_ms as f64 / 1000.0),
    );
    let max = buckets.iter().copied().max().unwrap_or(0);
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{H}\" x2=\"{x2}\" y2=\"{H}\" stroke=\"#9ca3af\"/>\
         <text x=\"{lx}\" y=\"10\" text-anchor=\"end\">{max}</text><text x=\"{lx}\" y=\"{H}\" text-anchor=\"end\">0</text>",
        x2 = LEFT + W,
        lx = LEFT - 4.0,
    );
    if buckets.is_empty() || total == 0 {
        let _ = write!(out, "<text x=\"{}\" y=\"{}\">no job finished in this window</text>", LEFT + 12.0, H / 2.0);
    }
    let n = buckets.len().max(1) as f64;
    let slot = W / n;
    for (i, &c) in buckets.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let h = (c as f64 / max.max(1) as f64) * (H - 12.0);
        let at = start_ms + i as i64 * bucket_ms;
        let _ = write!(
            out,
            "<rect class=\"tp\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"#2f7d4f\" data-count=\"{c}\">\
             <title>{t} UTC: {c} jobs</title></rect>",
            x = LEFT + i as f64 * slot + 0.5,
            y = H - h,
            bw = (slot - 1.0).max(1.0),
            t = label(at, bucket_ms),
        );
    }
    let end = start_ms + buckets.len() as i64 * bucket_ms;
    let _ = write!(
        out,
        "<text x=\"{LEFT}\" y=\"{ty}\">{a}</text><text x=\"{mx}\" y=\"{ty}\" text-anchor=\"middle\">{m}</text>\
         <text x=\"{ex}\" y=\"{ty}\" text-anchor=\"end\">{e} UTC</text></svg>",
        ty = H + BOTTOM - 2.0,
        a = label(start_ms, bucket_ms),
        mx = LEFT + W / 2.0,
        m = label(start_ms + (end - start_ms) / 2, bucket_ms),
        ex = LEFT + W,
        e = label(end, bucket_ms),
    );
    out
}

/// An axis time: seconds shown when the buckets are shorter than a minute.
fn label(ms: i64, bucket_ms: i64) -> String {
    if bucket_ms < 60_000 { utc_hms(ms) } else { utc_hm(ms) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_carry_their_numbers_and_escape_their_labels() {
        let svg = bar_chart(&[
            Bar { reason: "journal_sidecar", campaign: "c1", count: 6 },
            Bar { reason: "bad_message", campaign: "<b>x</b>", count: 1 },
        ]);
        assert!(svg.contains("data-reason=\"journal_sidecar\" data-campaign=\"c1\" data-count=\"6\""), "{svg}");
        assert!(svg.contains("&lt;b&gt;x&lt;/b&gt;") && !svg.contains("<b>"), "{svg}");
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 2);
        assert!(bar_chart(&[]).contains("No dead letters"));
    }

    #[test]
    fn throughput_draws_one_bar_per_non_empty_bucket_and_labels_the_window() {
        let start = 1_763_900_000_000;
        let svg = throughput(&[0, 3, 0, 7], start, 60_000);
        assert_eq!(svg.matches("<rect class=\"tp\"").count(), 2, "{svg}");
        assert!(svg.contains("data-total=\"10\"") && svg.contains("12:13") && svg.contains("12:17 UTC"), "{svg}");
        assert!(throughput(&[0, 0], start, 1000).contains("no job finished"));
    }
}
