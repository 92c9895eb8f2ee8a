//! A stand-in for the Kubernetes API server, for the resources the agent
//! watches (Nodes, Services, EndpointSlices, Namespaces, Pods, NetworkPolicies): it serves real objects over
//! HTTP the way the API server does (GET one Node, list a collection with a
//! resourceVersion, watch as a chunked stream of ADDED / MODIFIED / DELETED /
//! BOOKMARK events), and lets a test disconnect the watches or make requests
//! fail. No API server can run on these machines; this keeps `kube`'s real
//! client, watcher and reflector in the loop.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::lab::Netns;

/// The collections served: (path, kind, list kind, apiVersion).
const COLLECTIONS: [(&str, &str, &str, &str); 6] = [
    ("/api/v1/nodes", "Node", "NodeList", "v1"),
    ("/api/v1/services", "Service", "ServiceList", "v1"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", "EndpointSliceList", "discovery.k8s.io/v1"),
    ("/api/v1/namespaces", "Namespace", "NamespaceList", "v1"),
    ("/api/v1/pods", "Pod", "PodList", "v1"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
        "NetworkPolicyList",
        "networking.k8s.io/v1",
    ),
];

#[derive(Default)]
struct Collection {
    /// By "namespace/name" ("name" for cluster-scoped objects).
    objects: BTreeMap<String, serde_json::Value>,
    watchers: Vec<mpsc::Sender<String>>,
    /// (resourceVersion, event line): a watch from resourceVersion N gets
    /// every event after N first, as the API server's watch cache replays.
    events: Vec<(u64, String)>,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<&'static str, Collection>,
    resource_version: u64,
    /// The next `count` requests whose path matches get 500.
    fail_next: Option<(PathMatch, u32)>,
    requests: Vec<String>,
}

impl State {
    /// Record a request; whether it is to fail ([`FakeApiServer::fail_next`]).
    fn take_request(&mut self, request_line: &str, path: &str) -> bool {
        self.requests.push(request_line.trim().to_owned());
        match &mut self.fail_next {
            Some((matching, left)) if *left > 0 && matching.matches(path) => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }
}

/// Which request paths [`FakeApiServer::fail_next`] and
/// [`FakeApiServer::fail_next_lists`] fail.
enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
        }
    }
}

/// The collection path of an object's kind.
fn collection_of(kind: &str) -> &'static str {
    COLLECTIONS.iter().find(|c| c.1 == kind).unwrap_or_else(|| panic!("kind {kind} not served")).0
}

fn object_key(object: &serde_json::Value) -> String {
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

pub struct FakeApiServer {
    pub address: Ipv4Addr,
    pub port: u16,
    state: Arc<Mutex<State>>,
}

/// A Node object as the API server serves it.
pub fn node_object(name: &str, pod_cidr: Option<&str>, internal_ip: &str) -> serde_json::Value {
    let mut spec = serde_json::json!({});
    if let Some(cidr) = pod_cidr {
        spec = serde_json::json!({ "podCIDR": cidr, "podCIDRs": [cidr] });
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "kubernetes.io/hostname": name } },
        "spec": spec,
        "status": { "addresses": [
            { "type": "InternalIP", "address": internal_ip },
            { "type": "Hostname", "address": name },
        ] },
    })
}

impl FakeApiServer {
    /// Listen on `address:6443` inside `ns` (a namespace on the simulated
    /// physical network, so agents in node namespaces reach it).
    pub fn start(ns: &Netns, address: Ipv4Addr) -> Self {
        let state = Arc::new(Mutex::new(State { resource_version: 1000, ..Default::default() }));
        let (tx, rx) = mpsc::channel();
        let server_state = Arc::clone(&state);
        crate::lab::in_netns(&ns.path(), move || {
            let listener = TcpListener::bind((address, 6443)).unwrap();
            tx.send(()).unwrap();
            for conn in listener.incoming().flatten() {
                let state = Arc::clone(&server_state);
                std::thread::spawn(move || {
                    let _ = serve(conn, &state);
                });
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Self { address, port: 6443, state }
    }

    /// A kubeconfig that points at this server (plain HTTP, no auth).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}:{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.address, self.port
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn broadcast(state: &mut State, collection: &'static str, event: serde_json::Value) {
        let line = format!("{event}\n");
        let rv = state.resource_version;
        let c = state.collections.entry(collection).or_default();
        if event["type"] != "BOOKMARK" {
            c.events.push((rv, line.clone()));
        }
        c.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    /// Create or replace an object of a served kind (ADDED or MODIFIED to
    /// every watch of its collection).
    pub fn apply(&self, mut object: serde_json::Value) {
        let collection = collection_of(object["kind"].as_str().expect("kind"));
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = state.resource_version.to_string().into();
        let key = object_key(&object);
        let c = state.collections.entry(collection).or_default();
        let kind = if c.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        c.objects.insert(key, object.clone());
        Self::broadcast(&mut state, collection, serde_json::json!({ "type": kind, "object": object }));
    }

    /// Delete a Node.
    pub fn delete(&self, name: &str) {
        self.delete_object("Node", name);
    }

    /// Delete an object by kind and key ("namespace/name", or "name").
    pub fn delete_object(&self, kind: &str, key: &str) {
        let collection = collection_of(kind);
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        if let Some(mut object) = state.collections.entry(collection).or_default().objects.remove(key) {
            object["metadata"]["resourceVersion"] = rv.into();
            Self::broadcast(
                &mut state,
                collection,
                serde_json::json!({ "type": "DELETED", "object": object }),
            );
        }
    }

    /// A BOOKMARK on the Node watches.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version.to_string();
        let event = serde_json::json!({ "type": "BOOKMARK", "object": { "kind": "Node", "apiVersion": "v1", "metadata": { "resourceVersion": rv } } });
        Self::broadcast(&mut state, "/api/v1/nodes", event);
    }

    /// End every open watch (as an API server restart or a load balancer does).
    pub fn disconnect_watches(&self) {
        for c in self.state.lock().unwrap().collections.values_mut() {
            c.watchers.clear();
        }
    }

    /// The next `n` requests whose path starts with `path_prefix` get HTTP
    /// 500. A prefix, because every agent watches several collections and a
    /// test means one watcher's trouble.
    pub fn fail_next(&self, path_prefix: &str, n: u32) {
        self.state.lock().unwrap().fail_next = Some((PathMatch::Prefix(path_prefix.to_owned()), n));
    }

    /// The next `n` lists and watches of the collection at `path` (e.g.
    /// "/api/v1/nodes") get HTTP 500; GETs of single objects still work (an
    /// API server overloaded for lists, as during a rollout).
    pub fn fail_next_lists(&self, path: &str, n: u32) {
        self.state.lock().unwrap().fail_next = Some((PathMatch::Exact(path.to_owned()), n));
    }

    /// The object of `kind` at `key` ("namespace/name", or "name") now.
    pub fn object(&self, kind: &str, key: &str) -> Option<serde_json::Value> {
        let state = self.state.lock().unwrap();
        state.collections.get(collection_of(kind)).and_then(|c| c.objects.get(key)).cloned()
    }

    /// Request lines served so far (method and path).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// PATCH /api/v1/nodes/{name}/status with a strategic merge patch: the
/// patch's conditions replace those of the same type, the others stay (the
/// `type` merge key of NodeStatus.conditions); a MODIFIED event follows.
/// Anything else PATCHed: 405.
fn patch_node_status(
    conn: &mut TcpStream,
    state: &Mutex<State>,
    request_line: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let mut s = state.lock().unwrap();
    if s.take_request(request_line, path) {
        drop(s);
        return respond(conn, 500, &status(500, "InternalError"));
    }
    let Some(name) = path.strip_prefix("/api/v1/nodes/").and_then(|p| p.strip_suffix("/status")) else {
        drop(s);
        return respond(conn, 405, &status(405, "MethodNotAllowed"));
    };
    if content_type != "application/strategic-merge-patch+json" {
        drop(s);
        return respond(conn, 415, &status(415, "UnsupportedMediaType"));
    }
    let Ok(patch) = serde_json::from_slice::<serde_json::Value>(body) else {
        drop(s);
        return respond(conn, 400, &status(400, "BadRequest"));
    };
    s.resource_version += 1;
    let rv = s.resource_version.to_string();
    let Some(node) = s.collections.entry("/api/v1/nodes").or_default().objects.get_mut(name) else {
        drop(s);
        return respond(conn, 404, &status(404, "NotFound"));
    };
    for (field, value) in patch["status"].as_object().into_iter().flatten() {
        if field != "conditions" {
            node["status"][field] = value.clone();
            continue;
        }
        let mut conditions = node["status"]["conditions"].as_array().cloned().unwrap_or_default();
        for new in value.as_array().into_iter().flatten() {
            conditions.retain(|old| old["type"] != new["type"]);
            conditions.push(new.clone());
        }
        node["status"]["conditions"] = conditions.into();
    }
    node["metadata"]["resourceVersion"] = rv.into();
    let node = node.clone();
    FakeApiServer::broadcast(
        &mut s,
        "/api/v1/nodes",
        serde_json::json!({ "type": "MODIFIED", "object": node }),
    );
    drop(s);
    respond(conn, 200, &node.to_string())
}

fn status(code: u16, reason: &str) -> String {
    serde_json::json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code }).to_string()
}

fn respond(conn: &mut TcpStream, code: u16, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let (mut content_length, mut content_type) = (0usize, String::new());
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.trim().parse().unwrap_or(0),
                "content-type" => content_type = value.trim().to_owned(),
                _ => {}
            }
        }
    }
    let method = request_line.split_whitespace().next().unwrap_or("GET").to_owned();
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if method == "PATCH" {
        let mut body = vec![0; content_length];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        return patch_node_status(&mut conn, state, &request_line, path, &content_type, &body);
    }
    let watch_rx = {
        let mut s = state.lock().unwrap();
        if s.take_request(&request_line, path) {
            drop(s);
            return respond(&mut conn, 500, &status(500, "InternalError"));
        }
        if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
            let body =
                s.collections.get("/api/v1/nodes").and_then(|c| c.objects.get(name)).map(|n| n.to_string());
            drop(s);
            return match body {
                Some(body) => respond(&mut conn, 200, &body),
                None => respond(&mut conn, 404, &status(404, "NotFound")),
            };
        }
        let Some(&(collection, _, list_kind, api_version)) = COLLECTIONS.iter().find(|c| c.0 == path) else {
            drop(s);
            return respond(&mut conn, 404, &status(404, "NotFound"));
        };
        if !query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1") {
            let rv = s.resource_version.to_string();
            let c = s.collections.entry(collection).or_default();
            let list = serde_json::json!({
                "apiVersion": api_version,
                "kind": list_kind,
                "metadata": { "resourceVersion": rv },
                "items": c.objects.values().collect::<Vec<_>>(),
            })
            .to_string();
            drop(s);
            return respond(&mut conn, 200, &list);
        }
        let since: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(s.resource_version);
        let (tx, rx) = mpsc::channel();
        // Replay and register under one lock: no event falls in between.
        let c = s.collections.entry(collection).or_default();
        for (_, line) in c.events.iter().filter(|(rv, _)| *rv > since) {
            let _ = tx.send(line.clone());
        }
        c.watchers.push(tx);
        rx
    };
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    conn.flush()?;
    // Until the server drops this watch (disconnect) or the client goes away.
    while let Ok(line) = watch_rx.recv() {
        write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
        conn.flush()?;
    }
    write!(conn, "0\r\n\r\n")?;
    conn.flush()
}
