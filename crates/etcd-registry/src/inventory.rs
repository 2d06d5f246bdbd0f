//! Read-only inventory for dashboards: where instance keys stand in etcd's
//! history, and which namespaces exist under the key prefix.

use etcd_client::GetOptions;

use crate::core::Core;
use crate::error::Result;
use crate::keys::{namespaces_root, parse_namespace};

/// Where one instance key stands in etcd's history, from
/// [`Registry::instance_revisions`](crate::Registry::instance_revisions).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceRevision {
    /// The service name, from the key.
    pub name: String,
    /// The instance id, from the key.
    pub id: String,
    /// The revision that created the key. It stays the same across updates
    /// and re-puts, and changes when the key is deleted and written again,
    /// so it dates the registration.
    pub create_revision: i64,
    /// The revision of the key's last write.
    pub mod_revision: i64,
    /// The lease the key lives under; 0 for a key written without one.
    pub lease_id: i64,
}

/// More namespaces than this are not looked for: each costs one request.
const MAX_NAMESPACES: usize = 10_000;

pub(crate) async fn instance_revisions(core: &Core) -> Result<Vec<InstanceRevision>> {
    let keys = &core.keys;
    let prefix = keys.services_prefix().to_owned();
    let paged = core
        .conn
        .read_prefixes("get", &[prefix], true, Vec::new, |out, kvs| {
            out.extend(kvs.iter().filter_map(|kv| {
                let (name, id) = keys.parse_instance_key(kv.key_str().ok()?)?;
                Some(InstanceRevision {
                    name: name.to_owned(),
                    id: id.to_owned(),
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    lease_id: kv.lease(),
                })
            }));
        })
        .await?;
    Ok(paged.value)
}

pub(crate) async fn namespaces(core: &Core) -> Result<Vec<String>> {
    let root = namespaces_root(core.config.key_prefix());
    // The root ends with '/'; '0' is the byte after it: the end of the root's range.
    let end = format!("{}0", &root[..root.len() - 1]);
    let mut cursor = root.clone().into_bytes();
    let mut found = Vec::new();
    while found.len() < MAX_NAMESPACES {
        let from = cursor.clone();
        let resp = core
            .conn
            .retry("get", |mut c| {
                let options = GetOptions::new()
                    .with_range(end.clone())
                    .with_keys_only()
                    .with_limit(1);
                let from = from.clone();
                async move { c.get(from, Some(options)).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first() else { break };
        let key = kv.key();
        match std::str::from_utf8(key)
            .ok()
            .and_then(|k| parse_namespace(&root, k))
        {
            Some((namespace, in_layout)) => {
                if in_layout {
                    found.push(namespace.to_owned());
                }
                // Past every key of `{root}{namespace}/`: '0' follows '/'.
                cursor = format!("{root}{namespace}0").into_bytes();
            }
            None => {
                // A key with no '/' after the namespace: step just past it.
                cursor = key.to_vec();
                cursor.push(0);
            }
        }
    }
    Ok(found)
}
