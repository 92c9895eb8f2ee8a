//! ClusterIP Services: a pod's new TCP or UDP connection to a Service port
//! gets a backend, and both directions of it a connection-tracking entry
//! that says how to rewrite them. The client's packets have their
//! destination rewritten to the backend where they leave the client's pod
//! ("from pod"); the backend's replies get the Service address back as
//! their source where they reach the client's node (whichever program that
//! is), so the client only ever sees the Service address.
//!
//! [`translate`] takes the packet's header view and gives one back: the
//! helpers that rewrite a packet move its data, so the view is taken again
//! after them.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use datapath_common::{
    AffinityEntry, AffinityKey, Backend, BackendKey, CONNTRACK_LAST_SEEN_GRANULARITY_NS, CT_CLOSING, CT_FIN,
    CT_FORWARD, CT_HAIRPIN, CT_POLICY, CT_REPLY, CT_SEEN, CT_SNAT, CT_STATEFUL, ConntrackEntry, ConntrackKey,
    Direction, DropReason, FragmentKey, FragmentTranslation, HAIRPIN_IPV4, IP_MF, IP_OFFSET_MASK,
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAX_OUTSIDE_OPENING, SERVICE_AFFINITY_CLIENT_IP,
    SERVICE_DROP_WITHOUT_BACKEND, SERVICE_SCOPE_CLUSTER, SERVICE_SCOPE_OUTSIDE, SNAT_PORT_COUNT, Service,
    ServiceKey, TCP_ACK_JUMP, TCP_DATA_STEP, TCP_FIN_WINDOW, TCP_RST_WINDOW, snat_port_at, snat_port_id,
    tcp_acknowledges_sent, tcp_in_window, unanswered,
};

use crate::{
    NS_PER_SECOND, clients,
    counters::count_drop,
    headers::{ETH_HLEN, IPV4_MIN_HLEN, IPV4_NO_OPTIONS, Ipv4Hdr, same_ipv4},
    lookup::{local_endpoint, node_ipv4},
    maps::{
        CONNTRACK, CONNTRACK_OUTSIDE_OPENING, EARLY_DROP_SCRATCH, EarlyDropScratch, SERVICE_AFFINITY,
        SERVICE_BACKENDS, SERVICE_FRAGMENTS, SERVICES,
    },
    packet::{Ipv4Headers, Packet},
    related::{
        BLOCK_LEN, L4Check, Q_ADDRS, Q_PORTS, Q_TCP_CHECK, Q_UDP_CHECK, QUOTE, QUOTING_TYPES, Quote,
        rewrite_quote,
    },
};

/// Random ports a NodePort connection to another node's backend tries
/// before it is refused (`snat_ports_exhausted`): with half the ports held,
/// 1 in 256 is refused.
const SNAT_PORT_TRIES: usize = 8;
/// Slots of the ring of outside TCP connections a full share looks at for
/// one to give up ([`outside_early_drop`]).
const EARLY_DROP_TRIES: usize = 32;
/// No ring slot (`EarlyDropScratch::victim_slot`).
const NO_SLOT: u32 = u32::MAX;
/// `-EEXIST`: another CPU opened the same connection first.
const EEXIST: i32 = -17;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
/// Where the TCP flags sit in the TCP header.
const TCP_FLAGS: usize = 13;
/// Where the sequence number (then the acknowledgement number) sits.
const TCP_SEQ: usize = 4;
/// Where the checksum sits in the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
/// Offsets of IPv4 header fields in the frame.
const IP_CHECK: usize = ETH_HLEN + core::mem::offset_of!(Ipv4Hdr, check);
const IP_SADDR: usize = ETH_HLEN + core::mem::offset_of!(Ipv4Hdr, saddr);
const IP_DADDR: usize = ETH_HLEN + core::mem::offset_of!(Ipv4Hdr, daddr);

/// What [`translate`] made of a packet.
pub enum Translation<'a> {
    /// Forward it, translated if it belongs to a Service connection: its
    /// headers, taken again if they were rewritten; for a backend's reply,
    /// its 5-tuple before the translation (the one it travelled between
    /// the pods with), else an all-zero key (protocol 0). Not an `Option`:
    /// LLVM leaves a `None`'s payload undefined, and the verifier refuses
    /// the program that copies it.
    Forward(Ipv4Headers<'a>, ConntrackKey),
    /// A new connection the Service cannot take: refuse it.
    Refuse(DropReason),
}

/// The TCP/UDP ports and where the L4 header starts.
struct Ports {
    l4: usize,
    sport: [u8; 2],
    dport: [u8; 2],
}

/// Translate a TCP or UDP packet that belongs to (or opens) a Service
/// connection. "From pod" opens connections (`may_open`), and "from
/// uplink" those to the node's own address (NodePort), each client at most
/// `max_per_client` at once (0: no limit); otherwise only replies are
/// translated. `NODE_PORT`: the program handles NodePort connections to
/// other nodes' backends ([`CT_SNAT`]): opens them (with `may_open`) and
/// translates their packets; elsewhere their entries are not looked at, so
/// "from pod" carries none of that code.
#[inline(always)]
pub fn translate<const NODE_PORT: bool>(
    headers: Ipv4Headers<'_>,
    may_open: bool,
    max_per_client: u32,
    scope: u8,
) -> Result<Translation<'_>, DropReason> {
    let ip = headers.ip();
    let (protocol, saddr, daddr) = (ip.protocol, ip.saddr, ip.daddr);
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        if protocol == IPPROTO_ICMP {
            let packet = headers.into_packet();
            let before = related_error::<NODE_PORT>(packet)?;
            return Ok(Translation::Forward(packet.ipv4()?, before));
        }
        return Ok(Translation::Forward(headers, ConntrackKey::default()));
    }
    let frag_off = ip.frag_off();
    let datagram = FragmentKey { saddr, daddr, id: ip.id, protocol, _pad: 0 };
    // Later fragments carry no ports: they get what their first got.
    if frag_off & IP_OFFSET_MASK != 0 {
        return later_fragment(headers, &datagram, frag_off & IP_MF == 0);
    }
    // A first fragment: remember its translation for the later ones.
    let fragments = (frag_off & IP_MF != 0).then_some(&datagram);
    let Some(ports) = ports(headers.packet(), ip.version_ihl) else {
        return Ok(Translation::Forward(headers, ConntrackKey::default()));
    };
    let key = ConntrackKey { saddr, daddr, sport: ports.sport, dport: ports.dport, protocol, _pad: [0; 3] };
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // (An entry of a connection policy allowed translates nothing.)
    if let Some(entry) = CONNTRACK.get_ptr_mut(key)
        // SAFETY: a live entry, read once.
        && unsafe { (*entry).kind } != CT_POLICY
        // SAFETY: as above.
        && (NODE_PORT || unsafe { (*entry).flags } & CT_SNAT == 0)
    {
        // SAFETY: a live entry; a racing update of these fields is harmless.
        let entry_copy = unsafe {
            if now.wrapping_sub((*entry).last_seen_ns) >= CONNTRACK_LAST_SEEN_GRANULARITY_NS {
                (*entry).last_seen_ns = now;
            }
            let reply = (*entry).kind == CT_REPLY;
            let events = if protocol == IPPROTO_TCP {
                let flags = tcp_flags(headers.packet(), ports.l4).unwrap_or(0);
                let segment = tcp_segment(headers.packet(), headers.ip().tot_len, ports.l4, flags);
                if !reply && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    reopen(&key, entry, max_per_client, segment.end);
                }
                checked_tcp_events(&key, entry, flags, &segment)
            } else if reply {
                CT_SEEN
            } else {
                0
            };
            // Written only when it changes something: one write per
            // connection and event, not per packet.
            let old = (*entry).flags;
            if old & events != events {
                (*entry).flags = old | events;
                if old & CT_SEEN == 0 && events & CT_SEEN != 0 {
                    now_answered(&key, &*entry, protocol, max_per_client);
                }
                if protocol == IPPROTO_TCP && events & !old & (CT_CLOSING | CT_FIN) != 0 {
                    now_over(&key, &*entry, old);
                }
            }
            *entry
        };
        return apply::<NODE_PORT>(headers, &key, &entry_copy, &ports, fragments);
    }
    if !may_open {
        return Ok(Translation::Forward(headers, ConntrackKey::default()));
    }
    let service_key = ServiceKey { vip: daddr, port: ports.dport, protocol, scope };
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(service_key) }).copied() else {
        return Ok(Translation::Forward(headers, ConntrackKey::default()));
    };
    if service.backend_count == 0 {
        if service.flags & SERVICE_DROP_WITHOUT_BACKEND != 0 {
            return Err(DropReason::ServiceNoLocalBackend);
        }
        return Ok(Translation::Refuse(DropReason::ServiceNoBackend));
    }
    // Only what netfilter's conntrack would take as a valid first packet
    // opens a connection: nothing is tracked for a packet refused below.
    if !l4_header_valid(headers.packet(), headers.ip(), ports.l4) {
        return Err(DropReason::MalformedL4);
    }
    // From outside (a node port or an external address), a packet whose
    // TTL runs out here is never forwarded: answered, nothing tracked (it
    // would also hold a source-NAT port until the opening timer ended).
    if NODE_PORT && headers.ip().ttl_expires() {
        return Ok(Translation::Refuse(DropReason::TtlExceeded));
    }
    let from_outside = scope == SERVICE_SCOPE_OUTSIDE;
    // Clients outside are held together (per protocol), not per address:
    // see `clients`.
    if from_outside {
        // TCP's share full, or the TCP connections held from outside:
        // give up an unanswered one for this, as netfilter's early drop
        // does (UDP flows are not given up: a faked UDP source cannot be
        // told from a real one; answered TCP connections are not either:
        // past the limit with only those, a new one is refused).
        if clients::outside_at_limit(protocol) && !(protocol == IPPROTO_TCP && outside_early_drop()) {
            return Err(DropReason::ConntrackOutsideLimit);
        }
    } else if clients::at_limit(saddr, max_per_client) {
        return Ok(Translation::Refuse(DropReason::ConntrackClientLimit));
    }
    // Chosen by the flow's hash, not at random: a connection given up
    // (early drop, expiry) and picked up again by a later packet of the
    // same flow lands on the same backend, and behind the same source port
    // (`open_snat`), so the backend's socket carries on instead of
    // resetting it. (The agent is shrinking this Service right now if
    // there is none.)
    let flow_hash = headers.packet().flow_hash();
    let Some(backend) = choose_backend(&service, saddr, now, flow_hash) else {
        return Ok(Translation::Refuse(DropReason::ServiceNoBackend));
    };
    let hairpin = same_ipv4(backend.ipv4, saddr);
    // What the opening packet itself says (an ACK or a FIN instead of a
    // SYN: the backend's RST will end it).
    // Where the client stands in sequence space is known from its SYN on
    // (a connection picked up mid-stream is not checked: see `seq_end`).
    let (events, seq_end) = match tcp_flags(headers.packet(), ports.l4) {
        Some(tcp_flags) if protocol == IPPROTO_TCP => {
            let syn = tcp_flags & TCP_SYN != 0;
            let seq_end = if syn {
                tcp_segment(headers.packet(), headers.ip().tot_len, ports.l4, tcp_flags).end
            } else {
                0
            };
            (tcp_events(tcp_flags, false), seq_end)
        }
        _ => (0, 0),
    };
    // A node port's connection to another node's backend leaves from the
    // node's address, so that the replies come back through here.
    if NODE_PORT && local_endpoint(backend.ipv4).is_none() {
        return open_snat(headers, key, &ports, &backend, (events, seq_end, flow_hash), now, fragments);
    }
    let forward = ConntrackEntry {
        nat_addr: backend.ipv4,
        nat_port: backend.port,
        kind: CT_FORWARD,
        flags: CT_STATEFUL | events | if hairpin { CT_HAIRPIN } else { 0 },
        client_ipv4: saddr,
        service_id: service.id,
        last_seen_ns: now,
        seq_end,
        ack: 0,
    };
    let reply_key = key.pair(&forward);
    let reply = ConntrackEntry {
        nat_addr: daddr,
        nat_port: ports.dport,
        kind: CT_REPLY,
        flags: CT_STATEFUL | if hairpin { CT_HAIRPIN } else { 0 },
        seq_end: 0,
        ..forward
    };
    match CONNTRACK.insert(key, forward, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(EEXIST) => {
            // Another CPU opened it a moment ago: use its choice.
            // SAFETY: copied out at once.
            return match unsafe { CONNTRACK.get(key) } {
                Some(entry) => {
                    let entry = *entry;
                    apply::<NODE_PORT>(headers, &key, &entry, &ports, fragments)
                }
                None => Ok(Translation::Refuse(DropReason::ConntrackFull)),
            };
        }
        // Full: the old connections keep their entries, this one is refused.
        Err(_) => return Ok(Translation::Refuse(DropReason::ConntrackFull)),
    }
    if CONNTRACK.insert(reply_key, reply, 0).is_err() {
        let _ = CONNTRACK.remove(key);
        return Ok(Translation::Refuse(DropReason::ConntrackFull));
    }
    if from_outside {
        clients::count_outside_opened(protocol);
        remember_outside_opening(&key);
    } else {
        clients::count(saddr, max_per_client);
    }
    apply::<NODE_PORT>(headers, &key, &forward, &ports, fragments)
}

/// The slots of the ring of outside TCP connections in use: twice TCP's
/// share of `conntrack_max_outside` (a share filled at random slots holds
/// about 40 % of them; a connection given up leaves its slot to the one
/// that replaced it, so that stays so under a flood), at most the whole
/// ring; `None` without a limit (nothing to give up for).
#[inline(always)]
fn outside_ring_len() -> Option<u32> {
    let share = clients::outside_limit(IPPROTO_TCP);
    (share != 0).then(|| share.saturating_mul(2).min(MAX_OUTSIDE_OPENING))
}

/// Remember a TCP connection a client outside opened, for
/// [`outside_early_drop`]: in the slot of the connection given up for it,
/// else in a slot of the ring drawn at random (it replaces what the slot
/// held).
#[inline(always)]
fn remember_outside_opening(key: &ConntrackKey) {
    if key.protocol != IPPROTO_TCP {
        return;
    }
    let Some(len) = outside_ring_len() else { return };
    let mut slot = NO_SLOT;
    if let Some(scratch) = EARLY_DROP_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch; only this program run uses it now.
        unsafe { slot = core::mem::replace(&mut (*scratch).victim_slot, NO_SLOT) };
    }
    if slot >= len {
        // SAFETY: plain helper without arguments.
        slot = unsafe { bpf_get_prandom_u32() } % len;
    }
    if let Some(slot) = CONNTRACK_OUTSIDE_OPENING.get_ptr_mut(slot) {
        // SAFETY: a live array value; another CPU writing the same slot at
        // once leaves a torn key, which finds nothing.
        unsafe { *slot = *key };
    }
}

/// Clients outside have TCP's share of `conntrack_max_outside` unanswered:
/// give up one still unanswered of the outside TCP connections opened
/// lately (both entries, and its count), as netfilter's early drop gives up
/// an unassured entry, so that SYNs nobody completes, from however many
/// faked sources, cannot keep real clients out: a real client's handshake
/// completes within a round trip, long before a flood comes round to it.
/// Answered connections are never given up. Up to [`EARLY_DROP_TRIES`]
/// slots of the ring ([`outside_ring_len`]) are looked at, from one drawn
/// at random: whatever else it holds (answered connections, expired ones),
/// a full share's unanswered connections fill about 40 % of it, so one is
/// found at nearly every try (a queue looked at from its oldest end was
/// defeated by a head of answered or expired ones: red team round 31).
/// Whether one was given up. A function of its own (a BPF subprogram): its
/// frame stays out of the program's main one.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the keys stay in the scratch map: passed by value they would be copied onto the stack"
)]
fn outside_early_drop() -> bool {
    let Some(scratch) = EARLY_DROP_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let Some(len) = outside_ring_len() else { return false };
    // Consecutive slots from one drawn at random: as good as random ones
    // (the slots were drawn at random), and the whole ring when it is short.
    // SAFETY: plain helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() } % len;
    for i in 0..EARLY_DROP_TRIES as u32 {
        let Some(slot) = CONNTRACK_OUTSIDE_OPENING.get_ptr((start + i) % len) else {
            continue;
        };
        // SAFETY: this CPU's scratch (aligned as every map value), used by
        // this program run only; the slot is copied into it first (another
        // CPU may write the slot meanwhile).
        unsafe {
            let EarlyDropScratch { key, pair, victim_slot, .. } = &mut *scratch;
            *key = *slot;
            if key.protocol != IPPROTO_TCP {
                continue;
            }
            let Some(entry) = CONNTRACK.get(&*key) else {
                continue;
            };
            if entry.kind != CT_FORWARD {
                continue;
            }
            (&raw mut *pair).cast::<[u32; 4]>().write(key.forward_pair_words(entry));
            let pair_flags = CONNTRACK.get(&*pair).map_or(0, |p| p.flags);
            if !unanswered(IPPROTO_TCP, CT_FORWARD, entry.flags, pair_flags) {
                continue;
            }
            // (Another CPU may give it up at the same time: one of us counts it.)
            if CONNTRACK.remove(&*key).is_err() {
                continue;
            }
            let _ = CONNTRACK.remove(&*pair);
            *victim_slot = (start + i) % len;
        }
        clients::count_outside_given_up();
        // A connection given up, not a packet: no bytes.
        count_drop(Direction::FromUplink, DropReason::ConntrackEarlyDrop, 0);
        return true;
    }
    false
}

/// Open a NodePort connection to another node's backend: a free source
/// port of [`datapath_common::SNAT_PORT_RANGES`] on the node's address (the key's destination),
/// taken by writing the reply entry first ([`SNAT_PORT_TRIES`] tries: the
/// flow hash's port, then random ones), then the
/// forward entry.
#[inline(always)]
fn open_snat<'a>(
    headers: Ipv4Headers<'a>,
    key: ConntrackKey,
    ports: &Ports,
    backend: &Backend,
    (events, seq_end, flow_hash): (u8, u32, u32),
    now: u64,
    fragments: Option<&FragmentKey>,
) -> Result<Translation<'a>, DropReason> {
    // The node's address: the Service address may be another (external).
    let node = node_ipv4();
    let reply = ConntrackEntry {
        nat_addr: key.daddr,
        nat_port: ports.dport,
        kind: CT_REPLY,
        flags: CT_STATEFUL | CT_SNAT,
        client_ipv4: key.saddr,
        service_id: snat_port_id(ports.sport),
        last_seen_ns: now,
        seq_end: 0,
        ack: 0,
    };
    let mut reply_key = ConntrackKey {
        saddr: backend.ipv4,
        daddr: node,
        sport: backend.port,
        dport: [0; 2],
        protocol: key.protocol,
        _pad: [0; 3],
    };
    let mut taken = false;
    for i in 0..SNAT_PORT_TRIES {
        // First the port the flow's hash names (a connection picked up again
        // gets the port it had, if free: the backend sees the same
        // connection), then at random.
        // SAFETY: plain helper without arguments.
        let pick = if i == 0 { flow_hash.rotate_left(16) } else { unsafe { bpf_get_prandom_u32() } };
        let port = snat_port_at(pick % SNAT_PORT_COUNT);
        reply_key.dport = port.to_be_bytes();
        // A port the node's own stack uses with this backend (its own
        // connection from an explicitly bound port, a listener): the
        // replies would be taken from it, or its packets given ours.
        if headers.packet().host_socket_for(
            key.protocol,
            reply_key.saddr,
            reply_key.daddr,
            reply_key.sport,
            reply_key.dport,
        ) {
            continue;
        }
        match CONNTRACK.insert(reply_key, reply, BPF_NOEXIST as u64) {
            Ok(()) => {
                taken = true;
                break;
            }
            Err(EEXIST) => continue,
            Err(_) => return Ok(Translation::Refuse(DropReason::ConntrackFull)),
        }
    }
    if !taken {
        return Ok(Translation::Refuse(DropReason::SnatPortsExhausted));
    }
    let forward = ConntrackEntry {
        nat_addr: backend.ipv4,
        nat_port: backend.port,
        kind: CT_FORWARD,
        flags: CT_STATEFUL | CT_SNAT | events,
        client_ipv4: node,
        service_id: snat_port_id(reply_key.dport),
        last_seen_ns: now,
        seq_end,
        ack: 0,
    };
    match CONNTRACK.insert(key, forward, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) => {
            let _ = CONNTRACK.remove(reply_key);
            if e != EEXIST {
                return Ok(Translation::Refuse(DropReason::ConntrackFull));
            }
            // Another CPU opened it a moment ago: use its choice.
            // SAFETY: copied out at once.
            return match unsafe { CONNTRACK.get(key) } {
                Some(entry) => {
                    let entry = *entry;
                    apply::<true>(headers, &key, &entry, ports, fragments)
                }
                None => Ok(Translation::Refuse(DropReason::ConntrackFull)),
            };
        }
    }
    // (Only connections from outside the cluster are given source ports.)
    clients::count_outside_opened(key.protocol);
    remember_outside_opening(&key);
    apply::<true>(headers, &key, &forward, ports, fragments)
}

/// A backend of `service` for a new connection of `client`: the one its
/// ClientIP affinity names while that lasts (renewed), else the one `pick`
/// (the packet's flow hash, or a random number for a socket) falls on.
/// `None`: no backend in that slot (the agent is shrinking the Service
/// right now). Shared by the packet and the socket programs.
#[inline(always)]
pub fn choose_backend(service: &Service, client: [u8; 4], now: u64, pick: u32) -> Option<Backend> {
    let affinity_key = AffinityKey { service_id: service.id, client_ipv4: client };
    let with_affinity = service.flags & SERVICE_AFFINITY_CLIENT_IP != 0;
    if with_affinity {
        // SAFETY: copied out at once.
        if let Some(affinity) = unsafe { SERVICE_AFFINITY.get(affinity_key) } {
            let timeout = service.affinity_timeout_seconds as u64 * NS_PER_SECOND;
            if now.wrapping_sub(affinity.last_used_ns) < timeout {
                let backend = affinity.backend;
                let _ =
                    SERVICE_AFFINITY.insert(affinity_key, AffinityEntry { backend, last_used_ns: now }, 0);
                return Some(backend);
            }
        }
    }
    let slot = pick % service.backend_count;
    // SAFETY: copied out at once.
    let backend = (unsafe { SERVICE_BACKENDS.get(BackendKey { service_id: service.id, slot }) }).copied()?;
    if with_affinity {
        let _ = SERVICE_AFFINITY.insert(affinity_key, AffinityEntry { backend, last_used_ns: now }, 0);
    }
    Some(backend)
}

/// This entry's direction was just seen (its [`CT_SEEN`] set): if that
/// answers the connection (the other direction seen too, or for UDP the
/// backend's first reply), its client's unanswered count goes down.
#[inline(always)]
fn now_answered(key: &ConntrackKey, entry: &ConntrackEntry, protocol: u8, max_per_client: u32) {
    if entry.flags & CT_STATEFUL == 0 {
        return;
    }
    let answered = if protocol == IPPROTO_TCP {
        // SAFETY: read once.
        unsafe { CONNTRACK.get(key.pair(entry)) }.is_some_and(|pair| pair.flags & CT_SEEN != 0)
    } else {
        entry.kind == CT_REPLY
    };
    if answered {
        // (A forward entry's client is its key's source: a CT_SNAT one's
        // client_ipv4 holds the node's address.)
        let client = if entry.kind == CT_FORWARD { key.saddr } else { entry.client_ipv4 };
        // Service connections are opened by this node's pods or by clients
        // outside the cluster: one that is not a pod here was outside.
        // (A pod deleted meanwhile takes one off the outside count: the
        // recount heals it.) UDP from outside keeps counting: an answer
        // proves nothing about a UDP source (a faked one is answered too),
        // where a TCP handshake that acknowledged the backend's SYN did.
        if local_endpoint(client).is_some() {
            clients::answered(client, max_per_client);
        } else if protocol != IPPROTO_UDP {
            clients::count_outside(protocol, true);
        }
    }
}

/// When the RST or FIN a TCP segment just set on `entry` (whose flags
/// were `old`) ends its connection (an RST either way, or a FIN each
/// way), a client outside no longer holds it: it only waits out the
/// closing timer, and a busy node port's short connections would
/// otherwise fill `conntrack_max_outside` with closed ones.
#[inline(always)]
fn now_over(key: &ConntrackKey, entry: &ConntrackEntry, old: u8) {
    if entry.flags & CT_STATEFUL == 0 {
        return;
    }
    // SAFETY: read once.
    let Some(pair_flags) = (unsafe { CONNTRACK.get(key.pair(entry)) }).map(|pair| pair.flags) else {
        return;
    };
    let over = |own: u8| (own | pair_flags) & CT_CLOSING != 0 || own & pair_flags & CT_FIN != 0;
    if over(old) || !over(entry.flags) {
        return;
    }
    // (As in `now_answered`: a client that is not a pod here was outside.)
    let client = if entry.kind == CT_FORWARD { key.saddr } else { entry.client_ipv4 };
    if local_endpoint(client).is_none() {
        clients::count_outside_closed();
    }
}

/// A TCP segment's flags: read in place where the header is in the linear
/// data (every packet of a tracked connection reads them), else copied.
#[inline(always)]
fn tcp_flags(packet: &Packet, l4: usize) -> Option<u8> {
    // A constant offset for the verifier (no IP options: the common case).
    const AT: usize = ETH_HLEN + IPV4_MIN_HLEN + TCP_FLAGS;
    if l4 == ETH_HLEN + IPV4_MIN_HLEN
        && let Some(flags) = packet.read::<u8>(AT)
    {
        return Some(flags);
    }
    packet.load::<u8>(l4 + TCP_FLAGS)
}

/// What the conntrack checks read of a TCP segment (host order; all 0
/// where the header cannot be read).
struct TcpSegment {
    seq: u32,
    ack: u32,
    /// The sequence number just after the segment: its data, SYN and FIN.
    end: u32,
}

/// The sequence and acknowledgement numbers of the TCP segment at `l4`
/// and where it ends: its length from the IP total length `tot_len` (0
/// in a BIG TCP packet: from the packet's), less the headers (a first
/// fragment's is short of the segment's: its end only moves later). A
/// function of its own (a BPF subprogram), copying with one helper call
/// wherever the header is: the verifier walks one path through it, not
/// one per way of reading multiplied through the rest of the program.
#[inline(never)]
fn tcp_segment(packet: &Packet, tot_len: [u8; 2], l4: usize, flags: u8) -> TcpSegment {
    // Sequence, acknowledgement and the data offset's byte.
    let Some(n) = packet.load::<[u8; 9]>(l4 + TCP_SEQ) else {
        return TcpSegment { seq: 0, ack: 0, end: 0 };
    };
    let seq = u32::from_be_bytes([n[0], n[1], n[2], n[3]]);
    let ack = u32::from_be_bytes([n[4], n[5], n[6], n[7]]);
    let headers = (l4 as u32).wrapping_sub(ETH_HLEN as u32) + u32::from(n[8] >> 4) * 4;
    let total = match u16::from_be_bytes(tot_len) {
        0 => packet.frame_len().saturating_sub(ETH_HLEN as u32),
        total => u32::from(total),
    };
    let data = total.saturating_sub(headers);
    let end = seq
        .wrapping_add(data)
        .wrapping_add(u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0));
    TcpSegment { seq, ack, end }
}

/// The events a TCP segment of a tracked connection sets on its entry
/// ([`tcp_events`]), less those its sequence numbers do not bear out (the
/// segment itself is passed either way; see [`TCP_RST_WINDOW`]): an RST
/// or FIN away from where the other direction's last acknowledgement
/// says this one stands, and the client's handshake ACK if it does not
/// acknowledge the backend's SYN (a blind ACK from a faked source would
/// count its connection answered).
///
/// Records where this direction's data ends (up to [`TCP_DATA_STEP`] on
/// at once) and what it acknowledged: an acknowledgement of no more than
/// the other direction sent, as netfilter's window tracking bounds it. So
/// a faked ACK cannot move the place an RST or FIN must hit past what the
/// sender really sent (red team round 29: 256 blind ACKs made the real
/// close land "out of window", leaving the connection established for the
/// idle time). An acknowledgement within [`TCP_RST_WINDOW`] of the last is
/// recorded without looking (as hard to hit blind as an RST itself); only
/// a longer step, or a segment that would change the state, looks up the
/// other entry: request/response traffic never does.
///
/// # Safety
/// `entry` is a live entry of `key`.
#[inline(always)]
unsafe fn checked_tcp_events(
    key: &ConntrackKey,
    entry: *mut ConntrackEntry,
    flags: u8,
    segment: &TcpSegment,
) -> u8 {
    let TcpSegment { seq, ack, end } = *segment;
    // SAFETY: the caller's live entry; racing writes of these fields
    // (another CPU's packet of the same direction) leave one of the values.
    unsafe {
        let reply = (*entry).kind == CT_REPLY;
        let mut events = tcp_events(flags, reply);
        let old = (*entry).flags;
        let new = events & !old;
        let checks = CT_CLOSING | CT_FIN | if reply { 0 } else { CT_SEEN };
        // The client's acknowledgements count once its handshake ACK was
        // checked (before, a faked one would move the RST check). A first
        // one, or a long step, is borne out by the other direction's end.
        let last_ack = (*entry).ack;
        let ack_step = if flags & TCP_ACK != 0 && (reply || (old | events) & CT_SEEN != 0) {
            if last_ack == 0 { TCP_ACK_JUMP - 1 } else { tcp_step(last_ack, ack) }
        } else {
            0
        };
        // The other direction's end (0: not known, or not looked up).
        let mut pair_end = 0;
        if (new & checks != 0 || ack_step >= TCP_RST_WINDOW)
            && let Some(pair) = CONNTRACK.get(key.pair(&*entry))
        {
            if !tcp_in_window(seq, pair.ack, TCP_RST_WINDOW) {
                events &= !CT_CLOSING;
            }
            if !tcp_in_window(seq, pair.ack, TCP_FIN_WINDOW) {
                events &= !CT_FIN;
            }
            if !reply && !tcp_acknowledges_sent(ack, pair.seq_end, TCP_RST_WINDOW) {
                events &= !CT_SEEN;
            }
            pair_end = pair.seq_end;
        }
        // Where this direction's data ends: from its SYN on (the backend's
        // first SYN-ACK sets it; its retransmissions say the same), moved
        // on by each segment up to TCP_DATA_STEP at once.
        let own_end = (*entry).seq_end;
        if own_end == 0 {
            if reply && flags & TCP_SYN != 0 {
                (*entry).seq_end = end;
            }
        } else if end != own_end && end.wrapping_sub(own_end) < TCP_DATA_STEP {
            (*entry).seq_end = end;
        }
        // (A handshake ACK the check refused moves nothing.)
        if ack_step != 0
            && (reply || (old | events) & CT_SEEN != 0)
            && (ack_step < TCP_RST_WINDOW || tcp_acknowledges_sent(ack, pair_end, TCP_ACK_JUMP))
        {
            (*entry).ack = ack;
        }
        events
    }
}

/// How far `to` is past `from` in sequence space, if it is ahead by less
/// than [`TCP_ACK_JUMP`]; else 0 (behind, the same, or too far to be real).
#[inline(always)]
fn tcp_step(from: u32, to: u32) -> u32 {
    let step = to.wrapping_sub(from);
    if step < TCP_ACK_JUMP { step } else { 0 }
}

/// The [`ConntrackEntry::flags`] a TCP packet with `tcp_flags` sets on the
/// entry of its direction (`reply`: the backend's).
#[inline(always)]
pub fn tcp_events(tcp_flags: u8, reply: bool) -> u8 {
    let mut events = 0;
    if tcp_flags & TCP_RST != 0 {
        events |= CT_CLOSING;
    }
    if tcp_flags & TCP_FIN != 0 {
        events |= CT_FIN;
    }
    // The client's ACK (the handshake went on), or any answer but an RST:
    // a connection refused (or a flood of stray segments the backend
    // resets) was never answered, and keeps counting against its client.
    if tcp_flags & TCP_RST == 0 && (reply || tcp_flags & TCP_ACK != 0) {
        events |= CT_SEEN;
    }
    events
}

/// A client's SYN on the 5-tuple of a connection that is over (an RST
/// seen, or a FIN each way): a new connection reusing the tuple (its
/// client port), as netfilter takes it. On a half-closed one (a FIN one
/// way) a SYN changes nothing, as in netfilter: no client reuses a port
/// whose connection still waits for the other side's FIN, so such a SYN is
/// forged (red team: one blind spray put every half-closed connection back
/// on the opening timer, and the late answers were lost). Both entries
/// start afresh: the old connection's state would otherwise end the new
/// one's translation with the closing timer. It keeps the backend. The new connection is
/// unanswered, so it counts against its client (and the clients outside)
/// like any new one, unless the old one still did (never answered): a
/// client reusing its ports is held to its limits, and the count never
/// goes below what is unanswered when the new connection is answered.
#[inline(always)]
fn reopen(key: &ConntrackKey, entry: *mut ConntrackEntry, max_per_client: u32, seq_end: u32) {
    // SAFETY: live entries; a racing update of their flags is harmless.
    let still_counted = unsafe {
        let pair = CONNTRACK.get_ptr_mut(key.pair(&*entry));
        let pair_flags = pair.map_or(0, |pair| (*pair).flags);
        let over =
            ((*entry).flags | pair_flags) & CT_CLOSING != 0 || (*entry).flags & pair_flags & CT_FIN != 0;
        if !over {
            // A retransmitted SYN of a connection still opening, or one
            // on a live or half-closed connection's tuple.
            return;
        }
        // Counted from its opening until both directions were seen (an
        // entry of a build before CT_STATEFUL never counted).
        let still_counted = (*entry).flags & CT_STATEFUL != 0 && (*entry).flags & pair_flags & CT_SEEN == 0;
        // What the connection is (hairpin, source NAT: how its fields read)
        // stays; what happened to it starts over.
        const KEPT: u8 = CT_HAIRPIN | CT_SNAT;
        (*entry).flags = ((*entry).flags & KEPT) | CT_STATEFUL;
        (*entry).seq_end = seq_end;
        (*entry).ack = 0;
        if let Some(pair) = pair {
            (*pair).flags = ((*pair).flags & KEPT) | CT_STATEFUL;
            (*pair).seq_end = 0;
            (*pair).ack = 0;
        }
        still_counted
    };
    // As in `now_answered`: a client that is not a pod here is outside.
    let outside = local_endpoint(key.saddr).is_none();
    if outside {
        // Held again (it stopped being held when it was over).
        clients::count_outside_held_again();
    }
    if !still_counted {
        if outside {
            clients::count_outside(IPPROTO_TCP, false);
        } else {
            clients::count(key.saddr, max_per_client);
        }
    }
}

/// An ICMP error about a packet of a Service connection (see
/// [`crate::related`]): the quoted packet's 5-tuple, reversed, is the key
/// of the entry for the error's own direction. The error gets what that
/// entry does to the addresses of its packets (its source only if the
/// backend sent it: a router's address stays), the quote the mirror of it.
/// A NodePort connection to another node's backend ([`CT_SNAT`], only
/// where `NODE_PORT`) is translated both ways at once: an error about the
/// node's request to the backend goes to the client, quoting what the
/// client sent; one about the reply to the client goes to the backend,
/// from the node (as netfilter's source NAT does), quoting what the
/// backend sent.
/// For an error about the client's packet, the returned key is the quote
/// before the rewrite (the connection as it travelled between the pods,
/// for policy); else all zero. Anything else passes as it is. Not
/// inlined: its stack frame stays out of the programs' main one.
#[inline(always)]
fn related_error<const NODE_PORT: bool>(packet: &mut Packet) -> Result<ConntrackKey, DropReason> {
    let untouched = Ok(ConntrackKey::default());
    let (saddr, daddr) = {
        let headers = packet.ipv4()?;
        let ip = headers.ip();
        // Errors are small: one in fragments is not worth reassembling
        // here; one with IP options of its own is rare.
        if ip.frag_off() & (IP_MF | IP_OFFSET_MASK) != 0 || ip.version_ihl != IPV4_NO_OPTIONS {
            return untouched;
        }
        (ip.saddr, ip.daddr)
    };
    const L4: usize = ETH_HLEN + IPV4_MIN_HLEN;
    // In place: copies of these headers would cost the stack the programs
    // have little of (the debug build's least).
    let Some(error) = packet.view_mut::<[u8; BLOCK_LEN]>(L4) else {
        return untouched;
    };
    let protocol = error[QUOTE + 9];
    // A quote with IP options, or of a later fragment (no ports), is left
    // as it is: rare, and what it quotes cannot be matched cheaply.
    if !QUOTING_TYPES.contains(&error[0])
        || error[QUOTE] != IPV4_NO_OPTIONS
        || u16::from_be_bytes([error[QUOTE + 6], error[QUOTE + 7]]) & IP_OFFSET_MASK != 0
        || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
    {
        return untouched;
    }
    let at4 = |i: usize| [error[i], error[i + 1], error[i + 2], error[i + 3]];
    let quoted = Quote::of(
        [at4(Q_ADDRS), at4(Q_ADDRS + 4)],
        [[error[Q_PORTS], error[Q_PORTS + 1]], [error[Q_PORTS + 2], error[Q_PORTS + 3]]],
    );
    // An error goes back to the quoted packet's sender.
    if !same_ipv4(daddr, quoted.saddr) {
        return untouched;
    }
    let key = ConntrackKey {
        saddr: quoted.daddr,
        daddr: quoted.saddr,
        sport: quoted.dport,
        dport: quoted.sport,
        protocol,
        _pad: [0; 3],
    };
    // SAFETY: read in place.
    let Some(entry) = (unsafe { CONNTRACK.get(key) }) else {
        return untouched;
    };
    let (kind, hairpin, snat) = (entry.kind, entry.flags & CT_HAIRPIN != 0, entry.flags & CT_SNAT != 0);
    if snat && !NODE_PORT {
        return untouched;
    }
    let (mut new, mut new_saddr, mut new_daddr) = (quoted, saddr, daddr);
    match kind {
        // About the client's packet: it was sent to the Service.
        CT_REPLY => {
            new.daddr = entry.nat_addr;
            new.dport = entry.nat_port;
            if same_ipv4(saddr, key.saddr) {
                new_saddr = entry.nat_addr;
            }
            // ... from the client's own address and port, and goes to it.
            if snat {
                new.saddr = entry.client_ipv4;
                new.sport = entry.snat_client_port();
                new_daddr = entry.client_ipv4;
            }
            if hairpin {
                new.saddr = entry.client_ipv4;
                new_daddr = entry.client_ipv4;
            }
        }
        // About the backend's reply: it came from the backend.
        CT_FORWARD => {
            new.saddr = entry.nat_addr;
            new.sport = entry.nat_port;
            new_daddr = entry.nat_addr;
            // ... to the node's address and port, and comes from the node.
            if snat {
                new.daddr = entry.client_ipv4;
                new.dport = entry.snat_port();
                new_saddr = entry.client_ipv4;
            }
            if hairpin {
                new.daddr = HAIRPIN_IPV4;
                if same_ipv4(saddr, key.saddr) {
                    new_saddr = HAIRPIN_IPV4;
                }
            }
        }
        // A connection policy allowed translates nothing.
        _ => return untouched,
    }
    // UDP sent without a checksum stays so; TCP's, past the view, is
    // there if the error quotes that much.
    let udp_with_check = protocol == IPPROTO_UDP && (error[Q_UDP_CHECK] | error[Q_UDP_CHECK + 1]) != 0;
    let tcp_check = if protocol == IPPROTO_TCP { packet.ptr_mut::<[u8; 2]>(L4 + Q_TCP_CHECK) } else { None };
    let Some(error) = packet.ptr_mut::<[u8; BLOCK_LEN]>(L4) else {
        return untouched;
    };
    // SAFETY: two disjoint, bounds-checked places in the packet; no helper
    // moves the data while they are used.
    unsafe {
        let l4 = match tcp_check {
            Some(tcp) => L4Check::Tcp(&mut *tcp),
            None if udp_with_check => L4Check::Udp,
            None => L4Check::None,
        };
        rewrite_quote(&mut *error, &new, l4);
    }
    set_ip_addr(packet, IP_SADDR, saddr, new_saddr)?;
    set_ip_addr(packet, IP_DADDR, daddr, new_daddr)?;
    // About the client's packet: the connection as it travelled.
    if kind == CT_REPLY {
        return Ok(ConntrackKey {
            saddr: key.daddr,
            daddr: key.saddr,
            sport: key.dport,
            dport: key.sport,
            protocol,
            _pad: [0; 3],
        });
    }
    untouched
}

/// Rewrite this packet for its connection, checksums included (the
/// helpers also handle CHECKSUM_PARTIAL packets from veths and UDP
/// without a checksum); for the first fragment of a datagram, record the
/// new addresses for its later fragments.
#[inline(always)]
fn apply<'a, const NODE_PORT: bool>(
    headers: Ipv4Headers<'a>,
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    ports: &Ports,
    fragments: Option<&FragmentKey>,
) -> Result<Translation<'a>, DropReason> {
    let packet = headers.into_packet();
    let (saddr, daddr) = if NODE_PORT && entry.flags & CT_SNAT != 0 {
        rewrite_snat(packet, key, entry, ports.l4)?
    } else {
        rewrite_connection(packet, key, entry, ports.l4)?
    };
    if let Some(datagram) = fragments {
        // Full (LRU): the oldest datagram's record goes, not this one.
        let _ = SERVICE_FRAGMENTS.insert(*datagram, FragmentTranslation { saddr, daddr }, 0);
    }
    let reply = if entry.kind == CT_REPLY { *key } else { ConntrackKey::default() };
    Ok(Translation::Forward(packet.ipv4()?, reply))
}

/// A later fragment: the addresses its datagram's first fragment got (no
/// ports here, and no L4 checksum to fix). The last fragment ends the
/// record, so a later datagram that reuses the IP id is not mistaken for
/// this one. Fragments of datagrams that are no Service's pass as they are.
#[inline(always)]
fn later_fragment<'a>(
    headers: Ipv4Headers<'a>,
    datagram: &FragmentKey,
    last: bool,
) -> Result<Translation<'a>, DropReason> {
    // SAFETY: copied out at once.
    let Some(new) = (unsafe { SERVICE_FRAGMENTS.get(*datagram) }).copied() else {
        return Ok(Translation::Forward(headers, ConntrackKey::default()));
    };
    if last {
        let _ = SERVICE_FRAGMENTS.remove(*datagram);
    }
    let packet = headers.into_packet();
    set_ip_addr(packet, IP_SADDR, datagram.saddr, new.saddr)?;
    set_ip_addr(packet, IP_DADDR, datagram.daddr, new.daddr)?;
    Ok(Translation::Forward(packet.ipv4()?, ConntrackKey::default()))
}

/// Rewrite an address in the IPv4 header and its checksum (alone, for a
/// later fragment, which has no L4 header).
#[inline(always)]
fn set_ip_addr(packet: &mut Packet, offset: usize, old: [u8; 4], new: [u8; 4]) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    packet.l3_csum_replace(IP_CHECK, from, to, 4)?;
    packet.store(offset, &new)
}

#[inline(always)]
fn ports(packet: &Packet, version_ihl: u8) -> Option<Ports> {
    let ihl = (version_ihl & 0x0f) as usize * 4;
    // The common case, no IP options, with direct access; else a copy.
    let raw: [u8; 4] = if ihl == IPV4_MIN_HLEN {
        packet.read(ETH_HLEN + IPV4_MIN_HLEN)?
    } else {
        packet.load(ETH_HLEN + ihl)?
    };
    Some(Ports { l4: ETH_HLEN + ihl, sport: [raw[0], raw[1]], dport: [raw[2], raw[3]] })
}

/// Is the TCP or UDP header at `l4` one netfilter's conntrack would call
/// valid: wholly inside the packet (in a first fragment: inside this
/// fragment), a TCP data offset of at least five words that ends within
/// the segment, a UDP length that fits (a first fragment's counts the whole
/// datagram: only its header must be here)?
#[inline(always)]
fn l4_header_valid(packet: &Packet, ip: &Ipv4Hdr, l4: usize) -> bool {
    const UDP_HLEN: usize = 8;
    const TCP_MIN_HLEN: usize = 20;
    let l4_len = (u16::from_be_bytes(ip.tot_len) as usize).saturating_sub(ip.header_len());
    if ip.protocol == IPPROTO_TCP {
        let Some(data_offset) = packet.load::<u8>(l4 + 12) else {
            return false;
        };
        let header_len = (data_offset >> 4) as usize * 4;
        return header_len >= TCP_MIN_HLEN && header_len <= l4_len;
    }
    if l4_len < UDP_HLEN {
        return false;
    }
    if ip.frag_off() & IP_MF != 0 {
        return true;
    }
    let Some(length) = packet.load::<[u8; 2]>(l4 + 4) else {
        return false;
    };
    let length = u16::from_be_bytes(length) as usize;
    (UDP_HLEN..=l4_len).contains(&length)
}

/// Apply a connection's translation to this packet. Returns the new
/// source and destination addresses.
#[inline(always)]
fn rewrite_connection(
    packet: &mut Packet,
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    l4: usize,
) -> Result<([u8; 4], [u8; 4]), DropReason> {
    let hairpin = entry.flags & CT_HAIRPIN != 0;
    let (l4_check, mangled_0) = l4_check_of(key.protocol, l4);
    // The ports: source first, destination second, in TCP and UDP alike.
    let (sport, dport) = (l4, l4 + 2);
    if entry.kind == CT_FORWARD {
        // Client -> backend (and, hairpin, from the hairpin address).
        set_addr(packet, IP_DADDR, l4_check, mangled_0, key.daddr, entry.nat_addr)?;
        set_port(packet, dport, l4_check, mangled_0, key.dport, entry.nat_port)?;
        if hairpin {
            set_addr(packet, IP_SADDR, l4_check, mangled_0, key.saddr, HAIRPIN_IPV4)?;
            return Ok((HAIRPIN_IPV4, entry.nat_addr));
        }
        Ok((key.saddr, entry.nat_addr))
    } else {
        // Backend -> client: from the Service address again.
        set_addr(packet, IP_SADDR, l4_check, mangled_0, key.saddr, entry.nat_addr)?;
        set_port(packet, sport, l4_check, mangled_0, key.sport, entry.nat_port)?;
        if hairpin {
            set_addr(packet, IP_DADDR, l4_check, mangled_0, key.daddr, entry.client_ipv4)?;
            return Ok((entry.nat_addr, entry.client_ipv4));
        }
        Ok((entry.nat_addr, key.daddr))
    }
}

/// Where a TCP or UDP packet's checksum sits, and the flag its updates
/// need (UDP: 0 means none, and stays so).
#[inline(always)]
fn l4_check_of(protocol: u8, l4: usize) -> (usize, u64) {
    if protocol == IPPROTO_TCP { (l4 + TCP_CHECK, 0) } else { (l4 + UDP_CHECK, BPF_F_MARK_MANGLED_0 as u64) }
}

/// [`rewrite_connection`] for a [`CT_SNAT`] connection: both addresses
/// and both ports change, each way.
#[inline(always)]
fn rewrite_snat(
    packet: &mut Packet,
    key: &ConntrackKey,
    entry: &ConntrackEntry,
    l4: usize,
) -> Result<([u8; 4], [u8; 4]), DropReason> {
    let (l4_check, mangled_0) = l4_check_of(key.protocol, l4);
    let (sport, dport) = (l4, l4 + 2);
    if entry.kind == CT_FORWARD {
        // Client -> Service address:port becomes node:source port -> backend.
        set_addr(packet, IP_DADDR, l4_check, mangled_0, key.daddr, entry.nat_addr)?;
        set_port(packet, dport, l4_check, mangled_0, key.dport, entry.nat_port)?;
        set_addr(packet, IP_SADDR, l4_check, mangled_0, key.saddr, entry.client_ipv4)?;
        set_port(packet, sport, l4_check, mangled_0, key.sport, entry.snat_port())?;
        Ok((entry.client_ipv4, entry.nat_addr))
    } else {
        // Backend -> node:source port becomes Service address:port -> client.
        set_addr(packet, IP_SADDR, l4_check, mangled_0, key.saddr, entry.nat_addr)?;
        set_port(packet, sport, l4_check, mangled_0, key.sport, entry.nat_port)?;
        set_addr(packet, IP_DADDR, l4_check, mangled_0, key.daddr, entry.client_ipv4)?;
        set_port(packet, dport, l4_check, mangled_0, key.dport, entry.snat_client_port())?;
        Ok((entry.nat_addr, entry.client_ipv4))
    }
}

#[inline(always)]
fn set_addr(
    packet: &mut Packet,
    offset: usize,
    l4_check: usize,
    mangled_0: u64,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), DropReason> {
    // The helpers take the values as they sit in the packet.
    let (from, to) = (u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64);
    packet.l4_csum_replace(l4_check, from, to, BPF_F_PSEUDO_HDR as u64 | mangled_0 | 4)?;
    set_ip_addr(packet, offset, old, new)
}

#[inline(always)]
fn set_port(
    packet: &mut Packet,
    offset: usize,
    l4_check: usize,
    mangled_0: u64,
    old: [u8; 2],
    new: [u8; 2],
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let (from, to) = (u16::from_ne_bytes(old) as u64, u16::from_ne_bytes(new) as u64);
    packet.l4_csum_replace(l4_check, from, to, mangled_0 | 2)?;
    packet.store(offset, &new)
}

/// Is this packet for a Service port (a new or tracked connection to it)?
/// Only looked at for packets the forwarding checks refused, to tell a
/// packet we would forward (refused with a reason) from one for the host.
#[inline(always)]
pub fn is_service(headers: &Ipv4Headers<'_>) -> bool {
    let (packet, ip) = (headers.packet(), headers.ip());
    let protocol = ip.protocol;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return false;
    }
    let Some(ports) = ports(packet, ip.version_ihl) else {
        return false;
    };
    let key = ServiceKey { vip: ip.daddr, port: ports.dport, protocol, scope: SERVICE_SCOPE_CLUSTER };
    // SAFETY: only checked for presence.
    unsafe { SERVICES.get(key) }.is_some()
}
