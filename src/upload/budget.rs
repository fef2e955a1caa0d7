//! The global part-buffer budget. A part's bytes are reserved before they are read; when the
//! budget is spent, uploads wait here and stop reading their sockets (TCP backpressure).
//! Whole parts are reserved at once: reserving piecemeal could deadlock with every upload
//! holding half a part.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::part::{BLOCK, BlockPool, PartBuf};
use crate::metrics::Metrics;

/// Permits are KiB so that one acquire (u32 permits) can cover a 5 GiB part.
const UNIT: u64 = 1024;

#[derive(Clone, Debug)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    units: u64,
    metrics: Arc<Metrics>,
    /// Where reserved bytes live: blocks recycled between parts.
    pool: BlockPool,
}

#[derive(Debug)]
pub struct Reservation {
    permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

fn units(bytes: u64) -> u64 {
    bytes.div_ceil(UNIT)
}

/// What holding `bytes` costs: pooled parts occupy whole blocks.
fn charge(bytes: u64) -> u64 {
    let block = BLOCK as u64;
    if bytes >= block {
        bytes.div_ceil(block) * block
    } else {
        bytes
    }
}

impl Budget {
    pub fn new(bytes: u64, metrics: Arc<Metrics>) -> Self {
        let units = units(bytes);
        metrics
            .budget_bytes
            .set(i64::try_from(units * UNIT).unwrap_or(i64::MAX));
        Self {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            units,
            metrics,
            pool: BlockPool::default(),
        }
    }

    /// A part buffer for `capacity` reserved bytes.
    pub fn part_buf(&self, capacity: u64) -> PartBuf {
        PartBuf::new(&self.pool, capacity)
    }

    /// Waits (fairly, FIFO) until `bytes` fit in the budget.
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let n = units(charge(bytes)).min(self.units);
        let permit = Arc::clone(&self.semaphore)
            .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
            .await
            .expect("the budget semaphore is never closed");
        self.metrics
            .budget_in_use_bytes
            .inc_by(i64::try_from(n * UNIT).unwrap_or(i64::MAX));
        Reservation {
            permit,
            metrics: Arc::clone(&self.metrics),
        }
    }

    pub fn available_bytes(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }
}

impl Reservation {
    /// Gives back what a short (final) part did not use.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = units(charge(bytes)) as usize;
        let extra = self.permit.num_permits().saturating_sub(keep);
        if let Some(released) = self.permit.split(extra) {
            self.metrics
                .budget_in_use_bytes
                .dec_by((released.num_permits() as u64 * UNIT) as i64);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics
            .budget_in_use_bytes
            .dec_by((self.permit.num_permits() as u64 * UNIT) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_when_spent_and_shrinks() {
        let metrics = Arc::new(Metrics::default());
        let budget = Budget::new(10 * UNIT, Arc::clone(&metrics));
        let mut a = budget.reserve(8 * UNIT).await;
        assert_eq!(metrics.budget_in_use_bytes.get(), 8 * UNIT as i64);
        let b = budget.clone();
        let waiting = tokio::spawn(async move { b.reserve(5 * UNIT).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "must wait while the budget is spent"
        );
        a.shrink_to(2 * UNIT + 1);
        assert_eq!(metrics.budget_in_use_bytes.get(), 3 * UNIT as i64);
        let c = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(budget.available_bytes(), 2 * UNIT);
        drop((a, c));
        assert_eq!(budget.available_bytes(), 10 * UNIT);
        assert_eq!(metrics.budget_in_use_bytes.get(), 0);
    }

    #[tokio::test]
    async fn oversized_request_is_clamped_not_deadlocked() {
        let budget = Budget::new(4 * UNIT, Arc::new(Metrics::default()));
        let r = tokio::time::timeout(Duration::from_secs(1), budget.reserve(100 * UNIT))
            .await
            .unwrap();
        assert_eq!(budget.available_bytes(), 0);
        drop(r);
    }
}
