//! NetworkPolicy: a new connection of an isolated local pod is judged by
//! the rules the agent compiled for it; an allowed one gets a [`CT_POLICY`]
//! entry in the connection-tracking map (shared with the Services), so its
//! later packets and its replies pass without being judged again.
//!
//! Judging costs the same whatever the number of policies and rules: the
//! peer's address gives its identity (`POLICY_PEERS`, one LPM lookup), and
//! (endpoint, identity, direction, protocol, port) is one LPM lookup in
//! `POLICY_RULES`, whose prefixes cover "any protocol", "any port" and
//! port ranges. Egress is judged where the packet leaves the sending pod
//! ("from pod"); ingress where it enters the receiving pod's node, so each
//! node decides only for its own pods. docs/policy.md has the design.

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_coarse_ns};
use datapath_common::{
    CONNTRACK_LAST_SEEN_GRANULARITY_NS, CT_CLOSING, CT_FIN, CT_FIN_REPLY, CT_FORWARD, CT_POLICY, CT_SEEN,
    CT_SEEN_REPLY, CT_STATEFUL, ConntrackEntry, ConntrackKey, DropReason, EndpointKey, HAIRPIN_IPV4,
    IP_OFFSET_MASK, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, NodeConfig, POLICY_EGRESS,
    POLICY_INGRESS, POLICY_PREFIX_FULL, PolicyRuleKey, policy_verdict_slot, unanswered,
};

use crate::{
    clients,
    headers::{ETH_HLEN, same_ipv4},
    icmp::{
        ICMP_DEST_UNREACH, ICMP_ECHO, ICMP_ECHO_REPLY, ICMP_PARAMETER_PROBLEM, ICMP_SOURCE_QUENCH,
        ICMP_TIME_EXCEEDED, IcmpError,
    },
    maps::{CONNTRACK, POLICY_ENDPOINTS, POLICY_PEERS, POLICY_RULES, POLICY_VERDICTS},
    packet::Ipv4Headers,
    verdict::{Back, Verdict},
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Where the TCP flags sit in the TCP header.
const TCP_FLAGS: usize = 13;
/// Where an ICMP error quotes the packet it is about.
const ICMP_QUOTE: usize = 8;

/// What policy needs of a packet: its connection's 5-tuple as it travels
/// between the pods, and what kind of packet it is.
#[derive(Clone, Copy)]
pub struct Flow {
    pub key: ConntrackKey,
    /// Opens a connection (TCP SYN, UDP, SCTP, ICMP echo request): a
    /// refusal is answered, so the client fails at once.
    opens: bool,
    /// A TCP packet's flags (0 for other protocols): what it tells the
    /// connection's entry.
    tcp_flags: u8,
    /// An ICMP error: it belongs to the connection it quotes (`key` is
    /// the quoted packet's 5-tuple).
    error: bool,
    /// The packet's own source and destination (for an ICMP error they
    /// are not `key`'s).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// A first fragment (or a packet) too short to hold the header policy
    /// judges by (ports, TCP flags, an ICMP error's quote): refused where
    /// policy applies, as firewalls refuse the tiny-fragment attack (RFC
    /// 1858); its later fragments could complete it past the judgement.
    unreadable: bool,
    /// Allowed, but not remembered: its destination is an address of this
    /// node's pod CIDR that no pod has (yet), and an entry made now would
    /// let the same 5-tuple into whichever pod gets the address next.
    untracked: bool,
}

impl Flow {
    /// This flow as its packet was before a Service translation rewrote
    /// it: a backend's reply is judged with the addresses and ports it
    /// travelled between the pods with. `key` all zero: no translation.
    #[inline(always)]
    pub fn before_translation(mut self, key: ConntrackKey) -> Flow {
        if key.protocol == 0 {
            return self;
        }
        self.key = key;
        // An ICMP error about the client's packet: the quote as it
        // travelled; the error itself goes back to that packet's sender
        // (its source may be a router's: kept).
        if self.error {
            self.daddr = key.saddr;
            return self;
        }
        self.saddr = key.saddr;
        self.daddr = key.daddr;
        self
    }

    /// The flow of an IPv4 packet; `None` for a later fragment (no L4
    /// header: it follows its first fragment, which was judged). A header
    /// too short to judge gives a flow marked `unreadable`.
    #[inline(always)]
    pub fn of(headers: &Ipv4Headers<'_>) -> Option<Flow> {
        let ip = headers.ip();
        if ip.frag_off() & IP_OFFSET_MASK != 0 {
            return None;
        }
        let l4 = ETH_HLEN + (ip.version_ihl & 0x0f) as usize * 4;
        let packet = headers.packet();
        let mut key = ConntrackKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: [0; 2],
            dport: [0; 2],
            protocol: ip.protocol,
            _pad: [0; 3],
        };
        let (mut opens, mut error, mut unreadable) = (false, false, false);
        let mut tcp_flags = 0;
        match ip.protocol {
            IPPROTO_TCP => {
                // Direct access where the header is in the linear data (a
                // helper call otherwise).
                match packet.read::<[u8; TCP_FLAGS + 1]>(l4).or_else(|| packet.load(l4)) {
                    Some(tcp) => {
                        key.sport = [tcp[0], tcp[1]];
                        key.dport = [tcp[2], tcp[3]];
                        tcp_flags = tcp[TCP_FLAGS];
                        opens = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                    }
                    None => unreadable = true,
                }
            }
            IPPROTO_UDP | IPPROTO_SCTP => match packet.read::<[u8; 4]>(l4).or_else(|| packet.load(l4)) {
                Some(ports) => {
                    key.sport = [ports[0], ports[1]];
                    key.dport = [ports[2], ports[3]];
                    opens = true;
                }
                None => unreadable = true,
            },
            IPPROTO_ICMP => match packet.read::<[u8; 8]>(l4).or_else(|| packet.load(l4)) {
                Some(icmp) => {
                    let id = [icmp[4], icmp[5]];
                    match icmp[0] {
                        // An echo is tracked by its id: the request as the
                        // source port, the reply as the destination port.
                        ICMP_ECHO => {
                            key.sport = id;
                            opens = true;
                        }
                        ICMP_ECHO_REPLY => key.dport = id,
                        ICMP_DEST_UNREACH
                        | ICMP_SOURCE_QUENCH
                        | ICMP_TIME_EXCEEDED
                        | ICMP_PARAMETER_PROBLEM => {
                            error = true;
                            match quoted(headers, l4 + ICMP_QUOTE) {
                                Some(quoted) => key = quoted,
                                None => unreadable = true,
                            }
                        }
                        _ => {}
                    }
                }
                None => unreadable = true,
            },
            _ => {}
        }
        Some(Flow {
            key,
            opens,
            tcp_flags,
            error,
            saddr: ip.saddr,
            daddr: ip.daddr,
            unreadable,
            untracked: false,
        })
    }

    /// This flow, not to be remembered if `untracked` (see [`Flow::untracked`]).
    #[inline(always)]
    pub fn untracked_if(mut self, untracked: bool) -> Flow {
        self.untracked = untracked;
        self
    }
}

/// The 5-tuple of the packet an ICMP error quotes (at `at`), as that
/// packet's sender sent it.
#[inline(always)]
fn quoted(headers: &Ipv4Headers<'_>, at: usize) -> Option<ConntrackKey> {
    let packet = headers.packet();
    let ip: [u8; 20] = packet.load(at)?;
    let protocol = ip[9];
    let mut key = ConntrackKey {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: [0; 2],
        dport: [0; 2],
        protocol,
        _pad: [0; 3],
    };
    let l4 = at + (ip[0] & 0x0f) as usize * 4;
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u8; 4] = packet.load(l4)?;
            key.sport = [ports[0], ports[1]];
            key.dport = [ports[2], ports[3]];
        }
        IPPROTO_ICMP => {
            let icmp: [u8; 8] = packet.load(l4)?;
            if icmp[0] == ICMP_ECHO {
                key.sport = [icmp[4], icmp[5]];
            } else if icmp[0] == ICMP_ECHO_REPLY {
                key.dport = [icmp[4], icmp[5]];
            }
        }
        _ => {}
    }
    Some(key)
}

/// A packet policy refused.
#[derive(Clone, Copy)]
pub struct Refusal {
    pub reason: DropReason,
    /// Answer with ICMP administratively prohibited (it opens a connection).
    pub answer: bool,
}

impl Refusal {
    /// The verdict: answered from `source` (the destination the sender
    /// addressed) the way the packet came, or dropped.
    #[inline(always)]
    pub fn verdict(self, source: [u8; 4], back: Back) -> Result<Verdict, DropReason> {
        if !self.answer {
            return Err(self.reason);
        }
        Ok(Verdict::Answer { reason: self.reason, error: IcmpError::ADMIN_PROHIBITED, source, back })
    }
}

/// Judge `flow` for the local pods taking part: `sender` (the sending pod,
/// known only to "from pod", isolated in `sender_isolation`) for egress,
/// the pod at the flow's destination (if it is local, isolated in
/// `receiver_isolation`; zero otherwise) for ingress. Both isolations come
/// from the entries the caller looked up anyway (`PodInterface`,
/// `Endpoint`), copies of POLICY_ENDPOINTS. Call only with
/// `NODE_FLAG_POLICY` set.
#[inline(always)]
pub fn enforce(
    flow: &Flow,
    sender: Option<[u8; 4]>,
    sender_isolation: u32,
    receiver_isolation: u32,
    config: &NodeConfig,
) -> Result<(), Refusal> {
    let key = &flow.key;
    let (saddr, daddr) = (flow.saddr, flow.daddr);
    // A pod reaching itself is never judged: directly, or through a
    // Service (the hairpin address). Only "from pod" knows the sender is
    // the pod: from outside either is an address like any other.
    let to_itself =
        same_ipv4(saddr, daddr) || same_ipv4(saddr, HAIRPIN_IPV4) || same_ipv4(daddr, HAIRPIN_IPV4);
    if sender.is_some() && to_itself {
        return Ok(());
    }
    // What each local party is isolated in: a connection is tracked when
    // either is isolated in any direction, so that its replies, which
    // that party's other direction judges, pass.
    if sender_isolation == 0 && receiver_isolation == 0 {
        return Ok(());
    }
    // Traffic from the pod's own node is always allowed in (kubelet
    // probes). Out to its node, a pod's packets that open nothing pass
    // (its replies to those probes, whose first packets the programs never
    // see); what opens a connection to the node is judged like any peer.
    let to_node = same_ipv4(daddr, config.node_ipv4) && !flow.opens && !flow.error;
    let egress = if to_node { 0 } else { sender_isolation & POLICY_EGRESS };
    let ingress = if same_ipv4(saddr, config.node_ipv4) { 0 } else { receiver_isolation & POLICY_INGRESS };
    let refused = |reason| Err(Refusal { reason, answer: false });
    if flow.unreadable {
        if egress != 0 {
            return refused(DropReason::PolicyDeniedEgress);
        }
        if ingress != 0 {
            return refused(DropReason::PolicyDeniedIngress);
        }
        return Ok(());
    }
    if tracked(flow, false, config.conntrack_max_per_client) {
        return Ok(());
    }
    if flow.error {
        // An error about no connection policy allowed (an isolated pod's
        // own attempts are tracked where it is isolated: their errors
        // passed above).
        if egress != 0 {
            return refused(DropReason::PolicyDeniedEgress);
        }
        if ingress != 0 {
            return refused(DropReason::PolicyDeniedIngress);
        }
        return Ok(());
    }
    if egress != 0 {
        let allowed = allows(sender.unwrap_or_default(), POLICY_EGRESS, key.daddr, key);
        count(POLICY_EGRESS, allowed);
        if !allowed {
            return Err(Refusal { reason: DropReason::PolicyDeniedEgress, answer: flow.opens });
        }
    }
    if ingress != 0 {
        let allowed = allows(key.daddr, POLICY_INGRESS, key.saddr, key);
        count(POLICY_INGRESS, allowed);
        if !allowed {
            return Err(Refusal { reason: DropReason::PolicyDeniedIngress, answer: flow.opens });
        }
    }
    track(flow, config.conntrack_max_per_client);
    Ok(())
}

/// Judge a packet the node's own stack routes into the local pod at the
/// flow's destination ("to pod"), isolated in `isolation`: that pod's
/// ingress, unless the node sent it or translated it to one of its own
/// addresses (`from_node`: its own traffic is always allowed in, and
/// tracked like the rest so that the pod's replies pass its egress). A
/// refusal is not answered: the sender addressed what the node translated
/// (a hostPort, say), which an answer from here could not name. Call only
/// with `NODE_FLAG_POLICY` set.
#[inline(always)]
pub fn enforce_routed(
    flow: &Flow,
    isolation: u32,
    from_node: bool,
    config: &NodeConfig,
) -> Result<(), DropReason> {
    if isolation == 0 {
        return Ok(());
    }
    let ingress = !from_node && isolation & POLICY_INGRESS != 0;
    let refused = if ingress { Err(DropReason::PolicyDeniedIngress) } else { Ok(()) };
    if flow.unreadable {
        return refused;
    }
    if tracked(flow, true, config.conntrack_max_per_client) {
        return Ok(());
    }
    if flow.error {
        return refused;
    }
    if ingress {
        let key = &flow.key;
        let allowed = allows(key.daddr, POLICY_INGRESS, key.saddr, key);
        count(POLICY_INGRESS, allowed);
        if !allowed {
            return refused;
        }
    }
    track(flow, config.conntrack_max_per_client);
    Ok(())
}

/// The directions NetworkPolicy isolates the local pod at `ipv4` in, from
/// the record itself ("to pod" has no endpoint lookup of its own).
#[inline(always)]
pub fn isolation(ipv4: [u8; 4]) -> u32 {
    // SAFETY: copied out at once.
    unsafe { POLICY_ENDPOINTS.get(EndpointKey { ipv4 }) }.map_or(0, |e| e.flags)
}

/// Does a rule of `endpoint` allow this connection with `peer`?
#[inline(always)]
fn allows(endpoint: [u8; 4], direction: u32, peer: [u8; 4], key: &ConntrackKey) -> bool {
    let identity = POLICY_PEERS.get(&Key { prefix_len: 32, data: peer }).map_or(0, |p| p.identity);
    let rule = PolicyRuleKey {
        endpoint,
        identity: identity.to_be_bytes(),
        direction: direction as u8,
        protocol: key.protocol,
        port: key.dport,
    };
    POLICY_RULES.get(&Key { prefix_len: POLICY_PREFIX_FULL, data: rule }).is_some()
}

/// Does this packet belong to a connection policy allowed: its own key
/// (a later packet of it), the key reversed (a reply)? An ICMP error
/// belongs to the connection of the packet it quotes. With
/// `service_replies`, a reply already translated back to a Service address
/// belongs to the Service connection its client opened (the node's stack
/// routes it into the pod when it had to fragment it).
#[inline(always)]
fn tracked(flow: &Flow, service_replies: bool, max_per_client: u32) -> bool {
    let key = flow.key;
    let reversed = ConntrackKey {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    // (An echo request is keyed with its id as the source port, its reply
    // with it as the destination port: reversed like ports.)
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    for (candidate, reply) in [(key, false), (reversed, true)] {
        if let Some(entry) = CONNTRACK.get_ptr_mut(candidate) {
            // SAFETY: a live entry; a racing update of these fields is harmless.
            unsafe {
                if (*entry).kind != CT_POLICY {
                    if service_replies && reply && (*entry).kind == CT_FORWARD {
                        return true;
                    }
                    continue;
                }
                if flow.error {
                    return true;
                }
                // A SYN on the tuple of a connection that is over opens a
                // new connection, which today's rules judge (as netfilter
                // drops a closed conntrack entry on a new SYN): the old
                // entry goes, and the caller tracks the new one if allowed.
                if flow.key.protocol == IPPROTO_TCP
                    && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
                    && (*entry).flags & (CT_FIN | CT_FIN_REPLY | CT_CLOSING) != 0
                {
                    let _ = CONNTRACK.remove(candidate);
                    return false;
                }
                if now.wrapping_sub((*entry).last_seen_ns) >= CONNTRACK_LAST_SEEN_GRANULARITY_NS {
                    (*entry).last_seen_ns = now;
                }
                let events = events(flow, reply);
                let old = (*entry).flags;
                if old & events != events {
                    let new = old | events;
                    (*entry).flags = new;
                    if unanswered(flow.key.protocol, CT_POLICY, old, 0)
                        && !unanswered(flow.key.protocol, CT_POLICY, new, 0)
                    {
                        clients::answered(candidate.saddr, max_per_client);
                    }
                }
            }
            return true;
        }
    }
    false
}

/// Remember an allowed connection. A full map, or a client at its
/// `max_per_client` connections, still lets this packet through; its
/// replies are judged as new packets then.
#[inline(always)]
fn track(flow: &Flow, max_per_client: u32) {
    if flow.untracked || clients::at_limit(flow.key.saddr, max_per_client) {
        return;
    }
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let entry = ConntrackEntry {
        kind: CT_POLICY,
        flags: CT_STATEFUL | events(flow, false),
        last_seen_ns: now,
        ..ConntrackEntry::default()
    };
    if CONNTRACK.insert(flow.key, entry, BPF_NOEXIST as u64).is_ok() {
        clients::count(flow.key.saddr, max_per_client);
    }
}

/// What a packet of `flow` tells its connection's policy entry: the
/// events of [`crate::services::tcp_events`] (other protocols: a reply
/// answers), the reply direction's in their own bits (one entry stands for
/// both directions).
#[inline(always)]
fn events(flow: &Flow, reply: bool) -> u8 {
    if flow.key.protocol != IPPROTO_TCP {
        return if reply { CT_SEEN_REPLY } else { 0 };
    }
    let events = crate::services::tcp_events(flow.tcp_flags, reply);
    if !reply {
        return events;
    }
    let mut own = events & CT_CLOSING;
    if events & CT_FIN != 0 {
        own |= CT_FIN_REPLY;
    }
    if events & CT_SEEN != 0 {
        own |= CT_SEEN_REPLY;
    }
    own
}

#[inline(always)]
fn count(direction: u32, allowed: bool) {
    if let Some(slot) = POLICY_VERDICTS.get_ptr_mut(policy_verdict_slot(direction, allowed)) {
        // SAFETY: a per-CPU slot: no other writer.
        unsafe { *slot += 1 };
    }
}
