//! The HTTP API against the double: status codes and bodies as
//! kube-apiserver answers them.

mod common;

use std::time::Duration;

use common::*;
use kube_api_double::{AuthorizationMode, Options};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(5);
const ROLES: &str = "/apis/rbac.authorization.k8s.io/v1/clusterroles";
const BINDINGS: &str = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings";

/// The body without the newline kube-apiserver ends JSON with.
fn text(r: &Resp) -> String {
    let t = String::from_utf8_lossy(&r.body).into_owned();
    match t.strip_suffix('\n') {
        Some(s) => s.to_string(),
        None => t,
    }
}

async fn create_nodes(c: &Client, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        let r = c
            .create_node(&node(n, &format!("10.244.{}.0/24", i + 1)))
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
    }
}

async fn flannel_rbac(c: &Client) {
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "flannel"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]}
        ]
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "flannel"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "flannel"},
        "subjects": [{"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"}]
    });
    let r = c.post(ROLES, ADMIN, &role).await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = c.post(BINDINGS, ADMIN, &binding).await;
    assert_eq!(r.status, 201, "{}", text(&r));
}

#[tokio::test]
async fn authentication() {
    let (_h, c) = start(rbac_options()).await;
    let r = c.get("/api/v1/nodes", "no-such-token").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        text(&r),
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
    );
    // No token: the anonymous user, which RBAC lets see health and version only.
    let r = c.send("GET", "/api/v1/nodes", None, None, vec![]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["message"],
        "nodes is forbidden: User \"system:anonymous\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );
    for path in ["/healthz", "/livez", "/readyz"] {
        let r = c.send("GET", path, None, None, vec![]).await;
        assert_eq!((r.status, text(&r).as_str()), (200, "ok"), "{path}");
    }
    let r = c.send("GET", "/version", None, None, vec![]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["gitVersion"], "v1.36.2");
    // Discovery needs an authenticated user.
    assert_eq!(c.send("GET", "/api", None, None, vec![]).await.status, 403);
    assert_eq!(c.get("/api", BOB).await.status, 200);

    let (_h, c) = start(Options {
        anonymous_auth: false,
        ..rbac_options()
    })
    .await;
    assert_eq!(
        c.send("GET", "/api/v1/nodes", None, None, vec![])
            .await
            .status,
        401
    );
    assert_eq!(
        c.send("GET", "/healthz", None, None, vec![]).await.status,
        401
    );
    assert_eq!(c.get("/healthz", BOB).await.status, 200);
}

#[tokio::test]
async fn rbac_decisions() {
    let (_h, c) = start(rbac_options()).await;
    create_nodes(&c, &["k8s-node1"]).await;
    // Before the binding exists, flanneld's user may do nothing.
    let r = c.get("/api/v1/nodes", FLANNEL).await;
    assert_eq!(r.status, 403);
    flannel_rbac(&c).await;
    assert_eq!(c.get("/api/v1/nodes", FLANNEL).await.status, 200);
    assert_eq!(c.get("/api/v1/nodes/k8s-node1", FLANNEL).await.status, 200);
    let ann =
        json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "172.16.1.12"}}});
    let r = c
        .patch("/api/v1/nodes/k8s-node1/status", FLANNEL, SMP, &ann)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = c.patch("/api/v1/nodes/k8s-node1", FLANNEL, SMP, &ann).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        text(&r),
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nodes \"k8s-node1\" is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope","reason":"Forbidden","details":{"name":"k8s-node1","kind":"nodes"},"code":403}"#
    );
    let r = c.delete("/api/v1/nodes/k8s-node1", FLANNEL).await;
    assert_eq!(r.status, 403);
    // A pod in a namespace: the message names the namespace.
    let r = c.get("/api/v1/namespaces/kube-flannel/pods/p", BOB).await;
    assert_eq!(
        r.json()["message"],
        "pods \"p\" is forbidden: User \"bob\" cannot get resource \"pods\" in API group \"\" in the namespace \"kube-flannel\""
    );
    // A group subject, and a binding to a role that does not exist.
    let binding = |name: &str, role: &str| {
        json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]
        })
    };
    let r = c
        .post(BINDINGS, ADMIN, &binding("bob-missing", "missing"))
        .await;
    assert_eq!(r.status, 201);
    let r = c.get("/api/v1/nodes", BOB).await;
    assert_eq!(
        r.json()["message"],
        "nodes is forbidden: User \"bob\" cannot list resource \"nodes\" in API group \"\" at the cluster scope: RBAC: clusterrole.rbac.authorization.k8s.io \"missing\" not found"
    );
    let r = c
        .post(BINDINGS, ADMIN, &binding("bob-flannel", "flannel"))
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(c.get("/api/v1/nodes", BOB).await.status, 200);
    // Roles can be read back, replaced and deleted.
    let r = c.get(&format!("{ROLES}/flannel"), ADMIN).await;
    let mut role = r.json();
    assert_eq!(role["kind"], "ClusterRole");
    role["rules"] = json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]);
    let r = c.put(&format!("{ROLES}/flannel"), ADMIN, &role).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(c.get("/api/v1/nodes/k8s-node1", BOB).await.status, 403);
    let r = c.delete(&format!("{BINDINGS}/bob-flannel"), ADMIN).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "Success");
    assert_eq!(r.json()["details"]["group"], "rbac.authorization.k8s.io");
    assert_eq!(c.get("/api/v1/nodes", BOB).await.status, 403);

    // AlwaysAllow lets every authenticated user do everything.
    let (_h, c) = start(Options {
        tokens: tokens(),
        authorization: AuthorizationMode::AlwaysAllow,
        ..Options::default()
    })
    .await;
    let r = c
        .post("/api/v1/nodes", BOB, &node("n", "10.0.0.0/24"))
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn nodes_errors() {
    let (_h, c) = start(rbac_options()).await;
    let r = c.get("/api/v1/nodes/x", ADMIN).await;
    assert_eq!(
        text(&r),
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"nodes \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"nodes"},"code":404}"#
    );
    create_nodes(&c, &["k8s-node1"]).await;
    let r = c.create_node(&node("k8s-node1", "10.9.0.0/24")).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["reason"], "AlreadyExists");
    assert_eq!(r.json()["message"], "nodes \"k8s-node1\" already exists");

    // Names.
    let r = c.create_node(&json!({"metadata": {}})).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["message"],
        "Node \"\" is invalid: metadata.name: Required value: name or generateName is required"
    );
    let r = c
        .create_node(&json!({"metadata": {"name": "Bad_Name"}}))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["details"]["causes"][0]["field"], "metadata.name");
    let r = c
        .create_node(&json!({"metadata": {"generateName": "gen-"}}))
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json()["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("gen-"));

    // A non-string annotation is the decoder's 400 on create, 422 in a patch.
    let r = c
        .create_node(&json!({"metadata": {"name": "n2", "annotations": {"a": 1}}}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "Node in version \"v1\" cannot be handled as a Node: json: cannot unmarshal number into Go struct field ObjectMeta.metadata.annotations of type string"
    );
    let r = c
        .smp(
            "/api/v1/nodes/k8s-node1/status",
            &json!({"metadata": {"annotations": {"a": 1}}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["message"],
        " \"\" is invalid: patch: Invalid value: \"map[metadata:map[annotations:map[a:1]]]\": cannot convert int64 to string"
    );
    let r = c
        .smp(
            "/api/v1/nodes/k8s-node1",
            &json!({"metadata": {"annotations": {"bad key": "x"}}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["details"]["causes"][0]["field"],
        "metadata.annotations"
    );

    // podCIDR may only be set from empty.
    let r = c
        .patch(
            "/api/v1/nodes/k8s-node1",
            ADMIN,
            MERGE,
            &json!({"spec": {"podCIDR": "10.9.0.0/24", "podCIDRs": ["10.9.0.0/24"]}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        text(&r),
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Node \"k8s-node1\" is invalid: spec.podCIDRs: Forbidden: node updates may not change podCIDR except from \"\" to valid","reason":"Invalid","details":{"name":"k8s-node1","kind":"Node","causes":[{"reason":"FieldValueForbidden","message":"Forbidden: node updates may not change podCIDR except from \"\" to valid","field":"spec.podCIDRs"}]},"code":422}"#
    );
    let r = c.create_node(&json!({"metadata": {"name": "empty"}})).await;
    assert_eq!(r.status, 201);
    let r = c
        .smp(
            "/api/v1/nodes/empty",
            &json!({"spec": {"podCIDR": "10.8.0.0/24"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["spec"]["podCIDRs"], json!(["10.8.0.0/24"]));
    let r = c
        .create_node(&json!({"metadata": {"name": "badcidr"}, "spec": {"podCIDRs": ["10.0.0.0/24", "10.1.0.0/24"]}}))
        .await;
    assert_eq!(r.status, 422);

    // Stale resourceVersion: 409 Conflict.
    let cur = c.get("/api/v1/nodes/k8s-node1", ADMIN).await.json();
    let stale = json!({"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}});
    let r = c.smp("/api/v1/nodes/k8s-node1", &stale).await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json()["message"],
        "Operation cannot be fulfilled on nodes \"k8s-node1\": the object has been modified; please apply your changes to the latest version and try again"
    );
    let mut put = cur.clone();
    put["metadata"]["labels"]["x"] = json!("y");
    let r = c.put("/api/v1/nodes/k8s-node1", ADMIN, &put).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = c.put("/api/v1/nodes/k8s-node1", ADMIN, &put).await;
    assert_eq!(
        r.status, 409,
        "the second PUT carries the old resourceVersion"
    );
    let r = c.put("/api/v1/nodes/other", ADMIN, &put).await;
    assert_eq!(r.status, 400);

    // Media types and methods.
    let r = c
        .send(
            "PATCH",
            "/api/v1/nodes/k8s-node1",
            Some(ADMIN),
            Some("application/apply-patch+yaml"),
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["reason"], "UnsupportedMediaType");
    let r = c.post("/api/v1/nodes/k8s-node1", ADMIN, &json!({})).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["reason"], "MethodNotAllowed");
    let r = c
        .send(
            "POST",
            "/api/v1/nodes",
            Some(ADMIN),
            Some("application/json"),
            b"{not json".to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["reason"], "BadRequest");
    let r = c.get("/api/v1/widgets", ADMIN).await;
    assert_eq!(r.status, 404);
    // Unknown fields are dropped, with a warning.
    let r = c
        .patch(
            "/api/v1/nodes/k8s-node1",
            ADMIN,
            MERGE,
            &json!({"spec": {"podCidr": "typo"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["spec"].get("podCidr").is_none());
    assert_eq!(
        r.headers["warning"],
        "299 - \"unknown field \\\"spec.podCidr\\\"\""
    );
    let r = c
        .patch(
            "/api/v1/nodes/k8s-node1",
            ADMIN,
            JSON_PATCH,
            &json!([{"op": "remove", "path": "/spec/nope"}]),
        )
        .await;
    assert_eq!(r.status, 422);
    let r = c.smp("/api/v1/nodes/missing", &json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(c.delete("/api/v1/nodes/missing", ADMIN).await.status, 404);
}

#[tokio::test]
async fn patches_and_status_subresource() {
    let (_h, c) = start(rbac_options()).await;
    create_nodes(&c, &["n1"]).await;
    let before = c.get("/api/v1/nodes/n1", ADMIN).await.json();

    // Through /status: metadata and status change, spec does not.
    let p = json!({
        "metadata": {"annotations": {"a": "1"}},
        "spec": {"unschedulable": true},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp", "message": "m",
            "lastHeartbeatTime": "2026-12-02T12:36:56Z", "lastTransitionTime": "2026-12-02T12:36:56Z"}]}
    });
    let r = c.smp("/api/v1/nodes/n1/status", &p).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let n = r.json();
    assert_eq!(n["metadata"]["annotations"]["a"], "1");
    assert_eq!(n["spec"], before["spec"]);
    assert_eq!(n["status"]["conditions"][0]["type"], "NetworkUnavailable");

    // Through the main resource: metadata and spec change, status does not.
    let p = json!({"metadata": {"labels": {"l": "v"}}, "spec": {"unschedulable": true}, "status": {"conditions": null}});
    let r = c.smp("/api/v1/nodes/n1", &p).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let n2 = r.json();
    assert_eq!(n2["spec"]["unschedulable"], true);
    assert_eq!(n2["metadata"]["labels"]["l"], "v");
    assert_eq!(n2["status"], n["status"]);

    // A strategic merge of conditions by type; a no-op patch writes nothing.
    let p = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    let r = c.smp("/api/v1/nodes/n1/status", &p).await;
    let conds = r.json()["status"]["conditions"].clone();
    assert_eq!(conds.as_array().unwrap().len(), 2);
    let rv = r.json()["metadata"]["resourceVersion"].clone();
    let r = c.smp("/api/v1/nodes/n1/status", &p).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["metadata"]["resourceVersion"],
        rv,
        "a no-op patch keeps the resourceVersion"
    );
    // client-go's two-way merge patches carry $setElementOrder.
    let p = json!({"status": {
        "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "NetworkUnavailable"}],
        "conditions": [{"type": "NetworkUnavailable", "status": "True"}]
    }});
    let r = c.smp("/api/v1/nodes/n1/status", &p).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let conds = r.json()["status"]["conditions"].clone();
    assert_eq!(conds[0]["type"], "Ready");
    assert_eq!(conds[1]["type"], "NetworkUnavailable");
    assert_eq!(conds[1]["status"], "True");
    assert_eq!(conds[1]["reason"], "FlannelIsUp", "merged, not replaced");

    // RFC 7386 merge patch: lists are replaced, null deletes.
    let p = json!({"metadata": {"annotations": {"a": null, "b": "2"}}, "status": {"conditions": [{"type": "Only", "status": "True"}]}});
    let r = c.patch("/api/v1/nodes/n1/status", ADMIN, MERGE, &p).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let n = r.json();
    assert_eq!(n["metadata"]["annotations"], json!({"b": "2"}));
    assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 1);
    // RFC 6902 JSON patch.
    let p = json!([
        {"op": "test", "path": "/metadata/annotations/b", "value": "2"},
        {"op": "add", "path": "/metadata/annotations/c", "value": "3"}
    ]);
    let r = c.patch("/api/v1/nodes/n1", ADMIN, JSON_PATCH, &p).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["metadata"]["annotations"]["c"], "3");
    // PUT on /status replaces the status only.
    let mut cur = c.get("/api/v1/nodes/n1", ADMIN).await.json();
    cur["status"]["conditions"] = json!([]);
    cur["spec"]["unschedulable"] = json!(false);
    let r = c.put("/api/v1/nodes/n1/status", ADMIN, &cur).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(r.json()["status"].get("conditions").is_none());
    assert_eq!(r.json()["spec"]["unschedulable"], true);
    // GET of the status subresource is the Node.
    let r = c.get("/api/v1/nodes/n1/status", ADMIN).await;
    assert_eq!(r.json()["kind"], "Node");
    // DELETE answers a Status of success.
    let r = c.delete("/api/v1/nodes/n1", ADMIN).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "Success");
    assert_eq!(r.json()["details"]["kind"], "nodes");
    assert_eq!(c.get("/api/v1/nodes/n1", ADMIN).await.status, 404);
}

#[tokio::test]
async fn lists_pagination_and_selectors() {
    let (h, c) = start(rbac_options()).await;
    let names = ["a", "b", "c", "d", "e"];
    create_nodes(&c, &names).await;
    let r = c
        .smp(
            "/api/v1/nodes/c",
            &json!({"metadata": {"labels": {"role": "edge"}}}),
        )
        .await;
    assert_eq!(r.status, 200);

    let all = c.get("/api/v1/nodes", ADMIN).await.json();
    assert_eq!(all["kind"], "NodeList");
    assert_eq!(all["apiVersion"], "v1");
    assert!(
        all["items"][0].get("kind").is_none(),
        "items without kind, as recorded"
    );
    let got: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, names);
    assert!(all["metadata"].get("continue").is_none());

    // resourceVersion=0 is served whole, limit ignored.
    let r = c
        .get("/api/v1/nodes?limit=2&resourceVersion=0", ADMIN)
        .await
        .json();
    assert_eq!(r["items"].as_array().unwrap().len(), 5);
    assert!(r["metadata"].get("continue").is_none());
    let r = c
        .get(
            "/api/v1/nodes?limit=2&resourceVersion=0&resourceVersionMatch=NotOlderThan",
            ADMIN,
        )
        .await
        .json();
    assert_eq!(r["items"].as_array().unwrap().len(), 5);

    // Pages of a consistent snapshot.
    let p1 = c.get("/api/v1/nodes?limit=2", ADMIN).await.json();
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    assert_eq!(p1["metadata"]["remainingItemCount"], 3);
    let token = p1["metadata"]["continue"].as_str().unwrap().to_string();
    assert_eq!(c.delete("/api/v1/nodes/d", ADMIN).await.status, 200);
    let p2 = c
        .get(&format!("/api/v1/nodes?limit=2&continue={token}"), ADMIN)
        .await
        .json();
    let got: Vec<&str> = p2["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["c", "d"], "the deleted Node is still in the snapshot");
    assert_eq!(
        p2["metadata"]["resourceVersion"],
        p1["metadata"]["resourceVersion"]
    );
    let token2 = p2["metadata"]["continue"].as_str().unwrap().to_string();
    let p3 = c
        .get(&format!("/api/v1/nodes?limit=2&continue={token2}"), ADMIN)
        .await
        .json();
    assert_eq!(p3["items"].as_array().unwrap().len(), 1);
    assert!(p3["metadata"].get("continue").is_none());

    let r = c
        .get("/api/v1/nodes?limit=2&continue=garbage!", ADMIN)
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .starts_with("invalid continue token"));
    h.compact();
    let r = c
        .get(&format!("/api/v1/nodes?limit=2&continue={token2}"), ADMIN)
        .await;
    assert_eq!(r.status, 410);
    assert_eq!(r.json()["reason"], "Expired");
    assert!(r.json()["metadata"]["continue"].is_string());

    // Selectors.
    let names_of = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let r = c
        .get("/api/v1/nodes?labelSelector=role%3Dedge", ADMIN)
        .await
        .json();
    assert_eq!(names_of(&r), ["c"]);
    let r = c
        .get("/api/v1/nodes?labelSelector=role!%3Dedge", ADMIN)
        .await
        .json();
    assert_eq!(names_of(&r), ["a", "b", "e"]);
    let r = c
        .get("/api/v1/nodes?labelSelector=role", ADMIN)
        .await
        .json();
    assert_eq!(names_of(&r), ["c"]);
    let r = c
        .get(
            "/api/v1/nodes?labelSelector=role%3Dedge,kubernetes.io/hostname%3Dc",
            ADMIN,
        )
        .await
        .json();
    assert_eq!(names_of(&r), ["c"]);
    let r = c
        .get("/api/v1/nodes?fieldSelector=metadata.name%3Db", ADMIN)
        .await
        .json();
    assert_eq!(names_of(&r), ["b"]);
    let r = c
        .get("/api/v1/nodes?fieldSelector=spec.podCIDR%3Dx", ADMIN)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "field label not supported: spec.podCIDR"
    );
    let r = c.get("/api/v1/nodes?labelSelector=a%20b", ADMIN).await;
    assert_eq!(r.status, 400);
    let r = c
        .get("/api/v1/nodes?resourceVersionMatch=Exact", ADMIN)
        .await;
    assert_eq!(r.status, 422);
    // With a selector, no remainingItemCount.
    let r = c
        .get(
            "/api/v1/nodes?limit=1&labelSelector=kubernetes.io/hostname",
            ADMIN,
        )
        .await
        .json();
    assert!(r["metadata"]["continue"].is_string());
    assert!(r["metadata"].get("remainingItemCount").is_none());
}

#[tokio::test]
async fn watches() {
    let (h, c) = start(Options {
        bookmark_interval: Duration::from_millis(200),
        ..rbac_options()
    })
    .await;
    create_nodes(&c, &["a", "b"]).await;
    let list = c.get("/api/v1/nodes", ADMIN).await.json();
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // From the current state.
    let mut w = c.watch("/api/v1/nodes?watch=1", ADMIN).await;
    for name in ["a", "b"] {
        let ev = w.next(WAIT).await.unwrap();
        assert_eq!(ev["type"], "ADDED");
        assert_eq!(ev["object"]["kind"], "Node");
        assert_eq!(ev["object"]["metadata"]["name"], name);
    }
    // From a resourceVersion, with bookmarks.
    let mut wb = c
        .watch(&format!("/api/v1/nodes?allowWatchBookmarks=true&resourceVersion={list_rv}&timeout=8m1s&timeoutSeconds=481&watch=true"), ADMIN)
        .await;
    let bm = wb.next(WAIT).await.expect("a bookmark");
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(bm["object"]["kind"], "Node");
    assert_eq!(
        bm["object"]["metadata"]["resourceVersion"],
        list_rv.to_string()
    );

    let r = c
        .smp(
            "/api/v1/nodes/a/status",
            &json!({"metadata": {"annotations": {"x": "1"}}}),
        )
        .await;
    let patched = r.json();
    for w in [&mut w, &mut wb] {
        let ev = w.next_change(WAIT).await.unwrap();
        assert_eq!(ev["type"], "MODIFIED");
        assert_eq!(ev["object"], patched);
    }
    let r = c.delete("/api/v1/nodes/b", ADMIN).await;
    assert_eq!(r.status, 200);
    let ev = w.next_change(WAIT).await.unwrap();
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(ev["object"]["metadata"]["name"], "b");
    let del_rv: u64 = ev["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(del_rv > list_rv, "DELETED carries a new resourceVersion");
    // A bookmark after the events is at least as new.
    let bm = loop {
        let e = wb.next(WAIT).await.unwrap();
        if e["type"] == "BOOKMARK" {
            break e;
        }
    };
    let bm_rv: u64 = bm["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bm_rv >= del_rv);

    // Resuming from the history, then after compaction: 410 as one ERROR event, stream ends.
    let mut wr = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={list_rv}"),
            ADMIN,
        )
        .await;
    assert_eq!(wr.next_change(WAIT).await.unwrap()["type"], "MODIFIED");
    assert_eq!(wr.next_change(WAIT).await.unwrap()["type"], "DELETED");
    h.compact();
    let mut we = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={list_rv}"),
            ADMIN,
        )
        .await;
    let ev = we.next(WAIT).await.unwrap();
    let current = h.resource_version();
    assert_eq!(
        ev,
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {list_rv} ({current})"), "reason": "Expired", "code": 410}})
    );
    assert!(we.next(WAIT).await.is_none());
    assert!(we.ended);

    // timeoutSeconds ends the stream.
    let mut wt = c
        .watch("/api/v1/nodes?watch=true&timeoutSeconds=1", ADMIN)
        .await;
    assert_eq!(wt.next(WAIT).await.unwrap()["type"], "ADDED");
    assert!(wt.next(WAIT).await.is_none());
    assert!(wt.ended);

    // Selectors see an object leave (DELETED) and enter (ADDED).
    let mut ws = c
        .watch("/api/v1/nodes?watch=true&labelSelector=team%3Dx", ADMIN)
        .await;
    c.smp(
        "/api/v1/nodes/a",
        &json!({"metadata": {"labels": {"team": "x"}}}),
    )
    .await;
    assert_eq!(ws.next_change(WAIT).await.unwrap()["type"], "ADDED");
    c.smp(
        "/api/v1/nodes/a",
        &json!({"metadata": {"labels": {"team": "y"}}}),
    )
    .await;
    let ev = ws.next_change(WAIT).await.unwrap();
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(
        ev["object"]["metadata"]["labels"]["team"], "x",
        "the last state that matched"
    );

    // Streaming lists: initial state, then a bookmark marking its end.
    let mut wl = c
        .watch("/api/v1/nodes?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true", ADMIN)
        .await;
    assert_eq!(wl.next(WAIT).await.unwrap()["type"], "ADDED");
    let bm = wl.next(WAIT).await.unwrap();
    assert_eq!(bm["type"], "BOOKMARK");
    assert_eq!(
        bm["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let r = c
        .get("/api/v1/nodes?watch=true&sendInitialEvents=true", ADMIN)
        .await;
    assert_eq!(r.status, 422);

    // A resourceVersion the server has not reached: 504 after a wait.
    let r = c
        .get(
            &format!(
                "/api/v1/nodes?watch=true&resourceVersion={}",
                current + 1000
            ),
            ADMIN,
        )
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.json()["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
}

#[tokio::test]
async fn namespaces_and_pods() {
    let (_h, c) = start(rbac_options()).await;
    let r = c.get("/api/v1/namespaces", ADMIN).await.json();
    let names: Vec<&str> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["default", "kube-node-lease", "kube-public", "kube-system"]
    );
    assert_eq!(r["items"][0]["status"]["phase"], "Active");

    let pod = json!({"metadata": {"name": "kube-flannel-ds-x"}, "spec": {"nodeName": "k8s-node1", "containers": [{"name": "kube-flannel", "image": "flannel:v0.20.2"}]}});
    let r = c
        .post("/api/v1/namespaces/kube-flannel/pods", ADMIN, &pod)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        text(&r),
        r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"namespaces \"kube-flannel\" not found","reason":"NotFound","details":{"name":"kube-flannel","kind":"namespaces"},"code":404}"#
    );
    let r = c
        .post(
            "/api/v1/namespaces",
            ADMIN,
            &json!({"metadata": {"name": "kube-flannel"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.json()["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "kube-flannel"
    );
    // The ServiceAccount admission: the pod's account must exist (no
    // kube-controller-manager made the namespace's `default` one).
    let r = c
        .post("/api/v1/namespaces/kube-flannel/pods", ADMIN, &pod)
        .await;
    assert_eq!(r.status, 403, "{}", text(&r));
    assert!(
        text(&r).contains(r#"error looking up service account kube-flannel/default: serviceaccount \"default\" not found"#),
        "{}",
        text(&r)
    );
    let r = c
        .post(
            "/api/v1/namespaces/kube-flannel/serviceaccounts",
            ADMIN,
            &json!({"metadata": {"name": "default"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    let r = c
        .post("/api/v1/namespaces/kube-flannel/pods", ADMIN, &pod)
        .await;
    assert_eq!(r.status, 201, "{}", text(&r));
    assert_eq!(r.json()["spec"]["serviceAccountName"], "default");
    let p = r.json();
    assert_eq!(p["spec"]["nodeName"], "k8s-node1");
    assert_eq!(p["metadata"]["namespace"], "kube-flannel");
    assert_eq!(p["status"]["phase"], "Pending");
    let r = c
        .get(
            "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x",
            ADMIN,
        )
        .await;
    assert_eq!(r.json()["spec"]["nodeName"], "k8s-node1");
    let r = c
        .get(
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dk8s-node1",
            ADMIN,
        )
        .await
        .json();
    assert_eq!(r["items"].as_array().unwrap().len(), 1);
    let r = c
        .post(
            "/api/v1/namespaces/kube-flannel/pods",
            ADMIN,
            &json!({"metadata": {"name": "p"}, "spec": {}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["message"],
        "Pod \"p\" is invalid: spec.containers: Required value"
    );

    // A pod bound to a node is deleted gracefully (the kubelet would finish it);
    // gracePeriodSeconds=0 deletes it at once.
    let r = c
        .delete(
            "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x",
            ADMIN,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["metadata"]["deletionTimestamp"].is_string());
    let r = c
        .delete(
            "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x?gracePeriodSeconds=0",
            ADMIN,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kind"], "Pod");
    assert_eq!(
        c.get(
            "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x",
            ADMIN
        )
        .await
        .status,
        404
    );

    c.post("/api/v1/namespaces/kube-flannel/pods", ADMIN, &pod)
        .await;
    let r = c.delete("/api/v1/namespaces/kube-flannel", ADMIN).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"]["phase"], "Terminating");
    assert_eq!(
        c.get("/api/v1/namespaces/kube-flannel", ADMIN).await.status,
        404
    );
    assert_eq!(
        c.get(
            "/api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-x",
            ADMIN
        )
        .await
        .status,
        404
    );
    let r = c.delete("/api/v1/namespaces/default", ADMIN).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["message"],
        "namespaces \"default\" is forbidden: this namespace may not be deleted"
    );
}

#[tokio::test]
async fn discovery() {
    let (h, c) = start(rbac_options()).await;
    let r = c.get("/api", BOB).await.json();
    assert_eq!(r["kind"], "APIVersions");
    assert_eq!(r["versions"], json!(["v1"]));
    let r = c.get("/api/v1", BOB).await.json();
    let names: Vec<&str> = r["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for n in ["nodes", "nodes/status", "pods", "namespaces"] {
        assert!(names.contains(&n), "{n}");
    }
    let r = c.get("/apis", BOB).await.json();
    assert_eq!(r["groups"][0]["name"], "rbac.authorization.k8s.io");
    let r = c
        .get("/apis/rbac.authorization.k8s.io/v1", BOB)
        .await
        .json();
    assert_eq!(r["groupVersion"], "rbac.authorization.k8s.io/v1");
    assert!(h.url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn audit_log() {
    let dir = flannel_store::testsupport::TestDir::new("kube-audit");
    let path = dir.path().join("audit.log");
    let (_h, c) = start(Options {
        audit_log_path: Some(path.clone()),
        ..rbac_options()
    })
    .await;
    create_nodes(&c, &["n1"]).await;
    let mut w = c
        .watch("/api/v1/nodes?watch=true&timeoutSeconds=1", ADMIN)
        .await;
    while w.next(WAIT).await.is_some() {}
    c.get("/api/v1/nodes/n1", BOB).await;
    c.get("/api/v1/nodes", "bad").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let events = loop {
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let done = events.iter().filter(|e| e["verb"] == "watch").count() == 2;
        if done || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let create = events
        .iter()
        .find(|e| e["verb"] == "create" && e["objectRef"]["resource"] == "nodes")
        .unwrap();
    assert_eq!(create["stage"], "ResponseComplete");
    assert_eq!(
        create["responseStatus"],
        json!({"metadata": {}, "code": 201})
    );
    assert_eq!(create["user"]["username"], "admin");
    assert_eq!(
        create["objectRef"],
        json!({"resource": "nodes", "apiVersion": "v1"})
    );
    let stages: Vec<&str> = events
        .iter()
        .filter(|e| e["verb"] == "watch")
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["ResponseStarted", "ResponseComplete"]);
    let denied = events
        .iter()
        .find(|e| e["user"]["username"] == "bob")
        .unwrap();
    assert_eq!(denied["responseStatus"]["code"], 403);
    assert_eq!(denied["responseStatus"]["reason"], "Forbidden");
    assert_eq!(
        denied["annotations"]["authorization.k8s.io/decision"],
        "forbid"
    );
    assert_eq!(
        denied["objectRef"],
        json!({"resource": "nodes", "name": "n1", "apiVersion": "v1"})
    );
    let unauth = events
        .iter()
        .find(|e| e["responseStatus"]["code"] == 401)
        .unwrap();
    assert_eq!(unauth["stage"], "ResponseStarted");
    for e in &events {
        assert_eq!(e["apiVersion"], "audit.k8s.io/v1");
        assert_eq!(e["level"], "Metadata");
        assert!(e["requestReceivedTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert_eq!(e["sourceIPs"], json!(["127.0.0.1"]));
    }
}

/// 5,000 Nodes: created through the API (concurrently, on kept-alive
/// connections), listed in one response with resourceVersion=0 as
/// flanneld's reflector lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_nodes_one_list() {
    let (_h, c) = start(rbac_options()).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..5000).step_by(8) {
                let name = format!("node-{i:04}");
                let cidr = format!("10.{}.{}.0/24", i / 256, i % 256);
                let r = c.create_node(&node(&name, &cidr)).await;
                assert_eq!(r.status, 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = c
        .get("/api/v1/nodes?limit=500&resourceVersion=0", ADMIN)
        .await
        .json();
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 5000);
    assert!(r["metadata"].get("continue").is_none());
    assert_eq!(items[0]["metadata"]["name"], "node-0000");
    assert_eq!(items[4999]["metadata"]["name"], "node-4999");
}

#[tokio::test]
async fn delete_collection() {
    let (_h, c) = start(rbac_options()).await;
    create_nodes(&c, &["a", "b", "c"]).await;
    c.smp(
        "/api/v1/nodes/b",
        &json!({"metadata": {"labels": {"gone": "yes"}}}),
    )
    .await;
    let r = c
        .delete("/api/v1/nodes?labelSelector=gone%3Dyes", ADMIN)
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["kind"], "NodeList");
    assert_eq!(r.json()["items"][0]["metadata"]["name"], "b");
    let left = c.get("/api/v1/nodes", ADMIN).await.json();
    assert_eq!(left["items"].as_array().unwrap().len(), 2);
    assert_eq!(c.delete("/api/v1/namespaces", ADMIN).await.status, 405);
}

/// A double on its own runtime thread, for tests that are not async.
#[test]
fn blocking_start() {
    use std::io::{Read, Write};
    let h = kube_api_double::Double::start_blocking(rbac_options()).unwrap();
    let mut s = std::net::TcpStream::connect(h.addr()).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("ok"), "{out}");
    let addr = h.addr();
    h.shutdown();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed after shutdown"
    );
}
