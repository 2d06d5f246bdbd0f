//! The zone's answers, built from instances without a server or etcd.

use std::sync::Arc;

use etcd_registry::ServiceInstance;
use hickory_proto::rr::{LowerName, Name, RData, RecordType};

use super::build::{Issue, NODATA_HOLD, Settings, State, build, build_at, srv_weight};
use super::names::parse_domain;
use super::zone::{Outcome, Zone};

fn settings() -> Settings {
    Settings::new(parse_domain("registry.").unwrap(), 7)
}

fn instances(list: Vec<ServiceInstance>) -> Vec<Arc<ServiceInstance>> {
    let mut list: Vec<_> = list.into_iter().map(Arc::new).collect();
    list.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    list
}

fn zone_of(list: Vec<ServiceInstance>) -> Zone {
    build(&settings(), &instances(list), &mut State::default(), 42).zone
}

fn ask<'z>(zone: &'z Zone, name: &str, qtype: RecordType) -> Outcome<'z> {
    zone.lookup(&LowerName::new(&Name::from_ascii(name).unwrap()), qtype)
}

/// The answer's records as text (`SRV 0 5 8080 web-1.web.registry.`), or
/// `NXDOMAIN` / `REFUSED`.
fn answer(zone: &Zone, name: &str, qtype: RecordType) -> Vec<String> {
    match ask(zone, name, qtype) {
        Outcome::NxDomain => vec!["NXDOMAIN".into()],
        Outcome::Refused => vec!["REFUSED".into()],
        outcome => outcome
            .answers()
            .map(|r| {
                assert_eq!(r.ttl, 7, "every record has the record TTL");
                format!("{} {}", r.record_type(), r.data)
            })
            .collect(),
    }
}

fn web() -> Vec<ServiceInstance> {
    vec![
        ServiceInstance::new("web", "web-1", "10.0.0.1", 8080).with_weight(5),
        ServiceInstance::new("web", "web-2", "10.0.0.2", 8081),
        ServiceInstance::new("web", "web-3", "::1", 8082).with_weight(100_000),
        ServiceInstance::new("web", "web-4", "db.internal", 8083),
    ]
}

#[test]
fn srv_has_one_record_per_instance_with_port_weight_and_target() {
    let zone = zone_of(web());
    assert_eq!(
        answer(&zone, "_web._tcp.registry.", RecordType::SRV),
        [
            "SRV 0 5 8080 web-1.web.registry.",
            "SRV 0 1 8081 web-2.web.registry.",
            "SRV 0 65535 8082 web-3.web.registry.",
            // A host name is its own target: an SRV target must not be an alias.
            "SRV 0 1 8083 db.internal.",
        ]
    );
    // Names are case-insensitive.
    assert_eq!(
        answer(&zone, "_WEB._tcp.Registry.", RecordType::SRV).len(),
        4
    );
}

#[test]
fn service_addresses_are_the_ip_instances_only() {
    let zone = zone_of(web());
    assert_eq!(
        answer(&zone, "web.registry.", RecordType::A),
        ["A 10.0.0.1", "A 10.0.0.2"]
    );
    assert_eq!(
        answer(&zone, "web.registry.", RecordType::AAAA),
        ["AAAA ::1"]
    );
    assert_eq!(
        answer(&zone, "web.registry.", RecordType::ANY),
        ["A 10.0.0.1", "A 10.0.0.2", "AAAA ::1"]
    );
}

#[test]
fn an_instance_name_gives_its_address_or_its_host_as_cname() {
    let zone = zone_of(web());
    assert_eq!(
        answer(&zone, "web-1.web.registry.", RecordType::A),
        ["A 10.0.0.1"]
    );
    assert_eq!(
        answer(&zone, "web-3.web.registry.", RecordType::AAAA),
        ["AAAA ::1"]
    );
    // An IPv4 instance has no AAAA: NODATA, not NXDOMAIN.
    assert!(answer(&zone, "web-1.web.registry.", RecordType::AAAA).is_empty());
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
        assert_eq!(
            answer(&zone, "web-4.web.registry.", qtype),
            ["CNAME db.internal."]
        );
    }
}

#[test]
fn unknown_names_are_nxdomain_and_foreign_ones_refused() {
    let zone = zone_of(web());
    assert_eq!(answer(&zone, "api.registry.", RecordType::A), ["NXDOMAIN"]);
    assert_eq!(
        answer(&zone, "web-9.web.registry.", RecordType::A),
        ["NXDOMAIN"]
    );
    assert_eq!(
        answer(&zone, "_api._tcp.registry.", RecordType::SRV),
        ["NXDOMAIN"]
    );
    assert_eq!(
        answer(&zone, "_web._udp.registry.", RecordType::SRV),
        ["NXDOMAIN"]
    );
    assert_eq!(answer(&zone, "example.com.", RecordType::A), ["REFUSED"]);
    assert_eq!(answer(&zone, "registry.com.", RecordType::A), ["REFUSED"]);
}

#[test]
fn the_apex_has_a_soa_and_tcp_exists_empty() {
    let zone = zone_of(web());
    let soa = answer(&zone, "registry.", RecordType::SOA);
    assert_eq!(
        soa,
        ["SOA registry. hostmaster.registry. 42 3600 600 86400 7"]
    );
    assert_eq!(answer(&zone, "registry.", RecordType::ANY), soa);
    assert!(answer(&zone, "registry.", RecordType::A).is_empty());
    assert!(answer(&zone, "_tcp.registry.", RecordType::SRV).is_empty());
    assert!(matches!(
        ask(&zone, "_tcp.registry.", RecordType::SRV),
        Outcome::Records(_)
    ));
}

#[test]
fn a_known_service_without_instances_is_nodata_not_nxdomain() {
    let mut state = State::default();
    let s = settings();
    build(&s, &instances(web()), &mut state, 1);
    let api = instances(vec![ServiceInstance::new("api", "a", "10.1.0.1", 80)]);
    let zone = build(&s, &api, &mut state, 2).zone;
    for (name, qtype) in [
        ("web.registry.", RecordType::A),
        ("_web._tcp.registry.", RecordType::SRV),
    ] {
        let outcome = ask(&zone, name, qtype);
        assert!(
            matches!(outcome, Outcome::Records(_)) && outcome.is_empty(),
            "{name}: {outcome:?}"
        );
    }
    // Its instances are gone for good.
    assert_eq!(
        answer(&zone, "web-1.web.registry.", RecordType::A),
        ["NXDOMAIN"]
    );
    // A service never seen is unknown.
    assert_eq!(answer(&zone, "db.registry.", RecordType::A), ["NXDOMAIN"]);
}

#[test]
fn names_that_are_not_dns_labels_are_left_out_with_a_problem() {
    let long = "x".repeat(63);
    let built = build(
        &settings(),
        &instances(vec![
            ServiceInstance::new("web", "web.1", "10.0.0.1", 80),
            ServiceInstance::new("web", "ok", "10.0.0.2", 80),
            ServiceInstance::new("web", "OK", "10.0.0.3", 80),
            ServiceInstance::new("web", "bad-host", "two words", 80),
            ServiceInstance::new("web", "port", "10.0.0.4", 80).with_port("http"),
            ServiceInstance::new("my.svc", "a", "10.0.0.5", 80),
            ServiceInstance::new(long.as_str(), "a", "10.0.0.6", 80),
            ServiceInstance::new("Api", "a", "10.0.0.7", 80),
            ServiceInstance::new("api", "a", "10.0.0.8", 80),
        ]),
        &mut State::default(),
        1,
    );
    let issues: Vec<(String, Option<String>, Issue)> = built
        .problems
        .iter()
        .map(|p| (p.service.clone(), p.id.clone(), p.issue.clone()))
        .collect();
    let some = |s: &str| Some(s.to_owned());
    for expected in [
        ("web".into(), some("web.1"), Issue::IdNotLabel),
        ("web".into(), some("ok"), Issue::IdCaseClash),
        (
            "web".into(),
            some("bad-host"),
            Issue::HostInvalid("two words".into()),
        ),
        (
            "web".into(),
            some("port"),
            Issue::PortNotNumber("http".into()),
        ),
        ("my.svc".into(), None, Issue::ServiceNotLabel),
        (long.clone(), None, Issue::ServiceNotLabel),
        ("api".into(), None, Issue::ServiceCaseClash),
    ] {
        assert!(issues.contains(&expected), "{expected:?} not in {issues:?}");
    }
    assert_eq!(issues.len(), 7, "{issues:?}");
    let zone = built.zone;
    // "OK" sorts before "ok" and wins; "ok" is left out.
    assert_eq!(
        answer(&zone, "ok.web.registry.", RecordType::A),
        ["A 10.0.0.3"]
    );
    assert_eq!(
        answer(&zone, "web.registry.", RecordType::A),
        ["A 10.0.0.3", "A 10.0.0.4"]
    );
    // A port that is not a number: the address is served, SRV leaves it out.
    assert_eq!(
        answer(&zone, "_web._tcp.registry.", RecordType::SRV),
        ["SRV 0 1 80 ok.web.registry."]
    );
    assert_eq!(
        answer(&zone, "api.registry.", RecordType::A),
        ["A 10.0.0.7"]
    );
}

#[test]
fn equal_addresses_appear_once_at_the_service_name() {
    let zone = zone_of(vec![
        ServiceInstance::new("web", "a", "10.0.0.1", 80),
        ServiceInstance::new("web", "b", "10.0.0.1", 81),
    ]);
    assert_eq!(
        answer(&zone, "web.registry.", RecordType::A),
        ["A 10.0.0.1"]
    );
    assert_eq!(
        answer(&zone, "_web._tcp.registry.", RecordType::SRV).len(),
        2
    );
}

#[test]
fn srv_weights_follow_the_library_picker() {
    assert_eq!(srv_weight(-3), 1);
    assert_eq!(srv_weight(0), 1);
    assert_eq!(srv_weight(7), 7);
    assert_eq!(srv_weight(65_535), 65_535);
    assert_eq!(srv_weight(i64::MAX), 65_535);
}

#[test]
fn records_carry_the_right_rdata_types() {
    let zone = zone_of(web());
    let outcome = ask(&zone, "_web._tcp.registry.", RecordType::SRV);
    assert!(outcome.answers().all(|r| matches!(r.data, RData::SRV(_))));
}

#[test]
fn a_change_rebuilds_only_the_services_whose_instances_changed() {
    let s = settings();
    let mut state = State::default();
    let mut list = instances(vec![
        ServiceInstance::new("api", "a-1", "10.1.0.1", 80),
        ServiceInstance::new("web", "web-1", "10.0.0.1", 80),
        ServiceInstance::new("web", "bad id", "10.0.0.2", 80),
    ]);
    let first = build(&s, &list, &mut state, 1);
    // The cache hands out the same Arc for an unchanged instance.
    list[0] = Arc::new(ServiceInstance::new("api", "a-1", "10.1.0.2", 80));
    let second = build(&s, &list, &mut state, 2);
    let (api1, api2) = (first.zone.service("api"), second.zone.service("api"));
    let (web1, web2) = (first.zone.service("web"), second.zone.service("web"));
    assert!(
        !Arc::ptr_eq(api1.unwrap(), api2.unwrap()),
        "api changed: built again"
    );
    assert!(
        Arc::ptr_eq(web1.unwrap(), web2.unwrap()),
        "web did not: reused"
    );
    assert_eq!(
        answer(&second.zone, "api.registry.", RecordType::A),
        ["A 10.1.0.2"]
    );
    assert_eq!(
        answer(&second.zone, "web.registry.", RecordType::A),
        ["A 10.0.0.1"]
    );
    // A reused service's problems are still reported, so none looks new later.
    assert_eq!(first.problems, second.problems);
    assert_eq!(second.problems.len(), 1);
    // The SOA serial follows the revision even when nothing is rebuilt.
    let third = build(&s, &list, &mut state, 3);
    assert_eq!(
        answer(&third.zone, "registry.", RecordType::SOA),
        ["SOA registry. hostmaster.registry. 3 3600 600 86400 7"]
    );
}

#[test]
fn a_literal_wildcard_label_names_nothing() {
    let zone = zone_of(web());
    for (name, qtype) in [
        ("*.registry.", RecordType::SOA),
        ("*.registry.", RecordType::A),
        ("*.web.registry.", RecordType::A),
        ("*._tcp.registry.", RecordType::SRV),
        ("*.web-1.web.registry.", RecordType::A),
    ] {
        assert_eq!(answer(&zone, name, qtype), ["NXDOMAIN"], "{name}");
    }
    assert!(!answer(&zone, "web.registry.", RecordType::A).is_empty());
}

#[test]
fn an_empty_service_is_kept_for_the_hold_then_pruned() {
    let s = settings();
    assert_eq!(
        s.nodata_hold, NODATA_HOLD,
        "TTL 7 s is under the least hold"
    );
    assert_eq!(
        Settings::new(parse_domain("registry.").unwrap(), 600).nodata_hold,
        std::time::Duration::from_secs(600)
    );
    let mut state = State::default();
    let t0 = tokio::time::Instant::now();
    assert_eq!(
        build_at(&s, &instances(web()), &mut state, 1, t0).prune_at,
        None
    );
    let empty = instances(vec![]);
    let is_nodata = |zone: &Zone| {
        let outcome = ask(zone, "web.registry.", RecordType::A);
        matches!(outcome, Outcome::Records(_)) && outcome.is_empty()
    };
    let second = std::time::Duration::from_secs(1);
    let went = t0 + second;
    let built = build_at(&s, &empty, &mut state, 2, went);
    assert!(is_nodata(&built.zone));
    assert_eq!(built.prune_at, Some(went + NODATA_HOLD));
    // A rebuild within the hold keeps it, and the end of the hold.
    let built = build_at(&s, &empty, &mut state, 3, went + NODATA_HOLD - second);
    assert!(is_nodata(&built.zone));
    assert_eq!(built.prune_at, Some(went + NODATA_HOLD));
    // At the end of the hold: gone, for good.
    let built = build_at(&s, &empty, &mut state, 4, went + NODATA_HOLD);
    assert_eq!(
        answer(&built.zone, "web.registry.", RecordType::A),
        ["NXDOMAIN"]
    );
    assert_eq!(
        answer(&built.zone, "_web._tcp.registry.", RecordType::SRV),
        ["NXDOMAIN"]
    );
    assert_eq!(built.prune_at, None);
    // Back within a hold: served, and the hold starts again when it empties.
    build_at(&s, &instances(web()), &mut state, 5, went + NODATA_HOLD);
    let later = went + NODATA_HOLD * 3;
    let built = build_at(&s, &empty, &mut state, 6, later);
    assert!(is_nodata(&built.zone));
    assert_eq!(built.prune_at, Some(later + NODATA_HOLD));
}
