//! [`ServiceInstance`]: its fields, validation and the Go library's JSON wire format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::validate_segment;

/// Largest key + value we write. etcd's default request limit is 1.5 MiB;
/// a quarter MiB stays free for the request's framing and the lease.
pub const MAX_ENTRY_BYTES: usize = 1_310_720;

/// One instance of a service, as stored in etcd.
///
/// ```
/// use etcd_registry::ServiceInstance;
///
/// let web = ServiceInstance::new("web", "web-1", "10.0.0.7", 8080)
///     .with_version("1.0.2")
///     .with_weight(10)
///     .with_metadata("zone", "eu-1");
/// assert_eq!(web.metadata["zone"], "eu-1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceInstance {
    /// The service name: non-empty, no `/`, no control characters.
    pub name: String,
    /// The instance id, unique within the service: same rules as `name`.
    pub id: String,
    /// Host name or IP address that clients dial.
    pub address: String,
    /// The port clients dial. On the wire it is a JSON string, as Go writes it.
    pub port: u16,
    /// Free-form version. Default empty.
    pub version: String,
    /// Relative weight for weighted picking. Default 0 (treated as 1 by pickers).
    pub weight: i64,
    /// Free-form labels. Written as JSON `null` when empty, as Go writes it.
    pub metadata: BTreeMap<String, String>,
}

impl ServiceInstance {
    /// A new instance with no version, weight 0 and no metadata.
    pub fn new(
        name: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            name: name.into(),
            id: id.into(),
            address: address.into(),
            port,
            version: String::new(),
            weight: 0,
            metadata: BTreeMap::new(),
        }
    }

    /// Sets the version.
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the weight.
    #[must_use]
    pub fn with_weight(mut self, weight: i64) -> Self {
        self.weight = weight;
        self
    }

    /// Adds one metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// `address:port`, bracketing IPv6 literals.
    pub fn endpoint(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// Checks every field. Fails with [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_segment("name", &self.name)?;
        validate_segment("id", &self.id)?;
        if self.address.trim().is_empty() {
            return Err(Error::invalid("address", "must not be empty"));
        }
        if self.address.chars().any(char::is_control) {
            return Err(Error::invalid("address", "contains a control character"));
        }
        Ok(())
    }

    /// The Go library's JSON for this instance.
    pub fn to_json(&self) -> Vec<u8> {
        let port = self.port.to_string();
        let wire = WireOut {
            name: &self.name,
            id: &self.id,
            address: &self.address,
            port: &port,
            version: &self.version,
            weight: self.weight,
            metadata: (!self.metadata.is_empty()).then_some(&self.metadata),
        };
        // Serializing strings, an integer and a string map cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Validates the instance and encodes it, checking the size against `key`.
    pub(crate) fn encode_for(&self, key: &str) -> Result<Vec<u8>> {
        self.validate()?;
        let value = self.to_json();
        if key.len() + value.len() > MAX_ENTRY_BYTES {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "the instance encodes to {} bytes, over the {MAX_ENTRY_BYTES}-byte limit",
                    key.len() + value.len()
                ),
            ));
        }
        Ok(value)
    }

    /// Parses a value that the Go library (or we) wrote.
    ///
    /// Accepts `metadata` null or missing, `port` as a string or a number, and
    /// unknown extra fields. Empty `name`/`id` are filled from the key when given.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let w: WireIn = serde_json::from_slice(bytes)?;
        let port = match w.port {
            Port::Num(n) => u16::try_from(n).ok(),
            Port::Str(s) => s.trim().parse::<u16>().ok(),
        }
        .ok_or_else(|| serde::de::Error::custom("port is not a valid u16"))?;
        Ok(Self {
            name: w.name,
            id: w.id,
            address: w.address,
            port,
            version: w.version.unwrap_or_default(),
            weight: w.weight.unwrap_or_default(),
            metadata: w.metadata.unwrap_or_default(),
        })
    }

    /// Parses an instance from an etcd key-value, filling an empty name or id
    /// from the key. Malformed values are logged with a warning and skipped.
    pub(crate) fn from_kv(key: &[u8], value: &[u8], name_id: Option<(&str, &str)>) -> Option<Self> {
        match Self::from_json(value) {
            Ok(mut inst) => {
                if let Some((name, id)) = name_id {
                    if inst.name.is_empty() {
                        name.clone_into(&mut inst.name);
                    }
                    if inst.id.is_empty() {
                        id.clone_into(&mut inst.id);
                    }
                }
                Some(inst)
            }
            Err(error) => {
                tracing::warn!(
                    key = %String::from_utf8_lossy(key),
                    %error,
                    "skipping a malformed service instance value"
                );
                None
            }
        }
    }
}

#[derive(Serialize)]
struct WireOut<'a> {
    name: &'a str,
    id: &'a str,
    address: &'a str,
    port: &'a str,
    version: &'a str,
    weight: i64,
    metadata: Option<&'a BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct WireIn {
    #[serde(default)]
    name: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    address: String,
    port: Port,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Port {
    Num(i64),
    Str(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bytes the Go library writes for an instance with no metadata.
    const GO_BYTES: &str = r#"{"name":"a","id":"1","address":"10.0.0.1","port":"8080","version":"","weight":0,"metadata":null}"#;

    #[test]
    fn writes_the_go_librarys_exact_bytes() {
        let inst = ServiceInstance::new("a", "1", "10.0.0.1", 8080);
        assert_eq!(String::from_utf8(inst.to_json()).unwrap(), GO_BYTES);
    }

    #[test]
    fn parses_the_go_librarys_exact_bytes() {
        let inst = ServiceInstance::from_json(GO_BYTES.as_bytes()).unwrap();
        assert_eq!(inst, ServiceInstance::new("a", "1", "10.0.0.1", 8080));
    }

    #[test]
    fn metadata_is_an_object_when_present() {
        let inst = ServiceInstance::new("a", "1", "h", 1)
            .with_weight(7)
            .with_version("v2")
            .with_metadata("zone", "eu-1");
        let v: serde_json::Value = serde_json::from_slice(&inst.to_json()).unwrap();
        assert_eq!(v["metadata"]["zone"], "eu-1");
        assert_eq!(v["port"], "1");
        assert_eq!(v["weight"], 7);
        assert_eq!(ServiceInstance::from_json(&inst.to_json()).unwrap(), inst);
    }

    #[test]
    fn reading_is_lenient() {
        let numeric = r#"{"name":"a","id":"1","address":"h","port":8080,"extra":{"x":1}}"#;
        let inst = ServiceInstance::from_json(numeric.as_bytes()).unwrap();
        assert_eq!(inst.port, 8080);
        assert!(inst.metadata.is_empty());
        assert_eq!(inst.weight, 0);
    }

    #[test]
    fn bad_ports_and_garbage_are_rejected() {
        for bad in [
            r#"{"name":"a","id":"1","address":"h","port":"99999"}"#,
            r#"{"name":"a","id":"1","address":"h","port":-1}"#,
            r#"{"name":"a","id":"1","address":"h","port":"http"}"#,
            r#"{"name":"a","id":"1","address":"h"}"#,
            "not json",
        ] {
            assert!(ServiceInstance::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let field = |i: ServiceInstance| match i.validate() {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(ServiceInstance::new("", "1", "h", 1)), "name");
        assert_eq!(field(ServiceInstance::new("a/b", "1", "h", 1)), "name");
        assert_eq!(field(ServiceInstance::new("a", "x\ny", "h", 1)), "id");
        assert_eq!(field(ServiceInstance::new("a", "1", "", 1)), "address");
    }

    #[test]
    fn oversized_values_are_rejected() {
        let big = ServiceInstance::new("a", "1", "h", 1)
            .with_metadata("blob", "x".repeat(MAX_ENTRY_BYTES));
        assert!(matches!(
            big.encode_for("k"),
            Err(Error::InvalidInput {
                field: "metadata",
                ..
            })
        ));
    }
}
