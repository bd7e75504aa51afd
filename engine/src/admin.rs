//! The operators' commands: upsert, restock, pause and resume a SKU, the emergency freeze, and
//! the idempotency keys they may be applied under.

use wire::{Command, Outcome, Reject, SkuConfig};

use crate::output::{AdminKeyApplied, AdminKeyRecord, BatchOutput};
use crate::state::{Engine, Sku};
use crate::{SkuIdx, STOCK_MAX};

impl Engine {
    /// An operator's command under an idempotency key: applied once per key. A retry (the same
    /// command under the key) gets the first outcome and changes nothing; another command
    /// under the key is refused. A refused command records nothing, so its key stays free.
    pub(crate) fn keyed_admin(
        &mut self,
        index: u32,
        key: &str,
        command: &Command,
        out: &mut BatchOutput,
    ) -> Outcome {
        let encoded = wire::encode(command);
        if let Some((first, outcome)) = self.admin_keys.get(key) {
            return if *first == encoded {
                outcome.clone()
            } else {
                Outcome::Rejected(Reject::IdempotencyKeyReused)
            };
        }
        let outcome = self.admin(command);
        if !matches!(outcome, Outcome::Rejected(_)) {
            self.admin_keys
                .insert(key.to_owned(), (encoded.clone(), outcome.clone()));
            out.admin_keys.push(AdminKeyApplied {
                command_index: index,
                command: encoded,
            });
        }
        outcome
    }

    pub(crate) fn admin(&mut self, command: &Command) -> Outcome {
        match command {
            Command::UpsertSku { sku, config } => self.upsert_sku(sku, config),
            Command::Restock { sku, quantity } => self.restock(sku, *quantity),
            Command::Pause { sku } => self.set_paused(sku, true),
            Command::Resume { sku } => self.set_paused(sku, false),
            Command::PauseAll => {
                let mut paused = 0;
                for sku in &mut self.skus {
                    if !sku.paused {
                        sku.paused = true;
                        sku.dirty_in_batch = self.batch_seq;
                        paused += 1;
                    }
                }
                Outcome::Frozen {
                    skus_paused: paused,
                }
            }
            // Not an admin command: `fields_ok` refuses these before they get here.
            _ => Outcome::Rejected(Reject::InvalidCommand),
        }
    }

    /// Every admin key applied so far, in no particular order.
    pub fn admin_keys(&self) -> impl Iterator<Item = AdminKeyRecord> + '_ {
        self.admin_keys
            .iter()
            .map(|(key, (command, outcome))| AdminKeyRecord {
                idempotency_key: key.clone(),
                command: command.clone(),
                outcome: outcome.clone(),
            })
    }

    /// Adds admin keys stored in Postgres (`admin_commands`) to a restored engine: checkpoints
    /// do not carry them. Only keys applied up to the engine's `batch_seq` belong here; later
    /// ones come back when their batches are replayed.
    pub fn restore_admin_keys(&mut self, keys: impl IntoIterator<Item = AdminKeyRecord>) {
        for k in keys {
            self.admin_keys
                .insert(k.idempotency_key, (k.command, k.outcome));
        }
    }

    fn upsert_sku(&mut self, name: &str, config: &SkuConfig) -> Outcome {
        if !config.is_valid() {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let batch_seq = self.batch_seq;
        let sku = match self.sku_index.get(name) {
            Some(&i) => {
                let sku = &mut self.skus[i as usize];
                let committed = sku.held + sku.sold;
                if config.total_stock < committed {
                    return Outcome::Rejected(Reject::StockBelowCommitted);
                }
                sku.available = config.total_stock - committed;
                sku.config = config.clone();
                sku
            }
            None => {
                let idx = SkuIdx::try_from(self.skus.len()).expect("fewer than 2^32 skus");
                self.sku_index.insert(name.to_owned(), idx);
                self.skus.push(Sku {
                    name: name.to_owned(),
                    config: config.clone(),
                    available: config.total_stock,
                    held: 0,
                    sold: 0,
                    paused: false,
                    dirty_in_batch: 0,
                });
                self.skus.last_mut().expect("just pushed")
            }
        };
        sku.dirty_in_batch = batch_seq;
        Outcome::Sku(sku.view())
    }

    fn restock(&mut self, name: &str, quantity: u64) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        if quantity == 0 {
            return Outcome::Rejected(Reject::InvalidCommand);
        }
        let sku = &mut self.skus[i as usize];
        match sku.total().checked_add(quantity) {
            Some(total) if total <= STOCK_MAX => {
                sku.config.total_stock = total;
                sku.available += quantity;
                sku.dirty_in_batch = self.batch_seq;
                Outcome::Sku(sku.view())
            }
            _ => Outcome::Rejected(Reject::StockOverflow),
        }
    }

    fn set_paused(&mut self, name: &str, paused: bool) -> Outcome {
        let Some(&i) = self.sku_index.get(name) else {
            return Outcome::Rejected(Reject::UnknownSku);
        };
        let sku = &mut self.skus[i as usize];
        sku.paused = paused;
        sku.dirty_in_batch = self.batch_seq;
        Outcome::Sku(sku.view())
    }
}
