//! What may become a DNS name: the served domain, service names and ids as
//! labels, and instance hosts as addresses or names.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::rr::Name;

/// The longest service name served: 62 bytes, so that the SRV owner's label
/// `_{service}` still fits in DNS's 63.
pub const MAX_SERVICE_LABEL: usize = 62;
/// The longest instance id served: one DNS label.
pub const MAX_ID_LABEL: usize = 63;

/// Whether `s` can be served as one label of a name: 1 to `max` bytes of
/// ASCII letters, digits, `-` and `_`. A dot would split it into two labels
/// and change the name's shape, so it is not allowed; neither is anything a
/// resolver or a log line would have to escape.
pub fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `--domain`: a domain of at least one label, made absolute and lowercase
/// (`registry` and `Registry.` both mean `registry.`).
pub fn parse_domain(s: &str) -> Result<Name, String> {
    let trimmed = s.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("must name a domain such as `registry.` (the root is not allowed)".into());
    }
    if let Some(bad) = trimmed.split('.').find(|l| !is_label(l, 63)) {
        return Err(format!(
            "label {bad:?} is not a DNS label (1 to 63 letters, digits, '-' or '_')"
        ));
    }
    // Leaves room for `{id}.{service}.` (63 + 1 + 62 + 1 bytes) under it.
    if trimmed.len() > 120 {
        return Err(
            "is longer than 120 bytes, which leaves no room for `{id}.{service}.` under it".into(),
        );
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| format!("{e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// `--record-ttl`: whole seconds, from 0 to 2^31 - 1 (RFC 2181 section 8).
pub fn parse_record_ttl(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{s:?}: {e}"))?
    } else {
        humantime::parse_duration(s).map_err(|e| {
            format!("{e}; expected a duration such as 0s, 30s, 5m, or whole seconds")
        })?
    };
    if d.subsec_nanos() != 0 {
        return Err("must be whole seconds".into());
    }
    match u32::try_from(d.as_secs()) {
        Ok(secs) if secs <= i32::MAX as u32 => Ok(secs),
        _ => Err(format!("must be at most {} seconds", i32::MAX)),
    }
}

/// How an instance's `address` can be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An IPv4 or IPv6 literal (`10.0.0.1`, `::1`, `[::1]`): A or AAAA records.
    Ip(IpAddr),
    /// A host name: a CNAME at the instance's name, and the SRV target.
    Name(Name),
    /// Neither (empty, spaces, a label over 63 bytes...): not served.
    Invalid,
}

impl Host {
    pub fn parse(address: &str) -> Host {
        let a = address.trim();
        let literal = a
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(a);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Host::Ip(ip);
        }
        let plain = a.trim_end_matches('.');
        // Host names are letters, digits, '-' and '_' (the last for SRV-style
        // names some fleets use); anything else would need escaping.
        if plain.is_empty() || !plain.split('.').all(|l| is_label(l, 63)) {
            return Host::Invalid;
        }
        match Name::from_labels(plain.split('.').map(str::as_bytes)) {
            Ok(name) => Host::Name(name.to_lowercase()),
            Err(_) => Host::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_letters_digits_dash_and_underscore() {
        assert!(is_label("web-1", 63));
        assert!(is_label("Web_1", 63));
        assert!(!is_label("", 63));
        assert!(!is_label("a.b", 63));
        assert!(!is_label("a b", 63));
        assert!(!is_label("café", 63));
        assert!(is_label(&"x".repeat(63), 63));
        assert!(!is_label(&"x".repeat(63), MAX_SERVICE_LABEL));
    }

    #[test]
    fn domains_are_absolute_lowercase_and_not_the_root() {
        assert_eq!(parse_domain("registry").unwrap().to_string(), "registry.");
        assert_eq!(
            parse_domain("Svc.Example.").unwrap().to_string(),
            "svc.example."
        );
        assert!(parse_domain("").is_err());
        assert!(parse_domain(".").is_err());
        assert!(parse_domain("a..b").is_err());
        assert!(parse_domain("a b").is_err());
        assert!(parse_domain(&format!("{}.x", "y".repeat(120))).is_err());
    }

    #[test]
    fn record_ttls_are_whole_seconds_within_31_bits() {
        assert_eq!(parse_record_ttl("0"), Ok(0));
        assert_eq!(parse_record_ttl("0s"), Ok(0));
        assert_eq!(parse_record_ttl("5m"), Ok(300));
        assert_eq!(parse_record_ttl("2147483647"), Ok(i32::MAX as u32));
        assert!(parse_record_ttl("2147483648").is_err());
        assert!(parse_record_ttl("1500ms").is_err());
        assert!(parse_record_ttl("soon").is_err());
    }

    #[test]
    fn hosts_are_ip_literals_names_or_invalid() {
        assert_eq!(
            Host::parse("10.0.0.1"),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(Host::parse("::1"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(Host::parse("[::1]"), Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            Host::parse("DB.internal"),
            Host::Name(Name::from_ascii("db.internal.").unwrap())
        );
        assert_eq!(
            Host::parse("_x.svc_1.example"),
            Host::Name(Name::from_ascii("_x.svc_1.example.").unwrap())
        );
        assert_eq!(Host::parse(""), Host::Invalid);
        assert_eq!(Host::parse("two words"), Host::Invalid);
        assert_eq!(Host::parse("a..b"), Host::Invalid);
    }
}
