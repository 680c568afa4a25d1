//! Test helpers: a raw HTTP client for the double (status codes, bodies,
//! watch streams as kube-apiserver sends them) and the standard tokens.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use kube_api_double::{AuthorizationMode, Double, Handle, Options, TokenUser, UserInfo};
use serde_json::Value;

pub const ADMIN: &str = "admin-token";
pub const FLANNEL: &str = "flannel-token";
pub const BOB: &str = "bob-token";
pub const FLANNEL_USER: &str = "system:serviceaccount:kube-flannel:flannel";
pub const SMP: &str = "application/strategic-merge-patch+json";
pub const MERGE: &str = "application/merge-patch+json";
pub const JSON_PATCH: &str = "application/json-patch+json";

/// The tokens of the recorded scenario: an admin, flanneld's service
/// account (groups as recorded), a user without roles.
pub fn tokens() -> Vec<TokenUser> {
    let mut flannel = UserInfo::new(
        FLANNEL_USER,
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:kube-flannel",
        ],
    );
    flannel.uid = "uid-flannel".into();
    vec![
        TokenUser::new(ADMIN, UserInfo::new("admin", &["system:masters"])),
        TokenUser::new(FLANNEL, flannel),
        TokenUser::new(BOB, UserInfo::new("bob", &[])),
    ]
}

/// Options with the tokens and RBAC on.
pub fn rbac_options() -> Options {
    Options {
        tokens: tokens(),
        authorization: AuthorizationMode::Rbac,
        ..Options::default()
    }
}

pub async fn start(opts: Options) -> (Handle, Client) {
    let h = Double::start(opts).await.expect("double starts");
    let c = Client::new(&h.url());
    (h, c)
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    base: String,
    user_agent: String,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
            base: base.to_string(),
            user_agent: "kube-api-double-tests".into(),
        }
    }

    /// The same client, sending this User-Agent.
    pub fn with_user_agent(&self, ua: &str) -> Client {
        Client {
            user_agent: ua.to_string(),
            ..self.clone()
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("user-agent", self.user_agent.as_str());
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        b.body(Full::new(Bytes::from(body))).expect("valid request")
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Resp {
        let resp = self
            .inner
            .request(self.request(method, path, token, content_type, body))
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.send("GET", path, Some(token), None, Vec::new()).await
    }

    async fn send_json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        ct: &str,
        body: &Value,
    ) -> Resp {
        self.send(
            method,
            path,
            Some(token),
            Some(ct),
            body.to_string().into_bytes(),
        )
        .await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.send_json("POST", path, token, "application/json", body)
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.send_json("PUT", path, token, "application/json", body)
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, content_type: &str, body: &Value) -> Resp {
        self.send_json("PATCH", path, token, content_type, body)
            .await
    }

    /// Creates a Node as the admin.
    pub async fn create_node(&self, body: &Value) -> Resp {
        self.post("/api/v1/nodes", ADMIN, body).await
    }

    /// A strategic merge patch as the admin.
    pub async fn smp(&self, path: &str, body: &Value) -> Resp {
        self.patch(path, ADMIN, SMP, body).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.send("DELETE", path, Some(token), None, Vec::new())
            .await
    }

    /// Starts a watch; panics unless the answer is 200.
    pub async fn watch(&self, path: &str, token: &str) -> Watch {
        let resp = self
            .inner
            .request(self.request("GET", path, Some(token), None, Vec::new()))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "watch {path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        Watch {
            body: resp.into_body(),
            buf: Vec::new(),
            ended: false,
        }
    }
}

/// A watch stream, read line by line.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    pub ended: bool,
}

impl Watch {
    /// The next event, `None` when the stream ended or nothing came in `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON event per line"));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) => self.ended = true,
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Ok(Some(Err(_))) => self.ended = true,
            }
        }
    }

    /// The next event that is not a bookmark.
    pub async fn next_change(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let ev = self.next(wait).await?;
            if ev["type"] != "BOOKMARK" {
                return Some(ev);
            }
        }
    }
}

/// A Node as an admin creates it.
pub fn node(name: &str, cidr: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}
    })
}

/// A test CA and a serving certificate for 127.0.0.1 / localhost.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kube-api-double test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A kube client for `url` trusting `ca_pem`, authenticating with `token`.
pub async fn kube_client(url: &str, ca_pem: &str, token: &str) -> kube::Client {
    use base64::Engine;
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let b64 = base64::engine::general_purpose::STANDARD;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: double\n    user: u\ncurrent-context: c\n",
        b64.encode(ca_pem)
    );
    let kc = Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}
