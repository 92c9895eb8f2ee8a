//! The kernel as the oracle (docs/why-dropped.md, "Never more permissive
//! than the kernel"). The same two-node topology is built twice: once with
//! our agents and CNI plugin, once forwarded by the plain kernel as a
//! flannel-style node would (static routes, `ip_forward=1`,
//! `rp_filter=1`, a blackhole route for the node's own pod CIDR, and in
//! overlay mode a VXLAN device with FDB entries). The same corpus of frames
//! is sent from the same senders in both, and what each pod's IP stack
//! receives is recorded; the test compares.
//!
//! Node A (10.250.0.1, 10.244.1.0/24) holds pods a1, a2, a3; node B
//! (10.250.0.2, 10.244.2.0/24) holds b1; the outside host H (10.250.0.9)
//! sits on the same fabric. Senders: a1 (to a2, same node), b1 (to a1,
//! across nodes), node B and host H (frames on the fabric, to a1), and
//! node B and host H again with hand-made VXLAN datagrams carrying the
//! frame to a1.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    lab::{Fabric, Netns, Node, Pod, mac_of, send_raw_frames_in},
    packets::{ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, checksum, ethernet, l4_checksum},
    sh,
};

pub const NODE_A_IP: [u8; 4] = [10, 250, 0, 1];
pub const NODE_B_IP: [u8; 4] = [10, 250, 0, 2];
pub const OUTSIDE_IP: [u8; 4] = [10, 250, 0, 9];
const VXLAN_PORT: u16 = 8472;
const VNI: u32 = 1;
/// What every probe carries in its payload, followed by its id (u32, BE).
const MARKER: &[u8; 10] = b"dpt-oracle";
/// UDP source port of probe `id`: `PORT_BASE + id`, so that an ICMP error
/// quoting it says which probe it is about.
const PORT_BASE: u16 = 20_000;
/// Sentinel ids: `SENTINEL + 2 id` goes before probe `id` on its path,
/// `SENTINEL + 2 id + 1` after it.
const SENTINEL: u32 = 1 << 20;
/// UDP port probes are sent to; each pod binds it, so none is answered
/// with port unreachable (less noise in the counters).
const PROBE_PORT: u16 = 9;

/// Who sends a probe, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sender {
    /// Pod a1, to pod a2 on the same node.
    LocalPod,
    /// Pod b1 on node B, to pod a1.
    RemotePod,
    /// Node B's raw frames on the fabric, to a1.
    PeerNode,
    /// Host H's raw frames on the fabric, to a1.
    OutsideHost,
    /// A VXLAN datagram from node B carrying the frame to a1.
    PeerTunnel,
    /// The same from host H (a forged tunnel packet).
    OutsideTunnel,
}

impl Sender {
    pub const ALL: [Sender; 6] = [
        Sender::LocalPod,
        Sender::RemotePod,
        Sender::PeerNode,
        Sender::OutsideHost,
        Sender::PeerTunnel,
        Sender::OutsideTunnel,
    ];
    const PLAIN: &[Sender] = &[Sender::LocalPod, Sender::RemotePod, Sender::PeerNode, Sender::OutsideHost];
    const UPLINK: &[Sender] = &[Sender::PeerNode, Sender::OutsideHost];
    const TUNNEL: &[Sender] = &[Sender::PeerTunnel, Sender::OutsideTunnel];

    pub fn name(self) -> &'static str {
        match self {
            Sender::LocalPod => "pod (same node)",
            Sender::RemotePod => "pod (other node)",
            Sender::PeerNode => "peer node",
            Sender::OutsideHost => "outside host",
            Sender::PeerTunnel => "peer, tunnelled",
            Sender::OutsideTunnel => "outside, tunnelled",
        }
    }

    fn tunnelled(self) -> bool {
        matches!(self, Sender::PeerTunnel | Sender::OutsideTunnel)
    }
}

/// A pod as the frames need it.
#[derive(Clone, Debug)]
pub struct PodRole {
    pub ip: [u8; 4],
    pub mac: [u8; 6],
    /// The MAC its frames go to: its host veth's.
    pub gateway_mac: [u8; 6],
    pub netns: String,
}

/// Everything a frame builder needs of one topology, and where to send.
#[derive(Clone, Debug)]
pub struct Roles {
    pub a_netns: String,
    pub b_netns: String,
    pub outside_netns: String,
    pub a_uplink_mac: [u8; 6],
    /// A's VXLAN device (overlay mode): the inner destination MAC.
    pub a_overlay_mac: [u8; 6],
    pub b_uplink_mac: [u8; 6],
    pub b_overlay_mac: [u8; 6],
    pub outside_mac: [u8; 6],
    pub a1: PodRole,
    pub a2: PodRole,
    pub a3: PodRole,
    pub b1: PodRole,
}

/// The L3 part of a probe before it is framed.
#[derive(Clone, Debug)]
pub enum L3 {
    Ipv4(Ipv4Probe),
    Other { ethertype: u16, bytes: Vec<u8> },
}

/// An IPv4 packet under construction; `render` computes lengths and
/// checksums, then `patches` are applied (to make them wrong on purpose).
#[derive(Clone, Debug)]
pub struct Ipv4Probe {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub protocol: u8,
    pub id: u16,
    pub options: Vec<u8>,
    /// Flags and fragment offset (DF by default).
    pub frag: u16,
    /// L4 header and payload (built for `protocol`).
    pub l4: Vec<u8>,
    /// (offset in the IPv4 header, byte): applied after the checksum.
    pub patches: Vec<(usize, u8)>,
    /// Keep only this many bytes of the rendered packet.
    pub truncate: Option<usize>,
}

impl Ipv4Probe {
    fn render(&self) -> Vec<u8> {
        let hl = 20 + self.options.len();
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | (hl / 4) as u8;
        h[2..4].copy_from_slice(&((hl + self.l4.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.protocol;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        h[20..].copy_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        for (at, byte) in &self.patches {
            h[*at] = *byte;
        }
        h.extend_from_slice(&self.l4);
        if let Some(n) = self.truncate {
            h.truncate(n);
        }
        h
    }
}

/// A probe as its class shapes it.
#[derive(Clone, Debug)]
pub struct Shape {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// 802.1Q / 802.1ad tags, outermost first: (TPID, TCI).
    pub tags: Vec<(u16, u16)>,
    pub l3: L3,
    /// Send the IPv4 packet as two fragments (split after this many L4 bytes, a multiple of 8).
    pub fragment_at: Option<usize>,
    /// Send only the second of those fragments.
    pub only_later_fragment: bool,
    /// Tunnelled senders: the VXLAN network identifier and flags byte.
    pub vni: u32,
    pub vxlan_flags: u8,
    /// Extra bytes of payload (to make a jumbo frame).
    pub pad_to: Option<usize>,
}

/// Where and what one probe is.
pub struct Probe<'a> {
    pub id: u32,
    pub sender: Sender,
    pub roles: &'a Roles,
}

impl Probe<'_> {
    /// The pod the probe is for.
    pub fn target(&self) -> &PodRole {
        if self.sender == Sender::LocalPod { &self.roles.a2 } else { &self.roles.a1 }
    }

    /// Another pod of node A: neither the target nor a sending pod.
    pub fn neighbour(&self) -> &PodRole {
        if self.sender == Sender::LocalPod { &self.roles.a3 } else { &self.roles.a2 }
    }

    /// The sender's own address (for tunnels: a pod address of node B).
    pub fn own_ip(&self) -> [u8; 4] {
        match self.sender {
            Sender::LocalPod => self.roles.a1.ip,
            Sender::RemotePod | Sender::PeerTunnel | Sender::OutsideTunnel => self.roles.b1.ip,
            Sender::PeerNode => NODE_B_IP,
            Sender::OutsideHost => OUTSIDE_IP,
        }
    }

    fn marker(&self) -> Vec<u8> {
        let mut m = MARKER.to_vec();
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&[0x5a; 18]);
        m
    }

    fn sport(&self) -> u16 {
        PORT_BASE + (self.id % 40_000) as u16
    }

    /// A UDP datagram to the target with the marker, as a well-behaved
    /// sender would send it (correct MACs, its own source, TTL 64).
    pub fn base(&self) -> Shape {
        let (src_mac, dst_mac) = match self.sender {
            Sender::LocalPod => (self.roles.a1.mac, self.roles.a1.gateway_mac),
            Sender::RemotePod => (self.roles.b1.mac, self.roles.b1.gateway_mac),
            Sender::PeerNode => (self.roles.b_uplink_mac, self.roles.a_uplink_mac),
            Sender::OutsideHost => (self.roles.outside_mac, self.roles.a_uplink_mac),
            // The inner frame, as the peer's tunnel sends it.
            Sender::PeerTunnel | Sender::OutsideTunnel => {
                (self.roles.b_overlay_mac, self.roles.a_overlay_mac)
            }
        };
        let ip = Ipv4Probe {
            src: self.own_ip(),
            dst: self.target().ip,
            ttl: 64,
            protocol: 17,
            id: (self.id & 0xffff) as u16,
            options: vec![],
            frag: 0x4000,
            l4: vec![],
            patches: vec![],
            truncate: None,
        };
        Shape {
            dst_mac,
            src_mac,
            tags: vec![],
            l3: L3::Ipv4(ip),
            fragment_at: None,
            only_later_fragment: false,
            vni: VNI,
            vxlan_flags: 0x08,
            pad_to: None,
        }
    }

    /// The frames on the wire for `shape` (two for a fragmented datagram).
    pub fn frames(&self, shape: &Shape) -> Vec<Vec<u8>> {
        let inner = self.inner_frames(shape);
        if !self.sender.tunnelled() {
            return inner;
        }
        let (outer_src, src_mac) = match self.sender {
            Sender::PeerTunnel => (NODE_B_IP, self.roles.b_uplink_mac),
            _ => (OUTSIDE_IP, self.roles.outside_mac),
        };
        inner
            .into_iter()
            .map(|frame| {
                let vni = shape.vni.to_be_bytes();
                let mut payload = vec![shape.vxlan_flags, 0, 0, 0, vni[1], vni[2], vni[3], 0];
                payload.extend_from_slice(&frame);
                let udp = udp_segment(outer_src, NODE_A_IP, self.sport(), VXLAN_PORT, &payload, false);
                let outer = Ipv4Probe {
                    src: outer_src,
                    dst: NODE_A_IP,
                    ttl: 64,
                    protocol: 17,
                    id: (self.id & 0xffff) as u16,
                    options: vec![],
                    frag: 0,
                    l4: udp,
                    patches: vec![],
                    truncate: None,
                };
                ethernet(self.roles.a_uplink_mac, src_mac, ETH_P_IP, &outer.render())
            })
            .collect()
    }

    fn inner_frames(&self, shape: &Shape) -> Vec<Vec<u8>> {
        let (ethertype, packets) = match &shape.l3 {
            L3::Other { ethertype, bytes } => (*ethertype, vec![bytes.clone()]),
            L3::Ipv4(ip) => {
                let mut ip = ip.clone();
                if ip.l4.is_empty() {
                    let mut payload = self.marker();
                    if let Some(n) = shape.pad_to {
                        payload.resize(n, 0x5a);
                    }
                    ip.l4 = match ip.protocol {
                        6 => tcp_syn(ip.src, self.sport(), ip.dst, 80, &payload),
                        1 => icmp_echo(&payload),
                        _ => udp_segment(ip.src, ip.dst, self.sport(), PROBE_PORT, &payload, true),
                    };
                }
                let packets = match shape.fragment_at {
                    None => vec![ip.render()],
                    Some(at) => {
                        let (first, rest) = ip.l4.split_at(at);
                        let mut a = ip.clone();
                        a.l4 = first.to_vec();
                        a.frag = 0x2000;
                        let mut b = ip.clone();
                        b.l4 = rest.to_vec();
                        b.frag = (at / 8) as u16;
                        if shape.only_later_fragment {
                            vec![b.render()]
                        } else {
                            vec![a.render(), b.render()]
                        }
                    }
                };
                (ETH_P_IP, packets)
            }
        };
        packets
            .into_iter()
            .map(|l3| {
                let mut frame = Vec::new();
                frame.extend_from_slice(&shape.dst_mac);
                frame.extend_from_slice(&shape.src_mac);
                for (tpid, tci) in &shape.tags {
                    frame.extend_from_slice(&tpid.to_be_bytes());
                    frame.extend_from_slice(&tci.to_be_bytes());
                }
                frame.extend_from_slice(&ethertype.to_be_bytes());
                frame.extend_from_slice(&l3);
                frame
            })
            .collect()
    }

    /// Where this probe is sent from: (namespace, interface).
    fn origin(&self) -> (&str, &'static str) {
        match self.sender {
            Sender::LocalPod => (&self.roles.a1.netns, "eth0"),
            Sender::RemotePod => (&self.roles.b1.netns, "eth0"),
            Sender::PeerNode | Sender::PeerTunnel => (&self.roles.b_netns, crate::lab::UPLINK),
            Sender::OutsideHost | Sender::OutsideTunnel => (&self.roles.outside_netns, "eth0"),
        }
    }
}

fn udp_segment(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
    with_checksum: bool,
) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    if with_checksum {
        let c = l4_checksum(src, dst, 17, &u);
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    u
}

fn tcp_syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    let c = l4_checksum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

fn icmp_echo(payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x4f, 0x52, 0, 1];
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// A frame class of the corpus: what a sender does differently from a
/// well-behaved one.
pub struct Class {
    pub name: &'static str,
    pub senders: &'static [Sender],
    pub shape: fn(&Probe) -> Shape,
    /// Devices drop it before any program runs (nothing of ours counts it).
    pub before_programs: bool,
}

fn ipv4(shape: &mut Shape) -> &mut Ipv4Probe {
    match &mut shape.l3 {
        L3::Ipv4(ip) => ip,
        L3::Other { .. } => unreachable!("an IPv4 class"),
    }
}

/// `base` with its IPv4 header changed by `f`.
fn with_ip(p: &Probe, f: impl FnOnce(&Probe, &mut Ipv4Probe)) -> Shape {
    let mut shape = p.base();
    f(p, ipv4(&mut shape));
    shape
}

const fn class(name: &'static str, senders: &'static [Sender], shape: fn(&Probe) -> Shape) -> Class {
    Class { name, senders, shape, before_programs: false }
}

/// The corpus: every class the issue names, and the malformed and spoofed
/// ones the packet tests cover one by one.
pub fn corpus() -> Vec<Class> {
    use Sender::*;
    const ALL: &[Sender] = &Sender::ALL;
    const PLAIN: &[Sender] = Sender::PLAIN;
    vec![
        class("valid UDP", ALL, |p| p.base()),
        class("valid TCP SYN", PLAIN, |p| with_ip(p, |_, ip| ip.protocol = 6)),
        class("valid ICMP echo", PLAIN, |p| with_ip(p, |_, ip| ip.protocol = 1)),
        class("dst MAC of another host", ALL, |p| Shape { dst_mac: [0x02, 0x42, 0, 0, 0, 0x42], ..p.base() }),
        class("dst MAC broadcast", ALL, |p| Shape { dst_mac: [0xff; 6], ..p.base() }),
        class("dst MAC multicast", ALL, |p| Shape { dst_mac: [0x01, 0, 0x5e, 0, 0, 0xfb], ..p.base() }),
        class("802.1Q VLAN 100", ALL, |p| Shape { tags: vec![(ETH_P_8021Q, 100)], ..p.base() }),
        class("802.1Q priority tag (VLAN 0)", ALL, |p| Shape {
            tags: vec![(ETH_P_8021Q, 0x6000)],
            ..p.base()
        }),
        class("priority tag, source = a neighbour pod", ALL, |p| {
            let mut shape = with_ip(p, |p, ip| ip.src = p.neighbour().ip);
            shape.tags = vec![(ETH_P_8021Q, 0x6000)];
            shape
        }),
        class("QinQ 802.1ad 200 / 802.1Q 100", ALL, |p| Shape {
            tags: vec![(0x88a8, 200), (ETH_P_8021Q, 100)],
            ..p.base()
        }),
        class("source 127.0.0.1 (loopback)", ALL, |p| with_ip(p, |_, ip| ip.src = [127, 0, 0, 1])),
        class("source 0.0.0.7 (zero network)", ALL, |p| with_ip(p, |_, ip| ip.src = [0, 0, 0, 7])),
        class("source 224.0.0.5 (multicast)", ALL, |p| with_ip(p, |_, ip| ip.src = [224, 0, 0, 5])),
        class("source 255.255.255.255", ALL, |p| with_ip(p, |_, ip| ip.src = [255; 4])),
        class("source 240.0.0.1 (class E)", ALL, |p| with_ip(p, |_, ip| ip.src = [240, 0, 0, 1])),
        class("source = destination (land)", ALL, |p| with_ip(p, |p, ip| ip.src = p.target().ip)),
        class("source = a neighbour pod (reflection)", ALL, |p| {
            with_ip(p, |p, ip| ip.src = p.neighbour().ip)
        }),
        class("source = unused address of A's pod CIDR", ALL, |p| {
            with_ip(p, |_, ip| ip.src = [10, 244, 1, 250])
        }),
        class("source = node A", ALL, |p| with_ip(p, |_, ip| ip.src = NODE_A_IP)),
        class("source = unused address of B's pod CIDR", ALL, |p| {
            with_ip(p, |_, ip| ip.src = [10, 244, 2, 99])
        }),
        class("source = another cluster CIDR (10.244.3.5)", ALL, |p| {
            with_ip(p, |_, ip| ip.src = [10, 244, 3, 5])
        }),
        class("source = unused fabric address", ALL, |p| with_ip(p, |_, ip| ip.src = [10, 250, 0, 77])),
        class("source with no route (198.51.100.9)", ALL, |p| with_ip(p, |_, ip| ip.src = [198, 51, 100, 9])),
        class("bad IPv4 header checksum", ALL, |p| with_ip(p, |_, ip| ip.patches.push((10, 0x00)))),
        class("TTL 0", ALL, |p| with_ip(p, |_, ip| ip.ttl = 0)),
        class("TTL 1", ALL, |p| with_ip(p, |_, ip| ip.ttl = 1)),
        class("TTL 2", ALL, |p| with_ip(p, |_, ip| ip.ttl = 2)),
        // Pods have the uplink's MTU less 50 in overlay mode: a full-size
        // packet from the fabric is too big for them.
        class("1500 bytes with DF", Sender::UPLINK, |p| Shape { pad_to: Some(1472), ..p.base() }),
        class("1500 bytes without DF", Sender::UPLINK, |p| {
            let mut shape = Shape { pad_to: Some(1472), ..p.base() };
            ipv4(&mut shape).frag = 0;
            shape
        }),
        class("option: record route", ALL, |p| {
            with_ip(p, |_, ip| ip.options = vec![0x07, 0x07, 0x04, 0, 0, 0, 0, 0x01])
        }),
        class("option: loose source route", ALL, |p| {
            with_ip(p, |p, ip| {
                let t = p.target().ip;
                ip.options = vec![0x83, 0x07, 0x04, t[0], t[1], t[2], t[3], 0x01];
            })
        }),
        class("option: router alert", PLAIN, |p| with_ip(p, |_, ip| ip.options = vec![0x94, 0x04, 0, 0])),
        class("fragmented datagram (2 fragments)", ALL, |p| Shape { fragment_at: Some(16), ..p.base() }),
        class("lone later fragment", PLAIN, |p| Shape {
            fragment_at: Some(16),
            only_later_fragment: true,
            ..p.base()
        }),
        class("IHL 4", PLAIN, |p| with_ip(p, |_, ip| ip.patches.push((0, 0x44)))),
        class("total length beyond the frame", PLAIN, |p| with_ip(p, |_, ip| ip.patches.push((2, 0x7f)))),
        class("IPv4 header cut at 10 bytes", PLAIN, |p| with_ip(p, |_, ip| ip.truncate = Some(10))),
        Class {
            name: "jumbo frame (3000 bytes, links are 1500)",
            senders: &[OutsideHost],
            shape: |p| Shape { pad_to: Some(2960), ..p.base() },
            before_programs: true,
        },
        class("ARP request for the target", PLAIN, |p| Shape {
            dst_mac: [0xff; 6],
            l3: arp(p, 1),
            ..p.base()
        }),
        class("gratuitous ARP claiming the target", Sender::UPLINK, |p| Shape {
            dst_mac: [0xff; 6],
            l3: arp(p, 2),
            ..p.base()
        }),
        class("IPv6 UDP to all-nodes", PLAIN, |p| Shape {
            dst_mac: [0x33, 0x33, 0, 0, 0, 1],
            l3: ipv6(p),
            ..p.base()
        }),
        class("unknown ethertype 0x88b5", PLAIN, |p| Shape {
            l3: L3::Other { ethertype: 0x88b5, bytes: p.marker() },
            ..p.base()
        }),
        class("VXLAN with another VNI", Sender::TUNNEL, |p| Shape { vni: 2, ..p.base() }),
        Class {
            name: "VXLAN without the I flag",
            senders: Sender::TUNNEL,
            shape: |p| Shape { vxlan_flags: 0, ..p.base() },
            before_programs: true,
        },
    ]
}

fn arp(p: &Probe, oper: u16) -> L3 {
    let (sender_mac, sender_ip) = match p.sender {
        Sender::LocalPod => (p.roles.a1.mac, p.roles.a1.ip),
        Sender::RemotePod => (p.roles.b1.mac, p.roles.b1.ip),
        Sender::PeerNode | Sender::PeerTunnel => (p.roles.b_uplink_mac, NODE_B_IP),
        Sender::OutsideHost | Sender::OutsideTunnel => (p.roles.outside_mac, OUTSIDE_IP),
    };
    let target = p.target().ip;
    let mut a = vec![0, 1, 0x08, 0, 6, 4, 0, oper as u8];
    a.extend_from_slice(&sender_mac);
    // Gratuitous: the sender claims the target's address.
    a.extend_from_slice(if oper == 2 { &target } else { &sender_ip });
    a.extend_from_slice(&[0xff; 6]);
    a.extend_from_slice(&target);
    a.extend_from_slice(&p.marker());
    L3::Other { ethertype: ETH_P_ARP, bytes: a }
}

fn ipv6(p: &Probe) -> L3 {
    let payload = p.marker();
    let mut v6 = vec![0x60, 0, 0, 0];
    v6.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v6.extend_from_slice(&[17, 64]);
    v6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99]);
    v6.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&p.sport().to_be_bytes());
    v6.extend_from_slice(&PROBE_PORT.to_be_bytes());
    v6.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v6.extend_from_slice(&[0, 0]);
    v6.extend_from_slice(&payload);
    L3::Other { ethertype: ETH_P_IPV6, bytes: v6 }
}

/// An ICMP error a sender got: (type, code, from).
pub type IcmpAnswer = (u8, u8, Ipv4Addr);

/// What became of one probe in one topology.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The target pod's IP stack (or, for non-IP frames, its interface) got it.
    pub delivered: bool,
    /// The sender got an ICMP error about it: (type, code, from).
    pub answered: Option<IcmpAnswer>,
    /// Our datapath only: the counters (drop reasons, forward paths) on A
    /// and B that the probe moved, beyond what a sentinel alone moves.
    pub counted: Vec<String>,
    /// Our datapath only: some counter says what became of the probe.
    pub accounted: bool,
}

/// Receives in every pod and sender namespace, and records what arrived.
pub struct Listeners {
    stop: Arc<AtomicBool>,
    delivered: Arc<Mutex<BTreeMap<String, BTreeSet<u32>>>>,
    answered: Arc<Mutex<BTreeMap<u32, IcmpAnswer>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Listeners {
    /// One listener per namespace in `pods` (deliveries, by namespace) and
    /// in `senders` (ICMP errors about probes).
    pub fn start(pods: &[&str], senders: &[&str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(Mutex::new(BTreeMap::new()));
        let answered = Arc::new(Mutex::new(BTreeMap::new()));
        let ready = Arc::new(AtomicU32::new(0));
        let mut threads = Vec::new();
        let mut all: Vec<(String, bool)> = pods.iter().map(|n| (n.to_string(), true)).collect();
        all.extend(senders.iter().filter(|n| !pods.contains(n)).map(|n| (n.to_string(), false)));
        for (ns, is_pod) in all.clone() {
            let (stop, delivered, answered, ready) =
                (stop.clone(), delivered.clone(), answered.clone(), ready.clone());
            threads.push(std::thread::spawn(move || {
                listen(&ns, is_pod, &stop, &delivered, &answered, &ready);
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while ready.load(Ordering::SeqCst) < all.len() as u32 {
            assert!(Instant::now() < deadline, "listeners did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { stop, delivered, answered, threads }
    }

    fn delivered_to(&self, netns: &str, id: u32) -> bool {
        self.delivered.lock().unwrap().get(netns).is_some_and(|ids| ids.contains(&id))
    }

    fn answer(&self, id: u32) -> Option<IcmpAnswer> {
        self.answered.lock().unwrap().get(&id).copied()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: plain socket call; the result is checked.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn find_marker(buf: &[u8]) -> Option<u32> {
    let at = buf.windows(MARKER.len()).position(|w| w == MARKER)?;
    let id = buf.get(at + MARKER.len()..at + MARKER.len() + 4)?;
    Some(u32::from_be_bytes(id.try_into().unwrap()))
}

fn listen(
    ns: &str,
    is_pod: bool,
    stop: &AtomicBool,
    delivered: &Mutex<BTreeMap<String, BTreeSet<u32>>>,
    answered: &Mutex<BTreeMap<u32, IcmpAnswer>>,
    ready: &AtomicU32,
) {
    datapath_api::netns::enter(&PathBuf::from(format!("/run/netns/{ns}"))).expect("enter listener netns");
    // IP stack deliveries, per protocol (a raw socket gets a copy of each
    // datagram the stack accepts for this host, after reassembly).
    let mut fds: Vec<(OwnedFd, bool)> = Vec::new();
    for protocol in [libc::IPPROTO_UDP, libc::IPPROTO_TCP, libc::IPPROTO_ICMP] {
        fds.push((socket(libc::AF_INET, libc::SOCK_RAW, protocol), false));
    }
    let mut _bound = None;
    if is_pod {
        // Frames that are not IPv4 count as delivered if they reach the
        // pod's interface at all.
        fds.push((socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32), true));
        // The probes' port is open: no port unreachable goes back.
        _bound = std::net::UdpSocket::bind(("0.0.0.0", PROBE_PORT)).ok();
    }
    ready.fetch_add(1, Ordering::SeqCst);
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut polls: Vec<libc::pollfd> = fds
            .iter()
            .map(|(fd, _)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: polls is a valid array of pollfd.
        unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as u64, 20) };
        for (i, (fd, packet_socket)) in fds.iter().enumerate() {
            if polls[i].revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buf and addr are valid for their sizes.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut addr as *mut libc::sockaddr_ll).cast(),
                        &mut addr_len,
                    )
                };
                if n <= 0 {
                    break;
                }
                let packet = &buf[..n as usize];
                if *packet_socket {
                    // Outgoing copies and IPv4 (judged by the IP stack) aside.
                    let ethertype = u16::from_be(addr.sll_protocol);
                    if addr.sll_pkttype == libc::PACKET_OUTGOING || ethertype == ETH_P_IP {
                        continue;
                    }
                    if let Some(id) = find_marker(packet) {
                        delivered.lock().unwrap().entry(ns.to_owned()).or_default().insert(id);
                    }
                    continue;
                }
                let hl = (packet[0] & 0x0f) as usize * 4;
                if packet[9] == 1 && packet.len() >= hl + 8 + 28 && matches!(packet[hl], 3 | 11) {
                    // An ICMP error about one of our probes: the quoted
                    // header's UDP source port says which.
                    let quoted = &packet[hl + 8..];
                    let qhl = (quoted[0] & 0x0f) as usize * 4;
                    if quoted[9] == 17 && quoted.len() >= qhl + 2 {
                        let sport = u16::from_be_bytes([quoted[qhl], quoted[qhl + 1]]);
                        if sport >= PORT_BASE {
                            let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
                            let id = u32::from(sport - PORT_BASE);
                            answered.lock().unwrap().entry(id).or_insert((packet[hl], packet[hl + 1], from));
                        }
                    }
                    continue;
                }
                if is_pod && let Some(id) = find_marker(packet) {
                    delivered.lock().unwrap().entry(ns.to_owned()).or_default().insert(id);
                }
            }
        }
    }
}

/// A topology the corpus runs through: its roles, and (ours) a way to read
/// the datapath's counters on both nodes.
pub trait Topology {
    fn roles(&self) -> &Roles;
    /// Drop reasons (`drop/<name>`) and forward paths (`forward/<name>`),
    /// summed over the nodes: empty for the plain kernel.
    fn counters(&self) -> BTreeMap<String, u64>;
}

/// Send every applicable probe of `corpus` from every sender in `senders`
/// through `topology`, one at a time, each followed by a sentinel (a valid
/// probe on the same path) whose arrival says the probe had its chance.
pub fn run_corpus(
    topology: &dyn Topology,
    corpus: &[Class],
    senders: &[Sender],
) -> BTreeMap<(usize, Sender), Outcome> {
    let roles = topology.roles();
    let pods =
        [roles.a1.netns.as_str(), roles.a2.netns.as_str(), roles.a3.netns.as_str(), roles.b1.netns.as_str()];
    let origins = [
        roles.a1.netns.as_str(),
        roles.b1.netns.as_str(),
        roles.b_netns.as_str(),
        roles.outside_netns.as_str(),
    ];
    let listeners = Listeners::start(&pods, &origins);
    let mut outcomes = BTreeMap::new();
    let mut id = 0u32;
    for (c, class) in corpus.iter().enumerate() {
        for &sender in class.senders.iter().filter(|s| senders.contains(s)) {
            id += 1;
            let probe = Probe { id, sender, roles };
            let (ns, ifname) = probe.origin();
            let ns = PathBuf::from(format!("/run/netns/{ns}"));
            // Sentinels: valid probes from the same place (tunnelled senders:
            // their plain path), one before the probe to measure what a
            // sentinel alone counts, one after it: once that one has
            // arrived, the probe had its chance.
            let sentinel_sender = match sender {
                Sender::PeerTunnel => Sender::PeerNode,
                Sender::OutsideTunnel => Sender::OutsideHost,
                other => other,
            };
            let send_sentinel = |sentinel_id: u32| {
                let sentinel = Probe { id: sentinel_id, sender: sentinel_sender, roles };
                let target = sentinel.target().netns.clone();
                send_raw_frames_in(&ns, ifname, sentinel.frames(&sentinel.base())).expect("send a sentinel");
                let deadline = Instant::now() + Duration::from_secs(5);
                while !listeners.delivered_to(&target, sentinel_id) {
                    assert!(
                        Instant::now() < deadline,
                        "sentinel {sentinel_id} around probe {id} ({} from {}) never arrived: the topology is broken",
                        class.name,
                        sender.name()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            let c0 = topology.counters();
            send_sentinel(SENTINEL + 2 * id);
            let c1 = topology.counters();
            let sent = send_raw_frames_in(&ns, ifname, probe.frames(&(class.shape)(&probe)));
            send_sentinel(SENTINEL + 2 * id + 1);
            // ICMP errors travel back meanwhile; give them a moment too.
            std::thread::sleep(Duration::from_millis(30));
            let c2 = topology.counters();
            let delta = |from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>, name: &str| {
                to.get(name).copied().unwrap_or(0).saturating_sub(from.get(name).copied().unwrap_or(0))
            };
            let counted: Vec<String> =
                c2.keys().filter(|name| delta(&c1, &c2, name) > delta(&c0, &c1, name)).cloned().collect();
            // Sentinels are never dropped nor handed to the stack: any such
            // count while the probe went through is the probe's (other
            // traffic, e.g. an ARP exchange, can hide its forwards in the
            // comparison above).
            let accounted = !counted.is_empty()
                || c2.keys().any(|name| {
                    (name.starts_with("drop/") || name == "forward/to_host_stack")
                        && delta(&c1, &c2, name) > 0
                });
            let target = probe.target().netns.clone();
            let outcome = Outcome {
                delivered: sent.is_ok() && listeners.delivered_to(&target, id),
                answered: listeners.answer(id),
                counted,
                accounted,
            };
            outcomes.insert((c, sender), outcome);
        }
    }
    outcomes
}

/// Our datapath: two nodes with agents, pods made by the CNI plugin, and
/// the outside host.
pub struct Ours {
    pub a: Node,
    pub b: Node,
    pub pods: Vec<Pod>,
    pub outside: Netns,
    roles: Roles,
    _fabric: Fabric,
}

impl Ours {
    pub fn new(mode: &str) -> Self {
        let fabric = Fabric::new();
        let (a, b) = crate::lab::peered_nodes(&fabric, mode);
        let pods = vec![a.add_pod("a1"), a.add_pod("a2"), a.add_pod("a3"), b.add_pod("b1")];
        let outside = fabric.add_host("out", Ipv4Addr::from(OUTSIDE_IP));
        for ns in [&a.netns, &b.netns, &outside].into_iter().chain(pods.iter().map(|p| &p.netns)) {
            quiet_ipv6(&ns.name);
        }
        sh(&["ip", "-n", &outside.name, "link", "set", "eth0", "mtu", "9000"]);
        let role = |pod: &Pod, node: &Node| PodRole {
            ip: pod.ip.octets(),
            mac: mac_of(&pod.netns, "eth0"),
            gateway_mac: mac_of(&node.netns, &pod.host_veth),
            netns: pod.netns.name.clone(),
        };
        let overlay_mac = |node: &Node| {
            if mode == "vxlan" { mac_of(&node.netns, "dp-vxlan") } else { [0x02, 0x0f, 0, 0, 0, 1] }
        };
        let roles = Roles {
            a_netns: a.netns.name.clone(),
            b_netns: b.netns.name.clone(),
            outside_netns: outside.name.clone(),
            a_uplink_mac: mac_of(&a.netns, crate::lab::UPLINK),
            a_overlay_mac: overlay_mac(&a),
            b_uplink_mac: mac_of(&b.netns, crate::lab::UPLINK),
            b_overlay_mac: overlay_mac(&b),
            outside_mac: mac_of(&outside, "eth0"),
            a1: role(&pods[0], &a),
            a2: role(&pods[1], &a),
            a3: role(&pods[2], &a),
            b1: role(&pods[3], &b),
        };
        Self { a, b, pods, outside, roles, _fabric: fabric }
    }

    pub fn pod_ips(&self) -> Vec<[u8; 4]> {
        self.pods.iter().map(|p| p.ip.octets()).collect()
    }
}

impl Topology for Ours {
    fn roles(&self) -> &Roles {
        &self.roles
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for node in [&self.a, &self.b] {
            let maps =
                datapath_agent::bpf::PinnedMaps::open(&datapath_agent::bpf::PinLayout::new(&node.bpffs_dir))
                    .expect("open the pinned maps");
            let counters = maps.counters().expect("read the counters");
            for (name, n) in &counters.drops {
                *all.entry(format!("drop/{name}")).or_default() += n;
            }
            for (name, n) in &counters.forwards {
                *all.entry(format!("forward/{name}")).or_default() += n;
            }
        }
        all
    }
}

fn quiet_ipv6(ns: &str) {
    // No router solicitations or neighbour discovery in the counters.
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
}

/// The same topology forwarded by the plain kernel, flannel-style.
pub struct Kernel {
    roles: Roles,
    _namespaces: Vec<Netns>,
    _fabric: Fabric,
}

impl Kernel {
    /// `pod_ips`: a1, a2, a3 (node A) and b1 (node B), as ours got them.
    pub fn new(mode: &str, pod_ips: &[[u8; 4]]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("dpt{}k{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let fabric = Fabric::new();
        let node = |name: &str, ip: [u8; 4], pod_cidr: &str| {
            let ns = Netns::new(format!("{prefix}-{name}"));
            quiet_ipv6(&ns.name);
            for sysctl in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=1",
                "net.ipv4.conf.default.rp_filter=1",
                "net.ipv4.conf.all.accept_source_route=0",
                // Every ICMP error the kernel would send, not a rate-limited
                // few: the test compares them with ours.
                "net.ipv4.icmp_ratelimit=0",
                "net.ipv4.icmp_msgs_per_sec=100000",
            ] {
                sh(&["ip", "netns", "exec", &ns.name, "sysctl", "-qw", sysctl]);
            }
            fabric.plug(&ns.name, crate::lab::UPLINK);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/24", Ipv4Addr::from(ip)),
                "dev",
                crate::lab::UPLINK,
            ]);
            // The node's pod CIDR is its own (flannel: on cni0): nothing
            // from it is routed back out of the uplink.
            sh(&["ip", "-n", &ns.name, "route", "add", "blackhole", pod_cidr]);
            ns
        };
        let a = node("a", NODE_A_IP, "10.244.1.0/24");
        let b = node("b", NODE_B_IP, "10.244.2.0/24");
        let outside = fabric.add_host("kout", Ipv4Addr::from(OUTSIDE_IP));
        quiet_ipv6(&outside.name);
        sh(&["ip", "-n", &outside.name, "link", "set", "eth0", "mtu", "9000"]);
        let pod_mtu = if mode == "vxlan" { "1450" } else { "1500" };
        let mut namespaces = Vec::new();
        let mut pod = |node: &Netns, name: &str, ip: [u8; 4]| {
            let ns = Netns::new(format!("{prefix}-{name}"));
            quiet_ipv6(&ns.name);
            let host = format!("dptk{name}");
            sh(&[
                "ip", "-n", &node.name, "link", "add", &host, "mtu", pod_mtu, "type", "veth", "peer", "name",
                "eth0", "netns", &ns.name,
            ]);
            sh(&["ip", "-n", &node.name, "link", "set", &host, "up"]);
            let ip_text = Ipv4Addr::from(ip).to_string();
            sh(&["ip", "-n", &ns.name, "link", "set", "eth0", "mtu", pod_mtu, "up"]);
            sh(&["ip", "-n", &ns.name, "addr", "add", &format!("{ip_text}/32"), "dev", "eth0"]);
            sh(&["ip", "-n", &ns.name, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
            sh(&["ip", "-n", &ns.name, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
            let gateway_mac = mac_of(node, &host);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                &mac_text(gateway_mac),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            sh(&["ip", "-n", &node.name, "route", "add", &format!("{ip_text}/32"), "dev", &host]);
            let role = PodRole { ip, mac: mac_of(&ns, "eth0"), gateway_mac, netns: ns.name.clone() };
            namespaces.push(ns);
            role
        };
        let a1 = pod(&a, "a1", pod_ips[0]);
        let a2 = pod(&a, "a2", pod_ips[1]);
        let a3 = pod(&a, "a3", pod_ips[2]);
        let b1 = pod(&b, "b1", pod_ips[3]);
        let (a_overlay_mac, b_overlay_mac) = if mode == "vxlan" {
            for (ns, ip, cidr_addr) in [(&a, NODE_A_IP, "10.244.1.0/32"), (&b, NODE_B_IP, "10.244.2.0/32")] {
                let local = Ipv4Addr::from(ip).to_string();
                sh(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "link",
                    "add",
                    "dptvx0",
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "local",
                    &local,
                    "dev",
                    crate::lab::UPLINK,
                    "dstport",
                    "8472",
                    "nolearning",
                ]);
                sh(&["ip", "-n", &ns.name, "link", "set", "dptvx0", "mtu", "1450", "up"]);
                sh(&["ip", "-n", &ns.name, "addr", "add", cidr_addr, "dev", "dptvx0"]);
            }
            let (am, bm) = (mac_of(&a, "dptvx0"), mac_of(&b, "dptvx0"));
            for (ns, gw, cidr, mac, peer) in [
                (&a, "10.244.2.0", "10.244.2.0/24", bm, "10.250.0.2"),
                (&b, "10.244.1.0", "10.244.1.0/24", am, "10.250.0.1"),
            ] {
                let mac = mac_text(mac);
                sh(&["ip", "-n", &ns.name, "route", "add", cidr, "via", gw, "dev", "dptvx0", "onlink"]);
                sh(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "neigh",
                    "add",
                    gw,
                    "lladdr",
                    &mac,
                    "dev",
                    "dptvx0",
                    "nud",
                    "permanent",
                ]);
                sh(&[
                    "ip", "netns", "exec", &ns.name, "bridge", "fdb", "append", &mac, "dev", "dptvx0", "dst",
                    peer,
                ]);
            }
            (am, bm)
        } else {
            sh(&["ip", "-n", &a.name, "route", "add", "10.244.2.0/24", "via", "10.250.0.2"]);
            sh(&["ip", "-n", &b.name, "route", "add", "10.244.1.0/24", "via", "10.250.0.1"]);
            ([0x02, 0x0f, 0, 0, 0, 1], [0x02, 0x0f, 0, 0, 0, 2])
        };
        let roles = Roles {
            a_netns: a.name.clone(),
            b_netns: b.name.clone(),
            outside_netns: outside.name.clone(),
            a_uplink_mac: mac_of(&a, crate::lab::UPLINK),
            a_overlay_mac,
            b_uplink_mac: mac_of(&b, crate::lab::UPLINK),
            b_overlay_mac,
            outside_mac: mac_of(&outside, "eth0"),
            a1,
            a2,
            a3,
            b1,
        };
        // Pods first: their namespaces go before the nodes' on drop.
        namespaces.extend([a, b, outside]);
        Self { roles, _namespaces: namespaces, _fabric: fabric }
    }
}

impl Topology for Kernel {
    fn roles(&self) -> &Roles {
        &self.roles
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
