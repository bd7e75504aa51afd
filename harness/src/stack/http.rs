//! The stack's HTTP client: the ingress's API as a test calls it, and the metrics of every
//! process.

use anyhow::bail;
use serde_json::{json, Value};

use super::{Stack, ADMIN_TOKEN};

impl Stack {
    pub async fn put_sku(
        &self,
        sku: &str,
        total: u64,
        per_user_limit: u32,
        ttl_s: f64,
    ) -> anyhow::Result<Value> {
        let (status, body) = self
            .admin("PUT", &format!("/v1/admin/skus/{sku}"),
                   Some(json!({"total_stock": total, "per_user_limit": per_user_limit, "hold_ttl_seconds": ttl_s})))
            .await?;
        if status != 200 {
            bail!("PUT sku answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        self.admin_keyed(method, path, body, None).await
    }

    /// An admin command, under `Idempotency-Key: key` when `key` is given.
    pub async fn admin_keyed(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.parse()?, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await?).await
    }

    pub async fn reserve(
        &self,
        sku: &str,
        user: &str,
        quantity: i64,
        key: &str,
    ) -> anyhow::Result<(u16, Value)> {
        let body =
            json!({"sku": sku, "user_id": user, "quantity": quantity, "idempotency_key": key});
        answer(
            self.http
                .post(format!("{}/v1/reservations", self.base))
                .json(&body)
                .send()
                .await?,
        )
        .await
    }

    /// Reserves one unit of `sku` for numbered buyer `i`: user `u{i}`, key `k{i}`.
    pub async fn reserve_one(
        &self,
        sku: &str,
        i: impl std::fmt::Display,
    ) -> anyhow::Result<(u16, Value)> {
        self.reserve(sku, &format!("u{i}"), 1, &format!("k{i}"))
            .await
    }

    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        answer(
            self.http
                .post(format!("{}{path}", self.base))
                .send()
                .await?,
        )
        .await
    }

    /// `POST /v1/reservations/{id}/confirm`.
    pub async fn confirm(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        self.post(&format!("/v1/reservations/{id}/confirm")).await
    }

    /// `POST /v1/reservations/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        self.post(&format!("/v1/reservations/{id}/cancel")).await
    }

    /// The ingress's whole answer to `GET path`, headers included.
    pub async fn get_response(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self.http.get(format!("{}{path}", self.base)).send().await?)
    }

    /// The ingress's Prometheus text.
    pub async fn ingress_metrics(&self) -> anyhow::Result<String> {
        let r = self.get_response("/metrics").await?;
        Ok(r.error_for_status()?.text().await?)
    }

    /// Sequencer `i`'s Prometheus text (from its status port).
    pub async fn sequencer_metrics(&self, i: usize) -> anyhow::Result<String> {
        let url = format!(
            "http://127.0.0.1:{}/metrics",
            self.sequencers[i].status_port
        );
        let r = self.http.get(url).send().await?;
        Ok(r.error_for_status()?.text().await?)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        answer(self.get_response(path).await?).await
    }
}

async fn answer(r: reqwest::Response) -> anyhow::Result<(u16, Value)> {
    let status = r.status().as_u16();
    let text = r.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, body))
}
