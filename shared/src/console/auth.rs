//! Who may use the console: the access token, the session cookie a login sets, the CSRF token
//! of every state-changing form, and the Host check of an open (tokenless) console.
//!
//! Invariants:
//! - the token is compared in constant time ([`subtle`]) and is never logged, displayed or put
//!   in a cookie: the cookie holds an HMAC of this process's random secret and the session's
//!   expiry, so it proves a login to this process and is worth nothing to another one or after
//!   a restart;
//! - a CSRF token is an HMAC of the same secret and the requester's identity (its session, the
//!   bearer token's digest, or `open`): a page of this console can embed it, another site
//!   cannot compute or read it, and a POST without the right one is refused before anything
//!   is read from the store;
//! - a console without a token (only allowed on loopback) serves only requests whose `Host` is
//!   a loopback name or an IP literal, so a DNS-rebinding page cannot talk to it through a
//!   name of its own.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The cookie a login sets.
pub const COOKIE: &str = "ferry_console";
/// How long a login lasts.
pub const SESSION_MS: i64 = 12 * 3600 * 1000;

/// Constant-time equality of two byte strings (their lengths are not secret).
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The console's secrets: the access token (if any) and the per-process key of its cookies
/// and CSRF tokens.
pub struct Keys {
    token: Option<String>,
    secret: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the secret.
        f.debug_struct("Keys").field("token", &self.token.as_ref().map(|_| "***")).finish_non_exhaustive()
    }
}

/// Who a request is, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No token is configured: anyone who reaches the (loopback) address.
    Open,
    /// `Authorization: Bearer` with the right token.
    Bearer,
    /// A login cookie, by its value.
    Session(String),
}

impl Keys {
    pub fn new(token: Option<String>) -> Keys {
        Keys { token, secret: rand::random() }
    }

    pub fn requires_login(&self) -> bool {
        self.token.is_some()
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts any key length");
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `candidate` is the access token.
    pub fn token_matches(&self, candidate: &str) -> bool {
        match &self.token {
            // Digests first, so the comparison's length says nothing of the token's.
            Some(token) => same(&Sha256::digest(token.as_bytes()), &Sha256::digest(candidate.as_bytes())),
            None => false,
        }
    }

    /// A session cookie value valid until `now_ms + SESSION_MS`: `{expiry}.{hmac}`.
    pub fn new_session(&self, now_ms: i64) -> String {
        let expiry = now_ms + SESSION_MS;
        format!("{expiry}.{}", hex::encode(self.mac(&[b"session", expiry.to_string().as_bytes()])))
    }

    /// Whether a session cookie value is one this process issued and has not expired.
    pub fn session_valid(&self, value: &str, now_ms: i64) -> bool {
        let Some((expiry, mac)) = value.split_once('.') else { return false };
        let Ok(at) = expiry.parse::<i64>() else { return false };
        let expected = hex::encode(self.mac(&[b"session", expiry.as_bytes()]));
        same(expected.as_bytes(), mac.as_bytes()) && at > now_ms
    }

    /// Who sent a request with these headers, or `None` when it must log in first.
    pub fn identify(&self, authorization: Option<&str>, cookie_header: Option<&str>, now_ms: i64) -> Option<Identity> {
        if self.token.is_none() {
            return Some(Identity::Open);
        }
        if let Some(bearer) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
            return self.token_matches(bearer.trim()).then_some(Identity::Bearer);
        }
        let session = cookie_header.and_then(|h| cookie(h, COOKIE))?;
        self.session_valid(session, now_ms).then(|| Identity::Session(session.to_string()))
    }

    /// The CSRF token of forms shown to `who`.
    pub fn csrf(&self, who: &Identity) -> String {
        let id: Vec<u8> = match who {
            Identity::Open => b"open".to_vec(),
            Identity::Bearer => b"bearer".to_vec(),
            Identity::Session(s) => [b"session:".as_slice(), s.as_bytes()].concat(),
        };
        hex::encode(self.mac(&[b"csrf", &id]))
    }

    /// The CSRF token of the login form (before there is a session).
    pub fn login_csrf(&self) -> String {
        hex::encode(self.mac(&[b"csrf", b"login"]))
    }

    /// Whether `given` is `who`'s CSRF token.
    pub fn csrf_ok(&self, who: &Identity, given: Option<&str>) -> bool {
        given.is_some_and(|g| same(self.csrf(who).as_bytes(), g.as_bytes()))
    }

    pub fn login_csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| same(self.login_csrf().as_bytes(), g.as_bytes()))
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').filter_map(|kv| kv.trim().split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The `Set-Cookie` value of a login: HttpOnly (no script reads it), SameSite=Strict (no
/// other site's request carries it), the whole console's path, for the session's life.
pub fn set_cookie(value: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}", SESSION_MS / 1000)
}

/// Whether a `Host` header names this machine by a loopback name or an IP literal (what an
/// open console accepts: a rebinding attacker's page sends its own DNS name).
pub fn host_is_local(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn the_token_is_accepted_only_exactly() {
        let k = Keys::new(Some("s3cret-token".into()));
        assert!(k.token_matches("s3cret-token"));
        for wrong in ["", "s3cret-toke", "s3cret-token ", "S3cret-token", "s3cret-token-longer"] {
            assert!(!k.token_matches(wrong), "{wrong:?}");
        }
        assert!(!Keys::new(None).token_matches(""), "no token configured accepts nothing as a token");
        assert!(!format!("{k:?}").contains("s3cret"), "Debug never shows the token");
    }

    #[test]
    fn bearer_or_a_valid_session_identifies_and_nothing_else_does() {
        let k = Keys::new(Some("tok".into()));
        assert_eq!(k.identify(Some("Bearer tok"), None, NOW), Some(Identity::Bearer));
        assert_eq!(k.identify(Some("Bearer nope"), None, NOW), None);
        assert_eq!(k.identify(None, None, NOW), None);
        let s = k.new_session(NOW);
        let header = format!("a=b; {COOKIE}={s}; c=d");
        assert_eq!(k.identify(None, Some(&header), NOW), Some(Identity::Session(s.clone())));
        assert_eq!(k.identify(None, Some(&header), NOW + SESSION_MS + 1), None, "expired");
        // A session of another process (another secret) is worth nothing here.
        let other = Keys::new(Some("tok".into())).new_session(NOW);
        assert_eq!(k.identify(None, Some(&format!("{COOKIE}={other}")), NOW), None);
        // A forged expiry breaks the MAC.
        let (_, mac) = s.split_once('.').unwrap();
        assert!(!k.session_valid(&format!("{}.{mac}", NOW + 10 * SESSION_MS), NOW));
        assert_eq!(Keys::new(None).identify(None, None, NOW), Some(Identity::Open));
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_identity_and_the_process() {
        let k = Keys::new(Some("tok".into()));
        let a = Identity::Session(k.new_session(NOW));
        let t = k.csrf(&a);
        assert!(k.csrf_ok(&a, Some(&t)));
        assert!(!k.csrf_ok(&a, None));
        assert!(!k.csrf_ok(&a, Some("")));
        assert!(!k.csrf_ok(&Identity::Bearer, Some(&t)), "another identity's token");
        assert!(!Keys::new(Some("tok".into())).csrf_ok(&a, Some(&t)), "another process's token");
        assert!(k.login_csrf_ok(Some(&k.login_csrf())) && !k.login_csrf_ok(Some(&t)));
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site_strict() {
        let c = set_cookie("v", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"), "{c}");
        assert!(set_cookie("v", true).ends_with("; Secure"));
        assert_eq!(cookie("x=1; ferry_console=abc", COOKIE), Some("abc"));
        assert_eq!(cookie("ferry_console_x=1", COOKIE), None);
    }

    #[test]
    fn an_open_console_serves_loopback_names_and_ip_literals_only() {
        for ok in ["127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "10.0.0.5:80"] {
            assert!(host_is_local(Some(ok)), "{ok}");
        }
        for bad in ["evil.example:8080", "evil.example", "127.0.0.1.nip.io", ""] {
            assert!(!host_is_local(Some(bad)), "{bad}");
        }
        assert!(!host_is_local(None));
    }
}
