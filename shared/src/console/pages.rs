//! The console's pages as HTML (bodies; [`super::html::page`] puts the frame around them).
//!
//! Invariants: every value from the store or the broker is escaped ([`esc`], [`attr`]); times
//! are shown in UTC with how long ago, never as epoch milliseconds; an action appears only when
//! the console is not read-only, only as a link to its confirmation page (a GET that changes
//! nothing), and the confirmation page's form is the only thing that POSTs, with the CSRF
//! token; the recovery offered first is the one that fits the reason
//! ([`crate::triage::recovery_fits`]), any other needs the force box ticked.

use std::fmt::Write;

use super::campaigns::{CampaignView, Overview};
use super::html::{attr, bytes, duration, esc, query, url_part, when};
use super::svg;
use crate::jobs::DeadLetter;
use crate::migrate::AuditRecord;
use crate::queue::status::{Depths, Eta};
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::triage::{self, ActorState, Filter, Page, Summary};
use crate::v2::DBHead;

/// What every page needs to know about who looks at it.
pub struct Viewer<'a> {
    /// The CSRF token of this viewer's forms.
    pub csrf: &'a str,
    pub read_only: bool,
    /// A login is in use (a logout button is shown).
    pub logged_in: bool,
}

fn hidden(name: &str, value: &str) -> String {
    format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", attr(name), attr(value))
}

fn csrf_field(v: &Viewer<'_>) -> String {
    hidden("csrf", v.csrf)
}

/// The error box of a page.
pub fn error_box(message: &str) -> String {
    format!("<p class=\"err\">{}</p>", esc(message))
}

/// A page that only says something went wrong (or was refused).
pub fn failure(title: &str, message: &str) -> String {
    format!("<h1>{}</h1>{}<p><a href=\"/campaigns\">Back to the campaigns</a></p>", esc(title), error_box(message))
}

// ---------------------------------------------------------------------------------------------
// Login

pub fn login(csrf: &str, problem: Option<&str>) -> String {
    format!(
        "<h1>Log in</h1>{problem}<div class=\"card\"><p>This console needs its access token \
         (the <code>FERRY_CONSOLE_TOKEN</code> it was started with).</p>\
         <form method=\"post\" action=\"/login\" class=\"inline\">{csrf}\
         <label>Access token<input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label>\
         <button type=\"submit\" id=\"login\">Log in</button></form></div>",
        problem = problem.map(error_box).unwrap_or_default(),
        csrf = hidden("csrf", csrf),
    )
}

pub fn logout_form(v: &Viewer<'_>) -> String {
    if !v.logged_in {
        return String::new();
    }
    format!(
        "<form method=\"post\" action=\"/logout\" class=\"inline\">{}<button type=\"submit\">Log out</button></form>",
        csrf_field(v)
    )
}

// ---------------------------------------------------------------------------------------------
// Campaigns

fn eta_text(eta: Option<Eta>) -> String {
    match eta {
        None => "unknown (no broker)".into(),
        Some(Eta::Seconds(s)) => duration(s),
        Some(Eta::Drained) => "done".into(),
        Some(e) => format!("unknown: {}", e.note().unwrap_or("")),
    }
}

fn queues(depths: &Option<Result<Depths, String>>) -> String {
    match depths {
        None => "<p class=\"muted\">Embedded mode: no broker, no queues.</p>".into(),
        Some(Err(e)) => error_box(&format!("cannot read the queues: {e}")),
        Some(Ok(d)) => {
            let mut out = String::from(
                "<table class=\"queues\"><tr><th>queue</th><th class=\"n\">messages</th><th class=\"n\">consumers</th></tr>",
            );
            for q in std::iter::once(&d.work).chain(&d.retry).chain(std::iter::once(&d.dead)) {
                let _ = write!(
                    out,
                    "<tr data-queue=\"{n}\"><td>{n}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    q.messages,
                    q.consumers,
                    n = esc(&q.name)
                );
            }
            out.push_str("</table>");
            out
        }
    }
}

pub fn campaigns(o: &Overview, v: &Viewer<'_>, refresh_secs: Option<u64>) -> String {
    let reload = refresh_secs.map_or(String::new(), |s| format!("; this page reloads every {s} s"));
    let mut out = format!(
        "<h1>Campaigns</h1><div class=\"card\"><p>All campaigns: <b>{rate:.1}</b> jobs/s over the last {span}; \
         ETA of the queued jobs: <b id=\"all-eta\">{eta}</b>. Read {now}{reload}.</p>{queues}</div>",
        rate = o.all_rate.per_second,
        span = duration(o.all_rate.span_seconds),
        eta = esc(&eta_text(o.all_eta)),
        now = esc(&super::html::utc(o.now_ms)),
        queues = queues(&o.depths),
    );
    if o.campaigns.is_empty() {
        out.push_str("<p class=\"muted\">No campaign in this store yet.</p>");
    }
    for c in &o.campaigns {
        out.push_str(&campaign(c, o.now_ms, v));
    }
    out
}

fn campaign(c: &CampaignView, now_ms: i64, v: &Viewer<'_>) -> String {
    let (pct, planned) = match c.planned {
        Some(p) if p > 0 => ((c.done.min(p) as f64 / p as f64) * 100.0, p.to_string()),
        Some(_) => (0.0, "0".into()),
        None => (0.0, "?".into()),
    };
    let state = match &c.record {
        Some(r) => format!(
            "{} · created {}",
            match r.status {
                crate::campaign::CampaignStatus::Enqueueing => "enqueueing",
                crate::campaign::CampaignStatus::Enqueued => "enqueued",
            },
            when(r.created_at_ms, now_ms)
        ),
        None => "no campaign record (embedded or an older store)".into(),
    };
    let mut outcomes = String::from("<table class=\"outcomes\"><tr><th>outcome</th><th class=\"n\">actors</th></tr>");
    for (k, n) in &c.counts.outcomes {
        let _ = write!(outcomes, "<tr data-outcome=\"{k}\"><td>{k}</td><td class=\"n\">{n}</td></tr>", k = esc(k));
    }
    for (reason, n) in &c.counts.dead_letters {
        let link = format!("/dead{}", query(&[("reason", reason), ("campaign", &c.name)]));
        let _ = write!(
            outcomes,
            "<tr><td>&nbsp;&nbsp;dead letter: <a href=\"{}\">{}</a></td><td class=\"n\">{n}</td></tr>",
            attr(&link),
            esc(reason)
        );
    }
    outcomes.push_str("</table>");
    let verify = if v.read_only {
        String::new()
    } else {
        format!(
            "<p><a class=\"button\" href=\"/actions/verify{}\">Verify this campaign…</a></p>",
            attr(&query(&[("campaign", &c.name)]))
        )
    };
    let chart = svg::throughput(&c.chart.buckets, c.chart.start_ms, c.chart.bucket_ms);
    format!(
        "<div class=\"card campaign\" data-campaign=\"{name_attr}\" data-done=\"{done}\" data-planned=\"{planned}\">\
         <h2>{name}</h2><p class=\"muted\">{state}</p>\
         <div class=\"bar\" title=\"{pct:.1}%\"><span style=\"width:{pct:.1}%\"></span></div>\
         <p><b class=\"done\">{done}</b> / <b class=\"planned\">{planned}</b> jobs done ({pct:.1}%){left} · \
         <b>{rate:.1}</b> jobs/s over the last {span} · ETA <b class=\"eta\">{eta}</b></p>\
         <div style=\"display:flex;gap:24px;flex-wrap:wrap\"><div>{outcomes}</div>\
         <div><p class=\"muted\">Jobs finished per {per} (from the audit records' finish times, UTC)</p>{chart}</div></div>{verify}</div>",
        name_attr = attr(&c.name),
        name = esc(&c.name),
        done = c.done,
        left = c.left().map_or(String::new(), |l| format!(", {l} left")),
        rate = c.rate.per_second,
        span = duration(c.rate.span_seconds),
        eta = esc(&eta_text(c.eta)),
        per = duration(c.chart.bucket_ms as f64 / 1000.0),
    )
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// The filter as query pairs (for links and hidden fields).
pub fn filter_pairs(f: &Filter) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(r) = f.reason {
        out.push(("reason", r.as_str().to_string()));
    }
    if let Some(c) = &f.campaign {
        out.push(("campaign", c.clone()));
    }
    if let Some(p) = &f.actor_prefix {
        out.push(("prefix", p.clone()));
    }
    if let Some(a) = f.actors.first() {
        out.push(("actor", a.clone()));
    }
    out
}

fn filter_query(f: &Filter, extra: &[(&str, &str)]) -> String {
    let pairs = filter_pairs(f);
    let mut all: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    query(&all)
}

fn filter_hidden(f: &Filter) -> String {
    filter_pairs(f).iter().map(|(k, v)| hidden(k, v)).collect()
}

fn describe(f: &Filter) -> String {
    let mut parts = Vec::new();
    if let Some(a) = f.actors.first() {
        parts.push(format!("actor <b>{}</b>", esc(a)));
    }
    if let Some(r) = f.reason {
        parts.push(format!("reason <b>{}</b>", esc(r.as_str())));
    }
    if let Some(c) = &f.campaign {
        parts.push(format!("campaign <b>{}</b>", esc(c)));
    }
    if let Some(p) = &f.actor_prefix {
        parts.push(format!("actor ids starting with <b>{}</b>", esc(p)));
    }
    if parts.is_empty() { "every dead letter".into() } else { parts.join(", ") }
}

/// Up to `n` characters of `s` (on a character boundary), with `…` when cut.
fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn actor_cell(d: &DeadLetter) -> String {
    match crate::ActorId::parse(&d.actor_id) {
        Ok(a) if d.reason != DeadLetterReason::BadMessage => {
            format!("<a class=\"actor\" href=\"/dead/actor/{}\">{}</a>", url_part(a.as_str()), esc(a.as_str()))
        }
        _ if d.actor_id.is_empty() => "<span class=\"muted\">(no actor)</span>".into(),
        _ => format!("<span class=\"actor bad\">{}</span>", esc(&d.actor_id)),
    }
}

pub fn dead_letters(
    summary: &Summary,
    filter: &Filter,
    page: &Page,
    after: Option<&str>,
    now_ms: i64,
    v: &Viewer<'_>,
) -> String {
    let bars: Vec<svg::Bar<'_>> =
        summary.groups.iter().map(|g| svg::Bar { reason: &g.reason, campaign: &g.campaign, count: g.count }).collect();
    let mut groups = String::from(
        "<table class=\"groups\"><tr><th>reason</th><th>campaign</th><th class=\"n\">letters</th><th class=\"n\">actors</th>\
         <th>oldest</th><th>newest</th><th class=\"n\">v1 size</th></tr>",
    );
    for g in &summary.groups {
        let link = format!("/dead{}", query(&[("reason", &g.reason), ("campaign", &g.campaign)]));
        let _ = write!(
            groups,
            "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            attr(&link),
            esc(&g.reason),
            esc(&g.campaign),
            g.count,
            g.actors,
            esc(&when(g.oldest_ms, now_ms)),
            esc(&when(g.newest_ms, now_ms)),
            esc(&bytes(g.v1_bytes)),
        );
    }
    groups.push_str("</table>");
    let pending = if summary.requeues_pending > 0 {
        format!(" · <b>{}</b> requeued actors waiting for a worker", summary.requeues_pending)
    } else {
        String::new()
    };
    let mut reasons = String::from("<option value=\"\">any</option>");
    for r in DeadLetterReason::ALL {
        let sel = if filter.reason == Some(r) { " selected" } else { "" };
        let _ = write!(reasons, "<option value=\"{r}\"{sel}>{r}</option>", r = r.as_str());
    }
    let form = format!(
        "<form method=\"get\" action=\"/dead\" class=\"inline\" id=\"filter\">\
         <label>Reason<select name=\"reason\" id=\"reason\">{reasons}</select></label>\
         <label>Campaign<input name=\"campaign\" id=\"campaign\" value=\"{campaign}\"></label>\
         <label>Actor id starts with<input name=\"prefix\" id=\"prefix\" value=\"{prefix}\"></label>\
         <button type=\"submit\" id=\"apply\">Filter</button> <a class=\"button\" href=\"/dead\">Clear</a></form>",
        campaign = attr(filter.campaign.as_deref().unwrap_or("")),
        prefix = attr(filter.actor_prefix.as_deref().unwrap_or("")),
    );
    let mut rows = String::from(
        "<table class=\"letters\"><tr><th>actor</th><th>campaign</th><th>reason</th><th>phase</th><th class=\"n\">attempts</th>\
         <th>dead-lettered</th><th class=\"n\">main</th><th>error</th></tr>",
    );
    for d in &page.letters {
        let size = d.v1_files.as_ref().and_then(|f| f.main).map_or("-".into(), bytes);
        let _ = write!(
            rows,
            "<tr class=\"letter\" data-reason=\"{reason}\"><td>{actor}</td><td>{campaign}</td><td>{reason}</td><td>{phase}</td>\
             <td class=\"n\">{attempts}</td><td>{at}</td><td class=\"n\">{size}</td><td class=\"error\">{error}</td></tr>",
            actor = actor_cell(d),
            campaign = esc(&d.campaign),
            reason = esc(d.reason.as_str()),
            phase = esc(&d.phase),
            attempts = d.attempts,
            at = esc(&when(d.at_ms, now_ms)),
            size = esc(&size),
            error = esc(&clip(&d.error, 300)),
        );
    }
    rows.push_str("</table>");
    if page.letters.is_empty() {
        rows.push_str("<p class=\"muted\">No dead letter matches.</p>");
    }
    let mut nav = String::new();
    if after.is_some() {
        let _ = write!(
            nav,
            "<a class=\"button\" id=\"first\" href=\"/dead{}\">← First page</a>",
            attr(&filter_query(filter, &[]))
        );
    }
    if let Some(next) = &page.next {
        let _ = write!(
            nav,
            "<a class=\"button\" id=\"next\" href=\"/dead{}\">Next page →</a>",
            attr(&filter_query(filter, &[("after", next)]))
        );
    }
    let actions = if v.read_only || page.letters.is_empty() {
        String::new()
    } else {
        format!(
            "<p><a class=\"button\" id=\"requeue\" href=\"/actions/requeue{q}\">Requeue these…</a>\
             <a class=\"button\" id=\"purge\" href=\"/actions/purge{q}\">Purge these…</a>\
             <a class=\"button\" id=\"sweep\" href=\"/actions/sweep{q}\">Sweep settled actors…</a>\
             <span class=\"muted\">(every dead letter of this filter, not only this page; each asks to confirm)</span></p>",
            q = attr(&filter_query(filter, &[]))
        )
    };
    format!(
        "<h1>Dead letters</h1><div class=\"card\"><p><b id=\"dead-total\">{total}</b> dead letters{pending} \
         (the same numbers as <code>ferry-producer dlq summary</code>)</p>{chart}<h2>By reason and campaign</h2>{groups}</div>\
         <div class=\"card\"><h2>List</h2>{form}<p>Showing {shown} of {what}.</p>{actions}{rows}<p>{nav}</p></div>",
        total = summary.dead_letters,
        chart = svg::bar_chart(&bars),
        shown = page.letters.len(),
        what = describe(filter),
    )
}

// ---------------------------------------------------------------------------------------------
// One actor

fn row(out: &mut String, k: &str, v: &str) {
    let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(v));
}

fn letter_block(d: &DeadLetter, now_ms: i64) -> String {
    let mut dl = String::from("<dl class=\"letter\">");
    row(&mut dl, "reason", d.reason.as_str());
    row(&mut dl, "campaign", &d.campaign);
    row(&mut dl, "phase", &d.phase);
    row(&mut dl, "attempts", &d.attempts.to_string());
    row(&mut dl, "worker", &d.worker);
    row(&mut dl, "dead-lettered", &when(d.at_ms, now_ms));
    row(&mut dl, "recovery asked", d.recovery.map_or("none", |r| r.as_str()));
    if let Some(f) = &d.v1_files {
        row(&mut dl, "v1 files seen", &files(f));
    }
    dl.push_str("</dl>");
    format!(
        "{dl}<h3>Error</h3><pre class=\"error\">{}</pre><h3>Message</h3><pre class=\"message\">{}</pre>",
        esc(&d.error),
        esc(&d.message)
    )
}

fn files(f: &crate::v1::V1Files) -> String {
    let part = |name: &str, n: Option<u64>| n.map(|n| format!("{name} {}", bytes(n)));
    let parts: Vec<String> = [part("main", f.main), part("journal", f.journal), part("wal", f.wal), part("shm", f.shm)]
        .into_iter()
        .flatten()
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

fn audit_block(a: &AuditRecord, now_ms: i64) -> String {
    let mut dl = String::from("<dl class=\"audit\">");
    row(&mut dl, "outcome", a.outcome.as_str());
    if let Some(r) = a.reason {
        row(&mut dl, "reason", r.as_str());
    }
    row(&mut dl, "campaign", &a.campaign);
    if let Some(p) = &a.phase {
        row(&mut dl, "phase", p);
    }
    row(&mut dl, "recovery", a.recovery.map_or("none", |r| r.as_str()));
    row(&mut dl, "worker", &a.worker);
    row(&mut dl, "started", &when(a.started_at_ms, now_ms));
    row(&mut dl, "finished", &when(a.finished_at_ms, now_ms));
    if let Some(n) = a.attempts {
        row(&mut dl, "attempts", &n.to_string());
    }
    if let Some(p) = a.pages {
        row(&mut dl, "pages", &p.to_string());
    }
    if let Some(b) = a.v1_bytes {
        row(&mut dl, "v1 size", &bytes(b));
    }
    if let Some(c) = &a.checksum {
        row(&mut dl, "checksum", c);
    }
    if let Some(g) = a.generation {
        row(&mut dl, "generation", &g.to_string());
    }
    if let Some(p) = a.purged_at_ms {
        row(&mut dl, "dead letter purged", &when(p, now_ms));
    }
    if let Some(e) = &a.error {
        row(&mut dl, "error", e);
    }
    dl.push_str("</dl>");
    dl
}

fn head_block(head: Option<&DBHead>, shown: Option<&str>, now_ms: i64) -> String {
    match (head, shown) {
        (Some(h), _) => {
            let mut dl = String::from("<dl class=\"head\">");
            row(&mut dl, "origin", &format!("{:?}", h.origin));
            row(&mut dl, "generation", &h.generation.to_string());
            row(&mut dl, "pages", &format!("{} of {} bytes", h.db_size_pages, h.page_size));
            row(&mut dl, "head txid", &h.head_txid.to_string());
            row(&mut dl, "created", &when(h.creation_ts_ms, now_ms));
            row(&mut dl, "storage used", &bytes(h.sqlite_storage_used));
            dl.push_str("</dl>");
            dl
        }
        (None, Some(s)) => format!("<pre>{}</pre>", esc(s)),
        (None, None) => "<p class=\"muted\">No v2 head.</p>".into(),
    }
}

/// The actor page: `dlq show`'s [`ActorState`], with the v2 head decoded for its times.
pub fn actor(state: &ActorState, head: Option<&DBHead>, now_ms: i64, v: &Viewer<'_>) -> String {
    let mut out = format!("<h1>Actor <span id=\"actor-id\">{}</span></h1>", esc(&state.actor));
    let outcome = state.audit.as_ref().map_or("none", |a| a.outcome.as_str());
    let _ = write!(out, "<p>Last outcome: <b id=\"outcome\">{}</b>", esc(outcome));
    if let Some(r) = state.audit.as_ref().and_then(|a| a.recovery) {
        let _ = write!(out, " with recovery <b id=\"recovery\">{}</b>", esc(r.as_str()));
    }
    out.push_str("</p>");
    if !v.read_only && !state.dead_letters.is_empty() {
        let q = attr(&query(&[("actor", &state.actor)]));
        let _ = write!(
            out,
            "<p><a class=\"button\" id=\"requeue\" href=\"/actions/requeue{q}\">Requeue…</a>\
             <a class=\"button\" id=\"purge\" href=\"/actions/purge{q}\">Purge…</a></p>"
        );
    }
    out.push_str("<div class=\"grid\"><div class=\"card\"><h2>Dead letter</h2>");
    if state.dead_letters.is_empty() {
        out.push_str("<p class=\"muted\">None.</p>");
    }
    for d in &state.dead_letters {
        out.push_str(&letter_block(d, now_ms));
    }
    out.push_str("</div>");
    let audit =
        state.audit.as_ref().map_or("<p class=\"muted\">No audit record.</p>".into(), |a| audit_block(a, now_ms));
    let _ = write!(out, "<div class=\"card\"><h2>Audit record</h2>{audit}</div>");
    if let Some(t) = &state.requeue {
        let mut dl = String::from("<dl class=\"ticket\">");
        row(&mut dl, "campaign", &t.campaign);
        row(&mut dl, "recovery", t.recovery.map_or("none", |r| r.as_str()));
        row(&mut dl, "requeued", &when(t.requeued_at_ms, now_ms));
        row(&mut dl, "from reason", t.dead_letter.reason.as_str());
        dl.push_str("</dl>");
        let _ = write!(out, "<div class=\"card\"><h2>Requeued, waiting for a worker</h2>{dl}</div>");
    }
    let _ = write!(out, "<div class=\"card\"><h2>v1 files</h2><p>{}</p></div>", esc(&files(&state.v1_files)));
    let _ =
        write!(out, "<div class=\"card\"><h2>v2 head</h2>{}</div>", head_block(head, state.v2_head.as_deref(), now_ms));
    let lease = match state.lease.as_deref() {
        None => "<p class=\"muted\">No lease.</p>".to_string(),
        Some(raw) => match crate::migrate::lease::Lease::decode(raw.as_bytes()) {
            Some(l) => {
                let mut dl = String::from("<dl class=\"lease\">");
                row(&mut dl, "holder", &l.holder);
                row(&mut dl, "generation", &l.generation.to_string());
                row(&mut dl, "expires", &when(l.expires_at_ms, now_ms));
                dl.push_str("</dl>");
                dl
            }
            None => format!("<pre>{}</pre>", esc(raw)),
        },
    };
    let _ = write!(out, "<div class=\"card\"><h2>Lease</h2>{lease}</div></div>");
    out
}

// ---------------------------------------------------------------------------------------------
// Actions: confirmation pages and results

/// The recoveries that fit `reason`, the one to offer first first.
pub fn fitting(reason: DeadLetterReason) -> Vec<Recovery> {
    // For an SHM-only actor, dropping the SHM is the smaller step than a checkpoint.
    let order = [Recovery::RollbackJournal, Recovery::DiscardShm, Recovery::CheckpointWal, Recovery::Force];
    order.into_iter().filter(|r| triage::recovery_fits(reason, Some(*r))).collect()
}

/// The letters an action would touch, as read for its confirmation.
pub struct Preview {
    pub letters: Vec<DeadLetter>,
    /// More than `letters` match.
    pub more: bool,
}

impl Preview {
    fn count(&self) -> String {
        if self.more { format!("more than {}", self.letters.len()) } else { self.letters.len().to_string() }
    }

    /// The one reason of every letter previewed, if they share one.
    pub fn reason(&self) -> Option<DeadLetterReason> {
        let first = self.letters.first()?.reason;
        self.letters.iter().all(|d| d.reason == first).then_some(first)
    }
}

fn preview_list(p: &Preview, now_ms: i64) -> String {
    let mut out = String::from(
        "<table class=\"letters\"><tr><th>actor</th><th>campaign</th><th>reason</th><th>dead-lettered</th></tr>",
    );
    for d in p.letters.iter().take(20) {
        let _ = write!(
            out,
            "<tr class=\"letter\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            actor_cell(d),
            esc(&d.campaign),
            esc(d.reason.as_str()),
            esc(&when(d.at_ms, now_ms))
        );
    }
    out.push_str("</table>");
    if p.letters.len() > 20 || p.more {
        out.push_str("<p class=\"muted\">… and more.</p>");
    }
    out
}

pub fn confirm_requeue(filter: &Filter, p: &Preview, now_ms: i64, v: &Viewer<'_>, embedded: bool) -> String {
    let reason = filter.reason.or(p.reason());
    let offered = reason.map(fitting).unwrap_or_default();
    let first = offered.first().copied();
    let mut options = format!(
        "<option value=\"\"{}>none (requeue as it is)</option>",
        if first.is_none() { " selected" } else { "" }
    );
    for r in Recovery::ALL {
        let fits = reason.is_none_or(|reason| triage::recovery_fits(reason, Some(r)));
        let note = match reason {
            Some(reason) if !fits => format!(" — does not fit {reason}: needs force"),
            Some(_) => " — fits the reason".into(),
            None => String::new(),
        };
        let sel = if first == Some(r) { " selected" } else { "" };
        let _ = write!(options, "<option value=\"{r}\"{sel}>{r}{}</option>", esc(&note), r = r.as_str());
    }
    let fit_note = match (reason, first) {
        (Some(reason), Some(r)) => {
            format!("<p>The recovery that fits <b>{reason}</b> is <b>{r}</b>; it is selected.</p>")
        }
        (Some(reason), None) => format!("<p>No recovery fits <b>{reason}</b>: requeue as it is, or force one.</p>"),
        (None, _) => {
            "<p class=\"warn\">These letters have more than one reason: each is checked against the recovery, and \
                      a letter it does not fit is skipped unless force is ticked.</p>"
                .into()
        }
    };
    let how = if embedded {
        "re-runs each job in the console's process"
    } else {
        "publishes a job for each actor to the work queue"
    };
    format!(
        "<h1>Requeue dead letters</h1><div class=\"card\"><p>Requeue {what}: <b id=\"count\">{count}</b> dead letters. \
         This moves each letter to a requeue ticket and {how}, as <code>ferry-producer dlq requeue</code> does; \
         the actors' audit records name the recovery their job applies.</p>{fit_note}\
         <form method=\"post\" action=\"/actions/requeue\" id=\"confirm\">{csrf}{hidden}\
         <p><label>Recovery<select name=\"recovery\" id=\"recovery\">{options}</select></label></p>\
         <p><label style=\"flex-direction:row;gap:6px\"><input type=\"checkbox\" name=\"force\" value=\"yes\" id=\"force\">\
         Force: requeue even when the recovery does not fit the reason</label></p>\
         <button type=\"submit\" id=\"do\">Requeue {count} dead letters</button> \
         <a class=\"button\" href=\"/dead{back}\">Cancel</a></form></div>{list}",
        what = describe(filter),
        count = esc(&p.count()),
        csrf = csrf_field(v),
        hidden = filter_hidden(filter),
        back = attr(&filter_query(filter, &[])),
        list = preview_list(p, now_ms),
    )
}

pub fn requeued(done: &triage::Requeued) -> String {
    let mut out = format!(
        "<h1>Requeued</h1><div class=\"card\"><p class=\"ok\" id=\"result\">Requeued <b>{}</b> actors ({} dead letters removed).</p>",
        done.actors.len(),
        done.dead_letters_removed
    );
    if !done.republished.is_empty() {
        let _ =
            write!(out, "<p>Published again {} requeues left by an interrupted command.</p>", done.republished.len());
    }
    if !done.outcomes.is_empty() {
        out.push_str("<table><tr><th>actor</th><th>outcome</th></tr>");
        for (a, o) in &done.outcomes {
            let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", esc(a), esc(o));
        }
        out.push_str("</table>");
    }
    if !done.skipped.is_empty() {
        let _ = write!(out, "<h2>Skipped ({})</h2><ul class=\"skipped\">", done.skipped.len());
        for s in done.skipped.iter().take(200) {
            let _ = write!(out, "<li>{}</li>", esc(s));
        }
        out.push_str("</ul>");
    }
    let list: Vec<String> = done
        .actors
        .iter()
        .take(200)
        .map(|a| format!("<a href=\"/dead/actor/{}\">{}</a>", url_part(a), esc(a)))
        .collect();
    if !list.is_empty() {
        let _ = write!(out, "<p>Actors: {}</p>", list.join(", "));
    }
    out.push_str("<p><a class=\"button\" href=\"/dead\">Back to the dead letters</a><a class=\"button\" href=\"/campaigns\">Campaigns</a></p></div>");
    out
}

pub fn confirm_purge(filter: &Filter, p: &Preview, now_ms: i64, v: &Viewer<'_>) -> String {
    format!(
        "<h1>Purge dead letters</h1><div class=\"card\"><p>Purge {what}: <b id=\"count\">{count}</b> dead letters. \
         They are dropped for good (each actor's audit record notes the purge), as <code>ferry-producer dlq purge --yes</code> does.</p>\
         <form method=\"post\" action=\"/actions/purge\" id=\"confirm\">{csrf}{hidden}\
         <button type=\"submit\" class=\"danger\" id=\"do\">Purge {count} dead letters</button> \
         <a class=\"button\" href=\"/dead{back}\">Cancel</a></form></div>{list}",
        what = describe(filter),
        count = esc(&p.count()),
        csrf = csrf_field(v),
        hidden = filter_hidden(filter),
        back = attr(&filter_query(filter, &[])),
        list = preview_list(p, now_ms),
    )
}

pub fn purged(n: u64) -> String {
    format!(
        "<h1>Purged</h1><div class=\"card\"><p class=\"ok\" id=\"result\">Purged <b>{n}</b> dead letters \
         (noted in each actor's audit record).</p><p><a class=\"button\" href=\"/dead\">Back to the dead letters</a></p></div>"
    )
}

pub fn confirm_sweep(filter: &Filter, dry: &triage::Swept, v: &Viewer<'_>) -> String {
    format!(
        "<h1>Sweep dead letters of settled actors</h1><div class=\"card\"><p>Selected: {what}, {checked} now; \
         <b id=\"count\">{count}</b> of them belong to actors whose v2 head is settled since ({migrated} migrated, {native} \
         native). Sweeping takes them out and records each actor's skip in its audit record (an audit that \
         already records the migration is kept), as <code>ferry-producer dlq sweep</code> does; every other \
         dead letter stays.</p>\
         <form method=\"post\" action=\"/actions/sweep\" id=\"confirm\">{csrf}{hidden}\
         <button type=\"submit\" id=\"do\">Sweep {count} dead letters</button> \
         <a class=\"button\" href=\"/dead{back}\">Cancel</a></form></div>",
        what = describe(filter),
        checked = dry.checked,
        count = dry.removed(),
        migrated = dry.migrated,
        native = dry.native,
        csrf = csrf_field(v),
        hidden = filter_hidden(filter),
        back = attr(&filter_query(filter, &[])),
    )
}

pub fn swept(s: &triage::Swept) -> String {
    let changed = if s.changed > 0 {
        format!(
            "<p class=\"warn\" id=\"changed\">{} changed while the sweep read them and were left: sweep again to look at them.</p>",
            s.changed
        )
    } else {
        String::new()
    };
    format!(
        "<h1>Swept</h1><div class=\"card\"><p class=\"ok\" id=\"result\">Removed <b>{removed}</b> of {checked} dead letters \
         ({migrated} migrated, {native} native; each actor's skip is in its audit record).</p>{changed}\
         <p><a class=\"button\" href=\"/dead\">Back to the dead letters</a></p></div>",
        removed = s.removed(),
        checked = s.checked,
        migrated = s.migrated,
        native = s.native,
    )
}

pub fn confirm_verify(campaign: &str, migrated: u64, v: &Viewer<'_>) -> String {
    format!(
        "<h1>Verify campaign {name}</h1><div class=\"card\"><p>Rebuild every migrated actor of <b>{name}</b> from v2 and \
         compare it with v1 and the checksum recorded at migration, as <code>ferry-producer verify --campaign</code> does \
         (reads only; about <b>{migrated}</b> actors, each read whole).</p>\
         <form method=\"post\" action=\"/actions/verify\" id=\"confirm\">{csrf}{hidden}\
         <button type=\"submit\" id=\"do\">Verify</button> <a class=\"button\" href=\"/campaigns\">Cancel</a></form></div>",
        name = esc(campaign),
        csrf = csrf_field(v),
        hidden = hidden("campaign", campaign),
    )
}

pub fn verified(campaign: &str, r: &crate::verify::VerifyReport) -> String {
    let verdict = if r.checked == 0 {
        "<p class=\"warn\" id=\"result\">Nothing to verify: the campaign has no migrated actor.</p>".to_string()
    } else if r.clean() && r.moved_on() > 0 {
        format!(
            "<p class=\"ok\" id=\"result\">No mismatch in <b>{}</b> actors: v2 matches v1 and the migration, but \
             for {} that have written v2 since their migration (not compared).</p>",
            r.checked,
            r.moved_on()
        )
    } else if r.clean() {
        format!(
            "<p class=\"ok\" id=\"result\">All <b>{}</b> actors verified: v2 matches v1 and the migration.</p>",
            r.checked
        )
    } else {
        format!("<p class=\"err\" id=\"result\">{} of {} actors do not match.</p>", r.mismatches(), r.checked)
    };
    let mut out = format!(
        "<h1>Verified {}</h1><div class=\"card\">{verdict}<table><tr><th>verdict</th><th class=\"n\">actors</th></tr>",
        esc(campaign)
    );
    for (k, n) in &r.counts {
        let _ = write!(out, "<tr><td>{}</td><td class=\"n\">{n}</td></tr>", esc(k));
    }
    out.push_str("</table>");
    if !r.problems.is_empty() {
        out.push_str("<h2>Problems</h2><table><tr><th>actor</th><th>verdict</th><th>detail</th></tr>");
        for p in r.problems.iter().take(500) {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{:?}</td><td>{}</td></tr>",
                esc(&p.actor),
                p.verdict,
                esc(p.detail.as_deref().unwrap_or(""))
            );
        }
        out.push_str("</table>");
    }
    out.push_str("<p><a class=\"button\" href=\"/campaigns\">Campaigns</a></p></div>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(actor: &str, error: &str, reason: DeadLetterReason) -> DeadLetter {
        DeadLetter {
            actor_id: actor.into(),
            campaign: "c1".into(),
            reason,
            phase: "read".into(),
            error: error.into(),
            attempts: 1,
            worker: "w".into(),
            at_ms: 1_763_900_000_000,
            v1_files: None,
            recovery: None,
            message: "<i>body</i>".into(),
        }
    }

    const V: Viewer<'static> = Viewer { csrf: "tok", read_only: false, logged_in: false };
    const RO: Viewer<'static> = Viewer { csrf: "tok", read_only: true, logged_in: false };

    #[test]
    fn the_list_escapes_ids_and_errors_and_links_only_real_actors() {
        let page = Page {
            letters: vec![
                letter("a-1", "<script>alert(1)</script>", DeadLetterReason::JournalSidecar),
                letter("<img src=x onerror=alert(2)>", "bad", DeadLetterReason::BadMessage),
            ],
            next: Some("journal_sidecar/c1/a-1".into()),
        };
        let html = dead_letters(&Summary::default(), &Filter::default(), &page, None, 1_763_900_100_000, &V);
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !html.contains("<script"), "{html}");
        assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;") && !html.contains("<img"), "{html}");
        assert!(html.contains("href=\"/dead/actor/a-1\""));
        assert!(html.contains("after=journal_sidecar%2Fc1%2Fa-1"), "{html}");
        assert!(html.contains("2025-11-23 12:13:20 UTC") && !html.contains("1763900000000"), "{html}");
        assert!(html.contains("/actions/requeue"));
        let ro = dead_letters(&Summary::default(), &Filter::default(), &page, None, 0, &RO);
        assert!(!ro.contains("/actions/") && !ro.contains("method=\"post\""), "read-only shows no action");
    }

    #[test]
    fn the_recovery_that_fits_is_offered_first() {
        assert_eq!(fitting(DeadLetterReason::JournalSidecar), vec![Recovery::RollbackJournal]);
        assert_eq!(fitting(DeadLetterReason::ShmSidecar), vec![Recovery::DiscardShm, Recovery::CheckpointWal]);
        assert_eq!(fitting(DeadLetterReason::IntegrityCheckFailed), vec![Recovery::Force]);
        assert!(fitting(DeadLetterReason::Oversize).is_empty());
        let filter = Filter { reason: Some(DeadLetterReason::JournalSidecar), ..Filter::default() };
        let p = Preview { letters: vec![letter("a-1", "e", DeadLetterReason::JournalSidecar)], more: false };
        let html = confirm_requeue(&filter, &p, 0, &V, false);
        assert!(html.contains("<option value=\"rollback_journal\" selected>"), "{html}");
        assert!(html.contains("checkpoint_wal — does not fit journal_sidecar: needs force"), "{html}");
        assert!(
            html.contains("name=\"csrf\" value=\"tok\"") && html.contains("name=\"reason\" value=\"journal_sidecar\"")
        );
    }
}
