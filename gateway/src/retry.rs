//! The retry budget: retries stay a bounded share of traffic, so a sick cluster is not buried
//! under its own retries.
//!
//! Every request deposits `budget_ratio` of a token (0.2 by default); every retry withdraws a
//! whole one. Unused allowance carries over, up to what 1000 requests deposit, so a burst of
//! failures after a quiet spell is covered but cannot last. On top, `budget_min_per_sec` retries
//! per second are always allowed, so a low-traffic gateway still retries. Lock-free: two
//! atomics.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::config::RetryConfig;

/// Tokens are counted in thousandths.
const UNIT: i64 = 1000;
/// Carry-over cap, in requests' worth of deposits.
const CARRY_REQUESTS: i64 = 1000;

/// A retry budget shared by all requests.
#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    cap: i64,
    balance: AtomicI64,
    min_per_sec: u64,
    /// `second << 32 | floor retries used in that second`.
    floor: AtomicU64,
}

impl RetryBudget {
    /// A budget for `config`, starting empty (the floor still allows retries at once).
    pub fn new(config: &RetryConfig) -> Self {
        let deposit = (config.budget_ratio * UNIT as f64).round() as i64;
        RetryBudget {
            deposit,
            cap: (deposit * CARRY_REQUESTS).max(UNIT),
            balance: AtomicI64::new(0),
            min_per_sec: u64::from(config.budget_min_per_sec),
            floor: AtomicU64::new(0),
        }
    }

    /// Counts one incoming request.
    #[inline]
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let before = self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        if before + self.deposit > self.cap {
            // Racy clamp; being off by a few deposits is harmless.
            self.balance.store(self.cap, Ordering::Relaxed);
        }
    }

    /// Takes the allowance for one retry at `second` (any monotonic second count).
    pub fn try_withdraw(&self, second: u64) -> bool {
        let before = self.balance.fetch_sub(UNIT, Ordering::Relaxed);
        if before >= UNIT {
            return true;
        }
        self.balance.fetch_add(UNIT, Ordering::Relaxed);
        self.take_floor(second)
    }

    fn take_floor(&self, second: u64) -> bool {
        if self.min_per_sec == 0 {
            return false;
        }
        let mut current = self.floor.load(Ordering::Relaxed);
        loop {
            let (at, used) = (current >> 32, current & 0xffff_ffff);
            let used = if at == second & 0xffff_ffff { used } else { 0 };
            if used >= self.min_per_sec {
                return false;
            }
            let next = ((second & 0xffff_ffff) << 32) | (used + 1);
            match self
                .floor
                .compare_exchange(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_sec: u32) -> RetryBudget {
        RetryBudget::new(&RetryConfig {
            budget_ratio: ratio,
            budget_min_per_sec: min_per_sec,
            ..RetryConfig::default()
        })
    }

    #[test]
    fn ratio_bounds_retries() {
        let b = budget(0.2, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.try_withdraw(0)).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn floor_allows_a_few_per_second_without_traffic() {
        let b = budget(0.2, 3);
        assert_eq!((0..10).filter(|_| b.try_withdraw(7)).count(), 3);
        assert_eq!(
            (0..10).filter(|_| b.try_withdraw(8)).count(),
            3,
            "new second"
        );
    }

    #[test]
    fn carry_over_is_capped() {
        let b = budget(0.5, 0);
        for _ in 0..100_000 {
            b.deposit();
        }
        let allowed = (0..1000).filter(|_| b.try_withdraw(0)).count();
        assert_eq!(allowed, 500);
    }

    #[test]
    fn zero_budget_and_floor_means_no_retries() {
        let b = budget(0.0, 0);
        b.deposit();
        assert!(!b.try_withdraw(0));
    }
}
