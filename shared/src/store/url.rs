//! Store URLs: `sqlite:PATH` and `postgres://user:pass@host/db?sslmode=require&schema=NAME`.
//! Owns the rule that a password never leaves this module except to the driver.

use super::StoreError;

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite { path: String },
    Postgres(PostgresUrl),
}

/// A PostgreSQL URL with ferry's own parameters taken out.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    /// The URL as the driver takes it (ferry's parameters removed).
    pub conninfo: String,
    /// Schema holding the `kv` table (default `public`); lets tests and campaigns share a server.
    pub schema: Option<String>,
    /// `sslmode=require` (or `verify-full`) was asked for.
    pub tls: bool,
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUrl")
            .field("conninfo", &redact(&self.conninfo))
            .field("schema", &self.schema)
            .field("tls", &self.tls)
            .finish()
    }
}

impl PostgresUrl {
    /// Whether the driver URL sets query parameter `name` (an operator's override).
    pub fn has_param(&self, name: &str) -> bool {
        let query = self.conninfo.split_once('?').map_or("", |(_, q)| q);
        query.split('&').any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
    }
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(StoreError::InvalidUrl("sqlite: URL needs a path".into()));
            }
            return Ok(StoreUrl::Sqlite { path: path.to_string() });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return parse_postgres(url).map(StoreUrl::Postgres);
        }
        Err(StoreError::InvalidUrl(format!("{}: expected sqlite:PATH or postgres://...", redact(url))))
    }
}

fn parse_postgres(url: &str) -> Result<PostgresUrl, StoreError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut schema = None;
    let mut tls = false;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "schema" => {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(StoreError::InvalidUrl(format!("schema {v:?}: use letters, digits and _")));
                }
                schema = Some(v.to_ascii_lowercase());
            }
            "sslmode" => {
                tls = matches!(v, "require" | "verify-ca" | "verify-full");
                // The driver knows only disable/prefer/require; verification is ferry's.
                let driver_mode = if tls { "require" } else { v };
                kept.push(format!("sslmode={driver_mode}"));
            }
            _ => kept.push(pair.to_string()),
        }
    }
    let conninfo = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok(PostgresUrl { conninfo, schema, tls })
}

/// The URL with every password replaced by `***`, for logs and errors: the userinfo's
/// password and any secret-named query parameter (`password`, `sslpassword`, ... in any case,
/// percent-encoded or not), in any scheme. Also a string that is not a URL at all (a libpq
/// `key=value` string given by mistake) has its secret-named values masked. Unusual URLs are
/// masked too much rather than too little.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // The userinfo ends at the last `@` before the first `/`, `?` or `#` that follows the
    // first `@`: a password written with an unencoded `@`, `/` or `?` is still all masked.
    let (userinfo, after) = match (scheme, rest.find('@')) {
        (Some(_), Some(first)) => {
            let end = rest[first..].find(['/', '?', '#']).map_or(rest.len(), |i| first + i);
            let at = rest[..end].rfind('@').unwrap_or(first);
            (Some(&rest[..at]), &rest[at + 1..])
        }
        _ => (None, rest),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***");
            }
            None => out.push_str(userinfo),
        }
        out.push('@');
    }
    out.push_str(after);
    // Any query, wherever it starts (a password with a `?` in it is already masked).
    match (scheme, out.find('?')) {
        (Some(_), Some(q)) => format!("{}{}", &out[..=q], redact_pairs(&out[q + 1..])),
        (Some(_), None) => out,
        (None, _) => redact_pairs(&out),
    }
}

/// `key=value` pairs (separated by `&`, `;` or whitespace, the separators kept) with the value
/// of every secret-named key masked.
fn redact_pairs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['&', ';', ' ', '\t', '\n']).unwrap_or(rest.len());
        let (pair, tail) = rest.split_at(end);
        match pair.split_once('=') {
            Some((key, _)) if secret_key(key) => {
                out.push_str(key);
                out.push_str("=***");
            }
            _ => out.push_str(pair),
        }
        let sep = tail.chars().next().map_or(0, char::len_utf8);
        out.push_str(&tail[..sep]);
        rest = &tail[sep..];
    }
    out
}

/// Whether a parameter name (percent-decoded, any case) names a secret.
fn secret_key(key: &str) -> bool {
    let decoded = percent_decode(key).to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|s| decoded.contains(s))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits: at most 0xff, so the cast cannot truncate.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("postgres://h/db?user=u&password=secret"), "postgres://h/db?user=u&password=***");
        assert_eq!(redact("sqlite:./x.db"), "sqlite:./x.db");
    }

    #[test]
    fn no_form_of_password_survives_redaction() {
        let cases = [
            ("postgres://u:s3cr3t@h/db?password=s3cr3t", "postgres://u:***@h/db?password=***"),
            ("postgres://h/db?Password=s3cr3t&schema=x", "postgres://h/db?Password=***&schema=x"),
            ("postgres://h/db?PASSWORD=s3cr3t", "postgres://h/db?PASSWORD=***"),
            ("postgres://h/db?pass%77ord=s3cr3t", "postgres://h/db?pass%77ord=***"),
            ("postgres://h/db?%70assword=s3cr3t", "postgres://h/db?%70assword=***"),
            ("postgres://h/db?sslpassword=s3cr3t;user=u", "postgres://h/db?sslpassword=***;user=u"),
            ("postgresql://u:p%40s3cr3t@h:5432/db", "postgresql://u:***@h:5432/db"),
            ("postgres://u:p@s3cr3t@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p/s3cr3t?x@h/db", "postgres://u:***@h/db"),
            ("amqp://u:s3cr3t@h:5672/%2f?password=s3cr3t", "amqp://u:***@h:5672/%2f?password=***"),
            ("amqps://u:s3cr3t@h/vhost?heartbeat=10", "amqps://u:***@h/vhost?heartbeat=10"),
            ("host=h user=u password=s3cr3t dbname=d", "host=h user=u password=*** dbname=d"),
            ("postgres://h/db?user=a@b&password=s3cr3t", "postgres://h/db?user=a@b&password=***"),
        ];
        for (url, want) in cases {
            let got = redact(url);
            assert_eq!(got, want, "{url}");
            assert!(!got.contains("s3cr3t"), "{url} -> {got}");
        }
        // Nothing else is touched.
        for url in ["postgres://u@h/db?user=a&sslmode=require", "amqp://h/%2f", "sqlite:/var/lib/ferry.db"] {
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn a_parse_error_names_the_url_without_its_password() {
        let err = StoreUrl::parse("mysql://u:s3cr3t@h/db?password=s3cr3t").unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        let err = StoreUrl::parse("host=h password=s3cr3t").unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn ferry_parameters_are_taken_out_of_postgres_urls() {
        let StoreUrl::Postgres(p) = StoreUrl::parse("postgres://u:p@h/db?schema=camp_1&sslmode=verify-full").unwrap()
        else {
            panic!("not postgres")
        };
        assert_eq!(p.schema.as_deref(), Some("camp_1"));
        assert!(p.tls);
        assert_eq!(p.conninfo, "postgres://u:p@h/db?sslmode=require");
        assert!(StoreUrl::parse("postgres://h/db?schema=a;drop").is_err());
    }

    #[test]
    fn sqlite_urls_take_a_path() {
        assert_eq!(StoreUrl::parse("sqlite:./ferry.db").unwrap(), StoreUrl::Sqlite { path: "./ferry.db".into() });
        assert!(StoreUrl::parse("sqlite:").is_err());
        assert!(StoreUrl::parse("mysql://x").is_err());
    }
}
