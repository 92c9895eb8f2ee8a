//! Red team, round 30: the per-protocol outside budget
//! (`conntrack_max_outside`, TCP's half and UDP's half, no limit per
//! address), the Prometheus/OpenMetrics `/metrics` endpoint, and the
//! binaries' `--version` / the CNI plugin's spec behaviour. Attacked from
//! outside: a host on the nodes' segment, a hostile pod, a careless
//! operator. Each test prints what it measured (`--nocapture`); its
//! assertions state what should hold, so a finding is a failing test.
//! Findings F3 (`metrics_accept_q_values_are_honoured`) and F4
//! (`cni_spec_behaviour_holds_whatever_the_runtime_passes`: VERSION with a
//! malformed CNI_ARGS) and F2
//! (`a_new_pod_on_a_deleted_pods_address_inherits_no_client_limit`) are
//! fixed; F1 is a known gap, its test ignored (docs/services.md, "Red
//! team, round 30"). The others are
//! attacks that failed, kept as regression tests.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    bin_dir,
    lab::{Netns, Node, http_get_local_with, in_netns, send_raw_frames},
    packets::{Ipv4, TCP_SYN},
    require_root,
};

use super::{
    observability::promtool_check,
    redteam_policy::outside_host,
    redteam_round29::{ask_udp, connects, frames_from, outside_lab, rows},
    services::{Lab, lab, wait_served},
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 66);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 30, 10);
const DEAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 30, 11);
const TCP_NP: u16 = 30080;
const UDP_NP: u16 = 30053;

/// Makes the i-th packet of a flood.
type PacketMaker = Box<dyn Fn(usize) -> Ipv4>;
/// (what, arguments, environment, stdin, expected answer).
type CniCase<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<u8>, &'a str);

// ---------------------------------------------------------------------------
// Lab and helpers
// ---------------------------------------------------------------------------

/// Service at VIP: TCP 80 -> 8080 (node port TCP_NP), UDP 53 -> 5353
/// (node port UDP_NP), external traffic `policy`.
fn np_service(backends: &[Ipv4Addr], policy: &str) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"rt30\"\ncluster_ip = \"{VIP}\"\nexternal_traffic_policy = \"{policy}\"\n\
         backends = [{}]\n[[services.ports]]\nport = 80\ntarget_port = 8080\nnode_port = {TCP_NP}\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = 5353\nnode_port = {UDP_NP}\n",
        list.join(", ")
    )
}

/// `inspect config`'s `conntrack_outside_<proto>`: (count, limit).
pub(super) fn outside_count(node: &Node, proto: &str) -> (i64, i64) {
    let v = node.inspect("config")[format!("conntrack_outside_{proto}")].clone();
    let text = match &v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut it = text.split('/');
    let count = it.next().and_then(|s| s.trim().parse().ok()).unwrap_or(i64::MIN);
    let limit = it.next().and_then(|s| s.trim().parse().ok()).unwrap_or(i64::MIN);
    if count == i64::MIN {
        eprintln!("conntrack_outside_{proto} not count/limit: {v}");
    }
    (count, limit)
}

/// `n` faked sources: 10.250.0.100.. (on the segment, nobody answers ARP).
fn faked(i: usize) -> ([u8; 4], u16) {
    ([10, 250, 0, 100 + (i / 1000) as u8], 20000 + (i % 1000) as u16)
}

fn rows_by_protocol(node: &Node) -> (usize, usize) {
    let r = rows(node);
    let tcp = r.iter().filter(|c| c["protocol"] == "TCP" || c["protocol"] == "tcp").count();
    (tcp, r.len() - tcp)
}

// ---------------------------------------------------------------------------
// 1. Per-protocol outside budget
// ---------------------------------------------------------------------------

/// Non-TCP traffic at the node's address from faked sources, past every
/// limit: UDP to the UDP node port, UDP to the TCP node port number, ICMP
/// port unreachables quoting node port connections, later fragments,
/// "TCP SYNs" under protocol numbers 132 (SCTP), 136 (UDP-Lite) and 47
/// (GRE), TCP SYNs whose first fragment holds the whole TCP header.
/// What should hold: the TCP count stays 0 (none of it is TCP), outside
/// TCP clients are served 5/5.
#[test]
fn non_tcp_floods_leave_the_outside_tcp_half_alone() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt30-client", OUTSIDE);
    let attacker = outside_host("rt30-x", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let (_, tcp_limit) = outside_count(&lab.a, "tcp");
    let (_, udp_limit) = outside_count(&lab.a, "udp");
    eprintln!("config: {}", lab.a.inspect("config"));
    let n = (tcp_limit.max(udp_limit) as usize) * 2 + 50;
    let node = NODE_A.octets();
    let kinds: Vec<(&str, PacketMaker)> = vec![
        (
            "udp to the UDP node port",
            Box::new(move |i| {
                let (s, p) = faked(i);
                Ipv4::udp(s, p, node, UDP_NP, b"who\n", true)
            }),
        ),
        (
            "udp to the TCP node port number",
            Box::new(move |i| {
                let (s, p) = faked(i);
                Ipv4::udp(s, p, node, TCP_NP, b"who\n", true)
            }),
        ),
        (
            "icmp port unreachable quoting node-port SYNs",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let quoted = Ipv4::tcp(node, TCP_NP, s, p, TCP_SYN | 0x10, &[]).bytes();
                Ipv4::icmp_error(s, node, 3, 3, [0; 4], &quoted[..28])
            }),
        ),
        (
            "icmp frag-needed quoting client->node port",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let quoted = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]).bytes();
                Ipv4::icmp_error(s, node, 3, 4, [0, 0, 5, 0], &quoted[..28])
            }),
        ),
        (
            "later fragments of TCP to the node port",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let mut pkt = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[0u8; 16]);
                pkt.frag = 0x0003; // offset 24 bytes, no MF
                pkt
            }),
        ),
        (
            "proto 132 with a TCP SYN header",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let mut pkt = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]);
                pkt.protocol = 132;
                pkt
            }),
        ),
        (
            "proto 136 with a UDP header",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let mut pkt = Ipv4::udp(s, p, node, UDP_NP, b"who\n", false);
                pkt.protocol = 136;
                pkt
            }),
        ),
        (
            "proto 47 with a TCP SYN header",
            Box::new(move |i| {
                let (s, p) = faked(i);
                let mut pkt = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]);
                pkt.protocol = 47;
                pkt
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, make) in &kinds {
        let packets: Vec<Ipv4> = (0..n).map(make).collect();
        send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let tcp = outside_count(&lab.a, "tcp");
        let udp = outside_count(&lab.a, "udp");
        let (tcp_rows, other_rows) = rows_by_protocol(&lab.a);
        let ok = connects(&outside, NODE_A, TCP_NP, 5);
        eprintln!(
            "{name} x{n}: outside tcp {tcp:?}, udp {udp:?}; rows tcp {tcp_rows} other {other_rows}; outside TCP {ok}/5"
        );
        if ok != 5 || tcp.0 > 0 {
            failures.push(format!("{name}: tcp count {tcp:?}, served {ok}/5"));
        }
    }
    // Last: TCP SYNs in two fragments (first holds the whole TCP header).
    let mut frags = Vec::new();
    for i in 0..n {
        let (s, p) = faked(i);
        let whole = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[0u8; 16]);
        let mut first = whole.clone();
        first.payload.truncate(24);
        first.frag = 0x2000;
        let mut second = whole.clone();
        second.payload = whole.payload[24..].to_vec();
        second.frag = 0x0003;
        frags.push(first);
        frags.push(second);
    }
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, frags)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tcp = outside_count(&lab.a, "tcp");
    let udp = outside_count(&lab.a, "udp");
    let drops = lab.a.inspect("counters")["drops"].clone();
    eprintln!("fragmented TCP SYNs x{n}: outside tcp {tcp:?} udp {udp:?}; drops {drops}");
    assert!(failures.is_empty(), "non-TCP traffic touched the TCP half: {failures:#?}");
}

/// A real outside client reconnecting on one tuple (RST aborts, then a
/// new connection from the same port, as after a reset): each reopen and
/// each answer must keep the TCP count right (0 once answered), never
/// drift down (a limit never reached) or wrap (a limit reached with
/// nothing tracked). Read right after each cycle (before a sweep heals).
/// Then the same with a FIN close each way, and SYN retransmissions the
/// backend answers twice.
#[test]
fn reconnects_on_one_tuple_keep_the_outside_tcp_count_right() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\nconntrack_closing_seconds = 1\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt30-re", OUTSIDE);
    let (_, limit) = outside_count(&lab.a, "tcp");
    let mut seen = Vec::new();
    for close in ["rst", "fin"] {
        let samples = in_netns(&outside.path(), move || {
            let mut ok = 0;
            for _ in 0..40 {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                s.set_reuse_address(true).unwrap();
                s.bind(&SocketAddr::from((OUTSIDE, 41234)).into()).unwrap();
                let t = Instant::now();
                if let Err(e) =
                    s.connect_timeout(&SocketAddr::from((NODE_A, TCP_NP)).into(), Duration::from_millis(1500))
                {
                    eprintln!("{close}: connect failed after {:?}: {e}", t.elapsed());
                    continue;
                }
                let mut c: TcpStream = s.into();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                writeln!(c, "who").unwrap();
                let mut line = String::new();
                let _ = BufReader::new(c.try_clone().unwrap()).read_line(&mut line);
                if close == "rst" {
                    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(c);
                } else {
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    let _ = c.read_to_end(&mut rest);
                    drop(c);
                    // TIME_WAIT: the port is reused at once only with RST aborts;
                    // with FIN closes the kernel's SO_REUSEADDR still lets
                    // connect from it after time-wait recycling is impossible,
                    // so go on (the bind above fails quietly into errors).
                }
                ok += 1;
            }
            ok
        });
        let mut counts = Vec::new();
        while !samples.is_finished() {
            counts.push(outside_count(&lab.a, "tcp").0);
        }
        let ok = samples.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let after = outside_count(&lab.a, "tcp").0;
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        eprintln!(
            "{close}: {ok}/40 connections, count samples min {min:?} max {max:?}, after {after} (limit {limit})"
        );
        seen.push((close, ok, min, max, after));
    }
    let served = connects(&outside, NODE_A, TCP_NP, 5);
    eprintln!("afterwards outside TCP {served}/5");
    for (close, _, min, max, after) in &seen {
        assert!(min.unwrap_or(0) >= 0 && max.unwrap_or(0) <= 1 && *after == 0, "{close}: count drifted");
    }
    assert_eq!(served, 5);
}

/// Forged SYNs from sources in the other node's pod CIDR (10.244.2.0/24,
/// routed out of the uplink in native mode, so they pass the reverse-path
/// check), in the cluster CIDR on no node, and from the peer node's own
/// address: are they held to the outside TCP half, or taken as pods
/// (`conntrack_max_per_client` each, 1,024 at most per address), which
/// would let a host outside fill the pods' part of the table? Table 2048
/// entries; 3,000 SYNs from 250 addresses.
#[test]
fn forged_syns_from_another_nodes_pod_addresses_are_held_as_outside_clients() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt30-c", OUTSIDE);
    let attacker = outside_host("rt30-p", ATTACKER);
    assert_eq!(connects(&lab.client.netns, VIP, 80, 5), 5, "control");
    eprintln!("routes of node A: {}", lab.a.host_routes());
    let node = NODE_A.octets();
    let mut results = Vec::new();
    for (name, base) in [("other node's pod CIDR", [10u8, 244, 2]), ("cluster CIDR, no node", [10, 244, 9])] {
        let before_full = lab.a.drop_count("conntrack_full");
        let packets: Vec<Ipv4> = (0..3000usize)
            .map(|i| {
                let src = [base[0], base[1], base[2], 2 + (i % 250) as u8];
                Ipv4::tcp(src, 30000 + (i / 250) as u16, node, TCP_NP, TCP_SYN, &[])
            })
            .collect();
        send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let r = rows(&lab.a);
        let from_flood = r
            .iter()
            .filter(|c| {
                c["client_ip"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{}.{}.{}.", base[0], base[1], base[2]))
            })
            .count();
        let tcp = outside_count(&lab.a, "tcp");
        let pods_ok = connects(&lab.client.netns, VIP, 80, 20);
        let out_ok = connects(&outside, NODE_A, TCP_NP, 3);
        let full = lab.a.drop_count("conntrack_full") - before_full;
        let drops = lab.a.inspect("counters")["drops"].clone();
        eprintln!(
            "{name}: tracked from flood {from_flood} (all rows {}), outside tcp {tcp:?}, pods {pods_ok}/20, \
             outside client {out_ok}/3, conntrack_full +{full}\n drops {drops}",
            r.len()
        );
        results.push((name, from_flood, tcp, pods_ok));
        // Let the sweep see it too.
        std::thread::sleep(Duration::from_secs(6));
        eprintln!("{name}: after a sweep: outside tcp {:?}", outside_count(&lab.a, "tcp"));
    }
    for (name, from_flood, tcp, pods_ok) in &results {
        assert_eq!(*pods_ok, 20, "{name}: pods lost their part of the table");
        assert!(
            (*from_flood as i64) <= tcp.1.max(0) + 16,
            "{name}: {from_flood} tracked past the TCP half {tcp:?}"
        );
    }
}

/// Cost and duration of locking every outside TCP client out at default
/// sizes: one burst of (TCP half + 100) SYNs from faked sources to a node
/// port (Local backend, which SYN-ACKs into the void). Then an outside
/// client tries every 3 s until it connects (capped at ~100 s).
/// netfilter (kube-proxy) has no outside budget and early-drops unassured
/// entries when full, so the same burst locks nobody out there. (Finding
/// F1: locked out 65 s. Fixed with early drop: a new connection takes the
/// place of the oldest unanswered one from outside.) Then the flood goes
/// on (five more bursts, back to back) while the client connects: served
/// every time, its handshake done long before the flood's queue comes
/// round to it.
#[test]
fn syn_burst_lockout_of_outside_tcp_clients_at_default_sizes() {
    require_root!();
    let lab = outside_lab("native", "", |lab| np_service(&[lab.backends[0].ip], "Local"));
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt30-l", OUTSIDE);
    let attacker = outside_host("rt30-f", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let (_, limit) = outside_count(&lab.a, "tcp");
    let n = limit as usize + 100;
    let packets: Vec<Ipv4> = (0..n)
        .map(|i| {
            let (s, p) = faked(i);
            Ipv4::tcp(s, p, NODE_A.octets(), TCP_NP, TCP_SYN, &[])
        })
        .collect();
    let bytes: usize = packets.iter().map(|p| p.bytes().len() + 14).sum();
    let t0 = Instant::now();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
    let sent_in = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let tcp = outside_count(&lab.a, "tcp");
    let first = connects(&outside, NODE_A, TCP_NP, 5);
    let udp_ok = ask_udp(&outside, NODE_A, UDP_NP).is_ok();
    let pods_ok = connects(&lab.client.netns, VIP, 80, 5);
    eprintln!(
        "burst {n} SYNs ({bytes} bytes) in {sent_in:?}; outside tcp {tcp:?}; outside TCP {first}/5, UDP {udp_ok}, pods {pods_ok}/5"
    );
    let mut locked_for = None;
    if first < 5 {
        while t0.elapsed() < Duration::from_secs(100) {
            std::thread::sleep(Duration::from_secs(3));
            if connects(&outside, NODE_A, TCP_NP, 1) == 1 {
                locked_for = Some(t0.elapsed());
                break;
            }
        }
        eprintln!(
            "outside TCP clients locked out for {:?} (None: still at {:?}); outside tcp now {:?}",
            locked_for,
            t0.elapsed(),
            outside_count(&lab.a, "tcp")
        );
    }
    assert_eq!(
        first, 5,
        "one burst of {n} forged SYNs ({bytes} bytes) locked outside TCP clients out for {locked_for:?}"
    );
    // A sustained flood, while the client connects.
    let more: Vec<Ipv4> = (n..6 * n)
        .map(|i| {
            let (s, p) = faked(i);
            Ipv4::tcp(s, p, NODE_A.octets(), TCP_NP, TCP_SYN, &[])
        })
        .collect();
    let frames = frames_from(&attacker, &lab.a, more);
    let given_up_before = lab.a.drop_count("conntrack_early_drop");
    let (during, flood_took) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let t = Instant::now();
            send_raw_frames(&attacker, "eth0", frames).unwrap();
            t.elapsed()
        });
        let mut served = 0;
        let mut tried = 0;
        while !flood.is_finished() || tried < 5 {
            tried += 1;
            served += connects(&outside, NODE_A, TCP_NP, 1);
        }
        (served * 100 / tried, flood.join().unwrap())
    });
    let given_up = lab.a.drop_count("conntrack_early_drop") - given_up_before;
    eprintln!(
        "sustained: {} more SYNs in {flood_took:?}, {given_up} unanswered connections given up for newer \
         ones; the outside client connected {during}% of its tries meanwhile; outside tcp {:?}",
        5 * n,
        outside_count(&lab.a, "tcp")
    );
    assert_eq!(during, 100, "an outside client refused during a SYN flood");
    assert!(given_up as usize >= 4 * n, "the flood's SYNs took unanswered ones' places: {given_up}");
}

/// A hostile pod leaves `conntrack_max_per_client` unanswered Service
/// connections (to a backend that never answers) and is deleted; its
/// address goes to the next pod (host-local hands addresses out in turn:
/// here its rotation is forced). The new pod should not inherit the old
/// one's count: its Service connections should be served at once.
#[test]
fn a_new_pod_on_a_deleted_pods_address_inherits_no_client_limit() {
    require_root!();
    let mut lab = lab("native");
    let a2 = lab.backends[0].ip;
    let config = format!(
        "conntrack_max_per_client = 32\n{}\n[[services]]\nname = \"dead\"\ncluster_ip = \"{DEAD_VIP}\"\n\
         backends = [\"10.244.2.250\"]\n[[services.ports]]\nport = 80\ntarget_port = 8080\n",
        np_service(&[a2], "Cluster")
    );
    lab.a.set_extra_config(&config);
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[a2]);
    let hostile = lab.a.add_pod("x1");
    assert_eq!(connects(&hostile.netns, VIP, 80, 2), 2, "control");
    // 40 unanswered connections (connect times out at once, the entries stay).
    in_netns(&hostile.netns.path(), || {
        for _ in 0..40 {
            let _ = TcpStream::connect_timeout(&(DEAD_VIP, 80).into(), Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
    let held = connects(&hostile.netns, VIP, 80, 3);
    eprintln!("hostile pod {} after 40 unanswered: served {held}/3 (limit 32)", hostile.ip);
    assert_eq!(held, 0, "test setup: the hostile pod is at its limit");
    let del = lab.a.del_pod(&hostile);
    assert!(del.success, "{}", del.raw_stdout);
    // host-local's rotation comes round to this address again.
    let prev = Ipv4Addr::from(u32::from(hostile.ip) - 1);
    let dir = lab.a.work_dir.join("ipam/datapath-test");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("ipam files {files:?}");
    for f in files.iter().filter(|f| f.starts_with("last_reserved_ip")) {
        std::fs::write(dir.join(f), prev.to_string()).unwrap();
    }
    let t0 = Instant::now();
    let next = lab.a.add_pod("x2");
    eprintln!("new pod got {} (deleted pod had {})", next.ip, hostile.ip);
    assert_eq!(next.ip, hostile.ip, "test setup: address reused");
    let first = connects(&next.netns, VIP, 80, 5);
    let mut served_after = None;
    if first < 5 {
        while t0.elapsed() < Duration::from_secs(80) {
            std::thread::sleep(Duration::from_secs(2));
            if connects(&next.netns, VIP, 80, 1) == 1 {
                served_after = Some(t0.elapsed());
                break;
            }
        }
    }
    eprintln!(
        "new pod on the reused address: {first}/5 served at once; served again after {served_after:?}; \
         client_limit drops {}",
        lab.a.drop_count("conntrack_client_limit")
    );
    assert_eq!(
        first, 5,
        "a new pod inherited the deleted pod's unanswered connections (refused for {served_after:?})"
    );
}

// ---------------------------------------------------------------------------
// 2. /metrics
// ---------------------------------------------------------------------------

/// [`promtool_check`] as (passed, what it said).
fn promtool_result(body: &str) -> (bool, String) {
    match promtool_check(body) {
        Ok(()) => (true, String::new()),
        Err(said) => (false, said),
    }
}

/// OpenMetrics 1.0 rules checked by hand: problems found.
fn openmetrics_problems(body: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !body.ends_with("# EOF\n") && !body.ends_with("# EOF") {
        problems.push("does not end with # EOF".into());
    }
    let lines: Vec<&str> = body.lines().collect();
    let mut types: std::collections::HashMap<String, String> = Default::default();
    let mut order: Vec<String> = Vec::new();
    let mut samples = std::collections::HashSet::new();
    let mut current: Option<String> = None;
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            problems.push(format!("line {}: empty line", i + 1));
            continue;
        }
        if *line == "# EOF" {
            if i + 1 != lines.len() {
                problems.push(format!("line {}: # EOF not last", i + 1));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let kind = w.next().unwrap_or("");
            let name = w.next().unwrap_or("").to_owned();
            match kind {
                "TYPE" => {
                    let t = w.next().unwrap_or("").to_owned();
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "stateset",
                        "info",
                        "summary",
                        "unknown",
                    ]
                    .contains(&t.as_str())
                    {
                        problems.push(format!("line {}: type {t}", i + 1));
                    }
                    if t == "counter" && name.ends_with("_total") {
                        problems.push(format!("line {}: counter family {name} ends in _total", i + 1));
                    }
                    if types.insert(name.clone(), t).is_some() {
                        problems.push(format!("line {}: family {name} TYPE twice", i + 1));
                    }
                    if order.contains(&name) && current.as_deref() != Some(&name) {
                        problems.push(format!("line {}: family {name} interleaved", i + 1));
                    }
                    order.push(name.clone());
                    current = Some(name);
                }
                "HELP" | "UNIT" => {
                    if current.as_deref() != Some(&name) && order.contains(&name) {
                        problems.push(format!("line {}: {kind} for {name} out of place", i + 1));
                    }
                }
                _ => problems.push(format!("line {}: comment {line:?} not allowed", i + 1)),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let family = current.clone().unwrap_or_default();
        let t = types.get(&family).cloned().unwrap_or_default();
        let ok = match t.as_str() {
            "counter" => name == format!("{family}_total") || name == format!("{family}_created"),
            "info" => name == format!("{family}_info"),
            "gauge" | "unknown" => name == family,
            "histogram" => {
                ["_bucket", "_count", "_sum", "_created"].iter().any(|s| name == format!("{family}{s}"))
            }
            _ => true,
        };
        if !ok {
            problems.push(format!("line {}: sample {name} not of family {family} ({t})", i + 1));
        }
        let key = line.rsplit_once(' ').map(|(k, _)| k.to_owned()).unwrap_or_default();
        if !samples.insert(key.clone()) {
            problems.push(format!("line {}: duplicate sample {key}", i + 1));
        }
        let value = line.rsplit(' ').next().unwrap_or("");
        if value.parse::<f64>().is_err() && !["NaN", "+Inf", "-Inf"].contains(&value) {
            problems.push(format!("line {}: value {value:?}", i + 1));
        }
        if line.contains("{}") {
            problems.push(format!("line {}: empty braces", i + 1));
        }
    }
    problems
}

fn scrape(node: &Node, accept: Option<&str>) -> (u16, String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| vec![("Accept", a)]).unwrap_or_default();
    http_get_local_with(&node.netns, 9976, "/metrics", &headers).unwrap()
}

fn content_type(head: &str) -> String {
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .map(|l| l[13..].trim().to_owned())
        .unwrap_or_default()
}

/// Check one scrape: the Content-Type names the format the body is in, and
/// that format's rules hold. Returns problems.
fn check_scrape(what: &str, status: u16, head: &str, body: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if status != 200 {
        problems.push(format!("{what}: status {status}"));
        return problems;
    }
    let ct = content_type(head).to_ascii_lowercase();
    let om = ct.starts_with("application/openmetrics-text");
    let has_eof = body.contains("# EOF");
    if om != has_eof {
        problems.push(format!("{what}: content-type {ct:?} but # EOF present: {has_eof}"));
    }
    if om {
        problems.extend(openmetrics_problems(body).into_iter().map(|p| format!("{what}: {p}")));
    } else {
        if !ct.starts_with("text/plain") || !ct.contains("version=0.0.4") {
            problems.push(format!("{what}: text content-type {ct:?}"));
        }
        let (ok, out) = promtool_result(body);
        if !ok {
            problems.push(format!("{what}: promtool: {out}"));
        }
    }
    problems
}

/// Generate drops of many kinds in several directions on node A of `lab`.
fn provoke_drops(lab: &Lab, attacker: &Netns) {
    let node = NODE_A.octets();
    let mut packets = Vec::new();
    for i in 0..50usize {
        let (s, p) = faked(i);
        packets.push(Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]));
        let mut short = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]);
        short.payload.truncate(10);
        packets.push(short);
        let mut ttl = Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]);
        ttl.ttl = 1;
        packets.push(ttl);
        packets.push(Ipv4::tcp([10, 244, 1, 99], p, lab.backends[0].ip.octets(), 8080, TCP_SYN, &[]));
        packets.push(Ipv4::tcp([127, 0, 0, 1], p, lab.backends[0].ip.octets(), 8080, TCP_SYN, &[]));
        packets.push(Ipv4::udp(s, p, [10, 244, 1, 200], 53, b"x", true));
    }
    send_raw_frames(attacker, "eth0", frames_from(attacker, &lab.a, packets)).unwrap();
    // From a pod: spoofed sources, to a Service without backends.
    let _ =
        datapath_tests::lab::ping_from_spoofed_address(&lab.client, "10.244.1.77/24", lab.backends[1].ip, 1);
    let _ = connects(&lab.client.netns, DEAD_VIP, 80, 1);
    let _ = connects(&lab.client.netns, VIP, 81, 1);
}

/// What `/metrics` serves in every state, in both formats, and under odd
/// Accept headers: each answer's Content-Type matches its body, and the
/// body passes `promtool check metrics` (text) or the OpenMetrics rules.
#[test]
fn metrics_parse_in_both_formats_in_every_state() {
    require_root!();
    let mut lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let attacker = outside_host("rt30-m", ATTACKER);
    let accepts: Vec<(&str, Option<String>)> = vec![
        ("none", None),
        ("prometheus 3", Some("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2".into())),
        ("prometheus 2", Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1".into())),
        ("om upper", Some("APPLICATION/OPENMETRICS-TEXT; VERSION=1.0.0".into())),
        ("om q=0", Some("application/openmetrics-text;version=1.0.0;q=0, text/plain;q=1".into())),
        ("om q=0 only", Some("application/openmetrics-text;q=0".into())),
        ("text preferred", Some("text/plain;version=0.0.4;q=1.0,application/openmetrics-text;q=0.1".into())),
        ("om version 2", Some("application/openmetrics-text;version=2.0.0".into())),
        ("om bad version", Some("application/openmetrics-text;version=".into())),
        ("malformed", Some(";;;,,,=q=;".into())),
        ("star", Some("*/*".into())),
        ("json", Some("application/json".into())),
        ("q garbage", Some("application/openmetrics-text;q=abc".into())),
        ("q >1", Some("text/plain;q=5,application/openmetrics-text;q=0.9".into())),
        ("non-ascii", Some("application/openmetrics-text;version=1.0.0;x=\u{e9}".into())),
        ("huge", Some(format!("application/openmetrics-text;version=1.0.0,{}", "text/html;q=0.1,".repeat(4000)))),
    ];
    let mut problems = Vec::new();
    let run = |lab: &Lab, state: &str, problems: &mut Vec<String>| {
        for (name, accept) in &accepts {
            match http_get_local_with(
                &lab.a.netns,
                9976,
                "/metrics",
                &accept.as_deref().map(|a| vec![("Accept", a)]).unwrap_or_default(),
            ) {
                Ok((status, head, body)) => {
                    let ct = content_type(&head);
                    eprintln!("{state} / {name}: {status} {ct:?} {} bytes", body.len());
                    if name == &"huge" && status != 200 {
                        continue; // refusing a huge header is fine
                    }
                    problems.extend(check_scrape(&format!("{state} / {name}"), status, &head, &body));
                }
                Err(e) => problems.push(format!("{state} / {name}: {e}")),
            }
        }
    };
    run(&lab, "fresh", &mut problems);
    provoke_drops(&lab, &attacker);
    std::thread::sleep(Duration::from_millis(500));
    run(&lab, "after drops", &mut problems);
    // A config reload (services changed), and a bad config.
    let services = np_service(&[lab.backends[0].ip, lab.backends[1].ip], "Cluster");
    lab.set_services(&format!("serve_outside_clients = true\nconntrack_max_entries = 2048\n{services}"));
    std::thread::sleep(Duration::from_secs(2));
    run(&lab, "after reload", &mut problems);
    std::fs::write(lab.a.config_path(), "this is = = not toml").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    run(&lab, "after a bad config", &mut problems);
    let (_, _, text) = scrape(&lab.a, None);
    let (_, _, om) = scrape(&lab.a, Some("application/openmetrics-text;version=1.0.0"));
    let text_fams: std::collections::BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    eprintln!("text families: {}", text_fams.len());
    for l in om.lines().filter(|l| l.starts_with("# TYPE")) {
        eprintln!("  om {l}");
    }
    for p in &problems {
        eprintln!("PROBLEM {p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

/// Concurrent scrapes (16 threads x 20, both formats, some never reading
/// the answer, some closing half way through the request): every answer
/// that comes is whole, and the agent still answers afterwards.
#[test]
fn concurrent_and_abandoned_scrapes_leave_metrics_whole() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", NODE_A);
    node.start_agent();
    let _pod = node.add_pod("m1");
    let path = node.netns.path();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..16)
        .map(|t| {
            in_netns(&path, move || {
                let mut bad = Vec::new();
                for i in 0..20 {
                    let mut c = match TcpStream::connect(("127.0.0.1", 9976)) {
                        Ok(c) => c,
                        Err(e) => {
                            bad.push(format!("connect {e}"));
                            continue;
                        }
                    };
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let accept = if (t + i) % 2 == 0 {
                        "application/openmetrics-text;version=1.0.0"
                    } else {
                        "text/plain"
                    };
                    match (t + i) % 5 {
                        0 => {
                            // Half a request, then gone.
                            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nAcc");
                            continue;
                        }
                        1 => {
                            // Whole request, answer never read.
                            let _ = write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n");
                            continue;
                        }
                        _ => {}
                    }
                    write!(
                        c,
                        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
                    )
                    .unwrap();
                    let mut answer = String::new();
                    if let Err(e) = c.read_to_string(&mut answer) {
                        bad.push(format!("read {e}"));
                        continue;
                    }
                    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
                    let om = head.to_ascii_lowercase().contains("openmetrics");
                    let len = head
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("content-length:"))
                        .and_then(|l| l[15..].trim().parse::<usize>().ok());
                    if !head.starts_with("HTTP/1.1 200") {
                        bad.push(format!("status {}", head.lines().next().unwrap_or("")));
                    } else if om && !body.ends_with("# EOF\n") {
                        bad.push("openmetrics body cut short".into());
                    } else if len.is_some_and(|n| n != body.len()) {
                        bad.push(format!("length {len:?} vs {}", body.len()));
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<String> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let took = t0.elapsed();
    let after = http_get_local_with(&node.netns, 9976, "/metrics", &[]);
    let healthy = http_get_local_with(&node.netns, 9976, "/healthz", &[]).map(|r| r.0);
    eprintln!(
        "320 scrapes in {took:?}: {} bad {:?}; afterwards /metrics {:?}, /healthz {healthy:?}",
        bad.len(),
        &bad[..bad.len().min(5)],
        after.as_ref().map(|r| r.0)
    );
    assert!(bad.is_empty());
    assert_eq!(after.unwrap().0, 200);
    let (ok, out) = promtool_result(&after_body(&node));
    assert!(ok, "{out}");
}

fn after_body(node: &Node) -> String {
    http_get_local_with(&node.netns, 9976, "/metrics", &[]).unwrap().2
}

/// Slow-loris: many connections that send half a request and hold: do
/// scrapes still get answers?
#[test]
fn held_half_requests_do_not_stop_scrapes() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", NODE_A);
    node.start_agent();
    let path = node.netns.path();
    let held = in_netns(&path, || {
        let mut v = Vec::new();
        for _ in 0..300 {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", 9976)) {
                let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text");
                v.push(c);
            }
        }
        v
    })
    .join()
    .unwrap();
    let t0 = Instant::now();
    let r = http_get_local_with(&node.netns, 9976, "/metrics", &[]);
    eprintln!(
        "{} held half requests; a scrape: {:?} in {:?}",
        held.len(),
        r.as_ref().map(|r| r.0),
        t0.elapsed()
    );
    drop(held);
    assert_eq!(r.unwrap().0, 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// 3. --version and the CNI plugin's spec behaviour
// ---------------------------------------------------------------------------

fn run_cni(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin_dir().join("datapath-cni"));
    cmd.args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whatever args and env a runtime passes, the plugin answers VERSION with
/// its JSON (exit 0), any failure with one CNI error JSON on stdout (exit
/// nonzero), and never prints anything but that JSON on stdout.
#[test]
fn cni_spec_behaviour_holds_whatever_the_runtime_passes() {
    let conf = br#"{"cniVersion":"1.0.0","name":"x","type":"datapath-cni"}"#;
    let long = format!("K8S_POD_NAME={}", "A".repeat(100_000));
    let cases: Vec<CniCase> = vec![
        ("VERSION", vec![], vec![("CNI_COMMAND", "VERSION")], conf.to_vec(), "version"),
        ("VERSION empty stdin", vec![], vec![("CNI_COMMAND", "VERSION")], vec![], "version"),
        (
            "VERSION garbage stdin",
            vec![],
            vec![("CNI_COMMAND", "VERSION")],
            b"\xff\xfe not json".to_vec(),
            "version",
        ),
        (
            "VERSION cniVersion 0.1.0",
            vec![],
            vec![("CNI_COMMAND", "VERSION")],
            br#"{"cniVersion":"0.1.0"}"#.to_vec(),
            "version",
        ),
        (
            "VERSION with --version arg",
            vec!["--version"],
            vec![("CNI_COMMAND", "VERSION")],
            conf.to_vec(),
            "version",
        ),
        (
            "VERSION with odd args",
            vec!["-v", "foo"],
            vec![("CNI_COMMAND", "VERSION")],
            conf.to_vec(),
            "version",
        ),
        (
            "VERSION with every var",
            vec![],
            vec![
                ("CNI_COMMAND", "VERSION"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", "/nonexistent"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "a=b;;==;c"),
                ("CNI_PATH", ""),
            ],
            conf.to_vec(),
            "version",
        ),
        (
            "VERSION huge CNI_ARGS",
            vec![],
            vec![("CNI_COMMAND", "VERSION"), ("CNI_ARGS", &long)],
            conf.to_vec(),
            "version",
        ),
        ("lowercase version", vec![], vec![("CNI_COMMAND", "version")], conf.to_vec(), "error"),
        ("unknown command", vec![], vec![("CNI_COMMAND", "FROB")], conf.to_vec(), "error"),
        ("no command", vec![], vec![], conf.to_vec(), "any"),
        (
            "ADD no netns",
            vec![],
            vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")],
            conf.to_vec(),
            "error",
        ),
        (
            "ADD with --version arg",
            vec!["--version"],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/nonexistent"),
            ],
            conf.to_vec(),
            "error",
        ),
        (
            "DEL bad json",
            vec![],
            vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")],
            b"{".to_vec(),
            "error",
        ),
        (
            "CHECK unsupported version",
            vec![],
            vec![
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            br#"{"cniVersion":"9.9.9","name":"x","type":"datapath-cni"}"#.to_vec(),
            "error",
        ),
        ("GC", vec![], vec![("CNI_COMMAND", "GC")], conf.to_vec(), "any"),
        ("STATUS", vec![], vec![("CNI_COMMAND", "STATUS")], conf.to_vec(), "any"),
        (
            "ADD huge CNI_ARGS",
            vec![],
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/nonexistent"),
                ("CNI_ARGS", &long),
            ],
            conf.to_vec(),
            "error",
        ),
    ];
    let mut problems = Vec::new();
    for (name, args, env, stdin, want) in &cases {
        let (code, stdout, stderr) = run_cni(args, env, stdin);
        let json: Option<serde_json::Value> = serde_json::from_str(stdout.trim()).ok();
        eprintln!(
            "{name}: exit {code:?}, stdout {:?}, stderr {:?}",
            &stdout[..stdout.len().min(200)],
            &stderr[..stderr.len().min(160)]
        );
        let stdout_json = json.is_some() || stdout.is_empty();
        if !stdout_json {
            problems.push(format!("{name}: stdout not JSON: {stdout:?}"));
        }
        match *want {
            "version" => {
                let ok = code == Some(0)
                    && json
                        .as_ref()
                        .is_some_and(|j| j["supportedVersions"].is_array() && j["cniVersion"].is_string());
                if !ok {
                    problems.push(format!("{name}: VERSION answer wrong: exit {code:?} {stdout:?}"));
                }
            }
            "error" => {
                let ok = code.is_some_and(|c| c != 0)
                    && json.as_ref().is_some_and(|j| j["code"].is_u64() && j["msg"].is_string());
                if !ok {
                    problems.push(format!("{name}: error answer wrong: exit {code:?} {stdout:?}"));
                }
                if !stderr.contains("datapath-cni ") || !stderr.contains("commit") {
                    problems.push(format!("{name}: failing call's stderr names no build: {stderr:?}"));
                }
            }
            _ => {
                if code != Some(0) && !json.as_ref().is_some_and(|j| j["code"].is_u64()) {
                    problems.push(format!("{name}: failed without an error JSON: exit {code:?} {stdout:?}"));
                }
            }
        }
    }
    for (bin, env) in
        [("datapath-cni", vec![]), ("datapath-agent", vec![]), ("datapath-cni", vec![("CNI_COMMAND", "ADD")])]
    {
        let mut cmd = Command::new(bin_dir().join(bin));
        cmd.arg("--version").env_clear();
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "{bin} --version {env:?}: exit {:?} {said:?} stderr {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        if env.is_empty() && (!out.status.success() || !said.contains("commit") || said.lines().count() != 1)
        {
            problems.push(format!("{bin} --version: {said:?}"));
        }
        if !env.is_empty() && serde_json::from_str::<serde_json::Value>(said.trim()).is_err() {
            problems.push(format!("{bin} --version under CNI_COMMAND=ADD: stdout not JSON: {said:?}"));
        }
    }
    for p in &problems {
        eprintln!("PROBLEM {p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

/// Content negotiation by q-value (RFC 9110 12.5.1, as client_golang's
/// goautoneg does): a scraper that prefers the text format (q=1) over
/// OpenMetrics (q=0.1) gets text; one that asks only for an OpenMetrics
/// version the agent does not write is not told it got that version.
#[test]
fn metrics_accept_q_values_are_honoured() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", NODE_A);
    node.start_agent();
    let mut problems = Vec::new();
    for (accept, want_om) in [
        ("text/plain;version=0.0.4;q=1.0,application/openmetrics-text;version=1.0.0;q=0.1", false),
        ("application/openmetrics-text;version=1.0.0;q=0.2,text/plain;version=0.0.4;q=0.9", false),
        ("text/plain;version=0.0.4;q=0.3,application/openmetrics-text;version=1.0.0;q=0.6", true),
    ] {
        let (status, head, body) = scrape(&node, Some(accept));
        let ct = content_type(&head);
        let om = ct.starts_with("application/openmetrics-text");
        eprintln!("Accept {accept:?}: {status} {ct:?} ({} bytes)", body.len());
        if om != want_om {
            problems.push(format!("Accept {accept:?} got {ct:?}"));
        }
    }
    let (_, head, _) = scrape(&node, Some("application/openmetrics-text;version=2.0.0"));
    eprintln!("Accept only OpenMetrics 2.0.0: {:?}", content_type(&head));
    assert!(problems.is_empty(), "{problems:#?}");
}
