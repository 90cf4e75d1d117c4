//! `edge-outbox-server`: the reference sync endpoint as a command.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_outbox_server::logging::LogFormat;
use edge_outbox_server::{DEFAULT_BODY_LIMIT, ServerConfig};

/// Receives events pushed by edge-outbox relays (sync protocol v1) and stores
/// them, exactly once in effect, in a SQLite file (one instance) or in
/// PostgreSQL (several instances on one database, behind a load balancer).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address to listen on; port 0 picks a free port (the real one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// SQLite database file (created if missing, WAL mode). Unused with --database-url.
    #[arg(long, default_value = "edge-outbox-server.db")]
    database: PathBuf,

    /// PostgreSQL instead of SQLite: postgres://USER@HOST:PORT/DB (any number of
    /// instances may share it; tables are created or migrated at start).
    #[arg(
        long,
        env = "EDGE_OUTBOX_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    database_url: Option<String>,

    /// Connections in this instance's PostgreSQL pool.
    #[arg(long, env = "EDGE_OUTBOX_POOL_SIZE", default_value_t = edge_outbox_server::DEFAULT_POOL_SIZE)]
    pool_size: usize,

    /// A bearer token and the client id it may push for, as TOKEN:CLIENT_ID. Repeatable.
    #[arg(long = "token", value_name = "TOKEN:CLIENT_ID", value_parser = parse_token)]
    tokens: Vec<(String, String)>,

    /// A bearer token that may read every client's stream (GET /v1/events), for
    /// backends; it may not push. Repeatable.
    #[arg(long = "reader-token", value_name = "TOKEN")]
    reader_tokens: Vec<String>,

    /// Verify HS256 JWTs with this shared secret (prefer the environment variable:
    /// a command line is visible to other users of the machine).
    #[arg(
        long,
        env = "EDGE_OUTBOX_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        conflicts_with_all = ["jwt_rsa_pem", "jwt_ec_pem", "jwks"]
    )]
    jwt_secret: Option<String>,

    /// Verify RS256 JWTs with the RSA public key in this PEM file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["jwt_ec_pem", "jwks"])]
    jwt_rsa_pem: Option<PathBuf>,

    /// Verify ES256 JWTs with the P-256 public key in this PEM file.
    #[arg(long, value_name = "FILE", conflicts_with = "jwks")]
    jwt_ec_pem: Option<PathBuf>,

    /// Verify JWTs with the public keys of this JWKS file (RSA and EC keys; the
    /// token's kid picks the key). Read once, at start.
    #[arg(long, value_name = "FILE")]
    jwks: Option<PathBuf>,

    /// Accept only JWTs whose aud holds this value (repeatable: any of them);
    /// a token without aud is then refused. Strongly advised.
    #[arg(long = "jwt-audience", value_name = "AUD")]
    jwt_audiences: Vec<String>,

    /// Accept only JWTs whose iss is this value (repeatable: any of them).
    #[arg(long = "jwt-issuer", value_name = "ISS")]
    jwt_issuers: Vec<String>,

    /// The JWT claim naming the client id a token may push for (and read).
    #[arg(long, value_name = "CLAIM", default_value = edge_outbox_server::auth::DEFAULT_CLIENT_CLAIM)]
    jwt_client_claim: String,

    /// The scope (in the JWT's scope or scp claim) that grants reading every stream.
    #[arg(long, value_name = "SCOPE", default_value = edge_outbox_server::auth::DEFAULT_READ_SCOPE)]
    jwt_read_scope: String,

    /// Clock skew tolerated on a JWT's exp and nbf, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = edge_outbox_server::auth::DEFAULT_LEEWAY.as_secs())]
    jwt_leeway: u64,

    /// Pushes per second each client may make sustained, as N/s, or `off`;
    /// over it a push gets 429 with Retry-After.
    #[arg(long, value_name = "N/s|off", default_value = "100/s", value_parser = parse_rate)]
    rate_limit: Rate,

    /// Pushes a client may make at once before --rate-limit applies.
    #[arg(long, value_name = "N", default_value_t = edge_outbox_server::DEFAULT_RATE_BURST)]
    rate_burst: u32,

    /// Accept pushes for any client id, and reads of every stream, without a
    /// token. LOCAL DEVELOPMENT ONLY.
    #[arg(long)]
    allow_anonymous: bool,

    /// Largest push body in bytes, after gzip inflation; larger ones get 413.
    #[arg(long, default_value_t = DEFAULT_BODY_LIMIT)]
    body_limit: usize,

    /// Serve this directory's files at / (a built web app).
    #[arg(long, value_name = "DIR")]
    static_dir: Option<PathBuf>,

    /// Allow browser pages from this origin (e.g. http://127.0.0.1:5173, or * for any)
    /// to call the API cross-origin. Repeatable.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,

    /// Mount the fault-injection endpoints under /__test/. TESTS ONLY.
    #[arg(long)]
    enable_test_controls: bool,

    /// Log lines (one per request, on stderr) as `text` or `json`. The level
    /// and targets come from RUST_LOG (default: info).
    #[arg(long, value_name = "json|text", default_value = "text")]
    log_format: LogFormat,

    /// Seconds a client has to send a request's head (from the connection's
    /// accept and TLS handshake, or from a later request's first byte);
    /// slower connections are closed.
    #[arg(long, value_name = "SECS", default_value_t = edge_outbox_server::DEFAULT_HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,

    /// Largest event accepted (type + key + payload + headers, bytes); larger
    /// ones are answered rejected. Keep it at or above the clients' limit.
    #[arg(long, value_name = "BYTES", default_value_t = edge_outbox::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,

    /// Base seconds a push body may take to arrive: the whole body within
    /// this plus 1 s per KiB received; a slower one gets 408 and is closed.
    #[arg(long, value_name = "SECS", default_value_t = edge_outbox_server::DEFAULT_BODY_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout: u64,

    /// Seconds a keep-alive connection may stay silent between requests
    /// before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = edge_outbox_server::DEFAULT_IDLE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,

    /// Connections open at once; more wait in the listen backlog until one
    /// closes. Keep it below the file descriptor limit (ulimit -n).
    #[arg(long, value_name = "N", default_value_t = edge_outbox_server::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,

    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs
    /// --tls-key. Without it the server speaks plain HTTP (put TLS in front).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check that a backend (any implementation) follows the sync protocol:
    /// pushes test events to URL and prints one PASS/FAIL line per
    /// obligation with the evidence. Exits non-zero when a MUST fails.
    Check {
        /// The push endpoint, e.g. http://127.0.0.1:8080/v1/events.
        url: String,
        /// Bearer token to push with.
        #[arg(long, value_name = "T")]
        token: Option<String>,
        /// Push for this client id (when the token is bound to one) instead
        /// of a fresh random one per check.
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
        /// The endpoint's body limit in bytes, after gzip inflation: the
        /// body-limit checks send twice this.
        #[arg(long = "body-limit", value_name = "BYTES", default_value_t = DEFAULT_BODY_LIMIT)]
        body_limit: usize,
    },
}

/// `--rate-limit`: pushes per second sustained, or `None` for `off`.
#[derive(Clone, Copy, Debug)]
struct Rate(Option<u32>);

/// `N/s` (or a bare `N`), or `off`.
fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Rate(None));
    }
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.trim().parse::<u32>() {
        Ok(0) => Err("a rate of 0 would refuse every push; use `off` for no limit".into()),
        Ok(n) => Ok(Rate(Some(n))),
        Err(_) => Err(format!("expected N/s or off, got {s:?}")),
    }
}

/// The JWT verification the flags ask for, if any.
fn jwt_config(args: &Args) -> Result<Option<edge_outbox_server::auth::Jwt>, String> {
    use edge_outbox_server::auth::Jwt;
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let jwt = if let Some(secret) = &args.jwt_secret {
        Jwt::hs256(secret.as_bytes())
    } else if let Some(path) = &args.jwt_rsa_pem {
        Jwt::rs256_pem(&read(path)?)
    } else if let Some(path) = &args.jwt_ec_pem {
        Jwt::es256_pem(&read(path)?)
    } else if let Some(path) = &args.jwks {
        Jwt::jwks_file(path)
    } else {
        return Ok(None);
    };
    let mut jwt = jwt
        .map_err(|e| e.to_string())?
        .client_claim(&args.jwt_client_claim)
        .read_scope(&args.jwt_read_scope)
        .leeway(std::time::Duration::from_secs(args.jwt_leeway));
    for aud in &args.jwt_audiences {
        jwt = jwt.audience(aud);
    }
    for iss in &args.jwt_issuers {
        jwt = jwt.issuer(iss);
    }
    Ok(Some(jwt))
}

/// `TOKEN:CLIENT_ID`, split at the last colon (client ids are UUIDs, tokens may hold colons).
fn parse_token(s: &str) -> Result<(String, String), String> {
    match s.rsplit_once(':') {
        Some((token, client)) if !token.is_empty() && !client.is_empty() => {
            Ok((token.to_owned(), client.to_owned()))
        }
        _ => Err("expected TOKEN:CLIENT_ID".to_owned()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Check {
        url,
        token,
        client_id,
        body_limit,
    }) = &args.command
    {
        let options = edge_outbox_server::check::Options {
            token: token.clone(),
            client_id: client_id.clone(),
            body_limit: Some(*body_limit),
        };
        let report = edge_outbox_server::check::run_with(url, &options).await;
        print!("{report}");
        return if report.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let subscriber = edge_outbox_server::logging::subscriber(
        args.log_format,
        &filter,
        std::io::stderr().is_terminal(),
        std::io::stderr,
    );
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("edge-outbox-server: a log subscriber was already installed");
    }
    let mut config = match &args.database_url {
        Some(url) => ServerConfig::postgres(url).pool_size(args.pool_size),
        None => ServerConfig::new(&args.database),
    }
    .allow_anonymous(args.allow_anonymous)
    .body_limit(args.body_limit)
    .test_controls(args.enable_test_controls)
    .header_timeout(std::time::Duration::from_secs(args.header_timeout))
    .body_timeout(std::time::Duration::from_secs(args.body_timeout))
    .max_event_bytes(args.max_event_bytes)
    .idle_timeout(std::time::Duration::from_secs(args.idle_timeout))
    .max_connections(usize::try_from(args.max_connections).unwrap_or(usize::MAX));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        match read(cert).and_then(|cert| Ok((cert, read(key)?))) {
            Ok((cert, key)) => config = config.tls_pem(cert, key),
            Err(e) => {
                eprintln!("edge-outbox-server: TLS: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for (token, client) in &args.tokens {
        config = config.token(token, client);
    }
    for token in &args.reader_tokens {
        config = config.reader_token(token);
    }
    let jwt = match jwt_config(&args) {
        Ok(jwt) => jwt,
        Err(e) => {
            eprintln!("edge-outbox-server: JWT configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let has_jwt = jwt.is_some();
    if let Some(jwt) = jwt {
        if args.jwt_audiences.is_empty() {
            eprintln!(
                "edge-outbox-server: WARNING: no --jwt-audience: any token the key signed is accepted, \
                 whatever service it was issued for"
            );
        }
        config = config.jwt(jwt);
    }
    config = config.rate_limit(
        args.rate_limit
            .0
            .map(|n| edge_outbox_server::RateLimit::new(n, args.rate_burst)),
    );
    for origin in &args.cors_origins {
        config = config.cors_origin(origin);
    }
    if let Some(dir) = &args.static_dir {
        config = config.static_dir(dir);
    }
    if args.allow_anonymous {
        eprintln!(
            "edge-outbox-server: WARNING: --allow-anonymous: ANY client may push without a token. \
             Local development only."
        );
    }
    if args.enable_test_controls {
        eprintln!(
            "edge-outbox-server: WARNING: --enable-test-controls: /__test/ endpoints can break this server. \
             Tests only."
        );
    }
    if args.tokens.is_empty() && !has_jwt && !args.allow_anonymous {
        eprintln!(
            "edge-outbox-server: no --token, no JWT key and no --allow-anonymous: every push will get 401"
        );
    }

    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edge-outbox-server: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    match &args.database_url {
        // The URL may hold a password: name the storage, not the URL.
        Some(_) => eprintln!(
            "edge-outbox-server: database PostgreSQL (--database-url), pool of {}",
            args.pool_size
        ),
        None => eprintln!("edge-outbox-server: database {}", args.database.display()),
    }

    // Scripts and tests read this line to learn the port and that the
    // server is up: printed only once the database is open and migrated.
    let ready = || {
        println!("listening on {scheme}://{addr}");
        let _ = std::io::stdout().flush();
    };
    match edge_outbox_server::serve_when_ready(listener, config, ready, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-outbox-server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("edge-outbox-server: shutting down");
}
