//! A real Kubernetes client (kube 5 / k8s-openapi, what flanneld uses)
//! against the double over HTTPS with a CA of the test's own: typed get,
//! list and status patches, and kube-runtime's watcher (list + watch,
//! bookmarks, relist after a 410).

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube_api_double::{Options, Tls};
use serde_json::json;

/// What the watcher yields: an event (described) or an error.
type Seen = Result<String, String>;

fn describe(ev: &watcher::Event<Node>) -> String {
    use kube::ResourceExt;
    match ev {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(n) => format!("InitApply({})", n.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(n) => format!("Apply({})", n.name_any()),
        watcher::Event::Delete(n) => format!("Delete({})", n.name_any()),
    }
}

/// Runs the watcher in the background (it only works while polled).
fn run_watcher(api: Api<Node>, cfg: watcher::Config) -> tokio::sync::mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = Box::pin(watcher(api, cfg));
        while let Some(item) = stream.next().await {
            let seen = item.map(|ev| describe(&ev)).map_err(|e| e.to_string());
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next events up to and including `InitDone` or one `Apply`; errors
/// on the way are collected.
async fn next_events(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
    errors: &mut Vec<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let item = match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("the watcher stopped; so far {out:?}, errors {errors:?}"),
            Err(_) => panic!("no watcher event within 10 s; so far {out:?}, errors {errors:?}"),
        };
        match item {
            Ok(ev) => {
                let done = ev == "InitDone" || ev.starts_with("Apply");
                out.push(ev);
                if done {
                    return out;
                }
            }
            Err(e) => errors.push(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_over_https() {
    let pki = Pki::new();
    let h = kube_api_double::Double::start(Options {
        tls: Some(Tls::Pem {
            cert: pki.cert_pem.clone(),
            key: pki.key_pem.clone(),
        }),
        watch_history: 3,
        bookmark_interval: Duration::from_millis(200),
        ..rbac_options()
    })
    .await
    .unwrap();
    assert!(h.url().starts_with("https://127.0.0.1:"));
    let admin = kube_client(&h.url(), &pki.ca_pem, ADMIN).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for (name, cidr, team) in [("a", "10.244.1.0/24", "x"), ("b", "10.244.2.0/24", "y")] {
        let n: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"team": team}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }

    // Typed get, list and status patches.
    let a = nodes.get("a").await.unwrap();
    assert_eq!(
        a.spec.as_ref().unwrap().pod_cidr.as_deref(),
        Some("10.244.1.0/24")
    );
    let list = nodes.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.continue_.is_some());
    let list = nodes
        .list(&ListParams::default().match_any())
        .await
        .unwrap();
    assert_eq!(list.items.len(), 2);
    let patched = nodes
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "172.16.1.12"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.annotations.unwrap()["flannel.alpha.coreos.com/public-ip"],
        "172.16.1.12"
    );
    let patched = nodes
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.status.unwrap().conditions.unwrap()[0]
            .reason
            .as_deref(),
        Some("FlannelIsUp")
    );
    let err = nodes.get("missing").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );

    // kube-runtime's watcher: list + watch of the Nodes labelled team=x.
    let cfg = watcher::Config::default()
        .labels("team=x")
        .any_semantic()
        .timeout(1);
    let mut events = run_watcher(nodes.clone(), cfg);
    let mut errors = Vec::new();
    assert_eq!(
        next_events(&mut events, &mut errors).await,
        ["Init", "InitApply(a)", "InitDone"]
    );

    // More writes than the history holds, none for this watcher: the
    // bookmarks keep its resourceVersion current, so when its watch times
    // out (every second) it resumes without a 410 and without listing again.
    for i in 0..6 {
        nodes
            .patch(
                "b",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"i": i.to_string()}}})),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    nodes
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"seen": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        next_events(&mut events, &mut errors).await,
        ["Apply(a)"],
        "errors: {errors:?}"
    );
    assert!(errors.is_empty(), "resumed without errors: {errors:?}");

    // A compaction ends its watch; resuming is 410: it lists again.
    h.compact();
    assert_eq!(
        next_events(&mut events, &mut errors).await,
        ["Init", "InitApply(a)", "InitDone"]
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version")),
        "the 410 reached the watcher: {errors:?}"
    );

    // flanneld's user with upstream's role: get/list/watch Nodes, patch their status only.
    let flannel = kube_client(&h.url(), &pki.ca_pem, FLANNEL).await;
    let fnodes: Api<Node> = Api::all(flannel);
    let err = fnodes.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err:?}"
    );
}
