//! The etcd client with per-request timeouts and retries of idempotent requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, StatusResponse};

use crate::config::Config;
use crate::error::{Error, Result, is_auth_failed, is_transient};

/// How many times an idempotent request is tried. tonic's balancer may send a
/// request to a dead endpoint, which then fails instead of failing over.
const ATTEMPTS: u32 = 4;

#[derive(Clone)]
pub(crate) struct Conn {
    client: Client,
    request_timeout: Duration,
    /// Test knobs of the paged reader; empty in normal use.
    paging: Arc<std::sync::RwLock<PagingHooks>>,
}

impl Conn {
    /// Probes every endpoint on its own, connects to the ones that answered,
    /// then adds the rest so that they are used once they come back.
    pub(crate) async fn connect(config: &Config) -> Result<Self> {
        let options = connect_options(config);
        let probes = config.endpoints.iter().map(|ep| {
            let options = options.clone();
            async move {
                probe_typed(ep, options, config.dial_timeout, uses_tls(config, ep))
                    .await
                    .map(|_| ep.clone())
                    .map_err(|p| match p {
                        Probe::Failed(reason) => Probe::Failed(format!("{ep}: {reason}")),
                        auth => auth,
                    })
            }
        });
        let results = futures::future::join_all(probes).await;
        let (live, dead): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
        let live: Vec<String> = live.into_iter().filter_map(|r| r.ok()).collect();
        if live.is_empty() {
            let mut reasons = Vec::new();
            for probe in dead.into_iter().filter_map(|r| r.err()) {
                match probe {
                    // One endpoint that refused the credentials is proof enough:
                    // every member shares the same users.
                    Probe::Auth(reason) => return Err(auth_error(config, reason)),
                    Probe::Failed(reason) => reasons.push(reason),
                }
            }
            let reason = reasons.join("; ");
            return Err(Error::Connect {
                endpoints: config.endpoints.clone(),
                timeout: config.dial_timeout,
                reason,
            });
        }
        let client =
            tokio::time::timeout(config.dial_timeout, Client::connect(&live, Some(options)))
                .await
                .map_err(|_| Error::Connect {
                    endpoints: config.endpoints.clone(),
                    timeout: config.dial_timeout,
                    reason: "connecting to the live endpoints timed out".into(),
                })?
                .map_err(|e| {
                    if is_auth_failed(&e) {
                        auth_error(config, e.to_string())
                    } else {
                        Error::etcd("connect", e)
                    }
                })?;
        for ep in config.endpoints.iter().filter(|e| !live.contains(e)) {
            if let Err(error) = client.add_endpoint(ep).await {
                tracing::warn!(endpoint = %ep, %error, "could not add an unreachable endpoint");
            } else {
                tracing::warn!(endpoint = %ep, "endpoint unreachable at connect; it is kept and used once it answers");
            }
        }
        Ok(Self {
            client,
            request_timeout: config.request_timeout,
            paging: Arc::default(),
        })
    }

    /// A clone of the raw client, for streams (watch, keep-alive).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one request under the request timeout, without retries.
    pub(crate) async fn once<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.once_within(op, self.request_timeout, f).await
    }

    /// [`once`](Self::once) under `timeout` instead of the request timeout.
    pub(crate) async fn once_within<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(timeout, f(self.client.clone())).await {
            Ok(r) => r.map_err(|e| Error::etcd(op, e)),
            Err(_) => Err(Error::Timeout { op, after: timeout }),
        }
    }

    /// [`retry`](Self::retry) for a request on `key` (or the range under
    /// it): an RBAC refusal names it in [`Error::PermissionDenied`].
    pub(crate) async fn retry_on<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.retry(op, f).await.map_err(|e| e.on_key(key))
    }

    /// Runs an idempotent request, retrying transient failures a few times.
    pub(crate) async fn retry<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 1;
        loop {
            let result = self.once(op, &mut f).await;
            // A timeout is not retried here: it would multiply the caller's wait.
            let transient =
                matches!(&result, Err(Error::Etcd { source, .. }) if is_transient(source));
            if !transient || attempt >= ATTEMPTS {
                return result;
            }
            tracing::debug!(op, attempt, "transient etcd failure; retrying");
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            attempt += 1;
        }
    }
}

/// Asks one endpoint, on a connection of its own, for its status within
/// `dial_timeout`: the proof that it answers (`Client::connect` is lazy).
/// The error says why it did not, for people.
pub(crate) async fn probe(
    endpoint: &str,
    options: ConnectOptions,
    dial_timeout: Duration,
) -> std::result::Result<StatusResponse, String> {
    // TLS is in use exactly when the options carry it; a `https://` endpoint
    // always does, so that is the cheap tell here.
    let tls = endpoint.starts_with("https://");
    match probe_typed(endpoint, options, dial_timeout, tls).await {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err(STATUS_NEEDS_ROOT.to_owned()),
        Err(Probe::Auth(reason)) => Err(format!("authentication failed: {reason}")),
        Err(Probe::Failed(reason)) => Err(reason),
    }
}

/// What `probe` says of an endpoint that answered but refused its status.
const STATUS_NEEDS_ROOT: &str = "answers, but its status is refused to this user: etcd 3.5.28 to 3.5.31 \
     and 3.6.0 to 3.6.11 give Maintenance.Status to root only when auth is on";

/// [`probe`] that tells a refused user or password apart, and describes
/// other failures with their whole cause (TLS failures labelled as such).
async fn probe_typed(
    endpoint: &str,
    options: ConnectOptions,
    dial_timeout: Duration,
    tls: bool,
) -> std::result::Result<Option<StatusResponse>, Probe> {
    let attempt = async {
        let mut c = Client::connect([endpoint], Some(options)).await?;
        c.status().await
    };
    match tokio::time::timeout(dial_timeout, attempt).await {
        Ok(Ok(status)) => Ok(Some(status)),
        // The user was authenticated and etcd answered: it is reachable.
        // Some etcd releases (3.5.28-3.5.31, 3.6.0-3.6.11) refuse Status to
        // every user but root when auth is on.
        Ok(Err(e)) if crate::error::is_permission_denied(&e) => Ok(None),
        Ok(Err(e)) if is_auth_failed(&e) => Err(Probe::Auth(e.to_string())),
        Ok(Err(e)) => Err(Probe::Failed(describe_connect_error(&e, tls))),
        Err(_) => Err(Probe::Failed(format!("no answer within {dial_timeout:?}"))),
    }
}

pub(crate) fn connect_options(config: &Config) -> ConnectOptions {
    // No channel-wide timeout: it would cut long-lived watch and keep-alive
    // streams. Unary requests get `request_timeout` in `Conn::once` instead.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_require_leader(true);
    if let Some((interval, timeout)) = config.keep_alive {
        // Pings only while a stream is open: etcd's default enforcement
        // (PermitWithoutStream=false) counts pings on a connection without
        // streams as abuse whatever their interval.
        options = options
            .with_keep_alive(interval, timeout)
            .with_keep_alive_while_idle(false);
    }
    if let Some(c) = &config.auth {
        // etcd's auth tokens expire (simple tokens after 5 idle minutes by
        // default); a long-lived registry must re-authenticate on its own.
        options = options
            .with_user(c.user.clone(), c.password.clone())
            .with_auto_token_refresh(true);
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls.to_options());
    } else if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        // etcd-client would use an empty root store; trust the system's, as
        // etcdctl and browsers do.
        options = options.with_tls(crate::tls::TlsConfig::new().to_options());
    }
    options
}

/// How one endpoint's probe at connect failed.
enum Probe {
    /// etcd refused the user name or password (etcd's answer).
    Auth(String),
    /// Anything else, described with the endpoint.
    Failed(String),
}

fn auth_error(config: &Config, reason: String) -> Error {
    Error::Auth {
        user: config
            .auth
            .as_ref()
            .map(|c| c.user.clone())
            .unwrap_or_default(),
        reason,
    }
}

/// The whole chain of a connect failure: tonic's transport error says only
/// "transport error", and the cause (a refused TLS handshake, a refused
/// connection) is several sources down. A TLS failure says that TCP
/// connected and the handshake failed, with rustls's reason and what to
/// check; a refused or timed-out connect never reads as one.
fn describe_connect_error(e: &etcd_client::Error, tls: bool) -> String {
    #[cfg(feature = "tls")]
    match crate::tls::handshake::find_in(e) {
        Some(crate::tls::handshake::Found::Handshake { reason, check }) => {
            return format!("TCP connected, TLS handshake failed: {reason} ({check})");
        }
        Some(crate::tls::handshake::Found::Settings(reason)) => {
            return format!(
                "the TLS settings were refused before connecting: {reason} (check the client \
                 certificate and key)"
            );
        }
        None => {}
    }
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    let detail = parts.join(": ");
    match tls_hint(&detail, tls) {
        #[cfg(feature = "tls")]
        Some(hint) => {
            let reason = crate::tls::handshake::reason_in_text(&detail).unwrap_or(&detail);
            format!("TCP connected, TLS handshake failed: {reason} ({hint})")
        }
        #[cfg(not(feature = "tls"))]
        Some(hint) => format!("TCP connected, TLS handshake failed: {detail} ({hint})"),
        None => detail,
    }
}

/// Whether `endpoint` is reached over TLS with these settings.
fn uses_tls(config: &Config, endpoint: &str) -> bool {
    #[cfg(feature = "tls")]
    if config.tls.is_some() {
        return !endpoint.starts_with("http://");
    }
    let _ = config;
    endpoint.starts_with("https://")
}

/// What to check for a TLS failure described by `detail` (when no rustls
/// error was found in it), or `None` when it is no TLS failure: a refused or
/// timed-out TCP connect is not one.
fn tls_hint(detail: &str, tls: bool) -> Option<&'static str> {
    let d = detail.to_ascii_lowercase();
    if !tls || d.contains("connection refused") || d.contains("tcp connect") {
        return None;
    }
    // etcd refuses a missing or untrusted client certificate after the
    // client has finished its side of a TLS 1.3 handshake: the client then
    // sees the alert, or, when its first request raced the alert, only a
    // closed connection.
    let closed_after_handshake = [
        "broken pipe",
        "connection closed",
        "connection reset",
        "operation was canceled",
    ]
    .iter()
    .any(|m| d.contains(m));
    // An alert received is the server refusing us: UnknownCA there means our
    // client certificate's CA, not the server's.
    const REFUSED_CLIENT_CERT: [&str; 8] = [
        "badcertificate",
        "unknownca",
        "certificaterequired",
        "certificateexpired",
        "certificateunknown",
        "certificaterevoked",
        "unsupportedcertificate",
        "accessdenied",
    ];
    let alert_refusing_client_cert =
        d.contains("received fatal alert") && REFUSED_CLIENT_CERT.iter().any(|a| d.contains(a));
    if alert_refusing_client_cert {
        Some(
            "the server refused the client certificate or none was given; check the client certificate and key, and that etcd's --trusted-ca-file holds its CA",
        )
    } else if d.contains("unknownissuer")
        || d.contains("unknown issuer")
        || d.contains("unknown ca")
    {
        Some("the server's certificate is not signed by a trusted CA; check the CA certificate")
    } else if d.contains("notvalidforname") || d.contains("not valid for name") {
        Some(
            "the server's certificate is for another name; check the endpoint's host or the TLS domain name",
        )
    } else if d.contains("tls handshake eof") {
        // etcd serving plain text hangs up on a ClientHello.
        Some(
            "the server hung up during the handshake; is it serving plain text (then use http:// without TLS settings)?",
        )
    } else if closed_after_handshake
        || d.contains("certificaterequired")
        || d.contains("certificate required")
        || d.contains("badcertificate")
        || d.contains("bad certificate")
    {
        Some(
            "the server refused the client certificate or none was given (or it closed the connection during the handshake); check the client certificate and key",
        )
    } else if d.contains("certificate")
        || d.contains("tls")
        || d.contains("handshake")
        || d.contains("alert")
    {
        Some("check the CA, the client certificate and the server name")
    } else {
        None
    }
}

/// The size a page of a paged read aims at. etcd limits a page by count
/// only, so the count of the next page is derived from the bytes per key
/// seen so far. 1 MiB keeps a page a quarter of tonic's default 4 MiB
/// decode limit, whatever the value size, and short enough to answer well
/// within the request timeout on a loaded machine.
pub(crate) const PAGE_BYTES: usize = 1 << 20;
/// The count of the first page, before the size of a key is known: 256
/// keys of etcd's largest default request (1.5 MiB) would not fit a page,
/// but a page that does not fit is retried smaller (see below), and 256
/// typical instances (about 200 bytes each) are 50 KiB.
const FIRST_PAGE_KEYS: i64 = 256;
/// No page holds more keys than this, however small they are (keys-only reads).
const MAX_PAGE_KEYS: i64 = 10_000;
/// The decode limit of paged reads: 16 MiB. A page aims at 1 MiB, and shrinks
/// to a single key when it does not fit; a single key is at most etcd's
/// `--max-request-bytes` (1.5 MiB by default, and etcd advises at most
/// 10 MiB), so every key etcd accepted can be read. Other requests keep
/// tonic's 4 MiB default: they read single keys or bounded ranges.
pub(crate) const READ_DECODE_LIMIT: usize = 16 << 20;
/// How many times a paged read starts again at a new revision after the
/// revision it was reading at was compacted, before it gives up.
const MAX_RESTARTS: u32 = 5;

/// The result of a paged read.
pub(crate) struct Paged<T> {
    /// The revision every page was read at.
    pub(crate) revision: i64,
    /// The cluster that answered the first page.
    pub(crate) cluster_id: Option<u64>,
    /// What the pages were folded into.
    pub(crate) value: T,
}

/// Called after each page that is not the last one, with the read's revision.
pub(crate) type AfterPage =
    Arc<dyn Fn(i64) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Test knobs of the paged reader (see `Registry::set_read_paging_for_tests`).
#[derive(Clone, Default)]
pub(crate) struct PagingHooks {
    /// At most this many keys a page.
    pub(crate) max_keys: Option<i64>,
    pub(crate) after_page: Option<AfterPage>,
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// etcd answers a read at a compacted revision with this.
pub(crate) fn is_compacted(e: &Error) -> bool {
    matches!(e, Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.message().contains("required revision has been compacted"))
}

/// tonic refuses a response over the decode limit with this.
fn is_too_large(e: &Error) -> bool {
    matches!(e, Error::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.message().contains("message length too large"))
}

/// The count of the next page, from the size of the last one.
fn next_page_keys(keys: usize, bytes: usize, max: i64) -> i64 {
    let per_key = (bytes / keys.max(1)).max(1);
    i64::try_from(PAGE_BYTES / per_key)
        .unwrap_or(max)
        .clamp(1, max)
}

impl Conn {
    /// Replaces the paged reader's test knobs.
    pub(crate) fn set_paging_hooks(&self, hooks: PagingHooks) {
        *self
            .paging
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = hooks;
    }

    /// Reads every key under each of `prefixes` as one consistent snapshot:
    /// in pages of about [`PAGE_BYTES`], all at the revision of the first
    /// page. Each page is handed to `page` with the state made by `init` and
    /// dropped after; if the revision is compacted before the last page, the
    /// state is made anew and the read starts again at the current revision
    /// (at most [`MAX_RESTARTS`] times). Returns the revision read at.
    ///
    /// Fails loudly rather than looping: a page that does not fit the decode
    /// limit even as a single key, repeated compactions, and every error that
    /// [`Conn::retry`] does not retry end the read with an error.
    pub(crate) async fn read_prefixes<T>(
        &self,
        op: &'static str,
        prefixes: &[String],
        keys_only: bool,
        init: impl FnMut() -> T,
        page: impl FnMut(&mut T, Vec<etcd_client::KeyValue>),
    ) -> Result<Paged<T>> {
        self.read_prefixes_at(op, prefixes, keys_only, None, init, page)
            .await
    }

    /// [`Conn::read_prefixes`] as of revision `at` (`None`: the current one).
    /// A read as of a given revision does not restart when that revision is
    /// compacted: it fails with etcd's compaction error instead.
    pub(crate) async fn read_prefixes_at<T>(
        &self,
        op: &'static str,
        prefixes: &[String],
        keys_only: bool,
        at: Option<i64>,
        mut init: impl FnMut() -> T,
        mut page: impl FnMut(&mut T, Vec<etcd_client::KeyValue>),
    ) -> Result<Paged<T>> {
        let hooks = self
            .paging
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let max_keys = hooks.max_keys.unwrap_or(MAX_PAGE_KEYS).max(1);
        let mut restarts = 0;
        'read: loop {
            let mut state = init();
            let mut revision = at.unwrap_or(0);
            let mut cluster_id = None;
            let mut limit = FIRST_PAGE_KEYS.min(max_keys);
            for prefix in prefixes {
                let end = prefix_end(prefix.as_bytes());
                let mut from = prefix.as_bytes().to_vec();
                loop {
                    let mut options = etcd_client::GetOptions::new()
                        .with_range(end.clone())
                        .with_limit(limit)
                        .with_revision(revision);
                    if keys_only {
                        options = options.with_keys_only();
                    }
                    let result = self
                        .retry_on(op, prefix, |c| {
                            let (from, options) = (from.clone(), options.clone());
                            let mut kv = c.kv_client().max_decoding_message_size(READ_DECODE_LIMIT);
                            async move { kv.get(from, Some(options)).await }
                        })
                        .await;
                    let mut resp = match result {
                        Ok(resp) => resp,
                        Err(e) if is_compacted(&e) && at.is_none() && restarts < MAX_RESTARTS => {
                            restarts += 1;
                            tracing::warn!(
                                op,
                                revision,
                                restarts,
                                "the revision of a paged read was compacted; reading again at the current revision"
                            );
                            continue 'read;
                        }
                        Err(e) if is_too_large(&e) && limit > 1 => {
                            limit = (limit / 4).max(1);
                            tracing::warn!(op, revision, limit, error = %e, "a page did not fit the decode limit; reading smaller pages");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if revision == 0 {
                        revision = resp.header().map_or(0, |h| h.revision());
                    }
                    if cluster_id.is_none() {
                        cluster_id = resp.header().map(|h| h.cluster_id());
                    }
                    let more = resp.more();
                    let kvs = resp.take_kvs();
                    drop(resp);
                    let bytes: usize = kvs
                        .iter()
                        .map(|kv| kv.key().len() + kv.value().len() + 32)
                        .sum();
                    let keys = kvs.len();
                    if let Some(last) = kvs.last() {
                        // The next page starts right after the last key read.
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    page(&mut state, kvs);
                    if !more || keys == 0 {
                        break;
                    }
                    limit = next_page_keys(keys, bytes, max_keys);
                    if let Some(after_page) = &hooks.after_page {
                        after_page(revision).await;
                    }
                }
            }
            return Ok(Paged {
                revision,
                cluster_id,
                value: state,
            });
        }
    }
}

/// The first key read by a transaction's first get, if any.
pub(crate) fn first_get_kv(resp: &etcd_client::TxnResponse) -> Option<etcd_client::KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

#[cfg(test)]
mod paging_tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"a/b/"), b"a/b0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn page_count_follows_the_bytes_per_key() {
        // 200-byte keys: about 5,000 to a 1 MiB page.
        assert_eq!(next_page_keys(100, 20_000, MAX_PAGE_KEYS), 5242);
        // Tiny keys are capped; huge ones still read one at a time.
        assert_eq!(next_page_keys(100, 100, MAX_PAGE_KEYS), MAX_PAGE_KEYS);
        assert_eq!(next_page_keys(1, 8 << 20, MAX_PAGE_KEYS), 1);
        assert_eq!(next_page_keys(0, 0, 3), 3);
    }
}
