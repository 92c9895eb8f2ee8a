//! Kubernetes mode against an API server that serves real Node objects
//! (tests/src/kube_api.rs): the agents learn their own pod CIDR and address
//! from their Node, program peers from the Node list as it changes (pod CIDR
//! assigned later, node deleted), ride out bookmarks, disconnects and server
//! errors without touching the maps, and the result forwards for real.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use datapath_tests::{
    kube_api::{FakeApiServer, node_object},
    lab::{Fabric, Netns, Node, Pod, http_get_local, in_netns, ping, try_http_get_local},
    netpol::{Servers, connects},
    netpol_cases::Protocol,
    require_root, sh, wait_for,
};

const API_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

fn peer_cidrs(node: &Node) -> Vec<String> {
    node.inspect("nodes")
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pod_cidr"].as_str().unwrap().to_owned())
        .collect()
}

/// The API server on the physical network and node A (10.244.1.0/24 at
/// 10.250.0.1) with its Node object, configured for kubernetes mode, not started.
fn one_node_in_kubernetes_mode(fabric: &Fabric) -> (FakeApiServer, Node) {
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    let kubeconfig = api.kubeconfig(&a.work_dir);
    a.use_kubernetes(&kubeconfig);
    (api, a)
}

fn health(ns: &Netns, path: &str) -> u16 {
    http_get_local(ns, 9976, path).0
}

/// Once ready, the agent sets its Node's `NetworkUnavailable` condition to
/// False (as flannel and Cilium do; a cloud's route controller sets it True
/// on a new node, and the scheduler keeps pods off until a CNI clears it),
/// with a strategic merge patch of nodes/status that leaves the kubelet's
/// conditions alone, and retries when the API server fails the patch.
#[test]
fn a_ready_agent_clears_its_nodes_network_unavailable_condition() {
    require_root!();
    let fabric = Fabric::new();
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let mut node = node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1");
    node["status"]["conditions"] = serde_json::json!([
        { "type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
          "message": "Node created without a route" },
        { "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status" },
    ]);
    api.apply(node);
    let kubeconfig = api.kubeconfig(&a.work_dir);
    a.use_kubernetes(&kubeconfig);
    let status_path = format!("/api/v1/nodes/{}/status", a.id);
    // The first two patches fail: the agent retries.
    api.fail_next(&status_path, 2);
    a.start_agent();
    let condition = |kind: &str| {
        api.object("Node", &a.id).and_then(|n| {
            n["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).cloned()
        })
    };
    wait_for("NetworkUnavailable False", Duration::from_secs(30), || {
        condition("NetworkUnavailable").is_some_and(|c| c["status"] == "False")
    });
    let cleared = condition("NetworkUnavailable").unwrap();
    assert_eq!(cleared["reason"], "DatapathIsUp", "{cleared}");
    assert!(cleared["lastTransitionTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{cleared}");
    let ready = condition("Ready").expect("the kubelet's condition stays");
    assert_eq!(ready["reason"], "KubeletReady");
    let patches =
        api.requests().iter().filter(|r| r.starts_with("PATCH ") && r.contains(&status_path)).count();
    assert_eq!(patches, 3, "two failed, one taken: {:?}", api.requests());
    assert_eq!(health(&a.netns, "/readyz"), 200);
    assert!(a.agent_log().contains("Node condition NetworkUnavailable set to False"), "{}", a.agent_log());
}

#[test]
fn agents_follow_the_node_list_and_forward() {
    require_root!();
    let fabric = Fabric::new();
    // The API server sits on the physical network, as in a real cluster.
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);

    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let mut b = Node::on_fabric(&fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), "native");
    let mut c = Node::on_fabric(&fabric, "10.244.3.0/24", Ipv4Addr::new(10, 250, 0, 3), "native");
    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2"));
    // C has registered but has no pod CIDR yet.
    api.apply(node_object(&c.id, None, "10.250.0.3"));
    // An unrelated dual-stack node without an InternalIPv4 is ignored.
    let mut odd = node_object("odd", Some("fd00:10:244:9::/64"), "fd00::9");
    odd["spec"]["podCIDRs"] = serde_json::json!(["fd00:10:244:9::/64"]);
    api.apply(odd);

    for node in [&mut a, &mut b] {
        let kubeconfig = api.kubeconfig(&node.work_dir);
        node.use_kubernetes(&kubeconfig);
        node.start_agent();
    }
    wait_for("A to know B", Duration::from_secs(40), || peer_cidrs(&a) == ["10.244.2.0/24"]);
    assert_eq!(peer_cidrs(&b), ["10.244.1.0/24"]);
    assert!(a.agent_log().contains("node facts from its Node object"), "{}", a.agent_log());
    wait_for("A ready", Duration::from_secs(40), || health(&a.netns, "/readyz") == 200);
    assert_eq!(health(&a.netns, "/healthz"), 200);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.written_cni_config()).unwrap()).unwrap();
    assert_eq!(written["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24", "{written}");

    let a1 = a.add_pod("a1");
    let b1 = b.add_pod("b1");
    assert!(ping(&a1.netns, b1.ip, 2), "A -> B from the Node list");

    // C gets its pod CIDR later: A and B add it; C's agent can start now.
    api.apply(node_object(&c.id, Some("10.244.3.0/24"), "10.250.0.3"));
    wait_for("A to add C", Duration::from_secs(40), || peer_cidrs(&a) == ["10.244.2.0/24", "10.244.3.0/24"]);
    let kubeconfig = api.kubeconfig(&c.work_dir);
    c.use_kubernetes(&kubeconfig);
    c.start_agent();
    wait_for("C to know A and B", Duration::from_secs(40), || peer_cidrs(&c).len() == 2);
    let c1 = c.add_pod("c1");
    assert!(ping(&a1.netns, c1.ip, 2), "A -> C");
    assert!(ping(&c1.netns, b1.ip, 2), "C -> B");

    // Bookmarks, a label change, dropped watches and a burst of 500s: the
    // maps must not move, forwarding must not stop.
    let before = (a.inspect("nodes"), b.inspect("nodes"), c.inspect("nodes"));
    api.bookmark();
    let mut relabelled = node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2");
    relabelled["metadata"]["labels"]["tier"] = "gold".into();
    api.apply(relabelled);
    api.fail_next("/api/v1/nodes", 4);
    api.disconnect_watches();
    wait_for("the failing Node lists to reach an agent", Duration::from_secs(40), || {
        [&a, &b, &c].iter().any(|n| n.agent_log().contains("Node watch failed"))
    });
    assert!(ping(&a1.netns, b1.ip, 2), "forwarding during API trouble");
    wait_for("the watches to come back", Duration::from_secs(40), || {
        api.requests().iter().filter(|r| r.contains("watch=")).count() >= 6
    });
    assert_eq!((a.inspect("nodes"), b.inspect("nodes"), c.inspect("nodes")), before, "maps unchanged");
    let logs = [a.agent_log(), b.agent_log(), c.agent_log()].concat();
    assert!(logs.contains("Node watch failed"), "the 500s reached an agent's watcher: {logs}");

    // B's InternalIP changes: A re-points B's CIDR (one map update and a
    // route replace), then back.
    let node_ip_of_b = |a: &Node| {
        a.inspect("nodes").as_array().unwrap().iter().find(|n| n["pod_cidr"] == "10.244.2.0/24").unwrap()["node_ip"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.12"));
    wait_for("A to follow B's new address", Duration::from_secs(40), || node_ip_of_b(&a) == "10.250.0.12");
    // (The map is written first, the node's route a moment later.)
    wait_for("A's route to follow", Duration::from_secs(5), || {
        a.host_routes().contains("10.244.2.0/24 via 10.250.0.12")
    });
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2"));
    wait_for("A to follow B back", Duration::from_secs(40), || node_ip_of_b(&a) == "10.250.0.2");
    assert!(ping(&a1.netns, b1.ip, 2), "A -> B after the address came back");

    // C is deleted: A and B stop routing to it (maps and node routes).
    api.delete(&c.id);
    wait_for("A to drop C", Duration::from_secs(40), || peer_cidrs(&a) == ["10.244.2.0/24"]);
    wait_for("B to drop C", Duration::from_secs(40), || peer_cidrs(&b) == ["10.244.1.0/24"]);
    wait_for("A's route to C to go", Duration::from_secs(5), || !a.host_routes().contains("10.244.3.0/24"));
    assert!(ping(&a1.netns, b1.ip, 1), "A -> B unaffected");
    drop((a1, b1, c1));
}

#[test]
fn kubernetes_mode_refuses_a_file_that_sets_what_the_node_decides() {
    require_root!();
    let fabric = Fabric::new();
    let (_api, a) = one_node_in_kubernetes_mode(&fabric);
    let mut text = std::fs::read_to_string(a.config_path()).unwrap();
    text = text.replacen("source = ", "pod_cidr = \"10.244.1.0/24\"\nsource = ", 1);
    std::fs::write(a.config_path(), text).unwrap();
    let out = a
        .in_node(&datapath_tests::bin_dir().join("datapath-agent"))
        .args(["run", "--config"])
        .arg(a.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`pod_cidr`") && stderr.contains("Node object"), "{stderr}");
}

/// A Service and its EndpointSlice as the API server serves them.
fn service_objects(vip: &str, ready: &[(Ipv4Addr, bool)]) -> (serde_json::Value, serde_json::Value) {
    let service = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "web", "namespace": "shop", "uid": "uid-web" },
        "spec": { "clusterIP": vip, "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": "http" }] },
    });
    let endpoints: Vec<serde_json::Value> = ready
        .iter()
        .map(|(ip, ready)| serde_json::json!({ "addresses": [ip.to_string()], "conditions": { "ready": ready } }))
        .collect();
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": "web-abc12", "namespace": "shop", "uid": "uid-web-abc12",
                      "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints,
    });
    (service, slice)
}

#[test]
fn services_follow_service_and_endpointslice_objects() {
    require_root!();
    use std::io::{Read as _, Write as _};
    let fabric = Fabric::new();
    let (api, mut a) = one_node_in_kubernetes_mode(&fabric);
    a.start_agent();
    wait_for("A ready", Duration::from_secs(40), || health(&a.netns, "/readyz") == 200);
    let client = a.add_pod("client");
    let backend = a.add_pod("backend");
    let not_ready = a.add_pod("notready");
    // The backend answers on its named target port, 8080.
    let ip = backend.ip;
    let listener = datapath_tests::lab::in_netns(&backend.netns.path(), move || {
        std::net::TcpListener::bind((ip, 8080)).unwrap()
    })
    .join()
    .unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"hello from the backend");
        }
    });

    let (service, slice) = service_objects("10.96.0.10", &[(backend.ip, true), (not_ready.ip, false)]);
    api.apply(service);
    api.apply(slice);
    let programmed = |a: &Node| {
        a.inspect("services")
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let backends: Vec<String> = s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| format!("{}:{}", b["ip"].as_str().unwrap(), b["port"]))
                    .collect();
                // (An external address's entry for clients outside the
                // cluster is marked: its backends follow externalTrafficPolicy.)
                format!(
                    "{}/{} {}:{}{} {}",
                    s["namespace"].as_str().unwrap(),
                    s["name"].as_str().unwrap(),
                    s["cluster_ip"].as_str().unwrap(),
                    s["port"],
                    if s["clients"] == "outside" { " (outside)" } else { "" },
                    backends.join(",")
                )
            })
            .collect::<Vec<_>>()
    };
    let want = vec![format!("shop/web 10.96.0.10:80 {}:8080", backend.ip)];
    wait_for("the Service programmed from the API", Duration::from_secs(40), || programmed(&a) == want);

    let fetch = |client: &datapath_tests::lab::Pod| {
        datapath_tests::lab::in_netns(&client.netns.path(), || -> std::io::Result<String> {
            let mut conn = std::net::TcpStream::connect_timeout(
                &(Ipv4Addr::new(10, 96, 0, 10), 80).into(),
                Duration::from_secs(3),
            )?;
            let mut text = String::new();
            conn.read_to_string(&mut text)?;
            Ok(text)
        })
        .join()
        .unwrap()
    };
    assert_eq!(fetch(&client).expect("through the Service"), "hello from the backend");

    // A second slice of the same Service adds its endpoint; an IPv6 slice
    // with the same label changes nothing; removing the second slice takes
    // its endpoint away again (each event recomputes that Service alone).
    let extra_slice = |name: &str, address_type: &str, address: String| {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                          "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": address_type,
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [address], "conditions": { "ready": true } }],
        })
    };
    api.apply(extra_slice("web-def34", "IPv4", client.ip.to_string()));
    // Backends in address order (slots follow the order they came in).
    let sorted = |mut list: Vec<String>| {
        for entry in &mut list {
            let (head, backends) = entry.rsplit_once(' ').unwrap();
            let mut backends: Vec<&str> = backends.split(',').collect();
            backends.sort_by_key(|b| b.parse::<std::net::SocketAddrV4>().unwrap());
            *entry = format!("{head} {}", backends.join(","));
        }
        list
    };
    let both = sorted(vec![format!("shop/web 10.96.0.10:80 {}:8080,{}:8080", backend.ip, client.ip)]);
    wait_for("the second slice's endpoint added", Duration::from_secs(40), || sorted(programmed(&a)) == both);
    // The IPv6 slice's event comes before the deletion's on the same watch:
    // once the deletion shows, the IPv6 slice was seen and added nothing.
    api.apply(extra_slice("web-v6", "IPv6", "fd00::5".to_owned()));
    api.delete_object("EndpointSlice", "shop/web-def34");
    wait_for(
        "the second slice's endpoint removed, nothing from the IPv6 slice",
        Duration::from_secs(40),
        || programmed(&a) == want,
    );

    // The endpoint terminates but still serves and no other is ready: it
    // keeps taking new connections (kube-proxy's fallback). An externalIP
    // on the Service serves the same backend.
    let (mut with_external, mut terminating) = service_objects("10.96.0.10", &[]);
    with_external["spec"]["externalIPs"] = serde_json::json!(["203.0.113.7"]);
    terminating["endpoints"] = serde_json::json!([{
        "addresses": [backend.ip.to_string()],
        "conditions": { "ready": false, "serving": true, "terminating": true }
    }]);
    api.apply(with_external);
    api.apply(terminating);
    // (No entry for clients outside: `serve_outside_clients` is off by default.)
    let mut both_addresses = vec![
        format!("shop/web 10.96.0.10:80 {}:8080", backend.ip),
        format!("shop/web 203.0.113.7:80 {}:8080", backend.ip),
    ];
    both_addresses.sort();
    wait_for("the terminating endpoint serves, on both addresses", Duration::from_secs(40), || {
        let mut rows = programmed(&a);
        rows.sort();
        rows == both_addresses
    });
    assert_eq!(fetch(&client).expect("through the Service"), "hello from the backend");
    let (service, _) = service_objects("10.96.0.10", &[]);
    api.apply(service);

    // The endpoint goes unready: new connections are refused at once.
    let (_, slice) = service_objects("10.96.0.10", &[(backend.ip, false)]);
    api.apply(slice);
    wait_for("no backends left", Duration::from_secs(40), || {
        programmed(&a) == vec!["shop/web 10.96.0.10:80 ".to_owned()]
    });
    let err = fetch(&client).expect_err("no ready endpoint");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // The Service is deleted: nothing left programmed.
    api.delete_object("Service", "shop/web");
    wait_for("the Service removed", Duration::from_secs(40), || programmed(&a).is_empty());
}

/// Until the API server gives this node's Node object the agent is live
/// (so the liveness probe does not restart it into CrashLoopBackOff during
/// an API outage) but not ready, and /metrics answers. Once running, it
/// goes unready when a watch has failed for longer than
/// `kubernetes.watch_failure_seconds`, and ready again when it recovers.
#[test]
fn health_is_served_while_waiting_for_the_api_and_follows_the_watches() {
    require_root!();
    let fabric = Fabric::new();
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let kubeconfig = api.kubeconfig(&a.work_dir);
    a.use_kubernetes(&kubeconfig);
    a.set_kubernetes_extra_config("watch_failure_seconds = 2\n");
    // No Node object yet: the agent waits for it.
    a.launch_agent(None);
    let status =
        |a: &Node, path: &str| try_http_get_local(&a.netns, 9976, path).map(|(status, _)| status).ok();
    wait_for("/healthz served while waiting", Duration::from_secs(40), || {
        status(&a, "/healthz") == Some(200)
    });
    assert_eq!(status(&a, "/readyz"), Some(503));
    assert_eq!(status(&a, "/metrics"), Some(200));
    assert!(a.agent_log().contains("cannot read this node's Node object yet"), "{}", a.agent_log());
    assert!(a.agent_running(), "still waiting");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status(&a, "/healthz"), Some(200), "still live");

    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    a.wait_for_agent_socket();
    wait_for("A ready", Duration::from_secs(40), || status(&a, "/readyz") == Some(200));
    let watch_errors = |a: &Node| {
        let (_, body) = try_http_get_local(&a.netns, 9976, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("pod_datapath_kubernetes_watch_errors_total{watch=\"Node\"} "))
            .map(|v| v.parse::<u64>().unwrap())
    };
    let errors_before = watch_errors(&a).expect("the Node watch's errors are exported once it ran");

    // The Node watch fails on and on: not ready after the bound (forwarding
    // and the maps stay as they are meanwhile).
    let before = a.inspect("nodes");
    api.fail_next_lists("/api/v1/nodes", 1_000);
    api.disconnect_watches();
    wait_for("unready while the Node watch fails", Duration::from_secs(40), || {
        status(&a, "/readyz") == Some(503)
    });
    let (_, body) = try_http_get_local(&a.netns, 9976, "/readyz").unwrap();
    assert!(body.contains("the Node watch has been failing"), "{body}");
    let errors = watch_errors(&a).unwrap();
    assert!(errors > errors_before, "watch errors counted: {errors_before} -> {errors}");
    assert_eq!(status(&a, "/healthz"), Some(200), "live all along");
    assert_eq!(a.inspect("nodes"), before);
    api.fail_next_lists("/api/v1/nodes", 0);
    wait_for("ready again once the watch recovers", Duration::from_secs(40), || {
        status(&a, "/readyz") == Some(200)
    });
}

/// Nodes A and B in kubernetes mode with their Node objects, both agents
/// running and each routing to the other; a pod on each.
fn two_nodes_in_kubernetes_mode(fabric: &Fabric) -> (FakeApiServer, Node, Node) {
    two_nodes_in_kubernetes_mode_with(fabric, "")
}

/// [`two_nodes_in_kubernetes_mode`], both agents started with `extra`
/// top-level config lines.
fn two_nodes_in_kubernetes_mode_with(fabric: &Fabric, extra: &str) -> (FakeApiServer, Node, Node) {
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "native");
    let mut b = Node::on_fabric(fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), "native");
    api.apply(node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1"));
    api.apply(node_object(&b.id, Some("10.244.2.0/24"), "10.250.0.2"));
    for node in [&mut a, &mut b] {
        let kubeconfig = api.kubeconfig(&node.work_dir);
        node.set_extra_config(extra);
        node.use_kubernetes(&kubeconfig);
        node.start_agent();
    }
    wait_for("A to know B", Duration::from_secs(40), || peer_cidrs(&a) == ["10.244.2.0/24"]);
    wait_for("B to know A", Duration::from_secs(40), || peer_cidrs(&b) == ["10.244.1.0/24"]);
    (api, a, b)
}

fn peer_routes(node: &Node) -> Vec<(String, String)> {
    node.inspect("nodes")
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["pod_cidr"].as_str().unwrap().to_owned(), n["node_ip"].as_str().unwrap().to_owned()))
        .collect()
}

/// `ping -i 0.002` (500 per second) from `from` to `dst`, `count` of them.
fn ping_flood(from: &Netns, dst: Ipv4Addr, count: u32) -> std::process::Child {
    std::process::Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-q", "-i", "0.002", "-W", "1", "-c"])
        .arg(count.to_string())
        .arg(dst.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// (transmitted, received) of a finished `ping`.
fn ping_result(child: std::process::Child) -> (u32, u32) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

/// A restart in kubernetes mode keeps every peer routed until the first
/// Node list has come, then applies it by diff: SIGKILL + restart under a
/// 2 ms ping flood across nodes loses nothing, with the API healthy and
/// with the API failing its Node lists for a while after the restart.
#[test]
fn kubernetes_mode_restart_loses_nothing_even_while_node_lists_fail() {
    require_root!();
    let fabric = Fabric::new();
    let (api, mut a, b) = two_nodes_in_kubernetes_mode(&fabric);
    let a1 = a.add_pod("a1");
    let b1 = b.add_pod("b1");
    assert!(ping(&a1.netns, b1.ip, 1));
    let routes_before = peer_routes(&a);
    let host_routes = |node: &Node| {
        let mut routes: Vec<String> =
            node.host_routes().lines().filter(|l| l.contains("10.244.2.0/24")).map(str::to_owned).collect();
        routes.sort();
        routes
    };
    let host_routes_before = host_routes(&a);
    let ready = |a: &Node| http_get_local(&a.netns, 9976, "/readyz").0 == 200;

    // 10,000 at 2 ms: longer than both restarts below take.
    let flood = ping_flood(&a1.netns, b1.ip, 10_000);
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    // The API answers at once.
    a.kill_agent();
    a.start_agent();
    wait_for("A ready after the restart", Duration::from_secs(40), || ready(&a));
    assert_eq!(peer_routes(&a), routes_before);

    // The API fails its Node lists: the restarted agent reads its own Node
    // but gets no list for a while; the pinned peers stay routed meanwhile.
    let lists_before = api.requests().len();
    api.fail_next_lists("/api/v1/nodes", 3);
    a.kill_agent();
    a.start_agent();
    wait_for("the failing lists to reach the agent", Duration::from_secs(40), || {
        a.agent_log().contains("Node watch failed")
    });
    assert!(!ready(&a), "not ready before a Node list");
    assert_eq!(peer_routes(&a), routes_before, "peers kept while the lists fail");
    assert_eq!(host_routes(&a), host_routes_before, "node routes kept while the lists fail");
    wait_for("A ready once a list succeeds", Duration::from_secs(40), || ready(&a));
    assert_eq!(peer_routes(&a), routes_before);
    assert!(api.requests()[lists_before..].iter().any(|r| r.starts_with("GET /api/v1/nodes?")));
    let restarts = started.elapsed();

    let mut flood = flood;
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the ping flood ended before the restarts did ({restarts:?}); it must cover them"
    );
    let (transmitted, received) = ping_result(flood);
    eprintln!(
        "kubernetes mode, 2 SIGKILL + restarts (API healthy, then Node lists failing) in {restarts:?}: \
         {received}/{transmitted} pings across nodes"
    );
    assert_eq!(received, transmitted, "pings lost across the restarts");
}

/// A Node whose pod CIDR overlaps one already routed is refused with a
/// warning, whatever its name; the routed node keeps its traffic, also
/// across a restart, and the newcomer is routed once the other one goes.
#[test]
fn a_new_node_clashing_with_a_routed_one_is_refused() {
    require_root!();
    let fabric = Fabric::new();
    let (api, mut a, b) = two_nodes_in_kubernetes_mode(&fabric);
    let a1 = a.add_pod("a1");
    let b1 = b.add_pod("b1");
    let routes_before = peer_routes(&a);
    assert_eq!(routes_before, [("10.244.2.0/24".to_owned(), "10.250.0.2".to_owned())]);

    // "aaa-newcomer" sorts before B's name.
    api.apply(node_object("aaa-newcomer", Some("10.244.2.0/24"), "10.250.0.99"));
    wait_for("A to process the newcomer", Duration::from_secs(40), || {
        a.agent_log().contains("aaa-newcomer") || peer_routes(&a) != routes_before
    });
    assert_eq!(peer_routes(&a), routes_before, "B keeps its CIDR:\n{}", a.agent_log());
    assert!(a.agent_log().contains("clashes with a node already routed"), "{}", a.agent_log());
    assert!(ping(&a1.netns, b1.ip, 2), "A -> B unaffected");

    // A restart: what is pinned decides, not the names.
    a.kill_agent();
    a.start_agent();
    wait_for("A ready", Duration::from_secs(40), || http_get_local(&a.netns, 9976, "/readyz").0 == 200);
    assert_eq!(peer_routes(&a), routes_before, "B keeps its CIDR across a restart");
    assert!(ping(&a1.netns, b1.ip, 2));

    // B goes: the newcomer takes the CIDR.
    api.delete(&b.id);
    wait_for("the newcomer routed", Duration::from_secs(40), || {
        peer_routes(&a) == [("10.244.2.0/24".to_owned(), "10.250.0.99".to_owned())]
    });
}

fn pod_object(namespace: &str, name: &str, app: &str, ip: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 80}]}], "hostNetwork": false},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// NetworkPolicies, Namespaces and Pods from the API server: a policy, a
/// label change and a deletion each reach both nodes' maps, without a
/// policy_dir.
#[test]
fn network_policy_follows_the_api_objects() {
    require_root!();
    let fabric = Fabric::new();
    let (api, a, b) = two_nodes_in_kubernetes_mode(&fabric);
    let web = a.add_pod_as("web", "shop", "web");
    let client = b.add_pod_as("client", "shop", "client");
    let other = b.add_pod_as("other", "shop", "other");
    let _servers = Servers::start(std::slice::from_ref(&web));
    api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    for (name, app, pod) in [("web", "web", &web), ("client", "client", &client), ("other", "other", &other)]
    {
        api.apply(pod_object("shop", name, app, pod.ip));
    }
    let reaches = |from: &Pod| {
        let target = SocketAddr::from((web.ip, 80));
        in_netns(&from.netns.path(), move || connects(Protocol::Tcp, target)).join().unwrap()
    };
    assert!(reaches(&client) && reaches(&other), "no policy: open");
    api.apply(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "shop", "name": "web-from-client"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]}]
        }
    }));
    wait_for("the policy applied from the API", Duration::from_secs(20), || {
        reaches(&client) && !reaches(&other)
    });
    // A label change: "other" becomes a client.
    api.apply(pod_object("shop", "other", "client", other.ip));
    wait_for("the relabelled pod allowed", Duration::from_secs(20), || reaches(&other));
    api.delete_object("NetworkPolicy", "shop/web-from-client");
    wait_for("the policy removed", Duration::from_secs(20), || {
        a.inspect("policy")["endpoints"].as_array().unwrap().is_empty()
    });
    assert!(reaches(&client) && reaches(&other));
    // The agent watched exactly what RBAC grants (see manifests.rs).
    let requests = api.requests();
    for path in ["/api/v1/pods", "/api/v1/namespaces", "/apis/networking.k8s.io/v1/networkpolicies"] {
        assert!(requests.iter().any(|r| r.contains(path)), "{path} never requested: {requests:?}");
    }
}

/// Kubernetes mode with clients outside the cluster served
/// (`serve_outside_clients`): a NodePort Service read from its Service and
/// EndpointSlice objects, reached by a host on the nodes' segment through
/// either node, one backend on node A. externalTrafficPolicy Local: node A
/// answers and the backend sees the outside host's own address, node B
/// (no local backend) does not answer, and the healthCheckNodePort on each
/// node tells it (200 with 1 local endpoint / 503 with 0). Then the same
/// Service with policy Cluster (an update of its object): node B answers
/// too, the backend seeing node B's address (source NAT, so the reply
/// goes back through B).
#[test]
fn node_ports_from_service_objects_serve_a_host_outside_the_cluster() {
    require_root!();
    use std::io::{BufRead as _, Write as _};
    let fabric = Fabric::new();
    let (api, a, b) = two_nodes_in_kubernetes_mode_with(&fabric, "serve_outside_clients = true\n");
    let backend = a.add_pod("backend");
    // The backend tells each client the address it sees.
    let ip = backend.ip;
    let listener = in_netns(&backend.netns.path(), move || std::net::TcpListener::bind((ip, 8080)).unwrap())
        .join()
        .unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let peer = conn.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let _ = writeln!(conn, "{peer}");
        }
    });
    let outside_ip = Ipv4Addr::new(10, 250, 0, 50);
    let outside = crate::redteam_policy::outside_host("k8s-out", outside_ip);
    let (node_a, node_b) = (Ipv4Addr::new(10, 250, 0, 1), Ipv4Addr::new(10, 250, 0, 2));
    let (node_port, health_port) = (30480u16, 32480u16);
    let service = |policy: &str| {
        let (mut service, slice) = service_objects("10.96.0.20", &[(backend.ip, true)]);
        service["spec"]["type"] = serde_json::json!("NodePort");
        service["spec"]["externalTrafficPolicy"] = serde_json::json!(policy);
        service["spec"]["ports"][0]["nodePort"] = serde_json::json!(node_port);
        if policy == "Local" {
            service["spec"]["healthCheckNodePort"] = serde_json::json!(health_port);
        }
        (service, slice)
    };
    // Which address the backend saw, through `node`.
    let seen_through = |node: Ipv4Addr| -> std::io::Result<String> {
        in_netns(&outside.path(), move || {
            let conn =
                std::net::TcpStream::connect_timeout(&(node, node_port).into(), Duration::from_millis(1500))?;
            conn.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            std::io::BufReader::new(conn).read_line(&mut line)?;
            Ok(line.trim().to_owned())
        })
        .join()
        .unwrap()
    };

    let (local, slice) = service("Local");
    api.apply(local);
    api.apply(slice);
    wait_for("node A serves the node port to the outside host", Duration::from_secs(40), || {
        seen_through(node_a).is_ok()
    });
    assert_eq!(seen_through(node_a).unwrap(), outside_ip.to_string(), "Local keeps the client's address");
    let err = seen_through(node_b).expect_err("node B has no local backend");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "dropped unanswered, as kube-proxy does: {err}");
    for (node, status, count) in [(node_a, 200, 1), (node_b, 503, 0)] {
        let (got, body) = crate::node_ports::http_get(&outside, node, health_port);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(
            (got, body["localEndpoints"].as_u64()),
            (status, Some(count)),
            "{node}:{health_port} {body}"
        );
        assert_eq!(body["service"]["namespace"], "shop");
    }

    let (cluster, _) = service("Cluster");
    api.apply(cluster);
    wait_for("node B serves the node port too", Duration::from_secs(40), || seen_through(node_b).is_ok());
    assert_eq!(seen_through(node_b).unwrap(), node_b.to_string(), "Cluster through B: source NAT to B");
    assert_eq!(seen_through(node_a).unwrap(), outside_ip.to_string(), "through A: its own backend, no NAT");
    drop((a, b));
}
