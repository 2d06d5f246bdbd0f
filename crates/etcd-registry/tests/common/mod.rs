//! Helpers shared by the integration tests of this crate.
#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use etcd_registry::{Registry, RegistryBuilder};

/// Logs of the library, shown for failing tests (`RUST_LOG` overrides).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "etcd_registry=info".into()))
        .with_test_writer()
        .try_init();
}

/// A builder for `namespace` on `endpoints` with a TTL of `ttl_secs` and a 3 s dial timeout.
pub fn builder(endpoints: Vec<String>, namespace: &str, ttl_secs: u64) -> RegistryBuilder {
    init_tracing();
    Registry::builder()
        .endpoints(endpoints)
        .namespace(namespace)
        .ttl(Duration::from_secs(ttl_secs))
        .dial_timeout(Duration::from_secs(3))
}

/// Connects `builder`, failing the test if that fails or takes over 30 s.
pub async fn connect_with(builder: RegistryBuilder) -> Registry {
    etcd_registry_testkit::within("connect", Duration::from_secs(30), builder.connect())
        .await
        .expect("connect failed")
}
