//! Red team: the four Service features (ICMP error translation, TCP state
//! timers, the per-client limit of unanswered connections, socket load
//! balancing for the node's own sockets) attacked from the outside, as a
//! hostile pod, a hostile host on the nodes' segment or a careless operator
//! would. Each asserts what the docs or the plain kernel / kube-proxy would
//! do. The red team's findings 1 (ACK and FIN floods past the per-client
//! limit), 3 (a reused tuple left closing) and 7 (SYN+FIN kept half-closed)
//! are fixed and their tests pass; the four it found that are not fixed yet
//! are ignored, each naming its gap (docs/services.md lists them): run them
//! with `--ignored`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use datapath_agent::bpf::PinLayout;
use datapath_common::map_names;
use datapath_tests::{
    in_both_modes,
    lab::{Netns, Node, Pod, in_netns, mac_of, send_raw_frames_in},
    packets::{ETH_P_IP, Ipv4, TCP_ACK, TCP_SYN, ethernet},
    require_root, sh,
};

use super::{
    redteam_policy::{TCP_RST, outside_host, send_ip},
    services::{connect, lab, parse_answer, service, wait_programmed},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLOSED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const VOID_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const TWIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

// ---------------------------------------------------------------------------
// Lab (as services.rs builds it)
// ---------------------------------------------------------------------------

/// A Service with one TCP port 80 -> `tcp_target` and UDP 53 -> `udp_target`.
fn service_ports(
    name: &str,
    vip: Ipv4Addr,
    backends: &[Ipv4Addr],
    tcp_target: u16,
    udp_target: u16,
) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"{name}\"\ncluster_ip = \"{vip}\"\nbackends = [{}]\n\
         [[services.ports]]\nport = 80\ntarget_port = {tcp_target}\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = {udp_target}\n",
        list.join(", ")
    )
}

/// Stop `node`'s agent, write `config`, drop the conntrack pin (so a new
/// size takes effect), start it again.
fn restart_with(node: &mut Node, config: &str) {
    node.stop_agent();
    node.set_extra_config(config);
    let _ = std::fs::remove_file(PinLayout::new(&node.bpffs_dir).map(map_names::CONNTRACK));
    node.start_agent();
}

fn ask(conn: &mut TcpStream) -> (Ipv4Addr, Ipv4Addr) {
    try_ask(conn).expect("answer")
}

fn try_ask(conn: &mut TcpStream) -> std::io::Result<(Ipv4Addr, Ipv4Addr)> {
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    writeln!(conn, "who")?;
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("connection closed"));
    }
    Ok(parse_answer(&line))
}

fn conntrack_rows(node: &Node) -> Vec<serde_json::Value> {
    node.inspect("conntrack").as_array().unwrap().clone()
}

fn rows_of_client(node: &Node, client: Ipv4Addr) -> usize {
    conntrack_rows(node).iter().filter(|c| c["client_ip"] == client.to_string()).count()
}

fn state_of_port(node: &Node, port: u16) -> Option<serde_json::Value> {
    conntrack_rows(node)
        .into_iter()
        .find(|c| c["client_port"] == port && c["protocol"] == "TCP")
        .map(|c| c["state"].clone())
}

/// Raw TCP segments from `pod` (through its veth, with its own address).
fn raw_tcp_frames(
    node: &Node,
    pod: &Pod,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
    ports: std::ops::Range<u16>,
) -> Vec<Vec<u8>> {
    let (pod_mac, host_mac) = (mac_of(&pod.netns, "eth0"), mac_of(&node.netns, &pod.host_veth));
    ports
        .map(|sport| {
            let seg = Ipv4::tcp(pod.ip.octets(), sport, dst.octets(), dport, flags, &[]);
            ethernet(host_mac, pod_mac, ETH_P_IP, &seg.bytes())
        })
        .collect()
}

/// `count` connections from `client` to WEB_VIP; returns how many were refused.
fn victim_connects(client: &Pod, count: usize) -> usize {
    let mut refused = 0;
    for _ in 0..count {
        match connect(client, WEB_VIP) {
            Ok(mut conn) => {
                let _ = try_ask(&mut conn);
            }
            Err(e) => {
                eprintln!("  victim refused: {e}");
                refused += 1;
            }
        }
    }
    refused
}

// ---------------------------------------------------------------------------
// 3. Per-client limit of unanswered connections
// ---------------------------------------------------------------------------

/// A pod flooding SYNs at a Service whose backend port is closed: the
/// backend answers each SYN with an RST. Those connections were never
/// "answered and acknowledged both ways", so the pod must be held to
/// conntrack_max_per_client (256 here) and other pods must not be refused
/// (docs/services.md, "Unanswered connections per client"; drop reason doc:
/// "a dead backend in a tight retry loop").
#[test]
fn a_syn_flood_at_a_closed_backend_port_is_held_to_the_client_limit() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooder = lab.a.add_pod("a3");
    let closed = lab.backends[1].ip;
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_entries = 2048\n{}{}",
            service("web", WEB_VIP, &all),
            service_ports("closed", CLOSED_VIP, &[closed], 9999, 9999)
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, CLOSED_VIP, &[closed]);
    assert_eq!(lab.a.inspect("config")["conntrack_max_per_client"], 256);

    let syns = raw_tcp_frames(&lab.a, &flooder, CLOSED_VIP, 80, TCP_SYN, 10_000..13_000);
    send_raw_frames_in(&flooder.netns.path(), "eth0", syns).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let held = rows_of_client(&lab.a, flooder.ip);
    let full_before = lab.a.drop_count("conntrack_full");
    let refused = victim_connects(&lab.client, 30);
    let full = lab.a.drop_count("conntrack_full");
    eprintln!(
        "flooder holds {held} connections; conntrack_full {full_before} -> {full}; client_limit {}; victim refused {refused}/30",
        lab.a.drop_count("conntrack_client_limit")
    );
    assert!(held <= 270, "the flooder (RST-answered SYNs) holds {held} connections, over its limit of 256");
    assert_eq!(refused, 0, "another pod's connections refused while the flooder's entries stay");
}

/// A pod flooding SYNs at a live Service while dropping its own RSTs (so
/// the SYN-ACKs are never acknowledged): "a pod flooding SYNs it never
/// completes (or whose answers it drops) holds at most that many entries".
#[test]
fn a_syn_flood_whose_syn_acks_the_flooder_drops_is_held_to_the_client_limit() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooder = lab.a.add_pod("a3");
    sh(&[
        "ip",
        "netns",
        "exec",
        &flooder.netns.name,
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "--tcp-flags",
        "RST",
        "RST",
        "-j",
        "DROP",
    ]);
    // The flood goes to a Service of its own (same backends), so that the
    // victim's Service is not slowed by full accept queues.
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_entries = 2048\n{}{}",
            service("web", WEB_VIP, &all),
            service("twin", TWIN_VIP, &all[1..])
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, TWIN_VIP, &all[1..]);

    let syns = raw_tcp_frames(&lab.a, &flooder, TWIN_VIP, 80, TCP_SYN, 10_000..13_000);
    send_raw_frames_in(&flooder.netns.path(), "eth0", syns).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let held = rows_of_client(&lab.a, flooder.ip);
    let refused = victim_connects(&lab.client, 30);
    eprintln!(
        "flooder holds {held}; conntrack_full {}; client_limit {}; victim refused {refused}/30",
        lab.a.drop_count("conntrack_full"),
        lab.a.drop_count("conntrack_client_limit")
    );
    assert!(held <= 270, "the flooder (SYN-ACKs never acknowledged) holds {held} connections, over 256");
    assert_eq!(refused, 0, "another pod's connections refused");
}

/// Bare ACKs to a Service on fresh ports (no SYN): the backend answers each
/// with an RST. Either they open nothing or they are held to the limit.
#[test]
fn an_ack_flood_is_held_to_the_client_limit() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooder = lab.a.add_pod("a3");
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_entries = 2048\n{}{}",
            service("web", WEB_VIP, &all),
            service("twin", TWIN_VIP, &all[1..])
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, TWIN_VIP, &all[1..]);
    let acks = raw_tcp_frames(&lab.a, &flooder, TWIN_VIP, 80, TCP_ACK, 10_000..13_000);
    send_raw_frames_in(&flooder.netns.path(), "eth0", acks).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let held = rows_of_client(&lab.a, flooder.ip);
    let refused = victim_connects(&lab.client, 30);
    eprintln!(
        "ACK flood: flooder holds {held}; conntrack_full {}; victim refused {refused}",
        lab.a.drop_count("conntrack_full")
    );
    let mut states = std::collections::BTreeMap::new();
    for row in conntrack_rows(&lab.a) {
        *states.entry(format!("{} {}", row["state"], row["idle_seconds"])).or_insert(0) += 1;
    }
    eprintln!("states of the table: {states:?}");
    // How long the victim stays refused.
    let started = Instant::now();
    while victim_connects(&lab.client, 1) > 0 && started.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("victim refused for {:?} after the flood", started.elapsed());
    assert!(held <= 270, "bare ACKs hold {held} connections");
    assert_eq!(refused, 0);
}

/// Several pods of one node flooding together: each is held to its own
/// limit, so five pods x 256 fill a 1024-connection table and a sixth pod
/// is refused. (netfilter evicts unassured entries when full: early_drop.)
#[test]
#[ignore = "known gap: no early drop of unanswered entries when full (docs/services.md)"]
fn several_flooding_pods_together_fill_the_table() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooders: Vec<Pod> = (0..5).map(|i| lab.a.add_pod(&format!("f{i}"))).collect();
    let nobody = Ipv4Addr::new(10, 244, 2, 250);
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_entries = 2048\n{}{}",
            service("web", WEB_VIP, &all),
            service("void", VOID_VIP, &[nobody])
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, VOID_VIP, &[nobody]);
    for f in &flooders {
        let syns = raw_tcp_frames(&lab.a, f, VOID_VIP, 80, TCP_SYN, 10_000..10_400);
        send_raw_frames_in(&f.netns.path(), "eth0", syns).unwrap();
    }
    let refused = victim_connects(&lab.client, 20);
    eprintln!(
        "5 flooders: conntrack_full {}, client_limit {}, entries {}",
        lab.a.drop_count("conntrack_full"),
        lab.a.drop_count("conntrack_client_limit"),
        conntrack_rows(&lab.a).len()
    );
    assert_eq!(refused, 0, "a pod refused because five others each used their allowance");
}

/// A legitimate busy client: many short connections one after the other
/// with a small limit (16): none refused, they were all answered.
#[test]
fn a_busy_client_with_many_short_connections_is_not_limited() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    restart_with(&mut lab.a, &format!("conntrack_max_per_client = 16\n{}", service("web", WEB_VIP, &all)));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let path = lab.client.netns.path();
    let (refused, udp_refused) = in_netns(&path, || {
        let mut refused = 0;
        for _ in 0..400 {
            match TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(3)) {
                Ok(mut c) => {
                    let _ = try_ask(&mut c);
                }
                Err(_) => refused += 1,
            }
        }
        let mut udp_refused = 0;
        for _ in 0..400 {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(b"who\n", (WEB_VIP, 53)).unwrap();
            if s.recv_from(&mut [0u8; 512]).is_err() {
                udp_refused += 1;
            }
        }
        (refused, udp_refused)
    })
    .join()
    .unwrap();
    eprintln!(
        "busy client: TCP refused {refused}/400, UDP unanswered {udp_refused}/400; client_limit {}",
        lab.a.drop_count("conntrack_client_limit")
    );
    assert_eq!((refused, udp_refused), (0, 0));
    assert_eq!(lab.a.drop_count("conntrack_client_limit"), 0);
}

/// A pod that is also a backend, reaching itself (hairpin) with more
/// unanswered connections than its limit, must not use up another pod's
/// allowance: the hairpin address 169.254.42.1 must not be the counted
/// client.
#[test]
fn hairpin_clients_do_not_share_one_limit() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let hostile = lab.a.add_pod("a3");
    let victim = (lab.backends[0].ip,);
    // Each pod is the only backend of its own Service; the hostile pod
    // drops inbound SYNs to 7777, so its hairpin SYNs are never answered.
    sh(&[
        "ip",
        "netns",
        "exec",
        &hostile.netns.name,
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "7777",
        "-j",
        "DROP",
    ]);
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_per_client = 16\n{}{}{}",
            service("web", WEB_VIP, &all),
            service_ports("hostile-self", VOID_VIP, &[hostile.ip], 7777, 7777),
            service("victim-self", SELF_VIP, &[victim.0])
        ),
    );
    wait_programmed(&lab.a, VOID_VIP, &[hostile.ip]);
    wait_programmed(&lab.a, SELF_VIP, &[victim.0]);
    // 40 hairpin connections of the hostile pod, never answered.
    let path = hostile.netns.path();
    let handles: Vec<_> = (0..40)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                in_netns(&path, || TcpStream::connect_timeout(&(VOID_VIP, 80).into(), Duration::from_secs(4)))
                    .join()
                    .unwrap()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    // The victim backend reaches itself through its Service.
    let victim_path = lab.backends[0].netns.path();
    let result = in_netns(&victim_path, || {
        let mut refused = 0;
        for _ in 0..5 {
            match TcpStream::connect_timeout(&(SELF_VIP, 80).into(), Duration::from_secs(3)) {
                Ok(mut c) => {
                    let _ = try_ask(&mut c);
                }
                Err(_) => refused += 1,
            }
        }
        refused
    })
    .join()
    .unwrap();
    for h in handles {
        let _ = h.join();
    }
    eprintln!(
        "hairpin: victim refused {result}/5, client_limit {}",
        lab.a.drop_count("conntrack_client_limit")
    );
    assert_eq!(result, 0, "a pod reaching itself refused because another pod's hairpin SYNs used the limit");
}

// ---------------------------------------------------------------------------
// 2. TCP state timers
// ---------------------------------------------------------------------------

/// A backend that accepts, answers one line and closes first (so the
/// client does not hold TIME_WAIT), on `port`; serves `count` connections.
fn closing_server(ns: &Netns, ip: Ipv4Addr, port: u16, count: usize) -> std::thread::JoinHandle<()> {
    let listener = in_netns(&ns.path(), move || TcpListener::bind((ip, port)).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for i in 0..count {
            let (conn, peer) = listener.accept().unwrap();
            let mut writer = conn.try_clone().unwrap();
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = writeln!(writer, "{ip} {}", peer.ip());
            if i + 1 < count {
                drop(writer);
                drop(reader);
            } else {
                // The last one stays open: answer each line.
                let _ = writer.flush();
                for line in reader.lines() {
                    if line.is_err() || writeln!(writer, "{ip} {}", peer.ip()).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// A connection that reuses the 4-tuple of one that just closed (FIN both
/// ways; the server closed first, so the client may bind the same port
/// again at once) is a new connection: netfilter starts a new entry on a
/// SYN in CLOSE/TIME_WAIT. It must not inherit the closing state and lose
/// its translation after conntrack_closing_seconds of quiet.
#[test]
fn a_connection_reusing_a_closed_tuple_is_not_left_closing() {
    require_root!();
    let mut lab = lab("native");
    let backend = lab.backends[1].ip;
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_closing_seconds = 2\n{}",
            service_ports("one", WEB_VIP, &[backend], 9090, UDP_PORT)
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &[backend]);
    // First connection: closes (server first), second one keeps running.
    let server_first = closing_server(&lab.backends[1].netns, backend, 9090, 2);
    let path = lab.client.netns.path();
    let port = in_netns(&path, || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into()).unwrap();
        s.connect(&SocketAddr::from((WEB_VIP, 80)).into()).unwrap();
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        let mut c: TcpStream = s.into();
        writeln!(c, "who").unwrap();
        let mut all = String::new();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.read_to_string(&mut all).unwrap();
        drop(c);
        port
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("first connection from port {port}: {:?}", state_of_port(&lab.a, port));
    // Same port again, at once.
    let mut again = in_netns(&path, move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).unwrap();
        s.connect_timeout(&SocketAddr::from((WEB_VIP, 80)).into(), Duration::from_secs(3)).unwrap();
        let c: TcpStream = s.into();
        c
    })
    .join()
    .unwrap();
    let first = try_ask(&mut again).expect("the new connection on the reused tuple answers");
    std::thread::sleep(Duration::from_millis(500));
    let state = state_of_port(&lab.a, port);
    eprintln!("reused tuple: state {state:?}");
    // Quiet for longer than the closing limit and a sweep.
    std::thread::sleep(Duration::from_secs(9));
    let after = state_of_port(&lab.a, port);
    let answer = try_ask(&mut again);
    eprintln!("after 9 s quiet: state {after:?}, answer {answer:?}");
    drop(again);
    let _ = server_first.join();
    assert_eq!(state, Some(serde_json::json!("established")), "a new handshake on a reused tuple");
    assert!(after.is_some(), "an established connection lost its translation after 9 s of quiet");
    assert_eq!(answer.expect("the connection still works").0, first.0);
}

/// A host on the nodes' segment (native mode) forges an RST from the
/// backend (a peer pod address, which the uplink accepts: it is routed
/// there) with a random sequence number. Linux's TCP ignores it (out of
/// window) and netfilter does not change state for an out-of-window RST;
/// the connection's translation must stay.
#[test]
fn a_forged_out_of_window_rst_does_not_close_a_service_connection() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    restart_with(
        &mut lab.a,
        &format!("conntrack_closing_seconds = 1\n{}", service("web", WEB_VIP, &all[1..])),
    );
    wait_programmed(&lab.a, WEB_VIP, &all[1..]);
    let attacker = outside_host("attacker", Ipv4Addr::new(10, 250, 0, 66));
    let mut conn = connect(&lab.client, WEB_VIP).unwrap();
    let (backend, _) = ask(&mut conn);
    let port = conn.local_addr().unwrap().port();
    assert_eq!(state_of_port(&lab.a, port), Some(serde_json::json!("established")));
    let rst = Ipv4::tcp(backend.octets(), TCP_PORT, lab.client.ip.octets(), port, TCP_RST, &[]).bytes();
    send_ip(&attacker.path(), vec![rst]);
    std::thread::sleep(Duration::from_millis(500));
    let state = state_of_port(&lab.a, port);
    eprintln!("after the forged RST: {state:?}");
    std::thread::sleep(Duration::from_secs(8));
    let after = state_of_port(&lab.a, port);
    let answer = try_ask(&mut conn);
    eprintln!("8 s later: {after:?}, answer {answer:?}");
    assert_eq!(
        state,
        Some(serde_json::json!("established")),
        "a forged out-of-window RST closed the connection"
    );
    assert!(after.is_some(), "the connection's translation was removed");
    assert_eq!(answer.expect("the connection still works").0, backend);
}

/// Idle established connections across an agent restart (and a quiet
/// period longer than the short timers while it is down and after).
#[test]
fn an_idle_established_connection_survives_an_agent_restart() {
    require_root!();
    let mut lab = lab("vxlan");
    let all = lab.backend_ips();
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_closing_seconds = 1\nconntrack_opening_seconds = 2\nconntrack_half_closed_seconds = 2\n{}",
            service("web", WEB_VIP, &all)
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    let mut conns: Vec<(TcpStream, Ipv4Addr)> = (0..6)
        .map(|_| {
            let mut c = connect(&lab.client, WEB_VIP).unwrap();
            let b = ask(&mut c).0;
            (c, b)
        })
        .collect();
    lab.a.stop_agent();
    std::thread::sleep(Duration::from_secs(4));
    lab.a.start_agent();
    std::thread::sleep(Duration::from_secs(8));
    for (c, b) in &mut conns {
        assert_eq!(try_ask(c).expect("idle connection after restart").0, *b);
    }
}

// ---------------------------------------------------------------------------
// 1. ICMP errors
// ---------------------------------------------------------------------------

/// Hairpin: a pod reaches itself through its Service on a UDP port where
/// it does not listen. Its own kernel's port unreachable (to the hairpin
/// address, quoting 169.254.42.1 -> itself) must come back about the
/// Service: ECONNREFUSED at once, as it does for other backends (and as
/// kube-proxy's hairpin masquerade gives).
#[test]
fn hairpin_udp_to_a_closed_port_is_refused_at_once() {
    require_root!();
    let mut lab = lab("native");
    let itself = lab.backends[0].ip;
    lab.set_services(&service_ports("itself", SELF_VIP, &[itself], TCP_PORT, 5999));
    wait_programmed(&lab.a, SELF_VIP, &[itself]);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let result = in_netns(&lab.backends[0].netns.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((SELF_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send(b"who").unwrap();
        socket.recv(&mut [0u8; 10]).map(|_| ())
    })
    .join()
    .unwrap();
    let err = result.expect_err("nothing listens");
    eprintln!("hairpin closed port: {err} after {:?}", started.elapsed());
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A router's fragmentation needed (here sent by another pod of the
/// backend's node, b2, as a router on the path would) about a UDP query the
/// client sent through the Service to b1, crossing nodes: the client's
/// kernel must learn the path MTU for the Service address.
fn frag_needed_across_nodes(mode: &str) {
    let mut lab = lab(mode);
    let b1 = lab.backends[1].ip;
    lab.set_services(&service("web", WEB_VIP, &[b1]));
    wait_programmed(&lab.a, WEB_VIP, &[b1]);
    let client_ip = lab.client.ip;
    let (socket, port) = in_netns(&lab.client.netns.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((WEB_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send(b"who\n").unwrap();
        socket.recv(&mut [0u8; 512]).expect("answer");
        let port = socket.local_addr().unwrap().port();
        (socket, port)
    })
    .join()
    .unwrap();
    let quoted =
        Ipv4 { ttl: 63, ..Ipv4::udp(client_ip.octets(), port, b1.octets(), UDP_PORT, b"who\n", true) }
            .bytes();
    let router = &lab.backends[2];
    let error = Ipv4::icmp_error(router.ip.octets(), client_ip.octets(), 3, 4, [0, 0, 0x05, 0x14], &quoted);
    let (pod_mac, host_mac) = (mac_of(&router.netns, "eth0"), mac_of(&lab.b.netns, &router.host_veth));
    send_raw_frames_in(
        &router.netns.path(),
        "eth0",
        vec![ethernet(host_mac, pod_mac, ETH_P_IP, &error.bytes())],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let route = sh(&["ip", "-n", &lab.client.netns.name, "route", "get", &WEB_VIP.to_string()]);
    eprintln!("{mode}: {route}");
    drop(socket);
    assert!(
        route.contains("mtu 1300"),
        "{mode}: the client did not learn the path MTU of the Service: {route}"
    );
}

in_both_modes! { a_routers_frag_needed_across_nodes_sets_the_services_path_mtu => frag_needed_across_nodes; }

/// An ICMP error whose outer destination is not the quoted sender (a
/// hostile pod h on node A sends it to a bystander pod quoting the client's
/// connection): netfilter does not treat it as related (outer daddr !=
/// inner saddr, nf_conntrack_inet_error) and leaves it as it is. Ours must
/// not rewrite it into an error about the Service.
#[test]
fn an_icmp_error_to_a_bystander_is_not_translated() {
    require_root!();
    use super::redteam_policy::Capture;
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.set_services(&service("web", WEB_VIP, &[b1]));
    wait_programmed(&lab.a, WEB_VIP, &[b1]);
    let hostile = lab.a.add_pod("h");
    let bystander = lab.a.add_pod("y");
    let client_ip = lab.client.ip;
    let (_socket, port) = in_netns(&lab.client.netns.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((WEB_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send(b"who\n").unwrap();
        socket.recv(&mut [0u8; 512]).expect("answer");
        let port = socket.local_addr().unwrap().port();
        (socket, port)
    })
    .join()
    .unwrap();
    let capture = Capture::start(&bystander.netns.path(), "eth0");
    let quoted = Ipv4::udp(client_ip.octets(), port, b1.octets(), UDP_PORT, b"who\n", true).bytes();
    let error = Ipv4::icmp_error(hostile.ip.octets(), bystander.ip.octets(), 3, 3, [0; 4], &quoted);
    let (pod_mac, host_mac) = (mac_of(&hostile.netns, "eth0"), mac_of(&lab.a.netns, &hostile.host_veth));
    send_raw_frames_in(
        &hostile.netns.path(),
        "eth0",
        vec![ethernet(host_mac, pod_mac, ETH_P_IP, &error.bytes())],
    )
    .unwrap();
    let vip = WEB_VIP.octets();
    let translated = capture.saw_ip(Duration::from_secs(1), |ip| {
        ip[9] == 1 && ip.len() >= 48 && ip[20] == 3 && ip[28 + 16..28 + 20] == vip
    });
    let untouched = capture.saw_ip(Duration::from_millis(100), |ip| {
        ip[9] == 1 && ip.len() >= 48 && ip[20] == 3 && ip[28 + 16..28 + 20] == b1.octets()
    });
    eprintln!("bystander got: translated {translated}, untouched {untouched}");
    assert!(!translated, "an error not addressed to the quoted sender was rewritten about the Service");
}

/// Malformed errors from a hostile pod quoting the client's live
/// connection: what reaches the client must carry valid checksums (a bad
/// ICMP checksum must stay bad, not be laundered into a valid one), and a
/// quote cut inside the UDP header must not be turned into something the
/// client's kernel accepts.
#[test]
fn malformed_icmp_errors_are_not_laundered() {
    require_root!();
    use datapath_tests::packets::checksum;

    use super::redteam_policy::Capture;
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.set_services(&service("web", WEB_VIP, &[b1]));
    wait_programmed(&lab.a, WEB_VIP, &[b1]);
    let hostile = lab.a.add_pod("h");
    let client_ip = lab.client.ip;
    let (socket, port) = in_netns(&lab.client.netns.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((WEB_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        socket.send(b"who\n").unwrap();
        socket.recv(&mut [0u8; 512]).expect("answer");
        let port = socket.local_addr().unwrap().port();
        (socket, port)
    })
    .join()
    .unwrap();
    let capture = Capture::start(&lab.client.netns.path(), "eth0");
    let quoted = Ipv4::udp(client_ip.octets(), port, b1.octets(), UDP_PORT, b"who\n", true).bytes();
    let (pod_mac, host_mac) = (mac_of(&hostile.netns, "eth0"), mac_of(&lab.a.netns, &hostile.host_veth));
    let frame = |ip: Vec<u8>| ethernet(host_mac, pod_mac, ETH_P_IP, &ip);
    // 1: a bad ICMP checksum (off by one), a full quote.
    let mut bad = Ipv4::icmp_error(hostile.ip.octets(), client_ip.octets(), 3, 3, [0; 4], &quoted).bytes();
    bad[22] ^= 0x01;
    // 2: a quote cut after the ports (24 bytes: no UDP length/checksum).
    let cut = Ipv4::icmp_error(hostile.ip.octets(), client_ip.octets(), 3, 3, [0; 4], &quoted[..24]).bytes();
    send_raw_frames_in(&hostile.netns.path(), "eth0", vec![frame(bad)]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after_bad = in_netns(&lab.client.netns.path(), {
        let s = socket.try_clone().unwrap();
        move || s.send(b"x").and_then(|_| s.recv(&mut [0u8; 512]).map(|_| ()))
    })
    .join()
    .unwrap();
    let icmp_frames: Vec<Vec<u8>> = capture
        .frames
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == ETH_P_IP.to_be_bytes() && f[14 + 9] == 1)
        .map(|f| f[14..].to_vec())
        .collect();
    let laundered = icmp_frames.iter().any(|ip| {
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        checksum(&ip[20..total]) == 0
    });
    eprintln!(
        "bad-checksum error: {} ICMP frames reached the client, laundered {laundered}; socket {after_bad:?}",
        icmp_frames.len()
    );
    send_raw_frames_in(&hostile.netns.path(), "eth0", vec![frame(cut)]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let frames: Vec<Vec<u8>> = capture
        .frames
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == ETH_P_IP.to_be_bytes() && f[14 + 9] == 1)
        .map(|f| f[14..].to_vec())
        .collect();
    for ip in &frames {
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        eprintln!(
            "  ICMP at client: {} bytes, outer {:?}, icmp checksum ok {}, quote dst {:?}",
            total,
            &ip[12..16],
            checksum(&ip[20..total]) == 0,
            ip.get(44..48)
        );
    }
    drop(socket);
    assert!(!laundered, "an ICMP error with a bad checksum reached the client with a valid one");
    assert!(
        !matches!(&after_bad, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a bad-checksum error refused the client's socket"
    );
}

// ---------------------------------------------------------------------------
// 4. Socket load balancing
// ---------------------------------------------------------------------------

/// Two Services with the same backends (same target port) and one
/// unconnected UDP socket asking both: each answer must come from the
/// Service it was sent to. Pods (conntrack: the two connections' reply
/// entries share the 5-tuple backend -> client) and the node's own sockets
/// (sock_revnat keyed by socket and backend). kube-proxy: netfilter gives
/// the second connection another source port (NAT clash resolution), and
/// each answer comes from its own Service.
fn two_services_one_socket(from: &Netns) -> Vec<SocketAddr> {
    in_netns(&from.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.send_to(b"one\n", (WEB_VIP, 53)).unwrap();
        socket.send_to(b"two\n", (TWIN_VIP, 53)).unwrap();
        let mut froms = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            froms.push(from);
        }
        froms.sort();
        froms
    })
    .join()
    .unwrap()
}

#[test]
#[ignore = "known gap: recvmsg knows only the backend address (docs/services.md)"]
fn one_udp_socket_to_two_services_with_the_same_backend() {
    require_root!();
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.set_services(&format!("{}{}", service("web", WEB_VIP, &[b1]), service("twin", TWIN_VIP, &[b1])));
    wait_programmed(&lab.a, WEB_VIP, &[b1]);
    wait_programmed(&lab.a, TWIN_VIP, &[b1]);
    let want = vec![SocketAddr::from((WEB_VIP, 53)), SocketAddr::from((TWIN_VIP, 53))];
    let pod = two_services_one_socket(&lab.client.netns);
    let node = two_services_one_socket(&lab.a.netns);
    eprintln!("pod socket heard {pod:?}; node socket heard {node:?}");
    assert_eq!(pod, want, "pod: each answer from the Service asked");
    assert_eq!(node, want, "node: each answer from the Service asked");
}

/// Node B has no Services; node A does. A process in node B's namespace
/// connecting to A's cluster IP must not be translated by A's socket
/// programs (both nodes' programs sit on the same cgroup root).
#[test]
fn one_nodes_socket_programs_leave_the_other_nodes_sockets_alone() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    lab.a.set_extra_config(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let on_b = in_netns(&lab.b.netns.path(), || {
        TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(2)).map(|mut c| try_ask(&mut c))
    })
    .join()
    .unwrap();
    eprintln!("node B to A's Service: {on_b:?}");
    assert!(!matches!(on_b, Ok(Ok(_))), "node A's programs translated node B's socket");
}

/// A UDP socket of the node to a Service's TCP-only port (80) and a TCP
/// socket to its UDP-only port (53) are not Service traffic.
#[test]
fn the_socket_programs_match_the_protocol_of_the_service_port() {
    require_root!();
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.set_services(&service("web", WEB_VIP, &[b1]));
    wait_programmed(&lab.a, WEB_VIP, &[b1]);
    // b1 answers UDP on 8080 and TCP on 5353 too.
    let _udp8080 = Server2::udp(&lab.backends[1].netns, b1, TCP_PORT);
    let tcp5353 = in_netns(&lab.backends[1].netns.path(), move || TcpListener::bind((b1, UDP_PORT)).unwrap())
        .join()
        .unwrap();
    tcp5353.set_nonblocking(true).unwrap();
    let node = lab.a.netns.path();
    let (udp, tcp) = in_netns(&node, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let udp =
            s.send_to(b"who\n", (WEB_VIP, 80)).and_then(|_| s.recv_from(&mut [0u8; 512]).map(|(_, f)| f));
        let tcp = TcpStream::connect_timeout(&(WEB_VIP, 53).into(), Duration::from_secs(1))
            .map(|c| c.peer_addr().unwrap());
        (udp, tcp)
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let accepted = tcp5353.accept().is_ok();
    eprintln!("UDP to VIP:80 -> {udp:?}; TCP to VIP:53 -> {tcp:?} (backend accepted: {accepted})");
    assert!(udp.is_err(), "a UDP socket was sent to the TCP port's backend");
    assert!(!accepted, "a TCP socket was sent to the UDP port's backend");
}

struct Server2 {
    stop: Arc<AtomicBool>,
}
impl Server2 {
    fn udp(ns: &Netns, ip: Ipv4Addr, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let udp = in_netns(&ns.path(), move || UdpSocket::bind((ip, port)).unwrap()).join().unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{ip} {}\n", peer.ip()).as_bytes(), peer);
                }
            }
        });
        Server2 { stop }
    }
}
impl Drop for Server2 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The node's connections across an agent restart: a TCP connection and a
/// connected UDP socket made before keep working and still show the
/// Service (getpeername, recv), and an unconnected socket's late answer
/// (sent before the restart, answered after) comes from the Service.
fn host_sockets_across_restart(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let node = lab.a.netns.path();
    let (mut tcp, udp) = in_netns(&node, || {
        let tcp = TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(3)).unwrap();
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect((WEB_VIP, 53)).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        (tcp, udp)
    })
    .join()
    .unwrap();
    let backend = ask(&mut tcp).0;
    lab.a.stop_agent();
    lab.a.start_agent();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tcp.peer_addr().unwrap(),
        SocketAddr::from((WEB_VIP, 80)),
        "{mode}: getpeername after restart"
    );
    assert_eq!(ask(&mut tcp).0, backend, "{mode}: the node's TCP connection after restart");
    assert_eq!(udp.peer_addr().unwrap(), SocketAddr::from((WEB_VIP, 53)));
    udp.send(b"who\n").unwrap();
    assert!(udp.recv(&mut [0u8; 512]).is_ok(), "{mode}: connected UDP after restart");
    let from = in_netns(&node, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send_to(b"who\n", (WEB_VIP, 53)).unwrap();
        s.recv_from(&mut [0u8; 512]).map(|(_, f)| f)
    })
    .join()
    .unwrap();
    assert_eq!(from.unwrap(), SocketAddr::from((WEB_VIP, 53)));
}

in_both_modes! { the_nodes_sockets_survive_an_agent_restart => host_sockets_across_restart; }

/// A connected UDP socket of the node keeps its backend after the backend
/// leaves the Service (and its pod is gone): with the socket programs
/// nothing ever moves it. kube-proxy deletes the UDP conntrack entries of
/// a removed endpoint so the next datagram picks a live backend.
#[test]
#[ignore = "known gap: no socket destroy on backend removal (docs/services.md)"]
fn a_nodes_connected_udp_socket_follows_a_removed_backend() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let node = lab.a.netns.path();
    let _ = &node;
    let udp = in_netns(&node, || {
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.connect((WEB_VIP, 53)).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        udp
    })
    .join()
    .unwrap();
    udp.send(b"who\n").unwrap();
    let mut buf = [0u8; 512];
    let n = udp.recv(&mut buf).unwrap();
    let first = parse_answer(&String::from_utf8_lossy(&buf[..n])).0;
    let rest: Vec<Ipv4Addr> = all.iter().copied().filter(|ip| *ip != first).collect();
    lab.set_services(&service("web", WEB_VIP, &rest));
    wait_programmed(&lab.a, WEB_VIP, &rest);
    std::thread::sleep(Duration::from_secs(1));
    let mut answered_by = None;
    for _ in 0..3 {
        udp.send(b"who\n").unwrap();
        if let Ok(n) = udp.recv(&mut buf) {
            answered_by = Some(parse_answer(&String::from_utf8_lossy(&buf[..n])).0);
        }
    }
    eprintln!("removed backend {first}; connected node socket answered by {answered_by:?}");
    assert!(
        answered_by.is_some_and(|b| rest.contains(&b)),
        "the node's connected UDP socket still goes to the removed backend {first}: {answered_by:?}"
    );
}

/// socket_lb = false (after a start with it on): the links are gone, so the
/// node's connect() to a cluster IP is not translated.
#[test]
fn socket_lb_false_removes_the_translation() {
    require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let node = lab.a.netns.path();
    let before =
        in_netns(&node, || TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(2)).is_ok())
            .join()
            .unwrap();
    assert!(before);
    lab.a.stop_agent();
    lab.a.set_extra_config(&format!("socket_lb = false\n{}", service("web", WEB_VIP, &all)));
    lab.a.start_agent();
    wait_programmed(&lab.a, WEB_VIP, &all);
    std::thread::sleep(Duration::from_secs(1));
    let after = in_netns(&node, || {
        TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(2)).map(|mut c| try_ask(&mut c))
    })
    .join()
    .unwrap();
    eprintln!(
        "socket_lb = false: {after:?}; links {:?}",
        std::fs::read_dir(lab.a.bpffs_dir.join("sock-links")).map(|d| d.count())
    );
    assert!(!matches!(after, Ok(Ok(_))), "socket_lb = false still translates the node's sockets");
}

/// A pod's socket is left to the packet path: its connection is tracked.
#[test]
fn a_pods_socket_keeps_the_packet_path() {
    require_root!();
    let mut lab = lab("vxlan");
    let all = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let mut conn = connect(&lab.client, WEB_VIP).unwrap();
    let _ = ask(&mut conn);
    let port = conn.local_addr().unwrap().port();
    assert!(state_of_port(&lab.a, port).is_some(), "the pod's connection is tracked (packet path)");
}

/// A flood of 3000 segments with `flags` on fresh ports from one pod at
/// `target` (a live Service, or one whose backend address nobody has):
/// (connections the flooder holds, other pod's refusals out of 30, states).
fn flood(flags: u8, live: bool) -> (usize, usize, String) {
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooder = lab.a.add_pod("a3");
    let nobody = Ipv4Addr::new(10, 244, 2, 250);
    let target_backends = if live { all[1..].to_vec() } else { vec![nobody] };
    restart_with(
        &mut lab.a,
        &format!(
            "conntrack_max_entries = 2048\n{}{}",
            service("web", WEB_VIP, &all),
            service("target", TWIN_VIP, &target_backends)
        ),
    );
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, TWIN_VIP, &target_backends);
    let frames = raw_tcp_frames(&lab.a, &flooder, TWIN_VIP, 80, flags, 10_000..13_000);
    send_raw_frames_in(&flooder.netns.path(), "eth0", frames).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let held = rows_of_client(&lab.a, flooder.ip);
    let mut states = std::collections::BTreeMap::new();
    for row in conntrack_rows(&lab.a) {
        *states.entry(row["state"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
    }
    let refused = victim_connects(&lab.client, 30);
    let summary = format!(
        "flags {flags:#04x} live {live}: flooder holds {held}, victim refused {refused}/30, states {states:?}, conntrack_full {}, client_limit {}",
        lab.a.drop_count("conntrack_full"),
        lab.a.drop_count("conntrack_client_limit")
    );
    eprintln!("{summary}");
    (held, refused, summary)
}

#[test]
fn an_ack_flood_at_a_service_nobody_answers_is_held_to_the_client_limit() {
    require_root!();
    let (held, refused, summary) = flood(TCP_ACK, false);
    assert!(held <= 270 && refused == 0, "{summary}");
}

#[test]
fn an_rst_flood_is_held_to_the_client_limit() {
    require_root!();
    let (held, refused, summary) = flood(TCP_RST, false);
    assert!(held <= 270 && refused == 0, "{summary}");
}

#[test]
fn a_fin_flood_is_held_to_the_client_limit() {
    require_root!();
    let (held, refused, summary) = flood(datapath_tests::packets::TCP_FIN | TCP_ACK, true);
    assert!(held <= 270 && refused == 0, "{summary}");
}

#[test]
fn a_syn_fin_flood_is_held_to_the_client_limit() {
    require_root!();
    // Linux drops SYN+FIN unanswered: these connections were never
    // answered, so they are `opening` (60 s), not `half_closed` (120 s).
    let (held, refused, summary) = flood(TCP_SYN | datapath_tests::packets::TCP_FIN, true);
    assert!(held <= 270 && refused == 0, "{summary}");
    assert!(
        summary.contains("\"opening\": "),
        "unanswered SYN+FIN connections kept as half-closed: {summary}"
    );
}
