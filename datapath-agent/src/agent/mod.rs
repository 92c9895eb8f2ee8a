//! The agent: its state ([`Agent`]), the composition root that loads the
//! datapath and starts every source and task, and the event loop that
//! applies what they send. API handlers: [`api`]; keeping the datapath in
//! line with the endpoints, peers and Services: [`upkeep`].

mod api;
mod upkeep;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use api::{bind_private_socket, refuse_a_socket_that_answers, remove_own_socket, serve_connection};
use datapath_common::{
    MonitorConfig, NODE_FLAG_POLICY, NODE_FLAG_SERVICES, NodeConfig, RoutingMode, program_names,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use upkeep::RecordsReport;

use crate::{
    bpf::{Datapath, LoadOptions, PinLayout, PinnedConntrack, ProgramBuild},
    host::{
        node_lock::{NetnsLock, NodeLock},
        node_net::{self, RouteVia},
        state::EndpointStore,
    },
    observe::{
        health::{ConfigRejection, Health},
        metrics::{AgentErrors, ConntrackStats},
        monitor_lock::{MonitorLock, MonitorLockError},
        service_health::ServiceHealthServers,
    },
    reconcile::{
        conntrack::{self, ConntrackLimits},
        policy_sync::PolicySync,
        service_sync::ServiceSync,
        services::ThisNode,
    },
    source::{
        config::{AgentConfig, EbpfLog, Mode, Source},
        config_file::{ConfigFile, watch_config},
    },
};

/// How often a failed Service sync is tried again.
const SERVICE_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the event loop beats for the liveness probe.
const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a link that could not be switched to the loaded program is
/// tried again, live pods are checked for their map entries and program
/// link (put back if missing), and forward tracing left on by a killed
/// monitor is switched off.
const LINK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the node's own routes to other nodes' pods are checked (one
/// deleted by someone else is put back).
const ROUTE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often map entries of interfaces that no longer exist are swept (also
/// after each DEL and at start).
const INTERFACE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

struct Agent {
    errors: Arc<AgentErrors>,
    config: AgentConfig,
    datapath: Datapath,
    store: EndpointStore,
    pod_mtu: u32,
    route_via: RouteVia,
    services: ServiceSync,
    /// The health check node ports of the Services served.
    service_health: ServiceHealthServers,
    health: Arc<Health>,
    /// What the connection-tracking collector last saw (for `status`).
    conntrack_stats: Arc<ConntrackStats>,
    /// Live links that could not be switched to the loaded program: they
    /// keep forwarding with the one they have, and are retried.
    pending_links: Vec<PendingLink>,
    /// Peer pod CIDRs whose node route is someone else's (already said).
    routes_taken: Vec<ipnet::Ipv4Net>,
    policy: PolicySync,
    /// The last policy sync failed: tried again at the next link check.
    policy_failed: bool,
    /// When each reconciler last ran and how it ended (for `status`).
    reconciles: Reconciles,
}

/// The last run of each reconciler: when, and its error if it failed.
#[derive(Default)]
struct Reconciles(std::collections::BTreeMap<&'static str, (std::time::Instant, Option<String>)>);

impl Reconciles {
    fn record<T>(&mut self, what: &'static str, result: &anyhow::Result<T>) {
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        self.0.insert(what, (std::time::Instant::now(), error));
    }

    /// Did `what`'s last run fail?
    fn failed_last(&self, what: &str) -> bool {
        self.0.get(what).is_some_and(|(_, error)| error.is_some())
    }

    fn failed(&mut self, what: &'static str, error: &anyhow::Error) {
        self.0.insert(what, (std::time::Instant::now(), Some(format!("{error:#}"))));
    }

    fn status(&self) -> Vec<datapath_api::ReconcileStatus> {
        self.0
            .iter()
            .map(|(what, (at, error))| datapath_api::ReconcileStatus {
                what: (*what).to_owned(),
                seconds_ago: at.elapsed().as_secs(),
                error: error.clone(),
            })
            .collect()
    }
}

/// A pinned link to switch to the loaded program again.
struct PendingLink {
    program: &'static str,
    ifname: String,
    pin: PathBuf,
}

/// Run the agent with the config file at `config_path`, until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config_file = ConfigFile::read(config_path)?;
    // One agent per node, settled before anything is touched: the network
    // namespace's lock and the CNI socket (neither makes anything), then the
    // locks on the pinned state and the records (their directories are
    // removed again if the start fails before the datapath is pinned).
    let settings = &config_file.settings;
    let netns_lock = NetnsLock::acquire()?;
    netns_lock.answer_holder_queries().context("serving the network namespace's lock")?;
    refuse_a_socket_that_answers(&settings.api_socket)?;
    let mut node_lock = NodeLock::acquire(&settings.bpffs_dir, &settings.state_dir)?;
    let health = Arc::new(Health::default());
    let errors = Arc::new(AgentErrors::default());
    let conntrack_stats = Arc::new(ConntrackStats::default());
    // Served from now on, also while waiting for the API server below (live,
    // not ready). An address that cannot be bound is fatal: the probes
    // would fail, and the node would never see this agent ready.
    if let Some(address) = settings.health_address {
        let listener = crate::observe::health::bind(address).await?;
        let health = Arc::clone(&health);
        let registry = crate::observe::metrics::registry(
            PinLayout::new(&settings.bpffs_dir),
            Arc::clone(&errors),
            Arc::clone(&conntrack_stats),
            Arc::clone(&health),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::observe::health::serve(listener, health, registry).await {
                tracing::error!(error = format!("{e:#}"), "health endpoints failed");
            }
        });
    }
    let (config, kube_client) = config_file.resolve().await?;
    config.check_host()?;
    let (connection, netlink, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(connection);

    // Node networking first: the programs need the ifindexes.
    let uplink = node_net::uplink(&netlink, &config.uplink_interface).await?;
    // The uplink's program runs in both modes: it delivers to local pods
    // what arrives for them unencapsulated (after the kernel's forwarding
    // checks) and notices peers that send in the other mode.
    let uplink_program = (program_names::FROM_UPLINK, config.uplink_interface.clone());
    let (vxlan_ifindex, route_via, node_programs) = match config.mode {
        Mode::Native => {
            node_net::remove_vxlan_if_present(&netlink, &config.vxlan.device).await?;
            (0, RouteVia::Native { uplink_index: uplink.index }, vec![uplink_program])
        }
        Mode::Vxlan => {
            let vxlan =
                node_net::ensure_vxlan(&netlink, &config.vxlan.device, config.vxlan.port, uplink.mtu).await?;
            (
                vxlan.index,
                RouteVia::Overlay { vxlan_index: vxlan.index, vni: config.vxlan.vni },
                vec![uplink_program, (program_names::FROM_OVERLAY, config.vxlan.device.clone())],
            )
        }
    };
    node_net::enable_ip_forwarding()?;
    node_net::check_ephemeral_ports();

    let build = match config.ebpf_log {
        EbpfLog::Off => ProgramBuild::Normal,
        EbpfLog::Debug => ProgramBuild::Debug,
    };
    let load_options = LoadOptions { conntrack_entries: config.conntrack_max_entries };
    node_lock.keep_created();
    let mut datapath = Datapath::load_pinned_with(PinLayout::new(&config.bpffs_dir), build, load_options)
        .with_context(|| format!("loading the datapath under {}", config.bpffs_dir.display()))?;
    if build == ProgramBuild::Debug {
        crate::bpf::ebpf::forward_log_to_tracing(datapath.ebpf_mut())
            .context("reading the debug build's aya-log ring buffer")?;
    }
    // The monitor's forward tracing belongs to a running `monitor`: kept,
    // unless no monitor runs (one was killed and left it on).
    let monitor = datapath.monitor_config().context("reading the monitor config map")?;
    datapath
        .set_monitor_config(MonitorConfig { events_per_second: config.monitor_events_per_second, ..monitor })
        .context("writing the monitor config map")?;
    switch_off_abandoned_forward_tracing(&mut datapath)?;
    // Service translation stays as the last agent left it until the Services
    // are synced below: tracked connections must keep their translation.
    let node_config_before = datapath.node_config().context("reading the node config map")?;
    // So does policy (its maps too), until the policy objects are read.
    let services_flag = node_config_before.flags & (NODE_FLAG_SERVICES | NODE_FLAG_POLICY);
    // The mode the notes of peers in the other mode were made under.
    let mode_before =
        [Mode::Native, Mode::Vxlan].into_iter().find(|mode| node_config_before.mode == routing_mode(*mode));
    datapath
        .set_node_config(NodeConfig {
            node_ipv4: config.node_ip.octets(),
            mode: routing_mode(config.mode),
            uplink_ifindex: uplink.index,
            vxlan_ifindex,
            vni: config.vxlan.vni,
            flags: services_flag,
            vxlan_port: config.vxlan.port.to_be_bytes(),
            pod_prefix_len: config.pod_cidr.prefix_len(),
            _pad: 0,
            pod_cidr: config.pod_cidr.network().octets(),
            pod_mtu: node_net::pod_mtu(config.mode, uplink.mtu),
            conntrack_max_per_client: config.conntrack_max_per_client(),
            host_netns_cookie: if config.socket_lb {
                crate::host::node_net::netns_cookie()
                    .context("reading the node's network namespace cookie")?
            } else {
                0
            },
        })
        .context("writing the node config map")?;
    let pod_mtu = node_net::pod_mtu(config.mode, uplink.mtu);
    let store = EndpointStore::open(&config.state_dir)?;
    let services = ServiceSync::new(
        config.state_dir.clone(),
        ThisNode {
            pod_cidr: config.pod_cidr,
            address: config.node_ip,
            serve_outside: config.serve_outside_clients,
        },
    );
    let mut agent = Agent {
        config,
        datapath,
        store,
        pod_mtu,
        route_via,
        errors,
        services,
        service_health: ServiceHealthServers::default(),
        health: Arc::clone(&health),
        conntrack_stats: Arc::clone(&conntrack_stats),
        pending_links: Vec::new(),
        routes_taken: Vec::new(),
        policy: PolicySync::default(),
        policy_failed: false,
        reconciles: Reconciles::default(),
    };
    let mut report = agent.datapath.reconcile().context("reconciling pinned state")?;
    let RecordsReport { stale: stale_records, restored: endpoints_restored } = agent.reconcile_records()?;
    // Pods' veths taken down (or up again) while no agent ran; then every
    // change as it happens.
    let mut link_changes = crate::host::link_state::watch()?;
    crate::host::link_state::sync_all(&mut agent.datapath, &netlink)
        .await
        .context("reading the pods' veth states")?;
    let node_links_failed =
        agent.datapath.sync_node_links(&node_programs).context("attaching the node programs")?;
    let cgroup = match (agent.config.socket_lb, &agent.config.cgroup_root) {
        (false, _) => None,
        (true, Some(root)) => Some(root.clone()),
        (true, None) => {
            Some(crate::bpf::sock_links::cgroup2_mount().context("reading /proc/self/mountinfo")?.context(
                "socket_lb needs cgroup v2, and none is mounted: mount it, or set socket_lb = false",
            )?)
        }
    };
    // Not fatal: pods do not depend on these links, and links pinned by an
    // earlier start stay with the programs they have (same maps).
    if let Err(e) = agent.datapath.sync_socket_links(cgroup.as_deref()) {
        agent.errors.inc();
        tracing::error!(
            error = format!("{:#}", anyhow::Error::from(e)),
            "the socket programs (socket_lb) were not attached anew: the node's own sockets keep \
             what an earlier start attached, if anything"
        );
    }
    let links_failed = report.links_failed.len() + node_links_failed.len();
    for failure in std::mem::take(&mut report.links_failed).into_iter().chain(node_links_failed) {
        agent.keep_failed_link(failure);
    }
    // In kubernetes mode the peers are not known until the first Node list:
    // what is pinned stays routed until then (a restart must not cut
    // cross-node traffic, and an API server that fails its lists must not
    // either); the list is then applied by diff.
    if agent.config.source == Source::Static {
        agent.apply_peers(&netlink).await.context("programming the peer nodes")?;
    }
    // Static Services are all known now. In kubernetes mode the file has
    // none: the maps stay as the last agent left them (no connection to a
    // Service is refused across a restart) until a Service list arrives.
    if agent.config.source == Source::Static {
        let list = agent.config.services.clone();
        agent.apply_services(list).context("programming the Services")?;
    }
    // NetworkPolicy: the objects of policy_dir, else (Kubernetes source)
    // of the API server, else none. Until the objects are first read whole
    // (a directory that cannot be read, lists not complete yet), the maps
    // stay as the last agent left them: its policy goes on applying.
    let mut policy_changes = match (&agent.config.policy_dir, &kube_client) {
        (Some(dir), _) => {
            // Fingerprinted before the read: a file written while it reads
            // is the watcher's first change, not lost until the next one.
            let mut seen = crate::source::policy_dir::fingerprint(dir);
            match crate::source::policy_dir::read(dir) {
                Ok(objects) => agent.policy.set_objects(objects),
                Err(e) => {
                    tracing::error!(
                        error = format!("{:#}", anyhow::Error::from(e)),
                        "policy_dir not applied; the pinned policy stays until it can be read"
                    );
                    seen = None;
                }
            }
            Some(crate::source::policy_dir::watch(dir.clone(), seen))
        }
        (None, Some(client)) => {
            Some(crate::source::kubernetes_policy::watch_policy_objects(client.clone(), Arc::clone(&health)))
        }
        (None, None) => {
            agent.policy.set_objects(Default::default());
            None
        }
    };
    tokio::task::block_in_place(|| agent.sync_policy());
    crate::host::masquerade::apply(
        agent
            .config
            .masquerade
            .then_some((agent.config.cluster_cidr, agent.config.uplink_interface.as_str())),
    )?;
    tracing::info!(
        node = agent.config.node_name,
        pod_cidr = %agent.config.pod_cidr,
        mode = ?agent.config.mode,
        pod_mtu,
        links_updated = report.links_updated,
        stale_links_removed = report.stale_links_removed,
        stale_endpoints_removed = report.stale_endpoints_removed,
        stale_interfaces_removed = report.stale_interfaces_removed,
        links_failed,
        stale_records,
        endpoints_restored,
        "datapath loaded and reconciled"
    );

    // Readiness also needs the pins it made to stay in place.
    health.configure(
        agent.datapath.pins().clone(),
        node_programs
            .iter()
            .map(|(program, ifname)| agent.datapath.pins().node_link(program, ifname))
            .collect(),
        std::time::Duration::from_secs(agent.config.event_loop_stall_seconds.into()),
        std::time::Duration::from_secs(agent.config.kubernetes.watch_failure_seconds.into()),
    );
    let socket_path = agent.config.api_socket.clone();
    let (listener, socket_identity) = bind_private_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), "serving the CNI plugin");
    // Peers come from the file (static) or from Node objects (Kubernetes).
    let mut config_changes = match kube_client {
        None => watch_config(config_path.to_owned(), agent.config.clone(), Arc::clone(&health)),
        Some(_) => tokio::sync::mpsc::channel(1).1,
    };
    // Services come from the file (static) or from Services and EndpointSlices.
    let mut kube_services = kube_client
        .clone()
        .map(|client| crate::source::kubernetes_services::watch_services(client, Arc::clone(&health)));
    let programmed = agent.datapath.remote_routes().context("reading the programmed peers")?;
    let status_client = kube_client.clone();
    let mut node_peers = kube_client.map(|client| {
        crate::source::kubernetes::watch_peers(
            client,
            agent.config.node_name.clone(),
            agent.config.pod_cidr,
            agent.config.cluster_cidr,
            programmed,
            Arc::clone(&health),
        )
    });
    if node_peers.is_none() {
        become_ready(&agent.config, &health)?;
    }
    let (config_bpffs_dir, config_mode) = (agent.config.bpffs_dir.clone(), agent.config.mode);
    let pinned_conntrack = PinnedConntrack::open(agent.datapath.pins())
        .context("opening the connection-tracking map for its collector")?;
    let gc_errors = Arc::clone(&agent.errors);
    // An async mutex: peer updates hold it across netlink calls.
    let agent = Arc::new(Mutex::new(agent));
    conntrack::spawn_collector(Arc::clone(&agent), pinned_conntrack, conntrack_stats, gc_errors);
    crate::observe::mode_mismatch::spawn_watch(PinLayout::new(&config_bpffs_dir), mode_before, config_mode);

    // A Service sync that failed (e.g. a full map) is tried again, whole.
    let mut service_retry = tokio::time::interval(SERVICE_RETRY_INTERVAL);
    service_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link_retry = tokio::time::interval(LINK_RETRY_INTERVAL);
    link_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    link_retry.reset();
    let mut route_check = tokio::time::interval(ROUTE_CHECK_INTERVAL);
    route_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    route_check.reset();
    let mut interface_sweep = tokio::time::interval(INTERFACE_SWEEP_INTERVAL);
    interface_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interface_sweep.reset();
    // The loop's pulse for /healthz: taken with the agent's lock, so a lock
    // that stays held stops it too.
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The drop counters, sampled for `status` (the first sample at once).
    let mut drop_sample = std::time::Instant::now() - crate::observe::health::DROP_SAMPLE_INTERVAL;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let agent = agent.lock().await;
                health.beat();
                if drop_sample.elapsed() >= crate::observe::health::DROP_SAMPLE_INTERVAL {
                    drop_sample = std::time::Instant::now();
                    match agent.datapath.counters() {
                        Ok(counters) => health.sample_drops(counters.drops),
                        Err(e) => tracing::debug!(error = %e, "sampling the drop counters failed"),
                    }
                }
            }
            Some(change) = link_changes.recv() => {
                let mut agent = agent.lock().await;
                if let Err(e) = crate::host::link_state::apply(&mut agent.datapath, &netlink, change).await {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "following a pod veth's state failed");
                }
            }
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, _)) => {
                        let agent = Arc::clone(&agent);
                        tokio::spawn(async move {
                            if let Err(e) = serve_connection(stream, agent).await {
                                tracing::warn!(error = format!("{e:#}"), "API connection failed");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
            Some(objects) = next_update(&mut policy_changes) => {
                let mut agent = agent.lock().await;
                agent.policy.set_objects(objects);
                tokio::task::block_in_place(|| agent.sync_policy());
            }
            Some(first) = next_update(&mut kube_services) => {
                // Whatever else has queued up meanwhile goes in the same sync.
                let mut updates = vec![first];
                while let Some(update) = kube_services.as_mut().and_then(|rx| rx.try_recv().ok()) {
                    updates.push(update);
                }
                let mut agent = agent.lock().await;
                if let Err(e) = tokio::task::block_in_place(|| agent.apply_service_updates(updates)) {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the Service list failed");
                }
            }
            Some(peers) = next_from_watch(&mut node_peers) => {
                let mut agent = agent.lock().await;
                agent.config.peers = peers;
                match agent.apply_peers(&netlink).await {
                    Ok(()) if !health.is_started() => {
                        become_ready(&agent.config, &health)?;
                        if let Some(client) = status_client.clone() {
                            crate::source::kubernetes::spawn_clear_network_unavailable(
                                client,
                                agent.config.node_name.clone(),
                            );
                        }
                    }
                    Ok(()) => {}
                    Err(e) => {
                        agent.errors.inc();
                        tracing::error!(error = format!("{e:#}"), "applying the Node list failed");
                    }
                }
            }
            Some(new_config) = config_changes.recv() => {
                let mut agent = agent.lock().await;
                match agent.config.restart_only_fields_differ(&new_config) {
                    Some(field) => {
                        tracing::warn!(
                            field,
                            "this config change needs an agent restart; only peers, services and the \
                             conntrack timeouts are applied live"
                        );
                        health.config_rejected(
                            ConfigRejection::NeedsRestart,
                            format!("`{field}` changed: not applied until the agent restarts"),
                        );
                    }
                    None => health.config_accepted(),
                }
                // Only the live part is taken; the collector reads the timeouts at each sweep.
                agent.config.apply_live(new_config.split().1);
                if let Err(e) = agent.apply_peers(&netlink).await {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the new peer list failed");
                }
                // Also when they did not change: a sync of what already
                // matches writes nothing, and one that failed before is retried.
                let list = agent.config.services.clone();
                if let Err(e) = tokio::task::block_in_place(|| agent.apply_services(list)) {
                    agent.errors.inc();
                    tracing::error!(error = format!("{e:#}"), "applying the new Services failed");
                }
            }
            _ = service_retry.tick() => {
                let mut agent = agent.lock().await;
                let agent = &mut *agent;
                if !agent.services.in_sync() {
                    match tokio::task::block_in_place(|| agent.services.retry(&mut agent.datapath)) {
                        Ok(Some(report)) => {
                            agent.reconciles.record("services", &Ok(()));
                            tracing::info!(
                            added = report.added,
                            updated = report.updated,
                            removed = report.removed,
                            "Services programmed on retry"
                            )
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let e = anyhow::Error::from(e);
                            agent.reconciles.failed("services", &e);
                            agent.errors.inc();
                            tracing::error!(error = format!("{e:#}"), "programming the Services failed again");
                        }
                    }
                }
            }
            _ = link_retry.tick() => {
                let mut agent = agent.lock().await;
                tokio::task::block_in_place(|| {
                    if !agent.pending_links.is_empty() {
                        agent.retry_pending_links();
                    }
                    if agent.policy_failed {
                        agent.sync_policy();
                    }
                    agent.check_live_endpoints();
                    // The uplink's (and the VXLAN device's) programs: a
                    // device re-created under its name lost them.
                    match agent.datapath.repair_node_links(&node_programs) {
                        Ok(repaired) => {
                            for (program, ifname) in repaired {
                                tracing::warn!(
                                    program,
                                    ifname,
                                    "node program attached again: its link no longer ran (the device re-created, \
                                     or the link detached by hand)"
                                );
                            }
                        }
                        Err(e) => {
                            agent.errors.inc();
                            tracing::error!(error = format!("{e:#}"), "checking the node programs' links failed");
                        }
                    }
                    if let Err(e) = switch_off_abandoned_forward_tracing(&mut agent.datapath) {
                        agent.errors.inc();
                        tracing::warn!(error = format!("{e:#}"), "checking the monitor's forward tracing failed");
                    }
                });
            }
            _ = route_check.tick() => {
                let mut agent = agent.lock().await;
                // A failed peer sync is tried again here (what failed may
                // have been fixed on the node since: an address, a route).
                if agent.reconciles.failed_last("peers") {
                    match agent.apply_peers(&netlink).await {
                        Ok(()) => tracing::info!("peer nodes programmed on retry"),
                        Err(e) => tracing::debug!(error = format!("{e:#}"), "programming the peer nodes failed again"),
                    }
                }
                agent.check_node_routes(&netlink).await;
            }
            _ = interface_sweep.tick() => {
                let mut agent = agent.lock().await;
                tokio::task::block_in_place(|| agent.sweep_gone_interfaces());
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Pinned maps and links stay: forwarding goes on while the agent is away.
    remove_own_socket(&socket_path, socket_identity);
    tracing::info!("agent stopped; datapath left running");
    Ok(())
}

impl conntrack::CollectorHost for Agent {
    fn conntrack_limits(&self) -> ConntrackLimits {
        let c = &self.config;
        ConntrackLimits {
            outside_limit: c.conntrack_max_outside(),
            local_pods: Some(c.pod_cidr),
            ..ConntrackLimits::from_seconds(
                c.conntrack_tcp_idle_seconds,
                c.conntrack_udp_idle_seconds,
                c.conntrack_closing_seconds,
                c.conntrack_half_closed_seconds,
                c.conntrack_opening_seconds,
            )
        }
    }

    fn serving_backends(&self) -> Option<crate::reconcile::services::ServingIndex> {
        self.services.serving()
    }

    fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }
}

/// The next update from `rx`; never, without one.
async fn next_update<T>(rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next peer list from the Node watch; never resolves without one
/// (static source).
async fn next_from_watch<T: Clone>(rx: &mut Option<tokio::sync::watch::Receiver<Option<T>>>) -> Option<T> {
    let Some(rx) = rx else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(list) = rx.borrow_and_update().clone() {
            return Some(list);
        }
    }
}

/// Ready: tell the probes, and give the runtime our CNI config (only now, so
/// kubelet never sends a pod to a node whose datapath is not in place).
fn become_ready(config: &AgentConfig, health: &Health) -> anyhow::Result<()> {
    if let Some(path) = &config.cni_config_file {
        crate::host::cni_config::write_conflist(path, &config.api_socket, config.pod_cidr)?;
    }
    health.set_ready();
    tracing::info!("ready");
    Ok(())
}

fn routing_mode(mode: Mode) -> u32 {
    match mode {
        Mode::Native => RoutingMode::Native as u32,
        Mode::Vxlan => RoutingMode::Vxlan as u32,
    }
}

/// Forward tracing is on only while a `monitor` runs: when no monitor
/// holds its lock, a `trace_forwards` still set was left by one that was
/// killed; switch it off (the programs would otherwise pay for it forever).
/// Returns whether it did.
fn switch_off_abandoned_forward_tracing(datapath: &mut Datapath) -> anyhow::Result<bool> {
    // No pins (removed by `cleanup --force` under this agent): no monitor
    // can run, and taking its lock would make the directory again.
    if !datapath.pins().maps_dir().exists() {
        return Ok(false);
    }
    let _no_monitor = match MonitorLock::try_acquire(datapath.pins()) {
        Ok(lock) => lock,
        Err(MonitorLockError::Held { .. }) => return Ok(false),
        Err(e) => return Err(e).context("looking for a running monitor"),
    };
    let config = datapath.monitor_config().context("reading the monitor config map")?;
    if config.trace_forwards == 0 {
        return Ok(false);
    }
    datapath
        .set_monitor_config(MonitorConfig { trace_forwards: 0, ..config })
        .context("writing the monitor config map")?;
    tracing::warn!("forward tracing was left on by a monitor that is gone (killed?); switched off");
    Ok(true)
}
