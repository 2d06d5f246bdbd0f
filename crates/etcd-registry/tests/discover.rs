//! (feature `tower`) `ServiceCache::discover` against real etcd: the changes
//! it emits for adds, updates and removes, in a namespace-wide cache.
#![cfg(feature = "tower")]

mod common;

use std::time::Duration;

use etcd_registry::ServiceInstance;
use etcd_registry_testkit::{shared_server, unique_name, within};
use futures::StreamExt;
use tower::discover::Change;

const T: Duration = Duration::from_secs(30);

/// The next change, as (`+` or `-`, key, port of an insert).
async fn next(discover: &mut etcd_registry::ServiceDiscover) -> (char, String, Option<u16>) {
    match within("next change", T, discover.next()).await {
        Some(Ok(Change::Insert(key, i))) => ('+', key, i.port.number()),
        Some(Ok(Change::Remove(key))) => ('-', key, None),
        other => panic!("the stream ended: {other:?}"),
    }
}

#[tokio::test]
async fn a_namespace_discover_emits_only_what_changed() {
    let etcd = shared_server().await;
    let ns = unique_name("discover");
    let registry = common::connect_with(common::builder(etcd.endpoints(), &ns, 10)).await;
    let a = ServiceInstance::new("api", "x", "127.0.0.1", 1);
    let b = ServiceInstance::new("web", "x", "127.0.0.1", 2);
    let mut reg_a = within("register", T, registry.register(a.clone()))
        .await
        .expect("register a");
    let reg_b = within("register", T, registry.register(b.clone()))
        .await
        .expect("register b");
    let cache = within("cache", T, registry.cache_all())
        .await
        .expect("cache_all");
    let mut discover = cache.discover();
    // Keys are `name/id` in a namespace cache: the two `x` are told apart.
    assert_eq!(next(&mut discover).await, ('+', "api/x".into(), Some(1)));
    assert_eq!(next(&mut discover).await, ('+', "web/x".into(), Some(2)));

    // An update is an insert under the same key; the unchanged one is not
    // sent again (the comparison goes by the shared instances). Checked by
    // hand: with `catch_up` re-inserting every instance it meets in both
    // lists, this fails (`web/x` comes again before its removal).
    within("update", T, reg_a.update(a.clone().with_weight(5)))
        .await
        .expect("update");
    assert_eq!(next(&mut discover).await, ('+', "api/x".into(), Some(1)));
    within("deregister", T, reg_b.deregister())
        .await
        .expect("deregister");
    assert_eq!(next(&mut discover).await, ('-', "web/x".into(), None));
    let c = ServiceInstance::new("api", "w", "127.0.0.1", 3);
    let _reg_c = within("register", T, registry.register(c))
        .await
        .expect("register c");
    assert_eq!(next(&mut discover).await, ('+', "api/w".into(), Some(3)));
    // Nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), discover.next())
            .await
            .is_err(),
        "an unchanged instance was emitted again"
    );
    within("close", T, registry.close()).await.expect("close");
}
