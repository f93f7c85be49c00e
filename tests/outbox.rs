//! The outbox (issue #3): a push answered `success` reaches every target of its route, once;
//! WeChat's retries are answered the same and not forwarded again; what cannot be delivered
//! becomes a dead letter an operator sees and replays with `wechat-relay outbox`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use wechat_relay::outbox::memory::MemoryStore;
use wechat_relay::outbox::store::{
    BoxFuture, Commit, Committed, Delivery, DeliveryId, DeliveryInfo, Filter, RecentId, Recorded,
    Selection, Settle, Stats, Store, StoreError, StoreResult, StoredDelivery,
};

/// The durable backends the behaviour tests run on, each test on both.
#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A store for one test: SQLite in a folder of its own, or a database of its own on a
/// PostgreSQL server (a cluster of the test's own, or `WECHAT_RELAY_TEST_POSTGRES`'s).
struct StoreAt {
    dir: tempfile::TempDir,
    pg: Option<common::postgres::Postgres>,
}

impl StoreAt {
    /// `None` (the test skips) when PostgreSQL is not installed and `CI` is not set.
    fn new(backend: Backend) -> Option<StoreAt> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let pg = common::postgres::Postgres::start()?;
                pg.create_db("relay");
                Some(pg)
            }
        };
        Some(StoreAt { dir, pg })
    }

    /// The `[store]` keys that name it.
    fn keys(&self) -> String {
        match &self.pg {
            None => format!("path = \"{}\"\n", self.dir.path().display()),
            Some(pg) => format!(
                "url = \"{}\"\npassword_file = \"{}\"\n",
                pg.url("relay"),
                pg.password_file(self.dir.path()).display()
            ),
        }
    }
}

/// `test` on SQLite (`<name>_on_sqlite`) and on PostgreSQL (`<name>_on_postgres`).
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Sqlite).await
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Backend::Postgres).await
            })*
        }
    };
}

on_both_backends!(
    a_target_down_when_the_push_arrives_receives_it_once_when_it_comes_up,
    a_wechat_retry_during_and_after_the_first_is_forwarded_once_and_answered_the_same,
    after_max_attempts_a_delivery_is_a_dead_letter_and_replay_delivers_it,
    a_permanent_4xx_is_a_dead_letter_at_once_replayed_by_id_and_purged,
    retries_keep_the_event_id_count_attempts_and_honour_retry_after,
    a_reply_target_that_answers_needs_no_delivery_and_one_that_fails_keeps_its_place,
);

/// A safe-mode account routing everything to target `t` at `url`, with the store `store` and
/// `target_keys` added to the target.
fn config(store: &StoreAt, url: &str, format: &str, target_keys: &str, route_keys: &str) -> String {
    let mut toml = server_section(2000, 300);
    toml.push_str(&format!("[store]\n{}", store.keys()));
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", url, format, target_keys));
    toml.push_str(&format!("[[route]]\nto = [\"t\"]\n{route_keys}\n"));
    toml
}

/// Fast retries, so that tests see several attempts in a second.
const FAST_RETRY: &str = "retry_initial_ms = 50\nretry_max_ms = 100\n";

fn status(code: u16) -> Behaviour {
    Behaviour {
        status: StatusCode::from_u16(code).expect("status"),
        ..Behaviour::default()
    }
}

async fn push(relay: &TestRelay, msg_id: u64) -> Answer {
    let (query, body) = PushBuilder::new(text_xml("outbox", msg_id)).safe();
    post(&relay.url(&format!("/wechat?{query}")), body).await
}

fn attempt(received: &Received) -> u32 {
    received
        .header("x-wechat-relay-attempt")
        .expect("attempt header")
        .parse()
        .expect("a number")
}

/// `wechat-relay outbox <args> --config <relay.toml>` (the option last, as an operator may
/// type it); asserts exit 0 and returns stdout.
fn outbox(relay: &TestRelay, args: &[&str]) -> String {
    let config = relay.config.to_string_lossy().into_owned();
    let mut all = vec!["outbox"];
    all.extend_from_slice(args);
    all.extend(["--config", config.as_str()]);
    let (code, stdout, stderr) = cli(&all);
    assert_eq!(code, Some(0), "outbox {args:?}: {stderr}");
    stdout
}

async fn a_target_down_when_the_push_arrives_receives_it_once_when_it_comes_up(backend: Backend) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    // A port with nobody listening: connection refused until the target starts.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let relay = TestRelay::start(&config(
        &store,
        &format!("http://{addr}/hook"),
        "plain",
        FAST_RETRY,
        "",
    ))
    .await;
    assert_success(&push(&relay, 1).await);
    // Its first retries fail and are recorded (within a few seconds on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pending = outbox(&relay, &["list"]);
        if pending.contains("target=t") && pending.contains("error=\"client error (Connect)") {
            break;
        }
        assert!(Instant::now() < deadline, "{pending}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut target = FakeTarget::on(addr, Behaviour::default()).await;
    let got = target.next().await;
    assert!(attempt(&got) > 1, "delivered on a retry");
    assert!(
        String::from_utf8_lossy(&got.body).contains("outbox"),
        "the decrypted message"
    );
    target.expect_none(Duration::from_millis(800)).await;
    assert_eq!(outbox(&relay, &["list"]), "");
    relay.stop().await;
}

async fn a_wechat_retry_during_and_after_the_first_is_forwarded_once_and_answered_the_same(
    backend: Backend,
) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    let reply = "<xml><ToUserName><![CDATA[o]]></ToUserName><FromUserName><![CDATA[gh]]></FromUserName>\
        <CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content></xml>";
    let mut target = FakeTarget::with(Behaviour {
        body: bytes::Bytes::from_static(reply.as_bytes()),
        content_type: "text/xml",
        delay: Duration::from_millis(800),
        ..Behaviour::default()
    })
    .await;
    let toml = config(&store, &target.url("/"), "plain", "", "reply = \"t\"");
    let relay = TestRelay::start(&toml).await;
    // The identical request three times: while the first is in flight, and after it.
    let (query, body) = PushBuilder::new(text_xml("retry me", 7)).safe();
    let url = relay.url(&format!("/wechat?{query}"));
    let first = tokio::spawn({
        let (url, body) = (url.clone(), body.clone());
        async move { post(&url, body).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = post(&url, body.clone()).await;
    let first = first.await.expect("first");
    let after = post(&url, body.clone()).await;
    assert_eq!(first.status, 200);
    // The reply is sealed with a random nonce: equal bytes mean the same answer, given again.
    assert!(first.text().contains("<Encrypt>"), "{}", first.text());
    assert_eq!(during.body, first.body);
    assert_eq!(after.body, first.body);
    target.next().await;
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;

    // The window survives a restart: the store answers.
    let relay = TestRelay::start(&toml).await;
    let url = relay.url(&format!("/wechat?{query}"));
    let restarted = post(&url, body).await;
    assert_eq!(restarted.body, first.body);
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

async fn after_max_attempts_a_delivery_is_a_dead_letter_and_replay_delivers_it(backend: Backend) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    let mut target = FakeTarget::with(status(503)).await;
    let keys = format!("{FAST_RETRY}max_attempts = 3\n");
    let relay = TestRelay::start(&config(&store, &target.url("/"), "raw", &keys, "")).await;
    assert_success(&push(&relay, 1).await);
    let attempts: Vec<u32> = [
        target.next().await,
        target.next().await,
        target.next().await,
    ]
    .iter()
    .map(attempt)
    .collect();
    assert_eq!(attempts, [1, 2, 3]);
    target.expect_none(Duration::from_millis(400)).await;

    // Seen from the command line while the relay runs.
    let dead = outbox(&relay, &["list", "--dead"]);
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(
        dead.contains("target=t")
            && dead.contains("attempts=3")
            && dead.contains("HTTP 503 (max_attempts 3 reached)"),
        "{dead}"
    );
    let stats = outbox(&relay, &["stats"]);
    assert!(stats.contains("target=t pending=0 dead=1"), "{stats}");

    // The target is fixed; the operator replays every dead letter.
    target.set(Behaviour::default());
    assert!(outbox(&relay, &["replay", "--dead"]).contains("replayed=1"));
    let replayed = target.next().await;
    assert_eq!(attempt(&replayed), 1, "a replay starts a fresh count");
    target.expect_none(Duration::from_millis(300)).await;
    assert_eq!(outbox(&relay, &["list", "--dead"]), "");
    relay.stop().await;
}

async fn a_permanent_4xx_is_a_dead_letter_at_once_replayed_by_id_and_purged(backend: Backend) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    let mut target = FakeTarget::with(status(404)).await;
    let relay = TestRelay::start(&config(&store, &target.url("/"), "raw", FAST_RETRY, "")).await;
    assert_success(&push(&relay, 1).await);
    target.next().await;
    target.expect_none(Duration::from_millis(400)).await;
    let dead = outbox(&relay, &["list", "--dead", "--target", "t"]);
    assert!(
        dead.contains("attempts=1") && dead.contains("HTTP 404"),
        "{dead}"
    );
    let id = dead
        .split_whitespace()
        .find_map(|w| w.strip_prefix("id="))
        .expect("id=")
        .to_owned();

    // Replayed by id: still 404, dead again.
    assert!(outbox(&relay, &["replay", &id]).contains("replayed=1"));
    target.next().await;
    target.expect_none(Duration::from_millis(300)).await;
    let (code, _, stderr) = cli(&[
        "--config",
        &relay.config.to_string_lossy(),
        "outbox",
        "replay",
        "999999",
    ]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no delivery with id 999999"), "{stderr}");

    // Purged: not the ones younger than an hour, then all.
    assert!(outbox(&relay, &["purge", "--dead", "--older-than", "1h"]).contains("purged=0"));
    assert!(outbox(&relay, &["purge", "--dead"]).contains("purged=1"));
    assert_eq!(outbox(&relay, &["list", "--dead"]), "");
    relay.stop().await;
}

async fn retries_keep_the_event_id_count_attempts_and_honour_retry_after(backend: Backend) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    let mut target = FakeTarget::with(Behaviour {
        retry_after: Some("1"),
        ..status(429)
    })
    .await;
    let keys = "retry_initial_ms = 10\nretry_max_ms = 5000\n";
    let relay = TestRelay::start(&config(&store, &target.url("/"), "raw", keys, "")).await;
    assert_success(&push(&relay, 1).await);
    let first = target.next().await;
    let asked = Instant::now();
    target.set(Behaviour::default());
    let second = target.next().await;
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "Retry-After: 1 was honoured over a 10 ms backoff"
    );
    assert_eq!((attempt(&first), attempt(&second)), (1, 2));
    let id = |r: &Received| r.header("x-wechat-relay-event-id").map(str::to_owned);
    assert_eq!(id(&first), id(&second));
    assert!(id(&first).is_some());
    relay.stop().await;
}

#[tokio::test]
async fn deliveries_to_one_target_stay_within_its_concurrency() {
    let mut target = FakeTarget::with(Behaviour {
        delay: Duration::from_millis(300),
        ..Behaviour::default()
    })
    .await;
    let mut toml = server_section(2000, 300);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section(
        "t",
        &target.url("/"),
        "raw",
        "concurrency = 2",
    ));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    let relay = TestRelay::start(&toml).await;
    for i in 0..6 {
        assert_success(&push(&relay, i).await);
    }
    for _ in 0..6 {
        target.next().await;
    }
    assert_eq!(target.peak_load(), 2, "two at a time, never more");
    relay.stop().await;
}

async fn a_reply_target_that_answers_needs_no_delivery_and_one_that_fails_keeps_its_place(
    backend: Backend,
) {
    let Some(store) = StoreAt::new(backend) else {
        return;
    };
    let mut target = FakeTarget::start().await;
    let relay = TestRelay::start(&config(
        &store,
        &target.url("/"),
        "plain",
        FAST_RETRY,
        "reply = \"t\"",
    ))
    .await;
    // Answered: delivered by the synchronous attempt, nothing queued.
    assert_success(&push(&relay, 1).await);
    assert_eq!(attempt(&target.next().await), 1);
    target.expect_none(Duration::from_millis(300)).await;

    // Failed: WeChat gets success, and the outbox delivers it on a retry.
    target.set(status(502));
    assert_success(&push(&relay, 2).await);
    assert_eq!(attempt(&target.next().await), 1);
    target.set(Behaviour::default());
    let mut last = target.next().await;
    while last.answered != StatusCode::OK {
        last = target.next().await;
    }
    assert!(attempt(&last) >= 2);
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

/// The in-memory store with faults: commits and settles that fail (one per count), and
/// commits that wait at a gate until the test opens it.
struct FaultyStore {
    inner: MemoryStore,
    failing_commits: AtomicUsize,
    failing_settles: AtomicUsize,
    settles: AtomicUsize,
    /// Reads of due deliveries.
    reads: AtomicUsize,
    /// Look-ups of dedupe records.
    lookups: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl FaultyStore {
    fn new(failing_commits: usize, failing_settles: usize, gate_open: bool) -> Self {
        Self {
            inner: MemoryStore::new(),
            failing_commits: AtomicUsize::new(failing_commits),
            failing_settles: AtomicUsize::new(failing_settles),
            settles: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            lookups: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(if gate_open { 1 << 20 } else { 0 }),
        }
    }
}

fn take_one(count: &AtomicUsize) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Store for FaultyStore {
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>> {
        Box::pin(async move {
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
            if take_one(&self.failing_commits) {
                return Err(StoreError::Io("the disk is full (test)".into()));
            }
            self.inner.commit(commit).await
        })
    }
    fn answer(&self, id: &str, since: u64) -> BoxFuture<'_, StoreResult<Option<Recorded>>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.answer(id, since)
    }
    fn recent(&self, since: u64) -> BoxFuture<'_, StoreResult<Vec<RecentId>>> {
        self.inner.recent(since)
    }
    fn used_bytes(&self) -> u64 {
        self.inner.used_bytes()
    }
    fn probe(&self) -> BoxFuture<'_, StoreResult<()>> {
        self.inner.probe()
    }
    fn due(
        &self,
        target: &str,
        now: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.due(target, now, limit, skip)
    }
    fn next_due(&self, target: &str, now: u64) -> BoxFuture<'_, StoreResult<Option<u64>>> {
        self.inner.next_due(target, now)
    }
    fn settle(&self, id: DeliveryId, settle: Settle, now: u64) -> BoxFuture<'_, StoreResult<()>> {
        self.settles.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.failing_settles) {
            return Box::pin(async { Err(StoreError::Io("the disk is full (test)".into())) });
        }
        self.inner.settle(id, settle, now)
    }
    fn expire_dedupe(&self, before: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.expire_dedupe(before)
    }
    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>> {
        self.inner.stats()
    }
    fn list(&self, filter: Filter) -> BoxFuture<'_, StoreResult<Vec<DeliveryInfo>>> {
        self.inner.list(filter)
    }
    fn get(&self, id: DeliveryId) -> BoxFuture<'_, StoreResult<Option<StoredDelivery>>> {
        self.inner.get(id)
    }
    fn replay(&self, selection: Selection, now: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.replay(selection, now)
    }
    fn discard(&self, selection: Selection) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.discard(selection)
    }
    fn purge_dead(
        &self,
        before: Option<u64>,
        t: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>> {
        self.inner.purge_dead(before, t)
    }
}

/// A safe-mode account routing everything to one raw target, on `store`.
async fn relay_on(store: Arc<FaultyStore>, target: &FakeTarget) -> TestRelay {
    let mut toml = server_section(2000, 300);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", &target.url("/"), "raw", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    TestRelay::start_with(&toml, Some(store)).await
}

#[tokio::test]
async fn when_the_store_cannot_commit_wechat_gets_an_error_and_its_retry_a_fresh_try() {
    let mut target = FakeTarget::start().await;
    let relay = relay_on(Arc::new(FaultyStore::new(1, 0, true)), &target).await;
    let (query, body) = PushBuilder::new(text_xml("disk full", 1)).safe();
    let url = relay.url(&format!("/wechat?{query}"));
    let refused = post(&url, body.clone()).await;
    assert_eq!(
        refused.status, 503,
        "never success when the push is not stored"
    );
    assert!(
        refused.text().contains("store unavailable"),
        "{}",
        refused.text()
    );
    target.expect_none(Duration::from_millis(300)).await;
    // WeChat's retry: the key was released, the push is taken and delivered once.
    assert_success(&post(&url, body).await);
    target.next().await;
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

#[tokio::test]
async fn wechat_is_answered_only_once_the_push_is_committed() {
    let mut target = FakeTarget::start().await;
    let store = Arc::new(FaultyStore::new(0, 0, false));
    let relay = relay_on(Arc::clone(&store), &target).await;
    let (query, body) = PushBuilder::new(text_xml("held", 1)).safe();
    let url = relay.url(&format!("/wechat?{query}"));
    let answer = tokio::spawn(async move { post(&url, body).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!answer.is_finished(), "answered before the commit");
    target.expect_none(Duration::from_millis(10)).await;
    store.gate.add_permits(1 << 20);
    assert_success(&answer.await.expect("answer"));
    target.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_delivery_whose_outcome_cannot_be_recorded_is_held_not_sent_again() {
    let mut target = FakeTarget::start().await;
    let store = Arc::new(FaultyStore::new(0, 3, true));
    let relay = relay_on(Arc::clone(&store), &target).await;
    assert_success(&push(&relay, 1).await);
    target.next().await;
    // Three failed records, then the fourth lands (100 + 200 + 400 ms apart): meanwhile the
    // target gets nothing more.
    target.expect_none(Duration::from_millis(1200)).await;
    assert_eq!(store.settles.load(Ordering::SeqCst), 4);
    relay.stop().await;
}

#[tokio::test]
async fn committed_deliveries_reach_their_worker_in_memory_without_a_store_read_each() {
    let mut target = FakeTarget::start().await;
    let store = Arc::new(FaultyStore::new(0, 0, true));
    let relay = relay_on(Arc::clone(&store), &target).await;
    // The worker's first read at start (what an earlier run left).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = store.reads.load(Ordering::SeqCst);
    for msg_id in 1..=100 {
        assert_success(&push(&relay, msg_id).await);
        target.next().await;
    }
    let reads = store.reads.load(Ordering::SeqCst) - before;
    // Read back through the store, each push would cost a read (100 or more); the idle
    // worker looks at the store about once a second (replays by the `outbox` command).
    assert!(reads <= 5, "{reads} store reads for 100 deliveries");
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_reply_target_route_reads_the_store_only_for_an_id_that_may_be_a_retry() {
    let mut target = FakeTarget::start().await;
    let store = Arc::new(FaultyStore::new(0, 0, true));
    let mut toml = server_section(2000, 300);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", &target.url("/"), "raw", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\nreply = \"t\"\n");
    let relay = TestRelay::start_with(&toml, Some(Arc::clone(&store) as Arc<dyn Store>)).await;
    let mut first = None;
    for msg_id in 1..=50 {
        let (query, body) = PushBuilder::new(text_xml("reply", msg_id)).safe();
        let url = relay.url(&format!("/wechat?{query}"));
        let answer = post(&url, body.clone()).await;
        assert_eq!(answer.status, 200);
        target.next().await;
        first.get_or_insert((url, body, answer.body));
    }
    // No id was committed before: none is looked up.
    assert_eq!(store.lookups.load(Ordering::SeqCst), 0);
    // WeChat's retry of the first: looked up, answered the same, not forwarded again.
    let (url, body, answered) = first.expect("first push");
    let retry = post(&url, body).await;
    assert_eq!(retry.body, answered);
    assert_eq!(store.lookups.load(Ordering::SeqCst), 1);
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}
