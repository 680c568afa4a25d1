//! Persistence in etcd (`--etcd-servers`), laid out as kube-apiserver lays
//! out its JSON storage: one key per object under the prefix, in the
//! directory kube-apiserver uses for the resource (`minions` for nodes),
//! the value the object's JSON with `kind`/`apiVersion` and without
//! `metadata.resourceVersion`, which is the key's mod revision.
//!
//! (`etcdctl get --prefix /registry/minions/` shows the Nodes.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient,
    TlsOptions, Txn, TxnOp,
};
use serde_json::Value;

use crate::resources::Kind;
use crate::store::StoredObject;
use crate::Error;

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs (`http://127.0.0.1:2379`, `https://...`).
    pub endpoints: Vec<String>,
    /// Key prefix (kube-apiserver's `--etcd-prefix`, default `/registry`).
    pub prefix: String,
    /// `--etcd-cafile`: CA of the etcd server certificates.
    pub ca_file: Option<PathBuf>,
    /// `--etcd-certfile` / `--etcd-keyfile`: client certificate.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// Plain-HTTP endpoints with the default prefix.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: "/registry".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// The result of a guarded write.
pub enum TxnOutcome {
    /// Written at this revision.
    Done(u64),
    /// The key was not at the expected revision; what it holds now.
    Failed(Option<Arc<StoredObject>>),
}

/// A connected etcd.
#[derive(Clone)]
pub struct EtcdBackend {
    kv: KvClient,
    prefix: String,
}

fn etcd_err(what: &str, e: etcd_client::Error) -> Error {
    Error::Etcd(format!("{what}: {e}"))
}

impl EtcdBackend {
    /// Connects and checks that etcd answers.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdBackend, Error> {
        let mut copts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        if opts.ca_file.is_some() || opts.cert_file.is_some() {
            let read = |flag: &str, p: &PathBuf| {
                std::fs::read(p).map_err(|e| Error::Config(format!("{flag} {}: {e}", p.display())))
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("--etcd-cafile", ca)?));
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("--etcd-certfile", c)?,
                        read("--etcd-keyfile", k)?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(Error::Config(
                        "--etcd-certfile and --etcd-keyfile go together".into(),
                    ))
                }
            }
            copts = copts.with_tls(tls);
        }
        let client = Client::connect(&opts.endpoints, Some(copts))
            .await
            .map_err(|e| {
                etcd_err(
                    &format!("cannot connect to etcd at {}", opts.endpoints.join(",")),
                    e,
                )
            })?;
        let mut kv = client.kv_client();
        // The connection is lazy: prove that a member answers.
        kv.get("health", None).await.map_err(|e| {
            etcd_err(
                &format!("etcd at {} does not answer", opts.endpoints.join(",")),
                e,
            )
        })?;
        Ok(EtcdBackend {
            kv,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
        })
    }

    fn key(&self, kind: Kind, key: &str) -> String {
        format!("{}/{}/{}", self.prefix, kind.etcd_dir(), key)
    }

    fn encode(kind: Kind, value: &Value) -> Vec<u8> {
        let mut v = value.clone();
        if let Value::Object(m) = &mut v {
            m.insert("apiVersion".into(), kind.api_version().into());
            m.insert("kind".into(), kind.kind().into());
            if let Some(Value::Object(meta)) = m.get_mut("metadata") {
                meta.remove("resourceVersion");
            }
        }
        serde_json::to_vec(&v).expect("JSON values serialize")
    }

    fn decode(kind: Kind, bytes: &[u8], rev: i64) -> Option<Arc<StoredObject>> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        Some(StoredObject::new(kind, v, rev as u64))
    }

    /// Every object under the prefix and the current revision.
    pub async fn load(&self) -> Result<(u64, Vec<Arc<StoredObject>>), Error> {
        let mut kv = self.kv.clone();
        let prefix = format!("{}/", self.prefix);
        let resp = kv
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_err("cannot read the objects from etcd", e))?;
        let revision = resp.header().map_or(0, |h| h.revision()) as u64;
        let mut objects = Vec::new();
        for kvp in resp.kvs() {
            let Ok(key) = kvp.key_str() else { continue };
            let rest = &key[prefix.len()..];
            let Some((dir, _)) = rest.split_once('/') else {
                continue;
            };
            let Some(kind) = Kind::ALL.iter().copied().find(|k| k.etcd_dir() == dir) else {
                continue;
            };
            match Self::decode(kind, kvp.value(), kvp.mod_revision()) {
                Some(o) => objects.push(o),
                None => tracing::warn!(key, "skipping an etcd value that is not JSON"),
            }
        }
        Ok((revision, objects))
    }

    async fn current(&self, kind: Kind, key: &str) -> Result<Option<Arc<StoredObject>>, Error> {
        let mut kv = self.kv.clone();
        let resp = kv
            .get(self.key(kind, key), None)
            .await
            .map_err(|e| etcd_err("cannot read from etcd", e))?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kvp| Self::decode(kind, kvp.value(), kvp.mod_revision())))
    }

    async fn txn(&self, kind: Kind, key: &str, txn: Txn) -> Result<TxnOutcome, Error> {
        let mut kv = self.kv.clone();
        let resp = kv
            .txn(txn)
            .await
            .map_err(|e| etcd_err("cannot write to etcd", e))?;
        if resp.succeeded() {
            Ok(TxnOutcome::Done(
                resp.header().map_or(0, |h| h.revision()) as u64
            ))
        } else {
            Ok(TxnOutcome::Failed(self.current(kind, key).await?))
        }
    }

    /// Creates the key if it does not exist.
    pub async fn create(&self, kind: Kind, key: &str, value: &Value) -> Result<TxnOutcome, Error> {
        let k = self.key(kind, key);
        let txn = Txn::new()
            .when([Compare::create_revision(k.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.as_str(), Self::encode(kind, value), None)]);
        self.txn(kind, key, txn).await
    }

    /// Replaces the value if the key is still at `rev`.
    pub async fn update(
        &self,
        kind: Kind,
        key: &str,
        value: &Value,
        rev: u64,
    ) -> Result<TxnOutcome, Error> {
        let k = self.key(kind, key);
        let put = TxnOp::put(k.as_str(), Self::encode(kind, value), None);
        self.guarded(kind, key, &k, rev, put).await
    }

    /// Runs `op` on the key if it is still at `rev`.
    async fn guarded(
        &self,
        kind: Kind,
        key: &str,
        k: &str,
        rev: u64,
        op: TxnOp,
    ) -> Result<TxnOutcome, Error> {
        let txn = Txn::new()
            .when([Compare::mod_revision(k, CompareOp::Equal, rev as i64)])
            .and_then([op]);
        self.txn(kind, key, txn).await
    }

    /// Writes the double's compaction marker (a new revision that no
    /// object has) and compacts etcd up to it, as kube-apiserver's
    /// periodic compaction would: older revisions can no longer be read.
    pub async fn bump_and_compact(&self) -> Result<u64, Error> {
        let mut kv = self.kv.clone();
        let resp = kv
            .put(
                format!("{}/kube-api-double/compaction", self.prefix),
                "{}",
                None,
            )
            .await
            .map_err(|e| etcd_err("cannot write to etcd", e))?;
        let rev = resp.header().map_or(0, |h| h.revision());
        kv.compact(rev, None)
            .await
            .map_err(|e| etcd_err("cannot compact etcd", e))?;
        Ok(rev as u64)
    }

    /// The objects of a resource at an older revision (a paged list
    /// continuing from before the double started); `None` once etcd has
    /// compacted that revision away.
    pub async fn objects_at(
        &self,
        kind: Kind,
        rev: u64,
    ) -> Result<Option<Vec<Arc<StoredObject>>>, Error> {
        let mut kv = self.kv.clone();
        let prefix = format!("{}/{}/", self.prefix, kind.etcd_dir());
        let resp = kv
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_revision(rev as i64)),
            )
            .await;
        match resp {
            Ok(r) => Ok(Some(
                r.kvs()
                    .iter()
                    .filter_map(|kvp| Self::decode(kind, kvp.value(), kvp.mod_revision()))
                    .collect(),
            )),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok(None),
            Err(e) => Err(etcd_err("cannot read from etcd", e)),
        }
    }

    /// Deletes the key if it is still at `rev`.
    pub async fn delete(&self, kind: Kind, key: &str, rev: u64) -> Result<TxnOutcome, Error> {
        let k = self.key(kind, key);
        let del = TxnOp::delete(k.as_str(), None);
        self.guarded(kind, key, &k, rev, del).await
    }
}
