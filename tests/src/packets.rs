//! Builders for the frames the packet-level tests feed to the programs, and
//! one BPF_PROG_TEST_RUN of a program with what it did.

use aya::programs::{TestRun as _, TestRunOptions};
use datapath_agent::bpf::{Counters, Datapath};
use datapath_common::{DropReason, ForwardPath};

use crate::{lab::Netns, sh};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

// The programs' own definitions: a test frame and the datapath cannot
// disagree on them.
pub use datapath_common::{ETH_P_ARP, ETH_P_IP};
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub fn ethernet(dst: [u8; 6], src: [u8; 6], proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Internet checksum (RFC 1071) over `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub protocol: u8,
    pub options: Vec<u8>,
    /// Flags + fragment offset field (network order as u16).
    pub frag: u16,
    pub payload: Vec<u8>,
}

/// The initial sequence number of every segment [`Ipv4::tcp`] makes.
pub const TCP_ISN: u32 = 0x1234_5678;

impl Ipv4 {
    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Self {
        // ICMP echo request with a valid ICMP checksum.
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"datapath-test-payload");
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        Self { src, dst, ttl: 64, protocol: 1, options: vec![], frag: 0x4000, payload: icmp }
    }

    pub fn header_len(&self) -> usize {
        20 + self.options.len()
    }

    pub fn bytes(&self) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0);
        let hl = self.header_len();
        let total = (hl + self.payload.len()) as u16;
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | (hl / 4) as u8;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.protocol;
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        h[20..].copy_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&self.payload);
        h
    }
}

/// Ethernet/IPv4 ARP request: who has `target`? tell `sender`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.push(6);
    a.push(4);
    a.extend_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip);
    ethernet([0xff; 6], sender_mac, ETH_P_ARP, &a)
}

/// Checksum of a TCP or UDP segment with its IPv4 pseudo-header.
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(12 + segment.len());
    data.extend_from_slice(&src);
    data.extend_from_slice(&dst);
    data.extend_from_slice(&[0, protocol]);
    data.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    data.extend_from_slice(segment);
    checksum(&data)
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;

impl Ipv4 {
    /// A TCP segment (20-byte header, `payload` after it) with valid checksums.
    pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8, payload: &[u8]) -> Self {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        // Both ends start at ISN 0x12345678 and are past their SYN ever
        // after (data or not): every segment but a SYN sits at ISN + 1,
        // and every ACK acknowledges the other end's SYN. Consistent for
        // the programs' sequence checks (an RST or FIN at the place the
        // other end acknowledged, a handshake ACK of the backend's SYN);
        // [`Ipv4::with_seq_ack`] sets others.
        let seq = if flags & 0x02 != 0 { TCP_ISN } else { TCP_ISN + 1 };
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        if flags & 0x10 != 0 {
            t[8..12].copy_from_slice(&(TCP_ISN + 1).to_be_bytes());
        }
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        t.extend_from_slice(payload);
        let c = l4_checksum(src, dst, 6, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        Self { src, dst, ttl: 64, protocol: 6, options: vec![], frag: 0x4000, payload: t }
    }

    /// This TCP segment with sequence number `seq` and acknowledgement
    /// number `ack` (checksum fixed).
    pub fn with_seq_ack(mut self, seq: u32, ack: u32) -> Self {
        let t = &mut self.payload;
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[16..18].copy_from_slice(&[0, 0]);
        let c = l4_checksum(self.src, self.dst, 6, t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        self
    }

    /// A UDP datagram; `with_checksum: false` sends checksum 0 (none).
    pub fn udp(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        payload: &[u8],
        with_checksum: bool,
    ) -> Self {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        if with_checksum {
            let c = l4_checksum(src, dst, 17, &u);
            u[6..8].copy_from_slice(&c.to_be_bytes());
        }
        Self { src, dst, ttl: 64, protocol: 17, options: vec![], frag: 0x4000, payload: u }
    }
}

impl Ipv4 {
    /// An ICMP error of `icmp_type`/`code` (`rest`: the header's last four
    /// bytes, e.g. the MTU of a fragmentation needed) quoting `quoted`,
    /// checksum computed from scratch.
    pub fn icmp_error(
        src: [u8; 4],
        dst: [u8; 4],
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quoted: &[u8],
    ) -> Self {
        let mut icmp = vec![icmp_type, code, 0, 0];
        icmp.extend_from_slice(&rest);
        icmp.extend_from_slice(quoted);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        Self { src, dst, ttl: 64, protocol: 1, options: vec![], frag: 0, payload: icmp }
    }
}

/// An Ethernet/IPv4 frame taken apart, for checking what a program wrote.
#[derive(Debug)]
pub struct Parsed {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    pub ip_header_ok: bool,
    /// The L4 bytes (after the IPv4 header, up to its total length).
    pub l4: Vec<u8>,
}

impl Parsed {
    pub fn new(frame: &[u8]) -> Self {
        let ip = &frame[14..];
        let hl = (ip[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        Parsed {
            src: ip[12..16].try_into().unwrap(),
            dst: ip[16..20].try_into().unwrap(),
            protocol: ip[9],
            ip_header_ok: checksum(&ip[..hl]) == 0,
            l4: ip[hl..total].to_vec(),
        }
    }
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4[0], self.l4[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4[2], self.l4[3]])
    }
    /// TCP/UDP checksum verifies (a UDP checksum of 0 means none).
    pub fn l4_checksum_ok(&self) -> bool {
        if self.protocol == 17 && self.l4[6..8] == [0, 0] {
            return true;
        }
        l4_checksum(self.src, self.dst, self.protocol, &self.l4) == 0
    }
}

/// The device a test run's packet arrives on: a veth in a namespace of its
/// own, so that the run sees what a real ingress has. Its MAC decides the
/// frame's `pkt_type` (the kernel's `eth_type_trans` in the test run: a
/// frame to another MAC is PACKET_OTHERHOST, as on the wire), and its
/// namespace's routes are what `bpf_fib_lookup` consults. The loopback
/// that runs use otherwise has an all-zero MAC and the host's routes.
pub struct RunDevice {
    netns: Netns,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The run device's own address (192.0.2.0/24 is its link; the far end of
/// the veth is 192.0.2.2, the "peer").
pub const RUN_DEVICE_IP: [u8; 4] = [192, 0, 2, 1];

impl RunDevice {
    /// `dpt<pid>x<n>-run` with veth `dptrun0` (MAC `mac`, 192.0.2.1/24,
    /// forwarding on) whose peer `dptrun1` stays in the namespace, and the
    /// `routes` given (`ip route add` arguments, e.g. "10.244.2.0/24 via
    /// 192.0.2.2").
    pub fn new(mac: [u8; 6], routes: &[&str]) -> Self {
        let netns = Netns::new(format!("dpt{}x{}-run", std::process::id(), next_run_device()));
        let ns = netns.name.as_str();
        let mac_text = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        sh(&[
            "ip", "-n", ns, "link", "add", "dptrun0", "address", &mac_text, "type", "veth", "peer", "name",
            "dptrun1",
        ]);
        sh(&["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "dptrun0"]);
        sh(&["ip", "-n", ns, "link", "set", "dptrun0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "dptrun1", "up"]);
        sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"]);
        for route in routes {
            let mut args = vec!["ip", "-n", ns, "route", "add"];
            args.extend(route.split_whitespace());
            sh(&args);
        }
        let out = sh(&["ip", "-n", ns, "-j", "link", "show", "dptrun0"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ifindex = v[0]["ifindex"].as_u64().expect("ifindex") as u32;
        Self { netns, ifindex, mac }
    }
}

impl RunDevice {
    /// The namespace the device is in (for extra routes or sysctls).
    pub fn netns_name(&self) -> &str {
        &self.netns.name
    }
}

fn next_run_device() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// `struct __sk_buff` as BPF_PROG_TEST_RUN takes it in `ctx_in`: all zero
/// but `ifindex` (offset 40), the device the packet arrives on.
pub fn skb_context(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Run `program` once on `frame` as if it arrived on `device`.
pub fn test_run_on(device: &RunDevice, datapath: &Datapath, program: &'static str, frame: &[u8]) -> Run {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = skb_context(device.ifindex);
    let path = device.netns.path();
    // The device and the FIB the helpers see are those of the calling
    // thread's namespace: run from a thread inside the device's.
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                datapath_api::netns::enter(&path).expect("enter the run device's namespace");
                // Always the same CPU: per-CPU state (caches, budgets) then
                // carries from one run to the next, as it does for a flow.
                let mut first = nix::sched::CpuSet::new();
                first.set(0).expect("CPU 0");
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &first).expect("pin to CPU 0");
                datapath.program(program).unwrap().test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat: 1,
                    ..Default::default()
                })
            })
            .join()
            .expect("test run thread")
    })
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    Run {
        verdict: result.return_value,
        out,
        counters: datapath.counters().unwrap(),
        frame_len: frame.len() as u64,
    }
}

/// What one test run did: the program's verdict, the frame as it left, and
/// the datapath's counters after it.
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub counters: Counters,
    /// Length of the frame run (what the counters' bytes count).
    pub frame_len: u64,
}

/// Run `program` of `datapath` once on `frame` (BPF_PROG_TEST_RUN; the
/// skb's device is the loopback, ifindex 1).
pub fn test_run(datapath: &Datapath, program: &'static str, frame: &[u8]) -> Run {
    let mut out = vec![0u8; frame.len() + 256];
    let result = datapath
        .program(program)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    Run {
        verdict: result.return_value,
        out,
        counters: datapath.counters().unwrap(),
        frame_len: frame.len() as u64,
    }
}

impl Run {
    /// Exactly one counter, the named one, moved by exactly one packet of
    /// the frame's length (the counters of a freshly loaded datapath start
    /// at zero).
    pub fn assert_only_drop(&self, reason: DropReason) {
        assert_eq!(self.verdict, TC_ACT_SHOT, "verdict");
        self.assert_drop_counted(reason);
    }

    fn assert_drop_counted(&self, reason: DropReason) {
        for r in DropReason::ALL {
            assert_eq!(self.counters.drop_count(r), u64::from(r == reason), "drop counter {}", r.name());
            let bytes = if r == reason { self.frame_len } else { 0 };
            assert_eq!(
                self.counters.drop_bytes.get(r.name()).copied(),
                Some(bytes),
                "drop bytes {}",
                r.name()
            );
        }
        for p in ForwardPath::ALL {
            assert_eq!(self.counters.forward_count(p), 0, "forward counter {}", p.name());
        }
    }

    /// Dropped for `reason` alone, and answered: the frame was turned into
    /// an ICMP error and redirected back (a drop as far as counters go).
    pub fn assert_answered(&self, reason: DropReason) {
        assert_eq!(self.verdict, TC_ACT_REDIRECT, "verdict: the ICMP error is sent back");
        self.assert_drop_counted(reason);
        for p in ForwardPath::ALL {
            assert_eq!(self.counters.forward_count(p), 0, "forward counter {}", p.name());
        }
    }

    pub fn assert_only_forward(&self, path: ForwardPath, verdict: u32) {
        assert_eq!(self.verdict, verdict, "verdict");
        for p in ForwardPath::ALL {
            assert_eq!(self.counters.forward_count(p), u64::from(p == path), "forward counter {}", p.name());
            let bytes = if p == path { self.frame_len } else { 0 };
            assert_eq!(
                self.counters.forward_bytes.get(p.name()).copied(),
                Some(bytes),
                "forward bytes {}",
                p.name()
            );
        }
        for r in DropReason::ALL {
            assert_eq!(self.counters.drop_count(r), 0, "drop counter {}", r.name());
        }
    }
}
