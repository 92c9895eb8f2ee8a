//! Which backends a Service's new connections go to, in the lab, in both
//! modes: internalTrafficPolicy Local (only the client's node's backends;
//! none there but some elsewhere: dropped, as kube-proxy does), graceful
//! termination (terminating backends that still serve take new connections
//! only while no backend is ready; open connections go on through every
//! change) and external / load balancer addresses (clients in the cluster
//! reach the Service there too, with every backend). Real pods made by the
//! CNI plugin, real sockets, Services from the agents' config files.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use datapath_tests::{
    in_both_modes,
    lab::{Netns, Pod, in_netns},
};

use super::services::{connect, lab, parse_answer, service, wait_programmed};

const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const ELSEWHERE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
const GRACEFUL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 12);
const EXTERNAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
/// Outside the cluster's ranges, as a real external address would be.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

/// A Service as [`service`] writes it, with `extra` lines (fields of the
/// `[[services]]` table) before its backends.
fn service_with(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr], extra: &str) -> String {
    service(name, vip, backends).replacen("backends =", &format!("{extra}\nbackends ="), 1)
}

/// One request on a connection: the backend that answered.
fn ask(conn: &mut TcpStream) -> Ipv4Addr {
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    writeln!(conn, "who").unwrap();
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).expect("answer");
    parse_answer(&line).0
}

/// The backends `n` new connections from `client` to `vip` reached.
fn backends_reached(client: &Pod, vip: Ipv4Addr, n: usize) -> std::collections::BTreeSet<Ipv4Addr> {
    (0..n).map(|_| ask(&mut connect(client, vip).expect("connect"))).collect()
}

/// A connection attempt from `netns` with a short timeout: how it failed.
fn connect_error(netns: &Netns, address: Ipv4Addr) -> ErrorKind {
    in_netns(&netns.path(), move || {
        TcpStream::connect_timeout(&(address, 80).into(), Duration::from_millis(1500))
    })
    .join()
    .unwrap()
    .map(|_| panic!("{address}:80 answered"))
    .unwrap_err()
    .kind()
}

fn internal_traffic_policy_local(mode: &str) {
    let mut lab = lab(mode);
    let [a2, b1, b2] = [lab.backends[0].ip, lab.backends[1].ip, lab.backends[2].ip];
    let local = "internal_traffic_policy = \"Local\"";
    lab.set_services(&format!(
        "{}{}",
        service_with("local", LOCAL_VIP, &[a2, b1, b2], local),
        service_with("elsewhere", ELSEWHERE_VIP, &[b1], local),
    ));
    // Each node keeps its own backends.
    wait_programmed(&lab.a, LOCAL_VIP, &[a2]);
    wait_programmed(&lab.b, LOCAL_VIP, &[b1, b2]);
    wait_programmed(&lab.a, ELSEWHERE_VIP, &[]);
    wait_programmed(&lab.b, ELSEWHERE_VIP, &[b1]);

    assert_eq!(backends_reached(&lab.client, LOCAL_VIP, 20), [a2].into(), "{mode}: node A's pod stays on A");
    assert_eq!(
        backends_reached(&lab.backends[2], LOCAL_VIP, 30),
        [b1, b2].into(),
        "{mode}: node B's pod reaches both of B's backends, never A's"
    );
    // The node's own sockets (socket load balancing) keep to it too.
    let node = lab.a.netns.path();
    let host = in_netns(&node, move || {
        (0..10)
            .map(|_| {
                let mut conn = TcpStream::connect_timeout(&(LOCAL_VIP, 80).into(), Duration::from_secs(3))
                    .expect("the node connects");
                ask(&mut conn)
            })
            .collect::<std::collections::BTreeSet<_>>()
    })
    .join()
    .unwrap();
    assert_eq!(host, [a2].into(), "{mode}: node A's own connections stay on A");

    // Backends only on node B: A drops (no answer, counted), B serves.
    let before = lab.a.drop_count("service_no_local_backend");
    assert_eq!(
        connect_error(&lab.client.netns, ELSEWHERE_VIP),
        ErrorKind::TimedOut,
        "{mode}: dropped without an answer, as kube-proxy does"
    );
    assert!(lab.a.drop_count("service_no_local_backend") > before, "{mode}: counted");
    assert_eq!(backends_reached(&lab.backends[2], ELSEWHERE_VIP, 5), [b1].into());
    let services = lab.a.inspect("services");
    let row = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["cluster_ip"] == ELSEWHERE_VIP.to_string() && s["port"] == 80)
        .unwrap();
    assert_eq!(row["without_backends"], "drop", "{row}");

    // Once no node has a backend, every node refuses at once again.
    lab.set_services(&service_with("elsewhere", ELSEWHERE_VIP, &[], local));
    wait_programmed(&lab.b, ELSEWHERE_VIP, &[]);
    let refused_in_time = |node: &datapath_tests::lab::Node| {
        node.inspect("services")
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["cluster_ip"] == ELSEWHERE_VIP.to_string() && s["without_backends"] == "refuse")
    };
    datapath_tests::wait_for("node A refuses", Duration::from_secs(10), || refused_in_time(&lab.a));
    assert_eq!(connect_error(&lab.client.netns, ELSEWHERE_VIP), ErrorKind::ConnectionRefused, "{mode}");
}

in_both_modes! { internal_traffic_policy_local_keeps_each_node_on_its_own_backends => internal_traffic_policy_local; }

fn graceful_termination(mode: &str) {
    let mut lab = lab(mode);
    let [a2, b1] = [lab.backends[0].ip, lab.backends[1].ip];
    let services = |ready: &[Ipv4Addr], terminating: &[Ipv4Addr]| {
        let list: Vec<String> = terminating.iter().map(|ip| format!("\"{ip}\"")).collect();
        service_with("web", GRACEFUL_VIP, ready, &format!("terminating_backends = [{}]", list.join(", ")))
    };
    lab.set_services(&services(&[b1], &[]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &[b1]);
    let mut open = connect(&lab.client, GRACEFUL_VIP).unwrap();
    assert_eq!(ask(&mut open), b1);

    // b1 starts terminating while a2 is ready: new connections go to a2
    // only, the open one stays with b1.
    lab.set_services(&services(&[a2], &[b1]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &[a2]);
    assert_eq!(backends_reached(&lab.client, GRACEFUL_VIP, 20), [a2].into(), "{mode}: ready ones first");
    assert_eq!(ask(&mut open), b1, "{mode}: the open connection to the terminating backend goes on");

    // No ready backend left: the terminating one that still serves takes
    // new connections rather than the Service refusing them.
    lab.set_services(&services(&[], &[b1]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &[b1]);
    assert_eq!(backends_reached(&lab.client, GRACEFUL_VIP, 10), [b1].into(), "{mode}: serving fallback");
    assert_eq!(ask(&mut open), b1, "{mode}");

    // Gone from the lists: new connections are refused; the open one still
    // reaches its pod (it is alive here), as connections are never cut.
    lab.set_services(&services(&[], &[]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &[]);
    assert_eq!(connect_error(&lab.client.netns, GRACEFUL_VIP), ErrorKind::ConnectionRefused, "{mode}");
    assert_eq!(ask(&mut open), b1, "{mode}: an open connection is never cut by the agent");
}

in_both_modes! { terminating_backends_serve_only_while_none_is_ready => graceful_termination; }

fn external_addresses(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    lab.set_services(&service_with(
        "web",
        EXTERNAL_VIP,
        &all,
        &format!(
            "external_ips = [\"{EXTERNAL_IP}\"]\nload_balancer_ips = [\"{LOAD_BALANCER_IP}\"]\n\
             internal_traffic_policy = \"Local\""
        ),
    ));
    // The cluster IP keeps to node A's backend; the external addresses
    // serve every backend (internalTrafficPolicy is about the cluster IP).
    wait_programmed(&lab.a, EXTERNAL_VIP, &[all[0]]);
    wait_programmed(&lab.a, EXTERNAL_IP, &all);
    wait_programmed(&lab.a, LOAD_BALANCER_IP, &all);
    for address in [EXTERNAL_IP, LOAD_BALANCER_IP] {
        let reached = backends_reached(&lab.client, address, 40);
        assert_eq!(reached.len(), all.len(), "{mode}: {address} reaches every backend: {reached:?}");
        // The client sees only the address it asked for.
        let conn = connect(&lab.client, address).unwrap();
        assert_eq!(conn.peer_addr().unwrap(), (address, 80).into());
        // And the node's own sockets reach it too (socket load balancing).
        let node = lab.a.netns.path();
        in_netns(&node, move || {
            let mut conn = TcpStream::connect_timeout(&(address, 80).into(), Duration::from_secs(3))
                .expect("the node connects to the external address");
            ask(&mut conn)
        })
        .join()
        .unwrap();
    }
    // UDP too, from a fresh socket: the reply comes from the address asked.
    let client = lab.client.netns.path();
    let from = in_netns(&client, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send_to(b"who\n", (EXTERNAL_IP, 53)).unwrap();
        let mut buf = [0u8; 256];
        socket.recv_from(&mut buf).expect("a UDP answer").1
    })
    .join()
    .unwrap();
    assert_eq!(from, (EXTERNAL_IP, 53).into(), "{mode}");
}

in_both_modes! { external_and_load_balancer_addresses_reach_every_backend_from_the_cluster => external_addresses; }

/// One query on a connected UDP socket: the backend that answered.
fn ask_udp(socket: &std::net::UdpSocket) -> std::io::Result<Ipv4Addr> {
    socket.send(b"who\n")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf)?;
    Ok(parse_answer(&String::from_utf8_lossy(&buf[..n])).0)
}

fn udp_flows(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    let services = |ready: &[Ipv4Addr], terminating: &[Ipv4Addr]| {
        let list: Vec<String> = terminating.iter().map(|ip| format!("\"{ip}\"")).collect();
        service_with("dns", GRACEFUL_VIP, ready, &format!("terminating_backends = [{}]", list.join(", ")))
    };
    lab.set_services(&services(&all, &[]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &all);
    // One long UDP flow: the same socket, the same 5-tuple, all along.
    let client = lab.client.netns.path();
    let socket = in_netns(&client, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((GRACEFUL_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket
    })
    .join()
    .unwrap();
    let first = ask_udp(&socket).expect("an answer");
    let others: Vec<Ipv4Addr> = all.iter().copied().filter(|ip| *ip != first).collect();

    // Its backend terminates but still serves: the flow stays with it.
    lab.set_services(&services(&others, &[first]));
    wait_programmed(&lab.a, GRACEFUL_VIP, &others);
    for _ in 0..5 {
        assert_eq!(ask_udp(&socket).unwrap(), first, "{mode}: a serving backend keeps its UDP flow");
    }

    // It leaves the Service: the flow moves to a backend that serves (its
    // old backend is still alive here, so only the agent can move it).
    lab.set_services(&services(&others, &[]));
    datapath_tests::wait_for("the flow moves off the backend that left", Duration::from_secs(10), || {
        ask_udp(&socket).is_ok_and(|backend| backend != first)
    });
    for _ in 0..5 {
        assert!(others.contains(&ask_udp(&socket).unwrap()), "{mode}: stays on a serving backend");
    }
}

in_both_modes! { a_udp_flow_leaves_a_backend_only_when_it_leaves_the_service => udp_flows; }
