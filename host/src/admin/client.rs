//! A client of the admin API ([`super::http`]): what `wagg module
//! upload/list/remove`, `wagg rollout`, `wagg promote` and `wagg rollback`
//! run, and what tests may drive a host with.
//!
//! Errors say what to do: an unreachable API asks whether `wagg run` is
//! running and where it listens; a refusal carries the server's message and
//! status; a 401 points at `--token`/`WAGG_ADMIN_TOKEN`.

use std::fmt::Write as _;
use std::time::Duration;

use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::http::ErrorBody;
use super::{ModuleRecord, ModuleView, RolloutView};

/// Where the CLI looks for the admin API without `--admin`: `[admin]
/// listen`'s default.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9464";

/// Environment variable naming the admin API's URL for the CLI.
pub const ADMIN_URL_ENV: &str = "WAGG_ADMIN";

/// How long the client waits for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client waits for an answer: an upload compiles and
/// test-runs the module, a rollout swaps shards at batch boundaries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The admin URL cannot be used.
    #[error("`{url}` is not a usable admin API address: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// Nothing answers at the admin URL.
    #[error(
        "cannot reach the admin API at {url}: is `wagg run` running? It listens on [admin] listen \
         of its configuration (default 127.0.0.1:9464); point --admin or {ADMIN_URL_ENV} at it"
    )]
    Unreachable {
        /// The URL called.
        url: String,
        /// The connection error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused the call.
    #[error("{message} (HTTP {status}){hint}", hint = hint(*status))]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's explanation.
        message: String,
    },
    /// The call failed on the way (timeout, connection lost, ...).
    #[error("the call to {url} failed")]
    Http {
        /// The URL called.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered something this client does not understand.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL called.
        url: String,
        /// Why it is not understood.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn hint(status: u16) -> &'static str {
    match status {
        401 => "; pass the admin token with --token or WAGG_ADMIN_TOKEN",
        _ => "",
    }
}

/// A client of one host's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client of the API at `base` (`http://host:port`), sending `token`
    /// on every call (an empty token is no token).
    ///
    /// # Errors
    ///
    /// [`ClientError::BadUrl`] if `base` is not an `http://` URL.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadUrl {
            url: base.to_owned(),
            reason,
        };
        let with_scheme = if base.contains("://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        let base_url = Url::parse(&with_scheme).map_err(|e| bad(e.to_string()))?;
        if base_url.scheme() != "http" {
            return Err(bad(format!(
                "the admin API speaks plain http (on loopback), not {}",
                base_url.scheme()
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // The API is on loopback or a private network, never behind the
            // proxy an environment may name for the Internet.
            .no_proxy()
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(AdminClient {
            base: base_url,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The API's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// Uploads a component as `name@version` with `options`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; the server refuses with 422 what is not a valid
    /// module (with the reason), 409 a duplicate, 400 a bad name, 413 a
    /// body over its limit.
    pub async fn upload(
        &self,
        bytes: Vec<u8>,
        name: &str,
        version: &str,
        options: &[(String, String)],
    ) -> Result<ModuleRecord, ClientError> {
        let mut query = vec![("name", name.to_owned()), ("version", version.to_owned())];
        query.extend(options.iter().map(|(k, v)| ("option", format!("{k}={v}"))));
        let url = self.url(&["modules"]);
        let request = self
            .request(Method::POST, url.clone())
            .query(&query)
            .header(reqwest::header::CONTENT_TYPE, "application/wasm")
            .body(bytes);
        self.send(url, request).await
    }

    /// Every module with its state and figures.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn list(&self) -> Result<Vec<ModuleView>, ClientError> {
        let url = self.url(&["modules"]);
        self.send(url.clone(), self.request(Method::GET, url)).await
    }

    /// Removes an idle module by id, id prefix or `name@version`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: 404 for an unknown module, 409 for one in use.
    pub async fn remove(&self, key: &str) -> Result<ModuleRecord, ClientError> {
        let url = self.url(&["modules", key]);
        self.send(url.clone(), self.request(Method::DELETE, url))
            .await
    }

    /// The rollout now.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn rollout(&self) -> Result<RolloutView, ClientError> {
        let url = self.url(&["rollout"]);
        self.send(url.clone(), self.request(Method::GET, url)).await
    }

    /// Puts `candidate` on `weight` percent of the shards.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn set_rollout(
        &self,
        candidate: &str,
        weight: u8,
    ) -> Result<RolloutView, ClientError> {
        #[derive(Serialize)]
        struct Body<'a> {
            candidate: &'a str,
            weight: u8,
        }
        let url = self.url(&["rollout"]);
        let request = self
            .request(Method::PUT, url.clone())
            .json(&Body { candidate, weight });
        self.send(url, request).await
    }

    /// Has the host write every open bucket now; returns its flushed
    /// watermark (Unix seconds).
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn flush(&self) -> Result<u64, ClientError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            flushed_watermark: u64,
        }
        let url = self.url(&["flush"]);
        let answer: Answer = self
            .send(url.clone(), self.request(Method::POST, url))
            .await?;
        Ok(answer.flushed_watermark)
    }

    /// Makes the candidate the incumbent on every shard.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: 409 without a candidate.
    pub async fn promote(&self) -> Result<RolloutView, ClientError> {
        let url = self.url(&["rollout", "promote"]);
        self.send(url.clone(), self.request(Method::POST, url))
            .await
    }

    /// Takes the candidate off every shard, recording `reason`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: 409 without a candidate.
    pub async fn rollback(&self, reason: Option<&str>) -> Result<RolloutView, ClientError> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
        }
        let url = self.url(&["rollout", "rollback"]);
        let request = self
            .request(Method::POST, url.clone())
            .json(&Body { reason });
        self.send(url, request).await
    }

    /// Runs `candidate` in shadow on `shards`, or on `share` percent of the
    /// incumbent's shards, or on all of them.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn start_shadow(
        &self,
        candidate: &str,
        shards: Option<Vec<u32>>,
        share: Option<u8>,
    ) -> Result<serde_json::Value, ClientError> {
        #[derive(Serialize)]
        struct Body<'a> {
            candidate: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            shards: Option<Vec<u32>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            share: Option<u8>,
        }
        let url = self.url(&["shadow"]);
        let request = self.request(Method::PUT, url.clone()).json(&Body {
            candidate,
            shards,
            share,
        });
        self.send(url, request).await
    }

    /// Stops the shadow.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn stop_shadow(&self) -> Result<serde_json::Value, ClientError> {
        let url = self.url(&["shadow"]);
        self.send(url.clone(), self.request(Method::DELETE, url))
            .await
    }

    /// The A/B report.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: 409 without a shadow.
    pub async fn ab(&self) -> Result<super::ab::AbReport, ClientError> {
        let url = self.url(&["ab"]);
        self.send(url.clone(), self.request(Method::GET, url)).await
    }

    /// `base` with `segments` appended, each percent-encoded as needed.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        url: Url,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let url = url.to_string();
        let transport = |source: reqwest::Error| {
            if source.is_connect() {
                ClientError::Unreachable {
                    url: url.clone(),
                    source,
                }
            } else {
                ClientError::Http {
                    url: url.clone(),
                    source,
                }
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
                url: url.clone(),
                reason: e.to_string(),
            });
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error,
            Err(_) => {
                let text = String::from_utf8_lossy(&body).trim().to_owned();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("refused").to_owned()
                } else {
                    text
                }
            }
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
        })
    }
}

/// The module list as a table: id prefix, `name@version`, state, shards,
/// memory, live series, failures by kind, rollback reason.
pub fn module_table(modules: &[ModuleView]) -> String {
    let header = [
        "ID",
        "MODULE",
        "STATE",
        "SHARDS",
        "MEMORY",
        "SERIES",
        "FAILURES",
        "ROLLED BACK",
    ];
    let rows: Vec<[String; 8]> = modules
        .iter()
        .map(|m| {
            let state = serde_json::to_value(m.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let shards = if m.shards.is_empty() {
                "-".to_owned()
            } else {
                m.shards
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let failures = if m.failures.is_empty() {
                "-".to_owned()
            } else {
                m.failures
                    .iter()
                    .map(|(kind, n)| format!("{kind}:{n}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            [
                m.record.id.chars().take(12).collect(),
                m.record.label(),
                state,
                shards,
                human_bytes(m.memory_bytes),
                m.live_series.to_string(),
                failures,
                m.record.rolled_back.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// The rollout as a few lines of text.
pub fn rollout_summary(view: &RolloutView) -> String {
    let short = |id: &str| id.chars().take(12).collect::<String>();
    let mut out = format!(
        "incumbent: {} ({})\n",
        view.incumbent.label,
        short(&view.incumbent.id)
    );
    match &view.candidate {
        Some(c) => {
            let _ = writeln!(
                out,
                "candidate: {} ({}) at {} %",
                c.label,
                short(&c.id),
                view.weight
            );
        }
        None => out.push_str("candidate: none\n"),
    }
    let label = |id: &str| {
        if *id == view.incumbent.id {
            view.incumbent.label.clone()
        } else if let Some(c) = view.candidate.as_ref().filter(|c| c.id == *id) {
            c.label.clone()
        } else {
            short(id)
        }
    };
    for (i, id) in view.shards.iter().enumerate() {
        let _ = writeln!(out, "shard {i}: {}", label(id));
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The A/B report as `wagg ab` prints it.
pub fn ab_table(r: &super::ab::AbReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (a, b) = (&r.incumbent, &r.shadow);
    let _ = writeln!(
        out,
        "A/B on shards {:?}: A = {} (incumbent), B = {} (shadow)",
        r.shards, a.label, b.label
    );
    let _ = writeln!(
        out,
        "shadowing cost: put time with the shadow {:.2}x of A alone; one shard puts {:.0} samples/s alone, {:.0} with the shadow; batches skipped by the shadow: {}",
        r.shadow_cost, r.shard_capacity.0, r.shard_capacity.1, r.skipped_batches
    );
    let _ = writeln!(out, "{:<26} {:>14} {:>14} {:>9}", "", "A", "B", "B/A");
    let row = |out: &mut String, name: &str, x: f64, y: f64, unit: &str| {
        let ratio = if x > 0.0 {
            format!("{:.2}", y / x)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{name:<26} {:>12.1}{unit:>2} {:>12.1}{unit:>2} {ratio:>9}",
            x, y
        );
    };
    let _ = writeln!(out, "{:<26} {:>14} {:>14}", "samples", a.samples, b.samples);
    row(
        &mut out,
        "put ns/sample, median",
        a.put_ns_median,
        b.put_ns_median,
        "",
    );
    row(
        &mut out,
        "put ns/sample, p99",
        a.put_ns_p99,
        b.put_ns_p99,
        "",
    );
    row(&mut out, "flush time", a.flush_ms, b.flush_ms, "ms");
    row(
        &mut out,
        "memory now, all shards",
        a.memory_bytes as f64 / 1024.0,
        b.memory_bytes as f64 / 1024.0,
        "Ki",
    );
    row(
        &mut out,
        "memory peak, one shard",
        a.memory_peak_bytes as f64 / 1024.0,
        b.memory_peak_bytes as f64 / 1024.0,
        "Ki",
    );
    row(
        &mut out,
        "bytes per live series",
        a.bytes_per_series,
        b.bytes_per_series,
        "",
    );
    row(
        &mut out,
        "fuel per sample",
        a.fuel_per_sample,
        b.fuel_per_sample,
        "",
    );
    let p = &r.put_ratio;
    let _ = writeln!(
        out,
        "put time B/A: {:.3} (95% CI {:.3}..{:.3}, {} paired batches): {}",
        p.ratio, p.low, p.high, p.batches, p.verdict
    );
    let g = &r.agreement;
    let _ = writeln!(
        out,
        "agreement over {} flushes: {} rows equal, {} differing, {} missing in B, {} missing in A",
        g.flushes, g.equal, g.differing, g.missing_in_shadow, g.missing_in_incumbent
    );
    for d in &g.first_differences {
        let tags: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "  {} @ {}: A {:?}, B {:?} (count, sum)",
            tags.join(","),
            d.bucket,
            d.incumbent,
            d.shadow
        );
    }
    for (shard, why) in &r.stopped {
        let _ = writeln!(out, "shadow stopped on shard {shard}: {why}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ModuleState;

    #[test]
    fn urls_append_segments_and_encode_keys() {
        let c = AdminClient::new("127.0.0.1:9464/", None).unwrap();
        assert_eq!(
            c.url(&["modules", "btree@2"]).as_str(),
            "http://127.0.0.1:9464/modules/btree@2"
        );
        assert_eq!(
            c.url(&["modules", "a/b c"]).as_str(),
            "http://127.0.0.1:9464/modules/a%2Fb%20c"
        );
        assert!(matches!(
            AdminClient::new("https://example.com", None),
            Err(ClientError::BadUrl { .. })
        ));
    }

    #[test]
    fn module_table_has_a_row_per_module() {
        let view = ModuleView {
            record: ModuleRecord {
                id: "0123456789abcdef".repeat(4),
                name: "leaky".into(),
                version: "1".into(),
                options: Vec::new(),
                builtin: false,
                rolled_back: Some("circuit breaker: 3 failures".into()),
            },
            state: ModuleState::RolledBack,
            shards: vec![],
            memory_bytes: 3 << 20,
            memory_peak_bytes: 4 << 20,
            live_series: 12,
            failures: [("memory".to_string(), 3)].into(),
        };
        let table = module_table(&[view]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID "));
        assert!(lines[1].starts_with("0123456789ab  leaky@1"), "{table}");
        assert!(lines[1].contains("rolled_back"));
        assert!(lines[1].contains("3.0 MiB"));
        assert!(lines[1].contains("memory:3"));
        assert!(lines[1].ends_with("circuit breaker: 3 failures"));
    }
}
