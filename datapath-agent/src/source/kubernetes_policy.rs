//! NetworkPolicy objects from the Kubernetes API (Kubernetes source, when
//! no `policy_dir` is set): NetworkPolicies, Namespaces and Pods of every
//! namespace, watched with `kube`'s reflectors. Once all three lists are
//! complete the whole set is sent, and again after each change (the
//! changes that arrive within a few milliseconds together): the agent
//! compiles it and writes only the map entries that differ. Pods are kept
//! with what policy reads alone (name, labels, named container ports,
//! addresses): a large cluster's pods cost little memory.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Container, Namespace, Pod, PodSpec, PodStatus},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use tokio::sync::mpsc;

use crate::{model::PolicyObjects, observe::health::Health, source::kubernetes::WatchBackoff};

/// Changes that arrive within this long of each other are sent together.
const BATCH: Duration = Duration::from_millis(20);

/// Where a watch event came from.
#[derive(Clone, Copy)]
enum Kind {
    Policy,
    Namespace,
    Pod,
}

impl Kind {
    fn watch(self) -> &'static str {
        match self {
            Kind::Policy => "NetworkPolicy",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
        }
    }
}

/// What an event means here.
enum Change {
    /// A list is complete (InitDone).
    Synced,
    /// Mid-relist: the store has not switched yet.
    Relisting,
    /// An object was created, changed or deleted.
    Object,
}

fn change<K>(event: &watcher::Event<K>) -> Change {
    match event {
        watcher::Event::InitDone => Change::Synced,
        watcher::Event::Init | watcher::Event::InitApply(_) => Change::Relisting,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Change::Object,
    }
}

/// A pod as policy needs it: the rest of its spec and status is dropped
/// as it arrives. A pod that has ended (its address may be reused) or that
/// uses the node's network (its address is the node's) has no address here.
pub fn policy_view(pod: &mut Pod) {
    let status = pod.status.take().unwrap_or_default();
    let spec = pod.spec.take().unwrap_or_default();
    let ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let host_network = spec.host_network.unwrap_or(false);
    pod.metadata.annotations = None;
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    pod.spec = Some(PodSpec {
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container { name: c.name, ports: c.ports, ..Container::default() })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = (!ended && !host_network).then(|| PodStatus {
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

/// Watch the objects policy is computed from; send the whole set once all
/// three lists are complete and after each change.
pub fn watch_policy_objects(client: Client, health: Arc<Health>) -> mpsc::UnboundedReceiver<PolicyObjects> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (policy_store, policy_writer) = reflector::store();
        let (namespace_store, namespace_writer) = reflector::store();
        let (pod_store, pod_writer) = reflector::store();
        let policies =
            reflector(policy_writer, watcher(Api::<NetworkPolicy>::all(client.clone()), Default::default()))
                .backoff(WatchBackoff::new("NetworkPolicy", Arc::clone(&health)))
                .map(|e| (Kind::Policy, e.map(|e| change(&e))));
        let namespaces = reflector(
            namespace_writer,
            watcher(Api::<Namespace>::all(client.clone()), Default::default()).modify(
                |ns: &mut Namespace| {
                    ns.spec = None;
                    ns.status = None;
                    ns.metadata.managed_fields = None;
                    ns.metadata.annotations = None;
                },
            ),
        )
        .backoff(WatchBackoff::new("Namespace", Arc::clone(&health)))
        .map(|e| (Kind::Namespace, e.map(|e| change(&e))));
        let pods =
            reflector(pod_writer, watcher(Api::<Pod>::all(client), Default::default()).modify(policy_view))
                .backoff(WatchBackoff::new("Pod", Arc::clone(&health)))
                .map(|e| (Kind::Pod, e.map(|e| change(&e))));
        let mut events = futures::stream::select_all([policies.boxed(), namespaces.boxed(), pods.boxed()]);
        let mut synced = [false; 3];
        // When a change is pending: the moment the set is sent (the
        // changes until then go with it; later ones do not delay it).
        let mut send_at: Option<tokio::time::Instant> = None;
        loop {
            let next = match send_at {
                Some(at) => match tokio::time::timeout_at(at, events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        send_at = None;
                        let objects = PolicyObjects {
                            policies: policy_store.state().iter().map(|o| (**o).clone()).collect(),
                            namespaces: namespace_store.state().iter().map(|o| (**o).clone()).collect(),
                            pods: pod_store.state().iter().map(|o| (**o).clone()).collect(),
                        };
                        if tx.send(objects).is_err() {
                            return;
                        }
                        continue;
                    }
                },
                None => events.next().await,
            };
            let Some((kind, event)) = next else { return };
            match event {
                Ok(change) => {
                    health.watch_ok(kind.watch());
                    if matches!(change, Change::Synced) {
                        synced[kind as usize] = true;
                    }
                    // Mid-relist states are partial: wait for InitDone.
                    let counts = !matches!(change, Change::Relisting);
                    if counts && synced.iter().all(|s| *s) && send_at.is_none() {
                        send_at = Some(tokio::time::Instant::now() + BATCH);
                    }
                }
                Err(e) => {
                    health.watch_failed(kind.watch(), &e);
                    tracing::warn!(error = %e, watch = kind.watch(), "policy watch failed; keeping the current policy and retrying");
                }
            }
        }
    });
    rx
}
