//! NodePort with externalTrafficPolicy Local, in the lab, in both modes: a
//! host outside the cluster (on the nodes' segment) reaches a Service on
//! each node's address at its node port; the node sends it to one of its
//! own backends and the backend sees the outside host's own address; the
//! replies come back from the node's address and port. A node with no
//! backend of its own drops (as kube-proxy does) while another serves; a
//! Service with none anywhere refuses at once. The node's own services on
//! its address are untouched.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use datapath_tests::{
    in_both_modes,
    lab::{Netns, in_netns, ping},
};

use super::{
    redteam_policy::outside_host,
    services::{lab, parse_answer, wait_served},
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
const WEB_NODE_PORT: u16 = 30080;
const DNS_NODE_PORT: u16 = 30053;
const ELSEWHERE_NODE_PORT: u16 = 30081;
const EMPTY_NODE_PORT: u16 = 30082;
const WEB_HEALTH_PORT: u16 = 32100;
const ELSEWHERE_HEALTH_PORT: u16 = 32101;

/// GET / on `address:port` from `host`: (status, body).
pub(super) fn http_get(host: &Netns, address: Ipv4Addr, port: u16) -> (u16, String) {
    use std::io::Read as _;
    in_netns(&host.path(), move || {
        let mut conn = TcpStream::connect_timeout(&(address, port).into(), Duration::from_secs(3)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(conn, "GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    })
    .join()
    .unwrap()
}

/// A Service with externalTrafficPolicy Local: TCP 80 -> 8080 at node port
/// `tcp_node_port`, and, if given, UDP 53 -> 5353 at `udp_node_port`.
fn node_port_service(
    name: &str,
    vip: Ipv4Addr,
    backends: &[Ipv4Addr],
    tcp_node_port: u16,
    udp_node_port: Option<u16>,
) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    let mut out = format!(
        "\n[[services]]\nname = \"{name}\"\ncluster_ip = \"{vip}\"\nexternal_traffic_policy = \"Local\"\n\
         backends = [{}]\n[[services.ports]]\nport = 80\ntarget_port = 8080\nnode_port = {tcp_node_port}\n",
        list.join(", ")
    );
    if let Some(udp) = udp_node_port {
        out += &format!(
            "[[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = 5353\nnode_port = {udp}\n"
        );
    }
    out
}

/// One TCP request from `host` to `node:port`: (backend, client address it saw, peer the host saw).
fn ask(host: &Netns, node: Ipv4Addr, port: u16) -> std::io::Result<(Ipv4Addr, Ipv4Addr, SocketAddr)> {
    in_netns(&host.path(), move || {
        let mut conn = TcpStream::connect_timeout(&(node, port).into(), Duration::from_millis(1500))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        writeln!(conn, "who")?;
        let mut line = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut line)?;
        let (backend, seen) = parse_answer(&line);
        Ok((backend, seen, conn.peer_addr()?))
    })
    .join()
    .unwrap()
}

/// One UDP datagram from `host` (a new source port) to `address:port`:
/// (who answered, (backend, client address it saw)).
fn ask_udp(host: &Netns, address: Ipv4Addr, port: u16) -> (SocketAddr, (Ipv4Addr, Ipv4Addr)) {
    ask_udp_from(host, 0, address, port)
}

/// The same from source port `from` (0: a new one).
fn ask_udp_from(host: &Netns, from: u16, address: Ipv4Addr, port: u16) -> (SocketAddr, (Ipv4Addr, Ipv4Addr)) {
    in_netns(&host.path(), move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, from)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send_to(b"who\n", (address, port)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = socket.recv_from(&mut buf).expect("a UDP answer");
        (from, parse_answer(&String::from_utf8_lossy(&buf[..n])))
    })
    .join()
    .unwrap()
}

/// Until a row of `agent`'s `inspect services` satisfies `ready` (`what`
/// names it in the failure).
fn wait_for_rows(
    agent: &datapath_tests::lab::Node,
    what: &str,
    ready: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let services = agent.inspect("services");
        if ready(services.as_array().unwrap()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} not programmed: {services:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab, its agents serving clients outside the cluster
/// (`serve_outside_clients`, off by default; read at start).
fn outside_lab(mode: &str) -> super::services::Lab {
    let mut lab = lab(mode);
    for node in [&mut lab.a, &mut lab.b] {
        node.set_extra_config(OUTSIDE_CLIENTS);
        node.stop_agent();
        node.start_agent();
    }
    lab
}

const OUTSIDE_CLIENTS: &str = "serve_outside_clients = true\n";

/// `services` on both nodes, with the setting the agents started with.
fn set_outside_services(lab: &mut super::services::Lab, services: &str) {
    lab.set_services(&format!("{OUTSIDE_CLIENTS}{services}"));
}

fn node_port_local(mode: &str) {
    let mut lab = outside_lab(mode);
    let [a2, b1, b2] = [lab.backends[0].ip, lab.backends[1].ip, lab.backends[2].ip];
    let with_health_check = |service: String, port: u16| {
        service.replacen(
            "external_traffic_policy = \"Local\"",
            &format!("external_traffic_policy = \"Local\"\nhealth_check_node_port = {port}"),
            1,
        )
    };
    let services = |elsewhere: &[Ipv4Addr]| {
        format!(
            "{}{}{}",
            with_health_check(
                node_port_service(
                    "web",
                    Ipv4Addr::new(10, 96, 2, 10),
                    &[a2, b1, b2],
                    WEB_NODE_PORT,
                    Some(DNS_NODE_PORT)
                ),
                WEB_HEALTH_PORT
            ),
            with_health_check(
                node_port_service(
                    "elsewhere",
                    Ipv4Addr::new(10, 96, 2, 11),
                    elsewhere,
                    ELSEWHERE_NODE_PORT,
                    None
                ),
                ELSEWHERE_HEALTH_PORT
            ),
            node_port_service("empty", Ipv4Addr::new(10, 96, 2, 12), &[], EMPTY_NODE_PORT, None),
        )
    };
    set_outside_services(&mut lab, &services(&[b1]));
    wait_served(&lab.a, NODE_A, WEB_NODE_PORT, &[a2]);
    wait_served(&lab.b, NODE_B, WEB_NODE_PORT, &[b1, b2]);
    wait_served(&lab.a, NODE_A, ELSEWHERE_NODE_PORT, &[]);
    wait_served(&lab.b, NODE_B, ELSEWHERE_NODE_PORT, &[b1]);
    let outside = outside_host("client", OUTSIDE);

    // Through each node, to its own backends; the backend sees the outside
    // host's address; the host sees only the node's address and port.
    for (node, port, want) in [(NODE_A, WEB_NODE_PORT, vec![a2]), (NODE_B, WEB_NODE_PORT, vec![b1, b2])] {
        let mut reached = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (backend, seen, peer) = ask(&outside, node, port).expect("through the node port");
            assert_eq!(seen, OUTSIDE, "{mode}: the client's address is kept");
            assert_eq!(peer, (node, port).into(), "{mode}: the answer comes from the node port");
            reached.insert(backend);
        }
        assert_eq!(reached, want.into_iter().collect(), "{mode}: via {node}, its own backends only");
    }
    // UDP: the reply comes from the node's address and node port.
    let (from, (backend, _)) = ask_udp(&outside, NODE_A, DNS_NODE_PORT);
    assert_eq!((backend, from), (a2, (NODE_A, DNS_NODE_PORT).into()), "{mode}");

    // Backends only on node B: A drops unanswered (counted), B serves.
    let before = lab.a.drop_count("service_no_local_backend");
    let err = ask(&outside, NODE_A, ELSEWHERE_NODE_PORT).expect_err("no backend on node A");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{mode}: dropped, as kube-proxy does: {err}");
    assert!(lab.a.drop_count("service_no_local_backend") > before, "{mode}: counted");
    assert_eq!(ask(&outside, NODE_B, ELSEWHERE_NODE_PORT).expect("node B serves").0, b1);
    // No backend anywhere: refused at once.
    let err = ask(&outside, NODE_A, EMPTY_NODE_PORT).expect_err("no backend anywhere");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{mode}: {err}");

    // The health check node ports, as a load balancer probes them: each
    // node tells its own ready backends, 503 with none.
    for (node, port, status, count) in [
        (NODE_A, WEB_HEALTH_PORT, 200, 1),
        (NODE_B, WEB_HEALTH_PORT, 200, 2),
        (NODE_A, ELSEWHERE_HEALTH_PORT, 503, 0),
        (NODE_B, ELSEWHERE_HEALTH_PORT, 200, 1),
    ] {
        let (got, body) = http_get(&outside, node, port);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(
            (got, body["localEndpoints"].as_u64()),
            (status, Some(count)),
            "{mode}: {node}:{port} {body}"
        );
        assert_eq!(body["service"]["namespace"], "default");
    }
    // The last backend on node B leaves: B's health check fails too.
    set_outside_services(&mut lab, &services(&[]));
    datapath_tests::wait_for("node B's health check fails", Duration::from_secs(10), || {
        http_get(&outside, NODE_B, ELSEWHERE_HEALTH_PORT).0 == 503
    });

    // The node's own services on its address are the node's, as before.
    let node_ns = lab.a.netns.path();
    let listener = in_netns(&node_ns, || TcpListener::bind((NODE_A, 9999)).unwrap()).join().unwrap();
    let accepting = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let conn = in_netns(&outside.path(), || {
        TcpStream::connect_timeout(&(NODE_A, 9999).into(), Duration::from_secs(3))
    })
    .join()
    .unwrap();
    assert!(conn.is_ok(), "{mode}: the node's own port: {conn:?}");
    assert_eq!(accepting.join().unwrap().unwrap().ip(), std::net::IpAddr::V4(OUTSIDE));
    assert!(ping(&outside, NODE_A, 2), "{mode}: the node answers pings");
    // Outside forwarding counts the replies sent straight out.
    let forwards = lab.a.inspect("counters");
    assert!(forwards["forwards"]["to_outside"].as_u64().unwrap() > 0, "{forwards:#}");
}

in_both_modes! { an_outside_host_reaches_the_local_backends_of_each_node_port => node_port_local; }

/// A Service with externalTrafficPolicy Cluster (the default): TCP 80 ->
/// 8080 at node port 30090, UDP 53 -> 5353 at 30091, and UDP 54 -> 5354
/// (where no backend listens) at 30092.
fn cluster_node_port_service(backends: &[Ipv4Addr]) -> String {
    node_port_service("spread", Ipv4Addr::new(10, 96, 2, 20), backends, 30090, Some(30091))
        .replace("external_traffic_policy = \"Local\"\n", "")
        + "[[services.ports]]\nport = 54\nprotocol = \"UDP\"\ntarget_port = 5354\nnode_port = 30092\n"
}

fn node_port_cluster(mode: &str) {
    let mut lab = outside_lab(mode);
    let all = lab.backend_ips();
    let a2 = all[0];
    set_outside_services(&mut lab, &cluster_node_port_service(&all));
    wait_served(&lab.a, NODE_A, 30090, &all);
    wait_served(&lab.b, NODE_B, 30090, &all);
    let outside = outside_host("client", OUTSIDE);
    // Through either node to every backend. A backend on the node the
    // connection came in through sees the client; one on the other node
    // sees that node's address (source NAT, so the reply comes back).
    for node in [NODE_A, NODE_B] {
        let mut reached = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let (backend, seen, peer) = ask(&outside, node, 30090).expect("through the node port");
            assert_eq!(peer, (node, 30090).into(), "{mode}: the answer comes from the node port");
            let local = (backend == a2) == (node == NODE_A);
            let want = if local { OUTSIDE } else { node };
            assert_eq!(seen, want, "{mode}: via {node}, backend {backend} sees {seen}");
            reached.insert(backend);
        }
        assert_eq!(reached.len(), all.len(), "{mode}: via {node}, every backend: {reached:?}");
    }
    // One long connection to another node's backend keeps its way.
    let long = in_netns(&outside.path(), move || {
        let mut seen = Vec::new();
        for _ in 0..30 {
            let mut conn =
                TcpStream::connect_timeout(&(NODE_A, 30090).into(), Duration::from_secs(3)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut lines = BufReader::new(conn.try_clone().unwrap());
            writeln!(conn, "who").unwrap();
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            let (backend, _) = parse_answer(&line);
            if backend == a2 {
                continue;
            }
            for _ in 0..20 {
                writeln!(conn, "again").unwrap();
                line.clear();
                lines.read_line(&mut line).unwrap();
                seen.push(parse_answer(&line).0);
            }
            return (backend, seen);
        }
        panic!("no connection reached node B's backends");
    })
    .join()
    .unwrap();
    assert!(long.1.iter().all(|b| *b == long.0), "{mode}: {long:?}");
    // UDP through node A reaches node B's backends too, each reply from
    // the node port.
    let mut udp_backends = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (from, (backend, _)) = ask_udp(&outside, NODE_A, 30091);
        assert_eq!(from, (NODE_A, 30091).into());
        udp_backends.insert(backend);
    }
    assert_eq!(udp_backends.len(), all.len(), "{mode}: {udp_backends:?}");
    // A UDP port where no backend listens: the backend's port unreachable
    // reaches the client at once, naming the node port (through source NAT
    // too), so its connected socket fails instead of waiting. (At most 4
    // errors per backend and destination: under Linux's ICMP burst of 6.)
    for node in [NODE_A, NODE_B] {
        for _ in 0..4 {
            let answer = in_netns(&outside.path(), move || {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.connect((node, 30092)).unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                socket.send(b"who\n").unwrap();
                socket.recv(&mut [0u8; 64]).map_err(|e| e.kind())
            })
            .join()
            .unwrap();
            assert_eq!(answer, Err(ErrorKind::ConnectionRefused), "{mode}: via {node}, a closed UDP port");
        }
    }
    // inspect shows the outside client's connections with their backend.
    let conntrack = lab.a.inspect("conntrack");
    assert!(
        conntrack.as_array().unwrap().iter().any(|c| c["client_ip"] == OUTSIDE.to_string()
            && c["service_port"] == 30090
            && c["backend_ip"] != a2.to_string()),
        "{conntrack:#}"
    );
    // ClientIP affinity on the node port: through each node, every new
    // connection of the outside host goes to one backend (the node that
    // chose it keeps the choice, as each kube-proxy does), whether that
    // backend is local or on the other node (source NAT).
    set_outside_services(
        &mut lab,
        &cluster_node_port_service(&all).replacen(
            "backends =",
            "session_affinity = \"ClientIP\"\nsession_affinity_timeout_seconds = 300\nbackends =",
            1,
        ),
    );
    for (node, agent) in [(NODE_A, &lab.a), (NODE_B, &lab.b)] {
        wait_for_affinity(agent, &all);
        let (first, _, _) = ask(&outside, node, 30090).expect("through the node port");
        for _ in 0..15 {
            let (backend, _, _) = ask(&outside, node, 30090).expect("through the node port");
            assert_eq!(backend, first, "{mode}: via {node}, ClientIP affinity keeps one backend");
        }
        // UDP too, from new source ports each time: ports above the
        // ephemeral range, so that none is the tuple of a datagram sent
        // before affinity, whose connection is still tracked to the
        // backend it had (CI hit that 1 in ~100 runs).
        let udp: std::collections::BTreeSet<Ipv4Addr> = (0..10)
            .map(|i| ask_udp_from(&outside, 61_000 + u16::from(node.octets()[3]) * 16 + i, node, 30091).1.0)
            .collect();
        assert_eq!(udp.len(), 1, "{mode}: via {node}, UDP with ClientIP affinity: {udp:?}");
    }
}

/// Until `agent` shows the node port Service with ClientIP affinity and
/// all of `backends`.
fn wait_for_affinity(agent: &datapath_tests::lab::Node, backends: &[Ipv4Addr]) {
    wait_for_rows(agent, "affinity", |rows| {
        [30090, 30091].iter().all(|port| {
            rows.iter().any(|s| {
                s["port"] == *port
                    && s["session_affinity"] == "ClientIP"
                    && s["backends"].as_array().is_some_and(|b| b.len() == backends.len())
            })
        })
    });
}

in_both_modes! { node_ports_with_the_cluster_policy_reach_every_backend_through_any_node => node_port_cluster; }

/// An external address, routed to the nodes by the outside network (here a
/// static route on the outside host, as a router or a load balancer that
/// forwards to a node would).
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

/// The outside host sends what it sends to `address` through `node`.
fn route_via(host: &Netns, address: Ipv4Addr, node: Ipv4Addr) {
    let status = std::process::Command::new("ip")
        .args(["-n", &host.name, "route", "replace", &format!("{address}/32"), "via", &node.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "route {address} via {node}");
}

/// A Service with `external_ips = [EXTERNAL]`, TCP 80 -> 8080 and UDP 53 ->
/// 5353, no node ports, with `policy` as its externalTrafficPolicy.
fn external_service(backends: &[Ipv4Addr], policy: &str) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"outside\"\ncluster_ip = \"10.96.2.30\"\nexternal_ips = [\"{EXTERNAL}\"]\n\
         external_traffic_policy = \"{policy}\"\nbackends = [{}]\n\
         [[services.ports]]\nport = 80\ntarget_port = 8080\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = 5353\n",
        list.join(", ")
    )
}

/// Until `agent` serves `EXTERNAL:80` to outside clients with `count` backends.
fn wait_outside_entry(agent: &datapath_tests::lab::Node, count: usize) {
    wait_for_rows(agent, "outside entry", |rows| {
        rows.iter().any(|s| {
            s["cluster_ip"] == EXTERNAL.to_string()
                && s["port"] == 80
                && s["clients"] == "outside"
                && s["backends"].as_array().is_some_and(|b| b.len() == count)
        })
    });
}

/// An external address reached from outside the cluster, through either
/// node: with externalTrafficPolicy Local, the node's own backends, which
/// see the outside host's address, and a node without one drops; with
/// Cluster, every backend (another node's from the node's address). The
/// answers come from the external address. UDP too. A cluster IP stays
/// out of reach from outside.
fn external_from_outside(mode: &str) {
    let mut lab = outside_lab(mode);
    let all = lab.backend_ips();
    let (a2, on_b) = (all[0], [all[1], all[2]]);
    set_outside_services(&mut lab, &external_service(&all, "Local"));
    wait_outside_entry(&lab.a, 1);
    wait_outside_entry(&lab.b, 2);
    let outside = outside_host("client", OUTSIDE);
    for (node, local) in [(NODE_A, vec![a2]), (NODE_B, on_b.to_vec())] {
        route_via(&outside, EXTERNAL, node);
        let mut reached = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (backend, seen, peer) = ask(&outside, EXTERNAL, 80).expect("through the external address");
            assert_eq!(peer, (EXTERNAL, 80).into(), "{mode}: the answer comes from the external address");
            assert_eq!(seen, OUTSIDE, "{mode}: via {node}, the backend sees the client's own address");
            assert!(local.contains(&backend), "{mode}: via {node}, only its own backends: {backend}");
            reached.insert(backend);
        }
        assert_eq!(reached.len(), local.len(), "{mode}: via {node}: {reached:?}");
        let udp = ask_udp(&outside, EXTERNAL, 53);
        assert_eq!(udp.0, (EXTERNAL, 53).into(), "{mode}: UDP answer from the external address");
        assert!(local.contains(&udp.1.0) && udp.1.1 == OUTSIDE, "{mode}: via {node}, UDP {udp:?}");
    }
    // Local, and no backend on node A: node A drops; node B serves.
    set_outside_services(&mut lab, &external_service(&on_b, "Local"));
    wait_outside_entry(&lab.b, 2);
    wait_outside_entry(&lab.a, 0);
    route_via(&outside, EXTERNAL, NODE_A);
    let err = ask(&outside, EXTERNAL, 80).expect_err("node A has no backend of its own");
    assert!(matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock), "{mode}: dropped: {err}");
    // Cluster: through node A to every backend; node B's see node A.
    set_outside_services(&mut lab, &external_service(&all, "Cluster"));
    wait_outside_entry(&lab.a, 3);
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (backend, seen, peer) = ask(&outside, EXTERNAL, 80).expect("through the external address");
        assert_eq!(peer, (EXTERNAL, 80).into());
        let want = if backend == a2 { OUTSIDE } else { NODE_A };
        assert_eq!(seen, want, "{mode}: backend {backend} sees {seen}");
        reached.insert(backend);
    }
    assert_eq!(reached.len(), all.len(), "{mode}: every backend through node A: {reached:?}");
    // The cluster IP is for clients in the cluster only.
    route_via(&outside, Ipv4Addr::new(10, 96, 2, 30), NODE_A);
    assert!(ask(&outside, Ipv4Addr::new(10, 96, 2, 30), 80).is_err(), "{mode}: a cluster IP from outside");
}

in_both_modes! { external_addresses_are_served_to_outside_clients_as_the_external_policy_says => external_from_outside; }

/// Pods reach a node port on every node's address, their own node's and
/// the other's, translated at their own node like a cluster IP: every
/// backend whatever externalTrafficPolicy says (kube-proxy short-circuits
/// pod traffic to a node port the same way), the backend sees the pod's
/// own address, the answer comes from the address asked. The node's own
/// sockets too (socket load balancing).
fn pods_reach_node_ports(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    lab.set_services(&node_port_service(
        "web",
        Ipv4Addr::new(10, 96, 2, 10),
        &all,
        WEB_NODE_PORT,
        Some(DNS_NODE_PORT),
    ));
    wait_served(&lab.a, NODE_A, WEB_NODE_PORT, &all);
    wait_served(&lab.a, NODE_B, WEB_NODE_PORT, &all);
    let client = lab.client.ip;
    for node in [NODE_A, NODE_B] {
        let mut reached = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (backend, seen, peer) =
                ask(&lab.client.netns, node, WEB_NODE_PORT).expect("a pod to a node port");
            assert_eq!(peer, (node, WEB_NODE_PORT).into(), "{mode}: the answer comes from the node port");
            assert_eq!(seen, client, "{mode}: via {node}, {backend} sees the pod's own address");
            reached.insert(backend);
        }
        assert_eq!(reached.len(), all.len(), "{mode}: via {node}, every backend: {reached:?}");
        let udp = ask_udp(&lab.client.netns, node, DNS_NODE_PORT);
        assert_eq!(udp.0, (node, DNS_NODE_PORT).into(), "{mode}: UDP from the node port");
        assert!(all.contains(&udp.1.0), "{mode}: {udp:?}");
        // The node's own sockets.
        let (backend, _, peer) = ask(&lab.a.netns, node, WEB_NODE_PORT).expect("node A to a node port");
        assert_eq!(peer, (node, WEB_NODE_PORT).into());
        assert!(all.contains(&backend), "{mode}: {backend}");
    }
    // These agents do not serve outside clients (`serve_outside_clients`
    // is off by default): a host outside reaches the node's own stack,
    // where nothing listens on the node port, and no health check port.
    let outside = outside_host("client", OUTSIDE);
    let err = ask(&outside, NODE_A, WEB_NODE_PORT).expect_err("not served to outside clients by default");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{mode}: {err}");
    assert!(lab.a.inspect("services").as_array().unwrap().iter().all(|s| s["clients"] == "cluster"));
}

in_both_modes! { pods_and_the_node_reach_node_ports_on_every_nodes_address => pods_reach_node_ports; }

/// A hostile host on the nodes' segment sends SYNs it never completes to
/// node A's node port from 70 faked source addresses of the segment (each
/// passes the reverse-path check, and 1000 each stays under the per-client
/// limit): 70,000 at the default table size. Clients outside together keep
/// to TCP's half of `conntrack_max_outside` (a quarter of the table): past
/// it each new SYN takes the place of the oldest unanswered one (early
/// drop, `conntrack_early_drop`), so the flood never holds more, a pod on
/// node A keeps reaching its Service (without the shared limit the flood
/// took every entry and the pod was refused: the red team's finding), and
/// an outside client is served at once after the flood (before early drop
/// it waited for the flood's entries to expire: red team round 30, F1).
#[test]
fn a_syn_flood_from_faked_outside_sources_leaves_the_pods_their_services() {
    use datapath_tests::{
        lab::{UPLINK, mac_of, send_raw_frames},
        packets::{ETH_P_IP, Ipv4, TCP_SYN, ethernet},
    };
    datapath_tests::require_root!();
    let mut lab = outside_lab("native");
    let a2 = lab.backends[0].ip;
    let vip = Ipv4Addr::new(10, 96, 3, 50);
    set_outside_services(
        &mut lab,
        &format!(
            "conntrack_opening_seconds = 5\n{}",
            node_port_service("web", vip, &[a2], WEB_NODE_PORT, None)
        ),
    );
    wait_served(&lab.a, NODE_A, WEB_NODE_PORT, &[a2]);
    let pod_connects = |tries: usize| pod_connects(&lab.client.netns, vip, tries);
    assert_eq!(pod_connects(5), 5, "control: the pod reaches the cluster IP");
    let outside = outside_host("np-flood", OUTSIDE);
    assert!(ask(&outside, NODE_A, WEB_NODE_PORT).is_ok(), "control: the outside host is served");
    let (node_mac, my_mac) = (mac_of(&lab.a.netns, UPLINK), mac_of(&outside, "eth0"));
    let flood: Vec<Vec<u8>> = (100u8..170)
        .flat_map(|host| (0..1000u16).map(move |port| (host, port)))
        .map(|(host, port)| {
            let syn =
                Ipv4::tcp([10, 250, 0, host], 20000 + port, NODE_A.octets(), WEB_NODE_PORT, TCP_SYN, &[]);
            ethernet(node_mac, my_mac, ETH_P_IP, &syn.bytes())
        })
        .collect();
    let refused_before = lab.a.drop_count("conntrack_outside_limit");
    let given_up_before = lab.a.drop_count("conntrack_early_drop");
    send_raw_frames(&outside, "eth0", flood).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let served = pod_connects(20);
    let outside_served = ask(&outside, NODE_A, WEB_NODE_PORT).is_ok();
    let tracked = lab.a.inspect("conntrack").as_array().unwrap().len();
    let refused = lab.a.drop_count("conntrack_outside_limit") - refused_before;
    let given_up = lab.a.drop_count("conntrack_early_drop") - given_up_before;
    let config = lab.a.inspect("config");
    let limit = config["conntrack_max_outside"].as_u64().unwrap();
    assert_eq!(limit, u64::from(datapath_common::DEFAULT_CONNTRACK_ENTRIES) / 8, "the default: {config}");
    // Half of it is TCP's.
    let share = limit / 2;
    eprintln!(
        "70000 faked SYNs: {tracked} connections tracked (TCP's share {share} of {limit}); {given_up} given \
         up for newer ones, {refused} dropped; pod served {served}/20, outside client served {outside_served}"
    );
    assert_eq!(served, 20, "a pod denied its Service by a flood from outside");
    assert!(
        (share..=share + 40).contains(&(tracked as u64)),
        "the flood holds TCP's share ({share}) and no more: {tracked} tracked"
    );
    assert!(
        // (Two CPUs racing on the count may admit or give up a few more.)
        (70_000 - share - 40..=70_000 - share + 40).contains(&(given_up + refused)) && refused < 100,
        "past the share, each SYN takes an unanswered one's place: {given_up} given up, {refused} dropped"
    );
    assert!(outside_served, "an outside client is served at once after the flood");
}

/// How many of `tries` new TCP connections from `pod` to `vip:80` open
/// (1.5 s each): whether a flood from outside left the pod its Services.
fn pod_connects(pod: &Netns, vip: Ipv4Addr, tries: usize) -> usize {
    in_netns(&pod.path(), move || {
        (0..tries)
            .filter(|_| TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_millis(1500)).is_ok())
            .count()
    })
    .join()
    .unwrap()
}

/// The red team's blind reset spray, with real TCP: an idle NodePort
/// connection from outside to another node's backend (source NAT), and a
/// host on the nodes' segment that forges, as that backend, an RST and a
/// FIN to every source-NAT port of the node (it sees no sequence number,
/// so it guesses one). The connection must stay established and keep
/// working after the short timers (before the sequence checks, the RST
/// marked it closing, and after a second of quiet its translation was
/// gone). The real endings still count: the client's own reset (an abort,
/// at the place the backend acknowledged) closes the next connection.
#[test]
fn a_blind_reset_spray_at_the_source_nat_ports_leaves_idle_connections_alone() {
    use datapath_tests::{
        lab::{UPLINK, mac_of, send_raw_frames},
        packets::{ETH_P_IP, Ipv4, TCP_ACK, TCP_FIN, ethernet},
    };
    const TCP_RST: u8 = 0x04;
    datapath_tests::require_root!();
    let mut lab = outside_lab("native");
    let all = lab.backend_ips();
    // Node B's backends only: every connection through node A is source NATed.
    let remote = all[1..].to_vec();
    set_outside_services(
        &mut lab,
        &format!(
            "conntrack_closing_seconds = 1\nconntrack_half_closed_seconds = 2\n{}",
            cluster_node_port_service(&remote)
        ),
    );
    wait_served(&lab.a, NODE_A, 30090, &remote);
    let outside = outside_host("np-rst", OUTSIDE);
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Result<Ipv4Addr, String>>();
    let client = in_netns(&outside.path(), move || {
        let mut conn = TcpStream::connect_timeout(&(NODE_A, 30090).into(), Duration::from_secs(3)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut lines = BufReader::new(conn.try_clone().unwrap());
        let mut ask = |conn: &mut TcpStream| -> Result<Ipv4Addr, String> {
            writeln!(conn, "who").map_err(|e| e.to_string())?;
            let mut line = String::new();
            lines.read_line(&mut line).map_err(|e| e.to_string())?;
            Ok(parse_answer(&line).0)
        };
        back_tx.send(ask(&mut conn)).unwrap();
        while let Ok(what) = rx.recv() {
            match what {
                "ask" => back_tx.send(ask(&mut conn)).unwrap(),
                _ => {
                    // An abort: SO_LINGER 0 sends an RST at the exact place.
                    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(conn);
                    return;
                }
            }
        }
    });
    let backend = back_rx.recv().unwrap().expect("the first answer");
    assert!(remote.contains(&backend), "{backend}");
    let state = |agent: &datapath_tests::lab::Node| {
        agent
            .inspect("conntrack")
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_ip"] == OUTSIDE.to_string() && c["service_port"] == 30090)
            .map(|c| c["state"].clone())
    };
    assert_eq!(state(&lab.a), Some(serde_json::json!("established")));

    let attacker = outside_host("np-rst-x", Ipv4Addr::new(10, 250, 0, 66));
    let (node_mac, my_mac) = (mac_of(&lab.a.netns, UPLINK), mac_of(&attacker, "eth0"));
    let spray: Vec<Vec<u8>> = datapath_common::SNAT_PORT_RANGES
        .iter()
        .flat_map(|range| range.clone())
        .flat_map(|port| {
            [TCP_RST, TCP_FIN | TCP_ACK].map(|flags| {
                let ip = Ipv4::tcp(backend.octets(), 8080, NODE_A.octets(), port, flags, &[])
                    .with_seq_ack(0x4000_0000 + u32::from(port), 0x2000_0000);
                ethernet(node_mac, my_mac, ETH_P_IP, &ip.bytes())
            })
        })
        .collect();
    eprintln!("spraying {} forged RSTs and FINs as {backend}:8080", spray.len());
    send_raw_frames(&attacker, "eth0", spray).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after_spray = state(&lab.a);
    // Longer than the closing and half-closed timers and a sweep.
    std::thread::sleep(Duration::from_secs(8));
    let later = state(&lab.a);
    tx.send("ask").unwrap();
    let answer = back_rx.recv().unwrap();
    eprintln!("after the spray: {after_spray:?}; 8 s later: {later:?}; answer {answer:?}");
    assert_eq!(after_spray, Some(serde_json::json!("established")), "a blind spray changed the connection");
    assert_eq!(later, Some(serde_json::json!("established")));
    assert_eq!(answer, Ok(backend), "the idle connection still works");

    // The client's real reset closes it.
    tx.send("abort").unwrap();
    client.join().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = state(&lab.a);
        if now.is_none() || now == Some(serde_json::json!("closing")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the client's real RST did not close it: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The red team's answered UDP flood: a host on the nodes' segment sends
/// datagrams from 4,000 faked sources to a UDP node port whose backend
/// answers every one. Answered or not, UDP from outside counts against
/// `conntrack_max_outside` (here 256, a quarter of a 2,048-entry table),
/// so the flood holds that share and a pod on the node keeps its Services
/// (before, every answered flow left the budget and the table filled:
/// pods 0/20).
#[test]
fn an_answered_udp_flood_from_faked_outside_sources_leaves_the_pods_their_services() {
    use datapath_tests::{
        lab::{UPLINK, mac_of, send_raw_frames},
        packets::{ETH_P_IP, Ipv4, ethernet},
    };
    datapath_tests::require_root!();
    let mut lab = outside_lab("native");
    let a2 = lab.backends[0].ip;
    let vip = Ipv4Addr::new(10, 96, 3, 51);
    for node in [&mut lab.a, &mut lab.b] {
        node.set_extra_config(&format!("{OUTSIDE_CLIENTS}conntrack_max_entries = 2048\n"));
        node.stop_agent();
        node.start_agent();
    }
    set_outside_services(
        &mut lab,
        &format!(
            "conntrack_max_entries = 2048\n{}",
            node_port_service("dns", vip, &[a2], WEB_NODE_PORT, Some(DNS_NODE_PORT))
        ),
    );
    wait_served(&lab.a, NODE_A, WEB_NODE_PORT, &[a2]);
    let outside = outside_host("np-udp", OUTSIDE);
    assert_eq!(ask_udp(&outside, NODE_A, DNS_NODE_PORT).1.0, a2, "control: UDP from outside is served");
    let pod_connects = |tries: usize| pod_connects(&lab.client.netns, vip, tries);
    assert_eq!(pod_connects(5), 5, "control: the pod reaches the cluster IP");
    let (node_mac, my_mac) = (mac_of(&lab.a.netns, UPLINK), mac_of(&outside, "eth0"));
    let flood: Vec<Vec<u8>> = (100u8..140)
        .flat_map(|host| (0..100u16).map(move |port| (host, port)))
        .map(|(host, port)| {
            let udp =
                Ipv4::udp([10, 250, 0, host], 20000 + port, NODE_A.octets(), DNS_NODE_PORT, b"who\n", true);
            ethernet(node_mac, my_mac, ETH_P_IP, &udp.bytes())
        })
        .collect();
    let refused_before = lab.a.drop_count("conntrack_outside_limit");
    send_raw_frames(&outside, "eth0", flood).unwrap();
    // The backend answers what got through.
    std::thread::sleep(Duration::from_secs(1));
    let served = pod_connects(20);
    let tracked = lab.a.inspect("conntrack").as_array().unwrap().len();
    let refused = lab.a.drop_count("conntrack_outside_limit") - refused_before;
    let limit = lab.a.inspect("config")["conntrack_max_outside"].as_u64().unwrap();
    eprintln!(
        "4000 faked answered datagrams: {tracked} flows tracked (limit {limit}); {refused} dropped; pod served {served}/20"
    );
    assert_eq!(limit, 256, "a quarter of the 2048-entry table");
    // Half of it is UDP's.
    let share = limit / 2;
    assert_eq!(served, 20, "a pod denied its Service by an answered UDP flood from outside");
    assert!(
        tracked as u64 <= share + 40,
        "the flood holds UDP's share ({share}) and no more: {tracked} tracked"
    );
    assert!(refused >= 4000 - share - 2, "the rest of the flood is dropped and counted: {refused}");
}

/// The node's own sockets on source-NAT ports (red team, stop 27: with
/// 1,988 of the node's own connections open from ports 1024-3023, 300
/// outside clients through a node port broke 20 of them). A NodePort
/// connection to another node's backend never takes a port on which the
/// node's stack has a socket for that backend. Node A holds 1,000 TCP
/// connections and 1,000 connected UDP sockets of its own to the backend,
/// from ports 1024-2023, while an outside host makes 300 TCP connections
/// and 300 UDP queries through node A's node ports to the same backend (at
/// random, about 9 of each would meet one of the node's ports). Each of
/// both sides is answered, by the right peer.
#[test]
fn source_nat_leaves_the_ports_of_the_nodes_own_sockets_alone() {
    use socket2::{Domain, Socket, Type};
    const OWN: std::ops::Range<u16> = 1024..2024;
    const OUTSIDE_FLOWS: usize = 300;
    datapath_tests::require_root!();
    raise_open_files_limit();
    let mut lab = outside_lab("native");
    let backend = lab.backends[1].ip;
    set_outside_services(&mut lab, &cluster_node_port_service(&[backend]));
    wait_served(&lab.a, NODE_A, 30090, &[backend]);

    let (own_tcp, own_udp) = in_netns(&lab.a.netns.path(), move || {
        let tcp: Vec<TcpStream> = OWN
            .map(|port| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket.bind(&SocketAddr::from((NODE_A, port)).into()).unwrap();
                socket
                    .connect_timeout(&SocketAddr::from((backend, 8080)).into(), Duration::from_secs(3))
                    .unwrap();
                socket.into()
            })
            .collect();
        let udp: Vec<UdpSocket> = OWN
            .map(|port| {
                let socket = UdpSocket::bind((NODE_A, port)).unwrap();
                socket.connect((backend, 5353)).unwrap();
                socket
            })
            .collect();
        (tcp, udp)
    })
    .join()
    .unwrap();

    let outside = outside_host("np-own", OUTSIDE);
    let outside_failed = in_netns(&outside.path(), move || {
        let mut failed = Vec::new();
        let mut open = Vec::new();
        for i in 0..OUTSIDE_FLOWS {
            let tcp = (|| -> std::io::Result<(Ipv4Addr, Ipv4Addr)> {
                let mut conn = TcpStream::connect_timeout(&(NODE_A, 30090).into(), Duration::from_secs(2))?;
                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                writeln!(conn, "who")?;
                let mut line = String::new();
                BufReader::new(conn.try_clone()?).read_line(&mut line)?;
                open.push(conn);
                Ok(parse_answer(&line))
            })();
            if tcp.as_ref().ok() != Some(&(backend, NODE_A)) {
                failed.push(format!("tcp {i}: {tcp:?}"));
            }
            let udp = (|| -> std::io::Result<(SocketAddr, String)> {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.send_to(b"who\n", (NODE_A, 30091))?;
                let mut buf = [0u8; 256];
                let (n, from) = socket.recv_from(&mut buf)?;
                Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()))
            })();
            match &udp {
                Ok((from, answer))
                    if *from == (NODE_A, 30091).into() && parse_answer(answer) == (backend, NODE_A) => {}
                _ => failed.push(format!("udp {i}: {udp:?}")),
            }
        }
        failed
    })
    .join()
    .unwrap();

    let mut own_failed = Vec::new();
    for (port, mut conn) in OWN.zip(own_tcp) {
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let answer = (|| -> std::io::Result<(Ipv4Addr, Ipv4Addr)> {
            writeln!(conn, "who")?;
            let mut line = String::new();
            BufReader::new(conn.try_clone()?).read_line(&mut line)?;
            Ok(parse_answer(&line))
        })();
        if answer.as_ref().ok() != Some(&(backend, NODE_A)) {
            own_failed.push(format!("tcp from {port}: {answer:?}"));
        }
    }
    for (port, socket) in OWN.zip(own_udp) {
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let answer = (|| -> std::io::Result<String> {
            socket.send(b"who\n")?;
            let mut buf = [0u8; 256];
            let n = socket.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })();
        if answer.as_deref().map(parse_answer).ok() != Some((backend, NODE_A)) {
            own_failed.push(format!("udp from {port}: {answer:?}"));
        }
    }
    eprintln!(
        "outside flows failed: {} of {}; the node's own failed: {} of {}\n{outside_failed:#?}\n{own_failed:#?}",
        outside_failed.len(),
        2 * OUTSIDE_FLOWS,
        own_failed.len(),
        2 * OWN.len()
    );
    assert!(outside_failed.is_empty() && own_failed.is_empty(), "source NAT met the node's own sockets");
}

/// As many open files as the hard limit allows: the test holds a few
/// thousand sockets.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}
