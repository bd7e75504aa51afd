//! Engine micro-benchmark: decisions/s of `Engine::apply_batch` on one thread, for one hot SKU.
//!
//! Each batch is one `Restock` of a tenth of the batch size (so grants keep happening) followed by
//! reserve commands: ~5% exact repeats of the previous batch's requests (idempotent replays),
//! the rest new keys from 200,000 buyers with a per-user limit of 2, so the mix holds grants,
//! `sold_out`, `limit_exceeded` and replays. Building the requests (the strings a decoder would
//! allocate) is not timed; deciding them, including every copy the engine keeps, is. The engine
//! is replaced by a fresh one (untimed) every million requests, so its maps stay the size of one
//! flash sale instead of growing without bound. Like the sequencer's (`ENGINE_HEADROOM_DECISIONS`),
//! the fresh engine reserves room for those million decisions, so no table grows mid-run; the
//! pages are still touched for the first time while timed.
//!
//! Run: `cargo bench -p engine`. Throughput is reported in elements/s, one
//! element per command: that is decisions/s.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::Engine;
use wire::{Command, Request, SkuConfig};

const SKU: &str = "hot-sku";
const USERS: u64 = 200_000;
const RESET_EVERY: u64 = 1_000_000;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct State {
    engine: Engine,
    batch: usize,
    counter: u64,
    since_reset: u64,
    now_ms: i64,
    previous: Vec<Request>,
}

impl State {
    fn new(batch: usize) -> State {
        let mut s = State {
            engine: Engine::new(),
            batch,
            counter: 0,
            since_reset: 0,
            now_ms: 1_700_000_000_000,
            previous: Vec::new(),
        };
        s.reset();
        s
    }

    fn reset(&mut self) {
        self.engine = Engine::new();
        self.engine.reserve_room(RESET_EVERY as usize);
        self.since_reset = 0;
        self.previous.clear();
        let upsert = Request {
            request_id: u128::from(self.next_id()),
            ingress_id: 1,
            command: Command::UpsertSku {
                sku: SKU.into(),
                config: SkuConfig {
                    total_stock: 1_000,
                    per_user_limit: 2,
                    hold_ttl_ms: 300_000,
                    starts_at_ms: None,
                    ends_at_ms: None,
                    queue: None,
                },
            },
        };
        self.now_ms += 1;
        self.engine.apply_batch(self.now_ms, &[upsert]);
    }

    fn next_id(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// The next batch (not timed).
    fn next_batch(&mut self) -> Vec<Request> {
        if self.since_reset >= RESET_EVERY {
            self.reset();
        }
        let mut out = Vec::with_capacity(self.batch);
        let id = self.next_id();
        out.push(Request {
            request_id: u128::from(id),
            ingress_id: 1,
            command: Command::Restock {
                sku: SKU.into(),
                quantity: (self.batch / 10) as u64,
            },
        });
        while out.len() < self.batch {
            let id = self.next_id();
            let repeat = !self.previous.is_empty() && mix(id ^ 0xBEEF) % 100 < 5;
            let command = if repeat {
                let i = (mix(id) % self.previous.len() as u64) as usize;
                self.previous[i].command.clone()
            } else {
                Command::Reserve {
                    sku: SKU.into(),
                    user_id: format!("u{}", mix(id) % USERS),
                    quantity: 1,
                    idempotency_key: format!("k{id}"),
                }
            };
            out.push(Request {
                request_id: u128::from(id) << 32,
                ingress_id: 1,
                command,
            });
        }
        self.since_reset += self.batch as u64;
        out
    }
}

fn apply_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_batch");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(30);
    for batch in [250usize, 2000] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("hot_sku_mix", batch),
            &batch,
            |b, &batch| {
                let mut state = State::new(batch);
                // Warm the maps to a realistic size before measuring.
                for _ in 0..(200_000 / batch) {
                    let requests = state.next_batch();
                    state.now_ms += 1;
                    state.engine.apply_batch(state.now_ms, &requests);
                    state.previous = requests;
                }
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let requests = state.next_batch();
                        state.now_ms += 1;
                        let started = Instant::now();
                        let out = state
                            .engine
                            .apply_batch(black_box(state.now_ms), black_box(&requests));
                        total += started.elapsed();
                        black_box(&out);
                        drop(out);
                        state.previous = requests;
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, apply_batch);
criterion_main!(benches);
