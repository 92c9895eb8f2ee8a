//! The NetworkPolicy lab: upstream's model (namespaces x, y, z; pods a, b,
//! c in each) on two nodes, pods made by the real CNI plugin, each serving
//! TCP and UDP on ports 80 and 81, and a policy directory both agents
//! watch (the static source: NetworkPolicy, Namespace and Pod objects).
//! Probes connect from every pod to every other pod; a truth table is
//! what they found.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    lab::{Fabric, Node, Pod, in_netns, peered_nodes},
    netpol_cases::{INITIAL_NAMESPACE_LABELS, INITIAL_POD_LABELS, PODS, Protocol, Step, container_port_name},
};

/// Which node each model pod lives on: every case has same-node and
/// cross-node pairs.
const ON_FIRST_NODE: [&str; 5] = ["x/a", "x/c", "y/b", "z/a", "z/c"];

/// Labels as written into an object: (key, value) pairs.
type Labels = Vec<(String, String)>;

/// A truth table: `[from][to]`, pods in [`PODS`] order.
pub type Table = [[bool; 9]; 9];

/// Fields drop in order: the servers stop before their pods go, the pods
/// before their nodes, the nodes before the fabric.
pub struct PolicyLab {
    _servers: Servers,
    extra_servers: Vec<Servers>,
    /// The model's pods, in [`PODS`] order.
    pub pods: Vec<Pod>,
    /// What probes connect to, in [`PODS`] order: the pods' addresses, or
    /// their ClusterIPs ([`PolicyLab::probe_through_services`]).
    targets: Vec<Ipv4Addr>,
    /// Pods added after the model's: ("ns/name", pod, labels).
    extra_pods: Vec<(String, Pod, Labels)>,
    /// Container port numbers changed from the model's: (pod, port name) -> port.
    port_overrides: BTreeMap<(String, String), u16>,
    pub nodes: (Node, Node),
    pub dir: PathBuf,
    namespace_labels: BTreeMap<String, Vec<(String, String)>>,
    pod_labels: BTreeMap<String, Vec<(String, String)>>,
    /// Policies by (namespace, name): their YAML, placeholders filled in.
    policies: BTreeMap<(String, String), String>,
    _fabric: Fabric,
}

impl PolicyLab {
    pub fn new(mode: &str) -> Self {
        let fabric = Fabric::new();
        let (mut a, mut b) = peered_nodes(&fabric, mode);
        let dir = a.work_dir.join("policy");
        std::fs::create_dir_all(&dir).unwrap();
        for node in [&mut a, &mut b] {
            node.set_extra_config(&format!("policy_dir = \"{}\"\n", dir.display()));
            node.stop_agent();
            node.start_agent();
        }
        let pods: Vec<Pod> = PODS
            .iter()
            .map(|name| {
                let (namespace, pod) = name.split_once('/').unwrap();
                let node = if ON_FIRST_NODE.contains(name) { &a } else { &b };
                node.add_pod_as(&format!("{namespace}{pod}"), namespace, pod)
            })
            .collect();
        let servers = Servers::start(&pods);
        let targets = pods.iter().map(|p| p.ip).collect();
        let mut lab = PolicyLab {
            targets,
            extra_servers: Vec::new(),
            extra_pods: Vec::new(),
            port_overrides: BTreeMap::new(),
            nodes: (a, b),
            pods,
            dir,
            namespace_labels: BTreeMap::new(),
            pod_labels: BTreeMap::new(),
            policies: BTreeMap::new(),
            _servers: servers,
            _fabric: fabric,
        };
        lab.reset();
        lab
    }

    pub fn pod(&self, name: &str) -> &Pod {
        match PODS.iter().position(|p| *p == name) {
            Some(i) => &self.pods[i],
            None => {
                &self
                    .extra_pods
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .unwrap_or_else(|| panic!("no pod {name}"))
                    .1
            }
        }
    }

    /// A pod made later (CNI ADD on node 0 or 1), serving like the model's,
    /// with a Pod object carrying `labels`.
    pub fn add_pod(&mut self, node: usize, name: &str, labels: &[(&str, &str)]) -> &Pod {
        let (namespace, pod_name) = name.split_once('/').unwrap();
        let on = if node == 0 { &self.nodes.0 } else { &self.nodes.1 };
        let pod = on.add_pod_as(&format!("{namespace}{pod_name}"), namespace, pod_name);
        self.extra_servers.push(Servers::start(std::slice::from_ref(&pod)));
        self.extra_pods.push((name.to_owned(), pod, owned(labels)));
        self.write();
        &self.extra_pods.last().unwrap().1
    }

    /// Change the number of a pod's named container port (its Pod object).
    pub fn set_container_port(&mut self, pod: &str, name: &str, port: u16) {
        self.port_overrides.insert((pod.to_owned(), name.to_owned()), port);
        self.write();
    }

    /// Extra config lines for both agents (e.g. `[[services]]`), applied live.
    pub fn set_agent_config(&mut self, lines: &str) {
        let policy_dir = format!("policy_dir = \"{}\"\n", self.dir.display());
        self.nodes.0.set_extra_config(&format!("{policy_dir}{lines}"));
        self.nodes.1.set_extra_config(&format!("{policy_dir}{lines}"));
    }

    /// Back to the initial state: initial labels, no policies.
    pub fn reset(&mut self) {
        self.namespace_labels =
            INITIAL_NAMESPACE_LABELS.iter().map(|(ns, labels)| (ns.to_string(), owned(labels))).collect();
        self.pod_labels =
            INITIAL_POD_LABELS.iter().map(|(pod, labels)| (pod.to_string(), owned(labels))).collect();
        self.policies.clear();
        self.write();
    }

    /// A step's changes, in upstream's order.
    pub fn apply(&mut self, step: &Step) {
        for (ns, labels) in step.namespace_labels {
            self.namespace_labels.insert(ns.to_string(), owned(labels));
        }
        for (pod, labels) in step.pod_labels {
            self.pod_labels.insert(pod.to_string(), owned(labels));
        }
        if step.delete_all_policies {
            self.policies.clear();
        }
        for (ns, name) in step.delete_policies {
            self.policies.remove(&(ns.to_string(), name.to_string()));
        }
        for policy in step.policies {
            self.put_policy(policy);
        }
        self.write();
    }

    /// Create or replace a policy (YAML, `${IP ns/pod}` placeholders).
    pub fn put_policy(&mut self, yaml: &str) {
        let yaml = self.fill_in(yaml);
        let value =
            datapath_agent::source::policy_dir::parse_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let value = &value[0];
        let key = (
            value["metadata"]["namespace"].as_str().unwrap().to_owned(),
            value["metadata"]["name"].as_str().unwrap().to_owned(),
        );
        self.policies.insert(key, yaml);
    }

    pub fn set_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) {
        self.pod_labels.insert(pod.into(), owned(labels));
    }

    fn fill_in(&self, yaml: &str) -> String {
        let mut out = yaml.to_owned();
        for (name, pod) in PODS.iter().zip(&self.pods) {
            out = out.replace(&format!("${{IP {name}}}"), &pod.ip.to_string());
        }
        assert!(!out.contains("${"), "unknown placeholder in {yaml}");
        out
    }

    /// Write the objects where the agents read them: each file written
    /// whole and renamed into place.
    pub fn write(&self) {
        let mut namespaces = String::new();
        for (name, labels) in &self.namespace_labels {
            namespaces.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {}\n",
                json_labels(labels)
            ));
        }
        let mut pods = String::new();
        let model =
            PODS.iter().zip(&self.pods).map(|(name, pod)| (name.to_string(), pod, &self.pod_labels[*name]));
        let extra = self.extra_pods.iter().map(|(name, pod, labels)| (name.clone(), pod, labels));
        for (name, pod, labels) in model.chain(extra) {
            let (namespace, pod_name) = name.split_once('/').unwrap();
            let ports: Vec<serde_json::Value> = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .iter()
                .flat_map(|protocol| {
                    [80u16, 81].map(|port| {
                        let port_name = container_port_name(*protocol, port);
                        let number = self
                            .port_overrides
                            .get(&(name.clone(), port_name.clone()))
                            .copied()
                            .unwrap_or(port);
                        serde_json::json!({
                            "name": port_name,
                            "containerPort": number,
                            "protocol": protocol.api_name(),
                        })
                    })
                })
                .collect();
            pods.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  namespace: {namespace}\n  name: {pod_name}\n  labels: {}\nspec:\n  containers: [{{name: cont, ports: {}}}]\nstatus:\n  podIP: {}\n",
                json_labels(labels),
                serde_json::Value::Array(ports),
                pod.ip
            ));
        }
        let policies: String = self.policies.values().map(|p| format!("---\n{p}\n")).collect();
        for (file, text) in
            [("namespaces.yaml", namespaces), ("pods.yaml", pods), ("policies.yaml", policies)]
        {
            let tmp = self.dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.join(file)).unwrap();
        }
    }

    /// From now on, probe each pod through a ClusterIP of its own
    /// (10.96.1.1 for the first model pod, and so on), TCP and UDP ports 80
    /// and 81 to the same ports, programmed on both nodes.
    pub fn probe_through_services(&mut self) {
        // No limit of unanswered connections per client: a connection
        // policy refuses keeps its Service entries, which count against
        // its client for conntrack_opening_seconds (a known gap, issue 18),
        // and the suite's probes make thousands of them a minute.
        let mut config = String::from("conntrack_max_per_client = 0\n");
        let mut targets = Vec::new();
        for (i, (name, pod)) in PODS.iter().zip(&self.pods).enumerate() {
            let (namespace, pod_name) = name.split_once('/').unwrap();
            let vip = Ipv4Addr::new(10, 96, 1, i as u8 + 1);
            config += &format!(
                "\n[[services]]\nname = \"s-{namespace}-{pod_name}\"\nnamespace = \"{namespace}\"\n\
                 cluster_ip = \"{vip}\"\nbackends = [\"{}\"]\n",
                pod.ip
            );
            for (port, protocol) in [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")] {
                config += &format!(
                    "[[services.ports]]\nname = \"{}-{port}\"\nport = {port}\nprotocol = \"{protocol}\"\ntarget_port = {port}\n",
                    protocol.to_lowercase()
                );
            }
            targets.push(vip);
        }
        // conntrack_max_per_client takes effect at a start (hitless).
        self.set_agent_config(&config);
        for node in [&mut self.nodes.0, &mut self.nodes.1] {
            node.stop_agent();
            node.start_agent();
        }
        assert_eq!(self.nodes.0.inspect("config")["conntrack_max_per_client"], 0);
        let programmed = |node: &Node| node.inspect("services").as_array().map_or(0, |s| s.len());
        let deadline = Instant::now() + Duration::from_secs(20);
        while programmed(&self.nodes.0) < 36 || programmed(&self.nodes.1) < 36 {
            assert!(
                Instant::now() < deadline,
                "the pods' Services not programmed: {}",
                self.nodes.0.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.targets = targets;
    }

    /// Probe every pod from every other pod on `port`.
    pub fn probe(&self, protocol: Protocol, port: u16) -> Table {
        let targets = self.targets.clone();
        let rows: Vec<JoinHandle<[bool; 9]>> = self
            .pods
            .iter()
            .enumerate()
            .map(|(from, pod)| {
                let targets = targets.clone();
                in_netns(&pod.netns.path(), move || {
                    let mut row = [false; 9];
                    for (to, ip) in targets.iter().enumerate() {
                        row[to] = from == to || connects(protocol, SocketAddr::from((*ip, port)));
                    }
                    row
                })
            })
            .collect();
        let mut table = [[false; 9]; 9];
        for (from, row) in rows.into_iter().enumerate() {
            table[from] = row.join().expect("probe thread");
        }
        table
    }

    /// Probe until the table is `want` (loopback not compared), for up to
    /// 10 s as upstream does (the agents need a moment to apply a change).
    /// Err: the last table found, drawn against the expected one, which is
    /// always one probed after those 10 s: a round can take longer than
    /// that (refusals the client waits out, 1.5 s each), and a first round
    /// made while the agents were still applying the change is no verdict.
    pub fn expect(&self, protocol: Protocol, port: u16, want: &Table) -> Result<usize, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let started = Instant::now();
            let got = self.probe(protocol, port);
            let wrong = differences(&got, want);
            if wrong == 0 {
                return Ok(72);
            }
            if started > deadline {
                return Err(format!(
                    "{wrong} of 72 cells wrong ({} {port}); X = refused, . = connected, uppercase/! = wrong\n{}",
                    protocol.api_name(),
                    draw(&got, want)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn json_labels(labels: &[(String, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        labels.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    serde_json::Value::Object(map).to_string()
}

pub fn index(name: &str) -> usize {
    PODS.iter().position(|p| *p == name).unwrap_or_else(|| panic!("no pod {name}"))
}

/// Cells (loopback excluded) where `got` and `want` differ.
pub fn differences(got: &Table, want: &Table) -> usize {
    (0..9)
        .flat_map(|i| (0..9).map(move |j| (i, j)))
        .filter(|(i, j)| i != j && got[*i][*j] != want[*i][*j])
        .count()
}

fn draw(got: &Table, want: &Table) -> String {
    let mut out = String::from("     ");
    for to in PODS {
        out.push_str(&format!("{to:>4}"));
    }
    out.push('\n');
    for (i, from) in PODS.iter().enumerate() {
        out.push_str(&format!("{from:>4} "));
        for j in 0..9 {
            let cell = if i == j {
                "-"
            } else {
                match (got[i][j], want[i][j]) {
                    (true, true) => ".",
                    (false, false) => "X",
                    (true, false) => "!.",
                    (false, true) => "!X",
                }
            };
            out.push_str(&format!("{cell:>4}"));
        }
        out.push('\n');
    }
    out
}

/// One connection attempt: TCP connects and reads the server's byte; UDP
/// gets its datagram echoed (3 tries, for loss); SCTP is not probed here.
pub fn connects(protocol: Protocol, to: SocketAddr) -> bool {
    match protocol {
        Protocol::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_millis(1500)) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut byte = [0u8; 1];
            matches!(stream.read(&mut byte), Ok(1))
        }
        Protocol::Udp => {
            let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else { return false };
            if socket.connect(to).is_err() {
                return false;
            }
            let _ = socket.set_read_timeout(Some(Duration::from_millis(500)));
            for _ in 0..3 {
                if socket.send(b"probe").is_err() {
                    return false;
                }
                let mut buf = [0u8; 16];
                match socket.recv(&mut buf) {
                    Ok(n) => return &buf[..n] == b"probe",
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    // Refused (ICMP): no point trying again.
                    Err(_) => return false,
                }
            }
            false
        }
        Protocol::Sctp => panic!("SCTP is not probed: this kernel has no SCTP (see sctp_available)"),
    }
}

/// Can this kernel make SCTP sockets?
pub fn sctp_available() -> bool {
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP);
        if fd < 0 {
            return false;
        }
        libc::close(fd);
    }
    true
}

/// The pods' servers: TCP and UDP on 80 and 81 in every pod, stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(pods: &[Pod]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = pods
            .iter()
            .map(|pod| {
                let (stop, ip) = (Arc::clone(&stop), pod.ip);
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let thread = in_netns(&pod.netns.path(), move || serve(ip, &stop, ready_tx));
                ready_rx.recv_timeout(Duration::from_secs(5)).expect("servers listening");
                thread
            })
            .collect();
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(ip: Ipv4Addr, stop: &AtomicBool, ready: std::sync::mpsc::Sender<()>) {
    let tcp: Vec<TcpListener> = [80, 81].iter().map(|port| TcpListener::bind((ip, *port)).unwrap()).collect();
    let udp: Vec<UdpSocket> = [80, 81].iter().map(|port| UdpSocket::bind((ip, *port)).unwrap()).collect();
    for listener in &tcp {
        listener.set_nonblocking(true).unwrap();
    }
    for socket in &udp {
        socket.set_nonblocking(true).unwrap();
    }
    ready.send(()).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let mut busy = false;
        for listener in &tcp {
            while let Ok((mut stream, _)) = listener.accept() {
                busy = true;
                let _ = stream.write_all(b"k");
            }
        }
        for socket in &udp {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                busy = true;
                let _ = socket.send_to(&buf[..n], from);
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
