//! A simulated node: a network namespace running the real agent, pods as
//! network namespaces wired by the real CNI plugin exactly as a container
//! runtime calls it.

use std::{
    io::Write as _,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{bin_dir, sh, sh_ok};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        // A leftover from a crashed run with the same name goes first.
        let _ = sh_ok(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// `ip netns exec NAME args...` succeeded?
    pub fn exec_ok(&self, args: &[&str]) -> bool {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh_ok(&all)
    }
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh_ok(&["ip", "netns", "del", &self.name]);
    }
}

/// A pod made by `datapath-cni ADD`.
pub struct Pod {
    pub netns: Netns,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub host_veth: String,
    pub result: serde_json::Value,
}

/// Result of one CNI invocation.
#[derive(Debug)]
pub struct CniRun {
    pub success: bool,
    pub stdout: serde_json::Value,
    pub raw_stdout: String,
    /// What the plugin logged (a panic, a lock-file warning).
    pub stderr: String,
}

/// The physical network between nodes: a bridge in a namespace of its own.
pub struct Fabric {
    pub netns: Netns,
    ports: AtomicU32,
}

pub const FABRIC_BRIDGE: &str = "dptbr0";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

impl Fabric {
    pub fn new() -> Self {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let netns = Netns::new(format!("dpt{}x{n}-fabric", std::process::id()));
        sh(&["ip", "-n", &netns.name, "link", "add", FABRIC_BRIDGE, "type", "bridge"]);
        sh(&["ip", "-n", &netns.name, "link", "set", FABRIC_BRIDGE, "up"]);
        // A physical switch does not validate IPv4 headers; a bridge with
        // br_netfilter loaded on the host does (and drops malformed ones):
        // keep it a plain wire. (No such sysctl without br_netfilter.)
        for table in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{table}=0");
            let _ = sh_ok(&["ip", "netns", "exec", &netns.name, "sysctl", "-qw", &key]);
        }
        Self { netns, ports: AtomicU32::new(0) }
    }

    /// Plug `ifname` of namespace `ns` into the fabric with a new cable.
    pub fn plug(&self, ns: &str, ifname: &str) {
        let port = format!("dptp{}", self.ports.fetch_add(1, Ordering::SeqCst));
        sh(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.netns.name,
        ]);
        sh(&["ip", "-n", &self.netns.name, "link", "set", &port, "master", FABRIC_BRIDGE, "up"]);
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }

    /// A host on the physical network that is not a node ("outside the cluster").
    pub fn add_host(&self, name: &str, ip: Ipv4Addr) -> Netns {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let netns = Netns::new(format!("dpt{}x{n}-{name}", std::process::id()));
        self.plug(&netns.name, "eth0");
        sh(&["ip", "-n", &netns.name, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns
    }
}

impl Default for Fabric {
    fn default() -> Self {
        Self::new()
    }
}

/// Two nodes on `fabric` (10.250.0.1 with 10.244.1.0/24, 10.250.0.2 with
/// 10.244.2.0/24), each in the other's peer list, agents running.
pub fn peered_nodes(fabric: &Fabric, mode: &str) -> (Node, Node) {
    let mut a = Node::on_fabric(fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), mode);
    let mut b = Node::on_fabric(fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), mode);
    a.set_peers(vec![b.as_peer()]);
    b.set_peers(vec![a.as_peer()]);
    a.start_agent();
    b.start_agent();
    (a, b)
}

/// A peer line in an agent's config.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
}

pub struct Node {
    pub id: String,
    pub netns: Netns,
    pub pod_cidr: String,
    pub node_ip: Ipv4Addr,
    pub mode: String,
    pub peers: Vec<Peer>,
    /// Kubernetes source: the kubeconfig the agent uses (None: static config).
    pub kubeconfig: Option<PathBuf>,
    /// Extra top-level config lines (e.g. `ebpf_log = "debug"`).
    pub extra_config: String,
    /// Extra lines of the `[kubernetes]` table (Kubernetes source).
    pub kubernetes_extra_config: String,
    /// Options before `run` (e.g. `--log-format json`).
    pub agent_options: Vec<String>,
    /// Another build of the agent to run (default: the one in [`bin_dir`]).
    pub agent_binary: Option<PathBuf>,
    pub work_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    agent: Option<Child>,
}

pub const UPLINK: &str = "dptup0";
pub const VETH_PREFIX: &str = "dpt";

impl Node {
    /// A node namespace with an uplink (a veth whose peer stays unused) and
    /// an address, and the agent's config, not yet started.
    pub fn new(pod_cidr: &str, node_ip: Ipv4Addr) -> Self {
        Self::build(pod_cidr, node_ip, None, "native")
    }

    /// A node whose uplink is plugged into `fabric`, in `mode` (native | vxlan).
    pub fn on_fabric(fabric: &Fabric, pod_cidr: &str, node_ip: Ipv4Addr, mode: &str) -> Self {
        Self::build(pod_cidr, node_ip, Some(fabric), mode)
    }

    fn build(pod_cidr: &str, node_ip: Ipv4Addr, fabric: Option<&Fabric>, mode: &str) -> Self {
        let n = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let id = format!("dpt{}x{n}", std::process::id());
        let netns = Netns::new(format!("{id}-node"));
        let ns = netns.name.clone();
        match fabric {
            Some(fabric) => fabric.plug(&ns, UPLINK),
            None => {
                sh(&["ip", "-n", &ns, "link", "add", UPLINK, "type", "veth", "peer", "name", "dptup1"]);
                sh(&["ip", "-n", &ns, "link", "set", UPLINK, "up"]);
                sh(&["ip", "-n", &ns, "link", "set", "dptup1", "up"]);
            }
        }
        sh(&["ip", "-n", &ns, "addr", "add", &format!("{node_ip}/24"), "dev", UPLINK]);
        let work_dir = PathBuf::from(format!("/tmp/{id}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(work_dir.join("ipam")).unwrap();
        let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/{id}"));
        let socket = work_dir.join("run/agent.sock");
        let node = Self {
            id,
            netns,
            pod_cidr: pod_cidr.into(),
            node_ip,
            mode: mode.into(),
            peers: Vec::new(),
            kubeconfig: None,
            extra_config: String::new(),
            kubernetes_extra_config: String::new(),
            agent_options: Vec::new(),
            agent_binary: None,
            work_dir,
            bpffs_dir,
            socket,
            agent: None,
        };
        node.write_config();
        node
    }

    pub fn as_peer(&self) -> Peer {
        Peer { name: self.id.clone(), node_ip: self.node_ip, pod_cidr: self.pod_cidr.clone() }
    }

    /// Replace the peer list in the config file (a running agent picks it up).
    pub fn set_peers(&mut self, peers: Vec<Peer>) {
        self.peers = peers;
        self.write_config();
    }

    /// Switch to the Kubernetes source: node facts and peers from the API
    /// server behind `kubeconfig`; health on 127.0.0.1:9976 (node netns); the
    /// CNI config written to `<work_dir>/net.d/` when ready.
    pub fn use_kubernetes(&mut self, kubeconfig: &Path) {
        self.kubeconfig = Some(kubeconfig.to_owned());
        self.write_config();
    }

    /// Set extra top-level config lines, read at the next agent start.
    pub fn set_extra_config(&mut self, lines: &str) {
        self.extra_config = lines.to_owned();
        self.write_config();
    }

    /// Set extra lines of the `[kubernetes]` table, read at the next start.
    pub fn set_kubernetes_extra_config(&mut self, lines: &str) {
        self.kubernetes_extra_config = lines.to_owned();
        self.write_config();
    }

    pub fn written_cni_config(&self) -> PathBuf {
        self.work_dir.join("net.d/10-datapath.conflist")
    }

    fn write_config(&self) {
        // Write and rename: the agent polling the file never reads half of it.
        let tmp = self.work_dir.join("agent.toml.tmp");
        std::fs::write(&tmp, self.agent_config()).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    pub fn agent_config(&self) -> String {
        if let Some(kubeconfig) = &self.kubeconfig {
            return format!(
                "node_name = \"{id}\"\nsource = \"kubernetes\"\nuplink_interface = \"{UPLINK}\"\nbpffs_dir = \"{bpffs}\"\napi_socket = \"{sock}\"\nstate_dir = \"{state}\"\ncluster_cidr = \"{CLUSTER_CIDR}\"\nmode = \"{mode}\"\nhealth_address = \"127.0.0.1:9976\"\ncni_config_file = \"{cni}\"\n{extra}\n[kubernetes]\nkubeconfig = \"{kc}\"\n{kubernetes_extra}",
                extra = self.extra_config,
                kubernetes_extra = self.kubernetes_extra_config,
                id = self.id,
                bpffs = self.bpffs_dir.display(),
                sock = self.socket.display(),
                state = self.work_dir.join("state").display(),
                mode = self.mode,
                cni = self.written_cni_config().display(),
                kc = kubeconfig.display(),
            );
        }
        let mut config = format!(
            "node_name = \"{id}\"\npod_cidr = \"{cidr}\"\nuplink_interface = \"{UPLINK}\"\nbpffs_dir = \"{bpffs}\"\napi_socket = \"{sock}\"\nstate_dir = \"{state}\"\ncluster_cidr = \"{CLUSTER_CIDR}\"\nnode_ip = \"{ip}\"\nmode = \"{mode}\"\nhealth_address = \"127.0.0.1:9976\"\n",
            id = self.id,
            cidr = self.pod_cidr,
            bpffs = self.bpffs_dir.display(),
            sock = self.socket.display(),
            state = self.work_dir.join("state").display(),
            ip = self.node_ip,
            mode = self.mode,
        );
        config.push_str(&self.extra_config);
        for p in &self.peers {
            config.push_str(&format!(
                "\n[[peers]]\nname = \"{}\"\nnode_ip = \"{}\"\npod_cidr = \"{}\"\n",
                p.name, p.node_ip, p.pod_cidr
            ));
        }
        config
    }

    pub fn config_path(&self) -> PathBuf {
        self.work_dir.join("agent.toml")
    }

    /// `nsenter --net=<node netns>` prefix: unlike `ip netns exec` it keeps
    /// /sys as is, so bpffs stays visible.
    pub fn in_node(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.path().display())).arg(program);
        cmd
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(None);
    }

    /// Start the agent with the kernel refusing each `bpf(cmd, ...)` of
    /// `commands` with EPERM (a seccomp filter): a real syscall failing for
    /// the real agent, as an LSM policy or an older kernel would make it.
    pub fn start_agent_refusing_bpf_commands(&mut self, commands: &[u32]) {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
        };
        let rules = commands
            .iter()
            .map(|cmd| {
                let is_cmd =
                    SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, u64::from(*cmd))
                        .unwrap();
                SeccompRule::new(vec![is_cmd]).unwrap()
            })
            .collect();
        let filter = SeccompFilter::new(
            [(libc::SYS_bpf, rules)].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        self.start_agent_with(Some(filter.try_into().unwrap()));
    }

    fn start_agent_with(&mut self, seccomp: Option<seccompiler::BpfProgram>) {
        self.launch_agent(seccomp);
        self.wait_for_agent_socket();
    }

    /// Start the agent without waiting for it to serve anything.
    pub fn launch_agent(&mut self, seccomp: Option<seccompiler::BpfProgram>) {
        use std::os::unix::process::CommandExt as _;
        assert!(self.agent.is_none(), "agent already running");
        // A SIGKILLed agent leaves its socket behind: readiness is a new one.
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::File::create(self.work_dir.join("agent.log")).unwrap();
        let binary = self.agent_binary.clone().unwrap_or_else(|| bin_dir().join("datapath-agent"));
        let mut command = self.in_node(&binary);
        command
            .args(&self.agent_options)
            .args(["run", "--config"])
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(filter) = seccomp {
            // SAFETY: between fork and exec only prctl and seccomp run, on
            // a filter built before the fork.
            unsafe {
                command.pre_exec(move || {
                    seccompiler::apply_filter(&filter).map_err(|e| std::io::Error::other(e.to_string()))
                });
            }
        }
        self.agent = Some(command.spawn().expect("spawn agent"));
    }

    /// Wait until the agent serves the CNI plugin (panics if it exits).
    pub fn wait_for_agent_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Some(status) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.agent_log());
            }
            assert!(Instant::now() < deadline, "agent did not come up:\n{}", self.agent_log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: pinned state must stay.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL: no chance to clean up, as in a crash or OOM kill.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // nsenter execs the agent, so the child pid is the agent's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the agent started last is still running.
    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Resident memory of the agent, from /proc (KiB).
    pub fn agent_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid().unwrap())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }

    /// Program ID behind a pinned link (which program a hook runs now).
    pub fn link_prog_id(&self, pin: &Path) -> u64 {
        let out = sh(&["bpftool", "-j", "link", "show", "pinned", &pin.display().to_string()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["prog_id"].as_u64().unwrap()
    }

    /// The tag (hash of the instructions) of the program a pinned link runs:
    /// differs between builds, equal for the same build loaded twice.
    pub fn link_prog_tag(&self, pin: &Path) -> String {
        let id = self.link_prog_id(pin).to_string();
        let out = sh(&["bpftool", "-j", "prog", "show", "id", &id]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["tag"].as_str().unwrap().to_owned()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.work_dir.join("agent.log")).unwrap_or_default()
    }

    /// Wait (up to `timeout`) until the agent's log contains `text`.
    #[track_caller]
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.agent_log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log within {timeout:?}:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `trace_forwards` of the pinned monitor config: whether the programs
    /// report every forwarding decision to the monitor.
    pub fn trace_forwards(&self) -> u32 {
        use datapath_common::{MonitorConfig, map_names};
        let pins = datapath_agent::bpf::PinLayout::new(&self.bpffs_dir);
        let map = aya::maps::MapData::from_pin(pins.map(map_names::MONITOR_CONFIG)).unwrap();
        let map: aya::maps::Array<_, MonitorConfig> =
            aya::maps::Array::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
        map.get(&0, 0).unwrap().trace_forwards
    }

    /// The peers PEER_MODE_MISMATCHES holds (read from its pin).
    pub fn peer_mode_mismatch_peers(&self) -> Vec<Ipv4Addr> {
        use datapath_common::{ModeMismatch, NodeKey, map_names};
        let pins = datapath_agent::bpf::PinLayout::new(&self.bpffs_dir);
        let map = aya::maps::MapData::from_pin(pins.map(map_names::PEER_MODE_MISMATCHES)).unwrap();
        let map: aya::maps::HashMap<_, NodeKey, ModeMismatch> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
        map.keys().map(|key| Ipv4Addr::from(key.unwrap().ipv4)).collect()
    }

    pub fn cni_config(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "datapath-test",
            "type": "datapath-cni",
            "agentSocket": self.socket,
            "hostVethPrefix": VETH_PREFIX,
            "lockDir": self.cni_lock_dir(),
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.pod_cidr }]],
                "dataDir": self.work_dir.join("ipam"),
            }
        })
    }

    /// Where this node's plugin keeps its per-container lock files.
    pub fn cni_lock_dir(&self) -> PathBuf {
        self.work_dir.join("cni-locks")
    }

    /// Files in the plugin's lock directory (none while no CNI call runs).
    pub fn cni_lock_files(&self) -> Vec<String> {
        std::fs::read_dir(self.cni_lock_dir())
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Run the plugin in the node namespace, as a runtime would.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> CniRun {
        let child = self.spawn_cni(env, stdin);
        Self::cni_outcome(child.wait_with_output().unwrap())
    }

    /// [`Node::cni`], killing the plugin if it has not finished within
    /// `deadline`: None then (it hung).
    pub fn cni_within(&self, env: &[(&str, &str)], stdin: &[u8], deadline: Duration) -> Option<CniRun> {
        output_within(self.spawn_cni(env, stdin), deadline).map(Self::cni_outcome)
    }

    fn spawn_cni(&self, env: &[(&str, &str)], stdin: &[u8]) -> Child {
        let cni_path = format!("{}:/usr/lib/cni", bin_dir().display());
        let mut cmd = self.in_node(&bin_dir().join("datapath-cni"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("CNI_PATH", cni_path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child
    }

    fn cni_outcome(out: std::process::Output) -> CniRun {
        let raw_stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stdout = serde_json::from_str(raw_stdout.trim()).unwrap_or(serde_json::Value::Null);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        CniRun { success: out.status.success(), stdout, raw_stdout, stderr }
    }

    pub fn cni_env<'a>(command: &'a str, container_id: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=test-pod"),
        ]
    }

    /// Create a pod namespace and ADD it through the plugin.
    pub fn add_pod(&self, name: &str) -> Pod {
        self.add_pod_as(name, "default", "test-pod")
    }

    /// [`Node::add_pod`] for the Kubernetes pod `namespace`/`pod_name`
    /// (what the runtime passes in CNI_ARGS, and policy selects by).
    pub fn add_pod_as(&self, name: &str, namespace: &str, pod_name: &str) -> Pod {
        let netns = Netns::new(format!("{}-{name}", self.id));
        let container_id = format!("{}-{name}-container", self.id);
        let path = netns.path().display().to_string();
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod_name}");
        let mut env = Self::cni_env("ADD", &container_id, &path);
        env.retain(|(key, _)| *key != "CNI_ARGS");
        env.push(("CNI_ARGS", &args));
        let run = self.cni(&env, self.cni_config().to_string().as_bytes());
        assert!(
            run.success,
            "CNI ADD failed: {}\nplugin stderr: {}\nagent log:\n{}",
            run.raw_stdout,
            run.stderr,
            self.agent_log()
        );
        let address = run.stdout["ips"][0]["address"].as_str().expect("result has an address");
        let ip: Ipv4Addr = address.trim_end_matches("/32").parse().unwrap();
        let host_veth = run.stdout["interfaces"][0]["name"].as_str().unwrap().to_owned();
        Pod { netns, container_id, ip, host_veth, result: run.stdout }
    }

    pub fn del_pod(&self, pod: &Pod) -> CniRun {
        let path = pod.netns.path().display().to_string();
        let mut conf = self.cni_config();
        conf["prevResult"] = pod.result.clone();
        self.cni(&Self::cni_env("DEL", &pod.container_id, &path), conf.to_string().as_bytes())
    }

    /// `datapath-agent inspect <what> --json` against this node's pins, run
    /// in the node's namespace (where the host veth ifindexes mean something).
    pub fn inspect(&self, what: &str) -> serde_json::Value {
        let out = self
            .in_node(&bin_dir().join("datapath-agent"))
            .args(["inspect", what, "--json", "--bpffs-dir"])
            .arg(&self.bpffs_dir)
            .arg("--state-dir")
            .arg(self.work_dir.join("state"))
            .output()
            .unwrap();
        assert!(out.status.success(), "inspect {what}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Start `datapath-agent monitor --json <args>` in the node; returns once
    /// it is watching.
    pub fn monitor(&self, args: &[&str]) -> Monitor {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.monitor_text(&all)
    }

    /// Start `datapath-agent monitor <args>` (table output unless `--json`).
    pub fn monitor_text(&self, args: &[&str]) -> Monitor {
        use std::io::BufRead as _;
        let mut child = self
            .in_node(&bin_dir().join("datapath-agent"))
            .args(["monitor", "--bpffs-dir"])
            .arg(&self.bpffs_dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn monitor");
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        assert!(first.starts_with("monitoring"), "monitor did not start: {first}");
        Monitor { child, stderr }
    }

    /// `inspect endpoints` without the traffic counters: what is programmed.
    pub fn programmed_endpoints(&self) -> serde_json::Value {
        let mut endpoints = self.inspect("endpoints");
        for endpoint in endpoints.as_array_mut().unwrap() {
            let fields = endpoint.as_object_mut().unwrap();
            fields.retain(|name, _| !name.starts_with("sent_") && !name.starts_with("delivered_"));
        }
        endpoints
    }

    /// The host veth indexes POD_INTERFACES holds (read from its pin).
    pub fn pod_interface_indexes(&self) -> Vec<u32> {
        use datapath_common::{PodInterface, map_names};
        let pins = datapath_agent::bpf::PinLayout::new(&self.bpffs_dir);
        let map = aya::maps::MapData::from_pin(pins.map(map_names::POD_INTERFACES)).unwrap();
        let map: aya::maps::HashMap<_, u32, PodInterface> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
        let mut indexes: Vec<u32> = map.keys().collect::<Result<_, _>>().unwrap();
        indexes.sort();
        indexes
    }

    /// Put an entry into POD_INTERFACES behind the agent's back (what an
    /// older agent could leave behind).
    pub fn insert_pod_interface(&self, ifindex: u32, pod_ipv4: Ipv4Addr) {
        use datapath_common::{NO_TRAFFIC_SLOT, PodInterface, map_names};
        let pins = datapath_agent::bpf::PinLayout::new(&self.bpffs_dir);
        let map = aya::maps::MapData::from_pin(pins.map(map_names::POD_INTERFACES)).unwrap();
        let mut map: aya::maps::HashMap<_, u32, PodInterface> =
            aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(map).unwrap()).unwrap();
        let entry = PodInterface {
            pod_ipv4: pod_ipv4.octets(),
            host_mac: [0x02, 0, 0, 0, 0, 1],
            isolation: 0,
            _pad: 0,
            traffic_slot: NO_TRAFFIC_SLOT,
        };
        map.insert(ifindex, entry, 0).unwrap();
    }

    /// Zero the copies of NetworkPolicy isolation in every ENDPOINTS and
    /// POD_INTERFACES entry behind the agent's back (what a build without
    /// them leaves behind).
    pub fn clear_isolation_copies(&self) {
        use datapath_common::{Endpoint, EndpointKey, PodInterface, map_names};
        let pins = datapath_agent::bpf::PinLayout::new(&self.bpffs_dir);
        let open =
            |name| aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(pins.map(name)).unwrap());
        let mut endpoints: aya::maps::HashMap<_, EndpointKey, Endpoint> =
            aya::maps::HashMap::try_from(open(map_names::ENDPOINTS).unwrap()).unwrap();
        let all: Vec<_> = endpoints.iter().map(Result::unwrap).collect();
        for (key, endpoint) in all {
            endpoints.insert(key, endpoint.with_isolation(0), 0).unwrap();
        }
        let mut interfaces: aya::maps::HashMap<_, u32, PodInterface> =
            aya::maps::HashMap::try_from(open(map_names::POD_INTERFACES).unwrap()).unwrap();
        let all: Vec<_> = interfaces.iter().map(Result::unwrap).collect();
        for (ifindex, interface) in all {
            interfaces.insert(ifindex, PodInterface { isolation: 0, ..interface }, 0).unwrap();
        }
    }

    pub fn drop_count(&self, reason: &str) -> u64 {
        self.inspect("counters")["drops"][reason].as_u64().unwrap()
    }

    /// Host veths with our test prefix that exist in the node namespace.
    pub fn host_veths(&self) -> Vec<String> {
        sh(&["ip", "-n", &self.netns.name, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_owned())
            .filter(|n| n.starts_with(VETH_PREFIX) && !n.starts_with("dptup"))
            .collect()
    }

    pub fn host_routes(&self) -> String {
        sh(&["ip", "-n", &self.netns.name, "route", "show"])
    }

    /// Leases host-local holds for this node.
    pub fn ipam_leases(&self) -> Vec<String> {
        let dir = self.work_dir.join("ipam/datapath-test");
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_agent();
        // Removing the pins detaches the links and frees the maps.
        let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Ping `dst` from inside `from` (a netns name): `count` echo requests.
pub fn ping(from: &Netns, dst: Ipv4Addr, count: u32) -> bool {
    from.exec_ok(&["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", &dst.to_string()])
}

/// Run `f` on a new thread inside the namespace at `ns` (entered with the
/// agent's own helper); join the handle for its result.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        datapath_api::netns::enter(&ns).expect("enter the namespace");
        f()
    })
}

/// A real TCP connection from `client` to a server in `server` at
/// `server_ip`: the client sends `len` bytes, the server echoes them back.
pub fn tcp_echo(server: &Netns, server_ip: Ipv4Addr, client: &Netns, len: usize) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let srv = in_netns(&server.path(), move || -> anyhow::Result<()> {
        let listener = TcpListener::bind((server_ip, 0))?;
        tx.send(listener.local_addr()?.port())?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 65536];
        let mut seen = 0;
        while seen < len {
            let n = conn.read(&mut buf)?;
            anyhow::ensure!(n > 0, "client closed early");
            conn.write_all(&buf[..n])?;
            seen += n;
        }
        Ok(())
    });
    let port = rx.recv_timeout(Duration::from_secs(5))?;
    let cli = in_netns(&client.path(), move || -> anyhow::Result<()> {
        let mut conn = TcpStream::connect_timeout(&(server_ip, port).into(), Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut w = conn.try_clone()?;
            let p = payload.clone();
            std::thread::spawn(move || w.write_all(&p))
        };
        let mut back = vec![0u8; len];
        conn.read_exact(&mut back)?;
        writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        anyhow::ensure!(back == payload, "echoed bytes differ");
        Ok(())
    });
    cli.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    srv.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    Ok(())
}

/// Send raw Ethernet frames out of `ifname` inside `ns` (AF_PACKET), as a
/// misbehaving pod could.
pub fn send_raw_frames(ns: &Netns, ifname: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
    send_raw_frames_in(&ns.path(), ifname, frames)
}

/// [`send_raw_frames`] from the namespace at `netns` (a path under /run/netns).
pub fn send_raw_frames_in(netns: &Path, ifname: &str, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
    let ifname = ifname.to_owned();
    in_netns(netns, move || -> anyhow::Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())?;
        // SAFETY: plain socket calls with checked results; addr is a zeroed sockaddr_ll.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            anyhow::ensure!(fd >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for frame in &frames {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    anyhow::bail!("sendto: {e}");
                }
            }
            libc::close(fd);
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("raw sender panicked"))?
}

/// A running `datapath-agent monitor --json`.
pub struct Monitor {
    child: Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl Monitor {
    /// Wait for it to stop (by --count or --seconds): the events it printed
    /// and its closing summary line.
    pub fn finish(self) -> (Vec<serde_json::Value>, String) {
        let (stdout, summary) = self.finish_text();
        let events =
            stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect();
        (events, summary)
    }

    /// Wait for it to stop: what it printed, and its closing summary line.
    pub fn finish_text(mut self) -> (String, String) {
        use std::io::Read as _;
        let mut stdout = String::new();
        self.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        let mut summary = String::new();
        self.stderr.read_to_string(&mut summary).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "monitor failed: {summary}");
        (stdout, summary)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send one VXLAN datagram from `from_ip` (inside `ns`) to `to_ip`:`port`,
/// carrying `inner` (an Ethernet frame) with network identifier `vni`: what
/// a peer node's tunnel sends, built by hand to send what it would not.
pub fn send_vxlan(ns: &Netns, from_ip: Ipv4Addr, to_ip: Ipv4Addr, port: u16, vni: u32, inner: Vec<u8>) {
    in_netns(&ns.path(), move || {
        let socket = std::net::UdpSocket::bind((from_ip, 0)).unwrap();
        // RFC 7348: flags (I bit), 3 reserved, VNI (24 bits), 1 reserved.
        let vni = vni.to_be_bytes();
        let mut datagram = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
        datagram.extend_from_slice(&inner);
        socket.send_to(&datagram, (to_ip, port)).unwrap();
    })
    .join()
    .unwrap();
}

/// MAC of `ifname` inside `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = sh(&["ip", "-n", &ns.name, "-j", "link", "show", ifname]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = v[0]["address"].as_str().unwrap();
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// HTTP GET `path` from 127.0.0.1:`port` inside `ns` (the agent's health and
/// metrics endpoint): (status, body).
pub fn http_get_local(ns: &Netns, port: u16, path: &str) -> (u16, String) {
    try_http_get_local(ns, port, path).expect("connect to the agent's HTTP endpoint")
}

/// [`http_get_local`], with a refused connection as an error.
pub fn try_http_get_local(ns: &Netns, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_local_with(ns, port, path, &[]).map(|(status, _, body)| (status, body))
}

/// GET `path` from 127.0.0.1:`port` in `ns` with extra request `headers`:
/// (status, response head, body).
pub fn http_get_local_with(
    ns: &Netns,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read as _, Write as _};
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let path = path.to_owned();
    in_netns(&ns.path(), move || {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
        Ok((status, head.to_owned(), body.to_owned()))
    })
    .join()
    .unwrap()
}

/// The pod takes `spoofed` as a second address and pings `dst` from it
/// `count` times; true if any reply came back (it must not).
pub fn ping_from_spoofed_address(pod: &Pod, spoofed: &str, dst: Ipv4Addr, count: u32) -> bool {
    let _ = sh_ok(&["ip", "-n", &pod.netns.name, "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]);
    pod.netns.exec_ok(&[
        "ping",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        spoofed,
        &dst.to_string(),
    ])
}

/// The output of `child` if it finishes within `deadline`; else it is
/// killed, and `None` (it hung).
pub fn output_within(mut child: Child, deadline: Duration) -> Option<std::process::Output> {
    let until = Instant::now() + deadline;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// Frames a misbehaving pod `from` (on `node`) can send towards `to`, one
/// per named drop reason: a 10-byte IPv4 header (malformed_ipv4), an
/// 802.1Q-tagged IPv4 packet (vlan_tagged), ARP claiming `to`'s address
/// (spoofed_arp).
pub fn malformed_frames(node: &Node, from: &Pod, to: &Pod) -> Vec<Vec<u8>> {
    use crate::packets::{ETH_P_8021Q, ETH_P_IP, Ipv4, arp_request, ethernet};
    let pod_mac = mac_of(&from.netns, "eth0");
    let host_mac = mac_of(&node.netns, &from.host_veth);
    let ip = Ipv4::icmp_echo(from.ip.octets(), to.ip.octets()).bytes();
    let mut tagged = vec![0x00, 0x64, 0x08, 0x00];
    tagged.extend_from_slice(&ip);
    vec![
        ethernet(host_mac, pod_mac, ETH_P_IP, &ip[..10]),
        ethernet(host_mac, pod_mac, ETH_P_8021Q, &tagged),
        arp_request(pod_mac, to.ip.octets(), [169, 254, 1, 1]),
    ]
}
