//! [`ServiceInstance`]: its fields, validation and the Go library's JSON wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::validate_segment;

/// Largest key + value we write. etcd's default request limit is 1.5 MiB;
/// a quarter MiB stays free for the request's framing and the lease.
pub const MAX_ENTRY_BYTES: usize = 1_310_720;

/// The port of a [`ServiceInstance`], kept as the free string the Go library
/// stores (`"8080"`, but also `""`, `"http"` or `"70000"`, which Go accepts).
///
/// [`number`](Port::number) is the typed view: `Some` only for a decimal
/// port number from 0 to 65535. The string is written back unchanged.
///
/// ```
/// use etcd_registry::Port;
///
/// assert_eq!(Port::from(8080).as_str(), "8080");
/// assert_eq!(Port::from("8080").number(), Some(8080));
/// assert_eq!(Port::from("http").number(), None);
/// assert_eq!(Port::from("70000").number(), None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(String);

impl Port {
    /// The port exactly as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The port number, when the stored string is a decimal number from 0 to
    /// 65535 (surrounding whitespace ignored); `None` otherwise.
    pub fn number(&self) -> Option<u16> {
        self.0.trim().parse().ok()
    }
}

impl From<u16> for Port {
    fn from(port: u16) -> Self {
        Self(port.to_string())
    }
}

impl From<&str> for Port {
    fn from(port: &str) -> Self {
        Self(port.to_owned())
    }
}

impl From<String> for Port {
    fn from(port: String) -> Self {
        Self(port)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
/// assert_eq!(web.port.number(), Some(8080));
/// ```
///
/// Build it with [`new`](ServiceInstance::new) and the `with_*` methods. An
/// instance read from etcd remembers how its value spelled an empty
/// `metadata` (`null` or `{}`), so writing it back keeps the stored bytes;
/// two instances that differ only in that spelling are not equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceInstance {
    /// The service name: non-empty, no `/`, no control characters.
    pub name: String,
    /// The instance id, unique within the service: same rules as `name`.
    pub id: String,
    /// Host name or IP address that clients dial.
    pub address: String,
    /// The port clients dial: the Go library's free string, with a typed view
    /// in [`Port::number`].
    pub port: Port,
    /// Free-form version. Default empty.
    pub version: String,
    /// Relative weight for weighted picking. Default 0 (treated as 1 by pickers).
    pub weight: i64,
    /// Free-form labels. Written as JSON `null` when empty, as Go writes a nil
    /// map, unless the instance was read from a value that had `{}`.
    pub metadata: BTreeMap<String, String>,
    /// The value spelled an empty `metadata` as `{}` (Go's empty, non-nil map).
    empty_metadata_object: bool,
}

impl ServiceInstance {
    /// A new instance with no version, weight 0 and no metadata.
    /// For a port that is not a number, see [`with_port`](Self::with_port).
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
            port: Port::from(port),
            version: String::new(),
            weight: 0,
            metadata: BTreeMap::new(),
            empty_metadata_object: false,
        }
    }

    /// Sets the port, as a number or as any string the Go library accepts.
    #[must_use]
    pub fn with_port(mut self, port: impl Into<Port>) -> Self {
        self.port = port.into();
        self
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

    /// `address:port`, bracketing IPv6 literals. The port is written as
    /// stored, so a named port gives `host:http`, as Go's `net.Dial` takes it.
    pub fn endpoint(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// Checks every field. Fails with [`Error::InvalidInput`] naming the field.
    ///
    /// The port is not checked: the Go library stores any string, and so do we.
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

    /// The Go library's JSON for this instance, byte for byte as Go's
    /// `encoding/json` writes it: fields in Go's order, `port` a string,
    /// empty `metadata` as `null` (or `{}` if it was read that way), and
    /// `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c` and so on.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = WireOut {
            name: &self.name,
            id: &self.id,
            address: &self.address,
            port: self.port.as_str(),
            version: &self.version,
            weight: self.weight,
            metadata: (!self.metadata.is_empty() || self.empty_metadata_object)
                .then_some(&self.metadata),
        };
        let mut out = Vec::with_capacity(128);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
        // Serializing strings, an integer and a string map into memory cannot fail.
        match wire.serialize(&mut ser) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
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
    /// Reads everything Go's `GetService` returns: any field missing or
    /// `null` (as an empty string, 0 or no metadata), `port` any string (or a
    /// JSON number), and unknown extra fields. Fails only on what Go's
    /// `json.Unmarshal` rejects too: not a JSON object, or a field of the
    /// wrong type. Empty `name`/`id` are filled from the key when listed.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        // serde would also fill the struct from a JSON array; Go would not.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(serde::de::Error::custom("not a JSON object"));
        }
        let w: WireIn = serde_json::from_slice(bytes)?;
        let port = match w.port {
            None => Port::default(),
            Some(PortIn::Str(s)) => Port(s),
            Some(PortIn::Num(n)) => Port(n.to_string()),
        };
        Ok(Self {
            name: w.name.unwrap_or_default(),
            id: w.id.unwrap_or_default(),
            address: w.address.unwrap_or_default(),
            port,
            version: w.version.unwrap_or_default(),
            weight: w.weight.unwrap_or_default(),
            empty_metadata_object: w.metadata.as_ref().is_some_and(BTreeMap::is_empty),
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

/// Go's `encoding/json` escapes `<`, `>` and `&` (HTML safety) and the
/// JavaScript line separators; serde_json does not. Escaping them too keeps
/// a value read from Go and written back byte-identical.
struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escaped = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(escaped.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
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
    name: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    port: Option<PortIn>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// Go writes a string; a number is accepted from other writers.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortIn {
    Str(String),
    Num(serde_json::Number),
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
        assert_eq!(inst.port.number(), Some(8080));
        assert!(inst.metadata.is_empty());
        assert_eq!(inst.weight, 0);
        // Go's json.Unmarshal leaves missing and null fields empty, and GetService returns them.
        let sparse = r#"{"name":"a","id":"1","address":null,"version":null,"weight":null}"#;
        let inst = ServiceInstance::from_json(sparse.as_bytes()).unwrap();
        assert_eq!((inst.address.as_str(), inst.port.as_str()), ("", ""));
    }

    #[test]
    fn every_port_string_go_writes_is_kept() {
        for (raw, number) in [
            ("", None),
            ("http", None),
            ("70000", None),
            ("-1", None),
            ("0", Some(0)),
            ("65535", Some(65535)),
        ] {
            let go = format!(
                r#"{{"name":"a","id":"1","address":"h","port":"{raw}","version":"","weight":0,"metadata":null}}"#
            );
            let inst = ServiceInstance::from_json(go.as_bytes()).unwrap();
            assert_eq!(inst.port.as_str(), raw);
            assert_eq!(inst.port.number(), number, "{raw:?}");
            assert_eq!(String::from_utf8(inst.to_json()).unwrap(), go);
        }
        let named = ServiceInstance::new("a", "1", "h", 0).with_port("http");
        assert_eq!(named.endpoint(), "h:http");
        assert!(named.validate().is_ok());
    }

    #[test]
    fn go_values_are_written_back_byte_for_byte() {
        // Go writes an empty non-nil map as {} and escapes <, >, & and U+2028.
        for go in [
            r#"{"name":"a","id":"1","address":"h","port":"1","version":"","weight":0,"metadata":{}}"#,
            r#"{"name":"a","id":"1","address":"h","port":"1","version":"\u003cb\u003e \u0026 \u2028","weight":-3,"metadata":{"\u003c":"\u003e"}}"#,
        ] {
            let inst = ServiceInstance::from_json(go.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(inst.to_json()).unwrap(), go);
        }
        let escaped = ServiceInstance::from_json(
            br#"{"name":"a","id":"1","address":"h","port":"1","version":"\u003cb\u003e"}"#,
        )
        .unwrap();
        assert_eq!(escaped.version, "<b>");
    }

    #[test]
    fn only_what_go_cannot_read_is_rejected() {
        for bad in [
            r#"{"name":"a","id":"1","address":"h","port":true}"#,
            r#"{"name":"a","id":"1","address":"h","port":"1","weight":"7"}"#,
            r#"{"name":"a","id":"1","address":"h","port":"1","metadata":[]}"#,
            r#"["a"]"#,
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
