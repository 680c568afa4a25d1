//! The HTTP API against the double: status codes and bodies as
//! kube-apiserver answers them.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn smoke() {
    let (_h, c) = start(rbac_options()).await;
    let r = c
        .post("/api/v1/nodes", ADMIN, &node("n1", "10.244.1.0/24"))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = c.get("/api/v1/nodes/n1", ADMIN).await;
    assert_eq!(r.status, 200);
    println!("{}", r.json());
    let r = c
        .get("/api/v1/nodes?limit=500&resourceVersion=0", ADMIN)
        .await;
    println!("{}", r.json());
    let mut w = c
        .watch("/api/v1/nodes?watch=true&allowWatchBookmarks=true", ADMIN)
        .await;
    println!("{:?}", w.next(Duration::from_secs(1)).await);
    let _ = json!({});
}
