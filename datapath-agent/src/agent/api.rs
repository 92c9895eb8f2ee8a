//! The agent's API for the CNI plugin: the private unix socket, and the
//! handlers of its requests (ADD, DEL, CHECK, status, list).

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc};

use anyhow::Context as _;
use datapath_api::{EndpointRef, EndpointSpec, Request, Response};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use crate::{agent::Agent, bpf::LocalEndpoint};

/// Refuse to start while `path` answers: another agent (with other pinned
/// state) serves it, and taking it over would send its CNI calls here.
pub(super) fn refuse_a_socket_that_answers(path: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "{} is served by another process (another datapath-agent?); refusing to take it over: \
             stop that process first, or give this agent another api_socket",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// Device and inode of the socket file this agent bound.
pub(super) type SocketIdentity = (u64, u64);

/// Bind the API socket so that only root can connect: the directory is 0700
/// and the socket 0600 (a pod must never be able to register endpoints).
/// What is at the path already is removed only if it is a socket that
/// nobody answers on (left by an agent that was killed).
pub(super) fn bind_private_socket(path: &Path) -> anyhow::Result<(UnixListener, SocketIdentity)> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let dir = path.parent().context("api_socket has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
            "api_socket {} exists and is not a socket; refusing to remove it: move it away or choose \
             another api_socket",
            path.display()
        ),
        Ok(_) => {
            refuse_a_socket_that_answers(path)?;
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Remove the API socket on the way out, unless it is no longer the one we
/// bound (someone removed it and another process bound the path since).
pub(super) fn remove_own_socket(path: &Path, ours: SocketIdentity) {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == ours => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot remove the API socket");
            }
        }
        Ok(_) => tracing::warn!(
            socket = %path.display(),
            "the API socket is no longer the one this agent bound; leaving it"
        ),
        Err(_) => {}
    }
}

pub(super) async fn serve_connection(stream: UnixStream, agent: Arc<Mutex<Agent>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let mut agent = agent.lock().await;
                // Map updates and one TCX attach: milliseconds, fine inline.
                tokio::task::block_in_place(|| agent.handle(request))
            }
            Err(e) => Response::Error { message: format!("malformed request: {e}") },
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

impl Agent {
    /// What `datapath-agent status` shows of the agent itself.
    fn status(&self) -> datapath_api::AgentStatus {
        let drops = self.datapath.counters().map(|c| c.drops).unwrap_or_default();
        let (recent_drops, recent_seconds) = self.health.recent_drops(&drops);
        let last_sweep = self.conntrack_stats.last_sweep();
        datapath_api::AgentStatus {
            version: datapath_api::build_info::LONG_VERSION.to_owned(),
            mode: format!("{:?}", self.config.mode).to_lowercase(),
            source: format!("{:?}", self.config.source).to_lowercase(),
            node_ip: self.config.node_ip.to_string(),
            not_ready: self.health.ready().err(),
            failing_watches: self.health.failing_watches(),
            peers: self.config.peers.len(),
            recent_drops,
            recent_seconds,
            conntrack_entries: self.conntrack_stats.entries(),
            // (A restart-only setting: the map was made with it.)
            conntrack_capacity: Some(u64::from(self.config.conntrack_max_entries)),
            last_sweep_seconds_ago: last_sweep.as_ref().map(|(ago, _)| ago.as_secs()),
            last_sweep_error: last_sweep.and_then(|(_, error)| error),
            errors: self.errors.count(),
            reconciles: self.reconciles.status(),
        }
    }

    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => {
                return match self.datapath.endpoints() {
                    Ok(endpoints) => Response::Status {
                        node_name: self.config.node_name.clone(),
                        pod_cidr: self.config.pod_cidr.to_string(),
                        endpoints: endpoints.len(),
                        pod_mtu: self.pod_mtu,
                        last_config_error: self.health.last_config_error(),
                        agent: Some(Box::new(self.status())),
                    },
                    Err(e) => Response::Error { message: format!("{:#}", anyhow::Error::from(e)) },
                };
            }
            Request::AddEndpoint(spec) => self.add_endpoint(spec),
            Request::DelEndpoint(reference) => self.del_endpoint(reference),
            Request::CheckEndpoint(reference) => {
                return match self.check_endpoint(&reference) {
                    Ok(problems) => Response::Check { problems },
                    Err(e) => Response::Error { message: format!("{e:#}") },
                };
            }
            Request::ListEndpoints => {
                return match self.store.list() {
                    Ok(endpoints) => Response::Endpoints { endpoints },
                    Err(e) => Response::Error { message: format!("{:#}", anyhow::Error::from(e)) },
                };
            }
        };
        match result {
            Ok(()) => Response::Done,
            Err(e) => {
                self.errors.inc();
                tracing::warn!(error = format!("{e:#}"), "request refused");
                Response::Error { message: format!("{e:#}") }
            }
        }
    }

    pub(super) fn add_endpoint(&mut self, spec: EndpointSpec) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.config.owns_pod_ip(spec.pod_ipv4),
            "pod address {} is outside this node's pod CIDR {}",
            spec.pod_ipv4,
            self.config.pod_cidr
        );
        let ifindex = nix::net::if_::if_nametoindex(spec.host_ifname.as_str())
            .with_context(|| format!("host veth {} not found", spec.host_ifname))?;
        anyhow::ensure!(
            ifindex == spec.host_ifindex,
            "host veth {} has ifindex {ifindex}, not {}",
            spec.host_ifname,
            spec.host_ifindex
        );
        let endpoint = LocalEndpoint {
            pod_ipv4: spec.pod_ipv4,
            pod_mac: spec.pod_mac,
            host_ifname: spec.host_ifname.clone(),
            host_ifindex: spec.host_ifindex,
            host_mac: spec.host_mac,
        };
        // Isolated before it is reachable: the new pod's policy entries
        // are written before the entries that deliver to it.
        self.sync_policy_with(Some(crate::model::LocalPod {
            ipv4: spec.pod_ipv4,
            namespace: spec.pod_namespace.clone().unwrap_or_else(|| "default".into()),
            name: spec.pod_name.clone().unwrap_or_else(|| spec.container_id.clone()),
        }));
        // The address may have been another pod's, or been tried while no
        // pod had it: the new pod starts with no allowed connection and no
        // Service connection counted against it. ("From pod" remembers
        // none for an address no pod has, so none can appear between this
        // and the entries below.)
        let as_client = !self.datapath.endpoints()?.iter().any(|(ip, _)| *ip == spec.pod_ipv4);
        let forgotten = self
            .datapath
            .forget_address_connections(spec.pod_ipv4, as_client)
            .context("forgetting the connections of this address's previous owner")?;
        if forgotten > 0 {
            tracing::info!(ip = %spec.pod_ipv4, forgotten, "connections of the address's previous owner forgotten");
        }
        if let Err(e) = self.datapath.add_endpoint(&endpoint) {
            // Leave nothing half-made behind.
            let _ = self.datapath.remove_endpoint(
                &spec.host_ifname,
                Some(spec.host_ifindex),
                Some(spec.pod_ipv4),
            );
            return Err(e).context("programming the endpoint");
        }
        if let Err(e) = self.store.save(&spec) {
            let _ = self.datapath.remove_endpoint(
                &spec.host_ifname,
                Some(spec.host_ifindex),
                Some(spec.pod_ipv4),
            );
            return Err(e).context("recording the endpoint");
        }
        tracing::info!(
            container = spec.container_id,
            pod = format!("{}/{}", spec.pod_namespace.as_deref().unwrap_or("-"), spec.pod_name.as_deref().unwrap_or("-")),
            ip = %spec.pod_ipv4,
            veth = spec.host_ifname,
            "endpoint added"
        );
        // Policy selects pods by name and labels: the new one's entries.
        self.sync_policy();
        Ok(())
    }

    /// Compare the datapath with the record: map entries, link, veth.
    pub(super) fn check_endpoint(&self, reference: &EndpointRef) -> anyhow::Result<Vec<String>> {
        let mut problems = Vec::new();
        let Some(record) = self.store.get(&reference.host_ifname)? else {
            return Ok(vec![format!("the agent has no endpoint for veth {}", reference.host_ifname)]);
        };
        if record.container_id != reference.container_id {
            problems
                .push(format!("veth {} belongs to container {}", reference.host_ifname, record.container_id));
        }
        if let Some(ip) = reference.pod_ipv4
            && ip != record.pod_ipv4
        {
            problems.push(format!("prevResult says {ip}, the agent has {}", record.pod_ipv4));
        }
        match nix::net::if_::if_nametoindex(record.host_ifname.as_str()) {
            Ok(ifindex) if ifindex == record.host_ifindex => {}
            Ok(ifindex) => problems.push(format!(
                "veth {} is ifindex {ifindex}, recorded {}",
                record.host_ifname, record.host_ifindex
            )),
            Err(_) => problems.push(format!("host veth {} is missing", record.host_ifname)),
        }
        match self.datapath.endpoints()?.into_iter().find(|(ip, _)| *ip == record.pod_ipv4) {
            Some((_, ep)) if ep.host_ifindex == record.host_ifindex && ep.pod_mac == record.pod_mac.0 => {}
            Some(_) => problems.push(format!("endpoint map entry for {} points elsewhere", record.pod_ipv4)),
            None => problems.push(format!("no endpoint map entry for {}", record.pod_ipv4)),
        }
        if !self.datapath.pins().link(&record.host_ifname).exists() {
            problems.push(format!("no program link pinned for {}", record.host_ifname));
        }
        if !self.datapath.pins().to_pod_link(&record.host_ifname).exists() {
            problems.push(format!("no to_pod link pinned for {}", record.host_ifname));
        }
        Ok(problems)
    }

    pub(super) fn del_endpoint(&mut self, reference: EndpointRef) -> anyhow::Result<()> {
        // The record knows the IP and the veth's index even when the plugin
        // no longer does (the pod's namespace, and with it the veth, went
        // first). The recorded index counts only while no other interface
        // has taken it.
        let recorded = self.store.get(&reference.host_ifname)?;
        let pod_ipv4 = reference.pod_ipv4.or(recorded.as_ref().map(|r| r.pod_ipv4));
        let recorded_ifindex = match recorded.as_ref().map(|r| r.host_ifindex) {
            Some(ifindex) => match crate::bpf::interface_name(ifindex)? {
                Some(name) if name != reference.host_ifname => None,
                _ => Some(ifindex),
            },
            None => None,
        };
        let host_ifindex = reference.host_ifindex.or(recorded_ifindex);
        let mut removed = self
            .datapath
            .remove_endpoint(&reference.host_ifname, host_ifindex, pod_ipv4)
            .context("removing the endpoint")?;
        if self.store.remove(&reference.host_ifname)? {
            removed += 1;
        }
        // Its address goes back to the pool: nothing allowed for this pod
        // may reach the next one, and none of its Service connections may
        // count against it (ADD forgets again, in case this fails). Its
        // Service connections only while no other pod has the address (a
        // late DEL of a pod whose address went to another).
        if let Some(ip) = pod_ipv4 {
            let as_client = match self.datapath.endpoints() {
                Ok(endpoints) => !endpoints.iter().any(|(owner, _)| *owner == ip),
                Err(_) => false,
            };
            match self.datapath.forget_address_connections(ip, as_client) {
                Ok(forgotten) => removed += forgotten,
                Err(e) => {
                    self.errors.inc();
                    tracing::warn!(ip = %ip, error = format!("{:#}", anyhow::Error::from(e)), "forgetting the pod's connections failed");
                }
            }
        }
        tracing::info!(
            container = reference.container_id,
            veth = reference.host_ifname,
            removed,
            "endpoint deleted"
        );
        // A DEL is when a pod's veth may have gone without one (a runtime
        // that lost the container): forget whatever such a veth left.
        self.sweep_gone_interfaces();
        self.sync_policy();
        Ok(())
    }
}
