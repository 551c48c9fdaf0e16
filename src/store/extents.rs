//! Free slots of the write layer as extents (runs of consecutive slots), so that a multi-block
//! write can get one contiguous run (one pwrite now, one pread when read back sequentially)
//! instead of whatever single slots random overwrites left behind.

use std::collections::BTreeMap;

/// How many extents a multi-slot request scans for one long enough before settling.
const FIRST_FIT_SCAN: usize = 64;

#[derive(Default, Debug)]
pub struct FreeExtents {
    /// start -> length; extents never touch or overlap (touching ones are merged).
    runs: BTreeMap<u32, u32>,
    total: u64,
}

impl FreeExtents {
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Adds `[start, start + len)`, which must not overlap a free extent.
    pub fn insert_run(&mut self, mut start: u32, mut len: u32) {
        if len == 0 {
            return;
        }
        self.total += len as u64;
        if let Some((&p, &plen)) = self.runs.range(..start).next_back() {
            debug_assert!(p + plen <= start, "slot freed twice");
            if p + plen == start {
                self.runs.remove(&p);
                start = p;
                len += plen;
            }
        }
        if let Some(&nlen) = self.runs.get(&(start + len)) {
            self.runs.remove(&(start + len));
            len += nlen;
        }
        self.runs.insert(start, len);
    }

    /// Adds every slot of `slots` (any order, no duplicates, none already free).
    pub fn insert_all(&mut self, mut slots: Vec<u32>) {
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[i] + (j - i) as u32 {
                j += 1;
            }
            self.insert_run(slots[i], (j - i) as u32);
            i = j;
        }
    }

    /// Takes `n` slots if that many are free: one contiguous run when one of the first
    /// extents is long enough, else the lowest slots.
    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        if (n as u64) > self.total {
            return None;
        }
        let n32 = n as u32;
        let fit = self
            .runs
            .iter()
            .take(FIRST_FIT_SCAN)
            .find(|(_, &len)| len >= n32)
            .map(|(&s, &l)| (s, l));
        let mut out = Vec::with_capacity(n);
        if let Some((start, len)) = fit {
            self.runs.remove(&start);
            if len > n32 {
                self.runs.insert(start + n32, len - n32);
            }
            out.extend(start..start + n32);
        } else {
            while out.len() < n {
                let (start, len) = self.runs.pop_first()?;
                let want = (n - out.len()) as u32;
                let got = want.min(len);
                out.extend(start..start + got);
                if len > got {
                    self.runs.insert(start + got, len - got);
                }
            }
        }
        self.total -= n as u64;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_contiguous_requests_are_served_whole() {
        let mut f = FreeExtents::default();
        f.insert_all(vec![7, 3, 4, 5, 100, 101, 6, 50]);
        assert_eq!(
            f.runs.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(),
            vec![(3, 5), (50, 1), (100, 2)]
        );
        assert_eq!(f.len(), 8);
        assert_eq!(f.take(2), Some(vec![3, 4]), "first fit");
        assert_eq!(f.take(3), Some(vec![5, 6, 7]));
        assert_eq!(
            f.take(2),
            Some(vec![100, 101]),
            "skips the single slot for a run"
        );
        assert_eq!(f.take(2), None, "only one slot left");
        assert_eq!(f.take(1), Some(vec![50]));
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn fragmented_requests_take_the_lowest_slots() {
        let mut f = FreeExtents::default();
        f.insert_all(vec![1, 3, 5, 7]);
        assert_eq!(f.take(3), Some(vec![1, 3, 5]));
        f.insert_run(8, 2);
        assert_eq!(f.runs.get(&7), Some(&3), "merged with its predecessor");
        f.insert_run(6, 1);
        assert_eq!(f.runs.get(&6), Some(&4), "merged on both sides");
        assert_eq!(f.len(), 4);
    }
}
