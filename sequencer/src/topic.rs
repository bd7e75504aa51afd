//! Which topic the requests log is: its Kafka topic id.
//!
//! A topic deleted and created again under the same name starts over at offset 0, and once it is
//! refilled past the committed offset nothing in the offsets or the watermarks tells it from the
//! original. Its topic id (KIP-516, reported by Apache Kafka since 2.8 and by other Kafka-API
//! brokers) does. librdkafka itself notices a changed id but keeps fetching the assigned partition
//! at the same offset, so the sequencer asks the id itself through the Admin API's DescribeTopics
//! (librdkafka 2.3+; the `rdkafka` crate has no wrapper for it, hence the FFI below).

use std::ffi::{c_char, CStr, CString};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::types::RDKafkaErrorCode;

/// What the broker says about a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicState {
    /// The topic exists; `id` is its topic id, `None` when the broker reports none (all zeros).
    Exists { id: Option<String> },
    /// The broker answered that no such topic exists.
    Missing,
}

/// Asks the broker about `topic` through `client` (any librdkafka handle: a consumer here).
/// Broker trouble (no answer within `timeout`) is an error; "no such topic" is [`TopicState::Missing`].
pub fn describe<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<TopicState> {
    let name = CString::new(topic).context("topic name with a NUL byte")?;
    let timeout_ms = timeout.as_millis().clamp(1, i32::MAX as u128 / 2) as i32;
    let rk = client.native_ptr();
    // SAFETY: every object created here is destroyed before returning, after its last use; the
    // result event (and the descriptions it owns) is read only while it is alive, and strings
    // are copied out of it. `rk` outlives the call (borrowed `client`).
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let mut names = [name.as_ptr()];
        let topics = rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        );
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        rd::rd_kafka_DescribeTopics(rk, topics, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, timeout_ms + 1_000);
        let result = read_result(event, topic);
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_TopicCollection_destroy(topics);
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}

unsafe fn read_result(event: *mut rd::rd_kafka_event_t, topic: &str) -> anyhow::Result<TopicState> {
    if event.is_null() {
        bail!("no answer from the broker about topic {topic:?} (is it up?)");
    }
    let err = RDKafkaErrorCode::from(rd::rd_kafka_event_error(event));
    if err != RDKafkaErrorCode::NoError {
        let text = c_string(rd::rd_kafka_event_error_string(event));
        if is_missing(err) {
            return Ok(TopicState::Missing);
        }
        bail!("describing topic {topic:?}: {err} ({text})");
    }
    let result = rd::rd_kafka_event_DescribeTopics_result(event);
    if result.is_null() {
        bail!("describing topic {topic:?}: unexpected admin result");
    }
    let mut count = 0usize;
    let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
    if count != 1 || descriptions.is_null() {
        bail!("describing topic {topic:?}: {count} descriptions returned");
    }
    let description = *descriptions;
    let error = rd::rd_kafka_TopicDescription_error(description);
    if !error.is_null() {
        let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(error));
        if code != RDKafkaErrorCode::NoError {
            if is_missing(code) {
                return Ok(TopicState::Missing);
            }
            return Err(anyhow!(
                "describing topic {topic:?}: {code} ({})",
                c_string(rd::rd_kafka_error_string(error))
            ));
        }
    }
    let id = rd::rd_kafka_TopicDescription_topic_id(description);
    if id.is_null()
        || (rd::rd_kafka_Uuid_most_significant_bits(id) == 0
            && rd::rd_kafka_Uuid_least_significant_bits(id) == 0)
    {
        return Ok(TopicState::Exists { id: None });
    }
    Ok(TopicState::Exists {
        id: Some(c_string(rd::rd_kafka_Uuid_base64str(id))),
    })
}

fn is_missing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicId
    )
}

unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
