use std::net::Ipv4Addr;

use datapath_common::{IPPROTO_TCP, IPPROTO_UDP, POLICY_EGRESS, POLICY_INGRESS};

use super::*;

/// The verdict the programs would reach with these maps: the longest
/// peer prefix gives the identity, any rule entry covering
/// (endpoint, identity, direction, protocol, port) allows.
fn allows(maps: &PolicyMaps, endpoint: &str, direction: u32, peer: &str, protocol: u8, port: u16) -> bool {
    let endpoint: Ipv4Addr = endpoint.parse().unwrap();
    let peer: Ipv4Addr = peer.parse().unwrap();
    if maps.endpoints.get(&endpoint).is_none_or(|flags| flags & direction == 0) {
        return true;
    }
    let identity = maps
        .peers
        .iter()
        .filter(|(net, _)| net.contains(&peer))
        .max_by_key(|(net, _)| net.prefix_len())
        .map_or(0, |(_, id)| *id);
    let bits = |key: &PolicyRuleKey| -> u128 {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&key.endpoint);
        b[4..8].copy_from_slice(&key.identity);
        b[8] = key.direction;
        b[9] = key.protocol;
        b[10..].copy_from_slice(&key.port);
        b.iter().fold(0u128, |acc, byte| (acc << 8) | u128::from(*byte))
    };
    let wanted = bits(&PolicyRuleKey {
        endpoint: endpoint.octets(),
        identity: identity.to_be_bytes(),
        direction: direction as u8,
        protocol,
        port: port.to_be_bytes(),
    });
    maps.rules.iter().any(|rule| {
        let shift = 96 - rule.prefix_len;
        bits(&rule.key) >> shift == wanted >> shift
    })
}

fn objects(yaml: &str) -> PolicyObjects {
    let mut objects = PolicyObjects::default();
    for value in serde_saphyr::from_multiple_with_options::<serde_json::Value>(
        yaml,
        serde_saphyr::options! { strict_booleans: true },
    )
    .unwrap()
    {
        match value["kind"].as_str().unwrap() {
            "NetworkPolicy" => objects.policies.push(serde_json::from_value(value).unwrap()),
            "Namespace" => objects.namespaces.push(serde_json::from_value(value).unwrap()),
            "Pod" => objects.pods.push(serde_json::from_value(value).unwrap()),
            other => panic!("{other}"),
        }
    }
    objects
}

const PODS: &str = "
kind: Namespace
apiVersion: v1
metadata: {name: x, labels: {team: red}}
---
kind: Namespace
apiVersion: v1
metadata: {name: y, labels: {team: blue}}
---
kind: Pod
apiVersion: v1
metadata: {namespace: x, name: a, labels: {app: web}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
---
kind: Pod
apiVersion: v1
metadata: {namespace: x, name: b, labels: {app: db, tier: back}}
spec:
  containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]
status: {podIP: 10.244.2.5}
---
kind: Pod
apiVersion: v1
metadata: {namespace: y, name: c, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.2.6}
";

fn local() -> Vec<LocalPod> {
    vec![LocalPod { ipv4: "10.244.1.2".parse().unwrap(), namespace: "x".into(), name: "a".into() }]
}

#[test]
fn no_policy_isolates_nothing() {
    let compiled = compile(&objects(PODS), &local());
    assert!(compiled.maps.endpoints.is_empty());
    assert!(compiled.maps.rules.is_empty());
}

#[test]
fn deny_all_then_allow_by_selectors() {
    let deny = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: deny}
spec: {podSelector: {}}
";
    let compiled = compile(&objects(&format!("{PODS}---{deny}")), &local());
    assert_eq!(compiled.maps.endpoints.get(&"10.244.1.2".parse().unwrap()), Some(&POLICY_INGRESS));
    assert!(!allows(&compiled.maps, "10.244.1.2", POLICY_INGRESS, "10.244.2.5", IPPROTO_TCP, 8080));
    // Egress is not isolated by an ingress-only policy.
    assert!(allows(&compiled.maps, "10.244.1.2", POLICY_EGRESS, "10.244.2.5", IPPROTO_TCP, 80));

    let allow = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: allow}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: tier, operator: In, values: [back]}]}
    - namespaceSelector: {matchLabels: {team: blue}}
      podSelector: {matchLabels: {app: web}}
    ports: [{port: http}, {protocol: UDP, port: 5000, endPort: 5100}]
";
    let compiled = compile(&objects(&format!("{PODS}---{deny}---{allow}")), &local());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let m = &compiled.maps;
    // x/b (tier back) on the named port, which is the target's own (8080).
    assert!(allows(m, "10.244.1.2", POLICY_INGRESS, "10.244.2.5", IPPROTO_TCP, 8080));
    assert!(!allows(m, "10.244.1.2", POLICY_INGRESS, "10.244.2.5", IPPROTO_TCP, 9090));
    // y/c through namespace + pod selector; UDP range ends inclusive.
    for port in [5000, 5001, 5050, 5099, 5100] {
        assert!(allows(m, "10.244.1.2", POLICY_INGRESS, "10.244.2.6", IPPROTO_UDP, port), "{port}");
    }
    for port in [4999, 5101] {
        assert!(!allows(m, "10.244.1.2", POLICY_INGRESS, "10.244.2.6", IPPROTO_UDP, port), "{port}");
    }
    // Anyone else: no.
    assert!(!allows(m, "10.244.1.2", POLICY_INGRESS, "192.168.1.1", IPPROTO_TCP, 8080));
}

#[test]
fn ip_block_with_except_and_egress_named_ports() {
    let policy = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: out}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.6/32]}}]
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: http}]
";
    let compiled = compile(&objects(&format!("{PODS}---{policy}")), &local());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let m = &compiled.maps;
    assert_eq!(m.endpoints.get(&"10.244.1.2".parse().unwrap()), Some(&POLICY_EGRESS));
    assert!(allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.3.3", IPPROTO_UDP, 53));
    assert!(allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.2.5", IPPROTO_TCP, 1));
    // The except: a pod inside it is refused, whatever its labels do.
    assert!(!allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.2.6", IPPROTO_TCP, 80));
    assert!(!allows(m, "10.244.1.2", POLICY_EGRESS, "10.245.0.1", IPPROTO_TCP, 80));
    // Ingress is not isolated by an egress-only policy.
    assert!(allows(m, "10.244.1.2", POLICY_INGRESS, "1.2.3.4", IPPROTO_TCP, 80));
}

#[test]
fn named_port_resolves_per_peer_for_egress() {
    let policy = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: out}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: http}]
";
    let compiled = compile(&objects(&format!("{PODS}---{policy}")), &local());
    let m = &compiled.maps;
    // x/b names 9090 "http"; y/c has no such port; outside addresses neither.
    assert!(allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.2.5", IPPROTO_TCP, 9090));
    assert!(!allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.2.5", IPPROTO_TCP, 8080));
    assert!(!allows(m, "10.244.1.2", POLICY_EGRESS, "10.244.2.6", IPPROTO_TCP, 9090));
}

#[test]
fn bad_peers_are_left_out_not_opened() {
    let policy = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: bad}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: not-a-cidr}}]
  - ports: [{protocol: ICMP}]
";
    let compiled = compile(&objects(&format!("{PODS}---{policy}")), &local());
    assert_eq!(compiled.problems.len(), 2, "{:?}", compiled.problems);
    assert!(compiled.problems[0].contains("x/bad Ingress rule 0"), "{:?}", compiled.problems);
    assert!(!allows(&compiled.maps, "10.244.1.2", POLICY_INGRESS, "10.244.2.5", IPPROTO_TCP, 80));
}

#[test]
fn port_blocks_cover_exactly() {
    for (first, last) in [(1, 1), (80, 81), (1, 65535), (5000, 5100), (0x7fff, 0x8001), (65535, 65535)] {
        let blocks = port_blocks(first, last);
        let mut covered = Vec::new();
        for (start, bits) in &blocks {
            assert_eq!(u32::from(*start) % (1 << bits), 0, "aligned");
            covered.extend(u32::from(*start)..u32::from(*start) + (1 << bits));
        }
        assert_eq!(covered, (u32::from(first)..=u32::from(last)).collect::<Vec<_>>());
        assert!(blocks.len() <= 32);
    }
}

#[test]
fn identities_are_stable_when_another_policy_changes() {
    let a = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: a}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]
";
    let b = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: b}
spec:
  podSelector: {}
  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}]}]
";
    let one = compile(&objects(&format!("{PODS}---{a}")), &local());
    let two = compile(&objects(&format!("{PODS}---{a}---{b}")), &local());
    let id = |m: &PolicyMaps| m.peers[&"10.244.2.5/32".parse::<Ipv4Net>().unwrap()];
    assert_eq!(id(&one.maps), id(&two.maps));
}

#[test]
fn what_the_api_server_would_refuse_isolates_instead_of_opening() {
    let lower_case = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: lower}
spec: {podSelector: {}, policyTypes: [ingress]}
";
    let compiled = compile(&objects(&format!("{PODS}---{lower_case}")), &local());
    assert_eq!(
        compiled.maps.endpoints.get(&"10.244.1.2".parse().unwrap()),
        Some(&(POLICY_INGRESS | POLICY_EGRESS))
    );
    assert!(compiled.problems[0].contains("isolated in both directions"), "{:?}", compiled.problems);
    let bad_operator = "
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {namespace: x, name: bad-op}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}
  policyTypes: [Ingress]
";
    let compiled = compile(&objects(&format!("{PODS}---{bad_operator}")), &local());
    assert_eq!(compiled.maps.endpoints.get(&"10.244.1.2".parse().unwrap()), Some(&POLICY_INGRESS));
    assert!(compiled.problems[0].contains("selects every pod"), "{:?}", compiled.problems);
}
