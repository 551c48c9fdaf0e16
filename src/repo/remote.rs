//! A repository served by `stasis repo serve`, reached over HTTP (`http://HOST:PORT`).
//!
//! The client opens a session with the access key (`STASIS_REPO_KEY`) and sends the session's
//! token with every request. An upload (a swapout) gets a session of its own; reads share a
//! download session, reopened when it expires or the server restarted. Every chunk read is
//! checked against its hash here too: a damaged one is an error, never data.

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::StatusCode;

use super::token::Scope;
use super::{now_secs, wire, ChunkHash, Kind, Manifest, ManifestInfo, RepoError, RepoStat};

/// The environment variable that holds the access key of a served repository.
pub const KEY_ENV: &str = "STASIS_REPO_KEY";
/// A session this close to its expiry is replaced before use.
const RENEW_MARGIN_SECS: u64 = 60;

#[derive(Clone)]
struct Session {
    id: String,
    token: String,
    expires_at: u64,
    /// The server hands out direct upload URLs (its repository has S3 bricks); a server
    /// that does not say so gets every chunk itself.
    direct_upload: bool,
}

pub struct RemoteRepo {
    base: String,
    access_key: String,
    http: Client,
    download: Mutex<Option<Session>>,
    upload: Mutex<Option<Session>>,
}

/// The error and its causes: reqwest's own message says only that a request failed, the
/// cause says why (refused, a certificate not trusted, a timeout).
fn remote_err(what: &str, e: reqwest::Error) -> RepoError {
    let mut msg = format!("{what}: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    RepoError::Remote(msg)
}

impl RemoteRepo {
    /// `access_key`: the repository's access key; None takes it from `STASIS_REPO_KEY`.
    pub fn open(url: &str, access_key: Option<&str>) -> Result<RemoteRepo, RepoError> {
        let base = url.trim_end_matches('/').to_string();
        let access_key = match access_key {
            Some(k) => k.to_string(),
            None => std::env::var(KEY_ENV).map_err(|_| {
                RepoError::Usage(format!(
                    "{url} is a served repository: set {KEY_ENV} to its access key (the file \
                     access.key in the server's data directory)"
                ))
            })?,
        };
        let mut builder = Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300));
        // TLS only for https://: loading the system's roots costs every client, and a bad
        // STASIS_REPO_CA must not break a plain repository.
        if base.starts_with("https://") {
            super::tls::install_provider();
            builder = builder.use_rustls_tls();
            for cert in super::tls::extra_roots()? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| remote_err(url, e))?;
        let repo = RemoteRepo {
            base,
            access_key: access_key.trim().to_string(),
            http,
            download: Mutex::new(None),
            upload: Mutex::new(None),
        };
        // Fails early on a wrong key or an unreachable server.
        repo.session(Scope::Download, false)?;
        Ok(repo)
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn open_session(&self, scope: Scope) -> Result<Session, RepoError> {
        let resp = self
            .http
            .post(format!("{}/v1/sessions", self.base))
            .bearer_auth(&self.access_key)
            .body(serde_json::json!({"scope": scope.as_str()}).to_string())
            .send()
            .map_err(|e| remote_err(&self.base, e))?;
        let v: serde_json::Value = serde_json::from_slice(&read_ok(resp)?)
            .map_err(|e| RepoError::Remote(format!("bad session reply: {e}")))?;
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        match (
            text("session"),
            text("token"),
            v.get("expires_at").and_then(|x| x.as_u64()),
        ) {
            (Some(id), Some(token), Some(expires_at)) => Ok(Session {
                id,
                token,
                expires_at,
                direct_upload: v.get("direct_upload").and_then(|x| x.as_bool()) == Some(true),
            }),
            _ => Err(RepoError::Remote(format!("bad session reply: {v}"))),
        }
    }

    /// The current session of `scope`, opened (or replaced: `fresh`) as needed.
    fn session(&self, scope: Scope, fresh: bool) -> Result<Session, RepoError> {
        let slot = match scope {
            Scope::Upload => &self.upload,
            Scope::Download => &self.download,
        };
        let mut slot = slot.lock();
        match &*slot {
            Some(s) if !fresh && s.expires_at > now_secs() + RENEW_MARGIN_SECS => Ok(s.clone()),
            _ => {
                let s = self.open_session(scope)?;
                *slot = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// Starts the upload session of one swapout.
    pub fn begin_upload(&self) -> Result<(), RepoError> {
        self.session(Scope::Upload, true).map(|_| ())
    }

    /// Sends a request built by `build(url_prefix)` with a token of `scope`; once more with
    /// a new session if the server no longer knows this one (expired, or it restarted).
    fn call(
        &self,
        scope: Scope,
        build: impl Fn(&Client, &str) -> RequestBuilder,
    ) -> Result<Vec<u8>, RepoError> {
        let mut fresh = false;
        loop {
            let s = self.session(scope, fresh)?;
            let prefix = format!("{}/v1/sessions/{}", self.base, s.id);
            let resp = build(&self.http, &prefix)
                .bearer_auth(&s.token)
                .send()
                .map_err(|e| remote_err(&self.base, e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !fresh {
                fresh = true;
                continue;
            }
            return read_ok(resp);
        }
    }

    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<bool>, RepoError> {
        let body = Bytes::from(wire::encode_hashes(hashes));
        let answer = self.call(Scope::Upload, |c, p| {
            c.post(format!("{p}/missing")).body(body.clone())
        })?;
        if answer.len() != hashes.len() {
            return Err(RepoError::Remote(format!(
                "asked about {} chunks, got {} answers",
                hashes.len(),
                answer.len()
            )));
        }
        Ok(answer.into_iter().map(|b| b != 0).collect())
    }

    /// Stores chunks: those whose brick is an S3 bucket straight into it, through presigned
    /// URLs the server hands out (then the server checks and indexes them); the rest through
    /// the server.
    pub fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        if !self.session(Scope::Upload, false)?.direct_upload {
            return self.put_through_server(chunks);
        }
        let hashes: Vec<ChunkHash> = chunks.iter().map(|c| c.0).collect();
        let body = Bytes::from(wire::encode_hashes(&hashes));
        let reply = self.call(Scope::Upload, |c, p| {
            c.post(format!("{p}/upload-urls")).body(body.clone())
        })?;
        #[derive(serde::Deserialize)]
        struct Urls {
            urls: Vec<Option<String>>,
        }
        let urls: Urls = serde_json::from_slice(&reply)
            .map_err(|e| RepoError::Remote(format!("bad upload-urls reply: {e}")))?;
        if urls.urls.len() != chunks.len() {
            return Err(RepoError::Remote(format!(
                "asked for {} upload URLs, got {}",
                chunks.len(),
                urls.urls.len()
            )));
        }
        let mut through_server = Vec::new();
        let mut direct = Vec::new();
        for (chunk, url) in chunks.iter().zip(urls.urls) {
            let Some(url) = url else {
                through_server.push(*chunk);
                continue;
            };
            // Stored as a brick stores it (zstd when that pays): the server reads it back
            // and checks it against the hash before indexing it.
            let stored = Bytes::from(super::brick::encode(chunk.1).into_owned());
            let resp = self
                .http
                .put(&url)
                .body(stored)
                .send()
                .map_err(|e| remote_err("the bucket", e))?;
            if !resp.status().is_success() {
                return Err(RepoError::Remote(format!(
                    "the bucket refused chunk {}: HTTP {}",
                    chunk.0,
                    resp.status()
                )));
            }
            direct.push(chunk.0);
        }
        if !direct.is_empty() {
            let body = Bytes::from(wire::encode_hashes(&direct));
            self.call(Scope::Upload, |c, p| {
                c.post(format!("{p}/uploaded")).body(body.clone())
            })?;
        }
        if !through_server.is_empty() {
            self.put_through_server(&through_server)?;
        }
        Ok(())
    }

    /// Sends chunks to the server, which checks and stores them.
    fn put_through_server(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), RepoError> {
        let body = Bytes::from(wire::encode_chunks(chunks));
        self.call(Scope::Upload, |c, p| {
            c.post(format!("{p}/chunks")).body(body.clone())
        })
        .map(drop)
    }

    /// A chunk, checked against its hash. The server may redirect to a presigned URL of its
    /// S3 brick (the bytes then come from the bucket as stored, perhaps compressed).
    pub fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, RepoError> {
        let data = self.call(Scope::Download, |c, p| {
            c.get(format!("{p}/chunks/{}?direct=1", hash.to_hex()))
        })?;
        super::brick::decode(hash, data, || format!("chunk {hash} from {}", self.base))
    }

    pub fn commit(&self, m: &Manifest) -> Result<(), RepoError> {
        let body = Bytes::from(m.encode());
        self.call(Scope::Upload, |c, p| {
            c.post(format!("{p}/commit")).body(body.clone())
        })
        .map(|_| ())
    }

    pub fn find(&self, kind: Kind, name: &str) -> Result<Option<Manifest>, RepoError> {
        match self.call(Scope::Download, |c, p| {
            c.get(format!(
                "{p}/manifests/{}/{}",
                kind.as_str(),
                encode_segment(name)
            ))
        }) {
            Ok(bytes) => Manifest::decode(&bytes).map(Some),
            Err(RepoError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes manifests (see [`super::Repo::remove`]); authorized by the access key.
    pub fn remove(&self, what: &super::Removal) -> Result<Vec<(Kind, String)>, RepoError> {
        let resp = self
            .http
            .post(format!("{}/v1/remove", self.base))
            .bearer_auth(&self.access_key)
            .body(serde_json::to_vec(what).expect("a removal serializes"))
            .send()
            .map_err(|e| remote_err(&self.base, e))?;
        #[derive(serde::Deserialize)]
        struct Removed {
            kind: Kind,
            name: String,
        }
        #[derive(serde::Deserialize)]
        struct Reply {
            removed: Vec<Removed>,
        }
        let reply: Reply = serde_json::from_slice(&read_ok(resp)?)
            .map_err(|e| RepoError::Remote(format!("bad remove reply: {e}")))?;
        Ok(reply
            .removed
            .into_iter()
            .map(|r| (r.kind, r.name))
            .collect())
    }

    pub fn list(&self) -> Result<Vec<(ManifestInfo, u64)>, RepoError> {
        let body = self.call(Scope::Download, |c, p| c.get(format!("{p}/list")))?;
        #[derive(serde::Deserialize)]
        struct Item {
            info: ManifestInfo,
            entries: u64,
        }
        let items: Vec<Item> = serde_json::from_slice(&body)
            .map_err(|e| RepoError::Remote(format!("bad list reply: {e}")))?;
        Ok(items.into_iter().map(|i| (i.info, i.entries)).collect())
    }

    pub fn stat(&self) -> Result<RepoStat, RepoError> {
        let body = self.call(Scope::Download, |c, p| c.get(format!("{p}/stat")))?;
        serde_json::from_slice(&body).map_err(|e| RepoError::Remote(format!("bad stat reply: {e}")))
    }
}

/// A manifest name as one URL path segment (names may hold any character but '/').
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The body of a successful reply, or the server's error as the matching `RepoError`.
fn read_ok(resp: reqwest::blocking::Response) -> Result<Vec<u8>, RepoError> {
    let status = resp.status();
    let body = resp
        .bytes()
        .map_err(|e| RepoError::Remote(format!("reading a reply: {e}")))?;
    if status.is_success() {
        return Ok(Vec::from(body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let msg = v
        .get("error")
        .and_then(|e| e.as_str())
        .map_or_else(|| format!("HTTP {status}"), str::to_string);
    Err(match v.get("kind").and_then(|k| k.as_str()) {
        Some("not_found") => RepoError::NotFound(msg),
        Some("exists") => RepoError::Exists(msg),
        Some("usage") => RepoError::Usage(msg),
        Some("denied") => RepoError::Denied(msg),
        _ => RepoError::Remote(format!("server: {msg}")),
    })
}
