//! Where each partition of the requests log keeps its state: one database per partition.
//!
//! A partition's writer owns its database outright (the fence row, batches, decisions, the SKUs
//! that hash to it), so nothing is shared between partitions and every invariant stays inside
//! one database. Partition 0 uses `DATABASE_URL` as given; partition `p` the same server and
//! credentials with the database name suffixed `_p{p}` (`flash`, `flash_p1`, `flash_p2`, ...).
//! `DATABASE_URLS` names every partition's database explicitly instead, for partitions on
//! other Postgres servers.
//!
//! The database records which partition of how many it holds (`sequencer_state.log_partition`
//! and `log_partitions`, see [`claim`]), so a database is never served as another partition,
//! and a store's partition count (which decides where every SKU lives) never changes under it.

use anyhow::{bail, ensure};
use sqlx::PgPool;

/// The database URL of partition `partition` when only `DATABASE_URL` is given.
pub fn derived_url(base: &str, partition: u32) -> anyhow::Result<String> {
    if partition == 0 {
        return Ok(base.to_owned());
    }
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let Some((server, name)) = head
        .rsplit_once('/')
        .filter(|(s, n)| s.contains("//") && !s.ends_with('/') && !n.is_empty())
    else {
        bail!("DATABASE_URL {base:?} names no database (postgres://user@host:port/name)");
    };
    let mut url = format!("{server}/{name}_p{partition}");
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok(url)
}

/// The database URL of each of `partitions` partitions: `explicit` (one per partition, in
/// order) when given, else derived from `base`.
pub fn database_urls(
    base: &str,
    explicit: &[String],
    partitions: u32,
) -> anyhow::Result<Vec<String>> {
    if !explicit.is_empty() {
        ensure!(
            explicit.len() == partitions as usize,
            "DATABASE_URLS names {} databases, but REQUEST_PARTITIONS is {partitions}: name one per partition",
            explicit.len()
        );
        return Ok(explicit.to_vec());
    }
    (0..partitions).map(|p| derived_url(base, p)).collect()
}

/// `url` with its password, if any, replaced by `***` (for messages and logs).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Records that this database holds partition `partition` of `partitions`, or refuses when it
/// already holds another one, or belongs to a store with another partition count. A database
/// that has decided nothing yet (no batch, no SKU) may be claimed afresh.
pub async fn claim(pool: &PgPool, partition: u32, partitions: u32) -> anyhow::Result<()> {
    let held: (i32, i32, i64) = sqlx::query_as(
        "UPDATE sequencer_state SET log_partition = $1, log_partitions = $2
         WHERE (log_partition = $1 AND log_partitions = $2)
            OR (batch_seq = 0 AND NOT EXISTS (SELECT 1 FROM skus))
         RETURNING log_partition, log_partitions, batch_seq",
    )
    .bind(partition as i32)
    .bind(partitions as i32)
    .fetch_optional(pool)
    .await?
    .map_or((-1, -1, -1), |r| r);
    if held.0 >= 0 {
        return Ok(());
    }
    let (was, of): (i32, i32) =
        sqlx::query_as("SELECT log_partition, log_partitions FROM sequencer_state")
            .fetch_one(pool)
            .await?;
    bail!(
        "this database holds partition {was} of a requests log with {of} partitions, but it is \
         configured as partition {partition} of {partitions}. The partition count decides where \
         every SKU lives and cannot change under a store that has SKUs; check REQUEST_PARTITIONS \
         and DATABASE_URL(S)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_zero_is_the_given_database_and_the_others_are_suffixed() {
        let base = "postgres://postgres@127.0.0.1:5432/flash";
        assert_eq!(derived_url(base, 0).unwrap(), base);
        assert_eq!(
            derived_url(base, 3).unwrap(),
            "postgres://postgres@127.0.0.1:5432/flash_p3"
        );
        assert_eq!(
            derived_url("postgres://u:pw@db/flash?sslmode=disable", 1).unwrap(),
            "postgres://u:pw@db/flash_p1?sslmode=disable"
        );
        assert!(derived_url("postgres://u@db", 1).is_err());
        assert!(derived_url("postgres://u@db/", 1).is_err());
    }

    #[test]
    fn a_password_never_shows() {
        assert_eq!(
            redacted("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn explicit_urls_must_name_every_partition() {
        let two = vec!["postgres://a/x".to_owned(), "postgres://b/y".to_owned()];
        assert_eq!(database_urls("ignored", &two, 2).unwrap(), two);
        assert!(database_urls("ignored", &two, 3).is_err());
        assert_eq!(
            database_urls("postgres://h/f", &[], 2).unwrap(),
            ["postgres://h/f", "postgres://h/f_p1"]
        );
    }
}
