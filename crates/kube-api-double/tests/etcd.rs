//! The double on a real etcd (Debian's etcd-server on 127.0.0.1, random
//! ports): objects are etcd keys laid out as kube-apiserver lays them
//! out, resourceVersions are etcd revisions, a restarted double keeps its
//! Nodes and their resourceVersions, and resuming from before the restart
//! is 410.

mod common;

use std::time::Duration;

use common::*;
use etcd_client::Client as Etcd;
use flannel_store::testsupport::EtcdServer;
use kube_api_double::{EtcdOptions, Options};
use serde_json::{json, Value};

fn options(etcd: &EtcdServer) -> Options {
    Options {
        etcd: Some(EtcdOptions::new(vec![etcd.endpoint()])),
        ..rbac_options()
    }
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_survive_a_restart() {
    let etcd = EtcdServer::start();
    let mut kv = Etcd::connect([etcd.endpoint()], None).await.unwrap();

    let (h, c) = start(options(&etcd)).await;
    for (n, cidr) in [
        ("k8s-node1", "10.244.1.0/24"),
        ("k8s-node2", "10.244.2.0/24"),
    ] {
        let r = c.create_node(&node(n, cidr)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = c
        .patch(
            "/api/v1/nodes/k8s-node1/status",
            ADMIN,
            SMP,
            &json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "172.16.1.12"}}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let node1 = r.json();

    // The key, its value, and the resourceVersion = the mod revision.
    let got = kv.get("/registry/minions/k8s-node1", None).await.unwrap();
    let entry = &got.kvs()[0];
    assert_eq!(entry.mod_revision() as u64, rv(&node1));
    let stored: Value = serde_json::from_slice(entry.value()).unwrap();
    assert_eq!(stored["kind"], "Node");
    assert_eq!(stored["apiVersion"], "v1");
    assert!(stored["metadata"].get("resourceVersion").is_none());
    assert_eq!(
        stored["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"],
        "172.16.1.12"
    );
    // The fresh cluster's namespaces and roles are there too.
    assert_eq!(
        kv.get("/registry/namespaces/kube-system", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );

    let before = c.get("/api/v1/nodes", ADMIN).await.json();
    let list_rv = rv(&before);
    let node2_rv = rv(&before["items"][1]);
    assert!(node2_rv < list_rv);
    let page = c.get("/api/v1/nodes?limit=1", ADMIN).await.json();
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    // A change after the first page: the next page must not show it.
    let r = c
        .patch(
            "/api/v1/nodes/k8s-node2",
            ADMIN,
            SMP,
            &json!({"metadata": {"labels": {"late": "1"}}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let before = c.get("/api/v1/nodes", ADMIN).await.json();
    h.shutdown();

    // A new double on the same etcd.
    let (h, c) = start(options(&etcd)).await;
    let after = c.get("/api/v1/nodes", ADMIN).await.json();
    assert_eq!(
        after["items"], before["items"],
        "same Nodes, same uids and resourceVersions"
    );
    assert_eq!(rv(&after), rv(&before));
    let r = c.get("/api/v1/nodes/k8s-node1", ADMIN).await.json();
    assert_eq!(r, node1);

    // Resuming a watch from before the restart: 410 (its history begins now).
    let mut w = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={node2_rv}"),
            ADMIN,
        )
        .await;
    let ev = w.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(
        ev["object"]["message"],
        format!("too old resource version: {node2_rv} ({})", rv(&after))
    );
    assert!(w.next(Duration::from_secs(5)).await.is_none());
    // A paged list from before the restart continues from etcd's revision.
    let r = c
        .get(&format!("/api/v1/nodes?limit=1&continue={token}"), ADMIN)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p2 = r.json();
    assert_eq!(p2["items"][0]["metadata"]["name"], "k8s-node2");
    assert!(
        p2["items"][0]["metadata"]["labels"].get("late").is_none(),
        "the snapshot of the first page"
    );
    // From the new list's version on, watches work.
    let mut w = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={}", rv(&after)),
            ADMIN,
        )
        .await;
    let r = c.delete("/api/v1/nodes/k8s-node2", ADMIN).await;
    assert_eq!(r.status, 200);
    let ev = w.next_change(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ev["type"], "DELETED");
    let del_rv = rv(&ev["object"]);
    assert!(kv
        .get("/registry/minions/k8s-node2", None)
        .await
        .unwrap()
        .kvs()
        .is_empty());
    let head = kv.get("health", None).await.unwrap();
    assert!(head.header().unwrap().revision() as u64 >= del_rv);

    // Another writer on the same etcd: the guarded write fails (409), the
    // double takes etcd's version, the next write succeeds on top of it.
    let mut external = stored.clone();
    external["metadata"]["labels"]["written-by"] = json!("someone-else");
    kv.put("/registry/minions/k8s-node1", external.to_string(), None)
        .await
        .unwrap();
    let p = json!({"metadata": {"labels": {"by-double": "yes"}}});
    let r = c.patch("/api/v1/nodes/k8s-node1", ADMIN, SMP, &p).await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let r = c.patch("/api/v1/nodes/k8s-node1", ADMIN, SMP, &p).await;
    assert_eq!(r.status, 200);
    let labels = &r.json()["metadata"]["labels"];
    assert_eq!(labels["written-by"], "someone-else");
    assert_eq!(labels["by-double"], "yes");

    // A compaction moves the revision on with a real etcd write.
    let now = rv(&c.get("/api/v1/nodes", ADMIN).await.json());
    h.compact();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let fresh = loop {
        let v = rv(&c.get("/api/v1/nodes", ADMIN).await.json());
        if v > now || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        fresh > now,
        "the list version moved on after the compaction"
    );
    let r = c
        .get(&format!("/api/v1/nodes?limit=1&continue={token}"), ADMIN)
        .await;
    assert_eq!(r.status, 410, "etcd compacted the revision of the token");
    let mut w = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={now}"),
            ADMIN,
        )
        .await;
    assert_eq!(
        w.next(Duration::from_secs(5)).await.unwrap()["type"],
        "ERROR"
    );
    let mut w = c
        .watch(
            &format!("/api/v1/nodes?watch=true&resourceVersion={fresh}&timeoutSeconds=1"),
            ADMIN,
        )
        .await;
    assert!(
        w.next(Duration::from_secs(5)).await.is_none(),
        "no error, no events, just the end"
    );
    assert!(w.ended);
}
