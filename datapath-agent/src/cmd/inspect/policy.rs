//! `datapath-agent inspect policy`: per local pod, what NetworkPolicy
//! isolates and the allow rules as compiled (peer identity with its
//! address prefixes, protocol, port range), read from the pinned maps.

use std::{collections::BTreeMap, net::Ipv4Addr};

use datapath_common::{
    POLICY_EGRESS, POLICY_IDENTITY_NONE, POLICY_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL,
    POLICY_PREFIX_FULL,
};

use crate::{bpf::policy::PolicyMaps, reconcile::services::protocol_name};

/// One local pod, as `inspect policy --json` prints it.
#[derive(serde::Serialize)]
pub(super) struct PolicyEndpointRow {
    pub pod: Option<String>,
    pub pod_ip: Ipv4Addr,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub rules: Vec<PolicyRuleRow>,
}

/// One compiled allow rule.
#[derive(serde::Serialize)]
pub(super) struct PolicyRuleRow {
    /// "ingress" or "egress".
    pub direction: &'static str,
    pub identity: u32,
    /// The address prefixes of that identity; for identity 0, every
    /// address no listed prefix holds.
    pub peers: Vec<String>,
    /// "any", "TCP", "UDP", "SCTP" (or a number).
    pub protocol: String,
    pub first_port: Option<u16>,
    pub last_port: Option<u16>,
}

pub(super) fn rows(
    maps: &PolicyMaps,
    names: &BTreeMap<Ipv4Addr, String>,
    only: Option<Ipv4Addr>,
) -> Vec<PolicyEndpointRow> {
    let mut peers_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (net, identity) in &maps.peers {
        peers_of.entry(*identity).or_default().push(net.to_string());
    }
    let mut out = Vec::new();
    for (ip, flags) in &maps.endpoints {
        if only.is_some_and(|only| only != *ip) {
            continue;
        }
        let rules = maps
            .rules
            .iter()
            .filter(|rule| rule.key.endpoint == ip.octets())
            .map(|rule| {
                let identity = u32::from_be_bytes(rule.key.identity);
                let mut peers = peers_of.get(&identity).cloned().unwrap_or_default();
                if identity == POLICY_IDENTITY_NONE {
                    peers.insert(0, "any address not in another peer entry".into());
                }
                let (protocol, ports) = match rule.prefix_len {
                    POLICY_PREFIX_ANY_PROTOCOL => ("any".to_owned(), None),
                    POLICY_PREFIX_ANY_PORT => (protocol_text(rule.key.protocol), None),
                    len => {
                        let first = u16::from_be_bytes(rule.key.port);
                        let free_bits = POLICY_PREFIX_FULL.saturating_sub(len);
                        let last = (u32::from(first) + (1u32 << free_bits) - 1).min(65535) as u16;
                        (protocol_text(rule.key.protocol), Some((first, last)))
                    }
                };
                PolicyRuleRow {
                    direction: if u32::from(rule.key.direction) == POLICY_EGRESS {
                        "egress"
                    } else {
                        "ingress"
                    },
                    identity,
                    peers,
                    protocol,
                    first_port: ports.map(|p| p.0),
                    last_port: ports.map(|p| p.1),
                }
            })
            .collect();
        out.push(PolicyEndpointRow {
            pod: names.get(ip).cloned(),
            pod_ip: *ip,
            ingress_isolated: flags & POLICY_INGRESS != 0,
            egress_isolated: flags & POLICY_EGRESS != 0,
            rules,
        });
    }
    out
}

fn protocol_text(protocol: u8) -> String {
    match protocol {
        datapath_common::IPPROTO_SCTP => "SCTP".into(),
        p => protocol_name(p).to_owned(),
    }
}

pub(super) fn print(rows: &[PolicyEndpointRow], verdicts: &[(&str, &str, u64)]) {
    let counts: Vec<String> = verdicts.iter().map(|(d, v, n)| format!("{d} {v} {n}")).collect();
    println!("new connections judged: {}", counts.join(", "));
    if rows.is_empty() {
        println!("no local pod is isolated by NetworkPolicy (every pod allows everything)");
    }
    for row in rows {
        let isolated: Vec<&str> = [(row.ingress_isolated, "ingress"), (row.egress_isolated, "egress")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        println!(
            "{} {}  isolated for {}  ({} rules)",
            row.pod_ip,
            row.pod.as_deref().unwrap_or("-"),
            isolated.join(" and "),
            row.rules.len()
        );
        for rule in &row.rules {
            let ports = match (rule.first_port, rule.last_port) {
                (Some(first), Some(last)) if first == last => first.to_string(),
                (Some(first), Some(last)) => format!("{first}-{last}"),
                _ => "any".into(),
            };
            let mut peers = rule.peers.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
            if rule.peers.len() > 4 {
                peers.push_str(&format!(" (+{} more)", rule.peers.len() - 4));
            }
            let way = if rule.direction == "egress" { "to  " } else { "from" };
            println!(
                "  allow {:<7} {way} identity {:>10} [{peers}]  {} {ports}",
                rule.direction, rule.identity, rule.protocol
            );
        }
    }
}
