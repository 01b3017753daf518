//! The console's HTTP routes and the guard every request passes.
//!
//! Invariants: [`guard`] runs before every handler: security headers on every response, the
//! Host check of an open console, the token (bearer or session cookie) of a console that has
//! one (401 with the login form otherwise); every POST handler calls [`State::admit_post`]
//! before it reads anything: read-only refuses (403), a missing or wrong CSRF token refuses
//! (403); an action's GET only reads (its confirmation page).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Extension, Form, Path, Query, Request, State as Shared};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::auth::{self, Identity};
use super::html::{Frame, Tab, page};
use super::pages::{self, Preview, Viewer};
use super::{State, campaigns};
use crate::actor::ActorId;
use crate::clock::{Clock, SystemClock};
use crate::reason::DeadLetterReason;
use crate::recovery::Recovery;
use crate::triage::{self, Filter};

type App = Arc<State>;

pub(crate) fn router(state: App) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/campaigns") }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/campaigns", get(campaigns_page))
        .route("/dead", get(dead_page))
        .route("/dead/actor/{actor}", get(actor_page))
        .route("/actions/requeue", get(confirm_requeue).post(requeue))
        .route("/actions/purge", get(confirm_purge).post(purge))
        .route("/actions/sweep", get(confirm_sweep).post(sweep))
        .route("/actions/verify", get(confirm_verify).post(verify))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn now() -> i64 {
    SystemClock.now_ms()
}

/// A page, or a refusal rendered as one.
struct Html(StatusCode, String);

impl IntoResponse for Html {
    fn into_response(self) -> Response {
        let mut r = (self.0, self.1).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        r
    }
}

impl State {
    fn frame<'a>(&'a self, title: &'a str, tab: Tab, refresh_secs: Option<u64>) -> Frame<'a> {
        Frame {
            title,
            tab,
            mode: if self.config.read_only { "read-only" } else { "actions enabled" },
            footer: &self.footer,
            refresh_secs,
        }
    }

    fn html(&self, status: StatusCode, title: &str, tab: Tab, body: &str) -> Html {
        Html(status, page(&self.frame(title, tab, None), body))
    }

    fn fail(&self, status: StatusCode, title: &str, message: &str) -> Html {
        self.html(status, title, Tab::None, &pages::failure(title, message))
    }

    fn viewer<'a>(&self, who: &Identity, csrf: &'a str) -> Viewer<'a> {
        Viewer { csrf, read_only: self.config.read_only, logged_in: matches!(who, Identity::Session(_)) }
    }

    /// What every POST must pass first: not read-only, and the viewer's CSRF token.
    fn admit_post(&self, who: &Identity, form: &HashMap<String, String>) -> Result<(), Html> {
        if self.config.read_only {
            return Err(self.fail(StatusCode::FORBIDDEN, "Refused", "this console is read-only: it takes no action"));
        }
        if !self.keys.csrf_ok(who, form.get("csrf").map(String::as_str)) {
            return Err(self.fail(
                StatusCode::FORBIDDEN,
                "Refused",
                "missing or wrong CSRF token: submit the form from the console's own page",
            ));
        }
        Ok(())
    }

    /// Refuses an action's page when the console is read-only.
    fn actions_allowed(&self) -> Result<(), Html> {
        if self.config.read_only {
            return Err(self.fail(StatusCode::FORBIDDEN, "Refused", "this console is read-only: it takes no action"));
        }
        Ok(())
    }
}

/// Security headers, Host check, authentication.
async fn guard(Shared(state): Shared<App>, mut req: Request, next: Next) -> Response {
    let mut response = admit(&state, &mut req).await;
    if response.is_none() {
        response = Some(next.run(req).await);
    }
    // Set just above when it was not already.
    let mut response = response.expect("a response");
    let h = response.headers_mut();
    // No script may run and nothing may load from elsewhere, whatever a page holds.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `None` when the request may go on (its [`Identity`] added), or the refusal.
async fn admit(state: &State, req: &mut Request) -> Option<Response> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return None;
    }
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !state.keys.requires_login() && !auth::host_is_local(host) {
        return Some(
            state
                .fail(
                    StatusCode::MISDIRECTED_REQUEST,
                    "Refused",
                    "a console without an access token answers only to localhost or an IP address",
                )
                .into_response(),
        );
    }
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let cookie = headers.get(header::COOKIE).and_then(|v| v.to_str().ok());
    match state.keys.identify(authorization, cookie, now()) {
        Some(who) => {
            req.extensions_mut().insert(who);
            None
        }
        None if path == "/login" => None,
        None => {
            let body = pages::login(&state.keys.login_csrf(), authorization.map(|_| "wrong access token"));
            let mut r = state.html(StatusCode::UNAUTHORIZED, "Log in", Tab::None, &body).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ferry-console\""));
            Some(r)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Login

async fn login_page(Shared(state): Shared<App>, headers: axum::http::HeaderMap) -> Response {
    let header = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let who = state.keys.identify(header(header::AUTHORIZATION), header(header::COOKIE), now());
    if who.is_some() || !state.keys.requires_login() {
        return Redirect::to("/campaigns").into_response();
    }
    state.html(StatusCode::OK, "Log in", Tab::None, &pages::login(&state.keys.login_csrf(), None)).into_response()
}

async fn login(Shared(state): Shared<App>, Form(form): Form<HashMap<String, String>>) -> Response {
    if !state.keys.requires_login() {
        return Redirect::to("/campaigns").into_response();
    }
    if !state.keys.login_csrf_ok(form.get("csrf").map(String::as_str)) {
        return state.fail(StatusCode::FORBIDDEN, "Refused", "missing or wrong CSRF token").into_response();
    }
    let given = form.get("token").map(String::as_str).unwrap_or("");
    if !state.keys.token_matches(given) {
        // Slows guessing; the comparison itself is constant-time.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        tracing::warn!("console login refused: wrong access token");
        let body = pages::login(&state.keys.login_csrf(), Some("wrong access token"));
        return state.html(StatusCode::UNAUTHORIZED, "Log in", Tab::None, &body).into_response();
    }
    let session = state.keys.new_session(now());
    let cookie = auth::set_cookie(&session, state.config.secure_cookie);
    let mut r = Redirect::to("/campaigns").into_response();
    // A cookie value of hex, digits and a dot is a valid header value.
    r.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("cookie is ASCII"));
    r
}

async fn logout(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !state.keys.csrf_ok(&who, form.get("csrf").map(String::as_str)) {
        return state.fail(StatusCode::FORBIDDEN, "Refused", "missing or wrong CSRF token").into_response();
    }
    let mut r = Redirect::to("/login").into_response();
    let clear = format!("{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0", auth::COOKIE);
    // ASCII by construction.
    r.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("cookie is ASCII"));
    r
}

// ---------------------------------------------------------------------------------------------
// Campaigns

async fn overview(state: &State) -> Result<Arc<campaigns::Overview>, Html> {
    let mut cached = state.overview.lock().await;
    if let Some((at, o)) = cached.as_ref()
        && at.elapsed() < state.config.refresh
    {
        return Ok(o.clone());
    }
    let window = i64::try_from(state.config.chart_window.as_millis()).unwrap_or(i64::MAX / 2);
    let o = campaigns::overview(&*state.store, state.config.broker.as_ref(), window, now())
        .await
        .map(Arc::new)
        .map_err(|e| state.fail(StatusCode::INTERNAL_SERVER_ERROR, "Store error", &e.to_string()))?;
    *cached = Some((Instant::now(), o.clone()));
    Ok(o)
}

async fn campaigns_page(Shared(state): Shared<App>, Extension(who): Extension<Identity>) -> Result<Html, Html> {
    let o = overview(&state).await?;
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    // Reloads at the interval its read is reused for; with no reuse (0), it does not reload.
    let refresh = Some(state.config.refresh.as_secs()).filter(|s| *s > 0);
    let body = format!("{}{}", pages::logout_form(&v), pages::campaigns(&o, &v, refresh));
    Ok(Html(StatusCode::OK, page(&state.frame("Campaigns", Tab::Campaigns, refresh), &body)))
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// A filter as a form or query string gives it: empty fields are absent.
fn filter_of(state: &State, q: &HashMap<String, String>) -> Result<Filter, Html> {
    let field = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let bad = |m: String| state.fail(StatusCode::BAD_REQUEST, "Bad filter", &m);
    let reason = match field("reason") {
        Some(r) => Some(DeadLetterReason::parse(r).ok_or_else(|| bad(format!("unknown reason {r:?}")))?),
        None => None,
    };
    let campaign = match field("campaign") {
        Some(c) if crate::jobs::message::valid_campaign(c) => Some(c.to_string()),
        Some(c) => return Err(bad(format!("{c:?} is not a campaign name"))),
        None => None,
    };
    let actor_prefix = match field("prefix") {
        Some(p) => {
            triage::index::check_actor_prefix(p).map_err(bad)?;
            Some(p.to_string())
        }
        None => None,
    };
    let actors = match field("actor") {
        Some(a) => vec![ActorId::parse(a).map_err(|e| bad(format!("actor {a:?}: {e}")))?.to_string()],
        None => vec![],
    };
    Ok(Filter { reason, actors, campaign, actor_prefix })
}

fn store_error(state: &State, e: impl std::fmt::Display) -> Html {
    state.fail(StatusCode::INTERNAL_SERVER_ERROR, "Store error", &e.to_string())
}

async fn dead_page(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html, Html> {
    let filter = filter_of(&state, &q)?;
    let after = q.get("after").map(String::as_str).filter(|a| !a.is_empty());
    let summary = triage::summary(&state.store).await.map_err(|e| store_error(&state, e))?;
    let page_ =
        triage::page(&state.store, &filter, state.config.page_size, after).await.map_err(|e| store_error(&state, e))?;
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    let body =
        format!("{}{}", pages::logout_form(&v), pages::dead_letters(&summary, &filter, &page_, after, now(), &v));
    Ok(state.html(StatusCode::OK, "Dead letters", Tab::DeadLetters, &body))
}

async fn actor_page(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Path(actor): Path<String>,
) -> Result<Html, Html> {
    let actor =
        ActorId::parse(&actor).map_err(|e| state.fail(StatusCode::BAD_REQUEST, "Bad actor id", &e.to_string()))?;
    let shown = triage::show(&state.store, &actor).await.map_err(|e| store_error(&state, e))?;
    // `show` gives the head as text; decoded here for its fields and creation time.
    let head = state
        .store
        .get(&crate::v2::keys::meta(&actor))
        .await
        .map_err(|e| store_error(&state, e))?
        .and_then(|raw| crate::v2::DBHead::decode(&raw).ok());
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    let title = format!("Actor {actor}");
    Ok(state.html(StatusCode::OK, &title, Tab::DeadLetters, &pages::actor(&shown, head.as_ref(), now(), &v)))
}

// ---------------------------------------------------------------------------------------------
// Actions

/// Letters previewed on a confirmation page.
const PREVIEW: usize = 1000;

async fn preview(state: &State, filter: &Filter) -> Result<Preview, Html> {
    let p = triage::page(&state.store, filter, PREVIEW, None).await.map_err(|e| store_error(state, e))?;
    Ok(Preview { more: p.next.is_some(), letters: p.letters })
}

fn busy(state: &State) -> Html {
    state.fail(StatusCode::CONFLICT, "Busy", "another action is running: wait for it and try again")
}

async fn confirm_requeue(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.actions_allowed()?;
    let filter = filter_of(&state, &q)?;
    let p = preview(&state, &filter).await?;
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    let body = pages::confirm_requeue(&filter, &p, now(), &v, state.config.broker.is_none());
    Ok(state.html(StatusCode::OK, "Requeue", Tab::DeadLetters, &body))
}

async fn requeue(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.admit_post(&who, &form)?;
    let filter = filter_of(&state, &form)?;
    let recovery = match form.get("recovery").map(String::as_str).filter(|r| !r.is_empty()) {
        Some(r) => Some(r.parse::<Recovery>().map_err(|e| state.fail(StatusCode::BAD_REQUEST, "Bad recovery", &e))?),
        None => None,
    };
    let force = form.get("force").is_some_and(|f| f == "yes");
    // Refused here as a whole when the filter names the reason; otherwise the library checks
    // each letter and skips the ones the recovery does not fit.
    if let Some(reason) = filter.reason
        && !force
        && !triage::recovery_fits(reason, recovery)
    {
        return Err(state.fail(
            StatusCode::BAD_REQUEST,
            "Refused",
            &format!(
                "recovery {} does not fit reason {reason}: tick force to requeue anyway",
                recovery.map_or("none", |r| r.as_str())
            ),
        ));
    }
    let Ok(_running) = state.action.try_lock() else { return Err(busy(&state)) };
    let done = triage::requeue(&state.store, &state.source(), &filter, recovery, force)
        .await
        .map_err(|e| state.fail(StatusCode::INTERNAL_SERVER_ERROR, "Requeue failed", &e.to_string()))?;
    tracing::info!(
        actors = done.actors.len(),
        removed = done.dead_letters_removed,
        skipped = done.skipped.len(),
        recovery = recovery.map_or("none", |r| r.as_str()),
        force,
        "console: requeued"
    );
    Ok(state.html(StatusCode::OK, "Requeued", Tab::DeadLetters, &pages::requeued(&done)))
}

async fn confirm_purge(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.actions_allowed()?;
    let filter = filter_of(&state, &q)?;
    let p = preview(&state, &filter).await?;
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    Ok(state.html(StatusCode::OK, "Purge", Tab::DeadLetters, &pages::confirm_purge(&filter, &p, now(), &v)))
}

async fn purge(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.admit_post(&who, &form)?;
    let filter = filter_of(&state, &form)?;
    let Ok(_running) = state.action.try_lock() else { return Err(busy(&state)) };
    let n = triage::purge(&state.store, &filter).await.map_err(|e| store_error(&state, e))?;
    tracing::info!(purged = n, "console: purged dead letters");
    Ok(state.html(StatusCode::OK, "Purged", Tab::DeadLetters, &pages::purged(n)))
}

/// `dlq sweep`: the confirmation shows what a dry run of the same filter counts.
async fn confirm_sweep(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.actions_allowed()?;
    let filter = filter_of(&state, &q)?;
    let dry = triage::sweep(&state.store, &filter, true, &crate::telemetry::default_worker_id())
        .await
        .map_err(|e| store_error(&state, e))?;
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    Ok(state.html(StatusCode::OK, "Sweep", Tab::DeadLetters, &pages::confirm_sweep(&filter, &dry, &v)))
}

async fn sweep(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.admit_post(&who, &form)?;
    let filter = filter_of(&state, &form)?;
    let Ok(_running) = state.action.try_lock() else { return Err(busy(&state)) };
    let swept = triage::sweep(&state.store, &filter, false, &crate::telemetry::default_worker_id())
        .await
        .map_err(|e| store_error(&state, e))?;
    tracing::info!(
        checked = swept.checked,
        migrated = swept.migrated,
        native = swept.native,
        changed = swept.changed,
        "console: swept the dead letters of settled actors"
    );
    Ok(state.html(StatusCode::OK, "Swept", Tab::DeadLetters, &pages::swept(&swept)))
}

fn campaign_of(state: &State, q: &HashMap<String, String>) -> Result<String, Html> {
    match q.get("campaign").map(|c| c.trim()) {
        Some(c) if crate::jobs::message::valid_campaign(c) => Ok(c.to_string()),
        _ => Err(state.fail(StatusCode::BAD_REQUEST, "Bad campaign", "verify needs a campaign name")),
    }
}

async fn confirm_verify(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.actions_allowed()?;
    let campaign = campaign_of(&state, &q)?;
    let o = overview(&state).await?;
    let migrated =
        o.campaigns.iter().find(|c| c.name == campaign).map_or(0, |c| {
            ["migrated", "skipped_already_migrated"].iter().filter_map(|k| c.counts.outcomes.get(*k)).sum()
        });
    let csrf = state.keys.csrf(&who);
    let v = state.viewer(&who, &csrf);
    Ok(state.html(StatusCode::OK, "Verify", Tab::Campaigns, &pages::confirm_verify(&campaign, migrated, &v)))
}

async fn verify(
    Shared(state): Shared<App>,
    Extension(who): Extension<Identity>,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Html, Html> {
    state.admit_post(&who, &form)?;
    let campaign = campaign_of(&state, &form)?;
    let Ok(_running) = state.action.try_lock() else { return Err(busy(&state)) };
    let report = crate::verify::verify(&*state.store, &crate::verify::Selection::Campaign(campaign.clone()), || {})
        .await
        .map_err(|e| store_error(&state, e))?;
    tracing::info!(checked = report.checked, problems = report.problems.len(), "console: verified a campaign");
    Ok(state.html(StatusCode::OK, "Verified", Tab::Campaigns, &pages::verified(&campaign, &report)))
}
