//! `sequencer rebase-log`: the way back from a lost requests log that keeps every committed sale.
//!
//! It checks the log exactly as a starting sequencer does; only if the log is lost (or with
//! `--force`) does it record, in one fenced Postgres transaction, that decisions continue at
//! offset X of a new log generation (see `persistence::loggen`). Nothing committed is touched:
//! reservations, stock and idempotency keys stay as they are, so a buyer retrying with a key
//! decided before the loss gets that first outcome, on the new log as on the old.

use std::time::Duration;

use anyhow::{bail, Context};
use persistence::{lease, loggen};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::log::{self, LogIdentity, LogLost};
use crate::topic::{self, TopicState};

/// Where the new generation starts in the (new) topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A new topic (another topic id, or another name): its first offset, as [`Target::Start`].
    /// The same topic (it lost records but is the one Postgres's offsets refer to): the
    /// committed offset, clamped into what the topic holds, so a surviving record that was
    /// already decided is never decided again (an admin restock applied twice would add stock).
    Auto,
    /// The first offset the topic holds: every request appended since the loss is decided
    /// (their buyers got 504 and may have retried; a retry under the same key gets the first
    /// outcome, so deciding both is safe).
    Start,
    /// The topic's end: requests appended since the loss are never decided (their buyers got
    /// 504 and must retry).
    End,
    Offset(i64),
}

pub struct Args {
    pub database_url: String,
    pub brokers: String,
    pub requests_topic: String,
    pub target: Target,
    /// Rebase even when the current log looks whole (re-deciding or skipping is then on the
    /// operator).
    pub force: bool,
    /// Check and print the plan, change nothing.
    pub dry_run: bool,
    pub reason: Option<String>,
    /// The partition of the requests topic whose database this is.
    pub partition: i32,
}

/// Runs the command: Ok when a new generation was recorded (or, dry run, would be).
pub fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    // No migration here: the sequencers of this version have applied it (log_generations).
    let pool = rt.block_on(persistence::connect(&args.database_url, 2))?;
    let state = rt.block_on(lease::read_state(&pool))?;
    let generation = rt.block_on(loggen::current(&pool))?;
    let identity = LogIdentity::of(&generation, &args.requests_topic, args.partition);
    println!(
        "postgres: log generation {} (topic {:?}, id {}, from offset {}), {} batches committed, \
         next offset {}, epoch {}",
        identity.generation,
        identity.topic,
        identity.topic_id.as_deref().unwrap_or("not recorded"),
        identity.base_offset,
        state.batch_seq,
        state.next_offset,
        state.epoch
    );
    let config = log::consumer_config(&args.brokers, "rebase-log", 100);
    // The log Postgres's offsets refer to is checked, whichever topic the new generation reads.
    let diagnosis = match log::check_log(&config, &identity, state.next_offset) {
        Ok(_) => None,
        Err(e) => match e.downcast::<LogLost>() {
            Ok(lost) => Some(lost.message),
            Err(e) => return Err(e.context("checking the current log")),
        },
    };
    if identity.topic != args.requests_topic {
        println!(
            "the new generation reads topic {:?} instead of {:?}",
            args.requests_topic, identity.topic
        );
    }
    match &diagnosis {
        Some(why) => println!("the current log is lost: {why}"),
        None if args.force => {
            println!("the current log holds every decided offset; rebasing anyway (--force)")
        }
        None => bail!(
            "topic {:?} still holds every offset decided in generation {} and is the same topic: \
             nothing to recover. Rebasing now would re-decide or skip requests; use --force \
             only if you know why.",
            identity.topic,
            identity.generation
        ),
    }

    let consumer: BaseConsumer = config.create().context("creating a Kafka client")?;
    let topic = args.requests_topic.as_str();
    let topic_id = match topic::describe(consumer.client(), topic, Duration::from_secs(10))? {
        TopicState::Exists { id } => id,
        TopicState::Missing => bail!(
            "topic {topic:?} does not exist: create it first (sequencer create-topics), then \
             run rebase-log again"
        ),
    };
    let (low, high) = log::watermarks(
        &consumer,
        &LogIdentity {
            topic: topic.to_owned(),
            ..identity.clone()
        },
        Duration::from_secs(10),
    )?;
    let same_topic = topic == identity.topic && topic_id.is_some() && topic_id == identity.topic_id;
    let base_offset = match args.target {
        Target::Auto if same_topic => state.next_offset.clamp(low, high),
        Target::Auto | Target::Start => low,
        Target::End => high,
        Target::Offset(x) if (low..=high).contains(&x) => x,
        Target::Offset(x) => {
            bail!("offset {x} is outside topic {topic:?}, which holds offsets {low}..{high}")
        }
    };
    println!(
        "new generation {}: topic {topic:?} (id {}), holding offsets {low}..{high}; decisions \
         continue at offset {base_offset}",
        identity.generation + 1,
        topic_id.as_deref().unwrap_or("none reported"),
    );
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    let request = loggen::RebaseRequest {
        expected_generation: identity.generation,
        expected_batch_seq: state.batch_seq,
        expected_next_offset: state.next_offset,
        topic: topic.to_owned(),
        topic_id,
        base_offset,
        reason: args.reason.clone().unwrap_or_else(|| {
            format!(
                "rebase-log: {}",
                diagnosis.as_deref().unwrap_or("forced by the operator")
            )
        }),
    };
    let rebased = rt.block_on(loggen::rebase(&pool, &request))?;
    println!(
        "rebased: generation {} starts at offset {} of {topic:?} with batch {}; writer epoch is \
         now {} (no writer of the old log can commit). Sequencers waiting on the lost log load \
         the new generation within a second; any other sequencer is fenced and restarts as a \
         standby.",
        rebased.generation, rebased.base_offset, rebased.first_batch_seq, rebased.epoch
    );
    Ok(())
}
