//! The key layout. This module is the only place that formats or parses keys.
//!
//! ```text
//! {prefix}/{namespace}/services/{name}/{id}          a service instance (JSON)
//! {prefix}/{namespace}/elections/{election}/{lease}  an election candidate (lease id in lowercase hex)
//! {prefix}/{namespace}/locks/{lock}/{lease}          a lock holder or waiter (lease id in lowercase hex)
//! ```

use crate::error::{Error, Result};

/// Builds and parses the keys of one `{prefix}/{namespace}`.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    services: String,
    elections: String,
    locks: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, namespace: &str) -> Self {
        Self {
            services: format!("{prefix}/{namespace}/services/"),
            elections: format!("{prefix}/{namespace}/elections/"),
            locks: format!("{prefix}/{namespace}/locks/"),
        }
    }

    /// `{root}/services/`: every service of the namespace.
    pub(crate) fn services_prefix(&self) -> &str {
        &self.services
    }

    /// `{root}/services/{name}/`: the trailing `/` keeps `web` from matching `webhook`.
    pub(crate) fn service_prefix(&self, name: &str) -> String {
        format!("{}{name}/", self.services)
    }

    pub(crate) fn instance_key(&self, name: &str, id: &str) -> String {
        format!("{}{name}/{id}", self.services)
    }

    /// Splits an instance key into `(name, id)`; `None` for keys outside the layout.
    pub(crate) fn parse_instance_key<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(self.services.as_str())?;
        let (name, id) = rest.split_once('/')?;
        (!name.is_empty() && !id.is_empty() && !id.contains('/')).then_some((name, id))
    }

    /// `{root}/elections/`: every election of the namespace.
    pub(crate) fn elections_prefix(&self) -> &str {
        &self.elections
    }

    /// The election a candidate key belongs to; `None` for keys outside the layout.
    pub(crate) fn parse_election_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(self.elections.as_str())?;
        let (election, candidate) = rest.split_once('/')?;
        (!election.is_empty() && !candidate.is_empty() && !candidate.contains('/'))
            .then_some(election)
    }

    /// `{root}/elections/{election}`: the name `etcdctl elect` takes.
    pub(crate) fn election_name(&self, election: &str) -> String {
        format!("{}{election}", self.elections)
    }

    /// `{root}/elections/{election}/`: the prefix every candidate key lives under.
    pub(crate) fn election_prefix(&self, election: &str) -> String {
        format!("{}{election}/", self.elections)
    }

    /// A candidate key: the lease id in lowercase hex, as etcd's Go `concurrency` package writes it.
    pub(crate) fn election_key(&self, election: &str, lease_id: i64) -> String {
        format!("{}{election}/{lease_id:x}", self.elections)
    }

    /// `{root}/locks/{lock}`: the name `etcdctl lock` takes.
    pub(crate) fn lock_name(&self, lock: &str) -> String {
        format!("{}{lock}", self.locks)
    }

    /// `{root}/locks/{lock}/`: the prefix every holder and waiter key lives under.
    pub(crate) fn lock_prefix(&self, lock: &str) -> String {
        format!("{}{lock}/", self.locks)
    }

    /// The lock a holder or waiter key belongs to; `None` for keys outside
    /// the layout. The name is everything up to the last `/`, so the keys of
    /// an `etcdctl lock` whose name has a `/` in it are read too.
    pub(crate) fn parse_lock_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(self.locks.as_str())?;
        let (lock, waiter) = rest.rsplit_once('/')?;
        (!lock.is_empty() && !waiter.is_empty()).then_some(lock)
    }

    /// A lock key: the lease id in lowercase hex, as etcd's Go `concurrency.Mutex` writes it.
    pub(crate) fn lock_key(&self, lock: &str, lease_id: i64) -> String {
        format!("{}{lock}/{lease_id:x}", self.locks)
    }
}

/// `{prefix}/`: the root under which every namespace lives.
pub(crate) fn namespaces_root(prefix: &str) -> String {
    format!("{prefix}/")
}

/// The namespace of a key under `root` (from [`namespaces_root`]), and
/// whether the key is in the layout (`{namespace}/services/..`,
/// `{namespace}/elections/..` or `{namespace}/locks/..`). `None` for a key with no `/` after the namespace.
pub(crate) fn parse_namespace<'a>(root: &str, key: &'a str) -> Option<(&'a str, bool)> {
    let rest = key.strip_prefix(root)?;
    let (namespace, tail) = rest.split_once('/')?;
    let in_layout = !namespace.is_empty()
        && ["services/", "elections/", "locks/"]
            .iter()
            .any(|kind| tail.starts_with(kind));
    Some((namespace, in_layout))
}

/// Validates a path segment such as a service name, an instance id or an election name.
pub(crate) fn validate_segment(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.contains('/') {
        return Err(Error::invalid(field, format!("{value:?} contains '/'")));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("{value:?} contains a control character"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_go_library() {
        let k = Keys::new("/etcd_registry", "prod");
        assert_eq!(
            k.instance_key("web", "1"),
            "/etcd_registry/prod/services/web/1"
        );
        assert_eq!(k.service_prefix("web"), "/etcd_registry/prod/services/web/");
        assert_eq!(
            k.election_key("job", 0x694d_77b4_e1a2_c00b),
            "/etcd_registry/prod/elections/job/694d77b4e1a2c00b"
        );
        assert_eq!(k.election_name("job"), "/etcd_registry/prod/elections/job");
    }

    #[test]
    fn composes_keys_by_concatenation_as_go_does() {
        for (prefix, ns, key) in [
            (
                "/etcd_registry/",
                "default",
                "/etcd_registry//default/services/web/1",
            ),
            ("", "default", "/default/services/web/1"),
            (
                "/etcd_registry",
                "team/a",
                "/etcd_registry/team/a/services/web/1",
            ),
            ("/etcd_registry", "", "/etcd_registry//services/web/1"),
        ] {
            let k = Keys::new(prefix, ns);
            assert_eq!(k.instance_key("web", "1"), key);
            assert_eq!(k.parse_instance_key(key), Some(("web", "1")));
            // Go: fmt.Sprintf("%s/%s/elections/%s", prefix, ns, name), and
            // concurrency.NewElection appends "/" before the lease id.
            assert_eq!(
                k.election_prefix("job"),
                format!("{prefix}/{ns}/elections/job/")
            );
        }
    }

    #[test]
    fn parses_only_instance_keys() {
        let k = Keys::new("/company/registry", "ns");
        assert_eq!(
            k.parse_instance_key("/company/registry/ns/services/web/a"),
            Some(("web", "a"))
        );
        assert_eq!(
            k.parse_instance_key("/company/registry/ns/services/web"),
            None
        );
        assert_eq!(
            k.parse_instance_key("/company/registry/ns/services/web/a/b"),
            None
        );
        assert_eq!(
            k.parse_instance_key("/company/registry/other/services/web/a"),
            None
        );
    }

    #[test]
    fn parses_only_candidate_keys() {
        let k = Keys::new("/etcd_registry", "ns");
        assert_eq!(
            k.parse_election_key("/etcd_registry/ns/elections/job/694d77b4e1a2c00b"),
            Some("job")
        );
        assert_eq!(
            k.parse_election_key("/etcd_registry/ns/elections/job"),
            None
        );
        assert_eq!(
            k.parse_election_key("/etcd_registry/ns/elections/job/a/b"),
            None
        );
        assert_eq!(
            k.parse_election_key("/etcd_registry/ns/services/job/a"),
            None
        );
    }

    #[test]
    fn segments_reject_slash_control_and_empty() {
        assert!(validate_segment("name", "web").is_ok());
        for bad in ["", "a/b", "a\tb"] {
            assert!(matches!(
                validate_segment("name", bad),
                Err(Error::InvalidInput { field: "name", .. })
            ));
        }
    }

    #[test]
    fn lock_keys_are_those_of_etcdctl_lock() {
        let k = Keys::new("/etcd_registry", "prod");
        assert_eq!(k.lock_name("db"), "/etcd_registry/prod/locks/db");
        assert_eq!(k.lock_prefix("db"), "/etcd_registry/prod/locks/db/");
        assert_eq!(
            k.lock_key("db", 0x694d_77b4_e1a2_c00b),
            "/etcd_registry/prod/locks/db/694d77b4e1a2c00b"
        );
    }

    #[test]
    fn lock_keys_parse_back_to_their_lock_also_etcdctls_with_a_slash() {
        let k = Keys::new("/etcd_registry", "prod");
        let key = k.lock_key("db", 0x694d_77b4_e1a2_c00b);
        assert_eq!(k.parse_lock_key(&key), Some("db"));
        assert_eq!(
            k.parse_lock_key("/etcd_registry/prod/locks/a/b/694d77b4e1a2c00b"),
            Some("a/b")
        );
        assert_eq!(k.parse_lock_key("/etcd_registry/prod/locks/db"), None);
        assert_eq!(k.parse_lock_key("/etcd_registry/prod/locks/db/"), None);
        assert_eq!(k.parse_lock_key("/etcd_registry/prod/locks//1"), None);
        assert_eq!(k.parse_lock_key("/etcd_registry/other/locks/db/1"), None);
    }

    #[test]
    fn namespaces_are_the_segment_after_the_prefix_and_count_only_in_the_layout() {
        let root = namespaces_root("/etcd_registry");
        assert_eq!(root, "/etcd_registry/");
        let parse = |k| parse_namespace(&root, k);
        assert_eq!(
            parse("/etcd_registry/prod/services/web/1"),
            Some(("prod", true))
        );
        assert_eq!(
            parse("/etcd_registry/prod/elections/job/1f"),
            Some(("prod", true))
        );
        assert_eq!(
            parse("/etcd_registry/prod/locks/db/1f"),
            Some(("prod", true))
        );
        assert_eq!(parse("/etcd_registry/prod/other"), Some(("prod", false)));
        assert_eq!(parse("/etcd_registry//services/web/1"), Some(("", false)));
        assert_eq!(parse("/etcd_registry/prod"), None);
        assert_eq!(parse("/elsewhere/prod/services/web/1"), None);
    }
}
