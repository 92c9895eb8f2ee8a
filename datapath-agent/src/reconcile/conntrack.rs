//! Service connections (and, expired by the same rule, the connections
//! NetworkPolicy allowed) in the connection-tracking map: the view of its
//! entries as connections (for `inspect`), the rule by which the collector
//! expires them, and the collector's sweep.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use anyhow::Context as _;
use datapath_common::{
    Backend, CONNTRACK_LAST_SEEN_GRANULARITY_NS, CT_CLOSING, CT_FORWARD, CT_HAIRPIN, CT_POLICY, CT_SNAT,
    ConntrackEntry, ConntrackKey, IPPROTO_TCP, IPPROTO_UDP, TcpState, unanswered,
};
use tokio::sync::Mutex;

use crate::{
    bpf::{Datapath, DatapathError, GcReport, PinnedConntrack},
    observe::metrics::{AgentErrors, ConntrackStats},
    reconcile::services::ServingIndex,
};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// One translated connection, from its forward entry, its reply entry or
/// both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub protocol: u8,
    pub client: SocketAddrV4,
    pub service: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub service_id: u32,
    /// The later of the two directions' last packets (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
    /// Where a TCP connection stands (`None` for UDP).
    pub state: Option<TcpState>,
    /// The client is the backend itself.
    pub hairpin: bool,
}

/// The connections the conntrack entries describe, a forward entry joined
/// with its reply entry. A lone entry (its pair being created, removed, or
/// lost) still makes a row: it still translates packets.
pub fn connections(entries: &[(ConntrackKey, ConntrackEntry)]) -> Vec<Connection> {
    let by_key: HashMap<ConntrackKey, ConntrackEntry> = entries.iter().copied().collect();
    let mut out = Vec::new();
    // Connections NetworkPolicy allowed translate nothing: not shown here.
    for (key, entry) in entries.iter().filter(|(_, entry)| entry.kind != CT_POLICY) {
        let pair_key = key.pair(entry);
        let pair = by_key.get(&pair_key);
        // A reply entry is shown through its forward entry when there is one.
        if entry.kind != CT_FORWARD && pair.is_some_and(|p| p.kind == CT_FORWARD) {
            continue;
        }
        let port = u16::from_be_bytes;
        let hairpin = entry.flags & CT_HAIRPIN != 0;
        let (client, service, backend) = if entry.kind == CT_FORWARD {
            (
                SocketAddrV4::new(Ipv4Addr::from(key.saddr), port(key.sport)),
                SocketAddrV4::new(Ipv4Addr::from(key.daddr), port(key.dport)),
                SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), port(entry.nat_port)),
            )
        } else if entry.flags & CT_SNAT != 0 {
            // An outside client's connection to another node's backend:
            // the reply entry is keyed on the node's address and source
            // port, and holds the Service address the client asked for.
            (
                SocketAddrV4::new(Ipv4Addr::from(entry.client_ipv4), port(entry.snat_client_port())),
                SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), port(entry.nat_port)),
                SocketAddrV4::new(Ipv4Addr::from(key.saddr), port(key.sport)),
            )
        } else {
            let client_ip = if hairpin { entry.client_ipv4 } else { key.daddr };
            (
                SocketAddrV4::new(Ipv4Addr::from(client_ip), port(key.dport)),
                SocketAddrV4::new(Ipv4Addr::from(entry.nat_addr), port(entry.nat_port)),
                SocketAddrV4::new(Ipv4Addr::from(key.saddr), port(key.sport)),
            )
        };
        out.push(Connection {
            protocol: key.protocol,
            client,
            service,
            backend,
            // (A CT_SNAT entry keeps a port there.)
            service_id: if entry.flags & CT_SNAT != 0 { 0 } else { entry.service_id },
            last_seen_ns: entry.last_seen_ns.max(pair.map_or(0, |p| p.last_seen_ns)),
            state: (key.protocol == IPPROTO_TCP)
                .then(|| TcpState::of(entry.kind, entry.flags, pair.map_or(0, |p| p.flags))),
            hairpin,
        });
    }
    out.sort_by_key(|c| (c.protocol, *c.client.ip(), c.client.port(), *c.service.ip(), c.service.port()));
    out
}

/// How long a connection may stay quiet before the collector removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackLimits {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub closing_ns: u64,
    pub half_closed_ns: u64,
    pub opening_ns: u64,
    /// `conntrack_max_outside` (0: no limit), written next to the count of
    /// the clients outside the cluster at each sweep.
    pub outside_limit: u32,
    /// This node's pod CIDR: a Service connection opened by an address
    /// outside it came from outside the cluster (only this node's pods and
    /// outside clients open them here). `None`: nothing counted as outside.
    pub local_pods: Option<ipnet::Ipv4Net>,
}

impl ConntrackLimits {
    /// The limits from seconds (the config's `conntrack_*_seconds`).
    pub fn from_seconds(tcp_idle: u32, udp_idle: u32, closing: u32, half_closed: u32, opening: u32) -> Self {
        let ns = |seconds: u32| u64::from(seconds) * NS_PER_SECOND;
        Self {
            tcp_idle_ns: ns(tcp_idle),
            udp_idle_ns: ns(udp_idle),
            closing_ns: ns(closing),
            half_closed_ns: ns(half_closed),
            opening_ns: ns(opening),
            outside_limit: 0,
            local_pods: None,
        }
    }
}

/// Whether the connection `entry` belongs to (with `pair`, its other
/// direction, when it exists) has been quiet longer than its limit at
/// `now_ns`. Both directions count: a one-way UDP stream refreshes only
/// one of them and must live on.
pub fn expired(
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    pair: Option<&ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
) -> bool {
    let last_seen = entry.last_seen_ns.max(pair.map_or(0, |p| p.last_seen_ns));
    let limit = if key.protocol == IPPROTO_TCP {
        match TcpState::of(entry.kind, entry.flags, pair.map_or(0, |p| p.flags)) {
            TcpState::Opening => limits.opening_ns,
            TcpState::Established => limits.tcp_idle_ns,
            TcpState::HalfClosed => limits.half_closed_ns,
            TcpState::Closing => limits.closing_ns,
        }
    } else if (entry.flags | pair.map_or(0, |p| p.flags)) & CT_CLOSING != 0 {
        limits.closing_ns
    } else {
        limits.udp_idle_ns
    };
    // An entry refreshed after `now_ns` was taken is simply not idle. The
    // last packet may be up to the granularity younger than the entry says:
    // wait that much longer, never removing a connection within its limit.
    now_ns.saturating_sub(last_seen) > limit + CONNTRACK_LAST_SEEN_GRANULARITY_NS
}

/// What every Service serves from, as the agent last programmed it, and
/// when that was read.
#[derive(Debug, Clone)]
pub struct Serving {
    pub index: ServingIndex,
    /// CLOCK_MONOTONIC just before the Services were read: a connection
    /// seen since may be to a backend added since, and is judged at the
    /// next sweep instead.
    pub taken_ns: u64,
}

/// How far the programs' coarse clock, which stamps `last_seen_ns`, may
/// lag CLOCK_MONOTONIC (a tick; 10 ms covers HZ 100).
const COARSE_CLOCK_LAG_NS: u64 = 10_000_000;

/// Is this the forward entry of a connection that is over (a TCP one
/// reset or closed both ways), or of a UDP flow, to a backend that no
/// longer serves its Service address and port (or whose Service is gone)?
/// Such an entry only waits to send a reconnect on its tuple to that
/// backend: the collector forgets it. The Service sync forgets these when
/// the backend leaves; a TCP connection still open then and closed later
/// is caught here, at the next sweep (red team round 29, R29-5). A live
/// TCP connection is never cut.
pub fn departed(
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    pair: Option<&ConntrackEntry>,
    serving: &Serving,
) -> bool {
    if entry.kind != CT_FORWARD {
        return false;
    }
    let over = match key.protocol {
        IPPROTO_TCP => {
            TcpState::of(entry.kind, entry.flags, pair.map_or(0, |p| p.flags)) == TcpState::Closing
        }
        IPPROTO_UDP => true,
        _ => false,
    };
    let last_seen = entry.last_seen_ns.max(pair.map_or(0, |p| p.last_seen_ns));
    if !over || last_seen.saturating_add(COARSE_CLOCK_LAG_NS) >= serving.taken_ns {
        return false;
    }
    let backend = Backend { ipv4: entry.nat_addr, port: entry.nat_port, _pad: [0; 2] };
    !serving.index.serves(key.daddr.into(), u16::from_be_bytes(key.dport), key.protocol, &backend)
}

/// The keys of every entry to remove from a snapshot of the map: expired,
/// or (given what is served now) [`departed`].
pub fn expired_keys(
    snapshot: &HashMap<ConntrackKey, ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
    serving: Option<&Serving>,
) -> Vec<ConntrackKey> {
    snapshot
        .iter()
        .filter(|(key, entry)| to_remove(key, entry, snapshot.get(&key.pair(entry)), now_ns, limits, serving))
        .map(|(key, _)| *key)
        .collect()
}

fn to_remove(
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    pair: Option<&ConntrackEntry>,
    now_ns: u64,
    limits: &ConntrackLimits,
    serving: Option<&Serving>,
) -> bool {
    expired(key, entry, pair, now_ns, limits)
        || serving.is_some_and(|serving| departed(key, entry, pair, serving))
}

/// Remove every connection quiet for longer than its limit, both entries
/// at once. The keys are read first and removed afterwards (removing while
/// walking a hash map restarts the walk), which also works on a full map.
/// Each expired entry is looked up again just before it goes: a packet
/// may have refreshed it since the snapshot. With `serving` (`None` while
/// the agent's Services are not known to match the maps: nothing is judged
/// departed on a partial view), connections [`departed`] go too.
pub fn sweep(
    map: &mut PinnedConntrack,
    now_ns: u64,
    limits: &ConntrackLimits,
    serving: Option<&Serving>,
) -> Result<GcReport, DatapathError> {
    let mut snapshot = map.snapshot()?;
    let mut removed = 0;
    let mut gone = std::collections::HashSet::new();
    for key in expired_keys(&snapshot, now_ns, limits, serving) {
        let Some(entry) = map.get(&key)? else { continue };
        let pair_key = key.pair(&entry);
        let pair = map.get(&pair_key)?;
        if !to_remove(&key, &entry, pair.as_ref(), now_ns, limits, serving) {
            continue;
        }
        removed += usize::from(map.remove(&key)?);
        gone.insert(key);
        // (A CT_POLICY entry is its own pair.)
        if pair.is_some() && pair_key != key {
            removed += usize::from(map.remove(&pair_key)?);
            gone.insert(pair_key);
        }
    }
    for key in &gone {
        snapshot.remove(key);
    }
    map.set_client_counts(&client_counts(&snapshot, limits.local_pods), limits.outside_limit)?;
    Ok(GcReport { removed, remaining: snapshot.len() })
}

/// Each client's unanswered connections, as `conntrack_max_per_client`
/// counts them ([`datapath_common::unanswered`]): Service connections by
/// their forward entry, connections policy allowed by their one entry,
/// both under the address that opened them. Service connections opened by
/// addresses outside `local_pods` count not under their address but, all
/// together, under [`datapath_common::outside_clients`] of their protocol
/// (both keys always present), as `conntrack_max_outside` counts them:
/// unanswered TCP connections, and UDP flows answered or not; and every
/// TCP one from outside that is not over under
/// [`datapath_common::OUTSIDE_TCP_HELD`].
pub fn client_counts(
    snapshot: &HashMap<ConntrackKey, ConntrackEntry>,
    local_pods: Option<ipnet::Ipv4Net>,
) -> HashMap<[u8; 4], u32> {
    use datapath_common::{OUTSIDE_TCP_CLIENTS, OUTSIDE_TCP_HELD, OUTSIDE_UDP_CLIENTS, outside_clients};
    let mut counts = HashMap::from([
        (OUTSIDE_TCP_CLIENTS.ipv4, 0),
        (OUTSIDE_UDP_CLIENTS.ipv4, 0),
        (OUTSIDE_TCP_HELD.ipv4, 0),
    ]);
    for (key, entry) in snapshot {
        if entry.kind != CT_FORWARD && entry.kind != CT_POLICY {
            continue;
        }
        let pair_flags = if entry.kind == CT_FORWARD {
            snapshot.get(&key.pair(entry)).map_or(0, |pair| pair.flags)
        } else {
            0
        };
        let unanswered = unanswered(key.protocol, entry.kind, entry.flags, pair_flags);
        let outside = entry.kind == CT_FORWARD
            && local_pods.is_some_and(|pods| !pods.contains(&Ipv4Addr::from(key.saddr)));
        if outside {
            // Every TCP one held open, answered or not (R29-4); one that
            // is over only waits out the closing timer.
            if key.protocol == IPPROTO_TCP
                && TcpState::of(entry.kind, entry.flags, pair_flags) != TcpState::Closing
            {
                *counts.entry(OUTSIDE_TCP_HELD.ipv4).or_insert(0) += 1;
            }
            // From outside, UDP counts answered or not: an answer proves
            // nothing about a UDP source (a faked one is answered too).
            if unanswered || key.protocol == IPPROTO_UDP {
                *counts.entry(outside_clients(key.protocol).ipv4).or_insert(0) += 1;
            }
        } else if unanswered {
            *counts.entry(key.saddr).or_insert(0) += 1;
        }
    }
    counts
}

/// How often the agent removes idle and closed Service connections from
/// the connection-tracking map.
const CONNTRACK_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What the collector needs of the agent, under the agent's lock.
pub trait CollectorHost: Send + 'static {
    /// The limits now (a config reload may change them).
    fn conntrack_limits(&self) -> ConntrackLimits;
    /// What each Service address and port serves from now; `None` until
    /// the Service maps match a whole list.
    fn serving_backends(&self) -> Option<ServingIndex>;
    fn datapath_mut(&mut self) -> &mut Datapath;
}

/// Every [`CONNTRACK_GC_INTERVAL`], remove idle and closed Service
/// connections. The sweep works on its own handle of the pinned map, so
/// the agent's lock is held only to read the timeouts and to switch the
/// programs' Service lookups off once nothing is left.
pub fn spawn_collector<A: CollectorHost>(
    agent: Arc<Mutex<A>>,
    mut pinned_conntrack: PinnedConntrack,
    stats: Arc<ConntrackStats>,
    errors: Arc<AgentErrors>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONNTRACK_GC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // (The clock first: a connection it does not see as older than
            // the Services read after it is not judged by them.)
            let taken = crate::bpf::ebpf::monotonic_now_ns();
            let (limits, index) = {
                let agent = agent.lock().await;
                (agent.conntrack_limits(), agent.serving_backends())
            };
            let serving = taken
                .as_ref()
                .ok()
                .zip(index)
                .map(|(taken_ns, index)| Serving { index, taken_ns: *taken_ns });
            let swept =
                crate::bpf::ebpf::monotonic_now_ns().context("reading CLOCK_MONOTONIC").and_then(|now| {
                    tokio::task::block_in_place(|| {
                        sweep(&mut pinned_conntrack, now, &limits, serving.as_ref())
                    })
                    .context("sweeping the connection-tracking map")
                });
            let report = match swept {
                Ok(report) => report,
                Err(e) => {
                    errors.inc();
                    stats.record_failed_sweep(format!("{e:#}"));
                    tracing::error!(error = format!("{e:#}"), "connection-tracking collection failed");
                    continue;
                }
            };
            stats.record_sweep(&report);
            if report.removed > 0 {
                tracing::debug!(
                    removed = report.removed,
                    remaining = report.remaining,
                    "idle Service connections removed"
                );
            }
            // The last connection of a removed Service may just have gone.
            let mut agent = agent.lock().await;
            if let Err(e) = agent.datapath_mut().update_services_flag() {
                errors.inc();
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "switching Service translation failed"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use datapath_common::{CT_REPLY, HAIRPIN_IPV4, IPPROTO_UDP};

    use super::*;
    use crate::reconcile::services::service_key;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn pod(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, n), 8080)
    }

    fn tcp_connection(
        client_port: u16,
        backend: SocketAddrV4,
        hairpin: bool,
    ) -> [(ConntrackKey, ConntrackEntry); 2] {
        let client = if hairpin { *backend.ip() } else { Ipv4Addr::new(10, 244, 1, 50) };
        let key = ConntrackKey {
            saddr: client.octets(),
            daddr: VIP.octets(),
            sport: client_port.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let forward = ConntrackEntry {
            nat_addr: backend.ip().octets(),
            nat_port: backend.port().to_be_bytes(),
            kind: CT_FORWARD,
            flags: if hairpin { CT_HAIRPIN } else { 0 },
            client_ipv4: client.octets(),
            service_id: 1,
            last_seen_ns: 1_000 * NS_PER_SECOND,
            ..Default::default()
        };
        let reply = ConntrackEntry {
            nat_addr: VIP.octets(),
            nat_port: 80u16.to_be_bytes(),
            kind: CT_REPLY,
            ..forward
        };
        [(key, forward), (key.pair(&forward), reply)]
    }

    #[test]
    fn connections_join_both_directions_including_hairpin() {
        let [fwd, mut rep] = tcp_connection(40_000, pod(2), false);
        rep.1.last_seen_ns += 5 * NS_PER_SECOND;
        rep.1.flags |= CT_CLOSING;
        let [hfwd, hrep] = tcp_connection(40_001, pod(3), true);
        assert_eq!(hrep.0.daddr, HAIRPIN_IPV4);
        let rows = connections(&[rep, fwd, hrep, hfwd]);
        assert_eq!(rows.len(), 2, "{rows:#?}");
        let plain = rows.iter().find(|c| !c.hairpin).unwrap();
        assert_eq!(plain.client, SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 50), 40_000));
        assert_eq!(plain.service, SocketAddrV4::new(VIP, 80));
        assert_eq!(plain.backend, pod(2));
        assert_eq!(plain.last_seen_ns, 1_005 * NS_PER_SECOND, "the later direction counts");
        assert_eq!(plain.state, Some(TcpState::Closing), "an RST (an older build: any FIN) closes");
        let hairpin = rows.iter().find(|c| c.hairpin).unwrap();
        assert_eq!(hairpin.client, SocketAddrV4::new(*pod(3).ip(), 40_001));
        assert_eq!(hairpin.backend, pod(3));

        // A lone reply entry still shows the same connection.
        let lone = connections(&[hrep]);
        assert_eq!(lone.len(), 1);
        assert_eq!(
            (lone[0].client, lone[0].service, lone[0].backend),
            (hairpin.client, hairpin.service, hairpin.backend)
        );
    }

    #[test]
    fn tcp_state_follows_fins_seen_and_rsts_of_both_directions() {
        use datapath_common::{CT_FIN, CT_FIN_REPLY, CT_SEEN, CT_SEEN_REPLY, CT_STATEFUL};
        let of = TcpState::of;
        let new = CT_STATEFUL;
        // A SYN, then its answer, then the client's ACK.
        assert_eq!(of(CT_FORWARD, new, new), TcpState::Opening);
        assert_eq!(of(CT_FORWARD, new, new | CT_SEEN), TcpState::Opening, "answered, never acknowledged");
        assert_eq!(of(CT_FORWARD, new | CT_SEEN, new), TcpState::Opening, "an ACK nobody answered");
        assert_eq!(of(CT_REPLY, new | CT_SEEN, new | CT_SEEN), TcpState::Established);
        // One FIN: half-closed, whichever side; both: closing; RST: closing.
        let up = new | CT_SEEN;
        assert_eq!(of(CT_FORWARD, up | CT_FIN, up), TcpState::HalfClosed);
        assert_eq!(of(CT_REPLY, up | CT_FIN, up), TcpState::HalfClosed);
        assert_eq!(of(CT_FORWARD, up | CT_FIN, up | CT_FIN), TcpState::Closing);
        assert_eq!(of(CT_REPLY, up | CT_CLOSING, up), TcpState::Closing);
        // A policy entry holds both directions' bits itself.
        assert_eq!(of(CT_POLICY, new | CT_SEEN, 0), TcpState::Opening);
        assert_eq!(of(CT_POLICY, new | CT_SEEN | CT_SEEN_REPLY, 0), TcpState::Established);
        assert_eq!(of(CT_POLICY, new | CT_SEEN | CT_SEEN_REPLY | CT_FIN_REPLY, 0), TcpState::HalfClosed);
        assert_eq!(of(CT_POLICY, new | CT_FIN | CT_FIN_REPLY, 0), TcpState::Closing);
        // Never established: a FIN does not make it half-closed (a
        // SYN+FIN), an RST is no answer (it still counts against its client).
        assert_eq!(of(CT_FORWARD, new | CT_FIN, new), TcpState::Opening, "SYN+FIN");
        assert_eq!(of(CT_FORWARD, new | CT_SEEN, new | CT_CLOSING), TcpState::Closing, "an ACK reset");
        assert!(datapath_common::unanswered(IPPROTO_TCP, CT_FORWARD, new | CT_SEEN, new | CT_CLOSING));
        assert!(
            !datapath_common::unanswered(IPPROTO_TCP, CT_FORWARD, up | CT_FIN, up | CT_FIN),
            "was established"
        );
        // Entries of an older build (no CT_STATEFUL): established until
        // their FIN (which that build marked CT_CLOSING).
        assert_eq!(of(CT_FORWARD, 0, 0), TcpState::Established);
        assert_eq!(of(CT_FORWARD, CT_CLOSING, 0), TcpState::Closing);
    }

    #[test]
    fn clients_are_counted_by_their_unanswered_connections() {
        use datapath_common::{CT_SEEN, CT_SEEN_REPLY, CT_STATEFUL};
        let mut snapshot = HashMap::new();
        // Three TCP connections of one client: a SYN, one answered but never
        // acknowledged, one established.
        for (port, fwd_flags, rep_flags) in [(40_000, 0, 0), (40_001, 0, CT_SEEN), (40_002, CT_SEEN, CT_SEEN)]
        {
            let [mut fwd, mut rep] = tcp_connection(port, pod(2), false);
            fwd.1.flags = CT_STATEFUL | fwd_flags;
            rep.1.flags = CT_STATEFUL | rep_flags;
            snapshot.extend([fwd, rep]);
        }
        // UDP: one unanswered, one answered, by the same client.
        for (port, rep_flags) in [(50_000, 0), (50_001, CT_SEEN)] {
            let [mut fwd, mut rep] = tcp_connection(port, pod(2), false);
            fwd.0.protocol = IPPROTO_UDP;
            rep.0.protocol = IPPROTO_UDP;
            fwd.1.flags = CT_STATEFUL;
            rep.1.flags = CT_STATEFUL | rep_flags;
            snapshot.extend([fwd, rep]);
        }
        // Policy entries of another client: one unanswered, one answered;
        // and an entry of an older build, which counts as answered.
        let other = [10, 244, 1, 77];
        for (port, flags) in [(1, CT_STATEFUL | CT_SEEN), (2, CT_STATEFUL | CT_SEEN | CT_SEEN_REPLY), (3, 0)]
        {
            let key =
                ConntrackKey { saddr: other, sport: [0, port], protocol: IPPROTO_TCP, ..Default::default() };
            snapshot.insert(key, ConntrackEntry { kind: CT_POLICY, flags, ..Default::default() });
        }
        let counts = client_counts(&snapshot, None);
        assert_eq!(counts.get(&[10, 244, 1, 50]), Some(&3), "{counts:?}");
        assert_eq!(counts.get(&other), Some(&1), "{counts:?}");
        let outside = datapath_common::OUTSIDE_TCP_CLIENTS.ipv4;
        let outside_udp = datapath_common::OUTSIDE_UDP_CLIENTS.ipv4;
        assert_eq!(counts.get(&outside), Some(&0), "always written, none without the pod CIDR");
        assert_eq!(counts.get(&outside_udp), Some(&0), "always written, none without the pod CIDR");
        let held = datapath_common::OUTSIDE_TCP_HELD.ipv4;
        assert_eq!(counts.get(&held), Some(&0), "always written, none without the pod CIDR");
        assert_eq!(counts.len(), 5);

        // The pods are 10.244.1.0/24: the client above is one of them. The
        // unanswered Service connections of clients outside it count, all
        // together, as outside clients' of their protocol, not under their
        // own address (policy entries do not: they are no Service
        // connections).
        let pods: ipnet::Ipv4Net = "10.244.1.0/24".parse().unwrap();
        assert_eq!(client_counts(&snapshot, Some(pods)).get(&outside), Some(&0));
        for (n, established) in [(7, false), (8, false), (9, true)] {
            let [mut fwd, mut rep] = tcp_connection(41_000, pod(2), false);
            fwd.0.saddr = [198, 51, 100, n];
            rep.1.client_ipv4 = fwd.0.saddr;
            let seen = if established { CT_SEEN } else { 0 };
            (fwd.1.flags, rep.1.flags) = (CT_STATEFUL | seen, CT_STATEFUL | seen);
            rep.0 = fwd.0.pair(&fwd.1);
            snapshot.extend([fwd, rep]);
        }
        let counts = client_counts(&snapshot, Some(pods));
        assert_eq!(counts.get(&outside), Some(&2), "{counts:?}");
        assert_eq!(counts.get(&outside_udp), Some(&0), "{counts:?}");
        assert_eq!(counts.get(&[198, 51, 100, 7]), None, "not per address: {counts:?}");
        assert_eq!(counts.get(&[10, 244, 1, 50]), Some(&3), "{counts:?}");

        // UDP from outside counts under its own key answered or not (an
        // answer proves nothing about a UDP source).
        for (n, answered) in [(10, false), (11, true)] {
            let [mut fwd, mut rep] = tcp_connection(42_000, pod(2), false);
            fwd.0.saddr = [198, 51, 100, n];
            fwd.0.protocol = IPPROTO_UDP;
            rep.1.client_ipv4 = fwd.0.saddr;
            let seen = if answered { CT_SEEN } else { 0 };
            (fwd.1.flags, rep.1.flags) = (CT_STATEFUL, CT_STATEFUL | seen);
            rep.0 = fwd.0.pair(&fwd.1);
            snapshot.extend([fwd, rep]);
        }
        let counts = client_counts(&snapshot, Some(pods));
        assert_eq!(counts.get(&outside), Some(&2), "TCP's share untouched: {counts:?}");
        assert_eq!(counts.get(&outside_udp), Some(&2), "{counts:?}");
        assert_eq!(counts.get(&[198, 51, 100, 10]), None, "{counts:?}");
        assert_eq!(counts.get(&[198, 51, 100, 11]), None, "{counts:?}");
        // A pod's answered UDP counts nowhere.
        assert_eq!(counts.get(&[10, 244, 1, 50]), Some(&3), "{counts:?}");
    }

    /// The same entries as a UDP flow.
    fn as_udp(entries: [(ConntrackKey, ConntrackEntry); 2]) -> HashMap<ConntrackKey, ConntrackEntry> {
        entries
            .into_iter()
            .map(|(mut k, v)| {
                k.protocol = IPPROTO_UDP;
                (k, v)
            })
            .collect()
    }

    #[test]
    fn gc_times_half_closed_and_opening_connections_apart() {
        use datapath_common::{CT_FIN, CT_SEEN, CT_STATEFUL};
        let limits = ConntrackLimits::from_seconds(100, 30, 10, 50, 20);
        let [mut fwd, mut rep] = tcp_connection(40_000, pod(2), false);
        fwd.1.flags = CT_STATEFUL;
        rep.1.flags = CT_STATEFUL;
        let seen = fwd.1.last_seen_ns;
        let at = |secs: u64| seen + secs * NS_PER_SECOND;
        let with = |fwd_flags: u8, rep_flags: u8| -> HashMap<_, _> {
            let (mut f, mut r) = (fwd, rep);
            f.1.flags |= fwd_flags;
            r.1.flags |= rep_flags;
            [f, r].into_iter().collect()
        };
        // A SYN nobody answered: the opening limit, not the idle one.
        assert!(expired_keys(&with(0, 0), at(21), &limits, None).is_empty());
        assert_eq!(expired_keys(&with(0, 0), at(22), &limits, None).len(), 2);
        // Established: the idle limit.
        assert!(expired_keys(&with(CT_SEEN, CT_SEEN), at(101), &limits, None).is_empty());
        // The client's FIN alone: half-closed, kept past the closing limit.
        let half = with(CT_SEEN | CT_FIN, CT_SEEN);
        assert!(
            expired_keys(&half, at(25), &limits, None).is_empty(),
            "a half-closed connection outlives 10 s"
        );
        assert_eq!(expired_keys(&half, at(52), &limits, None).len(), 2);
        // FIN both ways: closing.
        assert_eq!(expired_keys(&with(CT_SEEN | CT_FIN, CT_SEEN | CT_FIN), at(12), &limits, None).len(), 2);
    }

    #[test]
    fn gc_expires_by_protocol_closing_and_the_later_direction() {
        let limits = ConntrackLimits {
            tcp_idle_ns: 100 * NS_PER_SECOND,
            udp_idle_ns: 30 * NS_PER_SECOND,
            closing_ns: 10 * NS_PER_SECOND,
            half_closed_ns: 50 * NS_PER_SECOND,
            opening_ns: 20 * NS_PER_SECOND,
            outside_limit: 0,
            local_pods: None,
        };
        let [fwd, rep] = tcp_connection(40_000, pod(2), false);
        let seen = fwd.1.last_seen_ns;
        let snapshot: HashMap<_, _> = [fwd, rep].into_iter().collect();
        let at = |secs: u64| seen + secs * NS_PER_SECOND;
        // Within the limit plus the refresh granularity: kept.
        assert!(expired_keys(&snapshot, at(101), &limits, None).is_empty());
        assert_eq!(expired_keys(&snapshot, at(102), &limits, None).len(), 2);
        // Refreshed after `now` was read: not idle.
        assert!(expired_keys(&snapshot, seen - 1, &limits, None).is_empty());

        // Closing on one side shortens both.
        let mut closing = snapshot.clone();
        closing.get_mut(&rep.0).unwrap().flags |= CT_CLOSING;
        assert!(expired_keys(&closing, at(11), &limits, None).is_empty());
        assert_eq!(expired_keys(&closing, at(12), &limits, None).len(), 2);

        // A one-way stream: the reply side is old, the forward side fresh.
        let mut one_way = snapshot.clone();
        one_way.get_mut(&fwd.0).unwrap().last_seen_ns = at(200);
        assert!(expired_keys(&one_way, at(250), &limits, None).is_empty());

        // UDP uses its own limit.
        let udp = as_udp([fwd, rep]);
        assert!(expired_keys(&udp, at(31), &limits, None).is_empty());
        assert_eq!(expired_keys(&udp, at(32), &limits, None).len(), 2);
    }

    #[test]
    fn connections_over_to_a_backend_that_left_are_forgotten_and_live_ones_kept() {
        use datapath_common::{CT_FIN, CT_SEEN, CT_STATEFUL};
        let limits = ConntrackLimits::from_seconds(100, 30, 10, 50, 20);
        let [mut fwd, mut rep] = tcp_connection(40_000, pod(2), false);
        fwd.1.flags = CT_STATEFUL | CT_SEEN;
        rep.1.flags = CT_STATEFUL | CT_SEEN;
        let now = fwd.1.last_seen_ns + NS_PER_SECOND;
        let backend =
            |p: SocketAddrV4| Backend { ipv4: p.ip().octets(), port: p.port().to_be_bytes(), _pad: [0; 2] };
        let serving =
            |by_address| Serving { index: ServingIndex { by_address, ..Default::default() }, taken_ns: now };
        let serving_from = |backends: &[SocketAddrV4]| {
            serving(
                [(service_key(VIP, 80, IPPROTO_TCP), backends.iter().map(|b| backend(*b)).collect())].into(),
            )
        };
        let still = serving_from(&[pod(2), pod(3)]);
        let left = serving_from(&[pod(3)]);
        let gone = serving(HashMap::new());
        let with = |fwd_flags: u8, rep_flags: u8| -> HashMap<_, _> {
            let (mut f, mut r) = (fwd, rep);
            f.1.flags |= fwd_flags;
            r.1.flags |= rep_flags;
            [f, r].into_iter().collect()
        };
        let established = with(0, 0);
        let half_closed = with(CT_FIN, 0);
        let closed = with(CT_FIN, CT_FIN);
        let reset = with(0, CT_CLOSING);
        for serving in [None, Some(&still), Some(&left), Some(&gone)] {
            assert!(
                expired_keys(&established, now, &limits, serving).is_empty(),
                "a live connection is never cut"
            );
            assert!(expired_keys(&half_closed, now, &limits, serving).is_empty(), "nor a half-closed one");
        }
        for over in [&closed, &reset] {
            assert!(expired_keys(over, now, &limits, None).is_empty(), "nothing judged without the Services");
            assert!(expired_keys(over, now, &limits, Some(&still)).is_empty(), "its backend still serves");
            // The forward entry names the backend; the sweep takes its pair with it.
            assert_eq!(expired_keys(over, now, &limits, Some(&left)), [fwd.0]);
            assert_eq!(expired_keys(over, now, &limits, Some(&gone)), [fwd.0], "the Service is gone");
            // Seen since the Services were read: maybe to a backend added since.
            let earlier = Serving { taken_ns: fwd.1.last_seen_ns, ..left.clone() };
            assert!(expired_keys(over, now, &limits, Some(&earlier)).is_empty(), "judged at the next sweep");
        }
        // A UDP flow to a backend that left, answered or not.
        let udp = as_udp([fwd, rep]);
        let udp_still = serving([(service_key(VIP, 80, IPPROTO_UDP), [backend(pod(2))].into())].into());
        assert!(expired_keys(&udp, now, &limits, Some(&udp_still)).is_empty());
        assert_eq!(expired_keys(&udp, now, &limits, Some(&left)).len(), 1, "TCP's backends are not UDP's");
    }
}
