//! Upstream Kubernetes NetworkPolicy e2e cases (`test/e2e/network/netpol/network_policy.go`),
//! transcribed into plain data.
//!
//! # Provenance
//! * `network_policy.go` read at kubernetes/kubernetes commit
//!   `008b3652959ca58af8be3fb5b6ecfe9ae7638282` (the newest stored version; it gives every
//!   `It()` its own reduced pod topology, e.g. "x/a", "x/b", "y/a").
//! * Cross-checked against commit `9db638c0807a720aa050ebcef69c32e4d4cce280`, the last layout
//!   that used the full 3 namespaces x 3 pods model. Both versions have the same 48 `It()`s with
//!   the same policies. Where the reduced version leaves out expectations for pods it does not
//!   create, the full-model expectations are used here, because this file's model always has all 9
//!   pods. Two cases are affected: "...allow ingress traffic for a target" (adds
//!   `AllIngress x/c false`) and "...Multiple PodSelectors and NamespaceSelectors" (adds
//!   `Expect z/a -> x/a false`). [`UPSTREAM_TOPOLOGY`] lists the pods upstream creates in each case
//!   at the newer commit, for reference only.
//! * Helpers: `policies.go` @ fde22c3f9aacfd260225a9741de123a41157b7c0 (policy builders),
//!   `reachability.go` @ c971a015f7fcf7a3828de2c489fe6ef6e84f2819 (Expect/ExpectPeer/...),
//!   `model.go` @ 95f08499d652a6211121d8af35f470609217c730 (port names), `test_helper.go`
//!   (AddPodLabels / AddNamespaceLabel merge a label into the existing set).
//!
//! # Model
//! * Namespaces `x`, `y`, `z`; pods `a`, `b`, `c` in each (9 pods, "x/a" ... "z/c").
//!   Initial labels: see [`INITIAL_NAMESPACE_LABELS`] and [`INITIAL_POD_LABELS`].
//! * Every pod serves ports 80 and 81 on TCP, UDP and SCTP. The container port names are
//!   `serve-<port>-<protocol in lower case>`, e.g. `serve-80-tcp` (see [`container_port_name`]).
//!   Upstream runs only the protocols and ports a test needs. Serving more of them here does not
//!   change any expected result, because named ports are unique per protocol.
//! * Every case starts from the fresh initial state: initial labels and no NetworkPolicies in any
//!   namespace. Upstream creates new namespaces for every `It()`. Steps within a case build on each
//!   other.
//!
//! # Steps
//! A [`Step`] applies its changes in this order: namespace labels, pod labels, policy deletions
//! (`delete_all_policies` first, then `delete_policies`), then policies to create or replace. Then
//! it probes every (protocol, port) in `probes` from every pod to every pod and compares the
//! results with the truth table built from `default_ok` and `ops` (see [`truth_table`]).
//!
//! # Comparing
//! Upstream ignores loopback (`ignoreLoopback = true`): cells where from == to are never compared,
//! even when an op sets them. Upstream probes each cell once and, if any cell is wrong, probes a
//! second time. Each probe retries for up to 10 s until it matches the expectation, so the
//! policies have time to take effect.
//!
//! # Probe target
//! Upstream probes each pod's per-pod Service ClusterIP (the Service selects exactly that pod).
//! Here we probe the pod IP directly, as the brief requires. No case depends on the difference. The
//! ipBlock cases use pod IPs, which match the destination after DNAT either way.
//!
//! # Policy YAML conventions
//! * One `networking.k8s.io/v1` NetworkPolicy per string, with `metadata.namespace` set.
//! * Placeholder `${IP <ns>/<pod>}` stands for that pod's IPv4 address at run time.
//!   Examples: `${IP y/b}/32` or, for the large block, `${IP x/b}/4`. Upstream's
//!   `makeLargeCIDRForIP` masks the pod IP to its /4 network. Here the runner must mask host bits
//!   (so `${IP x/b}/4` becomes the network address of x/b's IP with /4).
//!   These values are quoted in the YAML.
//! * `policyTypes`: upstream's builders (`SetSpecIngressRules` / `SetSpecEgressRules`) always set
//!   them, so every manifest here has explicit `policyTypes`. If a manifest had none, the runner
//!   would have to apply the API server default: `[Ingress]`, plus `Egress` if the spec has egress
//!   rules.
//! * An empty rule list (`SetSpecIngressRules()` with no rules) serialises as an omitted
//!   `ingress`/`egress` key (Go `omitempty`). This is the same as an explicit `[]`.
//! * A `ports` entry without `protocol` means TCP (API default), exactly as upstream leaves it.
//! * `podSelector: {}` is upstream's empty `LabelSelector` / empty `MatchLabels` (selects all).
#![allow(dead_code)]

/// A pod of the model: namespace "x"/"y"/"z", pod "a"/"b"/"c", written "x/a".
pub type PodName = &'static str;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One peer pattern as upstream's `Peer{Namespace, Pod}`: None = any.
#[derive(Clone, Copy, Debug)]
pub struct PeerSel {
    pub namespace: Option<&'static str>,
    pub pod: Option<&'static str>,
}

/// The expectation operations upstream applies to a `Reachability`, in order.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// reachability.Expect(from, to, ok)
    Expect { from: PodName, to: PodName, ok: bool },
    /// reachability.ExpectPeer(from, to, ok) with wildcard peers
    Peer { from: PeerSel, to: PeerSel, ok: bool },
    /// reachability.ExpectAllIngress(pod, ok)
    AllIngress { pod: PodName, ok: bool },
    /// reachability.ExpectAllEgress(pod, ok)
    AllEgress { pod: PodName, ok: bool },
}

/// What to change before probing (in this order: namespace labels, pod labels, deletions, policies).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Replace the labels of a namespace ("x") with exactly these (upstream also keeps `ns: <name>` only if it sets it; write the complete resulting label set).
    pub namespace_labels: &'static [(&'static str, &'static [(&'static str, &'static str)])],
    /// Replace the labels of a pod ("x/a") with exactly these (complete resulting set).
    pub pod_labels: &'static [(PodName, &'static [(&'static str, &'static str)])],
    /// Policies to delete: (namespace, name).
    pub delete_policies: &'static [(&'static str, &'static str)],
    /// Delete every policy in every namespace first (upstream's CleanPolicies / deleting all).
    pub delete_all_policies: bool,
    /// NetworkPolicy manifests (networking.k8s.io/v1 YAML, one object per string, with metadata.namespace set) to create or replace (by namespace/name).
    pub policies: &'static [&'static str],
    /// What to probe after the changes: protocol and server port (80 or 81).
    pub probes: &'static [(Protocol, u16)],
    /// The expected truth table for each probe of this step.
    pub default_ok: bool,
    pub ops: &'static [Op],
}

#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// The upstream ginkgo.It text, verbatim.
    /// The same text appears in several `Describe` blocks (TCP, UDP and SCTP). In that case the
    /// probe protocol tells the cases apart.
    pub name: &'static str,
    /// Why it is skipped, if it needs something outside IPv4 TCP/UDP/SCTP pod-to-pod probes (e.g. IPv6, a feature gate we do not have); None = run it.
    pub skip: Option<&'static str>,
    pub steps: &'static [Step],
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

pub const NAMESPACES: &[&str] = &["x", "y", "z"];

/// All pods, in upstream's truth-table order.
pub const PODS: &[PodName] = &["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];

pub const PORTS: &[u16] = &[80, 81];
pub const PROTOCOLS: &[Protocol] = &[Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Initial namespace labels: `ns: <name>` and `kubernetes.io/metadata.name: <name>`.
/// The upstream selectors use only `kubernetes.io/metadata.name` (and `ns2` once it is added).
pub const INITIAL_NAMESPACE_LABELS: &[(&str, &[(&str, &str)])] = &[
    ("x", &[("ns", "x"), ("kubernetes.io/metadata.name", "x")]),
    ("y", &[("ns", "y"), ("kubernetes.io/metadata.name", "y")]),
    ("z", &[("ns", "z"), ("kubernetes.io/metadata.name", "z")]),
];

/// Initial pod labels: `pod: <a|b|c>`.
pub const INITIAL_POD_LABELS: &[(PodName, &[(&str, &str)])] = &[
    ("x/a", &[("pod", "a")]),
    ("x/b", &[("pod", "b")]),
    ("x/c", &[("pod", "c")]),
    ("y/a", &[("pod", "a")]),
    ("y/b", &[("pod", "b")]),
    ("y/c", &[("pod", "c")]),
    ("z/a", &[("pod", "a")]),
    ("z/b", &[("pod", "b")]),
    ("z/c", &[("pod", "c")]),
];

impl Protocol {
    /// Upstream's `strings.ToLower(string(v1.Protocol))`.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    /// The Kubernetes API spelling.
    pub fn api_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// Upstream `Container.PortName()`: `fmt.Sprintf("serve-%d-%s", port, strings.ToLower(protocol))`.
pub fn container_port_name(protocol: Protocol, port: u16) -> String {
    format!("serve-{}-{}", port, protocol.lower())
}

/// Upstream `Container.Name()`: `cont-<port>-<protocol lower>` (for reference).
pub fn container_name(protocol: Protocol, port: u16) -> String {
    format!("cont-{}-{}", port, protocol.lower())
}

/// Build the expected truth table of a step, as upstream's `NewReachability(allPods, default)`
/// followed by the ops in order. Index: `table[from][to]`, pods in [`PODS`] order.
/// Loopback cells (from == to) are present but must not be compared (upstream ignores them).
pub fn truth_table(step: &Step) -> [[bool; 9]; 9] {
    fn idx(p: &str) -> usize {
        PODS.iter().position(|q| *q == p).unwrap_or_else(|| panic!("unknown pod {p}"))
    }
    fn matches(sel: &PeerSel, pod: &str) -> bool {
        let (ns, name) = pod.split_once('/').expect("ns/pod");
        sel.namespace.is_none_or(|n| n == ns) && sel.pod.is_none_or(|p| p == name)
    }
    let mut t = [[step.default_ok; 9]; 9];
    for op in step.ops {
        match *op {
            Op::Expect { from, to, ok } => t[idx(from)][idx(to)] = ok,
            Op::AllIngress { pod, ok } => {
                let j = idx(pod);
                for row in t.iter_mut() {
                    row[j] = ok;
                }
            }
            Op::AllEgress { pod, ok } => {
                let i = idx(pod);
                t[i] = [ok; 9];
            }
            Op::Peer { from, to, ok } => {
                for (i, f) in PODS.iter().enumerate() {
                    if !matches(&from, f) {
                        continue;
                    }
                    for (j, d) in PODS.iter().enumerate() {
                        if matches(&to, d) {
                            t[i][j] = ok;
                        }
                    }
                }
            }
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// Small const helpers for the tables below
// ---------------------------------------------------------------------------------------------

const ANY: PeerSel = PeerSel { namespace: None, pod: None };
const fn ns(n: &'static str) -> PeerSel {
    PeerSel { namespace: Some(n), pod: None }
}
const fn ns_pod(n: &'static str, p: &'static str) -> PeerSel {
    PeerSel { namespace: Some(n), pod: Some(p) }
}
const fn expect(from: PodName, to: PodName, ok: bool) -> Op {
    Op::Expect { from, to, ok }
}
const fn peer(from: PeerSel, to: PeerSel, ok: bool) -> Op {
    Op::Peer { from, to, ok }
}
const fn all_ingress(pod: PodName, ok: bool) -> Op {
    Op::AllIngress { pod, ok }
}
const fn all_egress(pod: PodName, ok: bool) -> Op {
    Op::AllEgress { pod, ok }
}

/// A step that changes nothing, probes nothing and expects everything allowed; use with `..`.
const NOCHANGE: Step = Step {
    namespace_labels: &[],
    pod_labels: &[],
    delete_policies: &[],
    delete_all_policies: false,
    policies: &[],
    probes: &[],
    default_ok: true,
    ops: &[],
};

const TCP80: &[(Protocol, u16)] = &[(Protocol::Tcp, 80)];
const TCP81: &[(Protocol, u16)] = &[(Protocol::Tcp, 81)];
const UDP80: &[(Protocol, u16)] = &[(Protocol::Udp, 80)];
const UDP81: &[(Protocol, u16)] = &[(Protocol::Udp, 81)];
const SCTP80: &[(Protocol, u16)] = &[(Protocol::Sctp, 80)];
const SCTP81: &[(Protocol, u16)] = &[(Protocol::Sctp, 81)];

// ---------------------------------------------------------------------------------------------
// Policies (translated from upstream's Go builders)
// ---------------------------------------------------------------------------------------------

/// GenNetworkPolicyWithNameAndPodSelector("deny-ingress", {}, SetSpecIngressRules())
const DENY_INGRESS_X: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
"#;

/// GenNetworkPolicyWithNameAndPodSelector("deny-all", {}, SetSpecIngressRules())
const DENY_ALL_INGRESS_ONLY_X: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
"#;

/// GenNetworkPolicyWithNameAndPodSelector("deny-all", {}, SetSpecIngressRules(), SetSpecEgressRules())
const DENY_ALL_X: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  - Egress
"#;

const X_A_ALLOWS_X_B: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: x-a-allows-x-b
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
"#;

const ALLOW_ALL_TO_A: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-to-a
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector: {}
      namespaceSelector: {}
"#;

const ALLOW_FROM_ANOTHER_NS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-from-another-ns
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector: {}
"#;

const ALLOW_CLIENT_A_VIA_NS_SELECTOR: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
"#;

const X_A_ALLOWS_X_B_EXPR: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: x-a-allows-x-b
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchExpressions:
        - key: pod
          operator: In
          values:
          - b
"#;

const ALLOW_NS_Y_MATCH_SELECTOR_EXPR: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-match-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: In
          values:
          - y
"#;

const ALLOW_NS_NOT_X_OR_POD_B: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-match-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values:
          - x
    - podSelector:
        matchLabels:
          pod: b
"#;

const ALLOW_NS_Y_PODSELECTOR_AND_NSSELECTOR: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-podselector-and-nsselector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values:
          - x
      podSelector:
        matchLabels:
          pod: b
"#;

const ALLOW_NS_Y_Z_POD_B_C: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-z-pod-b-c
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values:
          - x
      podSelector:
        matchExpressions:
        - key: pod
          operator: In
          values:
          - b
          - c
"#;

const ALLOW_NS_X_POD_B_C: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-x-pod-b-c
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
    - podSelector:
        matchLabels:
          pod: c
"#;

/// Used by the TCP, UDP and SCTP variants (the policy has no ports).
const ALLOW_NS_Y_POD_A_VIA_NAMESPACE_POD_SELECTOR: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-pod-a-via-namespace-pod-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
      podSelector:
        matchLabels:
          pod: a
"#;

const ALLOW_PORT81_TCP_FROM_NS_Y: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
    ports:
    - port: 81
      protocol: TCP
"#;

const ALLOW_PORT80_TCP_FROM_NS_Y: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector-80
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
    ports:
    - port: 80
      protocol: TCP
"#;

const ALLOW_ALL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - {}
"#;

const ALLOW_ALL_NAMED_PORT_81: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - port: serve-81-tcp
"#;

const ALLOW_NS_Y_NAMED_PORT_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector-80
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
    ports:
    - port: serve-80-tcp
      protocol: TCP
"#;

const ALLOW_EGRESS_NAMED_PORT_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Egress
  egress:
  - ports:
    - port: serve-80-tcp
"#;

const MUTATE_ALLOW_ALL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-mutate-to-deny-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - {}
"#;

/// Upstream: `policy.Spec.Ingress = []` then UpdatePolicy (policyTypes stay [Ingress]).
const MUTATE_DENY_ALL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-mutate-to-deny-all
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress: []
"#;

const ALLOW_FROM_NS2_UPDATED: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          ns2: updated
"#;

const ALLOW_FROM_POD2_UPDATED: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-pod-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
          pod2: updated
"#;

const DENY_EMPTY_POLICY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-empty-policy
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector: {}
"#;

const DENY_INGRESS_TARGET_ISOLATED: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress-via-label-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      target: isolated
  policyTypes:
  - Ingress
"#;

const DENY_EGRESS_POD_A: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-egress-pod-a
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
"#;

const DENY_EGRESS_NS_X: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-egress-ns-x
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Egress
"#;

/// Upstream sets `PolicyTypes = [Egress, Ingress]` explicitly after building.
const INGRESS_EGRESS_TOGETHER: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-pod-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          pod: b
  egress:
  - ports:
    - port: 80
"#;

const ALLOW_TO_NS_Y_POD_A: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-to-ns-y-pod-a
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
      podSelector:
        matchLabels:
          pod: a
"#;

const ALLOW_FROM_XA_ON_YA: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-from-xa-on-ya-match-selector
  namespace: y
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: x
      podSelector:
        matchLabels:
          pod: a
"#;

const ALLOW_FROM_XA_ON_YB: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-from-xa-on-yb-match-selector
  namespace: y
spec:
  podSelector:
    matchLabels:
      pod: b
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: x
      podSelector:
        matchLabels:
          pod: a
"#;

const ALLOW_INGRESS_BY_PROTO: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress-by-proto
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - protocol: TCP
"#;

const ALLOW_INGRESS_PORT_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress-port-80
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - port: 80
"#;

const ALLOW_INGRESS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  ingress:
  - {}
"#;

const ALLOW_EGRESS_PORT_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress-port-80
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Egress
  egress:
  - ports:
    - port: 80
"#;

const ALLOW_EGRESS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress
  namespace: x
spec:
  podSelector: {}
  policyTypes:
  - Egress
  egress:
  - {}
"#;

/// Upstream: `fmt.Sprintf("%s/%d", podYB.Status.PodIP, 32)`.
const ALLOW_CIDR_Y_B: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-cidr-egress-rule
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - to:
    - ipBlock:
        cidr: "${IP y/b}/32"
"#;

/// Upstream: cidr = makeLargeCIDRForIP(x/b IP) (the /4 network containing x/b, host bits
/// masked by upstream; here the runner masks), except = [x/b IP/32].
/// (At the older full-model commit the /4 was built unmasked from x/a's IP: `${IP x/a}/4`.)
const ALLOW_CIDR_EXCEPT_X_B: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-cidr-egress-rule
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - to:
    - ipBlock:
        cidr: "${IP x/b}/4"
        except:
        - "${IP x/b}/32"
"#;

/// Replaces ALLOW_CIDR_EXCEPT_X_B (same name; upstream UpdatePolicy).
const ALLOW_CIDR_X_B: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-cidr-egress-rule
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - to:
    - ipBlock:
        cidr: "${IP x/b}/32"
"#;

const ALLOW_EGRESS_FOR_TARGET: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress-for-target
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - {}
"#;

const DENY_INGRESS_VIA_LABEL_SELECTOR_POD_A: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress-via-label-selector
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
"#;

const ALLOW_ONLY_SCTP_INGRESS_ON_PORT_81: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-only-sctp-ingress-on-port-81
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - port: 81
      protocol: SCTP
"#;

const ALLOW_ONLY_SCTP_INGRESS_ON_PORT_80: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-only-sctp-ingress-on-port-80
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - port: 80
      protocol: SCTP
"#;

const ALLOW_ONLY_UDP_INGRESS_ON_PORT_81: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-only-udp-ingress-on-port-81
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - ports:
    - port: 81
      protocol: UDP
"#;

const ALLOW_NS_Y_IMMUTABLE_LABEL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-client-a-via-ns-selector-for-immutable-ns-label
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
"#;

const ALLOW_EGRESS_NS_NOT_Y_IMMUTABLE_LABEL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ns-y-match-selector-for-immutable-ns-label
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: NotIn
          values:
          - y
"#;

const ALLOW_PORT81_UDP_FROM_NS_Y: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress-on-port-81-ns-x
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
    ports:
    - port: 81
      protocol: UDP
"#;

const ALLOW_PORT81_SCTP_FROM_NS_Y: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress-on-port-81-ns-x
  namespace: x
spec:
  podSelector:
    matchLabels:
      pod: a
  policyTypes:
  - Ingress
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: y
    ports:
    - port: 81
      protocol: SCTP
"#;

// Shared expectation tables.

/// Everything into x is denied.
const OPS_DENY_INTO_X: &[Op] = &[peer(ANY, ns("x"), false)];
/// Only namespace y may reach x/a (x and z denied).
const OPS_ONLY_Y_TO_XA: &[Op] =
    &[peer(ns("x"), ns_pod("x", "a"), false), peer(ns("z"), ns_pod("x", "a"), false)];
/// Only y/a may reach x/a.
const OPS_ONLY_YA_TO_XA: &[Op] = &[all_ingress("x/a", false), expect("y/a", "x/a", true)];
/// Only x/b may reach x/a.
const OPS_ONLY_XB_TO_XA: &[Op] = &[all_ingress("x/a", false), expect("x/b", "x/a", true)];
/// Port 81 policy from ns y (upstream's reachabilityALLOW).
const OPS_PORT_ALLOW_Y: &[Op] = &[
    peer(ns("x"), ns_pod("x", "a"), false),
    peer(ns("y"), ns_pod("x", "a"), true),
    peer(ns("z"), ns_pod("x", "a"), false),
];

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

pub const CASES: &[Case] = &[
    // ===== Describe("Netpol") / Context("NetworkPolicy between server and client") =====
    Case {
        name: "should support a 'default-deny-ingress' policy",
        skip: None,
        steps: &[Step { policies: &[DENY_INGRESS_X], probes: TCP80, ops: OPS_DENY_INTO_X, ..NOCHANGE }],
    },
    Case {
        name: "should support a 'default-deny-all' policy",
        skip: None,
        steps: &[Step {
            policies: &[DENY_ALL_X],
            probes: TCP80,
            ops: &[peer(ANY, ns("x"), false), peer(ns("x"), ANY, false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        skip: None,
        steps: &[Step { policies: &[X_A_ALLOWS_X_B], probes: TCP80, ops: OPS_ONLY_XB_TO_XA, ..NOCHANGE }],
    },
    Case {
        name: "should enforce policy to allow ingress traffic for a target",
        skip: None,
        // Full-model ops (the reduced-topology commit omits x/c, which it does not create).
        steps: &[Step {
            policies: &[DENY_ALL_INGRESS_ONLY_X, ALLOW_ALL_TO_A],
            probes: TCP80,
            ops: &[all_ingress("x/a", true), all_ingress("x/b", false), all_ingress("x/c", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow ingress traffic from pods in all namespaces",
        skip: None,
        steps: &[Step { policies: &[ALLOW_FROM_ANOTHER_NS], probes: TCP80, ops: &[], ..NOCHANGE }],
    },
    Case {
        name: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_CLIENT_A_VIA_NS_SELECTOR],
            probes: TCP80,
            ops: OPS_ONLY_Y_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on PodSelector with MatchExpressions",
        skip: None,
        steps: &[Step {
            policies: &[X_A_ALLOWS_X_B_EXPR],
            probes: TCP80,
            ops: OPS_ONLY_XB_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on NamespaceSelector with MatchExpressions",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_MATCH_SELECTOR_EXPR],
            probes: TCP80,
            ops: OPS_ONLY_Y_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on PodSelector or NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_NOT_X_OR_POD_B],
            probes: TCP80,
            ops: &[expect("x/a", "x/a", false), expect("x/c", "x/a", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on PodSelector and NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_PODSELECTOR_AND_NSSELECTOR],
            probes: TCP80,
            ops: &[all_ingress("x/a", false), expect("y/b", "x/a", true), expect("z/b", "x/a", true)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        skip: None,
        // Full-model ops (the reduced-topology commit omits z/a, which it does not create).
        steps: &[Step {
            policies: &[ALLOW_NS_Y_Z_POD_B_C],
            probes: TCP80,
            ops: &[
                peer(ns("x"), ns_pod("x", "a"), false),
                expect("y/a", "x/a", false),
                expect("z/a", "x/a", false),
            ],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on any PodSelectors",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_X_POD_B_C],
            probes: TCP80,
            ops: &[all_ingress("x/a", false), expect("x/b", "x/a", true), expect("x/c", "x/a", true)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_POD_A_VIA_NAMESPACE_POD_SELECTOR],
            probes: TCP80,
            ops: OPS_ONLY_YA_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on Ports",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_PORT81_TCP_FROM_NS_Y],
            probes: TCP81,
            ops: OPS_PORT_ALLOW_Y,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce multiple, stacked policies with overlapping podSelectors",
        skip: None,
        steps: &[
            // "Verifying traffic on port 81."
            Step {
                policies: &[ALLOW_PORT81_TCP_FROM_NS_Y],
                probes: TCP81,
                ops: OPS_PORT_ALLOW_Y,
                ..NOCHANGE
            },
            // "Verifying traffic on port 80."
            Step { probes: TCP80, ops: &[all_ingress("x/a", false)], ..NOCHANGE },
            // "Verifying that we can add a policy to unblock port 80"
            Step {
                policies: &[ALLOW_PORT80_TCP_FROM_NS_Y],
                probes: TCP80,
                ops: OPS_PORT_ALLOW_Y,
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should support allow-all policy",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_ALL],
            probes: &[(Protocol::Tcp, 80), (Protocol::Tcp, 81)],
            ops: &[],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should allow ingress access on one named port",
        skip: None,
        steps: &[
            Step { policies: &[ALLOW_ALL_NAMED_PORT_81], probes: TCP81, ops: &[], ..NOCHANGE },
            Step { probes: TCP80, ops: OPS_DENY_INTO_X, ..NOCHANGE },
        ],
    },
    Case {
        name: "should allow ingress access from namespace on one named port",
        skip: None,
        steps: &[
            // "Verify that port 80 is allowed for namespace y"
            Step { policies: &[ALLOW_NS_Y_NAMED_PORT_80], probes: TCP80, ops: OPS_ONLY_Y_TO_XA, ..NOCHANGE },
            // "Verify that port 81 is blocked for all namespaces including y"
            Step { probes: TCP81, ops: &[all_ingress("x/a", false)], ..NOCHANGE },
        ],
    },
    Case {
        name: "should allow egress access on one named port",
        skip: None,
        steps: &[
            Step { policies: &[ALLOW_EGRESS_NAMED_PORT_80], probes: TCP80, ops: &[], ..NOCHANGE },
            Step { probes: TCP81, ops: &[peer(ns("x"), ANY, false)], ..NOCHANGE },
        ],
    },
    Case {
        name: "should enforce updated policy",
        skip: None,
        steps: &[
            Step { policies: &[MUTATE_ALLOW_ALL], probes: TCP81, ops: &[], ..NOCHANGE },
            Step { policies: &[MUTATE_DENY_ALL], probes: TCP81, ops: OPS_DENY_INTO_X, ..NOCHANGE },
        ],
    },
    Case {
        name: "should allow ingress access from updated namespace",
        skip: None,
        steps: &[
            Step {
                policies: &[ALLOW_FROM_NS2_UPDATED],
                probes: TCP80,
                ops: &[all_ingress("x/a", false)],
                ..NOCHANGE
            },
            // AddNamespaceLabel(nsY, "ns2", "updated") (merged into the existing labels).
            Step {
                namespace_labels: &[(
                    "y",
                    &[("ns", "y"), ("kubernetes.io/metadata.name", "y"), ("ns2", "updated")],
                )],
                probes: TCP80,
                ops: &[all_ingress("x/a", false), peer(ns("y"), ANY, true)],
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should allow ingress access from updated pod",
        skip: None,
        steps: &[
            Step {
                policies: &[ALLOW_FROM_POD2_UPDATED],
                probes: TCP80,
                ops: &[all_ingress("x/a", false)],
                ..NOCHANGE
            },
            // AddPodLabels(x/b, {pod: b, pod2: updated}) (merged into the existing labels).
            Step {
                pod_labels: &[("x/b", &[("pod", "b"), ("pod2", "updated")])],
                probes: TCP80,
                ops: OPS_ONLY_XB_TO_XA,
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should deny ingress from pods on other namespaces",
        skip: None,
        steps: &[Step {
            policies: &[DENY_EMPTY_POLICY],
            probes: TCP80,
            ops: &[peer(ns("y"), ns("x"), false), peer(ns("z"), ns("x"), false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should deny ingress access to updated pod",
        skip: None,
        steps: &[
            // "Verify that everything can reach x/a"
            Step { policies: &[DENY_INGRESS_TARGET_ISOLATED], probes: TCP80, ops: &[], ..NOCHANGE },
            // AddPodLabels(x/a, {target: isolated}) (merged into the existing labels).
            Step {
                pod_labels: &[("x/a", &[("pod", "a"), ("target", "isolated")])],
                probes: TCP80,
                ops: &[all_ingress("x/a", false)],
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should deny egress from pods based on PodSelector",
        skip: None,
        steps: &[Step {
            policies: &[DENY_EGRESS_POD_A],
            probes: TCP80,
            ops: &[all_egress("x/a", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should deny egress from all pods in a namespace",
        skip: None,
        steps: &[Step {
            policies: &[DENY_EGRESS_NS_X],
            probes: TCP80,
            ops: &[peer(ns("x"), ANY, false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should work with Ingress, Egress specified together",
        skip: None,
        steps: &[
            Step { policies: &[INGRESS_EGRESS_TOGETHER], probes: TCP80, ops: OPS_ONLY_XB_TO_XA, ..NOCHANGE },
            // "validating that port 81 doesn't work"
            Step {
                probes: TCP81,
                ops: &[all_ingress("x/a", false), all_egress("x/a", false), expect("x/b", "x/a", true)],
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_TO_NS_Y_POD_A, ALLOW_FROM_XA_ON_YA, ALLOW_FROM_XA_ON_YB],
            probes: TCP80,
            ops: &[
                peer(ns_pod("x", "a"), ANY, false),
                peer(ANY, ns_pod("y", "a"), false),
                peer(ns_pod("x", "a"), ns_pod("y", "a"), true),
                peer(ANY, ns_pod("y", "b"), false),
            ],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_TO_NS_Y_POD_A],
            probes: TCP80,
            ops: &[all_egress("x/a", false), expect("x/a", "y/a", true)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        skip: None,
        steps: &[
            Step { policies: &[ALLOW_INGRESS_BY_PROTO], probes: TCP80, ops: &[], ..NOCHANGE },
            Step { probes: UDP80, ops: &[peer(ANY, ns_pod("x", "a"), false)], ..NOCHANGE },
        ],
    },
    Case {
        name: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        skip: None,
        steps: &[
            // "The policy targets port 80 -- so let's make sure traffic on port 81 is blocked"
            Step { policies: &[ALLOW_INGRESS_PORT_80], probes: TCP81, ops: OPS_DENY_INTO_X, ..NOCHANGE },
            // "Allowing all ports"
            Step { policies: &[ALLOW_INGRESS], probes: TCP81, ops: &[], ..NOCHANGE },
        ],
    },
    Case {
        name: "should enforce multiple egress policies with egress allow-all policy taking precedence",
        skip: None,
        steps: &[
            Step {
                policies: &[ALLOW_EGRESS_PORT_80],
                probes: TCP81,
                ops: &[peer(ns("x"), ANY, false)],
                ..NOCHANGE
            },
            // "Allowing all ports"
            Step { policies: &[ALLOW_EGRESS], probes: TCP81, ops: &[], ..NOCHANGE },
        ],
    },
    Case {
        name: "should stop enforcing policies after they are deleted",
        skip: None,
        steps: &[
            Step {
                policies: &[DENY_ALL_X],
                probes: TCP80,
                ops: &[peer(ns("x"), ANY, false), peer(ANY, ns("x"), false)],
                ..NOCHANGE
            },
            // k8s.cleanNetworkPolicies(ctx) (upstream then sleeps 3 s).
            Step { delete_all_policies: true, probes: TCP80, ops: &[], ..NOCHANGE },
        ],
    },
    Case {
        name: "should allow egress access to server in CIDR block",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_CIDR_Y_B],
            probes: TCP80,
            ops: &[all_egress("x/a", false), expect("x/a", "y/b", true)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce except clause while egress access to server in CIDR block",
        skip: None,
        // Assumes, as upstream does, that every pod IP lies in the /4 around x/b's IP.
        steps: &[Step {
            policies: &[ALLOW_CIDR_EXCEPT_X_B],
            probes: TCP80,
            ops: &[expect("x/a", "x/b", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        skip: None,
        steps: &[
            Step {
                policies: &[ALLOW_CIDR_EXCEPT_X_B],
                probes: TCP80,
                ops: &[expect("x/a", "x/b", false)],
                ..NOCHANGE
            },
            // UpdatePolicy: same name, now only x/b's IP/32.
            Step {
                policies: &[ALLOW_CIDR_X_B],
                probes: TCP80,
                ops: &[all_egress("x/a", false), expect("x/a", "x/b", true)],
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        skip: None,
        steps: &[
            Step { policies: &[ALLOW_EGRESS_FOR_TARGET], probes: TCP80, ops: &[], ..NOCHANGE },
            Step {
                policies: &[DENY_INGRESS_VIA_LABEL_SELECTOR_POD_A],
                probes: TCP80,
                ops: &[all_ingress("x/a", false)],
                ..NOCHANGE
            },
        ],
    },
    Case {
        name: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        skip: None,
        steps: &[Step {
            policies: &[DENY_INGRESS_X, ALLOW_ONLY_SCTP_INGRESS_ON_PORT_81],
            probes: TCP81,
            ops: OPS_DENY_INTO_X,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_ONLY_SCTP_INGRESS_ON_PORT_80],
            probes: TCP81,
            ops: &[all_ingress("x/a", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should not allow access by TCP when a policy specifies only UDP",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_ONLY_UDP_INGRESS_ON_PORT_81],
            probes: TCP81,
            ops: &[all_ingress("x/a", false)],
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_IMMUTABLE_LABEL],
            probes: TCP80,
            ops: OPS_ONLY_Y_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_EGRESS_NS_NOT_Y_IMMUTABLE_LABEL],
            probes: TCP80,
            ops: &[peer(ns_pod("x", "a"), ns("y"), false)],
            ..NOCHANGE
        }],
    },
    // ===== Describe("Netpol [LinuxOnly]") / Context("NetworkPolicy between server and client using UDP") =====
    Case {
        name: "should support a 'default-deny-ingress' policy",
        skip: None,
        steps: &[Step {
            policies: &[DENY_ALL_INGRESS_ONLY_X],
            probes: UDP80,
            ops: OPS_DENY_INTO_X,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on Ports",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_PORT81_UDP_FROM_NS_Y],
            probes: UDP81,
            ops: OPS_ONLY_Y_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_POD_A_VIA_NAMESPACE_POD_SELECTOR],
            probes: UDP80,
            ops: OPS_ONLY_YA_TO_XA,
            ..NOCHANGE
        }],
    },
    // ===== Describe("Netpol", feature.SCTPConnectivity, "[LinuxOnly]") / Context("NetworkPolicy between server and client using SCTP") =====
    Case {
        name: "should support a 'default-deny-ingress' policy",
        skip: None,
        steps: &[Step {
            policies: &[DENY_ALL_INGRESS_ONLY_X],
            probes: SCTP80,
            ops: OPS_DENY_INTO_X,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy based on Ports",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_PORT81_SCTP_FROM_NS_Y],
            probes: SCTP81,
            ops: OPS_ONLY_Y_TO_XA,
            ..NOCHANGE
        }],
    },
    Case {
        name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        skip: None,
        steps: &[Step {
            policies: &[ALLOW_NS_Y_POD_A_VIA_NAMESPACE_POD_SELECTOR],
            probes: SCTP80,
            ops: OPS_ONLY_YA_TO_XA,
            ..NOCHANGE
        }],
    },
];

/// For reference only: the pods upstream creates for each case at commit 008b3652 (its
/// `initializeResources(..., "x/a", ...)` arguments). This list has the same order and length
/// as [`CASES`]. This file's runner model always has all 9 pods. Upstream also runs only the
/// protocols and ports of each test's probes.
pub const UPSTREAM_TOPOLOGY: &[&[PodName]] = &[
    &["x/a", "x/b", "y/a", "y/b"],        // default-deny-ingress (TCP)
    &["x/a", "x/b", "y/a"],               // default-deny-all
    &["x/a", "x/b", "x/c", "y/a"],        // within server namespace PodSelector
    &["x/a", "x/b", "y/a"],               // ingress for a target
    &["x/a", "x/b", "y/a", "z/a"],        // from pods in all namespaces
    &["x/a", "x/b", "y/a", "z/a"],        // only from a different namespace
    &["x/a", "x/b", "y/a"],               // PodSelector MatchExpressions
    &["x/a", "x/b", "y/a", "z/a"],        // NamespaceSelector MatchExpressions
    &["x/a", "x/b", "x/c", "y/a"],        // PodSelector or NamespaceSelector
    &["x/a", "x/b", "y/a", "y/b", "z/b"], // PodSelector and NamespaceSelector
    &["x/a", "x/b", "y/a", "y/b", "y/c"], // Multiple PodSelectors and NamespaceSelectors
    &["x/a", "x/b", "x/c"],               // any PodSelectors
    &["x/a", "x/b", "y/a", "y/b", "z/a"], // pod in a different namespace (TCP)
    &["x/a", "x/b", "y/a", "y/b", "z/a"], // Ports (TCP)
    &["x/a", "x/b", "y/a", "y/b", "z/a"], // stacked policies
    &["x/a", "x/b", "y/a"],               // allow-all
    &["x/a", "x/b", "y/a"],               // ingress one named port
    &["x/a", "x/b", "y/a", "z/a"],        // ingress from namespace on one named port
    &["x/a", "y/a"],                      // egress one named port
    &["x/a", "y/a"],                      // updated policy
    &["x/a", "y/a"],                      // updated namespace
    &["x/a", "x/b"],                      // updated pod
    &["x/a", "x/b", "y/a", "z/a"],        // deny ingress from other namespaces
    &["x/a", "y/a"],                      // deny ingress to updated pod
    &["x/a", "x/b", "y/a"],               // deny egress PodSelector
    &["x/a", "x/b", "y/a"],               // deny egress all pods in namespace
    &["x/a", "x/b", "x/c", "y/a"],        // Ingress, Egress together
    &["x/a", "y/a", "y/b"],               // denying egress on client side
    &["x/a", "y/a", "y/b"],               // egress to different namespace
    &["x/a", "y/a"],                      // ingress by protocol
    &["x/a", "y/a"],                      // multiple ingress allow-all
    &["x/a", "y/a"],                      // multiple egress allow-all
    &["x/a", "y/a"],                      // stop enforcing after delete
    &["x/a", "y/a", "y/b"],               // egress CIDR
    &["x/a", "x/b", "x/c"],               // except clause
    &["x/a", "x/b", "x/c"],               // CIDR/Except overlap
    &["x/a", "x/b", "y/a"],               // ingress/egress independent
    &["x/a", "y/a"],                      // SCTP not TCP
    &["x/a", "y/a"],                      // isolate SCTP
    &["x/a", "y/a"],                      // TCP when only UDP
    &["x/a", "x/b", "y/a", "z/a"],        // default ns label MatchLabels
    &["x/a", "x/b", "y/a", "z/a"],        // default ns label MatchExpressions
    &["x/a", "x/b", "y/a", "y/b"],        // UDP default-deny-ingress
    &["x/a", "x/b", "y/a", "z/a"],        // UDP Ports
    &["x/a", "x/b", "y/a"],               // UDP pod in different namespace
    &["x/a", "x/b", "y/a", "y/b"],        // SCTP default-deny-ingress
    &["x/a", "x/b", "y/a", "z/a"],        // SCTP Ports
    &["x/a", "x/b", "y/a"],               // SCTP pod in different namespace
];

const _: () = assert!(UPSTREAM_TOPOLOGY.len() == CASES.len());
const _: () = assert!(CASES.len() == 48);
