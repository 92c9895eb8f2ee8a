//! NetworkPolicy, enforced by the programs: upstream's conformance cases
//! (test/e2e/network/netpol, transcribed in `netpol_cases`) run whole, their
//! truth tables compared cell by cell, on two nodes in both modes.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use datapath_tests::{
    in_both_modes,
    lab::{Pod, in_netns},
    netpol::{PolicyLab, connects, sctp_available},
    netpol_cases::{CASES, Protocol, truth_table},
    wait_for,
};

in_both_modes! {
    upstream_conformance => upstream_conformance;
}

/// Through ClusterIPs in native mode only: the routing mode changes how a
/// translated packet crosses to the other node, which `upstream_conformance`
/// (both modes) and the Services suites (both modes) already cover, and
/// this run is CI's longest (290 s a mode).
#[test]
fn upstream_conformance_through_cluster_ips_native() {
    datapath_tests::require_root!();
    upstream_conformance_through_cluster_ips("native");
}

fn upstream_conformance(mode: &str) {
    conformance(mode, false);
}

/// The same cases with every probe sent to the target pod's own ClusterIP
/// (upstream probes Services too): policy judges the backend pod after the
/// translation, so the truth tables are the same. SCTP is not a Service
/// protocol here: those probes are skipped.
fn upstream_conformance_through_cluster_ips(mode: &str) {
    conformance(mode, true);
}

fn conformance(mode: &str, through_services: bool) {
    let started = std::time::Instant::now();
    let mut lab = PolicyLab::new(mode);
    if through_services {
        lab.probe_through_services();
    }
    eprintln!("lab ready in {:.1}s", started.elapsed().as_secs_f64());
    let sctp = sctp_available() && !through_services;
    let (mut cases, mut cells) = (0, 0);
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    // To run some cases only while debugging: a part of their names.
    let only = std::env::var("DATAPATH_NETPOL_CASES").ok();
    for case in CASES {
        if only.as_ref().is_some_and(|only| !case.name.contains(only.as_str())) {
            continue;
        }
        if let Some(reason) = case.skip {
            skipped.push(format!("{}: {reason}", case.name));
            continue;
        }
        let uses_sctp = case.steps.iter().any(|s| s.probes.iter().any(|(p, _)| *p == Protocol::Sctp));
        if uses_sctp && !sctp {
            let why = if through_services {
                "SCTP is not a Service protocol here"
            } else {
                "this kernel has no SCTP (CONFIG_IP_SCTP unset)"
            };
            skipped.push(format!("{} (SCTP): {why}", case.name));
            continue;
        }
        let started = std::time::Instant::now();
        // Each case starts from no policy: wait until every pod reaches
        // every pod, so a table the last case left cannot pass for this one's.
        lab.reset();
        if let Err(table) = lab.expect(Protocol::Tcp, 80, &[[true; 9]; 9]) {
            failures.push(format!("{}: no policy, yet:\n{table}", case.name));
            continue;
        }
        let mut failed = false;
        for (index, step) in case.steps.iter().enumerate() {
            lab.apply(step);
            let want = truth_table(step);
            for (protocol, port) in step.probes {
                match lab.expect(*protocol, *port, &want) {
                    Ok(compared) => cells += compared,
                    Err(table) => {
                        failures.push(format!("{} (step {index}):\n{table}", case.name));
                        failed = true;
                    }
                }
            }
            if failed {
                break;
            }
        }
        cases += usize::from(!failed);
        eprintln!(
            "{:>6.1}s {} {}",
            started.elapsed().as_secs_f64(),
            if failed { "FAIL" } else { "ok  " },
            case.name
        );
    }
    println!(
        "netpol conformance ({mode}{}): {cases} of {} cases passed, {cells} cells compared, {} skipped",
        if through_services { ", through ClusterIPs" } else { "" },
        CASES.len(),
        skipped.len()
    );
    for skip in &skipped {
        println!("  skipped: {skip}");
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

in_both_modes! {
    open_connections_survive_a_deny => open_connections_survive_a_deny;
    pods_added_later_and_named_ports_follow_their_objects => pods_added_later_and_named_ports_follow_their_objects;
    services_are_judged_at_the_backend => services_are_judged_at_the_backend;
}

const DENY_ALL_INGRESS_X: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

/// A long-lived TCP connection from `client` to `server_ip:8080`: each
/// `exchange` sends a line and reads it back.
struct Conversation {
    stream: std::net::TcpStream,
    _server: std::thread::JoinHandle<()>,
}

impl Conversation {
    fn open(server: &Pod, client: &Pod) -> Self {
        let ip = server.ip;
        let (tx, rx) = std::sync::mpsc::channel();
        let server_thread = in_netns(&server.netns.path(), move || {
            let listener = std::net::TcpListener::bind((ip, 8080)).unwrap();
            tx.send(()).unwrap();
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let stream = in_netns(&client.netns.path(), move || {
            std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(3)).unwrap()
        })
        .join()
        .unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Conversation { stream, _server: server_thread }
    }

    fn exchange(&mut self) -> std::io::Result<()> {
        self.stream.write_all(b"still there?\n")?;
        let mut back = [0u8; 13];
        self.stream.read_exact(&mut back)?;
        assert_eq!(&back, b"still there?\n");
        Ok(())
    }
}

/// Established connections of a pod policy selects keep their conntrack
/// entry across a policy change (as Calico's and Cilium's do); new ones are
/// refused at once (ICMP administratively prohibited), counted and shown
/// by the monitor.
fn open_connections_survive_a_deny(mode: &str) {
    let mut lab = PolicyLab::new(mode);
    // x selected by a policy that allows everything: x's connections are tracked.
    lab.put_policy(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress], ingress: [{}]}
",
    );
    lab.write();
    wait_for("x/b isolated (allowing all)", Duration::from_secs(10), || {
        lab.nodes.1.inspect("policy")["endpoints"].as_array().unwrap().iter().any(|e| {
            e["pod_ip"] == lab.pod("x/b").ip.to_string() && !e["rules"].as_array().unwrap().is_empty()
        })
    });
    // y/b lives on the first node, x/b on the second: ingress is judged
    // where the packet enters x/b's node (from_uplink or from_overlay).
    let mut open = Conversation::open(lab.pod("x/b"), lab.pod("y/b"));
    open.exchange().unwrap();
    let target = SocketAddr::from((lab.pod("x/b").ip, 80));
    let monitor = lab.nodes.1.monitor(&["--seconds", "20", "--count", "1"]);
    lab.apply(&datapath_tests::netpol_cases::Step {
        namespace_labels: &[],
        pod_labels: &[],
        delete_policies: &[("x", "allow-all")],
        delete_all_policies: false,
        policies: &[DENY_ALL_INGRESS_X],
        probes: &[],
        default_ok: true,
        ops: &[],
    });
    let refused = |lab: &PolicyLab| {
        in_netns(&lab.pod("y/b").netns.path(), move || {
            let started = Instant::now();
            let ok = connects(Protocol::Tcp, target);
            (ok, started.elapsed())
        })
        .join()
        .unwrap()
    };
    wait_for("new connections into x refused", Duration::from_secs(10), || !refused(&lab).0);
    let (_, took) = refused(&lab);
    assert!(took < Duration::from_millis(500), "a refused connect took {took:?}: no fast failure");
    // The open connection goes on, in both directions.
    for _ in 0..3 {
        open.exchange().expect("the connection opened before the policy goes on");
    }
    let (events, summary) = monitor.finish();
    let denied = events.iter().find(|e| e["reason"] == "policy_denied_ingress").unwrap_or_else(|| {
        panic!("no policy_denied_ingress event: {events:#?}\n{summary}");
    });
    assert_eq!(denied["destination"], format!("{}:80", lab.pod("x/b").ip), "{denied:#}");
    assert!(denied["source"].as_str().unwrap().starts_with(&format!("{}:", lab.pod("y/b").ip)), "{denied:#}");
    assert!(lab.nodes.1.drop_count("policy_denied_ingress") > 0);
    let policy = lab.nodes.1.inspect("policy");
    let isolated = policy["endpoints"].as_array().unwrap();
    assert!(
        isolated.iter().any(|e| e["pod_ip"] == lab.pod("x/b").ip.to_string()
            && e["ingress_isolated"] == true
            && e["pod"] == "x/b"
            && e["rules"].as_array().unwrap().is_empty()),
        "{policy:#}"
    );
    let denied_count = policy["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["direction"] == "ingress" && v["verdict"] == "denied")
        .unwrap()["connections"]
        .as_u64()
        .unwrap();
    assert!(denied_count > 0, "{policy:#}");
}

/// A pod made later in a namespace a policy selects gets the policy's
/// rules as a peer and as a target; a named port follows the number its
/// Pod object gives it.
fn pods_added_later_and_named_ports_follow_their_objects(mode: &str) {
    let mut lab = PolicyLab::new(mode);
    lab.put_policy(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: serve-80-tcp}]
",
    );
    lab.write();
    let probe = |lab: &PolicyLab, from: &str, to: &str, port: u16| {
        let target = SocketAddr::from((lab.pod(to).ip, port));
        in_netns(&lab.pod(from).netns.path(), move || connects(Protocol::Tcp, target)).join().unwrap()
    };
    wait_for("y/a allowed into x/a on 80", Duration::from_secs(10), || {
        probe(&lab, "y/a", "x/a", 80) && !probe(&lab, "z/a", "x/a", 80)
    });
    // New pods on the other node than x/a (first node): y/d allowed, z/d not;
    // a new pod x/d is isolated like its namespace's others.
    lab.add_pod(1, "y/d", &[("pod", "d")]);
    lab.add_pod(1, "z/d", &[("pod", "d")]);
    lab.add_pod(0, "x/d", &[("pod", "d")]);
    // (x/d is isolated from its CNI ADD on, before its Pod object with
    // its named ports is read: it admits y/d once that is.)
    wait_for("y/d allowed, z/d refused, x/d isolated and admitting y/d", Duration::from_secs(10), || {
        probe(&lab, "y/d", "x/a", 80)
            && !probe(&lab, "z/d", "x/a", 80)
            && !probe(&lab, "z/a", "x/d", 80)
            && probe(&lab, "y/d", "x/d", 80)
    });
    assert!(!probe(&lab, "y/a", "x/a", 81), "81 is not the named port");
    // x/a's "serve-80-tcp" now names 81 (the model's servers listen on both).
    lab.set_container_port("x/a", "serve-80-tcp", 81);
    wait_for("the named port moved to 81 on x/a only", Duration::from_secs(10), || {
        probe(&lab, "y/a", "x/a", 81) && !probe(&lab, "y/a", "x/a", 80)
    });
    assert!(probe(&lab, "y/a", "x/b", 80) && !probe(&lab, "y/a", "x/b", 81), "x/b keeps its own number");
}

const VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 80);

/// Policy judges the backend pod after the Service translation, with the
/// client's own address; a pod reaching itself through a Service (hairpin)
/// is never judged.
fn services_are_judged_at_the_backend(mode: &str) {
    let mut lab = PolicyLab::new(mode);
    // Backends x/a (first node) and x/b (second node).
    lab.set_agent_config(&format!(
        "\n[[services]]\nname = \"web\"\nnamespace = \"x\"\ncluster_ip = \"{VIP}\"\nbackends = [\"{}\", \"{}\"]\n[[services.ports]]\nport = 80\ntarget_port = 80\n",
        lab.pod("x/a").ip,
        lab.pod("x/b").ip
    ));
    lab.put_policy(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-c, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]}]
",
    );
    lab.write();
    let via_service = |lab: &PolicyLab, from: &str| {
        in_netns(&lab.pod(from).netns.path(), || {
            // Several connections: each may get either backend.
            (0..6).map(|_| connects(Protocol::Tcp, SocketAddr::from((VIP, 80)))).collect::<Vec<bool>>()
        })
        .join()
        .unwrap()
    };
    let one = |lab: &PolicyLab, from: &str| {
        in_netns(&lab.pod(from).netns.path(), || connects(Protocol::Tcp, SocketAddr::from((VIP, 80))))
            .join()
            .unwrap()
    };
    for node in [&lab.nodes.0, &lab.nodes.1] {
        wait_for("the Service programmed", Duration::from_secs(10), || {
            node.inspect("services").as_array().unwrap().iter().any(|s| s["cluster_ip"] == VIP.to_string())
        });
    }
    wait_for("the policy applied (y/c reaches, y/b refused)", Duration::from_secs(15), || {
        one(&lab, "y/c") && !one(&lab, "y/b")
    });
    let results = via_service(&lab, "y/c");
    assert!(
        results.iter().all(|ok| *ok),
        "y/c (pod c) reaches either backend: {results:?}\n{:#}\n{:#}\n{}",
        lab.nodes.0.inspect("counters")["drops"],
        lab.nodes.1.inspect("counters")["drops"],
        lab.nodes.1.agent_log()
    );
    assert!(via_service(&lab, "z/c").iter().all(|ok| *ok), "z/c (pod c) reaches either backend");
    assert!(via_service(&lab, "y/b").iter().all(|ok| !ok), "y/b reaches no backend");
    // x/a and x/b are isolated both ways (no egress rule): reaching the
    // Service, they get another backend (refused), or themselves (hairpin:
    // allowed). Each of them must reach itself through the Service.
    for name in ["x/a", "x/b"] {
        let results = in_netns(&lab.pod(name).netns.path(), || {
            (0..16).map(|_| connects(Protocol::Tcp, SocketAddr::from((VIP, 80)))).collect::<Vec<bool>>()
        })
        .join()
        .unwrap();
        assert!(results.iter().any(|ok| *ok), "{name} never reached itself through the Service: {results:?}");
        assert!(results.iter().any(|ok| !ok), "{name} reached the other isolated backend: {results:?}");
    }
}

/// The forwarding programs read a pod's isolation from copies in its
/// endpoint entries. Entries without them (left by a build that did not
/// write them) must not open an isolated pod when the agent starts: the
/// copies are written from the pinned POLICY_ENDPOINTS before the pinned
/// links switch to the new programs, even while the policy objects cannot
/// be read.
#[test]
fn isolation_holds_when_an_agent_starts_on_entries_without_it() {
    datapath_tests::require_root!();
    let mut lab = PolicyLab::new("native");
    lab.put_policy(DENY_ALL_INGRESS_X);
    lab.write();
    // y/b and x/a share the first node: from_pod judges x/a's ingress.
    let (from, target) = (lab.pod("y/b").netns.path(), SocketAddr::from((lab.pod("x/a").ip, 80)));
    let reaches = |from: &std::path::Path| {
        let from = from.to_owned();
        in_netns(&from, move || connects(Protocol::Tcp, target)).join().unwrap()
    };
    wait_for("x/a isolated", Duration::from_secs(10), || !reaches(&from));
    let node = &mut lab.nodes.0;
    node.stop_agent();
    node.clear_isolation_copies();
    // The programs read only the copies (they are what this test is about).
    assert!(reaches(&from), "x/a reachable without its copies: the programs do not read them");
    // The new agent cannot read the objects: only the pinned record says x/a is isolated.
    let hidden = lab.dir.with_extension("hidden");
    std::fs::rename(&lab.dir, &hidden).unwrap();
    node.start_agent();
    let refused = !reaches(&from);
    std::fs::rename(&hidden, &lab.dir).unwrap();
    assert!(refused, "x/a open after the start:\n{}", node.agent_log());
    assert!(node.agent_log().contains("policy_dir not applied"), "{}", node.agent_log());
}
