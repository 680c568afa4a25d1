//! Replays the recordings of a real kube-apiserver serving upstream
//! flanneld (testdata/, see its README) against the double: the same
//! Nodes, RBAC and token, every recorded request of flanneld in order;
//! the answers, the watch events, the audit events and the final Nodes must
//! be what the real server gave, except what legitimately differs between
//! runs (uids, resourceVersion values — whose order must hold —, creation
//! timestamps, managedFields).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use kube_api_double::Options;
use serde_json::{json, Value};

fn testdata(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What legitimately differs between two runs.
fn scrub(v: &mut Value) {
    if let Some(Value::Object(meta)) = v.get_mut("metadata") {
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(k);
        }
    }
    if let Some(Value::Array(items)) = v.get_mut("items") {
        items.iter_mut().for_each(scrub);
    }
}

/// Pairs of (recorded, ours) for resourceVersions and uids.
#[derive(Default)]
struct Correspondence {
    rvs: BTreeMap<u64, u64>,
    uids: BTreeMap<String, String>,
}

impl Correspondence {
    fn rv(&mut self, recorded: &Value, ours: &Value) {
        let r: u64 = recorded.as_str().unwrap().parse().unwrap();
        let o: u64 = ours.as_str().unwrap().parse().unwrap();
        let prev = self.rvs.insert(r, o);
        assert!(
            prev.is_none() || prev == Some(o),
            "recorded rv {r} maps to {prev:?} and {o}"
        );
    }

    fn object(&mut self, recorded: &Value, ours: &Value) {
        self.rv(
            &recorded["metadata"]["resourceVersion"],
            &ours["metadata"]["resourceVersion"],
        );
        if let (Some(r), Some(o)) = (
            recorded["metadata"]["uid"].as_str(),
            ours["metadata"]["uid"].as_str(),
        ) {
            let prev = self.uids.insert(r.to_string(), o.to_string());
            assert!(
                prev.is_none() || prev.as_deref() == Some(o),
                "uid {r} maps to two uids"
            );
        }
        if let (Some(ri), Some(oi)) = (recorded["items"].as_array(), ours["items"].as_array()) {
            for (r, o) in ri.iter().zip(oi) {
                self.object(r, o);
            }
        }
    }

    /// The order of resourceVersions must be the recorded one.
    fn check_order(&self) {
        let ours: Vec<u64> = self.rvs.values().copied().collect();
        assert!(
            ours.windows(2).all(|w| w[0] < w[1]),
            "resourceVersions out of the recorded order: {:?}",
            self.rvs
        );
        let distinct: std::collections::BTreeSet<&String> = self.uids.values().collect();
        assert_eq!(
            distinct.len(),
            self.uids.len(),
            "two recorded uids became one"
        );
    }

    fn our_rv(&self, recorded: u64) -> u64 {
        *self
            .rvs
            .get(&recorded)
            .unwrap_or_else(|| panic!("recorded rv {recorded} never seen"))
    }
}

/// Replaces the value of `resourceVersion=` in a URI.
fn with_rv(uri: &str, f: impl Fn(u64) -> u64) -> String {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let q: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("resourceVersion", v)) if v != "0" => {
                format!("resourceVersion={}", f(v.parse().unwrap()))
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

enum Action<'a> {
    Request(&'a Value),
    WatchStart(&'a Value),
    WatchEnd(&'a str),
}

struct OpenWatch {
    watch: Watch,
    expected: Vec<Value>,
}

async fn replay(backend: &str) {
    let dir = flannel_store::testsupport::TestDir::new("kube-replay");
    let audit_path = dir.path().join("audit.log");
    let (_h, admin_client) = start(Options {
        audit_log_path: Some(audit_path.clone()),
        ..rbac_options()
    })
    .await;

    // Upstream's RBAC for flannel, created by an admin.
    let rbac = testdata("flannel-rbac.json");
    let r = admin_client
        .post(
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            ADMIN,
            &rbac["clusterRole"],
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = admin_client
        .post(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            ADMIN,
            &rbac["clusterRoleBinding"],
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // The Nodes, created by an admin as kubectl create sends them.
    let mut corr = Correspondence::default();
    let before = testdata("nodes-before.json");
    for item in before["items"].as_array().unwrap() {
        let mut n = item.clone();
        for k in ["uid", "resourceVersion", "creationTimestamp"] {
            n["metadata"].as_object_mut().unwrap().remove(k);
        }
        let r = admin_client.post("/api/v1/nodes", ADMIN, &n).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let mut ours = r.json();
        // nodes-before.json is of one of the recorded runs: its uids are
        // that run's, its resourceVersions those of every run.
        corr.rv(
            &item["metadata"]["resourceVersion"],
            &ours["metadata"]["resourceVersion"],
        );
        let mut want = item.clone();
        scrub(&mut want);
        scrub(&mut ours);
        assert_eq!(
            ours, want,
            "a created Node is what kube-apiserver made of it"
        );
    }

    let audit = testdata(&format!("audit-flanneld-{backend}.json"));
    let events = audit.as_array().unwrap();
    let user_agent = events[0]["userAgent"].as_str().unwrap();
    let flannel = admin_client.with_user_agent(user_agent);
    let mut timeline: Vec<(String, Action)> = Vec::new();
    for e in events {
        let at = e["stageTimestamp"].as_str().unwrap().to_string();
        let action = match (e["verb"].as_str().unwrap(), e["stage"].as_str().unwrap()) {
            ("watch", "ResponseStarted") => Action::WatchStart(e),
            ("watch", _) => Action::WatchEnd(e["auditID"].as_str().unwrap()),
            _ => Action::Request(e),
        };
        timeline.push((at, action));
    }
    timeline.sort_by(|a, b| a.0.cmp(&b.0));

    let mut open: BTreeMap<String, OpenWatch> = BTreeMap::new();
    let mut requests = 0;
    for (_, action) in &timeline {
        match action {
            Action::Request(e) => {
                requests += 1;
                let uri = e["requestURI"].as_str().unwrap();
                let mut want = e["responseObject"].clone();
                let r = match e["verb"].as_str().unwrap() {
                    "list" => flannel.get(uri, FLANNEL).await,
                    "patch" => flannel.patch(uri, FLANNEL, SMP, &e["requestObject"]).await,
                    other => panic!("unexpected recorded verb {other}"),
                };
                assert_eq!(
                    r.status as i64,
                    e["responseStatus"]["code"].as_i64().unwrap(),
                    "{uri}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                let mut ours = r.json();
                corr.object(&want, &ours);
                if e["verb"] == "patch" {
                    for w in open.values_mut() {
                        w.expected.push(ours.clone());
                    }
                }
                scrub(&mut want);
                scrub(&mut ours);
                assert_eq!(ours, want, "{backend}: answer to {uri}");
            }
            Action::WatchStart(e) => {
                let uri = with_rv(e["requestURI"].as_str().unwrap(), |rv| corr.our_rv(rv));
                let watch = flannel.watch(&uri, FLANNEL).await;
                open.insert(
                    e["auditID"].as_str().unwrap().to_string(),
                    OpenWatch {
                        watch,
                        expected: Vec::new(),
                    },
                );
            }
            Action::WatchEnd(id) => {
                let mut w = open.remove(*id).expect("watch started before it ended");
                for want in &w.expected {
                    let ev = w
                        .watch
                        .next_change(Duration::from_secs(5))
                        .await
                        .expect("an event for every patch while the watch was open");
                    assert_eq!(ev["type"], "MODIFIED");
                    assert_eq!(&ev["object"], want, "{backend}: watch event of a patch");
                }
            }
        }
    }
    assert!(open.is_empty());

    // The Nodes after flanneld.
    let after = testdata(&format!("nodes-after-{backend}.json"));
    for item in after["items"].as_array().unwrap() {
        let name = item["metadata"]["name"].as_str().unwrap();
        let r = admin_client
            .get(&format!("/api/v1/nodes/{name}"), ADMIN)
            .await;
        assert_eq!(r.status, 200);
        let mut ours = r.json();
        corr.object(item, &ours);
        let mut want = item.clone();
        scrub(&mut want);
        scrub(&mut ours);
        assert_eq!(ours, want, "{backend}: Node {name} after flanneld");
    }
    corr.check_order();

    // The audit log holds the same events of flanneld's user.
    let normalize = |e: &Value, ours: bool| -> Value {
        let uri = e["requestURI"].as_str().unwrap();
        let uri = if ours {
            let back: BTreeMap<u64, u64> = corr.rvs.iter().map(|(r, o)| (*o, *r)).collect();
            with_rv(uri, |rv| back[&rv])
        } else {
            with_rv(uri, |rv| rv)
        };
        json!({
            "stage": e["stage"], "verb": e["verb"], "requestURI": uri, "user": e["user"],
            "userAgent": e["userAgent"], "objectRef": e["objectRef"],
            "code": e["responseStatus"]["code"], "annotations": e["annotations"],
        })
    };
    let mut want: Vec<String> = events
        .iter()
        .map(|e| normalize(e, false).to_string())
        .collect();
    want.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&audit_path).unwrap();
        let mut ours: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["user"]["username"] == FLANNEL_USER)
            .map(|e| {
                assert_eq!(e["level"], "Metadata");
                assert_eq!(e["kind"], "Event");
                normalize(&e, true).to_string()
            })
            .collect();
        ours.sort();
        if ours.len() >= want.len() || tokio::time::Instant::now() > deadline {
            assert_eq!(ours, want, "{backend}: audit events of flanneld");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(requests >= 5);
}

#[tokio::test]
async fn replay_vxlan() {
    replay("vxlan").await;
}

#[tokio::test]
async fn replay_host_gw() {
    replay("host-gw").await;
}

#[tokio::test]
async fn replay_udp() {
    replay("udp").await;
}
