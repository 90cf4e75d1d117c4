//! Who may do what: bearer credentials and the rights they carry.
//!
//! Two rights, kept apart:
//!
//! - **push** for one `client_id` (and read that client's own stream): a
//!   static token bound to a client id ([`ServerConfig::token`]) or a JWT
//!   whose client claim (default `sub`) names it;
//! - **read** every stream: a reader token ([`ServerConfig::reader_token`])
//!   or a JWT whose `scope` (or `scp`) holds the read scope (default
//!   `events:read`). A reader credential pushes only if it is also bound to
//!   a client id (a reader token is not; a JWT may carry both).
//!
//! A request without credentials is refused (`401`) unless the server allows
//! anonymous access (development only): then it may push for any client id
//! and read everything, as before rights existed. A presented credential is
//! always checked, anonymous access or not.
//!
//! [`ServerConfig::token`]: crate::ServerConfig::token
//! [`ServerConfig::reader_token`]: crate::ServerConfig::reader_token

// Helpers here return `Result<_, Response>`: the error IS the answer.
#![allow(clippy::result_large_err)]

use std::path::Path;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use crate::Error;
use crate::http::{AppState, error_response};

/// Default leeway on `exp` (and `nbf`), for clocks that disagree a little.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default JWT claim naming the client id a token may push for.
pub const DEFAULT_CLIENT_CLAIM: &str = "sub";
/// Default scope (in the `scope` or `scp` claim) that grants reading every stream.
pub const DEFAULT_READ_SCOPE: &str = "events:read";

/// The `error` code of a `401` for an expired JWT (other `401`s say `unauthorized`).
pub const TOKEN_EXPIRED: &str = "token_expired";

/// How the server verifies JWTs: the key(s) and the claims it requires.
///
/// Every token must carry `exp` (checked with [`leeway`](Self::leeway));
/// `aud` is required and checked when [`audience`](Self::audience) is set,
/// `iss` likewise with [`issuer`](Self::issuer). The token's `alg` must be
/// the key's own algorithm (an HS256 token signed with an RSA public key as
/// the secret is refused). Built with [`hs256`](Self::hs256),
/// [`rs256_pem`](Self::rs256_pem), [`es256_pem`](Self::es256_pem) or
/// [`jwks`](Self::jwks) / [`jwks_file`](Self::jwks_file), then chained setters.
#[derive(Clone)]
pub struct Jwt {
    keys: Vec<VerifyingKey>,
    /// The HS256 secret, kept only to mint test tokens (`/__test/token`).
    hs256_secret: Option<Vec<u8>>,
    audience: Vec<String>,
    issuer: Vec<String>,
    client_claim: String,
    read_scope: String,
    leeway: Duration,
}

#[derive(Clone)]
struct VerifyingKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys may be secrets: show their algorithms and ids only.
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| {
                format!(
                    "{:?}{}",
                    k.alg,
                    k.kid
                        .as_deref()
                        .map(|id| format!(" kid={id}"))
                        .unwrap_or_default()
                )
            })
            .collect();
        f.debug_struct("Jwt")
            .field("keys", &keys)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("client_claim", &self.client_claim)
            .field("read_scope", &self.read_scope)
            .field("leeway", &self.leeway)
            .finish()
    }
}

fn config_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what}: {e}"))
}

impl Jwt {
    fn with_keys(keys: Vec<VerifyingKey>) -> Self {
        Jwt {
            keys,
            hs256_secret: None,
            audience: Vec::new(),
            issuer: Vec::new(),
            client_claim: DEFAULT_CLIENT_CLAIM.to_owned(),
            read_scope: DEFAULT_READ_SCOPE.to_owned(),
            leeway: DEFAULT_LEEWAY,
        }
    }

    /// HS256 tokens signed with the shared `secret` (use at least 32 random bytes).
    pub fn hs256(secret: impl AsRef<[u8]>) -> Result<Self, Error> {
        let secret = secret.as_ref();
        if secret.is_empty() {
            return Err(Error::Config("the HS256 secret is empty".into()));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| config_error("HS256 secret", e))?;
        let mut jwt = Jwt::with_keys(vec![VerifyingKey {
            kid: None,
            alg: Algorithm::HS256,
            key,
        }]);
        jwt.hs256_secret = Some(secret.to_vec());
        Ok(jwt)
    }

    /// RS256 tokens, verified with an RSA public key in PEM (`BEGIN PUBLIC KEY`
    /// or `BEGIN RSA PUBLIC KEY`).
    pub fn rs256_pem(pem: &[u8]) -> Result<Self, Error> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| config_error("RSA public key", e))?;
        Ok(Jwt::with_keys(vec![VerifyingKey {
            kid: None,
            alg: Algorithm::RS256,
            key,
        }]))
    }

    /// ES256 tokens, verified with a P-256 public key in PEM (`BEGIN PUBLIC KEY`).
    pub fn es256_pem(pem: &[u8]) -> Result<Self, Error> {
        let key = DecodingKey::from_ec_pem(pem).map_err(|e| config_error("EC public key", e))?;
        Ok(Jwt::with_keys(vec![VerifyingKey {
            kid: None,
            alg: Algorithm::ES256,
            key,
        }]))
    }

    /// Tokens verified with the public keys of a JWKS document (`{"keys": [...]}`):
    /// RSA (RS256, or the key's `alg`) and EC (P-256: ES256, P-384: ES384)
    /// keys. A token's `kid` header picks the key; a token without `kid` is
    /// accepted only when the set holds one key. Symmetric (`oct`) keys are
    /// refused: a shared secret does not belong in a key set file.
    pub fn jwks(json: &[u8]) -> Result<Self, Error> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| config_error("JWKS", e))?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone();
            let name = kid.as_deref().unwrap_or("(no kid)");
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (_, AlgorithmParameters::OctetKey(_)) => {
                    return Err(Error::Config(format!(
                        "JWKS key {name}: symmetric keys are not accepted in a key set (use an HS256 secret)"
                    )));
                }
                (Some(alg), _) => Algorithm::try_from(*alg)
                    .map_err(|e| config_error(&format!("JWKS key {name}"), e))?,
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => {
                        return Err(Error::Config(format!("JWKS key {name}: unsupported curve")));
                    }
                },
                (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                (None, _) => {
                    return Err(Error::Config(format!(
                        "JWKS key {name}: unsupported key type"
                    )));
                }
            };
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(Error::Config(format!(
                    "JWKS key {name}: alg {alg:?} is symmetric; a key set holds public keys"
                )));
            }
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| config_error(&format!("JWKS key {name}"), e))?;
            keys.push(VerifyingKey { kid, alg, key });
        }
        if keys.is_empty() {
            return Err(Error::Config("the JWKS holds no keys".into()));
        }
        Ok(Jwt::with_keys(keys))
    }

    /// [`jwks`](Self::jwks) from a file (read once, at start).
    pub fn jwks_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let json = std::fs::read(path)
            .map_err(|e| config_error(&format!("JWKS file {}", path.display()), e))?;
        Self::jwks(&json)
    }

    /// Accept tokens whose `aud` holds `audience` (repeatable: any of them).
    /// Once set, a token without `aud` is refused. Without it `aud` is not checked.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience.push(audience.into());
        self
    }

    /// Accept tokens whose `iss` is `issuer` (repeatable: any of them). Once
    /// set, a token without `iss` is refused. Without it `iss` is not checked.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer.push(issuer.into());
        self
    }

    /// The claim holding the client id a token may push for (default `sub`).
    pub fn client_claim(mut self, claim: impl Into<String>) -> Self {
        self.client_claim = claim.into();
        self
    }

    /// The scope granting reads of every stream (default `events:read`),
    /// looked up in the `scope` claim (space-separated string) or `scp`
    /// (string or array).
    pub fn read_scope(mut self, scope: impl Into<String>) -> Self {
        self.read_scope = scope.into();
        self
    }

    /// Clock skew tolerated on `exp` and `nbf`, whole seconds (default [`DEFAULT_LEEWAY`]).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Verify `token`: its signature with the key it names (or the only
    /// key), then `exp`, `nbf`, `aud` and `iss`. The claims on success.
    fn verify(&self, token: &str) -> Result<Map<String, Value>, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::UnknownToken)?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .or_else(|| {
                    (self.keys.len() == 1 && self.keys[0].kid.is_none()).then(|| &self.keys[0])
                }),
            None => (self.keys.len() == 1).then(|| &self.keys[0]),
        }
        .ok_or_else(|| Refusal::Invalid("the token names no key this server knows (kid)".into()))?;
        // Exactly the key's algorithm: never what the token's header asks for.
        let mut validation = Validation::new(key.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            validation.set_issuer(&self.issuer);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => {
                    Refusal::Invalid("the token is not a well-formed JWT".into())
                }
                ErrorKind::InvalidSignature => {
                    Refusal::Invalid("the token's signature is not valid".into())
                }
                ErrorKind::InvalidAlgorithm => Refusal::Invalid(format!(
                    "the token's alg {:?} is not the key's ({:?})",
                    header.alg, key.alg
                )),
                ErrorKind::InvalidAudience => {
                    Refusal::Invalid("the token's audience (aud) is not accepted".into())
                }
                ErrorKind::InvalidIssuer => {
                    Refusal::Invalid("the token's issuer (iss) is not accepted".into())
                }
                ErrorKind::ImmatureSignature => {
                    Refusal::Invalid("the token is not valid yet (nbf)".into())
                }
                ErrorKind::MissingRequiredClaim(c) => {
                    Refusal::Invalid(format!("the token has no {c} claim"))
                }
                ErrorKind::InvalidClaimFormat(c) => {
                    Refusal::Invalid(format!("the token's {c} claim is malformed"))
                }
                _ => Refusal::Invalid("the token is not valid".into()),
            })
    }

    /// The rights the verified `claims` carry.
    fn access(&self, claims: &Map<String, Value>) -> Access {
        let client = claims
            .get(&self.client_claim)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let has_scope = |v: &Value| match v {
            Value::String(s) => s.split_whitespace().any(|s| s == self.read_scope),
            Value::Array(items) => items.iter().any(|i| i.as_str() == Some(&self.read_scope)),
            _ => false,
        };
        let read_all = ["scope", "scp"]
            .iter()
            .filter_map(|c| claims.get(*c))
            .any(has_scope);
        Access::Credential { client, read_all }
    }
}

/// Sign `claims` as an HS256 JWT with `secret`: what an identity provider
/// sharing that secret would issue. For tests and tools (the server itself
/// only verifies). `claims` should hold `exp` (seconds since the epoch).
pub fn sign_hs256(secret: &[u8], claims: &Value) -> Result<String, Error> {
    let key = EncodingKey::from_secret(secret).map_err(|e| config_error("HS256 secret", e))?;
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| Error::Internal(format!("signing a JWT: {e}")))
}

/// Seconds since the Unix epoch, now (for `exp`/`iat` claims).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Why a credential was refused: every case is a `401`.
#[derive(Debug)]
enum Refusal {
    Missing,
    NotBearer,
    SeveralHeaders,
    UnknownToken,
    Expired,
    Invalid(String),
}

impl Refusal {
    fn response(self) -> Response {
        let (code, message) = match self {
            Refusal::Missing => ("unauthorized", "a bearer token is required".to_owned()),
            Refusal::NotBearer => (
                "unauthorized",
                "the Authorization header is not a bearer token".to_owned(),
            ),
            Refusal::SeveralHeaders => (
                "unauthorized",
                "more than one Authorization header: send one".to_owned(),
            ),
            Refusal::UnknownToken => ("unauthorized", "unknown token".to_owned()),
            Refusal::Expired => (TOKEN_EXPIRED, "the token has expired (exp)".to_owned()),
            Refusal::Invalid(why) => ("unauthorized", why),
        };
        error_response(StatusCode::UNAUTHORIZED, code, message)
    }
}

/// What the caller of one request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    /// No credentials, on a server that allows anonymous access: push for
    /// any client id and read everything (development only).
    Anonymous,
    /// A verified credential.
    Credential {
        /// The client id it may push for and whose stream it may read.
        client: Option<String>,
        /// May read every stream.
        read_all: bool,
    },
}

fn forbidden(message: String) -> Response {
    error_response(StatusCode::FORBIDDEN, "forbidden", message)
}

impl Access {
    /// May this caller push into `client_id`'s stream? `403` if not.
    pub(crate) fn check_push(&self, client_id: &str) -> Result<(), Response> {
        match self {
            Access::Anonymous => Ok(()),
            Access::Credential {
                client: Some(bound),
                ..
            } if bound == client_id => Ok(()),
            Access::Credential { client: None, .. } => Err(unbound_may_not_push()),
            Access::Credential { .. } => Err(forbidden(format!(
                "this token may not push for client_id {client_id:?}"
            ))),
        }
    }

    /// The stream this caller may read for the pull query's `client_id`
    /// (`None`: every stream). A client reads its own stream, asked for or
    /// not; another client's stream, or all of them, needs the read right:
    /// `403` otherwise.
    pub(crate) fn check_read(&self, requested: Option<&str>) -> Result<Option<String>, Response> {
        match self {
            Access::Anonymous | Access::Credential { read_all: true, .. } => {
                Ok(requested.map(str::to_owned))
            }
            Access::Credential {
                client: Some(own), ..
            } => match requested {
                None => Ok(Some(own.clone())),
                Some(r) if r == own => Ok(Some(own.clone())),
                Some(r) => Err(forbidden(format!(
                    "this token may read only its own stream, not client_id {r:?} (reading other streams needs a reader credential)"
                ))),
            },
            Access::Credential { client: None, .. } => Err(forbidden(
                "this token grants no read right (no client_id, no read scope)".into(),
            )),
        }
    }

    /// What can be decided about a push from the request head alone, before
    /// its body is read: `403` for a credential that may not push at all (not
    /// bound to a client id), else the key its pushes are rate limited under
    /// when the credential fixes it (its client id; `None` when anonymous:
    /// the pushed `client_id` is the key, known once the body is read).
    pub(crate) fn push_rate_key(&self) -> Result<Option<String>, Response> {
        match self {
            Access::Anonymous => Ok(None),
            Access::Credential {
                client: Some(c), ..
            } => Ok(Some(rate_key(c))),
            Access::Credential { client: None, .. } => Err(unbound_may_not_push()),
        }
    }
}

/// The `403` of a push by a credential bound to no client id (a reader
/// token): it may read, never push.
fn unbound_may_not_push() -> Response {
    forbidden("this token may not push: it is not bound to a client_id".into())
}

/// The rate-limit key of pushes for `client_id`: one budget per client,
/// whichever of its credentials (or, anonymous, whoever) pushes.
pub(crate) fn rate_key(client_id: &str) -> String {
    format!("client:{client_id}")
}

/// The credentials a server accepts.
pub(crate) struct Auth {
    /// (token, client id it may push for), compared in constant time.
    tokens: Vec<(String, String)>,
    /// Tokens granting reads of every stream, compared in constant time.
    reader_tokens: Vec<String>,
    jwt: Option<Jwt>,
    allow_anonymous: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("reader_tokens", &self.reader_tokens.len())
            .field("jwt", &self.jwt)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

/// The bearer token of a request: `None` when there is no Authorization
/// header, `Some(Err)` when there is one but it is not a usable bearer
/// token, or when there are several: a proxy in front may check one and
/// this server would use another, so neither is believed.
fn bearer(headers: &HeaderMap) -> Option<Result<&str, Refusal>> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return Some(Err(Refusal::SeveralHeaders));
    }
    let parsed = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    });
    Some(parsed.ok_or(Refusal::NotBearer))
}

impl Auth {
    pub(crate) fn new(
        tokens: Vec<(String, String)>,
        reader_tokens: Vec<String>,
        jwt: Option<Jwt>,
        allow_anonymous: bool,
    ) -> Self {
        Auth {
            tokens,
            reader_tokens,
            jwt,
            allow_anonymous,
        }
    }

    /// Who is calling: the rights of the request's credentials, or the
    /// `401` answer. Static tokens are all compared, each in constant time,
    /// so the time taken tells nothing about how much of a guess was right
    /// (only, as with any comparison, its length).
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Access, Response> {
        let token = match bearer(headers) {
            None if self.allow_anonymous => return Ok(Access::Anonymous),
            None => return Err(Refusal::Missing.response()),
            Some(Err(refusal)) => return Err(refusal.response()),
            Some(Ok(token)) => token,
        };
        let mut client = None;
        for (known, client_id) in &self.tokens {
            if bool::from(known.as_bytes().ct_eq(token.as_bytes())) {
                client = Some(client_id.clone());
            }
        }
        let mut read_all = false;
        for known in &self.reader_tokens {
            if bool::from(known.as_bytes().ct_eq(token.as_bytes())) {
                read_all = true;
            }
        }
        if client.is_some() || read_all {
            return Ok(Access::Credential { client, read_all });
        }
        let Some(jwt) = &self.jwt else {
            return Err(Refusal::UnknownToken.response());
        };
        let claims = jwt.verify(token).map_err(Refusal::response)?;
        Ok(jwt.access(&claims))
    }
}

/// Body of `POST /__test/token`.
#[derive(Deserialize)]
pub(crate) struct TokenRequest {
    /// Claims to sign (`exp` is added).
    #[serde(default)]
    claims: Map<String, Value>,
    /// Seconds from now to `exp`; negative for a token that has expired.
    expires_in: i64,
}

/// `POST /__test/token` (test controls only): an HS256 JWT signed with the
/// server's own secret, so browser tests need no JWT code of their own.
/// `{"claims": {"sub": "…"}, "expires_in": -3600}` → `{"token": "…"}`.
pub(crate) async fn post_token(
    State(state): State<AppState>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()),
    };
    let Some(secret) = state
        .auth()
        .jwt
        .as_ref()
        .and_then(|j| j.hs256_secret.as_ref())
    else {
        return error_response(
            StatusCode::CONFLICT,
            "no_hs256_secret",
            "the server verifies no HS256 tokens (--jwt-secret), so it mints none",
        );
    };
    let mut claims = req.claims;
    claims.insert("exp".into(), Value::from(unix_now() + req.expires_in));
    match sign_hs256(secret, &Value::Object(claims)) {
        Ok(token) => Json(serde_json::json!({ "token": token })).into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
    }
}

/// Why `client_id` is not acceptable, if it is not: empty, longer than
/// `max_len` bytes, or holding a character that changes how text is shown
/// rather than showing ([`crate::text::is_unsafe_to_print`]): a control
/// character (C0, DEL, C1: escapes could drive the terminal of whoever reads
/// a log or a tool's output), a bidi control (it reorders what is shown, as
/// in "Trojan Source", CVE-2021-42574), a zero-width character (two
/// different ids look the same) or a line separator (it splits a log line).
pub(crate) fn invalid_client_id(client_id: &str, max_len: usize) -> Option<String> {
    if client_id.is_empty() || client_id.len() > max_len {
        return Some(format!("client_id must be 1 to {max_len} bytes long"));
    }
    if let Some(c) = client_id
        .chars()
        .find(|&c| crate::text::is_unsafe_to_print(c))
    {
        return Some(format!(
            "client_id must not hold control, bidi, invisible or line separator characters (found U+{:04X})",
            c as u32
        ));
    }
    None
}
