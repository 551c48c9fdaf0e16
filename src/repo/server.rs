//! `stasis repo serve`: a repository served over HTTP to other nodes.
//!
//! The metadata service and the data brick endpoints run in one process over one local
//! repository. A client opens a session with the repository's access key and gets a token
//! (HMAC-signed, scoped to that session, expiring: [`super::token`]); every other request
//! carries it. Uploaded chunks are checked against their hash before they are stored.
//! Protocol: kernel-notes/formats.md, "Repository over HTTP".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use parking_lot::Mutex;

use super::token::{Claims, Scope, TokenKey};
use super::{now_secs, wire, ChunkHash, Kind, Manifest, Repo, RepoError};

/// Largest request body: a batch of uploads (the client sends about 4 MiB per batch).
const MAX_BODY: usize = 64 << 20;
pub const ACCESS_KEY_FILE: &str = "access.key";
const TOKEN_KEY_FILE: &str = "token.key";
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

struct ServerState {
    repo: Repo,
    key: TokenKey,
    /// The access key's hash: compared in constant time (blake3::Hash's `==`).
    access: blake3::Hash,
    ttl: u64,
    /// Open sessions and when they expire.
    sessions: Mutex<HashMap<[u8; 16], u64>>,
}

/// An error reply: `{"error": "...", "kind": "..."}` with a status that says what it is.
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.2, "kind": self.1}).to_string();
        (self.0, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        let (status, kind) = match &e {
            RepoError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RepoError::Exists(_) => (StatusCode::CONFLICT, "exists"),
            RepoError::Usage(_) | RepoError::BadManifest(_) => (StatusCode::BAD_REQUEST, "usage"),
            RepoError::BadChunk { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "bad_chunk"),
            RepoError::MissingChunks { .. } => (StatusCode::CONFLICT, "missing_chunks"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("repo serve: {e}");
        }
        ApiError(status, kind, e.to_string())
    }
}

fn denied(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, "denied", why.into())
}

fn bad_request(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "usage", why.into())
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| denied("no token (Authorization: Bearer ...)"))
}

impl ServerState {
    /// The request's credential must be the access key itself (hashes compared in constant
    /// time: blake3::Hash's `==`).
    fn check_access(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if blake3::hash(bearer(headers)?.as_bytes()) != self.access {
            return Err(denied("wrong access key"));
        }
        Ok(())
    }

    /// The request's token must verify, name this session (`id`, from the URL), be one the
    /// server opened and still holds, and allow `need`.
    fn authorize(&self, headers: &HeaderMap, id: &str, need: Scope) -> Result<Claims, ApiError> {
        let claims = self
            .key
            .verify(bearer(headers)?, now_secs())
            .map_err(|e| denied(e.to_string()))?;
        if hex::encode(claims.session) != id {
            return Err(denied("token belongs to another session"));
        }
        if !self.sessions.lock().contains_key(&claims.session) {
            return Err(denied(
                "unknown or ended session (the server restarted?): open a new one",
            ));
        }
        if need == Scope::Upload && claims.scope != Scope::Upload {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "denied",
                "a download token cannot upload or commit".into(),
            ));
        }
        Ok(claims)
    }
}

/// A request of session `/v1/sessions/{id}/...` whose token was checked for that session
/// and for upload (`UPLOAD`) or any access: what every session endpoint takes first.
struct Authorized<const UPLOAD: bool> {
    state: Arc<ServerState>,
    claims: Claims,
}

type CanUpload = Authorized<true>;
type CanRead = Authorized<false>;

impl<const UPLOAD: bool> axum::extract::FromRequestParts<Arc<ServerState>> for Authorized<UPLOAD> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<ServerState>,
    ) -> Result<Self, ApiError> {
        // The routes put the session id third: /v1/sessions/{id}/...
        let id = parts.uri.path().split('/').nth(3).unwrap_or_default();
        let need = if UPLOAD {
            Scope::Upload
        } else {
            Scope::Download
        };
        let claims = state.authorize(&parts.headers, id, need)?;
        Ok(Authorized {
            state: state.clone(),
            claims,
        })
    }
}

impl<const UPLOAD: bool> Authorized<UPLOAD> {
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Repo) -> Result<T, RepoError> + Send + 'static,
    ) -> Result<T, ApiError> {
        run_blocking(&self.state, f).await
    }
}

/// Runs a repository call off the async workers (the repository does blocking I/O).
async fn run_blocking<T: Send + 'static>(
    state: &Arc<ServerState>,
    f: impl FnOnce(&Repo) -> Result<T, RepoError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state.repo))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "failed", e.to_string()))?
        .map_err(ApiError::from)
}

fn json(v: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn open_session(
    State(st): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.check_access(&headers)?;
    let req: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("not JSON: {e}")))?;
    let scope = req
        .get("scope")
        .and_then(|s| s.as_str())
        .and_then(Scope::parse)
        .ok_or_else(|| bad_request("\"scope\" must be \"upload\" or \"download\""))?;
    let now = now_secs();
    let claims = Claims {
        session: rand_bytes()?,
        scope,
        expires_at: now + st.ttl,
    };
    {
        let mut sessions = st.sessions.lock();
        sessions.retain(|_, expires_at| *expires_at > now);
        sessions.insert(claims.session, claims.expires_at);
    }
    tracing::debug!(session = %hex::encode(claims.session), scope = scope.as_str(), "session opened");
    Ok(json(serde_json::json!({
        "session": hex::encode(claims.session),
        "scope": scope.as_str(),
        "token": st.key.mint(&claims),
        "expires_at": claims.expires_at,
        // Whether `upload-urls` can give direct URLs: else clients skip asking.
        "direct_upload": st.repo.has_s3_bricks(),
    })))
}

async fn end_session(auth: CanRead) -> Response {
    auth.state.sessions.lock().remove(&auth.claims.session);
    StatusCode::NO_CONTENT.into_response()
}

async fn missing(auth: CanUpload, body: Bytes) -> Result<Response, ApiError> {
    let hashes = wire::decode_hashes(&body).map_err(bad_request)?;
    let missing = auth.run(move |r| r.missing(&hashes)).await?;
    Ok(missing
        .into_iter()
        .map(u8::from)
        .collect::<Vec<u8>>()
        .into_response())
}

async fn put_chunks(auth: CanUpload, body: Bytes) -> Result<Response, ApiError> {
    auth.run(move |r| {
        let chunks = wire::decode_chunks(&body).map_err(RepoError::Usage)?;
        // Held while storing and indexing, as a local swapout holds it: gc waits.
        let _lock = r.upload_lock()?;
        r.put_chunks(&chunks)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
struct ChunkQuery {
    /// `direct=1`: the client can fetch from the bucket itself (a redirect is welcome).
    #[serde(default)]
    direct: u8,
}

async fn get_chunk(
    auth: CanRead,
    UrlPath((_, hash)): UrlPath<(String, String)>,
    Query(q): Query<ChunkQuery>,
) -> Result<Response, ApiError> {
    let hash = ChunkHash::from_hex(&hash).ok_or_else(|| bad_request("bad chunk hash"))?;
    enum Reply {
        Bytes(Vec<u8>),
        Redirect(String),
    }
    let direct = q.direct == 1;
    let reply = auth
        .run(move |r| {
            // A chunk in an S3 brick: the node fetches it from the bucket, not through us.
            // No URL (or none could be signed): the chunk comes through us.
            if direct {
                if let Ok(Some(url)) = r.download_url(&hash) {
                    return Ok(Reply::Redirect(url));
                }
            }
            r.get_chunk(&hash).map(Reply::Bytes)
        })
        .await?;
    Ok(match reply {
        Reply::Bytes(bytes) => bytes.into_response(),
        Reply::Redirect(url) => {
            tracing::debug!(chunk = %hash, "redirected to its bucket");
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, url)]).into_response()
        }
    })
}

/// Presigned PUT URLs for chunks whose brick is S3 (null for the others, which are uploaded
/// to `chunks`). Body: a hash list (10.6.4); reply: `{"urls": [URL | null, ...]}`.
async fn upload_urls(auth: CanUpload, body: Bytes) -> Result<Response, ApiError> {
    let hashes = wire::decode_hashes(&body).map_err(bad_request)?;
    let session = hex::encode(auth.claims.session);
    let urls = auth.run(move |r| r.upload_urls(&session, &hashes)).await?;
    Ok(json(serde_json::json!({ "urls": urls })))
}

/// The chunks a node put in the bucket through those URLs: read back, checked, indexed.
async fn uploaded(auth: CanUpload, body: Bytes) -> Result<Response, ApiError> {
    let hashes = wire::decode_hashes(&body).map_err(bad_request)?;
    let count = hashes.len();
    let session = hex::encode(auth.claims.session);
    auth.run(move |r| {
        // Held while checking and indexing, as for an upload through us: gc waits.
        let _lock = r.upload_lock()?;
        r.take_uploaded(&session, &hashes)
    })
    .await?;
    tracing::debug!(
        chunks = count,
        "indexed chunks stored straight into the bucket"
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_manifest(
    auth: CanRead,
    UrlPath((_, kind, name)): UrlPath<(String, String, String)>,
) -> Result<Response, ApiError> {
    let kind = Kind::parse(&kind)
        .ok_or_else(|| bad_request("manifest kind must be disk, image, file, vm or experiment"))?;
    match auth.run(move |r| r.find(kind, &name)).await? {
        Some(m) => Ok(m.encode().into_response()),
        None => Err(RepoError::NotFound("no such manifest".into()).into()),
    }
}

async fn commit(auth: CanUpload, body: Bytes) -> Result<Response, ApiError> {
    let m = Manifest::decode(&body)?;
    auth.run(move |r| {
        let _lock = r.upload_lock()?;
        r.commit(&m)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `repo rm` against a served repository: not a swap session's business, so it takes the
/// access key itself, as opening a session does. Body: `{"names": [...], "kind": K|null,
/// "with_parts": bool, "in_use": [...]}`; reply: `{"removed": [{"kind": K, "name": N}, ...]}`.
async fn remove(
    State(st): State<Arc<ServerState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.check_access(&headers)?;
    let req: super::Removal = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("bad remove request: {e}")))?;
    let removed = run_blocking(&st, move |r| r.remove(&req)).await?;
    let removed: Vec<_> = removed
        .into_iter()
        .map(|(kind, name)| serde_json::json!({"kind": kind, "name": name}))
        .collect();
    Ok(json(serde_json::json!({ "removed": removed })))
}

async fn list(auth: CanRead) -> Result<Response, ApiError> {
    let list = auth.run(|r| r.list()).await?;
    let v: Vec<_> = list
        .into_iter()
        .map(|(info, entries)| serde_json::json!({"info": info, "entries": entries}))
        .collect();
    Ok(json(serde_json::Value::Array(v)))
}

async fn stat(auth: CanRead) -> Result<Response, ApiError> {
    let stat = auth.run(|r| r.stat()).await?;
    Ok(json(serde_json::to_value(stat).unwrap_or_default()))
}

fn rand_bytes<const N: usize>() -> Result<[u8; N], RepoError> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| RepoError::io(Path::new("/dev/urandom"), e))?;
    Ok(b)
}

/// Reads the key file, or creates it (mode 0600) with `make()`'s bytes.
fn key_file(
    path: &Path,
    make: impl FnOnce() -> Result<Vec<u8>, RepoError>,
) -> Result<Vec<u8>, RepoError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = make()?;
            super::write_durably(path, &bytes, 0o600)?;
            Ok(bytes)
        }
        Err(e) => Err(RepoError::io(path, e)),
    }
}

/// What `serve` was started with.
pub struct ServeOptions {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub token_ttl_secs: u64,
    /// Serve https:// with this certificate and key; None: plain http://.
    pub tls: Option<super::tls::TlsFiles>,
}

/// Serves the repository at `opts.data` (created if new) until `stop` resolves. `ready` is
/// called with the URL clients use (`http://` or `https://` and the bound address) and the
/// access key file once clients can connect.
pub fn serve(
    opts: &ServeOptions,
    ready: impl FnOnce(&str, &Path),
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RepoError> {
    // Checked before anything is created: a bad certificate is wrong use.
    let tls = opts.tls.as_ref().map(super::tls::acceptor).transpose()?;
    let repo = Repo::open(&opts.data.display().to_string())?;
    let access_path = opts.data.join(ACCESS_KEY_FILE);
    let access = key_file(&access_path, || {
        Ok(format!("{}\n", hex::encode(rand_bytes::<32>()?)).into_bytes())
    })?;
    let access = String::from_utf8_lossy(&access).trim().to_string();
    if access.len() < 16 {
        return Err(RepoError::Usage(format!(
            "{}: an access key needs at least 16 characters",
            access_path.display()
        )));
    }
    let token_key = key_file(&opts.data.join(TOKEN_KEY_FILE), || {
        rand_bytes::<32>().map(|b| b.to_vec())
    })?;
    let token_key: [u8; 32] = token_key.try_into().map_err(|_| RepoError::Meta {
        path: opts.data.join(TOKEN_KEY_FILE),
        why: "not 32 bytes".into(),
    })?;
    let state = Arc::new(ServerState {
        repo,
        key: TokenKey::from_bytes(token_key),
        access: blake3::hash(access.as_bytes()),
        ttl: opts.token_ttl_secs.max(1),
        sessions: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/v1/sessions", post(open_session))
        .route("/v1/remove", post(remove))
        .route("/v1/sessions/{id}", delete(end_session))
        .route("/v1/sessions/{id}/missing", post(missing))
        .route("/v1/sessions/{id}/chunks", post(put_chunks))
        .route("/v1/sessions/{id}/chunks/{hash}", get(get_chunk))
        .route("/v1/sessions/{id}/upload-urls", post(upload_urls))
        .route("/v1/sessions/{id}/uploaded", post(uploaded))
        .route(
            "/v1/sessions/{id}/manifests/{kind}/{name}",
            get(get_manifest),
        )
        .route("/v1/sessions/{id}/commit", post(commit))
        .route("/v1/sessions/{id}/list", get(list))
        .route("/v1/sessions/{id}/stat", get(stat))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| RepoError::io(&opts.data, e))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|e| RepoError::Usage(format!("listen on {}: {e}", opts.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RepoError::io(&opts.data, e))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        ready(&format!("{scheme}://{addr}"), &access_path);
        match tls {
            Some(acceptor) => {
                let listener = super::tls::TlsListener::new(listener, acceptor)
                    .map_err(|e| RepoError::io(&opts.data, e))?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }
        }
        .map_err(|e| RepoError::io(&opts.data, e))
    })
}
