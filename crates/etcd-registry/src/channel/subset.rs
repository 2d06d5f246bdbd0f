//! Deterministic subsetting (Google SRE book, chapter 20, "Load Balancing in
//! the Datacenter").
//!
//! The backends, sorted by id, are shuffled with a seed that is the client's
//! "round" (`client_id / subset_count`), and client `client_id` takes slice
//! `client_id % subset_count` of that order. The clients of one round
//! partition the backends exactly, so `C` clients with consecutive ids each
//! connect to `k` of `N` backends and each backend has `C·k/N` clients, give
//! or take one. The same membership always gives the same subset, so it
//! changes only when membership does.
//!
//! The shuffle uses SplitMix64 and Fisher–Yates, written out here so that the
//! order never depends on a dependency's version: every client of a service,
//! whatever it was built with, must compute the same order.

/// SplitMix64: a tiny, fixed pseudo-random sequence.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// The indices (into `sorted`, sorted by id) that client `client_id` uses
/// with subsets of `size`. All of them when there are no more than `size`.
pub(crate) fn subset<T>(sorted: &[T], client_id: u64, size: usize) -> Vec<usize> {
    let n = sorted.len();
    if size == 0 || n <= size {
        return (0..n).collect();
    }
    let subset_count = (n / size) as u64;
    let round = client_id / subset_count;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(round);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let start = (client_id % subset_count) as usize * size;
    order[start..start + size].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_of_a_round_partition_the_backends() {
        let backends: Vec<u32> = (0..1000).collect();
        let mut load = vec![0u32; 1000];
        for client in 0..50 {
            let chosen = subset(&backends, client, 10);
            assert_eq!(chosen.len(), 10);
            for i in chosen {
                load[i] += 1;
            }
        }
        assert!(load.iter().all(|&l| l <= 1), "max {:?}", load.iter().max());
        assert_eq!(load.iter().sum::<u32>(), 500);
        // 1,000 clients of 1,000 backends, 10 each: exactly 10 per backend.
        let mut load = vec![0u32; 1000];
        for client in 0..1000 {
            for i in subset(&backends, client, 10) {
                load[i] += 1;
            }
        }
        assert!(load.iter().all(|&l| l == 10));
    }

    #[test]
    fn the_same_membership_gives_the_same_subset() {
        let backends: Vec<u32> = (0..100).collect();
        assert_eq!(subset(&backends, 7, 5), subset(&backends, 7, 5));
        assert_eq!(subset(&backends[..3], 7, 5), vec![0, 1, 2]);
    }
}
