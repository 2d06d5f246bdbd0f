//! gRPC's etcd naming layout: the keys and values that etcd's Go
//! `client/v3/naming/endpoints` manager writes and its `naming/resolver`
//! (scheme `etcd:///`) reads. A leaf: no I/O, only the layout.
//!
//! ```text
//! {target}/{addr}   {"Op":0,"Addr":"{addr}","Metadata":…}
//! ```
//!
//! - `Op` is 0 (add). The Go manager deletes an endpoint by deleting its
//!   key, never by writing `"Op":1`; its resolver ignores `Op` and treats
//!   every put as an add and every delete of a key as a removal.
//! - `Addr` is what gRPC dials: `host:port`, with IPv6 in brackets.
//! - `Metadata` is any JSON value, `null` when the endpoint has none.
//! - The value is Go's `json.Marshal` of the struct: fields in that order,
//!   `<`, `>`, `&`, U+2028 and U+2029 escaped, no trailing newline.
//!
//! # What we write
//!
//! [`encode`] turns a [`ServiceInstance`] into the bytes Go's manager writes
//! for `Endpoint{Addr: host:port, Metadata: …}`, byte for byte (checked
//! against Go 1.19, Debian's; Go 1.22 and later spell the control
//! characters `\b` and `\f` as `\b` and `\f` rather than `\u0008` and
//! `\u000c`, which decodes the same). `Metadata` is the instance's
//! metadata map as a JSON object with sorted keys, or `null` when the map
//! is empty, which is what a Go server that passes no metadata writes.
//! Version, weight, name and id are not part of the layout.
//!
//! # What we read
//!
//! [`decode`] turns a value into a [`ServiceInstance`]: `id` is `Addr`,
//! `address` and `port` come from `Addr` (`[::1]:50051` gives `::1` and
//! `50051`), `name` is the target. `Metadata`:
//!
//! - `null` or missing: no metadata;
//! - an object whose values are all strings (what we write): those entries;
//! - anything else: one entry, [`GRPC_METADATA_KEY`], holding the value as
//!   JSON text (keys sorted, numbers as Go's `float64` prints them), which
//!   [`encode`] writes back as that JSON value.
//!
//! As Go's `json.Unmarshal`, field names match case-insensitively, unknown
//! fields are ignored and `null` leaves a field empty. Values Go cannot
//! decode are refused, and so are those gRPC could not dial: an `Addr` that
//! is not `host:port`. A value whose `Op` is 1 is not an endpoint for us:
//! nobody writes one today, Go's current resolver would dial it, but the
//! field says the address was deleted, and gRPC's older `naming` package,
//! whose format this is, removed it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::instance::ServiceInstance;

/// The metadata key under which [`decode`] keeps a `Metadata` value that is
/// not an object of strings, as JSON text. [`encode`] writes an instance
/// whose only metadata entry is this key back as that JSON value.
pub const GRPC_METADATA_KEY: &str = "grpc.metadata";

/// Op 0: the endpoint is added (the only op the Go manager writes).
const OP_ADD: u64 = 0;

/// A value in the gRPC naming layout that we cannot read as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gRPC naming value: {field}: {reason}")]
pub struct NamingValueError {
    /// The JSON field at fault (`Op`, `Addr`, `Metadata`), or `value` for
    /// the value as a whole.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl NamingValueError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks a naming target (what follows `etcd:///` in a gRPC dial target,
/// such as `foo/bar/my-service`). Fails with [`Error::InvalidInput`] for
/// `target` when it is empty (Go's manager refuses it too), ends with `/`
/// (its keys would hold `//`), or contains a control character.
///
/// ```
/// use etcd_registry::naming::validate_target;
///
/// assert!(validate_target("foo/bar/my-service").is_ok());
/// assert!(validate_target("my-service/").is_err());
/// ```
pub fn validate_target(target: &str) -> Result<()> {
    if target.is_empty() {
        return Err(Error::invalid("target", "must not be empty"));
    }
    if target.ends_with('/') {
        return Err(Error::invalid(
            "target",
            format!("{target:?} ends with '/'; endpoint keys are {{target}}/{{addr}}"),
        ));
    }
    if target.chars().any(char::is_control) {
        return Err(Error::invalid(
            "target",
            format!("{target:?} contains a control character"),
        ));
    }
    Ok(())
}

/// The key of one endpoint: `{target}/{addr}`, as the Go manager's callers
/// write it (`foo/bar/my-service/10.0.0.1:50051`).
pub fn naming_key(target: &str, addr: &str) -> String {
    format!("{target}/{addr}")
}

/// `{target}/`: the prefix every endpoint key of `target` lives under.
///
/// Go's manager reads the prefix `{target}` without the `/`, so a Go
/// client of `svc` also sees the endpoints of `svc2`; we do not.
pub fn naming_prefix(target: &str) -> String {
    format!("{target}/")
}

/// The part of `key` after `{target}/`; `None` for a key outside the target.
pub fn parse_naming_key<'a>(target: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(target)?.strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

/// The `Addr` gRPC dials for `instance`: `host:port`, IPv6 in brackets.
/// Fails with [`Error::InvalidInput`] for `address` (empty or with a
/// control character) or `port` (not a number from 0 to 65535: gRPC
/// dials numbers).
pub fn endpoint_addr(instance: &ServiceInstance) -> Result<String> {
    if instance.address.trim().is_empty() {
        return Err(Error::invalid("address", "must not be empty"));
    }
    if instance.address.chars().any(char::is_control) {
        return Err(Error::invalid("address", "contains a control character"));
    }
    if instance.port.number().is_none() {
        return Err(Error::invalid(
            "port",
            format!(
                "{:?} is not a port number; a gRPC naming endpoint needs one",
                instance.port.as_str()
            ),
        ));
    }
    Ok(instance.endpoint())
}

/// The value Go's endpoints manager writes for `instance`, byte for byte:
/// `{"Op":0,"Addr":"host:port","Metadata":…}`. See the [module
/// docs](self) for what `Metadata` holds.
///
/// ```
/// use etcd_registry::{ServiceInstance, naming};
///
/// let web = ServiceInstance::new("web", "web-1", "10.0.0.1", 50051);
/// assert_eq!(
///     naming::encode(&web).unwrap(),
///     br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#
/// );
/// ```
pub fn encode(instance: &ServiceInstance) -> Result<Vec<u8>> {
    let addr = endpoint_addr(instance)?;
    let md = &instance.metadata;
    let passthrough = match md.get(GRPC_METADATA_KEY) {
        Some(json) if md.len() == 1 => serde_json::from_str::<Value>(json).ok(),
        _ => None,
    };
    let metadata = match passthrough {
        Some(value) => value,
        None if md.is_empty() => Value::Null,
        None => Value::Object(
            md.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    };
    Ok(encode_endpoint(&addr, &metadata))
}

/// The value Go's manager writes for `Endpoint{Addr: addr, Metadata: metadata}`
/// where `metadata` went through Go's `json.Unmarshal` into an
/// `interface{}` (object keys sorted, numbers as `float64`).
pub fn encode_endpoint(addr: &str, metadata: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + addr.len());
    out.extend_from_slice(b"{\"Op\":0,\"Addr\":");
    write_go_string(&mut out, addr);
    out.extend_from_slice(b",\"Metadata\":");
    write_go_value(&mut out, metadata);
    out.push(b'}');
    out
}

/// Reads a value of `target` into a [`ServiceInstance`]; see the [module
/// docs](self) for the mapping and what is refused.
///
/// ```
/// use etcd_registry::naming;
///
/// let go = br#"{"Op":0,"Addr":"[::1]:50051","Metadata":{"zone":"eu-1"}}"#;
/// let inst = naming::decode("foo/bar/svc", go).unwrap();
/// assert_eq!((inst.id.as_str(), inst.address.as_str()), ("[::1]:50051", "::1"));
/// assert_eq!(inst.port.number(), Some(50051));
/// assert_eq!(inst.metadata["zone"], "eu-1");
/// ```
pub fn decode(target: &str, value: &[u8]) -> Result<ServiceInstance, NamingValueError> {
    // Go's decoder turns invalid UTF-8 in strings into U+FFFD; serde_json refuses it.
    let text = String::from_utf8_lossy(value);
    let parsed: Value = serde_json::from_str(&text)
        .map_err(|e| NamingValueError::new("value", format!("not JSON: {e}")))?;
    let Value::Object(fields) = parsed else {
        return Err(NamingValueError::new("value", "not a JSON object"));
    };
    let (mut op, mut addr, mut metadata) = (None, None, None);
    for (name, v) in fields {
        // Go matches a field name exactly or, failing that, case-insensitively.
        if name.eq_ignore_ascii_case("Op") {
            op = Some(v);
        } else if name.eq_ignore_ascii_case("Addr") {
            addr = Some(v);
        } else if name.eq_ignore_ascii_case("Metadata") {
            metadata = Some(v);
        }
    }
    match op {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= u64::from(u8::MAX)) => {
            if n.as_u64() != Some(OP_ADD) {
                return Err(NamingValueError::new(
                    "Op",
                    format!("{n} is not 0 (add); 1 marks a deleted address"),
                ));
            }
        }
        Some(other) => {
            return Err(NamingValueError::new(
                "Op",
                format!("{other} is not an operation (an integer from 0 to 255)"),
            ));
        }
    }
    let addr = match addr {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err(NamingValueError::new(
                "Addr",
                format!("{other} is not a string"),
            ));
        }
    };
    let (host, port) = split_host_port(&addr).map_err(|reason| {
        NamingValueError::new("Addr", format!("{addr:?} is not host:port: {reason}"))
    })?;
    let mut inst = ServiceInstance::new(target, addr.as_str(), host, 0).with_port(port);
    inst.metadata = metadata_map(metadata.unwrap_or(Value::Null));
    Ok(inst)
}

/// Decodes an etcd key-value of `target`; a value we cannot read is logged
/// with a warning and skipped, as Go's resolver skips what it cannot decode.
pub(crate) fn from_kv(target: &str, key: &[u8], value: &[u8]) -> Option<ServiceInstance> {
    match decode(target, value) {
        Ok(inst) => Some(inst),
        Err(error) => {
            tracing::warn!(
                grpc_target = target,
                key = %String::from_utf8_lossy(key),
                %error,
                "skipping a gRPC naming value that is not an endpoint"
            );
            None
        }
    }
}

/// [`from_kv`] of an etcd key-value when `target` is a gRPC naming target;
/// `otherwise` (our own layout's parse) when it is `None`.
pub(crate) fn parse_kv_or(
    target: &Option<String>,
    kv: &etcd_client::KeyValue,
    otherwise: impl FnOnce() -> Option<ServiceInstance>,
) -> Option<ServiceInstance> {
    match target {
        Some(target) => from_kv(target, kv.key(), kv.value()),
        None => otherwise(),
    }
}

/// Where else a registration is published, beside its own key
/// (see `Registry::register_with`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Publish {
    /// Also at `{target}/{host:port}` in gRPC's etcd naming layout, holding
    /// [`encode`]'s bytes: under the registration's lease, written in the
    /// same transaction as its own key, deleted, restored and reclaimed
    /// with it, so that a gRPC client dialing `etcd:///{target}` finds it.
    GrpcNaming {
        /// The naming target (see [`validate_target`]).
        target: String,
    },
}

/// The target of a registry-wide template (`RegistryBuilder::publish_grpc_naming`)
/// for service `name`: every `{name}` in it replaced by the service name.
pub(crate) fn target_for(template: &str, name: &str) -> String {
    template.replace("{name}", name)
}

/// The key and value that publish `instance` under `target`, checked.
pub(crate) fn entry_for(target: &str, instance: &ServiceInstance) -> Result<(String, Vec<u8>)> {
    validate_target(target)?;
    let addr = endpoint_addr(instance)?;
    Ok((naming_key(target, &addr), encode(instance)?))
}

/// Splits `Addr` as Go's `net.SplitHostPort` does (`host:port`,
/// `[ipv6]:port`), also refusing an empty host or port, which gRPC cannot dial.
pub fn split_host_port(addr: &str) -> Result<(&str, &str), &'static str> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing ']'")?;
        let port = after.strip_prefix(':').ok_or("missing port")?;
        (host, port)
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or("missing port")?;
        if host.contains(':') {
            return Err("too many colons (an IPv6 address needs [brackets])");
        }
        (host, port)
    };
    if host.contains(['[', ']']) || port.contains(['[', ']']) {
        return Err("unexpected bracket");
    }
    if host.is_empty() {
        return Err("missing host");
    }
    if port.is_empty() {
        return Err("missing port");
    }
    Ok((host, port))
}

fn metadata_map(metadata: Value) -> BTreeMap<String, String> {
    match metadata {
        Value::Null => BTreeMap::new(),
        Value::Object(map) if map.values().all(Value::is_string) => map
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect(),
        other => {
            let mut text = Vec::new();
            write_go_value(&mut text, &other);
            BTreeMap::from([(
                GRPC_METADATA_KEY.to_owned(),
                String::from_utf8_lossy(&text).into_owned(),
            )])
        }
    }
}

/// Go's `json.Marshal` of a value decoded into an `interface{}`.
fn write_go_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => write_go_float(out, n.as_f64().unwrap_or(0.0)),
        Value::String(s) => write_go_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_go_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // Go sorts map keys by their bytes, whatever order serde_json keeps.
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_go_string(out, k);
                out.push(b':');
                write_go_value(out, v);
            }
            out.push(b'}');
        }
    }
}

/// Go's `float64` encoding: the shortest decimal that reads back the same,
/// in exponent form (`1e+21`, `1e-7`) outside `[1e-6, 1e21)`.
fn write_go_float(out: &mut Vec<u8>, f: f64) {
    let abs = f.abs();
    let text = if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let e = format!("{f:e}");
        match e.split_once('e') {
            Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
            _ => e,
        }
    } else {
        format!("{f}")
    };
    out.extend_from_slice(text.as_bytes());
}

/// Go 1.19's `encoding/json` string escaping with HTML escaping on (what
/// `json.Marshal` does): `"` and `\` escaped, `\n`, `\r`, `\t` short, other
/// control characters and `<`, `>`, `&` as `\u00XX` (lowercase hex),
/// U+2028 and U+2029 as `\u2028` and `\u2029`; everything else as is.
fn write_go_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{2028}' => out.extend_from_slice(b"\\u2028"),
            '\u{2029}' => out.extend_from_slice(b"\\u2029"),
            c if c < ' ' || matches!(c, '<' | '>' | '&') => {
                let b = c as u8;
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    /// Written by Debian's Go 1.19 through etcd's endpoints manager and read
    /// back from etcd byte for byte: `interop/go-naming print-bytes svc ADDR
    /// METADATA-JSON` (the middle column; `None`: no metadata argument, a
    /// nil `Metadata`). The integration test `grpc_naming` checks the same
    /// against the live Go program.
    const GO_GOLDEN: &[(&str, Option<&str>, &str)] = &[
        (
            "10.0.0.1:50051",
            None,
            r#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#,
        ),
        (
            "[::1]:50051",
            Some(r#"{"zone":"eu-1","a":"<b>&"}"#),
            r#"{"Op":0,"Addr":"[::1]:50051","Metadata":{"a":"\u003cb\u003e\u0026","zone":"eu-1"}}"#,
        ),
        (
            "[::1]:50051",
            Some(r#"{"ctl":"\b\f\n\r\t\u0001\u001f\u007f","q":"\"\\/","u":"é😀\u2028\u2029"}"#),
            "{\"Op\":0,\"Addr\":\"[::1]:50051\",\"Metadata\":{\"ctl\":\"\\u0008\\u000c\\n\\r\\t\\u0001\\u001f\u{7f}\",\"q\":\"\\\"\\\\/\",\"u\":\"é😀\\u2028\\u2029\"}}",
        ),
        (
            "[::1]:50051",
            Some(r#"{"weight":"10","Zone":"z","zone":"y","":""}"#),
            r#"{"Op":0,"Addr":"[::1]:50051","Metadata":{"":"","Zone":"z","weight":"10","zone":"y"}}"#,
        ),
        (
            "[fe80::1%eth0]:8080",
            None,
            r#"{"Op":0,"Addr":"[fe80::1%eth0]:8080","Metadata":null}"#,
        ),
        (
            "h<&>:1",
            None,
            r#"{"Op":0,"Addr":"h\u003c\u0026\u003e:1","Metadata":null}"#,
        ),
    ];

    /// Go's bytes for metadata that is not an object of strings, also from
    /// `print-bytes` (argument, value): numbers went through `float64`.
    const GO_FOREIGN_METADATA: &[(&str, &str)] = &[
        (r#""str""#, r#""str""#),
        ("1.5", "1.5"),
        (
            r#"[1,"a",null,true,{"b":1,"a":2}]"#,
            r#"[1,"a",null,true,{"a":2,"b":1}]"#,
        ),
        ("12345678901234567890", "12345678901234567000"),
        ("1e21", "1e+21"),
        ("1e-7", "1e-7"),
        ("0.000001", "0.000001"),
        ("-0", "-0"),
        ("100", "100"),
        (
            r#"{"weight":10,"tags":["x"]}"#,
            r#"{"tags":["x"],"weight":10}"#,
        ),
    ];

    fn golden_instance(addr: &str, md: Option<&str>) -> ServiceInstance {
        let (host, port) = split_host_port(addr).unwrap();
        let mut inst = ServiceInstance::new("svc", "1", host, port.parse().unwrap());
        if let Some(md) = md {
            inst.metadata = serde_json::from_str(md).unwrap();
        }
        inst
    }

    #[test]
    fn encodes_the_go_managers_exact_bytes() {
        for (addr, md, go) in GO_GOLDEN {
            let inst = golden_instance(addr, *md);
            assert_eq!(text(encode(&inst).unwrap()), *go, "{addr} {md:?}");
        }
    }

    #[test]
    fn decodes_go_values_and_writes_them_back_byte_for_byte() {
        for (addr, md, go) in GO_GOLDEN {
            let inst = decode("foo/bar/svc", go.as_bytes()).unwrap();
            let want = golden_instance(addr, *md);
            assert_eq!(inst.id, *addr);
            assert_eq!(inst.name, "foo/bar/svc");
            assert_eq!((&inst.address, &inst.port), (&want.address, &want.port));
            assert_eq!(inst.metadata, want.metadata);
            assert_eq!(inst.endpoint(), *addr);
            assert_eq!(text(encode(&inst).unwrap()), *go);
        }
    }

    #[test]
    fn foreign_metadata_is_kept_as_json_and_written_back_as_go_writes_it() {
        for (arg, go_md) in GO_FOREIGN_METADATA {
            let go = format!(r#"{{"Op":0,"Addr":"[::1]:50051","Metadata":{go_md}}}"#);
            let inst = decode("svc", go.as_bytes()).unwrap();
            assert_eq!(inst.metadata.len(), 1, "{arg}");
            assert_eq!(inst.metadata[GRPC_METADATA_KEY], *go_md, "{arg}");
            assert_eq!(text(encode(&inst).unwrap()), go, "{arg}");
            // What Go does to the argument, we do to it too.
            let mut ours = Vec::new();
            write_go_value(&mut ours, &serde_json::from_str(arg).unwrap());
            assert_eq!(text(ours), *go_md, "{arg}");
        }
    }

    #[test]
    fn an_empty_object_reads_as_no_metadata_and_is_written_as_null() {
        let go = br#"{"Op":0,"Addr":"[::1]:50051","Metadata":{}}"#;
        let inst = decode("svc", go).unwrap();
        assert!(inst.metadata.is_empty());
        assert_eq!(
            text(encode(&inst).unwrap()),
            r#"{"Op":0,"Addr":"[::1]:50051","Metadata":null}"#
        );
    }

    #[test]
    fn reads_as_leniently_as_gos_json_unmarshal() {
        for (value, addr) in [
            (r#"{"Addr":"1.2.3.4:5"}"#, "1.2.3.4:5"),
            (
                r#"{"op":0,"addr":"1.2.3.4:5","metadata":null}"#,
                "1.2.3.4:5",
            ),
            (
                r#"{"OP":null,"ADDR":"h:1","Extra":[1],"Metadata":null}"#,
                "h:1",
            ),
            (" {\"Addr\":\"h:1\"}\n", "h:1"),
        ] {
            let inst = decode("svc", value.as_bytes()).unwrap();
            assert_eq!(inst.id, addr, "{value}");
            assert!(inst.metadata.is_empty(), "{value}");
        }
        // Invalid UTF-8 becomes U+FFFD, as in Go.
        let inst = decode("svc", b"{\"Addr\":\"h\xff:1\"}").unwrap();
        assert_eq!(inst.address, "h\u{fffd}");
    }

    #[test]
    fn refuses_what_go_or_grpc_cannot_use_naming_the_field() {
        for (value, field) in [
            ("not json", "value"),
            ("[1]", "value"),
            ("null", "value"),
            (r#""1.2.3.4:5""#, "value"),
            (r#"{"Op":1,"Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"op":1,"Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"Op":"0","Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"Op":256,"Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"Op":-1,"Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"Op":0.5,"Addr":"1.2.3.4:5"}"#, "Op"),
            (r#"{"Op":0,"Addr":5}"#, "Addr"),
            (r#"{"Op":0}"#, "Addr"),
            (r#"{"Op":0,"Addr":""}"#, "Addr"),
            (r#"{"Op":0,"Addr":"1.2.3.4"}"#, "Addr"),
            (r#"{"Op":0,"Addr":"1.2.3.4:"}"#, "Addr"),
            (r#"{"Op":0,"Addr":":80"}"#, "Addr"),
            (r#"{"Op":0,"Addr":"::1:80"}"#, "Addr"),
            (r#"{"Op":0,"Addr":"[::1]80"}"#, "Addr"),
            (r#"{"Op":0,"Addr":"[::1:80"}"#, "Addr"),
            (r#"{"Op":0,"Addr":"a]:80"}"#, "Addr"),
        ] {
            let err = decode("svc", value.as_bytes()).expect_err(value);
            assert_eq!(err.field, field, "{value}: {err}");
        }
    }

    #[test]
    fn templates_name_the_service_and_entries_are_checked() {
        assert_eq!(target_for("grpc/{name}", "web"), "grpc/web");
        assert_eq!(target_for("fixed", "web"), "fixed");
        let inst = ServiceInstance::new("web", "w-1", "::1", 8080);
        let (key, value) = entry_for("grpc/web", &inst).unwrap();
        assert_eq!(key, "grpc/web/[::1]:8080");
        assert_eq!(value, encode(&inst).unwrap());
        assert!(matches!(
            entry_for("grpc/web/", &inst),
            Err(Error::InvalidInput {
                field: "target",
                ..
            })
        ));
    }

    #[test]
    fn split_host_port_is_gos() {
        assert_eq!(split_host_port("1.2.3.4:80"), Ok(("1.2.3.4", "80")));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1", "80")));
        assert_eq!(split_host_port("[fe80::1%lo]:80"), Ok(("fe80::1%lo", "80")));
        assert_eq!(split_host_port("name.svc:http"), Ok(("name.svc", "http")));
    }

    #[test]
    fn keys_are_target_slash_addr() {
        assert_eq!(
            naming_key("foo/bar/my-service", "10.0.0.1:50051"),
            "foo/bar/my-service/10.0.0.1:50051"
        );
        assert_eq!(naming_prefix("svc"), "svc/");
        assert_eq!(parse_naming_key("svc", "svc/[::1]:80"), Some("[::1]:80"));
        assert_eq!(parse_naming_key("svc", "svc2/1.2.3.4:80"), None);
        assert_eq!(parse_naming_key("svc", "svc/"), None);
        assert_eq!(parse_naming_key("svc", "svc"), None);
    }

    #[test]
    fn bad_targets_and_endpoints_name_the_field() {
        let field = |r: Result<()>| match r {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        for bad in ["", "svc/", "a\nb"] {
            assert_eq!(field(validate_target(bad)), "target", "{bad:?}");
        }
        for good in ["svc", "foo/bar/my-service", "/abs/svc"] {
            assert!(validate_target(good).is_ok(), "{good:?}");
        }
        let named = ServiceInstance::new("a", "1", "h", 0).with_port("http");
        assert_eq!(field(encode(&named).map(drop)), "port");
        let empty = ServiceInstance::new("a", "1", " ", 80);
        assert_eq!(field(encode(&empty).map(drop)), "address");
        let v6 = ServiceInstance::new("a", "1", "::1", 80);
        assert_eq!(endpoint_addr(&v6).unwrap(), "[::1]:80");
    }
}
