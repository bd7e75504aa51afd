//! The model's admin commands: upsert, restock, pause and resume, the freeze, and keyed admin
//! commands, as plainly as the rest of the model.

use wire::{Command, Outcome, Reject, Request, ReservationStatus, SkuConfig};

use super::{Model, ModelSku};
use crate::{AdminKeyApplied, BatchOutput, HOLD_TTL_MS_MAX, QUANTITY_MAX, STOCK_MAX};
use wire::limits::QUEUE_MAX;

impl Model {
    /// An admin command under an idempotency key: applied once per key.
    pub(super) fn keyed_admin(
        &mut self,
        index: u32,
        request: &Request,
        idempotency_key: &str,
        command: &Command,
        out: &mut BatchOutput,
    ) -> Outcome {
        if !command.is_admin() || idempotency_key.is_empty() {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let encoded = wire::encode(command);
        if let Some((_, first, outcome)) = self
            .admin_keys
            .iter()
            .find(|(k, _, _)| k == idempotency_key)
        {
            return if *first == encoded {
                outcome.clone()
            } else {
                Outcome::Rejected(Reject::IdempotencyKeyReused)
            };
        }
        let plain = Request {
            command: command.clone(),
            ..request.clone()
        };
        let outcome = self.decide(index, &plain, out);
        if !matches!(outcome, Outcome::Rejected(_)) {
            self.admin_keys
                .push((idempotency_key.to_owned(), encoded.clone(), outcome.clone()));
            out.admin_keys.push(AdminKeyApplied {
                command_index: index,
                command: encoded,
            });
        }
        outcome
    }

    /// Pauses every SKU not paused yet.
    pub(super) fn pause_all(&mut self) -> Outcome {
        let mut newly_paused = Vec::new();
        for sku in &mut self.skus {
            if !sku.paused {
                sku.paused = true;
                newly_paused.push(sku.name.clone());
            }
        }
        for name in &newly_paused {
            self.touch(name);
        }
        Outcome::Frozen {
            skus_paused: newly_paused.len() as u32,
        }
    }

    pub(super) fn upsert(&mut self, name: &str, config: &SkuConfig) -> Outcome {
        let window_ok = match (config.starts_at_ms, config.ends_at_ms) {
            (Some(starts_at), Some(ends_at)) => starts_at < ends_at,
            _ => true,
        };
        let queue_ok = match (&config.queue, config.starts_at_ms) {
            (None, _) => true,
            (Some(q), Some(starts_at)) => {
                q.opens_at_ms >= 0 && q.opens_at_ms < starts_at && q.max >= 1 && q.max <= QUEUE_MAX
            }
            (Some(_), None) => false,
        };
        let valid = config.total_stock <= STOCK_MAX
            && config.per_user_limit >= 1
            && config.per_user_limit <= QUANTITY_MAX
            && config.hold_ttl_ms >= 1
            && config.hold_ttl_ms <= HOLD_TTL_MS_MAX
            && window_ok
            && queue_ok;
        if !valid {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        if self.sku_row(name).is_some() {
            let committed = self.units(name, ReservationStatus::Held)
                + self.units(name, ReservationStatus::Confirmed);
            if config.total_stock < committed {
                return Outcome::Rejected(Reject::StockBelowCommitted);
            }
            self.sku_mut(name).expect("present").config = config.clone();
        } else {
            self.skus.push(ModelSku {
                name: name.to_owned(),
                config: config.clone(),
                paused: false,
                queue: Vec::new(),
            });
        }
        self.touch(name);
        Outcome::Sku(self.sku_view(name).expect("present"))
    }

    pub(super) fn restock(&mut self, name: &str, quantity: u64) -> Outcome {
        let Some(sku) = self.sku_row(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0 {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let new_total = u128::from(sku.config.total_stock) + u128::from(quantity);
        if new_total > u128::from(STOCK_MAX) {
            return Outcome::Rejected(Reject::StockOverflow);
        }
        self.sku_mut(name).expect("present").config.total_stock = new_total as u64;
        self.touch(name);
        Outcome::Sku(self.sku_view(name).expect("present"))
    }

    pub(super) fn set_paused(&mut self, name: &str, paused: bool) -> Outcome {
        let Some(sku) = self.sku_mut(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        sku.paused = paused;
        // Reported even when it was already in that state (the engine does the same).
        self.touch(name);
        Outcome::Sku(self.sku_view(name).expect("present"))
    }
}
