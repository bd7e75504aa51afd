//! Shared by the persistence tests: each test makes its own database on the real Postgres
//! (FLASH_PG_ADMIN_URL, default postgres://postgres@127.0.0.1:5432/postgres), migrated.

use sqlx::PgPool;

/// Creates and migrates a database of its own; returns its URL.
pub async fn fresh_database(name: &str) -> String {
    let admin_url = std::env::var("FLASH_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = format!(
        "flash_p_{name}_{:08x}",
        uuid::Uuid::new_v4().as_u128() as u32
    );
    let admin = PgPool::connect(&admin_url)
        .await
        .expect("Postgres reachable");
    sqlx::query(&format!("CREATE DATABASE \"{db}\""))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", &admin_url[..admin_url.rfind('/').unwrap()]);
    let pool = persistence::connect(&url, 2).await.unwrap();
    persistence::migrate(&pool).await.unwrap();
    url
}
