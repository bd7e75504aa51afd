//! Shared by the persistence tests: each test makes its own database on the real Postgres
//! (FLASH_PG_ADMIN_URL, default postgres://postgres@127.0.0.1:5432/postgres), migrated.

/// Creates and migrates a database of its own; returns its URL.
pub async fn fresh_database(name: &str) -> String {
    let db = format!("flash_p_{name}_{:08x}", harness::rand32());
    let url = harness::db::fresh_database(&harness::pg_admin_url(), &db)
        .await
        .expect("Postgres reachable");
    let pool = persistence::connect(&url, 2).await.unwrap();
    persistence::migrate(&pool).await.unwrap();
    url
}

/// Takes the free writer lease for `holder`; returns the epoch it fences with.
pub async fn take_lease(pool: &sqlx::PgPool, holder: &str, lease: std::time::Duration) -> u64 {
    persistence::lease::try_acquire(pool, holder, lease)
        .await
        .unwrap()
        .expect("a free lease")
        .epoch
}
