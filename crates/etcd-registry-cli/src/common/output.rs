//! Everything the commands print: tables, JSON lines, events, leaders, states.
//!
//! Data goes to stdout, one line per item, written through [`line()`] so that a
//! closed pipe ends the command quietly instead of panicking.

use std::io::Write as _;

use etcd_registry::{LeaderInfo, RegistryState, ServiceEvent, ServiceInstance};

use super::error::CliResult;

/// Writes one line to stdout (flushed: stdout is line-buffered).
pub fn line(text: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// Writes one stored value, byte for byte, as one line.
pub fn raw_line(bytes: &[u8]) -> CliResult {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// An instance in the Go library's wire format: the bytes Go writes for it,
/// which are the stored bytes of every value Go or this library wrote. A
/// value from another writer (extra fields, a numeric port) is re-encoded;
/// `list --raw` prints stored bytes as they are.
pub fn instance_json(instance: &ServiceInstance) -> String {
    String::from_utf8_lossy(&instance.to_json()).into_owned()
}

/// `[{...},{...}]`: instances in the Go wire format, as one JSON document.
pub fn instances_json(instances: &[ServiceInstance]) -> String {
    let items: Vec<String> = instances.iter().map(instance_json).collect();
    format!("[{}]", items.join(","))
}

/// `{"event":"added","instance":{...}}`, the instance in the Go wire format.
///
/// Built by hand so that the instance keeps the wire format's key order.
pub fn event_json(kind: &str, instance: &ServiceInstance) -> String {
    format!(
        r#"{{"event":{},"instance":{}}}"#,
        serde_json::Value::from(kind),
        instance_json(instance)
    )
}

/// `{"event":"snapshot","instances":[...]}`.
pub fn snapshot_json(instances: &[ServiceInstance]) -> String {
    format!(
        r#"{{"event":"snapshot","instances":{}}}"#,
        instances_json(instances)
    )
}

/// `completions SHELL`: the completion script of `command` on stdout.
pub fn completions(shell: clap_complete::Shell, mut command: clap::Command) -> CliResult {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "etcd-registry", &mut script);
    write_all(&script)
}

/// `man`: the man page (roff) on stdout, generated from the same definition as `--help`.
pub fn man(command: clap::Command) -> CliResult {
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    write_all(&page)
}

fn write_all(bytes: &[u8]) -> CliResult {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// The name of an event as printed: `snapshot`, `added`, `updated`, `removed`.
pub fn event_name(event: &ServiceEvent) -> &'static str {
    match event {
        ServiceEvent::Snapshot(_) => "snapshot",
        ServiceEvent::Added(_) => "added",
        ServiceEvent::Updated(_) => "updated",
        ServiceEvent::Removed(_) => "removed",
    }
}

const HEADER: [&str; 6] = ["SERVICE", "ID", "ADDRESS", "VERSION", "WEIGHT", "METADATA"];

fn cells(i: &ServiceInstance) -> [String; 6] {
    let metadata = if i.metadata.is_empty() {
        "-".to_owned()
    } else {
        i.metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let version = if i.version.is_empty() {
        "-".to_owned()
    } else {
        i.version.clone()
    };
    [
        i.name.clone(),
        i.id.clone(),
        i.endpoint(),
        version,
        i.weight.to_string(),
        metadata,
    ]
}

/// Instances as aligned columns with a header.
pub fn table(instances: &[ServiceInstance]) -> Vec<String> {
    columns(HEADER, instances.iter().map(cells))
}

/// Aligned columns with a header; the last column is not padded.
pub fn columns<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> Vec<String> {
    let rows: Vec<[String; N]> = std::iter::once(header.map(str::to_owned))
        .chain(rows)
        .collect();
    let mut widths = [0; N];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut s = String::new();
            for (n, (cell, w)) in row.iter().zip(widths).enumerate() {
                s.push_str(cell);
                if n + 1 < N {
                    s.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            s
        })
        .collect()
}

/// One instance on one line, for `watch`: `web/web-1 10.0.0.7:8080 version=1.0 weight=10 zone=eu`.
pub fn instance_line(i: &ServiceInstance) -> String {
    let mut s = format!("{}/{} {}", i.name, i.id, i.endpoint());
    if !i.version.is_empty() {
        s.push_str(&format!(" version={}", i.version));
    }
    s.push_str(&format!(" weight={}", i.weight));
    for (k, v) in &i.metadata {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

/// etcd shows lease ids in hex (as `etcdctl lease list` does).
pub fn lease_hex(id: i64) -> String {
    format!("{id:x}")
}

/// `leader: PROPOSAL (fencing token N, lease HEX)` or `no leader`.
pub fn leader_text(leader: Option<&LeaderInfo>) -> String {
    match leader {
        Some(l) => format!(
            "leader: {} (fencing token {}, lease {})",
            l.proposal_str(),
            l.fencing_token,
            lease_hex(l.lease_id)
        ),
        None => "no leader".to_owned(),
    }
}

/// `{"leader":{"proposal":..,"fencing_token":..,"lease_id":"hex"}}` or `{"leader":null}`.
pub fn leader_json(leader: Option<&LeaderInfo>) -> String {
    let value = match leader {
        Some(l) => serde_json::json!({
            "proposal": l.proposal_str(),
            "fencing_token": l.fencing_token,
            "lease_id": lease_hex(l.lease_id),
        }),
        None => serde_json::Value::Null,
    };
    serde_json::json!({ "leader": value }).to_string()
}

/// A lease state for people.
pub fn state_text(state: &RegistryState) -> String {
    match state {
        RegistryState::Connecting => "connecting".to_owned(),
        RegistryState::Active { lease_id } => format!("active (lease {})", lease_hex(*lease_id)),
        RegistryState::Degraded { lease_id } => format!(
            "degraded: keep-alives of lease {} are failing; the registration is kept",
            lease_hex(*lease_id)
        ),
        RegistryState::Recovering => {
            "recovering: the lease is gone; granting a new one and registering again".to_owned()
        }
        RegistryState::Closed => "closed".to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ServiceInstance {
        ServiceInstance::new("web", "web-1", "10.0.0.7", 8080)
            .with_version("1.0.2")
            .with_weight(10)
            .with_metadata("zone", "eu-1")
    }

    #[test]
    fn event_json_keeps_the_go_wire_format_inside() {
        assert_eq!(
            event_json("added", &web()),
            r#"{"event":"added","instance":{"name":"web","id":"web-1","address":"10.0.0.7","port":"8080","version":"1.0.2","weight":10,"metadata":{"zone":"eu-1"}}}"#
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&snapshot_json(&[web(), web()])).unwrap();
        assert_eq!(parsed["instances"].as_array().unwrap().len(), 2);
        assert_eq!(snapshot_json(&[]), r#"{"event":"snapshot","instances":[]}"#);
    }

    #[test]
    fn table_aligns_columns_and_marks_empty_cells() {
        let bare = ServiceInstance::new("a", "1", "::1", 1);
        let lines = table(&[web(), bare]);
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "SERVICE  ID     ADDRESS        VERSION  WEIGHT  METADATA"
        );
        assert_eq!(
            lines[1],
            "web      web-1  10.0.0.7:8080  1.0.2    10      zone=eu-1"
        );
        assert_eq!(
            lines[2],
            "a        1      [::1]:1        -        0       -"
        );
    }

    #[test]
    fn leaders_print_hex_leases_and_null_for_nobody() {
        assert_eq!(leader_text(None), "no leader");
        assert_eq!(leader_json(None), r#"{"leader":null}"#);
        assert_eq!(lease_hex(0x694d_7a0e_1ba8_a40c), "694d7a0e1ba8a40c");
    }
}
