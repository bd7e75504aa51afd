//! A database of one's own on the real Postgres, made through a superuser connection.

use std::process::{Command, Stdio};

use anyhow::Context;

/// The URL of database `db` on the server of `admin_url` (same user and host, other path).
pub fn database_url(admin_url: &str, db: &str) -> String {
    let base = &admin_url[..admin_url.rfind('/').unwrap_or(admin_url.len())];
    format!("{base}/{db}")
}

/// Creates database `db` (dropping a leftover of the same name first); returns its URL.
pub async fn fresh_database(admin_url: &str, db: &str) -> anyhow::Result<String> {
    let admin = sqlx::PgPool::connect(admin_url)
        .await
        .context("connecting to Postgres as superuser (is it up?)")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE \"{db}\""))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(database_url(admin_url, db))
}

/// Drops database `db`, best effort, without an async runtime (it runs `psql`, so it can be
/// called from `Drop`).
pub fn drop_database(admin_url: &str, db: &str) {
    let _ = Command::new("psql")
        .args([
            admin_url,
            "-qc",
            &format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::database_url;

    #[test]
    fn a_database_url_replaces_the_path_of_the_admin_url() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "flash_t_x"),
            "postgres://postgres@127.0.0.1:5432/flash_t_x"
        );
    }
}
