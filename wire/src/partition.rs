//! Which partition of the requests log a SKU lives in.
//!
//! Every SKU is decided by exactly one partition's writer, so every ingress must compute the
//! same partition for a name without asking anyone. The hash is Apache Kafka's own default for
//! keyed records (32-bit murmur2 of the key's bytes, seed `0x9747b28c`, sign bit cleared, modulo
//! the partition count): a Java producer keyed by the SKU name, or librdkafka with
//! `partitioner=murmur2_random`, lands on the same partition. The tests pin it against values
//! computed with Kafka's `Utils.murmur2` (kafka-clients 4.1.1).
//!
//! The mapping depends on the partition count: a store's count is fixed when its first SKU is
//! created, and the sequencer refuses a log whose count differs from the one recorded.

/// Largest partition count the requests topic may have here.
pub const PARTITIONS_MAX: u32 = 256;

/// Kafka's murmur2 (the 32-bit MurmurHash2 variant its partitioner uses).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `sku` among `partitions` (at least 1).
pub fn partition_of(sku: &str, partitions: u32) -> u32 {
    assert!(partitions >= 1, "a log has at least one partition");
    (murmur2(sku.as_bytes()) as u32 & 0x7fff_ffff) % partitions
}

/// With several partitions, every request id carries its partition in its low byte (the
/// ingress tags it), so that a reservation id alone says where the reservation lives: a confirm,
/// a cancel or a read goes straight to it. With one partition ids are left as they are.
pub fn tag(id: u128, partition: u32, partitions: u32) -> u128 {
    if partitions <= 1 {
        id
    } else {
        (id & !0xff) | u128::from(partition as u8)
    }
}

/// The partition an id was tagged with; `None` when the tag names no partition of `partitions`.
pub fn of_id(id: u128, partitions: u32) -> Option<u32> {
    if partitions <= 1 {
        return Some(0);
    }
    let p = (id & 0xff) as u32;
    (p < partitions).then_some(p)
}

/// The partition `command` goes to: its SKU's, or for a confirm or cancel its reservation's.
/// The emergency freeze goes to every partition, one copy each, under ids tagged with each
/// one: its partition is its `request_id`'s.
pub fn of_command(command: &crate::Command, request_id: u128, partitions: u32) -> Option<u32> {
    use crate::Command;
    match command {
        Command::Reserve { sku, .. }
        | Command::UpsertSku { sku, .. }
        | Command::Restock { sku, .. }
        | Command::Pause { sku }
        | Command::Resume { sku } => Some(partition_of(sku, partitions)),
        Command::Confirm { reservation_id } | Command::Cancel { reservation_id } => {
            of_id(*reservation_id, partitions)
        }
        Command::PauseAll => of_id(request_id, partitions),
        Command::Admin { command, .. } => of_command(command, request_id, partitions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;

    #[test]
    fn ids_carry_their_partition_only_when_there_are_several() {
        let id = 0x0193_a0c4_7e0a_7c3e_9a51_3f7c_2b8d_4eff_u128;
        assert_eq!(tag(id, 0, 1), id);
        assert_eq!(of_id(id, 1), Some(0));
        let tagged = tag(id, 3, 4);
        assert_eq!(tagged >> 8, id >> 8);
        assert_eq!(of_id(tagged, 4), Some(3));
        assert_eq!(
            of_id(tag(id, 5, 8), 4),
            None,
            "a tag beyond the count names nothing"
        );
    }

    #[test]
    fn a_command_goes_to_its_skus_partition_or_its_reservations() {
        let reserve = Command::Reserve {
            sku: "sku-1".into(),
            user_id: "u".into(),
            quantity: 1,
            idempotency_key: "k".into(),
        };
        assert_eq!(of_command(&reserve, 0, 4), Some(3));
        let admin = Command::Admin {
            idempotency_key: "k".into(),
            command: Box::new(Command::Pause { sku: "a".into() }),
        };
        assert_eq!(of_command(&admin, 0, 4), Some(0));
        let confirm = Command::Confirm {
            reservation_id: tag(77 << 8, 2, 4),
        };
        assert_eq!(of_command(&confirm, 0, 4), Some(2));
        assert_eq!(
            of_command(&Command::PauseAll, tag(5 << 8, 1, 4), 4),
            Some(1)
        );
    }

    /// `(key, Utils.murmur2(key), partition of 4, partition of 7)` from kafka-clients 4.1.1.
    const KAFKA: [(&str, i32, u32, u32); 10] = [
        ("", 275_646_681, 1, 2),
        ("a", -1_563_381_124, 0, 5),
        ("ab", 316_155_434, 2, 0),
        ("abc", 479_470_107, 3, 4),
        ("abcd", -1_323_649_548, 0, 5),
        ("sku-1", -418_539_829, 3, 1),
        ("sku-42", 794_416_707, 3, 0),
        ("flash-tee", 1_983_280_072, 0, 4),
        ("ÄÖ-ü", 930_145_347, 3, 5),
        ("SKU_000123456789", -831_159_396, 0, 5),
    ];

    #[test]
    fn the_hash_and_the_partition_are_kafkas_own() {
        for (key, hash, of4, of7) in KAFKA {
            assert_eq!(murmur2(key.as_bytes()), hash, "murmur2({key:?})");
            assert_eq!(partition_of(key, 4), of4, "{key:?} of 4");
            assert_eq!(partition_of(key, 7), of7, "{key:?} of 7");
        }
    }

    #[test]
    fn one_partition_holds_every_sku() {
        for (key, ..) in KAFKA {
            assert_eq!(partition_of(key, 1), 0);
        }
    }

    #[test]
    fn forty_skus_spread_over_four_partitions() {
        let mut per = [0u32; 4];
        for i in 0..40 {
            per[partition_of(&format!("sku-{i}"), 4) as usize] += 1;
        }
        assert!(per.iter().all(|&n| n >= 4), "{per:?}");
    }
}
