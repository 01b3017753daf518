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

/// The URL with any password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => {
            // A password can also ride in the query string.
            let redacted: Vec<String> = tail
                .split('&')
                .map(|p| match p.split_once("password=") {
                    Some((pre, _)) => format!("{pre}password=***"),
                    None => p.to_string(),
                })
                .collect();
            format!("{scheme}://{authority}{}", redacted.join("&"))
        }
    }
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
