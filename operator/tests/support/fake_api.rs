//! A scripted Kubernetes API server behind a mocked tower service: it records
//! every request the reconciler makes and answers with canned objects, so a
//! test can assert the exact requests (method, path, field manager, body).
// Included by several test crates, each of which uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request as the fake API server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

impl Seen {
    /// "PATCH /api/v1/namespaces/ns/configmaps/name"
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

/// What the fake cluster holds and how it misbehaves.
#[derive(Debug, Default)]
pub struct World {
    pub configmaps: Vec<Value>,
    pub daemonsets: Vec<Value>,
    /// Nodes by name; a status apply replaces the conditions the operator
    /// applied before (server-side apply with one field manager).
    pub nodes: BTreeMap<String, Value>,
    /// Condition types the operator's last status apply set, per node.
    pub applied_conditions: BTreeMap<String, Vec<String>>,
    /// Leases by name, with resourceVersion-checked replaces.
    pub leases: BTreeMap<String, Value>,
    /// Status the API server reports on an applied `DaemonSet`.
    pub daemonset_status: Value,
    /// Requests (method, path fragment) answered with this HTTP status.
    pub failures: Vec<(&'static str, &'static str, u16)>,
    /// Like `failures`, but each answers only the first matching request.
    pub fail_once: Vec<(&'static str, &'static str, u16)>,
    /// How long the server takes to answer each request (tokio's clock).
    pub delay: Option<std::time::Duration>,
    /// events.k8s.io Events created, by "namespace/name". Creating one whose
    /// name is taken is a conflict, as on a real API server.
    pub events: BTreeMap<String, Value>,
    pub seen: Vec<Seen>,
    /// Source of new resourceVersions.
    pub next_version: u64,
}

impl World {
    fn respond(&mut self, req: &Seen) -> (u16, Value) {
        let matches = |(m, p, _): &&(&str, &str, u16)| *m == req.method && req.path.contains(p);
        let once = self.fail_once.iter().position(|f| matches(&f));
        let failure = match once {
            Some(i) => Some(self.fail_once.remove(i).2),
            None => self.failures.iter().find(matches).map(|f| f.2),
        };
        if let Some(code) = failure {
            return (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "etcdserver: request timed out", "reason": "InternalError", "code": code}),
            );
        }
        let segments: Vec<&str> = req.path.split('/').collect();
        match (req.method.as_str(), segments.as_slice()) {
            ("GET", [.., "configmaps"]) => (200, list("v1", "ConfigMapList", &self.configmaps)),
            ("GET", [.., "daemonsets"]) => {
                (200, list("apps/v1", "DaemonSetList", &self.daemonsets))
            }
            ("PATCH", [.., "configmaps", name]) => {
                let answer = self.applied(&req.body, name, false);
                (200, answer)
            }
            ("PATCH", [.., "daemonsets", name]) => {
                let answer = self.applied(&req.body, name, true);
                (200, answer)
            }
            ("DELETE", _) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            ("PATCH", [.., namespace, "pingmeshes", name, "status"]) => {
                let mut mesh = req.body.clone();
                mesh["metadata"] = json!({"name": name, "namespace": namespace, "uid": "mesh-uid"});
                mesh["spec"] = json!({});
                (200, mesh)
            }
            ("POST", [.., namespace, "events"]) => {
                let name = req.body["metadata"]["name"].as_str().unwrap_or_default();
                let key = format!("{namespace}/{name}");
                if name.is_empty() || self.events.contains_key(&key) {
                    return conflict();
                }
                self.events.insert(key, req.body.clone());
                (201, req.body.clone())
            }
            ("PATCH", [.., namespace, "events", name]) => {
                match self.events.get_mut(&format!("{namespace}/{name}")) {
                    Some(event) => {
                        merge(event, &req.body);
                        (200, event.clone())
                    }
                    None => not_found(),
                }
            }
            ("GET", [.., "nodes", name]) => match self.nodes.get(*name) {
                Some(node) => (200, node.clone()),
                None => not_found(),
            },
            ("PATCH", [.., "nodes", name, "status"]) => self.apply_node_status(name, &req.body),
            ("GET", [.., "leases", name]) => match self.leases.get(*name) {
                Some(lease) => (200, lease.clone()),
                None => not_found(),
            },
            ("POST", [.., "leases"]) => {
                let name = req.body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if self.leases.contains_key(&name) {
                    return conflict();
                }
                let stored = self.store_lease(&name, req.body.clone());
                (201, stored)
            }
            ("PUT", [.., "leases", name]) => {
                let current = self
                    .leases
                    .get(*name)
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                match current {
                    None => not_found(),
                    Some(version) if version != req.body["metadata"]["resourceVersion"] => {
                        conflict()
                    }
                    Some(_) => {
                        let stored = self.store_lease(name, req.body.clone());
                        (200, stored)
                    }
                }
            }
            _ => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}),
            ),
        }
    }

    /// Stores a Lease under a new resourceVersion; returns it as stored.
    pub fn store_lease(&mut self, name: &str, mut lease: Value) -> Value {
        self.next_version += 1;
        lease["apiVersion"] = json!("coordination.k8s.io/v1");
        lease["kind"] = json!("Lease");
        lease["metadata"]["name"] = json!(name);
        lease["metadata"]["resourceVersion"] = json!(format!("{}", 100 + self.next_version));
        self.leases.insert(name.to_owned(), lease.clone());
        lease
    }

    /// Server-side apply of a node's status by the operator: the conditions it
    /// applied before are replaced by the ones in `body` (none: removed).
    fn apply_node_status(&mut self, name: &str, body: &Value) -> (u16, Value) {
        let Some(node) = self.nodes.get_mut(name) else {
            return not_found();
        };
        let applied: Vec<Value> = body["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let before = self.applied_conditions.remove(name).unwrap_or_default();
        let mut conditions: Vec<Value> = node["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                let type_ = c["type"].as_str().unwrap_or_default();
                !before.iter().any(|b| b == type_)
                    && !applied.iter().any(|a| a["type"] == c["type"])
            })
            .collect();
        conditions.extend(applied.iter().cloned());
        self.applied_conditions.insert(
            name.to_owned(),
            applied
                .iter()
                .filter_map(|c| c["type"].as_str().map(str::to_owned))
                .collect(),
        );
        node["status"]["conditions"] = json!(conditions);
        (200, node.clone())
    }

    /// The object as stored after an apply: same resourceVersion when nothing
    /// changed, a new one otherwise; `DaemonSet`s get the scripted status.
    fn applied(&mut self, body: &Value, name: &str, daemonset: bool) -> Value {
        let store = if daemonset {
            &self.daemonsets
        } else {
            &self.configmaps
        };
        let content = |v: &Value| {
            if daemonset {
                v["spec"].clone()
            } else {
                v["data"].clone()
            }
        };
        let before = store.iter().find(|o| o["metadata"]["name"] == name);
        let mut object = body.clone();
        let version = match before {
            Some(b) if content(b) == content(body) => b["metadata"]["resourceVersion"].clone(),
            _ => {
                self.next_version += 1;
                json!(format!("{}", 100 + self.next_version))
            }
        };
        object["metadata"]["resourceVersion"] = version;
        object["metadata"]["uid"] = json!(format!("uid-{name}"));
        if daemonset {
            object["metadata"]["generation"] = json!(1);
            object["status"] = self.daemonset_status.clone();
        }
        object
    }
}

/// A JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

fn conflict() -> (u16, Value) {
    (
        409,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
               "message": "the object has been modified"}),
    )
}

/// A Node as the API server returns it, with a kubelet condition.
pub fn node(name: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": uid, "resourceVersion": "1"},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
    })
}

fn list(api_version: &str, kind: &str, items: &[Value]) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// A client talking to the fake API server, and the server task.
pub fn start(world: World) -> (Client, Arc<Mutex<World>>, JoinHandle<()>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let world = Arc::new(Mutex::new(world));
    let task = tokio::spawn(serve(handle, world.clone()));
    (Client::new(service, "default"), world, task)
}

async fn serve(mut handle: Handle, world: Arc<Mutex<World>>) {
    while let Some((request, reply)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts
                .uri
                .query()
                .map(|q| {
                    url_pairs(q)
                        .into_iter()
                        .collect::<BTreeMap<String, String>>()
                })
                .unwrap_or_default(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            },
        };
        let (code, answer, delay) = {
            let mut w = world.lock().unwrap();
            let (code, answer) = w.respond(&seen);
            w.seen.push(seen);
            (code, answer, w.delay)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        reply.send_response(
            Response::builder()
                .status(code)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
    }
}

/// `a=b&c=d%2Fe` -> pairs, percent-decoded (enough for label selectors).
fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}
