//! Our CNI plugin driven by container runtimes nobody here wrote: containerd
//! through CRI (what kubelet does) and podman with its CNI backend, each
//! running inside a simulated node. Images are OCI archives built from
//! Debian's catatonit (pause) and busybox by `tests/runtimes/cri_driver.py`.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    bin_dir,
    lab::{Fabric, Netns, Node, in_netns, peered_nodes},
    require_root, sh,
};

fn driver() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("runtimes/cri_driver.py")
}

/// Run the driver; its JSON answer.
fn drive(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3").arg(driver()).args(args).output().expect("python3");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "driver {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "driver {args:?}: {answer}");
    answer
}

/// A CNI bin dir as a runtime expects it: our plugin plus loopback and host-local.
fn cni_bin_dir(dir: &Path) -> PathBuf {
    let bin = dir.join("cnibin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, target) in [
        ("datapath-cni", bin_dir().join("datapath-cni")),
        ("loopback", PathBuf::from("/usr/lib/cni/loopback")),
        ("host-local", PathBuf::from("/usr/lib/cni/host-local")),
    ] {
        let _ = std::fs::remove_file(bin.join(name));
        std::os::unix::fs::symlink(target, bin.join(name)).unwrap();
    }
    bin
}

/// The node's CNI config as a conflist named `name`.
fn conflist(node: &Node, name: &str) -> String {
    let mut plugin = node.cni_config();
    let obj = plugin.as_object_mut().unwrap();
    obj.remove("cniVersion");
    obj.remove("name");
    serde_json::json!({ "cniVersion": "1.0.0", "name": name, "plugins": [plugin] }).to_string()
}

/// containerd with its own root, state, socket and CNI dirs, in `node`'s netns.
struct Containerd {
    dir: PathBuf,
    sock: PathBuf,
    child: Child,
    pods: Vec<String>,
}

impl Containerd {
    fn start(node: &Node) -> Self {
        let dir = node.work_dir.join("containerd");
        let netd = dir.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        std::fs::write(netd.join("10-datapath.conflist"), conflist(node, "datapath-test")).unwrap();
        let bin = cni_bin_dir(&dir);
        let sock = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/dpt-pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{netd}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
            d = dir.display(),
            sock = sock.display(),
            bin = bin.display(),
            netd = netd.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = node
            .in_node(Path::new("/usr/bin/containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let built = drive(&["images", "--dir", &images.display().to_string()]);
        let me = Self { dir, sock, child, pods: Vec::new() };
        for image in ["pause", "busybox"] {
            sh(&[
                "ctr",
                "-a",
                &me.sock.display().to_string(),
                "-n",
                "k8s.io",
                "images",
                "import",
                built[image]["archive"].as_str().unwrap(),
            ]);
        }
        me
    }

    fn sock(&self) -> String {
        self.sock.display().to_string()
    }

    fn pod_args<'a>(&'a self, name: &'a str, uid: &'a str, logs: &'a str) -> Vec<&'a str> {
        vec!["--name", name, "--uid", uid, "--log-dir", logs]
    }

    /// RunPodSandbox + PodSandboxStatus: (sandbox id, pod IP).
    fn run_pod(&mut self, name: &str) -> (String, Ipv4Addr) {
        let logs = self.dir.join("logs").join(name).display().to_string();
        let uid = format!("uid-{name}");
        let sock = self.sock();
        let mut args = vec!["run-pod", "--sock", &sock];
        args.extend(self.pod_args(name, &uid, &logs));
        let answer = drive(&args);
        let id = answer["id"].as_str().unwrap().to_owned();
        self.pods.push(id.clone());
        (id, answer["ip"].as_str().unwrap().parse().unwrap())
    }

    fn start_container(&self, pod: &str, pod_name: &str, command: &[&str]) {
        let logs = self.dir.join("logs").join(pod_name).display().to_string();
        let uid = format!("uid-{pod_name}");
        let sock = self.sock();
        let mut args = vec![
            "start-container",
            "--sock",
            &sock,
            "--pod",
            pod,
            "--container",
            "web",
            "--image",
            "localhost/dpt-busybox:1",
        ];
        args.extend(self.pod_args(pod_name, &uid, &logs));
        args.push("--");
        args.extend_from_slice(command);
        drive(&args);
    }

    /// StopPodSandbox + RemovePodSandbox (each calls CNI DEL).
    fn remove_pod(&mut self, pod: &str) {
        drive(&["remove-pod", "--sock", &self.sock(), "--pod", pod]);
        self.pods.retain(|p| p != pod);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pod in std::mem::take(&mut self.pods) {
            let _ = Command::new("python3")
                .arg(driver())
                .args(["remove-pod", "--sock", &self.sock(), "--pod", &pod])
                .output();
        }
        let _ = Command::new("ctr")
            .args([
                "-a",
                &self.sock(),
                "-n",
                "k8s.io",
                "images",
                "rm",
                "localhost/dpt-pause:1",
                "localhost/dpt-busybox:1",
            ])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims of this instance, and any mount left under its root.
        let _ = Command::new("pkill").args(["-f", &self.dir.display().to_string()]).status();
        unmount_below(&self.dir);
    }
}

fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(&*dir.to_string_lossy()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// HTTP GET from inside `from`, retried while the server starts.
fn http_get(from: &Netns, ip: Ipv4Addr, port: u16) -> String {
    in_netns(&from.path(), move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let attempt = (|| -> std::io::Result<String> {
                let mut conn = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut body = String::new();
                conn.read_to_string(&mut body)?;
                Ok(body)
            })();
            match attempt {
                Ok(body) if !body.is_empty() => return body,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => panic!("GET http://{ip}:{port}/: {other:?}"),
            }
        }
    })
    .join()
    .unwrap()
}

#[track_caller]
fn assert_node_clean(node: &Node) {
    assert_eq!(node.host_veths(), Vec::<String>::new(), "veths left");
    assert_eq!(node.inspect("endpoints"), serde_json::json!([]), "endpoints left");
    assert_eq!(node.ipam_leases(), Vec::<String>::new(), "leases left");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("links")).unwrap().count(), 0, "link pins left");
    assert_eq!(std::fs::read_dir(node.bpffs_dir.join("to-pod-links")).unwrap().count(), 0, "link pins left");
    assert_eq!(std::fs::read_dir(node.work_dir.join("state/endpoints")).unwrap().count(), 0, "records left");
    assert!(!node.host_routes().contains("10.244.1."), "routes left: {}", node.host_routes());
}

#[test]
fn containerd_pods_get_our_addresses_and_serve_across_nodes() {
    require_root!();
    let fabric = Fabric::new();
    let (a, b) = peered_nodes(&fabric, "native");
    let mut containerd = Containerd::start(&a);

    let (web, web_ip) = containerd.run_pod("web");
    assert!(
        a.pod_cidr.starts_with("10.244.1.") && web_ip.octets()[..3] == [10, 244, 1],
        "pod IP {web_ip} from node A's CIDR"
    );
    let endpoints = a.inspect("endpoints");
    assert_eq!(endpoints[0]["pod_ip"], web_ip.to_string());
    assert_eq!(endpoints[0]["pod"], "default/web", "K8S_POD_* from containerd reach inspect: {endpoints}");
    containerd.start_container(&web, "web", &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]);

    // From a pod on the other node.
    let client = b.add_pod("client");
    let body = http_get(&client.netns, web_ip, 8080);
    assert!(body.starts_with("HTTP/1.") && body.contains("hello from a pod made by containerd"), "{body}");

    // A second sandbox on the same node reaches it too.
    let (_, other_ip) = containerd.run_pod("other");
    assert_ne!(other_ip, web_ip);

    containerd.remove_pod(&web);
    let other = containerd.pods[0].clone();
    containerd.remove_pod(&other);
    assert_node_clean(&a);
    let netns_left: Vec<String> =
        sh(&["ip", "netns", "list"]).lines().filter(|l| l.starts_with("cni-")).map(str::to_owned).collect();
    assert!(netns_left.is_empty(), "containerd left pod namespaces: {netns_left:?}");
}

/// podman with the CNI backend, its own root/runroot/config, in `node`'s netns.
struct Podman {
    dir: PathBuf,
    node_ns: PathBuf,
}

impl Podman {
    fn new(node: &Node, network: &str) -> Self {
        let dir = node.work_dir.join("podman");
        let netd = dir.join("cni");
        std::fs::create_dir_all(&netd).unwrap();
        std::fs::write(netd.join(format!("{network}.conflist")), conflist(node, network)).unwrap();
        let bin = cni_bin_dir(&dir);
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin.display(),
                netd.display()
            ),
        )
        .unwrap();
        Self { dir, node_ns: node.netns.path() }
    }

    /// `podman` in the node's netns with this instance's root and config.
    fn command(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_ns.display()))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["pod", "rm", "-a", "-f"]).output();
        let _ = Command::new("pkill").args(["-f", &self.dir.display().to_string()]).status();
        unmount_below(&self.dir);
    }
}

#[test]
fn podman_pod_on_our_network_is_reachable_from_another_node() {
    require_root!();
    let fabric = Fabric::new();
    let (a, b) = peered_nodes(&fabric, "vxlan");
    let podman = Podman::new(&a, "dptnet");
    let images = podman.dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let built = drive(&["images", "--dir", &images.display().to_string()]);
    podman.run(&["load", "-i", built["busybox"]["archive"].as_str().unwrap()]);

    podman.run(&["pod", "create", "--network", "dptnet", "--name", "dptpod"]);
    podman.run(&[
        "run",
        "-d",
        "--pod",
        "dptpod",
        "--name",
        "dptweb",
        "--entrypoint",
        "/bin/httpd",
        "localhost/dpt-busybox:1",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let endpoints = a.inspect("endpoints");
    assert_eq!(endpoints.as_array().unwrap().len(), 1, "{endpoints}");
    assert_eq!(endpoints[0]["pod"], "dptpod", "{endpoints}");
    let ip: Ipv4Addr = endpoints[0]["pod_ip"].as_str().unwrap().parse().unwrap();

    let client = b.add_pod("client");
    let body = http_get(&client.netns, ip, 8080);
    assert!(body.contains("hello from a pod made by containerd"), "{body}");

    podman.run(&["pod", "rm", "-f", "dptpod"]);
    assert_node_clean(&a);
}
