//! The `policy` bench suite: the per-packet cost of NetworkPolicy
//! (BPF_PROG_TEST_RUN: a tracked connection, and judging a new one with
//! 10, 1,000 and 10,000 rules), how long a policy change takes to compile
//! and write at 1,000 pods / 500 policies, and the agent's memory and the
//! maps' entries at 10,000 pods / 1,000 policies.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use datapath_agent::{
    bpf::{
        Datapath,
        policy::{PolicyMaps, PolicyRule},
    },
    model::{LocalPod, PolicyObjects},
    reconcile::policy::compile,
};
use datapath_common::{
    IPPROTO_TCP, POLICY_EGRESS, POLICY_INGRESS, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL, PolicyRuleKey,
};

use crate::bench::{Stats, stats};

/// Pods of `namespaces` namespaces (labels `app: a<k>`, `tier: t<k % 5>`),
/// `policies` policies each selecting one app and allowing two others on a
/// port range, as Pod/Namespace/NetworkPolicy objects; the first `local`
/// pods are this node's.
pub(crate) fn cluster(pods: usize, policies: usize, local: usize) -> (PolicyObjects, Vec<LocalPod>) {
    let apps = (policies / 2).max(1);
    let mut yaml = String::new();
    for n in 0..20 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{}}}}}\n",
            n % 4
        ));
    }
    let mut locals = Vec::new();
    for p in 0..pods {
        let ip = Ipv4Addr::new(10, 244, (p / 250) as u8, (p % 250 + 2) as u8);
        let (ns, app) = (p % 20, p % apps);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: ns{ns}, name: p{p}, labels: {{app: a{app}, tier: t{}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\nstatus: {{podIP: {ip}}}\n",
            app % 5,
            8000 + app % 7
        ));
        if p < local {
            locals.push(LocalPod { ipv4: ip, namespace: format!("ns{ns}"), name: format!("p{p}") });
        }
    }
    for k in 0..policies {
        yaml.push_str(&policy(k, apps, 0));
    }
    (parse(&yaml), locals)
}

/// Policy `k` (version `version`: a change moves its port).
pub(crate) fn policy(k: usize, apps: usize, version: u16) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: ns{}, name: pol{k}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}, {{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [t1, t2]}}]}}}}]\n    ports: [{{port: {}, endPort: {}}}, {{port: http}}]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.244.{}.0/24]}}}}]\n",
        k % 20,
        k % apps,
        (k + 1) % apps,
        k % 4,
        1000 + version,
        1100 + version,
        k % 40
    )
}

/// The objects of a YAML text, read as `policy_dir` reads its files.
fn parse(yaml: &str) -> PolicyObjects {
    let mut objects = PolicyObjects::default();
    datapath_agent::source::policy_dir::add_objects(&mut objects, yaml, std::path::Path::new("bench"))
        .expect("bench YAML");
    objects
}

/// What a policy change costs the agent: compile everything, write the
/// difference into the maps (a private, unpinned datapath).
pub(crate) struct ChangeLatency {
    pub pods: usize,
    pub policies: usize,
    pub local: usize,
    pub first_sync: Duration,
    pub entries: (usize, usize, usize),
    pub change: Stats,
}

pub(crate) fn change_latency(
    pods: usize,
    policies: usize,
    local: usize,
    changes: usize,
) -> anyhow::Result<ChangeLatency> {
    let (mut objects, locals) = cluster(pods, policies, local);
    let mut dp = Datapath::load_unpinned()?;
    let started = Instant::now();
    let compiled = compile(&objects, &locals);
    dp.write_policy_maps(&PolicyMaps::default(), &compiled.maps)?;
    let first_sync = started.elapsed();
    let entries = (compiled.maps.endpoints.len(), compiled.maps.peers.len(), compiled.maps.rules.len());
    let mut current = compiled.maps;
    let apps = (policies / 2).max(1);
    let mut samples = Vec::new();
    for change in 0..changes {
        let k = (change * 7) % policies;
        let edited = parse(&policy(k, apps, (change % 50 + 1) as u16));
        objects.policies[k] = edited.policies.into_iter().next().unwrap();
        let started = Instant::now();
        let compiled = compile(&objects, &locals);
        dp.write_policy_maps(&current, &compiled.maps)?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        current = compiled.maps;
    }
    Ok(ChangeLatency { pods, policies, local, first_sync, entries, change: stats(samples) })
}

/// `count` filler rules for `endpoint` (other identities), so the rule
/// trie holds that many entries besides the ones a packet can match.
pub(crate) fn filler_rules(endpoint: [u8; 4], count: usize) -> Vec<PolicyRule> {
    (0..count)
        .map(|i| PolicyRule {
            prefix_len: if i % 3 == 0 { POLICY_PREFIX_ANY_PROTOCOL } else { POLICY_PREFIX_FULL },
            key: PolicyRuleKey {
                endpoint,
                identity: (1000 + i as u32).to_be_bytes(),
                direction: if i % 2 == 0 { POLICY_EGRESS as u8 } else { POLICY_INGRESS as u8 },
                protocol: if i % 3 == 0 { 0 } else { IPPROTO_TCP },
                port: if i % 3 == 0 { [0, 0] } else { (1 + (i % 60000) as u16).to_be_bytes() },
            },
        })
        .collect()
}

/// The compiled policy at scale: how long the first compile and write
/// take, the maps' entries, and the memory the agent holds for it (this
/// process's RSS growth while holding the objects and the compiled maps).
pub(crate) struct AtScale {
    pub pods: usize,
    pub policies: usize,
    pub local: usize,
    pub sync: Duration,
    pub entries: (usize, usize, usize),
    pub rss_growth_kib: u64,
}

pub(crate) fn at_scale(pods: usize, policies: usize, local: usize) -> anyhow::Result<AtScale> {
    let before = crate::bench_extra::rss_kib(std::process::id());
    let (objects, locals) = cluster(pods, policies, local);
    let mut dp = Datapath::load_unpinned()?;
    let started = Instant::now();
    let compiled = compile(&objects, &locals);
    dp.write_policy_maps(&PolicyMaps::default(), &compiled.maps)?;
    let sync = started.elapsed();
    let rss_growth_kib = crate::bench_extra::rss_kib(std::process::id()).saturating_sub(before);
    let entries = (compiled.maps.endpoints.len(), compiled.maps.peers.len(), compiled.maps.rules.len());
    drop((objects, compiled));
    Ok(AtScale { pods, policies, local, sync, entries, rss_growth_kib })
}
