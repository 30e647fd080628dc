//! The HTTP side of remote inputs: one tokio runtime, one reqwest client (rustls on
//! ring) handed to `object_store` as its connector, the retry policy, and the
//! environment that configures them.
//!
//! `object_store` retries what a flaky network does (connection errors, 5xx, 429, 408,
//! timeouts, a body cut short: from the byte where it stopped, when the response had an
//! ETag), a bounded number of times with exponential backoff. The connector adds what it
//! does not do: a `Retry-After` on a 429 or 503 is waited out (at most
//! [`MAX_RETRY_AFTER`]) before the response is handed back for the retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::error::{Error, Result};

/// The longest `Retry-After` waited out; a server asking for more gets the request
/// again after this long.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How the remote client behaves: from the environment, with defaults for a WAN.
#[derive(Clone)]
pub(crate) struct Settings {
    /// Retries of one request (a range resumed after a cut counts as one).
    pub(crate) retries: usize,
    /// No bytes for this long (before the status line or inside a body) is a stall:
    /// the request is retried from where it stopped.
    pub(crate) read_timeout: Duration,
    /// The first backoff; it doubles up to 15 s.
    pub(crate) backoff: Duration,
    /// The token sent to the Hub (never to the storage it redirects to, never shown).
    pub(crate) token: Option<Token>,
}

/// A bearer token. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub(crate) struct Token(pub(crate) String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("retries", &self.retries)
            .field("read_timeout", &self.read_timeout)
            .field("backoff", &self.backoff)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn env_secs(key: &str) -> Option<Duration> {
    let v = std::env::var(key).ok()?;
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s))
}

impl Settings {
    /// Defaults (10 retries, a 30 s stall timeout, 100 ms first backoff), overridden by
    /// `MODELCONV_HTTP_RETRIES`, `MODELCONV_HTTP_TIMEOUT` and `MODELCONV_HTTP_BACKOFF`
    /// (seconds); the token from `token_file`, else `HF_TOKEN`, else the file
    /// `HF_TOKEN_PATH` or `$HF_HOME/token` (`~/.cache/huggingface/token`), as
    /// `huggingface_hub` finds it.
    pub(crate) fn from_env(token_file: Option<&std::path::Path>) -> Result<Settings> {
        let retries = std::env::var("MODELCONV_HTTP_RETRIES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(10);
        let token = match token_file {
            Some(p) => Some(read_token(p)?.ok_or_else(|| Error::InvalidOption {
                reason: format!("the token file {} is empty", p.display()),
            })?),
            None => match std::env::var("HF_TOKEN") {
                Ok(t) if !t.trim().is_empty() => Some(Token(t.trim().to_string())),
                _ => default_token_file()
                    .and_then(|p| read_token(&p).ok())
                    .flatten(),
            },
        };
        Ok(Settings {
            retries,
            read_timeout: env_secs("MODELCONV_HTTP_TIMEOUT").unwrap_or(Duration::from_secs(30)),
            backoff: env_secs("MODELCONV_HTTP_BACKOFF").unwrap_or(Duration::from_millis(100)),
            token,
        })
    }

    /// The retry policy handed to `object_store`.
    pub(crate) fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.backoff,
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: self.retries,
            retry_timeout: Duration::from_secs(600),
        }
    }
}

fn default_token_file() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("HF_TOKEN_PATH").filter(|v| !v.is_empty()) {
        return Some(p.into());
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(std::path::PathBuf::from(h).join("token"));
    }
    let home = std::env::var_os("HOME")?;
    Some(std::path::PathBuf::from(home).join(".cache/huggingface/token"))
}

/// The first line of a token file; `None` when it is empty or missing.
fn read_token(p: &std::path::Path) -> Result<Option<Token>> {
    match std::fs::read_to_string(p) {
        Ok(t) => Ok(t
            .lines()
            .next()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| Token(t.to_string()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", p, e)),
    }
}

/// Counters every remote read adds to (shown as progress, and in the benches).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Body bytes received.
    pub(crate) fetched: AtomicU64,
    /// Requests sent (retries included).
    pub(crate) requests: AtomicU64,
}

/// The shared runtime and client of one opened remote source.
pub(crate) struct Client {
    /// Drives every request; two worker threads (the work is waiting on sockets).
    /// Shut down in the background on drop, abandoning what is in flight.
    rt: std::mem::ManuallyDrop<tokio::runtime::Runtime>,
    /// The client with the Hub token as a default header, when there is one.
    pub(crate) http: reqwest::Client,
    /// The same without any token: for S3 (signed by `object_store`) and plain URLs.
    pub(crate) plain: reqwest::Client,
    pub(crate) settings: Settings,
    pub(crate) counters: Arc<Counters>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn build_reqwest(settings: &Settings, token: Option<&Token>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.0)).map_err(|_| {
                Error::InvalidOption {
                    reason: "the Hugging Face token has characters a header cannot carry".into(),
                }
            })?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("modelconv/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(settings.read_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        // A redirect to another host (the Hub's storage) drops `Authorization`.
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
        .map_err(|e| Error::Remote {
            url: String::new(),
            reason: format!("cannot set up the HTTP client: {e}"),
        })
}

impl Client {
    /// A runtime and clients for `settings`.
    pub(crate) fn new(settings: Settings) -> Result<Arc<Client>> {
        // One process-wide TLS provider (a second install is refused and harmless).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("modelconv-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Remote {
                url: String::new(),
                reason: format!("cannot start the network runtime: {e}"),
            })?;
        let http = build_reqwest(&settings, settings.token.as_ref())?;
        let plain = build_reqwest(&settings, None)?;
        Ok(Arc::new(Client {
            rt: std::mem::ManuallyDrop::new(rt),
            http,
            plain,
            settings,
            counters: Arc::new(Counters::default()),
        }))
    }

    /// The connector `object_store` sends through: `with_token` chooses the client
    /// that carries the Hub token.
    pub(crate) fn connector(&self, with_token: bool) -> Connector {
        Connector {
            client: if with_token {
                self.http.clone()
            } else {
                self.plain.clone()
            },
            plain: self.plain.clone(),
            counters: self.counters.clone(),
            moved: Arc::default(),
        }
    }

    /// Client options for `object_store` (plain HTTP is allowed: loopback servers,
    /// S3-compatible stores on a LAN).
    pub(crate) fn options(&self) -> ClientOptions {
        ClientOptions::new().with_allow_http(true)
    }
}

impl Client {
    /// The runtime requests run on.
    pub(crate) fn rt(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: `rt` is taken once, here, and never used after.
        let rt = unsafe { std::mem::ManuallyDrop::take(&mut self.rt) };
        // A plain drop would wait for the tasks; in-flight requests are abandoned.
        rt.shutdown_background();
    }
}

/// Sends `object_store`'s requests with reqwest and waits out `Retry-After`.
///
/// A GET redirected elsewhere (the Hub's `resolve` URL to its storage) is remembered:
/// the next GET of the same URL goes straight to where it led, so a file read by many
/// ranges costs one `resolve` request, not one per range (half the requests, and the
/// Hub rate-limits `resolve`). Such a request goes without the Hub token, as a redirect
/// to another host would; when the storage no longer takes it (a signed location
/// expired: 401, 403, 404, 410), the original URL is asked again and its new location
/// kept.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    client: reqwest::Client,
    /// The client without a token, for remembered locations.
    plain: reqwest::Client,
    counters: Arc<Counters>,
    /// Where GETs of a URL were redirected.
    moved: Arc<std::sync::Mutex<Moved>>,
}

/// A URL → the location a GET of it was redirected to.
type Moved = std::collections::HashMap<reqwest::Url, reqwest::Url>;

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.clone()))
    }
}

/// How long a 429 or 503 asks to wait: `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s));
    }
    let when = httpdate(v)?;
    let now = std::time::SystemTime::now();
    Some(when.duration_since(now).unwrap_or_default())
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send.
fn httpdate(s: &str) -> Option<std::time::SystemTime> {
    let mut it = s.split_whitespace().skip(1);
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The kind `object_store` retries by, from a reqwest error.
fn classify(e: &reqwest::Error) -> HttpErrorKind {
    use std::error::Error as _;
    if e.is_timeout() {
        return HttpErrorKind::Timeout;
    }
    if e.is_connect() {
        return HttpErrorKind::Connect;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::TimedOut => return HttpErrorKind::Timeout,
                K::ConnectionAborted | K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof => {
                    return HttpErrorKind::Interrupted
                }
                _ => {}
            }
        }
        source = s.source();
    }
    if e.is_request() || e.is_body() {
        // The connection closed under the request, or the body ended early.
        return HttpErrorKind::Interrupted;
    }
    if e.is_decode() {
        return HttpErrorKind::Decode;
    }
    HttpErrorKind::Unknown
}

impl Connector {
    fn moved(&self) -> std::sync::MutexGuard<'_, Moved> {
        self.moved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `method url` with `headers` through `client`.
    async fn send(
        &self,
        client: &reqwest::Client,
        method: http::Method,
        url: reqwest::Url,
        headers: http::HeaderMap,
        body: Option<reqwest::Body>,
    ) -> std::result::Result<reqwest::Response, HttpError> {
        let mut r = reqwest::Request::new(method, url);
        *r.headers_mut() = headers;
        *r.body_mut() = body;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        client
            .execute(r)
            .await
            .map_err(|e| HttpError::new(classify(&e), e.without_url()))
    }

    /// A GET of `url` at the location it was last redirected to, if it was and the
    /// storage there still takes it.
    async fn at_location(
        &self,
        url: &reqwest::Url,
        headers: &http::HeaderMap,
    ) -> std::result::Result<Option<reqwest::Response>, HttpError> {
        let Some(to) = self.moved().get(url).cloned() else {
            return Ok(None);
        };
        let mut headers = headers.clone();
        headers.remove(reqwest::header::AUTHORIZATION);
        let res = self
            .send(&self.plain, http::Method::GET, to, headers, None)
            .await?;
        use reqwest::StatusCode as S;
        if matches!(
            res.status(),
            S::UNAUTHORIZED | S::FORBIDDEN | S::NOT_FOUND | S::GONE
        ) {
            self.moved().remove(url);
            return Ok(None);
        }
        Ok(Some(res))
    }
}

#[async_trait]
impl HttpService for Connector {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string())
            .map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        let get = parts.method == http::Method::GET;
        let mut res = None;
        if get {
            res = self.at_location(&url, &parts.headers).await?;
        }
        let res = match res {
            Some(r) => r,
            None => {
                let body = Some(reqwest::Body::wrap(body));
                let r = self
                    .send(&self.client, parts.method, url.clone(), parts.headers, body)
                    .await?;
                if get && r.status().is_success() && r.url() != &url {
                    self.moved().insert(url, r.url().clone());
                }
                r
            }
        };
        let status = res.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        {
            if let Some(wait) = retry_after(res.headers()) {
                tokio::time::sleep(wait.min(MAX_RETRY_AFTER)).await;
            }
        }
        let counters = self.counters.clone();
        let res: http::Response<reqwest::Body> = res.into();
        let (parts, body) = res.into_parts();
        let body = body
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    counters
                        .fetched
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                f
            })
            .map_err(|e| HttpError::new(classify(&e), e.without_url()));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = httpdate("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 784_111_777);
        assert!(httpdate("yesterday").is_none());
    }
}
