//! NetworkPolicy compiled to map entries (docs/policy.md).
//!
//! Every peer of every rule is a *term*: pods chosen by selectors, or an
//! ipBlock. An address's *identity* is the set of terms it matches (plus,
//! for a pod, the named ports egress rules ask about): all addresses of one
//! identity are treated alike by every rule, so the rules are written per
//! identity, not per peer. Pods get a /32 entry with their identity;
//! ipBlock prefixes (and their exceptions) get the identity of the blocks
//! that contain them; all else is [`POLICY_IDENTITY_NONE`]. A rule of a
//! local pod becomes one entry per (identity it admits, port block).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use datapath_common::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, POLICY_EGRESS, POLICY_IDENTITY_NONE, POLICY_INGRESS,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PolicyRuleKey,
};
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{
    bpf::policy::{PolicyMaps, PolicyRule},
    model::{LocalPod, PolicyObjects},
};

type Labels = BTreeMap<String, String>;
/// A rule's peers and ports, ingress (`from`) or egress (`to`) alike.
type RuleParts = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

/// The label the API server gives every namespace: its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What compiling gave: the maps' content, and what had to be left out.
#[derive(Debug, Default)]
pub struct Compiled {
    pub maps: PolicyMaps,
    /// One line per peer or port that could not be used (named, with the
    /// policy): left out, so the pods it selects are refused, not opened.
    pub problems: Vec<String>,
}

/// A pod as policy sees it.
#[derive(Debug, Clone)]
struct PodFacts {
    namespace: String,
    labels: Labels,
    ipv4: Option<Ipv4Addr>,
    /// Named container ports: (name, protocol) -> port.
    ports: BTreeMap<(String, u8), u16>,
}

/// A peer of a rule.
#[derive(Debug, Clone)]
enum Term {
    /// Pods of the namespaces `namespaces` selects (or the policy's own),
    /// matching `pods` (all if `None`).
    Pods { namespaces: NamespaceScope, pods: Option<LabelSelector> },
    /// Addresses in `net` but in none of `except`.
    Block { net: Ipv4Net, except: Vec<Ipv4Net> },
}

#[derive(Debug, Clone)]
enum NamespaceScope {
    Own(String),
    Selected(LabelSelector),
}

/// A port a rule allows: `None` protocol = every protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PortSpec {
    AnyProtocol,
    AnyPort(u8),
    Range(u8, u16, u16),
    Named(u8, String),
}

/// One compiled rule of one policy: which terms (`None` = every peer), which ports.
struct Rule {
    direction: u32,
    terms: Option<BTreeSet<usize>>,
    ports: Vec<PortSpec>,
}

/// The identity of a set of addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct IdentityKey {
    terms: BTreeSet<usize>,
    /// Named ports egress rules ask about: (name, protocol) -> port.
    named_ports: BTreeMap<(String, u8), u16>,
}

/// Compile `objects` for the pods of this node (`local`).
pub fn compile(objects: &PolicyObjects, local: &[LocalPod]) -> Compiled {
    let mut compiled = Compiled::default();
    let namespaces = namespace_labels(objects, local);
    let pods = pod_facts(objects, local);
    let mut terms: Vec<Term> = Vec::new();
    let mut term_ids: BTreeMap<String, usize> = BTreeMap::new();
    // Each policy's rules, with the local pods it selects.
    let mut selecting: Vec<(Vec<Ipv4Addr>, u32, Vec<Rule>)> = Vec::new();
    for policy in &objects.policies {
        let Some((isolates, rules)) = policy_rules(policy, &mut terms, &mut term_ids, &mut compiled.problems)
        else {
            continue;
        };
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        let spec = policy.spec.clone().unwrap_or_default();
        let mut selector = spec.pod_selector.unwrap_or_default();
        if let Some(problem) = selector_problem(&selector) {
            // Never left open: an invalid target selector selects every pod
            // of the namespace.
            compiled.problems.push(format!(
                "{namespace}/{}: podSelector: {problem}: it selects every pod of the namespace",
                policy.metadata.name.as_deref().unwrap_or("?")
            ));
            selector = LabelSelector::default();
        }
        let selected: Vec<Ipv4Addr> = local
            .iter()
            .filter(|pod| pod.namespace == namespace)
            .filter(|pod| {
                let labels = pods.iter().find(|p| p.ipv4 == Some(pod.ipv4)).map(|p| &p.labels);
                matches(&selector, labels.unwrap_or(&Labels::new()))
            })
            .map(|pod| pod.ipv4)
            .collect();
        if !selected.is_empty() {
            selecting.push((selected, isolates, rules));
        }
    }
    // Named ports egress rules resolve against the peer pod.
    let egress_names: BTreeSet<(String, u8)> = selecting
        .iter()
        .flat_map(|(_, _, rules)| rules.iter().filter(|r| r.direction == POLICY_EGRESS))
        .flat_map(|rule| rule.ports.iter())
        .filter_map(|port| match port {
            PortSpec::Named(protocol, name) => Some((name.clone(), *protocol)),
            _ => None,
        })
        .collect();
    // Identities: the pods', and the ipBlock prefixes'.
    let mut prefix_keys: BTreeMap<Ipv4Net, IdentityKey> = BTreeMap::new();
    for term in &terms {
        if let Term::Block { net, except } = term {
            for prefix in std::iter::once(net).chain(except) {
                prefix_keys.entry(*prefix).or_insert_with(|| IdentityKey {
                    terms: block_terms(&terms, |net, except| {
                        net.contains(prefix) && !except.iter().any(|e| e.contains(prefix))
                    }),
                    named_ports: BTreeMap::new(),
                });
            }
        }
    }
    let mut pod_keys: BTreeMap<Ipv4Addr, IdentityKey> = BTreeMap::new();
    for pod in &pods {
        let Some(ipv4) = pod.ipv4 else { continue };
        let mut matched = block_terms(&terms, |net, except| {
            net.contains(&ipv4) && !except.iter().any(|e| e.contains(&ipv4))
        });
        for (id, term) in terms.iter().enumerate() {
            if let Term::Pods { namespaces: scope, pods: selector } = term {
                let namespace_ok = match scope {
                    NamespaceScope::Own(name) => *name == pod.namespace,
                    NamespaceScope::Selected(selector) => {
                        matches(selector, namespaces.get(&pod.namespace).unwrap_or(&Labels::new()))
                    }
                };
                if namespace_ok && selector.as_ref().is_none_or(|s| matches(s, &pod.labels)) {
                    matched.insert(id);
                }
            }
        }
        let named_ports = pod
            .ports
            .iter()
            .filter(|(key, _)| egress_names.contains(key))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        pod_keys.insert(ipv4, IdentityKey { terms: matched, named_ports });
    }
    let identities = number_identities(prefix_keys.values().chain(pod_keys.values()));
    for (net, key) in &prefix_keys {
        compiled.maps.peers.insert(*net, identities[key]);
    }
    for (ipv4, key) in &pod_keys {
        // (A pod's /32 overrides an ipBlock prefix of the same address.)
        compiled.maps.peers.insert(Ipv4Net::from(*ipv4), identities[key]);
    }
    // The rules, per local pod.
    for (selected, isolates, rules) in &selecting {
        for endpoint in selected {
            *compiled.maps.endpoints.entry(*endpoint).or_default() |= isolates;
            let own_ports = pods.iter().find(|p| p.ipv4 == Some(*endpoint)).map(|p| &p.ports);
            for rule in rules {
                for (key, identity) in &identities {
                    let admitted = match &rule.terms {
                        None => true,
                        Some(terms) => !terms.is_disjoint(&key.terms),
                    };
                    if !admitted {
                        continue;
                    }
                    for port in &rule.ports {
                        // A named port: the destination pod's number for it.
                        let resolved = match port {
                            PortSpec::Named(protocol, name) => {
                                let ports = if rule.direction == POLICY_INGRESS {
                                    own_ports.and_then(|p| p.get(&(name.clone(), *protocol)))
                                } else {
                                    key.named_ports.get(&(name.clone(), *protocol))
                                };
                                match ports {
                                    Some(port) => PortSpec::Range(*protocol, *port, *port),
                                    None => continue,
                                }
                            }
                            other => other.clone(),
                        };
                        for rule_key in rule_entries(*endpoint, *identity, rule.direction, &resolved) {
                            compiled.maps.rules.insert(rule_key);
                        }
                    }
                }
            }
        }
    }
    compiled
}

/// The ids of the ipBlock terms `inside` says hold an address or prefix.
fn block_terms(terms: &[Term], inside: impl Fn(&Ipv4Net, &[Ipv4Net]) -> bool) -> BTreeSet<usize> {
    terms
        .iter()
        .enumerate()
        .filter(|(_, term)| matches!(term, Term::Block { net, except } if inside(net, except)))
        .map(|(id, _)| id)
        .collect()
}

/// Give each identity a number: stable across recompiles while its key is
/// the same (a hash of it, moved on by one on a collision), so a change of
/// one policy does not renumber the others' entries.
fn number_identities<'a>(keys: impl Iterator<Item = &'a IdentityKey>) -> BTreeMap<IdentityKey, u32> {
    let mut numbered = BTreeMap::new();
    let empty = IdentityKey { terms: BTreeSet::new(), named_ports: BTreeMap::new() };
    numbered.insert(empty.clone(), POLICY_IDENTITY_NONE);
    let mut taken: BTreeSet<u32> = BTreeSet::from([POLICY_IDENTITY_NONE]);
    let unique: BTreeSet<&IdentityKey> = keys.collect();
    for key in unique {
        if *key == empty {
            continue;
        }
        let mut id = fnv1a(format!("{key:?}").as_bytes());
        while taken.contains(&id) {
            id = id.wrapping_add(1);
        }
        taken.insert(id);
        numbered.insert(key.clone(), id);
    }
    numbered
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193))
}

/// The POLICY_RULES entries of one port of a rule.
fn rule_entries(endpoint: Ipv4Addr, identity: u32, direction: u32, port: &PortSpec) -> Vec<PolicyRule> {
    let key = |protocol: u8, port: u16| PolicyRuleKey {
        endpoint: endpoint.octets(),
        identity: identity.to_be_bytes(),
        direction: direction as u8,
        protocol,
        port: port.to_be_bytes(),
    };
    match port {
        PortSpec::AnyProtocol => vec![PolicyRule { prefix_len: POLICY_PREFIX_ANY_PROTOCOL, key: key(0, 0) }],
        PortSpec::AnyPort(protocol) => {
            vec![PolicyRule { prefix_len: POLICY_PREFIX_ANY_PORT, key: key(*protocol, 0) }]
        }
        PortSpec::Range(protocol, first, last) => port_blocks(*first, *last)
            .into_iter()
            .map(|(start, bits)| PolicyRule {
                prefix_len: POLICY_PREFIX_FULL - u32::from(bits),
                key: key(*protocol, start),
            })
            .collect(),
        PortSpec::Named(..) => Vec::new(),
    }
}

/// `first..=last` as aligned blocks: (start, free low bits), each block
/// `start .. start + 2^bits`.
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    let (mut start, last) = (u32::from(first), u32::from(last));
    while start <= last {
        let mut bits = 0u8;
        while bits < 16 {
            let size = 1u32 << (bits + 1);
            if start % size != 0 || start + size - 1 > last {
                break;
            }
            bits += 1;
        }
        blocks.push((start as u16, bits));
        start += 1u32 << bits;
    }
    blocks
}

/// The directions a policy isolates and its rules; `None` if it selects
/// nothing we can tell (no spec).
fn policy_rules(
    policy: &NetworkPolicy,
    terms: &mut Vec<Term>,
    term_ids: &mut BTreeMap<String, usize>,
    problems: &mut Vec<String>,
) -> Option<(u32, Vec<Rule>)> {
    let namespace = policy.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = format!("{namespace}/{}", policy.metadata.name.as_deref().unwrap_or("?"));
    let spec = policy.spec.as_ref()?;
    let ingress = spec.ingress.clone().unwrap_or_default();
    let egress = spec.egress.clone().unwrap_or_default();
    // The API server's default: Ingress, and Egress if there are egress rules.
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut types = vec!["Ingress".to_owned()];
        if !egress.is_empty() {
            types.push("Egress".into());
        }
        types
    });
    let mut isolates = 0;
    let mut rules = Vec::new();
    let mut intern = |term: Term| {
        let canonical = format!("{term:?}");
        let next = terms.len();
        let id = *term_ids.entry(canonical).or_insert(next);
        if id == next {
            terms.push(term);
        }
        id
    };
    for kind in &types {
        let (direction, list): (u32, Vec<RuleParts>) = match kind.as_str() {
            "Ingress" => {
                (POLICY_INGRESS, ingress.iter().map(|r| (r.from.clone(), r.ports.clone())).collect())
            }
            "Egress" => (POLICY_EGRESS, egress.iter().map(|r| (r.to.clone(), r.ports.clone())).collect()),
            other => {
                // The API server refuses it; whatever was meant, the pods
                // are isolated both ways (never left open).
                problems.push(format!(
                    "{name}: unknown policyTypes entry {other:?} (Ingress or Egress, capitalised): its pods are \
                     isolated in both directions"
                ));
                isolates |= POLICY_INGRESS | POLICY_EGRESS;
                continue;
            }
        };
        isolates |= direction;
        for (index, (peers, ports)) in list.into_iter().enumerate() {
            let what = format!("{name} {kind} rule {index}");
            let peers = peers.unwrap_or_default();
            let terms = if peers.is_empty() {
                None
            } else {
                let mut ids = BTreeSet::new();
                for peer in &peers {
                    match peer_term(peer, &namespace) {
                        Ok(term) => {
                            ids.insert(intern(term));
                        }
                        Err(problem) => problems.push(format!("{what}: {problem}")),
                    }
                }
                // Every peer unusable: the rule admits nobody.
                if ids.is_empty() {
                    continue;
                }
                Some(ids)
            };
            let ports = ports.unwrap_or_default();
            let ports = if ports.is_empty() {
                vec![PortSpec::AnyProtocol]
            } else {
                ports
                    .iter()
                    .filter_map(|port| {
                        port_spec(port).map_err(|p| problems.push(format!("{what}: {p}"))).ok()
                    })
                    .collect()
            };
            rules.push(Rule { direction, terms, ports });
        }
    }
    Some((isolates, rules))
}

/// What is wrong with a selector the API server would refuse, if anything.
fn selector_problem(selector: &LabelSelector) -> Option<String> {
    selector.match_expressions.iter().flatten().find_map(|r| {
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => Some(format!("{} {} needs values", r.key, r.operator)),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                Some(format!("{} {} takes no values", r.key, r.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => None,
            other => Some(format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)")),
        }
    })
}

fn peer_term(peer: &NetworkPolicyPeer, namespace: &str) -> Result<Term, String> {
    for selector in [&peer.pod_selector, &peer.namespace_selector].into_iter().flatten() {
        if let Some(problem) = selector_problem(selector) {
            return Err(format!("selector: {problem}"));
        }
    }
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err("ipBlock cannot be combined with selectors in one peer".into());
        }
        let net = parse_cidr(&block.cidr)?;
        let mut except = Vec::new();
        for text in block.except.iter().flatten() {
            let e = parse_cidr(text)?;
            if !net.contains(&e) {
                return Err(format!("ipBlock except {text} is outside its cidr {}", block.cidr));
            }
            except.push(e);
        }
        return Ok(Term::Block { net, except });
    }
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => Err("a peer needs podSelector, namespaceSelector or ipBlock".into()),
        (None, Some(pods)) => {
            Ok(Term::Pods { namespaces: NamespaceScope::Own(namespace.into()), pods: Some(pods.clone()) })
        }
        (Some(namespaces), pods) => {
            Ok(Term::Pods { namespaces: NamespaceScope::Selected(namespaces.clone()), pods: pods.clone() })
        }
    }
}

/// An IPv4 CIDR; host bits are cleared (as the API server accepts them).
fn parse_cidr(text: &str) -> Result<Ipv4Net, String> {
    text.parse::<Ipv4Net>().map(|net| net.trunc()).map_err(|_| {
        if text.contains(':') {
            format!("{text:?} is IPv6, which this datapath does not carry yet")
        } else {
            format!("{text:?} is not an IPv4 CIDR (like 10.0.0.0/16)")
        }
    })
}

fn protocol_number(protocol: Option<&str>) -> Result<u8, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(IPPROTO_TCP),
        "UDP" => Ok(IPPROTO_UDP),
        "SCTP" => Ok(IPPROTO_SCTP),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

fn port_spec(port: &NetworkPolicyPort) -> Result<PortSpec, String> {
    let protocol = protocol_number(port.protocol.as_deref())?;
    match &port.port {
        None => Ok(PortSpec::AnyPort(protocol)),
        Some(IntOrString::String(name)) => {
            if port.end_port.is_some() {
                return Err(format!("endPort needs a numeric port, not {name:?}"));
            }
            Ok(PortSpec::Named(protocol, name.clone()))
        }
        Some(IntOrString::Int(first)) => {
            let last = port.end_port.unwrap_or(*first);
            let valid = |p: i32| (1..=65535).contains(&p);
            if !valid(*first) || !valid(last) || last < *first {
                return Err(format!("port range {first}-{last} is not within 1-65535 in order"));
            }
            Ok(PortSpec::Range(protocol, *first as u16, last as u16))
        }
    }
}

/// Does `selector` select `labels`? (Empty selects everything.)
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
    by_labels
        && selector.match_expressions.iter().flatten().all(|requirement| {
            let value = labels.get(&requirement.key);
            let values = requirement.values.as_deref().unwrap_or_default();
            match requirement.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // Unknown operators select nothing (the API server refuses them).
                _ => false,
            }
        })
}

/// Every namespace's labels, with the name label the API server adds.
fn namespace_labels(objects: &PolicyObjects, local: &[LocalPod]) -> BTreeMap<String, Labels> {
    let mut out: BTreeMap<String, Labels> = BTreeMap::new();
    for namespace in &objects.namespaces {
        let Some(name) = namespace.metadata.name.clone() else { continue };
        let labels = namespace.metadata.labels.clone().unwrap_or_default();
        out.insert(name, labels);
    }
    let referenced = objects
        .pods
        .iter()
        .filter_map(|pod| pod.metadata.namespace.clone())
        .chain(local.iter().map(|pod| pod.namespace.clone()));
    for name in referenced {
        out.entry(name).or_default();
    }
    for (name, labels) in &mut out {
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
    }
    out
}

/// The pods: those of the objects (address from their status), with this
/// node's pods' addresses from the CNI records (which win: they are what
/// the datapath delivers to), and local pods no object describes (no labels).
fn pod_facts(objects: &PolicyObjects, local: &[LocalPod]) -> Vec<PodFacts> {
    let mut pods: Vec<PodFacts> = Vec::new();
    let mut by_name: BTreeMap<(String, String), usize> = BTreeMap::new();
    for pod in &objects.pods {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let Some(name) = pod.metadata.name.clone() else { continue };
        let status = pod.status.as_ref();
        let ipv4 = status
            .and_then(|s| s.pod_ip.as_deref())
            .into_iter()
            .chain(status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|ip| ip.ip.as_str()))
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok());
        let mut ports = BTreeMap::new();
        let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
        for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            if let (Some(name), Ok(protocol), Ok(number)) =
                (&port.name, protocol_number(port.protocol.as_deref()), u16::try_from(port.container_port))
            {
                ports.insert((name.clone(), protocol), number);
            }
        }
        by_name.insert((namespace.clone(), name), pods.len());
        pods.push(PodFacts {
            namespace,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ipv4,
            ports,
        });
    }
    let local_ips: BTreeSet<Ipv4Addr> = local.iter().map(|p| p.ipv4).collect();
    // An object claiming a local pod's address under another name is stale.
    for pod in &mut pods {
        if pod.ipv4.is_some_and(|ip| local_ips.contains(&ip)) {
            pod.ipv4 = None;
        }
    }
    for pod in local {
        match by_name.get(&(pod.namespace.clone(), pod.name.clone())) {
            Some(index) => pods[*index].ipv4 = Some(pod.ipv4),
            None => pods.push(PodFacts {
                namespace: pod.namespace.clone(),
                labels: Labels::new(),
                ipv4: Some(pod.ipv4),
                ports: BTreeMap::new(),
            }),
        }
    }
    pods
}

#[cfg(test)]
mod tests;
