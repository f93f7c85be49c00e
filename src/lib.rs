//! `wechat-relay` sits at a WeChat official account's server URL. It verifies each push,
//! decrypts it, routes it by what it is, forwards it to the company's targets (an identity
//! provider for QR-code logins, business servers for everything else) and answers WeChat
//! inside its 5-second deadline.
//!
//! # Layout
//! A push flows one way through these modules:
//!
//! - [`config`]: relay.toml, loaded and validated into a checked [`config::Config`];
//! - [`service`]: `serve` as a service: startup order, signals, reload, systemd notify;
//! - [`server`]: accepts (HTTP or [`tls`]), keeps connection slots free for WeChat, swaps the
//!   relay on reload, shuts down gracefully; [`stack`] builds the tower stack;
//! - [`peer`]: who is asking (the peer, or the client behind a trusted proxy) and the
//!   allow-list;
//! - [`relay`]: the handler, as phases over one push ending in one outcome (its log line and
//!   metrics): [`request`] checks what arrives (query, signature, timestamp, body, decrypt),
//!   then route, dedupe, [`reply`] (the reply target within the deadline, sealed), commit;
//! - [`outbox`]: the durable store of deliveries, its workers (retries, dead letters) and the
//!   WeChat-retry dedupe;
//! - [`wechat`]: the protocol (signatures, AES, message XML), knowing nothing of routes; its
//!   [`wechat::sender`] builds pushes the way WeChat does, for tests and benchmarks;
//! - [`push`]: a verified push as every later step reads it;
//! - [`route`]: the route table, first match wins;
//! - [`forward`]: the HTTP client and the `raw` / `plain` / `json` request shapes;
//! - [`secret`]: tokens, keys and credentials in zeroed memory, compared in constant time;
//! - [`error`]: refusals and forward failures, and the one mapping to HTTP (4xx, 503, 500);
//! - [`simulate`]: WeChat's side from the command line: a signed push or URL check sent to a
//!   running relay, its answer opened (`wechat-relay simulate`);
//! - [`admin`] and [`metrics`]: health, readiness and the Prometheus metrics;
//! - [`cli`] and [`telemetry`]: the command line (with the `outbox` commands) and logging.

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod forward;
pub mod init;
pub mod metrics;
pub mod outbox;
pub mod peer;
pub mod push;
pub mod relay;
pub mod reply;
pub mod request;
pub mod route;
pub mod secret;
pub mod server;
pub mod service;
pub mod simulate;
pub mod sink;
pub mod stack;
pub mod telemetry;
pub mod tls;
pub mod wechat;
