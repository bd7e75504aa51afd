//! The machinery of the property tests: random ops, the script that turns them into timed
//! batches, and the checks shared by the property tests of every topic.

use super::*;

/// "ghost" is never created, so it is always an unknown SKU; "c" exists only once an op creates it.
pub(super) const SKUS: [&str; 4] = ["a", "b", "c", "ghost"];
pub(super) const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];

#[derive(Debug, Clone)]
pub(super) enum Target {
    /// One of the fresh reserve requests issued so far (granted or not).
    Issued(Index),
    /// Most likely no reservation at all.
    Random(RequestId),
}

#[derive(Debug, Clone)]
pub(super) enum Op {
    /// A reserve under the user's next key ("k0", "k1", ... per user, so the same key strings
    /// recur across users).
    Reserve {
        sku: usize,
        user: usize,
        quantity: u32,
    },
    /// The same user and key as an earlier reserve: the same request again (a client retry), or
    /// with `change` a different SKU and quantity (key reuse, unless the dice pick the same).
    Retry {
        pick: Index,
        change: Option<(usize, u32)>,
    },
    /// A reserve under a fresh key whose request id repeats an earlier reserve's (a buggy
    /// producer).
    ReserveReusingId {
        pick: Index,
        sku: usize,
        user: usize,
        quantity: u32,
    },
    Confirm(Target),
    Cancel(Target),
    Upsert {
        sku: usize,
        config: SkuConfig,
    },
    Restock {
        sku: usize,
        quantity: u64,
    },
    Pause(usize),
    Resume(usize),
    PauseAll,
    /// An admin op under one of a few admin keys (so keys recur, with the same command or not).
    Keyed {
        key: usize,
        op: Box<Op>,
    },
    /// Ends the batch; the next one is `dt` ms later (earlier when negative: the clock stepped back).
    Cut {
        dt: i64,
    },
}

pub(super) fn sku() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 4 => Just(1usize), 2 => Just(2usize), 1 => Just(3usize)]
}

pub(super) fn quantity() -> impl Strategy<Value = u32> {
    prop_oneof![12 => 1u32..=3, 1 => Just(4), 1 => Just(0), 1 => Just(QUANTITY_MAX + 1)]
}

pub(super) fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        8 => any::<Index>().prop_map(Target::Issued),
        1 => (0u128..400).prop_map(Target::Random),
    ]
}

pub(super) fn sku_config() -> impl Strategy<Value = SkuConfig> {
    let total = prop_oneof![10 => 0u64..=12, 1 => Just(STOCK_MAX), 1 => Just(STOCK_MAX + 1)];
    let limit = prop_oneof![10 => 1u32..=4, 1 => Just(0), 1 => Just(QUANTITY_MAX + 1)];
    let ttl = prop_oneof![
        10 => 1u64..=3_000,
        1 => Just(0),
        1 => Just(HOLD_TTL_MS_MAX),
        1 => Just(HOLD_TTL_MS_MAX + 1)
    ];
    let starts = proptest::option::weighted(0.25, (T0 - 2_000)..(T0 + 8_000));
    let ends = proptest::option::weighted(0.25, T0..(T0 + 15_000));
    // A pre-sale queue: mostly opening before the start, a few too long or empty.
    let queue = proptest::option::weighted(
        0.3,
        (
            (T0 - 4_000)..(T0 + 6_000),
            prop_oneof![10 => 1u32..=4, 1 => Just(0), 1 => Just(QUEUE_MAX + 1)],
        )
            .prop_map(|(opens_at_ms, max)| QueueWindow { opens_at_ms, max }),
    );
    (total, limit, ttl, starts, ends, queue).prop_map(
        |(total_stock, per_user_limit, hold_ttl_ms, starts_at_ms, ends_at_ms, queue)| SkuConfig {
            total_stock,
            per_user_limit,
            hold_ttl_ms,
            starts_at_ms,
            ends_at_ms,
            queue,
        },
    )
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS.len();
    prop_oneof![
        30 => (sku(), user.clone(), quantity())
            .prop_map(|(sku, user, quantity)| Op::Reserve { sku, user, quantity }),
        10 => (any::<Index>(), proptest::option::weighted(0.25, (sku(), quantity())))
            .prop_map(|(pick, change)| Op::Retry { pick, change }),
        1 => (any::<Index>(), sku(), user, quantity())
            .prop_map(|(pick, sku, user, quantity)| Op::ReserveReusingId {
                pick, sku, user, quantity
            }),
        8 => target().prop_map(Op::Confirm),
        5 => target().prop_map(Op::Cancel),
        4 => (0..SKUS.len() - 1, sku_config()).prop_map(|(sku, config)| Op::Upsert { sku, config }),
        2 => (sku(), prop_oneof![8 => 1u64..=5, 1 => Just(0), 1 => Just(STOCK_MAX)])
            .prop_map(|(sku, quantity)| Op::Restock { sku, quantity }),
        2 => sku().prop_map(Op::Pause),
        6 => sku().prop_map(Op::Resume),
        1 => Just(Op::PauseAll),
        4 => (0..3usize, admin_op()).prop_map(|(key, op)| Op::Keyed { key, op: Box::new(op) }),
        12 => prop_oneof![8 => 0i64..=600, 2 => 600i64..=3_000, 1 => -2_000i64..0]
            .prop_map(|dt| Op::Cut { dt }),
    ]
}

/// The admin ops a keyed op wraps: few distinct ones, so that a recurring key often repeats
/// its command (a retry) and sometimes does not (a reuse).
fn admin_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, prop_oneof![Just(1u64), Just(3), Just(0)])
            .prop_map(|(sku, quantity)| Op::Restock { sku, quantity }),
        1 => (0..2usize).prop_map(Op::Pause),
        1 => (0..2usize).prop_map(Op::Resume),
        1 => (0..SKUS.len() - 1).prop_map(|sku| Op::Upsert { sku, config: config(8, 2, 1_000) }),
        1 => Just(Op::PauseAll),
    ]
}

pub(super) fn ops(max: usize) -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 0..=max)
}

/// An earlier fresh reserve: what a retry repeats.
#[derive(Debug, Clone)]
pub(super) struct Issued {
    request_id: RequestId,
    user: usize,
    key: String,
    sku: usize,
    quantity: u32,
}

/// Turns ops into timed batches of requests. Pure: it never looks at an engine, so the same ops
/// always give the same batches.
#[derive(Debug, Clone)]
pub(super) struct Script {
    reqs: Reqs,
    now: i64,
    issued: Vec<Issued>,
    keys_used: [usize; USERS.len()],
}

impl Script {
    /// Starts with a batch at `T0` that creates "a" and "b" (more SKUs come from the ops).
    pub(super) fn start() -> (Self, (i64, Vec<Request>)) {
        let mut reqs = Reqs::new();
        let setup = vec![
            reqs.upsert("a", config(6, 3, 3_000)),
            // "b" opens with a pre-sale queue: its sale starts 3 s in.
            reqs.upsert(
                "b",
                SkuConfig {
                    starts_at_ms: Some(T0 + 3_000),
                    queue: Some(QueueWindow {
                        opens_at_ms: T0,
                        max: 4,
                    }),
                    ..config(3, 2, 1_500)
                },
            ),
        ];
        let script = Self {
            reqs,
            now: T0,
            issued: Vec::new(),
            keys_used: [0; USERS.len()],
        };
        (script, (T0, setup))
    }

    pub(super) fn fresh_key(&mut self, user: usize) -> String {
        let key = format!("k{}", self.keys_used[user]);
        self.keys_used[user] += 1;
        key
    }

    /// A script and its first batches: the setup, then `ops`; the script goes on from there.
    pub(super) fn start_with(ops: &[Op]) -> (Self, Vec<(i64, Vec<Request>)>) {
        let (mut script, setup) = Script::start();
        let mut batches = vec![setup];
        batches.extend(script.batches(ops));
        (script, batches)
    }

    pub(super) fn batches(&mut self, ops: &[Op]) -> Vec<(i64, Vec<Request>)> {
        let mut batches = Vec::new();
        let mut current = Vec::new();
        for op in ops {
            let request = match op {
                Op::Cut { dt } => {
                    batches.push((self.now, std::mem::take(&mut current)));
                    self.now += dt;
                    continue;
                }
                &Op::Reserve {
                    sku,
                    user,
                    quantity,
                } => {
                    let key = self.fresh_key(user);
                    let r = self.reqs.reserve(SKUS[sku], USERS[user], quantity, &key);
                    self.issued.push(Issued {
                        request_id: r.request_id,
                        user,
                        key,
                        sku,
                        quantity,
                    });
                    r
                }
                Op::Retry { pick, change } => {
                    if self.issued.is_empty() {
                        continue;
                    }
                    let first = pick.get(&self.issued);
                    let (sku, quantity) = change.unwrap_or((first.sku, first.quantity));
                    let (user, key) = (USERS[first.user], first.key.clone());
                    self.reqs.reserve(SKUS[sku], user, quantity, &key)
                }
                &Op::ReserveReusingId {
                    ref pick,
                    sku,
                    user,
                    quantity,
                } => {
                    let key = self.fresh_key(user);
                    let mut r = self.reqs.reserve(SKUS[sku], USERS[user], quantity, &key);
                    if !self.issued.is_empty() {
                        r.request_id = pick.get(&self.issued).request_id;
                    }
                    r
                }
                Op::Confirm(t) => {
                    let id = self.resolve(t);
                    self.reqs.confirm(id)
                }
                Op::Cancel(t) => {
                    let id = self.resolve(t);
                    self.reqs.cancel(id)
                }
                Op::Upsert { sku, config } => self.reqs.upsert(SKUS[*sku], config.clone()),
                Op::Restock { sku, quantity } => self.reqs.restock(SKUS[*sku], *quantity),
                Op::Pause(sku) => self.reqs.pause(SKUS[*sku]),
                Op::Resume(sku) => self.reqs.resume(SKUS[*sku]),
                Op::PauseAll => self.reqs.pause_all(),
                Op::Keyed { key, op } => {
                    let [admin] = &self.batches(std::slice::from_ref(op))[..] else {
                        unreachable!("an admin op is one request in one batch")
                    };
                    let admin = admin.1[0].clone();
                    self.reqs.keyed(&format!("admin-{key}"), admin)
                }
            };
            current.push(request);
        }
        batches.push((self.now, current));
        batches
    }

    pub(super) fn resolve(&self, target: &Target) -> RequestId {
        match target {
            Target::Issued(i) if !self.issued.is_empty() => i.get(&self.issued).request_id,
            Target::Issued(_) => 0,
            Target::Random(id) => *id,
        }
    }
}

pub(super) fn all_batches(ops: &[Op]) -> Vec<(i64, Vec<Request>)> {
    Script::start_with(ops).1
}

/// A check that does not need the model: every `(user, key)` keeps answering its first recorded
/// outcome to the same request, and key reuse to a different one.
#[derive(Default)]
pub(super) struct IdempotencyLedger {
    first: BTreeMap<(String, String), (String, u32, Outcome)>,
}

impl IdempotencyLedger {
    pub(super) fn check(&mut self, requests: &[Request], out: &BatchOutput) {
        for (request, outcome) in requests.iter().zip(&out.outcomes) {
            let Some((sku, user_id, quantity, idempotency_key)) = request.command.as_reserve()
            else {
                continue;
            };
            let k = (user_id.to_owned(), idempotency_key.to_owned());
            match self.first.get(&k) {
                None => {
                    assert_ne!(*outcome, rejected(Reject::IdempotencyKeyReused));
                    // Input errors are answered but not recorded: the key stays free.
                    let input_error = [Reject::UnknownSku, Reject::InvalidCommand]
                        .map(rejected)
                        .contains(outcome);
                    if !input_error {
                        self.first
                            .insert(k, (sku.to_owned(), quantity, outcome.clone()));
                    }
                }
                Some((s, q, first)) if s == sku && *q == quantity => match (first, outcome) {
                    // Queued, then decided when its sale started: a retry gets the decision.
                    (Outcome::Queued { .. }, Outcome::Held { .. } | Outcome::Rejected(_)) => {
                        self.first
                            .insert(k, (sku.to_owned(), quantity, outcome.clone()));
                    }
                    (
                        Outcome::Queued {
                            reservation_id,
                            position,
                            ..
                        },
                        Outcome::Queued {
                            reservation_id: again,
                            position: at,
                            ..
                        },
                    ) => assert_eq!((reservation_id, position), (again, at), "{k:?} moved"),
                    _ => assert_eq!(outcome, first, "{k:?} answered differently"),
                },
                Some(_) => assert_eq!(*outcome, rejected(Reject::IdempotencyKeyReused)),
            }
        }
    }
}

pub(super) fn assert_same_state(engine: &mut Engine, model: &Model, ids: &[RequestId]) {
    assert_eq!(engine.clock_ms(), model.clock_ms());
    assert_eq!(engine.batch_seq(), model.batch_seq());
    let views: Vec<SkuView> = engine.skus().collect();
    assert_eq!(views, model.sku_views());
    for v in &views {
        assert_eq!(v.available + v.held + v.sold, v.total, "{v:?}");
        assert_eq!(v.total, v.config.total_stock);
    }
    for &id in ids {
        assert_eq!(
            engine.reservation(id),
            model.reservation(id),
            "reservation {id}"
        );
    }
    assert_eq!(engine.next_expiry_ms(), model.next_expiry_ms());
    assert_eq!(
        engine.queued().cloned().collect::<Vec<_>>(),
        model.queued_requests()
    );
    assert_eq!(engine.next_release_ms(), model.next_release_ms());
}

/// Every id a request in `batches` used or pointed at.
pub(super) fn ids_in(batches: &[(i64, Vec<Request>)]) -> Vec<RequestId> {
    let mut ids: Vec<RequestId> = batches
        .iter()
        .flat_map(|(_, b)| b)
        .flat_map(|r| match r.command {
            Command::Confirm { reservation_id } | Command::Cancel { reservation_id } => {
                vec![r.request_id, reservation_id]
            }
            _ => vec![r.request_id],
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Rebuilds what Postgres would hold after `history` (the batches and what the engine said
/// about them): one row per decision, moved on by the transitions.
pub(super) fn snapshot_of(engine: &Engine, history: &[(Vec<Request>, BatchOutput)]) -> Snapshot {
    let mut decisions: Vec<StoredDecision> = Vec::new();
    let mut granted: BTreeMap<RequestId, usize> = BTreeMap::new();
    // What `queued_requests` holds: queued and not yet decided.
    let mut queued: Vec<QueuedRequest> = Vec::new();
    let mut decide = |q: QueuedRequest, result: Result<i64, Reject>| {
        let (status, expires_at_ms) = match result {
            Ok(expires_at_ms) => {
                let clash = granted.insert(q.request_id, decisions.len());
                assert!(clash.is_none(), "two grants with id {}", q.request_id);
                (Ok(ReservationStatus::Held), expires_at_ms)
            }
            Err(reason) => (Err(reason), 0),
        };
        decisions.push(StoredDecision {
            request_id: q.request_id,
            user_id: q.user_id,
            idempotency_key: q.idempotency_key,
            sku: q.sku,
            quantity: q.quantity,
            status,
            expires_at_ms,
        });
    };
    let reserve = |request: &Request| {
        let (sku, user_id, quantity, idempotency_key) = request
            .command
            .as_reserve()
            .expect("decisions come from reserve commands");
        QueuedRequest {
            request_id: request.request_id,
            sku: sku.to_owned(),
            user_id: user_id.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            quantity,
        }
    };
    let mut moves = Vec::new();
    for (requests, out) in history {
        for r in &out.released {
            let i = queued
                .iter()
                .position(|q| q.request_id == r.request_id)
                .expect("a released request was queued");
            decide(queued.remove(i), r.result);
        }
        for d in &out.decisions {
            let request = &requests[d.command_index as usize];
            assert_eq!(request.request_id, d.request_id);
            decide(reserve(request), d.result);
        }
        for q in &out.queued {
            queued.push(reserve(&requests[q.command_index as usize]));
        }
        moves.extend(out.transitions.iter().cloned());
    }
    for t in moves {
        let row = &mut decisions[granted[&t.reservation_id]];
        assert_eq!(
            row.status,
            Ok(ReservationStatus::Held),
            "{t:?} leaves a non-held row"
        );
        row.status = Ok(t.status);
    }
    // The rows agree with what the engine shows.
    for (&id, &i) in &granted {
        let view = engine
            .reservation(id)
            .expect("granted reservation is visible");
        let row = &decisions[i];
        assert_eq!(row.status, Ok(view.status));
        assert_eq!(
            (
                row.sku.as_str(),
                row.user_id.as_str(),
                row.quantity,
                row.expires_at_ms
            ),
            (
                view.sku.as_str(),
                view.user_id.as_str(),
                view.quantity,
                view.expires_at_ms
            )
        );
    }
    let admin_keys = history
        .iter()
        .flat_map(|(requests, out)| {
            out.admin_keys.iter().map(|a| {
                let i = a.command_index as usize;
                let Command::Admin {
                    idempotency_key, ..
                } = &requests[i].command
                else {
                    panic!(
                        "an admin key from a command that is not keyed: {:?}",
                        requests[i]
                    );
                };
                AdminKeyRecord {
                    idempotency_key: idempotency_key.clone(),
                    command: a.command.clone(),
                    outcome: out.outcomes[i].clone(),
                }
            })
        })
        .collect();
    Snapshot {
        hash_seed: engine.hash_seed(),
        batch_seq: engine.batch_seq(),
        clock_ms: engine.clock_ms(),
        skus: engine.skus().collect(),
        decisions,
        admin_keys,
        queued,
    }
}

/// Applies `batches` to `engine`, keeping each batch's requests with what it decided.
pub(super) fn record_batches(
    engine: &mut Engine,
    batches: &[(i64, Vec<Request>)],
) -> Vec<(Vec<Request>, BatchOutput)> {
    batches
        .iter()
        .map(|(now, requests)| (requests.clone(), engine.apply_batch(*now, requests)))
        .collect()
}

/// A new engine that has applied `batches`, and its history (see [`record_batches`]).
pub(super) fn run_recording(
    batches: &[(i64, Vec<Request>)],
) -> (Engine, Vec<(Vec<Request>, BatchOutput)>) {
    let mut engine = Engine::new();
    let history = record_batches(&mut engine, batches);
    (engine, history)
}

pub(super) fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported with the shrunk case; no regression files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs the batches through the engine and the naive model and insists they agree on every
/// output and on every reservation and SKU afterwards; returns the engine's outputs.
pub(super) fn agree_with_model(batches: &[(i64, Vec<Request>)]) -> (Engine, Vec<BatchOutput>) {
    let mut engine = Engine::new();
    let mut model = Model::new();
    let mut outs = Vec::new();
    for (now, requests) in batches {
        let got = engine.apply_batch(*now, requests);
        let want = model.apply_batch(*now, requests);
        assert_eq!(got, want, "batch at {now} of {requests:?}");
        engine.check_invariants();
        outs.push(got);
    }
    let ids = ids_in(batches);
    assert_same_state(&mut engine, &model, &ids);
    (engine, outs)
}

/// Runs `second_part` on both engines and checks they answer alike, batch after batch.
pub(super) fn assert_continue_alike(
    original: &mut Engine,
    loaded: &mut Engine,
    second_part: &[(i64, Vec<Request>)],
    ids: &[RequestId],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(loaded.batch_seq(), original.batch_seq());
    prop_assert_eq!(loaded.clock_ms(), original.clock_ms());
    prop_assert_eq!(
        loaded.skus().collect::<Vec<_>>(),
        original.skus().collect::<Vec<_>>()
    );
    prop_assert_eq!(loaded.next_expiry_ms(), original.next_expiry_ms());
    let keys = |e: &Engine| {
        let mut k: Vec<_> = e
            .admin_keys()
            .map(|k| (k.idempotency_key, k.command))
            .collect();
        k.sort();
        k
    };
    prop_assert_eq!(keys(loaded), keys(original));
    prop_assert_eq!(
        loaded.queued().collect::<Vec<_>>(),
        original.queued().collect::<Vec<_>>()
    );
    for (now, requests) in second_part {
        let a = original.apply_batch(*now, requests);
        let b = loaded.apply_batch(*now, requests);
        prop_assert_eq!(&a, &b, "batch at {} of {:?}", now, requests);
    }
    loaded.check_invariants();
    for &id in ids {
        prop_assert_eq!(original.reservation(id), loaded.reservation(id));
    }
    Ok(())
}
