//! [`Core`]: what every feature of a registry is handed, as kube hands its
//! `Client` around. A cheap `Clone` of the connection, the key layout, the
//! configuration, the session (the one lease) and the registry's
//! cancellation token. Features take a `Core` and own their own state;
//! nothing reaches back into the registry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::KeyValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::instance::ServiceInstance;
use crate::keys::Keys;
use crate::session::{Lease, Session};
use crate::stream::{Label, Resumable};

/// See the module docs.
#[derive(Clone)]
pub(crate) struct Core {
    pub(crate) conn: Conn,
    pub(crate) keys: Keys,
    pub(crate) config: Arc<Config>,
    pub(crate) session: Arc<Session>,
    /// Fires when the registry closes or its last handle is dropped.
    pub(crate) cancel: CancellationToken,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Core {
    pub(crate) fn new(conn: Conn, config: Config, session: Arc<Session>) -> Self {
        Self {
            keys: Keys::new(&config.key_prefix, &config.namespace),
            conn,
            config: Arc::new(config),
            session,
            cancel: CancellationToken::new(),
            tasks: Arc::default(),
        }
    }

    /// The registry's namespace: the `namespace` label of every metric.
    pub(crate) fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// `Err(Closed)` once the registry is closed.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Spawns a background task the registry owns: it is awaited by
    /// `close` (every task ends on the registry's cancellation token).
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(handle);
        }
    }

    /// Takes every task handle, for `close` to await.
    pub(crate) fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        self.tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    /// The current lease, waiting up to the request timeout for one while
    /// the registry recovers.
    pub(crate) async fn wait_lease(&self) -> Result<Lease> {
        self.session
            .wait_lease(self.config.request_timeout, &self.cancel)
            .await
    }

    /// The current lease if it is alive by its local deadline.
    pub(crate) async fn live_lease(&self) -> Result<Lease> {
        self.check_open()?;
        let lease = self.wait_lease().await?;
        if Session::past_deadline(&lease) {
            return Err(Error::SessionLost);
        }
        Ok(lease)
    }

    /// The request timeout of one unary request.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// A resumable watch of `keys` (prefixes when `prefix`), labelled `name`
    /// in logs and metrics.
    pub(crate) fn stream(&self, keys: Vec<String>, prefix: bool, name: &str) -> Resumable {
        Resumable::new(
            self.conn.clone(),
            self.cancel.clone(),
            keys,
            prefix,
            Label {
                namespace: self.config.namespace.clone(),
                name: name.to_owned(),
            },
        )
    }

    /// One consistent read of `prefix`, paged: the revision and the parsed
    /// instances. Each page is parsed and dropped before the next one.
    pub(crate) async fn list(&self, prefix: &str) -> Result<(i64, Vec<ServiceInstance>)> {
        self.conn
            .read_prefixes("get", &[prefix.to_owned()], false, Vec::new, |all, kvs| {
                all.extend(kvs.iter().filter_map(|kv| self.parse_kv(kv)));
            })
            .await
            .map(|paged| (paged.revision, paged.value))
    }

    /// Parses an instance key-value; `None` (with a warning) when malformed.
    pub(crate) fn parse_kv(&self, kv: &KeyValue) -> Option<ServiceInstance> {
        let key = std::str::from_utf8(kv.key()).ok();
        let name_id = key.and_then(|k| self.keys.parse_instance_key(k));
        if name_id.is_none() {
            // The Go library writes any name and id, `/` and empty included;
            // such a key is still its instance when the value names exactly it.
            if let (Some(key), Ok(inst)) = (key, ServiceInstance::from_json(kv.value()))
                && self.keys.instance_key(&inst.name, &inst.id) == key
            {
                return Some(inst);
            }
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a key outside the service layout");
            return None;
        }
        ServiceInstance::from_kv(kv.key(), kv.value(), name_id)
    }
}
