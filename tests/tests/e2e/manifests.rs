//! deploy/ parses into the Kubernetes API types, asks for no more than the
//! agent needs, and carries an agent config the agent's own loader accepts.
//! (Pure parsing, no root needed; but for the image's stripped binaries,
//! which run a node.)

use std::{collections::BTreeSet, net::Ipv4Addr};

use datapath_agent::source::config::{AgentConfig, NodeIdentity, Source};
use datapath_tests::{
    bin_dir,
    lab::{Node, ping},
    require_root, sh,
};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn documents() -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/datapath.yaml")).unwrap();
    serde_saphyr::from_multiple::<serde_json::Value>(&text).expect("deploy/datapath.yaml is YAML")
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<serde_json::Value> = documents().into_iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "exactly one {kind}");
    serde_json::from_value(docs[0].clone()).unwrap_or_else(|e| panic!("{kind} does not parse: {e}"))
}

#[test]
fn every_document_is_a_known_kubernetes_object() {
    let kinds: BTreeSet<String> =
        documents().iter().map(|d| d["kind"].as_str().unwrap().to_owned()).collect();
    let expected: BTreeSet<String> =
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "ServiceAccount"]
            .map(String::from)
            .into();
    assert_eq!(kinds, expected);
    let _: ServiceAccount = one("ServiceAccount");
    let _: ClusterRoleBinding = one("ClusterRoleBinding");
}

#[test]
fn rbac_reads_what_the_agent_watches_and_writes_only_node_status() {
    let role: ClusterRole = one("ClusterRole");
    let rules = role.rules.unwrap();
    let granted: BTreeSet<(String, String, String)> = rules
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                let verbs = r.verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs.clone().into_iter().map(move |v| (g.clone(), res.clone(), v))
                })
            })
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "services", "get"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("networking.k8s.io", "networkpolicies", "list"),
        ("networking.k8s.io", "networkpolicies", "watch"),
        // The NetworkUnavailable condition, once ready (nothing else is written).
        ("", "nodes/status", "patch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, want, "read-only on what the agent watches, patch on nodes/status only");
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    let sa: ServiceAccount = one("ServiceAccount");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    assert_eq!(binding.subjects.unwrap()[0].name, sa.metadata.name.unwrap());
}

#[test]
fn daemonset_runs_everywhere_with_only_the_capabilities_it_needs() {
    let ds: DaemonSet = one("DaemonSet");
    let spec = ds.spec.unwrap();
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert!(
        pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    assert_eq!(spec.update_strategy.unwrap().type_.as_deref(), Some("RollingUpdate"));
    let agent = &pod.containers[0];
    let security = agent.security_context.clone().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.unwrap();
    let added: BTreeSet<&str> = caps.add.as_ref().unwrap().iter().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(caps.drop.unwrap(), vec!["ALL".to_owned()]);
    let env = agent.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path,
        "spec.nodeName"
    );
    assert_eq!(
        agent.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        agent.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(),
        Some("/healthz")
    );

    // Every path the agent's config uses is on a volume from the host.
    let mounts: Vec<String> =
        agent.volume_mounts.clone().unwrap().into_iter().map(|m| m.mount_path).collect();
    let config = agent_config();
    for path in [
        config.bpffs_dir.clone(),
        config.state_dir.clone(),
        config.api_socket.parent().unwrap().to_owned(),
        config.cni_config_file.clone().unwrap().parent().unwrap().to_owned(),
    ] {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{} is on no mounted volume ({mounts:?})",
            path.display()
        );
    }
    let init = &pod.init_containers.unwrap()[0];
    assert!(init.command.as_ref().unwrap().join(" ").contains("/host/opt/cni/bin/datapath-cni"));
    // Linux nodes only: the agent and its programs are Linux's.
    assert_eq!(
        pod.node_selector.unwrap().get("kubernetes.io/os").map(String::as_str),
        Some("linux"),
        "nodeSelector kubernetes.io/os: linux"
    );
}

/// The init container's install command, run for real (its paths moved
/// into a temporary directory) while the old plugin binary there is being
/// executed, as a runtime may during a rollout: the new binary takes its
/// place, where a plain `cp` onto it fails with "Text file busy".
#[test]
fn the_plugin_is_installed_over_a_running_one() {
    let ds: DaemonSet = one("DaemonSet");
    let init = ds.spec.unwrap().template.spec.unwrap().init_containers.unwrap().remove(0);
    let command = init.command.unwrap();
    let dir = std::env::temp_dir().join(format!("dpt-install-{}", std::process::id()));
    let (source, bin) = (dir.join("src"), dir.join("bin"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    // The old plugin: a copy of `sleep`, running. The new one: a script.
    std::fs::copy("/bin/sleep", bin.join("datapath-cni")).unwrap();
    let mut running = std::process::Command::new(bin.join("datapath-cni")).arg("30").spawn().unwrap();
    std::fs::write(source.join("datapath-cni"), "#!/bin/sh\necho new plugin\n").unwrap();
    let moved: Vec<String> = command
        .iter()
        .map(|arg| {
            arg.replace("/usr/local/bin/datapath-cni", source.join("datapath-cni").to_str().unwrap())
                .replace("/host/opt/cni/bin", bin.to_str().unwrap())
        })
        .collect();
    let plain_cp = std::process::Command::new("cp")
        .arg(source.join("datapath-cni"))
        .arg(bin.join("datapath-cni"))
        .output()
        .unwrap();
    let install = std::process::Command::new(&moved[0]).args(&moved[1..]).output().unwrap();
    let installed = std::fs::read_to_string(bin.join("datapath-cni"));
    let left: Vec<_> = std::fs::read_dir(&bin).unwrap().map(|e| e.unwrap().file_name()).collect();
    let _ = running.kill();
    let _ = running.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        String::from_utf8_lossy(&plain_cp.stderr).contains("Text file busy"),
        "control: a plain cp onto the running binary fails: {plain_cp:?}"
    );
    assert!(install.status.success(), "{moved:?}: {install:?}");
    assert_eq!(installed.unwrap(), "#!/bin/sh\necho new plugin\n");
    assert_eq!(left.len(), 1, "nothing left beside it: {left:?}");
}

fn agent_config() -> AgentConfig {
    let cm: ConfigMap = one("ConfigMap");
    let text = cm.data.unwrap().remove("agent.toml").expect("agent.toml in the ConfigMap");
    let settings = AgentConfig::source_settings(&text).unwrap();
    assert_eq!(settings.source, Source::Kubernetes);
    // What a Node object would supply.
    let identity = NodeIdentity {
        node_name: "worker-1".into(),
        pod_cidr: "10.244.1.0/24".parse().unwrap(),
        node_ip: "172.18.0.2".parse().unwrap(),
    };
    AgentConfig::parse_with(&text, Some(&identity))
        .unwrap_or_else(|e| panic!("the agent refuses the ConfigMap: {e}"))
}

#[test]
fn configmap_is_accepted_by_the_agents_loader() {
    let config = agent_config();
    assert_eq!(config.health_address.unwrap().port(), 9976, "the probes' port");
}

/// The port the agent serves /metrics, /healthz and /readyz on is the one
/// the DaemonSet declares (named `metrics`), probes, and tells scrapers
/// (annotations, and the PodMonitor example, which selects the agent's pods
/// by their label).
#[test]
fn scrapers_and_probes_find_the_agents_health_port() {
    let port = i32::from(agent_config().health_address.unwrap().port());
    let ds: DaemonSet = one("DaemonSet");
    let template = ds.spec.unwrap().template;
    let pod = template.spec.unwrap();
    let agent = &pod.containers[0];
    let declared =
        agent.ports.as_ref().unwrap().iter().find(|p| p.name.as_deref() == Some("metrics")).unwrap();
    assert_eq!(declared.container_port, port);
    for probe in [&agent.readiness_probe, &agent.liveness_probe] {
        let http = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(http.port, IntOrString::String("metrics".into()));
    }
    let metadata = template.metadata.unwrap();
    let annotations = metadata.annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let monitor: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/podmonitor.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(monitor["kind"], "PodMonitor");
    let labels = metadata.labels.unwrap();
    for (key, value) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            labels.get(key).map(String::as_str),
            value.as_str(),
            "the PodMonitor selects the agent's pods"
        );
    }
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
}

/// The image's build context leaves the build output out (target/ alone
/// is gigabytes: `podman build … .` sent it all) and keeps what the
/// Containerfile builds from.
#[test]
fn the_image_build_context_leaves_build_output_out() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let ignore = std::fs::read_to_string(format!("{root}/.containerignore")).expect(".containerignore");
    let patterns: Vec<&str> =
        ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(patterns.contains(&"target/") && patterns.contains(&"**/target/"), "{patterns:?}");
    for needed in ["scripts", "Cargo.toml", "Cargo.lock", "datapath-ebpf", "datapath-agent", "datapath-cni"] {
        assert!(
            patterns.iter().all(|p| !p.trim_end_matches('/').eq(needed)),
            "{needed} is ignored, the Containerfile builds from it"
        );
    }
}

/// The image is built with the stable toolchain the project is tested
/// with (the base image's tag is this `rustc`'s version) and ships its
/// binaries stripped; a stripped agent still carries its programs (data to
/// strip) and forwards: pods on a node run by one reach each other.
#[test]
fn the_image_pins_its_toolchain_and_its_stripped_binaries_forward() {
    require_root!();
    let containerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/Containerfile")).unwrap();
    let rustc = sh(&["rustc", "--version"]);
    let version: Vec<&str> = rustc.split_whitespace().nth(1).unwrap().split('.').take(2).collect();
    let base = format!("FROM docker.io/library/rust:{}-bookworm AS build", version.join("."));
    assert!(containerfile.lines().any(|l| l == base), "expected `{base}` in deploy/Containerfile");
    assert!(
        containerfile.contains("strip target/release/datapath-agent target/release/datapath-cni"),
        "the image's binaries are stripped:\n{containerfile}"
    );

    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    let stripped = node.work_dir.join("datapath-agent-stripped");
    std::fs::copy(bin_dir().join("datapath-agent"), &stripped).unwrap();
    sh(&["strip", &stripped.display().to_string()]);
    let sections = sh(&["readelf", "-S", &stripped.display().to_string()]);
    assert!(!sections.contains(".symtab") && !sections.contains(".debug_info"), "{sections}");
    node.agent_binary = Some(stripped);
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 2), "pods on a stripped agent's node:\n{}", node.agent_log());
}

/// deploy/cleanup.yaml runs `datapath-agent cleanup` with the agent's own
/// config, where the agent's DaemonSet mounts what it makes: the same
/// host paths at the same places (so the paths in the config name the
/// host's files), and the plugin's directory as the install puts it.
#[test]
fn the_cleanup_daemonset_reaches_what_the_agent_made() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cleanup.yaml")).unwrap();
    let cleanup: DaemonSet = serde_saphyr::from_str(&text).expect("deploy/cleanup.yaml is one DaemonSet");
    let pod = cleanup.spec.unwrap().template.spec.unwrap();
    let init = pod.init_containers.clone().unwrap().remove(0);
    let command = init.command.clone().unwrap();
    assert_eq!(
        command,
        [
            "/usr/local/bin/datapath-agent",
            "cleanup",
            "--config",
            "/etc/datapath/agent.toml",
            "--cni-bin-dir",
            "/host/opt/cni/bin"
        ]
    );
    let agent: DaemonSet = one("DaemonSet");
    let agent_pod = agent.spec.unwrap().template.spec.unwrap();
    // (mount path, host path or ConfigMap) of a container.
    let mounts = |spec: &k8s_openapi::api::core::v1::PodSpec,
                  container: &k8s_openapi::api::core::v1::Container| {
        let volumes = spec.volumes.clone().unwrap();
        container
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| {
                let v = volumes.iter().find(|v| v.name == m.name).unwrap();
                let source = v
                    .host_path
                    .as_ref()
                    .map(|h| h.path.clone())
                    .or_else(|| v.config_map.as_ref().map(|c| format!("configmap {}", c.name)))
                    .unwrap();
                (m.mount_path, source)
            })
            .collect::<BTreeSet<_>>()
    };
    let theirs = mounts(&pod, &init);
    let containers = agent_pod.containers.clone();
    let mut ours = mounts(&agent_pod, &containers[0]);
    ours.extend(mounts(&agent_pod, &agent_pod.init_containers.clone().unwrap()[0]));
    // The agent reads the host's cgroups (socket programs, pinned); nothing to remove there.
    ours.retain(|(path, _)| path != "/host/sys/fs/cgroup");
    assert_eq!(theirs, ours);
    // The config names paths under those mounts.
    let config = agent_config();
    for path in [config.bpffs_dir.clone(), config.state_dir.clone(), config.cni_config_file.clone().unwrap()]
    {
        assert!(theirs.iter().any(|(mount, _)| path.starts_with(mount)), "{} is not mounted", path.display());
    }
}

/// deploy/kustomization.yaml is a base of datapath.yaml alone (not the
/// uninstall), with the image named as the DaemonSet names it so an
/// overlay's `images:` entry replaces it; where kubectl is installed, it
/// renders to the same objects.
#[test]
fn the_kustomize_base_renders_the_manifest() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let text = std::fs::read_to_string(format!("{dir}/kustomization.yaml")).unwrap();
    let base: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(base["kind"], "Kustomization");
    assert_eq!(base["resources"], serde_json::json!(["datapath.yaml"]));
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let images: BTreeSet<String> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .map(|c| c.image.clone().unwrap())
        .collect();
    let name = base["images"][0]["name"].as_str().unwrap();
    let tag = base["images"][0]["newTag"].as_str().unwrap();
    assert_eq!(
        images,
        BTreeSet::from([format!("{name}:{tag}")]),
        "every container's image is the one patched"
    );
    // The real renderer, where present (kubectl embeds kustomize).
    match std::process::Command::new("kubectl").args(["kustomize", dir]).output() {
        Ok(out) if out.status.success() => {
            let rendered =
                serde_saphyr::from_multiple::<serde_json::Value>(&String::from_utf8_lossy(&out.stdout))
                    .unwrap();
            let names = |docs: &[serde_json::Value]| -> BTreeSet<String> {
                docs.iter().map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"])).collect()
            };
            assert_eq!(names(&rendered), names(&documents()));
        }
        other => eprintln!("kubectl kustomize not run: {other:?}"),
    }
}
