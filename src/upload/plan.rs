//! Part sizes. Known length: one size chosen so the object fits in 10,000 parts. Unknown length:
//! start at the configured size and double every `GROWTH_EVERY` parts, so small streams use small
//! parts and a long stream still ends before part 10,001. Parts are capped by what the memory
//! budget can hold (a part is buffered whole so it can be retried): a quarter of the budget, so
//! an upload can fill its next part while earlier ones are in flight.

use crate::config::{
    MAX_OBJECT_SIZE, MAX_PART_SIZE, MAX_PARTS, MIB, MIN_PART_SIZE, UploadSettings,
};
use crate::error::Error;

/// With a 5 GiB cap this reaches 47.9 TiB for any base part size (98% of S3's maximum).
pub const GROWTH_EVERY: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    base: u64,
    cap: u64,
    fixed: bool,
    max_object: u64,
}

impl PartPlan {
    pub fn new(settings: &UploadSettings, declared: Option<u64>) -> Result<Self, Error> {
        let cap = max_part_size(settings);
        let max_object = settings
            .max_object_size
            .min(MAX_OBJECT_SIZE)
            .min(cap * MAX_PARTS);
        match declared {
            Some(len) if len > max_object => Err(too_large(len, max_object)),
            Some(len) => {
                let needed = len.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
                Ok(Self {
                    base: settings.part_size.max(needed).min(cap),
                    cap,
                    fixed: true,
                    max_object,
                })
            }
            None => Ok(Self {
                base: settings.part_size,
                cap,
                fixed: false,
                max_object,
            }),
        }
    }

    /// The size of part `number` (1-based); `None` past S3's 10,000 parts.
    pub fn part_size(&self, number: u32) -> Option<u64> {
        if u64::from(number) > MAX_PARTS || number == 0 {
            return None;
        }
        if self.fixed {
            return Some(self.base);
        }
        let doublings = (number - 1) / GROWTH_EVERY;
        let grown = if doublings < self.base.leading_zeros() {
            self.base << doublings
        } else {
            u64::MAX
        };
        Some(grown.min(self.cap).max(self.base))
    }

    /// The largest object this plan can carry (413 beyond it).
    pub fn max_object(&self) -> u64 {
        self.max_object
    }
}

/// The largest part we will buffer: S3's 5 GiB, or a quarter of the budget, whole MiB.
pub fn max_part_size(settings: &UploadSettings) -> u64 {
    (settings.memory_budget / 4 / MIB * MIB)
        .clamp(settings.part_size.max(MIN_PART_SIZE), MAX_PART_SIZE)
}

pub fn too_large(len: u64, max: u64) -> Error {
    Error::TooLarge(format!(
        "{len} bytes exceeds the maximum object size of {max} bytes (raise max_object_size or memory_budget)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GIB;

    fn settings(part_size: u64, budget: u64) -> UploadSettings {
        UploadSettings {
            memory_budget: budget,
            part_size,
            parts_in_flight: 4,
            max_object_size: MAX_OBJECT_SIZE,
        }
    }

    fn capacity(plan: &PartPlan) -> u64 {
        (1..=10_000).map(|n| plan.part_size(n).unwrap()).sum()
    }

    #[test]
    fn known_length_fits_in_10000_parts() {
        let s = settings(16 * MIB, 1024 * GIB);
        for len in [
            0,
            1,
            16 * MIB,
            16 * MIB * 10_000,
            16 * MIB * 10_000 + 1,
            1024 * GIB,
            MAX_OBJECT_SIZE,
        ] {
            let plan = PartPlan::new(&s, Some(len)).unwrap();
            let size = plan.part_size(1).unwrap();
            assert!((16 * MIB..=MAX_PART_SIZE).contains(&size) && size.is_multiple_of(MIB));
            assert!(
                len.div_ceil(size) <= MAX_PARTS,
                "{len} needs {} parts",
                len.div_ceil(size)
            );
            assert_eq!(plan.part_size(10_000), Some(size));
        }
        assert_eq!(
            PartPlan::new(&s, Some(MAX_OBJECT_SIZE))
                .unwrap()
                .part_size(1),
            Some(MAX_PART_SIZE)
        );
        assert!(matches!(
            PartPlan::new(&s, Some(MAX_OBJECT_SIZE + 1)),
            Err(Error::TooLarge(_))
        ));
    }

    #[test]
    fn unknown_length_grows_to_near_the_s3_maximum() {
        for base in [MIN_PART_SIZE, 8 * MIB, 16 * MIB, 64 * MIB] {
            let plan = PartPlan::new(&settings(base, 1024 * GIB), None).unwrap();
            assert_eq!(plan.part_size(1), Some(base));
            assert_eq!(plan.part_size(GROWTH_EVERY), Some(base));
            assert_eq!(plan.part_size(GROWTH_EVERY + 1), Some(2 * base));
            assert_eq!(plan.part_size(10_000), Some(MAX_PART_SIZE));
            assert_eq!(plan.part_size(10_001), None);
            assert_eq!(plan.part_size(0), None);
            let sizes: Vec<u64> = (1..=10_000).map(|n| plan.part_size(n).unwrap()).collect();
            assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
            assert!(
                sizes
                    .iter()
                    .all(|&s| (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&s))
            );
            // 47.9 TiB of the 48.8 TiB maximum, without ever needing part 10,001.
            assert!(
                capacity(&plan) >= 47_900 * GIB / 1000 * 1024,
                "base {base}: {}",
                capacity(&plan)
            );
        }
    }

    #[test]
    fn parts_are_capped_by_the_budget() {
        let s = settings(16 * MIB, 256 * MIB);
        assert_eq!(max_part_size(&s), 64 * MIB);
        let plan = PartPlan::new(&s, None).unwrap();
        assert_eq!(plan.part_size(10_000), Some(64 * MIB));
        assert_eq!(plan.max_object(), 64 * MIB * MAX_PARTS);
        assert!(matches!(
            PartPlan::new(&s, Some(64 * MIB * MAX_PARTS + 1)),
            Err(Error::TooLarge(_))
        ));
        // A budget of exactly one part still makes progress: the cap never drops below the base.
        assert_eq!(max_part_size(&settings(16 * MIB, 16 * MIB)), 16 * MIB);
    }

    #[test]
    fn max_object_size_setting_applies() {
        let s = UploadSettings {
            max_object_size: 1000,
            ..settings(16 * MIB, 256 * MIB)
        };
        assert!(PartPlan::new(&s, Some(1000)).is_ok());
        assert!(matches!(
            PartPlan::new(&s, Some(1001)),
            Err(Error::TooLarge(_))
        ));
        assert_eq!(PartPlan::new(&s, None).unwrap().max_object(), 1000);
    }
}
